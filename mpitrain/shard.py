"""Which samples each rank uses at each step.

Sharding (:class:`ShardSampler`) is a pure function of (seed, epoch, rank, size): the epoch's
order is a permutation drawn from (seed, epoch) alone -- the same on every rank and for every
rank count -- and global step k of the epoch takes the next ``global_batch`` samples of it
(``size * batch_size`` unless a resumed run keeps its own), rank r the r-th of ``size``
contiguous blocks, as equal as integers allow (sizes differ by at most one).  So with per-rank
batch b, P ranks see exactly the samples one process sees with batch P*b, shuffled or not; and
a run resumed on another rank count (elastic resume, a shrunk communicator) keeps its global
batch: the same samples per step, split unevenly where P no longer divides it.  Every sample
is weighted by 1/(samples in the global batch), so the gradients' sum over ranks is the exact
mean whatever the split.  Nothing is ever padded with duplicated samples: the last partial
global batch is dropped (``tail = "drop"``) or split over the ranks as far as it goes
(``tail = "weighted"``; ranks past the end get no samples).
"""
from __future__ import annotations

import numpy as np


class ShardSampler:
    """Which samples rank ``rank`` of ``size`` uses at each step (see the module docstring).

    ``global_batch`` defaults to ``batch_size * size``; a resumed or shrunk run passes the one
    it started with.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, rank: int, size: int, seed: int,
                 shuffle: bool, tail: str, global_batch: int | None = None):
        self.indices, self.batch_size = indices, batch_size
        self.rank, self.size, self.seed = rank, size, seed
        self.shuffle, self.tail = shuffle, tail
        self.global_batch = global_batch or batch_size * size
        n = len(indices)
        if tail == "drop":
            self.steps_per_epoch = n // self.global_batch
        else:
            self.steps_per_epoch = -(-n // self.global_batch)

    def resized(self, rank: int, size: int) -> "ShardSampler":
        """The same sampling on a world of another ``size``: same global batch, same steps,
        the batch split into ``size`` blocks instead."""
        return ShardSampler(self.indices, self.batch_size, rank, size, self.seed, self.shuffle,
                            self.tail, self.global_batch)

    def bounds(self, rank: int) -> tuple[int, int]:
        """[lo, hi) of rank ``rank``'s block within a full global batch."""
        return rank * self.global_batch // self.size, (rank + 1) * self.global_batch // self.size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's sample order: a function of (seed, epoch) only, never of rank or size."""
        if not self.shuffle:
            return self.indices
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0xE90C, epoch]))
        return self.indices[rng.permutation(len(self.indices))]

    def shard(self, epoch: int, step_in_epoch: int, order: np.ndarray | None = None
              ) -> tuple[np.ndarray, int]:
        """(this rank's sample indices, samples in the whole global batch) for one step."""
        if order is None:
            order = self.epoch_order(epoch)
        start = step_in_epoch * self.global_batch
        batch = order[start:start + self.global_batch]
        lo, hi = self.bounds(self.rank)
        return batch[lo:hi], len(batch)

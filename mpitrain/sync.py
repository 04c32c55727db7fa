"""Per-layer gradient synchronization: start each layer's allreduce as soon as it is ready.

Protocol, on every rank, in the same order (collectives must match across ranks):

    sync.begin(step)
    for i in model.backward(dz):      # last layer first
        sync.layer_ready(i)           # overlap on: starts layer i's allreduce now
    waited = sync.finish()            # every gradient buffer now holds the MEAN over ranks

Each rank hands in gradients that are already the mean over *its* samples weighted so that
the sum over ranks divided by ``size`` is the mean over the global batch (see train.py); the
allreduce sums, ``finish`` divides by ``size``.  With overlap off, nothing is sent during
backward and ``finish`` reduces the layers one after another (last layer first), which is
the reference to measure overlap against.

Why poke: MPI implementations without an asynchronous progress thread (MPICH's default)
only advance a non-blocking collective while the process is inside an MPI call.  Testing
the outstanding requests between layers lets layer k's reduction run during the backward
of layer k-1 instead of all of it piling up in ``finish``.
"""
from __future__ import annotations

import hashlib
import time

import numpy as np

from .errors import DivergenceError


class GradientSync:
    """Averages a fixed list of flat gradient buffers across ranks, layer by layer."""

    def __init__(self, allreducer, buffers: list, size: int, overlap: bool = True):
        self.allreducer, self.buffers, self.size, self.overlap = allreducer, buffers, size, overlap
        self.step = 0
        self._pending: list[tuple[int, object]] = []
        self._scale = 1.0 / size
        # GPU buffers travel through pinned host copies: the MPI from PyPI is not CUDA-aware.
        self._host = [_pinned_like(b) for b in buffers] if _on_gpu(buffers) else None

    def _wire(self, layer: int):
        """The buffer MPI sees for ``layer``: the gradient itself, or its host copy."""
        if self._host is None:
            return self.buffers[layer]
        self.buffers[layer].get(out=self._host[layer])
        return self._host[layer]

    def begin(self, step: int) -> None:
        """Start a step: no layer is outstanding."""
        assert not self._pending, "finish() was not called for the previous step"
        self.step = step

    def layer_ready(self, layer: int) -> None:
        """Layer ``layer``'s gradients are final; with overlap on, start its allreduce."""
        if not self.overlap:
            return
        self._pending.append((layer, self.allreducer.start(self._wire(layer), self.step, layer)))
        for _, handle in self._pending:
            self.allreducer.test(handle)

    def finish(self) -> float:
        """Complete every layer's reduction and average; return the seconds spent waiting."""
        t0 = time.perf_counter()
        if self.overlap:
            for _, handle in self._pending:
                self.allreducer.wait(handle)
        else:
            for layer in range(len(self.buffers) - 1, -1, -1):
                self.allreducer.wait(self.allreducer.start(self._wire(layer), self.step, layer))
        self._pending.clear()
        waited = time.perf_counter() - t0
        if self._host is not None:
            for buf, host in zip(self.buffers, self._host):
                buf.set(host)
        if self.size > 1:
            for buf in self.buffers:
                buf *= self._scale
        return waited


def _on_gpu(buffers: list) -> bool:
    return bool(buffers) and hasattr(buffers[0], "__cuda_array_interface__")


def _pinned_like(buf) -> np.ndarray:
    import cupyx
    return cupyx.empty_pinned(buf.shape, buf.dtype)


def layer_digests(arrays: list) -> list[str]:
    """A short hash of each layer's parameter bytes (host copy for GPU arrays)."""
    out = []
    for a in arrays:
        host = a.get() if hasattr(a, "get") else np.ascontiguousarray(a)
        out.append(hashlib.blake2b(host.tobytes(), digest_size=8).hexdigest())
    return out


def verify_replicas(comm, arrays: list, step: int, rank: int) -> None:
    """Collective: raise DivergenceError on every rank if any replica differs from rank 0's.

    Names every rank that differs and the first layer (from the input side) where it does.
    """
    mine = layer_digests(arrays)
    everyone = comm.allgather(mine)
    bad = [(r, next(i for i, (a, b) in enumerate(zip(d, everyone[0])) if a != b))
           for r, d in enumerate(everyone) if d != everyone[0]]
    if bad:
        where = "; ".join(f"rank {r} differs from rank 0 first at layer {i}" for r, i in bad)
        when = "before step 1" if step == 0 else f"after step {step}"
        raise DivergenceError(f"replicas are not identical {when}: {where}",
                              hint="replicas must start equal and stay equal: check [model] init "
                                   "and the fault plan (lossy delivery lets them drift)",
                              reporter=0)

"""Optimizers and learning-rate schedules.

An optimizer updates each layer's flat parameter buffer in place from the layer's flat,
already averaged, gradient buffer, slice by slice, allocating nothing.  It never talks to
other ranks: every rank applies the same update to the same averaged gradient, so replicas
stay bitwise identical.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .backend import to_host

if TYPE_CHECKING:
    from .config import OptimConfig

SLOTS = {"sgd": (), "momentum": ("velocity",), "adam": ("m", "v")}


def learning_rate(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """The learning rate of global step ``step`` (1-based)."""
    lr = cfg.lr
    if cfg.schedule == "step":
        lr *= cfg.gamma ** ((step - 1) // cfg.step_size)
    elif cfg.schedule == "cosine":
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps - 1, 0) / span, 1.0)
        lr *= 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        lr *= step / cfg.warmup_steps
    return lr


BLOCK_BYTES = 1 << 18  # CPU updates go slice by slice: the temporaries stay in the L2 cache


class Optimizer:
    """SGD, momentum (heavy ball) or Adam over a list of flat parameter buffers.

    sgd:      p -= lr * g
    momentum: v = mu * v + g;                 p -= lr * v
    adam:     m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
              p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
    ``weight_decay`` adds wd * p to g first (L2 regularisation).

    On the CPU every update runs over slices of :data:`BLOCK_BYTES` with one small scratch
    buffer, so each temporary is written and read back while still in cache: after a
    backward pass, the SGD step of a 7 MiB model takes 1.0 ms here against 1.2 ms in
    whole-layer slices (``python benchmarks/optim_step.py``).  The arithmetic is
    element-wise, so the result is bitwise that of whole-buffer updates (tested).
    """

    def __init__(self, cfg: OptimConfig, params: list, xp: Any = np):
        self.cfg, self.xp, self.params = cfg, xp, params
        self.t = 0
        self.state = {slot: [xp.zeros_like(p) for p in params] for slot in SLOTS[cfg.name]}
        biggest = max((p.size for p in params), default=0)
        itemsize = params[0].dtype.itemsize if params else 8
        # a GPU runs a whole layer per kernel: slicing would only add launches
        self._block = max(1, BLOCK_BYTES // itemsize) if xp is np else max(biggest, 1)
        self._tmp = xp.empty(min(biggest, self._block), params[0].dtype if params else float)

    def step(self, grads: list, lr: float) -> None:
        """Apply one update; ``grads[i]`` matches ``params[i]`` (flat, averaged)."""
        self.t += 1
        slots = [self.state[s] for s in SLOTS[self.cfg.name]]
        blk = self._block
        for i, (p, g) in enumerate(zip(self.params, grads)):
            state = [s[i] for s in slots]
            for a in range(0, p.size, blk):
                piece = p[a:a + blk]
                self._update(piece, g[a:a + blk], [s[a:a + blk] for s in state],
                             self._tmp[:piece.size], lr)

    def _update(self, p, g, state: list, tmp, lr: float) -> None:
        """One slice: ``p``, ``g`` and the state slots are matching views, ``tmp`` scratch."""
        cfg, xp = self.cfg, self.xp
        if cfg.weight_decay:  # the gradient buffer is ours until the next backward
            xp.multiply(p, cfg.weight_decay, out=tmp)
            g += tmp
        if cfg.name == "sgd":
            xp.multiply(g, lr, out=tmp)
            p -= tmp
        elif cfg.name == "momentum":
            v, = state
            v *= cfg.momentum
            v += g
            xp.multiply(v, lr, out=tmp)
            p -= tmp
        else:
            m, v = state
            self._adam(p, g, m, v, tmp, lr)

    def _adam(self, p, g, m, v, tmp, lr: float) -> None:
        cfg, xp = self.cfg, self.xp
        m *= cfg.beta1
        xp.multiply(g, 1 - cfg.beta1, out=tmp)
        m += tmp
        v *= cfg.beta2
        xp.multiply(g, g, out=tmp)
        tmp *= 1 - cfg.beta2
        v += tmp
        # p -= lr_t * m / (sqrt(v) + eps_t), the bias corrections folded into two scalars
        c1, c2 = 1 - cfg.beta1 ** self.t, 1 - cfg.beta2 ** self.t
        xp.sqrt(v, out=tmp)
        tmp *= 1 / math.sqrt(c2)
        tmp += cfg.eps
        xp.divide(m, tmp, out=tmp)
        tmp *= lr / c1
        p -= tmp

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"optim.t": np.array(self.t)}
        for slot, bufs in self.state.items():
            for i, b in enumerate(bufs):
                out[f"optim.{slot}.{i}"] = to_host(b)
        return out

    def load_state_dict(self, arrays) -> None:
        self.t = int(arrays["optim.t"])
        for slot, bufs in self.state.items():
            for i, b in enumerate(bufs):
                b[...] = self.xp.asarray(arrays[f"optim.{slot}.{i}"])

"""Optimizers and learning-rate schedules.

An optimizer updates each layer's flat parameter buffer in place from the layer's flat,
already averaged, gradient buffer: one pass per layer and state slot.  It never talks to
other ranks: every rank applies the same update to the same averaged gradient, so replicas
stay bitwise identical.
"""
from __future__ import annotations

import math

import numpy as np

SLOTS = {"sgd": (), "momentum": ("velocity",), "adam": ("m", "v")}


def learning_rate(cfg, step: int, total_steps: int) -> float:
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


class Optimizer:
    """SGD, momentum (heavy ball) or Adam over a list of flat parameter buffers.

    sgd:      p -= lr * g
    momentum: v = mu * v + g;                 p -= lr * v
    adam:     m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
              p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
    ``weight_decay`` adds wd * p to g first (L2 regularisation).
    """

    def __init__(self, cfg, params: list, xp=np):
        self.cfg, self.xp, self.params = cfg, xp, params
        self.t = 0
        self.state = {slot: [xp.zeros_like(p) for p in params] for slot in SLOTS[cfg.name]}
        self._tmp = [xp.empty_like(p) for p in params]  # no allocation in the step

    def step(self, grads: list, lr: float) -> None:
        """Apply one update; ``grads[i]`` matches ``params[i]`` (flat, averaged)."""
        self.t += 1
        cfg, xp = self.cfg, self.xp
        for i, (p, g) in enumerate(zip(self.params, grads)):
            tmp = self._tmp[i]
            if cfg.weight_decay:  # the gradient buffer is ours until the next backward
                xp.multiply(p, cfg.weight_decay, out=tmp)
                g += tmp
            if cfg.name == "sgd":
                xp.multiply(g, lr, out=tmp)
                p -= tmp
            elif cfg.name == "momentum":
                v = self.state["velocity"][i]
                v *= cfg.momentum
                v += g
                xp.multiply(v, lr, out=tmp)
                p -= tmp
            else:
                self._adam(p, g, self.state["m"][i], self.state["v"][i], tmp, lr)

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
                out[f"optim.{slot}.{i}"] = b.get() if hasattr(b, "get") else np.array(b)
        return out

    def load_state_dict(self, arrays) -> None:
        self.t = int(arrays["optim.t"])
        for slot, bufs in self.state.items():
            for i, b in enumerate(bufs):
                b[...] = self.xp.asarray(arrays[f"optim.{slot}.{i}"])

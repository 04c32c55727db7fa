"""The model replica: dense layers, activations, losses; forward and backward by hand.

Conventions (those of the parameter files and of the chapter):

* layer i (0 at the input side) computes ``z = a_prev @ W + b`` with W of shape
  (fan_in, fan_out), then ``a = f(z)``;
* ``mse`` is 0.5 * (mean over the batch) of the sum of squared errors;
  ``cross_entropy`` is the mean over the batch of -sum(t * log p) on softmax outputs;
* each layer keeps its parameters -- and its gradients -- in ONE flat contiguous buffer,
  with the weight and bias as views into it.  Backward writes a layer's gradients straight
  into its buffer, which is exactly what the synchronizer reduces (no packing copy) and what
  the optimizer updates in one pass.  The gradient buffers are themselves views into one
  arena, last layer first, so any run of consecutive layers is one contiguous slice
  (:meth:`MLP.grad_span`): a fused allreduce of several layers needs no packing either.

``backward`` is a generator that yields each layer's index as soon as that layer's gradients
exist, last layer first, so the caller can start the layer's allreduce while the backward
pass goes on to the layer before (the overlap of the chapter's Figure 2-12).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from .backend import to_host
from .errors import ConfigError
from .schema import suggest

if TYPE_CHECKING:
    from .config import ModelConfig

@dataclass
class LayerBuffer:
    """One layer's parameters (or gradients): a flat buffer and two views into it."""

    flat: Any      # 1-D array of fan_in*fan_out + fan_out (NumPy or CuPy)
    weight: Any    # (fan_in, fan_out) view
    bias: Any      # (fan_out,) view

    @classmethod
    def zeros(cls, fan_in: int, fan_out: int, dtype, xp) -> "LayerBuffer":
        return cls.over(xp.zeros(fan_in * fan_out + fan_out, dtype=dtype), fan_in, fan_out)

    @classmethod
    def over(cls, flat, fan_in: int, fan_out: int) -> "LayerBuffer":
        """Weight and bias views of ``flat`` (fan_in*fan_out + fan_out elements)."""
        return cls(flat, flat[:fan_in * fan_out].reshape(fan_in, fan_out), flat[fan_in * fan_out:])


def activate(name: str, z, xp):
    if name == "relu":
        return xp.maximum(z, 0)
    if name == "sigmoid":
        return 1.0 / (1.0 + xp.exp(-z))
    if name == "tanh":
        return xp.tanh(z)
    if name == "softmax":
        e = xp.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return z


def activation_backward(name: str, z, a, da, xp):
    """dL/dz from dL/da for an element-wise activation (softmax is handled by the loss)."""
    if name == "relu":
        return da * (z > 0)
    if name == "sigmoid":
        return da * a * (1 - a)
    if name == "tanh":
        return da * (1 - a * a)
    return da


class MLP:
    """A stack of dense layers; hidden layers use ``activation``, the last one ``output``."""

    def __init__(self, n_inputs: int, widths: list[int], activation: str = "relu",
                 output: str = "softmax", loss: str = "cross_entropy", dtype="float64", xp=np):
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.sizes = [n_inputs, *widths]
        self.activations = [activation] * (len(widths) - 1) + [output]
        self.loss_name = loss
        shapes = list(zip(self.sizes[:-1], self.sizes[1:]))
        self.params = [LayerBuffer.zeros(i, o, self.dtype, xp) for i, o in shapes]
        # gradients: one arena, last layer first (see the module docstring)
        sizes = [i * o + o for i, o in shapes]
        self.grad_arena = xp.zeros(sum(sizes), dtype=self.dtype)
        self._grad_start = [sum(sizes[k + 1:]) for k in range(len(sizes))]
        self.grads = [LayerBuffer.over(self.grad_arena[a:a + n], i, o)
                      for a, n, (i, o) in zip(self._grad_start, sizes, shapes)]
        self._cache: list = []

    @property
    def n_layers(self) -> int:
        return len(self.params)

    def buckets(self, bucket_bytes: int) -> list[tuple[int, int]]:
        """The fused allreduces of ``[sync] bucket_bytes``: layer ranges, last first
        (:func:`plan_buckets` over this model's gradient sizes)."""
        return plan_buckets([g.flat.nbytes for g in self.grads], bucket_bytes)

    def grad_span(self, lo: int, hi: int):
        """The gradients of layers ``lo..hi`` (inclusive) as one contiguous 1-D view.

        The arena holds them last layer first: layer ``hi`` at the front, ``lo`` at the end.
        """
        return self.grad_arena[self._grad_start[hi]:self._grad_start[lo] + self.grads[lo].flat.size]

    # ------------------------------------------------------------------ parameters
    def init(self, scheme: str, seed: int) -> None:
        """Seeded initialisation, identical on every rank; biases start at zero.

        he: N(0, 2/fan_in); xavier: U(+-sqrt(6/(fan_in+fan_out))); normal: N(0, 0.01^2);
        auto: he for relu networks, xavier otherwise.
        """
        if scheme == "auto":
            scheme = "he" if self.activations[0] == "relu" else "xavier"
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1A17]))
        for p, (fan_in, fan_out) in zip(self.params, zip(self.sizes[:-1], self.sizes[1:])):
            if scheme == "he":
                w = rng.normal(0.0, np.sqrt(2.0 / fan_in), (fan_in, fan_out))
            elif scheme == "xavier":
                lim = np.sqrt(6.0 / (fan_in + fan_out))
                w = rng.uniform(-lim, lim, (fan_in, fan_out))
            elif scheme == "normal":
                w = rng.normal(0.0, 0.01, (fan_in, fan_out))
            else:
                raise ConfigError(f"[model] init = {scheme!r}: allowed are auto, he, xavier, "
                                  f"normal, or a path to an .npz of parameters")
            p.weight[...] = self.xp.asarray(w.astype(self.dtype))
            p.bias[...] = 0

    def state(self) -> dict[str, np.ndarray]:
        """Parameters as host arrays under the parameter-file keys."""
        out = {}
        for i, p in enumerate(self.params):
            out[f"layers.{i}.weight"] = to_host(p.weight)
            out[f"layers.{i}.bias"] = to_host(p.bias)
        return out

    def load_state(self, arrays, where: str) -> None:
        """Copy parameters from a mapping with the parameter-file keys; check every shape."""
        expected = {f"layers.{i}.{k}": getattr(p, k).shape
                    for i, p in enumerate(self.params) for k in ("weight", "bias")}
        extra = sorted(set(arrays) - set(expected))
        if extra:
            raise ConfigError(f"{where}: unexpected arrays {', '.join(extra)}; a model with "
                              f"{self.n_layers} layers has {', '.join(expected)}")
        for i, p in enumerate(self.params):
            for k in ("weight", "bias"):
                name = f"layers.{i}.{k}"
                if name not in arrays:
                    raise ConfigError(f"{where}: missing {name}; expected shape {expected[name]}")
                value = np.asarray(arrays[name])
                if value.shape != expected[name]:
                    raise ConfigError(f"{where}: {name} has shape {value.shape}, the model "
                                      f"needs {expected[name]} (y = x @ W + b, W is fan_in x "
                                      f"fan_out)")
                if value.dtype.kind not in "biuf" or not np.isfinite(value).all():
                    raise ConfigError(f"{where}: {name} holds "
                                      f"{'non-numbers' if value.dtype.kind not in 'biuf' else 'NaN or Inf'}"
                                      f"; parameters must be finite real numbers",
                                      hint="write the parameter file again, or use an init "
                                           "scheme (" + ", ".join(INIT_SCHEMES) + ")")
                getattr(p, k)[...] = self.xp.asarray(value.astype(self.dtype))

    def load_file(self, path: str | Path) -> None:
        where = f"[model] init = {str(path)!r}"
        try:
            z = np.load(path)
        except FileNotFoundError:
            close = suggest(str(path), INIT_SCHEMES)
            raise ConfigError(f"{where}: no such file, and not an init scheme{close}",
                              hint="use one of " + ", ".join(INIT_SCHEMES) +
                                   ", or a path to an .npz of parameters") from None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"{where}: not a readable .npz ({exc})") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ConfigError(f"{where}: not an .npz of parameters (a single array)",
                              hint="save with numpy.savez(path, **{'layers.0.weight': W0, ...})")
        with z:
            try:
                arrays = {k: z[k] for k in z.files}
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise ConfigError(f"{where}: not a readable .npz ({exc})") from None
        self.load_state(arrays, where)

    # ------------------------------------------------------------------ passes
    def forward(self, x):
        """Output of the network for inputs ``x`` (batch, n_inputs); keeps what backward needs."""
        self._cache = [x]
        a = x
        for p, act in zip(self.params, self.activations):
            z = a @ p.weight
            z += p.bias
            a = activate(act, z, self.xp)
            self._cache.append((z, a))
        return a

    def layer_values(self, i: int) -> tuple:
        """(z, a) of layer ``i`` in the last ``forward``: its weighted sums and activations."""
        return self._cache[i + 1]

    def loss(self, out, target, weight: float) -> tuple[float, object]:
        """(sum over samples of weight * loss_i, dL/dz of the output layer).

        ``weight`` is the factor of each sample, 1/batch for a plain mean.  Only one
        forward may be outstanding: this uses the cache of the last ``forward``.
        """
        xp, act = self.xp, self.activations[-1]
        if self.loss_name == "mse":
            diff = out - target
            value = 0.5 * float((diff * diff).sum()) * weight
            dout = diff * weight
            if act == "softmax":  # Jacobian of softmax: dz = p * (g - <g, p>)
                return value, out * (dout - (dout * out).sum(axis=1, keepdims=True))
            z = self._cache[-1][0]
            return value, activation_backward(act, z, out, dout, xp)
        # cross-entropy on softmax probabilities; dz = p * sum(t) - t (= p - t for one-hot)
        value = -float((target * xp.log(xp.maximum(out, np.finfo(self.dtype).tiny))).sum()) * weight
        return value, (out * target.sum(axis=1, keepdims=True) - target) * weight

    def backward(self, dz) -> Iterator[int]:
        """Write every layer's gradients, last layer first; yield each layer's index when done.

        ``dz`` is dL/dz of the output layer (from :meth:`loss`).  The caller may hand the
        yielded layer's ``grads[i].flat`` to the synchronizer at once: backward never touches
        a layer's gradient buffer again after yielding it.
        """
        xp = self.xp
        for i in range(self.n_layers - 1, -1, -1):
            a_prev = self._cache[i] if i == 0 else self._cache[i][1]
            g = self.grads[i]
            xp.matmul(a_prev.T, dz, out=g.weight)
            xp.sum(dz, axis=0, out=g.bias)
            if i > 0:
                da = dz @ self.params[i].weight.T
                z_prev, a_prev_act = self._cache[i]
                dz = activation_backward(self.activations[i - 1], z_prev, a_prev_act, da, xp)
            yield i

    def correct(self, out, target) -> int:
        """How many rows of ``out`` pick the class ``target`` marks (one-hot or soft labels)."""
        return int((out.argmax(axis=1) == target.argmax(axis=1)).sum())


def plan_buckets(nbytes: Sequence[float], bucket_bytes: int) -> list[tuple[int, int]]:
    """Group layers into fused allreduces: ``(lo, hi)`` layer ranges, last layer first.

    ``nbytes[i]`` is layer i's gradient size.  Walking from the last layer to the first, a
    bucket takes layers until their gradients hold at least ``bucket_bytes``; the bucket of
    layer 0 takes what is left.  0 gives one bucket per layer.  So small layers ride with
    their neighbours instead of each paying a collective's latency, and a big layer closes
    its bucket at once.  Each bucket is one slice of the gradient arena (:meth:`MLP.grad_span`).
    """
    buckets: list[tuple[int, int]] = []
    hi, held = len(nbytes) - 1, 0.0
    for layer in range(len(nbytes) - 1, -1, -1):
        held += nbytes[layer]
        if held >= bucket_bytes or layer == 0:
            buckets.append((layer, hi))
            hi, held = layer - 1, 0
    return buckets


INIT_SCHEMES = ("auto", "he", "xavier", "normal")


def build(model_cfg: ModelConfig, n_inputs: int, seed: int, xp: Any = np) -> MLP:
    """The replica a job's ``[model]`` section describes, initialised from ``seed`` (or the
    ``init`` file): the same parameters on every rank."""
    m = model_cfg
    model = MLP(n_inputs, m.layers, m.activation, m.output, m.loss, m.dtype, xp)
    if m.init in INIT_SCHEMES:
        model.init(m.init, seed)
    else:
        model.load_file(m.init)
    return model

"""``mpitrain explain --scenario``: one step of the chapter's two-GPU scenario.

One step of ``jobs/chapter/two_gpus.toml`` (or another job) with two replicas in one
process, GPU-A (rank 0) and GPU-B (rank 1), each on its own half of one global batch, the
same shards and initial parameters as ``mpitrain run -n 2`` uses at step 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import config, data, jobs, shard
from ..errors import DataError
from ..metrics import fmt
from ..model import MLP
from ..model import build as build_model
from ..optim import Optimizer, learning_rate

DEFAULT_JOB = jobs.folder() / "chapter" / "two_gpus.toml"
RANK_NAMES = ("GPU-A", "GPU-B")


def two_gpu_step(job: str | Path = DEFAULT_JOB) -> dict:
    """One step of ``job`` with two replicas in one process, rank A and rank B.

    Each replica gets the shard ``mpitrain run -n 2`` gives that rank at step 1 and the same
    initial parameters; each runs forward, loss and backward, and the gradients each would
    hand to the allreduce are recorded per layer in the order backward yields them (last
    layer first).  Each rank weights its samples by 1/(global batch), as train.py does, so
    what it sends is its share of the mean and the allreduce's SUM is the average over the
    global batch; that is checked against one replica run on the whole global batch.
    """
    cfg = config.load(job)
    size = len(RANK_NAMES)
    dataset = data.load(cfg.data, cfg.run.seed)
    train_idx, _ = data.split(len(dataset.x), cfg.data.val_fraction, cfg.run.seed)
    samplers = [shard.ShardSampler(train_idx, cfg.data.batch_size, rank, size, cfg.run.seed,
                                  cfg.data.shuffle, cfg.data.tail) for rank in range(size)]
    replicas = [_replica(cfg, dataset) for _ in range(size)]
    sends: list[dict] = []
    order: list[int] = []
    losses: list[float] = []
    shards: list[np.ndarray] = []
    for sampler, model in zip(samplers, replicas):
        idx, n_global = sampler.shard(0, 0)
        if len(idx) == 0:
            raise DataError(f"{job}: the first global batch leaves a rank without samples",
                            hint="use more samples or a smaller [data] batch_size")
        x, y = dataset.batch(idx, model.dtype, np)
        grads, loss, order = _local_step(model, x, y, 1.0 / n_global)
        sends.append(grads)
        losses.append(loss)
        shards.append(idx)

    # What sync.finish leaves in every buffer: the allreduce's sum of the ranks' shares.
    average = {i: sends[0][i] + sends[1][i] for i in order}
    reference = _global_batch_gradients(dataset, np.concatenate(shards), replicas[0])
    layers = [_layer_report(replicas[0], i, [s[i] for s in sends], average[i]) for i in order]
    return {
        "job": str(job), "ranks": list(RANK_NAMES), "dtype": cfg.model.dtype,
        "sizes": replicas[0].sizes, "global_batch": int(sum(len(s) for s in shards)),
        "samples_per_rank": [len(s) for s in shards],
        "local_loss": losses, "global_loss": float(sum(losses)),
        "order": order, "layers": layers,
        "total_values": sum(l["values"] for l in layers),
        "total_bytes": {dt: sum(l["bytes"][dt] for l in layers) for dt in ("float32", "float64")},
        "max_abs_diff_vs_global_batch": max(float(np.abs(average[i] - reference[i]).max())
                                            for i in order),
        "backward_needs_only_local_error_terms": _backward_is_local(
            replicas[0], sends[0], dataset, shards[0], 1.0 / n_global),
        "params_after_step": _apply(cfg, replicas[0], average, samplers[0]),
    }


def _replica(cfg, dataset: data.Dataset) -> MLP:
    """A model replica built and initialised exactly as ``train.setup`` does."""
    return build_model(cfg.model, dataset.features, cfg.run.seed)


def _local_step(model: MLP, x, y, weight: float) -> tuple[dict, float, list[int]]:
    """Forward, loss and backward on one rank's shard.

    Each sample is weighted 1/n_global, as in train.py, so the sum over ranks is the mean
    over the global batch.  Returns {layer: flat gradients as
    handed to the allreduce}, the weighted loss sum, and the order the layers came in.
    """
    loss, dz = model.loss(model.forward(x), y, weight)
    grads, order = {}, []
    for i in model.backward(dz):
        grads[i] = model.grads[i].flat.copy()
        order.append(i)
    return grads, loss, order


def _global_batch_gradients(dataset, idx, like: MLP) -> dict:
    """The gradients of ONE replica on the whole global batch: what the average must equal."""
    model = _clone(like)
    x, y = dataset.batch(idx, model.dtype, np)
    return _local_step(model, x, y, 1.0 / len(idx))[0]


def _backward_is_local(model: MLP, sent: dict, dataset, idx, weight: float) -> bool:
    """Does layer k-1's backward need layer k's (averaged) gradient?  Find out.

    Re-run rank A's backward and, the moment each layer is yielded, overwrite its gradient
    buffer with NaN -- as if the average had not arrived yet.  If every earlier layer still
    gets the same gradients, backward only used the local error term and the weights, which
    is why a layer's allreduce can overlap the backward pass of the layers before it.
    """
    probe = _clone(model)
    x, y = dataset.batch(idx, probe.dtype, np)
    _, dz = probe.loss(probe.forward(x), y, weight)
    same = True
    for i in probe.backward(dz):
        same &= bool(np.array_equal(probe.grads[i].flat, sent[i]))
        probe.grads[i].flat[...] = np.nan
    return same


def _layer_report(model: MLP, i: int, sent: list, average) -> dict:
    """One layer's line of the scenario: shapes, values, bytes, what is sent and the mean."""
    fan_in, fan_out = model.sizes[i], model.sizes[i + 1]
    n = fan_in * fan_out + fan_out

    def split(flat) -> dict:
        return {"weight": flat[:fan_in * fan_out].reshape(fan_in, fan_out).tolist(),
                "bias": flat[fan_in * fan_out:].tolist()}

    return {"layer": i, "weight_shape": [fan_in, fan_out], "bias_shape": [fan_out],
            "values": n, "bytes": {"float32": 4 * n, "float64": 8 * n},
            "sent": {name: split(s) for name, s in zip(RANK_NAMES, sent)},
            "average": split(average)}


def _apply(cfg, model: MLP, average: dict, sampler: shard.ShardSampler) -> dict:
    """Parameters after step 1: the job's optimizer on the averaged gradients."""
    model = _clone(model)
    total = cfg.run.steps or (cfg.run.epochs or 10) * sampler.steps_per_epoch
    optim = Optimizer(cfg.optim, [p.flat for p in model.params], np)
    optim.step([average[i] for i in range(model.n_layers)], learning_rate(cfg.optim, 1, total))
    return {k: v.tolist() for k, v in model.state().items()}


def _clone(model: MLP) -> MLP:
    """A separate replica with the same architecture and parameters."""
    copy = MLP(model.sizes[0], model.sizes[1:], model.activations[0], model.activations[-1],
               model.loss_name, model.dtype, np)
    copy.load_state(model.state(), "the scenario's replica")
    return copy


def format_scenario(s: dict) -> str:
    """The scenario as text: per layer, last first, what each GPU sends and the average."""
    arch = " -> ".join(map(str, s["sizes"]))
    L = [
        f"One step of the chapter's two-GPU scenario ({_shown(s['job'])})",
        f"  model {arch} (two hidden layers of four neurons, one output), dtype {s['dtype']}",
        f"  global batch {s['global_batch']}: GPU-A (rank 0) takes {s['samples_per_rank'][0]}"
        f" samples, GPU-B (rank 1) the other {s['samples_per_rank'][1]}",
        f"  loss over the global batch {fmt(s['global_loss'], 6)} (GPU-A's half contributes "
        f"{fmt(s['local_loss'][0], 6)}, GPU-B's {fmt(s['local_loss'][1], 6)})",
        "",
        "Backward pass, layer by layer as it produces them (last layer first); each layer's",
        "gradients go into one allreduce as soon as they exist.  Each GPU weights its samples",
        f"by 1/{s['global_batch']} (the global batch), so it sends its share of the mean and the",
        "allreduce's sum is the average over the global batch -- the chapter's average of the",
        "two GPUs' gradients, without a separate division:",
    ]
    for l in s["layers"]:
        fi, fo = l["weight_shape"]
        L.append("")
        L.append(f"layer {l['layer']} ({fi} -> {fo}): dW {fi}x{fo} + db {fo} = {l['values']} "
                 f"gradients = {l['bytes']['float32']} B as float32, "
                 f"{l['bytes']['float64']} B as float64, per rank")
        for who, g in [*l["sent"].items(), ("average", l["average"])]:
            label = f"{who} sends" if who != "average" else "sum = average"
            if fo == 1:  # one output neuron: its weight column reads better as a row
                L.append(f"  {label:<18} dW^T = {_fmt_row(w[0] for w in g['weight'])}")
                L.append(f"  {'':<18} db   = {_fmt_row(g['bias'])}")
            else:
                L += _matrix(f"  {label:<18} dW", g["weight"])
                L.append(f"  {'':<18} db = {_fmt_row(g['bias'])}")
    t = s["total_bytes"]
    L += [
        "",
        f"Per step each rank contributes {s['total_values']} gradients: {t['float32']} B as "
        f"float32, {t['float64']} B as float64",
        "  (the payload of the three allreduces; a ring allreduce on p ranks sends 2(p-1)/p",
        "  of it per rank, so at p = 2 each GPU sends its payload once and receives it once).",
        f"The average equals the gradient of one replica on the whole global batch: max |diff|"
        f" = {s['max_abs_diff_vs_global_batch']:.3g}",
        "",
        "What waits for what",
        "  GPU-A's backward for layer k-1 uses its LOCAL error term of layer k and the weights",
        "  of layer k (identical on both ranks), never the averaged gradient of layer k.  Check:",
        "  re-running GPU-A's backward with each layer's gradient buffer overwritten by NaN as",
        "  soon as it is yielded gives the same gradients for every earlier layer: "
        f"{s['backward_needs_only_local_error_terms']}.",
        "  So layer k's allreduce can run while backward computes layer k-1 ([sync] overlap).",
        "  The averages are needed only for the weight update.  That is what the chapter's",
        "  \"the neurons in the preceding layer cannot calculate their gradient\" is about: the",
        "  synchronized step as a whole.  Without every layer's average no replica can apply",
        "  the update, and a replica that applied a different one would drift from the others.",
    ]
    return "\n".join(L)


def _shown(path: str) -> str:
    """``path`` as the user knows it: a built-in job as ``jobs/NAME.toml`` (the repository's
    folder, and a name every command accepts), else relative to the working directory when
    it lies below it."""
    p = Path(path).resolve()
    if p.is_relative_to(jobs.folder()):
        return f"jobs/{p.relative_to(jobs.folder()).as_posix()}"
    return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)


def _fmt_row(values) -> str:
    return "[" + " ".join(f"{v:+.4f}" for v in values) + "]"


def _matrix(prefix: str, rows) -> list[str]:
    pad = " " * len(prefix)
    return [f"{prefix if k == 0 else pad} {'=' if k == 0 else ' '} {_fmt_row(row)}"
            for k, row in enumerate(rows)]


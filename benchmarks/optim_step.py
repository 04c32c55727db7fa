"""What one optimizer step costs on the 784-1024-1024-10 model, sliced or whole-layer.

mpitrain's optimizer updates each layer in slices of ``optim.BLOCK_BYTES`` so the
temporaries stay in cache; "whole layer" is the same code with one slice per layer.  As in
training, every step follows a forward and backward pass (which leave the caches full of
activations, not parameters); the variants alternate inside every round, one BLAS thread.

    python benchmarks/optim_step.py [--name sgd|momentum|adam] [--batch 64] [--rounds 150]
        [--old OPTIM_PY]

``--old`` adds the ``Optimizer`` of another ``optim.py`` to the rounds, e.g. the one before
slicing: ``git show 439730a:mpitrain/optim.py > /tmp/optim_old.py``.
"""
import argparse
import importlib.util
import os
import statistics
import time
from types import SimpleNamespace

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from mpitrain.model import MLP  # noqa: E402
from mpitrain.optim import BLOCK_BYTES, Optimizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="sgd", choices=("sgd", "momentum", "adam"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--old", metavar="OPTIM_PY", help="another optim.py to compare with")
    args = ap.parse_args()
    cfg = SimpleNamespace(name=args.name, lr=1e-9, momentum=0.9, beta1=0.9, beta2=0.999,
                          eps=1e-8, weight_decay=0.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 784)).astype(np.float32)
    t = np.eye(10, dtype=np.float32)[rng.integers(0, 10, args.batch)]
    variants = {}
    for label, whole in ((f"sliced ({BLOCK_BYTES // 1024} KiB)", False), ("whole layer", True)):
        model = MLP(784, [1024, 1024, 10], dtype="float32")
        model.init("he", 0)
        opt = Optimizer(cfg, [p.flat for p in model.params])
        if whole:  # one slice per layer
            opt._block = max(p.flat.size for p in model.params)
            opt._tmp = np.empty(opt._block, np.float32)
        variants[label] = (model, opt)
    if args.old:
        spec = importlib.util.spec_from_file_location("old_optim", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        model = MLP(784, [1024, 1024, 10], dtype="float32")
        model.init("he", 0)
        variants[f"--old {os.path.basename(args.old)}"] = (
            model, old.Optimizer(cfg, [p.flat for p in model.params]))
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, (model, opt) in variants.items():
            _, dz = model.loss(model.forward(x), t, 1.0 / args.batch)
            for _ in model.backward(dz):
                pass
            t0 = time.perf_counter()
            opt.step([g.flat for g in model.grads], 1e-9)
            times[k].append(time.perf_counter() - t0)
    print(f"{args.name} step after forward+backward (batch {args.batch}), 784-1024-1024-10 "
          f"float32, median of {args.rounds} interleaved rounds:")
    for k, v in times.items():
        print(f"  {k:>18}: {statistics.median(v[10:]) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()

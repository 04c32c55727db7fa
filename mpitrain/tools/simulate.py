"""``mpitrain simulate``: predicted step time and traffic of a data-parallel job at any scale.

The command line of the alpha-beta-gamma cost model (:mod:`.simulate_model`): the layer sizes
come from a job or ``--layers``, the network parameters from ``--latency-us`` /
``--bandwidth-gbps`` or from measured sweeps (``--calibrate``, :mod:`.simulate_calibration`);
it prints one row per (ranks, algorithm), optionally compares the model with measurements
(``--check``), writes ``--json`` and plots (``--plot``, :mod:`.simulate_plot`).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import checkpoint
from ..errors import ConfigError
from ..model import plan_buckets
from .simulate_calibration import calibrate, check, load_sweeps
from .simulate_model import ALGORITHMS, Network, Params, StepModel
from .simulate_plot import plot


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpitrain simulate",
                                description="alpha-beta-gamma model of a training step: step "
                                            "time and traffic per rank for P up to 4096")
    p.add_argument("job", nargs="?", help="job file for the layer sizes, batch and dtype "
                                          "(default: the built-in digits job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                   help="override a key of the job, as for run (e.g. model.layers=[256,10]); "
                        "repeatable")
    p.add_argument("--layers", help="widths from the input, e.g. 784,1024,1024,10 (wins over JOB)")
    p.add_argument("--batch", type=int, help="per-rank batch (default: the job's)")
    p.add_argument("--dtype", choices=("float32", "float64"), help="default: the job's")
    p.add_argument("--ranks", default="2,4,8,16,32,64,128,256,512,1024,2048,4096",
                   help="comma-separated rank counts to predict (2,4,...,4096)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help="comma-separated subset of " + ",".join(ALGORITHMS))
    p.add_argument("--bandwidth-gbps", type=float, help="link bandwidth, Gbit/s (e.g. 100, 400)")
    p.add_argument("--latency-us", type=float, help="per-message latency alpha, us (e.g. 2)")
    p.add_argument("--gamma-gbps", type=float,
                   help="local reduction rate, GB/s (default: calibrated, else 20)")
    p.add_argument("--calibrate", nargs="+", metavar="FILE",
                   help="bench allreduce --json files: fit alpha/beta per algorithm")
    p.add_argument("--check", nargs="+", metavar="FILE",
                   help="bench allreduce --json files to compare predictions with")
    p.add_argument("--gflops", type=float, default=50.0, help="compute rate per rank (50)")
    p.add_argument("--compute-ms", type=float, help="compute time per step (overrides --gflops)")
    p.add_argument("--no-overlap", action="store_true", help="allreduce after the backward pass")
    p.add_argument("--bucket-bytes", type=int, help="fuse layers into allreduces of at least "
                                                    "this many bytes (default: the job's "
                                                    "[sync] bucket_bytes)")
    p.add_argument("--loss-rate", type=float, default=0.0, help="packet loss probability")
    p.add_argument("--mtu", type=int, default=4096, help="packet size, bytes (4096)")
    p.add_argument("--window", type=int, default=64, help="go-back-N window, packets (64)")
    p.add_argument("--rto-us", type=float, default=100.0, help="retransmission timeout, us")
    p.add_argument("--straggler-ms", type=float, default=0.0, help="straggler delay per step")
    p.add_argument("--straggler-prob", type=float, default=1.0,
                   help="probability that a given rank straggles in a step (1)")
    p.add_argument("--plot", metavar="FILE.png", help="plot step time and traffic (matplotlib)")
    p.add_argument("--json", metavar="FILE", help="write predictions as JSON")
    return p


def model_shape(args) -> tuple[list[int], int, str, int]:
    """(widths from the input, per-rank batch, dtype, bucket bytes) from the options or the job."""
    if args.layers and args.batch and args.dtype and not args.job:
        cfg = None  # everything on the command line: no job, no environment read
    else:
        from .. import config, jobs
        from ..context import environment
        cfg = config.load(jobs.resolve(args.job), args.overrides, environment())
    if args.layers:
        try:
            widths = [int(w) for w in args.layers.split(",") if w.strip()]
        except ValueError:
            raise ConfigError(f"--layers {args.layers}: expected integers like 784,1024,10") from None
        if len(widths) < 2 or min(widths) < 1:
            raise ConfigError(f"--layers {args.layers}: need an input width and at least one layer")
    else:
        assert cfg is not None  # loaded above whenever --layers is missing
        if cfg.data.source == "digits":
            features = 64
        elif cfg.data.source == "synthetic":
            features = cfg.data.features
        else:
            from .. import data
            features = data.load(cfg.data, cfg.run.seed).features
        widths = [features, *cfg.model.layers]
    batch = args.batch or (cfg.data.batch_size if cfg else 0)
    dtype = args.dtype or (cfg.model.dtype if cfg else "float32")
    bucket_bytes = (args.bucket_bytes if args.bucket_bytes is not None
                    else cfg.sync.bucket_bytes if cfg is not None else 0)
    return widths, batch, dtype, bucket_bytes


def params_for(args, algos) -> tuple[dict[str, Params], str]:
    calibrated = calibrate(load_sweeps(args.calibrate), algos) if args.calibrate else {}
    source = []
    gamma = 1 / (args.gamma_gbps * 1e9) if args.gamma_gbps else None
    out = {}
    for a in algos:
        base = calibrated.get(a)
        if base is None:
            if args.latency_us is None or args.bandwidth_gbps is None:
                raise ConfigError(f"no parameters for {a}: give --latency-us and --bandwidth-gbps, "
                                  f"or --calibrate a bench allreduce --json file that has {a}")
            base = Params(0.0, 0.0, 1 / 20e9)
        prm = Params(**asdict(base))
        if args.latency_us is not None:
            prm.alpha = args.latency_us * 1e-6
        if args.bandwidth_gbps is not None:
            prm.beta = 8 / (args.bandwidth_gbps * 1e9)
        if gamma is not None:
            prm.gamma = gamma
        out[a] = prm
    if calibrated:
        source.append(f"calibrated from {', '.join(args.calibrate)}")
    if args.latency_us is not None or args.bandwidth_gbps is not None:
        source.append(f"network: latency {args.latency_us} us, bandwidth {args.bandwidth_gbps} Gbit/s")
    return out, "; ".join(source)


def main(argv: list[str]) -> int:
    """``mpitrain simulate ARGS``: print (and --json, --plot) the predictions; 0."""
    args = parser().parse_args(argv)
    algos, ranks = _algorithms_and_ranks(args)
    widths, batch, dtype, bucket_bytes = model_shape(args)
    if bucket_bytes < 0:
        raise ConfigError(f"--bucket-bytes {bucket_bytes}: must be >= 0")
    itemsize = np.dtype(dtype).itemsize
    layer_bytes = [(i * o + o) * itemsize for i, o in zip(widths[:-1], widths[1:])]
    flops = [2.0 * batch * i * o for i, o in zip(widths[:-1], widths[1:])]
    gflops = args.gflops
    if args.compute_ms:
        gflops = (3 * sum(flops) - flops[0]) / (args.compute_ms * 1e-3) / 1e9  # fwd + bwd flops
    sm = StepModel(layer_bytes, flops, gflops, overlap=not args.no_overlap,
                   straggler_s=args.straggler_ms * 1e-3, straggler_prob=args.straggler_prob,
                   bucket_bytes=bucket_bytes)
    net = Network(args.loss_rate, args.mtu, args.window, args.rto_us * 1e-6)
    params, source = params_for(args, algos)

    report = {"widths": widths, "batch": batch, "dtype": dtype, "layer_bytes": layer_bytes,
              "gflops": gflops, "overlap": sm.overlap, "network": asdict(net),
              "straggler_ms": args.straggler_ms, "straggler_prob": args.straggler_prob,
              "params": {a: asdict(p) for a, p in params.items()}, "source": source,
              "predictions": []}
    _print_setup(args, sm, net, params, report)
    _predict(report, sm, ranks, algos, params, net)
    if args.check:
        _check(args, params, report)
    if args.json:
        checkpoint.write_text(Path(args.json), json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


def _algorithms_and_ranks(args) -> tuple[list[str], list[int]]:
    """--algorithms and --ranks as lists, and --loss-rate, checked."""
    algos = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    for a in algos:
        if a not in ALGORITHMS:
            raise ConfigError(f"--algorithms: unknown {a!r}; use {', '.join(ALGORITHMS)}")
    try:
        ranks = sorted({int(p) for p in args.ranks.split(",")})
    except ValueError:
        raise ConfigError(f"--ranks {args.ranks}: expected integers like 2,4,8") from None
    if not ranks or ranks[0] < 1 or ranks[-1] > 1 << 20:
        raise ConfigError("--ranks: values between 1 and 1048576")
    if not 0 <= args.loss_rate < 1:
        raise ConfigError("--loss-rate must be in [0, 1)")
    _check_positive(args)
    return algos, ranks


POSITIVE = ("bandwidth_gbps", "latency_us", "gamma_gbps", "gflops", "compute_ms", "mtu",
            "window", "rto_us", "batch")      # physical quantities: more than zero
NON_NEGATIVE = ("straggler_ms", "bucket_bytes")


def _check_positive(args) -> None:
    """A rate, size or time of zero or less describes no machine: one message naming it."""
    for name in POSITIVE + NON_NEGATIVE:
        value = getattr(args, name, None)
        if value is None:
            continue
        if value < 0 or (value == 0 and name in POSITIVE) or value != value:
            bound = "> 0" if name in POSITIVE else ">= 0"
            raise ConfigError(f"--{name.replace('_', '-')} {value:g}: must be {bound}")
    if not 0 <= args.straggler_prob <= 1:
        raise ConfigError(f"--straggler-prob {args.straggler_prob:g}: must be in [0, 1]")


def _print_setup(args, sm: StepModel, net: Network, params: dict[str, Params],
                 report: dict) -> None:
    """The header lines: the model, the parameters per algorithm, loss and straggler."""
    widths, layer_bytes = report["widths"], report["layer_bytes"]
    print(f"# model {'-'.join(map(str, widths))}, batch {report['batch']}/rank, "
          f"{report['dtype']}: gradients "
          f"{sum(layer_bytes) / 2**20:.2f} MiB/step in "
          f"{len(plan_buckets(layer_bytes, sm.bucket_bytes))} allreduces; compute "
          f"{sum(sm.compute_times()[1]) * 1e3 + sm.compute_times()[0] * 1e3:.2f} ms at "
          f"{sm.gflops:.1f} GFLOP/s; overlap {'on' if sm.overlap else 'off'}")
    print(f"# parameters ({report['source']}):")
    for a, p in params.items():
        print(f"#   {a:>18}: alpha {p.alpha * 1e6:9.2f} us  beta {p.beta * 1e9:8.4f} ns/B "
              f"({8 / p.beta / 1e9 if p.beta else float('inf'):8.2f} Gbit/s)  gamma "
              f"{p.gamma * 1e9:7.4f} ns/B")
    if net.loss or args.straggler_ms:
        print(f"# loss rate {net.loss:g} per packet (mtu {net.mtu} B, go-back-N window "
              f"{net.window}, rto {net.rto * 1e6:g} us); straggler {args.straggler_ms:g} ms "
              f"with probability {args.straggler_prob:g} per rank and step")


def _predict(report: dict, sm: StepModel, ranks: list[int], algos: list[str],
             params: dict[str, Params], net: Network) -> None:
    """Print the table and add each row to ``report["predictions"]``."""
    print(f"{'P':>6} {'algorithm':>18} {'step(ms)':>10} {'comm(ms)':>10} {'exposed(ms)':>11} "
          f"{'traffic/rank(MiB)':>17} {'efficiency':>10}")
    for p in ranks:
        for a in algos:
            s = sm.step(a, p, params[a], net)
            eff = (s["compute_s"]) / s["step_s"] if s["step_s"] else 1.0
            report["predictions"].append({"ranks": p, "algorithm": a, **s, "efficiency": eff})
            print(f"{p:>6} {a:>18} {s['step_s'] * 1e3:>10.3f} {s['comm_s'] * 1e3:>10.3f} "
                  f"{s['exposed_s'] * 1e3:>11.3f} {s['traffic_bytes'] / 2**20:>17.3f} {eff:>10.3f}")


def _check(args, params: dict[str, Params], report: dict) -> None:
    """--check: the model against measured sweeps, printed and added to ``report``."""
    if not args.calibrate and (args.latency_us is None or args.bandwidth_gbps is None):
        raise ConfigError("--check needs --calibrate (or --latency-us and --bandwidth-gbps)")
    res = check(load_sweeps(args.check), params)
    report["check"] = [{k: v for k, v in r.items() if k != "points_detail"} for r in res]
    report["check_points"] = {f"{r['algorithm']}@{r['ranks']}": r["points_detail"] for r in res}
    print(f"# prediction error against {', '.join(args.check)} (|pred - measured| / measured)")
    print(f"{'algorithm':>18} {'P':>4} {'sizes':>5} {'median':>8} {'max':>8} {'median>=1MiB':>12}")
    for r in res:
        big = r["median_rel_error_1MiB_up"]
        print(f"{r['algorithm']:>18} {r['ranks']:>4} {r['points']:>5} "
              f"{r['median_rel_error'] * 100:>7.1f}% {r['max_rel_error'] * 100:>7.1f}% "
              f"{'' if big is None else f'{big * 100:.1f}%':>12}")

"""``mpitrain simulate``: an alpha-beta-gamma cost model of one data-parallel training step.

Every allreduce algorithm is a sequence of rounds; in each round a rank sends one message of
``m`` bytes (and receives one), then reduces ``r`` bytes.  One round costs

    alpha + m * beta * f(m) + timeouts(m) * rto + r * gamma

alpha: latency per message (s); beta: seconds per byte on the wire (1 / bandwidth); gamma:
seconds per byte of local reduction.  f(m) and timeouts(m) are the go-back-N loss terms:
a message of k = ceil(m / mtu) packets with packet loss rate L needs on average
f = 1 + W L / (1 - L) transmissions per packet (each loss resends the window of
W = min(window, k) packets) and suffers k L / (1 - L) retransmission timeouts.

Rounds per algorithm for n bytes on P ranks (p2 = largest power of two <= P, lg = log2):

    ring                2(P-1) rounds of n/P bytes; P-1 of them reduce n/P
                        -> 2(P-1) alpha + 2(P-1)/P n beta + (P-1)/P n gamma
    recursive_doubling  lg(p2) rounds of n bytes, each reducing n; P != p2 adds a fold-in
                        and a fold-out round of n bytes
    tree                binomial reduce then broadcast: 2 ceil(lg P) rounds of n bytes,
                        ceil(lg P) reducing n
    native              MPICH's choice: recursive doubling up to 2 KiB, above that
                        Rabenseifner (recursive-halving reduce-scatter + recursive-doubling
                        allgather: 2 lg P rounds, 2(P-1)/P n bytes, (P-1)/P n reduced)

Traffic is the bytes a rank sends per step (the busiest rank: the root for tree), including
retransmissions.  The step: forward, then backward layer by layer (last first); with overlap
each layer's allreduce starts when its gradients exist and the allreduces run one after
another on the network; a straggler delay D hitting each rank with probability q per step adds
D (1 - (1 - q)^P) to a synchronous step.

Calibration (``--calibrate bench.json ...``, files written by ``mpitrain bench allreduce
--json``): per algorithm, alpha and beta by least squares on relative error, gamma fixed from
the measured local reduction (``reduce_s`` per size).  For every algorithm the beta and gamma
terms are proportional to n at any P, so the data alone cannot separate them; the local
reduction measurement does.  ``--check FILE ...`` compares predictions with measured sweeps
(e.g. calibrate at P = 2, check at P = 4).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import checkpoint
from ..errors import ConfigError, MpitrainError
from ..model import plan_buckets

ALGORITHMS = ("native", "ring", "recursive_doubling", "tree")
NATIVE_SHORT_BYTES = 2048  # MPICH MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE


@dataclass
class Params:
    alpha: float   # s per message
    beta: float    # s per byte sent
    gamma: float   # s per byte reduced


@dataclass
class Network:
    loss: float = 0.0        # packet loss probability
    mtu: int = 4096          # bytes per packet
    window: int = 64         # go-back-N window, packets
    rto: float = 100e-6      # retransmission timeout, s


# --------------------------------------------------------------------------- the model
def rounds(algo: str, p: int, n: float) -> list[tuple[int, float, float]]:
    """(repeat, message bytes, reduced bytes) per round kind, one rank's critical path."""
    if p <= 1 or n <= 0:
        return []
    lg = math.ceil(math.log2(p))
    if algo == "ring":
        return [(p - 1, n / p, n / p), (p - 1, n / p, 0.0)]
    if algo == "recursive_doubling" or (algo == "native" and n <= NATIVE_SHORT_BYTES):
        p2 = 1 << (p.bit_length() - 1)
        out = [(p2.bit_length() - 1, n, n)]
        if p != p2:
            out += [(1, n, n), (1, n, 0.0)]
        return out
    if algo == "tree":
        return [(lg, n, n), (lg, n, 0.0)]
    if algo == "native":  # Rabenseifner: halving reduce-scatter, doubling allgather
        out, m = [], n
        for _ in range(lg):
            m /= 2
            out.append((1, m, m))
        return out + [(1, m * 2 ** k, 0.0) for k in range(lg)]
    raise ConfigError(f"unknown algorithm {algo!r}; use one of {', '.join(ALGORITHMS)}")


def _loss_terms(m: float, net: Network) -> tuple[float, float]:
    """(transmissions per packet f, expected timeouts) of one m-byte message."""
    if net.loss <= 0 or m <= 0:
        return 1.0, 0.0
    k = max(1, math.ceil(m / net.mtu))
    w = min(net.window, k)
    odds = net.loss / (1.0 - net.loss)
    return 1.0 + w * odds, k * odds


def coefficients(algo: str, p: int, n: float, net: Network | None = None) -> tuple[float, float, float, float]:
    """(A, B, C, T): time = A alpha + B beta + C gamma + T rto; B counts resent bytes."""
    net = net or Network()
    a = b = c = t = 0.0
    for rep, m, red in rounds(algo, p, n):
        f, to = _loss_terms(m, net)
        a += rep
        b += rep * m * f
        c += rep * red
        t += rep * to
    return a, b, c, t


def allreduce_time(algo: str, p: int, n: float, prm: Params, net: Network | None = None) -> float:
    net = net or Network()
    a, b, c, t = coefficients(algo, p, n, net)
    return a * prm.alpha + b * prm.beta + c * prm.gamma + t * net.rto


def traffic_per_rank(algo: str, p: int, n: float, net: Network | None = None) -> float:
    """Bytes the busiest rank sends for one allreduce of n bytes (with retransmissions)."""
    if algo == "tree" and p > 1:  # the root sends the whole buffer once per broadcast round
        net = net or Network()
        return math.ceil(math.log2(p)) * n * _loss_terms(n, net)[0]
    return coefficients(algo, p, n, net)[1]


@dataclass
class StepModel:
    layer_bytes: list[float]   # gradient bytes per layer, input side first
    layer_flops: list[float]   # forward flops per layer
    gflops: float              # compute rate
    overlap: bool = True
    straggler_s: float = 0.0
    straggler_prob: float = 1.0
    bucket_bytes: int = 0      # [sync] bucket_bytes: fused allreduces (0: one per layer)

    def compute_times(self) -> tuple[float, list[float]]:
        fwd = sum(self.layer_flops) / (self.gflops * 1e9)
        # backward: dW for every layer, dX for all but the first (2x / 1x the forward flops)
        bwd = [f * (2 if i else 1) / (self.gflops * 1e9) for i, f in enumerate(self.layer_flops)]
        return fwd, bwd

    def step(self, algo: str, p: int, prm: Params, net: Network | None = None) -> dict:
        fwd, bwd = self.compute_times()
        compute = fwd + sum(bwd)
        buckets = plan_buckets(self.layer_bytes, self.bucket_bytes)
        sizes = {lo: sum(self.layer_bytes[lo:hi + 1]) for lo, hi in buckets}
        comm = {lo: allreduce_time(algo, p, n, prm, net) for lo, n in sizes.items()}
        if self.overlap:  # a bucket starts when backward has reached its lowest layer
            t, free = fwd, fwd
            for i in range(len(bwd) - 1, -1, -1):  # last layer first
                t += bwd[i]
                if i in comm:
                    free = max(free, t) + comm[i]
            total = max(t, free)
        else:
            total = compute + sum(comm.values())
        straggle = self.straggler_s * (1 - (1 - self.straggler_prob) ** p) if p > 1 else 0.0
        total += straggle
        return {"step_s": total, "compute_s": compute, "comm_s": sum(comm.values()),
                "exposed_s": total - compute - straggle, "straggler_s": straggle,
                "traffic_bytes": sum(traffic_per_rank(algo, p, n, net) for n in sizes.values())}


# --------------------------------------------------------------------------- calibration
def load_sweeps(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a readable bench allreduce --json file ({exc})") from None
        for r in doc.get("results", []):
            if r.get("checksum") == "none":  # the model is of the default, checksummed transport
                continue
            rows.append({**r, "ranks": r.get("ranks", doc.get("ranks"))})
    if not rows:
        raise ConfigError(f"{', '.join(paths)}: no results in these files")
    return rows


def gamma_from_rows(rows: list[dict], min_bytes: int = 1 << 16) -> float | None:
    """Per-byte cost of the local reduction measured next to the sweep (median, big sizes)."""
    vals = [r["reduce_s"] / r["bytes"] for r in rows if r.get("reduce_s") and r["bytes"] >= min_bytes]
    return statistics.median(vals) if vals else None


def fit(rows: list[dict], algo: str, gamma: float | None = None) -> Params:
    """alpha, beta (and gamma if not given) minimising the relative error on ``rows``."""
    pts = [r for r in rows if r["algorithm"] == algo and r["ranks"] > 1]
    if len(pts) < 2:
        raise ConfigError(f"calibration: fewer than two {algo} points with more than one rank")
    X = np.array([coefficients(algo, r["ranks"], r["bytes"])[:3] for r in pts])
    t = np.array([r["time_s"] for r in pts])
    w = 1.0 / t                                  # relative error
    cols = [0, 1] if gamma is not None else [0, 1, 2]
    rhs = t - (X[:, 2] * gamma if gamma is not None else 0.0)
    coef = np.zeros(3)
    active = list(cols)
    while active:                                # tiny NNLS: drop negative terms, refit
        sol, *_ = np.linalg.lstsq(X[:, active] * w[:, None], rhs * w, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        active = [c for c, s in zip(active, sol) if s > 0]
    return Params(coef[0], coef[1], gamma if gamma is not None else coef[2])


def calibrate(rows: list[dict], algos=ALGORITHMS) -> dict[str, Params]:
    gamma = gamma_from_rows(rows)
    return {a: fit(rows, a, gamma) for a in algos if any(r["algorithm"] == a for r in rows)}


def check(rows: list[dict], params: dict[str, Params]) -> list[dict]:
    """Per (algorithm, ranks): median and max relative prediction error over the sizes."""
    out = {}
    for r in rows:
        a = r["algorithm"]
        if a not in params or r["ranks"] < 2:
            continue
        pred = allreduce_time(a, r["ranks"], r["bytes"], params[a])
        out.setdefault((a, r["ranks"]), []).append((r["bytes"], r["time_s"], pred))
    res = []
    for (a, p), pts in sorted(out.items()):
        err = [abs(pr - t) / t for _, t, pr in pts]
        big = [abs(pr - t) / t for n, t, pr in pts if n >= (1 << 20)]
        res.append({"algorithm": a, "ranks": p, "points": len(pts),
                    "median_rel_error": statistics.median(err), "max_rel_error": max(err),
                    "median_rel_error_1MiB_up": statistics.median(big) if big else None,
                    "points_detail": pts})
    return res


# --------------------------------------------------------------------------- command line
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpitrain simulate",
                                description="alpha-beta-gamma model of a training step: step "
                                            "time and traffic per rank for P up to 4096")
    p.add_argument("job", nargs="?", help="job file for the layer sizes, batch and dtype "
                                          "(default: the built-in digits job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    p.add_argument("--layers", help="widths from the input, e.g. 784,1024,1024,10 (wins over JOB)")
    p.add_argument("--batch", type=int, help="per-rank batch (default: the job's)")
    p.add_argument("--dtype", choices=("float32", "float64"), help="default: the job's")
    p.add_argument("--ranks", default="2,4,8,16,32,64,128,256,512,1024,2048,4096")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
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
        from .. import config
        from ..context import environment
        cfg = config.load(args.job, args.overrides, environment())
    if args.layers:
        try:
            widths = [int(w) for w in args.layers.split(",") if w.strip()]
        except ValueError:
            raise ConfigError(f"--layers {args.layers}: expected integers like 784,1024,10") from None
        if len(widths) < 2 or min(widths) < 1:
            raise ConfigError(f"--layers {args.layers}: need an input width and at least one layer")
    else:
        if cfg.data.source == "digits":
            features = 64
        elif cfg.data.source == "synthetic":
            features = cfg.data.features
        else:
            from .. import data
            features = data.load(cfg.data, cfg.run.seed).features
        widths = [features, *cfg.model.layers]
    batch = args.batch or cfg.data.batch_size
    dtype = args.dtype or cfg.model.dtype
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


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except MpitrainError as err:
        print(f"mpitrain: error: {err}", file=sys.stderr)
        return err.exit_code


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
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
    print(f"# model {'-'.join(map(str, widths))}, batch {batch}/rank, {dtype}: gradients "
          f"{sum(layer_bytes) / 2**20:.2f} MiB/step in "
          f"{len(plan_buckets(layer_bytes, bucket_bytes))} allreduces; compute "
          f"{sum(sm.compute_times()[1]) * 1e3 + sm.compute_times()[0] * 1e3:.2f} ms at "
          f"{gflops:.1f} GFLOP/s; overlap {'on' if sm.overlap else 'off'}")
    print(f"# parameters ({source}):")
    for a, p in params.items():
        print(f"#   {a:>18}: alpha {p.alpha * 1e6:9.2f} us  beta {p.beta * 1e9:8.4f} ns/B "
              f"({8 / p.beta / 1e9 if p.beta else float('inf'):8.2f} Gbit/s)  gamma "
              f"{p.gamma * 1e9:7.4f} ns/B")
    if net.loss or args.straggler_ms:
        print(f"# loss rate {net.loss:g} per packet (mtu {net.mtu} B, go-back-N window "
              f"{net.window}, rto {net.rto * 1e6:g} us); straggler {args.straggler_ms:g} ms "
              f"with probability {args.straggler_prob:g} per rank and step")
    print(f"{'P':>6} {'algorithm':>18} {'step(ms)':>10} {'comm(ms)':>10} {'exposed(ms)':>11} "
          f"{'traffic/rank(MiB)':>17} {'efficiency':>10}")
    for p in ranks:
        for a in algos:
            s = sm.step(a, p, params[a], net)
            eff = (s["compute_s"]) / s["step_s"] if s["step_s"] else 1.0
            report["predictions"].append({"ranks": p, "algorithm": a, **s, "efficiency": eff})
            print(f"{p:>6} {a:>18} {s['step_s'] * 1e3:>10.3f} {s['comm_s'] * 1e3:>10.3f} "
                  f"{s['exposed_s'] * 1e3:>11.3f} {s['traffic_bytes'] / 2**20:>17.3f} {eff:>10.3f}")

    if args.check:
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
    if args.json:
        checkpoint.write_text(Path(args.json), json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(f"mpitrain simulate: matplotlib is not installed, so no plot was written to {path} "
              f"(pip install matplotlib, or the 'bench' extra)", file=sys.stderr)
        return
    preds = report["predictions"]
    algos = list(dict.fromkeys(r["algorithm"] for r in preds))
    checks = report.get("check_points")
    ncol = 3 if checks else 2
    fig, axes = plt.subplots(1, ncol, figsize=(5.2 * ncol, 4.2))
    styles = {"native": ("o", "-"), "ring": ("s", "--"), "recursive_doubling": ("^", "-."),
              "tree": ("x", ":")}
    for a in algos:
        rs = [r for r in preds if r["algorithm"] == a]
        ps = [r["ranks"] for r in rs]
        mk, ls = styles.get(a, ("o", "-"))
        axes[0].plot(ps, [r["step_s"] * 1e3 for r in rs], marker=mk, ls=ls, ms=4, label=a)
        axes[1].plot(ps, [r["traffic_bytes"] / 2**20 for r in rs], marker=mk, ls=ls, ms=4, label=a)
    compute = preds[0]["compute_s"] * 1e3
    axes[0].axhline(compute, color="gray", ls=":", lw=1, label="compute only")
    for ax, title, yl in ((axes[0], "predicted step time", "ms per step"),
                          (axes[1], "traffic per rank per step (busiest rank)", "MiB sent")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks P")
        ax.set_ylabel(yl)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)
    if checks:
        ax = axes[2]
        for key, pts in checks.items():
            pts = sorted(pts)
            line, = ax.plot([n for n, _, _ in pts], [t * 1e6 for _, t, _ in pts], "o", ms=3,
                            label=f"{key} measured")
            ax.plot([n for n, _, _ in pts], [pr * 1e6 for _, _, pr in pts], "-",
                    color=line.get_color(), lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message bytes")
        ax.set_ylabel("allreduce time (us)")
        ax.set_title("check: measured (dots) vs model (lines)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    w = "-".join(map(str, report["widths"]))
    fig.suptitle(f"mpitrain simulate: MLP {w}, batch {report['batch']}/rank; {report['source']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"# plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())

"""MPI driver for the comm-layer tests (launched by tests/test_*.py under mpiexec).

    python tests/comm_driver.py allreduce
        Every own algorithm against native MPI on many buffer shapes; exits 1
        on the first mismatch (message on stderr), prints "ALLREDUCE OK" on rank 0.
    python tests/comm_driver.py scenario '<json>'
        A miniature training loop (params -= lr * mean gradient, layers last to
        first) under a fault plan.  Every rank prints one line
        ``RESULT {json}`` (status, error, reporter, digest of the parameters,
        transport stats, fault events); on an MpitrainError the reporter also
        prints ``ERROR: <message>`` and every rank exits with the error's exit
        code via os._exit, as the CLI does.

    python tests/comm_driver.py cli '<json>' COMMAND ARGS...
        ``mpitrain COMMAND ARGS`` (the CLI itself: session, exit statuses, one message),
        one rank of it stopped on the way: json {"rank", "at", "how"}, ``at`` the name of a
        function of mpitrain.train that the command calls ("evaluate", "report_transport",
        "report_fault_outcome"), ``how`` "stall" (sleep 600 s at its first call: a rank
        stuck) or "die" (os._exit(9) there, telling no one).

Scenario keys: algorithm, delivery, deadline, rto, grace, rules, seed, steps,
layers (sizes), dtype, checks ("hash", "e2e" in that order), ledger (dir),
die ({"rank", "step"}: os._exit(9) without telling anyone; with "where": "checks", after
the step's fence, before its checks), stall ({"rank", "step", "seconds"}: sleep that long
after the step's fence, before its checks: a rank stuck), fence (bool),
outdir (write result-{rank}.json there instead of printing RESULT lines),
clean_first (run the same loop without faults first: "clean_digest").
Each rank records its end as `mpitrain run -n`'s ranks do (context.World.record_exit), so
tests/mpirun.py job() gives the job's status the same way under every MPI.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from mpitrain.comm.allreduce import ALGORITHMS, make_allreducer  # noqa: E402
from mpitrain.comm.checks import SumCheck, check_replicas  # noqa: E402
from mpitrain.comm.faults import FaultInjector, FaultPlan  # noqa: E402
from mpitrain.comm.guarded import GuardedComm  # noqa: E402
from mpitrain.comm.ledger import Ledger  # noqa: E402
from mpitrain.comm.transport import Transport  # noqa: E402
from mpitrain.context import World  # noqa: E402
from mpitrain.errors import MpitrainError  # noqa: E402
from mpitrain.session import EXIT_WAIT_S  # noqa: E402


def data(rank: int, n: int, dtype, salt: int) -> np.ndarray:
    rng = np.random.default_rng([rank, n, salt, np.dtype(dtype).itemsize])
    return rng.standard_normal(n).astype(dtype)


def fail(comm, msg: str) -> None:
    sys.stderr.write(f"rank {comm.Get_rank()}: {msg}\n")
    sys.stderr.flush()
    os._exit(1)


def check_allreduce() -> None:
    comm = MPI.COMM_WORLD.Dup()
    p, r = comm.Get_size(), comm.Get_rank()
    lengths = sorted({0, 1, 2, 3, max(p - 1, 1), p, p + 1, 2 * p + 3, 7, 1001, 4096})
    ars = {a: make_allreducer(a, comm, Transport(comm, deadline_s=20)) for a in ALGORITHMS}
    rel = Transport(comm, delivery="reliable", deadline_s=20)
    ars["ring/reliable"] = make_allreducer("ring", comm, rel)
    ars["tree/lossy"] = make_allreducer("tree", comm, Transport(comm, delivery="lossy", deadline_s=20))
    step = 0
    for dtype in (np.float32, np.float64):
        eps = np.finfo(dtype).eps
        for n in lengths:
            step += 1
            x = data(r, n, dtype, 1)
            ref = x.copy()
            h = ars["native"].start(ref, step, 0)
            ars["native"].wait(h)
            bound = 2 * p * eps * comm.allreduce(np.abs(x).astype(np.float64), MPI.SUM) if n else 0
            for name, ar in ars.items():
                if name == "native":
                    continue
                outs = []
                for rep in range(2):  # twice: determinism
                    y = x.copy()
                    h = ar.start(y, step, 1 + rep)
                    while not ar.test(h):
                        pass
                    ar.wait(h)
                    outs.append(y)
                where = f"{name} p={p} n={n} {np.dtype(dtype).name}"
                if outs[0].dtype != dtype or outs[0].shape != (n,):
                    fail(comm, f"{where}: wrong dtype/shape")
                if not np.array_equal(outs[0].view(np.uint8), outs[1].view(np.uint8)):
                    fail(comm, f"{where}: two runs differ")
                if n and not np.all(np.abs(outs[0] - ref) <= bound):
                    fail(comm, f"{where}: differs from native by {np.max(np.abs(outs[0] - ref))}")
                crcs = comm.allgather(zlib.crc32(outs[0].view(np.uint8)))
                if len(set(crcs)) != 1:
                    fail(comm, f"{where}: results not bitwise identical across ranks {crcs}")
    if rel.stats["retransmissions"] > 50:
        fail(comm, f"reliable mode retransmitted {rel.stats['retransmissions']} times without faults")
    comm.Barrier()
    if r == 0:
        print(f"ALLREDUCE OK p={p} cases={step}", flush=True)


def train(cfg: dict, ar, t: Transport, comm, p: int, r: int) -> list[np.ndarray]:
    """Mini training loop; layers synced last first, params -= lr * mean gradient."""
    dtype = np.dtype(cfg.get("dtype", "float64"))
    sizes = cfg.get("layers", [37, 300, 5])
    params = [data(0, n, dtype, 99) for n in sizes]  # identical on every rank
    die, stall = cfg.get("die") or {}, cfg.get("stall") or {}
    guard = GuardedComm(comm, t.agreement, t.deadline_s)
    for step in range(1, cfg.get("steps", 2) + 1):
        if die.get("rank") == r and die.get("step") == step and die.get("where") != "checks":
            os._exit(9)
        sc = SumCheck()
        for layer in reversed(range(len(sizes))):
            g = data(r, sizes[layer], dtype, 1000 * step + layer)
            sc.before(layer, g)
            h = ar.start(g, step, layer)
            ar.wait(h)
            sc.after(layer, g)
            params[layer] -= np.asarray(0.01 / p, dtype) * g
        if cfg.get("fence"):
            t.fence(step)
        if die.get("rank") == r and die.get("step") == step and die.get("where") == "checks":
            os._exit(9)
        if stall.get("rank") == r and stall.get("step") == step:
            time.sleep(stall["seconds"])
        for check in cfg.get("checks", []):
            if check == "hash":
                check_replicas(guard, [[w] for w in params], step, lost=t.lost)
            elif check == "e2e":
                sc.verify(guard, step, lost=t.lost)
    t.close()
    return params


def digest(params: list[np.ndarray]) -> str:
    return hashlib.sha256(b"".join(w.tobytes() for w in params)).hexdigest()


def run_scenario(cfg: dict) -> None:
    world = World(dict(os.environ))  # records this rank's end for tests/mpirun.py job()
    comm = MPI.COMM_WORLD.Dup()
    p, r = comm.Get_size(), comm.Get_rank()
    algorithm = cfg.get("algorithm", "ring")
    out: dict = {"rank": r, "status": "ok"}
    if cfg.get("clean_first"):  # the fault-free reference, same process, own transport
        clean = Transport(comm, deadline_s=20)
        out["clean_digest"] = digest(train({**cfg, "checks": []}, make_allreducer(algorithm, comm, clean),
                                           clean, comm, p, r))
    events: list[dict] = []
    plan = FaultPlan(cfg.get("rules", []), cfg.get("seed", 0))
    injector = FaultInjector(plan, r, events) if cfg.get("rules") else None
    ledger = Ledger(cfg["ledger"], r, p, comm) if cfg.get("ledger") else None
    t = Transport(comm, delivery=cfg.get("delivery", "strict"), deadline_s=cfg.get("deadline", 2.0),
                  injector=injector, ledger=ledger, events=events, rto_s=cfg.get("rto"),
                  grace_s=cfg.get("grace"))
    ar = make_allreducer(algorithm, comm, t)
    t0 = time.monotonic()
    params = None
    try:
        params = train(cfg, ar, t, comm, p, r)
    except MpitrainError as err:
        out.update(status="error", error=type(err).__name__, message=err.message, hint=err.hint,
                   reporter=err.reporter, exit_code=err.exit_code,
                   ranks=getattr(err, "ranks", None), layer=getattr(err, "layer", None))
    out["elapsed"] = time.monotonic() - t0
    out["digest"] = digest(params) if params is not None else None
    out["stats"] = t.stats
    out["events"] = [{k: v for k, v in e.items() if k != "t"} for e in events
                     if e.get("event") == "fault"]
    out["lost"] = [list(m) for m in t.lost]
    line = json.dumps(out)
    if cfg.get("outdir"):  # one file per rank: stdout lines of ranks can interleave
        Path(cfg["outdir"], f"result-{r}.json").write_text(line)
    else:
        print("RESULT " + line, flush=True)
    world.record_exit(out.get("exit_code", 0))
    if out["status"] == "error":
        if ledger is not None:
            ledger.close()
        if out["reporter"] in (None, r):
            print(f"ERROR: {out['message']}", flush=True)
        sys.stdout.flush()
        # Leave together, as mpitrain.session does: under mpiexec's own clean-up the first
        # rank to exit takes the others down, maybe before they have written their result.
        if p > 1:
            world.all_present(timeout=EXIT_WAIT_S)
        os._exit(out["exit_code"])


def cli_stopping_one_rank(where: dict, args: list[str]) -> int:
    """``mpitrain ARGS``, rank ``where["rank"]`` stopped at ``where["at"]`` (see module)."""
    import mpitrain.train
    from mpitrain import cli
    if MPI.COMM_WORLD.Get_rank() == where["rank"]:
        def stop(*_args, **_kwargs):
            if where["how"] == "die":
                os._exit(9)
            time.sleep(600)  # far beyond any test's timeout: only the others can end this
        setattr(mpitrain.train, where["at"], stop)
    return cli.main(args)


if __name__ == "__main__":
    if sys.argv[1] == "allreduce":
        check_allreduce()
    elif sys.argv[1] == "cli":
        sys.exit(cli_stopping_one_rank(json.loads(sys.argv[2]), sys.argv[3:]))
    else:
        run_scenario(json.loads(sys.argv[2]))

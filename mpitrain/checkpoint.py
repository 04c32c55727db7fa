"""Checkpoints and output files, written atomically.

Every file goes to a temporary name in the same folder, is flushed to disk, then renamed
over the target: a reader (or a restarted job) sees the old file or the new one, never half
of one.  Only rank 0 writes; replicas are identical, so its parameters are everyone's.

A checkpoint ``checkpoints/step-00000120.npz`` holds the parameters under the
parameter-file keys, the optimizer state under ``optim.*``, and ``meta`` (JSON: step,
ranks, per-rank batch) so that a resume can refuse a run it would not reproduce.

The resume policy lives here too: what a checkpoint and the run resuming it must share
(:func:`resume_identity`), the collective :func:`restore`, and what a fresh start in a used
folder removes (:func:`forget_earlier_run`).
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .errors import MpitrainError

if TYPE_CHECKING:
    from .config import JobConfig
    from .context import RankContext
    from .model import MLP
    from .optim import Optimizer

CHECKPOINT_RE = re.compile(r"^step-(\d{8})\.npz$")


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], object]) -> None:
    """Write ``path`` via ``write(fh)`` on a temporary file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def save(out: Path, step: int, arrays: dict[str, np.ndarray], meta: dict, keep: int) -> Path:
    """Write the checkpoint of ``step`` and delete all but the newest ``keep``."""
    path = checkpoint_dir(out) / f"step-{step:08d}.npz"
    write_npz(path, {**arrays, "meta": np.array(json.dumps({**meta, "step": step}))})
    for old in list_checkpoints(out)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(out: Path) -> list[Path]:
    """Checkpoints in ``out``, oldest first."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CHECKPOINT_RE.match(p.name))


def load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) of a checkpoint file."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files if k != "meta"}
            meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise MpitrainError(f"checkpoint {path} cannot be read: {exc}",
                            hint="delete it to resume from the one before") from None
    return arrays, meta


# --------------------------------------------------------------------------- resume policy
def resume_identity(size: int, cfg: JobConfig) -> dict[str, Any]:
    """What a checkpoint's run and a resuming run must share to be the same training."""
    return {"ranks": size, "batch_size": cfg.data.batch_size, "seed": cfg.run.seed,
            "shuffle": cfg.data.shuffle, "tail": cfg.data.tail, "source": cfg.data.source,
            "layers": list(cfg.model.layers), "dtype": cfg.model.dtype,
            "optimizer": cfg.optim.name}


def restore(ctx: RankContext, cfg: JobConfig, out: Path, model: MLP, optim: Optimizer) -> int:
    """Collective: load the newest checkpoint (read by rank 0, broadcast); return its step.

    Returns 0 when there is no checkpoint (a fresh start).  Every rank raises the same error
    if rank 0 cannot read it or it belongs to a different training (other ranks, batch,
    seed, data order, model or optimizer).
    """
    loaded: Any = None
    if ctx.is_root:
        try:
            found = list_checkpoints(out)
            loaded = load(found[-1]) if found else None
        except MpitrainError as err:
            loaded = err
    loaded = ctx.comm.bcast(loaded, root=0)
    if isinstance(loaded, MpitrainError):
        loaded.reporter = 0
        raise loaded
    if loaded is None:
        return 0
    arrays, meta = loaded
    mine = resume_identity(ctx.size, cfg)
    differ = [f"{k} {meta.get(k)!r} -> {v!r}" for k, v in mine.items() if meta.get(k) != v]
    if differ:
        raise MpitrainError(
            f"the checkpoint of step {meta['step']} in {out} belongs to a different training "
            f"({'; '.join(differ)}): resuming it would not continue the same run",
            hint="resume with the job the checkpoint was written by, or use a new [run] out",
            reporter=0)
    try:
        model.load_state({k: v for k, v in arrays.items() if k.startswith("layers.")},
                         f"checkpoint step {meta['step']}")
        optim.load_state_dict(arrays)
    except (MpitrainError, KeyError, ValueError) as exc:
        raise MpitrainError(f"the checkpoint of step {meta['step']} in {out} does not fit this "
                            f"job: {exc}", hint="use a new [run] out", reporter=0) from None
    return int(meta["step"])


def forget_earlier_run(out: Path, size: int) -> None:
    """A fresh start in a used folder: nothing of an earlier run may mix with this one.

    Its checkpoints must never be resumed by mistake, and its metrics, events and per-rank
    logs of ranks this run does not have must not be read as this run's.  (Rank 0 only; the
    per-rank logs of ranks < size are rewritten by their ranks.)
    """
    old = list_checkpoints(out)
    stale = [out / "metrics.jsonl", out / "events.jsonl"]
    for pattern in ("ledger-rank*.jsonl", "faults-rank*.jsonl"):
        stale += [p for p in out.glob(pattern)
                  if int(p.stem.rsplit("rank", 1)[1]) >= size]
    for path in old + stale:
        path.unlink(missing_ok=True)
    if old:
        print(f"mpitrain: starting afresh in {out}: removed {len(old)} checkpoint(s) of an "
              f"earlier run (use --resume to continue one)", file=sys.stderr)

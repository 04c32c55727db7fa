"""Checkpoints and output files, written atomically.

Every file goes to a temporary name in the same folder, is flushed to disk, then renamed
over the target: a reader (or a restarted job) sees the old file or the new one, never half
of one.  Only rank 0 writes; replicas are identical, so its parameters are everyone's.

A checkpoint ``checkpoints/step-00000120.npz`` holds the parameters under the
parameter-file keys, the optimizer state under ``optim.*``, and ``meta`` (JSON: step, the
run's identity) so that a resume can refuse a run it would not reproduce.

The resume policy lives here too: what a checkpoint and the run resuming it must share
(:func:`resume_identity`: everything that changes the mathematics, the data's content
included) and the collective :func:`restore`.  The rank count is not part of it: a run
resumed on P' ranks keeps the global batch it started with (split unevenly where P' does
not divide it, see shard.ShardSampler), so it continues the same mathematics -- elastic
resume.  And the rule that a fresh start never destroys
an earlier run: it refuses (:func:`check_fresh_start`), or with ``--overwrite`` moves the
earlier run aside until the new one has written its first checkpoint.

Files are written with the mode the umask gives (as ``open`` would), not the 0600 of a
temporary file.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .errors import ConfigError, MpitrainError

if TYPE_CHECKING:
    from .config import JobConfig
    from .context import RankContext
    from .model import MLP
    from .optim import Optimizer

CHECKPOINT_RE = re.compile(r"^step-(\d{8})\.npz$")
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], object]) -> None:
    """Write ``path`` via ``write(fh)`` on a temporary file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
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
    forget_set_aside(out)
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
#: Job keys a resumed run may change without a word: how the run is driven, reported and
#: synchronized, not what it computes.  ``run.steps``/``run.epochs`` extend or shorten the
#: run; another ``[sync]`` algorithm or bucket layout adds gradients in another order, so
#: at 3+ ranks the last bits may differ.  Every other key needs ``--allow-change KEY``.
RESUME_MAY_CHANGE = ("run.steps", "run.epochs", "run.out", "run.checkpoint_every",
                     "run.keep_checkpoints", "run.log_every", "run.progress", "run.blas_threads",
                     "run.device", "sync.*", "faults.*")


def _may_change(name: str, allowed: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in (*RESUME_MAY_CHANGE, *allowed))


#: Identity keys that describe a run without defining it: the rank count it ran on, and the
#: global batch -- which every resume keeps from the checkpoint (:func:`restore`).
INFORMATION = ("ranks", "data.global_batch")


def resume_identity(size: int, cfg: JobConfig, data_fingerprint: str,
                    global_batch: int) -> dict[str, Any]:
    """Everything that makes a run the mathematics it is: the data's content, the global
    batch, and every job key outside :data:`RESUME_MAY_CHANGE` (``section.key`` -> value);
    and, as information, the rank count."""
    identity: dict[str, Any] = {"ranks": size, "data.global_batch": global_batch,
                                "data.content": data_fingerprint}
    for sec in ("run", "data", "model", "optim", "sync", "faults"):
        for f in dataclasses.fields(getattr(cfg, sec)):
            name = f"{sec}.{f.name}"
            if not _may_change(name, ()):
                identity[name] = _plain(getattr(getattr(cfg, sec), f.name))
    return identity


def _plain(value: Any) -> Any:
    """A JSON-comparable value (lists stay lists, dataclasses become dicts)."""
    return json.loads(json.dumps(value, default=lambda o: dataclasses.asdict(o)))


@dataclasses.dataclass(frozen=True)
class Resumed:
    """Where a resumed run starts: the checkpoint's ``step`` (0: none, a fresh start), the
    allowed ``changed`` keys (``key -> (old, new)``), the ``ranks`` the checkpoint was written
    on and the ``global_batch`` the run continues with."""

    step: int
    changed: dict[str, tuple[Any, Any]]
    ranks: int
    global_batch: int


def kept_global_batch(old: dict[str, Any], new: dict[str, Any]) -> int:
    """The global batch a resumed run continues with: the checkpoint's (older checkpoints
    did not record it: their per-rank batch times their rank count), unless the per-rank
    batch itself was changed (``--allow-change data.batch_size``): then the new run's."""
    if old.get("data.batch_size") != new["data.batch_size"]:
        return int(new["data.global_batch"])
    return int(old.get("data.global_batch") or old["data.batch_size"] * old["ranks"])


def restore(ctx: RankContext, cfg: JobConfig, out: Path, model: MLP, optim: Optimizer,
            identity: dict[str, Any], allowed: Sequence[str] = ()) -> Resumed:
    """Collective: load the newest checkpoint (read by rank 0, broadcast).

    Returns where the run resumes (:class:`Resumed`; step 0 when there is no checkpoint).
    Every rank raises the same error if rank 0 cannot read it, or if it belongs to a
    different training: every key of ``identity`` but :data:`INFORMATION` that differs and
    is not in ``allowed`` (patterns like ``optim.lr`` or ``optim.*``) is named.
    """
    loaded: Any = None
    if ctx.is_root:
        try:
            found = list_checkpoints(out)
            loaded = load(found[-1]) if found else None
        except MpitrainError as err:
            loaded = err
    loaded = ctx.guard.bcast(loaded, "reading the checkpoint", 0)
    if isinstance(loaded, MpitrainError):
        loaded.reporter = 0
        raise loaded
    if loaded is None:
        return Resumed(0, {}, ctx.size, int(identity["data.global_batch"]))
    arrays, meta = loaded
    if "identity" not in meta:
        raise MpitrainError(f"the checkpoint of step {meta['step']} in {out} was written by an "
                            f"older mpitrain, which did not record what it trained",
                            hint="resume it with that version, or start afresh in a new "
                                 "[run] out", reporter=0)
    old = meta["identity"]
    changed = {k: (old.get(k), v) for k, v in identity.items()
               if old.get(k) != v and k not in INFORMATION}
    refused = [f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items() if not _may_change(k, allowed)]
    if refused:
        raise MpitrainError(
            f"the checkpoint of step {meta['step']} in {out} belongs to a different training "
            f"({'; '.join(refused)}): resuming it would not continue the same run",
            hint="resume with the job the checkpoint was written by, use a new [run] out, or "
                 "accept a deliberate change with --allow-change KEY (e.g. --allow-change "
                 "optim.lr)", reporter=0)
    try:
        model.load_state({k: v for k, v in arrays.items() if k.startswith("layers.")},
                         f"checkpoint step {meta['step']}")
        optim.load_state_dict(arrays)
    except (MpitrainError, KeyError, ValueError) as exc:
        raise MpitrainError(f"the checkpoint of step {meta['step']} in {out} does not fit this "
                            f"job: {exc}", hint="use a new [run] out", reporter=0) from None
    return Resumed(int(meta["step"]), changed, int(old["ranks"]), kept_global_batch(old, identity))


# --------------------------------------------------------------------------- earlier runs
#: What a run writes into its folder (besides the report files of later tools).
RUN_FILES = ("model.npz", "metrics.jsonl", "events.jsonl", "config.toml", "checkpoints",
             "ledger-rank*.jsonl", "ledger-rank*.jsonl.1", "faults-rank*.jsonl", "traffic.json",
             "trace.json", "trace-rank*.json", "report.html")
REPLACED = ".replaced"  # an earlier run moved aside by --overwrite until the new one checkpoints


def earlier_run(out: Path) -> list[Path]:
    """The files of an earlier run in ``out`` (empty: none, or nothing worth keeping)."""
    if not out.is_dir():
        return []
    found = [p for pattern in RUN_FILES for p in sorted(out.glob(pattern))]
    results = (out / "model.npz").exists() or (out / "metrics.jsonl").exists() \
        or bool(list_checkpoints(out))
    return found if results else []


def check_writable(out: Path) -> None:
    """The output folder must exist or be creatable, and take a file: say so now, naming the
    path, rather than fail at the first checkpoint (a file in the way, a read-only or full
    file system, /proc)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"[run] out = {str(out)!r} is a file, not a folder",
                          hint="set [run] out to a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out) as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out) else ""
        raise ConfigError(f"[run] out = {str(out)!r}: cannot write there: "
                          f"{exc.strerror or exc}{where}",
                          hint="set [run] out to a folder on a writable file system with "
                               "free space") from None


def check_fresh_start(out: Path, overwrite: bool) -> None:
    """A fresh start must not destroy an earlier run: refuse unless ``overwrite``.

    Also puts back an earlier run that an ``--overwrite`` run moved aside and then died
    before its first checkpoint (rank 0 only, before anything is written)."""
    put_back(out)
    found = earlier_run(out)
    if found and not overwrite:
        checkpoints = list_checkpoints(out)
        what = ", ".join(p.name for p in found if p.name != "checkpoints")
        if checkpoints:
            what += f", {len(checkpoints)} checkpoint(s) up to {checkpoints[-1].name}"
        raise ConfigError(f"[run] out = {str(out)!r} holds an earlier run ({what}); a fresh "
                          f"start would replace it",
                          hint="continue it with --resume, write elsewhere with --set "
                               "run.out=..., or replace it with --overwrite (it is kept "
                               "until the new run writes its first checkpoint)")


def set_aside(out: Path) -> None:
    """``--overwrite``: move the earlier run's files into ``out/.replaced`` (rank 0); they
    are deleted by the new run's first checkpoint (:func:`save`), or put back if it dies
    before (:func:`put_back`)."""
    found = earlier_run(out)
    if not found:
        return
    aside = out / REPLACED
    aside.mkdir()
    for path in found:
        path.rename(aside / path.name)
    print(f"mpitrain: --overwrite: the earlier run in {out} is kept in {aside} until this run "
          f"writes its first checkpoint", file=sys.stderr)


def put_back(out: Path) -> None:
    """Restore the run an ``--overwrite`` run was replacing, if that run failed (or died)
    before its first checkpoint; what it wrote is removed.  A no-op without ``.replaced``."""
    aside = out / REPLACED
    if not aside.is_dir():
        return
    for path in out.glob("*"):  # what the failed run wrote
        if path.name == REPLACED or not any(fnmatch.fnmatchcase(path.name, p) for p in RUN_FILES):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for path in aside.iterdir():
        path.rename(out / path.name)
    aside.rmdir()


def forget_set_aside(out: Path) -> None:
    """The new run has a checkpoint: the run it replaced is gone for good."""
    shutil.rmtree(out / REPLACED, ignore_errors=True)


def drop_stale_rank_logs(out: Path, size: int) -> None:
    """Per-rank logs of ranks this run does not have must not be read as this run's (rank 0;
    the logs of ranks < size are rewritten by their ranks)."""
    for pattern in ("ledger-rank*.jsonl", "faults-rank*.jsonl"):
        for p in out.glob(pattern):
            if int(p.stem.rsplit("rank", 1)[1]) >= size:
                p.unlink(missing_ok=True)

"""Checkpoints and output files, written atomically.

Every file goes to a temporary name in the same folder, is flushed to disk, then renamed
over the target: a reader (or a restarted job) sees the old file or the new one, never half
of one.  Only rank 0 writes; replicas are identical, so its parameters are everyone's.

A checkpoint ``checkpoints/step-00000120.npz`` holds the parameters under the
parameter-file keys, the optimizer state under ``optim.*``, and ``meta`` (JSON: step,
ranks, per-rank batch) so that a resume can refuse a run it would not reproduce.
"""
from __future__ import annotations

import io
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import MpitrainError

CHECKPOINT_RE = re.compile(r"^step-(\d{8})\.npz$")


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
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
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


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

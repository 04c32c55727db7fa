"""The built-in jobs: TOML job files shipped inside the package, found by name.

The files live here (``digits.toml``, ``chapter/two_gpus.toml``, ``faults/crash.toml``, ...)
and reach an installed package as package data.  A checkout's top-level ``jobs/`` holds
relative symlinks to them, so ``mpitrain run jobs/digits.toml`` works in the repository,
and :func:`resolve` lets every command take a built-in job by name from any folder:
``mpitrain run faults/crash`` (or ``faults/crash.toml``, or ``jobs/faults/crash.toml``).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import ConfigError


def folder() -> Path:
    """Where the built-in job files are (a folder of the installed package)."""
    return Path(str(resources.files(__name__)))


def names() -> list[str]:
    """The built-in jobs' names: paths below :func:`folder` without ``.toml``."""
    root = folder()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.toml"))


def resolve(job: str | None) -> str | Path | None:
    """The job file a command's JOB argument names.

    ``None`` (no job: the built-in defaults) and any existing path stay as given, so a job's
    name stays its file's stem; otherwise ``job`` must name a built-in job, with or without
    ``.toml`` and the leading ``jobs/`` of the repository's folder.  A job that is neither is
    a :class:`ConfigError` that lists the built-in jobs.
    """
    if job is None or Path(job).exists():
        return job
    name = job.removeprefix("jobs/").removesuffix(".toml")
    if name in names():
        return folder() / f"{name}.toml"
    raise ConfigError(f"job file {Path(job)} does not exist",
                      hint=f"give a TOML job file, or a built-in job: {', '.join(names())}")

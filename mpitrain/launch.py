"""``-n P``: re-run a command under ``mpiexec -n P``, with the launcher of mpi4py's MPI.

Used by ``mpitrain run -n P`` (:func:`launch_run`) and ``mpitrain bench SUB -n P``.  The
launching process starts no MPI itself: it only asks mpi4py which library it uses, then
replaces itself with mpiexec.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

from . import config, jobs
from .context import environment
from .errors import ConfigError, LaunchError

OPENMPI_LOCAL_ENV = {  # what a local Open MPI launch as root, on a small machine, needs
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "self,sm",
}


def launch_run(nprocs: int, job: str | None, overrides: list[str], faults: list[str],
               start_flags: list[str]) -> NoReturn:
    """Re-run ``mpitrain run`` with these arguments under ``mpiexec -n NPROCS``
    (``start_flags``: --resume, --overwrite, --allow-change KEY, passed on as they are)."""
    overrides = list(overrides)
    # Check the job before starting any rank, and keep the progress bar: under mpiexec the
    # ranks write into pipes, so they cannot see that the user is at a terminal.
    cfg = config.load(jobs.resolve(job), overrides, environment(),
                      extra_rules=[config.parse_fault(f) for f in faults])
    if cfg.run.progress == "auto" and sys.stderr.isatty():
        overrides.append('run.progress="bar"')
    argv = ["-m", "mpitrain", "run", *([job] if job else [])]
    for o in overrides:
        argv += ["--set", o]
    for f in faults:
        argv += ["--fault", f]
    argv += start_flags
    # Keep the other ranks alive when one dies, so they can say which one did (hydra's
    # default kills them all at once, silently).  A rank that fails alone still takes the
    # job down with MPI_Abort.
    exec_under_mpiexec(nprocs, argv, keep_survivors=True)


def exec_under_mpiexec(nprocs: int, python_args: list[str],
                       keep_survivors: bool = False) -> NoReturn:
    """Replace this process with ``mpiexec -n NPROCS python PYTHON_ARGS``.

    Uses the mpiexec that belongs to mpi4py's MPI (another MPI's launcher silently starts
    NPROCS separate rank-0 jobs), with what a local run needs: one BLAS thread per rank, and
    for Open MPI the settings for root and oversubscription.  ``keep_survivors`` passes
    MPICH's -disable-auto-cleanup (the ranks must then ignore SIGUSR1 outside training,
    which :func:`mpitrain.session.session` does).
    """
    if nprocs < 1:
        raise ConfigError(f"-n {nprocs}: the number of ranks must be >= 1")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        raise LaunchError(f"no mpiexec next to {sys.executable}",
                          hint="install MPI from PyPI into this environment (pip install mpich), "
                               "or launch with your cluster's mpiexec/srun yourself")
    import mpi4py
    mpi4py.rc.initialize = False  # only ask which library; do not start MPI in the launcher
    from mpi4py import MPI
    library = MPI.Get_library_version()
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if "Open MPI" in library:
        for k, v in OPENMPI_LOCAL_ENV.items():
            env.setdefault(k, v)
    argv = [str(mpiexec), "-n", str(nprocs)]
    if keep_survivors and "MPICH" in library:
        argv.append("-disable-auto-cleanup")
    argv += [sys.executable, *python_args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)

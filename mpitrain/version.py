"""``mpitrain --version``: this package's version and the stack it runs on.

Asks mpi4py which MPI library it loads without initialising MPI, so it works anywhere
(no launcher, no network) and quickly.
"""
from __future__ import annotations

import platform
from importlib import metadata


def package_version() -> str:
    """The installed distribution's version (setup.cfg's ``version``); in a source checkout
    that was never installed, the package's ``__version__``."""
    try:
        return metadata.version("mpitrain")
    except metadata.PackageNotFoundError:
        from . import __version__
        return __version__


def mpi_library() -> str:
    """The first line of ``MPI.Get_library_version()`` (e.g. "MPICH Version: 4.3.0"), asked
    with MPI left uninitialised; or why mpi4py cannot load its MPI library."""
    import mpi4py
    mpi4py.rc.initialize = False  # only ask: starting MPI here could hang or need a launcher
    try:
        from mpi4py import MPI
        first = MPI.Get_library_version().strip().splitlines()[0]
    except Exception as exc:  # a missing or broken libmpi: say so, --version still works
        return f"cannot be loaded ({exc})"
    return " ".join(first.split())


def report() -> str:
    """The lines ``mpitrain --version`` prints."""
    import mpi4py
    import numpy
    return "\n".join([
        f"mpitrain {package_version()}",
        f"mpi4py {mpi4py.__version__}, MPI library: {mpi_library()}",
        f"numpy {numpy.__version__}",
        f"Python {platform.python_version()} ({platform.python_implementation()})",
    ])

import sys
from pathlib import Path

# tests/mpirun.py is a helper module, imported as `from mpirun import ...`
sys.path.insert(0, str(Path(__file__).parent))


# tests/in_rank runs inside MPI jobs (see tests/test_in_rank.py), not in the plain suite.
collect_ignore = ["in_rank"]


def pytest_report_header(config) -> list[str]:
    """Which MPI the suite runs on: results differ between implementations.

    Asked in a child process, with MPI left uninitialised, so the suite's own process
    starts no MPI of its own."""
    from mpirun import PROFILE, suite_library
    version, library = suite_library()
    return [f"MPI: mpi4py {version}, {library.splitlines()[0].strip()} (launcher profile "
            f"{PROFILE.name})"]

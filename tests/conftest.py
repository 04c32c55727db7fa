import subprocess
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
    probe = ("import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; "
             "print(mpi4py.__version__); print(MPI.Get_library_version().strip())")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60)
    if res.returncode != 0:
        return [f"MPI: mpi4py cannot load its MPI library: {res.stderr.strip()[-300:]}"]
    version, library = res.stdout.split("\n", 1)
    return [f"MPI: mpi4py {version}, {library.splitlines()[0].strip()}"]

import sys
from pathlib import Path

# tests/mpirun.py is a helper module, imported as `from mpirun import ...`
sys.path.insert(0, str(Path(__file__).parent))


# tests/in_rank runs inside MPI jobs (see tests/test_in_rank.py), not in the plain suite.
collect_ignore = ["in_rank"]

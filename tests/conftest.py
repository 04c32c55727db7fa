import sys
from pathlib import Path

# tests/mpirun.py is a helper module, imported as `from mpirun import ...`
sys.path.insert(0, str(Path(__file__).parent))

"""``python -m mpitrain``: the same as the ``mpitrain`` command."""
import sys

from .cli import main

sys.exit(main())

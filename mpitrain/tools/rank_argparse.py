"""argparse for commands that run on every rank of an MPI job."""
from __future__ import annotations

import argparse

from ..errors import ConfigError


class RankArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`ConfigError` instead of exiting, so that inside
    ``World.collective_errors`` only one rank prints the message (``--help`` still prints
    on every rank and exits)."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message}")

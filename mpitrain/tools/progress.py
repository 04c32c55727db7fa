"""What tools show: their results on stdout, and progress with an ETA on stderr.

Progress (``bench allreduce`` sweeps, ``bench train`` runs) is a tqdm bar on stderr, drawn
by rank 0 only and, by default, only when stderr is a terminal.  The tables on stdout stay
byte for byte what they are without it: lines printed through :meth:`Progress.print` go to
stdout with the bar cleared and redrawn around them, and the bar disappears when the work
is done.  A reader that stops reading stdout early (``| head``) is no error
(:func:`print_result`).

Under mpiexec the ranks write into pipes and cannot see the user's terminal, so a
``-n P`` re-launch passes ``--progress bar`` on when the launching process is at one
(:func:`forward_terminal`); under a plain mpiexec, ``--progress bar`` asks for it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

MODES = ("auto", "bar", "off")


def add_option(parser: argparse.ArgumentParser) -> None:
    """The ``--progress`` option of a tool."""
    parser.add_argument("--progress", choices=MODES, default="auto",
                        help="progress bar with an ETA on stderr (rank 0): auto = when stderr "
                             "is a terminal (-n P passes it on), bar = always, off = never")


def forward_terminal(args: list[str]) -> list[str]:
    """``args`` for the ranks of a ``-n P`` re-launch: with ``--progress bar`` added when
    this process's stderr is a terminal and ``--progress`` was not given."""
    given = any(a == "--progress" or a.startswith("--progress=") for a in args)
    return args if given or not sys.stderr.isatty() else [*args, "--progress", "bar"]


def print_result(text: str) -> None:
    """``text`` and a newline on stdout, flushed.  When the reader has gone (``| head``),
    the rest of the output goes to /dev/null instead of ending in a traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _stdout_to_devnull()


def _stdout_to_devnull() -> None:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Progress:
    """A bar over ``total`` units of work (any weights) with elapsed time and ETA, or
    nothing: when ``active`` is false (ranks other than 0), ``mode`` is "off", or "auto"
    and stderr is not a terminal."""

    def __init__(self, mode: str, total: float, active: bool, desc: str):
        self._bar: Any = None
        if active and (mode == "bar" or (mode == "auto" and sys.stderr.isatty())):
            from tqdm import tqdm
            # smoothing=0: the rate over all work so far, steadier than recent bursts
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                             smoothing=0, leave=False, mininterval=0.5,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                                        "{elapsed} elapsed, ETA {remaining}")

    def advance(self, units: float) -> None:
        if self._bar is not None:
            self._bar.update(units)

    def print(self, line: str) -> None:
        """``line`` on stdout, flushed (the bar, if any, cleared and redrawn around it)."""
        if self._bar is None:
            print_result(line)
            return
        try:
            self._bar.write(line, file=sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_to_devnull()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

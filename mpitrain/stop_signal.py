"""Preemption: SIGTERM or SIGUSR1 (Slurm's ``--signal``, a preempting scheduler) becomes a
flag the training loop reads at each step's end, where every rank stops together, rank 0
writes a checkpoint and all exit 75 (mpitrain.train)."""
from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any


class StopSignal:
    """Turns SIGTERM/SIGUSR1 (preemption, Slurm's --signal) into a flag read at step ends.

    Installed for the training loop and removed by :meth:`restore`; a second signal before
    the step boundary kills the process the default way.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = 0
        self._old: dict[int, Any] = {}
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): no preemption
                pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # asked twice: the step boundary is not coming, stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.requested = 1

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

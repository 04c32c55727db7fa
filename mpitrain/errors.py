"""Errors a user can act on.

Every error that should reach the user as *one clear message* (no traceback)
derives from :class:`MpitrainError`.  The command line catches them, prints the
message once (from one rank only) and exits with ``exit_code``.  Anything else
is a bug in mpitrain and keeps its traceback.
"""
from __future__ import annotations


class MpitrainError(Exception):
    """A problem the user can fix or must know about; printed without traceback.

    ``hint`` is an optional second line telling the user what to do next.
    ``reporter`` is set when EVERY rank raises this error together (a collective check, an
    error broadcast by the transport): then only rank ``reporter`` prints it and each rank
    exits by itself.  ``None`` means this rank alone saw it: it prints, and the whole job is
    aborted, since the other ranks may be waiting for it inside a collective.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, reporter: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.reporter = reporter

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(MpitrainError):
    """A job file, override or environment variable is invalid."""


class DataError(MpitrainError):
    """A data set cannot be read or does not fit the model/job."""


class LaunchError(MpitrainError):
    """The MPI launch is wrong (for example a launcher from another MPI)."""


class SyncError(MpitrainError):
    """Gradient synchronization failed and was not recovered (a fault, a hang, a crash).

    ``step`` and ``layer`` locate the failure where it is known; ``ranks`` are the ranks it
    was seen on (or came from).
    """

    exit_code = 3

    def __init__(self, message: str, hint: str | None = None, reporter: int | None = None,
                 *, step: int | None = None, layer: int | None = None,
                 ranks: list[int] | None = None):
        super().__init__(message, hint, reporter)
        self.step, self.layer, self.ranks = step, layer, list(ranks or [])


class DivergenceError(SyncError):
    """Replicas that must be identical are not (named by rank and layer).

    ``groups``: the ranks grouped by the parameters they hold, largest group first.
    """

    def __init__(self, message: str, hint: str | None = None, reporter: int | None = None,
                 *, step: int | None = None, layer: int | None = None,
                 ranks: list[int] | None = None, groups: list[list[int]] | None = None):
        super().__init__(message, hint, reporter, step=step, layer=layer, ranks=ranks)
        self.groups = list(groups or [])


class ReductionError(SyncError):
    """The reduced gradient is not the sum of the ranks' gradients (all ranks agree on it):
    a contribution was lost or altered inside the reduction, so every replica is equally
    wrong and no replica hash can see it."""


class NumericsError(SyncError):
    """A NaN or Inf reached the gradients or the loss (named by rank and layer)."""


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; resume me
CRASH_EXIT = 70      # EX_SOFTWARE: the status of a rank that a "crash" fault killed


class Preempted(MpitrainError):
    """A preemption signal arrived; every rank checkpointed at the same step."""

    exit_code = PREEMPTED_EXIT

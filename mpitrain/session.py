"""One MPI session of a command: start-up, user errors, bugs and the way out.

Every command that runs on the ranks (``mpitrain run``, ``mpitrain bench allreduce|train``,
the scripts in ``benchmarks/``) runs inside :func:`session`, so they all start and end the
same way.  A user error (:class:`MpitrainError`) becomes one message on stderr, printed by
one rank, and a non-zero exit on every rank -- never a traceback per rank, never a hang:

* errors every rank raised together (bad config, replica checks, preemption, a fault that
  the transport reported to all ranks) exit each process with the error's code;
* an error only one rank saw (a NaN loss on that rank's shard, say) aborts the whole job
  with MPI_Abort, since the other ranks may already wait in a collective for it.

An error raised by MPI itself (a peer that died in the middle of a message) is a
synchronization failure (status 3), not a bug.  Any other exception is a bug: its traceback
is printed and the job aborted with status 1.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from typing import Iterator, NoReturn

from .context import World, environment, launcher_rank
from .context import mpi as context_mpi
from .errors import MpitrainError, SyncError

EXIT_WAIT_S = 3.0  # how long ranks that failed together wait for each other before exiting


@contextmanager
def session() -> Iterator[World]:
    """Collective: start MPI, check the launcher, and yield the :class:`World`.

    Every rank enters together.  Inside the block, code that can fail on some ranks only
    and is followed by collectives belongs in ``world.collective_errors()``.  An error
    leaving the block ends the process here (see the module docstring); a normal end
    returns, and MPI is finalised when the interpreter exits.
    """
    # Launched with -disable-auto-cleanup, hydra sends SIGUSR1 to the other ranks whenever a
    # rank exits, also at a normal end.  Training turns SIGUSR1 into "checkpoint and stop"
    # (preemption); outside training it must not kill the process.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    world = World(environment())
    try:
        with world.collective_errors():
            world.check_launcher()
        yield world
        world.record_exit(0)
    except MpitrainError as err:
        exit_on_error(err, world)
    except OSError as exc:  # the file system failed under a running job (a full disk, say)
        where = f"{exc.filename}: " if exc.filename else ""
        exit_on_error(MpitrainError(f"cannot write the run's files: {where}{exc.strerror or exc}",
                                    hint="free space or choose another [run] out, then "
                                         "continue with --resume"), world)
    except context_mpi().Exception as exc:  # MPI itself failed: a peer died mid-message, say
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        exit_on_error(SyncError(f"MPI reported an error on rank {world.rank}: {first}",
                                hint="a rank may have died (crashed or killed) while a message "
                                     "to or from it was in flight; `mpitrain run -n P "
                                     "--restarts N` relaunches from the newest checkpoint"),
                      world)
    except Exception:  # a bug: show where, and take the job down rather than hang it
        traceback.print_exc()
        sys.stderr.flush()
        world.record_exit(1)
        world.release_shared_memory()
        _abort(world, 1)


def exit_on_error(err: MpitrainError, world: World) -> NoReturn:
    """Print ``err`` once and end this rank -- and the job -- with its exit code."""
    everywhere = err.reporter is not None
    # P processes of a foreign launcher are P worlds of one: only its first one speaks
    alone_of_many = world.size == 1 and launcher_rank(world.env) not in (None, 0)
    if (not everywhere or err.reporter == world.rank) and not alone_of_many:
        print(f"mpitrain: error: {err}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    world.record_exit(err.exit_code)
    world.release_shared_memory()  # no MPI_Finalize on this path: it would not clean up
    if world.size > 1 and not everywhere:
        _abort(world, err.exit_code)
    if world.size > 1:
        # Leave together: a launcher that keeps no survivors kills the remaining ranks as
        # soon as one exits with an error ("BAD TERMINATION"), so the ranks meet first
        # (boundedly: one may be dead) and then all exit at once.  Intel MPI's hydra kills
        # them even then unless they finalize; MPICH's kills those still finalizing when
        # the first has left, so only Intel MPI's ranks finalize (all there: else it waits).
        if world.all_present(timeout=EXIT_WAIT_S) and \
                "Intel" in context_mpi().Get_library_version():
            _finalize_within(EXIT_WAIT_S, err.exit_code)
    os._exit(err.exit_code)


def _finalize_within(seconds: float, code: int) -> None:
    """MPI_Finalize on the way out of an error every rank raised (all ranks call it, having
    met); bounded: a message still in flight to a peer that gave up on it can keep it
    waiting, and after ``seconds`` this process exits with ``code`` anyway."""
    watchdog = threading.Timer(seconds, os._exit, args=(code,))
    watchdog.daemon = True
    watchdog.start()
    context_mpi().Finalize()


def _abort(world: World, code: int) -> NoReturn:
    """Take the whole job down from this rank: MPI_Abort, its own stderr line silenced (the
    user has read mpitrain's message already), and never go on after it (the MPICH wheel's
    MPI_Abort can return)."""
    sys.stderr.flush()
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    except OSError:
        pass
    world.comm.Abort(code)
    os._exit(code)

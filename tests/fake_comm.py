"""An in-process fake of the mpi4py communicator calls the transport makes.

``Fabric(size)`` is the network between ``size`` ranks that run as threads of one process;
``fabric.comm(rank)`` is one rank's communicator, ``run_ranks`` runs a function on every
rank.  So the transport, its delivery policies and the error agreement get unit tests that
take milliseconds, beside the multi-process ones (tests/test_transport_unit.py).

MPI semantics kept: messages from one source with one tag are matched in the order sent
(non-overtaking); a matched probe takes the message off the network; a send of more than
:data:`EAGER_MAX` bytes is read from the sender's buffer only when the receiver matches it
and its request completes then (rendezvous: a sender that reuses the buffer too early sends
the new contents), smaller sends are copied at once and complete at once.  Pickled sends
(``isend``) are eager.  A communicator's ``Idup`` is a new context: its messages never match
those of the communicator it was duplicated from (the k-th ``Idup`` of a communicator is
the same context on every rank).
"""
from __future__ import annotations

import pickle
import threading
import time
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

EAGER_MAX = 64 * 1024


class Request:
    """A send request: complete once its message left the sender's buffer."""

    def __init__(self, done: bool):
        self.done = done

    def Test(self, status=None) -> bool:
        return self.done


def _bytes_of(buf: Any) -> np.ndarray:
    """The uint8 view of a send buffer (bytes, a NumPy array, or [array, count, type])."""
    if isinstance(buf, list):
        buf = buf[0]
    if isinstance(buf, (bytes, bytearray)):
        return np.frombuffer(buf, np.uint8)
    return np.ascontiguousarray(buf).reshape(-1).view(np.uint8)


class Envelope:
    """One message on its way: source, tag, and the payload or the buffer it is read from."""

    def __init__(self, src: int, tag: int, buf: Any = None, obj: bytes | None = None):
        self.src, self.tag, self.obj = src, tag, obj
        self.context: tuple = ()  # the communicator's context, set when it is posted
        self.data: np.ndarray | None = None
        self.lent: np.ndarray | None = None
        if buf is None:
            self.request = Request(True)
            return
        arr = _bytes_of(buf)
        if arr.size > EAGER_MAX:
            self.lent, self.request = arr, Request(False)
        else:
            self.data, self.request = arr.copy(), Request(True)

    def __repr__(self) -> str:
        return f"Envelope(src={self.src}, tag={self.tag}, context={self.context})"

    def take(self) -> np.ndarray:
        """The payload, read now from the sender's buffer if it was lent (rendezvous); a
        pickled message's bytes."""
        if self.obj is not None:
            return np.frombuffer(self.obj, np.uint8)
        if self.lent is not None:
            self.data, self.lent = self.lent.copy(), None
            self.request.done = True
        return self.data


class Message:
    """A matched probe's message (``Improbe``)."""

    def __init__(self, data: np.ndarray):
        self.data = data

    def Recv(self, spec: list) -> None:
        _bytes_of(spec)[:self.data.size] = self.data


class RecvRequest:
    """An ``Irecv``: completes when a matching message is there to copy in."""

    def __init__(self, comm: "FakeComm", spec: list, source: int, tag: int):
        self.comm, self.spec, self.source, self.tag, self.done = comm, spec, source, tag, False

    def Test(self, status=None) -> bool:
        if not self.done:
            env = self.comm._match(self.source, self.tag, take=True)
            if env is not None:
                data = env.take()
                _bytes_of(self.spec)[:data.size] = data
                self.done = True
        return self.done


class Fabric:
    """The network: per destination, the messages not yet received, in send order."""

    def __init__(self, size: int):
        self.size = size
        self.lock = threading.Lock()
        self.boxes: list[list[Envelope]] = [[] for _ in range(size)]

    def comm(self, rank: int) -> "FakeComm":
        return FakeComm(self, rank)

    def leftovers(self) -> list[Envelope]:
        """Every message sent and never received, on any communicator (MPI calls one left
        at MPI_Finalize erroneous; UCX prints a warning for each)."""
        with self.lock:
            return [e for box in self.boxes for e in box]

    def pending(self, dst: int, tag: int | None = None) -> list[Envelope]:
        """The messages waiting for ``dst`` (with ``tag``)."""
        with self.lock:
            return [e for e in self.boxes[dst] if tag is None or e.tag == tag]


class FakeComm:
    """One rank's end of a :class:`Fabric`, with the mpi4py calls the transport uses."""

    def __init__(self, fabric: Fabric, rank: int, context: tuple = ()):
        self.fabric, self.rank, self.context = fabric, rank, context
        self.dups = 0

    def Idup(self) -> tuple["FakeComm", Request]:
        self.dups += 1
        return FakeComm(self.fabric, self.rank, (*self.context, self.dups)), Request(True)

    def Free(self) -> None:
        """Nothing to release; messages still on the way stay in their context
        (:meth:`Fabric.leftovers` lists them)."""

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.fabric.size

    def _post(self, dst: int, env: Envelope) -> Request:
        env.context = self.context
        with self.fabric.lock:
            self.fabric.boxes[dst].append(env)
        return env.request

    def _match(self, source: int, tag: int, take: bool) -> Envelope | None:
        with self.fabric.lock:
            box = self.fabric.boxes[self.rank]
            for i, env in enumerate(box):
                if tag in (MPI.ANY_TAG, env.tag) and source in (MPI.ANY_SOURCE, env.src) \
                        and env.context == self.context:
                    if take:
                        del box[i]
                    return env
        return None

    def _wait_match(self, source: int, tag: int) -> Envelope:
        while (env := self._match(source, tag, take=True)) is None:
            time.sleep(1e-4)
        return env

    @staticmethod
    def _fill(status, env: Envelope, nbytes: int) -> None:
        if status is not None:
            status.Set_source(env.src)
            status.Set_tag(env.tag)
            status.Set_elements(MPI.BYTE, nbytes)

    def Isend(self, buf: Any, dst: int, tag: int) -> Request:
        return self._post(dst, Envelope(self.rank, tag, buf=buf))

    def isend(self, obj: Any, dst: int, tag: int) -> Request:
        return self._post(dst, Envelope(self.rank, tag, obj=pickle.dumps(obj)))

    def Irecv(self, spec: list, source: int, tag: int) -> RecvRequest:
        return RecvRequest(self, spec, source, tag)

    def Improbe(self, source: int, tag: int, status=None) -> Message | None:
        env = self._match(source, tag, take=True)
        if env is None:
            return None
        data = env.take()
        self._fill(status, env, data.size)
        return Message(data)

    def Iprobe(self, source: int, tag: int, status=None) -> bool:
        env = self._match(source, tag, take=False)
        if env is not None:
            self._fill(status, env, 0)
        return env is not None

    def recv(self, source: int, tag: int) -> Any:
        return pickle.loads(self._wait_match(source, tag).obj)

    def Recv(self, buf: Any, source: int, tag: int) -> None:
        data = self._wait_match(source, tag).take()
        _bytes_of(buf)[:data.size] = data


def run_ranks(size: int, fn: Callable[[FakeComm], Any], timeout: float = 30.0,
              fabric: Fabric | None = None) -> list[Any]:
    """Run ``fn(comm)`` on ``size`` ranks, one thread each; each rank's result or exception."""
    fabric = fabric or Fabric(size)
    results: list[Any] = [None] * size

    def rank_main(r: int) -> None:
        try:
            results[r] = fn(fabric.comm(r))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            results[r] = exc

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results

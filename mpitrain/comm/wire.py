"""The wire format of transport messages: message identity, header, checksums, corruption.

Messages
    Every data message travels on the harness's duplicated communicator with tag
    :data:`~mpitrain.comm.tags.TAG_DATA`, as a 96-byte int64 header (:data:`HEADER`)
    carrying a per-channel sequence number, the full :class:`MessageId` (step, layer,
    algorithm, phase, chunk, src, dst), the payload length, a checksum of the payload
    (:func:`checksum_kind`: xxh3 by default, CRC-32C or zlib's CRC-32 by choice, flagged in
    the header so mixed ranks are reported, not misread; none with ``checksum=False``,
    which trusts MPI's own delivery) and flags.  Payloads up to :data:`INLINE_MAX` bytes
    are copied behind the header into one MPI message.  Larger payloads follow the header
    in segments on the same (source, tag, communicator) (flag :data:`F_SPLIT`;
    :mod:`mpitrain.comm.segments`): MPI's non-overtaking rule keeps them in order, and the
    receiver always takes the payload right after its header.  The checksum covers the
    whole payload; :class:`Running` computes it segment by segment.

Packets
    A packet is ``(head, body)``: ``head`` the header (with the payload inline when
    ``body`` is None), ``body`` the payload that follows in segments.

The sequence numbers and what the receiver does with a packet that is not the one it
wants live in :mod:`mpitrain.comm.transport`; this module only builds and reads packets.
"""
from __future__ import annotations

import struct
import zlib
from typing import Any, Callable, NamedTuple, Union

import numpy as np

from mpitrain.schema import OWN_ALGORITHMS, PHASES

import xxhash
from crc32c import crc32c


def _xxh3(data: Any) -> int:
    return xxhash.xxh3_64_intdigest(data) & _WORD  # the header word is a signed int64


_WORD = (1 << 63) - 1
# The payload checksums, by their [faults] checksum name: (function, header flag).  Every
# payload is checksummed twice (sender, receiver), so the faster one keeps the check a
# smaller fraction of a transfer: xxh3 (the xxhash package) ran 3x faster than CRC-32C
# (crc32c, SSE4.2) on every box measured, 19-59 GB/s against 6-19 GB/s in cache
# (benchmarks/hash_rates.py).  zlib's CRC-32 only reads headers from older versions.
CHECKSUMS: dict[str, tuple[Callable[[Any], int], int]] = {
    "xxh3": (_xxh3, 16), "crc32c": (crc32c, 4), "zlib": (zlib.crc32, 0)}
DEFAULT_CHECKSUM = "xxh3"

# The wire numbers of the registry's own algorithms and phases (schema.py), plus the
# transport's own "fence" and "p2p".  Fixed numbers: ranks of different versions must agree.
ALGORITHM_CODES = {"ring": 1, "recursive_doubling": 2, "tree": 3, "fence": 4, "p2p": 5}
PHASE_CODES = {"reduce_scatter": 1, "allgather": 2, "exchange": 3, "reduce": 4,
               "broadcast": 5, "fence": 6, "p2p": 7}
assert set(OWN_ALGORITHMS) <= set(ALGORITHM_CODES) and set(PHASES) <= set(PHASE_CODES)
MAGIC = 0x6D7074726E  # "mptrn"
HEADER = struct.Struct("=12q")
HDR_BYTES = HEADER.size
# header word indices
(H_MAGIC, H_SEQ, H_STEP, H_LAYER, H_ALG, H_PHASE, H_CHUNK, H_SRC, H_DST, H_CRC, H_NBYTES,
 H_FLAGS) = range(12)
F_DROPPED = 1  # lossy mode: a tombstone in place of a dropped message
F_SPLIT = 2    # the payload follows as its own message (same source, tag and communicator)
F_CRC32C = 4   # the checksum is CRC-32C; all ranks must agree on the kind ...
F_NOSUM = 8    # checksums are off (checksum "none"): the CRC word is not set
F_XXH3 = 16    # ... or xxh3 (neither flag: zlib's CRC-32)
SUM_FLAGS = F_CRC32C | F_NOSUM | F_XXH3
INLINE_MAX = 16384  # payloads up to this size travel inside the header's message (one copy)

Packet = tuple[Union[bytes, np.ndarray], Union[np.ndarray, None]]


class MessageId(NamedTuple):
    """Identity of one point-to-point message of a collective."""

    step: int
    layer: int
    algorithm: str
    phase: str
    chunk: int
    src: int
    dst: int

    def where(self) -> str:
        return (f"step {self.step}, layer {self.layer}, {self.algorithm} {self.phase}, "
                f"chunk {self.chunk}, message {self.src}->{self.dst}")


def checksum_kind(choice: bool | str) -> tuple[Callable[[Any], int] | None, int]:
    """(checksum function or None, the flag naming it in every header this rank sends) for
    a ``[faults] checksum`` name, True (the default kind) or False / "none" (no checksum)."""
    if choice is True:
        choice = DEFAULT_CHECKSUM
    if choice is False or choice == "none":
        return None, F_NOSUM
    if choice not in CHECKSUMS:
        raise ValueError(f"unknown checksum {choice!r}; use one of {', '.join(CHECKSUMS)}")
    return CHECKSUMS[str(choice)]


class _RunningCrc:
    """A CRC computed piece by piece, with xxhash's streaming interface."""

    __slots__ = ("crc", "value")

    def __init__(self, crc: Callable[..., int]):
        self.crc, self.value = crc, 0

    def update(self, data: Any) -> None:
        self.value = self.crc(data, self.value)

    def intdigest(self) -> int:
        return self.value


class Running:
    """One payload's checksum computed piece by piece, in order (:meth:`update`); its
    :meth:`value` equals the one-shot checksum of :func:`checksum_kind` over the pieces
    joined, so a receiver can check each segment of a payload while it is in cache."""

    __slots__ = ("_state",)

    def __init__(self, kind: str):
        self._state = xxhash.xxh3_64() if kind == "xxh3" else _RunningCrc(CHECKSUMS[kind][0])

    def update(self, data: Any) -> None:
        self._state.update(data)

    def value(self) -> int:
        return self._state.intdigest() & _WORD


def running_kind(choice: bool | str) -> str | None:
    """The checksum name for :class:`Running` (None: no checksum), for the same ``choice``
    as :func:`checksum_kind`."""
    if checksum_kind(choice)[0] is None:
        return None
    return DEFAULT_CHECKSUM if choice is True else str(choice)


def pack_header(mid: MessageId, seq: int, crc: int, nbytes: int, flags: int) -> bytes:
    """The header of message ``mid``, number ``seq`` on its channel, ``nbytes`` of payload."""
    return HEADER.pack(MAGIC, seq, mid.step, mid.layer, ALGORITHM_CODES[mid.algorithm],
                       PHASE_CODES[mid.phase], mid.chunk, mid.src, mid.dst, crc, nbytes, flags)


def header_problem(hdr: tuple, mid: MessageId, seq: int, nbytes: int,
                   body: np.ndarray | None, sum_flag: int) -> str | None:
    """The one header check: None if ``hdr`` is message ``mid`` number ``seq``, ``nbytes``
    long (``body``: the payload at hand, None when it follows) and checksummed as this rank
    does (``sum_flag``, see :func:`checksum_kind`).  Otherwise "checksum" when only the
    checksum kinds differ, "message" when it is another message altogether."""
    if hdr[:9] != (MAGIC, seq, mid.step, mid.layer, ALGORITHM_CODES[mid.algorithm],
                   PHASE_CODES[mid.phase], mid.chunk, mid.src, mid.dst) \
            or hdr[H_NBYTES] != nbytes or (body is not None and body.size != nbytes):
        return "message"
    if (hdr[H_FLAGS] & SUM_FLAGS) != sum_flag:
        return "checksum"
    return None


def payload_bytes(pkt: Packet) -> int:
    """The payload size of a packet: its second message, or what follows the header."""
    head, body = pkt
    return int(body.size) if body is not None else len(head) - HDR_BYTES


def tombstone(head: bytes | np.ndarray) -> bytes:
    """The header-only packet head sent in place of a dropped message (lossy delivery): the
    same header, flagged :data:`F_DROPPED`, with no payload to follow."""
    words = list(HEADER.unpack_from(head))
    words[H_FLAGS] = (words[H_FLAGS] & ~F_SPLIT) | F_DROPPED
    return HEADER.pack(*words)


def corrupted(pkt: Packet, dtype, mode: str, pick: int) -> Packet:
    """A corrupted copy of ``pkt``; the header, with the original checksum, is kept.

    ``mode`` "nan" sets element ``pick`` (mod the count) to NaN when ``dtype`` is floating
    point; otherwise (and for "bitflip") bit ``pick`` (mod the payload's bits) is flipped.
    """
    head, body = pkt
    if body is None:
        head = np.frombuffer(head, np.uint8).copy()
        body = head[HDR_BYTES:]
    else:
        body = body.copy()
    if mode == "nan" and np.dtype(dtype).kind == "f":
        vals = body.view(dtype)
        vals[pick % vals.size] = np.nan
    else:
        bit = pick % (body.size * 8)
        body[bit // 8] ^= np.uint8(1 << (bit % 8))
    return (head, None) if pkt[1] is None else (head, body)


def payload_change(pkt: Packet, altered: Packet, dtype) -> float:
    """The largest absolute change ``altered`` makes to ``pkt``'s payload values (inf for a
    NaN or an overflow): what a corruption did, to compare with a check's tolerance."""
    def values(p: Packet) -> np.ndarray:
        head, body = p
        raw = np.frombuffer(head, np.uint8)[HDR_BYTES:] if body is None else body
        raw = raw[:raw.size - raw.size % np.dtype(dtype).itemsize]
        return raw.view(dtype).astype(np.float64)
    with np.errstate(all="ignore"):
        diff = np.abs(values(altered) - values(pkt))
    if not diff.size:
        return 0.0
    return float("inf") if not np.isfinite(diff).all() else float(diff.max())

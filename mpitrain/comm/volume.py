"""What each allreduce algorithm sends: the volume model that ``mpitrain simulate`` prices
and that traffic accounting uses for native MPI, whose messages the harness cannot see.

An algorithm is a sequence of rounds; in each a rank sends one message and reduces some
bytes.  :func:`rounds` lists them for one rank's critical path; :func:`bytes_sent` is the
payload one rank sends in an allreduce of ``n`` bytes.  Native MPI is modelled as MPICH
runs it on one node: recursive doubling up to :data:`NATIVE_SHORT_BYTES`, Rabenseifner's
halving reduce-scatter and doubling allgather above.  No MPI here (the tools import it).
"""
from __future__ import annotations

import math

from ..errors import ConfigError
from ..schema import ALGORITHMS

NATIVE_SHORT_BYTES = 2048  # MPICH MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE


def rounds(algo: str, p: int, n: float) -> list[tuple[int, float, float]]:
    """(repeat, message bytes, reduced bytes) per round kind, one rank's critical path."""
    if p <= 1 or n <= 0:
        return []
    lg = math.ceil(math.log2(p))
    if algo == "ring":
        return [(p - 1, n / p, n / p), (p - 1, n / p, 0.0)]
    if algo == "recursive_doubling" or (algo == "native" and n <= NATIVE_SHORT_BYTES):
        p2 = 1 << (p.bit_length() - 1)
        out = [(p2.bit_length() - 1, n, n)]
        if p != p2:
            out += [(1, n, n), (1, n, 0.0)]
        return out
    if algo == "tree":
        return [(lg, n, n), (lg, n, 0.0)]
    if algo == "native":  # Rabenseifner: halving reduce-scatter, doubling allgather
        out, m = [], n
        for _ in range(lg):
            m /= 2
            out.append((1, m, m))
        return out + [(1, m * 2 ** k, 0.0) for k in range(lg)]
    raise ConfigError(f"unknown algorithm {algo!r}; use one of {', '.join(ALGORITHMS)}")


def bytes_sent(algo: str, p: int, n: float) -> float:
    """Payload bytes one rank sends in an allreduce of ``n`` bytes over ``p`` ranks."""
    return sum(rep * m for rep, m, _ in rounds(algo, p, n))

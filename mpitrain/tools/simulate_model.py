"""The cost model of ``mpitrain simulate``: alpha-beta-gamma, one data-parallel training step.

Every allreduce algorithm is a sequence of rounds; in each round a rank sends one message of
``m`` bytes (and receives one), then reduces ``r`` bytes.  One round costs

    alpha + m * beta * f(m) + timeouts(m) * rto + r * gamma

alpha: latency per message (s); beta: seconds per byte on the wire (1 / bandwidth); gamma:
seconds per byte of local reduction.  f(m) and timeouts(m) are the go-back-N loss terms:
a message of k = ceil(m / mtu) packets with packet loss rate L needs on average
f = 1 + W L / (1 - L) transmissions per packet (each loss resends the window of
W = min(window, k) packets) and suffers k L / (1 - L) retransmission timeouts.

Rounds per algorithm for n bytes on P ranks (p2 = largest power of two <= P, lg = log2):

    ring                2(P-1) rounds of n/P bytes; P-1 of them reduce n/P
                        -> 2(P-1) alpha + 2(P-1)/P n beta + (P-1)/P n gamma
    recursive_doubling  lg(p2) rounds of n bytes, each reducing n; P != p2 adds a fold-in
                        and a fold-out round of n bytes
    tree                binomial reduce then broadcast: 2 ceil(lg P) rounds of n bytes,
                        ceil(lg P) reducing n
    native              MPICH's choice: recursive doubling up to 2 KiB, above that
                        Rabenseifner (recursive-halving reduce-scatter + recursive-doubling
                        allgather: 2 lg P rounds, 2(P-1)/P n bytes, (P-1)/P n reduced)

Traffic is the bytes a rank sends per step (the busiest rank: the root for tree), including
retransmissions.  The step: forward, then backward layer by layer (last first); with overlap
each layer's allreduce starts when its gradients exist and the allreduces run one after
another on the network; a straggler delay D hitting each rank with probability q per step adds
D (1 - (1 - q)^P) to a synchronous step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..errors import ConfigError
from ..model import plan_buckets
from ..comm.volume import rounds
from ..schema import ALGORITHMS



@dataclass
class Params:
    alpha: float   # s per message
    beta: float    # s per byte sent
    gamma: float   # s per byte reduced


@dataclass
class Network:
    loss: float = 0.0        # packet loss probability
    mtu: int = 4096          # bytes per packet
    window: int = 64         # go-back-N window, packets
    rto: float = 100e-6      # retransmission timeout, s


def _loss_terms(m: float, net: Network) -> tuple[float, float]:
    """(transmissions per packet f, expected timeouts) of one m-byte message."""
    if net.loss <= 0 or m <= 0:
        return 1.0, 0.0
    k = max(1, math.ceil(m / net.mtu))
    w = min(net.window, k)
    odds = net.loss / (1.0 - net.loss)
    return 1.0 + w * odds, k * odds


def coefficients(algo: str, p: int, n: float, net: Network | None = None) -> tuple[float, float, float, float]:
    """(A, B, C, T): time = A alpha + B beta + C gamma + T rto; B counts resent bytes."""
    net = net or Network()
    a = b = c = t = 0.0
    for rep, m, red in rounds(algo, p, n):
        f, to = _loss_terms(m, net)
        a += rep
        b += rep * m * f
        c += rep * red
        t += rep * to
    return a, b, c, t


def allreduce_time(algo: str, p: int, n: float, prm: Params, net: Network | None = None) -> float:
    net = net or Network()
    a, b, c, t = coefficients(algo, p, n, net)
    return a * prm.alpha + b * prm.beta + c * prm.gamma + t * net.rto


def traffic_per_rank(algo: str, p: int, n: float, net: Network | None = None) -> float:
    """Bytes the busiest rank sends for one allreduce of n bytes (with retransmissions)."""
    if algo == "tree" and p > 1:  # the root sends the whole buffer once per broadcast round
        net = net or Network()
        return math.ceil(math.log2(p)) * n * _loss_terms(n, net)[0]
    return coefficients(algo, p, n, net)[1]


@dataclass
class StepModel:
    layer_bytes: Sequence[float]  # gradient bytes per layer, input side first
    layer_flops: Sequence[float]  # forward flops per layer
    gflops: float              # compute rate
    overlap: bool = True
    straggler_s: float = 0.0
    straggler_prob: float = 1.0
    bucket_bytes: int = 0      # [sync] bucket_bytes: fused allreduces (0: one per layer)

    def compute_times(self) -> tuple[float, list[float]]:
        fwd = sum(self.layer_flops) / (self.gflops * 1e9)
        # backward: dW for every layer, dX for all but the first (2x / 1x the forward flops)
        bwd = [f * (2 if i else 1) / (self.gflops * 1e9) for i, f in enumerate(self.layer_flops)]
        return fwd, bwd

    def step(self, algo: str, p: int, prm: Params, net: Network | None = None) -> dict:
        fwd, bwd = self.compute_times()
        compute = fwd + sum(bwd)
        buckets = plan_buckets(self.layer_bytes, self.bucket_bytes)
        sizes = {lo: sum(self.layer_bytes[lo:hi + 1]) for lo, hi in buckets}
        comm = {lo: allreduce_time(algo, p, n, prm, net) for lo, n in sizes.items()}
        if self.overlap:  # a bucket starts when backward has reached its lowest layer
            t, free = fwd, fwd
            for i in range(len(bwd) - 1, -1, -1):  # last layer first
                t += bwd[i]
                if i in comm:
                    free = max(free, t) + comm[i]
            total = max(t, free)
        else:
            total = compute + sum(comm.values())
        straggle = self.straggler_s * (1 - (1 - self.straggler_prob) ** p) if p > 1 else 0.0
        total += straggle
        return {"step_s": total, "compute_s": compute, "comm_s": sum(comm.values()),
                "exposed_s": total - compute - straggle, "straggler_s": straggle,
                "traffic_bytes": sum(traffic_per_rank(algo, p, n, net) for n in sizes.values())}

"""Every MPI tag the harness uses, defined once.

All of them travel on the harness's own duplicate of COMM_WORLD (see
:meth:`mpitrain.context.RankContext.connect`), so they can never match the messages of user
code or of another library, and they stay below 32767, the smallest tag bound MPI promises.
Native collectives need no tag.
"""
from __future__ import annotations

TAG_DATA = 7001    # transport data: headers, inline payloads, split payloads (wire.py)
TAG_ACK = 7002     # reliable delivery: cumulative acknowledgement, one int64 (delivery.py)
TAG_NOTICE = 7003  # a sender tells the receiver of a fault it injected (pickled; agreement.py)
TAG_ERROR = 7004   # the error channel: failure reports (pickled; agreement.py)
TAG_LOSS = 7005    # lossy delivery: "a message was counted absent" (pickled; delivery.py)
TAG_BYE = 7006     # closing a communicator: nothing more follows from this rank (closing.py)
TAG_CLOCK_PING = 7101  # ledger clock offsets: rank -> rank 0 (ledger.py)
TAG_CLOCK_PONG = 7102  # ... and rank 0's clock back

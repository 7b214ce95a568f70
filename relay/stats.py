"""Counters of events that have no owner object to keep them, and the operator's stats line.

Theory of operation
-------------------
The hub counts what it routes, the listener its gaps; what happens to single connections
(refused, closed as slow, a write that failed, a protocol error) is counted here, in one
process-wide :data:`counters`, by the module where it happens. :func:`line` renders all of it
as the one log line the relay writes on SIGUSR1 and when it stops.

Pure bookkeeping: no I/O, no locks (everything runs on the one Trio thread).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Counters:
    """Events since start-up; each field is incremented where its event happens."""

    #: WebSocket requests refused (HTTP 400/403/503), per-address cap included.
    rejected: int = 0
    #: Clients closed with 1013 (slow consumer).
    slow_closed: int = 0
    #: Client messages whose NOTIFY failed (the client is closed with 1011).
    writes_failed: int = 0
    #: Clients closed with 1008 for writing faster than the configured rate.
    rate_limited: int = 0
    #: Clients closed with 1002/1007 for breaking the WebSocket protocol.
    protocol_errors: int = 0
    #: Clients closed with 1008 for sending frames or bytes faster than their inbound budget.
    inbound_limited: int = 0


counters = Counters()


def line(**gauges: Any) -> str:
    """``stats: name=value …``: the gauges given, then every counter."""
    fields = {**gauges, **dataclasses.asdict(counters)}
    return "stats: " + " ".join(f"{name}={value}" for name, value in fields.items())

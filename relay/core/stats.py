"""Counters of events that have no owner object to keep them, and the operator's stats line.

Theory of operation
-------------------
The hub counts what it routes, the listener its gaps; what happens to single connections
(accepted, refused, closed as slow, a write that failed, a protocol error) is counted here, in
one process-wide :data:`counters`, by the module where it happens. :func:`line` renders the
counters as the one log line the relay writes on SIGUSR1 and when it stops; the admin listener
(:mod:`relay.ops.admin`) reads the same numbers at scrape time.

:class:`LatencyHistogram` keeps bucket counts of delivery times, as plain integers, for the
same reason: the hot path adds to a list; turning it into a Prometheus histogram happens only
when someone asks.

Pure bookkeeping: no I/O, no locks (everything runs on the one Trio thread).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any

#: Upper bounds (seconds) of the delivery-time buckets: from one fast write (~0.1 ms) to a
#: client at the edge of ``send_timeout`` (10 s by default); beyond that, +Inf.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)

#: Why a WebSocket request was refused: the ``reason`` label of the refusal counter.
REFUSAL_REASONS: tuple[str, ...] = (
    "token",          # 400: the token or the channel (upstream's texts)
    "filter",         # 400: a ``filter`` query parameter that does not parse
    "position",       # 400: a ``from`` position that cannot be taken
    "handshake",      # 400/426: not a valid WebSocket upgrade
    "origin",         # 403: Origin not in PGWS_ALLOWED_ORIGINS
    "capacity",       # 503: PGWS_MAX_CONNECTIONS reached, or a filter cap
    "resumes",        # 429: PGWS_MAX_RESUMES_PER_SECOND_PER_IP reached
    "address",        # 503: PGWS_MAX_CONNECTIONS_PER_IP reached
    "shutting_down",  # 503: the relay is stopping
)


@dataclasses.dataclass
class Counters:
    """Events since start-up; each field is incremented where its event happens."""

    #: WebSocket connections upgraded (clients that got their 101).
    accepted: int = 0
    #: WebSocket requests refused (HTTP 400/403/426/503), per-address cap included.
    rejected: int = 0
    #: Clients closed with 1013 (slow consumer).
    slow_closed: int = 0
    #: Bytes queued for slow consumers and dropped unsent when they were closed.
    bytes_dropped: int = 0
    #: Client messages published with NOTIFY (one per channel of the client).
    writes_published: int = 0
    #: Client messages whose NOTIFY failed (the client is closed with 1011).
    writes_failed: int = 0
    #: Clients closed with 1008 for writing faster than the configured rate.
    rate_limited: int = 0
    #: Clients closed with 1002/1007 for breaking the WebSocket protocol.
    protocol_errors: int = 0
    #: Clients closed with 1008 for sending frames or bytes faster than their inbound budget.
    inbound_limited: int = 0
    #: Times an idle client was woken from its rest to a task (relay.transports.idle).
    woken: int = 0
    #: Pongs read from resting clients without waking them (relay.transports.websocket).
    pongs_at_rest: int = 0
    #: Idle clients resting without a task now (a level, not an event count).
    resting: int = 0
    #: Refusals by reason (:data:`REFUSAL_REASONS`); their sum is :attr:`rejected`.
    refused: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0))

    def refuse(self, reason: str) -> None:
        """Count one refused WebSocket request."""
        self.rejected += 1
        self.refused[reason] += 1


counters = Counters()


class LatencyHistogram:
    """Cumulative-free bucket counts of durations; :data:`LATENCY_BUCKETS` plus +Inf."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float, times: int = 1) -> None:
        """Count ``times`` events that each took ``seconds``."""
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += times
        self.sum += seconds * times

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, events at or below le)`` per bucket, ending with ``("+Inf", count)``."""
        rows, total = [], 0
        for bound, count in zip((*map(repr, LATENCY_BUCKETS), "+Inf"), self.counts, strict=True):
            total += count
            rows.append((bound, total))
        return rows


def fields(**gauges: Any) -> dict[str, Any]:
    """The gauges given, then every integer counter, by name."""
    return {**gauges, **{name: value for name, value in dataclasses.asdict(counters).items()
                         if isinstance(value, int)}}


def line(**gauges: Any) -> str:
    """``stats: name=value …``: the gauges given, then every counter."""
    return "stats: " + " ".join(f"{name}={value}" for name, value in fields(**gauges).items())

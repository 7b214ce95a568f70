"""The contract of a source: where the relay's notifications come from.

A source reads one ordered stream of notification payloads (PostgreSQL's LISTEN/NOTIFY,
:class:`relay.sources.notify.NotifySource`, or its write-ahead log,
:class:`relay.sources.wal.WalSource`) and hands it to the hub; the hub never knows which
source runs, and neither do the transports. To add a source, implement :class:`Source` in a
module of its own here (as ``wal.py`` does) and choose it in :mod:`relay.app`.

What every source promises the hub (the callbacks it is made with):

- ``publish(payloads, arrived)`` is called with each batch in the order the database
  committed the notifications, never two batches at once, never a payload twice within one
  uninterrupted run; ``arrived`` is ``time.monotonic()`` when the batch was read. It must not
  block: it is the hub's synchronous fan-out (:meth:`relay.core.hub.Hub.publish`).
- ``on_listening()`` is called each time the source has its place in the stream, the first time
  too, *before* the first batch read from there: what was committed while it had none may be
  lost (a *gap*; positioned clients are told ``lost``/``gap``), unless the source can resume
  from where it was, in which case it does not call it again after the first time.

Rules every source keeps: no client, no transport, no socket of a client; readiness (for
``/ready`` and the balancer) is ``status``; an outage is retried within the operator's window
(``PGWS_RETRIES``) and beyond it :meth:`Source.run` raises :class:`SourceGaveUp`, which stops
the relay with status 1 (its supervisor restarts it); what no retry can cure raises
:class:`SourceMisconfigured` (status 2).
"""

from __future__ import annotations

from typing import Protocol


class SourceGaveUp(Exception):
    """The source could not get its stream back within its window: the relay stops (1)."""


class SourceMisconfigured(Exception):
    """The database cannot serve the source as configured, and no retry will change that
    (``wal_level`` is not ``logical``, the slot's name is taken by another kind of slot): the
    relay stops with status 2 and this one line, which names the setting or the fix."""


class Source(Protocol):
    """One stream of notifications, read and handed to the hub (see the module's opening)."""

    #: None while the source has its place in the stream and reads it; else one line saying
    #: why not (``/ready`` answers 503 with it).
    status: str | None
    #: Notifications handed to the hub since start-up.
    received: int
    #: Times the source lost its place, so that notifications may have been lost.
    gaps: int

    def down_seconds(self) -> float:
        """Seconds since start-up without a place in the stream (the current outage too)."""

    def gauges(self) -> dict[str, tuple[str, float]]:
        """What only this kind of source measures, read at scrape time: metric name →
        (help, value). Empty when it has nothing of its own."""

    async def run(self) -> None:
        """Read the stream until cancelled, reconnecting within the window.

        Raises :class:`SourceGaveUp` when an outage outlasts the window, or at once for a
        permanent error (authentication refused, database missing)."""

"""Optional limits on what one client may take: its write rate, and its address's connections.

Theory of operation
-------------------
:class:`WriteBucket` is a token bucket per writing client: ``rate`` messages per second,
bursts of up to one second's worth (at least one message). :class:`AddressCount` counts the
open connections of each client address against a cap. Both only answer "allowed or not";
what a refusal means on the wire (close 1008, HTTP 503) is decided by their callers.

Pure bookkeeping: no I/O, and no clock of its own (callers pass ``now``), so tests need no
waiting.
"""

from __future__ import annotations


class WriteBucket:
    """How many messages a client may write now; refilled at ``rate`` per second."""

    __slots__ = ("_at", "_burst", "_rate", "_tokens")

    def __init__(self, rate: float, now: float) -> None:
        self._rate = rate
        self._burst = max(1.0, rate)
        self._tokens = self._burst
        self._at = now

    def take(self, now: float) -> bool:
        """Spend one message if the bucket holds one; False: the client writes too fast."""
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class AddressCount:
    """Open connections per client address, at most ``limit`` each (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: dict[str, int] = {}

    def enter(self, address: str) -> bool:
        """Count a new connection from ``address``; False (and not counted) over the cap."""
        if not self._limit:
            return True
        count = self._open.get(address, 0)
        if count >= self._limit:
            return False
        self._open[address] = count + 1
        return True

    def leave(self, address: str) -> None:
        """Forget a connection counted by :meth:`enter`."""
        if not self._limit:
            return
        count = self._open[address] - 1
        if count:
            self._open[address] = count
        else:
            del self._open[address]

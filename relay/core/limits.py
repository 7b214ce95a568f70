"""Limits on what one client may take: rates, and how many connections its address holds.

Theory of operation
-------------------
:class:`TokenBucket` is the one rate mechanism: ``rate`` units per second, holding at most
``burst``. Three limits are made of it: a writing client's messages (:class:`WriteBucket`,
``PGWS_MAX_WRITES_PER_SECOND``), and every client's inbound frames and bytes
(:class:`InboundBudget`, ``PGWS_MAX_CLIENT_FRAMES_PER_SECOND`` and
``PGWS_MAX_CLIENT_BYTES_PER_SECOND``), which bound the CPU one client's traffic can take.
:class:`AddressCount` counts the open connections of each client network
(:func:`network_of`: an IPv4 address, or an IPv6 /64) against a cap. :func:`within_queue_bound`
is the slow-consumer rule on a client's outbox (``PGWS_MAX_QUEUE_BYTES``).

They only answer "allowed or not"; what a refusal means on the wire (close 1008, HTTP 503) is
decided by their callers.

Pure bookkeeping: no I/O, and no clock of its own (callers pass ``now``), so tests need no
waiting.
"""

from __future__ import annotations

import ipaddress

#: IPv6 addresses are counted per /64: one subscriber line, one host or one cloud instance
#: usually holds a whole /64, so counting each /128 would let one machine take 2^64 "addresses".
_IPV6_NETWORK_BITS = 64


def within_queue_bound(queued: int, adding: int, bound: int) -> bool:
    """Whether ``adding`` more bytes keep a client's queue within ``bound`` (inclusive).

    A client over it is a slow consumer (close 1013); exactly ``bound`` bytes is allowed, so a
    bound of N lets a client that reads nothing hold N bytes and not one more.
    """
    return queued + adding <= bound


class TokenBucket:
    """Up to ``burst`` units at once, refilled at ``rate`` units per second."""

    __slots__ = ("_at", "_burst", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._at = now

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Spend ``amount`` if the bucket holds it; False (nothing spent): over the rate."""
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < amount:
            return False
        self._tokens -= amount
        return True


class WriteBucket(TokenBucket):
    """A writing client's messages: ``rate`` per second, bursts of one second's worth (>= 1)."""

    __slots__ = ()

    def __init__(self, rate: float, now: float) -> None:
        super().__init__(rate, max(1.0, rate), now)


class InboundBudget:
    """What one client may send: frames and bytes per second, each with a one-second burst.

    A rate of 0 means no limit for that measure. The byte burst is at least two of the largest
    messages, so a client may always send one whole message at once.
    """

    __slots__ = ("_bytes", "_frames")

    def __init__(self, frames_per_second: float, bytes_per_second: float,
                 max_message_size: int, now: float) -> None:
        self._frames = TokenBucket(frames_per_second, frames_per_second, now) \
            if frames_per_second else None
        self._bytes = TokenBucket(bytes_per_second, max(bytes_per_second,
                                                        2.0 * max_message_size), now) \
            if bytes_per_second else None

    def take_frame(self, now: float) -> bool:
        """Spend one frame; False: the client sends frames faster than its budget."""
        return self._frames is None or self._frames.take(now)

    def take_bytes(self, now: float, count: int) -> bool:
        """Spend ``count`` bytes read; False: the client sends faster than its budget."""
        return self._bytes is None or self._bytes.take(now, count)


def network_of(host: str) -> str:
    """The key a client address is counted under: IPv4 as is, IPv6 by its /64.

    An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, from a dual-stack socket) counts as its
    IPv4 address. Anything that is not an IP address (a Unix socket, say) counts as itself.
    """
    try:
        address = ipaddress.ip_address(host)  # A scope (fe80::1%eth0) is kept, then masked off.
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, _IPV6_NETWORK_BITS), strict=False))
    return str(address)


class AddressCount:
    """Open connections per client network, at most ``limit`` each (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: dict[str, int] = {}

    def enter(self, network: str) -> bool:
        """Count a new connection from ``network``; False (and not counted) over the cap."""
        if not self._limit:
            return True
        count = self._open.get(network, 0)
        if count >= self._limit:
            return False
        self._open[network] = count + 1
        return True

    def leave(self, network: str) -> None:
        """Forget a connection counted by :meth:`enter`."""
        if not self._limit:
            return
        count = self._open[network] - 1
        if count:
            self._open[network] = count
        else:
            del self._open[network]

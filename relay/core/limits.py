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
:class:`FilterBudget` holds the distinct filter sets of each channel against caps on their
number and on what evaluating them costs per notification (``PGWS_MAX_FILTER_SETS``,
``PGWS_MAX_FILTER_COST``, ``PGWS_MAX_FILTER_SETS_PER_IP``); :class:`AddressRate` the resumes
of each client network (``PGWS_MAX_RESUMES_PER_SECOND_PER_IP``).

They only answer "allowed or not"; what a refusal means on the wire (close 1008, HTTP 503) is
decided by their callers.

Pure bookkeeping: no I/O, and no clock of its own (callers pass ``now``), so tests need no
waiting.
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Iterable

from relay.core import filters
from relay.core.filters import Filters, Steps

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


#: Client networks whose rate :class:`AddressRate` tracks at once; the one seen least recently
#: is forgotten first (it starts with a full bucket again), so many addresses cannot grow memory.
_RATE_ADDRESSES = 65_536


class AddressRate:
    """A token bucket per client network: ``rate`` events per second, ``burst`` at once, for
    what an address may do rarely (resume, which replays history). 0: no limit."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def take(self, network: str, now: float) -> bool:
        """Count one event of ``network`` at ``now``; False (not counted) over its rate."""
        if not self._rate:
            return True
        bucket = self._buckets.get(network)
        if bucket is None:
            bucket = self._buckets[network] = TokenBucket(self._rate, self._burst, now)
            if len(self._buckets) > _RATE_ADDRESSES:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(network)
        return bucket.take(now)


class _Book:
    """One channel's pool of distinct filter sets: how often each is held, and what
    evaluating them all costs per notification (:func:`relay.core.filters.set_cost`)."""

    __slots__ = ("cost", "paths", "sets")

    def __init__(self) -> None:
        self.sets: dict[Filters, int] = {}
        self.paths: dict[Steps, int] = {}
        self.cost = 0

    def added_cost(self, filter_set: Filters) -> int:
        """What holding a set not held yet adds: its own cost, and the lookups of eq paths
        this pool does not look up yet."""
        new_paths = filters.lookup_paths(filter_set).difference(self.paths)
        return filters.set_cost(filter_set) + sum(filters.COST_FIXED + len(path)
                                                  for path in new_paths)

    def hold(self, filter_set: Filters, added: int) -> None:
        count = self.sets.get(filter_set, 0)
        self.sets[filter_set] = count + 1
        if count:
            return
        self.cost += added
        for path in filters.lookup_paths(filter_set):
            self.paths[path] = self.paths.get(path, 0) + 1

    def release(self, filter_set: Filters) -> None:
        count = self.sets[filter_set] - 1
        if count:
            self.sets[filter_set] = count
            return
        del self.sets[filter_set]
        for path in filters.lookup_paths(filter_set):
            left = self.paths[path] - 1
            if left:
                self.paths[path] = left
            else:
                del self.paths[path]
        self.cost -= self.added_cost(filter_set)


#: Why :meth:`FilterBudget.hold` refused a set.
SETS, COST, ADDRESS = "sets", "cost", "address"


class FilterBudget:
    """The distinct filter sets clients hold on each channel, and what evaluating them costs
    per notification, against caps; checked and held in one synchronous step, so that
    handshakes arriving together, or clients parked while they resume, cannot pass a cap.

    Each channel has two pools with the same caps: sets that carry a token's ``filters``
    claim (made by the token's issuer: an authorisation) and sets from URL filters alone
    (anyone with a read token can make those), so URL sets can never use up the room the
    claims need. Per client network, at most ``max_sets_per_address`` distinct URL-only sets
    (over all channels). A cap of 0 is no cap. The empty set costs nothing and is not held.
    """

    def __init__(self, max_sets: int, max_cost: int, max_sets_per_address: int) -> None:
        self._max_sets = max_sets
        self._max_cost = max_cost
        self._max_per_address = max_sets_per_address
        self._books: dict[tuple[str, bool], _Book] = {}
        self._by_address: dict[str, dict[Filters, int]] = {}

    def cost(self, channel: str, claimed: bool) -> int:
        """What one notification of ``channel`` costs the pool's sets (units of
        :func:`relay.core.filters.cost`)."""
        book = self._books.get((channel, claimed))
        return 0 if book is None else book.cost

    def hold(self, channels: Iterable[str], filter_set: Filters, claimed: bool,
             network: str) -> str | None:
        """Hold ``filter_set`` on each of ``channels`` for one client from ``network``; None
        when held, else why not (:data:`SETS`, :data:`COST` or :data:`ADDRESS`), and nothing
        is held. Each hold wants one :meth:`release` with the same arguments."""
        if not filter_set:
            return None
        channels = list(dict.fromkeys(channels))
        if not claimed and self._max_per_address:
            mine = self._by_address.get(network, {})
            if filter_set not in mine and len(mine) >= self._max_per_address:
                return ADDRESS
        added = []
        for channel in channels:
            book = self._books.get((channel, claimed)) or _Book()
            cost = 0
            if filter_set not in book.sets:
                if self._max_sets and len(book.sets) >= self._max_sets:
                    return SETS
                cost = book.added_cost(filter_set)
                if self._max_cost and book.cost + cost > self._max_cost:
                    return COST
            added.append((channel, book, cost))
        for channel, book, cost in added:
            self._books[channel, claimed] = book
            book.hold(filter_set, cost)
        if not claimed:
            mine = self._by_address.setdefault(network, {})
            mine[filter_set] = mine.get(filter_set, 0) + 1
        return None

    def release(self, channels: Iterable[str], filter_set: Filters, claimed: bool,
                network: str) -> None:
        """Forget a hold of :meth:`hold`."""
        if not filter_set:
            return
        for channel in dict.fromkeys(channels):
            book = self._books[channel, claimed]
            book.release(filter_set)
            if not book.sets:
                del self._books[channel, claimed]
        if not claimed:
            mine = self._by_address[network]
            count = mine[filter_set] - 1
            if count:
                mine[filter_set] = count
            else:
                del mine[filter_set]
                if not mine:
                    del self._by_address[network]

"""Leak checks of a running relay: its tasks and open descriptors at rest, before and after.

Theory of operation: a relay at rest (no client connecting, no NOTIFY in flight) holds a fixed
number of tasks and descriptors, apart from its NOTIFY pool, which grows on demand and is not a
leak. A check reads the relay's stats until a condition holds (:func:`settled`, bounded), once
before a run and once after it, and compares :func:`sockets_open` and the task count. The
fuzzer and the churn run both check this way; the relay may be the bench's ``Server`` or the
tests' ``RelayProcess`` (:class:`Relay` is what both provide).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol


class Relay(Protocol):
    """What a leak check needs of a running relay (bench's Server, the tests' RelayProcess)."""

    port: int
    proc: Any

    def stats(self) -> dict[str, int]: ...


def sockets_open(stats: dict[str, int]) -> int:
    """Open descriptors other than the NOTIFY pool's, which grows on demand (not a leak).

    Exact only when :func:`pool_at_rest` holds: a NOTIFY in flight holds a connection that is
    open but not idle (the client can see its echo before the pool takes the connection back).
    """
    return stats["fds"] - stats["db_pool_idle"]


def pool_at_rest(stats: dict[str, int]) -> bool:
    """No NOTIFY in flight, so :func:`sockets_open` counts every pool connection."""
    return stats["db_pool_busy"] == 0


def settled(server: Relay, condition: Callable[[dict[str, int]], bool],
             timeout: float = 30.0) -> dict[str, int]:
    """The relay's stats once ``condition`` holds (or the last ones after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        if condition(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)

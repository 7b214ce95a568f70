"""What every source does while its database is away: retry within a window, say why, count.

Theory of operation
-------------------
A source that loses its connection opens a new one at once, and while the database stays away
tries again every :data:`RETRY_SPACING` seconds, so delivery resumes within about a second of
the database accepting connections again. How long an outage may last is upstream's: the time
its ``PGWS_RETRIES`` attempts with backoff 1, 2, 4 … 32 s would span (:func:`retry_window`;
15 s for the default 5); past it the source raises
:class:`relay.sources.base.SourceGaveUp`.

:class:`Reconnecting` keeps what the operator sees of it: ``status`` (None while the source has
its place in the stream, else one line: ``/ready``'s reason) and :meth:`down_seconds`. A failed
attempt is logged when its error differs from the last one; the same error again is summed up
every :data:`REPEAT_LOG_INTERVAL` seconds, so a database that is away writes a few lines, not
one a second. An error that waiting cannot cure (:func:`is_permanent`) says so and names
``PGWS_DB_URI``; it is retried all the same, as upstream does, for the configured window.
"""

from __future__ import annotations

import logging
from math import inf

import trio

#: Upstream's backoff between failed connection attempts (1, 2, 4, 8, 16, then 32 s); here it
#: only measures how long an outage may last (:func:`retry_window`).
_BACKOFF_FIRST = 1.0
_BACKOFF_CAP = 32.0

#: Seconds between connection attempts while the database is away: short, so that a database
#: that is back is listened to again within about a second; a refused connection costs little.
RETRY_SPACING = 1.0

#: Seconds between two log lines about the same connection error: an outage of a minute writes
#: about six lines, and a new error is still logged at once.
REPEAT_LOG_INTERVAL = 10.0

#: Parts of libpq/server messages that no retry can cure: the configuration is wrong. (psycopg
#: gives no SQLSTATE for errors raised while connecting, so the text is all there is.)
_PERMANENT_ERRORS: tuple[str, ...] = (
    "does not exist",                 # database "x" / role "x" does not exist (3D000, 28000)
    "password authentication failed",  # 28P01
    "authentication failed",           # any other method
    "no pg_hba.conf entry",            # 28000
    "password is required",            # libpq: the server asked, the URI has none
    "permission denied for database",  # 42501: no CONNECT privilege
    "is not permitted to log in",      # role without LOGIN
)


def is_permanent(message: str) -> bool:
    """Whether a connection error means a wrong configuration rather than an outage."""
    lowered = message.lower()
    return any(part in lowered for part in _PERMANENT_ERRORS)


def backoff(failures: int) -> float:
    """Upstream's wait after the given number of consecutive failures (1 → 1 s)."""
    return min(_BACKOFF_FIRST * 2 ** (failures - 1), _BACKOFF_CAP)


def retry_window(retries: int) -> float:
    """Seconds an outage may last: the span of upstream's ``retries`` attempts (0 or 1: none)."""
    return sum(backoff(failures) for failures in range(1, max(retries, 1)))


class Reconnecting:
    """Status and outage bookkeeping shared by the sources; ``role`` names the connection in
    log lines ("listener", "WAL reader")."""

    role = "listener"

    def __init__(self, retries: int) -> None:
        self._retries = retries
        self._window = retry_window(retries)
        #: Why the source has no place in the stream (None while it has): /ready's reason.
        self.status: str | None = "not connected yet"
        # Seconds without a place in windows that have ended, and when the current one began
        # (trio clock; None while in place).
        self._down_total = 0.0
        self._down_since: float | None = None
        # The last connection error logged, and when (trio clock), for the repeat rule.
        self._logged_error: str | None = None
        self._logged_at = -inf
        self._unlogged = 0

    def down_seconds(self) -> float:
        """Seconds since start-up without a place in the stream, the current window included."""
        current = 0.0
        if self._down_since is not None:
            current = trio.current_time() - self._down_since
        return self._down_total + current

    def _went_down(self, now: float, why: str) -> None:
        self.status = why
        if self._down_since is None:
            self._down_since = now

    def _came_up(self) -> None:
        if self._down_since is not None:
            self._down_total += trio.current_time() - self._down_since
            self._down_since = None
        self.status = None
        self._logged_error = None
        self._unlogged = 0

    def _log_failure(self, message: str, attempts: int, outage: float) -> None:
        """Log a failed attempt: a new error at once, the same one every so often."""
        now = trio.current_time()
        if message == self._logged_error and now - self._logged_at < REPEAT_LOG_INTERVAL:
            self._unlogged += 1
            return
        again = f" ({self._unlogged + 1} failed attempts since the last line)" \
            if message == self._logged_error else ""
        advice = "; this will not pass by itself: check PGWS_DB_URI" \
            if is_permanent(message) else ""
        # The source's own logger (relay.sources.notify, relay.sources.wal).
        logging.getLogger(type(self).__module__).error(
            "%s cannot connect (attempt %d, down %.0f s of the %g s that PGWS_RETRIES=%d "
            "allows)%s: %s%s", self.role, attempts, outage, self._window, self._retries, again,
            message, advice,
            extra={"event": "listener_connect_failed", "attempt": attempts,
                   "down_seconds": round(outage, 3), "permanent": bool(advice)})
        self._logged_error = message
        self._logged_at = now
        self._unlogged = 0


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (libpq's later lines may quote a statement)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

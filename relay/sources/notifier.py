"""A small pool of PostgreSQL connections for ``pg_notify``: client writes, meta events, heartbeats.

Theory of operation
-------------------
psycopg's sync connections run in worker threads (``trio.to_thread``); its async connection is
asyncio-only. At most ``pool_size`` NOTIFYs run at once; an idle connection is reused, a broken
one is dropped, and the next call opens a new one, so writes work again as soon as the database
does. A statement that fails on a connection that turns out to be broken (the database was
restarted since its last use) is retried once on a fresh connection.

This module never LISTENs: the listener's connection is its own (:mod:`relay.sources.notify`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg
import trio

from relay.config import PG_NOTIFY_MAX_BYTES

log = logging.getLogger(__name__)

#: Seconds one NOTIFY may take, connection included, before it counts as failed. A NOTIFY is a
#: sub-millisecond statement; this only bounds a database that stopped answering.
NOTIFY_TIMEOUT = 10.0


class NotifyFailed(Exception):
    """The NOTIFY did not happen; the message says why (never the payload)."""


class Notifier:
    """``await notify(channel, payload)`` through a bounded pool of connections."""

    def __init__(self, db_uri: str, pool_size: int, connect_options: dict[str, Any],
                 log_prefix: str | None = None) -> None:
        """``log_prefix``: with the WAL source, the listen channel: what is notified on it is
        also written to the log (``pg_logical_emit_message``) in the same transaction."""
        self._db_uri = db_uri
        self._log_prefix = log_prefix
        self._connect_options = connect_options
        self._limiter = trio.CapacityLimiter(pool_size)
        self._idle: list[psycopg.Connection[Any]] = []

    @property
    def idle_connections(self) -> int:
        """Open connections not in use; the pool grows on demand up to ``pool_size``."""
        return len(self._idle)

    @property
    def busy_connections(self) -> int:
        """NOTIFYs in flight, each on a connection that is open but not counted as idle."""
        return self._limiter.borrowed_tokens

    async def notify(self, channel: str, payload: str,
                     on_sent: Callable[[], None] | None = None) -> None:
        """Run ``SELECT pg_notify(channel, payload)``; raise :class:`NotifyFailed` on failure.
        ``on_sent()`` is called in the worker thread as the statement goes to the database (the
        heartbeat's clock starts then, not while the thread waits to run).

        On the log prefix's channel, the payload goes to the write-ahead log too, in the same
        statement (one transaction), so that every WAL relay reads it; a payload too large for
        NOTIFY (8,000 bytes) goes to the log alone.

        Cancellation abandons the worker thread, whose connection is then never reused.
        """
        async with self._limiter:
            connection = self._idle.pop() if self._idle else None
            try:
                with trio.fail_after(NOTIFY_TIMEOUT):
                    connection = await trio.to_thread.run_sync(
                        self._notify_in_thread, connection, channel, payload, on_sent,
                        abandon_on_cancel=True,
                    )
            except psycopg.Error as exc:
                raise NotifyFailed(_describe(exc)) from None
            except trio.TooSlowError:
                raise NotifyFailed(f"no answer within {NOTIFY_TIMEOUT:g} s") from None
            self._idle.append(connection)

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._db_uri, autocommit=True, **self._connect_options)

    def _notify_in_thread(
        self, connection: psycopg.Connection[Any] | None, channel: str, payload: str,
        on_sent: Callable[[], None] | None = None,
    ) -> psycopg.Connection[Any]:
        if on_sent is not None:
            on_sent()
        if connection is None or connection.closed:
            connection = self._connect()
        statement, parameters = self._statement(channel, payload)
        try:
            connection.execute(statement, parameters)
        except psycopg.OperationalError:
            if not connection.broken:
                connection.close()
                raise
            connection.close()
            connection = self._connect()
            try:
                connection.execute(statement, parameters)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            connection.close()
            raise
        return connection

    def _statement(self, channel: str, payload: str) -> tuple[str, tuple[str, ...]]:
        if channel != self._log_prefix:
            return "SELECT pg_notify(%s, %s)", (channel, payload)
        if len(payload.encode()) >= PG_NOTIFY_MAX_BYTES:
            return "SELECT pg_logical_emit_message(true, %s, %s)", (channel, payload)
        return ("SELECT pg_notify(%s, %s), pg_logical_emit_message(true, %s, %s)",
                (channel, payload, channel, payload))

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


def _describe(exc: psycopg.Error) -> str:
    # The first line of libpq's message; later lines may repeat the statement's parameters.
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no message'}"

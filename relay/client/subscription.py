"""The client library: subscribe to a relay, get every message once, across reconnects.

Theory of operation
-------------------
:func:`subscribe` opens a :class:`Subscription`, an async context manager and an async
iterator::

    async with subscribe("wss://relay.example/chat", token=get_token,
                         filters=["payload.market_id=eq.7"]) as subscription:
        async for event in subscription:
            match event:
                case Message(payload=payload):
                    handle(payload)
                case Lost():
                    reread_state_from_the_database()

Inside, one task keeps a WebSocket connection (trio-websocket) to the relay and puts what
arrives into a bounded memory channel; the iterator takes from it. When the caller is slower
than the stream, the channel fills, the task stops reading, and TCP pushes back on the relay
(which closes a client it cannot serve with 1013; the subscription then resumes).

The connection offers the subprotocol :data:`relay.wire.positions.SUBPROTOCOL`. A relay that selects
it sends positions: the task remembers the last one read and, when the connection ends
(a close, a reset, a relay restart, a dead peer), reconnects with full-jitter exponential
backoff and asks to resume after it (query parameter ``from``). The relay then replays what
was missed, or says it cannot (:class:`Lost`: ``expired``, ``gap``, ``unknown``), and the
caller must re-read its state. A relay that does not select the subprotocol
(postgres-websockets, or pgws-relay with history off) still delivers messages, with no
position; a reconnect to it, or a start position it cannot honour, is ``Lost("unsupported")``.

Liveness: a ping every ``ping_interval`` seconds; no pong within ``ping_timeout`` and the
connection is taken for dead (a NAT or proxy that dropped it silently), aborted and replaced.
While the caller is the bottleneck the reader is stopped on purpose, so a missing pong then
proves nothing and is not counted.

Failures: a refused handshake with a 4xx status (a bad token, a channel not allowed, a bad
filter) will not fix itself, so the iterator raises :class:`Refused`; a close the relay will
repeat (a policy or protocol violation, or 3001 "JWT expired" with a fixed token) raises
:class:`Closed`. An expired token is retried only when ``token`` is a callable: it is called
at every connect, so it can hand out a fresh one. Everything else (5xx, refused or reset
connections, timeouts, closes 1000/1001/1006/1011/1013) is retried. Errors are raised from
``__anext__``, never from the ``async with`` as an exception group.

What this module owns: the client's connection, its reconnects, positions and liveness. What
it never does: import the server (only :mod:`relay.wire.positions`, which both ends share); mint a
token; log a token or a query string (log lines name ``host:port/path``, with any path segment
after the channel, or one shaped like a JWT, left out). Pass the token as ``token=``: it is
sent as ``Authorization: Bearer``, out of the URL.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import re
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

import h11
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)
from wsproto.utilities import ProtocolError as WsprotoError

from relay.wire import positions

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("relay.client.subscription")

#: The reason of a :class:`Lost` made by this side: the relay cannot resume at all.
UNSUPPORTED = "unsupported"

#: A connection that stayed up this long counts as healthy: the next reconnect starts the
#: backoff from the beginning (so does one that delivered a message).
STABLE_SECONDS = 10.0

#: Statuses of a refused handshake worth retrying: 408 and 429 say "later"; any other 4xx says
#: the request itself is wrong, and sending it again would only be refused again.
_RETRY_STATUSES = (408, 429)

#: Closes the relay would repeat on a new connection: protocol errors, policy violations, a
#: message too big. (1008 is also the relay's "writes too fast", which this reader never does.)
_FATAL_CLOSES = (1002, 1003, 1007, 1008, 1009, 1010)

_JWT_EXPIRED = 3001
_TOKEN_EXPIRED_BODY = "Token expired"
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

Token = str | Callable[[], str | Awaitable[str]] | None


# -- what the caller receives --------------------------------------------------------------------

@dataclass(frozen=True)
class Message:
    """A message: the NOTIFY payload, and its position (None when the relay sends none)."""

    payload: str
    position: str | None


@dataclass(frozen=True)
class Lost:
    """Messages may have been missed: re-read your state. ``reason`` is the relay's
    (``expired``, ``gap``, ``unknown``) or :data:`UNSUPPORTED`; the stream goes on after
    ``position`` (None when the relay sends no positions)."""

    reason: str
    position: str | None


Event = Message | Lost


class SubscriptionError(Exception):
    """The subscription cannot go on."""


class Refused(SubscriptionError):
    """The relay refused the handshake, for a reason a retry would not change."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}" if body else f"HTTP {status}")
        self.status = status
        self.body = body


class Closed(SubscriptionError):
    """The relay closed the connection, for a reason a reconnect would not change."""

    def __init__(self, code: int, reason: str | None) -> None:
        super().__init__(f"closed {code}: {reason}" if reason else f"closed {code}")
        self.code = code
        self.reason = reason


# -- pure helpers --------------------------------------------------------------------------------

def backoff(attempt: int, low: float, high: float,
            rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry ``attempt`` (0 first): full jitter, uniform in
    ``[0, min(high, low * 2**attempt))``, so many clients cut off together spread out."""
    return rand() * min(high, low * math.ldexp(1.0, min(attempt, 64)))


@dataclass(frozen=True)
class Endpoint:
    """Where to connect, and what to ask for: parsed once from the URL and filters of
    :func:`subscribe`."""

    host: str
    port: int
    secure: bool
    path: str
    query: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, url: str, filters: Iterable[str] = ()) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"the URL must start with ws:// or wss://, not {parts.scheme!r}")
        if not parts.hostname:
            raise ValueError("the URL names no host")
        query = parse_qsl(parts.query, keep_blank_values=True)
        if any(key == positions.FROM_PARAMETER for key, _ in query):
            raise ValueError("pass the start position as position=, not in the URL")
        query += [("filter", text) for text in filters]
        secure = parts.scheme == "wss"
        return cls(parts.hostname, parts.port or (443 if secure else 80), secure,
                   parts.path or "/", tuple(query))

    def resource(self, position: str | None) -> str:
        """The request target: path, the URL's query and filters, and ``from`` if resuming."""
        query = list(self.query)
        if position is not None:
            query.append((positions.FROM_PARAMETER, position))
        return f"{self.path}?{urlencode(query)}" if query else self.path

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.secure else 80) else f"{host}:{self.port}"

    def __str__(self) -> str:
        """``host:port/path`` for log lines: no query, no segment after the channel and none
        shaped like a JWT (a token may be in the path, upstream's way)."""
        first, slash, rest = self.path.lstrip("/").partition("/")
        if _JWT_SHAPE.fullmatch(first):
            first, rest = "…", ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}/{first}" + ("/…" if slash and rest else "")


# -- the subscription ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Checkpoint:
    """A position with no message (a control event): the caller's position moves on when the
    iterator reaches it."""

    position: str


@dataclass(frozen=True)
class _Failure:
    error: BaseException


_Item = Message | Lost | _Checkpoint | _Failure


class _Retry(Exception):
    """A connection attempt or a connection ended; try again. ``why`` is for the log;
    ``healthy``: the connection worked (start the backoff over); ``at_once``: no wait;
    ``token_expired``: the relay found the token expired."""

    def __init__(self, why: str, *, healthy: bool = False, at_once: bool = False,
                 token_expired: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.healthy = healthy
        self.at_once = at_once
        self.token_expired = token_expired


class _Connection:
    """What one connection's reader and keepalive share."""

    def __init__(self) -> None:
        #: A message (not a control event) was handed to the caller.
        self.delivered = False
        #: The keepalive found the peer dead and cut the connection.
        self.dead = False
        #: The reader is waiting for the caller (the channel is full).
        self.blocked = False
        #: ... or was, at some time since the current ping went out.
        self.blocked_since_ping = False


#: Bytes of the answer to the opening handshake read at most (a refusal's head and body): a
#: relay's is well under 1 KiB; anything larger ends the attempt instead of filling memory.
MAX_HANDSHAKE_ANSWER = 65536


class _HandshakeGuard(trio.abc.Stream):
    """A stream that turns a connection closed or reset during the opening handshake into an
    error.

    trio-websocket takes such a connection for a closed WebSocket and keeps waiting for an
    answer that cannot come (until ``connect_timeout``); behind a TCP proxy whose backend is
    down, that is every attempt. Raised in its reader task, the error ends the attempt at once.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.opened = False
        #: Bytes received before the handshake ended: an answer larger than a relay's
        #: (headers and a one-line refusal) is a hostile or broken server, not one to buffer.
        self.received = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError as error:
            if self.opened:
                raise
            raise HandshakeError("connection reset during the handshake") from error

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError as error:
            if self.opened:
                raise
            raise HandshakeError("connection reset during the handshake") from error
        if not self.opened:
            if not data:
                raise HandshakeError("connection closed during the handshake")
            self.received += len(data)
            if self.received > MAX_HANDSHAKE_ANSWER:
                raise HandshakeError(f"an answer to the handshake over {MAX_HANDSHAKE_ANSWER} "
                                     "bytes")
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


class Subscription:
    """Messages from one relay URL, as an async iterator; made by :func:`subscribe`.

    ``position`` is the position of the last event the iterator returned (persist it to start
    there next time); ``connected`` says whether a connection is up right now, and
    ``connections`` counts the connections made so far.
    """

    def __init__(self, endpoint: Endpoint, *, token: Token, position: str | None,
                 ping_interval: float | None, ping_timeout: float, connect_timeout: float,
                 backoff_min: float, backoff_max: float, ssl_context: ssl.SSLContext | None,
                 max_message_size: int, buffer: int) -> None:
        self._endpoint = endpoint
        self._token = token
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._connect_timeout = connect_timeout
        self._backoff = (backoff_min, backoff_max)
        self._ssl_context = ssl_context
        self._max_message_size = max_message_size
        self._send, self._receive = trio.open_memory_channel[_Item](buffer)
        #: The caller's position: that of the last event the iterator returned.
        self._position = position
        #: The reader's position: the last one read from a connection (resume after it).
        self._read = position
        #: The caller's stream has begun (a start position, a position read, or a message):
        #: from then on, a connection that cannot resume it is a loss.
        self._started = position is not None
        #: The last handshake with ``from`` was refused: the relay cannot resume.
        self._skip_from = False
        #: Set, and replaced, at each connect and disconnect.
        self._change = trio.Event()
        self._is_connected = False
        #: The error that ended the subscription, if one did.
        self._failure: Exception | None = None
        self.connections = 0

    # -- the caller's side ----------------------------------------------------------------------

    @property
    def position(self) -> str | None:
        return self._position

    @property
    def connected(self) -> bool:
        return self._is_connected

    async def wait_connected(self, count: int = 1) -> None:
        """Return once a connection, the ``count``-th or a later one, is up and has said where
        its stream starts (at once if one is); raise the error that ended the subscription if
        one does (the iterator raises it too)."""
        while not (self._is_connected and self.connections >= count):
            if self._failure is not None:
                raise self._failure
            await self._change.wait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            try:
                item = await self._receive.receive()
            except trio.EndOfChannel:
                raise StopAsyncIteration from None
            if isinstance(item, _Failure):
                raise item.error
            if isinstance(item, _Checkpoint):
                self._position = item.position
                continue
            if isinstance(item, Lost) or item.position is not None:
                self._position = item.position
            return item

    # -- the connection's side ------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, read, reconnect, until cancelled or a fatal error (handed to the caller)."""
        async with self._send:
            try:
                await self._connect_forever()
            except Exception as error:  # Whatever it is, the caller must see it.
                self._failure = error
                self._set_connected(False)
                await self._send.send(_Failure(error))

    async def _connect_forever(self) -> None:
        attempt = 0
        refused_token: str | None = None
        while True:
            token = await self._fetch_token()
            if token is not None and token == refused_token:
                raise Refused(400, _TOKEN_EXPIRED_BODY)
            try:
                await self._connection(token)
            except _Retry as retry:
                if retry.healthy:
                    attempt = 0
                if retry.token_expired:
                    refused_token = token
                if retry.at_once:
                    log.info("%s: %s; reconnecting", self._endpoint, retry.why)
                    continue
                delay = backoff(attempt, *self._backoff)
                attempt += 1
                log.info("%s: %s; reconnecting in %.1f s", self._endpoint, retry.why, delay)
                await trio.sleep(delay)

    async def _fetch_token(self) -> str | None:
        if self._token is None or isinstance(self._token, str):
            return self._token
        value = self._token()
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _open_stream(self) -> trio.abc.Stream:
        endpoint = self._endpoint
        if not endpoint.secure:
            return await trio.open_tcp_stream(endpoint.host, endpoint.port)
        stream = await trio.open_ssl_over_tcp_stream(
            endpoint.host, endpoint.port, https_compatible=True,
            ssl_context=self._ssl_context or ssl.create_default_context())
        try:
            # Here, so that a certificate error is an error of this attempt: inside
            # trio-websocket it would only look like a handshake that never ends.
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def _connection(self, token: str | None) -> None:
        """One connection, from opening to its end; raises :class:`_Retry` or a fatal error."""
        position = None if self._skip_from else self._read
        headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
        guard: _HandshakeGuard | None = None
        state = _Connection()
        started = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(self._connect_timeout):
                    guard = _HandshakeGuard(await self._open_stream())
                    ws = await wrap_client_stream(
                        nursery, guard, self._endpoint.host_header,  # type: ignore[arg-type]
                        self._endpoint.resource(position), subprotocols=[positions.SUBPROTOCOL],
                        extra_headers=headers, max_message_size=self._max_message_size)
                    guard.opened = True
                self._skip_from = False
                self.connections += 1
                if self._ping_interval is not None:
                    nursery.start_soon(self._keepalive, ws, state, nursery.cancel_scope)
                try:
                    await self._read_messages(ws, position, state)
                finally:
                    self._set_connected(False)
                    nursery.cancel_scope.cancel()  # The keepalive, trio-websocket's reader.
        except BaseExceptionGroup as group:
            error = _single(group)
            if error is group:  # Cancelled from outside (or several errors): as it is.
                raise
            if isinstance(error, trio.TooSlowError):
                raise _Retry(f"no answer within {self._connect_timeout:g} s") from None
            if isinstance(error, ConnectionRejected):
                self._refused(error, position)
            if isinstance(error, (OSError, HandshakeError, trio.BrokenResourceError)):
                raise _Retry(_describe(error)) from None
            if isinstance(error, (h11.ProtocolError, WsprotoError)):
                # A server that broke the protocol (a wrong accept key, a bad frame): trio-
                # websocket lets h11's and wsproto's errors out; they are no bug of ours.
                raise _Retry(f"the server broke the protocol: {error}") from None
            raise error from None
        finally:
            if guard is not None:
                await trio.aclose_forcefully(guard)
        healthy = state.delivered or trio.current_time() - started >= STABLE_SECONDS
        if state.dead:
            raise _Retry(f"no pong within {self._ping_timeout:g} s", healthy=healthy)
        closed = ws.closed
        code = 1006 if closed is None else closed.code
        reason = None if closed is None else closed.reason
        if code == _JWT_EXPIRED and not callable(self._token):
            raise Closed(code, reason)
        if code in _FATAL_CLOSES:
            raise Closed(code, reason)
        raise _Retry(f"closed {code}" + (f" ({reason})" if reason else ""), healthy=healthy)

    def _refused(self, error: ConnectionRejected, position: str | None) -> None:
        """Raise what a refused handshake means: retry, retry without ``from``, or give up."""
        body = (error.body or b"").decode("utf-8", "replace").strip()
        status = error.status_code
        if status == 400 and body == _TOKEN_EXPIRED_BODY and callable(self._token):
            raise _Retry("token expired", token_expired=True) from None
        if 400 <= status < 500 and status not in _RETRY_STATUSES:
            if position is not None and status == 400:
                # History off, or a relay that cannot read our position: go on without
                # resuming (a Lost tells the caller). If the refusal was about something
                # else, the next attempt is refused too, and that is final.
                self._skip_from = True
                raise _Retry(f"resume refused (HTTP 400: {body[:80]})", at_once=True) from None
            raise Refused(status, body) from None
        raise _Retry(f"HTTP {status}" + (f" ({body[:80]})" if body else "")) from None

    def _set_connected(self, connected: bool) -> None:
        self._is_connected = connected
        self._change.set()
        self._change = trio.Event()

    async def _read_messages(self, ws: WebSocketConnection, position: str | None,
                             state: _Connection) -> None:
        """Hand the connection's messages to the caller until it closes."""
        positioned = ws.subprotocol == positions.SUBPROTOCOL
        log.info("connected to %s%s", self._endpoint,
                 "" if positioned else " (no positions: the relay cannot resume)")
        if not positioned:
            self._read = None
            if self._started:  # Whatever came since, or since the start position, is unknown.
                await self._put(Lost(UNSUPPORTED, None), state)
            self._started = True
            self._set_connected(True)
        # A stream that has begun and is not resumed here (the last relay sent no positions):
        # the first control event starts the stream anew.
        unresumed = self._started and position is None
        first = True
        while True:
            try:
                raw = await ws.get_message()
            except ConnectionClosed:
                return
            text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
            if not positioned:
                await self._put(Message(text, None), state)
                state.delivered = True
                continue
            try:
                item = positions.read(text)
            except positions.ProtocolError as error:
                raise SubscriptionError(f"the relay sent {error}") from None
            self._read = item.position
            self._started = True
            if isinstance(item, positions.Delivery):
                await self._put(Message(item.payload, item.position), state)
                state.delivered = True
            elif item.event == "lost":
                await self._put(Lost(item.reason or positions.UNKNOWN, item.position), state)
            elif first and unresumed:
                await self._put(Lost(UNSUPPORTED, item.position), state)
            else:
                if item.event == "resumed":
                    log.info("resumed after %s: %d missed", item.position, item.replayed or 0)
                await self._put(_Checkpoint(item.position), state)
            if first:
                first = False
                self._set_connected(True)

    async def _put(self, item: _Item, state: _Connection) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            state.blocked = state.blocked_since_ping = True
            try:
                await self._send.send(item)
            finally:
                state.blocked = False

    async def _keepalive(self, ws: WebSocketConnection, state: _Connection,
                         connection: trio.CancelScope) -> None:
        assert self._ping_interval is not None
        while True:
            await trio.sleep(self._ping_interval)
            state.blocked_since_ping = state.blocked
            with trio.move_on_after(self._ping_timeout) as waiting:
                try:
                    await ws.ping()
                except ConnectionClosed:
                    return
            # The reader stops reading while the caller is slow, pongs included: no proof.
            if waiting.cancelled_caught and not state.blocked_since_ping:
                state.dead = True
                connection.cancel()
                return


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one exception, other than cancellations, that ``group`` holds; the group itself
    when it holds none (a cancellation from outside, to pass on as it is) or several."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        elif not isinstance(error, trio.Cancelled):
            leaves.append(error)

    collect(group)
    return leaves[0] if len(leaves) == 1 else group


def _describe(error: BaseException) -> str:
    """One line on a failed attempt, from the error or what caused it."""
    while not str(error) and (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return str(error) or type(error).__name__


def subscribe(url: str, *, token: Token = None, filters: Iterable[str] = (),
              position: str | None = None, ping_interval: float | None = 10.0,
              ping_timeout: float = 10.0, connect_timeout: float = 10.0,
              backoff_min: float = 0.5, backoff_max: float = 30.0,
              ssl_context: ssl.SSLContext | None = None, max_message_size: int = 2 ** 20,
              buffer: int = 100) -> AbstractAsyncContextManager[Subscription]:
    """Subscribe to ``url`` (``ws://`` or ``wss://``, path ``/CHANNEL``, or ``/`` with a
    ``channels`` claim).

    ``token``: a JWT, or a callable (sync or async) returning one, called at every connect
    (what it raises ends the subscription); None when the URL carries it. ``filters``:
    ``path=op.value`` texts (docs/filters.md).
    ``position``: start after this position (as :attr:`Subscription.position` gave it).
    ``ping_interval`` None turns pings off. ``buffer``: events held for a slow caller before
    the socket is left unread. Raises ValueError for a bad URL or position at once.
    """
    endpoint = Endpoint.parse(url, filters)
    if position is not None and positions.parse_position(position) is None:
        raise ValueError(f"not a position: {position!r}")
    subscription = Subscription(
        endpoint, token=token, position=position, ping_interval=ping_interval,
        ping_timeout=ping_timeout, connect_timeout=connect_timeout, backoff_min=backoff_min,
        backoff_max=backoff_max, ssl_context=ssl_context, max_message_size=max_message_size,
        buffer=buffer)
    return _running(subscription)


@asynccontextmanager
async def _running(subscription: Subscription) -> AsyncIterator[Subscription]:
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(subscription.run)
        try:
            yield subscription
        except BaseException as raised:
            # Raised again below, after the nursery: from inside it, it would come out
            # wrapped in an exception group.
            error = raised
        finally:
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error

"""Connections: HTTP request, then plain HTTP answer or WebSocket handshake, then a Client.

Theory of operation
-------------------
Every accepted TCP (or TLS) connection gets :meth:`Server.handle`. h11 reads the request head
within ``handshake_timeout``. A request whose ``Upgrade`` header says ``websocket`` goes to the
WebSocket path; anything else gets a plain HTTP answer (:mod:`relay.transports.static`) and the
connection
may carry further requests (keep-alive, at most ``_MAX_REQUESTS_PER_CONNECTION``).

Until a connection is a WebSocket client, every phase has a deadline, kept on the one cancel
scope of :meth:`Server._accept`: the request (head and any body, which is read and thrown away
up to ``_MAX_DISCARDED_BODY`` bytes) within ``handshake_timeout`` of its start, keep-alive idle
within ``handshake_timeout``, and each write of a response (at most ``_FILE_CHUNK`` bytes)
within ``send_timeout``. So a connection that is not a client costs a bounded time, at most
one request head, one read and one file chunk of memory, and the socket plus at most one open
file.

Before any of it, with ``PGWS_MAX_CONNECTIONS_PER_IP`` set, a connection from a network
(:func:`relay.core.limits.network_of`: an IPv4 address or an IPv6 /64) that already holds that many
gets a 503 as soon as its request head has arrived, without the head being parsed. A refused
connection is held at most ``_REFUSED_HEAD_WAIT`` + ``_ADDRESS_FULL_LINGER`` seconds, at most
``_REFUSED_AT_ONCE`` of them at a time (beyond that they are closed at once), and refusals are
logged as one summary line per ``_REFUSED_LOG_INTERVAL``: a storm from one address costs a
bounded number of descriptors and log lines.

The WebSocket path checks, in order: shutting down (503), the Origin allow-list (403), the
connection limit (503), the token and channel (400 with upstream's exact message as body, see
:mod:`relay.auth.tokens`), the ``filter`` parameters (400 naming the one that does not parse, see
:mod:`relay.core.filters`; 503 when they would be one distinct filter set too many on a
channel), and only then the WebSocket headers (wsproto; 400 or 426). The handshake
is then answered with 101, with permessage-deflate when the client offered it acceptably and
``PGWS_COMPRESSION`` is on (:func:`relay.wire.deflate.negotiate`), and the connection becomes a
:class:`relay.transports.websocket.Client` placed in the hub's stream for its channels and filters.

Protocol rules are asked of :mod:`relay.transports.request`, :mod:`relay.auth.tokens` and
wsproto; this module only moves bytes and keeps the order of the checks. A token never reaches a
log line: request targets are not logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any, Protocol

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection
from wsproto.utilities import RemoteProtocolError

from relay import __version__
from relay.auth import tokens
from relay.config import Config
from relay.core import envelope
from relay.core.encoding import Encoding
from relay.core.filters import Filters
from relay.core.hub import Compression, Hub
from relay.core.limits import AddressCount, WriteBucket, network_of
from relay.core.stats import counters
from relay.transports import request, static
from relay.transports.admission import Admission, Held, Refusal
from relay.transports.events import EventStreamClient
from relay.transports.idle import IdleConnections
from relay.transports.websocket import Client, ClientSettings, close_now
from relay.wire import deflate, events, frames, origins, positions, proxy

log = logging.getLogger(__name__)

#: accept() errors that a full process or host causes: retried after _ACCEPT_RETRY seconds.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY = 0.1

#: Largest request head accepted; browsers send well under 8 KiB, and h11 answers 431 beyond.
_MAX_REQUEST_HEAD = 16384
_RECEIVE_BYTES = 16384
#: Bytes of a plain-HTTP request body that are read and thrown away to keep the connection.
_MAX_DISCARDED_BODY = 65536
#: Bytes of a static file read and written at a time; each write must finish within
#: ``send_timeout``, so a client that stops reading holds the file at most that long.
_FILE_CHUNK = 65536
#: Plain requests one keep-alive connection may carry (nginx's keepalive_requests default), so
#: that pipelining cannot keep a connection that never becomes a client forever.
_MAX_REQUESTS_PER_CONNECTION = 1000
_SERVER_HEADER = f"pgws-relay/{__version__}".encode()
_ADDRESS_FULL_BODY = b"Too many connections from this address"
#: Sent before the request is read, so it cannot come from h11 (which answers requests only).
_ADDRESS_FULL = (b"HTTP/1.1 503 Service Unavailable\r\nserver: " + _SERVER_HEADER
                 + b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: "
                 + str(len(_ADDRESS_FULL_BODY)).encode() + b"\r\nconnection: close\r\n\r\n"
                 + _ADDRESS_FULL_BODY)
#: Seconds a refused connection may take to send its request head (at most handshake_timeout):
#: clients send it at once, and one that does not gets no answer sooner anyway.
_REFUSED_HEAD_WAIT = 1.0
#: Seconds the refused connection's request is read and dropped after the 503, so that closing
#: a socket with unread bytes (which sends a reset) does not destroy the answer in flight.
_ADDRESS_FULL_LINGER = 1.0
#: Refused connections waiting for their head or lingering at once; beyond it a refused
#: connection is closed without an answer, so a storm holds a bounded number of descriptors.
_REFUSED_AT_ONCE = 64
#: Seconds between two summary lines of refused connections: a storm is one line per interval.
_REFUSED_LOG_INTERVAL = 10.0
#: Seconds a client resuming from another relay process's position waits for that position to
#: arrive here: relays listening on one database receive each notification within
#: milliseconds of each other, so longer means this relay never saw it (``unknown``).
_RESUME_WAIT = 2.0
#: The same when positions are places in a log (the WAL source), or while the source reads its
#: log again after a start: every point arrives here in the end, so a relay that lags another,
#: or rebuilds its history, is waited for longer before the position is called unknown.
_LOG_RESUME_WAIT = 10.0


async def _contained(what: str, task: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run a connection's background task (started in the root nursery, where an exception
    would stop the relay): a bug in it costs that task, logged, and nothing else."""
    try:
        await task(*args)
    except Exception:
        log.exception("internal error in %s", what)


async def _until_head_end(stream: trio.abc.Stream) -> None:
    """Read until a blank line ends a request head, ``_MAX_REQUEST_HEAD`` bytes, or EOF."""
    carry = b""  # The last bytes of the previous read: the blank line may span two reads.
    received = 0
    while received < _MAX_REQUEST_HEAD:
        data = await stream.receive_some(_RECEIVE_BYTES)
        if not data:
            return
        received += len(data)
        window = carry + data
        if b"\r\n\r\n" in window:
            return
        carry = window[-3:]


class _Done(Exception):
    """The connection is finished; close it."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Accepted:
    """A client after its handshake (a WebSocket's, or an event stream's response head), with
    what the hub needs to place it."""

    client: Client
    filters: Filters
    compression: Compression
    #: The client has positions (the resume subprotocol, or an event stream, and history is
    #: on); ``resume``: the position it comes back with.
    positioned: bool = False
    resume: positions.Position | None = None
    encoding: Encoding = frames.TEXT_FRAMES


async def _receive_exactly(stream: trio.abc.Stream, count: int) -> bytes:
    """``count`` bytes, never one more (what follows belongs to someone else)."""
    data = b""
    while len(data) < count:
        more = await stream.receive_some(count - len(data))
        if not more:
            raise proxy.ProxyError("the connection ended inside the PROXY header")
        data += more
    return data


def _within(peer: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
            ) -> bool:
    try:
        address = ipaddress.ip_address(peer.rsplit(":", 1)[0].strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _peer(stream: trio.abc.Stream) -> str:
    inner = getattr(stream, "transport_stream", stream)
    try:
        host, port = inner.socket.getpeername()[:2]  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return "unknown"
    return f"{host}:{port}"


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _is_websocket(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    value = request.header(headers, b"upgrade")
    return value is not None and value.strip().lower() == b"websocket"


#: The request headers a cross-origin page may send with an event stream's ``fetch``.
_PREFLIGHT_HEADERS = b"authorization, last-event-id, accept, cache-control"


def _wants_events(req: h11.Request) -> bool:
    """A GET that accepts an event stream (``EventSource`` sends exactly that)."""
    accept = request.header(req.headers, b"accept")
    return req.method == b"GET" and accept is not None and events.MEDIA_TYPE in accept.lower()


class Publishing(Protocol):
    """What a transport asks of the write path (:class:`relay.sources.publisher.Publisher`),
    whichever source runs: a transport never imports a source."""

    @property
    def publishes_meta(self) -> bool:
        """Whether connections opening and closing are published (a meta channel is set)."""

    async def meta(self, event: str, grant: tokens.Grant) -> None:
        """Publish a connection's ``ConnectionOpen``/``ConnectionClose``."""

    async def message(self, client: Client, text: str) -> None:
        """Publish a client's message; raises :class:`relay.wire.closecodes.MessageRefused`."""


class Server:
    """Handles connections for the accept loop; knows the hub and the write path."""

    def __init__(self, config: Config, keys: Sequence[tokens.Key], hub: Hub,
                 publisher: Publishing, background: trio.Nursery) -> None:
        self._config = config
        self._admission = Admission(config, keys, hub.history)
        self._hub = hub
        self._publisher = publisher
        self._background = background
        self._settings = ClientSettings(
            max_queue_bytes=config.max_queue_bytes, send_timeout=config.send_timeout,
            close_timeout=config.close_timeout, max_message_size=config.max_message_size,
            max_client_frames_per_second=config.max_client_frames_per_second,
            max_client_bytes_per_second=config.max_client_bytes_per_second,
        )
        self._shutting_down = False
        self._addresses = AddressCount(config.max_connections_per_ip)
        #: Refused connections now held (waiting for their head, or lingering after the 503).
        self._refused_held = 0
        #: Refusals since the last summary line; the summary task runs while this can grow.
        self._refused_unlogged = 0
        self._refused_logging = False
        #: Cancel scopes of connections that are not WebSocket clients (yet).
        self._pending: set[trio.CancelScope] = set()
        #: Where idle WebSocket clients on plain sockets wait without a task (run it with
        #: :meth:`relay.transports.idle.IdleConnections.run` in the connections' nursery).
        self.idle = IdleConnections(self._woken, self._abandon)

    def shut_down(self) -> None:
        """Refuse new WebSocket clients (503) and end connections that are not clients yet;
        idle clients take no rest any more (the caller closes them all)."""
        self._shutting_down = True
        self._admission.shutting_down = True
        self.idle.stop()
        for scope in self._pending:
            scope.cancel()

    async def serve(self, listeners: Sequence[trio.abc.Listener[Any]],
                    nursery: trio.Nursery) -> None:
        """Accept on every listener until cancelled, starting :meth:`handle` in ``nursery``
        for each connection; the listeners are closed on the way out. As
        ``trio.serve_listeners`` does, with one difference: a handler that returns does not
        close its stream, because an idle client's connection lives on without its task
        (:mod:`relay.transports.idle`); :meth:`handle` closes every other one itself."""
        async with trio.open_nursery() as accepting:
            for listener in listeners:
                accepting.start_soon(self._accept_from, listener, nursery)

    async def _accept_from(self, listener: trio.abc.Listener[Any], nursery: trio.Nursery
                           ) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    # Out of descriptors or memory: the connections that hold them end, so
                    # try again soon (what trio.serve_listeners does, said in one line).
                    log.error("accept failed: %s; retrying in %g s", exc, _ACCEPT_RETRY)
                    await trio.sleep(_ACCEPT_RETRY)
                else:
                    nursery.start_soon(self.handle, stream)

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection. Never raises for anything the peer does; closes the stream."""
        peer = _peer(stream)
        if self._config.proxy_protocol_from and _within(peer, self._config.proxy_protocol_from):
            proxied = None
            with trio.move_on_after(self._config.handshake_timeout):
                proxied = await self._proxied(stream, peer)
            if proxied is None:  # No valid header in time: closed, as from no balancer we trust.
                await close_now(stream)
                return
            peer = proxied
        network = network_of(peer.rsplit(":", 1)[0])
        if not self._addresses.enter(network):
            await self._refuse_address(stream, network)
            return
        held = Held()
        resting = False
        try:
            accepted = await self._accept(stream, peer, network, held)
            if accepted is None:
                return
            client = accepted.client
            # Inline rather than a helper: this frame lives as long as the connection.
            grant = client.grant
            if self._hub.add(client, grant.channels if grant.can_read else (), accepted.filters,
                             accepted.compression, accepted.positioned, accepted.resume,
                             accepted.encoding):
                self._background.start_soon(_contained, "a parked resume",
                                            self._give_up_later, client)
            del accepted  # Placed: not kept for the connection's life (100,000 of them).
            # A task per event only when there is one to publish: a storm of connections
            # would otherwise start (and end) two tasks each for nothing.
            meta = self._publisher.publishes_meta
            if meta:
                self._background.start_soon(_contained, "a meta event", self._publisher.meta,
                                            envelope.CONNECTION_OPEN, grant)
            if type(client) is Client and client.fileno() >= 0 and self.idle.open:
                client.idle = self.idle
                client.ticket = (held, network, meta)
            try:
                resting = await self._serve(client)
            finally:
                if not resting:
                    self._left(client, meta)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Done):
            pass
        except Exception:
            # A bug must cost one connection, never the relay; the peer sees the socket close.
            log.exception("internal error on the connection from %s", peer)
        finally:
            if not resting:  # Else the idle set holds it, and its ticket what it holds.
                self._admission.release(held, network)
                self._addresses.leave(network)
                await close_now(stream)

    async def _serve(self, client: Client) -> bool:
        """Run ``client`` until it ends (False) or rests in :attr:`idle` (True)."""
        while await client.run():
            if client.can_rest():
                self.idle.rest(client)
                return True
        return False

    def _left(self, client: Client, meta: bool) -> None:
        """A client's connection ended: out of the hub, and told on the meta channel."""
        self.idle.forget(client)
        self._hub.remove(client)
        log.debug("client %s disconnected", client.peer, extra={"event": "disconnected",
                                                                "peer": client.peer})
        if meta:
            self._background.start_soon(_contained, "a meta event", self._publisher.meta,
                                        envelope.CONNECTION_CLOSE, client.grant)

    async def _woken(self, client: Client) -> None:
        """The task of a client woken in :attr:`idle`, until it rests again or ends (then what
        :meth:`handle` would have done at its end)."""
        held, network, meta = client.ticket
        resting = False
        try:
            resting = await self._serve(client)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("internal error on the connection from %s", client.peer)
        finally:
            if not resting:
                self._end(client, held, network, meta)

    def _abandon(self, client: Client) -> None:
        """A resting client when the relay stops without closing it: reset and ended."""
        held, network, meta = client.ticket
        with contextlib.suppress(OSError):
            client.reset()
        self._end(client, held, network, meta)

    def _end(self, client: Client, held: Held, network: str, meta: bool) -> None:
        self._left(client, meta)
        self._admission.release(held, network)
        self._addresses.leave(network)
        client.ticket = None

    async def _proxied(self, stream: trio.abc.Stream, peer: str) -> str | None:
        """The client ``host:port`` a balancer's PROXY v2 header names (``peer`` itself for its
        own checks, the LOCAL command); None when the header is not valid. Reads exactly the
        header's bytes: what follows is the client's request."""
        # The header comes before everything, a TLS handshake too: read it from the socket
        # itself (an SSLStream has not begun its handshake yet).
        raw = getattr(stream, "transport_stream", stream)
        try:
            carries, family, length = proxy.read_head(await _receive_exactly(raw,
                                                                            proxy.HEAD_LENGTH))
            rest = await _receive_exactly(raw, length)
            if not carries:
                return peer
            address, port = proxy.client(family, rest)
        except (proxy.ProxyError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("closing a connection from %s: %s", peer, exc)
            return None
        return f"{address}:{port}"

    async def _give_up_later(self, client: Client) -> None:
        """A client waits for its position (issued by another relay process) at most
        ``_RESUME_WAIT`` seconds (a log's: ``_LOG_RESUME_WAIT``); then it is told the position
        is unknown here."""
        history = self._hub.history
        log_positions = self._hub.catching_up or (history is not None and history.log)
        await trio.sleep(_LOG_RESUME_WAIT if log_positions else _RESUME_WAIT)
        self._hub.give_up(client)

    async def _refuse_address(self, stream: trio.abc.Stream, network: str) -> None:
        counters.refuse("address")
        self._count_refusal(network)
        if self._refused_held >= _REFUSED_AT_ONCE:
            await close_now(stream)
            return
        self._refused_held += 1
        try:
            # An answer to a request not yet sent breaks clients that race their own send against
            # the reply (websockets' sync client asserts), so wait for the head, unparsed.
            with trio.move_on_after(min(_REFUSED_HEAD_WAIT, self._config.handshake_timeout)
                                    ) as timer:
                await _until_head_end(stream)
            if not timer.cancelled_caught:
                with trio.move_on_after(_ADDRESS_FULL_LINGER):
                    await stream.send_all(_ADDRESS_FULL)
                    while await stream.receive_some(_RECEIVE_BYTES):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._refused_held -= 1
            await close_now(stream)

    def _count_refusal(self, network: str) -> None:
        """Log the first refusal at once and the rest as one summary line per interval."""
        if self._refused_logging:
            self._refused_unlogged += 1
            return
        log.info("refusing connections over the per-address cap (%d), first from %s; "
                 "further refusals are summed up every %g s", self._config.max_connections_per_ip,
                 network, _REFUSED_LOG_INTERVAL)
        self._refused_logging = True
        self._background.start_soon(self._log_refusals)

    async def _log_refusals(self) -> None:
        try:
            while True:
                await trio.sleep(_REFUSED_LOG_INTERVAL)
                if not self._refused_unlogged:
                    return
                log.info("refused %d more connections over the per-address cap in %g s",
                         self._refused_unlogged, _REFUSED_LOG_INTERVAL)
                self._refused_unlogged = 0
        finally:
            self._refused_logging = False

    async def _accept(self, stream: trio.abc.Stream, peer: str, network: str, held: Held
                      ) -> _Accepted | None:
        """Everything before a WebSocket client exists; the HTTP state dies with this call.

        Resource handling: every phase sets the deadline of one cancel scope, ``phase`` (see
        the module's opening); a phase that overruns it, or a shutdown, cancels the scope and
        the connection ends (None). Errors: an HTTP protocol error is answered with h11's
        status; socket errors propagate to :meth:`handle`.
        """
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_HEAD)
        with trio.CancelScope() as phase:
            self._pending.add(phase)
            try:
                return await self._until_client(stream, http, phase, peer, network, held)
            except h11.RemoteProtocolError as exc:
                await self._send_error(stream, http, phase, exc.error_status_hint, str(exc))
            finally:
                self._pending.discard(phase)
        if phase.cancelled_caught and not self._shutting_down:
            log.debug("connection from %s ended: a deadline passed before it became a client",
                      peer)
        return None

    def _within(self, phase: trio.CancelScope, seconds: float) -> None:
        """The next phase must end within ``seconds`` from now."""
        phase.deadline = trio.current_time() + seconds

    async def _write(self, stream: trio.abc.Stream, phase: trio.CancelScope, data: bytes) -> None:
        """One write of a response; it must finish within ``send_timeout``."""
        self._within(phase, self._config.send_timeout)
        await stream.send_all(data)

    async def _until_client(self, stream: trio.abc.Stream, http: h11.Connection,
                            phase: trio.CancelScope, peer: str, network: str, held: Held
                            ) -> _Accepted | None:
        """Read the request; answer plain HTTP, or return the accepted WebSocket client."""
        if self._shutting_down:
            return None
        self._within(phase, self._config.handshake_timeout)
        req = await self._read_request(stream, http)
        if req is None:
            return None
        if _is_websocket(req.headers):
            return await self._handshake(stream, http, phase, req, peer, network, held)
        if not _wants_events(req):
            # Plain requests, kept alive; an event stream may follow on the same connection
            # (browsers reuse the page's).
            req = await self._serve_http(stream, http, phase, req, peer)
            if req is None:
                return None
        return await self._event_stream(stream, http, phase, req, peer, network, held)

    async def _read_request(self, stream: trio.abc.Stream, http: h11.Connection
                            ) -> h11.Request | None:
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(await stream.receive_some(_RECEIVE_BYTES))
                continue
            if isinstance(event, h11.Request):
                return event
            return None  # ConnectionClosed, or PAUSED after a previous cycle.

    def _response_head(self, http: h11.Connection, status: int,
                       headers: list[tuple[bytes, bytes]]) -> bytes:
        return http.send(h11.Response(status_code=status, reason=_reason(status),
                                      headers=[*headers, (b"server", _SERVER_HEADER)]))

    async def _send(self, stream: trio.abc.Stream, http: h11.Connection,
                    phase: trio.CancelScope, status: int, headers: list[tuple[bytes, bytes]],
                    body: bytes = b"", close: bool = False) -> None:
        """A whole response with an in-memory body, in one write."""
        if close:
            headers = [*headers, (b"connection", b"close")]
        data = self._response_head(http, status, headers)
        if body:
            data += http.send(h11.Data(data=body))
        data += http.send(h11.EndOfMessage())
        await self._write(stream, phase, data)

    async def _send_error(self, stream: trio.abc.Stream, http: h11.Connection,
                          phase: trio.CancelScope, status: int, message: str,
                          extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        body = message.encode()
        if http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                 h11.LocalProtocolError):
            await self._send(stream, http, phase, status,
                             [(b"content-type", b"text/plain; charset=utf-8"),
                              (b"content-length", str(len(body)).encode()), *extra], body,
                             close=True)

    # -- plain HTTP -------------------------------------------------------------------------

    async def _serve_http(self, stream: trio.abc.Stream, http: h11.Connection,
                          phase: trio.CancelScope, req: h11.Request, peer: str
                          ) -> h11.Request | None:
        """Answer plain requests on a kept-alive connection; an event stream's request, when
        one comes, is returned to be served as one (None: the connection is done)."""
        for served in range(1, _MAX_REQUESTS_PER_CONNECTION + 1):
            # The request's deadline, set when it began: its body must come within it too.
            request_deadline = phase.deadline
            reply = self._preflight(req) or static.answer(
                self._config.root_path, req.method, req.target,
                request.header(req.headers, b"if-none-match"))
            headers = [*reply.headers, (b"content-length", str(reply.length).encode())]
            last = served == _MAX_REQUESTS_PER_CONNECTION
            if req.method == b"HEAD" or reply.file is None:
                await self._send(stream, http, phase, reply.status, headers,
                                 b"" if req.method == b"HEAD" else reply.body, close=last)
            else:
                if last:
                    headers.append((b"connection", b"close"))
                await self._write(stream, phase, self._response_head(http, reply.status,
                                                                     headers))
                await self._send_file(stream, http, phase, reply.file, reply.length)
                await self._write(stream, phase, http.send(h11.EndOfMessage()))
            log.info("HTTP %s %d from %s", req.method.decode("latin-1"), reply.status, peer)
            phase.deadline = request_deadline
            await self._discard_body(stream, http)
            if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                return None
            http.start_next_cycle()
            # Keep-alive: the next request must begin, and arrive whole, within the timeout.
            self._within(phase, self._config.handshake_timeout)
            next_req = await self._read_request(stream, http)
            if next_req is None:
                return None
            if _is_websocket(next_req.headers):
                # A WebSocket upgrade after plain requests on one connection: rare; refuse it
                # plainly rather than mixing both lives in one handler.
                await self._send_error(stream, http, phase, 400, "Upgrade on a reused connection")
                return None
            if _wants_events(next_req):
                return next_req
            req = next_req
        return None

    async def _send_file(self, stream: trio.abc.Stream, http: h11.Connection,
                         phase: trio.CancelScope, path: str, length: int) -> None:
        remaining = length
        try:
            handle = await trio.open_file(path, "rb")
        except OSError as exc:
            # Gone or locked since static.answer looked: the head is sent, so close is all left.
            log.warning("cannot open a static file: %s", exc.strerror)
            raise _Done from None
        async with handle:
            while remaining > 0:
                chunk = await handle.read(min(_FILE_CHUNK, remaining))
                if not chunk:
                    raise _Done  # The file shrank under us: the response cannot be completed.
                remaining -= len(chunk)
                await self._write(stream, phase, http.send(h11.Data(data=chunk)))

    async def _discard_body(self, stream: trio.abc.Stream, http: h11.Connection) -> None:
        discarded = 0
        while http.their_state is h11.SEND_BODY:
            event = http.next_event()
            if event is h11.NEED_DATA:
                if discarded > _MAX_DISCARDED_BODY:
                    raise _Done
                http.receive_data(await stream.receive_some(_RECEIVE_BYTES))
            elif isinstance(event, h11.Data):
                discarded += len(event.data)

    # -- WebSocket --------------------------------------------------------------------------

    async def _reject(self, stream: trio.abc.Stream, http: h11.Connection,
                      phase: trio.CancelScope, status: int, message: str, peer: str,
                      reason: str, cors: Sequence[tuple[bytes, bytes]] = ()) -> None:
        log.info("rejecting request from %s: %d %s", peer, status, message,
                 extra={"event": "refused", "peer": peer, "status": status, "reason": reason})
        counters.refuse(reason)
        await self._send_error(stream, http, phase, status, message, cors)

    async def _event_stream(self, stream: trio.abc.Stream, http: h11.Connection,
                            phase: trio.CancelScope, req: h11.Request, peer: str, network: str,
                            held: Held) -> _Accepted | None:
        """Admit an event stream as a WebSocket is admitted (the same refusals and texts); its
        response head is the client's first queued bytes."""
        admitted = self._admission.admit(req.target, req.headers, network, held, time.time(),
                                         time.monotonic(), events=True)
        if isinstance(admitted, Refusal):
            await self._reject(stream, http, phase, admitted.status, admitted.text, peer,
                               admitted.reason, cors=self._cors(req))
            return None
        counters.accepted += 1
        # Written by hand, not through h11: with no length h11 would chunk the body, and the
        # hub's bytes are shared by every client. The body ends with the connection.
        head = b"".join([b"HTTP/1.1 200 OK\r\n",
                         b"content-type: text/event-stream; charset=utf-8\r\n",
                         b"cache-control: no-cache\r\n", b"x-accel-buffering: no\r\n",
                         *(name + b": " + value + b"\r\n" for name, value in self._cors(req)),
                         b"connection: close\r\n\r\n"])
        log.debug("client %s connected: event stream, mode %r, channels %s", peer,
                  admitted.grant.mode, ",".join(admitted.grant.channels),
                  extra={"event": "connected", "peer": peer, "mode": admitted.grant.mode,
                         "channels": list(admitted.grant.channels), "transport": "sse"})
        client = EventStreamClient(stream, admitted.grant, self._settings, peer)
        client.offer(head)  # Before the hub can offer anything (see _handshake).
        return _Accepted(client, admitted.filters, Compression.OFF, admitted.positioned,
                         admitted.resume, events.EVENT_STREAM)

    def _refresher(self, channel: str | None) -> Callable[[Client, object], bytes]:
        """What a connection with positions does with a new token it sends: checked by
        admission; taken, it replaces the grant (later writes carry its claims) and moves the
        connection's end to its ``exp``."""
        def refresh(client: Client, token: object) -> bytes:
            grant = self._admission.refresh(token, client.grant, channel, time.time())
            if isinstance(grant, str):
                log.info("token refresh from %s refused: %s", client.peer, grant,
                         extra={"event": "token_refused", "peer": client.peer})
                return positions.token_refused_event(grant)
            client.grant = grant
            expires_at = grant.expires_at
            client.expire_at(expires_at)
            return positions.token_event(expires_at)

        return refresh

    def _preflight(self, req: h11.Request) -> static.Reply | None:
        """The answer to a CORS preflight (an ``OPTIONS`` with ``Access-Control-Request-Method``
        before a cross-origin ``fetch`` of an event stream with ``Authorization`` or
        ``Last-Event-ID``): allowed for an allowed origin, 403 for any other; None: not one."""
        if req.method != b"OPTIONS" or \
                request.header(req.headers, b"access-control-request-method") is None:
            return None
        allowed = self._cors(req)
        if not allowed:
            return static.Reply(403, [(b"content-type", b"text/plain; charset=utf-8")],
                                b"Origin not allowed", length=len(b"Origin not allowed"))
        return static.Reply(204, [*allowed, (b"access-control-allow-methods", b"GET"),
                                  (b"access-control-allow-headers", _PREFLIGHT_HEADERS),
                                  (b"access-control-max-age", b"600")])

    def _cors(self, req: h11.Request) -> list[tuple[bytes, bytes]]:
        """CORS headers for a request from an allowed Origin (``PGWS_ALLOWED_ORIGINS``):
        a page there may read the stream, with its cookies. None otherwise: without the
        setting no other site's page may read what a browser's cookies would open."""
        origin = request.header(req.headers, b"origin")
        if origin is None or not self._config.allowed_origins or \
                origins.origin_key(origin.decode("latin-1")) not in self._config.allowed_origins:
            return []
        return [(b"access-control-allow-origin", origin),
                (b"access-control-allow-credentials", b"true"), (b"vary", b"origin")]

    async def _handshake(self, stream: trio.abc.Stream, http: h11.Connection,
                         phase: trio.CancelScope, req: h11.Request, peer: str, network: str,
                         held: Held) -> _Accepted | None:
        config = self._config
        admitted = self._admission.admit(req.target, req.headers, network, held, time.time(),
                                         time.monotonic())
        if isinstance(admitted, Refusal):
            await self._reject(stream, http, phase, admitted.status, admitted.text, peer,
                               admitted.reason)
            return None
        grant, positioned = admitted.grant, admitted.positioned

        ws = WSConnection(ConnectionType.SERVER)
        try:
            try:
                ws.initiate_upgrade_connection(req.headers, req.target)
            except UnicodeDecodeError:
                # wsproto decodes Sec-WebSocket-Extensions/-Protocol as ASCII; h11 lets any
                # byte through. Such a header is as broken as any other bad handshake.
                raise RemoteProtocolError("Non-ASCII WebSocket extension or protocol header",
                                          event_hint=None) from None
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            status = getattr(hint, "status_code", 400)
            log.info("rejecting request from %s: %d %s", peer, status, exc,
                     extra={"event": "refused", "peer": peer, "status": status,
                            "reason": "handshake"})
            counters.refuse("handshake")
            extra = list(getattr(hint, "headers", []) or [])
            body = str(exc).encode()
            await self._send(stream, http, phase, status,
                             [*extra, (b"content-type", b"text/plain; charset=utf-8"),
                              (b"content-length", str(len(body)).encode())], body, close=True)
            return None
        # h11 holds any bytes the client sent after the request (its first frames).
        while http.next_event() not in (h11.PAUSED, h11.NEED_DATA):
            pass
        received = http.trailing_data[0]
        if config.send_buffer:
            # A fixed send buffer turns off the kernel's autotuning (up to tcp_wmem's maximum,
            # 4 MiB here): what a slow client can hold is then this plus max_queue_bytes.
            inner = getattr(stream, "transport_stream", stream)
            inner.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.send_buffer)
        agreement = None
        if config.compression:
            agreement = deflate.negotiate(
                [value for key, value in req.headers if key.lower() == b"sec-websocket-extensions"])
        headers = [] if agreement is None else [
            (b"sec-websocket-extensions", agreement.response.encode())]
        answer = ws.send(AcceptConnection(
            subprotocol=positions.SUBPROTOCOL if positioned else None, extra_headers=headers))
        counters.accepted += 1
        if agreement is None:
            compression = Compression.OFF
        elif agreement.server_no_context_takeover:
            compression = Compression.ALONE
        else:
            compression = Compression.SHARED
        log.debug("client %s connected: mode %r, channels %s, compression %s", peer, grant.mode,
                  ",".join(grant.channels), compression.value,
                  extra={"event": "connected", "peer": peer, "mode": grant.mode,
                         "channels": list(grant.channels), "compression": compression.value})
        client = Client(stream, grant, self._settings, self._publisher.message, peer, received,
                        inflate=agreement is not None)
        if config.max_writes_per_second and grant.can_write:
            client.write_bucket = WriteBucket(config.max_writes_per_second, time.monotonic())
        if positioned:
            client.refresh = self._refresher(request.parse_target(req.target).channel)
        # The answer is the client's first bytes out, and the caller adds it to the hub before
        # anything awaits: a notification handled in between would be missed by a client that
        # has its 101 (awaiting the answer's write here let the listener run first).
        client.offer(answer)
        return _Accepted(client, admitted.filters, compression, positioned, admitted.resume)

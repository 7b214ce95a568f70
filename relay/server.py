"""Connections: HTTP request, then plain HTTP answer or WebSocket handshake, then a Client.

Theory of operation
-------------------
Every accepted TCP (or TLS) connection gets :meth:`Server.handle`. h11 reads the request head
within ``handshake_timeout``. A request whose ``Upgrade`` header says ``websocket`` goes to the
WebSocket path; anything else gets a plain HTTP answer (:mod:`relay.static`) and the connection
may carry further requests (keep-alive, each under the same timeout).

Before any of it, with ``PGWS_MAX_CONNECTIONS_PER_IP`` set, a connection from an address that
already holds that many gets a 503 as soon as its request head has arrived, without the head
being parsed (cheap, and bounded by ``handshake_timeout`` and the head size, so one address
cannot tie the relay up with connections that never finish a request).

The WebSocket path checks, in order: shutting down (503), the Origin allow-list (403), the
connection limit (503), the token and channel (400 with upstream's exact message as body, see
:mod:`relay.auth`), and only then the WebSocket headers (wsproto; 400 or 426). The handshake is
then answered with 101 and the connection becomes a :class:`relay.client.Client` subscribed in
the hub.

Protocol rules are asked of :mod:`relay.request`, :mod:`relay.auth` and wsproto; this module
only moves bytes and keeps the order of the checks. A token never reaches a log line: request
targets are not logged.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from http import HTTPStatus

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection
from wsproto.utilities import RemoteProtocolError

from relay import __version__, auth, envelope, request, static
from relay.client import Client, ClientSettings, close_now
from relay.config import Config
from relay.hub import Hub
from relay.limits import AddressCount, WriteBucket
from relay.publisher import Publisher
from relay.stats import counters

log = logging.getLogger(__name__)

#: Largest request head accepted; browsers send well under 8 KiB, and h11 answers 431 beyond.
_MAX_REQUEST_HEAD = 16384
_RECEIVE_BYTES = 16384
#: Bytes of a plain-HTTP request body that are read and thrown away to keep the connection.
_MAX_DISCARDED_BODY = 65536
_FILE_CHUNK = 65536
_SERVER_HEADER = f"pgws-relay/{__version__}".encode()
_ADDRESS_FULL_BODY = b"Too many connections from this address"
#: Sent before the request is read, so it cannot come from h11 (which answers requests only).
_ADDRESS_FULL = (b"HTTP/1.1 503 Service Unavailable\r\nserver: " + _SERVER_HEADER
                 + b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: "
                 + str(len(_ADDRESS_FULL_BODY)).encode() + b"\r\nconnection: close\r\n\r\n"
                 + _ADDRESS_FULL_BODY)
#: Seconds the refused connection's request is read and dropped after the 503, so that closing
#: a socket with unread bytes (which sends a reset) does not destroy the answer in flight.
_ADDRESS_FULL_LINGER = 1.0


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


class Server:
    """Handles connections for the accept loop; knows the hub and the publisher."""

    def __init__(self, config: Config, keys: Sequence[auth.Key], hub: Hub, publisher: Publisher,
                 background: trio.Nursery) -> None:
        self._config = config
        self._keys = keys
        self._hub = hub
        self._publisher = publisher
        self._background = background
        self._settings = ClientSettings(
            max_queue_bytes=config.max_queue_bytes, send_timeout=config.send_timeout,
            close_timeout=config.close_timeout, max_message_size=config.max_message_size,
        )
        self._shutting_down = False
        self._addresses = AddressCount(config.max_connections_per_ip)
        #: Cancel scopes of connections that are not WebSocket clients (yet).
        self._pending: set[trio.CancelScope] = set()

    def shut_down(self) -> None:
        """Refuse new WebSocket clients (503) and end connections that are not clients yet."""
        self._shutting_down = True
        for scope in self._pending:
            scope.cancel()

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection. Never raises for anything the peer does; closes the stream."""
        peer = _peer(stream)
        address = peer.rsplit(":", 1)[0]
        if not self._addresses.enter(address):
            await self._refuse_address(stream, peer)
            return
        try:
            client = await self._accept(stream, peer)
            if client is None:
                return
            # Inline rather than a helper: this frame lives as long as the connection.
            grant = client.grant
            channels = grant.channels if grant.can_read else ()
            self._hub.add(client, channels)
            self._background.start_soon(self._publisher.meta, envelope.CONNECTION_OPEN, grant)
            try:
                await client.run()
            finally:
                self._hub.remove(client, channels)
                log.debug("client %s disconnected", peer)
                self._background.start_soon(self._publisher.meta, envelope.CONNECTION_CLOSE,
                                            grant)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Done):
            pass
        except Exception:
            # A bug must cost one connection, never the relay; the peer sees the socket close.
            log.exception("internal error on the connection from %s", peer)
        finally:
            self._addresses.leave(address)
            await close_now(stream)

    async def _refuse_address(self, stream: trio.abc.Stream, peer: str) -> None:
        counters.rejected += 1
        log.info("rejecting connection from %s: %d connections from that address", peer,
                 self._config.max_connections_per_ip)
        try:
            # An answer to a request not yet sent breaks clients that race their own send against
            # the reply (websockets' sync client asserts), so wait for the head, unparsed.
            with trio.move_on_after(self._config.handshake_timeout) as timer:
                await _until_head_end(stream)
            if not timer.cancelled_caught:
                with trio.move_on_after(_ADDRESS_FULL_LINGER):
                    await stream.send_all(_ADDRESS_FULL)
                    while await stream.receive_some(_RECEIVE_BYTES):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await close_now(stream)

    async def _accept(self, stream: trio.abc.Stream, peer: str) -> Client | None:
        """Everything before a WebSocket client exists; the HTTP state dies with this call."""
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_HEAD)
        # Until it is a WebSocket client, a shutdown may cancel the connection outright.
        with trio.CancelScope() as pending:
            self._pending.add(pending)
            try:
                return await self._until_client(stream, http, peer)
            except h11.RemoteProtocolError as exc:
                await self._send_error(stream, http, exc.error_status_hint, str(exc))
            finally:
                self._pending.discard(pending)
        return None

    async def _until_client(self, stream: trio.abc.Stream, http: h11.Connection, peer: str
                            ) -> Client | None:
        """Read the request; answer plain HTTP, or return the accepted WebSocket client."""
        if self._shutting_down:
            return None
        req = None
        with trio.move_on_after(self._config.handshake_timeout) as timer:
            req = await self._read_request(stream, http)
        if timer.cancelled_caught:
            log.debug("handshake timeout for %s", peer)
        if req is None:
            return None
        if _is_websocket(req.headers):
            return await self._handshake(stream, http, req, peer)
        await self._serve_http(stream, http, req, peer)
        return None

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

    async def _send(self, stream: trio.abc.Stream, http: h11.Connection, status: int,
                    headers: list[tuple[bytes, bytes]], body: bytes = b"",
                    close: bool = False) -> None:
        if close:
            headers = [*headers, (b"connection", b"close")]
        data = self._response_head(http, status, headers)
        if body:
            data += http.send(h11.Data(data=body))
        data += http.send(h11.EndOfMessage())
        await stream.send_all(data)

    async def _send_error(self, stream: trio.abc.Stream, http: h11.Connection, status: int,
                          message: str) -> None:
        body = message.encode()
        if http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            with trio.move_on_after(self._config.close_timeout):
                await self._send(stream, http, status,
                                 [(b"content-type", b"text/plain; charset=utf-8"),
                                  (b"content-length", str(len(body)).encode())], body, close=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass

    # -- plain HTTP -------------------------------------------------------------------------

    async def _serve_http(self, stream: trio.abc.Stream, http: h11.Connection,
                          req: h11.Request, peer: str) -> None:
        while True:
            reply = static.answer(self._config.root_path, req.method, req.target,
                                  request.header(req.headers, b"if-none-match"))
            headers = [*reply.headers, (b"content-length", str(reply.length).encode())]
            await stream.send_all(self._response_head(http, reply.status, headers))
            if req.method != b"HEAD":
                if reply.file is not None:
                    await self._send_file(stream, http, reply.file, reply.length)
                elif reply.body:
                    await stream.send_all(http.send(h11.Data(data=reply.body)))
            await stream.send_all(http.send(h11.EndOfMessage()))
            log.info("HTTP %s %d from %s", req.method.decode("latin-1"), reply.status, peer)
            await self._discard_body(stream, http)
            if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                return
            http.start_next_cycle()
            next_req = None
            with trio.move_on_after(self._config.handshake_timeout):
                next_req = await self._read_request(stream, http)
            if next_req is None:
                return
            if _is_websocket(next_req.headers):
                # A WebSocket upgrade after plain requests on one connection: rare; refuse it
                # plainly rather than mixing both lives in one handler.
                await self._send_error(stream, http, 400, "Upgrade on a reused connection")
                return
            req = next_req

    async def _send_file(self, stream: trio.abc.Stream, http: h11.Connection, path: str,
                         length: int) -> None:
        remaining = length
        async with await trio.open_file(path, "rb") as handle:
            while remaining > 0:
                chunk = await handle.read(min(_FILE_CHUNK, remaining))
                if not chunk:
                    raise _Done  # The file shrank under us: the response cannot be completed.
                remaining -= len(chunk)
                await stream.send_all(http.send(h11.Data(data=chunk)))

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

    async def _reject(self, stream: trio.abc.Stream, http: h11.Connection, status: int,
                      message: str, peer: str) -> None:
        log.info("rejecting request from %s: %d %s", peer, status, message)
        counters.rejected += 1
        await self._send_error(stream, http, status, message)

    async def _handshake(self, stream: trio.abc.Stream, http: h11.Connection, req: h11.Request,
                         peer: str) -> Client | None:
        config = self._config
        if self._shutting_down:
            await self._reject(stream, http, 503, "Shutting down", peer)
            return None
        origin = request.header(req.headers, b"origin")
        if config.allowed_origins and origin is not None and \
                origin.decode("latin-1") not in config.allowed_origins:
            await self._reject(stream, http, 403, "Origin not allowed", peer)
            return None
        if config.max_connections and self._hub.client_count >= config.max_connections:
            await self._reject(stream, http, 503, "Too many connections", peer)
            return None
        target = request.parse_target(req.target, req.headers)
        try:
            grant = auth.check(target.token, target.channel, self._keys, time.time())
        except auth.AuthError as refused:
            await self._reject(stream, http, 400, str(refused), peer)
            return None

        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.initiate_upgrade_connection(req.headers, req.target)
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            status = getattr(hint, "status_code", 400)
            log.info("rejecting request from %s: %d %s", peer, status, exc)
            counters.rejected += 1
            extra = list(getattr(hint, "headers", []) or [])
            body = str(exc).encode()
            await self._send(stream, http, status,
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
        await stream.send_all(ws.send(AcceptConnection()))
        log.debug("client %s connected: mode %r, channels %s", peer, grant.mode,
                  ",".join(grant.channels))
        client = Client(stream, grant, self._settings, self._publisher.message, peer, received)
        if config.max_writes_per_second and grant.can_write:
            client.write_bucket = WriteBucket(config.max_writes_per_second, time.monotonic())
        return client

"""One WebSocket connection's life after the handshake: its outbox, writer, reader and close.

Theory of operation
-------------------
Writing. Everything the server sends to a client (notification frames, pings, pongs) goes
through :meth:`Client.offer`, and the close frame through the same queue, so bytes never
interleave. The hub calls :meth:`offer` synchronously. When no writer is at work, ``offer``
writes straight to the socket without blocking (the fast path, off under TLS); whatever the
kernel does not take is queued, and a writer task is started. It sends everything queued as one
buffer, waiting for writability as needed, and ends when the queue is empty, so an idle
connection has no writer task at all. The slow-consumer rule
lives here: bytes queued plus bytes in flight may not exceed ``max_queue_bytes``, and a socket
may not refuse every byte for ``send_timeout`` seconds; a client that breaks either is closed
with 1013 ``slow consumer``, its queue dropped (a half-sent frame is finished first, so the close
frame stays well-formed).

Reading. The reader (the connection's own task) feeds wsproto's frame parser and acts on the
frames: pongs for pings, a close reply for a close, a 1002/1007
close for a protocol violation, client messages assembled under ``max_message_size`` and
``MAX_FRAGMENTS`` (1009 beyond either) and handed to ``on_message`` for ``w``/``rw`` clients
(awaited, so a client's writes are back-pressured by the database); read-only clients' messages
are read the same way and discarded. The ``exp`` claim is a deadline on the reader's wait and
is checked on every pass, busy or not; then the reader sends close 3001 and keeps reading for
the reply.

Resting. On a plain socket with :attr:`Client.idle` set, a reader that finds nothing to read,
nothing queued to write and nothing half done (a partial message, a close, a deadline) returns
instead of waiting: :meth:`run` returns True and its caller lets the connection rest in the worker's
:class:`relay.transports.idle.IdleConnections`, so an idle connection costs no task. Whatever
needs a task again (bytes queued for a writer, a close, an abort) wakes it from there, as its
socket's readability and its token's ``exp`` do; its caller then runs it again. Readability
is first offered to :meth:`Client.settle`, which reads the bytes without a task: when they are
nothing but pongs (every client answers every ping), they are counted against the inbound
budget and dropped, and the connection rests on; anything else is handed to the reader, which
parses it first when the task starts.

A client's traffic must never starve the others, whatever it sends. Parsing costs ~15 µs of
this thread per frame, so the reader yields to Trio after every read that did not wait and
every ``_FRAMES_PER_CHECKPOINT`` frames; and every client has an inbound budget
(:class:`relay.core.limits.InboundBudget`: frames and bytes per second), beyond which it is closed
with 1008 and no longer read (as after a protocol error, no close reply is awaited).

Closing. :meth:`close` queues a close frame behind what is queued and gives the whole
connection ``close_timeout`` seconds to finish: the writer sends the close frame, the reader
waits for the client's close. If the deadline passes, the TCP connection is aborted (RST), so a
client that does not read cannot hold the relay's resources.

Rules this file keeps: nothing here touches another client; nothing on the ``offer`` path awaits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from math import inf
from typing import TYPE_CHECKING, Any

import orjson
import trio
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from relay.auth.tokens import Grant
from relay.core.limits import InboundBudget, WriteBucket, within_queue_bound
from relay.core.stats import counters
from relay.wire import frames, positions
from relay.wire.closecodes import (
    JWT_EXPIRED,
    MESSAGE_TOO_BIG,
    NORMAL,
    POLICY_VIOLATION,
    TRY_AGAIN_LATER,
    MessageRefused,
)
from relay.wire.inflate import InboundDeflate

if TYPE_CHECKING:
    from relay.core.hub import (
        Pending,  # Only a type: the hub calls into clients, never the reverse.
    )
    from relay.transports.idle import IdleConnections

log = logging.getLogger(__name__)

#: A stand-in for a cancel scope when there is no deadline; stateless, so shared.
_NO_DEADLINE = contextlib.nullcontext()

#: Bytes asked of the socket per read; client traffic is small (pongs, short messages).
_RECEIVE_BYTES = 16384

#: Bytes a resting connection's readability is read in, without a task (:meth:`Client.settle`):
#: a pong of the server's ping is 7 to 13 bytes; a larger read is handed to the reader.
_SETTLE_BYTES = 512

#: Pongs one read may hold and still be taken where the connection rests: a client sends one
#: per ping. More are handed to the reader, which yields as it parses: 85 pongs a read over
#: 1,024 sockets held one pass of the idle loop for 42 ms (an attacker's review of 5f72efc).
_PONGS_AT_REST = 4

#: Frames parsed between two yields to Trio: ~0.25 ms of parsing, so a flooding client delays
#: no other task by more than that per turn (bench/reliability/flood.py: 32 frames doubled the delay
#: of a `GET /` under four flooders), while a checkpoint (a few µs) stays a small share.
_FRAMES_PER_CHECKPOINT = 16

#: Bytes joined into one write when the backlog is long (a replay): large enough that a replay
#: is a few system calls, small enough that the copy stays cheap and bounded.
_REPLAY_CHUNK = 262144

#: Seconds between two token refreshes a connection may ask for (a signature check each).
_REFRESH_SPACING = 1.0

#: Fragments one message may have (1009 beyond). Browsers never fragment and libraries cut at
#: a few KiB, so real messages have a handful; a cap keeps empty fragments, which add nothing
#: to ``max_message_size``, from growing a message's parts without bound.
MAX_FRAGMENTS = 4096

#: Bytes one TLS write may take before ``send_timeout`` counts it as a stall: one TLS record.
#: Progress inside a TLS ``send_all`` cannot be seen, so the backlog goes out a record at a
#: time and each record must leave within ``send_timeout``, as a plain socket must take a byte.
_TLS_SEND_BYTES = 16384

#: Close reasons for what :class:`relay.wire.inflate.InboundDeflate` refuses, by close code.
_INFLATE_FAILURES = {
    1002: "RSV1 on a control or continuation frame",
    1007: "compressed data that does not inflate",
    1009: "message too big",
}

#: Close codes a peer may not put on the wire (RFC 6455 7.4.1); we answer such a close with 1000.
_UNSENDABLE_CLOSE_CODES = frozenset({1005, 1006, 1015})

OnMessage = Callable[["Client", str], Awaitable[None]]


class Client:
    """A connected, authorised WebSocket client. Create it, then ``await run()``."""

    __slots__ = (
        "_backlog",
        "_budget",
        "_closing",
        "_deadline",
        "_exempt",
        "_expiry",
        "_fd",
        "_frames",
        "_inflate",
        "_nursery",
        "_on_message",
        "_partial_head",
        "_queued",
        "_reading",
        "_refreshed_at",
        "_settings",
        "_stream",
        "_tracked",
        "_unread",
        "_writing",
        "grant",
        "idle",
        "peer",
        "refresh",
        "ticket",
        "write_bucket",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        grant: Grant,
        settings: ClientSettings,
        on_message: OnMessage,
        peer: str,
        received: bytes = b"",
        inflate: bool = False,
    ) -> None:
        self._stream = stream
        self._settings = settings
        # wsproto's frame parser, without its Connection wrapper: the wrapper's only additions
        # are an event queue (a deque, ~0.8 KiB per connection) and a close state this class
        # keeps itself. ``received``: bytes the client sent right after its handshake.
        # ``inflate``: permessage-deflate was agreed, so the client may compress its messages;
        # they are inflated within max_message_size (a bomb is 1009 before it is inflated).
        self._inflate = inflate
        # None while the connection rests with nothing half parsed: made again at its next
        # bytes (0.8 KiB of an idle connection's 2 KiB, bench/micro/connection_memory.py).
        self._frames: FrameProtocol | None = self._new_decoder()
        if received:
            self._frames.receive_bytes(received)
        self.grant = grant
        #: The client's write-rate allowance, when a rate limit is configured.
        self.write_bucket: WriteBucket | None = None
        #: On connections with positions: takes a new token sent as ``{"event":"token"}`` and
        #: gives the answer to send (:meth:`_deliver`); None: such messages are published.
        self.refresh: Callable[[Client, object], bytes] | None = None
        self._refreshed_at = -inf
        self._on_message = on_message
        self.peer = peer
        # The fast path writes to the file descriptor directly; under TLS bytes must go
        # through the SSL object, so there is no fast path (fd = -1).
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._backlog: list[bytes] = []
        self._queued = 0
        # Bytes of a replay still queued (at the front): the history holds them anyway, so
        # they do not count against max_queue_bytes.
        self._exempt = 0
        # Batches whose delivery time waits for this client's backlog to be written (the hub's
        # delivery-time histogram); released with the backlog they came with.
        self._tracked: list[Pending] = []
        self._partial_head = False
        # A writer task exists only while there is something to write: an idle connection
        # costs one task (its reader), not two.
        self._writing = False
        self._closing = False
        self._nursery: trio.Nursery | None = None
        # The deadline and cancellation of the whole connection; held here until run() opens
        # the connection's nursery, whose cancel scope then carries them.
        self._deadline = inf
        #: When the token's ``exp`` closes the connection (Trio clock); inf: never, or done.
        self._expiry = inf
        self.expire_at(grant.expires_at)
        # The inbound budget, made at the first bytes the client sends, so that an idle
        # connection carries none; kept while it rests, so that pausing does not refill it.
        self._budget: InboundBudget | None = None
        #: Where this connection rests when idle (plain sockets; None: it keeps its task).
        self.idle: IdleConnections | None = None
        #: What the server needs to end a connection that has no task of its own.
        self.ticket: Any = None
        #: The reader's wait while only a writer keeps the connection from resting: the
        #: writer cuts it when it is done, so the connection rests then, not at its next bytes.
        self._reading: trio.CancelScope | None = None
        #: Bytes :meth:`settle` read that the reader must parse first (not only pongs).
        self._unread = b""

    # -- the write side ---------------------------------------------------------------------

    def offer(self, frame: bytes) -> bool:
        """Send ``frame`` now if the socket takes it, else queue it; never blocks.

        True when the frame (or its rest) was queued for the writer; False when it was written
        at once or will never be (the client is closing).
        """
        if self._closing:
            return False
        if self._fd >= 0 and not self._writing and not self._backlog:
            try:
                sent = os.write(self._fd, frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._abort()
                return False
            if sent == len(frame):
                return False
            if sent:
                # The rest of a half-written frame must follow, whatever the bound says.
                self._partial_head = True
                self._queue(frame[sent:])
                if not within_queue_bound(self._queued - self._exempt, 0,
                                          self._settings.max_queue_bytes):
                    self._slow("queue over its bound")
                return not self._closing
        if not within_queue_bound(self._queued - self._exempt, len(frame),
                                  self._settings.max_queue_bytes):
            self._slow("queue over its bound")
            return False
        self._queue(frame)
        return True

    def track(self, pending: Pending) -> None:
        """Release ``pending`` once what is queued now has been written (or dropped)."""
        self._tracked.append(pending)

    def replay(self, frames: list[bytes]) -> None:
        """Queue what a resume replays, behind what is queued; it is written in chunks of
        ``_REPLAY_CHUNK`` bytes and does not count against ``max_queue_bytes`` (the history
        holds these bytes anyway; live traffic queued behind them still does)."""
        if self._closing:
            return
        size = sum(map(len, frames))
        self._backlog.extend(frames)
        self._queued += size
        self._exempt += size
        self._start_writer()

    def _queue(self, frame: bytes) -> None:
        self._backlog.append(frame)
        self._queued += len(frame)
        self._start_writer()

    def _start_writer(self) -> None:
        if not self._writing and self._backlog:
            if self._nursery is not None:
                self._writing = True
                self._nursery.start_soon(self._writer)
            elif self.idle is not None:
                self.idle.wake(self)  # Resting: a task to write it (run() starts the writer).

    def close(self, code: int, reason: str) -> None:
        """Send a close frame after what is queued; the connection ends within close_timeout."""
        if self._closing:
            return
        self._queue(frames.close(code, reason))
        self._closing = True
        self._set_deadline(trio.current_time() + self._settings.close_timeout)

    def _slow(self, why: str) -> None:
        if self._closing:
            return  # Already closing: its deadline bounds what is left.
        log.warning("closing slow consumer %s (%s, %d bytes queued)", self.peer, why, self._queued,
                    extra={"event": "slow_consumer", "peer": self.peer,
                           "queued_bytes": self._queued})
        counters.slow_closed += 1
        # Drop what is queued, but keep the rest of a half-written frame so that the close
        # frame after it is still parsed as a frame.
        kept = 1 if self._partial_head else 0
        dropped = sum(map(len, self._backlog[kept:]))
        counters.bytes_dropped += dropped
        self._queued -= dropped
        self._exempt = 0
        del self._backlog[kept:]
        self._release(self._tracked)
        self.close(TRY_AGAIN_LATER, "slow consumer")

    @staticmethod
    def _release(tracked: list[Pending]) -> None:
        for pending in tracked:
            pending.done()
        tracked.clear()

    def _abort(self) -> None:
        self._closing = True
        self._set_deadline(-inf)

    def expire_at(self, expires_at: float | None) -> None:
        """The token's ``exp`` (Unix seconds; None: none) ends the connection then (3001)."""
        self._expiry = inf if expires_at is None else \
            trio.current_time() + (expires_at - time.time())

    def _set_deadline(self, deadline: float) -> None:
        self._deadline = min(self._deadline, deadline)
        if self._nursery is not None:
            self._nursery.cancel_scope.deadline = self._deadline
        elif self.idle is not None:
            self.idle.wake(self)  # Resting: run() applies the deadline.

    # -- resting (relay.transports.idle) ------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def expiry(self) -> float:
        return self._expiry

    def can_rest(self) -> bool:
        """Its task may end and it may rest: nothing queued, closing or due (see the
        opening)."""
        return self._nursery is None and self._fd >= 0 and self._idle_now()

    def settle(self) -> bool:
        """The socket of this resting connection is readable: read it without a task. True
        when what came was only pongs, within the inbound budget (it rests on); False when a
        task must take over (end of stream, an error, anything else, which waits in
        ``_unread`` for the reader, or a budget overrun, which the reader then closes)."""
        if self._frames is not None and not self._decoder_empty():
            return False  # A frame or message is half parsed: the reader owns what follows.
        try:
            data = os.read(self._fd, _SETTLE_BYTES)
        except BlockingIOError:
            return True  # Nothing after all; the epoll says so again when there is.
        except OSError:
            return False  # The reader's own read meets the end.
        pongs = frames.client_pongs(data)
        if 0 < pongs <= _PONGS_AT_REST:
            budget = self._inbound()
            now = trio.current_time()
            if budget.take_bytes(now, len(data)) and all(
                    budget.take_frame(now) for _ in range(pongs)):
                counters.pongs_at_rest += pongs
                return True
            self._unread = data  # The reader finds the budget spent and closes (1008).
            return False
        self._unread = data
        return False

    def _idle_now(self) -> bool:
        idle = self.idle
        return (idle is not None and idle.open and not self._backlog and not self._writing
                and not self._closing and self._deadline == inf
                and self._expiry > trio.current_time())

    async def _writer(self) -> None:
        """Send everything queued, one buffer at a time, then end (until more is queued)."""
        tracked: list[Pending] = []
        try:
            while self._backlog:
                backlog, self._backlog = self._backlog, []
                tracked, self._tracked = self._tracked, []
                self._partial_head = False
                for chunk in _chunks(backlog):  # One frame: the frame itself, no copy.
                    await self._send(chunk)
                self._release(tracked)
        finally:
            self._writing = False
            # Cancelled or aborted: what is left will never be written.
            self._release(tracked)
            self._release(self._tracked)
            if self._reading is not None:
                self._reading.cancel()  # The reader may let the connection rest now.

    def _written(self, size: int) -> None:
        """``size`` queued bytes went out; a replay's go first."""
        self._queued -= size
        if self._exempt:
            self._exempt = max(0, self._exempt - size)

    async def _send(self, data: bytes) -> None:
        if self._fd < 0:
            await self._send_tls(memoryview(data))
            return
        view = memoryview(data)
        sock = self._stream.socket  # type: ignore[attr-defined]
        while view:
            try:
                sent = os.write(self._fd, view)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._abort()
                return
            if sent:
                view = view[sent:]
                self._written(sent)
                continue
            with trio.move_on_after(self._settings.send_timeout):
                await trio.lowlevel.wait_writable(sock)
                continue
            # Not one byte taken for send_timeout seconds: a slow consumer. The close frame
            # would sit behind what is in flight, so the close deadline will abort it.
            self._slow("socket accepted nothing")

    async def _send_tls(self, view: memoryview) -> None:
        while view:
            record = view[:_TLS_SEND_BYTES]
            with trio.move_on_after(self._settings.send_timeout) as scope:
                try:
                    await self._stream.send_all(record)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._abort()
                    return
            if scope.cancelled_caught:
                # A TLS stream whose send was cancelled is broken: no close frame can follow.
                self._slow("socket accepted nothing")
                self._abort()
                return
            view = view[_TLS_SEND_BYTES:]
            self._written(len(record))

    # -- the read side ----------------------------------------------------------------------

    async def _reader(self) -> bool:
        """Read and act until the connection ends (False) or may rest (True)."""
        parts: list[Any] = []  # The frames of a message so far: str (text) or bytes (binary).
        size = 0
        fragments = 0
        # Read-only clients' messages are read and thrown away, except on connections that
        # may refresh their token (_deliver takes the token event and drops the rest).
        keep = self.grant.can_write or self.refresh is not None
        limit = self._settings.max_message_size
        decoder = self._frames
        if decoder is None:
            decoder = self._frames = self._new_decoder()
        budget = self._budget
        parsed = 0  # Frames since the last yield to Trio.
        if self._unread:  # What settle() read while the connection rested.
            unread, self._unread = self._unread, b""
            if not self._received(decoder, unread):
                return False
        while True:
            # Frames first: the handshake may have carried some (trailing data).
            try:
                for frame in decoder.received_frames():
                    parsed += 1
                    if parsed >= _FRAMES_PER_CHECKPOINT:
                        parsed = 0
                        await trio.lowlevel.checkpoint()
                    if budget is None:
                        budget = self._inbound()
                    if not budget.take_frame(trio.current_time()):
                        self._over_budget("frames")
                        return False
                    opcode = frame.opcode
                    if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                        if self._closing:
                            continue
                        payload = frame.payload
                        size += len(payload.encode() if opcode is Opcode.TEXT else payload)
                        fragments += 1
                        if size > limit:
                            self.close(MESSAGE_TOO_BIG, "message too big")
                            continue
                        if fragments > MAX_FRAGMENTS:
                            self.close(MESSAGE_TOO_BIG, "too many fragments")
                            continue
                        if keep:
                            parts.append(payload)
                        if frame.message_finished:
                            message, parts, size, fragments = parts, [], 0, 0
                            if keep:
                                await self._deliver(_text(message, opcode))
                    elif opcode is Opcode.PING:
                        # Through offer(), so a client flooding pings whose pongs it never
                        # reads meets the same bound as any other slow reader.
                        self.offer(frames.pong(bytes(frame.payload)))
                    elif opcode is Opcode.CLOSE:
                        self._on_close(frame.payload[0])
                        return False
            except ParseFailed as exc:
                # wsproto says only "error in extension" for what the inflater refused.
                why = _INFLATE_FAILURES.get(exc.code, str(exc)) \
                    if str(exc) == "error in extension" else str(exc)
                log.info("protocol error from %s: %s", self.peer, why,
                         extra={"event": "protocol_error", "peer": self.peer})
                counters.protocol_errors += 1
                self.close(exc.code, why)
                return False
            # The wait below is the only place an idle connection sits, so it is kept lean:
            # no cancel scope unless the token expires, and on a plain socket a bare
            # wait_readable + os.read rather than the stream's layers (~1 KiB per connection).
            data = None
            waited = True
            with trio.move_on_at(self._expiry) if self._expiry < inf else _NO_DEADLINE:
                if self._fd < 0:
                    try:
                        data = await self._stream.receive_some(_RECEIVE_BYTES)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                else:
                    try:
                        data = os.read(self._fd, _RECEIVE_BYTES)
                        waited = False
                    except BlockingIOError:
                        pass  # Wait outside the handler: it would keep the exception.
                    except OSError:
                        data = b""
                    if data is None:
                        if not parts and not fragments and self._idle_now():
                            self._drop_idle_decoder()
                            return True  # Nothing to do: rest (run() returns True).
                        if self.idle is None or parts or fragments:
                            await trio.lowlevel.wait_readable(self._fd)
                            continue
                        with trio.CancelScope() as self._reading:
                            await trio.lowlevel.wait_readable(self._fd)
                        self._reading = None
                        continue
            # Checked on every pass, not only when the wait was cut: a client whose bytes never
            # let the reader wait must not outlive its token.
            if self._expiry <= trio.current_time():
                self._expiry = inf
                self.close(JWT_EXPIRED, "JWT expired")
            if data is None:  # The wait was cut by the token's exp.
                continue
            if not data:
                self._abort()
                return False
            if not self._received(decoder, data):
                return False
            if not waited:
                # The bytes were there without a wait, which is no yield: yield now, so that a
                # client that keeps its socket full cannot keep every other task from running.
                parsed = 0
                await trio.lowlevel.checkpoint()

    def _new_decoder(self) -> FrameProtocol:
        extensions = [InboundDeflate(self._settings.max_message_size)] if self._inflate else []
        return FrameProtocol(client=False, extensions=extensions)

    def _drop_idle_decoder(self) -> None:
        """Forget the frame parser when it holds nothing: no bytes of a frame, no fragmented
        message, no compression context (the client's inflater keeps one across messages)."""
        if self._frames is not None and not self._inflate and self._decoder_empty():
            self._frames = None

    def _decoder_empty(self) -> bool:
        """The frame parser holds no bytes of a frame and no fragmented message (a compression
        context it may hold is not touched by control frames)."""
        decoder = self._frames
        assert decoder is not None
        pending = decoder._frame_decoder  # wsproto's own parts: nothing else says it is empty.
        return pending.header is None and not len(pending.buffer) \
            and decoder._message_decoder.opcode is None

    def _received(self, decoder: FrameProtocol, data: bytes) -> bool:
        """Charge ``data`` to the inbound budget and hand it to the frame parser; False (the
        client closed with 1008) beyond the budget."""
        if not self._inbound().take_bytes(trio.current_time(), len(data)):
            self._over_budget("bytes")
            return False
        decoder.receive_bytes(data)
        return True

    def _inbound(self) -> InboundBudget:
        """The client's inbound budget, made at its first bytes (an idle connection has none)."""
        budget = self._budget
        if budget is None:
            budget = self._budget = self._new_budget()
        return budget

    def _new_budget(self) -> InboundBudget:
        settings = self._settings
        return InboundBudget(settings.max_client_frames_per_second,
                             settings.max_client_bytes_per_second, settings.max_message_size,
                             trio.current_time())

    def _over_budget(self, what: str) -> None:
        """Close a client that sends too fast; its reader then stops reading (no reply is
        awaited: parsing more of a flood for it would spend what the budget protects)."""
        if not self._closing:
            log.info("closing %s: it sends %s faster than its budget (1008)", self.peer, what,
                     extra={"event": "inbound_limited", "peer": self.peer})
            counters.inbound_limited += 1
        self.close(POLICY_VIOLATION, f"too many {what}")

    def _on_close(self, code: int) -> None:
        if self._closing:
            return  # The client answered our close: the handshake is complete.
        self.close(NORMAL if code in _UNSENDABLE_CLOSE_CODES else code, "")

    async def _deliver(self, text: str) -> None:
        if self.refresh is not None and text.startswith("{"):
            try:
                fields = orjson.loads(text)
            except orjson.JSONDecodeError:
                fields = None
            if isinstance(fields, dict) and fields.get("event") == "token":
                # A token refresh, never published (docs/resume.md). Each costs a signature
                # check: one a second at most, so a client cannot make the relay verify
                # tokens at its frame rate.
                now = trio.current_time()
                if now - self._refreshed_at < _REFRESH_SPACING:
                    answer = positions.token_refused_event("one token refresh a second at most")
                else:
                    self._refreshed_at = now
                    answer = self.refresh(self, fields.get("token"))
                self.offer(frames.text(answer))
                return
        if not self.grant.can_write:
            return  # A read-only client's message: read, and thrown away.
        try:
            await self._on_message(self, text)
        except MessageRefused as refused:
            self.close(refused.code, refused.reason)

    # -- the whole life ---------------------------------------------------------------------

    async def run(self) -> bool:
        """Serve the connection until it closes (False) or has nothing to do and may rest
        (True: the caller lets it rest if :meth:`can_rest` still says so, else runs it again).

        Resource handling: the stream is closed when it returns False, gracefully after a
        completed close handshake, with a TCP reset otherwise. Errors: socket errors end the
        connection and are not raised; cancellation from outside is re-raised after the socket
        is closed.
        """
        aborted = True
        rest = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.cancel_scope.deadline = self._deadline
                self._start_writer()  # For anything offered before the connection ran.
                rest = await self._reader()
                if rest:
                    # The nursery takes no task from here (its exit may yield to the hub):
                    # what is offered meanwhile stays queued, and the caller runs the
                    # connection again instead of letting it rest.
                    self._nursery = None
            aborted = nursery.cancel_scope.cancel_called
            rest = rest and not aborted
        finally:
            self._nursery = None
            if not rest:
                await self._finish(aborted)
        return rest

    def reset(self) -> None:
        """Close a plain socket at once with a reset (the relay stops while it rests)."""
        sock = self._stream.socket  # type: ignore[attr-defined]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    async def _finish(self, aborted: bool) -> None:
        if aborted and self._fd >= 0:
            log.debug("aborting the connection to %s (close handshake not completed)", self.peer)
            # Abort: a reset tells the peer at once and frees the socket without TIME_WAIT.
            with contextlib.suppress(OSError):
                self._stream.socket.setsockopt(  # type: ignore[attr-defined]
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
        await close_now(self._stream)


async def close_now(stream: trio.abc.Stream) -> None:
    """Close ``stream`` without waiting for the peer; never raises. Idempotent.

    A plain socket is closed synchronously: ``trio.aclose_forcefully`` would close it too, but
    then checkpoints in a cancelled scope, whose raised and caught ``Cancelled`` costs ~0.1 ms,
    seconds when thousands of connections end at once (bench/reliability/faults.py,
    ``sigterm-silent``).
    A TLS stream goes through ``aclose_forcefully``, which skips its close_notify.
    """
    if isinstance(stream, trio.SocketStream):
        stream.socket.close()
    else:
        await trio.aclose_forcefully(stream)


def _chunks(backlog: list[bytes]) -> Iterator[bytes]:
    """The backlog as buffers of about ``_REPLAY_CHUNK`` bytes: a replay of thousands of
    frames is a few large writes, without one copy of all of it."""
    start = 0
    size = 0
    for end, frame in enumerate(backlog, 1):
        size += len(frame)
        if size >= _REPLAY_CHUNK:
            yield backlog[start] if end - start == 1 else b"".join(backlog[start:end])
            start, size = end, 0
    if start < len(backlog):
        yield backlog[start] if len(backlog) - start == 1 else b"".join(backlog[start:])


def _text(parts: list[Any], opcode: Opcode) -> str:
    """A whole client message as text; binary messages are decoded leniently, as upstream."""
    if opcode is Opcode.TEXT:
        return "".join(parts)
    return b"".join(parts).decode("utf-8", "replace")


class ClientSettings:
    """The per-client limits, shared by all clients (one object, not one per client)."""

    __slots__ = ("close_timeout", "max_client_bytes_per_second", "max_client_frames_per_second",
                 "max_message_size", "max_queue_bytes", "send_timeout")

    def __init__(
        self, max_queue_bytes: int, send_timeout: float, close_timeout: float,
        max_message_size: int, max_client_frames_per_second: float,
        max_client_bytes_per_second: float,
    ) -> None:
        self.max_queue_bytes = max_queue_bytes
        self.send_timeout = send_timeout
        self.close_timeout = close_timeout
        self.max_message_size = max_message_size
        self.max_client_frames_per_second = max_client_frames_per_second
        self.max_client_bytes_per_second = max_client_bytes_per_second

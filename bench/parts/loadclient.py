"""One cheap load-client process for the c100k scenario: thousands of WebSocket connections
from one source address (or a few), on one epoll, without a task or an object per connection.

    python -m bench.parts.loadclient SPEC.json  (started by bench.scenarios.c100k; stdin: commands)

Theory of operation
-------------------
The process owns ``count`` client connections to ``host:port``, every one bound to the source
address ``source`` (127.0.0.x) with IP_BIND_ADDRESS_NO_PORT, so that the kernel picks the
ephemeral port at connect time for the whole 4-tuple: each source address has its own 28,232
ports (32768–60999), and several processes on several addresses hold 100,000 connections
without running out. ``sources`` (a list) spreads one process's connections over several
addresses, round robin: Linux gives connect() the ports of one parity first (14,116 of them),
and once an address holds more, each connect() scans the full half before it finds a port (at
200,000 connections over 12 addresses, 95 % of the client's time went into connect() and the
ramp fell from 3,300 to 600 handshakes/s once each address held 14,000).
Per connection it keeps a few list slots indexed by the connection's
number (socket, phase, head buffer, bytes received, deadline), never a task or an object.

Commands arrive one per line on stdin; reports leave as ``KIND JSON`` lines on stdout:

- ``go AT``: at wall-clock time ``AT`` (every process gets the same one, so the storm starts
  at one instant) connect all connections as fast as the loop can issue them, each with a
  non-blocking connect, the HTTP upgrade request once it is writable, then the response head.
  A connection ends its handshake as ``ok`` (101), ``refused`` (ECONNREFUSED, or a reset or
  EOF before the answer), ``timeout`` (no 101 within ``timeout`` s of its own connect: the
  client's timeout, not the kernel's SYN retries), ``status`` (an answer other than 101) or
  ``error`` (any other errno, by name). When every connection has an outcome: ``storm`` with
  the counts, the handshake completions per 100 ms after ``AT``, the connect → 101 times, and
  each failure's kind, errno, phase (``connect``: before the TCP connection was up; ``answer``:
  after the request was sent) and 10-second slot after ``AT``.
- ``target BYTES``: from now on, record the wall-clock time (``time.time()``, comparable
  across processes) at which each open connection's received bytes reach ``BYTES`` (frames of
  one fixed length, so bytes count frames); ``armed`` at once, and ``done`` when all have,
  with the last time.
- ``report``: ``times`` with every connection's recorded time (None: missing) and counts.
- ``stop`` (or EOF): close everything and exit.

By default it never parses frames (the server sends only text frames of the one length the run
uses, and no pings within a run), never writes after the request, and never retries a
connection. Two options of the spec serve runs that hold connections for minutes (the million
scenario):

- ``inflight``: at most this many handshakes under way at once in this process, so that a
  million connections arrive as a steady ramp the server keeps up with, not as a storm that
  times out (an outcome still comes within ``timeout`` of each connection's own start).
- ``pong``: read the server's frames and answer each ping with a pong, as browsers and every
  WebSocket library do, so the server's pings cost what they cost in production (the pong
  wakes the connection on the server). Only data frames (text, binary, continuation) count
  towards ``target``'s bytes, so pings do not disturb the count.

``progress`` (a command) reports the outcomes so far (``progress`` line), for a ramp that lasts
minutes.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import select
import socket
import sys
import time
from typing import Any

#: Linux's IP_BIND_ADDRESS_NO_PORT (not in the socket module): bind() takes the address only,
#: and the port is chosen at connect() for the 4-tuple, so a source address's ports are not
#: spent at bind time.
IP_BIND_ADDRESS_NO_PORT = 24
#: Connects issued between two looks at the epoll during the storm: large enough that the
#: storm is a storm, small enough that answers are read (and timed) while it goes on.
CONNECTS_PER_PASS = 256
#: Width of one bin of the handshake-rate histogram, in seconds.
BIN = 0.1
#: Receive size per read: a burst of 100 frames of ~344 bytes to one connection fits.
READ_SIZE = 1 << 16
#: Small receive buffer per client: the kernel's default (128 KiB, autotuned up) times 100,000
#: connections is more memory than the loopback needs to keep pace.
RCVBUF = 65536
#: A pong's header with a zero masking key (RFC 6455 5.3: every client frame is masked; the key
#: protects intermediaries from chosen bytes, which a load client's pong of the server's own
#: payload does not need): the payload is sent as it came.
PONG_HEADER = bytes([0x8A])
ZERO_MASK = b"\0\0\0\0"

CONNECTING, SENT, OPEN, FAILED = 0, 1, 2, 3


def _emit(kind: str, body: Any) -> None:
    sys.stdout.write(f"{kind} {json.dumps(body)}\n")
    sys.stdout.flush()


def main(spec_path: str) -> int:
    with open(spec_path) as handle:
        spec = json.load(handle)
    count: int = spec["count"]
    host, port = spec["host"], spec["port"]
    sources: list[str] = spec.get("sources") or [spec["source"]]
    timeout: float = spec["timeout"]
    key = base64.b64encode(os.urandom(16)).decode()
    paths: list[str] | None = spec.get("paths")  # One per connection, or one for all.
    inflight: int = spec.get("inflight") or count or 1
    pong: bool = bool(spec.get("pong"))
    pongs = 0

    def request(slot: int) -> bytes:
        path = paths[slot] if paths is not None else spec["path"]
        return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n").encode()

    socks: list[socket.socket | None] = [None] * count
    phase = [CONNECTING] * count
    head = [b""] * count
    got = [0] * count
    started = [0.0] * count
    reached: list[float | None] = [None] * count
    slot_of: dict[int, int] = {}
    outcomes = {"ok": 0, "refused": 0, "timeout": 0, "status": 0, "error": 0}
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}
    bins: dict[int, int] = {}
    handshake_ms: list[float] = []
    poller = select.epoll(count + 16)
    poller.register(sys.stdin.fileno(), select.EPOLLIN)
    stdin_fd = sys.stdin.fileno()

    _emit("ready", {"count": count, "sources": sources})
    at = 0.0
    target = 0
    waiting = 0
    storm_reported = False
    issued = 0
    pending = 0  # Connections issued without an outcome yet.
    commands = b""
    stopping = False

    def _drop(slot: int) -> None:
        sock = socks[slot]
        if sock is not None:
            slot_of.pop(sock.fileno(), None)
            with contextlib.suppress(OSError):
                poller.unregister(sock.fileno())
            sock.close()
            socks[slot] = None

    def fail(slot: int, kind: str, detail: str | None = None) -> None:
        nonlocal pending
        _drop(slot)
        was = "connect" if phase[slot] == CONNECTING else "answer"
        phase[slot] = FAILED
        outcomes[kind] += 1
        if kind == "status" and detail:
            statuses[detail] = statuses.get(detail, 0) + 1
        else:
            # What failed, in which phase, and when: "refused ECONNRESET answer 40s".
            name = f"{kind} {detail or '-'} {was} {int(time.time() - at) // 10 * 10}s"
            errors[name] = errors.get(name, 0) + 1
        pending -= 1

    def received(slot: int, size: int, now: float) -> None:
        nonlocal waiting
        before = got[slot]
        got[slot] = before + size
        if target and before < target <= got[slot]:
            reached[slot] = now
            waiting -= 1
            if waiting == 0:
                _emit("done", {"at": now})

    def on_event(fd: int, mask: int, now: float) -> None:
        nonlocal pending
        slot = slot_of.get(fd)
        if slot is None:
            return
        sock = socks[slot]
        assert sock is not None
        state = phase[slot]
        if state == CONNECTING:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                fail(slot, "refused" if code in (errno.ECONNREFUSED, errno.ECONNRESET)
                     else "error", errno.errorcode.get(code, str(code)))
                return
            try:
                sock.send(request(slot))
            except OSError as exc:
                fail(slot, "refused" if exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET,
                                                      errno.EPIPE) else "error",
                     errno.errorcode.get(exc.errno or 0, str(exc)))
                return
            phase[slot] = SENT
            poller.modify(fd, select.EPOLLIN)
            return
        try:
            data = sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if state == SENT:
                fail(slot, "refused" if exc.errno in (errno.ECONNRESET, errno.ECONNREFUSED)
                     else "error", errno.errorcode.get(exc.errno or 0, str(exc)))
            else:
                _close_open(slot)
            return
        if not data:
            if state == SENT:
                fail(slot, "refused", "EOF")
            else:
                _close_open(slot)
            return
        if state == OPEN and pong:
            frames(slot, sock, head[slot] + data if head[slot] else data, now)
            return
        if state == SENT:
            buffer = head[slot] + data
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                head[slot] = buffer
                return
            head[slot] = b""
            line = buffer.split(b"\r\n", 1)[0]
            if not line.startswith(b"HTTP/1.1 101"):
                fail(slot, "status", line[9:12].decode(errors="replace"))
                return
            phase[slot] = OPEN
            outcomes["ok"] += 1
            pending -= 1
            bins[int((now - at) / BIN)] = bins.get(int((now - at) / BIN), 0) + 1
            handshake_ms.append(round(1000 * (now - started[slot]), 2))
            rest = len(buffer) - end - 4
            if rest and pong:
                frames(slot, sock, buffer[end + 4:], now)
            elif rest:
                received(slot, rest, now)
            return
        received(slot, len(data), now)

    def frames(slot: int, sock: socket.socket, buffer: bytes, now: float) -> None:
        """Count the data frames' bytes in ``buffer``, answer its pings, keep a partial frame."""
        nonlocal pongs
        at_byte, counted, size = 0, 0, len(buffer)
        while size - at_byte >= 2:
            length, header = buffer[at_byte + 1] & 0x7F, 2
            if length == 126:
                if size - at_byte < 4:
                    break
                length, header = int.from_bytes(buffer[at_byte + 2:at_byte + 4], "big"), 4
            elif length == 127:
                if size - at_byte < 10:
                    break
                length, header = int.from_bytes(buffer[at_byte + 2:at_byte + 10], "big"), 10
            if size - at_byte < header + length:
                break
            opcode = buffer[at_byte] & 0x0F
            if opcode == 0x9:  # A ping (≤ 125 bytes): the pong carries its payload back.
                body = buffer[at_byte + header:at_byte + header + length]
                with contextlib.suppress(OSError):
                    sock.send(PONG_HEADER + bytes([0x80 | length]) + ZERO_MASK + body)
                    pongs += 1
            elif opcode in (0x0, 0x1, 0x2):
                counted += header + length
            at_byte += header + length
        head[slot] = buffer[at_byte:]
        if counted:
            received(slot, counted, now)

    def _close_open(slot: int) -> None:
        """The server closed an open connection: it stays counted, but receives nothing."""
        _drop(slot)

    def connect(slot: int) -> None:
        nonlocal pending
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        started[slot] = time.time()
        pending += 1
        socks[slot] = sock
        try:
            sock.bind((sources[slot % len(sources)], 0))
            code = sock.connect_ex((host, port))
        except OSError as exc:
            code = exc.errno or -1
        if code not in (0, errno.EINPROGRESS):
            phase[slot] = CONNECTING
            sock.close()
            socks[slot] = None
            phase[slot] = FAILED
            pending -= 1
            kind = "refused" if code == errno.ECONNREFUSED else "error"
            outcomes[kind] += 1
            if kind == "error":
                name = errno.errorcode.get(code, str(code))
                errors[name] = errors.get(name, 0) + 1
            return
        slot_of[sock.fileno()] = slot
        poller.register(sock.fileno(), select.EPOLLOUT)

    def sweep(now: float) -> None:
        for slot in range(issued):
            if phase[slot] in (CONNECTING, SENT) and now - started[slot] > timeout:
                fail(slot, "timeout")

    last_sweep = 0.0
    while not stopping:
        if at and issued < count and time.time() >= at and pending < inflight:
            for _ in range(min(CONNECTS_PER_PASS, count - issued, inflight - pending)):
                connect(issued)
                issued += 1
            wait = 0.0
        elif at and issued < count and time.time() < at:
            wait = max(0.0, min(0.2, at - time.time()))
        else:
            wait = 0.2
        for fd, mask in poller.poll(wait):
            if fd == stdin_fd:
                chunk = os.read(stdin_fd, 4096)
                if not chunk:
                    stopping = True
                    break
                commands += chunk
                while b"\n" in commands:
                    line, commands = commands.split(b"\n", 1)
                    word, _, argument = line.decode().strip().partition(" ")
                    if word == "go":
                        at = float(argument)
                    elif word == "target":
                        target = int(argument)
                        now = time.time()
                        waiting = 0
                        for slot in range(count):
                            if phase[slot] == OPEN and socks[slot] is not None:
                                if got[slot] >= target:
                                    reached[slot] = reached[slot] or now
                                else:
                                    reached[slot] = None
                                    waiting += 1
                        _emit("armed", {"waiting": waiting})
                        if waiting == 0:
                            _emit("done", {"at": now})
                    elif word == "report":
                        open_now = sum(1 for s in socks if s is not None)
                        _emit("times", {"times": [reached[s] for s in range(count)
                                                  if phase[s] == OPEN],
                                        "open": open_now,
                                        "closed_by_server": outcomes["ok"] - open_now,
                                        "bytes": sum(got)})
                    elif word == "progress":
                        _emit("progress", {"outcomes": outcomes, "pending": pending,
                                           "issued": issued, "pongs": pongs,
                                           "open": sum(1 for s in socks if s is not None)})
                    elif word == "stop":
                        stopping = True
                continue
            on_event(fd, mask, time.time())
        now = time.time()
        if at and now - last_sweep > 0.5:
            last_sweep = now
            sweep(now)
        if at and issued == count and pending == 0 and not storm_reported:
            storm_reported = True
            _emit("storm", {"outcomes": outcomes, "errors": errors, "statuses": statuses,
                            "bins": bins, "handshake_ms": handshake_ms,
                            "last_issue": started[count - 1] if count else at})
    for sock in socks:
        if sock is not None:
            sock.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.parts.loadclient SPEC.json "
                 "(started by bench.scenarios.c100k)")
    sys.exit(main(sys.argv[1]))

"""The ceiling: plain Trio sockets writing pre-framed bytes, no WebSocket or HTTP library.

No token check, no HTTP or WebSocket parsing beyond the handshake, no limits, no pings, no
slow-consumer rule: only what this relay's design must do per notification (route, frame once,
one non-blocking write per subscriber per wake-up, the rest queued for a per-connection sender).
It shows how close pgws-relay comes to its own design's limit. A benchmark peer, not part of
the product.
"""

import base64
import contextlib
import hashlib
import json
import os

import psycopg
import trio

LISTEN = os.environ["LISTEN_CHANNEL"]
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
subscribers: dict[str, set] = {}


class Conn:
    __slots__ = ("backlog", "busy", "fd", "wake")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.backlog: list[bytes] = []
        self.busy = False
        self.wake = trio.Event()

    def offer(self, blob: bytes) -> None:
        if not self.backlog and not self.busy:
            try:
                sent = os.write(self.fd, blob)
            except BlockingIOError:
                sent = 0
            except OSError:
                return
            if sent == len(blob):
                return
            blob = blob[sent:]
        self.backlog.append(blob)
        self.wake.set()

    async def sender(self, stream: trio.SocketStream) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            self.busy = True
            while self.backlog:
                data = b"".join(self.backlog)
                self.backlog.clear()
                view = memoryview(data)
                while view:
                    try:
                        view = view[os.write(self.fd, view):]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(stream.socket)
                    except OSError:
                        return  # The client is gone; its handler ends the connection.
            self.busy = False


def frame(payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload


async def handle(stream: trio.SocketStream) -> None:
    head = b""
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some(4096)
        if not data:
            return
        head += data
    lines = head.split(b"\r\n")
    path = lines[0].split(b" ")[1].decode()
    key = next(line.split(b":", 1)[1].strip() for line in lines
               if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    parts = path.split("?")[0].lstrip("/").split("/")
    channel = parts[0] if len(parts) > 1 else LISTEN
    conn = Conn(stream.socket.fileno())
    subscribers.setdefault(channel, set()).add(conn)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.sender, stream)
            with contextlib.suppress(trio.BrokenResourceError):
                while await stream.receive_some(4096):
                    pass
            nursery.cancel_scope.cancel()
    finally:
        subscribers[channel].discard(conn)


async def listen() -> None:
    conn = await trio.to_thread.run_sync(
        lambda: psycopg.connect(os.environ["DB_URI"], autocommit=True))
    conn.execute(f'LISTEN "{LISTEN}"')
    print("READY", flush=True)
    pgconn = conn.pgconn
    while True:
        await trio.lowlevel.wait_readable(pgconn.socket)
        pgconn.consume_input()
        groups: dict[str, list[bytes]] = {}
        while (notify := pgconn.notifies()) is not None:
            try:
                channel = json.loads(notify.extra).get("channel", LISTEN)
            except ValueError:
                channel = LISTEN
            groups.setdefault(channel, []).append(frame(notify.extra))
        for channel, frames in groups.items():
            blob = b"".join(frames)
            for conn in subscribers.get(channel, ()):
                conn.offer(blob)


async def main() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        await trio.serve_tcp(handle, int(os.environ["PORT"]), host="127.0.0.1")


if __name__ == "__main__":
    trio.run(main)

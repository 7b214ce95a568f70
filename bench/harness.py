"""The benchmark's moving parts: servers under test, load-client processes, the producer.

Everything runs on this machine and talks over loopback only. Every wait is bounded.

- :class:`Server` starts one of :data:`SERVERS` (pgws-relay or a peer) as a subprocess on a
  given port and waits until it LISTENs; it reads the process's CPU time and memory.
- :func:`run_clients` spreads connections over several client processes (plain non-blocking
  sockets, no WebSocket library, so the client side stays cheap). Each connection either
  counts frames, counts and samples latency from the timestamp at the start of each payload,
  or stalls (never reads).
- :class:`Producer` sends NOTIFYs through PostgreSQL, in bursts of transactions or at a rate.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import jwt
import psycopg

HERE = os.path.dirname(os.path.abspath(__file__))
DB_URI = os.environ.get("PGWS_BENCH_DB_URI", "postgresql://postgres@127.0.0.1:5432/postgres")
SECRET = "benchbenchbenchbenchbenchbenchbe"
#: The listen channel, private to this run: two benchmarks (or a benchmark and the test suite's
#: smoke test) on one database must not receive each other's notifications.
LISTEN = f"pgws_bench_{os.getpid()}"
TIMEOUT = 120.0
#: Payloads start with the send time, so a client finds it at a fixed offset in every frame.
_TS_PREFIX = '{"ts":'
_TS_DIGITS = 17  # 1764000000.123456
#: An Econia fill_event row (econia.md 2.3), trimmed so that a whole payload is ~300 bytes.
FILL_BODY = ('{"txn_version":154106900,"event_idx":%d,"time":"2024-01-02T03:04:05.123456+00:00",'
             '"maker_address":"0xaa","maker_order_id":18446744073709551616000001,'
             '"maker_side":true,"market_id":7,"price":12345,"size":100,"taker_address":"0xbb",'
             '"taker_order_id":99}')


def payload(channel: str, n: int, size: int) -> str:
    """A ``size``-byte JSON payload for ``channel``: send time first, then a fill_event body."""
    text = (f'{_TS_PREFIX}{time.time():.6f}, "channel" : "{channel}", '
            f'"payload" : {FILL_BODY % n}')
    pad = size - len(text) - len(', "pad":""}')
    if pad < 0:
        raise ValueError(f"payload for {channel!r} does not fit in {size} bytes")
    return text + ', "pad":"' + "x" * pad + '"}'


def frame_length(size: int) -> int:
    return size + (2 if size < 126 else 4 if size < 65536 else 10)


def token(claims: dict[str, Any] | None = None) -> str:
    return jwt.encode(claims or {"mode": "r"}, SECRET, algorithm="HS256")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- servers --------------------------------------------------------------------------------

def _relay_command(port: int, extra: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    env = {"PGWS_DB_URI": DB_URI, "PGWS_JWT_SECRET": SECRET, "PGWS_HOST": "127.0.0.1",
           "PGWS_PORT": str(port), "PGWS_LISTEN_CHANNEL": LISTEN, "PGWS_LOG_LEVEL": "INFO",
           "PGWS_PING_INTERVAL": "3600", **extra}
    return [os.path.join(os.path.dirname(sys.executable), "pgws-relay")], env


def _peer_env(port: int) -> dict[str, str]:
    return {"PORT": str(port), "DB_URI": DB_URI, "SECRET": SECRET, "LISTEN_CHANNEL": LISTEN}


SERVERS: dict[str, str] = {
    "relay": "pgws-relay",
    "websockets": "websockets asyncio server + broadcast() (Python)",
    "node": "Node.js ws + pg",
    "ceiling": "plain Trio sockets, pre-framed bytes (design ceiling)",
}


class Server:
    """One server under test, on ``port``, LISTENing on :data:`LISTEN`."""

    def __init__(self, name: str, port: int, extra_env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = port
        extra = extra_env or {}
        #: How many "ready" lines to wait for: one per worker process.
        self._expected_ready = int(extra.get("PGWS_WORKERS", "1"))
        if name == "relay":
            command, env = _relay_command(port, extra)
            ready = "listening on channel"
        elif name == "websockets":
            command, env = [sys.executable, os.path.join(HERE, "peers", "websockets_relay.py")], \
                _peer_env(port)
            ready = "READY"
        elif name == "node":
            node_dir = os.path.join(HERE, "peers", "node")
            if not os.path.isdir(os.path.join(node_dir, "node_modules")):
                raise RuntimeError("the Node peer is not installed: run bench/setup.sh")
            command, env = ["node", os.path.join(node_dir, "relay.js")], _peer_env(port)
            ready = "READY"
        elif name == "ceiling":
            command, env = [sys.executable, os.path.join(HERE, "peers", "trio_ceiling.py")], \
                _peer_env(port)
            ready = "READY"
        else:
            raise ValueError(f"unknown server {name!r}; known: {', '.join(SERVERS)}")
        self.proc = subprocess.Popen(command, env={**os.environ, **env},
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._ready_seen = 0
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not self._ready.wait(30):
            self.stop()
            raise RuntimeError(f"{name} did not become ready:\n" + "\n".join(self.lines[-20:]))

    def _read(self, ready: str) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if ready in line:
                self._ready_seen += 1
                if self._ready_seen >= self._expected_ready:
                    self._ready.set()

    def _pids(self) -> list[int]:
        """The server's process and its children (worker processes)."""
        pids = [self.proc.pid]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        if int(handle.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                            pids.append(int(entry))
                except (OSError, IndexError, ValueError):
                    continue
        return pids

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self._pids():
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def memory_kib(self, field: str = "VmRSS") -> int:
        total = 0
        for pid in self._pids():
            try:
                with open(f"/proc/{pid}/status") as handle:
                    for line in handle:
                        if line.startswith(field + ":"):
                            total += int(line.split()[1])
            except OSError:
                continue
        return total

    def stats(self, timeout: float = 10.0) -> dict[str, int]:
        """pgws-relay's ``stats:`` line (asked for with SIGUSR1), as a dict."""
        start = len(self.lines)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                if "stats: " in line:
                    return {name: int(value) for name, value in
                            (field.split("=") for field in line.split("stats: ", 1)[1].split())}
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} wrote no stats line within {timeout} s")

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for line in self.lines if regex.search(line))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)


# -- load clients ---------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """What one client process does: connections (path, role) and when to stop."""

    port: int
    #: (path, role, frames expected or None: read until told to stop); role is "count",
    #: "sample" (count and measure latency) or "stall" (never read).
    connections: list[tuple[str, str, int | None]]
    size: int  # every payload of a run has this many bytes, so frames have one length
    timeout: float = TIMEOUT


def handshake(port: int, path: str, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    sock.setblocking(False)
    return sock


def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, masked: bool = True,
          mask: bytes | None = None, true_mask: bytes | None = None) -> bytes:
    """A client frame. ``true_mask``: mask the payload with this key, not the one announced."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    size = len(payload)
    bit = 0x80 if masked else 0
    if size < 126:
        head += bytes([bit | size])
    elif size < 65536:
        head += bytes([bit | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = mask or os.urandom(4)
    key = true_mask or mask
    return head + mask + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def recv_ready(sock: socket.socket) -> bytes | None:
    """What a ready socket has: bytes, b"" when the server closed or reset it, None if nothing."""
    try:
        return sock.recv(1 << 20)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _timestamps(buffer: bytearray, size: int, frames: int) -> list[float]:
    frame_len = frame_length(size)
    start = frame_len - size + len(_TS_PREFIX)
    return [float(buffer[i * frame_len + start:i * frame_len + start + _TS_DIGITS])
            for i in range(frames)]


def _client(plan: Plan, ready: Any, go: Any, stop: Any, results: Any) -> None:
    try:
        socks = [(handshake(plan.port, path, 4096 if role == "stall" else None), role,
                  expected) for path, role, expected in plan.connections]
    except OSError as exc:
        ready.put(f"error: {exc}")
        return
    selector = selectors.DefaultSelector()
    state: dict[socket.socket, list[Any]] = {}
    for sock, role, expected in socks:
        if role != "stall":
            selector.register(sock, selectors.EVENT_READ)
            # frames, unparsed rest, samples latency, closed by the server, frames expected
            state[sock] = [0, bytearray(), role == "sample", False, expected]
    ready.put("ok")
    go.wait()
    latencies: list[float] = []
    frame_len = frame_length(plan.size)
    open_readers = len(state)
    deadline = time.monotonic() + plan.timeout
    last = time.time()
    while open_readers and time.monotonic() < deadline and not stop.is_set():
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            entry = state[sock]
            data = recv_ready(sock)
            if data is None:
                continue
            now = time.time()
            if not data:
                selector.unregister(sock)
                entry[3] = True
                open_readers -= 1
                continue
            buffer = entry[1]
            buffer += data
            whole = len(buffer) // frame_len
            if whole:
                if entry[2]:
                    latencies.extend(now - ts for ts in _timestamps(buffer, plan.size, whole))
                del buffer[:whole * frame_len]
                entry[0] += whole
                last = now
            if entry[4] is not None and entry[0] >= entry[4]:
                selector.unregister(sock)
                open_readers -= 1
    received = sum(entry[0] for entry in state.values())
    closed = sum(1 for entry in state.values() if entry[3])
    stalled_closed = closed_count([sock for sock, role, _ in socks if role == "stall"])
    results.put({"received": received, "last": last, "latencies": latencies,
                 "closed": closed, "stalled_closed": stalled_closed,
                 "per_connection": [entry[0] for entry in state.values()]})
    for sock, _, _ in socks:
        sock.close()


def _has_close_frame(data: bytes) -> bool:
    """Walk server frames from the start of a stream: is one of them a close frame?"""
    offset = 0
    while offset + 2 <= len(data):
        if data[offset] & 0x0F == 0x8:
            return True
        size, header = data[offset + 1] & 0x7F, 2
        if size == 126:
            size, header = int.from_bytes(data[offset + 2:offset + 4], "big"), 4
        elif size == 127:
            size, header = int.from_bytes(data[offset + 2:offset + 10], "big"), 10
        offset += header + size
    return False


def closed_count(socks: list[socket.socket], wait: float = 8.0) -> int:
    """Read stalled sockets at last: how many did the server close (close frame, EOF, reset)?

    Waits up to ``wait`` seconds: a server sends what it still had in flight first.
    """
    received = {sock: bytearray() for sock in socks}
    closed: set[socket.socket] = set()
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + wait
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            chunk = recv_ready(sock)
            if chunk is None:
                continue
            if chunk:
                received[sock] += chunk
            if not chunk or _has_close_frame(received[sock]):
                closed.add(sock)
                selector.unregister(sock)
    return len(closed)


class Clients:
    """Client processes holding ``connections`` spread over ``procs`` processes."""

    def __init__(self, port: int, connections: Sequence[tuple[str, str, int | None]], size: int,
                 procs: int = 2, timeout: float = TIMEOUT) -> None:
        ctx = mp.get_context("fork")
        self._ready, self._results = ctx.Queue(), ctx.Queue()
        self._go, self._stop = ctx.Event(), ctx.Event()
        # Connections that sample latency get a process of their own: reading a few sockets,
        # it takes each frame as it arrives, so what it measures is the server's delivery and
        # not its place in a busy client's loop over hundreds of sockets.
        samplers = [c for c in connections if c[1] == "sample"]
        others = [c for c in connections if c[1] != "sample"]
        shares = [others[i::procs] for i in range(procs)] + [samplers]
        self._procs = [ctx.Process(target=_client, daemon=True, args=(
            Plan(port, share, size, timeout), self._ready, self._go,
            self._stop, self._results)) for share in shares if share]
        for proc in self._procs:
            proc.start()
        errors = [msg for msg in (self._ready.get(timeout=300) for _ in self._procs)
                  if msg != "ok"]
        if errors:
            self.close()
            raise RuntimeError("; ".join(errors))

    def start(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._stop.set()

    def results(self, timeout: float = TIMEOUT + 60) -> list[dict[str, Any]]:
        outcomes = [self._results.get(timeout=timeout) for _ in self._procs]
        return outcomes

    def close(self) -> None:
        """Stop every client process (collecting results nobody asked for, so they can exit)."""
        self._stop.set()
        self._go.set()
        while True:
            try:
                self._results.get(timeout=0.5)
            except Exception:
                break
        for proc in self._procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


# -- producer -------------------------------------------------------------------------------

class Producer:
    """NOTIFYs on :data:`LISTEN` through one PostgreSQL connection."""

    def __init__(self) -> None:
        self._db = psycopg.connect(DB_URI, autocommit=False)

    def burst(self, channels: Sequence[str], messages: int, batch: int, size: int) -> float:
        """Send ``messages`` payloads round-robin over ``channels`` in transactions of
        ``batch``; return when the first transaction was committed."""
        first_commit = 0.0
        for start in range(0, messages, batch):
            texts = [payload(channels[n % len(channels)], n, size)
                     for n in range(start, min(start + batch, messages))]
            # One statement per transaction, so the producer is never what limits a run; the
            # NOTIFYs are queued in unnest's order and delivered at commit.
            self._db.execute("SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS t(p)",
                             (LISTEN, texts))
            self._db.commit()
            if not first_commit:
                first_commit = time.time()
        return first_commit

    def steady(self, channels: Sequence[str], rate: float, seconds: float, size: int) -> int:
        """One NOTIFY per transaction at ``rate`` per second for ``seconds``; return the count."""
        interval = 1.0 / rate
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < seconds:
            delay = start + sent * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._db.execute("SELECT pg_notify(%s, %s)",
                             (LISTEN, payload(channels[sent % len(channels)], sent, size)))
            self._db.commit()
            sent += 1
        return sent

    def close(self) -> None:
        self._db.close()


def commit() -> str:
    """The checked-out commit, so that every result names the code it measured."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine() -> dict[str, Any]:
    """What the results were measured on."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or
            platform.machine()}


class QueueUsage:
    """The highest ``pg_notification_queue_usage()`` seen while in use (sampled every 50 ms):
    near 0 means every listener keeps up; PostgreSQL fails NOTIFYs when it reaches 1."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        with psycopg.connect(DB_URI, autocommit=True) as db:
            while not self._stop.wait(0.05):
                row = db.execute("SELECT pg_notification_queue_usage()").fetchone()
                self.peak = max(self.peak, float(row[0]) if row else 0.0)

    def __enter__(self) -> QueueUsage:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def dumps(result: Any) -> str:
    return json.dumps(result, indent=2, sort_keys=True)

"""The benchmark's moving parts: servers under test, load-client processes, the producer.

Everything runs on this machine and talks over loopback only. Every wait is bounded.

- :class:`Server` starts one of :data:`SERVERS` (pgws-relay or a peer) as a subprocess on a
  given port and waits until it LISTENs; it reads the process's CPU time and memory.
- :func:`run_clients` spreads connections over several client processes (plain non-blocking
  sockets, no WebSocket library, so the client side stays cheap). Each connection either
  counts frames, counts and samples latency from the timestamp at the start of each payload,
  or stalls (never reads).
- :class:`Producer` sends NOTIFYs through PostgreSQL, in bursts of transactions or at a rate.
- :class:`FrameClients` (for ``compression.py`` and ``filters.py``): client *subprocesses*
  (``python -m bench.parts.harness frame-client SPEC``, optionally behind a command prefix such as
  ``ip netns exec NS``) that parse each frame's header, so frames may have any length and may
  be permessage-deflate compressed; they count frames and bytes, and on chosen connections
  inflate every message and check it (:class:`Conn`). :class:`EconiaFeed` makes notification
  texts as Econia's triggers write them.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import hashlib
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from typing import Any

import jwt
import psycopg

from bench.parts.paths import module_command, module_env

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


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: all held at once while they are picked, so that no two
    are the same (one at a time, 60 picks for 30 relays collided in about one run in twenty,
    and a relay that cannot bind exits 1)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


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
    "bun": "Bun.serve's WebSocket server (uWebSockets) with its topic pub/sub + pg",
    "ceiling": "plain Trio sockets, pre-framed bytes (design ceiling)",
}


class Server:
    """One server under test, on ``port``, LISTENing on :data:`LISTEN`."""

    def __init__(self, name: str, port: int, extra_env: dict[str, str] | None = None,
                 ready_timeout: float = 30.0) -> None:
        self.name = name
        self.port = port
        extra = extra_env or {}
        #: How many "ready" lines to wait for: one per worker process.
        self._expected_ready = int(extra.get("PGWS_WORKERS", "1"))
        if name == "relay":
            command, env = _relay_command(port, extra)
            ready = "listening on channel"
        elif name == "websockets":
            command, env = module_command("bench.parts.peers.websockets_relay"), \
                module_env(_peer_env(port))
            ready = "READY"
        elif name == "node":
            node_dir = os.path.join(HERE, "peers", "node")
            if not os.path.isdir(os.path.join(node_dir, "node_modules")):
                raise RuntimeError("the Node peer is not installed: run bash bench/setup.sh")
            command, env = ["node", os.path.join(node_dir, "relay.js")], _peer_env(port)
            ready = "READY"
        elif name == "bun":
            bun_dir = os.path.join(HERE, "peers", "bun")
            binary = os.path.join(bun_dir, "node_modules", ".bin", "bun")
            if not os.path.exists(binary):
                raise RuntimeError("the Bun peer is not installed: run bash bench/setup.sh")
            command, env = [binary, os.path.join(bun_dir, "relay.js")], _peer_env(port)
            ready = "READY"
        elif name == "ceiling":
            command, env = module_command("bench.parts.peers.trio_ceiling"), \
                module_env(_peer_env(port))
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
        if not self._ready.wait(ready_timeout):
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
    #: Niceness added to the client process (``nice``): with 19 the server under test gets
    #: the cores first, so a scaling figure shows the server, not the clients' share of them.
    nice: int = 0


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
    if plan.nice:
        os.nice(plan.nice)
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
                 procs: int = 2, timeout: float = TIMEOUT, nice: int = 0) -> None:
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
            Plan(port, share, size, timeout, nice), self._ready, self._go,
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

    def send(self, texts: Sequence[str], batch: int) -> tuple[float, float]:
        """Send ``texts`` as they are, in order, in transactions of ``batch`` (one statement
        each, as :meth:`burst`); return the times of the first and the last commit."""
        first_commit = last_commit = 0.0
        for start in range(0, len(texts), batch):
            self._db.execute("SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS t(p)",
                             (LISTEN, list(texts[start:start + batch])))
            self._db.commit()
            last_commit = time.time()
            if not first_commit:
                first_commit = last_commit
        return first_commit, last_commit

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


class OwnedServer(Server):
    """A :class:`Server` that also stops its process when its start is interrupted (Ctrl-C or
    a signal while it waits for the ready line), so that no server outlives the script."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            if getattr(self, "proc", None) is not None:
                self.stop()
            raise


# -- Econia notification texts --------------------------------------------------------------

#: Column order and PostgreSQL type of each Econia table a trigger sends (econia.md 2.4): the
#: key order of the row in the notification is the table's column order.
ECONIA_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "fill_event": (
        ("txn_version", "numeric"), ("event_idx", "numeric"), ("emit_address", "varchar"),
        ("time", "timestamptz"), ("maker_address", "varchar"), ("maker_custodian_id", "numeric"),
        ("maker_order_id", "numeric"), ("maker_side", "boolean"), ("market_id", "numeric"),
        ("price", "numeric"), ("sequence_number_for_trade", "numeric"), ("size", "numeric"),
        ("taker_address", "varchar"), ("taker_custodian_id", "numeric"),
        ("taker_order_id", "numeric"), ("taker_quote_fees_paid", "numeric")),
    "place_limit_order_event": (
        ("txn_version", "numeric"), ("event_idx", "numeric"), ("time", "timestamptz"),
        ("market_id", "numeric"), ("user", "varchar"), ("custodian_id", "numeric"),
        ("order_id", "numeric"), ("side", "boolean"), ("integrator", "varchar"),
        ("initial_size", "numeric"), ("price", "numeric"), ("restriction", "smallint"),
        ("self_match_behavior", "smallint"), ("size", "numeric")),
    "place_market_order_event": (
        ("txn_version", "numeric"), ("event_idx", "numeric"), ("market_id", "numeric"),
        ("time", "timestamptz"), ("order_id", "numeric"), ("user", "varchar"),
        ("custodian_id", "numeric"), ("integrator", "varchar"), ("direction", "boolean"),
        ("size", "numeric"), ("self_match_behavior", "smallint")),
    "place_swap_order_event": (
        ("txn_version", "numeric"), ("event_idx", "numeric"), ("market_id", "numeric"),
        ("time", "timestamptz"), ("order_id", "numeric"), ("signing_account", "varchar"),
        ("integrator", "varchar"), ("direction", "boolean"), ("min_base", "numeric"),
        ("max_base", "numeric"), ("min_quote", "numeric"), ("max_quote", "numeric"),
        ("limit_price", "numeric")),
    "change_order_size_event": (
        ("txn_version", "numeric"), ("event_idx", "numeric"), ("market_id", "numeric"),
        ("time", "timestamptz"), ("order_id", "numeric"), ("user", "varchar"),
        ("custodian_id", "numeric"), ("side", "boolean"), ("new_size", "numeric")),
    "cancel_order_event": (
        ("txn_version", "numeric"), ("event_idx", "numeric"), ("time", "timestamptz"),
        ("market_id", "numeric"), ("user", "varchar"), ("custodian_id", "numeric"),
        ("order_id", "numeric"), ("reason", "smallint")),
    "market_registration_event": (
        ("txn_version", "numeric"), ("event_idx", "numeric"), ("market_id", "numeric"),
        ("time", "timestamptz"), ("base_account_address", "varchar"),
        ("base_module_name", "text"), ("base_struct_name", "text"),
        ("base_name_generic", "text"), ("quote_account_address", "varchar"),
        ("quote_module_name", "text"), ("quote_struct_name", "text"), ("lot_size", "numeric"),
        ("tick_size", "numeric"), ("min_size", "numeric"), ("underwriter_id", "numeric")),
    "recognized_market_event": (
        ("txn_version", "numeric"), ("event_idx", "numeric"), ("time", "timestamptz"),
        ("base_account_address", "varchar"), ("base_module_name", "text"),
        ("base_struct_name", "text"), ("base_name_generic", "text"),
        ("quote_account_address", "varchar"), ("quote_module_name", "text"),
        ("quote_struct_name", "text"), ("market_id", "numeric"), ("lot_size", "numeric"),
        ("tick_size", "numeric"), ("min_size", "numeric"), ("underwriter_id", "numeric")),
    # aggregator.user_history; its enums render as strings, as text does.
    "updated_limit_order": (
        ("market_id", "numeric"), ("order_id", "numeric"), ("created_at", "timestamptz"),
        ("last_updated_at", "timestamptz"), ("integrator", "text"),
        ("total_filled", "numeric"), ("remaining_size", "numeric"), ("order_status", "text"),
        ("order_type", "text"), ("user", "text"), ("direction", "text"), ("price", "numeric"),
        ("average_execution_price", "numeric"), ("custodian_id", "numeric"),
        ("self_match_behavior", "smallint"), ("restriction", "smallint"),
        ("last_increase_stamp", "numeric"), ("min_base", "numeric"), ("max_base", "numeric"),
        ("min_quote", "numeric"), ("max_quote", "numeric"),
        ("total_fees_paid_in_quote_subunits", "numeric")),
}

_U64_MAX = (1 << 64) - 1
#: A quote coin as Econia's markets have them (LayerZero USDC on Aptos).
_QUOTE = ("0xf22bede237a07e121b56d91a491eb7bcdfd1f5907926a9e58338f964a01b17fa", "asset", "USDC")


def pg_time(seconds: float) -> str:
    """A UTC timestamptz as PostgreSQL writes it into JSON: ISO 8601 with ``T``, the fraction
    without trailing zeros (none when zero), ``+00:00``."""
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    fraction = f"{stamp.microsecond:06d}".rstrip("0")
    return stamp.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "+00:00"


def _json_value(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def econia_text(channel: str, row: dict[str, Any]) -> str:
    """The notification an Econia trigger sends for ``row``: ``json_build_object('channel',
    channel, 'payload', NEW)::text`` (top level ``"key" : value``, the row compact)."""
    body = ",".join(f'"{name}":{_json_value(row[name])}' for name, _ in ECONIA_COLUMNS[channel])
    return f'{{"channel" : "{channel}", "payload" : {{{body}}}}}'


class EconiaFeed:
    """Rows of Econia's event tables with realistic values, as their triggers send them.

    Addresses are ``0x`` and 64 hex digits with leading zeros stripped (as the processor
    writes them); most are fresh random ones (a pessimistic case for compression): with
    probability ``repeat`` an address comes from a pool of ``pool`` active traders instead.
    Order ids are u128 (a counter in the high 64 bits, random low bits). Transaction versions
    grow; the events of one transaction share its time, which is the current time.
    """

    def __init__(self, seed: int | None = None, repeat: float = 0.2, pool: int = 64) -> None:
        self.rng = random.Random(seed)
        self.repeat = repeat
        self.pool = [self._fresh() for _ in range(pool)]
        self.integrators = [self._fresh() for _ in range(4)]
        self.txn = 2_000_000_000 + self.rng.randrange(10 ** 8)
        self.idx = 0
        self.now = time.time()

    def _fresh(self) -> str:
        return f"0x{self.rng.getrandbits(256):x}"

    def address(self) -> str:
        return self.rng.choice(self.pool) if self.rng.random() < self.repeat else self._fresh()

    def integrator(self) -> str:
        return self.rng.choice(self.integrators) if self.rng.random() < 0.8 else self._fresh()

    def order_id(self) -> int:
        return (self.rng.randrange(1, 1 << 20) << 64) | self.rng.getrandbits(64)

    def custodian(self) -> int:
        return 0 if self.rng.random() < 0.85 else self.rng.randint(1, 40)

    def market(self) -> int:
        return self.rng.randint(1, 12)

    def _event(self) -> dict[str, Any]:
        """The next event's key: a new transaction now and then (with the current time)."""
        if self.rng.random() < 0.3:
            self.txn += self.rng.randint(1, 40)
            self.idx = 0
            self.now = time.time()
        else:
            self.idx += 1
        return {"txn_version": self.txn, "event_idx": self.idx, "time": pg_time(self.now)}

    def fill_rows(self, market_id: int | None = None, pair: bool = False
                  ) -> list[dict[str, Any]]:
        """One fill: one row, or (``pair``) the two rows the processor stores (one per handle
        it was emitted to, ``emit_address`` maker then taker, consecutive event indices)."""
        rng = self.rng
        maker, taker = self.address(), self.address()
        row = {**self._event(), "maker_address": maker,
               "maker_custodian_id": self.custodian(), "maker_order_id": self.order_id(),
               "maker_side": rng.random() < 0.5,
               "market_id": self.market() if market_id is None else market_id,
               "price": rng.randint(1, 30000), "sequence_number_for_trade": rng.randint(0, 3),
               "size": rng.randint(1, 10 ** 6), "taker_address": taker,
               "taker_custodian_id": self.custodian(), "taker_order_id": self.order_id(),
               "taker_quote_fees_paid": rng.randint(0, 10 ** 7)}
        if not pair:
            return [{**row, "emit_address": rng.choice((maker, taker))}]
        second = {**row, "emit_address": taker, "event_idx": row["event_idx"] + 1}
        self.idx += 1
        return [{**row, "emit_address": maker}, second]

    def row(self, channel: str, market_id: int | None = None) -> dict[str, Any]:
        """One row of ``channel``'s table (a fill: one distinct fill, not a pair)."""
        rng = self.rng
        market = self.market() if market_id is None else market_id
        if channel == "fill_event":
            return self.fill_rows(market)[0]
        if channel == "place_limit_order_event":
            size = rng.randint(1, 10 ** 6)
            return {**self._event(), "market_id": market, "user": self.address(),
                    "custodian_id": self.custodian(), "order_id": self.order_id(),
                    "side": rng.random() < 0.5, "integrator": self.integrator(),
                    "initial_size": size, "price": rng.randint(1, 30000),
                    "restriction": rng.randint(0, 3), "self_match_behavior": rng.randint(0, 3),
                    "size": rng.randint(0, size)}
        if channel == "place_market_order_event":
            return {**self._event(), "market_id": market, "order_id": self.order_id(),
                    "user": self.address(), "custodian_id": self.custodian(),
                    "integrator": self.integrator(), "direction": rng.random() < 0.5,
                    "size": rng.randint(1, 10 ** 6), "self_match_behavior": rng.randint(0, 3)}
        if channel == "place_swap_order_event":
            return {**self._event(), "market_id": market, "order_id": self.order_id(),
                    "signing_account": self.address(), "integrator": self.integrator(),
                    "direction": rng.random() < 0.5, "min_base": 0,
                    "max_base": rng.choice((_U64_MAX, rng.randint(1, 10 ** 9))),
                    "min_quote": 0, "max_quote": rng.choice((_U64_MAX, rng.randint(1, 10 ** 9))),
                    "limit_price": rng.choice((_U64_MAX, rng.randint(1, 30000)))}
        if channel == "change_order_size_event":
            return {**self._event(), "market_id": market, "order_id": self.order_id(),
                    "user": self.address(), "custodian_id": self.custodian(),
                    "side": rng.random() < 0.5, "new_size": rng.randint(1, 10 ** 6)}
        if channel == "cancel_order_event":
            return {**self._event(), "market_id": market, "user": self.address(),
                    "custodian_id": self.custodian(), "order_id": self.order_id(),
                    "reason": rng.randint(1, 5)}
        if channel in ("market_registration_event", "recognized_market_event"):
            module = rng.choice(("coin", "asset", "token", "oft"))
            return {**self._event(), "market_id": market, "base_account_address": self._fresh(),
                    "base_module_name": module, "base_struct_name": rng.choice(
                        ("T", "Coin", "APT", "WETH", "USDT", "MOJO")),
                    "base_name_generic": None, "quote_account_address": _QUOTE[0],
                    "quote_module_name": _QUOTE[1], "quote_struct_name": _QUOTE[2],
                    "lot_size": 10 ** rng.randint(0, 6), "tick_size": 10 ** rng.randint(0, 4),
                    "min_size": rng.randint(1, 1000), "underwriter_id": 0}
        if channel == "updated_limit_order":
            self._event()
            total = rng.randint(0, 10 ** 6)
            status = rng.choice(("open", "open", "closed", "cancelled"))
            return {"market_id": market, "order_id": self.order_id(),
                    "created_at": pg_time(self.now - rng.uniform(0, 30 * 86400)),
                    "last_updated_at": pg_time(self.now), "integrator": self.integrator(),
                    "total_filled": total, "remaining_size": 0 if status != "open"
                    else rng.randint(1, 10 ** 6), "order_status": status,
                    "order_type": "limit", "user": self.address(),
                    "direction": rng.choice(("ask", "bid")), "price": rng.randint(1, 30000),
                    "average_execution_price": rng.randint(1, 30000) if total else None,
                    "custodian_id": self.custodian(), "self_match_behavior": rng.randint(0, 3),
                    "restriction": rng.randint(0, 3),
                    "last_increase_stamp": self.order_id() if rng.random() < 0.5 else None,
                    "min_base": None, "max_base": None, "min_quote": None, "max_quote": None,
                    "total_fees_paid_in_quote_subunits": rng.randint(0, 10 ** 7)}
        raise ValueError(f"no Econia table for channel {channel!r}")

    def texts(self, channels: Sequence[str], count: int, pairs: bool = False) -> list[str]:
        """``count`` notification texts, round-robin over ``channels``; with ``pairs``, every
        fill is sent as the processor stores it, twice (two rows, see :meth:`fill_rows`)."""
        out: list[str] = []
        n = 0
        while len(out) < count:
            channel = channels[n % len(channels)]
            n += 1
            if channel == "fill_event" and pairs:
                out.extend(econia_text(channel, row) for row in self.fill_rows(pair=True))
            else:
                out.append(econia_text(channel, self.row(channel)))
        return out[:count]


def check_econia_texts(feed: EconiaFeed | None = None, per_channel: int = 3) -> int:
    """Render rows of every Econia channel with PostgreSQL's own ``json_build_object`` (a row
    of the same column names and types, session time zone UTC) and compare them byte for byte
    with :func:`econia_text`; raise on a difference, return how many were compared."""
    feed = feed or EconiaFeed(seed=1)
    compared = 0
    with psycopg.connect(DB_URI, autocommit=True) as db:
        db.execute("SET TIME ZONE 'UTC'")
        for channel, columns in ECONIA_COLUMNS.items():
            select = ", ".join(f'%s::{kind} AS "{name}"' for name, kind in columns)
            for _ in range(per_channel):
                row = feed.row(channel)
                values = [str(row[name]) if isinstance(row[name], int)
                          and not isinstance(row[name], bool) else row[name]
                          for name, _ in columns]
                found = db.execute(f"SELECT json_build_object('channel', %s::text, 'payload', r)"
                                   f"::text FROM (SELECT {select}) AS r",
                                   [channel, *values]).fetchone()
                mine = econia_text(channel, row)
                if not found or found[0] != mine:
                    raise AssertionError(f"{channel}: PostgreSQL writes\n{found and found[0]}\n"
                                         f"the feed writes\n{mine}")
                compared += 1
    return compared


def text_digests(texts: Sequence[str]) -> dict[str, list[Any]]:
    """Per channel: [count, sha256 over the texts in order], as a verifying client computes
    them from what it receives (:class:`Conn` ``verify``)."""
    digests: dict[str, Any] = {}
    for text in texts:
        data = text.encode()
        channel = data[14:data.index(b'"', 14)].decode()
        entry = digests.setdefault(channel, [0, hashlib.sha256()])
        entry[0] += 1
        entry[1].update(len(data).to_bytes(4, "big") + data)
    return {channel: [count, digest.hexdigest()] for channel, (count, digest) in
            digests.items()}


# -- frame-parsing client processes --------------------------------------------------------

#: A client's permessage-deflate offer (RFC 7692), as browsers send it.
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
_DEFLATE_TAIL = b"\x00\x00\xff\xff"
_ENVELOPE_HEAD = b'{"channel" : "'
_MARKET = re.compile(rb'"market_id":(\d+|null)')
HARNESS = os.path.abspath(__file__)


@dataclasses.dataclass
class Conn:
    """One connection of :class:`FrameClients`."""

    path: str
    #: Messages to receive before this connection counts as done: an int, or a list of
    #: cumulative targets, one per phase (see :meth:`FrameClients.next_phase`); None: read
    #: until stopped.
    expected: int | list[int] | None = None
    #: Offer permessage-deflate in the handshake.
    deflate: bool = False
    #: Inflate (when compressed) every message and hash it per channel (:func:`text_digests`).
    verify: bool = False
    #: Check every message's ``"market_id":`` against this value (counted, not fatal).
    market: int | None = None
    #: Offer this WebSocket subprotocol (``Sec-WebSocket-Protocol``), e.g. ``pgws.resume.v1``.
    protocol: str | None = None


def ws_open(host: str, port: int, path: str, offer: str | None = None, timeout: float = 30.0,
            protocol: str | None = None) -> tuple[socket.socket, bytes, str]:
    """Connect and upgrade: (non-blocking socket, bytes that came after the response head,
    the ``Sec-WebSocket-Extensions`` answer or ""); ``protocol``: a subprotocol to offer."""
    sock = socket.socket()
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        extra = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer else ""
        if protocol:
            extra += f"Sec-WebSocket-Protocol: {protocol}\r\n"
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
            if len(head) > 65536:
                raise ConnectionError("no end of the response head")
        head, rest = head.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            raise ConnectionError(lines[0])
        extensions = ", ".join(line.split(":", 1)[1].strip() for line in lines[1:]
                               if line.lower().startswith("sec-websocket-extensions:"))
        sock.setblocking(False)
        return sock, rest, extensions
    except BaseException:
        sock.close()
        raise


#: The frame walk of :meth:`_Reader.feed` in C, for the connections that only count: the load
#: clients must stay far cheaper than the server they load (Python's loop costs ~0.4 µs a
#: frame, about twice what the relay spends per delivery in a burst). Built once with the
#: system's C compiler into the temporary directory; without one, the Python loop does it.
_WALK_C = r"""
long walk(const unsigned char *buf, long n, long *counts) {
    long pos = 0;
    while (n - pos >= 2) {
        long size = buf[pos + 1], start;
        if (size < 126) {
            start = pos + 2;
        } else if (size == 126) {
            start = pos + 4;
            if (start > n) break;
            size = ((long)buf[pos + 2] << 8) | buf[pos + 3];
        } else if (size == 127) {
            start = pos + 10;
            if (start > n) break;
            size = 0;
            for (int i = 2; i < 10; i++) size = (size << 8) | buf[pos + i];
            if (size < 0) { counts[2] = 1; return pos; }
        } else {
            counts[2] = 1;
            return pos;
        }
        long end = start + size;
        if (end > n) break;
        unsigned char first = buf[pos];
        if (first == 0x81) {
            counts[0]++;
        } else if (first == 0xC1) {
            counts[0]++;
            counts[1]++;
        } else {
            counts[2] = 1;  /* Anything else: the Python walk takes it from here. */
            return pos;
        }
        pos = end;
    }
    return pos;
}
"""


def compile_library(source: str, name: str) -> str | None:
    """Compile C ``source`` into a shared library named after ``name`` and the source's digest
    (once per source text, kept in the temporary directory); its path, or None when there is no
    C compiler."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"pgws-bench-{name}-{digest}.so")
    if os.path.exists(path):
        return path
    with tempfile.TemporaryDirectory() as scratch:
        written = os.path.join(scratch, f"{name}.c")
        with open(written, "w") as handle:
            handle.write(source)
        built = os.path.join(scratch, f"{name}.so")
        try:
            subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", built, written], check=True,
                           capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        os.replace(built, path)
    return path


def build_walker() -> str | None:
    """Compile :data:`_WALK_C` and return the library's path, or None (no C compiler)."""
    return compile_library(_WALK_C, "walk")


def _load_walker(path: str | None) -> Any:
    if not path:
        return None
    try:
        import ctypes
        library = ctypes.CDLL(path)
    except OSError:
        return None
    function = library.walk
    function.restype = ctypes.c_long
    function.argtypes = [ctypes.c_char_p, ctypes.c_long, ctypes.POINTER(ctypes.c_long)]
    counts = (ctypes.c_long * 3)()
    return function, counts


#: Set in a frame-client process from its spec (:func:`_load_walker`).
_walker: Any = None


class _Reader:
    """One connection's state in a frame client."""

    __slots__ = ("close_code", "closed", "compressed", "digests", "done", "errors",
                 "extensions", "foreign", "frames", "inflater", "market", "matched", "nbytes",
                 "rest", "sock", "targets", "verify")

    def __init__(self, sock: socket.socket, conn: dict[str, Any], rest: bytes,
                 extensions: str) -> None:
        self.sock = sock
        expected = conn["expected"]
        self.targets = (None if expected is None else
                        list(expected) if isinstance(expected, list) else [expected])
        self.extensions = extensions
        negotiated = extensions.startswith("permessage-deflate")
        self.inflater = zlib.decompressobj(-15) if negotiated else None
        self.verify = conn["verify"]
        self.market = conn["market"]
        self.frames = self.compressed = self.matched = self.foreign = self.errors = 0
        self.nbytes = len(rest)
        self.rest = b""
        self.done = False
        self.closed = False
        self.close_code: int | None = None
        self.digests: dict[bytes, list[Any]] = {}
        if rest:
            self.feed(rest, count=False)

    def feed(self, data: bytes, count: bool = True) -> None:
        """Take ``data`` from the socket: walk the frame headers, count, check when asked."""
        if count:
            self.nbytes += len(data)
        if self.rest:
            data = self.rest + data
        n = len(data)
        pos = frames = compressed = 0
        check = self.verify or self.market is not None
        if _walker is not None and not check:
            function, counts = _walker
            counts[0] = counts[1] = counts[2] = 0
            pos = function(data, n, counts)
            frames, compressed = counts[0], counts[1]
            if not counts[2]:
                n = pos  # Everything complete was walked; the rest waits for more bytes.
        while n - pos >= 2:
            size = data[pos + 1]  # Server frames are not masked: the high bit is clear.
            if size < 126:
                start = pos + 2
            elif size == 126:
                start = pos + 4
                if start > n:
                    break
                size = (data[pos + 2] << 8) | data[pos + 3]
            elif size == 127:
                start = pos + 10
                if start > n:
                    break
                size = int.from_bytes(data[pos + 2:start], "big")
            else:  # A masked server frame: a protocol error; nothing after it can be parsed.
                self.errors += 1
                self.closed = True
                pos = n
                break
            end = start + size
            if end > n:
                break
            first = data[pos]
            if first == 0x81:
                frames += 1
            elif first == 0xC1:
                frames += 1
                compressed += 1
            else:
                self._control(first, data[start:end])
                pos = end
                continue
            if check:
                self._check(first, data[start:end])
            pos = end
        self.rest = data[pos:] if pos < len(data) else b""
        self.frames += frames
        self.compressed += compressed

    def _control(self, first: int, payload: bytes) -> None:
        opcode = first & 0x0F
        if opcode == 0x8:
            self.closed = True
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
        elif opcode not in (0x9, 0xA):  # Pings and pongs are not messages; the rest is wrong.
            self.errors += 1  # A fragment, a binary frame or an RSV bit not expected.

    def _check(self, first: int, payload: bytes) -> None:
        if first & 0x40:
            if self.inflater is None:
                self.errors += 1
                return
            try:
                text = self.inflater.decompress(payload + _DEFLATE_TAIL)
            except zlib.error:
                self.errors += 1
                return
        else:
            text = payload
        if self.verify:
            if not text.startswith(_ENVELOPE_HEAD):
                self.errors += 1
                return
            channel = text[14:text.find(b'"', 14)]
            entry = self.digests.get(channel)
            if entry is None:
                entry = self.digests[channel] = [0, hashlib.sha256()]
            entry[0] += 1
            entry[1].update(len(text).to_bytes(4, "big") + text)
        if self.market is not None:
            found = _MARKET.search(text)
            if found and found.group(1) == str(self.market).encode():
                self.matched += 1
            else:
                self.foreign += 1

    def result(self) -> dict[str, Any]:
        final = self.targets[-1] if self.targets else None
        return {"frames": self.frames, "bytes": self.nbytes, "compressed": self.compressed,
                "matched": self.matched, "foreign": self.foreign, "errors": self.errors,
                "closed": self.closed, "close_code": self.close_code,
                "extra": max(0, self.frames - final) if final is not None else 0,
                "missing": max(0, final - self.frames) if final is not None else 0,
                "extensions": self.extensions,
                "digests": {channel.decode(errors="replace"): [count, digest.hexdigest()]
                            for channel, (count, digest) in self.digests.items()}}


def _emit(kind: str, body: Any) -> None:
    sys.stdout.write(f"{kind} {json.dumps(body)}\n")
    sys.stdout.flush()


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit (children inherit it);
    return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def frame_client_main(spec_path: str) -> int:
    """One frame-client process (run by :class:`FrameClients`): opens its connections, says
    ``ready``, waits for ``go`` on stdin, reads until told ``stop`` (or stdin closes, or the
    spec's timeout), saying ``done`` each time all its connections reach their target of the
    current phase (``next`` on stdin moves to the next phase); then writes its ``result``."""
    global _walker
    with open(spec_path) as handle:
        spec = json.load(handle)
    raise_nofile()
    _walker = _load_walker(spec.get("walker"))
    readers: list[_Reader] = []
    try:
        for conn in spec["connections"]:
            sock, rest, extensions = ws_open(spec["host"], spec["port"], conn["path"],
                                             DEFLATE_OFFER if conn["deflate"] else None,
                                             protocol=conn.get("protocol"))
            readers.append(_Reader(sock, conn, rest, extensions))
    except (OSError, ValueError) as exc:
        _emit("error", f"connection {len(readers) + 1} of {len(spec['connections'])}: "
                       f"{type(exc).__name__}: {exc}")
        return 1
    _emit("ready", {"connections": len(readers),
                    "negotiated": sum(1 for r in readers if r.inflater is not None),
                    "walker": "C" if _walker is not None else "Python"})
    if sys.stdin.readline().strip() != "go":
        return 0
    cpu_start = _cpu_self()
    phase = 0
    selector = selectors.DefaultSelector()
    for reader in readers:
        selector.register(reader.sock, selectors.EVENT_READ, reader)
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)

    def pending_count() -> int:
        return sum(1 for r in readers if r.targets is not None and not r.closed
                   and r.frames < r.targets[min(phase, len(r.targets) - 1)])

    def target(reader: _Reader) -> int:
        assert reader.targets is not None
        return reader.targets[min(phase, len(reader.targets) - 1)]

    waiting = {r for r in readers if r.targets is not None and r.frames < target(r)}
    tracked = any(r.targets is not None for r in readers)
    done_at = time.time() if tracked and not waiting else None
    if done_at is not None:
        _emit("done", {"phase": phase, "at": done_at})
    last_frame = 0.0
    deadline = time.monotonic() + spec["timeout"]
    stopping = timed_out = False
    commands = b""
    while not stopping:
        if time.monotonic() > deadline:
            timed_out = True
            break
        for key, _ in selector.select(timeout=0.2):
            reader = key.data
            if reader is None:
                chunk = os.read(sys.stdin.fileno(), 4096)
                if not chunk:
                    stopping = True
                    continue
                commands += chunk
                while b"\n" in commands:
                    line, commands = commands.split(b"\n", 1)
                    if line.strip() == b"stop":
                        stopping = True
                    elif line.strip() == b"next":
                        phase += 1
                        waiting = {r for r in readers if r.targets is not None
                                   and not r.closed and r.frames < target(r)}
                        if tracked and not waiting:
                            done_at = time.time()
                            _emit("done", {"phase": phase, "at": done_at})
                continue
            try:
                data = reader.sock.recv(1 << 18)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                reader.closed = True
                selector.unregister(reader.sock)
            else:
                reader.feed(data)
                last_frame = time.time()
                if reader.closed:
                    selector.unregister(reader.sock)
            if reader in waiting and (reader.closed or reader.frames >= target(reader)):
                waiting.discard(reader)
                if not waiting:
                    done_at = time.time()
                    _emit("done", {"phase": phase, "at": done_at})
    cpu = _cpu_self() - cpu_start
    _emit("result", {"connections": [r.result() for r in readers], "last_frame": last_frame,
                     "done_at": done_at, "timed_out": timed_out, "cpu_s": cpu,
                     "pending": pending_count()})
    for reader in readers:
        reader.sock.close()
    return 0


def end_client_processes(procs: Sequence[subprocess.Popen[str]], specs: Sequence[str],
                         grace: float) -> None:
    """End load-client processes already told to stop: close their stdin, give them ``grace``
    seconds in all to exit, kill those that have not, and delete their spec files."""
    for proc in procs:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for path in specs:
        with contextlib.suppress(OSError):
            os.unlink(path)


class FrameClients:
    """``connections`` spread round-robin over ``procs`` frame-client processes.

    Each process is ``[*prefix, python, bench/parts/harness.py, frame-client, SPEC]``: with a prefix
    such as ``["ip", "netns", "exec", NS]`` the clients run in another network namespace.
    Commands go to each process's stdin, reports come back on its stdout; every wait is
    bounded, and :meth:`close` (also on leaving a ``with`` block) ends the processes.
    """

    def __init__(self, host: str, port: int, connections: Sequence[Conn], procs: int = 2,
                 prefix: Sequence[str] = (), timeout: float = TIMEOUT,
                 connect_timeout: float = 300.0) -> None:
        self.connections = list(connections)
        procs = max(1, min(procs, len(self.connections)))
        self.shares = [list(range(i, len(self.connections), procs)) for i in range(procs)]
        self._reports: queue.Queue[tuple[int, str, Any]] = queue.Queue()
        self._procs: list[subprocess.Popen[str]] = []
        self._stderr: list[list[str]] = []
        self._stderr_threads: list[threading.Thread] = []
        self._specs: list[str] = []
        self.negotiated = 0
        self._phase = 0
        walker = build_walker()
        try:
            for number, share in enumerate(self.shares):
                spec = {"host": host, "port": port, "timeout": timeout, "walker": walker,
                        "connections": [dataclasses.asdict(self.connections[i]) for i in share]}
                with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="pgws-clients-",
                                                 delete=False) as handle:
                    json.dump(spec, handle)
                self._specs.append(handle.name)
                proc = subprocess.Popen([*prefix, *module_command("bench.parts.harness",
                                                                  "frame-client", handle.name)],
                                        env=module_env(), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                self._procs.append(proc)
                self._stderr.append([])
                threading.Thread(target=self._read, args=(number, proc), daemon=True).start()
                reader = threading.Thread(target=self._read_stderr, args=(number, proc),
                                          daemon=True)
                reader.start()
                self._stderr_threads.append(reader)
            ready = self._gather("ready", connect_timeout)
            self.negotiated = sum(body["negotiated"] for body in ready)
            #: "C" or "Python": what walks the frames of the connections that only count.
            self.walker = ready[0]["walker"]
        except BaseException:
            self.close()
            raise

    def _read(self, number: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, _, body = line.rstrip("\n").partition(" ")
            try:
                self._reports.put((number, kind, json.loads(body)))
            except ValueError:
                self._reports.put((number, "noise", line))
        self._reports.put((number, "exit", None))

    def _read_stderr(self, number: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self._stderr[number].append(line.rstrip("\n"))
            del self._stderr[number][:-40]

    def _gather(self, kind: str, timeout: float, processes: Sequence[int] | None = None
                ) -> list[Any]:
        """One ``kind`` report from each process (in process order); raise on an error report,
        an exit or the timeout."""
        wanted = set(range(len(self._procs)) if processes is None else processes)
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(wanted):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(wanted) - len(got)} client process(es) sent no "
                                   f"{kind!r} within {timeout:g} s")
            try:
                number, got_kind, body = self._reports.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if got_kind == kind and number in wanted and (
                    kind != "done" or body.get("phase") == self._phase):
                got[number] = body
            elif got_kind == "error" or (got_kind == "exit" and number in wanted
                                         and number not in got):
                proc = self._procs[number]
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
                self._stderr_threads[number].join(5)
                tail = "\n".join(self._stderr[number][-10:])
                raise RuntimeError(f"client process {number} (status {proc.returncode}): "
                                   f"{got_kind} {body or ''}" + (f"\n{tail}" if tail else ""))
        return [got[number] for number in sorted(got)]

    def _tell(self, command: str) -> None:
        for proc in self._procs:
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write(command + "\n")
                    proc.stdin.flush()
                except OSError:
                    pass

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def start(self) -> None:
        """Start reading (phase 0)."""
        self._tell("go")

    def wait_done(self, timeout: float) -> float | None:
        """Wait until every process with targets reports all its connections at the current
        phase's target; the time the last one got there, or None on timeout."""
        tracked = [n for n, share in enumerate(self.shares)
                   if any(self.connections[i].expected is not None for i in share)]
        try:
            bodies = self._gather("done", timeout, tracked)
        except TimeoutError:
            return None
        return max((body["at"] for body in bodies), default=time.time())

    def next_phase(self) -> None:
        """Targets move to the next phase's (cumulative) values."""
        self._phase += 1
        self._tell("next")

    def results(self, timeout: float = 60.0) -> dict[str, Any]:
        """Tell the processes to stop; their results, per connection in the given order."""
        self._tell("stop")
        bodies = self._gather("result", timeout)
        per_connection: list[dict[str, Any]] = [{} for _ in self.connections]
        for share, body in zip(self.shares, bodies, strict=True):
            for index, outcome in zip(share, body["connections"], strict=True):
                per_connection[index] = outcome
        return {"connections": per_connection,
                "last_frame": max(body["last_frame"] for body in bodies),
                "done_at": max((body["done_at"] or 0.0) for body in bodies) or None,
                "timed_out": any(body["timed_out"] for body in bodies),
                "client_cpu_s": sum(body["cpu_s"] for body in bodies),
                "pending": sum(body["pending"] for body in bodies)}

    def close(self) -> None:
        self._tell("stop")
        end_client_processes(self._procs, self._specs, grace=15)
        self._specs = []

    def __enter__(self) -> FrameClients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def git_head() -> dict[str, Any]:
    """The full commit (``git rev-parse HEAD``) and which files of the relay differ from it
    (read-only queries, no optional locks: others work in this checkout)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "--no-optional-locks", *args], capture_output=True,
                                  text=True, cwd=HERE, timeout=10).stdout.strip()
        except OSError:
            return ""
    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "uncommitted": git("status", "--porcelain", "--", "relay", "bench").splitlines()}


def relay_source() -> str:
    """Where the ``pgws-relay`` the benchmarks start imports ``relay`` from (PYTHONPATH may
    point it at another checkout)."""
    try:
        return subprocess.run([sys.executable, "-c", "import relay; print(relay.__file__)"],
                              capture_output=True, text=True, timeout=30, cwd="/",
                              env=os.environ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent outside idle and iowait since boot."""
    with open("/proc/stat") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def settle(limit: float, cores: float = 0.5) -> tuple[float, bool]:
    """Wait up to ``limit`` s for one second in which the machine keeps fewer than ``cores``
    busy (others' test suites come in bursts); (seconds waited, whether it came)."""
    started = time.monotonic()
    while limit > 0:
        busy = busy_seconds()
        time.sleep(1.0)
        if busy_seconds() - busy < cores:
            return round(time.monotonic() - started, 1), True
        if time.monotonic() - started >= limit:
            break
    return round(time.monotonic() - started, 1), False


def own_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def wait_for_db(timeout: float = 60.0) -> bool:
    """Wait (bounded) until PostgreSQL answers; whether it did."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(DB_URI, autocommit=True, connect_timeout=5) as db:
                db.execute("SELECT 1")
            return True
        except psycopg.Error:
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)


def write_json(path: str, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` whole or not at all (a run cut short leaves the last)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(document, handle, indent=1)
        handle.write("\n")
    os.replace(path + ".tmp", path)


def merge_json(path: str, key: str, value: Any) -> None:
    """Set ``key`` of the JSON object in ``path`` (made when missing) to ``value``, keeping
    its other keys: each part of a scenario keeps its own results in one file."""
    document: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as handle:
            document = json.load(handle)
    document[key] = value
    write_json(path, document)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "frame-client":
        sys.exit(frame_client_main(sys.argv[2]))
    sys.exit("usage: python -m bench.parts.harness frame-client SPEC.json "
             "(started by FrameClients)")

"""The WAL source (``PGWS_SOURCE=wal``): what survives kills and terminated walsenders, what it
costs the fan-out, and what it costs PostgreSQL.

    flock /tmp/machine.lock python -m bench.scenarios.wal --json bench/results/wal.json
    python -m bench.scenarios.wal --quick                 # a smoke run, a few minutes
    python -m bench.scenarios.wal --parts burst,pgbench  # of kill,alternate,walsender,burst,pgbench

Theory of operation
-------------------
Everything runs against one private PostgreSQL cluster (:class:`bench.parts.pgcluster.Cluster`,
needs root) with ``wal_level = logical`` and PostgreSQL's durability defaults (``fast=False``,
as ``pglimits.py``: every commit waits for its WAL flush), removed on any exit; the machine's
shared PostgreSQL has ``wal_level = replica``. Relays are the real ``pgws-relay`` command of
this venv (:class:`bench.parts.harness.OwnedServer`) with ``PGWS_SOURCE=wal``, a slot of their
own (``PGWS_WAL_SLOT``, made by the relay, dropped by ``pgws-relay drop-slot`` after the part)
and the listen channel :data:`PREFIX` as the message prefix.

Parts ``kill``, ``alternate`` and ``walsender`` share a producer and a client:

- the producer (``python -m bench.scenarios.wal produce SPEC``, a process of its own, one
  psycopg connection) commits ``{"channel":"c","n":N}``, N = 0, 1, 2 …, at ``--rate``
  (1,000) messages/s, :data:`BATCH` per transaction, one statement
  ``SELECT pg_logical_emit_message(true, PREFIX, p) FROM unnest(texts)`` each; the k-th
  transaction is due at start + k × batch / rate (paced against the clock);
- the clients (``python -m bench.scenarios.wal clients SPEC``, :data:`CLIENT_PROCS`
  processes, one epoll each) are raw WebSocket connections offering ``pgws.resume.v1``: each
  keeps the last position it read (of a delivery or of a ``position``/``resumed``/``lost``
  event) and, whenever its connection ends, opens a new one at once with ``?from=`` that
  position (retrying every :data:`RETRY_S` while the relay is away). Not the client library:
  100 clients at 1,000 messages/s are 100,000 messages/s to parse on the 2 cores that also run
  the relay, PostgreSQL and the producer, and trio-websocket costs tens of µs a message; this
  client a few. Each counts per N: lost (never received), duplicated (received twice), out of
  order (received after a higher N), and the ``lost`` events by reason; a client is done when
  it has received the last N, and has ``--drain`` (60) seconds after the producer's last
  commit to get there.

Relays of those parts keep ``PGWS_HISTORY_SECONDS=60``, ``PGWS_HISTORY_MESSAGES=100000`` (60 s
at 1,000/s on one channel, with margin) and the default 128 MiB (an entry is its ~25-byte
payload, its position and 512 bytes: 100,000 take ~58 MiB), and
``PGWS_MAX_RESUMES_PER_SECOND_PER_IP=0``: all clients come from 127.0.0.1, and the default
(10/s, bursts of 20) would answer most of 100 simultaneous resumes with 429.

- ``kill``: one relay; ``--kill-clients`` (100) clients; the producer runs ``--kill-seconds``
  (300); every ``--kill-every`` (10) s the relay gets SIGKILL and the same command is started
  again at once on the same slot and port. Per restart: seconds from the kill to the relay's
  ready line (its slot streams again), to its ``caught up with the log`` line (it has read its
  history back from the slot: clients wait for that), and the messages it read back (its
  ``pgws_notifications_received_total`` then). Goal: 0 lost / 0 duplicated / 0 out of order /
  0 lost events.
- ``alternate``: two relays (two slots) on the one database; ``--alternate-clients`` (20)
  clients, each closing its connection after a random 1–2 s and opening the next one, with
  ``from=`` its last position, on the other relay; ``--alternate-seconds`` (120). Every resume
  is a position one relay issued, read by the other. Goal: 0 / 0 / 0, and no ``unknown``.
- ``walsender``: one relay, ``--kill-clients`` clients that stay connected; every
  :data:`TERMINATE_EVERY` s ``pg_terminate_backend`` of the slot's walsender
  (``pg_replication_slots.active_pid``) for ``--walsender-seconds`` (120). Goal: 0 lost, 0
  duplicated, 0 lost events, no client reconnecting.
- ``burst``: bench/scenarios/throughput.py's burst: ``--burst-clients`` (1,000) plain clients
  of one channel (:class:`bench.parts.harness.FrameClients`, the C frame walk), 4,000 340-byte
  ``fill_event`` payloads (:func:`bench.parts.harness.payload`) committed 100 per transaction in
  one statement, deliveries/s from the first statement to the last client's last message.
  ``notify`` (a relay with ``PGWS_SOURCE=notify``, ``pg_notify``) and ``wal`` (a fresh slot per
  run, ``pg_logical_emit_message``), same build, same cluster, default settings otherwise;
  ``--burst-rounds`` (5) rounds, the order alternating; medians, the ratio of medians wal /
  notify (goal ≥ :data:`BURST_GOAL`) and the per-round ratios.
- ``pgbench``: PostgreSQL's side, as ``pglimits.py`` measured NOTIFY (its :class:`Pgbench`,
  :class:`Listeners`, :func:`throughput_run` and CPU split are reused): ``pgbench -M prepared``,
  pipeline mode, ``--pgbench-seconds`` (10) per run, one message per transaction, the same
  100-byte payload every way: ``notify``, ``SELECT pg_notify(...)`` with 1, 10 and 100
  LISTENing connections; ``wal``, ``SELECT pg_logical_emit_message(true, ...)`` with 1, 10 and
  100 logical slots each read by a ``pg_recvlogical`` process (pgoutput, ``messages=true``, the
  relay's publication, output to /dev/null, progress reported every second); ``wal-async``,
  the same after ``SET LOCAL synchronous_commit = off``. Why the third: a transaction that only
  NOTIFYs writes no WAL before its commit record, and PostgreSQL then does not wait for that
  record's flush, while a WAL message is WAL, so its commit waits for fdatasync like any
  write's; ``wal-async`` takes the flush out and leaves the decoding. The pgbench client count
  is each kind's best of :data:`SWEEP_CLIENTS` with one reader (half-length runs; --quick: 4,
  pglimits' choice). ``--pgbench-runs`` (3) runs, the kinds' order rotating, fresh listeners
  or slots for each; medians. A WAL row has kept up when every
  slot has confirmed the end of WAL at pgbench's end within 60 s (the seconds it took are in
  the row); a NOTIFY row as in pglimits (every listener got everything, the queue is empty).
  For reference, pglimits measured 35,397 / 13,835 / 1,474 commits/s with 1 / 10 / 100
  listeners on a ``wal_level = replica`` cluster.

The machine is shared: each run records the 1-minute load average at its start and the CPU
the rest of the machine used (``others_cpu_s``, busy CPU from /proc/stat less this process
and its children). A part that fails is a result (its error, the relay's last lines), not the
end of the invocation.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import queue
import random
import re
import resource
import selectors
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from typing import Any

import psycopg

from bench.parts.harness import (
    Conn,
    FrameClients,
    OwnedServer,
    busy_seconds,
    commit,
    free_port,
    machine,
    own_seconds,
    payload,
    token,
    write_json,
)
from bench.parts.paths import module_command, module_env
from bench.parts.pgcluster import Cluster, _bin, remove_stale
from bench.scenarios.pglimits import (
    CpuSplit,
    Listeners,
    Pgbench,
    load1,
    throughput_run,
    write_script,
)
from bench.scenarios.pglimits import payload as pg_payload

PARTS = ("kill", "alternate", "walsender", "burst", "pgbench")
#: The relays' PGWS_LISTEN_CHANNEL: the prefix of every message (and NOTIFY's channel).
PREFIX = "pgws_wal_bench"
#: The WebSocket channel of parts kill, alternate, walsender.
CHANNEL = "c"
#: The cluster's settings beyond the durability defaults: logical decoding, and slots and
#: walsenders for part pgbench's 100 readers plus the relays.
PG_SETTINGS = {"wal_level": "logical", "max_replication_slots": "120",
               "max_wal_senders": "120", "max_connections": "300"}
#: Messages per producer transaction in parts kill, alternate, walsender ("small
#: transactions": 100 commits/s at 1,000 messages/s).
BATCH = 10
#: History of the relays of parts kill, alternate, walsender (see the docstring).
HISTORY = {"PGWS_HISTORY_SECONDS": "60", "PGWS_HISTORY_MESSAGES": "100000",
           "PGWS_HISTORY_BYTES": str(128 * 1024 * 1024),
           "PGWS_MAX_RESUMES_PER_SECOND_PER_IP": "0"}
#: Client processes of parts kill, alternate, walsender: the machine has 2 cores.
CLIENT_PROCS = 2
#: Seconds between attempts while a relay is away (restarting) or refuses.
RETRY_S = 0.1
#: Part alternate: each connection lives this long (uniform, seconds), then the next one goes
#: to the other relay.
LIFETIME = (1.0, 2.0)
#: Part walsender: seconds between terminations of the slot's walsender.
TERMINATE_EVERY = 5.0
#: Part burst: payload bytes (the throughput burst's), messages per transaction, the goal.
BURST_SIZE = 340
BURST_BATCH = 100
BURST_CHANNEL = "fill_event"
BURST_GOAL = 0.8
#: Part pgbench: readers (LISTENing connections, or slots); pgbench client counts swept with
#: one reader, the best per kind kept for the grid (pglimits' sweep chose 4 for NOTIFY; a
#: commit that waits for its WAL flush gains from more clients, by group commit); the count
#: without the sweep (--quick); seconds to wait for the readers after pgbench.
READERS = (1, 10, 100)
SWEEP_CLIENTS = (1, 4, 16)
PGBENCH_CLIENTS = 4
CATCH_UP_S = 60.0
#: The producers compared: NOTIFY; a WAL message with the durability defaults; the same with
#: ``SET LOCAL synchronous_commit = off`` (a transaction that only NOTIFYs writes no WAL
#: before its commit record, so PostgreSQL does not wait for that record's flush: this
#: variant separates the flush from the decoding).
KINDS = ("notify", "wal", "wal-async")
#: The relay's publication (PGWS_WAL_PUBLICATION's default): pg_recvlogical reads through it.
PUBLICATION = "pgws_relay"


# -- the producer process ----------------------------------------------------------------------

_EMIT = {"wal": "SELECT pg_logical_emit_message(true, %s, p) FROM unnest(%s::text[]) AS t(p)",
         "notify": "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS t(p)"}


def message(n: int) -> str:
    return f'{{"channel":"{CHANNEL}","n":{n}}}'


def produce_main(spec_json: str) -> int:
    """``python -m bench.scenarios.wal produce SPEC``: connect, say ``ready``, wait for ``go``
    on stdin, commit messages 0 … total - 1 paced at the rate; print one JSON result."""
    spec = json.loads(spec_json)
    total, rate, batch = spec["total"], spec["rate"], spec["batch"]
    statement = _EMIT[spec["mode"]]
    with psycopg.connect(spec["uri"], autocommit=False) as db:
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 1
        interval = batch / rate
        start = time.monotonic()
        late = 0.0
        first_commit = last_commit = 0.0
        for k, low in enumerate(range(0, total, batch)):
            delay = start + k * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                late = max(late, -delay)
            db.execute(statement, (spec["prefix"],
                                   [message(n) for n in range(low, min(low + batch, total))]))
            db.commit()
            last_commit = time.time()
            first_commit = first_commit or last_commit
        print(json.dumps({"sent": total, "seconds": round(last_commit - first_commit, 3),
                          "rate": round(total / max(time.monotonic() - start, 1e-9), 1),
                          "max_late_s": round(late, 4), "last_commit": last_commit}),
              flush=True)
    return 0


class ProducerProcess:
    """The producer in a process of its own: :meth:`go` starts it, :meth:`result` waits."""

    def __init__(self, uri: str, total: int, rate: float, batch: int = BATCH,
                 mode: str = "wal") -> None:
        spec = {"uri": uri, "prefix": PREFIX, "total": total, "rate": rate, "batch": batch,
                "mode": mode}
        self.proc = subprocess.Popen(module_command("bench.scenarios.wal", "produce",
                                                    json.dumps(spec)),
                                     env=module_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("the producer process did not start")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=timeout)
        lines = out.strip().splitlines()
        if self.proc.returncode != 0 or not lines:
            raise RuntimeError(f"the producer failed (status {self.proc.returncode})")
        return json.loads(lines[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


# -- the resuming clients (one process per share) ----------------------------------------------

_REQUEST = ("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: pgws.resume.v1\r\n\r\n")
#: A client's close frame (code 1000), masked with a zero key.
_CLOSE = bytes([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8])


class _Client:
    """One resuming connection's state: the socket, the last position, what it received."""

    def __init__(self, number: int, ports: Sequence[int], path: str, total: int,
                 lifetime: Sequence[float] | None) -> None:
        self.number = number
        self.ports = list(ports)
        self.port_index = number % len(self.ports)
        self.path = path
        self.lifetime = lifetime
        self.sock: socket.socket | None = None
        self.state = "idle"  # idle, connecting, handshake, open, done
        self.retry_at = 0.0
        self.close_at: float | None = None
        self.head = b""
        self.buf = bytearray()
        self.position: str | None = None
        self.seen = bytearray(total)
        self.total = total
        self.highest = -1
        self.received = self.duplicated = self.out_of_order = self.foreign = 0
        self.connections = self.resumes = self.replayed = self.position_events = 0
        self.planned_closes = self.drops = 0
        self.lost_events: list[dict[str, Any]] = []
        self.failures: Counter[str] = Counter()
        self.ended_at: float | None = None
        self.outages: list[float] = []

    # -- connecting --------------------------------------------------------------------------

    def connect(self, selector: selectors.BaseSelector, now: float) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", self.ports[self.port_index]))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._retry(now, f"connect: {errno.errorcode.get(code, code)}")
            return
        self.sock = sock
        self.state = "connecting"
        self.head = b""
        self.buf = bytearray()
        selector.register(sock, selectors.EVENT_WRITE, self)

    def writable(self, selector: selectors.BaseSelector, now: float) -> None:
        assert self.sock is not None
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.fail(selector, now, f"connect: {errno.errorcode.get(code, code)}")
            return
        path = self.path + (f"?from={self.position}" if self.position else "")
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        try:
            self.sock.send(_REQUEST.format(path=path, key=key).encode())
        except OSError as exc:
            self.fail(selector, now, f"send: {exc.strerror}")
            return
        self.state = "handshake"
        selector.modify(self.sock, selectors.EVENT_READ, self)

    def readable(self, selector: selectors.BaseSelector, now: float) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(selector, now, f"recv: {exc.strerror}")
            return
        if not data:
            self.fail(selector, now, "closed" if self.state == "open" else "closed in handshake")
            return
        if self.state == "handshake":
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, rest = self.head.split(b"\r\n\r\n", 1)
            status = head.split(b"\r\n", 1)[0].decode("latin-1")
            if not status.startswith("HTTP/1.1 101"):
                self.fail(selector, now, status[9:12] or "bad answer")
                return
            if b"pgws.resume.v1" not in head:
                self.fail(selector, now, "no subprotocol")
                return
            self.state = "open"
            self.connections += 1
            if self.lifetime is not None:
                self.close_at = now + random.uniform(*self.lifetime)
            data = rest
            if not data:
                return
        if self.feed(data):
            self.fail(selector, now, "close frame")

    def _retry(self, now: float, why: str) -> None:
        self.failures[why] += 1
        self.state = "idle"
        self.retry_at = now + RETRY_S

    def _drop_socket(self, selector: selectors.BaseSelector) -> None:
        if self.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(self.sock)
            self.sock.close()
            self.sock = None

    def fail(self, selector: selectors.BaseSelector, now: float, why: str) -> None:
        """The connection ended (or never opened): the next one goes out after RETRY_S."""
        if self.state == "open":
            self.drops += 1
            self.ended_at = now
            self.port_index = (self.port_index + 1) % len(self.ports)
        self._drop_socket(selector)
        self._retry(now, why)

    def planned_close(self, selector: selectors.BaseSelector, now: float) -> None:
        """Part alternate: close now and reconnect at once to the other relay."""
        assert self.sock is not None
        with contextlib.suppress(OSError):
            self.sock.send(_CLOSE)
        self._drop_socket(selector)
        self.planned_closes += 1
        self.ended_at = now
        self.close_at = None
        self.port_index = (self.port_index + 1) % len(self.ports)
        self.state = "idle"
        self.retry_at = now

    def finish(self, selector: selectors.BaseSelector) -> None:
        self._drop_socket(selector)
        self.state = "done"

    # -- reading -----------------------------------------------------------------------------

    def feed(self, data: bytes) -> bool:
        """Walk the server's frames; True when a close frame came."""
        buf = self.buf
        buf += data
        n = len(buf)
        pos = 0
        closed = False
        while n - pos >= 2:
            size = buf[pos + 1] & 0x7F
            if size < 126:
                start = pos + 2
            elif size == 126:
                start = pos + 4
                if start > n:
                    break
                size = (buf[pos + 2] << 8) | buf[pos + 3]
            else:
                start = pos + 10
                if start > n:
                    break
                size = int.from_bytes(buf[pos + 2:start], "big")
            end = start + size
            if end > n:
                break
            opcode = buf[pos] & 0x0F
            if opcode == 1:
                self.message(bytes(buf[start:end]))
            elif opcode == 8:
                closed = True
            pos = end
        del buf[:pos]
        return closed

    def message(self, data: bytes) -> None:
        if data[:1] == b"{":
            event = json.loads(data)
            kind = event.get("event")
            self.position = event["position"]
            if kind == "lost":
                self.lost_events.append({"reason": event.get("reason"),
                                         "highest": self.highest})
            elif kind == "resumed":
                self.resumes += 1
                self.replayed += int(event.get("replayed", 0))
                if self.ended_at is not None:
                    self.outages.append(time.monotonic() - self.ended_at)
                    self.ended_at = None
            else:
                self.position_events += 1
            return
        cut = data.index(b"\n")
        self.position = data[:cut].decode()
        try:
            n = int(data[data.rindex(b":") + 1:-1])
        except ValueError:
            n = -1
        if not 0 <= n < self.total:
            self.foreign += 1
            return
        self.received += 1
        if self.seen[n]:
            self.duplicated += 1
        else:
            self.seen[n] = 1
            if n < self.highest:
                self.out_of_order += 1
        if n > self.highest:
            self.highest = n

    def summary(self) -> dict[str, Any]:
        lost = self.seen.count(0)
        ranges: list[list[int]] = []  # The first few runs of lost N, for a diagnosis.
        at = self.seen.find(0)
        while at >= 0 and len(ranges) < 5:
            end = self.seen.find(1, at)
            end = self.total if end < 0 else end
            ranges.append([at, end - 1])
            at = self.seen.find(0, end)
        return {"client": self.number, "lost": lost, "lost_ranges": ranges,
                "duplicated": self.duplicated, "out_of_order": self.out_of_order,
                "received": self.received, "highest": self.highest, "foreign": self.foreign,
                "done": self.state == "done", "connections": self.connections,
                "resumes": self.resumes, "replayed": self.replayed,
                "position_events": self.position_events, "planned_closes": self.planned_closes,
                "drops": self.drops, "lost_events": self.lost_events[:20],
                "lost_event_count": len(self.lost_events),
                "failures": dict(self.failures), "outages": self.outages}


def _emit(kind: str, body: Any) -> None:
    sys.stdout.write(f"{kind} {json.dumps(body)}\n")
    sys.stdout.flush()


def clients_main(spec_path: str) -> int:
    """``python -m bench.scenarios.wal clients SPEC``: run the spec's clients until each has
    the last message, or ``stop`` on stdin; ``ready`` once every client has a position, then
    one ``result``."""
    with open(spec_path) as handle:
        spec = json.load(handle)
    clients = [_Client(number, spec["ports"], spec["path"], spec["total"], spec["lifetime"])
               for number in spec["numbers"]]
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    ready = stopping = False
    last = spec["total"] - 1
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    while not stopping:
        now = time.monotonic()
        for client in clients:
            if client.state == "idle" and now >= client.retry_at:
                client.connect(selector, now)
            elif client.close_at is not None and now >= client.close_at \
                    and client.state == "open":
                client.planned_close(selector, now)
                client.connect(selector, now)
        for key, events in selector.select(timeout=0.02):
            client = key.data
            if client is None:
                if os.read(sys.stdin.fileno(), 4096) in (b"", b"stop\n"):
                    stopping = True
                continue
            if client.state == "connecting" and events & selectors.EVENT_WRITE:
                client.writable(selector, now)
            elif client.sock is not None:
                client.readable(selector, now)
            if client.highest == last:
                client.finish(selector)
        if not ready and all(c.position is not None for c in clients):
            ready = True
            _emit("ready", {"clients": len(clients)})
        if all(c.state == "done" for c in clients):
            break
    used = resource.getrusage(resource.RUSAGE_SELF)
    _emit("result", {"clients": [c.summary() for c in clients],
                     "cpu_s": round(used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime,
                                    2)})
    for client in clients:
        client.finish(selector)
    return 0


class ClientPool:
    """``count`` resuming clients over :data:`CLIENT_PROCS` processes (see the docstring)."""

    def __init__(self, ports: Sequence[int], count: int, total: int,
                 lifetime: Sequence[float] | None = None) -> None:
        path = f"/{CHANNEL}/{token()}"
        self._reports: queue.Queue[tuple[int, str, Any]] = queue.Queue()
        self._procs: list[subprocess.Popen[str]] = []
        self._specs: list[str] = []
        shares = [list(range(i, count, CLIENT_PROCS)) for i in range(min(CLIENT_PROCS, count))]
        for number, share in enumerate(shares):
            with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="pgws-wal-clients-",
                                             delete=False) as handle:
                json.dump({"ports": list(ports), "path": path, "total": total,
                           "lifetime": list(lifetime) if lifetime else None,
                           "numbers": share}, handle)
            self._specs.append(handle.name)
            proc = subprocess.Popen(module_command("bench.scenarios.wal", "clients",
                                                   handle.name),
                                    env=module_env(), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            self._procs.append(proc)
            threading.Thread(target=self._read, args=(number, proc), daemon=True).start()

    def _read(self, number: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, _, body = line.rstrip("\n").partition(" ")
            with contextlib.suppress(ValueError):
                self._reports.put((number, kind, json.loads(body)))
        self._reports.put((number, "exit", None))

    def _gather(self, kind: str, timeout: float) -> list[Any]:
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self._procs):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(self._procs) - len(got)} client process(es) sent no "
                                   f"{kind!r} within {timeout:g} s")
            try:
                number, got_kind, body = self._reports.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if got_kind == kind:
                got[number] = body
            elif got_kind == "exit" and number not in got:
                raise RuntimeError(f"client process {number} ended "
                                   f"(status {self._procs[number].poll()})")
        return [got[number] for number in sorted(got)]

    def wait_ready(self, timeout: float = 60.0) -> None:
        self._gather("ready", timeout)

    def _tell(self, command: str) -> None:
        for proc in self._procs:
            if proc.poll() is None and proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.write(command + "\n")
                    proc.stdin.flush()

    def finish(self, drain: float) -> dict[str, Any]:
        """Wait up to ``drain`` seconds for every client to have the last message, then stop
        the rest; every client's summary, and the totals."""
        try:
            bodies = self._gather("result", drain)
        except TimeoutError:
            self._tell("stop")
            bodies = self._gather("result", 60.0)
        clients = [c for body in bodies for c in body["clients"]]
        return {"totals": totals(clients),
                "client_cpu_s": round(sum(body["cpu_s"] for body in bodies), 1),
                "clients": clients}

    def close(self) -> None:
        self._tell("stop")
        for proc in self._procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for path in self._specs:
            with contextlib.suppress(OSError):
                os.unlink(path)


def totals(clients: list[dict[str, Any]]) -> dict[str, Any]:
    """The sums over clients, the worst client, the lost events by reason."""
    reasons: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for client in clients:
        reasons.update(event["reason"] for event in client["lost_events"])
        failures.update(client["failures"])
    outages = sorted(o for client in clients for o in client["outages"])
    out: dict[str, Any] = {"clients": len(clients)}
    for key in ("lost", "duplicated", "out_of_order", "received", "foreign", "connections",
                "resumes", "replayed", "planned_closes", "drops", "lost_event_count"):
        out[key] = sum(client[key] for client in clients)
        out[f"max_{key}_per_client"] = max((client[key] for client in clients), default=0)
    out.update({"lost_reasons": dict(reasons), "not_done": sum(1 for c in clients
                                                                if not c["done"]),
                "clients_with_loss": sum(1 for c in clients if c["lost"]),
                "clients_with_duplicates": sum(1 for c in clients if c["duplicated"]),
                "failed_attempts": dict(failures.most_common(10)),
                "resume_outage_s": {"median": round(statistics.median(outages), 3),
                                    "p99": round(outages[int(0.99 * (len(outages) - 1))], 3),
                                    "max": round(outages[-1], 3)} if outages else None})
    return out


# -- relays ------------------------------------------------------------------------------------

def relay_env(pg: Cluster, slot: str | None, admin: int | None = None,
              extra: dict[str, str] | None = None) -> dict[str, str]:
    """A relay's settings on the private cluster (harness adds secret, host, port, pings)."""
    env = {"PGWS_DB_URI": pg.uri(), "PGWS_LISTEN_CHANNEL": PREFIX,
           "PGWS_SOURCE": "wal" if slot else "notify", **(extra or {})}
    if slot:
        env["PGWS_WAL_SLOT"] = slot
    if admin:
        env["PGWS_ADMIN_PORT"] = str(admin)
    return env


def drop_slot(env: dict[str, str], timeout: float = 30.0) -> str:
    """``pgws-relay drop-slot`` for a stopped relay's slot, retried while its walsender ends."""
    command = [os.path.join(os.path.dirname(sys.executable), "pgws-relay"), "drop-slot"]
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(command, env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
        if done.returncode == 0 or time.monotonic() > deadline:
            return (done.stdout or done.stderr).strip()
        time.sleep(0.5)


def scrape(admin: int) -> dict[str, float]:
    """A relay's /metrics as {name with labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                found[name] = float(value)
    return found


def _wal_metrics(admin: int) -> dict[str, float]:
    with contextlib.suppress(OSError):
        return {name: value for name, value in scrape(admin).items()
                if re.match(r"pgws_(wal_|notifications_received|resum|replay|slow_consumers|"
                            r"listener_gaps|history_(entries|bytes))", name)}
    return {}


#: Relay log lines worth keeping in a result: errors, gaps, losses, restarts of the slot.
_NOTABLE = re.compile(r"ERROR|Traceback|gap|lost|again after|made again|over PGWS_MAX")


def notable(lines: list[str]) -> list[str]:
    return [line for line in lines if _NOTABLE.search(line) and "stats:" not in line]


def _wait_line(server: OwnedServer, text: str, timeout: float) -> float | None:
    """Seconds until one of ``server``'s lines contains ``text`` (None: not within timeout)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if any(text in line for line in server.lines):
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def _check(totals_: dict[str, Any], reconnects_allowed: bool = True) -> str | None:
    problems = [f"{totals_[key]} {key}" for key in ("lost", "duplicated", "out_of_order",
                                                     "lost_event_count", "not_done")
                if totals_[key]]
    if not reconnects_allowed and totals_["drops"]:
        problems.append(f"{totals_['drops']} connections dropped")
    return ", ".join(problems) or None


# -- part kill ---------------------------------------------------------------------------------

def kill_part(pg: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    """SIGKILL the relay every ``--kill-every`` s and start it again on the same slot and port."""
    total = int(args.rate * args.kill_seconds)
    port, admin = free_port(), free_port()
    env = relay_env(pg, "wal_kill", admin, HISTORY)
    result: dict[str, Any] = {"settings": {
        "rate": args.rate, "seconds": args.kill_seconds, "batch": BATCH,
        "kill_every": args.kill_every, "clients": args.kill_clients, "relay_env": env}}
    busy, ours, load = busy_seconds(), own_seconds(), load1()
    relay = OwnedServer("relay", port, env)
    lines: list[str] = []
    restarts: list[dict[str, Any]] = []
    pool: ClientPool | None = None
    producer: ProducerProcess | None = None
    try:
        pool = ClientPool([port], args.kill_clients, total)
        pool.wait_ready()
        producer = ProducerProcess(pg.uri(), total, args.rate)
        producer.go()
        began = time.monotonic()
        due = began + args.kill_every
        while True:
            while producer.running() and time.monotonic() < due:
                time.sleep(0.02)
            if not producer.running():
                break
            before = _wal_metrics(admin)
            killed = time.monotonic()
            relay.proc.send_signal(signal.SIGKILL)
            relay.proc.wait(10)
            lines += relay.lines
            relay = OwnedServer("relay", port, env)
            ready = time.monotonic() - killed
            caught = _wait_line(relay, "caught up with the log", 30.0)
            after = _wal_metrics(admin)
            restarts.append({
                "at_s": round(killed - began, 1),
                "ready_s": round(ready, 3),
                "caught_up_s": None if caught is None else round(ready + caught, 3),
                "read_back": after.get("pgws_notifications_received_total"),
                "lag_bytes_before_kill": before.get("pgws_wal_lag_bytes"),
                "history_entries_before_kill": before.get("pgws_history_entries")})
            print(f"   kill {len(restarts)}: ready {ready:.2f} s, caught up "
                  f"{restarts[-1]['caught_up_s']} s, read back {restarts[-1]['read_back']}",
                  flush=True)
            due += args.kill_every
        result["producer"] = producer.result()
        result.update(pool.finish(args.drain))
        result["relay_metrics_end"] = _wal_metrics(admin)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["relay_log_tail"] = relay.lines[-15:]
    finally:
        if producer is not None:
            producer.close()
        if pool is not None:
            pool.close()
        relay.stop()
        lines += relay.lines
        result["slot_dropped"] = drop_slot(env)
    result["restarts"] = restarts
    ready = [r["ready_s"] for r in restarts]
    caught = [r["caught_up_s"] for r in restarts if r["caught_up_s"] is not None]
    back = [r["read_back"] for r in restarts if r["read_back"] is not None]
    result["restart_summary"] = {
        "kills": len(restarts), "not_caught_up": len(restarts) - len(caught),
        "ready_s": _spread(ready), "caught_up_s": _spread(caught), "read_back": _spread(back)}
    result["relay_notable_lines"] = notable(lines)[:30]
    result.update(load_1m_start=load, others_cpu_s=round(busy_seconds() - busy
                                                         - (own_seconds() - ours), 1))
    if "totals" in result and "error" not in result:
        problem = _check(result["totals"])
        if problem:
            result["error"] = problem
    return result


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1]}


# -- part alternate ------------------------------------------------------------------------------

def alternate_part(pg: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    """Two relays, two slots; every client's next connection goes to the other one."""
    total = int(args.rate * args.alternate_seconds)
    envs = [relay_env(pg, slot, free_port(), HISTORY) for slot in ("wal_alt_a", "wal_alt_b")]
    ports = [free_port(), free_port()]
    result: dict[str, Any] = {"settings": {
        "rate": args.rate, "seconds": args.alternate_seconds, "batch": BATCH,
        "lifetime_s": LIFETIME, "clients": args.alternate_clients, "relays": 2}}
    busy, ours, load = busy_seconds(), own_seconds(), load1()
    relays: list[OwnedServer] = []
    pool: ClientPool | None = None
    producer: ProducerProcess | None = None
    try:
        for port, env in zip(ports, envs, strict=True):
            relays.append(OwnedServer("relay", port, env))
        pool = ClientPool(ports, args.alternate_clients, total, LIFETIME)
        pool.wait_ready()
        producer = ProducerProcess(pg.uri(), total, args.rate)
        producer.go()
        result["producer"] = producer.result(timeout=args.alternate_seconds * 2 + 60)
        result.update(pool.finish(args.drain))
        result["relay_metrics_end"] = [_wal_metrics(int(env["PGWS_ADMIN_PORT"]))
                                       for env in envs]
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["relay_log_tail"] = [line for relay in relays for line in relay.lines[-8:]]
    finally:
        if producer is not None:
            producer.close()
        if pool is not None:
            pool.close()
        for relay in relays:
            relay.stop()
        result["slots_dropped"] = [drop_slot(env) for env in envs]
    result["relay_notable_lines"] = notable([line for r in relays for line in r.lines])[:30]
    result.update(load_1m_start=load, others_cpu_s=round(busy_seconds() - busy
                                                         - (own_seconds() - ours), 1))
    if "totals" in result and "error" not in result:
        problem = _check(result["totals"])
        if problem:
            result["error"] = problem
    return result


# -- part walsender ------------------------------------------------------------------------------

def walsender_part(pg: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    """Terminate the slot's walsender every TERMINATE_EVERY s; clients stay connected."""
    total = int(args.rate * args.walsender_seconds)
    port, admin = free_port(), free_port()
    slot = "wal_walsender"
    env = relay_env(pg, slot, admin, HISTORY)
    result: dict[str, Any] = {"settings": {
        "rate": args.rate, "seconds": args.walsender_seconds, "batch": BATCH,
        "terminate_every": TERMINATE_EVERY, "clients": args.kill_clients}}
    busy, ours, load = busy_seconds(), own_seconds(), load1()
    relay = OwnedServer("relay", port, env)
    pool: ClientPool | None = None
    producer: ProducerProcess | None = None
    terminations: list[dict[str, Any]] = []
    try:
        pool = ClientPool([port], args.kill_clients, total)
        pool.wait_ready()
        producer = ProducerProcess(pg.uri(), total, args.rate)
        with psycopg.connect(pg.uri(), autocommit=True) as db:
            producer.go()
            due = time.monotonic() + TERMINATE_EVERY
            while True:
                while producer.running() and time.monotonic() < due:
                    time.sleep(0.02)
                if not producer.running():
                    break
                row = db.execute("SELECT active_pid, pg_terminate_backend(active_pid) FROM "
                                 "pg_replication_slots WHERE slot_name = %s "
                                 "AND active_pid IS NOT NULL", (slot,)).fetchone()
                terminations.append({"pid": row[0] if row else None,
                                     "terminated": bool(row and row[1])})
                due += TERMINATE_EVERY
        result["producer"] = producer.result()
        result.update(pool.finish(args.drain))
        result["relay_metrics_end"] = _wal_metrics(admin)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["relay_log_tail"] = relay.lines[-15:]
    finally:
        if producer is not None:
            producer.close()
        if pool is not None:
            pool.close()
        relay.stop()
        result["slot_dropped"] = drop_slot(env)
    again = [float(found.group(1)) for line in relay.lines
             if (found := re.search(r"again after ([\d.]+) s", line))]
    result.update({
        "terminations": len(terminations),
        "terminated": sum(1 for t in terminations if t["terminated"]),
        "relay_connection_lost_lines": relay.count("replication connection lost"),
        "relay_read_again_s": _spread(again),
        "relay_notable_lines": notable(relay.lines)[:30],
        "load_1m_start": load,
        "others_cpu_s": round(busy_seconds() - busy - (own_seconds() - ours), 1)})
    if "totals" in result and "error" not in result:
        problem = _check(result["totals"], reconnects_allowed=False)
        if problem:
            result["error"] = problem
    return result


# -- part burst ----------------------------------------------------------------------------------

def burst_once(pg: Cluster, mode: str, number: int, args: argparse.Namespace,
               texts: list[str]) -> dict[str, Any]:
    """One burst through a fresh relay of ``mode`` (``wal``: a fresh slot)."""
    slot = f"wal_burst_{number}" if mode == "wal" else None
    env = relay_env(pg, slot)
    conns = [Conn(f"/{BURST_CHANNEL}/{token()}", expected=len(texts))
             for _ in range(args.burst_clients)]
    result: dict[str, Any] = {"mode": mode, "load_1m_start": load1()}
    busy, ours = busy_seconds(), own_seconds()
    server = OwnedServer("relay", free_port(), env)
    try:
        with FrameClients("127.0.0.1", server.port, conns, procs=2,
                          timeout=args.timeout) as pool, \
                psycopg.connect(pg.uri(), autocommit=False) as db:
            cpu = server.cpu_seconds()
            pool.start()
            start = time.time()
            for low in range(0, len(texts), BURST_BATCH):
                db.execute(_EMIT[mode], (PREFIX, texts[low:low + BURST_BATCH]))
                db.commit()
            done = pool.wait_done(args.timeout)
            cpu = server.cpu_seconds() - cpu
            outcome = pool.results()
    except Exception as exc:
        result.update({"error": f"{type(exc).__name__}: {exc}",
                       "relay_log_tail": server.lines[-10:]})
        return result
    finally:
        server.stop()
        if slot:
            result["slot_dropped"] = drop_slot(env)
    per = outcome["connections"]
    delivered = sum(min(c["frames"], len(texts)) for c in per)
    end = done or outcome["last_frame"]
    result.update({
        "delivered": delivered, "expected": len(texts) * len(conns),
        "seconds": round(end - start, 4), "deliveries_per_s": delivered / max(end - start, 1e-9),
        "relay_cpu_ms_per_1000": 1e6 * cpu / max(delivered, 1),
        "client_cpu_s": round(outcome["client_cpu_s"], 2),
        "others_cpu_s": round(busy_seconds() - busy - (own_seconds() - ours), 2)})
    if done is None or delivered != len(texts) * len(conns):
        result["error"] = f"delivered {delivered:,} of {len(texts) * len(conns):,}"
    return result


def burst_part(pg: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    """``--burst-rounds`` rounds of notify and wal, the order alternating; medians, ratios."""
    messages = 2000 if args.quick else 4000
    runs: list[dict[str, Any]] = []
    for number in range(args.burst_rounds):
        texts = [payload(BURST_CHANNEL, n, BURST_SIZE) for n in range(messages)]
        for mode in (("notify", "wal") if number % 2 == 0 else ("wal", "notify")):
            run = burst_once(pg, mode, number, args, texts)
            run["round"] = number + 1
            runs.append(run)
            print(f"   burst round {number + 1} {mode:6} "
                  + (f"{run['deliveries_per_s']:>11,.0f}/s, relay "
                     f"{run['relay_cpu_ms_per_1000']:.3f} ms/1000, others' CPU "
                     f"{run['others_cpu_s']} s" if "deliveries_per_s" in run else "")
                  + (f"  ** {run['error']}" if "error" in run else ""), flush=True)
    summary: dict[str, Any] = {}
    for mode in ("notify", "wal"):
        good = [r for r in runs if r["mode"] == mode and "error" not in r]
        summary[mode] = {"runs": sum(1 for r in runs if r["mode"] == mode),
                         "failed": sum(1 for r in runs if r["mode"] == mode and "error" in r)}
        for key in ("deliveries_per_s", "relay_cpu_ms_per_1000"):
            if good:
                summary[mode][key] = _spread([r[key] for r in good])
    paired = []
    for number in sorted({r["round"] for r in runs}):
        pair = {r["mode"]: r for r in runs if r["round"] == number and "error" not in r}
        if len(pair) == 2:
            paired.append(pair["wal"]["deliveries_per_s"] / pair["notify"]["deliveries_per_s"])
    wal, notify = (summary[m].get("deliveries_per_s") for m in ("wal", "notify"))
    summary["ratio"] = wal["median"] / notify["median"] if wal and notify else None
    summary["per_round_ratios"] = _spread(paired)
    return {"summary": summary, "runs": runs, "clients": args.burst_clients,
            "messages": messages, "batch": BURST_BATCH, "payload_bytes": BURST_SIZE}


# -- part pgbench --------------------------------------------------------------------------------

def write_wal_script(directory: str, synchronous: bool = True) -> str:
    """pglimits' script with ``pg_logical_emit_message`` in ``pg_notify``'s place: one
    transaction, one message, the same 100-byte payload, pipeline mode; ``synchronous``
    False: the commit does not wait for its WAL flush."""
    path = os.path.join(directory, f"emit-1-{'sync' if synchronous else 'async'}.sql")
    with open(path, "w") as handle:
        handle.write("\\startpipeline\nBEGIN;\n"
                     + ("" if synchronous else "SET LOCAL synchronous_commit = off;\n")
                     + f"SELECT pg_logical_emit_message(true, '{PREFIX}', '{pg_payload(0)}');\n"
                     "END;\n\\endpipeline\n")
    return path


class Readers:
    """``count`` logical slots, each read by a ``pg_recvlogical`` process (see the docstring)."""

    def __init__(self, pg: Cluster, count: int) -> None:
        self.pg = pg
        self.slots = [f"recv_{i}" for i in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []
        with psycopg.connect(pg.uri(), autocommit=True) as db:
            for slot in self.slots:
                db.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        try:
            for slot in self.slots:
                self.procs.append(subprocess.Popen(
                    [_bin("pg_recvlogical"), "-d", f"host=127.0.0.1 port={pg.port} "
                     "user=postgres dbname=postgres", "--slot", slot, "--start",
                     "-o", "proto_version=1", "-o", f"publication_names={PUBLICATION}",
                     "-o", "messages=true", "-f", "/dev/null", "-s", "1", "-F", "0",
                     "--no-loop"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE))
            deadline = time.monotonic() + 60
            while self.active() < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{count - self.active()} of {count} pg_recvlogical "
                                       "did not start streaming within 60 s")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def active(self) -> int:
        with psycopg.connect(self.pg.uri(), autocommit=True) as db:
            row = db.execute("SELECT count(*) FROM pg_replication_slots WHERE active AND "
                             "slot_name LIKE 'recv\\_%%'").fetchone()
        return int(row[0]) if row else 0

    def caught_up(self, timeout: float = CATCH_UP_S) -> float | None:
        """Seconds until every slot has confirmed the end of WAL as it is now (a message
        committed after it makes each reader confirm past it); None: not within timeout."""
        start = time.monotonic()
        with psycopg.connect(self.pg.uri(), autocommit=True) as db:
            target = db.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
            db.execute("SELECT pg_logical_emit_message(true, 'marker', 'end')")
            while time.monotonic() - start < timeout:
                row = db.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name "
                                 "LIKE 'recv\\_%%' AND confirmed_flush_lsn >= %s::pg_lsn",
                                 (target,)).fetchone()
                if row and row[0] == len(self.slots):
                    return round(time.monotonic() - start, 2)
                time.sleep(0.1)
        return None

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        deadline = time.monotonic() + 30
        with psycopg.connect(self.pg.uri(), autocommit=True) as db:
            for slot in self.slots:
                while True:
                    try:
                        db.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                        break
                    except psycopg.errors.UndefinedObject:
                        break
                    except psycopg.errors.ObjectInUse:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)


def wal_run(pg: Cluster, script: str, clients: int, seconds: float, readers: Readers
            ) -> dict[str, Any]:
    """One pgbench run emitting one message per commit while ``readers`` read; a row."""
    loadavg = load1()
    producer = Pgbench(pg, script, clients, seconds)
    try:
        with CpuSplit(pg, {"pgbench": [producer.proc.pid],
                           "pg_recvlogical processes": readers.pids}) as cpu:
            result = producer.result()
    finally:
        producer.stop()
    caught = readers.caught_up()
    return {"k": 1, **result, "commits_per_s": result["tps"], "readers": len(readers.slots),
            "reader_kind": "pg_recvlogical", "caught_up_s": caught, "kept_up": caught is not None,
            "load_1m_start": loadavg, "cpu": cpu.cores()}


def pgbench_row(pg: Cluster, kind: str, scripts: dict[str, str], count: int, clients: int,
                seconds: float) -> dict[str, Any]:
    """One pgbench run of ``kind`` with ``count`` fresh readers (listeners or slots)."""
    if kind == "notify":
        listeners = Listeners(pg.uri(), count)
        try:
            row = throughput_run(pg, scripts[kind], 1, clients, seconds, listeners, None)
        finally:
            listeners.stop()
        row.update(readers=count, reader_kind="LISTEN (psycopg)")
    else:
        readers = Readers(pg, count)
        try:
            row = wal_run(pg, scripts[kind], clients, seconds, readers)
        finally:
            readers.stop()
    row["kind"] = kind
    return row


def pgbench_part(pg: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    """NOTIFY with 1/10/100 listeners against emit with 1/10/100 slots, runs alternating."""
    directory = tempfile.mkdtemp(prefix="pgws-wal-pgbench-")
    scripts = {"notify": write_script(1, directory), "wal": write_wal_script(directory),
               "wal-async": write_wal_script(directory, synchronous=False)}
    with psycopg.connect(pg.uri(), autocommit=True) as db:
        if db.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                      (PUBLICATION,)).fetchone() is None:
            db.execute(f"CREATE PUBLICATION {PUBLICATION}")
    rows: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    counts = READERS[:2] if args.quick else READERS
    clients = dict.fromkeys(KINDS, PGBENCH_CLIENTS)
    try:
        if not args.quick:
            for kind in KINDS:
                for count in SWEEP_CLIENTS:
                    row = pgbench_row(pg, kind, scripts, 1, count, args.pgbench_seconds / 2)
                    sweep.append(row)
                    print(f"   pgbench sweep {kind:9} clients={count:2}: "
                          f"{row['commits_per_s']:>9,.0f} commits/s", flush=True)
                clients[kind] = max((r for r in sweep if r["kind"] == kind),
                                    key=lambda r: r["commits_per_s"])["clients"]
        for count in counts:
            for run in range(args.pgbench_runs):
                shift = run % len(KINDS)
                for kind in KINDS[shift:] + KINDS[:shift]:
                    row = pgbench_row(pg, kind, scripts, count, clients[kind],
                                      args.pgbench_seconds)
                    row["run"] = run + 1
                    rows.append(row)
                    print(f"   pgbench {kind:9} readers={count:3} run {run + 1}: "
                          f"{row['commits_per_s']:>9,.0f} commits/s, kept up {row['kept_up']}"
                          + (f" (caught up {row.get('caught_up_s')} s)" if kind != "notify"
                             else "") + f", load {row['load_1m_start']}", flush=True)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "rows": rows, "sweep": sweep}
    summary = []
    for count in counts:
        for kind in KINDS:
            mine = [r for r in rows if r["readers"] == count and r["kind"] == kind]
            if mine:
                summary.append({"kind": kind, "readers": count, "runs": len(mine),
                                "clients": clients[kind],
                                "commits_per_s": _spread([r["commits_per_s"] for r in mine]),
                                "all_kept_up": all(r["kept_up"] for r in mine),
                                "caught_up_s": _spread([r["caught_up_s"] for r in mine
                                                        if r.get("caught_up_s") is not None])})
    return {"summary": summary, "rows": rows, "sweep": sweep, "clients": clients,
            "seconds": args.pgbench_seconds, "payload_bytes": len(pg_payload(0)),
            "pglimits_notify_reference": {"1": 35397, "10": 13835, "100": 1474}}


# -- goals and output ----------------------------------------------------------------------------

def goal_rows(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """Each part's figure, its target, and whether it is met."""
    rows: list[dict[str, Any]] = []
    labels = {"kill": "relay SIGKILLed every {kill_every:g} s, {clients} clients, "
                      "{rate:,.0f}/s for {seconds:g} s",
              "alternate": "{clients} clients alternating between 2 relays every 1-2 s, "
                           "{rate:,.0f}/s for {seconds:g} s",
              "walsender": "walsender terminated every {terminate_every:g} s, {clients} "
                           "clients, {rate:,.0f}/s for {seconds:g} s"}
    for name, label in labels.items():
        part = parts.get(name)
        if part is None:
            continue
        text = label.format(**part["settings"])
        if "totals" not in part:
            rows.append({"part": name, "label": text, "measured": f"failed: "
                         f"{part.get('error')}", "target": "0 / 0 / 0 / 0", "status": "failed"})
            continue
        t = part["totals"]
        measured = (f"{t['lost']} / {t['duplicated']} / {t['out_of_order']} / "
                    f"{t['lost_event_count']} {t['lost_reasons'] or ''}".rstrip()
                    + f" ({t['received']:,} received, {t['resumes']:,} resumes, "
                    f"{t['drops'] + t['planned_closes']:,} reconnects)")
        rows.append({"part": name, "label": f"{text}: lost / duplicated / out of order / lost "
                     "events", "measured": measured, "target": "0 / 0 / 0 / 0",
                     "status": "met" if "error" not in part else "missed"})
    burst = parts.get("burst")
    if burst is not None:
        s = burst["summary"]
        ratio = s.get("ratio")
        per = s.get("per_round_ratios")
        rows.append({"part": "burst", "label": f"burst N={burst['clients']:,} "
                     f"B={burst['batch']}: deliveries/s wal / notify" + (
                         f" ({s['wal']['deliveries_per_s']['median']:,.0f} / "
                         f"{s['notify']['deliveries_per_s']['median']:,.0f})" if ratio else ""),
                     "measured": "failed" if ratio is None else f"{ratio:.3f}×" + (
                         f" (per round {per['median']:.3f}, {per['min']:.2f}–{per['max']:.2f})"
                         if per else ""),
                     "target": f"≥ {BURST_GOAL:g}×", "status": "failed" if ratio is None
                     else "met" if ratio >= BURST_GOAL else "missed"})
    bench = parts.get("pgbench")
    if bench is not None and "summary" in bench:
        by = {(s["kind"], s["readers"]): s for s in bench["summary"]}
        for count in READERS:
            notify = by.get(("notify", count))
            for kind in ("wal", "wal-async"):
                wal = by.get((kind, count))
                if not (wal and notify):
                    continue
                mine, theirs = wal["commits_per_s"]["median"], notify["commits_per_s"]["median"]
                rows.append({"part": "pgbench", "label": f"commits/s, one message per commit, "
                             f"{count} slot(s) read ({kind}) / {count} LISTENer(s)",
                             "measured": f"{mine:,.0f} / {theirs:,.0f} ({mine / theirs:.2f}×; "
                             f"kept up {wal['all_kept_up']} / {notify['all_kept_up']})",
                             "target": "–", "status": "–"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="kill, alternate, walsender: messages/s")
    parser.add_argument("--kill-seconds", type=float, help="default 300, --quick 30")
    parser.add_argument("--kill-every", type=float, default=10.0)
    parser.add_argument("--kill-clients", type=int, default=100,
                        help="clients of parts kill and walsender")
    parser.add_argument("--alternate-seconds", type=float, help="default 120, --quick 20")
    parser.add_argument("--alternate-clients", type=int, default=20)
    parser.add_argument("--walsender-seconds", type=float, help="default 120, --quick 20")
    parser.add_argument("--drain", type=float, default=60.0,
                        help="seconds the clients may take to get the last message")
    parser.add_argument("--burst-rounds", type=int, help="default 5, --quick 1")
    parser.add_argument("--burst-clients", type=int, help="default 1000, --quick 200")
    parser.add_argument("--timeout", type=float, default=180.0, help="burst: seconds per run")
    parser.add_argument("--pgbench-runs", type=int, help="default 3, --quick 1")
    parser.add_argument("--pgbench-seconds", type=float, help="default 10, --quick 3")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--note", action="append", default=[], help="a line for the notes")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(PARTS)}")
    for name, full, small in (("kill_seconds", 300.0, 30.0), ("alternate_seconds", 120.0, 20.0),
                              ("walsender_seconds", 120.0, 20.0), ("burst_rounds", 5, 1),
                              ("burst_clients", 1000, 200), ("pgbench_runs", 3, 1),
                              ("pgbench_seconds", 10.0, 3.0)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    head = {"scenario": "wal", "what": "the WAL source: SIGKILLed relays, two relays "
            "alternating, terminated walsenders, the burst against NOTIFY, pgbench with slots "
            "against LISTENers (see the script's docstring)",
            "command": "python -m bench.scenarios.wal " + shlex.join(sys.argv[1:]),
            "commit": commit(), "machine": machine(), "quick": args.quick,
            "started": time.strftime("%F %T"), "postgres_settings": PG_SETTINGS,
            "load_average_start": [round(x, 2) for x in os.getloadavg()],
            "notes": list(args.note)}
    results: dict[str, Any] = {}

    def save(complete: bool) -> None:
        if args.json:
            write_json(args.json, {**head, "complete": complete,
                                   "load_average_end": [round(x, 2) for x in os.getloadavg()],
                                   "parts": results, "goals": goal_rows(results)})

    remove_stale()
    runners = {"kill": kill_part, "alternate": alternate_part, "walsender": walsender_part,
               "burst": burst_part, "pgbench": pgbench_part}
    with Cluster(port=free_port(), fast=False, settings=PG_SETTINGS) as pg:
        with psycopg.connect(pg.uri(), autocommit=True) as db:
            head["postgres_version"] = db.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        for part in parts:
            print(f"== {part}", flush=True)
            started = time.monotonic()
            try:
                results[part] = runners[part](pg, args)
            except Exception as exc:  # A part that fails is a result.
                results[part] = {"error": f"{type(exc).__name__}: {exc}"}
            results[part]["part_seconds"] = round(time.monotonic() - started, 1)
            _print_part(part, results[part])
            save(False)
    print("-- goals")
    for row in goal_rows(results):
        print(f"   {row['part']}: {row['label']}: {row['measured']} (target {row['target']}): "
              f"{row['status']}")
    print(f"reproduce: {head['command']}")
    save(True)
    if args.json:
        print(f"wrote {args.json}")


def _print_part(part: str, result: dict[str, Any]) -> None:
    keys = {"kill": ("totals", "restart_summary", "producer", "relay_notable_lines"),
            "alternate": ("totals", "producer", "relay_notable_lines"),
            "walsender": ("totals", "terminated", "relay_connection_lost_lines",
                          "relay_read_again_s", "producer"),
            "burst": ("summary",), "pgbench": ("summary",)}[part]
    for key in (*keys, "error", "part_seconds"):
        if key in result:
            print(f"   {key}: {json.dumps(result[key])}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "produce":
        sys.exit(produce_main(sys.argv[2]))
    if len(sys.argv) == 3 and sys.argv[1] == "clients":
        sys.exit(clients_main(sys.argv[2]))
    main()

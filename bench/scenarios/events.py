"""Server-Sent Events: the event-stream burst against the WebSocket burst, and a real browser's
``EventSource`` and the JavaScript client library across a connection reset every second.

    flock /tmp/machine.lock python -m bench.scenarios.events --json bench/results/events.json
    python -m bench.scenarios.events --quick                   # a smoke run, about a minute
    python -m bench.scenarios.events --parts browser           # of burst,browser

Theory of operation
-------------------
Everything talks over loopback to the real ``pgws-relay`` command of this venv
(:class:`bench.parts.harness.OwnedServer`, the harness's settings: its secret, a listen channel
private to this run, pings every hour) with its default history (on: 1,000 deliveries, 128 MiB,
300 s per channel), so every event-stream delivery carries ``id: POSITION``. NOTIFYs go
through the machine's shared PostgreSQL (``PGWS_BENCH_DB_URI``, default
``postgresql://postgres@127.0.0.1:5432/postgres``). Needs root for ``ss -K`` (part browser).

- ``burst``: bench/scenarios/throughput.py's burst at N = ``--clients`` (1,000) clients of one
  channel, once over WebSocket and once as event streams, in ``--rounds`` (5) rounds whose
  order alternates (ws, sse; sse, ws; …); a fresh relay per run, same build, same machine.
  ``--messages`` (4,000) 340-byte ``fill_event`` payloads (:func:`bench.parts.harness.payload`)
  are committed :data:`BATCH` per transaction, one ``pg_notify`` statement each
  (:class:`bench.parts.harness.Producer`). The clients run in :data:`CLIENT_PROCS` processes,
  one epoll each. WebSocket: :class:`bench.parts.harness.FrameClients` (plain connections, no
  subprotocol, so no positions: the existing burst's clients and bytes, frames walked in C).
  Event streams: :class:`SseClients` (``python -m bench.scenarios.events sse-clients SPEC``,
  the same reporting protocol): ``GET /fill_event/TOKEN`` with ``Accept: text/event-stream``
  on a raw socket, then events counted at their empty line (``\\n\\n``), lines found with
  ``memchr`` in C (:data:`_EVENTS_C`; the frame walk's equivalent): deliveries are the events
  less named events (an ``event:`` line: the opening ``position`` and any checkpoint) less
  comments (keep-alives). Counting in Python instead (three ``bytes.count`` passes over every
  byte, the fallback without a C compiler) cost the clients twice the WebSocket clients' CPU,
  and on this 2-core machine put SSE at 0.54× in a first run. Deliveries/s is what every
  client received over the time from just before the first statement to the moment the last
  client had its last delivery; relay CPU is read from /proc around the same span. The
  figures are the medians per transport and the ratio of medians sse / ws, with the
  per-round ratios (goal ≥ :data:`BURST_GOAL`).
- ``browser``: headless Chromium (``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` through
  Selenium, as tests/browser) opens a page the relay serves itself: the relay's
  ``PGWS_ROOT_PATH`` is a temporary directory holding :data:`PAGE` and a copy of
  ``clients/js/index.js``, so the page, its module and the streams are one origin. The page
  opens three subscriptions to channel ``chat`` at once: ``eventsource`` (a bare
  ``EventSource("/chat/TOKEN")``), ``library-ws`` and ``library-sse`` (the library's
  ``subscribe("http://…/chat", {token, transport})``, default options: backoff 500 ms to
  30 s, full jitter). When all three are open, a producer thread commits
  ``{"channel":"chat","n":N}``, N = 0, 1, 2 …, one per transaction, at ``--rate`` (100) per
  second for ``--seconds`` (60; --quick 15), paced against the clock, and every
  :data:`RESET_EVERY` s ``ss -K src 127.0.0.1 sport = PORT`` destroys the relay's side of
  every connection to it (the killed count is recorded). The browser reconnects by itself:
  ``EventSource`` after its default delay (the relay sends no ``retry:``), the library after
  its backoff, both with the last position (``Last-Event-ID``, ``?from=``). After the last
  commit the resets stop and each mode has :data:`DRAIN_S` s to receive the last N. Per mode:
  lost (never received), duplicated (received again), out of order (first received after a
  higher N), ``lost`` events, ``resumed`` events (``eventsource``) or connections (library),
  and reconnect times: for each drop the page saw (``error`` for EventSource, the library's
  ``reconnecting`` status), the seconds from the reset that caused it to the next open
  (``open`` / ``connected``). Goal: every message exactly once, in order, no ``lost`` event.
  All clients come from 127.0.0.1: the three modes' resumes, about three a second, stay under
  the relay's default ``PGWS_MAX_RESUMES_PER_SECOND_PER_IP`` (10/s, bursts of 20).

The machine is shared: each run waits (at most :data:`SETTLE_S` s) for a quiet second, and
records the 1-minute load average and the CPU the rest of the machine used meanwhile
(``others_cpu_s``). A part that fails is a result (its error, the relay's last lines), not the
end of the invocation.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import queue
import selectors
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import psycopg

from bench.parts.harness import (
    DB_URI,
    LISTEN,
    Conn,
    FrameClients,
    OwnedServer,
    Producer,
    busy_seconds,
    compile_library,
    free_port,
    git_head,
    machine,
    own_seconds,
    raise_nofile,
    settle,
    token,
    write_json,
)
from bench.parts.paths import ROOT, module_command, module_env
from bench.parts.workloads import PAYLOAD

PARTS = ("burst", "browser")
#: Load-client processes of part burst: the machine has 2 cores, and the existing burst uses 2.
CLIENT_PROCS = 2
#: Part burst: messages per transaction (the existing burst's B = 100), its channel, the goal.
BATCH = 100
BURST_CHANNEL = "fill_event"
BURST_GOAL = 0.8
#: Part burst: seconds a run may take before it is a failure.
RUN_TIMEOUT = 180.0
#: Seconds to wait for a quiet second before each run (others' test suites come in bursts).
SETTLE_S = 30.0
#: Part browser: seconds between connection resets, the channel, seconds to wait for the last
#: message after the last commit (EventSource waits ~3 s per reconnect, the library's backoff
#: at most 30 s).
RESET_EVERY = 1.0
BROWSER_CHANNEL = "chat"
DRAIN_S = 45.0
MODES = ("eventsource", "library-ws", "library-sse")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: The page: imports the library (served next to it) and says when it has.
PAGE = """<!doctype html>
<meta charset="utf-8">
<title>pgws-relay: event streams across resets</title>
<p>bench/scenarios/events.py</p>
<script type="module">
import { subscribe } from "/index.js";
window.pgwsSubscribe = subscribe;
</script>
"""
#: Opens one mode's subscription and records into window.rec[mode]: the N of every message,
#: lost and resumed events, opens and drops (milliseconds since the epoch), library statuses.
_OPEN = """
const [mode, origin, token] = arguments;
window.rec = window.rec || {};
window.feeds = window.feeds || {};
const rec = {ns: [], lost: [], resumed: [], opens: [], drops: [], statuses: [], failure: null,
             bad: 0};
window.rec[mode] = rec;
const take = (text) => {
  try { rec.ns.push(JSON.parse(text).n); } catch (e) { rec.bad += 1; }
};
if (mode === "eventsource") {
  const source = new EventSource(`/chat/${token}`);
  source.onopen = () => rec.opens.push(Date.now());
  source.onerror = () => rec.drops.push(Date.now());
  source.onmessage = (event) => take(event.data);
  source.addEventListener("lost", (event) => rec.lost.push(JSON.parse(event.data)));
  source.addEventListener("resumed", (event) =>
    rec.resumed.push([Date.now(), JSON.parse(event.data).replayed]));
  window.feeds[mode] = source;
} else {
  const feed = window.pgwsSubscribe(`${origin}/chat`, {
    token, transport: mode === "library-ws" ? "websocket" : "sse",
    onStatus: (s) => {
      const now = Date.now();
      if (s.state === "connected") rec.opens.push(now);
      if (s.state === "reconnecting") rec.drops.push(now);
      rec.statuses.push([now, s.state, s.why ?? null, s.delay ?? null, s.replayed ?? null]);
    },
  });
  window.feeds[mode] = feed;
  (async () => {
    try {
      for await (const event of feed) {
        if (event.type === "message") take(event.payload);
        else rec.lost.push({reason: event.reason, position: event.position});
      }
    } catch (error) {
      rec.failure = `${error.name}: ${error.message}`;
    }
  })();
}
"""


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "count": len(ordered)}


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# -- event-stream load clients (one process per share) ---------------------------------------

def _emit(kind: str, body: Any) -> None:
    sys.stdout.write(f"{kind} {json.dumps(body)}\n")
    sys.stdout.flush()


def open_stream(host: str, port: int, path: str, timeout: float = 30.0
                ) -> tuple[socket.socket, bytes]:
    """``GET path`` asking for an event stream: (non-blocking socket, body bytes already read);
    raises ConnectionError unless the answer is 200."""
    sock = socket.socket()
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the response head")
            head += chunk
            if len(head) > 65536:
                raise ConnectionError("no end of the response head")
        head, rest = head.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if not status.startswith("HTTP/1.1 200"):
            raise ConnectionError(status)
        sock.setblocking(False)
        return sock, rest
    except BaseException:
        sock.close()
        raise


#: The event walk of :class:`_Stream` in C: the load clients must stay far cheaper than the
#: relay they load, and counting patterns with ``bytes.count`` reads every byte three times
#: (about a microsecond a delivery, more than the relay spends). Lines are found with
#: ``memchr``; an empty line ends an event, which is a delivery (``id:``/``data:`` lines), a
#: named event (an ``event:`` line) or a comment (``:`` lines). ``state`` carries "at a line's
#: start" and the current event's kind from one read to the next. Built once with the system's
#: C compiler into the temporary directory (as bench/parts/harness.py's frame walk); without
#: one, :meth:`_Stream.feed` counts in Python.
_EVENTS_C = r"""
#include <string.h>
void walk(const unsigned char *buf, long n, long *state, long *counts) {
    long pos = 0, at_start = state[0], kind = state[1];
    while (pos < n) {
        if (at_start) {
            unsigned char c = buf[pos];
            if (c == '\n') {
                if (kind) counts[kind - 1]++;
                kind = 0;
                pos++;
                continue;
            }
            if (c == ':') { if (!kind) kind = 3; }
            else if (c == 'e') kind = 2;
            else if (!kind) kind = 1;
            at_start = 0;
        }
        const unsigned char *nl = memchr(buf + pos, '\n', n - pos);
        if (!nl) break;
        pos = nl - buf + 1;
        at_start = 1;
    }
    state[0] = at_start;
    state[1] = kind;
}
"""


def build_event_walker() -> str | None:
    """Compile :data:`_EVENTS_C` (once per source text); the library's path, or None."""
    return compile_library(_EVENTS_C, "events")


def _load_event_walker(path: str | None) -> Any:
    if not path:
        return None
    try:
        library = ctypes.CDLL(path)
    except OSError:
        return None
    function = library.walk
    function.restype = None
    function.argtypes = [ctypes.c_char_p, ctypes.c_long, ctypes.POINTER(ctypes.c_long),
                         ctypes.POINTER(ctypes.c_long)]
    return function


#: Set in an event-stream client process from its spec.
_event_walker: Any = None


class _Stream:
    """One event stream's counts: by :data:`_EVENTS_C`, or in Python, where each pattern is
    searched in the read with the few bytes before it that could begin a match (one less than
    its length), so nothing is counted twice or missed at a read's edge; the body counts as
    preceded by a line feed."""

    __slots__ = ("closed", "comments", "counts", "events", "expected", "named", "nbytes",
                 "sock", "state", "tail")

    def __init__(self, sock: socket.socket, expected: int | None, rest: bytes) -> None:
        self.sock = sock
        self.expected = expected
        self.events = self.named = self.comments = self.nbytes = 0
        self.tail = b"\n"
        self.state = (ctypes.c_long * 2)(1, 0)
        self.counts = (ctypes.c_long * 3)(0, 0, 0)
        self.closed = False
        if rest:
            self.feed(rest)

    def feed(self, data: bytes) -> None:
        self.nbytes += len(data)
        if _event_walker is not None:
            _event_walker(data, len(data), self.state, self.counts)
            self.named, self.comments = self.counts[1], self.counts[2]
            self.events = self.counts[0] + self.named + self.comments
            return
        one = self.tail[-1:] + data
        self.events += one.count(b"\n\n")
        self.comments += one.count(b"\n:")
        self.named += (self.tail[-7:] + data).count(b"\nevent: ")
        self.tail = (self.tail + data)[-7:] if len(data) < 7 else data[-7:]

    @property
    def deliveries(self) -> int:
        return self.events - self.named - self.comments

    def result(self) -> dict[str, Any]:
        got = self.deliveries
        return {"frames": got, "events": self.events, "named": self.named,
                "comments": self.comments, "bytes": self.nbytes, "closed": self.closed,
                "missing": max(0, (self.expected or 0) - got),
                "extra": max(0, got - self.expected) if self.expected is not None else 0}


def sse_clients_main(spec_path: str) -> int:
    """One event-stream client process (run by :class:`SseClients`): opens its streams, says
    ``ready``, waits for ``go`` on stdin, reads until ``stop`` (or stdin closes, or the
    timeout), saying ``done`` when all its streams have their expected deliveries; then writes
    its ``result``. The reports are :func:`bench.parts.harness.frame_client_main`'s."""
    global _event_walker
    with open(spec_path) as handle:
        spec = json.load(handle)
    raise_nofile()
    _event_walker = _load_event_walker(spec.get("walker"))
    streams: list[_Stream] = []
    try:
        for conn in spec["connections"]:
            sock, rest = open_stream(spec["host"], spec["port"], conn["path"])
            streams.append(_Stream(sock, conn["expected"], rest))
    except (OSError, ValueError) as exc:
        _emit("error", f"stream {len(streams) + 1} of {len(spec['connections'])}: "
                       f"{type(exc).__name__}: {exc}")
        return 1
    _emit("ready", {"connections": len(streams), "negotiated": 0,
                    "walker": "C" if _event_walker is not None else "Python"})
    if sys.stdin.readline().strip() != "go":
        return 0
    usage = os.times()
    cpu_start = usage.user + usage.system
    selector = selectors.DefaultSelector()
    for stream in streams:
        selector.register(stream.sock, selectors.EVENT_READ, stream)
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    commands = b""
    waiting = {s for s in streams if s.expected is not None and s.deliveries < s.expected}
    done_at = time.time() if not waiting else None
    if done_at is not None:
        _emit("done", {"phase": 0, "at": done_at})
    last_frame = 0.0
    deadline = time.monotonic() + spec["timeout"]
    stopping = timed_out = False
    while not stopping:
        if time.monotonic() > deadline:
            timed_out = True
            break
        for key, _ in selector.select(timeout=0.2):
            stream = key.data
            if stream is None:
                chunk = os.read(sys.stdin.fileno(), 4096)
                commands += chunk
                if not chunk or b"stop" in commands:
                    stopping = True
                continue
            try:
                data = stream.sock.recv(1 << 18)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                stream.closed = True
                selector.unregister(stream.sock)
            else:
                stream.feed(data)
                last_frame = time.time()
            if stream in waiting and (stream.closed or stream.deliveries >= stream.expected):
                waiting.discard(stream)
                if not waiting:
                    done_at = time.time()
                    _emit("done", {"phase": 0, "at": done_at})
    usage = os.times()
    _emit("result", {"connections": [s.result() for s in streams], "last_frame": last_frame,
                     "done_at": done_at, "timed_out": timed_out,
                     "cpu_s": usage.user + usage.system - cpu_start,
                     "pending": len(waiting)})
    for stream in streams:
        stream.sock.close()
    return 0


class SseClients(FrameClients):
    """:class:`bench.parts.harness.FrameClients` with event-stream processes
    (:func:`sse_clients_main`) in place of its frame clients: the same start, wait, results
    and close over the same reports."""

    def __init__(self, host: str, port: int, connections: Sequence[Conn],
                 procs: int = CLIENT_PROCS, timeout: float = RUN_TIMEOUT,
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
        walker = build_event_walker()
        try:
            for number, share in enumerate(self.shares):
                spec = {"host": host, "port": port, "timeout": timeout, "walker": walker,
                        "connections": [{"path": self.connections[i].path,
                                         "expected": self.connections[i].expected}
                                        for i in share]}
                with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="pgws-sse-",
                                                 delete=False) as handle:
                    json.dump(spec, handle)
                self._specs.append(handle.name)
                proc = subprocess.Popen(module_command("bench.scenarios.events", "sse-clients",
                                                       handle.name),
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
            self.walker = ready[0]["walker"]
        except BaseException:
            self.close()
            raise


# -- part burst --------------------------------------------------------------------------------

def burst_once(transport: str, args: argparse.Namespace) -> dict[str, Any]:
    """One burst through a fresh relay to ``--clients`` clients of ``transport``."""
    path = f"/{BURST_CHANNEL}/{token({'mode': 'r'})}"
    conns = [Conn(path, expected=args.messages) for _ in range(args.clients)]
    waited, quiet = settle(SETTLE_S)
    result: dict[str, Any] = {"transport": transport, "load_1m_start": load1(),
                              "settle_s": waited, "quiet": quiet}
    busy, ours = busy_seconds(), own_seconds()
    server = OwnedServer("relay", free_port())
    try:
        pool_class = SseClients if transport == "sse" else FrameClients
        with pool_class("127.0.0.1", server.port, conns, procs=CLIENT_PROCS,
                        timeout=RUN_TIMEOUT) as pool:
            producer = Producer()
            try:
                cpu = server.cpu_seconds()
                pool.start()
                start = time.time()
                producer.burst([BURST_CHANNEL], args.messages, BATCH, PAYLOAD)
                done = pool.wait_done(RUN_TIMEOUT)
                cpu = server.cpu_seconds() - cpu
            finally:
                producer.close()
            outcome = pool.results()
    except Exception as exc:
        result.update({"error": f"{type(exc).__name__}: {exc}",
                       "relay_log_tail": server.lines[-10:]})
        return result
    finally:
        server.stop()
    per = outcome["connections"]
    delivered = sum(min(c["frames"], args.messages) for c in per)
    expected = args.messages * len(conns)
    end = done or outcome["last_frame"]
    result.update({
        "delivered": delivered, "expected": expected, "seconds": round(end - start, 4),
        "deliveries_per_s": delivered / max(end - start, 1e-9),
        "relay_cpu_ms_per_1000": 1e6 * cpu / max(delivered, 1),
        "relay_peak_rss_kib": server.memory_kib("VmHWM") if server.proc.poll() is None
        else None,
        "bytes_per_client": statistics.median(c["bytes"] for c in per),
        "client_cpu_s": round(outcome["client_cpu_s"], 2),
        "client_reader": pool.walker,
        "others_cpu_s": round(busy_seconds() - busy - (own_seconds() - ours), 2)})
    if transport == "sse":
        result["named_events"] = sum(c["named"] for c in per)
        result["comments"] = sum(c["comments"] for c in per)
    if done is None or delivered != expected:
        result["error"] = f"delivered {delivered:,} of {expected:,}"
    return result


def burst_part(args: argparse.Namespace) -> dict[str, Any]:
    """``--rounds`` rounds of ws and sse, the order alternating; medians, ratios."""
    runs: list[dict[str, Any]] = []
    for number in range(args.rounds):
        for transport in (("ws", "sse") if number % 2 == 0 else ("sse", "ws")):
            run = burst_once(transport, args)
            run["round"] = number + 1
            runs.append(run)
            print(f"   burst round {number + 1} {transport:3} "
                  + (f"{run['deliveries_per_s']:>11,.0f}/s, relay "
                     f"{run['relay_cpu_ms_per_1000']:.3f} ms/1000, {run['seconds']:.2f} s, "
                     f"others' CPU {run['others_cpu_s']} s" if "deliveries_per_s" in run
                     else "")
                  + (f"  ** {run['error']}" if "error" in run else ""), flush=True)
    summary: dict[str, Any] = {}
    for transport in ("ws", "sse"):
        mine = [r for r in runs if r["transport"] == transport]
        good = [r for r in mine if "error" not in r]
        summary[transport] = {"runs": len(mine), "failed": len(mine) - len(good)}
        for key in ("deliveries_per_s", "relay_cpu_ms_per_1000", "bytes_per_client"):
            if good:
                summary[transport][key] = _spread([r[key] for r in good])
    paired = []
    for number in sorted({r["round"] for r in runs}):
        pair = {r["transport"]: r for r in runs if r["round"] == number and "error" not in r}
        if len(pair) == 2:
            paired.append(pair["sse"]["deliveries_per_s"] / pair["ws"]["deliveries_per_s"])
    sse, ws = (summary[t].get("deliveries_per_s") for t in ("sse", "ws"))
    summary["ratio"] = sse["median"] / ws["median"] if sse and ws else None
    cpu_sse, cpu_ws = (summary[t].get("relay_cpu_ms_per_1000") for t in ("sse", "ws"))
    summary["cpu_ratio"] = cpu_sse["median"] / cpu_ws["median"] if cpu_sse and cpu_ws else None
    summary["per_round_ratios"] = _spread(paired)
    return {"summary": summary, "runs": runs, "clients": args.clients,
            "messages": args.messages, "batch": BATCH, "payload_bytes": PAYLOAD,
            "history": "on (the relay's defaults): event-stream deliveries carry id: POSITION; "
                       "the WebSocket clients offer no subprotocol, so their frames carry none"}


# -- part browser ------------------------------------------------------------------------------

class Paced:
    """A thread committing ``{"channel":"chat","n":N}`` one per transaction at ``rate``/s for
    ``seconds``, paced against the clock (see the docstring)."""

    def __init__(self, rate: float, seconds: float) -> None:
        self.rate, self.seconds = rate, seconds
        self.sent = 0
        self.late = 0.0
        self.first_commit = self.last_commit = 0.0
        self.error: str | None = None
        self._stop = threading.Event()
        self._db = psycopg.connect(DB_URI, autocommit=True)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            total = int(self.rate * self.seconds)
            start = time.monotonic()
            for n in range(total):
                if self._stop.is_set():
                    break
                delay = start + n / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    self.late = max(self.late, -delay)
                self._db.execute("SELECT pg_notify(%s, %s)", (
                    LISTEN, json.dumps({"channel": BROWSER_CHANNEL, "n": n},
                                       separators=(",", ":"))))
                self.last_commit = time.time()
                self.first_commit = self.first_commit or self.last_commit
                self.sent = n + 1
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def start(self) -> None:
        self._thread.start()

    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._db.close()

    def result(self) -> dict[str, Any]:
        return {"sent": self.sent, "seconds": round(self.last_commit - self.first_commit, 3),
                "max_late_s": round(self.late, 4), "error": self.error}


def reset(port: int) -> tuple[float, int, str]:
    """``ss -K src 127.0.0.1 sport = PORT``: (when, sockets destroyed, stderr)."""
    at = time.time()
    done = subprocess.run(["ss", "-K", "-H", "src", "127.0.0.1", "sport", "=", str(port)],
                          capture_output=True, text=True, timeout=30)
    return at, len([line for line in done.stdout.splitlines() if line.strip()]), \
        done.stderr.strip()


def analyse(rec: dict[str, Any], sent: int, resets: list[float]) -> dict[str, Any]:
    """Lost / duplicated / out of order over N = 0 … sent - 1, and reconnect times."""
    ns = [n for n in rec["ns"] if isinstance(n, int)]
    seen: set[int] = set()
    duplicated = out_of_order = 0
    highest = -1
    for n in ns:
        if n in seen:
            duplicated += 1
            continue
        seen.add(n)
        if n < highest:
            out_of_order += 1
        highest = max(highest, n)
    lost = [n for n in range(sent) if n not in seen]
    # Reconnect times: each drop (the first after an open) to the next open, counted from the
    # reset at or before the drop.
    opens = sorted(t / 1000 for t in rec["opens"])
    drops = sorted(t / 1000 for t in rec["drops"])
    times, from_drop, unreconnected = [], [], 0
    handled_until = 0.0
    for drop in drops:
        if drop < handled_until:  # A failed attempt of a reconnect already counted.
            continue
        following = [o for o in opens if o > drop]
        cause = max((r for r in resets if r <= drop + 0.001), default=None)
        if not following:
            unreconnected += 1
            handled_until = float("inf")
            continue
        handled_until = following[0]
        from_drop.append(following[0] - drop)
        if cause is not None:
            times.append(following[0] - cause)
    replayed = [r[1] for r in rec["resumed"]] + [s[4] or 0 for s in rec.get("statuses", [])
                                                 if s[1] == "connected"]
    statuses = Counter(s[1] for s in rec.get("statuses", []))
    whys = Counter(s[2] for s in rec.get("statuses", []) if s[1] == "reconnecting")
    return {"received": len(ns), "unique": len(seen), "expected": sent, "lost": len(lost),
            "lost_first": lost[:20], "duplicated": duplicated, "out_of_order": out_of_order,
            "lost_events": len(rec["lost"]), "lost_event_samples": rec["lost"][:5],
            "unparsed": rec["bad"], "failure": rec["failure"],
            "opens": len(opens), "drops_seen": len(drops),
            "resumed_events": len(rec["resumed"]),
            # EventSource: the resumed events' counts; the library: its connected statuses'.
            "replayed": sum(replayed), "replayed_max": max(replayed, default=0),
            "reconnect_s_from_reset": _spread([round(t, 3) for t in times]),
            "reconnect_s_from_drop": _spread([round(t, 3) for t in from_drop]),
            "never_reconnected": unreconnected,
            "statuses": dict(statuses), "reconnecting_why": dict(whys),
            "library_delays_ms": _spread([s[3] for s in rec.get("statuses", [])
                                          if s[1] == "reconnecting" and s[3] is not None])}


def _chromium() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,960", "--no-first-run",
                     "--disable-extensions"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _wait(browser: Any, script: str, timeout: float, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(
        lambda driver: driver.execute_script(script), what)


def browser_part(args: argparse.Namespace) -> dict[str, Any]:
    """The three modes in one page across a reset every second (see the docstring)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return {"error": f"{path} not found"}
    if os.geteuid() != 0:
        return {"error": "ss -K needs root"}
    settings = {"rate": args.rate, "seconds": args.seconds, "reset_every": RESET_EVERY,
                "drain_s": DRAIN_S, "modes": list(MODES)}
    result: dict[str, Any] = {"settings": settings, "load_1m_start": load1()}
    read = token({"mode": "r", "channel": BROWSER_CHANNEL})
    with tempfile.TemporaryDirectory(prefix="pgws-events-page-") as root:
        with open(os.path.join(root, "index.html"), "w") as handle:
            handle.write(PAGE)
        shutil.copy(os.path.join(ROOT, "clients", "js", "index.js"),
                    os.path.join(root, "index.js"))
        busy, ours = busy_seconds(), own_seconds()
        server = OwnedServer("relay", free_port(), {"PGWS_ROOT_PATH": root})
        origin = f"http://127.0.0.1:{server.port}"
        browser = producer = None
        resets: list[tuple[float, int, str]] = []
        try:
            browser = _chromium()
            result["browser_version"] = browser.capabilities.get("browserVersion")
            browser.get(origin + "/")
            _wait(browser, "return typeof window.pgwsSubscribe === 'function'", 30,
                  "the library imported")
            for mode in MODES:
                browser.execute_script(_OPEN, mode, origin, read)
            _wait(browser, "return window.feeds.eventsource.readyState === 1 && "
                  "window.feeds['library-ws'].connected && "
                  "window.feeds['library-sse'].connected", 30, "every mode connected")
            producer = Paced(args.rate, args.seconds)
            producer.start()
            next_reset = time.monotonic() + RESET_EVERY
            while producer.running():
                time.sleep(max(0.0, next_reset - time.monotonic()))
                next_reset += RESET_EVERY
                if producer.running():
                    resets.append(reset(server.port))
            producer.close()
            sent = producer.sent
            last = sent - 1
            drain_start = time.monotonic()
            check = " && ".join(f"window.rec['{m}'].ns.includes({last})" for m in MODES)
            with contextlib.suppress(Exception):
                _wait(browser, f"return {check}", DRAIN_S, "the last message everywhere")
            result["drain_s"] = round(time.monotonic() - drain_start, 2)
            recs = browser.execute_script("return window.rec")
            reset_times = [at for at, _, _ in resets]
            result["modes"] = {mode: analyse(recs[mode], sent, reset_times) for mode in MODES}
            result["producer"] = producer.result()
            result["resets"] = {"count": len(resets),
                                "sockets_destroyed": sum(n for _, n, _ in resets),
                                "with_nothing_destroyed": sum(1 for _, n, _ in resets if n == 0),
                                "errors": sorted({e for _, _, e in resets if e})[:5]}
            result["relay_notable_lines"] = [line for line in server.lines
                                             if "ERROR" in line or "Traceback" in line][:20]
            result["others_cpu_s"] = round(busy_seconds() - busy - (own_seconds() - ours), 1)
            problems = [f"{mode}: " + ", ".join(f"{row[key]} {key}" for key in
                                                 ("lost", "duplicated", "out_of_order",
                                                  "lost_events") if row[key])
                        for mode, row in result["modes"].items()
                        if any(row[key] for key in ("lost", "duplicated", "out_of_order",
                                                    "lost_events"))]
            if problems:
                result["error"] = "; ".join(problems)
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["relay_log_tail"] = server.lines[-10:]
        finally:
            if producer is not None:
                producer.close()
            if browser is not None:
                with contextlib.suppress(Exception):
                    browser.execute_script(
                        "for (const f of Object.values(window.feeds || {})) f.close()")
                browser.quit()
            server.stop()
    return result


# -- goals and output --------------------------------------------------------------------------

def goal_rows(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """Each part's figure, its target, and whether it is met."""
    rows: list[dict[str, Any]] = []
    burst = parts.get("burst")
    if burst is not None and "summary" in burst:
        s = burst["summary"]
        ratio, per = s.get("ratio"), s.get("per_round_ratios")
        rows.append({"part": "burst", "label": f"burst N={burst['clients']:,} "
                     f"B={burst['batch']}, history on: deliveries/s sse / ws" + (
                         f" ({s['sse']['deliveries_per_s']['median']:,.0f} / "
                         f"{s['ws']['deliveries_per_s']['median']:,.0f})" if ratio else ""),
                     "measured": "failed" if ratio is None else f"{ratio:.3f}×" + (
                         f" (per round {per['median']:.3f}, {per['min']:.2f}–{per['max']:.2f})"
                         if per else ""),
                     "target": f"≥ {BURST_GOAL:g}×", "status": "failed" if ratio is None
                     else "met" if ratio >= BURST_GOAL else "missed"})
    browser = parts.get("browser")
    if browser is not None:
        if "modes" not in browser:
            rows.append({"part": "browser", "label": "Chromium across a reset every second",
                         "measured": f"failed: {browser.get('error')}",
                         "target": "0 / 0 / 0 / 0", "status": "failed"})
        else:
            settings = browser["settings"]
            for mode, row in browser["modes"].items():
                again = row["reconnect_s_from_reset"]
                rows.append({
                    "part": "browser",
                    "label": f"{mode}, {settings['rate']:g}/s for {settings['seconds']:g} s, "
                             f"reset every {settings['reset_every']:g} s: lost / duplicated / "
                             "out of order / lost events",
                    "measured": f"{row['lost']} / {row['duplicated']} / {row['out_of_order']} "
                                f"/ {row['lost_events']} ({row['received']:,} received of "
                                f"{row['expected']:,}, {row['opens']} opens; reconnect "
                                + (f"{again['median']:.2f} s median, {again['max']:.2f} max"
                                   if again else "–") + ")",
                    "target": "0 / 0 / 0 / 0",
                    "status": "met" if not any(row[k] for k in ("lost", "duplicated",
                                                                "out_of_order", "lost_events"))
                    else "missed"})
    return rows


def _print_part(part: str, result: dict[str, Any]) -> None:
    keys = {"burst": ("summary",),
            "browser": ("modes", "resets", "producer", "relay_notable_lines")}[part]
    for key in (*keys, "error", "part_seconds"):
        if key not in result:
            continue
        if key == "modes":
            for mode, row in result[key].items():
                brief = {k: v for k, v in row.items() if k not in ("lost_event_samples",)}
                print(f"   {mode}: {json.dumps(brief)}", flush=True)
        else:
            print(f"   {key}: {json.dumps(result[key])}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--rounds", type=int, help="burst: default 5, --quick 1")
    parser.add_argument("--clients", type=int, help="burst: default 1000, --quick 200")
    parser.add_argument("--messages", type=int, help="burst: default 4000, --quick 2000")
    parser.add_argument("--rate", type=float, default=100.0, help="browser: messages/s")
    parser.add_argument("--seconds", type=float, help="browser: default 60, --quick 15")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--note", action="append", default=[], help="a line for the notes")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(PARTS)}")
    for name, full, small in (("rounds", 5, 1), ("clients", 1000, 200),
                              ("messages", 4000, 2000), ("seconds", 60.0, 15.0)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    head = {"scenario": "events", "what": "Server-Sent Events: the burst against WebSocket's, "
            "and Chromium's EventSource and the JavaScript library across a reset every second "
            "(see the script's docstring)",
            "command": "python -m bench.scenarios.events " + shlex.join(sys.argv[1:]),
            **git_head(), "machine": machine(), "quick": args.quick,
            "started": time.strftime("%F %T"), "db": DB_URI,
            "load_average_start": [round(x, 2) for x in os.getloadavg()],
            "notes": list(args.note)}
    results: dict[str, Any] = {}

    def save(complete: bool) -> None:
        if args.json:
            write_json(args.json, {**head, "complete": complete,
                                   "load_average_end": [round(x, 2) for x in os.getloadavg()],
                                   "parts": results, "goals": goal_rows(results)})

    runners = {"burst": burst_part, "browser": browser_part}
    for part in parts:
        print(f"== {part}", flush=True)
        started = time.monotonic()
        try:
            results[part] = runners[part](args)
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "sse-clients":
        sys.exit(sse_clients_main(sys.argv[2]))
    main()

"""Resumable streams: lossless reconnects, replay speed, fan-out cost, history memory.

    python -m bench.scenarios.resume --json bench/results/resume.json
    python -m bench.scenarios.resume --quick               # smoke version, well under a minute
    python -m bench.scenarios.resume --parts replay,burst  # of reset,alternate,replay,burst,memory

Theory of operation
-------------------
Every part starts real ``pgws-relay`` processes (:class:`bench.parts.harness.OwnedServer`, default
settings unless the part says otherwise) on one database and listen channel; the client of
parts ``reset``, ``alternate`` and ``replay`` is the project's own client library,
:func:`relay.client.subscription.subscribe`, offering ``pgws.resume.v1`` and resuming by itself.
Payloads are the harness's 340-byte ``fill_event`` texts (:func:`bench.parts.harness.payload`) whose
``event_idx`` is a sequence number, so the client counts what is lost, duplicated or out of
order; part ``memory`` sends Econia fills (:class:`bench.parts.harness.EconiaFeed`, ~630 bytes).

- ``reset`` (goal 1): a producer process (``python -m bench.scenarios.resume produce``, one psycopg
  connection) commits ``--rate`` (1,000) notifications/s on one channel for ``--seconds``
  (60), ``--batch`` (10) per transaction, each transaction due at start + k × batch / rate
  (paced against the clock, not by sleeping a fixed interval). The client connects through
  :class:`ResetProxy`, a TCP proxy in this process (Trio), which resets every connection
  (SO_LINGER 0, then close: an RST to the client and to the relay) each ``--reset-every``
  (1 s) second while the producer runs: with ``--reset-mode tick`` (default) every open
  connection at each tick, wherever it is (a handshake, a replay); with ``lifetime`` each
  connection that long after it was accepted. Counted: messages lost, duplicated, out of
  order; ``Lost`` events; resets, reconnects and resumes (the library's log lines: one per
  reconnect, one per resume with the count it replayed), the outage of each reset (reset →
  the next connection's accept) and each message's age on arrival (commit → receipt, the
  payload's time stamp).
- ``alternate`` (goal 1): the same with two relay processes; the proxy sends each new
  connection to the next relay in turn, so every resume is across hosts (a position the
  other process issued, found there by its digest).
- ``replay`` (goal 2): a relay with ``PGWS_HISTORY_MESSAGES=20000``; the client connects,
  receives one message (its position), disconnects; the producer commits 10,000 notifications
  at 10,000/s (100 per transaction every 10 ms); once the relay has them (its /metrics), the
  client reconnects with its position. Measured from before the TCP connect to the last
  replayed message, and to the first live one: a notification committed when the first
  replayed message arrives (the relay admits a resuming client in one step, so by then it is
  in the live stream). All 10,000 must arrive once and in order, then the live one. Target:
  less than the production time (10,000 at 10,000/s: 1.0 s). ``--replay-runs`` (5) runs, a
  fresh relay each; medians. Then the same position again, resumed by a bare socket (no
  client library): the relay's side of the replay alone (information).
- ``burst`` (goal 3): bench/scenarios/throughput.py's burst at N=1,000 (4,000 notifications, 100 per
  transaction) through :class:`bench.parts.harness.FrameClients`, against a relay with history on
  (defaults) and off (``PGWS_HISTORY_MESSAGES=0``), plain clients (no subprotocol) both;
  ``positioned`` (information): history on, clients offering the subprotocol (each receives
  the position event at connect and every delivery with its position; a checkpoint event
  during the run would count as a delivery: at most 1 of 4,000). ``--burst-rounds`` (20)
  interleaved rounds, the variants' order rotating; medians and the ratio of medians (plus
  per-round ratios).
- ``memory`` (goal 4): a relay with the default history settings; 100 warm-up notifications
  on a channel of their own, then RSS; then Econia fills round-robin over 1,000 channels
  until the history has been at its byte bound (``PGWS_HISTORY_BYTES``, 128 MiB counting each
  entry as its frame plus ``relay.core.history.ENTRY_OVERHEAD``, 512 B, which includes the
  allocator's share) for as long again, RSS sampled along the way. The relay's growth (RSS
  after − before) is compared with the bound itself. The relay's ``pgws_history_bytes`` says
  whether its history is at the bound (when /metrics has it; else the figure below does). The
  same texts fed to
  :class:`relay.core.history.History` in a subprocess (same seed, same sequence numbers:
  ``python -m bench.scenarios.resume history-alone``) give the second figure: the structure's own
  memory under tracemalloc, against its accounting and the bound.

This machine is shared (other sessions run test suites on its 2 cores). Each run records the
CPU the rest of the machine used while it measured (busy CPU from /proc/stat minus this
process, the relay and the load clients; PostgreSQL's share is in it): a ``replay`` or
``burst`` run in which that exceeds ``--quiet`` (0.25) cores on average is *disturbed*, kept in
``discarded``, and made again, up to ``--retries`` (4) times (the last attempt is kept
whatever it measured); before each run the script waits up to ``--settle`` (20) seconds for
a quiet second. Correctness counts every attempt. A part that fails is a result (its
error), not the end of the invocation; the relay's log lines about LISTEN gaps are errors.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import re
import resource
import shlex
import socket
import statistics
import struct
import subprocess
import sys
import time
import tracemalloc
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import trio

from bench.parts.harness import (
    DB_URI,
    LISTEN,
    Conn,
    EconiaFeed,
    FrameClients,
    OwnedServer,
    Producer,
    busy_seconds,
    econia_text,
    free_port,
    git_head,
    machine,
    own_seconds,
    payload,
    relay_source,
    settle,
    token,
    wait_for_db,
    write_json,
    ws_open,
)
from bench.parts.paths import module_command, module_env
from relay.client.subscription import Lost, Message, subscribe
from relay.core.history import ENTRY_OVERHEAD, History
from relay.wire import positions

PARTS = ("reset", "alternate", "replay", "burst", "memory")
CHANNEL = "fill_event"
SIZE = 340  # bytes per payload in parts reset, alternate, replay, burst (the throughput burst's)
_SEQ = re.compile(r'"event_idx":(\d+)')
#: Goal 3: deliveries/s with history on / off.
BURST_GOAL = 0.9
#: Goal 4: RSS growth may exceed PGWS_HISTORY_BYTES by this share of it: none. (With 320 B per
#: entry, RSS grew 1.09× the bound: malloc's chunk headers and the free space between live
#: blocks as entries are dropped and new ones made; the accounting now charges 512 B.)
ALLOCATOR_SLACK = 0.0
#: Defaults of PGWS_HISTORY_MESSAGES / _BYTES / _SECONDS (relay/config.py).
DEFAULT_MESSAGES, DEFAULT_BYTES, DEFAULT_SECONDS = 1000, 128 * 1024 * 1024, 300.0
WARMUP = 100
SUB_LOG = logging.getLogger("relay.client.subscription")


# -- the producer process ------------------------------------------------------------------

def paced_send(db: psycopg.Connection[Any], listen: str, first: int, count: int, rate: float,
               batch: int, channel: str = CHANNEL, size: int = SIZE) -> dict[str, Any]:
    """Commit payloads ``first`` … ``first + count - 1``, ``batch`` per transaction, the k-th
    transaction due at start + k × batch / rate (late ones go at once: no drift)."""
    interval = batch / rate
    start = time.monotonic()
    first_commit = last_commit = 0.0
    late = 0.0
    for k, low in enumerate(range(first, first + count, batch)):
        delay = start + k * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            late = max(late, -delay)
        texts = [payload(channel, n, size) for n in range(low, min(low + batch, first + count))]
        db.execute("SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS t(p)", (listen, texts))
        db.commit()
        last_commit = time.time()
        first_commit = first_commit or last_commit
    return {"sent": count, "first_commit": first_commit, "last_commit": last_commit,
            "seconds": last_commit - first_commit, "rate": count / max(time.monotonic() - start,
                                                                      1e-9),
            "max_late_s": round(late, 4)}


def produce_main(listen: str) -> int:
    """``python -m bench.scenarios.resume produce LISTEN``: one JSON send spec per stdin line, one
    JSON result per stdout line (:func:`paced_send`), until stdin closes."""
    with psycopg.connect(DB_URI, autocommit=False) as db:
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip():
                print(json.dumps(paced_send(db, listen, **json.loads(line))), flush=True)
    return 0


class ProducerProcess:
    """The producer in a process of its own, so that this process's work cannot delay it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(module_command("bench.scenarios.resume", "produce", LISTEN),
                                     env=module_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("the producer process did not start")
        self._lock = trio.Lock()

    async def send(self, first: int, count: int, rate: float, batch: int) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write(json.dumps({"first": first, "count": count, "rate": rate,
                                              "batch": batch}) + "\n")
            self.proc.stdin.flush()
            line = await trio.to_thread.run_sync(self.proc.stdout.readline,
                                                 abandon_on_cancel=True)
        if not line:
            raise RuntimeError(f"the producer process ended (status {self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -- the resetting proxy ---------------------------------------------------------------------

class _Pair:
    """One proxied connection: the client's side, the relay's side, the scope of its pumps."""

    def __init__(self, number: int, down: trio.SocketStream, up: trio.SocketStream,
                 scope: trio.CancelScope) -> None:
        self.number = number
        self.down, self.up, self.scope = down, up, scope
        self.reset = False


def _hard(stream: trio.SocketStream) -> None:
    """Make the next close an RST (SO_LINGER on, 0 s): queued bytes are discarded."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _pump(source: trio.SocketStream, sink: trio.SocketStream,
                both: trio.CancelScope) -> None:
    """Copy ``source`` to ``sink`` until either ends; then end both directions."""
    try:
        async for chunk in source:
            await sink.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    both.cancel()


class ResetProxy:
    """A TCP proxy on 127.0.0.1 that sends each new connection to the next of ``backends`` (ports)
    in turn and, while :attr:`resetting`, resets connections (``mode`` ``tick``: all open ones
    every ``every`` s; ``lifetime``: each ``every`` s after its accept)."""

    def __init__(self, backends: Sequence[int], every: float, mode: str) -> None:
        self.backends = list(backends)
        self.every = every
        self.mode = mode
        self.resetting = False
        self.port = 0
        self.accepted = 0
        self.per_backend = [0] * len(self.backends)
        self.upstream_failed = 0
        self.resets = 0
        #: Seconds from each reset to the next accepted connection.
        self.outages: list[float] = []
        self._reset_at: float | None = None
        self._open: dict[int, _Pair] = {}

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            if self.mode == "tick":
                nursery.start_soon(self._ticker)
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _ticker(self) -> None:
        due = trio.current_time()
        while True:
            due += self.every
            await trio.sleep_until(due)
            if self.resetting:
                for pair in list(self._open.values()):
                    self._reset(pair)

    def _reset(self, pair: _Pair) -> None:
        if pair.reset:
            return
        pair.reset = True
        self.resets += 1
        self._reset_at = trio.current_time()
        _hard(pair.down)
        _hard(pair.up)
        pair.scope.cancel()

    async def _handle(self, down: trio.SocketStream) -> None:
        now = trio.current_time()
        if self._reset_at is not None:
            self.outages.append(now - self._reset_at)
            self._reset_at = None
        number = self.accepted
        self.accepted += 1
        backend = number % len(self.backends)
        self.per_backend[backend] += 1
        try:
            up = await trio.open_tcp_stream("127.0.0.1", self.backends[backend])
        except OSError:
            self.upstream_failed += 1
            _hard(down)
            await trio.aclose_forcefully(down)
            return
        with trio.CancelScope() as scope:
            pair = self._open[number] = _Pair(number, down, up, scope)
            try:
                async with trio.open_nursery() as nursery:
                    if self.mode == "lifetime":
                        nursery.start_soon(self._reset_later, pair)
                    nursery.start_soon(_pump, down, up, nursery.cancel_scope)
                    nursery.start_soon(_pump, up, down, nursery.cancel_scope)
            finally:
                del self._open[number]
        await trio.aclose_forcefully(down)
        await trio.aclose_forcefully(up)

    async def _reset_later(self, pair: _Pair) -> None:
        await trio.sleep(self.every)
        if self.resetting:
            self._reset(pair)


# -- what the client saw ---------------------------------------------------------------------

class Tally:
    """Sequence numbers ``0 … total - 1`` as a client receives them."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.seen = bytearray(total)
        self.highest = -1
        self.messages = self.duplicates = self.out_of_order = self.foreign = self.jumps = 0
        self.ages: list[float] = []
        self.lost_events: list[dict[str, Any]] = []

    def message(self, text: str) -> int | None:
        found = _SEQ.search(text)
        seq = int(found.group(1)) if found else -1
        if not 0 <= seq < self.total:
            self.foreign += 1
            return None
        self.messages += 1
        with contextlib.suppress(ValueError):
            self.ages.append(time.time() - float(text[6:23]))
        if self.seen[seq]:
            self.duplicates += 1
        else:
            self.seen[seq] = 1
            if seq < self.highest:
                self.out_of_order += 1
            elif seq > self.highest + 1:
                self.jumps += 1
        self.highest = max(self.highest, seq)
        return seq

    @property
    def lost(self) -> int:
        return self.total - self.seen.count(1)

    def summary(self) -> dict[str, Any]:
        ages = sorted(self.ages)
        return {"expected": self.total, "received": self.messages, "unique": self.total - self.lost,
                "lost": self.lost, "duplicated": self.duplicates,
                "out_of_order": self.out_of_order, "forward_jumps": self.jumps,
                "foreign": self.foreign, "lost_events": len(self.lost_events),
                "lost_reasons": dict(Counter(e["reason"] for e in self.lost_events)),
                "age_ms": {"p50": _quantile(ages, 0.5), "p99": _quantile(ages, 0.99),
                           "max": 1000 * ages[-1] if ages else None}}


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


class _ClientLog(logging.Handler):
    """The client library's log lines: reconnects (and why), resumes (and how many replayed)."""

    _RESUMED = re.compile(r"resumed after \S+: (\d+) missed")
    _RETRY = re.compile(r": (.*); reconnecting in ([\d.]+) s")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.replayed: list[int] = []
        self.reasons: Counter[str] = Counter()
        self.connected = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if (found := self._RESUMED.search(text)) is not None:
            self.replayed.append(int(found.group(1)))
        elif (found := self._RETRY.search(text)) is not None:
            self.reasons[found.group(1)] += 1
        elif text.startswith("connected to"):
            self.connected += 1


@contextlib.contextmanager
def client_log() -> Iterator[_ClientLog]:
    handler = _ClientLog()
    level, propagate = SUB_LOG.level, SUB_LOG.propagate
    SUB_LOG.addHandler(handler)
    SUB_LOG.setLevel(logging.INFO)
    SUB_LOG.propagate = False
    try:
        yield handler
    finally:
        SUB_LOG.removeHandler(handler)
        SUB_LOG.setLevel(level)
        SUB_LOG.propagate = propagate


# -- the relay's side ------------------------------------------------------------------------

def scrape(admin: int) -> dict[str, float]:
    """The relay's /metrics as {name with labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                found[name] = float(value)
    return found


def relay_figures(admin: int) -> dict[str, float]:
    """What /metrics says about connections, resumes and history (whatever of it exists)."""
    metrics = scrape(admin)
    return {name: value for name, value in metrics.items()
            if re.match(r"pgws_(connections_accepted|connections_refused_total\{reason=\"position"
                        r"|notifications_received|listener_gaps|slow_consumers|history|resum"
                        r"|replay)", name)}


def wait_received(admin: int, count: int, timeout: float = 60.0) -> bool:
    """Wait until the relay has read ``count`` notifications from LISTEN; whether it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scrape(admin).get("pgws_notifications_received_total", 0) >= count:
            return True
        time.sleep(0.02)
    return False


def self_cpu() -> float:
    """CPU seconds of this process (not its children)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_relay(env: dict[str, str] | None = None) -> tuple[OwnedServer, int]:
    """A relay with an admin port: (server, admin port)."""
    admin = free_port()
    return OwnedServer("relay", free_port(), {**(env or {}), "PGWS_ADMIN_PORT": str(admin)}), admin


def listener_gaps(server: OwnedServer) -> list[str]:
    return [line for line in server.lines if "without LISTEN (gap" in line]


# -- goal 1: resets, one relay or two ----------------------------------------------------------

async def _lossless(ports: Sequence[int], seconds: float, rate: float, batch: int,
                    every: float, mode: str, drain: float) -> dict[str, Any]:
    total = int(seconds * rate)
    tally = Tally(total)
    proxy = ResetProxy(ports, every, mode)
    producer = ProducerProcess()
    result: dict[str, Any] = {}
    try:
        with client_log() as log:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(proxy.serve)
                produced = trio.Event()

                async def produce() -> None:
                    proxy.resetting = True
                    try:
                        result["producer"] = await producer.send(0, total, rate, batch)
                    finally:
                        proxy.resetting = False
                        produced.set()

                url = f"ws://127.0.0.1:{port}/{CHANNEL}"
                async with subscribe(url, token=token()) as sub:
                    with trio.fail_after(30):
                        await sub.wait_connected()
                    nursery.start_soon(produce)
                    deadline = None
                    try:
                        async for event in sub:
                            if isinstance(event, Message):
                                tally.message(event.payload)
                            elif isinstance(event, Lost):
                                tally.lost_events.append({"reason": event.reason,
                                                          "position": event.position,
                                                          "highest": tally.highest})
                            if tally.highest == total - 1:
                                break
                            if produced.is_set() and deadline is None:
                                deadline = trio.current_time() + drain
                                nursery.cancel_scope.deadline = deadline + 5
                            if deadline is not None and trio.current_time() > deadline:
                                break
                    except Exception as exc:  # The library gave up: a result.
                        result["error"] = f"{type(exc).__name__}: {exc}"
                    result["connections"] = sub.connections
                await produced.wait()
                nursery.cancel_scope.cancel()
    finally:
        producer.close()
    outages = sorted(proxy.outages)
    result.update({
        **tally.summary(), "resets": proxy.resets, "proxied_connections": proxy.accepted,
        "per_relay_connections": proxy.per_backend, "upstream_failed": proxy.upstream_failed,
        "reconnects": sum(log.reasons.values()), "reconnect_reasons": dict(log.reasons),
        "resumes": len(log.replayed),
        "replayed": {"total": sum(log.replayed), "median": statistics.median(log.replayed)
                     if log.replayed else None, "max": max(log.replayed, default=None)},
        "outage_s": {"median": round(statistics.median(outages), 3) if outages else None,
                     "max": round(outages[-1], 3) if outages else None},
        "settings": {"seconds": seconds, "rate": rate, "batch": batch, "reset_every": every,
                     "reset_mode": mode, "relays": len(ports)}})
    if "error" not in result and (tally.lost or tally.duplicates or tally.out_of_order):
        result["error"] = (f"lost {tally.lost}, duplicated {tally.duplicates}, out of order "
                           f"{tally.out_of_order}")
    return result


def lossless_part(relays: int, args: argparse.Namespace, relay_env: dict[str, str]
                  ) -> dict[str, Any]:
    """Goal 1 with ``relays`` relay processes behind the resetting proxy."""
    if not wait_for_db(60):
        return {"error": "PostgreSQL did not answer within 60 s"}
    waited, quiet = settle(args.settle)
    busy, ours = busy_seconds(), own_seconds()
    servers: list[tuple[OwnedServer, int]] = []
    try:
        for _ in range(relays):
            servers.append(start_relay(relay_env))
        result = trio.run(_lossless, [s.port for s, _ in servers], args.seconds, args.rate,
                          args.batch, args.reset_every, args.reset_mode, args.drain)
        result["relays"] = [relay_figures(admin) for _, admin in servers]
        gaps = [line for server, _ in servers for line in listener_gaps(server)]
        if gaps:
            result["listener_gaps"] = gaps[:5]
            result.setdefault("error", f"a relay's LISTEN was replaced {len(gaps)} time(s)")
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}",
                  "relay_log_tail": [line for s, _ in servers for line in s.lines[-5:]]}
    finally:
        for server, _ in servers:
            server.stop()
    busy = busy_seconds() - busy
    result.update({"settle_wait_s": waited, "settled": quiet,
                   "others_cpu_s": round(busy - (own_seconds() - ours), 1)})
    return result


# -- goal 2: replay ----------------------------------------------------------------------------

async def _replay(port: int, admin: int, count: int, rate: float, batch: int,
                  relay_cpu: Callable[[], float]) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{port}/{CHANNEL}"
    read = token()
    producer = ProducerProcess()
    try:
        async with subscribe(url, token=read) as sub:
            with trio.fail_after(30):
                await sub.wait_connected()
                await producer.send(0, 1, 1000.0, 1)
                position = None
                async for event in sub:
                    if isinstance(event, Message):
                        position = event.position
                        break
        if position is None:
            return {"error": "no position from the first message"}
        production = await producer.send(1, count, rate, batch)
        if not await trio.to_thread.run_sync(wait_received, admin, 1 + count):
            return {"error": "the relay did not receive every notification within 60 s"}
        tally = Tally(count + 2)
        tally.seen[0] = 1
        others = 0.0
        times: dict[str, float] = {}
        live_commit: dict[str, Any] = {}
        with client_log() as log, trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def live() -> None:
                    live_commit.update(await producer.send(count + 1, 1, 1000.0, 1))

                start, start_wall = trio.current_time(), time.time()
                window, mine, cpu = busy_seconds(), self_cpu(), relay_cpu()
                async with subscribe(url, token=read, position=position) as sub:
                    async for event in sub:
                        now = trio.current_time()
                        if isinstance(event, Lost):
                            tally.lost_events.append({"reason": event.reason,
                                                      "position": event.position})
                            continue
                        seq = tally.message(event.payload)
                        if "first" not in times:
                            times["first"] = now - start
                            nursery.start_soon(live)
                        if seq == count:
                            times["last_replayed"] = now - start
                            others = (busy_seconds() - window - (self_cpu() - mine)
                                      - (relay_cpu() - cpu))
                        if seq == count + 1:
                            times["live"] = now - start
                            break
    finally:
        producer.close()
    summary = tally.summary()
    in_order = (summary["lost"] == 0 and not summary["duplicated"]
                and not summary["out_of_order"] and not summary["lost_events"])
    result = {**{f"{key}_s": round(value, 4) for key, value in times.items()},
              "production_s": round(production["seconds"], 4),
              "production_rate": round(production["rate"]),
              "producer_max_late_s": production["max_late_s"],
              "resumed_replayed": log.replayed, "exactly_once_in_order": in_order,
              "live_after_replay": tally.highest == count + 1 and times.get("live", 0) >=
              times.get("last_replayed", float("inf")),
              "live_committed_s": round(live_commit["last_commit"] - start_wall, 4)
              if live_commit else None,
              "position": position,
              # The rest of the machine from the connect to the last replayed message.
              "window_others_cpu_s": round(others, 2) if "last_replayed" in times else None,
              **{key: summary[key] for key in ("received", "lost", "duplicated", "out_of_order",
                                               "lost_events")}}
    if not in_order or "last_replayed" not in times or "live" not in times:
        result["error"] = "not every missed message arrived once, in order, before the live one"
    return result


def raw_replay(port: int, position: str, last: int) -> dict[str, Any]:
    """Resume from ``position`` with a bare socket (no client library): seconds from the
    connect to the end of the frame of payload ``last`` (the relay's side of a replay), and
    whether payloads 1 … ``last`` came once, in order."""
    marker = b'"event_idx":%d,' % last
    start = time.monotonic()
    sock, rest, _ = ws_open("127.0.0.1", port, f"/{CHANNEL}/{token()}?from={position}",
                            protocol=positions.SUBPROTOCOL)
    try:
        sock.setblocking(True)
        sock.settimeout(30)
        data = bytearray(rest)
        searched = found = 0
        while True:
            if not found:
                at = data.find(marker, max(0, searched - len(marker)))
                searched = len(data)
                found = at + 1 if at >= 0 else 0
            if found and data.find(b'"}', found) >= 0:
                break
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed before the last replayed message")
            data += chunk
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    seqs: list[int] = []
    offset = 0
    while offset + 2 <= len(data):  # Server frames: unmasked, unfragmented text here.
        size, header = data[offset + 1] & 0x7F, 2
        if size == 126:
            size, header = int.from_bytes(data[offset + 2:offset + 4], "big"), 4
        body = bytes(data[offset + header:offset + header + size])
        offset += header + size
        if len(body) < size:
            break
        if data[offset - header - size] == 0x81 and not body.startswith(b"{"):
            number = _SEQ.search(body.decode())
            seqs.append(int(number.group(1)) if number else -1)
    return {"raw_last_replayed_s": round(elapsed, 4), "raw_bytes": len(data),
            "raw_exactly_once_in_order": seqs == list(range(1, last + 1))}


def _disturbed(run: dict[str, Any], seconds: float | None, quiet: float) -> bool:
    """Whether the rest of the machine kept more than ``quiet`` cores busy on average while
    the run measured (``seconds`` long)."""
    others = run.get("window_others_cpu_s")
    return others is not None and bool(seconds) and others / seconds > quiet


def replay_once(args: argparse.Namespace, relay_env: dict[str, str]) -> dict[str, Any]:
    """One replay run on a fresh relay: the client library, then a bare socket."""
    if not wait_for_db(60):
        return {"error": "PostgreSQL did not answer within 60 s"}
    waited, quiet = settle(args.settle)
    server, admin = start_relay({**relay_env,
                                 "PGWS_HISTORY_MESSAGES": str(2 * args.replay_messages)})
    try:
        run = trio.run(_replay, server.port, admin, args.replay_messages, args.replay_rate,
                       args.replay_batch, server.cpu_seconds)
        if "error" not in run:
            # The same missed messages (and the live one), to a bare socket.
            run.update(raw_replay(server.port, run["position"], args.replay_messages + 1))
    except Exception as exc:
        run = {"error": f"{type(exc).__name__}: {exc}", "relay_log_tail": server.lines[-5:]}
    finally:
        server.stop()
    run.update({"settle_wait_s": waited, "settled": quiet})
    return run


def replay_part(args: argparse.Namespace, relay_env: dict[str, str]) -> dict[str, Any]:
    """Goal 2: ``--replay-runs`` runs, a fresh relay each (a run the rest of the machine
    disturbed is made again, up to ``--retries`` times); medians."""
    runs: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    for number in range(args.replay_runs):
        for attempt in range(args.retries + 1):
            run = replay_once(args, relay_env)
            run.update({"run": number + 1, "attempt": attempt + 1})
            disturbed = _disturbed(run, run.get("last_replayed_s"), args.quiet)
            print(f"   replay run {number + 1}: " + ", ".join(
                f"{key} {run[key]}" for key in (
                    "first_s", "last_replayed_s", "live_s", "production_s",
                    "exactly_once_in_order", "raw_last_replayed_s", "raw_exactly_once_in_order",
                    "window_others_cpu_s", "error") if key in run)
                + (" (disturbed)" if disturbed else ""), flush=True)
            if "error" in run or not disturbed or attempt == args.retries:
                break
            discarded.append(run)
        runs.append(run)
    good = [r for r in runs if "error" not in r]
    summary: dict[str, Any] = {"runs": len(runs), "failed": len(runs) - len(good),
                               "messages": args.replay_messages, "rate": args.replay_rate,
                               "history_messages": 2 * args.replay_messages}
    for key in ("first_s", "last_replayed_s", "live_s", "production_s",
                "raw_last_replayed_s"):
        values = [r[key] for r in good if key in r]
        if values:
            summary[f"median_{key}"] = statistics.median(values)
            summary[f"range_{key}"] = [min(values), max(values)]
    # Correctness counts every attempt, disturbed or not.
    summary["attempts"] = len(runs) + len(discarded)
    summary["exactly_once_in_order"] = sum(1 for r in runs + discarded
                                           if r.get("exactly_once_in_order"))
    summary["raw_exactly_once_in_order"] = sum(1 for r in runs + discarded
                                               if r.get("raw_exactly_once_in_order"))
    summary["still_disturbed"] = sum(1 for r in good
                                     if _disturbed(r, r.get("last_replayed_s"), args.quiet))
    return {"summary": summary, "runs": runs, "discarded": discarded,
            "quiet_cores": args.quiet}


# -- goal 3: burst fan-out, history on and off --------------------------------------------------

BURST_VARIANTS = ("on", "off", "positioned")


def burst_once(variant: str, clients: int, texts: list[str], batch: int, procs: int,
               timeout: float, settle_limit: float, relay_env: dict[str, str]
               ) -> dict[str, Any]:
    """One burst: a fresh relay, ``clients`` frame clients of one channel, ``texts``."""
    if not wait_for_db(60):
        return {"variant": variant, "error": "PostgreSQL did not answer within 60 s"}
    waited, quiet = settle(settle_limit)
    env = {**relay_env, **({"PGWS_HISTORY_MESSAGES": "0"} if variant == "off" else {})}
    positioned = variant == "positioned"
    extra = 1 if positioned else 0  # The position event at connect.
    path = f"/{CHANNEL}/{token()}"
    conns = [Conn(path, expected=len(texts) + extra,
                  protocol=positions.SUBPROTOCOL if positioned else None)
             for _ in range(clients)]
    result: dict[str, Any] = {"variant": variant, "settle_wait_s": waited, "settled": quiet}
    busy, ours = busy_seconds(), own_seconds()
    server = OwnedServer("relay", free_port(), env)
    try:
        with FrameClients("127.0.0.1", server.port, conns, procs=procs, timeout=timeout) as pool:
            producer = Producer()
            try:
                cpu, window, mine = server.cpu_seconds(), busy_seconds(), self_cpu()
                pool.start()
                start = time.time()
                producer.send(texts, batch)
                done = pool.wait_done(timeout)
                cpu = server.cpu_seconds() - cpu
                window, mine = busy_seconds() - window, self_cpu() - mine
                outcome = pool.results()
            finally:
                producer.close()
    except Exception as exc:
        result.update({"error": f"{type(exc).__name__}: {exc}",
                       "relay_log_tail": server.lines[-10:]})
        return result
    finally:
        server.stop()
    per = outcome["connections"]
    delivered = sum(min(max(c["frames"] - extra, 0), len(texts)) for c in per)
    frames = sum(c["frames"] for c in per)
    end = done or outcome["last_frame"]
    busy = busy_seconds() - busy
    result.update({
        "delivered": delivered, "expected": len(texts) * clients,
        "delivered_share": delivered / (len(texts) * clients),
        "seconds": end - start, "deliveries_per_s": delivered / max(end - start, 1e-9),
        "relay_cpu_ms_per_1000": 1e6 * cpu / max(delivered, 1),
        "bytes_per_frame": sum(c["bytes"] for c in per) / max(frames, 1),
        "frames_beyond_messages": frames - len(texts) * clients,
        "closed": sum(1 for c in per if c["closed"]), "timed_out": done is None,
        "client_cpu_s": outcome["client_cpu_s"], "others_cpu_s": round(busy - (own_seconds()
                                                                               - ours), 2),
        # The rest of the machine (PostgreSQL included) from the producer's first statement
        # to the last client's last message: what decides whether the run was disturbed.
        "window_others_cpu_s": round(window - cpu - mine - outcome["client_cpu_s"], 2)})
    gaps = listener_gaps(server)
    if gaps:
        result["error"] = f"the relay's LISTEN was replaced {len(gaps)} time(s): {gaps[0]}"
    elif done is None or delivered != len(texts) * clients:
        result["error"] = f"delivered {delivered:,} of {len(texts) * clients:,}"
    return result


def burst_part(args: argparse.Namespace, relay_env: dict[str, str]) -> dict[str, Any]:
    """Goal 3: ``--burst-rounds`` rounds, each running every variant once (order rotating)."""
    messages = 2000 if args.quick else 4000
    runs: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    for number in range(args.burst_rounds):
        texts = [payload(CHANNEL, n, SIZE) for n in range(messages)]
        shift = number % len(BURST_VARIANTS)
        for variant in BURST_VARIANTS[shift:] + BURST_VARIANTS[:shift]:
            for attempt in range(args.retries + 1):
                run = burst_once(variant, args.burst_clients, texts, 100, args.procs,
                                 args.timeout, args.settle, relay_env)
                run.update({"round": number + 1, "attempt": attempt + 1})
                disturbed = _disturbed(run, run.get("seconds"), args.quiet)
                print(f"   burst round {number + 1} {variant:10} "
                      + (f"{run['deliveries_per_s']:>11,.0f}/s relay "
                         f"{run['relay_cpu_ms_per_1000']:.3f} ms/1000, "
                         f"{run['bytes_per_frame']:.0f} B/frame, others' CPU "
                         f"{run['window_others_cpu_s']} s" if "deliveries_per_s" in run else "")
                      + (" (disturbed)" if disturbed else "")
                      + (f"  ** {run['error']}" if "error" in run else ""), flush=True)
                if "error" in run or not disturbed or attempt == args.retries:
                    break
                discarded.append(run)
            runs.append(run)
    return {"summary": burst_summary(runs), "runs": runs, "discarded": discarded,
            "quiet_cores": args.quiet, "still_disturbed": sum(
                1 for r in runs if _disturbed(r, r.get("seconds"), args.quiet)),
            "clients": args.burst_clients, "messages": messages,
            "batch": 100, "payload_bytes": SIZE}


def burst_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per variant, ratios of medians to ``off``, and per-round ratios."""
    summary: dict[str, Any] = {"variants": {}, "ratios": {}}
    for variant in BURST_VARIANTS:
        good = [r for r in runs if r["variant"] == variant and "error" not in r]
        entry: dict[str, Any] = {"runs": sum(1 for r in runs if r["variant"] == variant),
                                 "failed": sum(1 for r in runs if r["variant"] == variant
                                               and "error" in r)}
        for key in ("deliveries_per_s", "relay_cpu_ms_per_1000", "bytes_per_frame"):
            values = [r[key] for r in good]
            if values:
                entry[f"median_{key}"] = statistics.median(values)
                entry[f"range_{key}"] = [min(values), max(values)]
        summary["variants"][variant] = entry
    base = summary["variants"]["off"].get("median_deliveries_per_s")
    for variant in ("on", "positioned"):
        mine = summary["variants"][variant].get("median_deliveries_per_s")
        paired = []
        for number in sorted({r["round"] for r in runs}):
            pair = {r["variant"]: r for r in runs if r["round"] == number and "error" not in r}
            if "off" in pair and variant in pair:
                paired.append(pair[variant]["deliveries_per_s"] / pair["off"]["deliveries_per_s"])
        summary["ratios"][f"{variant}/off"] = {
            "ratio": mine / base if mine and base else None,
            "per_round": {"median": statistics.median(paired), "min": min(paired),
                          "max": max(paired)} if paired else None}
    return summary


# -- goal 4: history memory ----------------------------------------------------------------------

def memory_texts(seed: int, channels: int, total: int, chunk: int = 10_000
                 ) -> Iterator[list[tuple[str, str]]]:
    """Chunks of (channel, notification text): :data:`WARMUP` on channel ``warmup`` first, then
    ``total`` Econia fills round-robin over ``channels`` channels ``fill_event_NNNN``."""
    feed = EconiaFeed(seed=seed)
    names = [f"fill_event_{i:04d}" for i in range(channels)]

    def fill(channel: str) -> str:
        text = econia_text("fill_event", feed.fill_rows()[0])
        return text.replace('"channel" : "fill_event"', f'"channel" : "{channel}"', 1)

    yield [("warmup", fill("warmup")) for _ in range(WARMUP)]
    for low in range(0, total, chunk):
        yield [(names[n % channels], fill(names[n % channels]))
               for n in range(low, min(low + chunk, total))]


def history_alone_main(spec_json: str) -> int:
    """``python -m bench.scenarios.resume history-alone SPEC``: the same texts into
    :class:`relay.core.history.History` under tracemalloc; prints one JSON result."""
    spec = json.loads(spec_json)
    chunks = memory_texts(spec["seed"], spec["channels"], spec["total"])
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    history = History(spec["messages"], spec["bytes"], spec["seconds"])
    history.mark_break()  # As the relay's LISTEN does first: the same sequence numbers.
    appended = 0
    bound_at: int | None = None
    samples = []
    for chunk in chunks:
        for channel, text in chunk:
            history.append(channel, text.encode(), time.monotonic())
            appended += 1
            if bound_at is None and history.bytes + 2000 > history.max_bytes:
                bound_at = appended
        samples.append({"appended": appended, "entries": history.entries,
                        "accounted": history.bytes})
    del chunk, chunks
    gc.collect()
    traced, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    kept = [entry for log in history._logs.values() for entry in log.entries[log.start:]]
    frames = sum(len(entry.data) for entry in kept)  # Frames, or payloads not framed yet.
    # Entries a log dropped (the bounds) but still holds in its list, frames and all, until
    # it compacts (relay/core/history.py, _Log.drop_head: at 1,024 dropped entries).
    dropped_held = [entry for log in history._logs.values()
                    for entry in log.entries[:log.start]]
    held_frames = sum(len(entry.data) for entry in dropped_held)
    print(json.dumps({"appended": appended, "entries": history.entries,
                      "channels_kept": len(history._logs), "accounted_bytes": history.bytes,
                      "max_bytes": history.max_bytes, "traced_bytes": traced - base,
                      "traced_peak_bytes": peak - base, "frame_bytes": frames,
                      "mean_frame_bytes": frames / max(len(kept), 1),
                      "bound_reached_after": bound_at,
                      "dropped_but_held_entries": len(dropped_held),
                      "dropped_but_held_frame_bytes": held_frames,
                      # What each entry the structure holds costs beyond its frame (the
                      # accounting charges ENTRY_OVERHEAD): checks that constant.
                      "traced_per_held_entry_beyond_frame": round(
                          (traced - base - frames - held_frames)
                          / max(len(kept) + len(dropped_held), 1), 1),
                      "samples": samples}))
    return 0


def memory_part(args: argparse.Namespace, relay_env: dict[str, str]) -> dict[str, Any]:
    """Goal 4: the relay's RSS growth filling the history of ``--channels`` channels."""
    quick = args.quick
    env = {**relay_env, **({"PGWS_HISTORY_BYTES": str(1 << 20)} if quick else {})}
    limits = {"messages": int(env.get("PGWS_HISTORY_MESSAGES", DEFAULT_MESSAGES)),
              "bytes": int(env.get("PGWS_HISTORY_BYTES", DEFAULT_BYTES)),
              "seconds": float(env.get("PGWS_HISTORY_SECONDS", DEFAULT_SECONDS))}
    spec = {**limits, "seed": args.seed, "channels": args.channels,
            "total": args.memory_messages}
    if not wait_for_db(60):
        return {"error": "PostgreSQL did not answer within 60 s"}
    waited, quiet = settle(args.settle)
    server, admin = start_relay(env)
    result: dict[str, Any] = {"settings": limits, "channels": args.channels,
                              "settle_wait_s": waited, "settled": quiet,
                              "allocator_slack": ALLOCATOR_SLACK}
    producer = Producer()
    try:
        samples = []
        sent = 0
        started = time.monotonic()
        for number, chunk in enumerate(memory_texts(args.seed, args.channels,
                                                    args.memory_messages)):
            producer.send([text for _, text in chunk], 100)
            sent += len(chunk)
            if not wait_received(admin, sent, timeout=120):
                raise RuntimeError(f"the relay did not read {sent:,} notifications in 120 s")
            if number == 0:
                time.sleep(1.0)
                result["rss_before_kib"] = server.memory_kib()
                result["payload_mean_bytes"] = round(statistics.mean(len(t) for _, t in chunk))
            samples.append({"sent": sent - WARMUP, "rss_kib": server.memory_kib(),
                            "t": round(time.monotonic() - started, 1)})
        time.sleep(1.0)
        result.update({"rss_after_kib": server.memory_kib(),
                       "rss_peak_kib": server.memory_kib("VmHWM"),
                       "sent": sent - WARMUP, "fill_seconds": round(time.monotonic() - started, 1),
                       "samples": samples, "relay_metrics": {
                           name: value for name, value in scrape(admin).items()
                           if "history" in name}})
        gaps = listener_gaps(server)
        if gaps:
            result["error"] = f"the relay's LISTEN was replaced {len(gaps)} time(s): {gaps[0]}"
    except Exception as exc:
        result.update({"error": f"{type(exc).__name__}: {exc}",
                       "relay_log_tail": server.lines[-10:]})
        return result
    finally:
        producer.close()
        server.stop()
    alone = subprocess.run(module_command("bench.scenarios.resume", "history-alone",
                                          json.dumps(spec)),
                           env=module_env(), capture_output=True, text=True, timeout=1800)
    if alone.returncode != 0:
        result["error"] = f"history-alone failed: {alone.stderr[-500:]}"
        return result
    result["history_alone"] = json.loads(alone.stdout)
    growth = (result["rss_after_kib"] - result["rss_before_kib"]) * 1024
    reached = result["history_alone"]["bound_reached_after"]
    if reached is not None:
        # The first sample at or past the point where the history first filled its byte
        # bound (appended counts the warm-up, samples do not).
        first = next((sample for sample in samples if sample["sent"] >= reached - WARMUP),
                     None)
        if first is not None:
            result["at_first_bound"] = {
                "sent": first["sent"],
                "rss_growth_bytes": (first["rss_kib"] - result["rss_before_kib"]) * 1024}
    result.update({"rss_growth_bytes": growth, "bound_bytes": limits["bytes"],
                   "rss_growth_within_bound": growth <= limits["bytes"] * (1 + ALLOCATOR_SLACK),
                   "at_bound": result["relay_metrics"].get(
                       "pgws_history_bytes", result["history_alone"]["accounted_bytes"])
                   > limits["bytes"] - 2 * (result["payload_mean_bytes"] + 64 + ENTRY_OVERHEAD)})
    if not result["at_bound"]:
        result["error"] = "the history never reached its byte bound: send more messages"
    return result


# -- goals and output -------------------------------------------------------------------------

def _mib(value: float) -> str:
    return f"{value / 1048576:.1f} MiB"


def goal_rows(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """The resume goals: each figure, its target, and whether it is met."""
    rows: list[dict[str, Any]] = []
    for name, label in (("reset", "1 relay"), ("alternate", "2 relays, alternating")):
        part = parts.get(name)
        if part is None:
            continue
        if "lost" not in part:
            rows.append({"goal": "1", "label": f"resets every second, {label}",
                         "measured": f"failed: {part.get('error')}", "target": "0 / 0 / 0",
                         "status": "failed"})
            continue
        s = part["settings"]
        measured = (f"{part['lost']} / {part['duplicated']} / {part['out_of_order']} "
                    f"({part['unique']:,} of {part['expected']:,} once; {part['resets']} resets, "
                    f"{part['resumes']} resumes, {part['lost_events']} Lost events)")
        clean = not (part["lost"] or part["duplicated"] or part["out_of_order"]
                     or part["lost_events"]) and "error" not in part
        rows.append({"goal": "1", "label": f"{s['rate']:,.0f}/s for {s['seconds']:g} s, TCP "
                     f"reset every {s['reset_every']:g} s ({s['reset_mode']}), {label}: lost / "
                     "duplicated / out of order", "measured": measured, "target": "0 / 0 / 0",
                     "status": "met" if clean else "missed"})
    replay = parts.get("replay")
    if replay is not None:
        summary = replay["summary"]
        # The time the missed messages took to be produced: count / rate (the producer's own
        # first-to-last commit, one transaction interval less, is in the summary).
        production = summary["messages"] / summary["rate"]
        for key, text in (("last_replayed_s", "connect → last replayed message"),
                          ("live_s", "connect → first live message after the replay")):
            value = summary.get(f"median_{key}")
            spread = summary.get(f"range_{key}")
            ok = value is not None and value < production
            rows.append({"goal": "2", "label": f"resume after {summary['messages']:,} missed "
                         f"(produced at {summary['rate']:,.0f}/s): {text}, median of "
                         f"{summary['runs'] - summary['failed']} runs",
                         "measured": "failed" if value is None else f"{value:.3f} s"
                         + (f" ({spread[0]:.3f}–{spread[1]:.3f})" if spread else ""),
                         "target": f"< {production:.3f} s (production time)",
                         "status": "met" if ok else "missed" if value is not None
                         else "failed", "value": value})
        raw = summary.get("median_raw_last_replayed_s")
        if raw is not None:
            spread = summary["range_raw_last_replayed_s"]
            rows.append({"goal": "2", "label": "the same replay to a bare socket (no client "
                         "library: the relay's side; information): connect → last replayed "
                         "message", "measured": f"{raw:.3f} s ({spread[0]:.3f}–{spread[1]:.3f}"
                         f"; {summary['raw_exactly_once_in_order']} of "
                         f"{summary.get('attempts', summary['runs'])} runs "
                         "once and in order)", "target": "–", "status": "–", "value": raw})
        rows.append({"goal": "2", "label": "every missed message once, in order, then live",
                     "measured": f"{summary['exactly_once_in_order']} of "
                     f"{summary.get('attempts', summary['runs'])} runs",
                     "target": "every run", "status": "met"
                     if summary["exactly_once_in_order"] == summary.get("attempts",
                                                                        summary["runs"])
                     else "missed"})
    burst = parts.get("burst")
    if burst is not None:
        variants, ratios = burst["summary"]["variants"], burst["summary"]["ratios"]
        for variant, text, target in (("on", "plain clients, history on / off", BURST_GOAL),
                                      ("positioned", "positioned clients (history on) / plain "
                                       "clients, history off (information)", None)):
            ratio = ratios[f"{variant}/off"]["ratio"]
            mine = variants[variant].get("median_deliveries_per_s")
            base = variants["off"].get("median_deliveries_per_s")
            per_round = ratios[f"{variant}/off"]["per_round"]
            rows.append({
                "goal": "3", "label": f"burst N={burst['clients']:,} B={burst['batch']}, "
                f"deliveries/s, {text}" + (f" ({_short(mine)} / {_short(base)})"
                                           if mine and base else ""),
                "measured": "failed" if ratio is None else f"{ratio:.3f}×" + (
                    f" (per-round ratios: median {per_round['median']:.3f}, "
                    f"{per_round['min']:.2f}–{per_round['max']:.2f})" if per_round else ""),
                "target": f"≥ {target:g}×" if target else "–",
                "status": "–" if target is None else "failed" if ratio is None
                else "met" if ratio >= target else "missed", "value": ratio})
    memory = parts.get("memory")
    if memory is not None:
        if "rss_growth_bytes" not in memory:
            rows.append({"goal": "4", "label": "history memory", "measured":
                         f"failed: {memory.get('error')}", "target": "≤ bound",
                         "status": "failed"})
        else:
            bound = memory["bound_bytes"]
            alone = memory["history_alone"]
            setting = "defaults" if bound == DEFAULT_BYTES else f"PGWS_HISTORY_BYTES {_mib(bound)}"
            rows.append({
                "goal": "4", "label": f"relay RSS growth, history full at {memory['channels']:,} "
                f"channels ({setting}; RSS {_mib(memory['rss_before_kib'] * 1024)} → "
                f"{_mib(memory['rss_after_kib'] * 1024)})",
                "measured": f"{_mib(memory['rss_growth_bytes'])} "
                            f"({memory['rss_growth_bytes'] / bound:.2f}× the bound)",
                "target": f"≤ {_mib(bound)} (PGWS_HISTORY_BYTES)" + (
                    f" + {ALLOCATOR_SLACK:.0%} allocator slack" if ALLOCATOR_SLACK else ""),
                "status": "met" if memory["rss_growth_within_bound"] and memory.get("at_bound")
                else "missed", "value": memory["rss_growth_bytes"]})
            first = memory.get("at_first_bound")
            if first:
                rows.append({
                    "goal": "4", "label": "relay RSS growth when the history first reached its "
                    f"byte bound (after {first['sent']:,} fills; information)",
                    "measured": _mib(first["rss_growth_bytes"]), "target": "–",
                    "status": "–", "value": first["rss_growth_bytes"]})
            held = alone.get("dropped_but_held_entries") \
                if alone.get("dropped_but_held_frame_bytes") else 0
            rows.append({
                "goal": "4", "label": f"History alone under tracemalloc ({alone['entries']:,} "
                f"entries kept, accounted {_mib(alone['accounted_bytes'])}"
                + (f"; {held:,} dropped entries still held by the logs, frames included"
                   if held else "") + ")",
                "measured": _mib(alone["traced_bytes"]), "target": f"≤ {_mib(bound)}",
                "status": "met" if alone["traced_bytes"] <= bound else "missed",
                "value": alone["traced_bytes"]})
    return rows


def _short(value: float) -> str:
    return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.1f} k"


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="small and short (smoke test)")
    parser.add_argument("--seconds", type=float, help="reset/alternate: production time "
                        "(default 60, --quick 3)")
    parser.add_argument("--rate", type=float, help="reset/alternate: notifications/s "
                        "(default 1000, --quick 500)")
    parser.add_argument("--batch", type=int, default=10, help="notifications per transaction")
    parser.add_argument("--reset-every", type=float, help="seconds (default 1, --quick 0.5)")
    parser.add_argument("--reset-mode", choices=("tick", "lifetime"), default="tick")
    parser.add_argument("--drain", type=float, default=30.0,
                        help="seconds the client may take to catch up after production ends")
    parser.add_argument("--replay-runs", type=int, help="default 5, --quick 1")
    parser.add_argument("--replay-messages", type=int, help="default 10000, --quick 2000")
    parser.add_argument("--replay-rate", type=float, default=10_000.0)
    parser.add_argument("--replay-batch", type=int, default=100)
    parser.add_argument("--burst-rounds", type=int, help="default 20, --quick 1")
    parser.add_argument("--burst-clients", type=int, help="default 1000, --quick 100")
    parser.add_argument("--procs", type=int, default=2, help="burst: client processes")
    parser.add_argument("--timeout", type=float, default=180.0, help="burst: seconds per run")
    parser.add_argument("--channels", type=int, help="memory: default 1000, --quick 100")
    parser.add_argument("--memory-messages", type=int,
                        help="memory: fills sent (default 300000, --quick 4000)")
    parser.add_argument("--seed", type=int, default=12, help="memory: the texts' seed")
    parser.add_argument("--settle", type=float, help="before each run, wait up to this many "
                        "seconds for a quiet second; default 20, --quick 0")
    parser.add_argument("--quiet", type=float, default=0.25,
                        help="replay, burst: a run during which the rest of the machine kept "
                             "more cores than this busy (on average) is disturbed, and made "
                             "again")
    parser.add_argument("--retries", type=int, help="replay, burst: times a disturbed run is "
                        "made again (default 4, --quick 0)")
    parser.add_argument("--relay-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every relay (repeatable)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--note", action="append", default=[], help="a line for the notes")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(PARTS)}")
    quick = args.quick
    for name, full, small in (("seconds", 60.0, 3.0), ("rate", 1000.0, 500.0),
                              ("reset_every", 1.0, 0.5), ("replay_runs", 5, 1),
                              ("replay_messages", 10_000, 2000), ("burst_rounds", 20, 1),
                              ("burst_clients", 1000, 100), ("channels", 1000, 100),
                              ("memory_messages", 300_000, 4000), ("settle", 20.0, 0.0),
                              ("retries", 4, 0)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    relay_env = dict(item.split("=", 1) for item in args.relay_env)
    source = relay_source()
    print(f"relay imported from {source}", flush=True)
    head = {"what": "resumable streams: resets, cross-relay resume, replay speed, burst with "
                    "history, history memory (see the script's docstring)",
            "command": "python -m bench.scenarios.resume " + shlex.join(sys.argv[1:]),
            **git_head(), "relay_source": source, "machine": machine(),
            "started": time.strftime("%F %T"), "relay_env": relay_env,
            "load_average_start": [round(x, 2) for x in os.getloadavg()],
            "notes": list(args.note)}
    results: dict[str, Any] = {}

    def save(complete: bool) -> None:
        if args.json:
            write_json(args.json, {**head, "complete": complete,
                                   # Others commit to this checkout meanwhile: what it was at
                                   # the end (relays started later import the newer code).
                                   "at_end": {**git_head(), "at": time.strftime("%F %T")},
                                   "load_average_end": [round(x, 2) for x in os.getloadavg()],
                                   "parts": results, "goals": goal_rows(results)})

    for part in parts:
        print(f"== {part}", flush=True)
        started = time.monotonic()
        if part == "reset":
            results[part] = lossless_part(1, args, relay_env)
        elif part == "alternate":
            results[part] = lossless_part(2, args, relay_env)
        elif part == "replay":
            results[part] = replay_part(args, relay_env)
        elif part == "burst":
            results[part] = burst_part(args, relay_env)
        else:
            results[part] = memory_part(args, relay_env)
        results[part]["part_seconds"] = round(time.monotonic() - started, 1)
        _print_part(part, results[part])
        save(False)
    print("-- goals")
    for row in goal_rows(results):
        print(f"   {row['goal']}  {row['label']}: {row['measured']} (target {row['target']}): "
              f"{row['status']}")
    print(f"reproduce: {head['command']}")
    save(True)
    if args.json:
        print(f"wrote {args.json}")


def _print_part(part: str, result: dict[str, Any]) -> None:
    keys = {"reset": ("lost", "duplicated", "out_of_order", "lost_events", "resets",
                      "reconnects", "resumes", "replayed", "outage_s", "age_ms",
                      "per_relay_connections", "others_cpu_s"),
            "alternate": ("lost", "duplicated", "out_of_order", "lost_events", "resets",
                          "reconnects", "resumes", "replayed", "outage_s", "age_ms",
                          "per_relay_connections", "others_cpu_s"),
            "replay": ("summary",), "burst": ("summary",),
            "memory": ("rss_before_kib", "rss_after_kib", "rss_peak_kib", "rss_growth_bytes",
                       "bound_bytes", "rss_growth_within_bound", "at_bound")}[part]
    for key in (*keys, "error"):
        if key in result:
            print(f"   {key}: {json.dumps(result[key])}", flush=True)
    if part == "memory" and "history_alone" in result:
        alone = {k: v for k, v in result["history_alone"].items() if k != "samples"}
        print(f"   history_alone: {json.dumps(alone)}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "produce":
        sys.exit(produce_main(sys.argv[2]))
    if len(sys.argv) == 3 and sys.argv[1] == "history-alone":
        sys.exit(history_alone_main(sys.argv[2]))
    main()

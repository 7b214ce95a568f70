"""Where PostgreSQL becomes the limit: NOTIFY's own ceilings on this machine.

    flock /tmp/machine.lock python -m bench.scenarios.pglimits --json bench/results/pglimits.json
    python -m bench.scenarios.pglimits --quick          # a small smoke run (seconds, not minutes)

Owns the measurement of PostgreSQL's LISTEN/NOTIFY path without any relay in the way (one row
puts a real ``pgws-relay`` in a listener's place): notifying commits/s and notifications/s,
deliveries to 1, 10 and 100 LISTENing connections, what one stalled listener does to the
queue and to everyone else, the chart of it and bench/RESULTS.md's section rendered from the
JSON (:func:`section`, called by ``bench/report.py``). Never touches the machine's shared cluster:
everything runs against a private one (:mod:`bench.parts.pgcluster`), removed on any exit.

Theory of operation
-------------------
*Throughput.* ``pgbench`` commits transactions of k ``SELECT pg_notify(...)`` statements
(k = 1, 10, 100), each payload a distinct 100-byte JSON text (PostgreSQL folds identical
notifications of one transaction into one, so the k payloads differ by their index), sent in
pipeline mode (``\\startpipeline``: one round trip per transaction, so k statements do not
become k loopback round trips and the figure is PostgreSQL's, not the protocol's). Commits/s
is pgbench's tps, notifications/s tps x k. The client count is the best of a short sweep per
k, with PostgreSQL's durability defaults (``fsync=on``, ``synchronous_commit=on``), so every
commit waits for a WAL flush and more clients mean larger group commits. Listener processes
hold 1, 10 or 100 connections that LISTEN and drain at once (libpq's ``consume_input`` and
``notifies`` on each readable socket, no per-notification Python beyond a count); after
pgbench ends, every listener must have received sent x 1 notifications and the queue must be
back to 0, else the row says it did not keep up. Everything shares the 2 cores: a sampler
reads the CPU time of PostgreSQL's backends (by ``application_name``: producers, listeners,
the relay), of pgbench, of the listener processes and of the relay from ``/proc`` so the
split is in the JSON.

*Stall.* While pgbench produces at a fixed rate, one extra listener stops consuming: either a
LISTENing session idle in an open transaction (``BEGIN; SELECT 1;``: a backend delivers
notifications only between transactions) or a LISTENing connection whose socket is never
read (the backend blocks writing to it once the socket buffers are full, and its queue
position only moves when a read pass ends). ``pg_notification_queue_usage()`` is sampled
every second; its growth per second and per notification (the queue is 8 KiB SLRU pages; the
usage is page-granular, a fraction of 2^20 pages = 8 GiB) gives the time to fill at the
measured maximum rate. Healthy listeners keep counting throughout. Then the stall ends
(COMMIT, or the socket is read) with the producer still running, and the time until the
queue is back to its pre-stall level is measured; the stalled listener must then have
everything too.

*Entry sizes and a full queue.* A listener idle in a transaction pins the queue's tail while
batches of notifications of one payload size go in: pages used / notifications = bytes per
entry. Last, the same pin with 7,900-byte payloads (one entry per page) fills the queue as
fast as one connection can, past half (PostgreSQL's warning, read from the cluster's log and
the producer's notices) up to the "too many notifications" error when that fits in
:data:`FILL_LIMIT_S`; closing the pinning session frees the queue at once.

Needs root (the private cluster) and 10 GiB free under /tmp for the fill (skipped otherwise).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import select
import selectors
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import psycopg

from bench.parts.harness import Server, commit, free_port, machine
from bench.parts.pgcluster import Cluster, _bin, remove_stale

#: The one notification channel; the relay LISTENs on it too in its row.
CHANNEL = "pglimits"
#: Payload size of every throughput notification: about one Econia event envelope.
PAYLOAD_BYTES = 100
#: Notifications per transaction, and LISTENing connections, of the throughput grid.
KS = (1, 10, 100)
LISTENERS = (1, 10, 100)
#: pgbench client counts tried per k (with one listener); the best is used for the grid.
SWEEP_CLIENTS = (1, 2, 4, 8, 16)
#: Listener connections per listener process: 2 cores, so at most 2 processes are useful.
LISTENER_PROCESSES = 2
#: Application names, so the CPU sampler can tell backends apart.
APP_LISTENER = "pglimits-listener"
APP_STALL = "pglimits-stalled"
APP_MONITOR = "pglimits-monitor"
#: pg_notification_queue_usage() is a share of this many 8 KiB pages (PostgreSQL 15:
#: (QUEUE_MAX_PAGE + 1) / 2 with 32-page SLRU segments), 8 GiB.
QUEUE_PAGES = 1 << 20
PAGE_BYTES = 8192
QUEUE_BYTES = QUEUE_PAGES * PAGE_BYTES
#: An entry's fixed part in the queue (length, database, xid, sender pid: 4 x 4 bytes) before
#: "channel\\0payload\\0", padded to 4 (QUEUEALIGN is INTALIGN); an entry never spans two
#: pages, so what is left at a page's end is lost.
ENTRY_HEADER = 16
ENTRY_ALIGN = 4
#: Stall: producer rate (commits/s at k = STALL_K), seconds stalled, seconds to drain after.
STALL_K = 10
STALL_RATE = 1000
STALL_SECONDS = 30.0
DRAIN_SECONDS = 30.0
#: Healthy listeners beside the stalled one.
STALL_HEALTHY = 2
#: Payload sizes of the entry-size table, and the pages each measurement should fill.
ENTRY_SIZES = (10, 100, 340, 1000, 4000, 7900)
ENTRY_PAGES = 400
#: The fill: payloads that take a page each, notifications per transaction, a time bound, and
#: the free space it needs under /tmp (8 GiB of queue files plus a margin).
FILL_PAYLOAD = 7900
FILL_BATCH = 1000
FILL_LIMIT_S = 150.0
FILL_DISK_BYTES = 10 << 30
#: A measurement waits (at most LOAD_WAIT_S) for the 1-minute load average to fall below this;
#: this script's own previous run keeps it near 1-2, so it only catches heavy visitors.
QUIET_LOAD = 1.5
LOAD_WAIT_S = 15.0
#: Seconds to wait for listeners to catch up after the producer stops.
SETTLE_S = 60.0
#: How often the CPU sampler reads /proc.
CPU_PERIOD = 0.2


def payload(index: int, size: int = PAYLOAD_BYTES) -> str:
    """A ``size``-byte Econia-like envelope, distinct per ``index`` within a transaction."""
    head = (f'{{"channel":"fill_event","payload":{{"i":{index},"market_id":7,"price":12345,'
            '"size":100,"pad":"')
    tail = '"}}'
    pad = size - len(head) - len(tail)
    if pad < 0:
        raise ValueError(f"payload {index} does not fit in {size} bytes")
    return head + "x" * pad + tail


def entry_bytes(payload_size: int, channel: str = CHANNEL) -> int:
    """PostgreSQL's queue entry for one notification, before page-end waste."""
    raw = ENTRY_HEADER + len(channel) + 1 + payload_size + 1
    return -(-raw // ENTRY_ALIGN) * ENTRY_ALIGN


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def wait_quiet(log: Callable[[str], None]) -> float:
    """Wait (bounded) for the machine to settle; the 1-minute load average at the start."""
    deadline = time.monotonic() + LOAD_WAIT_S
    while load1() > QUIET_LOAD and time.monotonic() < deadline:
        time.sleep(2)
    if load1() > QUIET_LOAD:
        log(f"  (load average {load1()} at the start: someone else is using the machine)")
    return load1()


# -- producers -------------------------------------------------------------------------------

def write_script(k: int, directory: str, size: int = PAYLOAD_BYTES) -> str:
    path = os.path.join(directory, f"notify-{k}-{size}.sql")
    lines = ["\\startpipeline", "BEGIN;"]
    lines += [f"SELECT pg_notify('{CHANNEL}', '{payload(i, size)}');" for i in range(k)]
    lines += ["END;", "\\endpipeline"]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


class Pgbench:
    """One pgbench run in the background; :meth:`result` parses its summary."""

    def __init__(self, pg: Cluster, script: str, clients: int, seconds: float,
                 rate: float | None = None) -> None:
        self.clients = clients
        self.jobs = min(clients, os.cpu_count() or 2)
        command = [_bin("pgbench"), "-n", "-M", "prepared", "-f", script, "-c", str(clients),
                   "-j", str(self.jobs), "-T", str(max(1, round(seconds))),
                   "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "postgres"]
        if rate:
            command[1:1] = ["-R", str(rate)]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PGAPPNAME": "pgbench"})

    def result(self) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=600)
        if self.proc.returncode != 0:
            raise RuntimeError(f"pgbench failed ({self.proc.returncode}): {err.strip()[-800:]}")

        def number(pattern: str) -> float:
            found = re.search(pattern, out)
            if not found:
                raise RuntimeError(f"pgbench output lacks {pattern!r}:\n{out}")
            return float(found.group(1))

        return {"transactions": int(number(r"actually processed: (\d+)")),
                "failed": int(number(r"number of failed transactions: (\d+)")),
                "tps": number(r"tps = ([\d.]+) \(without initial connection time\)"),
                "latency_ms": number(r"latency average = ([\d.]+) ms"),
                "clients": self.clients, "jobs": self.jobs}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# -- listeners -------------------------------------------------------------------------------

def _listen_process(uri: str, count: int, pipe: Pipe) -> None:
    """Hold ``count`` LISTENing connections and count what each receives, until told to stop.

    Commands on ``pipe``: "counts" (answer: the list of counts), "stop"."""
    connections = []
    for _ in range(count):
        connection = psycopg.connect(uri, autocommit=True, application_name=APP_LISTENER)
        connection.execute(f"LISTEN {CHANNEL}")
        connections.append(connection)
    selector = selectors.DefaultSelector()
    for index, connection in enumerate(connections):
        selector.register(connection.pgconn.socket, selectors.EVENT_READ, index)
    counts = [0] * count
    pipe.send(("ready", os.getpid()))
    while True:
        for key, _ in selector.select(0.05):
            pgconn = connections[key.data].pgconn
            pgconn.consume_input()
            received = 0
            while pgconn.notifies() is not None:
                received += 1
            counts[key.data] += received
        if pipe.poll():
            command = pipe.recv()
            if command == "counts":
                pipe.send(counts)
            elif command == "stop":
                break
    for connection in connections:
        connection.close()


class Listeners:
    """``count`` draining LISTEN connections over at most :data:`LISTENER_PROCESSES`."""

    def __init__(self, uri: str, count: int) -> None:
        context = mp.get_context("spawn")  # no inherited libpq sockets in the children
        processes = min(count, LISTENER_PROCESSES)
        shares = [count // processes + (1 if i < count % processes else 0)
                  for i in range(processes)]
        self.count = count
        self.pipes: list[Pipe] = []
        self.procs: list[Any] = []
        self.pids: list[int] = []
        for share in shares:
            mine, theirs = context.Pipe()
            proc = context.Process(target=_listen_process, args=(uri, share, theirs),
                                   daemon=True)
            proc.start()
            self.pipes.append(mine)
            self.procs.append(proc)
        for pipe in self.pipes:
            if not pipe.poll(120):
                self.stop()
                raise RuntimeError("a listener process did not start")
            self.pids.append(pipe.recv()[1])

    def counts(self) -> list[int]:
        found: list[int] = []
        for pipe in self.pipes:
            pipe.send("counts")
            found += pipe.recv()
        return found

    def settle(self, expected: int, timeout: float = SETTLE_S) -> list[int]:
        """Counts once every connection has ``expected``, or nothing moved for 3 s."""
        deadline = time.monotonic() + timeout
        last, still = self.counts(), time.monotonic()
        while min(last) < expected and time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.counts()
            if now != last:
                last, still = now, time.monotonic()
            elif time.monotonic() - still > 3:
                break
        return last

    def stop(self) -> None:
        for pipe, proc in zip(self.pipes, self.procs, strict=False):
            with suppress(OSError):
                pipe.send("stop")
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def drain(pgconn: Any, wait: float = 0.0) -> int:
    """Read everything that has arrived on one connection (waiting up to ``wait`` seconds for
    the first bytes); the number of notifications. One ``consume_input`` reads one buffer's
    worth, so it loops while the socket stays readable."""
    received = 0
    while select.select([pgconn.socket], [], [], wait)[0]:
        pgconn.consume_input()
        while pgconn.notifies() is not None:
            received += 1
        wait = 0.0
    return received


# -- monitoring ------------------------------------------------------------------------------

def _proc_cpu(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class CpuSplit:
    """CPU seconds per group while in use: PostgreSQL's backends by application_name, and the
    client-side processes given by pid. Backends that exit keep their last reading."""

    def __init__(self, pg: Cluster, clients: dict[str, list[int]]) -> None:
        self.postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
        self.uri = pg.uri()
        self.clients = clients
        self.start: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.group: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _children(self) -> dict[int, float]:
        found = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                info = _proc_cpu(int(entry))
                if info and info[0] == self.postmaster:
                    found[int(entry)] = info[1]
        return found

    def _classify(self, db: psycopg.Connection[Any]) -> None:
        rows = db.execute("SELECT pid, backend_type, application_name FROM pg_stat_activity"
                          ).fetchall()
        for pid, kind, app in rows:
            if pid not in self.last or self.group.get(pid, "unknown") != "unknown":
                continue
            if kind != "client backend":
                self.group[pid] = "postgres: background"
            elif app == "pgbench":
                self.group[pid] = "postgres: producer backends"
            elif app in (APP_LISTENER, APP_STALL):
                self.group[pid] = "postgres: listener backends"
            elif app.startswith("pgws-relay"):
                self.group[pid] = "postgres: relay backends"
            elif app == APP_MONITOR:
                self.group[pid] = "postgres: monitor"

    def _run(self) -> None:
        with psycopg.connect(self.uri, autocommit=True, application_name=APP_MONITOR) as db:
            while True:
                for pid, seconds in self._children().items():
                    self.last[pid] = seconds
                    self.start.setdefault(pid, seconds if self._first else 0.0)
                for pid in self.clients.get("pgbench", []):
                    info = _proc_cpu(pid)
                    if info:
                        self.last[pid] = info[1]
                        self.start.setdefault(pid, 0.0)
                        self.group[pid] = "pgbench"
                self._first = False
                if any(self.group.get(pid, "unknown") == "unknown" for pid in self.last):
                    self._classify(db)
                if self._stop.wait(CPU_PERIOD):
                    break

    def __enter__(self) -> CpuSplit:
        self._first = True
        self._wall = time.monotonic()
        self._busy = _machine_busy()
        self._client_start = {pid: (_proc_cpu(pid) or (0, 0.0))[1]
                              for name, pids in self.clients.items() if name != "pgbench"
                              for pid in pids}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.wall = time.monotonic() - self._wall
        busy = _machine_busy()
        self.machine_busy = (busy[0] - self._busy[0]) / max(1, busy[1] - self._busy[1])
        self.seconds: dict[str, float] = {}
        for pid, last in self.last.items():
            group = self.group.get(pid, "postgres: other")
            self.seconds[group] = self.seconds.get(group, 0.0) + last - self.start[pid]
        for name, pids in self.clients.items():
            if name == "pgbench":
                continue
            for pid in pids:
                info = _proc_cpu(pid)
                if info:
                    self.seconds[name] = (self.seconds.get(name, 0.0) + info[1]
                                          - self._client_start[pid])

    def cores(self) -> dict[str, Any]:
        """Cores used per group (CPU seconds / wall seconds) and the machine's busy share."""
        cores = {name: round(value / self.wall, 3) for name, value in sorted(self.seconds.items())}
        # Whatever else ran meanwhile (another engineer's benchmark, this script's sampler):
        # the load average cannot say, since this run alone keeps many processes runnable.
        others = self.machine_busy * (os.cpu_count() or 2) - sum(cores.values())
        return {"cores": cores, "other_cores": round(max(0.0, others), 3),
                "machine_busy_share": round(self.machine_busy, 3), "wall_s": round(self.wall, 2)}


def queue_usage(db: psycopg.Connection[Any]) -> float:
    row = db.execute("SELECT pg_notification_queue_usage()").fetchone()
    return float(row[0]) if row else 0.0


# -- part 1: throughput ----------------------------------------------------------------------

def throughput_run(pg: Cluster, script: str, k: int, clients: int, seconds: float,
                   listeners: Listeners | None, relay: Server | None) -> dict[str, Any]:
    """One pgbench run against the listeners given; the row of the JSON."""
    loadavg = load1()
    groups = {"listener processes": listeners.pids if listeners else [],
              "relay process": relay._pids() if relay else []}
    before = listeners.counts() if listeners else []
    relay_before = relay.stats()["notifications"] if relay else 0
    producer = Pgbench(pg, script, clients, seconds)
    groups["pgbench"] = [producer.proc.pid]
    try:
        with CpuSplit(pg, groups) as cpu:
            result = producer.result()
    finally:
        producer.stop()
    sent = result["transactions"] * k
    row: dict[str, Any] = {"k": k, **result, "commits_per_s": result["tps"],
                           "notifications_per_s": result["tps"] * k, "sent": sent,
                           "load_1m_start": loadavg, "cpu": cpu.cores()}
    if listeners:
        counts = listeners.settle(max(before) + sent)
        received = [after - start for after, start in zip(counts, before, strict=True)]
        row.update(listeners=listeners.count, listener_kind="psycopg",
                   received_min=min(received), received_max=max(received))
    else:
        assert relay is not None
        deadline, received = time.monotonic() + SETTLE_S, 0
        while time.monotonic() < deadline:
            received = relay.stats()["notifications"] - relay_before
            if received >= sent:
                break
            time.sleep(0.5)
        row.update(listeners=1, listener_kind="pgws-relay", received_min=received,
                   received_max=received)
    with psycopg.connect(pg.uri(), autocommit=True, application_name=APP_MONITOR) as db:
        row["queue_usage_end"] = queue_usage(db)
    row["deliveries_per_s"] = row["notifications_per_s"] * row["listeners"]
    row["kept_up"] = row["received_min"] == sent and row["queue_usage_end"] == 0.0
    return row


def sweep(pg: Cluster, scripts: dict[int, str], ks: tuple[int, ...], counts: tuple[int, ...],
          seconds: float, log: Callable[[str], None]) -> tuple[list[dict[str, Any]],
                                                                dict[int, int]]:
    """pgbench client counts per k with one listener; the best count per k."""
    rows = []
    listeners = Listeners(pg.uri(), 1)
    try:
        for k in ks:
            for clients in counts:
                row = throughput_run(pg, scripts[k], k, clients, seconds, listeners, None)
                rows.append(row)
                log(f"  sweep k={k} c={clients}: {row['tps']:,.0f} commits/s, "
                    f"{row['notifications_per_s']:,.0f} notifications/s")
    finally:
        listeners.stop()
    best = {k: max((r for r in rows if r["k"] == k), key=lambda r: r["tps"])["clients"]
            for k in ks}
    return rows, best


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians (and min-max) of the runs of each (durability, listener kind, listeners, k)."""
    keys = sorted({(r["durability"], r["listener_kind"], r["listeners"], r["k"]) for r in rows})
    out = []
    for durability, kind, listeners, k in keys:
        runs = [r for r in rows if (r["durability"], r["listener_kind"], r["listeners"], r["k"])
                == (durability, kind, listeners, k)]
        entry: dict[str, Any] = {"durability": durability, "listener_kind": kind,
                                 "listeners": listeners, "k": k, "runs": len(runs),
                                 "clients": runs[0]["clients"],
                                 "all_kept_up": all(r["kept_up"] for r in runs)}
        for key in ("commits_per_s", "notifications_per_s", "deliveries_per_s"):
            values = [r[key] for r in runs]
            entry[key] = {"median": statistics.median(values), "min": min(values),
                          "max": max(values)}
        groups = sorted({g for r in runs for g in r["cpu"]["cores"]})
        entry["cpu_cores_median"] = {
            g: round(statistics.median(r["cpu"]["cores"].get(g, 0.0) for r in runs), 3)
            for g in groups}
        out.append(entry)
    return out


def throughput(pg: Cluster, scripts: dict[int, str], clients: dict[int, int], runs: int,
               ks: tuple[int, ...], counts: tuple[int, ...], seconds: float, durability: str,
               log: Callable[[str], None], relay_ks: tuple[int, ...] = ()
               ) -> list[dict[str, Any]]:
    """The grid, runs interleaved (run 1 of every case, then run 2, ...)."""
    rows = []
    for run in range(runs):
        for count in counts:
            wait_quiet(log)
            listeners = Listeners(pg.uri(), count)
            try:
                for k in ks:
                    row = throughput_run(pg, scripts[k], k, clients[k], seconds, listeners,
                                         None)
                    row.update(run=run, durability=durability)
                    rows.append(row)
                    log(f"  run {run + 1} k={k} L={count}: {row['tps']:,.0f} commits/s, "
                        f"{row['notifications_per_s']:,.0f} notifications/s, kept up "
                        f"{row['kept_up']} (load {row['load_1m_start']})")
            finally:
                listeners.stop()
        if relay_ks:
            relay = Server("relay", free_port(), {"PGWS_DB_URI": pg.uri(),
                                                  "PGWS_LISTEN_CHANNEL": CHANNEL,
                                                  "PGWS_LOG_LEVEL": "INFO"})
            try:
                for k in relay_ks:
                    row = throughput_run(pg, scripts[k], k, clients[k], seconds, None, relay)
                    row.update(run=run, durability=durability,
                               relay_listener_losses=relay.count("listener connection lost"))
                    rows.append(row)
                    log(f"  run {run + 1} k={k} relay: {row['tps']:,.0f} commits/s, kept up "
                        f"{row['kept_up']}")
            finally:
                relay.stop()
    return rows


# -- part 2: a stalled listener --------------------------------------------------------------

def stall(pg: Cluster, script: str, variant: str, rate: int, stalled_s: float, drain_s: float,
          log: Callable[[str], None]) -> dict[str, Any]:
    """One stalled listener (``transaction`` or ``socket``) beside healthy ones."""
    loadavg = wait_quiet(log)
    healthy = Listeners(pg.uri(), STALL_HEALTHY)
    stalled = psycopg.connect(pg.uri(), autocommit=variant != "transaction",
                              application_name=APP_STALL)
    log_offset = pg.log_file.stat().st_size
    samples: list[dict[str, float]] = []
    try:
        stalled.execute(f"LISTEN {CHANNEL}")
        if variant == "transaction":
            stalled.commit()
        # What psycopg itself reads while it runs a statement on this connection (the
        # backlog arrives during COMMIT) goes to its handlers, not to libpq's queue.
        handled = [0]
        stalled.add_notify_handler(lambda _: handled.__setitem__(0, handled[0] + 1))
        db = psycopg.connect(pg.uri(), autocommit=True, application_name=APP_MONITOR)
        producer = Pgbench(pg, script, 2, stalled_s + drain_s + 5, rate=rate)
        start = time.monotonic()
        base = healthy.counts()[0]
        stalled_received = 0

        def sample(phase: str) -> dict[str, float]:
            entry = {"t": round(time.monotonic() - start, 3), "phase": phase,
                     "usage": queue_usage(db), "healthy_min": min(healthy.counts()) - base,
                     "healthy_max": max(healthy.counts()) - base,
                     "stalled_received": stalled_received + handled[0]}
            samples.append(entry)
            return entry

        # Before: everyone drains (the stalled connection too) for a few seconds.
        while time.monotonic() - start < 5:
            stalled_received += drain(stalled.pgconn, 0.05)
            if not samples or time.monotonic() - start - samples[-1]["t"] >= 1:
                sample("before")
        if variant == "transaction":
            stalled.execute("SELECT 1")  # BEGIN; SELECT 1; ... idle in transaction
        stall_began = time.monotonic()
        while time.monotonic() - stall_began < stalled_s:
            time.sleep(max(0.0, 1 - (time.monotonic() - start - samples[-1]["t"])))
            sample("stalled")
        ended = time.monotonic()
        if variant == "transaction":
            stalled.commit()  # returns once the backlog is read: psycopg reads it meanwhile
        peak = max(s["usage"] for s in samples)
        baseline = max(s["usage"] for s in samples if s["phase"] == "before")
        drained_after: float | None = None
        last_sample = 0.0
        while time.monotonic() - ended < drain_s:
            stalled_received += drain(stalled.pgconn, 0.01)
            if time.monotonic() - last_sample >= 0.1:
                last_sample = time.monotonic()
                entry = sample("draining")
                if drained_after is None and entry["usage"] <= baseline:
                    drained_after = round(time.monotonic() - ended, 2)
        pgbench = producer.result()
        sent = pgbench["transactions"] * STALL_K
        deadline = time.monotonic() + SETTLE_S
        while stalled_received + handled[0] < sent and time.monotonic() < deadline:
            stalled_received += drain(stalled.pgconn, 0.01)
        stalled_received += handled[0]
        final = healthy.settle(sent)
        usage_end = queue_usage(db)
        db.close()
    finally:
        stalled.close()
        healthy.stop()
    with open(pg.log_file, errors="replace") as handle:
        handle.seek(log_offset)
        log_lines = [line.rstrip() for line in handle if "NOTIFY" in line or "queue" in line]
    # Growth: a least-squares line through the stalled samples once the queue grows.
    growing = [s for s in samples if s["phase"] == "stalled" and s["usage"] > baseline]
    result: dict[str, Any] = {
        "variant": variant, "rate_commits_per_s": rate, "k": STALL_K,
        "rate_notifications_per_s": rate * STALL_K, "payload_bytes": PAYLOAD_BYTES,
        "stalled_s": stalled_s, "stall_began_s": round(stall_began - start, 3),
        "healthy_listeners": STALL_HEALTHY, "load_1m_start": loadavg,
        "sent": sent, "healthy_received_min": min(final), "stalled_received": stalled_received,
        "everyone_got_everything": min(final) == sent and stalled_received == sent,
        "peak_usage": peak, "peak_bytes": peak * QUEUE_BYTES, "baseline_usage": baseline,
        "drained_after_s": drained_after, "usage_end": usage_end, "log_lines": log_lines,
        "pgbench": pgbench, "samples": samples}
    if len(growing) >= 3:
        times = [s["t"] for s in growing]
        usage = [s["usage"] * QUEUE_BYTES for s in growing]
        notes = [s["healthy_min"] for s in growing]
        slope = statistics.linear_regression(times, usage).slope
        per_note = (usage[-1] - usage[0]) / max(1, notes[-1] - notes[0])
        result.update(growth_onset_s=round(growing[0]["t"] - (stall_began - start), 2),
                      growth_bytes_per_s=slope, growth_bytes_per_notification=per_note,
                      healthy_rate_while_stalled=(notes[-1] - notes[0]) / (times[-1] - times[0]))
    return result


# -- part 3: entry sizes, and the full queue --------------------------------------------------

@contextmanager
def pinned(pg: Cluster) -> Iterator[psycopg.Connection[Any]]:
    """A LISTENing session idle in a transaction: the queue's tail cannot move past it."""
    pin = psycopg.connect(pg.uri(), application_name=APP_STALL)
    try:
        pin.execute(f"LISTEN {CHANNEL}")
        pin.commit()
        pin.execute("SELECT 1")
        yield pin
    finally:
        pin.close()  # the backend exits without reading: its share of the queue is let go


def entry_sizes(pg: Cluster, sizes: tuple[int, ...], pages: int) -> list[dict[str, Any]]:
    rows = []
    with psycopg.connect(pg.uri(), autocommit=True, application_name=APP_MONITOR) as db:
        for size in sizes:
            per_page = PAGE_BYTES // entry_bytes(size)
            count = pages * per_page
            with pinned(pg):
                before = queue_usage(db)
                for first in range(0, count, 5000):
                    db.execute("SELECT count(pg_notify(%s, lpad(i::text, %s, 'x'))) "
                               "FROM generate_series(%s::int, %s::int) i",
                               (CHANNEL, size, first, min(count, first + 5000) - 1))
                used = (queue_usage(db) - before) * QUEUE_BYTES
            rows.append({"payload_bytes": size, "notifications": count,
                         "entry_bytes": entry_bytes(size), "entries_per_page": per_page,
                         "measured_bytes_per_notification": used / count,
                         "predicted_bytes_per_notification": PAGE_BYTES / per_page})
    return rows


def fill(pg: Cluster, limit_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Pin the queue and fill it with page-sized notifications until full or ``limit_s``."""
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < FILL_DISK_BYTES:
        return {"skipped": f"{free / 2**30:.1f} GiB free under /tmp, needs "
                           f"{FILL_DISK_BYTES / 2**30:.0f}"}
    loadavg = wait_quiet(log)
    log_offset = pg.log_file.stat().st_size
    notices: list[str] = []
    samples: list[dict[str, float]] = []
    sent, error, full_at = 0, None, None
    with psycopg.connect(pg.uri(), autocommit=True, application_name=APP_MONITOR) as db, \
            psycopg.connect(pg.uri(), autocommit=True, application_name="pgbench") as producer:
        producer.add_notice_handler(
            lambda diag: notices.append(f"{diag.severity}: {diag.message_primary} "
                                        f"{diag.message_detail or ''} {diag.message_hint or ''}"
                                        .strip()))
        pin = psycopg.connect(pg.uri(), application_name=APP_STALL)
        pin.execute(f"LISTEN {CHANNEL}")
        pin.commit()
        pin.execute("SELECT 1")
        start = last = time.monotonic()
        samples.append({"t": 0.0, "usage": queue_usage(db), "sent": 0})
        try:
            while time.monotonic() - start < limit_s:
                try:
                    producer.execute("SELECT count(pg_notify(%s, repeat('x', %s) || i)) "
                                     "FROM generate_series(1, %s) i",
                                     (CHANNEL, FILL_PAYLOAD - 4, FILL_BATCH))
                    sent += FILL_BATCH
                except psycopg.Error as exc:
                    error = str(exc).strip()
                    full_at = round(time.monotonic() - start, 2)
                    samples.append({"t": full_at, "usage": queue_usage(db), "sent": sent})
                    break
                if time.monotonic() - last >= 1:
                    last = time.monotonic()
                    samples.append({"t": round(last - start, 2), "usage": queue_usage(db),
                                    "sent": sent})
            peak = queue_usage(db)
            files = len(os.listdir(pg.data / "pg_notify"))
        finally:
            released = time.monotonic()
            pin.close()
        after_close = queue_usage(db)
        freed_in: float | None = None
        while time.monotonic() - released < 30:
            if queue_usage(db) == 0.0:
                freed_in = round(time.monotonic() - released, 3)
                break
            time.sleep(0.05)
        producer.execute("SELECT pg_notify(%s, 'after')", (CHANNEL,))
        usage_end = queue_usage(db)
    with open(pg.log_file, errors="replace") as handle:
        handle.seek(log_offset)
        log_lines = [line.rstrip() for line in handle
                     if "NOTIFY" in line or "notif" in line.lower()]
    elapsed = samples[-1]["t"] or 1.0
    return {"payload_bytes": FILL_PAYLOAD, "batch": FILL_BATCH, "limit_s": limit_s,
            "load_1m_start": loadavg, "sent": sent, "peak_usage": peak,
            "peak_bytes": peak * QUEUE_BYTES, "segment_files_at_peak": files,
            "bytes_per_s": samples[-1]["usage"] * QUEUE_BYTES / elapsed,
            "notifications_per_s": sent / elapsed, "full_error": error, "full_at_s": full_at,
            "half_at_s": next((s["t"] for s in samples if s["usage"] >= 0.5), None),
            "usage_right_after_close": after_close, "freed_within_s": freed_in,
            "usage_after_next_notify": usage_end, "producer_notices": notices[:10],
            "log_lines": log_lines[:40], "samples": samples}


# -- bench/RESULTS.md's section ---------------------------------------------------------------

#: Column groups of the CPU table: (heading, the CpuSplit groups summed into it).
_CPU_COLUMNS = (
    ("PostgreSQL: producer backends", ("postgres: producer backends",)),
    ("PostgreSQL: listener backends", ("postgres: listener backends",
                                       "postgres: relay backends")),
    ("PostgreSQL: background", ("postgres: background", "postgres: other")),
    ("pgbench", ("pgbench",)),
    ("listener processes", ("listener processes", "relay process")))
#: How each stall variant was made, for the table.
_STALL_LABELS = {"transaction": "idle in a transaction (`BEGIN; SELECT 1;`)",
                 "socket": "socket never read"}


def _n(value: float) -> str:
    """35,397.2 → 35,397; 9.6 → 9.6; 0.4 → 0.4."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2g}" if value < 10 else f"{value:.1f}"


def _spread(figures: dict[str, float]) -> str:
    """A summary's {"median", "min", "max"} as "median (min–max)"."""
    if figures["min"] == figures["max"]:
        return _n(figures["median"])
    return f"{_n(figures['median'])} ({_n(figures['min'])}–{_n(figures['max'])})"


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def _who(row: dict[str, Any]) -> str:
    return "1 pgws-relay" if row["listener_kind"] == "pgws-relay" else str(row["listeners"])


def _find(summary: list[dict[str, Any]], listeners: int, k: int, kind: str = "psycopg",
          durability: str = "defaults") -> dict[str, Any] | None:
    return next((s for s in summary if (s["listeners"], s["k"], s["listener_kind"],
                                        s["durability"]) == (listeners, k, kind, durability)),
                None)


def _other_cores(result: dict[str, Any], row: dict[str, Any]) -> str:
    """The median of the runs' ``other_cores`` (work on the machine that was not this run's)."""
    values = [run["cpu"]["other_cores"] for run in result.get("throughput", [])
              if "other_cores" in run["cpu"]
              and (run["durability"], run["listener_kind"], run["listeners"], run["k"])
              == (row["durability"], row["listener_kind"], row["listeners"], row["k"])]
    return f"{statistics.median(values):.2f}" if values else "–"


def _throughput_lines(result: dict[str, Any]) -> list[str]:
    summary = result.get("summary") or []
    rows = [s for s in summary if s["durability"] == "defaults"]
    if not rows:
        return []
    rows.sort(key=lambda s: (s["listener_kind"] == "pgws-relay", s["listeners"], s["k"]))
    clients = ", ".join(f"k={k}: {c}" for k, c in (result.get("clients_by_k") or {}).items())
    lines = ["### Throughput", "",
             f"Payloads of {result['payload_bytes']} bytes, k notifications per transaction, "
             f"{result['seconds_per_run']:g} s per run, runs interleaved; pgbench clients per k "
             f"the best of a sweep with one listener ({clients}). \"kept up\": every listener "
             "received every notification and the queue was empty after the run.", "",
             "| LISTENing connections | k | commits/s | notifications/s | deliveries/s "
             "| kept up |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {_who(row)} | {row['k']} | {_spread(row['commits_per_s'])} | "
                     f"{_spread(row['notifications_per_s'])} | "
                     f"{_spread(row['deliveries_per_s'])} | "
                     f"{'yes' if row['all_kept_up'] else 'no'} |")
    lines += ["", "Where the 2 cores went (median cores used per run: CPU seconds / wall "
              "seconds; \"other\": the rest of the machine's busy time, work that was not "
              "this run's):", "",
              "| LISTENing connections | k | "
              + " | ".join(heading for heading, _ in _CPU_COLUMNS) + " | other |",
              "|---|---|" + "---|" * (len(_CPU_COLUMNS) + 1)]
    for row in rows:
        cores = row["cpu_cores_median"]
        cells = [f"{sum(cores.get(group, 0.0) for group in groups):.2f}"
                 for _, groups in _CPU_COLUMNS]
        lines.append(f"| {_who(row)} | {row['k']} | " + " | ".join(cells)
                     + f" | {_other_cores(result, row)} |")
    lines.append("")
    return lines + _throughput_findings(summary)


def _throughput_findings(summary: list[dict[str, Any]]) -> list[str]:
    """The sentences under the throughput tables, each where its rows were measured."""
    def median(listeners: int, k: int, key: str, kind: str = "psycopg") -> float | None:
        row = _find(summary, listeners, k, kind)
        return row[key]["median"] if row else None

    first, last, most = KS[0], KS[-1], LISTENERS[-1]
    found = []
    batched, single = (median(1, last, "notifications_per_s"),
                       median(1, first, "notifications_per_s"))
    if batched and single:
        found.append(
            "- **Batching.** A notifying commit is expensive and serialised: PostgreSQL lets "
            "one notifying transaction at a time through its commit, cluster-wide (a lock on "
            "\"database 0\" held from `PreCommit_Notify` until after the commit record is "
            "flushed), and then signals every listening backend. With one listener, "
            f"k={last} moved {batched / single:.0f}× the notifications of k={first}.")
    commits = (median(1, first, "commits_per_s"), median(most, first, "commits_per_s"))
    notes = (batched, median(most, last, "notifications_per_s"))
    delivered = median(most, last, "deliveries_per_s")
    if all(commits) and all(notes) and delivered:
        cores = [s["cpu_cores_median"].get("postgres: listener backends", 0.0)
                 for s in summary if s["durability"] == "defaults"
                 and s["listener_kind"] == "psycopg" and s["listeners"] == most]
        found.append(
            f"- **Listeners.** Commits/s fell {commits[0] / commits[1]:.0f}× from 1 to {most} "
            f"listeners at k={first}, notifications/s {notes[0] / notes[1]:.0f}× at k={last}; "
            f"the deliveries PostgreSQL did still rose, to {delivered / 1e6:.1f} M/s at "
            f"{most} listeners, while their backends took {min(cores):.2f}–{max(cores):.2f} "
            "of the 2 cores.")
    losses = [1 - relay / alone for relay, alone in
              ((median(1, k, "commits_per_s", "pgws-relay"), median(1, k, "commits_per_s"))
               for k in KS) if relay and alone]
    relays = [s for s in summary if s["listener_kind"] == "pgws-relay"]
    if losses:
        best = max(relays, key=lambda s: s["notifications_per_s"]["median"])
        found.append(
            "- **The relay keeps up.** One pgws-relay process (no clients) in the listener's "
            f"place drained {best['notifications_per_s']['median'] / 1e3:.0f} k "
            f"notifications/s at k={best['k']}"
            + (" and was never behind" if all(s["all_kept_up"] for s in relays) else
               ", but fell behind in some runs")
            + f"; the producer lost {min(losses) * 100:.0f}–{max(losses) * 100:.0f} % of its "
            f"rate to it (k = {first} to {last}) because they shared the 2 cores.")
    fast = [s for s in summary if s["durability"] != "defaults"]
    if fast:
        ratios = [s["commits_per_s"]["median"] / base for s in fast
                  if (base := median(s["listeners"], s["k"], "commits_per_s"))]
        found.append(
            "- **Durability.** With `fsync=off` and `synchronous_commit=off` (one listener) "
            "commits/s were "
            + ", ".join(f"{_n(s['commits_per_s']['median'])} at k={s['k']}" for s in fast)
            + (f": {min(ratios):.2f}–{max(ratios):.2f}× the defaults'" if ratios else "")
            + ". Flushes are nearly free on this machine's disk; on a real one, at ~1 ms per "
            "flush, the cluster does ~1,000 notifying commits/s whatever the client count.")
    return [*found, ""] if found else []


def _stall_lines(result: dict[str, Any]) -> list[str]:
    stalls = result.get("stalls") or []
    if not stalls:
        return []
    first = stalls[0]
    lines = ["### One stalled listener", "",
             f"pgbench at {first['rate_commits_per_s']:,} commits/s of k={first['k']} "
             f"({first['rate_notifications_per_s']:,} notifications/s, {first['payload_bytes']}"
             f"-byte payloads), {first['healthy_listeners']} healthy listeners and one that "
             f"stops consuming for {first['stalled_s']:g} s, then resumes with the producer "
             "still running. The queue is one ring per cluster; its tail is the slowest "
             "listener.", "",
             "| stalled listener | queue growth | per notification | peak | healthy listeners "
             "meanwhile | queue back to its level after the stall | everyone got everything |",
             "|---|---|---|---|---|---|---|"]
    for row in stalls:
        growth = (f"{_mib(row['growth_bytes_per_s'])}/s"
                  if "growth_bytes_per_s" in row else "none")
        per_note = (f"{row['growth_bytes_per_notification']:.0f} B"
                    if "growth_bytes_per_notification" in row else "–")
        healthy = (f"{row['healthy_rate_while_stalled']:,.0f} notifications/s"
                   if "healthy_rate_while_stalled" in row else "–")
        drained = ("not within the run" if row["drained_after_s"] is None
                   else f"{row['drained_after_s']:g} s")
        lines.append(f"| {_STALL_LABELS.get(row['variant'], row['variant'])} | {growth} | "
                     f"{per_note} | {_mib(row['peak_bytes'])} | {healthy} | {drained} | "
                     f"{'yes' if row['everyone_got_everything'] else 'no'} |")
    lines.append("")
    extrapolated = result.get("extrapolated")
    if extrapolated:
        lines += [f"At the grid's best rate ({_n(extrapolated['at_notifications_per_s'])} "
                  f"notifications/s) and {extrapolated['bytes_per_notification']:.0f} bytes "
                  "per notification, a stalled listener would fill the 8 GiB queue to half "
                  "(PostgreSQL's first `WARNING: NOTIFY queue is 50% full`) in "
                  f"{extrapolated['seconds_to_half']:.0f} s and to full in "
                  f"{extrapolated['seconds_to_full']:.0f} s.", ""]
    return lines


def _entry_lines(result: dict[str, Any]) -> list[str]:
    rows = result.get("entry_sizes") or []
    if not rows:
        return []
    lines = ["### Bytes per notification in the queue", "",
             f"An entry is {ENTRY_HEADER} bytes + channel + 1 + payload + 1, aligned to "
             f"{ENTRY_ALIGN}, in {PAGE_BYTES // 1024} KiB pages (an entry never spans two, so "
             "a page's tail is lost); measured as pages used per notification with the tail "
             f"pinned, channel `{result['channel']}`.", "",
             "| payload bytes | entry bytes | entries per page | predicted bytes per "
             "notification | measured |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['payload_bytes']:,} | {row['entry_bytes']:,} | "
                     f"{row['entries_per_page']} | "
                     f"{row['predicted_bytes_per_notification']:,.1f} | "
                     f"{row['measured_bytes_per_notification']:,.1f} |")
    return [*lines, ""]


def _fill_lines(result: dict[str, Any]) -> list[str]:
    filled = result.get("fill")
    if not filled:
        return []
    lines = ["### A full queue", ""]
    if "skipped" in filled:
        return [*lines, f"Skipped: {filled['skipped']}.", ""]
    text = (f"{filled['payload_bytes']:,}-byte payloads (one per page), {filled['batch']:,} "
            "per statement from one connection, the tail pinned by a LISTENing session idle "
            f"in a transaction: {filled['notifications_per_s']:,.0f} notifications/s "
            f"({_mib(filled['bytes_per_s'])}/s).")
    if filled["half_at_s"] is not None:
        text += f" Half full after {filled['half_at_s']:.1f} s"
    if filled["full_error"]:
        text += (f"; at {filled['full_at_s']:.1f} s ({filled['sent']:,} notifications, "
                 f"{filled['peak_bytes'] / 2**30:.1f} GiB in {filled['segment_files_at_peak']:,}"
                 " segment files) the next notifying transaction failed at commit: "
                 f"`ERROR: {filled['full_error']}`.")
    else:
        text += (f"; {filled['peak_usage']:.0%} full when the {filled['limit_s']:g} s bound "
                 "ended the fill.")
    warnings = [re.sub(r"^.*?WARNING:\s+", "", line) for line in filled["log_lines"]
                if "WARNING" in line]
    if warnings:
        text += (" PostgreSQL warned the producer (as notices, naming the oldest process) and "
                 "the log: " + ", ".join(f"`{w}`" for w in warnings) + ".")
    if filled["freed_within_s"] is not None:
        text += (" Closing the pinning session emptied the queue: "
                 f"`pg_notification_queue_usage()` read 0 within {filled['freed_within_s']:.1f} s.")
    return [*lines, text, ""]


def section(result: dict[str, Any], directory: Path) -> list[str]:
    """bench/RESULTS.md's section for ``results/pglimits.json`` (in ``directory``): throughput
    and its CPU split, the stalled listener, bytes per entry, the full queue, the run's notes
    and the chart (drawn again into ``directory``)."""
    postgres = result.get("postgres", {})
    version = postgres.get("server_version", "?").split(" ")[0]
    command = ("python -m bench.scenarios.pglimits --quick" if result.get("quick")
               else "flock /tmp/machine.lock python -m bench.scenarios.pglimits --json "
                    "bench/results/pglimits.json")
    lines = ["## PostgreSQL's limits", "",
             f"`{command}` (run {result['started']}, commit {result['commit']}, "
             f"{result['runs']} runs): PostgreSQL {version} alone in a private cluster, with "
             f"its durability defaults (`fsync={postgres.get('fsync', '?')}`, "
             f"`synchronous_commit={postgres.get('synchronous_commit', '?')}`). Producer: "
             f"{result['producer']}. Listeners: {result['listener']}. Figures are medians of "
             "the runs (min–max). Every relay worker holds one LISTEN connection, so a fleet "
             "of H hosts with W workers is H × W listeners here; what it means for sizing: "
             "[docs/scaling.md](../docs/scaling.md#where-postgresql-becomes-the-limit).", "",
             *_throughput_lines(result), *_stall_lines(result), *_entry_lines(result),
             *_fill_lines(result)]
    if result.get("notes"):
        lines += ["Notes on this result:", "", *[f"- {note}" for note in result["notes"]], ""]
    chart(result, str(directory / "pglimits.png"))
    return [*lines, f"![pglimits.png]({directory.name}/pglimits.png)", ""]


# -- the chart -------------------------------------------------------------------------------

def chart(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4))
    summary = [s for s in result["summary"] if s["durability"] == "defaults"]
    for k, style in zip(KS, ("-", "--", ":"), strict=False):
        points = sorted((s["listeners"], s["notifications_per_s"]["median"]) for s in summary
                        if s["k"] == k and s["listener_kind"] == "psycopg")
        if points:
            left.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                      linestyle=style, color="tab:blue", label=f"notifications/s, k={k}")
            left.plot([p[0] for p in points], [p[0] * p[1] for p in points], marker="s",
                      linestyle=style, color="tab:green", label=f"deliveries/s, k={k}")
        relay = [s for s in summary if s["k"] == k and s["listener_kind"] == "pgws-relay"]
        if relay:
            left.plot([1], [relay[0]["notifications_per_s"]["median"]], marker="*",
                      markersize=10, linestyle="none", color="tab:red",
                      label="pgws-relay as the listener" if k == KS[0] else None)
    _finish(left, "LISTENing connections", "per second (median)",
            "NOTIFY throughput (durability defaults)", log_x=True, log_y=True)
    for stalled, color in zip(result.get("stalls", []), ("tab:orange", "tab:purple"),
                              strict=False):
        samples = stalled["samples"]
        began = stalled["stall_began_s"]
        middle.plot([s["t"] - began for s in samples],
                    [s["usage"] * QUEUE_BYTES / 2**20 for s in samples], color=color,
                    label=f"stalled: {stalled['variant']}")
    if result.get("stalls"):
        middle.axvline(result["stalls"][0]["stalled_s"], color="grey", linestyle=":",
                       label="stall ends")
    _finish(middle, "seconds since the stall began",
            "NOTIFY queue MiB",
            f"One stalled listener, {STALL_RATE * STALL_K:,} notifications/s")
    filled = result.get("fill", {})
    if filled.get("samples"):
        right.plot([s["t"] for s in filled["samples"]],
                   [s["usage"] * 100 for s in filled["samples"]], color="tab:red",
                   label=f"{FILL_PAYLOAD:,}-byte payloads, tail pinned")
        right.axhline(50, color="grey", linestyle=":", label="warning (50 %)")
    _finish(right, "seconds", "pg_notification_queue_usage() %",
            "Filling the 8 GiB queue")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _finish(axes: Any, xlabel: str, ylabel: str, title: str, log_x: bool = False,
            log_y: bool = False) -> None:
    """bench/report.py's labelling: log axes where asked, small legend, light grid."""
    if log_x:
        axes.set_xscale("log")
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=6)
    axes.grid(True, which="both", alpha=0.3)


# -- main ------------------------------------------------------------------------------------

def settings(pg: Cluster) -> dict[str, str]:
    with psycopg.connect(pg.uri(), autocommit=True, application_name=APP_MONITOR) as db:
        rows = db.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                          (["fsync", "synchronous_commit", "full_page_writes",
                            "wal_sync_method", "shared_buffers", "max_connections",
                            "server_version", "commit_delay", "wal_level"],)).fetchall()
    return dict(rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--chart", help="the PNG (default: beside --json, pglimits.png)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="per pgbench run")
    parser.add_argument("--port", type=int, default=0, help="the private cluster's port")
    parser.add_argument("--parts", default="throughput,relay,fast,stall,entries,fill",
                        help="comma-separated subset")
    parser.add_argument("--replot", metavar="JSON", help="only draw the chart of a result")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as handle:
            chart(json.load(handle), args.chart or os.path.join(
                os.path.dirname(os.path.abspath(args.replot)), "pglimits.png"))
        return
    parts = set(args.parts.split(","))
    ks, counts, sweep_counts = KS, LISTENERS, SWEEP_CLIENTS
    runs, seconds, stall_s, drain_s, fill_s = args.runs, args.seconds, STALL_SECONDS, \
        DRAIN_SECONDS, FILL_LIMIT_S
    sizes, pages = ENTRY_SIZES, ENTRY_PAGES
    if args.quick:
        ks, counts, sweep_counts = (1, 100), (1, 10), (2,)
        runs, seconds, stall_s, drain_s, fill_s = 1, 2.0, 4.0, 4.0, 2.0
        sizes, pages = (100, 4000), 20
    port = args.port or free_port()

    def log(text: str) -> None:
        print(text, flush=True)

    for path in remove_stale():
        log(f"removed a stale cluster: {path}")
    result: dict[str, Any] = {
        "scenario": "pglimits", "started": time.strftime("%F %T"), "commit": commit(),
        "machine": machine(), "quick": args.quick, "channel": CHANNEL,
        "payload_bytes": PAYLOAD_BYTES, "seconds_per_run": seconds, "runs": runs,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "producer": "pgbench -M prepared, pipeline mode: BEGIN; k x SELECT pg_notify(...); "
                    "END; one round trip per transaction",
        "listener": "psycopg 3 connections, LISTEN, consume_input + notifies on each "
                    "readable socket; up to 2 processes"}
    workdir = tempfile.mkdtemp(prefix="pglimits-")
    try:
        scripts = {k: write_script(k, workdir) for k in KS}
        with Cluster(port=port, fast=False) as pg:
            result["postgres"] = settings(pg)
            log(f"private cluster on port {port}: {result['postgres']}")
            clients = {k: 2 for k in ks}
            rows: list[dict[str, Any]] = []
            if "throughput" in parts or "relay" in parts:
                log("pgbench client sweep (1 listener)")
                result["sweep"], clients = sweep(pg, scripts, ks, sweep_counts,
                                                 min(seconds, 5.0), log)
                result["clients_by_k"] = clients
                log(f"clients per k: {clients}")
            if "throughput" in parts:
                rows += throughput(pg, scripts, clients, runs, ks, counts, seconds,
                                   "defaults", log,
                                   relay_ks=ks if "relay" in parts else ())
            elif "relay" in parts:
                rows += throughput(pg, scripts, clients, runs, ks, (), seconds, "defaults",
                                   log, relay_ks=ks)
            if "stall" in parts:
                result["stalls"] = []
                for variant in ("transaction", "socket"):
                    log(f"stall: {variant}")
                    outcome = stall(pg, scripts[STALL_K], variant, STALL_RATE, stall_s,
                                    drain_s, log)
                    result["stalls"].append(outcome)
                    log(f"  peak {outcome['peak_bytes'] / 2**20:.1f} MiB, growth "
                        f"{outcome.get('growth_bytes_per_s', 0) / 2**20:.2f} MiB/s, "
                        f"{outcome.get('growth_bytes_per_notification', 0):.0f} B per "
                        f"notification, drained after {outcome['drained_after_s']} s, "
                        f"sent {outcome['sent']:,}, healthy got {outcome['healthy_received_min']:,}"
                        f", stalled got {outcome['stalled_received']:,}")
            if "entries" in parts:
                log("queue bytes per entry by payload size")
                result["entry_sizes"] = entry_sizes(pg, sizes, pages)
                for row in result["entry_sizes"]:
                    log(f"  {row['payload_bytes']} B payload: "
                        f"{row['measured_bytes_per_notification']:.0f} B per notification "
                        f"(predicted {row['predicted_bytes_per_notification']:.0f})")
            if "fill" in parts:
                log(f"fill the queue (at most {fill_s:.0f} s)")
                result["fill"] = fill(pg, fill_s, log)
                brief = {key: value for key, value in result["fill"].items()
                         if key not in ("samples", "log_lines")}
                log(f"  {json.dumps(brief)}")
        if "fast" in parts:
            with Cluster(port=port, fast=True) as pg:
                result["postgres_fast"] = settings(pg)
                log("fast cluster (fsync=off, synchronous_commit=off): one listener")
                rows += throughput(pg, scripts, result.get("clients_by_k", {k: 2 for k in ks}),
                                   runs, ks, (1,), seconds, "fast (fsync=off)", log)
        result["throughput"] = rows
        result["summary"] = summarize(rows) if rows else []
        if result["summary"]:
            best = max(s["notifications_per_s"]["median"] for s in result["summary"]
                       if s["durability"] == "defaults")
            result["max_notifications_per_s"] = best
            per_note = [s["growth_bytes_per_notification"] for s in result.get("stalls", [])
                        if "growth_bytes_per_notification" in s]
            if per_note:
                size = statistics.median(per_note)
                result["extrapolated"] = {
                    "bytes_per_notification": size, "at_notifications_per_s": best,
                    "queue_bytes_per_s": size * best,
                    "seconds_to_half": QUEUE_BYTES / 2 / (size * best),
                    "seconds_to_full": QUEUE_BYTES / (size * best)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2, sort_keys=True)
        log(f"wrote {args.json}")
    chart_path = args.chart or (os.path.join(os.path.dirname(os.path.abspath(args.json)),
                                             "pglimits.png") if args.json else None)
    if chart_path and result.get("summary"):
        chart(result, chart_path)
        log(f"wrote {chart_path}")


if __name__ == "__main__":
    main()

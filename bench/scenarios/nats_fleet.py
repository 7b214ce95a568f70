"""A fleet on NATS JetStream (``pgws-relay feed`` and ``PGWS_SOURCE=nats``), measured with real
processes: what a fault of each part costs the clients, and how far the database goes.

    sudo flock /tmp/machine.lock python -m bench.scenarios.nats_fleet \
        --json bench/results/nats-fleet.json
    sudo python -m bench.scenarios.nats_fleet --quick        # a smoke run: a few minutes
    sudo python -m bench.scenarios.nats_fleet --parts faults # or ceiling (default: both)

Theory of operation
-------------------
*Faults* (``faults``). :class:`NatsFleet` is :class:`bench.parts.fleet_hosts.Fleet` (three relay
hosts behind HAProxy with ``deploy/haproxy.cfg``, a clients' host, the private PostgreSQL, each a
network namespace) with ``wal_level=logical`` and five more hosts on the database's network: three
NATS servers ``n1``-``n3`` (``nats-server -c`` with a file each: ``server_name``, JetStream, a
``cluster`` block whose ``routes`` name the other two, the monitoring port) and two feeder hosts
``f1``, ``f2`` running ``pgws-relay feed`` with the same settings: the first takes the slot, the
second stands by. The feeder makes the stream with ``PGWS_NATS_REPLICAS=3``; the relays read it
(``PGWS_SOURCE=nats``, every NATS server in ``PGWS_NATS_URL``). A producer thread here commits,
at ``--rate`` per second, one transaction per message: an INSERT of its number into a table and
``pg_logical_emit_message(true, LISTEN_CHANNEL, {"channel": "fleet", "seq": N})``; when the
database goes away it reconnects and reads the table to learn whether the transaction in doubt
committed, so the numbers it hands out are exactly those in the log, none twice, none skipped.

For each fault, a fresh set of resuming clients (:mod:`bench.parts.fleet_agent`, the client
library :func:`relay.client.subscription.subscribe`) connects through HAProxy; after a second of
steady traffic the fault is applied while the messages flow:

``nats-kill``    SIGKILL of the NATS server that leads the stream (its replicas elect another);
                 started again once every client receives again and :data:`HOLD_S` passed.
``nats-cut``     the NATS server the active feeder is connected to loses its cable (``ip link
                 set back down`` in its namespace: nobody is told); up again after
                 :data:`CUT_S` at least.
``feeder-kill``  SIGKILL of the feeder that holds the slot: the standby takes over; then a new
                 standby is started where the dead one was.
``relay-kill``   SIGKILL of the relay holding the most sessions: HAProxy moves its clients to
                 the others, where they resume; the relay is started again.
``database``     ``pg_ctl restart -m fast`` of PostgreSQL (the feeder's replication connection
                 and the producer's connection end).

"Receives again" is, per client, the time from the fault until it has the first message committed
once the fault took effect (replayed or live); the figure is the worst client's (every client is
exposed to a fault of the pipeline, not only those that reconnect). Over the run of each fault:
messages lost (missing from each client's first message to the last committed), duplicated,
out of order, and ``Lost`` events. Goal: 0 / 0 / 0, every client receives again within 5 s.
What the operator sees is kept beside: a sampler polls every relay's ``/ready`` and
``/metrics`` (``pgws_nats_lag_messages``, ``pgws_nats_seconds_since_message``) and the slot
(``pg_replication_slots``) every :data:`SAMPLE_S` during the fault, and the log lines of the
feeders, relays, NATS servers and HAProxy written meanwhile are filtered to state changes.
Between faults the fleet is brought back and checked whole (every relay ready, HAProxy all up,
every NATS server healthy with the stream's replicas current, one feeder on the slot and one
standing by).

*Ceiling* (``ceiling``). The database's side, outside namespaces, on a private PostgreSQL with
its durability defaults (as :mod:`bench.scenarios.pglimits`: every commit waits for a WAL
flush) and ``wal_level=logical``, one local nats-server (JetStream, one replica: three servers
on the same 2 cores would measure NATS's replication, not the database). ``pgbench`` commits
transactions of k ``pg_logical_emit_message`` (k = 1 and 100, the 100-byte payloads of
pglimits, pipeline mode, :data:`PGBENCH_CLIENTS` clients) for :data:`PGBENCH_S` seconds while the
feeder reads the log into a fresh stream and 0, 10 or 30 relay processes (``PGWS_SOURCE=nats``,
one worker each, no clients) read the stream; then the same pgbench with one ``pg_notify`` per
transaction (and 100) against 30 relay processes with ``PGWS_SOURCE=notify`` (each a LISTEN
backend). Each configuration gets fresh relays, a fresh stream and slot. With ``--cores split``
(the default on a machine of 2 cores or more) the database's side runs on CPU 0 (the cluster
with every backend it forks, pgbench, the feeder and the nats-server) and the relay processes
on the others (``sched_setaffinity``): the goal is what the database can take, and in a fleet the
relays are other hosts; on 2 shared cores 30 relays' own CPU would be measured instead (it was,
at 3f2993f: 0.66x from 10 to 30 relays, and 0.72x NOTIFY's commits/s). ``--cores shared`` runs
everything everywhere, as then. The feeder and the
relays may fall behind pgbench (the slot keeps the log): after pgbench ends they are given up to
:data:`DRAIN_S` to catch up, and the figures say how far they got. Figures per row: commits/s
and messages/s (pgbench's), the feeder's stored messages/s and one relay's receptions/s (from
pgbench's start until it caught up, or the drain's end), and CPU per message of the feeder and
of the relays (``utime + stime`` from ``/proc/PID/stat`` over the same window, divided by the
messages each handled), with the CPU split during pgbench (:class:`bench.scenarios.pglimits
.CpuSplit`). Goals: commits/s with 10 and 30 relays within 10 % of each other; with the feeder,
at least 5 times the commits/s of NOTIFY with 30 LISTENing relays (k = 1).

Needs root, ``haproxy``, ``curl``, Debian's PostgreSQL and ``nats-server`` (``/usr/sbin``);
leaves nothing behind (namespaces, processes, clusters, stores), even when stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench.parts import fleet_hosts
from bench.parts.fleet_hosts import CHANNEL, LISTEN_CHANNEL, SECRET, WAIT, Fleet
from bench.parts.harness import commit, free_port, free_ports, machine
from bench.parts.netns import exit_on_signals
from bench.parts.pgcluster import Cluster
from bench.parts.pgcluster import remove_stale as remove_stale_clusters
from bench.scenarios.fleet import Agent
from bench.scenarios.pglimits import CpuSplit, Pgbench, payload, write_script

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
FAULTS = ("nats-kill", "nats-cut", "feeder-kill", "relay-kill", "database")
PARTS = ("faults", "ceiling")
#: The NATS servers and feeders live on the database's network (10.233.2.0/24, the relays'
#: ``back`` cable): the feeder reads PostgreSQL and writes NATS, the relays read NATS.
NATS_NODES = 3
CLIENT_PORT = 4222
ROUTE_PORT = 6222
MONITOR_PORT = 8222
FEEDERS = 2
STREAM = "pgws_fleet"
SLOT = "pgws_feeder"
#: Replication slots and senders: the feeder's one, and room for a standby's attempts.
#: max_connections: 30 relays each with a LISTEN or a pool connection and its heartbeat's,
#: and 32 pgbench clients, exceed the default 100 (one of 30 NOTIFY relays gave up in a run).
LOGICAL = {"wal_level": "logical", "max_replication_slots": "10", "max_wal_senders": "10",
           "max_connections": "400"}
#: Messages per second while faults happen (200-500 asked), and the clients: one agent
#: process reads rate x clients messages/s, 300 x 20 = 6,000 as in the notify fleet
#: (bench/scenarios/fleet.py). At 300 x 40 it could not keep up on these 2 cores beside
#: 3 relays, 3 NATS servers and 2 feeders: its clients were closed as slow consumers and
#: lost messages (every fault, even a relay kill), which is the clients' fault, not the fleet's.
RATE = 300.0
CLIENTS = 20
QUICK_RATE = 200.0
QUICK_CLIENTS = 12
#: A NATS server killed stays down this long after every client received again, so that the
#: fleet runs on two servers for a while (quick: shorter).
HOLD_S = 5.0
QUICK_HOLD_S = 2.0
#: A NATS server cut off stays cut at least this long: longer than the cluster's leader
#: election (a few seconds), so that the others decide without it.
CUT_S = 10.0
QUICK_CUT_S = 6.0
#: How often the operator's view is sampled during a fault.
SAMPLE_S = 0.5
#: The goal: every client receives again within this many seconds of a fault.
GOAL_SECONDS = 5.0
#: Relay metrics worth showing the operator.
_METRICS = ("pgws_nats_lag_messages", "pgws_nats_sequence", "pgws_nats_seconds_since_message",
            "pgws_connections ", "pgws_resumes_total", "pgws_listener_reconnects_total",
            "pgws_slow_consumers_closed_total")
#: Log lines worth showing: state changes, not traffic.
_LOG_WORDS = ("NATS", "nats", "stream", "slot", "standing", "write-ahead", "ready", "caught",
              "listener", "leader", "Leader", "DOWN", "UP", "error", "ERROR", "WARNING",
              "CRITICAL", "retrying", "failed", "Server is", "JetStream cluster", "[WRN]",
              "[ERR]", "slow", "expired", "lost", "gave up")

#: Ceiling: relay processes reading the stream, pgbench's seconds per run, the longest wait for
#: the feeder and the relays to catch up after it, messages per transaction, pgbench clients
#: per k (pglimits' sweep found these best for NOTIFY; the same here so that rows compare).
CEILING_RELAYS = (0, 10, 30)
NOTIFY_RELAYS = 30
CEILING_KS = (1, 100)
PGBENCH_S = 10.0
DRAIN_S = 30.0
QUICK_PGBENCH_S = 3.0
QUICK_DRAIN_S = 10.0
#: pgbench clients per k: more clients make larger group commits (every commit waits for a WAL
#: flush). At k = 1, with the cores split, 4 clients left the emitting path waiting on flushes
#: (3,182-3,672 commits/s, the database's core not full), 16 gave 6,895 and 32 gave 8,267;
#: NOTIFY with 30 listeners is bound by its CPU either way (1,875 / 2,220 / 2,694).
PGBENCH_CLIENTS = {1: 32, 100: 4}
#: The ceiling's channel (the prefix of the messages, the relays' listen channel).
CEILING_CHANNEL = "pglimits"
#: A relay process starting, 30 at once on 2 cores: time to be ready.
START_WAIT = 120.0


def nats_address(index: int) -> str:
    return f"10.233.2.{20 + index}"


def feeder_address(index: int) -> str:
    return f"10.233.2.{30 + index}"


def nats_urls() -> str:
    return ",".join(f"nats://{nats_address(i)}:{CLIENT_PORT}" for i in range(1, NATS_NODES + 1))


def _run(*args: str, check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()}")
    return result


def _wait(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> float:
    """Wait until ``condition()``; the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


#: ``--cores split``: CPUs of the database's side and of the relays (see the opening); None:
#: shared.
CORES: tuple[set[int], set[int]] | None = None


def _pin(pid: int, cpus: set[int] | None) -> None:
    """Every thread of ``pid`` on ``cpus`` (threads and processes it starts later inherit)."""
    if cpus is None:
        return
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(task), cpus)


def _pin_cluster(pg: Cluster, cpus: set[int] | None) -> None:
    """The postmaster and every process it forked so far: later backends inherit."""
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    _pin(postmaster, cpus)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
                if int(fields[1]) == postmaster:
                    _pin(int(entry), cpus)


def _database_cpus() -> set[int] | None:
    return None if CORES is None else CORES[0]


def _relay_cpus() -> set[int] | None:
    return None if CORES is None else CORES[1]


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process in seconds (None: gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the fleet --------------------------------------------------------------------------------

class NatsFleet(Fleet):
    """The fleet of :mod:`bench.parts.fleet_hosts` reading a three-node JetStream cluster that
    two feeders (one active, one standing by) fill from the database."""

    def __init__(self, relays: int = 3, directory: Path | None = None) -> None:
        super().__init__(relays, directory=directory, relay_env={
            "PGWS_SOURCE": "nats", "PGWS_NATS_URL": nats_urls(), "PGWS_NATS_STREAM": STREAM,
            "PGWS_NATS_REPLICAS": "3"}, database_settings=LOGICAL)
        self.nodes = [f"n{i}" for i in range(1, NATS_NODES + 1)]
        self.feeders = [f"f{i}" for i in range(1, FEEDERS + 1)]
        for role in [*self.nodes, *self.feeders]:
            self.ns[role] = f"{fleet_hosts.PREFIX}{self.pid}-{role}"

    def _network(self) -> None:
        super()._network()
        sw = self.ns["sw"]
        hosts = [(node, nats_address(i)) for i, node in enumerate(self.nodes, start=1)]
        hosts += [(feeder, feeder_address(i)) for i, feeder in enumerate(self.feeders, start=1)]
        for host, address in hosts:
            _run("ip", "link", "add", "back", "netns", self.ns[host], "type", "veth", "peer",
                 "name", f"b-{host}", "netns", sw)
            _run("ip", "-n", self.ns[host], "addr", "add", f"{address}/24", "dev", "back")
            _run("ip", "-n", self.ns[host], "link", "set", "back", "up")
            _run("ip", "-n", sw, "link", "set", f"b-{host}", "master", "brb", "up")

    def _services(self) -> None:
        for node in self.nodes:
            self.start_node(node, wait=False)
        for node in self.nodes:
            _wait(lambda node=node: self._alive(node) and self.node_healthy(node),
                  f"NATS server {node} healthy (JetStream cluster formed)", 60)
        self.start_feeder(self.feeders[0], "through the write-ahead log")
        self.start_feeder(self.feeders[1], "standing by")

    # -- NATS -------------------------------------------------------------------------------

    def _node_config(self, node: str) -> Path:
        assert self.directory is not None
        index = int(node[1:])
        address = nats_address(index)
        routes = ", ".join(f"nats-route://{nats_address(i)}:{ROUTE_PORT}"
                           for i in range(1, NATS_NODES + 1) if i != index)
        path = self.directory / f"{node}.conf"
        path.write_text(
            f"server_name: {node}\nlisten: {address}:{CLIENT_PORT}\n"
            f"http: {address}:{MONITOR_PORT}\n"
            f"jetstream {{\n  store_dir: \"{self.directory / (node + '-store')}\"\n}}\n"
            f"cluster {{\n  name: pgws\n  listen: {address}:{ROUTE_PORT}\n"
            f"  routes: [{routes}]\n}}\n")
        return path

    def start_node(self, node: str, wait: bool = True) -> None:
        """Start NATS server ``node`` (again, on its store); with ``wait``, until healthy."""
        config = self._node_config(node)
        with self._log(node) as log:
            self.processes[node] = subprocess.Popen(
                [*self.exec_prefix(node), NATS_SERVER, "-c", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            _wait(lambda: self._alive(node) and self.node_healthy(node),
                  f"NATS server {node} healthy", 60)

    def monitor(self, node: str, path: str) -> dict[str, Any] | None:
        """A NATS server's monitoring endpoint, as JSON (None: no answer)."""
        address = nats_address(int(node[1:]))
        result = _run(*self.exec_prefix(node), "curl", "-s", "-m", "1",
                      f"http://{address}:{MONITOR_PORT}{path}", check=False)
        try:
            answer: dict[str, Any] = json.loads(result.stdout)
        except ValueError:
            return None
        return answer

    def node_healthy(self, node: str) -> bool:
        answer = self.monitor(node, "/healthz")
        return bool(answer) and answer.get("status") == "ok"  # type: ignore[union-attr]

    def stream_cluster(self) -> dict[str, Any]:
        """The stream's leader and replicas as the leader sees them (only it knows whether
        each replica is current; else the first answering server), with the meta leader:
        {"leader", "replicas": {name: current}, "meta_leader", "messages", "seen_by"}."""
        found: dict[str, Any] = {}
        for node in self.nodes:
            if self.processes.get(node) is None or self.processes[node].poll() is not None:
                continue
            answer = self.monitor(node, "/jsz?accounts=true&streams=true")
            if not answer:
                continue
            for account in answer.get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    if stream.get("name") != STREAM:
                        continue
                    cluster = stream.get("cluster") or {}
                    view = {"leader": cluster.get("leader"),
                            "replicas": {r["name"]: bool(r.get("current"))
                                         for r in cluster.get("replicas") or []},
                            "meta_leader": (answer.get("meta_cluster") or {}).get("leader"),
                            "messages": (stream.get("state") or {}).get("messages"),
                            "last_seq": (stream.get("state") or {}).get("last_seq"),
                            "seen_by": node}
                    if view["leader"] == node:
                        return view
                    found = found or view
        return found

    def replica_states(self) -> dict[str, dict[str, Any]]:
        """Each NATS server's own copy of the stream (its /jsz): first and last sequence,
        messages and bytes. Replicas that agree on the last sequence but not on the bytes hold
        different messages."""
        states: dict[str, dict[str, Any]] = {}
        for node in self.nodes:
            answer = self.monitor(node, "/jsz?accounts=true&streams=true") or {}
            for account in answer.get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    if stream.get("name") == STREAM:
                        state = stream.get("state") or {}
                        states[node] = {key: state.get(key) for key in
                                        ("first_seq", "last_seq", "messages", "bytes")}
        return states

    def audit_stream(self) -> dict[str, Any]:
        """The stream as a reader sees it (from the first feeder's host): messages, and how
        many carry a ``Nats-Msg-Id`` seen before (stored twice) or a log place before the one
        before them (stored out of the log's order)."""
        result = _run(*self.exec_prefix(self.feeders[0]), sys.executable, "-c", _AUDIT_STREAM,
                      nats_urls(), STREAM, check=False, timeout=120.0)
        try:
            answer: dict[str, Any] = json.loads(result.stdout)
        except ValueError:
            return {"error": (result.stderr or result.stdout)[-500:]}
        return answer

    def connections(self) -> dict[str, list[str]]:
        """Per NATS server, the names and addresses of its client connections."""
        found = {}
        for node in self.nodes:
            answer = self.monitor(node, "/connz?limit=100")
            found[node] = [f"{c.get('name', '')}@{c.get('ip', '')}"
                           for c in (answer or {}).get("connections") or []]
        return found

    # -- feeders ----------------------------------------------------------------------------

    def feeder_environment(self, feeder: str) -> dict[str, str]:
        return {**{k: v for k, v in os.environ.items() if not k.startswith("PGWS_")},
                "PGWS_DB_URI": f"postgres://postgres@{fleet_hosts.DATABASE_ADDRESS}:5432/postgres",
                "PGWS_WAL_SLOT": SLOT, "PGWS_NATS_URL": nats_urls(), "PGWS_NATS_STREAM": STREAM,
                "PGWS_NATS_REPLICAS": "3", "PGWS_LISTEN_CHANNEL": LISTEN_CHANNEL,
                "PGWS_CHECK_LISTENER_INTERVAL": str(fleet_hosts.HEARTBEAT_MS),
                "PGWS_LOG_LEVEL": "INFO"}

    def start_feeder(self, feeder: str, until: str | None = None) -> None:
        """Start ``pgws-relay feed`` in host ``feeder``; with ``until``, wait for that text in
        what it logs from now on."""
        offset = self.log_size(feeder)
        with self._log(feeder) as log:
            self.processes[feeder] = subprocess.Popen(
                [*self.exec_prefix(feeder), sys.executable, "-m", "relay", "feed"],
                env=self.feeder_environment(feeder), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        if until is not None:
            _wait(lambda: self._alive(feeder) and any(
                until in line for line in self.log_lines(feeder, offset)),
                f"feeder {feeder} to log {until!r}", 60)

    def active_feeder(self) -> str | None:
        """The feeder whose replication connection reads the slot (by its address)."""
        with psycopg.connect(self.database_uri(), autocommit=True, connect_timeout=3) as db:
            rows = db.execute("SELECT host(client_addr) FROM pg_stat_replication").fetchall()
        addresses = {row[0] for row in rows}
        for index, feeder in enumerate(self.feeders, start=1):
            if feeder_address(index) in addresses:
                return feeder
        return None


# -- the producer -----------------------------------------------------------------------------

class Producer:
    """Commits ``{"channel", "seq"}`` messages to the log at a fixed rate in a thread, each with
    its number in a table; remembers when each committed, and survives database restarts."""

    def __init__(self, uri: str, rate: float) -> None:
        self.uri = uri
        self.rate = rate
        self.committed: list[float] = []  # commit time of seq i at index i
        self.reconnects = 0
        self.in_doubt: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> Producer:
        with psycopg.connect(self.uri, autocommit=True) as db:
            db.execute("CREATE TABLE IF NOT EXISTS bench_emitted (seq bigint PRIMARY KEY)")
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._produce()
                except psycopg.OperationalError:
                    self.reconnects += 1
                    self._settle()
        except BaseException as error:  # The driver checks and reports it.
            self.error = error

    def _produce(self) -> None:
        with psycopg.connect(self.uri, connect_timeout=3) as conn:
            start, sent = time.monotonic(), 0
            while not self._stop.is_set():
                seq = len(self.committed)
                with conn.transaction():
                    conn.execute("INSERT INTO bench_emitted VALUES (%s)", (seq,))
                    conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", (
                        LISTEN_CHANNEL, json.dumps({"channel": CHANNEL, "seq": seq})))
                self.committed.append(time.time())
                sent += 1
                delay = start + sent / self.rate - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)

    def _settle(self) -> None:
        """After a lost connection: whether the transaction in doubt committed (then it counts,
        at the time it is known), so that every number is in the log exactly once."""
        seq = len(self.committed)
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.uri, autocommit=True, connect_timeout=3) as db:
                    row = db.execute("SELECT 1 FROM bench_emitted WHERE seq = %s",
                                     (seq,)).fetchone()
                if row is not None:
                    self.committed.append(time.time())
                self.in_doubt.append({"seq": seq, "committed": row is not None})
                return
            except psycopg.OperationalError:
                self._stop.wait(0.05)

    @property
    def last(self) -> int:
        return len(self.committed) - 1

    def first_after(self, moment: float) -> int:
        """The first seq committed after ``moment`` (waits for it)."""
        deadline = time.monotonic() + WAIT
        while not self.committed or self.committed[-1] <= moment:
            if self.error is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the producer stopped: {self.error}")
            time.sleep(0.005)
        low, high = 0, len(self.committed)
        while low < high:
            middle = (low + high) // 2
            if self.committed[middle] <= moment:
                low = middle + 1
            else:
                high = middle
        return low

    def wait_for(self, count: int) -> None:
        target = len(self.committed) + count
        deadline = time.monotonic() + WAIT
        while len(self.committed) < target:
            if self.error is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the producer stopped: {self.error}")
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


# -- what the operator sees -------------------------------------------------------------------

class Sampler:
    """Polls every relay's ``/ready`` and NATS metrics and the slot every :data:`SAMPLE_S`, in a
    thread, from the fault until stopped."""

    def __init__(self, hosts: NatsFleet) -> None:
        self.hosts = hosts
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _slot(self) -> dict[str, Any] | None:
        try:
            with psycopg.connect(self.hosts.database_uri(), autocommit=True,
                                 connect_timeout=1) as db:
                row = db.execute(
                    "SELECT active, active_pid, pg_wal_lsn_diff(pg_current_wal_lsn(), "
                    "confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = %s",
                    (SLOT,)).fetchone()
        except psycopg.Error:
            return None
        return None if row is None else {"active": row[0], "pid": row[1], "lag_bytes": row[2]}

    def _run(self) -> None:
        start = time.time()
        while not self._stop.is_set():
            sample: dict[str, Any] = {"t": round(time.time() - start, 2), "slot": self._slot()}
            for index, host in enumerate(self.hosts.hosts, start=1):
                code, _ = self.hosts.ready(index)
                metrics = self.hosts.metrics(index, ("pgws_nats_lag_messages",
                                                     "pgws_nats_seconds_since_message"))
                sample[host] = {"ready": code,
                                "lag": metrics.get("pgws_nats_lag_messages"),
                                "since": metrics.get("pgws_nats_seconds_since_message")}
            self.samples.append(sample)
            self._stop.wait(SAMPLE_S)

    def stop(self) -> dict[str, Any]:
        """A summary per relay (the highest lag, seconds not ready, the longest silence) and of
        the slot (the highest lag in bytes, seconds with nobody reading, readers seen)."""
        self._stop.set()
        self._thread.join(10)
        out: dict[str, Any] = {"samples": len(self.samples)}
        for host in self.hosts.hosts:
            rows = [s[host] for s in self.samples]
            lags = [r["lag"] for r in rows if r["lag"] is not None]
            silent = [r["since"] for r in rows if r["since"] is not None]
            out[host] = {"max_lag_messages": max(lags) if lags else None,
                         "not_ready_s": round(SAMPLE_S * sum(r["ready"] != 200 for r in rows), 2),
                         "ready_codes": sorted({r["ready"] for r in rows}),
                         "max_seconds_since_message": round(max(silent), 2) if silent else None}
        slots = [s["slot"] for s in self.samples]
        known = [s for s in slots if s is not None]
        out["slot"] = {"max_lag_bytes": max((s["lag_bytes"] or 0 for s in known), default=None),
                       "unread_s": round(SAMPLE_S * sum(not s["active"] for s in known), 2),
                       "unanswered_s": round(SAMPLE_S * (len(slots) - len(known)), 2),
                       "reader_pids": sorted({s["pid"] for s in known if s["pid"]})}
        return out


def _log_text(line: str) -> str:
    text = re.sub(r"^\S+ \S+ |^\[\d+\] \S+ \S+ |^\[\w+\]\s+\(\d+\) : ", "", line.strip())
    return text if len(text) <= 140 else text[:137] + "..."


# -- faults -----------------------------------------------------------------------------------

def _healthy(hosts: NatsFleet) -> dict[str, Any]:
    """Wait until the whole fleet is back; what it took."""
    took = {}
    took["relays_s"] = _wait(lambda: all(hosts.ready(i)[0] == 200
                                         for i in range(1, hosts.relays + 1)), "every relay ready")
    took["balancer_s"] = _wait(lambda: all(status == "UP" for status, _ in
                                           hosts.balancer().values()), "HAProxy: every relay up")
    took["nats_s"] = _wait(lambda: all(hosts.node_healthy(node) for node in hosts.nodes),
                           "every NATS server healthy", 60)

    def current() -> bool:
        cluster = hosts.stream_cluster()
        return bool(cluster.get("leader")) and len(cluster["replicas"]) == NATS_NODES - 1 and all(
            cluster["replicas"].values())

    took["stream_s"] = _wait(current, "the stream's replicas current", 60)
    took["feeder_s"] = _wait(lambda: hosts.active_feeder() is not None, "a feeder on the slot")
    return took


def _target(hosts: NatsFleet, fault: str) -> str:
    """The part a fault hits."""
    if fault == "nats-kill":
        leader = hosts.stream_cluster().get("leader")
        if not leader:
            raise RuntimeError("the stream has no leader to kill")
        return str(leader)
    if fault == "nats-cut":
        feeder = hosts.active_feeder()
        index = hosts.feeders.index(feeder) + 1 if feeder else 0
        for node, names in hosts.connections().items():
            if any(name.endswith(f"@{feeder_address(index)}") for name in names):
                return node
        return str(hosts.stream_cluster().get("leader"))
    if fault == "feeder-kill":
        feeder = hosts.active_feeder()
        if feeder is None:
            raise RuntimeError("no feeder reads the slot")
        return feeder
    if fault == "relay-kill":
        sessions = {name: count for name, (_, count) in hosts.balancer().items()}
        return max(sessions, key=sessions.__getitem__)
    return "db"


def _apply(hosts: NatsFleet, fault: str, target: str) -> None:
    if fault in ("nats-kill", "feeder-kill"):
        process = hosts.processes[target]
        process.kill()
        process.wait(WAIT)
    elif fault == "nats-cut":
        _run("ip", "-n", hosts.ns[target], "link", "set", "back", "down")
    elif fault == "relay-kill":
        hosts.kill(int(target[1:]))
    elif fault == "database":
        assert hosts.cluster is not None
        hosts.cluster.restart("fast")


def _restore(hosts: NatsFleet, fault: str, target: str) -> None:
    if fault == "nats-kill":
        hosts.start_node(target)
    elif fault == "nats-cut":
        _run("ip", "-n", hosts.ns[target], "link", "set", "back", "up")
    elif fault == "feeder-kill":
        hosts.start_feeder(target, "standing by")
    elif fault == "relay-kill":
        hosts.start(int(target[1:]))


def run_fault(hosts: NatsFleet, producer: Producer, fault: str, clients: int,
              hold: float, cut: float) -> dict[str, Any]:
    """One fault with a fresh set of clients; its figures and what the operator saw."""
    agent = Agent(hosts, clients)
    try:
        agent.expect("ready")
        _wait(lambda: sum(n for _, n in hosts.balancer().values()) >= clients,
              "every client's session at HAProxy")
        before = {name: n for name, (_, n) in hosts.balancer().items()}
        producer.wait_for(int(producer.rate))  # A second of steady traffic first.
        target = _target(hosts, fault)
        roles = [*hosts.hosts, *hosts.nodes, *hosts.feeders, "haproxy"]
        offsets = {role: hosts.log_size(role) for role in roles}
        cluster_before = hosts.stream_cluster()
        connections = hosts.connections()
        sampler = Sampler(hosts)
        agent_cpu = _cpu_seconds(agent.process.pid) or 0.0
        moment = time.time()
        _apply(hosts, fault, target)
        applied = time.time() - moment
        first = producer.first_after(time.time())
        agent.send(cmd="wait", seq=first, timeout=WAIT)
        waited = agent.expect("waited", WAIT + 10)
        received_after = time.time() - moment
        if fault == "nats-kill":
            time.sleep(hold)
        elif fault == "nats-cut":
            time.sleep(max(0.0, cut - (time.time() - moment)))
        # The clients' own load: a client host that cannot keep up is closed as a slow
        # consumer, which is the clients' fault, not the fleet's.
        agent_cores = ((_cpu_seconds(agent.process.pid) or 0.0) - agent_cpu) / max(
            1e-3, time.time() - moment)
        seen: dict[str, Any] = {
            "clients_process_cores": round(agent_cores, 2),
            "sampled": sampler.stop(), "ready": {host: hosts.ready(i)
                                                 for i, host in enumerate(hosts.hosts, 1)},
            "metrics": {host: hosts.metrics(i, _METRICS) for i, host in enumerate(hosts.hosts, 1)},
            "stream_before": cluster_before, "stream_during": hosts.stream_cluster(),
            "nats_connections_before": connections, "balancer": hosts.balancer()}
        restored_at = time.time()
        _restore(hosts, fault, target)
        seen["recovery_s"] = {"restore": round(time.time() - restored_at, 2),
                              **{k: round(v, 2) for k, v in _healthy(hosts).items()}}
        seen["stream_after"] = hosts.stream_cluster()
        seen["log"] = {role: [_log_text(line) for line in hosts.log_lines(role, offset)
                              if any(word in line for word in _LOG_WORDS)][:12]
                       for role, offset in offsets.items()}
        seen["log"] = {role: lines for role, lines in seen["log"].items() if lines}
        agent.send(cmd="report", last=producer.last, faults=[
            {"name": fault, "time": moment, "first": first}])
        result = agent.expect("report", WAIT + 10)
    finally:
        agent.close()
    figures = result["faults"][0]
    return {"fault": fault, "target": target, "sessions_before": before, "clients": clients,
            "applied_s": round(applied, 3), "first_seq_after": first,
            "all_received_again_after_s": round(received_after, 3),
            "affected": figures["affected"], "receives_again_s": figures["receives_again_s"],
            "reconnected_after_s": figures["reconnected_after_s"],
            "never_received_again": max(figures["never_received_again"],
                                        len(waited["missing"])),
            "late_at_end": len(result.get("late_at_end", [])),
            "missing": result["missing"], "duplicated": result["duplicated"],
            "out_of_order": result["out_of_order"], "lost_events": result["lost_events"],
            "lost_reasons": result["lost_reasons"], "gaps": result["gaps"],
            "anomalies": result.get("anomalies", []), "operator": seen}


def faults_part(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    rate = args.rate or (QUICK_RATE if args.quick else RATE)
    clients = args.clients or (QUICK_CLIENTS if args.quick else CLIENTS)
    hold, cut = (QUICK_HOLD_S, QUICK_CUT_S) if args.quick else (HOLD_S, CUT_S)
    faults = [name for name in args.faults.split(",") if name]
    runs: list[dict[str, Any]] = []
    fleet_hosts.remove_stale()
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
    with NatsFleet(args.relays, args.logs) as hosts:
        log(f"fleet up: {hosts.relays} relays, NATS {hosts.stream_cluster()}, "
            f"feeder {hosts.active_feeder()}")
        producer = Producer(hosts.database_uri(), rate).start()
        cluster_lost = False
        try:
            for run in range(args.runs):
                for fault in faults:
                    try:
                        row = run_fault(hosts, producer, fault, clients, hold, cut)
                    except TimeoutError as exc:  # The cluster did not come back: a result.
                        log(f"{fault:<12} run {run}: {exc}; the runs end here")
                        cluster_lost = True
                        break
                    row["run"] = run
                    runs.append(row)
                    worst = row["receives_again_s"]["all"]["max"]
                    log(f"{fault:<12} run {run}: target {row['target']}; every client received "
                        f"again within {worst if worst is None else round(worst, 2)} s; lost "
                        f"{row['missing']}, duplicated {row['duplicated']}, out of order "
                        f"{row['out_of_order']}, Lost events {row['lost_events']}, affected "
                        f"{row['affected']}" + (f"; first anomalies {row['anomalies'][:4]}"
                                                if row["anomalies"] else ""))
                if cluster_lost:
                    break
        finally:
            producer.stop()
        # Once the feeder stored the last commits, do the replicas hold the same stream, and
        # does the stream hold each message once and in the log's order?
        states: list[dict[str, Any]] = []

        def settled() -> bool:
            states.append(hosts.replica_states())
            return len(states) > 1 and states[-1] == states[-2] and len(
                {(s["last_seq"], s["bytes"]) for s in states[-1].values()}) == 1

        with contextlib.suppress(TimeoutError):
            _wait(settled, "the replicas to agree", timeout=30.0)
        replicas = states[-1] if states else {}
        audit = hosts.audit_stream()
        log(f"replicas at the end: {replicas}; stream: {audit}")
        producer_info = {"rate": rate, "committed": len(producer.committed),
                         "reconnects": producer.reconnects, "in_doubt": producer.in_doubt,
                         "error": repr(producer.error) if producer.error else None}
    return {"rate": rate, "clients": clients, "relays": args.relays, "nats_nodes": NATS_NODES,
            "hold_s": hold, "cut_s": cut, "producer": producer_info,
            "replicas_at_end": replicas, "stream_audit": audit,
            "summary": summarise(runs, faults), "runs": runs}


def summarise(runs: list[dict[str, Any]], faults: list[str]) -> dict[str, Any]:
    out = {}
    for fault in faults:
        rows = [row for row in runs if row["fault"] == fault]
        if not rows:
            continue
        worst = [row["receives_again_s"]["all"]["max"] for row in rows
                 if row["receives_again_s"]["all"]["max"] is not None]
        clean = all(not (row["missing"] or row["duplicated"] or row["out_of_order"]
                         or row["lost_events"] or row["never_received_again"]) for row in rows)
        out[fault] = {
            "runs": len(rows), "lost": sum(row["missing"] for row in rows),
            "duplicated": sum(row["duplicated"] for row in rows),
            "out_of_order": sum(row["out_of_order"] for row in rows),
            "lost_events": sum(row["lost_events"] for row in rows),
            "never_received_again": sum(row["never_received_again"] for row in rows),
            "receives_again_worst_s_median": statistics.median(worst) if worst else None,
            "receives_again_worst_s_max": max(worst) if worst else None,
            "affected_median": statistics.median(row["affected"] for row in rows),
            "goal_met": clean and bool(worst) and max(worst) <= GOAL_SECONDS}
    return out


# -- ceiling ----------------------------------------------------------------------------------

class LocalNats:
    """One nats-server with JetStream on 127.0.0.1, its store in a directory of its own."""

    def __init__(self, directory: Path) -> None:
        self.port, self.monitor_port = free_port(), free_port()
        self.store = directory / "nats-store"
        self.log = directory / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalNats:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-m",
                 str(self.monitor_port), "-sd", str(self.store)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT)
        _pin(self.proc.pid, _database_cpus())
        _wait(lambda: "Server is ready" in self.log.read_text(), "nats-server ready")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stream_state(self, stream: str) -> dict[str, Any]:
        """The stream's state (messages, last_seq ...): {} when it does not exist."""
        url = (f"http://127.0.0.1:{self.monitor_port}/jsz?accounts=true&streams=true")
        with urllib.request.urlopen(url, timeout=5) as answer:
            data = json.load(answer)
        for account in data.get("account_details") or []:
            for found in account.get("stream_detail") or []:
                if found.get("name") == stream:
                    return dict(found.get("state") or {})
        return {}


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return 0, ""


def _metric(port: int, name: str) -> float | None:
    code, text = _http(port, "/metrics")
    if code != 200:
        return None
    found = re.search(rf"(?m)^{name} (\S+)$", text)
    return float(found.group(1)) if found else None


class Relays:
    """``count`` relay processes on 127.0.0.1, one worker each, with an admin port each."""

    def __init__(self, count: int, env: dict[str, str], directory: Path) -> None:
        self.admin_ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        ports = free_ports(2 * count)
        try:
            for index in range(count):
                admin, port = ports[2 * index], ports[2 * index + 1]
                with open(directory / f"relay-{index}.log", "ab") as log:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, "-m", "relay"], stdin=subprocess.DEVNULL, stdout=log,
                        stderr=subprocess.STDOUT, env={
                            **{k: v for k, v in os.environ.items() if not k.startswith("PGWS_")},
                            "PGWS_JWT_SECRET": SECRET, "PGWS_HOST": "127.0.0.1",
                            "PGWS_PORT": str(port), "PGWS_ADMIN_PORT": str(admin),
                            "PGWS_WORKERS": "1", "PGWS_LOG_LEVEL": "INFO", **env}))
                _pin(self.procs[-1].pid, _relay_cpus())
                self.admin_ports.append(admin)
            _wait(self.ready, f"{count} relays ready", START_WAIT)
        except BaseException:
            self.stop()
            raise

    def ready(self) -> bool:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a relay exited with status {proc.returncode}")
        return all(_http(port, "/ready")[0] == 200 for port in self.admin_ports)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def cpu(self) -> list[float]:
        return [_cpu_seconds(pid) or 0.0 for pid in self.pids]

    def sequences(self) -> list[float]:
        return [_metric(port, "pgws_nats_sequence") or 0.0 for port in self.admin_ports]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _emit_script(k: int, directory: str) -> str:
    path = os.path.join(directory, f"emit-{k}.sql")
    lines = ["\\startpipeline", "BEGIN;"]
    lines += [f"SELECT pg_logical_emit_message(true, '{CEILING_CHANNEL}', '{payload(i)}');"
              for i in range(k)]
    lines += ["END;", "\\endpipeline"]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def nats_row(pg: Cluster, nats: LocalNats, k: int, count: int, script: str, seconds: float,
             drain: float, directory: Path, name: str) -> dict[str, Any]:
    """pgbench emitting k messages per commit with the feeder and ``count`` relays reading."""
    stream = slot = name
    env = {"PGWS_DB_URI": pg.uri(), "PGWS_NATS_URL": nats.url, "PGWS_NATS_STREAM": stream,
           "PGWS_LISTEN_CHANNEL": CEILING_CHANNEL}
    feeder_log = directory / f"{name}-feeder.log"
    with open(feeder_log, "ab") as log:
        feeder = subprocess.Popen(
            [sys.executable, "-m", "relay", "feed"], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, env={
                **{k_: v for k_, v in os.environ.items() if not k_.startswith("PGWS_")},
                **env, "PGWS_WAL_SLOT": slot, "PGWS_NATS_REPLICAS": "1", "PGWS_LOG_LEVEL": "INFO"})
    _pin(feeder.pid, _database_cpus())
    relays: Relays | None = None
    try:
        _wait(lambda: feeder.poll() is None and "through the write-ahead log"
              in feeder_log.read_text(), "the feeder on its slot", 60)
        _wait(lambda: bool(nats.stream_state(stream)) or feeder.poll() is not None,
              "the stream", 30)
        (directory / name).mkdir(exist_ok=True)
        relays = Relays(count, {**env, "PGWS_SOURCE": "nats"}, directory / name) if count else None
        base_stored = nats.stream_state(stream).get("last_seq", 0)
        base_seq = relays.sequences() if relays else []
        cpu_feeder0 = _cpu_seconds(feeder.pid) or 0.0
        cpu_relays0 = relays.cpu() if relays else []
        groups: dict[str, list[int]] = {"feeder": [feeder.pid],
                                        "relay processes": relays.pids if relays else []}
        start = time.monotonic()
        _pin_cluster(pg, _database_cpus())  # The walsender forked since.
        bench = Pgbench(pg, script, PGBENCH_CLIENTS[k], seconds)
        _pin(bench.proc.pid, _database_cpus())
        groups["pgbench"] = [bench.proc.pid]
        try:
            with CpuSplit(pg, groups) as split:
                result = bench.result()
        finally:
            bench.stop()
        ended = time.monotonic() - start
        emitted = result["transactions"] * k
        stored_at_end = nats.stream_state(stream).get("last_seq", 0) - base_stored
        read_at_end = (relays.sequences()[0] - base_seq[0]) if relays else None
        feeder_done = relay_done = None
        deadline = time.monotonic() + drain
        stored = stored_at_end
        while time.monotonic() < deadline:
            stored = nats.stream_state(stream).get("last_seq", 0) - base_stored
            if feeder_done is None and stored >= emitted:
                feeder_done = time.monotonic() - start
            if relays is None:
                if feeder_done is not None:
                    break
            else:
                read = [after - before for after, before in zip(relays.sequences(), base_seq,
                                                                 strict=True)]
                if relay_done is None and read[0] >= emitted:
                    relay_done = time.monotonic() - start
                if feeder_done is not None and min(read) >= emitted:
                    break
            time.sleep(0.5)
        window = time.monotonic() - start
        cpu_feeder = (_cpu_seconds(feeder.pid) or 0.0) - cpu_feeder0
        read_all = ([after - before for after, before in zip(relays.sequences(), base_seq,
                                                              strict=True)] if relays else [])
        cpu_relays = ([after - before for after, before in zip(relays.cpu(), cpu_relays0,
                                                                strict=True)] if relays else [])
        relay_cpu_per_message = [cpu / read for cpu, read in zip(cpu_relays, read_all,
                                                                  strict=True) if read]
        return {
            "source": "nats", "k": k, "relays": count, **result,
            "commits_per_s": result["tps"], "messages_per_s": result["tps"] * k,
            "emitted": emitted, "pgbench_s": round(ended, 2), "window_s": round(window, 2),
            "stored": stored, "stored_during_pgbench": stored_at_end,
            "feeder_caught_up_s": None if feeder_done is None else round(feeder_done, 2),
            "feeder_stored_per_s": round(stored / (feeder_done or window), 1),
            "relay_read": read_all[0] if read_all else None,
            "relay_read_during_pgbench": read_at_end,
            "relays_behind_at_end": (sum(read < emitted for read in read_all)
                                     if relays else None),
            "relay_caught_up_s": None if relay_done is None else round(relay_done, 2),
            "relay_receptions_per_s": (round(read_all[0] / (relay_done or window), 1)
                                       if read_all else None),
            "feeder_cpu_us_per_message": round(1e6 * cpu_feeder / stored, 2) if stored else None,
            "relay_cpu_us_per_message_median": (
                round(1e6 * statistics.median(relay_cpu_per_message), 2)
                if relay_cpu_per_message else None),
            "feeder_cpu_s": round(cpu_feeder, 2), "relays_cpu_s": round(sum(cpu_relays), 2),
            "cpu_during_pgbench": split.cores()}
    finally:
        if relays is not None:
            relays.stop()
        if feeder.poll() is None:
            feeder.terminate()
            try:
                feeder.wait(15)
            except subprocess.TimeoutExpired:
                feeder.kill()
                feeder.wait(5)
        with psycopg.connect(pg.uri(), autocommit=True) as db:
            db.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                       "WHERE slot_name = %s AND NOT active", (slot,))
        subprocess.run([sys.executable, "-c", _DELETE_STREAM, nats.url, stream],
                       capture_output=True, timeout=60)


#: Deletes a stream (frees the store between configurations), run as a child: nats-py is asyncio.
_AUDIT_STREAM = """
import asyncio, json, sys, nats
from nats.js.api import ConsumerConfig, DeliverPolicy
async def main():
    connection = await nats.connect(sys.argv[1].split(","))
    try:
        js = connection.jetstream()
        info = await js.stream_info(sys.argv[2])
        last = info.state.last_seq
        subscription = await js.subscribe(sys.argv[2] + ".>", ordered_consumer=True,
                                          config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
                                          stream=sys.argv[2])
        seen, twice, backwards, count, previous, sequence = set(), 0, 0, 0, None, 0
        while sequence < last:
            message = await subscription.next_msg(timeout=10)
            sequence = message.metadata.sequence.stream
            ident = (message.headers or {}).get("Nats-Msg-Id", "")
            parts = ident.split(".")
            place = (int(parts[2], 16), int(parts[3], 16)) if len(parts) == 4 else None
            count += 1
            twice += ident in seen
            seen.add(ident)
            backwards += place is not None and previous is not None and place < previous
            previous = place or previous
        print(json.dumps({"messages": count, "last_seq": last, "stored_twice": twice,
                          "out_of_log_order": backwards}))
    finally:
        await connection.close()
asyncio.run(main())
"""

_DELETE_STREAM = """
import asyncio, sys, nats
async def main():
    connection = await nats.connect(sys.argv[1])
    try:
        await connection.jetstream().delete_stream(sys.argv[2])
    finally:
        await connection.close()
asyncio.run(main())
"""


def notify_row(pg: Cluster, k: int, count: int, script: str, seconds: float, drain: float,
               directory: Path, name: str) -> dict[str, Any]:
    """pgbench with k pg_notify per commit against ``count`` LISTENing relays."""
    (directory / name).mkdir(exist_ok=True)
    relays = Relays(count, {"PGWS_DB_URI": pg.uri(), "PGWS_SOURCE": "notify",
                            "PGWS_LISTEN_CHANNEL": CEILING_CHANNEL}, directory / name)
    try:
        def received() -> list[float]:
            return [_metric(port, "pgws_notifications_received_total") or 0.0
                    for port in relays.admin_ports]

        before = received()
        cpu0 = relays.cpu()
        start = time.monotonic()
        _pin_cluster(pg, _database_cpus())  # The LISTEN backends forked since.
        bench = Pgbench(pg, script, PGBENCH_CLIENTS[k], seconds)
        _pin(bench.proc.pid, _database_cpus())
        try:
            with CpuSplit(pg, {"relay processes": relays.pids,
                               "pgbench": [bench.proc.pid]}) as split:
                result = bench.result()
        finally:
            bench.stop()
        sent = result["transactions"] * k
        deadline = time.monotonic() + drain
        counts = [after - b for after, b in zip(received(), before, strict=True)]
        while min(counts) < sent and time.monotonic() < deadline:
            time.sleep(0.5)
            counts = [after - b for after, b in zip(received(), before, strict=True)]
        window = time.monotonic() - start
        cpu = [after - b for after, b in zip(relays.cpu(), cpu0, strict=True)]
        per = [c / n for c, n in zip(cpu, counts, strict=True) if n]
        return {"source": "notify", "k": k, "relays": count, **result,
                "commits_per_s": result["tps"], "messages_per_s": result["tps"] * k,
                "emitted": sent, "window_s": round(window, 2),
                "relays_behind_at_end": sum(n < sent for n in counts),
                "relay_read": counts[0],
                "relay_cpu_us_per_message_median": round(1e6 * statistics.median(per), 2)
                if per else None, "relays_cpu_s": round(sum(cpu), 2),
                "cpu_during_pgbench": split.cores()}
    finally:
        relays.stop()


def ceiling_part(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    seconds, drain = (QUICK_PGBENCH_S, QUICK_DRAIN_S) if args.quick else (PGBENCH_S, DRAIN_S)
    runs = 1 if args.quick else args.runs
    counts = tuple(int(c) for c in args.ceiling_relays.split(","))
    for path in remove_stale_clusters():
        log(f"removed a stale cluster: {path}")
    directory = Path(tempfile.mkdtemp(prefix="pgws-nats-ceiling-"))
    rows: list[dict[str, Any]] = []
    try:
        with Cluster(port=free_port(), fast=False, settings=LOGICAL) as pg, \
                LocalNats(directory) as nats:
            with psycopg.connect(pg.uri(), autocommit=True) as db:
                settings = dict(db.execute(
                    "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                    (["fsync", "synchronous_commit", "wal_level", "server_version",
                      "full_page_writes"],)).fetchall())
            _pin_cluster(pg, _database_cpus())
            log(f"private cluster: {settings}; nats-server {nats.url}; cores: "
                f"{'shared' if CORES is None else f'database {CORES[0]}, relays {CORES[1]}'}")
            emit = {k: _emit_script(k, str(directory)) for k in CEILING_KS}
            notify = {k: write_script(k, str(directory)) for k in CEILING_KS}
            for run in range(runs):
                for k in CEILING_KS:
                    for count in counts:
                        name = f"ceil_r{run}_k{k}_n{count}"
                        try:
                            row = nats_row(pg, nats, k, count, emit[k], seconds, drain,
                                           directory, name)
                        except Exception as error:  # Kept in the results; the rest go on.
                            rows.append({"source": "nats", "k": k, "relays": count, "run": run,
                                         "error": repr(error)})
                            log(f"nats   k={k} relays={count} run {run}: {error!r}")
                            continue
                        row["run"] = run
                        rows.append(row)
                        log(f"nats   k={k:<3} relays={count:<2} run {run}: "
                            f"{row['commits_per_s']:,.0f} commits/s "
                            f"({row['messages_per_s']:,.0f} msg/s); feeder stored "
                            f"{row['feeder_stored_per_s']:,.0f}/s (caught up "
                            f"{row['feeder_caught_up_s']} s), relay 1 read "
                            f"{row['relay_receptions_per_s']}/s (caught up "
                            f"{row['relay_caught_up_s']} s); CPU/msg feeder "
                            f"{row['feeder_cpu_us_per_message']} µs, relay "
                            f"{row['relay_cpu_us_per_message_median']} µs")
                    try:
                        row = notify_row(pg, k, NOTIFY_RELAYS, notify[k], seconds, drain,
                                         directory, f"notify_r{run}_k{k}")
                    except Exception as error:  # Kept in the results; the rest go on.
                        rows.append({"source": "notify", "k": k, "relays": NOTIFY_RELAYS,
                                     "run": run, "error": repr(error)})
                        log(f"notify k={k} run {run}: {error!r}")
                        continue
                    row["run"] = run
                    rows.append(row)
                    log(f"notify k={k:<3} relays={NOTIFY_RELAYS} run {run}: "
                        f"{row['commits_per_s']:,.0f} commits/s "
                        f"({row['messages_per_s']:,.0f} msg/s); relays behind at end "
                        f"{row['relays_behind_at_end']}; CPU/msg relay "
                        f"{row['relay_cpu_us_per_message_median']} µs")
    finally:
        if args.logs is not None:
            shutil.copytree(directory, args.logs / "ceiling", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("nats-store"))
        shutil.rmtree(directory, ignore_errors=True)
    return {"postgres": settings, "pgbench_seconds": seconds, "drain_seconds": drain,
            "cores": "shared" if CORES is None else {"database": sorted(CORES[0]),
                                                     "relays": sorted(CORES[1])},
            "runs": runs, "pgbench_clients": PGBENCH_CLIENTS, "payload_bytes": len(payload(0)),
            "rows": rows, "summary": summarise_ceiling(rows)}


def summarise_ceiling(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per (source, k, relays), and the two goals."""
    table: dict[str, Any] = {}
    measured = [r for r in rows if "error" not in r]
    for key in sorted({(r["source"], r["k"], r["relays"]) for r in measured}):
        group = [r for r in measured if (r["source"], r["k"], r["relays"]) == key]

        def median(field: str, group: list[dict[str, Any]] = group) -> float | None:
            values = [r[field] for r in group if r.get(field) is not None]
            return round(statistics.median(values), 2) if values else None

        table[f"{key[0]} k={key[1]} relays={key[2]}"] = {
            "source": key[0], "k": key[1], "relays": key[2], "runs": len(group),
            "commits_per_s": median("commits_per_s"), "messages_per_s": median("messages_per_s"),
            "feeder_stored_per_s": median("feeder_stored_per_s"),
            "relay_receptions_per_s": median("relay_receptions_per_s"),
            "feeder_cpu_us_per_message": median("feeder_cpu_us_per_message"),
            "relay_cpu_us_per_message": median("relay_cpu_us_per_message_median"),
            "relays_behind_at_end_max": max((r.get("relays_behind_at_end") or 0) for r in group)}
    goals: dict[str, Any] = {}
    for k in CEILING_KS:
        ten = table.get(f"nats k={k} relays=10", {}).get("commits_per_s")
        thirty = table.get(f"nats k={k} relays=30", {}).get("commits_per_s")
        if ten and thirty:
            goals[f"k={k}: 30 vs 10 relays"] = {"ratio": round(thirty / ten, 3),
                                                "met": abs(thirty / ten - 1) <= 0.10}
        note = table.get(f"notify k={k} relays={NOTIFY_RELAYS}", {}).get("commits_per_s")
        if thirty and note:
            goals[f"k={k}: nats (30 relays) vs notify (30 listeners)"] = {
                "ratio": round(thirty / note, 2), "met": thirty / note >= 5 if k == 1 else None}
    return {"table": table, "goals": goals}


# -- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer clients, "
                        "shorter phases, one run")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of "
                        + ", ".join(PARTS))
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated subset")
    parser.add_argument("--runs", type=int, default=1, help="runs of every fault and of every "
                        "ceiling row (the ceiling's medians are over them)")
    parser.add_argument("--relays", type=int, default=3, help="relay hosts of the fleet")
    parser.add_argument("--clients", type=int, default=0, help=f"resuming clients per fault "
                        f"(default {CLIENTS}, quick {QUICK_CLIENTS})")
    parser.add_argument("--rate", type=float, default=0.0, help=f"messages per second during "
                        f"the faults (default {RATE:g}, quick {QUICK_RATE:g})")
    parser.add_argument("--logs", type=Path, help="keep the fleet's logs (every relay, feeder, "
                        "NATS server and HAProxy) in this directory (default: removed)")
    parser.add_argument("--ceiling-relays", default=",".join(map(str, CEILING_RELAYS)),
                        help="relay processes reading the stream in the ceiling's rows")
    parser.add_argument("--pgbench-clients", default="",
                        help="pgbench clients per k, as k:clients,... (default "
                        + ",".join(f"{k}:{c}" for k, c in PGBENCH_CLIENTS.items()) + ")")
    parser.add_argument("--cores", choices=("split", "shared"), default=None,
                        help="the ceiling's CPUs: the database's side on CPU 0 and the relays "
                        "on the others (split: the default with 2 cores or more), or all shared")
    args = parser.parse_args(argv)
    global CORES
    for item in filter(None, args.pgbench_clients.split(",")):
        k, _, clients = item.partition(":")
        PGBENCH_CLIENTS[int(k)] = int(clients)
    available = sorted(os.sched_getaffinity(0))
    if (args.cores or ("split" if len(available) >= 2 else "shared")) == "split":
        if len(available) < 2:
            parser.error("--cores split needs 2 CPUs")
        CORES = ({available[0]}, set(available[1:]))
    parts = [part for part in args.parts.split(",") if part]
    unknown = (set(parts) - set(PARTS)) | ({f for f in args.faults.split(",") if f} - set(FAULTS))
    if unknown:
        parser.error(f"unknown parts or faults: {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, private PostgreSQL clusters)")
    if not os.access(NATS_SERVER, os.X_OK):
        parser.error(f"{NATS_SERVER} not found (apt-get install nats-server)")

    def log(text: str) -> None:
        print(text, flush=True)

    result: dict[str, Any] = {
        "benchmark": "nats-fleet", "started": time.strftime("%F %T"), "commit": commit(),
        "command": "python -m bench.scenarios.nats_fleet " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "machine": machine(), "quick": args.quick,
        "nats_server": _run(NATS_SERVER, "--version", check=False).stdout.strip(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    def save() -> None:
        result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")
            log(f"wrote {args.json}")

    with exit_on_signals():
        if "faults" in parts:
            result["faults"] = faults_part(args, log)
            log(json.dumps(result["faults"]["summary"], indent=1))
            save()  # A part's figures are kept even if the next one fails.
        if "ceiling" in parts:
            result["ceiling"] = ceiling_part(args, log)
            log(json.dumps(result["ceiling"]["summary"], indent=1))
            save()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())

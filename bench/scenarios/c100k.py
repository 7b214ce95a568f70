"""C100k on one 2-core machine: storm, hold, broadcast and burst to 100,000
WebSocket connections; and the workers goal (W=2 against W=1 at 1,000 clients, clients niced).

    flock /tmp/machine.lock python -m bench.scenarios.c100k c100k --runs 3 \\
        --json bench/results/c100k.json
    flock /tmp/machine.lock python -m bench.scenarios.c100k c100k --quick  # 10,000, for development
    flock /tmp/machine.lock python -m bench.scenarios.c100k peers --json bench/results/c100k.json
    flock /tmp/machine.lock python -m bench.scenarios.c100k workers --runs 7 \\
        --json bench/results/workers-nice.json
    python -m bench.scenarios.c100k chart                                   # c100k.json → c100k.png
    python -m bench.scenarios.c100k section     # the goals table of bench/RESULTS.md's section

Theory of operation
-------------------
One run (``c100k``) starts ``pgws-relay`` (``python -m relay`` through
:class:`bench.parts.harness.OwnedServer`) with ``PGWS_WORKERS=W`` (8 by default: 12,500 connections
each when balanced, well under the 20,000 descriptors one process may hold here), then ``P``
load-client processes (:mod:`bench.parts.loadclient`, 8 × 12,500 by default), each binding its
sockets to a source address of its own in 127.0.0.0/8 so that no address spends more than its
28,232 ephemeral ports. Then, in order:

(a) storm: every client process is told one wall-clock instant and then connects all its
    connections as fast as its loop issues them; outcomes are counted per process (101,
    refused, timed out after ``--timeout`` s of the client's own clock, other status, other
    error) with handshake completions per 100 ms. The kernel's counters for the listen queue
    and SYN cookies (``nstat``: ListenOverflows, ListenDrops, SyncookiesSent, ...) are read
    before and after the run; the deltas are machine-wide (others' traffic counts too).
(b) hold: per-process VmRSS of the supervisor and of every worker before the storm and with
    every connection held (after ``HOLD_SETTLE`` s), so KiB per connection as growth / N and as
    total / N; per worker the descriptors it gained, i.e. its connections (the balance).
(c) broadcast: one notification (one commit) to every connection; the time from the commit's
    return to the last client's receipt (``time.time()`` in every process, one clock), its
    CDF, and how many connections never got it within ``WAIT_BROADCAST`` s.
(d) burst: ``--burst`` notifications in transactions of 100 to every connection:
    deliveries/s = frames received / (last receipt − first commit), and what is missing.

``peers`` runs the Node ``ws`` and ``websockets`` peers (single processes, so bound by the
20,000-descriptor limit): first ``--peer-over`` (25,000) connections to see where and how each
fails, then the whole sequence at ``--peer-held`` (19,000) connections.

``workers`` alternates W=1 and W=2 runs of the throughput scenario's burst (1,000 clients, 4,000
notifications in transactions of 100, 2 client processes) with the client processes at
``nice 19``, so the figure shows the relay's scaling and not the clients' share of the cores.
Niced clients fall behind two busy workers: with the default 1 MiB ``PGWS_MAX_QUEUE_BYTES``
the relay closes many of them as slow consumers (``delivered_share`` < 1), which makes the
W=2 rate meaningless; ``--max-queue-bytes`` raises the bound for these runs.

Every server and client process, and any orphaned worker, is ended on the way out, also on
Ctrl-C, SIGTERM or SIGHUP (:func:`bench.parts.netns.exit_on_signals`). Host settings are left alone
unless ``--somaxconn N`` asks for longer listen queues (``net.core.somaxconn`` and
``net.ipv4.tcp_max_syn_backlog``), set for the run only and restored on any exit; the results
record both values. Each measurement records ``os.getloadavg()`` at its start: a run disturbed by
someone else's benchmark shows there. Run every measurement under the machine lock.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.parts import netns
from bench.parts.harness import (
    DB_URI,
    LISTEN,
    OwnedServer,
    Producer,
    commit,
    end_client_processes,
    frame_length,
    free_port,
    git_head,
    machine,
    merge_json,
    payload,
    relay_source,
    token,
)
from bench.parts.paths import RESULTS, module_command, module_env

#: Bytes per payload: the throughput scenario's size (an Econia fill_event envelope), 344-byte
#: frames.
PAYLOAD = 340
#: Notifications per transaction in the burst: the issue's batches of 100.
BATCH = 100
CHANNEL = "c100k"
#: Seconds between the last handshake and the "held" RSS reading: lets the workers' allocators
#: and any handshake leftovers settle, as the idle scenario's second.
HOLD_SETTLE = 3.0
#: Seconds the clients are given to prepare before the storm's instant (imports are done; this
#: is the margin for the "go" line to reach every process).
STORM_LEAD = 1.0
#: Bounds on the waits of each phase; a phase that runs out reports what is missing.
WAIT_STORM_EXTRA = 30.0
WAIT_BROADCAST = 60.0
WAIT_BURST = 300.0
#: Kernel counters read around each run (``nstat``; machine-wide deltas).
NSTAT_FIELDS = ("TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtSyncookiesSent",
                "TcpExtSyncookiesRecv", "TcpExtSyncookiesFailed", "TcpExtTCPReqQFullDrop",
                "TcpExtTCPReqQFullDoCookies", "TcpPassiveOpens", "TcpActiveOpens",
                "TcpAttemptFails", "TcpEstabResets", "TcpRetransSegs", "TcpExtTCPTimeouts",
                "TcpExtTCPMemoryPressures", "TcpExtTCPAbortOnMemory", "TcpExtTCPRcvQDrop",
                "TcpExtTCPBacklogDrop")


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def nstat() -> dict[str, int]:
    """Absolute kernel counters (``nstat -asz``: without touching nstat's history file)."""
    try:
        out = subprocess.run(["nstat", "-asz"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    values = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in NSTAT_FIELDS:
            values[parts[0]] = int(parts[1])
    return values


def sysctls() -> dict[str, str]:
    names = ("net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog", "net.ipv4.tcp_syncookies",
             "net.ipv4.ip_local_port_range", "net.ipv4.tcp_mem", "net.ipv4.tcp_tw_reuse")
    values = {}
    for name in names:
        with contextlib.suppress(OSError), open("/proc/sys/" + name.replace(".", "/")) as handle:
            values[name] = " ".join(handle.read().split())
    return values


@contextlib.contextmanager
def host_settings(values: dict[str, str]) -> Any:
    """Set these sysctls for the block only (``--somaxconn``); the old values come back on any
    exit. Both are reported in the results."""
    old: dict[str, str] = {}
    try:
        for name, value in values.items():
            path = "/proc/sys/" + name.replace(".", "/")
            with open(path) as handle:
                old[name] = handle.read().strip()
            with open(path, "w") as handle:
                handle.write(value)
        yield old
    finally:
        for name, value in old.items():
            with contextlib.suppress(OSError), \
                    open("/proc/sys/" + name.replace(".", "/"), "w") as handle:
                handle.write(value)


def proc_status(pid: int, field: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages (the interpreter, libraries, the pages a fork
    shares) split between the processes that map them, so a sum over workers counts them once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def receipts(got: list[float]) -> dict[str, Any]:
    """Commit → receipt times (seconds) as the results give them, in ms: the last, p50, p99
    and the CDF by percent."""
    return {"last_ms": round(1000 * max(got), 1) if got else None,
            "p50_ms": round(1000 * percentile(got, 0.5), 1) if got else None,
            "p99_ms": round(1000 * percentile(got, 0.99), 1) if got else None,
            "cdf_ms": [round(1000 * percentile(got, q / 100), 2) for q in range(101)]
            if got else []}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LoadClients:
    """``count`` connections over ``procs`` :mod:`bench.parts.loadclient` processes, process i on
    the source address 127.<net>.0.(i + 2); with ``per_address``, on as many addresses
    127.<net>.i.(k + 2) as hold its share at that many connections each."""

    def __init__(self, port: int, count: int, procs: int, timeout: float, net: int,
                 distinct: bool = False, path: str | None = None,
                 options: dict[str, Any] | None = None, per_address: int = 0) -> None:
        """``options``: more of :mod:`bench.parts.loadclient`'s spec (``inflight``, ``pong``)."""
        self._reports: queue.Queue[tuple[int, str, Any]] = queue.Queue()
        # Reports of another kind than the one being gathered, kept for their own gather.
        self._stash: dict[str, dict[int, Any]] = {}
        self._procs: list[subprocess.Popen[str]] = []
        self._specs: list[str] = []
        self.count = count
        path = path or f"/{CHANNEL}/{token({'mode': 'r'})}"
        self.shares = [count // procs + (1 if i < count % procs else 0) for i in range(procs)]
        try:
            for number, share in enumerate(self.shares):
                spec = {"host": "127.0.0.1", "port": port, "source": f"127.{net}.0.{number + 2}",
                        "count": share, "path": path, "timeout": timeout, **(options or {})}
                if per_address:
                    spec["sources"] = [f"127.{net}.{number}.{k + 2}"
                                       for k in range(-(-share // per_address))]
                if distinct:  # One token per connection: no grant is shared.
                    spec["paths"] = [f"/{CHANNEL}/{token({'mode': 'r', 'n': [number, i]})}"
                                     for i in range(share)]
                with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="pgws-c100k-",
                                                 delete=False) as handle:
                    json.dump(spec, handle)
                self._specs.append(handle.name)
                proc = subprocess.Popen(module_command("bench.parts.loadclient", handle.name),
                                        env=module_env(), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                self._procs.append(proc)
                threading.Thread(target=self._read, args=(number, proc), daemon=True).start()
            self.gather("ready", 60)
        except BaseException:
            self.close()
            raise

    def _read(self, number: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, _, body = line.rstrip("\n").partition(" ")
            with contextlib.suppress(ValueError):
                self._reports.put((number, kind, json.loads(body)))
        self._reports.put((number, "exit", None))

    def gather(self, kind: str, timeout: float) -> list[Any]:
        """One ``kind`` report per process, None for those that sent none in time."""
        got: dict[int, Any] = self._stash.pop(kind, {})
        deadline = time.monotonic() + timeout
        while len(got) < len(self._procs) and time.monotonic() < deadline:
            try:
                number, got_kind, body = self._reports.get(timeout=0.5)
            except queue.Empty:
                continue
            if got_kind == kind:
                got[number] = body
            elif got_kind != "exit":
                self._stash.setdefault(got_kind, {})[number] = body
            elif got_kind == "exit" and number not in got:
                proc = self._procs[number]
                assert proc.stderr is not None
                raise RuntimeError(f"load client {number} exited: {proc.stderr.read()[-2000:]}")
        return [got.get(number) for number in range(len(self._procs))]

    def tell(self, command: str) -> None:
        for proc in self._procs:
            if proc.poll() is None and proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.write(command + "\n")
                    proc.stdin.flush()

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def close(self) -> None:
        self.tell("stop")
        end_client_processes(self._procs, self._specs, grace=20)
        self._specs = []


def _end_server(server: OwnedServer, pids: list[int]) -> None:
    """Stop the server; then kill any of its processes (workers) that outlived it."""
    server.stop()
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, 0)
            os.kill(pid, signal.SIGKILL)


def _storm_summary(storms: list[Any], at: float, count: int) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}
    bins: dict[int, int] = {}
    handshake_ms: list[float] = []
    unreported = 0
    for index, storm in enumerate(storms):
        if storm is None:
            unreported += 1
            continue
        for name, value in storm["outcomes"].items():
            outcomes[name] = outcomes.get(name, 0) + value
        for table, into in ((storm["errors"], errors), (storm["statuses"], statuses)):
            for name, value in table.items():
                into[name] = into.get(name, 0) + value
        for slot, value in storm["bins"].items():
            bins[int(slot)] = bins.get(int(slot), 0) + value
        handshake_ms.extend(storm["handshake_ms"])
        del index
    span = (max(bins) + 1) * 0.1 if bins else 0.0
    rate = [bins.get(i, 0) * 10 for i in range(max(bins) + 1)] if bins else []
    per_second = [sum(bins.get(i, 0) for i in range(s * 10, s * 10 + 10))
                  for s in range(int(span) + 1)]
    return {"connections": count, "outcomes": outcomes, "errors": errors,
            "statuses": statuses, "processes_unreported": unreported,
            "all_connected_s": round(span, 2),
            "handshakes_per_s_mean": round(outcomes.get("ok", 0) / span, 1) if span else 0,
            "handshakes_per_s_peak_1s": max(per_second, default=0),
            "handshakes_per_100ms_x10": rate,
            "connect_to_101_ms": {"p50": percentile(handshake_ms, 0.5),
                                  "p99": percentile(handshake_ms, 0.99),
                                  "max": max(handshake_ms, default=float("nan"))}}


def one_run(name: str, count: int, procs: int, workers: int, burst: int, timeout: float,
            net: int, extra_env: dict[str, str] | None = None, distinct: bool = False
            ) -> dict[str, Any]:
    """Storm, hold, broadcast, burst against a fresh server; the figures of each phase."""
    result: dict[str, Any] = {"server": name, "connections": count, "client_processes": procs,
                              "distinct_tokens": distinct,
                              "workers": workers if name == "relay" else 1,
                              "load_average_start": load(), "started": time.strftime("%F %T")}
    env = {"PGWS_WORKERS": str(workers), **(extra_env or {})} if name == "relay" else None
    port = free_port()
    counters = nstat()
    server = OwnedServer(name, port, env)
    pids = server._pids()
    clients: LoadClients | None = None
    frame_len = frame_length(PAYLOAD)
    try:
        time.sleep(1.0)
        pids = server._pids()
        workers_pids = pids[1:] if name == "relay" and workers > 1 else pids
        rss_before = {pid: proc_status(pid) for pid in pids}
        pss_before = sum(pss_kib(pid) for pid in pids)
        fds_before = {pid: fd_count(pid) for pid in workers_pids}
        clients = LoadClients(port, count, procs, timeout, net, distinct)
        at = time.time() + STORM_LEAD
        server_cpu, client_cpu = cpu_seconds(pids), cpu_seconds(clients.pids)
        clients.tell(f"go {at}")
        storms = clients.gather("storm", STORM_LEAD + timeout + WAIT_STORM_EXTRA)
        storm = _storm_summary(storms, at, count)
        # CPU spent in the storm (and the idle lead before it): where the 2 cores went.
        storm["server_cpu_s"] = round(cpu_seconds(pids) - server_cpu, 2)
        storm["client_cpu_s"] = round(cpu_seconds(clients.pids) - client_cpu, 2)
        storm["wall_s"] = round(time.time() - at, 2)
        result["storm"] = storm
        held = storm["outcomes"].get("ok", 0)
        print(f"  storm: {storm['outcomes']} errors={storm['errors']} in "
              f"{storm['all_connected_s']} s, mean {storm['handshakes_per_s_mean']:,.0f}/s, "
              f"peak {storm['handshakes_per_s_peak_1s']:,}/s; CPU s server "
              f"{storm['server_cpu_s']}, clients {storm['client_cpu_s']}", flush=True)
        if server.proc.poll() is not None:
            result["server_exit"] = server.proc.returncode
        time.sleep(HOLD_SETTLE)
        rss_held = {pid: proc_status(pid) for pid in pids}
        pss_held = sum(pss_kib(pid) for pid in pids)
        fds_held = {pid: fd_count(pid) for pid in workers_pids}
        balance = [fds_held[pid] - fds_before[pid] for pid in workers_pids]
        total_before, total_held = sum(rss_before.values()), sum(rss_held.values())
        result["hold"] = {
            "held": held, "load_average": load(),
            "rss_kib_before": {str(pid): rss_before[pid] for pid in pids},
            "rss_kib_held": {str(pid): rss_held[pid] for pid in pids},
            "rss_total_kib_before": total_before, "rss_total_kib_held": total_held,
            "kib_per_connection_growth": round((total_held - total_before) / held, 3)
            if held else None,
            "kib_per_connection_total": round(total_held / held, 3) if held else None,
            "pss_total_kib_before": pss_before, "pss_total_kib_held": pss_held,
            "pss_kib_per_connection_growth": round((pss_held - pss_before) / held, 3)
            if held else None,
            "pss_kib_per_connection_total": round(pss_held / held, 3) if held else None,
            "connections_per_worker": balance,
            "balance_max_over_mean": round(max(balance) / (sum(balance) / len(balance)), 3)
            if balance and sum(balance) else None,
            "server_log_tail": [line for line in server.lines[-30:]
                                if "error" in line.lower() or "EMFILE" in line
                                or "Too many" in line][-10:]}
        print(f"  hold: {held:,} held, RSS {total_before / 1024:.0f} → {total_held / 1024:.0f} "
              f"MiB, {result['hold']['kib_per_connection_growth']} KiB/conn growth, "
              f"{result['hold']['kib_per_connection_total']} total (PSS "
              f"{result['hold']['pss_kib_per_connection_total']}); per worker {balance}",
              flush=True)
        if not held:
            return result
        producer = Producer()
        try:
            # (c) one notification to all.
            result["broadcast"] = {"load_average": load()}
            clients.tell(f"target {frame_len}")
            time.sleep(0.5)
            before_commit = time.time()
            producer.send([payload(CHANNEL, 0, PAYLOAD)], 1)
            committed = time.time()
            clients.gather("done", WAIT_BROADCAST)
            clients.tell("report")
            reports = clients.gather("times", 60)
            times = [t for r in reports if r for t in r["times"]]
            got = [t - committed for t in times if t is not None]
            missing = len(times) - len(got)
            result["broadcast"].update({
                "commit_s": round(committed - before_commit, 4),
                "receivers": len(times), "missing": missing,
                "closed_by_server": sum(r["closed_by_server"] for r in reports if r),
                **receipts(got)})
            print(f"  broadcast: last {result['broadcast']['last_ms']} ms, p50 "
                  f"{result['broadcast']['p50_ms']} ms, missing {missing}", flush=True)
            # (d) the burst, batches of 100.
            result["burst"] = {"load_average": load(), "messages": burst, "batch": BATCH}
            clients.tell(f"target {frame_len * (1 + burst)}")
            time.sleep(0.5)
            bytes_before = sum(r["bytes"] for r in reports if r)
            cpu_before = server.cpu_seconds()
            first_commit = producer.burst([CHANNEL], burst, BATCH, PAYLOAD)
            done = clients.gather("done", WAIT_BURST)
            clients.tell("report")
            reports = clients.gather("times", 60)
            times = [t for r in reports if r for t in r["times"]]
            finished = [t for t in times if t is not None]
            received_frames = (sum(r["bytes"] for r in reports if r) - bytes_before) // frame_len
            last = max([d["at"] for d in done if d] + finished, default=time.time())
            seconds = last - first_commit
            result["burst"].update({
                "seconds": round(seconds, 3), "frames_received": received_frames,
                "frames_expected": len(times) * burst,
                "connections_incomplete": len(times) - len(finished),
                "missing_frames": len(times) * burst - received_frames,
                "deliveries_per_s": round(received_frames / seconds, 1) if seconds > 0 else 0,
                "server_cpu_s": round(server.cpu_seconds() - cpu_before, 2),
                "rss_total_kib_after": sum(proc_status(pid) for pid in pids),
                "peak_rss_total_kib": sum(proc_status(pid, "VmHWM") for pid in pids)})
            print(f"  burst: {result['burst']['deliveries_per_s']:,.0f} deliveries/s, "
                  f"{received_frames:,} of {len(times) * burst:,} in {seconds:.2f} s",
                  flush=True)
        finally:
            producer.close()
    except Exception as exc:  # A server that falls over is a result, not a crash.
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"  error: {result['error']}", flush=True)
    finally:
        if clients is not None:
            clients.close()
        if server.proc.poll() is not None and "server_exit" not in result:
            result["server_exit"] = server.proc.returncode
        result["server_log_errors"] = [line for line in server.lines
                                       if any(word in line for word in (
                                           "rror", "EMFILE", "Too many", "resource"))][:10]
        _end_server(server, pids)
        after = nstat()
        result["nstat_delta"] = {key: after.get(key, 0) - counters.get(key, 0)
                                 for key in NSTAT_FIELDS if key in after}
        print(f"  nstat: {result['nstat_delta']}", flush=True)
    return result


def c100k(args: argparse.Namespace) -> dict[str, Any]:
    count = 10_000 if args.quick else args.connections
    procs = 2 if args.quick else args.procs
    workers = 2 if args.quick else args.workers
    runs = []
    for index in range(args.runs):
        print(f"== relay run {index + 1}: {count:,} connections, {workers} workers, {procs} "
              "client processes", flush=True)
        runs.append(one_run("relay", count, procs, workers, args.burst, args.timeout,
                            net=(index % 200) + 1, distinct=args.distinct_tokens))
    return {"relay": runs}


def peers(args: argparse.Namespace) -> dict[str, Any]:
    found: dict[str, Any] = {}
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    for offset, name in enumerate(names):
        found[name] = {}
        for label, count in (("over", args.peer_over), ("held", args.peer_held)):
            print(f"== {name} {label}: {count:,} connections", flush=True)
            found[name][label] = one_run(name, count, args.peer_procs, 1, args.peer_burst,
                                         args.timeout, net=201 + 2 * offset + (label == "held"))
    return found


def _leaves(raw: str) -> tuple[int, list[tuple[str, int]]]:
    """py-spy's raw (collapsed) stacks → total samples and samples per innermost frame."""
    per: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        per[leaf] = per.get(leaf, 0) + int(count)
        total += int(count)
    return total, sorted(per.items(), key=lambda item: -item[1])


def workers_profile(args: argparse.Namespace) -> dict[str, Any]:
    """py-spy on every relay worker during a longer burst (1,000 clients at nice 19), W=1 and
    W=2: where the workers' time goes, and the relay's CPU per 1,000 deliveries."""
    from bench.parts.workloads import burst as run_burst

    out: dict[str, Any] = {"client_nice": args.nice, "messages": 20_000}
    for workers in (1, 2):
        env = {"PGWS_WORKERS": str(workers), "PGWS_MAX_QUEUE_BYTES": str(64 << 20)}
        server = OwnedServer("relay", free_port(), env)
        time.sleep(0.5)
        pids = server._pids()
        targets = [pid for pid in pids if len(pids) == 1 or pid != server.proc.pid]
        folder = tempfile.mkdtemp(prefix="pgws-profile-")
        spies = [subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "250",
                                   "--format", "raw", "--nonblocking", "--output",
                                   os.path.join(folder, f"{pid}.txt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for pid in targets]
        try:
            time.sleep(1.0)  # py-spy attaches.
            sample = run_burst(server, clients=1000, messages=out["messages"], batch=BATCH,
                               procs=2, nice=args.nice)
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)
            for spy in spies:
                spy.wait(30)
            _end_server(server, pids)
        profiles = []
        for pid in targets:
            with open(os.path.join(folder, f"{pid}.txt")) as handle:
                total, leaves = _leaves(handle.read())
            profiles.append({"samples": total, "top": [
                {"frame": frame, "share": count / total} for frame, count in leaves[:8]]})
        out[str(workers)] = {**sample, "profiles": profiles}
        print(f"W={workers}: {sample['deliveries_per_s']:,.0f} deliveries/s, relay CPU "
              f"{sample['cpu_ms_per_1000']:.3f} ms / 1,000", flush=True)
        for profile in profiles:
            print("   " + "; ".join(f"{top['share']:.0%} {top['frame'][:60]}"
                                    for top in profile["top"][:5]), flush=True)
    return out


def workers_goal(args: argparse.Namespace) -> dict[str, Any]:
    """W=1 and W=2 alternately, the throughput scenario's burst at 1,000 clients, clients at
    nice 19."""
    from bench.parts.workloads import burst as run_burst

    samples: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
    for index in range(args.runs):
        for workers in ((1, 2) if index % 2 == 0 else (2, 1)):
            env = {"PGWS_WORKERS": str(workers)}
            if args.max_queue_bytes:
                env["PGWS_MAX_QUEUE_BYTES"] = str(args.max_queue_bytes)
            server = OwnedServer("relay", free_port(), env)
            pids = server._pids()
            try:
                time.sleep(0.5)
                pids = server._pids()
                sample = {"load_average_start": load()}
                try:
                    sample.update(run_burst(server, clients=1000, messages=4000, batch=BATCH,
                                            procs=2, nice=args.nice))
                except Exception as exc:
                    sample["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                _end_server(server, pids)
            samples[str(workers)].append(sample)
            print(f"  W={workers}: {sample.get('deliveries_per_s', 0):,.0f} deliveries/s "
                  f"load {sample['load_average_start']}", flush=True)
    medians = {w: statistics.median(s["deliveries_per_s"] for s in runs
                                    if "deliveries_per_s" in s)
               for w, runs in samples.items()}
    ratio = medians["2"] / medians["1"]
    print(f"medians: W=1 {medians['1']:,.0f}, W=2 {medians['2']:,.0f}, ratio {ratio:.3f}")
    return {"clients": 1000, "messages": 4000, "batch": BATCH, "client_processes": 2,
            "client_nice": args.nice, "max_queue_bytes": args.max_queue_bytes or None,
            "runs": samples, "median_deliveries_per_s": medians,
            "ratio_w2_over_w1": round(ratio, 3), "goal": 1.6}


def chart(path: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as handle:
        document = json.load(handle)
    colors = {"relay": "tab:blue", "websockets": "tab:orange", "node": "tab:green"}
    figure, (storm_axes, cdf_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for key, color, what in (("c100k-after", "tab:blue", "pgws-relay, somaxconn 65535"),
                             ("c100k", "tab:grey", "before the fixes, host defaults")):
        for index, run in enumerate(document.get(key, {}).get("relay", [])):
            label = f"{what}, run {index + 1} ({run['connections']:,})"
            rate = run.get("storm", {}).get("handshakes_per_100ms_x10", [])
            if rate:
                storm_axes.plot([i / 10 for i in range(len(rate))], rate, color=color,
                                alpha=1.0 - 0.25 * index, linewidth=0.8, label=label)
            cdf = run.get("broadcast", {}).get("cdf_ms", [])
            if cdf:
                cdf_axes.plot(cdf, [q / 100 for q in range(101)], color=color,
                              alpha=1.0 - 0.25 * index, label=label)
    for name, runs in document.get("peers", {}).get("servers", {}).items():
        run = runs.get("held", {})
        rate = run.get("storm", {}).get("handshakes_per_100ms_x10", [])
        if rate:
            storm_axes.plot([i / 10 for i in range(len(rate))], rate, color=colors.get(name),
                            label=f"{name}, {run['connections']:,}")
        cdf = run.get("broadcast", {}).get("cdf_ms", [])
        if cdf:
            cdf_axes.plot(cdf, [q / 100 for q in range(101)], color=colors.get(name),
                          label=f"{name}, {run['connections']:,}")
    storm_axes.set_xlabel("seconds since the storm's start")
    storm_axes.set_ylabel("handshakes/s (per 100 ms)")
    storm_axes.set_title("Connection storm")
    cdf_axes.set_xlabel("commit → receipt (ms)")
    cdf_axes.set_ylabel("share of connections")
    cdf_axes.set_title("One notification to every connection")
    for axes in (storm_axes, cdf_axes):
        axes.legend(fontsize=6)
        axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


#: The relay's result sets shown, in order: the relay since the storm's fixes (99f7d92), with
#: the host's listen queues raised (one token for all clients, and one per client) and at the
#: host's defaults; then before them (d9a795c).
#: ``c100k-proposed*`` (the fixes in a scratch copy, before they were committed) stay in the
#: JSON.
RELAY_KEYS = (("c100k-after", "pgws-relay, somaxconn 65535"),
              ("c100k-after-distinct", "pgws-relay, somaxconn 65535, a token per connection"),
              ("c100k-after-defaults", "pgws-relay, host defaults (somaxconn 4096)"),
              ("c100k", "before the fixes (d9a795c), host defaults"),
              ("c100k-somaxconn", "before the fixes, somaxconn 65535"))


def section(path: str, workers_pattern: str) -> str:
    """The goals table of bench/RESULTS.md's section "C100k and workers", from the
    results (medians over the runs of each key; the runs' spread beside them)."""
    with open(path) as handle:
        document = json.load(handle)
    lines = ["| goal | measured | target | status |", "|---|---|---|---|"]

    def row(goal: str, measured: str, target: str, met: bool | None) -> None:
        status = "–" if met is None else ("met" if met else "missed")
        lines.append(f"| {goal} | {measured} | {target} | {status} |")

    for key, what in RELAY_KEYS:
        runs = [r for r in document.get(key, {}).get("relay", []) if "storm" in r]
        if not runs:
            continue
        n = runs[0]["connections"]
        held = [r["hold"]["held"] for r in runs]
        failed = [sum(v for k, v in r["storm"]["outcomes"].items() if k != "ok") for r in runs]
        spread = f" ({len(runs)} run{'s' if len(runs) > 1 else ''}: {', '.join(map(str, held))})"
        row(f"{what}: connections held of {n:,}", f"{_median(held):,.0f}{spread}",
            f"{n:,}", min(held) == n)
        outcomes = runs[len(runs) // 2]["storm"]["outcomes"]
        row(f"{what}: storm, refused + timed out (60 s client timeout)",
            f"{_median(failed):,.0f} (median run: {outcomes['refused']:,} refused, "
            f"{outcomes['timeout']:,} timed out; all runs: {', '.join(map(str, failed))})",
            "0", max(failed) == 0)
        rate = _median([r["storm"]["handshakes_per_s_mean"] for r in runs])
        span = _median([r["storm"]["all_connected_s"] for r in runs])
        cpu = _median([r["storm"]["server_cpu_s"] / max(1, r["storm"]["outcomes"]["ok"]) * 1e6
                       for r in runs])
        row(f"{what}: handshakes/s (mean over the storm)",
            f"{rate:,.0f}/s, last 101 after {span:.1f} s; relay CPU {cpu:,.0f} µs per "
            "handshake", "–", None)
        growth = _median([r["hold"]["kib_per_connection_growth"] for r in runs])
        total = _median([r["hold"]["kib_per_connection_total"] for r in runs])
        pss = _median([r["hold"]["pss_kib_per_connection_total"] for r in runs])
        row(f"{what}: RSS per connection, all workers + supervisor",
            f"{growth:.2f} KiB growth / N; {total:.2f} KiB total RSS / N ({pss:.2f} PSS)",
            "≤ 8 KiB", growth <= 8)
        balance = runs[len(runs) // 2]["hold"]["connections_per_worker"]
        row(f"{what}: connections per worker (median run)",
            f"{', '.join(f'{b:,}' for b in balance)} (max/mean "
            f"{runs[len(runs) // 2]['hold']['balance_max_over_mean']})", "–", None)
        casts = [r["broadcast"] for r in runs if "broadcast" in r]
        if casts:
            missing = [c["missing"] for c in casts]
            row(f"{what}: one notification to all, commit → last receipt",
                f"{_median([c['last_ms'] for c in casts]):,.0f} ms (p50 "
                f"{_median([c['p50_ms'] for c in casts]):,.0f} ms); missing "
                f"{', '.join(map(str, missing))}", "none missing", max(missing) == 0)
        bursts = [r["burst"] for r in runs if "burst" in r]
        if bursts:
            row(f"{what}: burst, {bursts[0]['messages']} in batches of 100, deliveries/s",
                f"{_median([b['deliveries_per_s'] for b in bursts]) / 1e6:.2f} M; missing "
                f"{', '.join(str(b['missing_frames']) for b in bursts)}", "–", None)
    for name, runs in document.get("peers", {}).get("servers", {}).items():
        over, held = runs.get("over", {}), runs.get("held", {})
        if "storm" in over:
            o = over["storm"]["outcomes"]
            row(f"{name} peer: {over['connections']:,} connections (one process, 20,000 fds)",
                f"{o['ok']:,} held, {o['refused']:,} refused, {o['timeout']:,} timed out, "
                f"{o['error']:,} other errors; {over['storm']['errors']}", "–", None)
        if "storm" in held:
            o = held["storm"]["outcomes"]
            cast, burst = held.get("broadcast", {}), held.get("burst", {})
            row(f"{name} peer: {held['connections']:,} connections",
                f"{o['ok']:,} held ({o['refused'] + o['timeout'] + o['error']:,} failed), "
                f"{held['storm']['handshakes_per_s_mean']:,.0f} handshakes/s; "
                f"{held['hold']['kib_per_connection_growth']:.2f} KiB/conn growth; broadcast "
                f"last {cast.get('last_ms')} ms, missing {cast.get('missing')}; burst "
                f"{burst.get('deliveries_per_s', 0) / 1e6:.3f} M deliveries/s", "–", None)
    for path in sorted(glob.glob(workers_pattern)):
        with open(path) as handle:
            workers = json.load(handle).get("workers", {})
        if not workers:
            continue
        medians = workers["median_deliveries_per_s"]
        shares = {w: _median([r.get("delivered_share") for r in runs])
                  for w, runs in workers["runs"].items()}
        bound = workers.get("max_queue_bytes")
        row(f"workers, 1,000 clients at nice {workers['client_nice']}"
            + (f", PGWS_MAX_QUEUE_BYTES={bound:,}" if bound else ", default queue bound")
            + f": W=2 / W=1 (medians of {len(workers['runs']['1'])} interleaved runs each: "
            f"{medians['2'] / 1e6:.2f} M / {medians['1'] / 1e6:.2f} M deliveries/s; delivered "
            f"share W=1 {shares['1']:.2f}, W=2 {shares['2']:.2f})",
            f"{workers['ratio_w2_over_w1']:.2f}×", "≥ 1.6×",
            workers["ratio_w2_over_w1"] >= 1.6 and shares["2"] == 1)
    return "\n".join(lines)


_INTRO = (
    "`bench/scenarios/c100k.py` (load clients: `bench/parts/loadclient.py`, one epoll per "
    "process, no task or object per connection). The relay runs with `PGWS_WORKERS=8` (12,500 "
    "connections each when balanced; one process may hold 20,000 descriptors here). 8 load-client "
    "processes × 12,500 connections, each process bound to its own source address 127.N.0.(2–9) "
    "with `IP_BIND_ADDRESS_NO_PORT`, so no address spends more than 12,500 of its 28,232 "
    "ephemeral ports. Every client presents the same token, as the clients of a public feed do "
    "(Econia's frontends share one read token). Phases per run: (a) storm: every process starts "
    "connecting at one wall-clock instant, as fast as its loop issues connects; a connection is "
    "*refused* (ECONNREFUSED, or a reset/EOF before the answer), *timed out* (no 101 within the "
    "client's own 60 s, counted from its connect), or gets another status; (b) hold: VmRSS (and "
    "PSS) of the supervisor and every worker before the storm and with every connection held, and "
    "each worker's connections; (c) one notification in one commit → time from the commit's "
    "return to the last client's receipt (`time.time()` in every process); (d) 300 notifications "
    "in transactions of 100 → deliveries/s. Payloads 340 B (344-byte frames). `--somaxconn` sets "
    "`net.core.somaxconn` and `net.ipv4.tcp_max_syn_backlog` for the run only and restores them.")

_COMMANDS = "\n".join([
    "```sh",
    "python -m bench.scenarios.c100k c100k --runs 3 --somaxconn 65535 --key c100k-after "
    "--json bench/results/c100k.json",
    "python -m bench.scenarios.c100k c100k --runs 1 --somaxconn 65535 --distinct-tokens "
    "--key c100k-after-distinct --json bench/results/c100k.json",
    "python -m bench.scenarios.c100k c100k --runs 1 --key c100k-after-defaults "
    "--json bench/results/c100k.json",
    "python -m bench.scenarios.c100k peers --json bench/results/c100k.json",
    "python -m bench.scenarios.c100k workers --runs 5 --json bench/results/workers-nice.json",
    "python -m bench.scenarios.c100k workers --runs 5 --max-queue-bytes 67108864 "
    "--json bench/results/workers-nice-bigqueue.json",
    "python -m bench.scenarios.c100k chart     # results/c100k.png (bench/report.py draws it too)",
    "```"])

_FINDINGS = [
    "- **Listen-queue overflow, not the relay's code, refused clients.** Before the fixes, "
    "100,000 connects in ~2 s met 8 listen queues of 4,096 drained at ~2,300 handshakes/s: "
    "`nstat` counted ~460,000 ListenOverflows per run. Under that pressure the kernel prunes "
    "half-open requests after ~2 SYN-ACK retries and the clients' requests then meet a reset "
    "(\"refused\", at 10–50 s); connects whose SYN retries (1, 3, 7, 15, 31, 63 s) pass 60 s "
    "time out. The relay now asks for a backlog of 65,535, which the kernel caps at "
    "`net.core.somaxconn`: with that sysctl (and `tcp_max_syn_backlog`) raised, every connect "
    "waits in the kernel instead of being dropped. No server drains 100,000 connects in 2 s; "
    "the queue is what a storm of this size needs, and the host's sysctls are the operator's "
    "(docs/operations.md, \"Capacity\").",
    "- **Handshake CPU** (py-spy: PyJWT verification ~12 %, h11 ~10 %, wsproto's upgrade ~6 %, "
    "the rest Trio's per-task machinery): the relay keeps each accepted (token, channel)'s "
    "grant (`auth.GrantCache`, time claims checked again at every use, 4,096 entries, tokens "
    "up to 4,096 characters), starts no meta task per connection without "
    "`PGWS_META_CHANNEL`, and shares the grant's filter set when the URL has none: 545 → "
    "~370 µs of relay CPU per handshake. With distinct tokens per client, the signature check "
    "stays per connection, and so does a grant's memory (~0.8 KiB: the before rows' growth).",
    "- **Memory**: tracemalloc on one worker at 5,000 connections puts ~3.9 KiB per connection "
    "in Trio's task, cancel scopes, epoll waiter and coroutine frames and ~0.7 KiB in wsproto's "
    "`FrameProtocol`; the rest is the client's own state and the socket object. Kernel socket "
    "buffers are not in RSS. \"Total / N\" includes 9 processes' baselines (~55 MiB each: "
    "Python, Trio, psycopg, cryptography, the admin listener).",
    "- **Balance** across 8 workers (SO_REUSEPORT): within 1–8 % of the mean.",
    "- **Peers** are one process each, so the 20,000-descriptor limit caps them: Node `ws` "
    "resets the connections beyond it (ECONNRESET after the request was sent) and its default "
    "backlog (511) overflows; `websockets` stops accepting (the rest time out; backlog 100).",
    "- **Workers** (1,000 clients, load clients at `nice 19`): W=2 delivers less than W=1. "
    "With W=1 the relay already has one core and the niced clients the other (5.0 M "
    "deliveries/s, against 2.3 M without `nice`); a loopback write does the receiver's TCP work "
    "inline, so a second worker only takes CPU from the clients, which then fall behind and "
    "are closed as slow consumers at the default 1 MiB queue bound (delivered share 0.64). "
    "With a 64 MiB bound everything arrives and W=2 is 0.87× W=1. On 2 cores there is no "
    "free core for a second worker: the goal measures the machine, not the relay.",
]


def _profile_finding(path: Path) -> list[str]:
    """The workers' profile (``c100k.py profile``) as one bullet, if it was run."""
    if not path.exists():
        return []
    with open(path) as handle:
        profile = json.load(handle)["profile"]
    one, two = profile["1"], profile["2"]

    def write_share(run: dict[str, Any]) -> str:
        shares = [sum(top["share"] for top in each["top"] if "Client._send" in top["frame"])
                  for each in run["profiles"]]
        return " and ".join(f"{share:.0%}" for share in shares)

    return [
        f"- **The workers' profile** (`python -m bench.scenarios.c100k profile --json "
        f"bench/results/workers-profile.json`: py-spy on every worker during a burst of "
        f"{profile['messages']:,} to 1,000 clients at nice {profile['client_nice']}): one "
        f"worker delivered {one['deliveries_per_s'] / 1e6:.2f} M/s for "
        f"{one['cpu_ms_per_1000']:.3f} ms of relay CPU per 1,000 deliveries, two workers "
        f"{two['deliveries_per_s'] / 1e6:.2f} M/s for {two['cpu_ms_per_1000']:.3f} ms: the "
        "same deliveries cost twice the CPU. The samples show where: the socket write "
        f"(`Client._send`) is {write_share(one)} of the single worker's samples and "
        f"{write_share(two)} of each of the two workers', the rest being the joining of "
        "queued frames (`_chunks`) and Trio's epoll. On loopback a write does the receiving "
        "client's TCP work inline and wakes it; with two workers busy on both cores, the "
        "starved clients read later, sockets fill, and each write carries fewer bytes for the "
        "same system-call and wake-up cost. Nothing in the relay's own Python grows with the "
        "second worker; what grows is the kernel's work per write on a machine with no idle "
        "core."]


def readme_section(directory: Path) -> list[str]:
    """bench/RESULTS.md's section "C100k and workers", from ``directory``'s
    c100k.json and workers-nice*.json; redraws the chart."""
    path = directory / "c100k.json"
    chart(str(path), str(directory / "c100k.png"))
    return ["## C100k and workers", "", _INTRO, "",
            section(str(path), str(directory / "workers-nice*.json")), "",
            "Commands (each under `flock /tmp/machine.lock`; a 100,000 run takes ~90 s, "
            "`--quick` 10,000 connections ~12 s):", "", _COMMANDS, "",
            "![C100k](results/c100k.png)", "", "What the storm exposed, and what changed:", "",
            *_FINDINGS, *_profile_finding(directory / "workers-profile.json"), ""]


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["c100k", "peers", "workers", "profile", "chart",
                                         "section"])
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--procs", type=int, default=8, help="load-client processes")
    parser.add_argument("--workers", type=int, default=8, help="relay worker processes")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--burst", type=int, default=300, help="notifications in the burst")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a client gives its connect + handshake")
    parser.add_argument("--quick", action="store_true", help="10,000 connections, 2 workers")
    parser.add_argument("--peers", default="node,websockets")
    parser.add_argument("--peer-over", type=int, default=25_000)
    parser.add_argument("--peer-held", type=int, default=19_000)
    parser.add_argument("--peer-procs", type=int, default=2)
    parser.add_argument("--peer-burst", type=int, default=100)
    parser.add_argument("--nice", type=int, default=19, help="workers: the clients' niceness")
    parser.add_argument("--max-queue-bytes", type=int, default=0,
                        help="workers: PGWS_MAX_QUEUE_BYTES for the relay (0: its default); "
                        "niced clients fall behind and a 1 MiB bound closes them (1013)")
    parser.add_argument("--distinct-tokens", action="store_true",
                        help="c100k: a token of its own for every connection (default: one "
                             "token for all, as a public feed's clients share)")
    parser.add_argument("--somaxconn", type=int, default=0,
                        help="set net.core.somaxconn and net.ipv4.tcp_max_syn_backlog to this "
                        "for the run (restored afterwards; 0: leave the host alone)")
    parser.add_argument("--json", help="merge the results into this file (its part's key)")
    parser.add_argument("--key", help="the key of the results in the JSON file (default: the "
                        "part; e.g. c100k-proposed for a run of a patched relay)")
    parser.add_argument("--png", default=os.path.join(RESULTS, "c100k.png"))
    args = parser.parse_args()
    if args.part == "chart":
        chart(args.json or os.path.join(RESULTS, "c100k.json"), args.png)
        return
    if args.part == "section":
        print(section(args.json or os.path.join(RESULTS, "c100k.json"),
                      os.path.join(RESULTS, "workers-nice*.json")))
        return
    header = {"machine": machine(), "commit": commit(), "git": git_head(),
              "relay_source": relay_source(), "sysctl": sysctls(), "db": DB_URI,
              "listen_channel": LISTEN, "started": time.strftime("%F %T"),
              "load_average_start": load(), "argv": sys.argv[1:]}
    changed = {"net.core.somaxconn": str(args.somaxconn),
               "net.ipv4.tcp_max_syn_backlog": str(args.somaxconn)} if args.somaxconn else {}
    with netns.exit_on_signals(), host_settings(changed) as previous:
        header["sysctl_set_for_the_run"] = {name: {"was": previous.get(name), "set": value}
                                            for name, value in changed.items()}
        if args.part == "c100k":
            body = c100k(args)
        elif args.part == "peers":
            body = peers(args)
        elif args.part == "profile":
            body = workers_profile(args)
        else:
            body = workers_goal(args)
        if args.part == "peers":
            body = {"servers": body}
    header["load_average_end"] = load()
    if args.json:
        merge_json(args.json, args.key or args.part, {**header, **body})


if __name__ == "__main__":
    main()

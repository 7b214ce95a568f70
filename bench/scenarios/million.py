"""A million concurrent WebSocket connections on one 2-core machine: how far the relay gets,
what each connection costs the relay and the kernel, what the server's pings cost, and how long
one notification takes to reach everyone.

    flock /tmp/machine.lock python -m bench.scenarios.million \\
        --json bench/results/million.json
    flock /tmp/machine.lock python -m bench.scenarios.million --connections 100000 \\
        --workers 8 --procs 8 --key rehearsal --json bench/results/million.json   # a rehearsal

Theory of operation
-------------------
The c100k scenario (:mod:`bench.scenarios.c100k`) generalised, with what a million needs:

- **Workers.** One process may hold 20,000 descriptors here, so ``--workers`` (60) relay
  workers share the port (``PGWS_WORKERS``; the kernel spreads connections by their 4-tuple),
  16,667 each when balanced. Each worker holds a LISTEN connection and opens pool connections
  on demand (at least one, for the listener's heartbeat): 60 workers exceed the shared
  PostgreSQL's 100 connections, so the relay runs against a private cluster
  (:class:`bench.parts.pgcluster.Cluster`) allowing ``workers × (1 + PGWS_POOL_SIZE) + 20``;
  the database connections actually held are read from ``pg_stat_activity``.
- **Clients.** ``--procs`` (56) load-client processes (:mod:`bench.parts.loadclient`, under
  20,000 descriptors each), each on source addresses of its own (127.<net>.<process>.x),
  ``--per-address`` (5,000) connections on each: Linux's connect() takes ports of one parity
  first, 14,116 per address, and slows down sharply as an address nears that. They connect as a
  *ramp*: at most ``--inflight`` handshakes under way per process, so the server is never sent
  more than it answers (a storm of a million times out, which measures the listen queue, not
  what a host holds). They answer every ping with a pong, as browsers do.
- **Ramp.** Every 10 s: connections held, failures, the workers' RSS, the kernel's slab and
  TCP memory, the load average (``timeline``). The ramp ends when every connection has an
  outcome, or at ``--max-minutes``: then how far it got, and what stopped it, are the result.
- **Hold.** After ``HOLD_SETTLE`` s: RSS and PSS of every worker (KiB per connection as growth
  and as total), connections per worker, and the kernel's memory: ``Slab`` from
  /proc/meminfo, the socket caches of /proc/slabinfo, and TCP's buffer pages from
  /proc/net/sockstat. Both ends of every connection live in this one kernel, so the server's
  share is half the growth (the two sockets are alike: TCP, in an epoll).
- **Pings.** ``PGWS_PING_INTERVAL`` is the default 30 s. Over ``--ping-window`` s (two rounds)
  the workers' CPU seconds and the pongs the clients sent give the server's CPU per ping and
  its share of a core; nothing else happens in that window.
- **Broadcast.** One notification (one commit) to every connection: the time from the commit's
  return to the last receipt (``time.time()`` in every process), its CDF, and what was missed.

Host settings it needs (docs/operations.md, "A million connections"): ``fs.file-max`` above
twice the connections (both ends are here; checked, not changed), and ``net.ipv4.tcp_mem``
(set for the run with ``--tcp-mem`` and restored, recorded either way). Everything it started
is ended on the way out, also on Ctrl-C, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import psycopg

from bench.parts import netns
from bench.parts.harness import (
    LISTEN,
    OwnedServer,
    frame_length,
    free_port,
    git_head,
    machine,
    merge_json,
    payload,
    relay_source,
    token,
)
from bench.parts.harness import (
    commit as head_commit,
)
from bench.parts.pgcluster import Cluster
from bench.scenarios.c100k import (
    CHANNEL,
    NSTAT_FIELDS,
    PAYLOAD,
    LoadClients,
    _end_server,
    cpu_seconds,
    fd_count,
    host_settings,
    load,
    nstat,
    proc_status,
    pss_kib,
    receipts,
    sysctls,
)

#: Seconds between the last outcome and the "held" readings (as the c100k scenario's).
HOLD_SETTLE = 5.0
#: Seconds between two timeline readings during the ramp.
TICK = 10.0
#: Seconds the broadcast may take before the missing are counted.
WAIT_BROADCAST = 180.0
#: The slab caches that grow with a TCP connection (names as in /proc/slabinfo).
SOCKET_CACHES = ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi",
                 "eventpoll_pwq", "skbuff_head_cache", "tcp_bind_bucket", "request_sock_TCP",
                 "kmalloc-64", "kmalloc-128", "kmalloc-192", "kmalloc-256", "kmalloc-512",
                 "kmalloc-1k", "kmalloc-2k", "kmalloc-4k", "kmalloc-8k", "pid", "ep_head",
                 "lsm_file_cache", "selinux_file_security", "inode_cache")


def meminfo() -> dict[str, int]:
    """/proc/meminfo's fields, KiB."""
    values = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            values[name] = int(rest.split()[0])
    return values


def slabs() -> dict[str, int]:
    """KiB held by each socket-related slab cache (active objects × object size)."""
    held: dict[str, int] = {}
    try:
        with open("/proc/slabinfo") as handle:
            for line in handle:
                fields = line.split()
                if fields and fields[0] in SOCKET_CACHES:
                    held[fields[0]] = int(fields[1]) * int(fields[3]) // 1024
    except OSError:  # Not root: the caches are not reported, meminfo's Slab still is.
        pass
    return held


def sockstat() -> dict[str, int]:
    """/proc/net/sockstat's TCP line (``inuse``, ``orphan``, ``tw``, ``alloc``, ``mem`` pages)."""
    with open("/proc/net/sockstat") as handle:
        for line in handle:
            if line.startswith("TCP:"):
                fields = line.split()[1:]
                return {fields[i]: int(fields[i + 1]) for i in range(0, len(fields), 2)}
    return {}


def kernel() -> dict[str, Any]:
    info = meminfo()
    return {"slab_kib": info.get("Slab", 0), "sunreclaim_kib": info.get("SUnreclaim", 0),
            "mem_available_kib": info.get("MemAvailable", 0),
            "caches_kib": slabs(), "tcp": sockstat()}


def _workers(server: OwnedServer, count: int) -> list[int]:
    pids = server._pids()
    return pids[1:] if count > 1 else pids


def _db_connections(uri: str) -> int:
    with psycopg.connect(uri, autocommit=True) as db:
        row = db.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                         "'client backend' AND pid <> pg_backend_pid()").fetchone()
    return int(row[0]) if row else 0


def _progress(clients: LoadClients) -> dict[str, int]:
    clients.tell("progress")
    totals = {"ok": 0, "refused": 0, "timeout": 0, "status": 0, "error": 0, "pending": 0,
              "open": 0, "pongs": 0, "reporting": 0}
    for body in clients.gather("progress", 30):
        if body is None:
            continue
        totals["reporting"] += 1
        for name, value in body["outcomes"].items():
            totals[name] += value
        for name in ("pending", "open", "pongs"):
            totals[name] += body[name]
    return totals


def _delta_per_connection(before: dict[str, Any], after: dict[str, Any], held: int
                          ) -> dict[str, Any]:
    """The kernel's growth per connection (both ends), and half of it: the server's share."""
    if not held:
        return {}
    caches = {name: round(1024 * (after["caches_kib"].get(name, 0) - value) / held, 1)
              for name, value in before["caches_kib"].items()}
    slab = 1024 * (after["slab_kib"] - before["slab_kib"]) / held
    tcp_pages = after["tcp"].get("mem", 0) - before["tcp"].get("mem", 0)
    return {"slab_bytes_per_connection_both_ends": round(slab, 1),
            "slab_bytes_per_connection_server_side": round(slab / 2, 1),
            "tcp_buffer_bytes_per_connection_both_ends": round(4096 * tcp_pages / held, 1),
            "cache_bytes_per_connection_both_ends": {name: value for name, value
                                                     in caches.items() if value}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"connections": args.connections, "workers": args.workers,
                              "client_processes": args.procs, "inflight": args.inflight,
                              "ping_interval_s": args.ping_interval,
                              "started": time.strftime("%F %T"),
                              "load_average_start": load()}
    max_connections = args.workers * (1 + args.pool_size) + 20
    with Cluster(port=free_port(), settings={"max_connections": str(max_connections)}) as db:
        result["database"] = {"max_connections": max_connections, "pool_size": args.pool_size}
        env = {"PGWS_WORKERS": str(args.workers), "PGWS_DB_URI": db.uri(),
               "PGWS_POOL_SIZE": str(args.pool_size),
               "PGWS_PING_INTERVAL": str(args.ping_interval)}
        counters = nstat()
        port = free_port()
        server = OwnedServer("relay", port, env, ready_timeout=180.0)
        clients: LoadClients | None = None
        pids = _workers(server, args.workers)
        try:
            time.sleep(2.0)  # Not a synchronisation: lets the workers' start-up RSS settle.
            pids = _workers(server, args.workers)
            every = [server.proc.pid, *pids] if args.workers > 1 else pids
            base = {"rss_kib": sum(proc_status(pid) for pid in every),
                    "pss_kib": sum(pss_kib(pid) for pid in every),
                    "fds": {pid: fd_count(pid) for pid in pids}, "kernel": kernel(),
                    "db_connections": _db_connections(db.uri())}
            result["before"] = {key: value for key, value in base.items() if key != "fds"}
            print(f"  relay up: {len(pids)} workers, RSS {base['rss_kib'] / 1024:.0f} MiB, "
                  f"{base['db_connections']} database connections", flush=True)
            clients = LoadClients(port, args.connections, args.procs, args.timeout, net=77,
                                  path=f"/{CHANNEL}/{token({'mode': 'r'})}",
                                  options={"inflight": args.inflight, "pong": True},
                                  per_address=args.per_address)
            at = time.time() + 1.0
            cpu_server, cpu_clients = cpu_seconds(every), cpu_seconds(clients.pids)
            clients.tell(f"go {at}")
            timeline = result["timeline"] = []
            deadline = at + 60 * args.max_minutes
            stopped = ""
            while True:
                time.sleep(TICK)  # Not a synchronisation: the timeline's period.
                totals = _progress(clients)
                info = meminfo()
                point = {"t": round(time.time() - at, 1), **totals,
                         "rss_mib": round(sum(proc_status(pid) for pid in every) / 1024),
                         "slab_mib": round(info.get("Slab", 0) / 1024),
                         "tcp_mem_pages": sockstat().get("mem", 0),
                         "mem_available_mib": round(info.get("MemAvailable", 0) / 1024),
                         "load": load()[0],
                         "server_alive": server.proc.poll() is None}
                timeline.append(point)
                print(f"  {point['t']:7.1f} s: {totals['ok']:,} held ({totals['open']:,} open), "
                      f"{totals['refused'] + totals['timeout'] + totals['error']:,} failed, "
                      f"{totals['pending']} pending; RSS {point['rss_mib']:,} MiB, slab "
                      f"{point['slab_mib']:,} MiB, load {point['load']}", flush=True)
                outcomes = sum(totals[name] for name in ("ok", "refused", "timeout", "status",
                                                         "error"))
                if outcomes >= args.connections:
                    break
                if not point["server_alive"]:
                    stopped = f"the relay exited ({server.proc.returncode})"
                    break
                if time.time() > deadline:
                    stopped = f"--max-minutes {args.max_minutes} ran out"
                    break
            storms = [s for s in clients.gather("storm", 5 if stopped else 60) if s]
            errors: dict[str, int] = {}
            for storm in storms:
                for name, value in storm["errors"].items():
                    errors[name] = errors.get(name, 0) + value
            ramp_s = time.time() - at
            result["ramp"] = {
                "seconds": round(ramp_s, 1), "stopped": stopped or None,
                "held": totals["ok"], "failed": {name: totals[name] for name in
                                                 ("refused", "timeout", "status", "error")},
                "errors": errors,
                "handshakes_per_s_mean": round(totals["ok"] / ramp_s, 1),
                "server_cpu_s": round(cpu_seconds(every) - cpu_server, 1),
                "client_cpu_s": round(cpu_seconds(clients.pids) - cpu_clients, 1)}
            held = totals["open"]
            time.sleep(HOLD_SETTLE)
            fds = {pid: fd_count(pid) - base["fds"].get(pid, 0) for pid in pids}
            rss = {pid: proc_status(pid) for pid in every}
            rss_total, pss_total = sum(rss.values()), sum(pss_kib(pid) for pid in every)
            after = kernel()
            per_worker = sorted(fds.values())
            result["hold"] = {
                "held": held, "load_average": load(),
                "rss_total_kib": rss_total, "pss_total_kib": pss_total,
                "kib_per_connection_growth": round((rss_total - base["rss_kib"]) / held, 3)
                if held else None,
                "kib_per_connection_total": round(rss_total / held, 3) if held else None,
                "pss_kib_per_connection_growth": round((pss_total - base["pss_kib"]) / held, 3)
                if held else None,
                "peak_rss_total_kib": sum(proc_status(pid, "VmHWM") for pid in every),
                "connections_per_worker": {"min": per_worker[0], "max": per_worker[-1],
                                           "mean": round(sum(per_worker) / len(per_worker))}
                if per_worker else {},
                "kernel": after,
                "kernel_per_connection": _delta_per_connection(base["kernel"], after, held),
                "db_connections": _db_connections(db.uri())}
            print(f"  hold: {held:,} open; relay RSS {rss_total / 1024:,.0f} MiB, "
                  f"{result['hold']['kib_per_connection_growth']} KiB/conn growth, "
                  f"{result['hold']['kib_per_connection_total']} total; kernel "
                  f"{result['hold']['kernel_per_connection'].get('slab_bytes_per_connection_server_side')}"
                  f" B/conn (server side); workers {result['hold']['connections_per_worker']}",
                  flush=True)
            if not held or server.proc.poll() is not None:
                return result
            # Pings: the workers' CPU over a window with nothing else going on.
            before_cpu, before_clients = cpu_seconds(every), cpu_seconds(clients.pids)
            before_pongs = _progress(clients)["pongs"]
            started = time.monotonic()
            time.sleep(args.ping_window)  # Not a synchronisation: the measured window.
            window = time.monotonic() - started
            pongs = _progress(clients)["pongs"] - before_pongs
            server_cpu = cpu_seconds(every) - before_cpu
            result["pings"] = {
                "window_s": round(window, 1), "pongs": pongs,
                "server_cpu_s": round(server_cpu, 2),
                "client_cpu_s": round(cpu_seconds(clients.pids) - before_clients, 2),
                "server_cores": round(server_cpu / window, 3),
                "server_us_per_ping": round(1e6 * server_cpu / pongs, 1) if pongs else None,
                "peak_rss_total_kib": sum(proc_status(pid, "VmHWM") for pid in every)}
            print(f"  pings: {pongs:,} pongs in {window:.0f} s, server {server_cpu:.1f} CPU s "
                  f"({result['pings']['server_cores']} cores, "
                  f"{result['pings']['server_us_per_ping']} µs per ping)", flush=True)
            # One notification to every connection.
            clients.tell(f"target {frame_length(PAYLOAD)}")
            clients.gather("armed", 30)  # Every process has the target before the commit.
            with psycopg.connect(db.uri(), autocommit=True) as producer:
                before_commit = time.time()
                producer.execute("SELECT pg_notify(%s, %s)",
                                 (LISTEN, payload(CHANNEL, 0, PAYLOAD)))
                committed = time.time()
            done = clients.gather("done", WAIT_BROADCAST)
            clients.tell("report")
            reports = clients.gather("times", 120)
            times = [t for r in reports if r for t in r["times"]]
            got = [t - committed for t in times if t is not None]
            result["broadcast"] = {
                "commit_s": round(committed - before_commit, 4),
                "receivers": len(times), "received": len(got), "missing": len(times) - len(got),
                "processes_done": sum(1 for d in done if d),
                "closed_by_server": sum(r["closed_by_server"] for r in reports if r),
                **receipts(got)}
            print(f"  broadcast: {len(got):,} of {len(times):,} in "
                  f"{result['broadcast']['last_ms']} ms (p50 {result['broadcast']['p50_ms']} "
                  f"ms)", flush=True)
        except Exception as exc:  # A relay that falls over is a result, not a crash.
            result["error"] = f"{type(exc).__name__}: {exc}"
            print(f"  error: {result['error']}", flush=True)
        finally:
            if clients is not None:
                clients.close()
            result["server_exit"] = server.proc.poll()
            result["server_log_errors"] = [line for line in server.lines if any(
                word in line for word in ("rror", "EMFILE", "Too many", "gap"))][:20]
            _end_server(server, pids)
            later = nstat()
            result["nstat_delta"] = {key: later.get(key, 0) - counters.get(key, 0)
                                     for key in NSTAT_FIELDS if key in later}
            print(f"  nstat: {result['nstat_delta']}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=60, help="relay worker processes")
    parser.add_argument("--procs", type=int, default=56, help="load-client processes")
    parser.add_argument("--inflight", type=int, default=32,
                        help="handshakes under way at once per client process")
    parser.add_argument("--per-address", type=int, default=5000,
                        help="connections per source address (each client process uses as many "
                        "addresses as its share needs)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a client gives its connect + handshake")
    parser.add_argument("--pool-size", type=int, default=10, help="PGWS_POOL_SIZE")
    parser.add_argument("--ping-interval", type=float, default=30.0, help="PGWS_PING_INTERVAL")
    parser.add_argument("--ping-window", type=float, default=65.0,
                        help="seconds over which the pings' cost is measured")
    parser.add_argument("--max-minutes", type=float, default=45.0,
                        help="the ramp's bound: how far it got by then is the result")
    parser.add_argument("--tcp-mem", default="",
                        help="net.ipv4.tcp_mem for the run, in pages (restored afterwards)")
    parser.add_argument("--json", help="merge the results into this file (its key)")
    parser.add_argument("--key", default="million", help="the key of the results in the file")
    args = parser.parse_args()
    with open("/proc/sys/fs/file-max") as handle:
        file_max = int(handle.read())
    if file_max < 2 * args.connections + 100_000:
        sys.exit(f"fs.file-max is {file_max:,}: both ends of {args.connections:,} connections "
                 f"need {2 * args.connections + 100_000:,} (sysctl -w fs.file-max=...)")
    header = {"machine": machine(), "commit": head_commit(), "git": git_head(),
              "relay_source": relay_source(), "listen_channel": LISTEN,
              "started": time.strftime("%F %T"), "argv": sys.argv[1:]}
    changed = {"net.ipv4.tcp_mem": args.tcp_mem} if args.tcp_mem else {}
    with netns.exit_on_signals(), host_settings(changed) as previous:
        header["sysctl"] = {**sysctls(), "fs.file-max": str(file_max)}
        header["sysctl_set_for_the_run"] = {name: {"was": previous.get(name), "set": value}
                                            for name, value in changed.items()}
        body = run(args)
    header["load_average_end"] = load()
    print(json.dumps({key: body.get(key) for key in ("ramp", "pings", "broadcast")}, indent=1))
    if args.json:
        merge_json(args.json, args.key, {**header, **body})


if __name__ == "__main__":
    main()

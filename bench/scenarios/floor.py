"""The machine's floor under the steady-rate latency goals, measured without any relay.

    python -m bench.scenarios.floor [--json bench/results/floor.json]

Two figures bound what any single-process relay can reach here:

1. PostgreSQL's own path: a NOTIFY committed by one connection to its receipt by a LISTENing
   psycopg connection (median, p99).
2. The kernel's price of one delivery: a bare Python loop writes one 344-byte frame to each of
   N loopback TCP sockets (drained by a reader process) and reads its own user and system CPU
   time per write. No WebSocket code, no event loop: nothing a relay could remove.

One notification to N clients is a fan-out of F = N writes in a row, so the client in the
middle waits at least PostgreSQL's path plus F/2 and the p99 client 0.99 F. When the rate
leaves the fan-out no idle time (rate x F >= 1), notifications coalesce into cycles of at
least F, and a notification also waits for the cycle under way: floors F and 2 F. The report
puts these floors beside the steady-rate goals.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import selectors
import socket
import statistics
import threading
import time
from typing import Any

import psycopg

from bench.parts.harness import DB_URI, commit, dumps, frame_length, machine
from bench.parts.workloads import PAYLOAD

#: The steady-rate goals against the peers: (rate per second, clients, p50 goal ms, p99 goal ms).
STEADY_GOALS = ((100, 1000, 2.0, 10.0), (1000, 1000, None, 25.0), (100, 10000, None, 100.0))
#: Notifications timed on PostgreSQL's path; enough for a stable p99.
_PG_SAMPLES = 500
#: Fan-out rounds per client count: rounds x clients writes, with a pause between rounds so
#: that, as in the steady cases, each round starts with the readers idle.
_ROUNDS = 200
_PAUSE = 0.01


def pg_path() -> dict[str, float]:
    """Commit → receipt through PostgreSQL alone, in milliseconds."""
    latencies: list[float] = []
    with psycopg.connect(DB_URI, autocommit=True) as listener, \
            psycopg.connect(DB_URI, autocommit=False) as producer:
        listener.execute("LISTEN pgws_floor")

        def receive() -> None:
            for note in listener.notifies(timeout=30, stop_after=_PG_SAMPLES):
                latencies.append(time.time() - float(note.payload))

        reader = threading.Thread(target=receive)
        reader.start()
        for _ in range(_PG_SAMPLES):
            producer.execute("SELECT pg_notify('pgws_floor', %s)", (f"{time.time():.6f}",))
            producer.commit()
            time.sleep(_PAUSE)
        reader.join(60)
    ordered = sorted(latencies)
    return {"p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[int(0.99 * len(ordered))]}


def _drain(port: int, clients: int) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(clients)]
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    open_socks = clients
    while open_socks:
        for key, _ in selector.select(5):
            try:
                if not key.fileobj.recv(1 << 16):  # type: ignore[union-attr]
                    selector.unregister(key.fileobj)
                    open_socks -= 1
            except BlockingIOError:
                continue


def write_cost(clients: int) -> dict[str, float]:
    """Microseconds of CPU per 344-byte loopback write, at ``clients`` sockets."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(clients)
        reader = mp.get_context("fork").Process(
            target=_drain, args=(listening.getsockname()[1], clients))
        reader.start()
        conns = [listening.accept()[0] for _ in range(clients)]
    fds = [conn.fileno() for conn in conns]
    for conn in conns:
        conn.setblocking(False)
    frame = b"x" * frame_length(PAYLOAD)
    write = os.write
    before = os.times()
    for _ in range(_ROUNDS):
        for fd in fds:
            write(fd, frame)
        time.sleep(_PAUSE)
    after = os.times()
    for conn in conns:
        conn.close()
    reader.join(60)
    writes = _ROUNDS * clients
    return {"user_us": 1e6 * (after.user - before.user) / writes,
            "sys_us": 1e6 * (after.system - before.system) / writes}


def floors(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The latency floor of each steady case, in milliseconds, from measured costs."""
    pg = statistics.median(run["p50_ms"] for run in result["pg"])
    rows = []
    for rate, clients, p50_goal, p99_goal in STEADY_GOALS:
        per_write = statistics.median(run["user_us"] + run["sys_us"]
                                      for run in result["writes"][str(clients)])
        fan_out = clients * per_write / 1000
        saturated = rate * fan_out / 1000 >= 1
        rows.append({"case": f"{rate}/s x {clients}", "per_write_us": per_write,
                     "fan_out_ms": fan_out, "saturated": saturated,
                     "p50_floor_ms": pg + (fan_out if saturated else fan_out / 2),
                     "p99_floor_ms": pg + (2 * fan_out if saturated else 0.99 * fan_out),
                     "p50_goal_ms": p50_goal, "p99_goal_ms": p99_goal})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    result: dict[str, Any] = {"machine": machine(), "commit": commit(),
                              "started": time.strftime("%F %T"), "runs": args.runs,
                              "pg": [pg_path() for _ in range(args.runs)], "writes": {}}
    for clients in (1000, 10000):
        result["writes"][str(clients)] = [write_cost(clients) for _ in range(args.runs)]
    pg = statistics.median(run["p50_ms"] for run in result["pg"])
    print(f"PostgreSQL commit -> LISTEN receipt: p50 {pg:.2f} ms")
    for row in floors(result):
        print(f"{row['case']:>14}: {row['per_write_us']:.2f} us per write, fan-out "
              f"{row['fan_out_ms']:.1f} ms{' (saturated)' if row['saturated'] else ''}; floor "
              f"p50 {row['p50_floor_ms']:.1f} ms (goal {row['p50_goal_ms'] or '-'}), p99 "
              f"{row['p99_floor_ms']:.1f} ms (goal {row['p99_goal_ms']})")
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(dumps(result))


if __name__ == "__main__":
    main()

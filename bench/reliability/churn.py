"""Connect/disconnect churn: 100,000 WebSocket connections opened and closed, nothing kept.

    python -m bench.reliability.churn --cycles 100000 --procs 4 --json bench/results/churn.json

Each cycle opens a connection, completes the handshake and leaves in one of four ways, in
turn: a clean close handshake, a close frame without waiting, a TCP reset, or a plain close
with no word. ``--procs`` processes run cycles side by side. Before the first cycle (after a
warm-up of 1,000 cycles) and after the last, the relay's ``stats:`` line (SIGUSR1) gives its
tasks and open file descriptors, and /proc its RSS. It passes when tasks and descriptors (other
than the NOTIFY pool's) are back where they were, or fewer (the baseline may catch a connection
on its way out), and RSS is within 10 % of its baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import socket
import struct
import sys
import time
from typing import Any

from bench.parts.harness import Server, commit, dumps, frame, free_port, handshake, machine, token
from bench.parts.leaks import pool_at_rest, settled, sockets_open

_WARM_UP = 1000
#: RSS may end this much above its baseline (the issue's bound).
_RSS_TOLERANCE = 0.10
_PATH = f"/churn/{token({'mode': 'r'})}"


def _leave(sock: socket.socket, how: int) -> None:
    if how == 0:  # a clean close handshake: send ours, wait for the relay's
        sock.sendall(frame(8, (1000).to_bytes(2, "big")))
        sock.setblocking(True)
        sock.settimeout(10)
        with contextlib.suppress(OSError):
            while sock.recv(4096):
                pass
    elif how == 1:  # a close frame, not waiting for the answer
        with contextlib.suppress(OSError):
            sock.sendall(frame(8, (1001).to_bytes(2, "big")))
    elif how == 2:  # a reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # how == 3: just gone


def _cycles(port: int, count: int, results: Any) -> None:
    errors = 0
    for n in range(count):
        try:
            sock = handshake(port, _PATH)
        except OSError:
            errors += 1
            continue
        _leave(sock, n % 4)
    results.put(errors)


def _run(port: int, cycles: int, procs: int) -> int:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    shares = [cycles // procs + (1 if i < cycles % procs else 0) for i in range(procs)]
    workers = [ctx.Process(target=_cycles, args=(port, share, results)) for share in shares]
    for worker in workers:
        worker.start()
    errors = sum(results.get(timeout=3600) for _ in workers)
    for worker in workers:
        worker.join(60)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100_000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    server = Server("relay", free_port())
    try:
        _run(server.port, _WARM_UP, args.procs)
        before = settled(server, lambda stats: stats["clients"] == 0 and pool_at_rest(stats))
        rss_before = server.memory_kib()
        started = time.monotonic()
        errors = _run(server.port, args.cycles, args.procs)
        seconds = time.monotonic() - started
        # A leak is growth: "before" may still have caught a task or a socket on its way out
        # (a connection's handler finishing), so fewer afterwards is no failure.
        after = settled(server, lambda stats: stats["clients"] == 0 and pool_at_rest(stats)
                         and stats["tasks"] <= before["tasks"]
                         and sockets_open(stats) <= sockets_open(before))
        rss_after = server.memory_kib()
        peak = server.memory_kib("VmHWM")
        running = server.proc.poll() is None
    finally:
        server.stop()
    result = {
        "machine": machine(), "commit": commit(), "started": time.strftime("%F %T"),
        "cycles": args.cycles, "procs": args.procs, "seconds": round(seconds, 1),
        "cycles_per_s": round(args.cycles / seconds), "connect_errors": errors,
        "tasks": [before["tasks"], after["tasks"]], "fds": [before["fds"], after["fds"]],
        "db_pool_idle": [before["db_pool_idle"], after["db_pool_idle"]],
        "rss_kib": [rss_before, rss_after], "rss_peak_kib": peak,
        "rss_change": round(rss_after / rss_before - 1, 4), "relay_running": running,
        "tracebacks": sum("Traceback" in line for line in server.lines),
    }
    result["ok"] = (not errors and running and not result["tracebacks"]
                    and after["tasks"] <= before["tasks"]
                    and sockets_open(after) <= sockets_open(before)
                    and abs(result["rss_change"]) <= _RSS_TOLERANCE)
    for key in ("cycles", "seconds", "cycles_per_s", "connect_errors", "tasks", "fds",
                "rss_kib", "rss_peak_kib", "rss_change", "ok"):
        print(f"{key:>15}: {result[key]}")
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()

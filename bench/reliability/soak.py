"""Soak: pgws-relay at half its measured capacity for a long time, clients joining and leaving.

    python -m bench.reliability.soak --minutes 30 --json bench/results/reliability/soak.json

Theory of operation
-------------------
1. Start pgws-relay and measure its capacity on this machine: a burst of 1,000 clients,
   transactions of 100 (the ``burst`` scenario's case), which also warms it up.
2. For ``--minutes``: 1,000 long-lived clients read one channel, fed by one NOTIFY per
   transaction at half that capacity (deliveries/s ÷ 2 ÷ 1,000 notifications per second).
   A churn process keeps ``--churners`` more clients on the same channel, replacing
   ``--churn-per-s`` of them every second (a clean close, a reset or a silent drop, in turn),
   and plants a client that stops reading every ``--stall-every`` seconds.
3. Every ``--sample`` seconds: the relay's RSS and its ``stats:`` line (SIGUSR1: clients,
   tasks, file descriptors, counters).

It reports RSS over time (and its drift after the warm-up, the first third of the run),
deliveries to the long-lived clients against what was sent (every one is expected), and every
counter of trouble: clients closed as slow (expected: the planted ones, nothing else), failed
writes, protocol errors, listener gaps. Exit status 1 if anything but the planted stalls went wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import queue
import random
import selectors
import socket
import statistics
import struct
import sys
import threading
import time
from typing import Any

from bench.parts.harness import (
    Clients,
    Producer,
    Server,
    closed_count,
    commit,
    dumps,
    frame,
    free_port,
    handshake,
    machine,
    recv_ready,
    token,
)
from bench.parts.workloads import PAYLOAD, burst, connections_for

#: The long-lived clients whose deliveries are counted.
_CLIENTS = 1000
#: The last seconds of a soak plant no stalled client: each needs traffic to overflow its queue.
_QUIET_END = 30.0
#: Bytes a planted stalled client lets the kernel buffer, so that it stalls quickly.
_STALL_RCVBUF = 4096


def _churn(port: int, path: str, members: int, per_second: float, stall_every: float,
           plant_for: float, stop: Any, results: Any) -> None:
    """Keep ``members`` clients, replacing ``per_second`` of them each second; plant stalls
    during the first ``plant_for`` seconds (later ones might see too little traffic to fill).

    Handshakes run in a thread of their own, so that the loop reading the members never waits
    for the relay to accept a connection.
    """
    rng = random.Random(7)
    selector = selectors.DefaultSelector()
    live: list[socket.socket] = []
    stalled: list[socket.socket] = []
    joined: queue.SimpleQueue[socket.socket | None] = queue.SimpleQueue()
    wanted: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # rcvbuf, or 0 for a member
    counts = {"joined": 0, "left": 0, "join_errors": 0, "stalls_planted": 0,
              "closed_by_relay": 0}

    def joiner() -> None:
        while (rcvbuf := wanted.get()) is not None:
            try:
                sock = handshake(port, path, rcvbuf or None)
            except OSError:
                counts["join_errors"] += 1
                continue
            if rcvbuf:
                stalled.append(sock)
                counts["stalls_planted"] += 1
            else:
                joined.put(sock)

    def leave(sock: socket.socket, how: int) -> None:
        selector.unregister(sock)
        live.remove(sock)
        if how == 1:  # a reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how == 2:  # a close frame (masked, empty payload) first
            with contextlib.suppress(OSError):
                sock.send(frame(8, b""))
        sock.close()  # how == 0: just gone

    thread = threading.Thread(target=joiner, daemon=True)
    thread.start()
    for _ in range(members):
        wanted.put(0)
    owed = 0.0
    last = next_stall = time.monotonic()
    plant_until = last + plant_for
    while not stop.is_set():
        while not joined.empty():
            sock = joined.get()
            assert sock is not None
            selector.register(sock, selectors.EVENT_READ)
            live.append(sock)
            counts["joined"] += 1
        for key, _ in selector.select(timeout=0.05):
            if recv_ready(key.fileobj) == b"":  # type: ignore[arg-type]
                counts["closed_by_relay"] += 1
                leave(key.fileobj, 0)  # type: ignore[arg-type]
        now = time.monotonic()
        owed += (now - last) * per_second
        last = now
        while owed >= 1 and live:
            owed -= 1
            leave(rng.choice(live), counts["left"] % 3)
            counts["left"] += 1
            wanted.put(0)
        if next_stall <= now < plant_until:
            next_stall = now + stall_every
            wanted.put(_STALL_RCVBUF)
    wanted.put(None)
    thread.join(30)
    counts["stalls_closed"] = closed_count(stalled, wait=15.0)
    for sock in [*live, *stalled]:
        sock.close()
    results.put(counts)


def warmed_up(samples: list[dict[str, Any]], minutes: float) -> list[int]:
    """RSS samples after the warm-up: the first third of the run (allocator pools and the
    first generations of garbage fill then), and at least the first minute."""
    start = max(60.0, minutes * 60 / 3)
    return [s["rss_kib"] for s in samples if s["t"] >= start] or \
        [s["rss_kib"] for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--churners", type=int, default=100)
    parser.add_argument("--churn-per-s", type=float, default=20.0)
    parser.add_argument("--stall-every", type=float, default=60.0)
    parser.add_argument("--sample", type=float, default=10.0)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    server = Server("relay", free_port())
    try:
        result = _soak(server, args)
    finally:
        server.stop()
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(dumps(result))
    summary = result["summary"]
    for name, value in summary.items():
        print(f"{name:>28}: {value}")
    sys.exit(0 if summary["healthy"] else 1)


def _soak(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    warm = burst(server, _CLIENTS, 4000, 100, procs=2)
    capacity = warm["deliveries_per_s"]
    rate = capacity / 2 / _CLIENTS
    print(f"capacity {capacity:,.0f} deliveries/s; soaking at {rate:,.0f} notifications/s to "
          f"{_CLIENTS} clients (+{args.churners} churning) for {args.minutes:g} min", flush=True)

    ctx = mp.get_context("fork")
    stop, churn_results = ctx.Event(), ctx.Queue()
    path = f"/fill_event/{token({'mode': 'r'})}"
    churner = ctx.Process(target=_churn, daemon=True, args=(
        server.port, path, args.churners, args.churn_per_s, args.stall_every,
        args.minutes * 60 - _QUIET_END, stop, churn_results))
    pool = Clients(server.port, connections_for(["fill_event"], _CLIENTS, lambda i: "count", None),
                   PAYLOAD, procs=2, timeout=args.minutes * 60 + 120)
    samples: list[dict[str, Any]] = []
    sampling = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not sampling.wait(args.sample):
            samples.append({"t": round(time.monotonic() - started, 1),
                            "rss_kib": server.memory_kib(), **server.stats()})

    producer = Producer()
    try:
        churner.start()
        pool.start()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        sent = producer.steady(["fill_event"], rate, args.minutes * 60, PAYLOAD)
        time.sleep(3.0)  # The last notifications' way through the relay and the clients.
        sampling.set()
        sampler.join()
        pool.stop()
        stop.set()
        outcomes = pool.results()
        churn = churn_results.get(timeout=120)
        final = server.stats()
    finally:
        producer.close()
        pool.close()
        stop.set()
        churner.join(30)

    received = sum(o["received"] for o in outcomes)
    after_warm_up = warmed_up(samples, args.minutes)
    trouble = {key: final[key] for key in ("writes_failed", "protocol_errors", "gaps",
                                           "rate_limited")}
    summary = {
        "minutes": args.minutes, "rate_per_s": round(rate), "capacity_per_s": round(capacity),
        "sent": sent, "delivered_to_long_lived": received,
        "missing_deliveries": sent * _CLIENTS - received,
        "rss_mib_first_last_max": [round(after_warm_up[0] / 1024, 1),
                                   round(after_warm_up[-1] / 1024, 1),
                                   round(max(after_warm_up) / 1024, 1)],
        "rss_drift": round(after_warm_up[-1] / after_warm_up[0] - 1, 4),
        "rss_median_mib": round(statistics.median(after_warm_up) / 1024, 1),
        **{f"churn_{key}": value for key, value in churn.items()},
        "slow_closed": final["slow_closed"], **trouble,
    }
    summary["healthy"] = (summary["missing_deliveries"] == 0 and not any(trouble.values())
                          and final["slow_closed"] == churn["stalls_planted"]
                          and churn["stalls_closed"] == churn["stalls_planted"]
                          and churn["join_errors"] == 0 and churn["closed_by_relay"] == 0)
    return {"machine": machine(), "commit": commit(), "started": time.strftime("%F %T"),
            "params": vars(args), "warm_up_burst": warm, "summary": summary,
            "samples": samples}


if __name__ == "__main__":
    main()

"""Flooding clients against everyone else: how a plain GET and a delivery fare during a flood.

    python -m bench.reliability.flood --runs 3 --json bench/results/reliability/flood.json

Theory of operation
-------------------
Each scenario runs on a fresh relay for ``--seconds``. Meanwhile a probe sends ``GET /`` on a
new connection, one after another, and times each answer; a normal reader receives a
notification every 10 ms (each carrying its send time) and times each delivery. Scenarios:

- ``quiet``: no flood; the reference every ratio is taken against.
- ``flood, no budget``: ``--flooders`` read-only clients, each in a process of its own, keep
  their sockets full of empty text frames (the cheapest frame to send, ~15 µs of the relay's
  time to parse), with both inbound budgets off: only the reader's yields protect the others.
- ``flood, budgets``: the same clients with the default budgets; each is closed (1008) within
  a second and connects again at once, as an attacker would.

It reports per scenario the median and p99 of each latency, their ratios to ``quiet``, the
bytes the flooders got in and how often they were closed. Figures are medians over ``--runs``.
Before the reader yielded to other tasks, one flooder held the event loop: ``GET /`` timed out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import threading
import time
from typing import Any

import psycopg

from bench.parts.harness import (
    DB_URI,
    LISTEN,
    Server,
    commit,
    dumps,
    frame,
    free_port,
    handshake,
    machine,
    token,
)

#: Seconds between two notifications to the normal reader.
_NOTIFY_EVERY = 0.01
#: Seconds between two probes of ``GET /``.
_PROBE_EVERY = 0.02
#: What a flooder writes again and again: 10,000 empty text frames (60 KB).
_FLOOD = frame(1, b"", mask=b"mask") * 10_000
_NO_BUDGET = {"PGWS_MAX_CLIENT_FRAMES_PER_SECOND": "0", "PGWS_MAX_CLIENT_BYTES_PER_SECOND": "0"}
SCENARIOS: dict[str, tuple[dict[str, str], bool]] = {
    # name: (relay settings, flooding)
    "quiet": ({}, False),
    "flood, no budget": (_NO_BUDGET, True),
    "flood, budgets": ({}, True),
}


def _flooder(port: int, seconds: float, results: Any) -> None:
    """Flood for ``seconds``, connecting again whenever the relay closes the connection."""
    sent, closed = 0, 0
    deadline = time.monotonic() + seconds
    path = f"/flood/{token({'mode': 'r'})}"
    while time.monotonic() < deadline:
        try:
            sock = handshake(port, path)
        except OSError:
            continue
        sock.setblocking(True)
        sock.settimeout(10.0)  # A send cut short would split a frame: wait for the relay.
        try:
            while time.monotonic() < deadline:
                sock.sendall(_FLOOD)
                sent += len(_FLOOD)
        except OSError:
            closed += 1
        finally:
            sock.close()
    results.put({"sent": sent, "closed": closed})


def _get(port: int) -> float | None:
    """Seconds for one ``GET /`` on a new connection; None if it failed."""
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
    except OSError:
        return None
    return time.perf_counter() - started if answer.startswith(b"HTTP/1.1 200") else None


def _texts(buffer: bytearray) -> list[bytes]:
    """Whole unmasked text frames at the head of ``buffer`` (removed from it)."""
    texts = []
    while len(buffer) >= 2:
        size, head = buffer[1] & 0x7F, 2
        if size == 126:
            size, head = int.from_bytes(buffer[2:4], "big"), 4
        elif size == 127:
            size, head = int.from_bytes(buffer[2:10], "big"), 10
        if len(buffer) < head + size:
            break
        if buffer[0] & 0x0F == 1:
            texts.append(bytes(buffer[head:head + size]))
        del buffer[:head + size]
    return texts


def _measure(port: int, seconds: float) -> dict[str, Any]:
    """Probe ``GET /`` and time deliveries to a normal reader for ``seconds``."""
    reader = handshake(port, f"/news/{token({'mode': 'r'})}")
    reader.setblocking(True)
    reader.settimeout(0.2)
    deliveries: list[float] = []
    stop = threading.Event()

    def read() -> None:
        buffer = bytearray()
        while not stop.is_set():
            try:
                chunk = reader.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            now = time.time()
            deliveries.extend(now - json.loads(text)["ts"] for text in _texts(buffer))

    def produce() -> None:
        with psycopg.connect(DB_URI, autocommit=True) as db:
            while not stop.is_set():
                db.execute("SELECT pg_notify(%s, %s)",
                           (LISTEN, json.dumps({"channel": "news", "ts": time.time()})))
                stop.wait(_NOTIFY_EVERY)

    threads = [threading.Thread(target=read), threading.Thread(target=produce)]
    for thread in threads:
        thread.start()
    gets: list[float] = []
    failed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        took = _get(port)
        if took is None:
            failed += 1
        else:
            gets.append(took)
        time.sleep(_PROBE_EVERY)  # The probe's pace, not a wait for anything.
    stop.set()
    for thread in threads:
        thread.join(15)
    reader.close()
    return {"get_ms": _percentiles(gets), "gets": len(gets), "gets_failed": failed,
            "delivery_ms": _percentiles(deliveries), "deliveries": len(deliveries)}


def _percentiles(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p99": None}
    ordered = sorted(samples)
    return {"p50": round(1000 * statistics.median(ordered), 2),
            "p99": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2)}


def run_scenario(name: str, seconds: float, flooders: int) -> dict[str, Any]:
    settings, flooding = SCENARIOS[name]
    server = Server("relay", free_port(), settings)
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_flooder, args=(server.port, seconds + 1, results))
             for _ in range(flooders if flooding else 0)]
    try:
        for proc in procs:
            proc.start()
        time.sleep(0.5 if procs else 0)  # Let the flood get under way before measuring.
        measured = _measure(server.port, seconds)
        floods = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(30)
        stats = server.stats()
    finally:
        server.stop()
    return {**measured, "flood_mb": round(sum(f["sent"] for f in floods) / 1e6, 1),
            "flooders_closed": sum(f["closed"] for f in floods),
            "inbound_limited": stats.get("inbound_limited", 0),
            "relay_running": server.proc.returncode in (0, -15)}


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--flooders", type=int, default=1)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SCENARIOS}
    for run in range(args.runs):
        for name in SCENARIOS:  # Interleaved, so that drift in the machine hits every scenario.
            result = run_scenario(name, args.seconds, args.flooders)
            runs[name].append(result)
            print(f"run {run + 1} {name}: GET {result['get_ms']} ms, delivery "
                  f"{result['delivery_ms']} ms, {result['gets_failed']} GETs failed, flood "
                  f"{result['flood_mb']} MB, closed {result['flooders_closed']}", flush=True)
    summary = {}
    for name, results in runs.items():
        summary[name] = {
            f"{what}_{q}": statistics.median(r[f"{what}_ms"][q] or 0 for r in results)
            for what in ("get", "delivery") for q in ("p50", "p99")}
        summary[name].update(
            gets_failed=sum(r["gets_failed"] for r in results),
            flood_mb=statistics.median(r["flood_mb"] for r in results),
            flooders_closed=statistics.median(r["flooders_closed"] for r in results))
    quiet = summary["quiet"]
    for name, figures in summary.items():
        figures["ratios_to_quiet"] = {
            key: round(figures[key] / quiet[key], 2) if quiet[key] else None
            for key in ("get_p50", "get_p99", "delivery_p50", "delivery_p99")}
        print(f"{name}: {figures}")
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(dumps({"machine": machine(), "commit": commit(),
                                "started": time.strftime("%F %T"), "seconds": args.seconds,
                                "flooders": args.flooders, "runs": runs, "summary": summary}))


if __name__ == "__main__":
    main()

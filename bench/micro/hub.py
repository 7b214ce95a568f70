"""The hub's fan-out alone, in seconds: what one batch costs before any socket is written.

    python -m bench.micro.hub                                   # 1,000 clients, batches of 100
    python -m bench.micro.hub --json bench/results/micro-hub.json
    python -m bench.micro.hub --clients 20 --batch 10 --repeats 3   # a smoke run

Theory of operation
-------------------
:class:`relay.core.hub.Hub` is the relay's router: it parses each notification of a listener
wake-up, finds the streams that want it, has their encoding (WebSocket text frames) make its
bytes once and offers them to every client of each stream. This measures that work and nothing
else: the clients are the unit tests' ``Recorder`` fakes (``tests/unit/core/test_hub.py``),
which keep what they are offered, so no socket, event loop or PostgreSQL takes part and the
figure moves only when the hub's own code does. Each case builds one hub with ``--clients``
recorders on one channel, publishes one batch to warm it, then times ``--repeats`` calls of
``hub.publish`` with a batch of ``--batch`` notifications (``time.perf_counter_ns``; the
recorders are emptied between calls, outside the timing) and reports the median, as µs per
notification and ns per delivery (a delivery is one notification offered to one client, counted
by the hub itself).

Cases:

- ``plain``: every client on the channel, no filter: one stream, one blob of frames per batch.
- ``filtered``: the clients in :data:`GROUPS` filter sets (``payload.market_id=eq.K``), the
  notifications spread over the same markets, so each reaches a tenth of the clients: the cost
  of evaluating the filters per notification and stream.
- ``history``: as ``plain`` with history on (every notification appended to it), clients not
  asking for positions (so no position is sealed).
- ``positioned``: as ``history``, every client asking for positions (each notification's
  position is made once and framed with it).

A figure of this machine only: compare runs of different commits on one machine, in one
sitting. How the whole relay fares with real sockets is the throughput scenario's question.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.parts.harness import write_json
from bench.parts.paths import ROOT
from relay.core import filters
from relay.core.history import History
from relay.core.hub import Hub
from relay.wire.frames import TEXT_FRAMES
from tests.unit.core.test_hub import Recorder, fill

#: Filter sets (markets) in the ``filtered`` case.
GROUPS = 10
#: History bounds for the history cases: large enough that trimming is steady, not absent.
HISTORY = {"messages": 100_000, "max_bytes": 1 << 28, "max_age": 3600.0}
CASES = ("plain", "filtered", "history", "positioned")


def build(case: str, clients: int) -> tuple[Hub, list[Recorder]]:
    """A hub with ``clients`` recorders on the channel ``fill``, set up as ``case`` says."""
    history = History(**HISTORY) if case in ("history", "positioned") else None
    hub = Hub("listen", history=history, encoding=TEXT_FRAMES)
    recorders = [Recorder() for _ in range(clients)]
    for n, recorder in enumerate(recorders):
        if case == "filtered":
            hub.add(recorder, ["fill"], filters.parse_all([f"payload.market_id=eq.{n % GROUPS}"]))
        else:
            hub.add(recorder, ["fill"], positioned=case == "positioned")
    return hub, recorders


def batch_of(case: str, size: int, start: int) -> list[bytes]:
    """``size`` notifications of the channel ``fill``, numbered from ``start``."""
    return [fill(start + n, market=(start + n) % GROUPS if case == "filtered" else 7)
            for n in range(size)]


def measure(case: str, clients: int, batch: int, repeats: int,
            clock: Callable[[], int] = time.perf_counter_ns) -> dict[str, Any]:
    """Median time of ``hub.publish`` for one batch in this case, and the deliveries per batch."""
    hub, recorders = build(case, clients)
    hub.publish(batch_of(case, batch, 0))  # Warm-up: the first batch builds the frame caches.
    samples: list[int] = []
    deliveries = 0
    for number in range(1, repeats + 1):
        for recorder in recorders:
            recorder.offers.clear()
        payloads = batch_of(case, batch, number * batch)
        offered = hub.offered
        started = clock()
        hub.publish(payloads)
        samples.append(clock() - started)
        deliveries = hub.offered - offered
    median_ns = statistics.median(samples)
    return {"case": case, "clients": clients, "batch": batch, "repeats": repeats,
            "deliveries_per_batch": deliveries,
            "median_us_per_batch": round(median_ns / 1e3, 1),
            "us_per_notification": round(median_ns / 1e3 / batch, 3),
            "ns_per_delivery": round(median_ns / max(deliveries, 1), 2),
            "spread_us_per_batch": [round(min(samples) / 1e3, 1), round(max(samples) / 1e3, 1)]}


def short_commit() -> str:
    """This checkout's commit (``git rev-parse --short HEAD``), or ``unknown``."""
    try:
        return subprocess.run(["git", "--no-optional-locks", "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run(clients: int, batch: int, repeats: int, cases: tuple[str, ...] = CASES
        ) -> dict[str, Any]:
    """Every case in ``cases``; the document :func:`main` prints and may write."""
    return {"benchmark": "micro-hub", "commit": short_commit(),
            "command": "python -m bench.micro.hub " + shlex.join(sys.argv[1:]),
            "started": time.strftime("%F %T"), "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "cases": [measure(case, clients, batch, repeats) for case in cases]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro.hub",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100, help="notifications per publish")
    parser.add_argument("--repeats", type=int, default=21, help="timed publishes per case")
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    parser.add_argument("--json", help="write the results here (e.g. bench/results/micro-hub.json)")
    args = parser.parse_args(argv)
    cases = tuple(case.strip() for case in args.cases.split(",") if case.strip())
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    result = run(args.clients, args.batch, args.repeats, cases)
    for row in result["cases"]:
        print(f"{row['case']:11} {row['clients']:,} clients, batch {row['batch']}: "
              f"{row['us_per_notification']:.3f} µs per notification, "
              f"{row['ns_per_delivery']:.1f} ns per delivery "
              f"({row['deliveries_per_batch']:,} deliveries per batch; median of "
              f"{row['repeats']}, {row['spread_us_per_batch'][0]:,}–"
              f"{row['spread_us_per_batch'][1]:,} µs per batch)", flush=True)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

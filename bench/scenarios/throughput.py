"""Run a benchmark scenario against pgws-relay and its peers, side by side; print a table.

    python -m bench.scenarios.throughput burst --servers relay,websockets,node,ceiling --runs 3
    python -m bench.scenarios.throughput steady --json bench/results/steady.json
    python -m bench.scenarios.throughput all --quick    # the smallest of everything (smoke test)

Scenarios: ``burst`` (deliveries/s and CPU per 1,000 deliveries at N clients),
``steady`` (latency from commit to receipt at a fixed rate), ``channels`` (clients spread over
many channels; Econia's channel mix), ``idle`` (RSS per idle connection), ``slow`` (10% of
clients stop reading), ``workers`` (pgws-relay's burst with 1 and 2 worker processes).
Each case runs ``--runs`` times against each server, one server at a time, in the same
invocation; the table gives medians, the spread, and ratios of pgws-relay to each peer.
Load clients run in separate processes; all traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.parts.harness import (
    SERVERS,
    Clients,
    Producer,
    QueueUsage,
    Server,
    commit,
    free_port,
    machine,
)
from bench.parts.workloads import ECONIA_MIX, PAYLOAD, burst, burst_through, connections_for


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def steady(server: Server, clients: int, rate: float, seconds: float, procs: int
           ) -> dict[str, Any]:
    channels = ["fill_event"]
    # 50 connections spread over the whole population sample latency (in a process of their
    # own, see Clients); 50 x 10 s x rate samples are plenty for a p99.9.
    every = max(1, clients // 50)
    pool = Clients(server.port, connections_for(channels, clients,
                                             lambda i: "sample" if i % every == 0 else "count",
                                             None), PAYLOAD, procs=procs)
    producer = Producer()
    try:
        pool.start()
        sent = producer.steady(channels, rate, seconds, PAYLOAD)
        time.sleep(2.0)  # Let the last notifications arrive before the clients stop.
        pool.stop()
        outcomes = pool.results()
    finally:
        producer.close()
        pool.close()
    latencies = [x for o in outcomes for x in o["latencies"]]
    received = sum(o["received"] for o in outcomes)
    return {"sent": sent, "delivered_share": received / (sent * clients),
            "p50_ms": 1000 * _percentile(latencies, 0.50),
            "p99_ms": 1000 * _percentile(latencies, 0.99),
            "p999_ms": 1000 * _percentile(latencies, 0.999),
            "latency_cdf_ms": [1000 * _percentile(latencies, q / 100) for q in range(101)]}


def channels_case(server: Server, clients: int, spread: list[str], messages: int, batch: int,
                  procs: int) -> dict[str, Any]:
    conns = connections_for(spread, clients, lambda i: "count", messages)
    expected = sum(count or 0 for _, _, count in conns)
    run = burst_through(server, conns, spread, messages, batch, procs)
    return {"deliveries_per_s": run["received"] / run["seconds"],
            "delivered_share": run["received"] / expected,
            "cpu_ms_per_1000": run["cpu_ms_per_1000"]}


def idle(server: Server, clients: int, procs: int) -> dict[str, Any]:
    before = server.memory_kib()
    pool = Clients(server.port, connections_for(["idle"], clients, lambda i: "count", None),
                   PAYLOAD, procs=procs)
    try:
        time.sleep(1.0)
        after = server.memory_kib()
    finally:
        pool.close()
    return {"rss_base_kib": before, "rss_kib": after,
            "kib_per_connection": (after - before) / clients}


def idle_growth(server: Server, low: int, high: int, procs: int) -> dict[str, Any]:
    """RSS at ``low`` and at ``high`` idle connections (one channel, one shared token): what
    one more connection costs, without what the first ones cost (imports, arenas, the hub's
    first allocations)."""
    conns = connections_for(["idle"], high, lambda i: "count", None)
    first = Clients(server.port, conns[:low], PAYLOAD, procs=procs)
    try:
        time.sleep(1.0)  # Let the relay finish the handshakes' last writes; then read.
        at_low = server.memory_kib()
        rest = Clients(server.port, conns[low:], PAYLOAD, procs=procs)
        try:
            time.sleep(1.0)
            at_high = server.memory_kib()
        finally:
            rest.close()
    finally:
        first.close()
    return {"rss_low_kib": at_low, "rss_high_kib": at_high,
            "kib_per_connection": (at_high - at_low) / (high - low)}


def slow(server: Server, clients: int, messages: int, batch: int, stalled_share: float,
         procs: int) -> dict[str, Any]:
    every = round(1 / stalled_share) if stalled_share else 0

    def roles(i: int) -> str:
        return "stall" if every and i % every == 0 else "count"

    channels = ["fill_event"]
    conns = connections_for(channels, clients, roles, messages)
    healthy = sum(1 for _, role, _ in conns if role != "stall")
    with QueueUsage() as queue:
        run = burst_through(server, conns, channels, messages, batch, procs)
    return {"healthy_deliveries_per_s": run["received"] / run["seconds"],
            # The measure: each healthy client's throughput, so that the same clients
            # are compared with and without stalls (the total also drops by the 10% stalled).
            "per_healthy_client_per_s": run["received"] / run["seconds"] / healthy,
            "healthy_delivered_share": run["received"] / (healthy * messages),
            "stalled_closed": run["stalled_closed"], "stalled": clients - healthy,
            "peak_rss_kib": server.memory_kib("VmHWM"),
            "notification_queue_peak": queue.peak}


def _cases(scenario: str, quick: bool, procs: int) -> list[tuple[str, dict[str, Any],
                                                              Callable[..., dict[str, Any]]]]:
    """(label, parameters, function) for each case of a scenario."""
    if scenario == "burst":
        sizes = [(100, 2000, 100)] if quick else [
            (100, 20000, 100), (1000, 4000, 100), (10000, 500, 100),
            (100, 5000, 1), (1000, 2000, 1), (10000, 300, 1)]
        return [(f"N={n} B={b}", {"clients": n, "messages": m, "batch": b, "procs": procs},
                 burst) for n, m, b in sizes]
    if scenario == "steady":
        cases = [(100, 100, 2)] if quick else [(1000, 100, 10), (1000, 1000, 10),
                                               (10000, 100, 10)]
        return [(f"{r}/s x {n}", {"clients": n, "rate": r, "seconds": s, "procs": procs},
                 steady) for n, r, s in cases]
    if scenario == "channels":
        wide = [f"c{i:04d}" for i in range(1000)]
        cases = [("100 clients / 10 channels", 100, wide[:10], 200)] if quick else [
            ("10k clients / 1k channels", 10000, wide, 20000),
            ("1k clients / Econia mix", 1000, ECONIA_MIX, 4000)]
        return [(label, {"clients": n, "spread": spread, "messages": m, "batch": 100,
                         "procs": procs}, channels_case) for label, n, spread, m in cases]
    if scenario == "idle":
        if quick:
            return [("200 idle", {"clients": 200, "procs": procs}, idle)]
        # 20,000 connections exceed one process's file descriptors here (limit 20,000), so
        # that case runs pgws-relay with two workers (and only pgws-relay).
        return [("10000 idle", {"clients": 10000, "procs": procs}, idle),
                ("1000 to 18000 idle", {"low": 1000, "high": 18000, "procs": max(procs, 2)},
                 idle_growth),
                ("20000 idle, 2 workers", {"clients": 20000, "procs": max(procs, 2),
                                           "workers": 2}, idle)]
    if scenario == "slow":
        # Enough data per client (6,000 x 340 B = 2 MB) to overflow a stalled client's
        # socket buffers and its 1 MiB queue.
        n, m = (100, 200) if quick else (1000, 6000)
        return [(f"{n} clients, {share:.0%} stalled",
                 {"clients": n, "messages": m, "batch": 100, "stalled_share": share,
                  "procs": procs}, slow) for share in (0.0, 0.1)]
    if scenario == "workers":
        cases = [(100, 2000, 1)] if quick else [(1000, 4000, 1), (1000, 4000, 2),
                                               (10000, 500, 1), (10000, 500, 2)]
        return [(f"N={n} W={w}", {"clients": n, "messages": m, "batch": 100, "procs": procs,
                                  "workers": w}, burst) for n, m, w in cases]
    raise SystemExit(f"unknown scenario {scenario!r}")


HEADLINE = {"burst": "deliveries_per_s", "steady": "p99_ms", "channels": "deliveries_per_s",
            "idle": "kib_per_connection", "slow": "healthy_deliveries_per_s",
            "workers": "deliveries_per_s"}


def run(scenario: str, servers: list[str], runs: int, quick: bool, procs: int,
        only: str | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {"scenario": scenario, "servers": servers, "runs": runs,
                               "machine": machine(), "started": time.strftime("%F %T"),
                               "commit": commit(),
                               "cases": []}
    for label, params, function in _cases(scenario, quick, procs):
        if only and only not in label:
            continue
        case: dict[str, Any] = {"case": label, "params": {k: v for k, v in params.items()
                                                          if k != "spread"}, "servers": {}}
        workers = params.pop("workers", 1)
        case["params"]["workers"] = workers
        for name in servers:
            if workers > 1 and name != "relay":
                continue  # Only pgws-relay has workers; the scenario measures its scaling.
            samples = []
            for _ in range(runs):
                server = Server(name, free_port(),
                                {"PGWS_WORKERS": str(workers)} if name == "relay" else None)
                try:
                    samples.append(function(server, **params))
                except Exception as exc:  # A peer that falls over is a result, not a crash.
                    samples.append({"error": f"{type(exc).__name__}: {exc}"})
                finally:
                    server.stop()
            case["servers"][name] = samples
            _print_line(scenario, label, name, samples)
        results["cases"].append(case)
    return results


def summary(samples: list[dict[str, Any]], key: str) -> tuple[float, float, float] | None:
    values = [s[key] for s in samples if key in s]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def _print_line(scenario: str, label: str, name: str, samples: list[dict[str, Any]]) -> None:
    key = HEADLINE[scenario]
    stats = summary(samples, key)
    errors = [s["error"] for s in samples if "error" in s]
    if stats is None:
        print(f"{label:28} {name:11} failed: {errors[0] if errors else '?'}", flush=True)
        return
    median, low, high = stats
    extra = ""
    for field in ("delivered_share", "healthy_delivered_share", "cpu_ms_per_1000", "p50_ms",
                  "p999_ms", "stalled_closed", "peak_rss_kib"):
        values = [s[field] for s in samples if field in s]
        if values:
            extra += f" {field}={statistics.median(values):,.3g}"
    print(f"{label:28} {name:11} {key}={median:,.1f} ({low:,.1f}–{high:,.1f}){extra}"
          + (f" [{len(errors)} failed]" if errors else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=[*HEADLINE, "all"])
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"comma-separated, from {', '.join(SERVERS)}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--quick", action="store_true", help="the smallest case of each")
    parser.add_argument("--json", help="write the raw results here (all: a directory)")
    parser.add_argument("--cases", help="only the cases whose label contains this text")
    args = parser.parse_args()
    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    scenarios = list(HEADLINE) if args.scenario == "all" else [args.scenario]
    for scenario in scenarios:
        print(f"== {scenario}", flush=True)
        results = run(scenario, servers, args.runs, args.quick, args.procs, args.cases)
        if args.json:
            path = (os.path.join(args.json, f"{scenario}.json") if args.scenario == "all"
                    else args.json)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as handle:
                json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()

"""Render bench/results/*.json (from the scripts' ``--json``) into bench/RESULTS.md and PNG charts.

    python -m bench.report            # reads bench/results/, writes bench/RESULTS.md

Medians of the runs, their spread (min–max), and the ratio of pgws-relay to each peer
measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.parts.paths import BENCH, RESULTS
from bench.reliability.soak import warmed_up
from bench.scenarios.c100k import readme_section as c100k_section
from bench.scenarios.fleet import section as fleet_section
from bench.scenarios.floor import floors
from bench.scenarios.pglimits import section as pglimits_section
from bench.scenarios.resume import goal_rows as resume_goal_rows
from relay.core.history import ENTRY_OVERHEAD

NAMES = {"relay": "pgws-relay", "websockets": "websockets (Python)", "node": "Node ws + pg",
         "ceiling": "Trio ceiling"}
COLORS = {"relay": "tab:blue", "websockets": "tab:orange", "node": "tab:green",
          "ceiling": "tab:red"}
METRICS = {
    "burst": [("deliveries_per_s", "deliveries/s", True), ("cpu_ms_per_1000",
                                                          "CPU ms / 1,000 deliveries", False),
              ("delivered_share", "delivered", True)],
    "steady": [("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False),
               ("p999_ms", "p99.9 ms", False), ("delivered_share", "delivered", True)],
    "channels": [("deliveries_per_s", "deliveries/s", True), ("delivered_share", "delivered",
                                                             True)],
    "idle": [("kib_per_connection", "KiB per idle connection", False)],
    "slow": [("per_healthy_client_per_s", "deliveries/s per healthy client", True),
             ("healthy_deliveries_per_s", "healthy deliveries/s", True),
             ("healthy_delivered_share", "healthy delivered", True),
             ("stalled_closed", "stalled clients closed", True),
             ("peak_rss_kib", "peak RSS KiB", False),
             ("notification_queue_peak", "peak pg_notification_queue_usage()", False)],
    "workers": [("deliveries_per_s", "deliveries/s", True), ("cpu_ms_per_1000",
                                                            "CPU ms / 1,000 deliveries", False)],
}
COMMANDS = {
    "burst": "python -m bench.scenarios.throughput burst --runs 3 --json bench/results/burst.json",
    "steady": "python -m bench.scenarios.throughput steady --runs 3 "
              "--json bench/results/steady.json",
    "channels": "python -m bench.scenarios.throughput channels --runs 3 "
                "--json bench/results/channels.json",
    "idle": "python -m bench.scenarios.throughput idle --runs 3 --json bench/results/idle.json",
    "slow": "python -m bench.scenarios.throughput slow --runs 3 --json bench/results/slow.json",
    "workers": "python -m bench.scenarios.throughput workers --servers relay --runs 3 "
               "--json bench/results/workers.json",
}


def _values(samples: list[dict[str, Any]], key: str) -> list[float]:
    return [s[key] for s in samples if key in s]


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _cell(samples: list[dict[str, Any]], key: str) -> str:
    values = _values(samples, key)
    if not values:
        errors = [s.get("error", "") for s in samples]
        return "failed" + (f" ({errors[0][:40]})" if errors and errors[0] else "")
    median = statistics.median(values)
    if len(values) > 1 and min(values) != max(values):
        return f"{_fmt(median)} ({_fmt(min(values))}–{_fmt(max(values))})"
    return _fmt(median)


def _ratio(case: dict[str, Any], key: str, peer: str, higher_is_better: bool) -> str:
    ours = _values(case["servers"].get("relay", []), key)
    theirs = _values(case["servers"].get(peer, []), key)
    if not ours or not theirs or not statistics.median(theirs) or not statistics.median(ours):
        return "–"
    ratio = statistics.median(ours) / statistics.median(theirs)
    if not higher_is_better:
        ratio = 1 / ratio
    return f"{ratio:.2f}×"


def _table(result: dict[str, Any]) -> list[str]:
    scenario = result["scenario"]
    servers = result["servers"]
    peers = [name for name in servers if name != "relay"]
    lines = []
    for key, label, higher in METRICS[scenario]:
        header = ["case", *(NAMES.get(s, s) for s in servers),
                  *(f"relay vs {NAMES.get(p, p)}" for p in peers)]
        lines += [f"**{label}**", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for case in result["cases"]:
            row = [case["case"], *(_cell(case["servers"].get(s, []), key) for s in servers),
                   *(_ratio(case, key, p, higher) for p in peers)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _finish(figure: Any, axes: Any, name: str, xlabel: str, ylabel: str, title: str,
            log_y: bool = False, log_x: bool = True) -> str:
    """Label, save as bench/results/<name>.png, close; the path relative to bench/."""
    if log_x:
        axes.set_xscale("log")
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=6)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(os.path.join(RESULTS, f"{name}.png"), dpi=110)
    plt.close(figure)
    return f"results/{name}.png"


def _chart_burst(result: dict[str, Any]) -> str | None:
    figure, axes = plt.subplots(figsize=(7, 4))
    plotted = False
    for batch in sorted({case["params"]["batch"] for case in result["cases"]}):
        cases = [c for c in result["cases"] if c["params"]["batch"] == batch]
        for name in result["servers"]:
            points = [(c["params"]["clients"],
                       statistics.median(_values(c["servers"].get(name, []),
                                                 "deliveries_per_s")))
                      for c in cases if _values(c["servers"].get(name, []), "deliveries_per_s")]
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                axes.plot(xs, ys, marker="o", label=f"{NAMES.get(name, name)}, batch {batch}",
                          linestyle="-" if batch > 1 else "--", color=COLORS.get(name))
                plotted = True
    if not plotted:
        plt.close(figure)
        return None
    return _finish(figure, axes, "burst", "clients on one channel", "deliveries/s (median)",
                   "Burst fan-out", log_y=True)


def _chart_latency(result: dict[str, Any]) -> str | None:
    figure, axes = plt.subplots(figsize=(7, 4))
    plotted = False
    for case in result["cases"]:
        for name in result["servers"]:
            samples = [s for s in case["servers"].get(name, []) if "latency_cdf_ms" in s]
            if not samples:
                continue
            cdf = samples[len(samples) // 2]["latency_cdf_ms"]
            axes.plot(cdf, [q / 100 for q in range(101)], color=COLORS.get(name),
                      linestyle=["-", "--", ":"][result["cases"].index(case) % 3],
                      label=f"{NAMES.get(name, name)}, {case['case']}")
            plotted = True
    if not plotted:
        plt.close(figure)
        return None
    return _finish(figure, axes, "latency", "commit → receipt (ms)", "share of deliveries",
                   "Latency CDF at a steady rate")


def _chart_rss(burst: dict[str, Any] | None, idle: dict[str, Any] | None) -> str | None:
    figure, axes = plt.subplots(figsize=(7, 4))
    plotted = False
    if burst:
        for name in burst["servers"]:
            points = [(c["params"]["clients"],
                       statistics.median(_values(c["servers"][name], "peak_rss_kib")) / 1024)
                      for c in burst["cases"] if c["params"]["batch"] > 1
                      and _values(c["servers"].get(name, []), "peak_rss_kib")]
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                axes.plot(xs, ys, marker="o", label=f"{NAMES.get(name, name)} (burst peak)",
                          color=COLORS.get(name))
                plotted = True
    if idle:
        for name in idle["servers"]:
            for case in idle["cases"]:
                values = _values(case["servers"].get(name, []), "rss_kib")
                if values:
                    axes.scatter([case["params"]["clients"]], [statistics.median(values) / 1024],
                                 marker="x", color=COLORS.get(name),
                                 label=f"{NAMES.get(name, name)} (idle, {case['case']})")
                    plotted = True
    if not plotted:
        plt.close(figure)
        return None
    return _finish(figure, axes, "rss", "clients", "RSS (MiB)", "Memory vs clients")


def _median(result: dict[str, Any] | None, case: str, server: str, key: str) -> float | None:
    if not result:
        return None
    for entry in result["cases"]:
        if entry["case"] == case:
            values = _values(entry["servers"].get(server, []), key)
            return statistics.median(values) if values else None
    return None


def _goal(rows: list[str], goal: str, value: float | None, target: float, higher: bool,
          unit: str = "") -> None:
    if value is None:
        rows.append(f"| {goal} | not measured | {target:g}{unit} | – |")
        return
    met = value >= target if higher else value <= target
    rows.append(f"| {goal} | {_fmt(value)}{unit} | {'≥' if higher else '≤'} {target:g}{unit} | "
                f"{'met' if met else 'missed by ' + _fmt(abs(value - target)) + unit} |")


def goals(results: dict[str, dict[str, Any]]) -> list[str]:
    """The goals against the peers (throughput, latency, memory), each with its measured figure
    (medians) and whether it is met."""
    rows = ["| goal | measured | target | status |", "|---|---|---|---|"]
    burst = results.get("burst")
    for case in ("N=1000 B=100", "N=10000 B=100", "N=1000 B=1", "N=10000 B=1"):
        ours = _median(burst, case, "relay", "deliveries_per_s")
        for peer, target in (("node", 4.0), ("websockets", 3.0), ("ceiling", 0.8)):
            theirs = _median(burst, case, peer, "deliveries_per_s")
            ratio = ours / theirs if ours and theirs else None
            _goal(rows, f"burst {case}: relay / {NAMES[peer]}", ratio, target, True, "×")
    steady = results.get("steady")
    _goal(rows, "100/s × 1,000: p50", _median(steady, "100/s x 1000", "relay", "p50_ms"), 2,
          False, " ms")
    _goal(rows, "100/s × 1,000: p99", _median(steady, "100/s x 1000", "relay", "p99_ms"), 10,
          False, " ms")
    _goal(rows, "1,000/s × 1,000: p99", _median(steady, "1000/s x 1000", "relay", "p99_ms"), 25,
          False, " ms")
    _goal(rows, "1,000/s × 1,000: delivered",
          _median(steady, "1000/s x 1000", "relay", "delivered_share"), 1.0, True)
    _goal(rows, "100/s × 10,000: p99", _median(steady, "100/s x 10000", "relay", "p99_ms"),
          100, False, " ms")
    _goal(rows, "idle: KiB per connection at 10,000",
          _median(results.get("idle"), "10000 idle", "relay", "kib_per_connection"), 8, False,
          " KiB")
    held = _median(results.get("idle"), "20000 idle, 2 workers", "relay", "kib_per_connection")
    rows.append("| 20,000 concurrent connections held | "
                + (f"held, 2 workers, {_fmt(held)} KiB each" if held else "not measured")
                + " | held | " + ("met" if held else "–") + " |")
    slow = results.get("slow")
    stalled = _median(slow, "1000 clients, 10% stalled", "relay", "per_healthy_client_per_s")
    clean = _median(slow, "1000 clients, 0% stalled", "relay", "per_healthy_client_per_s")
    _goal(rows, "slow: per healthy client, 10% stalled / none stalled",
          stalled / clean if stalled and clean else None, 0.9, True, "×")
    workers = results.get("workers")
    for clients in (1000, 10000):
        one = _median(workers, f"N={clients} W=1", "relay", "deliveries_per_s")
        two = _median(workers, f"N={clients} W=2", "relay", "deliveries_per_s")
        _goal(rows, f"workers N={clients}: W=2 / (2 × W=1)",
              two / (2 * one) if one and two else None, 0.85, True, "×")
    return rows


def floor_section(directory: str) -> list[str]:
    """The steady-rate goals beside this machine's floor (bench/scenarios/floor.py) and the
    medians."""
    path = os.path.join(directory, "floor.json")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        floor = json.load(handle)
    steady = load(directory).get("steady")
    lines = ["## The machine's latency floor", "",
             "`python -m bench.scenarios.floor --json bench/results/floor.json` (run "
             f"{floor['started']}): PostgreSQL's own commit → LISTEN path plus the CPU cost of "
             "one bare 344-byte loopback `write` from Python, times the fan-out (see the "
             "script's docstring). No server fanning out from one thread can go below these here; "
             "the gap between the "
             "floor and the measured figures is the load clients and PostgreSQL competing for "
             "the same 2 cores.", "",
             "| case | µs per write | fan-out ms | floor p50 / p99 ms | goal p50 / p99 ms | "
             "pgws-relay p50 / p99 ms | Trio ceiling p50 / p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for row in floors(floor):

        def pair(server: str, case: str = row["case"]) -> str:
            p50 = _median(steady, case, server, "p50_ms")
            p99 = _median(steady, case, server, "p99_ms")
            return f"{_fmt(p50)} / {_fmt(p99)}" if p50 and p99 else "–"

        goal_p50 = _fmt(row["p50_goal_ms"]) if row["p50_goal_ms"] else "–"
        lines.append(f"| {row['case']} | {row['per_write_us']:.2f} | {row['fan_out_ms']:.1f}"
                     f"{' (saturated)' if row['saturated'] else ''} | "
                     f"{_fmt(row['p50_floor_ms'])} / {_fmt(row['p99_floor_ms'])} | "
                     f"{goal_p50} / {_fmt(row['p99_goal_ms'])} | {pair('relay')} | "
                     f"{pair('ceiling')} |")
    return [*lines, ""]


RELIABILITY_COMMANDS = {
    "faults": "python -m bench.reliability.faults --runs 3 "
              "--json bench/results/reliability/faults.json",
    "fuzz": "python -m bench.reliability.fuzz --cases 100000 --procs 4 "
            "--json bench/results/reliability/fuzz.json",
    "churn": "python -m bench.reliability.churn --cycles 100000 --procs 4 "
             "--json bench/results/reliability/churn.json",
    "slow": "python -m bench.scenarios.throughput slow --servers relay --runs 3 "
            "--json bench/results/reliability/slow.json",
    "soak": "python -m bench.reliability.soak --minutes 30 "
            "--json bench/results/reliability/soak.json",
    "flood": "python -m bench.reliability.flood --runs 3 "
             "--json bench/results/reliability/flood.json",
    "burst-before-after": "python -m bench.scenarios.throughput burst --servers relay --runs 1 "
                          "--cases 'N=1000 B=100', alternated 10 times between two checkouts",
    "metrics-cost": "python -m bench.scenarios.metrics_cost --before /tmp/pgws-before --rounds 40 "
                    "--json bench/results/reliability/metrics-cost.json",
}


def _reliability(directory: str) -> dict[str, Any]:
    found = {}
    for name in RELIABILITY_COMMANDS:
        path = os.path.join(directory, "reliability", f"{name}.json")
        if os.path.exists(path):
            with open(path) as handle:
                found[name] = json.load(handle)
    return found


def _chart_soak(soak: dict[str, Any]) -> str | None:
    samples = soak.get("samples") or []
    if not samples:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    minutes = [sample["t"] / 60 for sample in samples]
    axes.plot(minutes, [sample["rss_kib"] / 1024 for sample in samples], color="tab:blue",
              label="pgws-relay RSS (MiB)")
    axes.plot(minutes, [sample["clients"] / 10 for sample in samples], color="tab:gray",
              label="clients / 10")
    axes.set_ylim(bottom=0)
    return _finish(figure, axes, "soak", "minutes", "MiB  /  clients ÷ 10",
                   f"Soak: {soak['summary']['rate_per_s']:,} notifications/s to 1,000 clients, "
                   "clients joining and leaving", log_x=False)


def reliability_section(directory: str) -> list[str]:
    """The long runs and fault figures, from bench/results/reliability/*.json."""
    found = _reliability(directory)
    if not found:
        return []
    lines = ["## Reliability", "", "| run | figures | command |",
             "|---|---|---|"]
    if "faults" in found:
        cases = found["faults"]["cases"]

        def median(case: str, key: str) -> float:
            return statistics.median(run[key] for run in cases[case])

        for case, text in (
                ("kill", "LISTEN backend killed: delivery again {resume_s:.2f} s after the kill"),
                ("restart", "PostgreSQL stopped and started: delivery again {resume_s:.2f} s "
                            "after it accepts connections"),
                ("down-at-start", "PostgreSQL down at start-up for 5 s: delivery {resume_s:.2f} s "
                                  "after it accepts connections"),
                ("sigterm", "SIGTERM, 1,000 clients answering the close: exit {exit_s:.2f} s, "
                            "status 0, {closed_1001:.0f} × 1001"),
                ("sigterm-silent", "SIGTERM, 1,000 clients that never answer: exit "
                                   "{exit_s:.2f} s (PGWS_SHUTDOWN_TIMEOUT 5 s), {closed_1001:.0f}"
                                   " × 1001")):
            if case in cases:
                figures = {key: median(case, key) for key in cases[case][0]}
                gap = f"; gaps counted: {figures['gaps']:.0f}" if "gaps" in figures else ""
                lines.append(f"| {case} (median of {len(cases[case])}) | "
                             f"{text.format(**figures)}{gap} | "
                             f"`{RELIABILITY_COMMANDS['faults']}` |")
    if "fuzz" in found:
        fuzz = found["fuzz"]
        lines.append(f"| raw-socket fuzzer | {fuzz['cases']:,} cases in {fuzz['seconds']} s, "
                     f"{fuzz['failed']} answered outside their family's documented set; "
                     f"{fuzz['round_trips']} normal-client round trips, all ok: "
                     f"{fuzz['round_trips_ok']}; tasks {fuzz['before']['tasks']} → "
                     f"{fuzz['after']['tasks']}; no leak: {fuzz['leak_free']}; tracebacks: "
                     f"{fuzz['tracebacks']} | `{RELIABILITY_COMMANDS['fuzz']}` |")
    if "churn" in found:
        churn = found["churn"]
        lines.append(f"| connect/disconnect churn | {churn['cycles']:,} cycles in "
                     f"{churn['seconds']} s ({churn['cycles_per_s']:,}/s), "
                     f"{churn['connect_errors']} errors; tasks {churn['tasks'][0]} → "
                     f"{churn['tasks'][1]}; RSS {churn['rss_kib'][0] / 1024:.1f} → "
                     f"{churn['rss_kib'][1] / 1024:.1f} MiB ({churn['rss_change']:+.1%}, bound "
                     f"±10 %) | `{RELIABILITY_COMMANDS['churn']}` |")
    if "slow" in found:
        slow = found["slow"]
        for case in slow["cases"]:
            runs = case["servers"]["relay"]
            lines.append(
                f"| slow consumers: {case['case']} | "
                f"{statistics.median(r['per_healthy_client_per_s'] for r in runs):,.0f} "
                f"deliveries/s per healthy client, healthy delivered "
                f"{min(r['healthy_delivered_share'] for r in runs):.0%}, "
                f"{statistics.median(r['stalled_closed'] for r in runs):.0f} closed (1013), "
                f"peak RSS {max(r['peak_rss_kib'] for r in runs) / 1024:.0f} MiB, peak "
                f"`pg_notification_queue_usage()` "
                f"{max(r.get('notification_queue_peak', 0) for r in runs):.1g} | "
                f"`{RELIABILITY_COMMANDS['slow']}` |")
    if "flood" in found:
        flood = found["flood"]
        for name in sorted(flood["summary"], key=lambda name: name != "quiet"):
            figures = flood["summary"][name]
            closed = (f"; flooders closed (1008) {figures['flooders_closed']:.0f} times"
                      if figures["flooders_closed"] else "")
            lines.append(
                f"| {flood['flooders']} flooding client, {name} (median of "
                f"{len(flood['runs'][name])} × {flood['seconds']:g} s) | `GET /` p50 / p99 "
                f"{figures['get_p50']} / {figures['get_p99']} ms, delivery "
                f"{figures['delivery_p50']} / {figures['delivery_p99']} ms, "
                f"{figures['gets_failed']} GETs failed{closed} | "
                f"`{RELIABILITY_COMMANDS['flood']}` |")
    if "burst-before-after" in found:
        runs = found["burst-before-after"]["runs"]
        lines.append(
            f"| fan-out cost of the reader's checkpoints: burst, 1,000 clients | "
            f"{runs['before']['median_deliveries_per_s'] / 1e6:.2f} M deliveries/s before "
            f"({found['burst-before-after']['before_commit']}), "
            f"{runs['after']['median_deliveries_per_s'] / 1e6:.2f} M after "
            f"(medians of {len(runs['after']['deliveries_per_s'])} interleaved runs; CPU per "
            f"1,000 deliveries {runs['before']['median_cpu_ms_per_1000']} and "
            f"{runs['after']['median_cpu_ms_per_1000']} ms) | "
            f"`{RELIABILITY_COMMANDS['burst-before-after']}` |")
    if "metrics-cost" in found:
        cost = found["metrics-cost"]
        runs = cost["runs"]
        rates = [rate for name in runs for rate in runs[name]["deliveries_per_s"]]
        lines.append(
            f"| fan-out cost of the metrics: burst, 1,000 clients | "
            f"{runs['before']['median_deliveries_per_s'] / 1e6:.2f} M deliveries/s before "
            f"({cost['before']['commit']}), "
            f"{runs['after']['median_deliveries_per_s'] / 1e6:.2f} M after "
            f"({cost['after']['commit']}), "
            f"{runs['after_scraper']['median_deliveries_per_s'] / 1e6:.2f} M after with "
            f"`/metrics` scraped every second (medians of "
            f"{len(runs['after']['deliveries_per_s'])} interleaved runs each; single runs "
            f"{min(rates) / 1e6:.1f}–{max(rates) / 1e6:.1f} M); CPU per 1,000 deliveries "
            f"{runs['before']['median_cpu_ms_per_1000']:.3f}, "
            f"{runs['after']['median_cpu_ms_per_1000']:.3f} and "
            f"{runs['after_scraper']['median_cpu_ms_per_1000']:.3f} ms | "
            f"`{cost.get('command', RELIABILITY_COMMANDS['metrics-cost'])}` |")
    chart = None
    if "soak" in found:
        summary = found["soak"]["summary"]
        chart = _chart_soak(found["soak"])
        rss = [kib / 1024 for kib in warmed_up(found["soak"]["samples"], summary["minutes"])]
        lines.append(
            f"| soak | {summary['minutes']:g} min at {summary['rate_per_s']:,} notifications/s "
            f"to 1,000 clients (half of {summary['capacity_per_s']:,} deliveries/s), "
            f"{summary['churn_joined']:,} clients joined and {summary['churn_left']:,} left; "
            f"missing deliveries {summary['missing_deliveries']}; RSS after the warm-up (the "
            f"first third) {rss[0]:.1f} → {rss[-1]:.1f} MiB (max {max(rss):.1f}); closed as slow "
            f"{summary['slow_closed']} of {summary['churn_stalls_planted']} planted stalls; "
            f"write failures {summary['writes_failed']}, protocol errors "
            f"{summary['protocol_errors']}, gaps {summary['gaps']} | "
            f"`{RELIABILITY_COMMANDS['soak']}` |")
    lines.append("")
    if chart:
        lines += [f"![{os.path.basename(chart)}]({chart})", ""]
    return lines


FILTERS_AND_COMPRESSION = ("compression", "filters")
#: The compression goals: compression.py's goal → (measure, target, higher is better, row label).
COMPRESSION_GOALS = {
    "A(a)": ("bytes_per_delivery", 0.40, False, "bytes per delivery, deflate / plain"),
    "A(b)": ("bytes_per_delivery", 0.40, False, "bytes per delivery, deflate / plain"),
    "B": ("deliveries_per_s", 0.8, True, "deliveries/s, deflate / plain"),
    "C": ("deliveries_per_s", 2.0, True, "deliveries/s, deflate / plain"),
}
FILTERS_GOAL = 1.2
COMPRESSION_METRICS = [("bytes_per_delivery", "bytes per delivery"),
                       ("deliveries_per_s", "deliveries/s"),
                       ("relay_cpu_ms_per_1000", "relay CPU ms / 1,000 deliveries")]
VARIANTS = {"plain": "plain", "deflate": "deflate",
            "off": "deflate offered, PGWS_COMPRESSION=off"}


def _filters_and_compression(directory: str) -> dict[str, Any]:
    """bench/results/compression.json and filters.json, whichever exist (filters.json is
    rewritten after every round while bench/scenarios/filters.py runs: read what is there)."""
    found = {}
    for name in FILTERS_AND_COMPRESSION:
        path = os.path.join(directory, f"{name}.json")
        if os.path.exists(path):
            with open(path) as handle:
                found[name] = json.load(handle)
    return found


def _provenance(result: dict[str, Any], unit: str) -> str:
    """`command` (run …, commit …, N rounds), and whether the file is complete."""
    runs = result.get("runs") or [run for case in result.get("cases", [])
                                  for run in case.get("runs", [])]
    done = max((run.get("round", 0) for run in runs), default=0)
    text = (f"`{result['command']}` (run {result['started']}, commit "
            f"{str(result.get('commit', '?'))[:7]}"
            + (", with uncommitted changes" if result.get("uncommitted") else "")
            + f", {result['rounds']} {unit})")
    if not result.get("complete", True):
        text += f" — incomplete: written after round {done} of {result['rounds']}"
    return text


def _compression_case(compression: dict[str, Any] | None, goal: str) -> dict[str, Any] | None:
    for case in (compression or {}).get("cases", []):
        if case["case"].get("goal") == goal:
            return case
    return None


def _variant_median(case: dict[str, Any], variant: str, key: str) -> float | None:
    values = _values([r for r in case["runs"] if r["variant"] == variant
                      and "error" not in r], key)
    return statistics.median(values) if values else None


def _short(value: float) -> str:
    """1,321,449 → 1.32 M; 37,610 → 37.6 k; 179.13 → 179."""
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e4:
        return f"{value / 1e3:.1f} k"
    return f"{value:,.0f}" if value >= 100 else _fmt(value)


def _filters_runs(filters: dict[str, Any], clients: int) -> list[dict[str, Any]]:
    """The runs at this client count that the medians use (filters.py: no error)."""
    return [r for r in filters.get("runs", []) if r["clients"] == clients
            and "phases" in r and "error" not in r]


def _sizes(filters: dict[str, Any]) -> list[int]:
    return sorted(int(n) for n in filters.get("summary", {}).get("by_clients", {}))


def filters_and_compression_goals(found: dict[str, Any]) -> list[str]:
    """The filter and compression goals (compression A–C, filters D), each with its measured
    figure (ratios of medians from one invocation) and whether it is met, and what D's figures
    mean."""
    compression, filters = found.get("compression"), found.get("filters")
    if not compression and not filters:
        return []
    rows = ["| goal | measured | target | status |", "|---|---|---|---|"]
    for goal, (key, target, higher, measure) in COMPRESSION_GOALS.items():
        case = _compression_case(compression, goal)
        ratio = plain = deflate = None
        label = f"{goal}: {measure}"
        if case:
            ratio = case["summary"]["ratios"].get("deflate/plain", {}).get(key)
            plain = _variant_median(case, "plain", key)
            deflate = _variant_median(case, "deflate", key)
            unit = " B" if key == "bytes_per_delivery" else ""
            label = (f"{goal}: {case['case']['label']}, {case['case']['clients']:,} clients: "
                     f"{measure}"
                     + (f" ({_short(deflate)}{unit} / {_short(plain)}{unit})"
                        if plain and deflate else ""))
            compressed = _variant_median(case, "deflate", "compressed_share")
            if ratio is not None and not compressed:
                rows.append(f"| {label} | {_fmt(ratio)}× | {'≥' if higher else '≤'} "
                            f"{target:g}× | not measured: no compressed frame |")
                continue
        _goal(rows, label, ratio, target, higher, "×")
    sizes = _sizes(filters) if filters else []
    by_clients = filters.get("summary", {}).get("by_clients", {}) if filters else {}
    small, large = (by_clients.get(str(sizes[0]), {}), by_clients.get(str(sizes[-1]), {})) \
        if sizes else ({}, {})
    names = (f"{sizes[-1]:,} vs {sizes[0]:,} clients" if sizes
             else "10,000 vs 1,000 clients")
    for phase, text in (("matched", "D: relay CPU per notification matching one group, "),
                        ("nomatch", "D: relay CPU per notification matching no group (filter "
                                    "evaluation and routing alone), ")):
        key = f"{phase}_relay_cpu_us_per_notification"
        low, high = small.get(key), large.get(key)
        ratio = high / low if low and high is not None else None
        if filters and not filters.get("probe", {}).get("filters_applied", True):
            rows.append(f"| {text}{names} | – | ≤ {FILTERS_GOAL:g}× | not measured: the relay "
                        "ignores filters |")
            continue
        _goal(rows, text + names + (f" ({_fmt(high)} / {_fmt(low)} µs)" if ratio else ""),
              ratio, FILTERS_GOAL, False, "×")
    if filters:
        clean = [r for r in filters.get("runs", []) if "phases" in r
                 and not r.get("listener_gaps")]
        exact = sum(r["clients_exact"] for r in clean)
        everyone = sum(r["clients"] for r in clean)
        foreign = sum(r.get("foreign_frames", 0) for r in filters.get("runs", []))
        rows.append(
            "| D: every client received exactly the notifications its filter matched | "
            + (f"{exact:,} of {everyone:,} clients in {len(clean)} "
               f"run{'s' if len(clean) != 1 else ''} "
               f"({exact / everyone:.0%}), {foreign} foreign frames" if everyone
               else "not measured")
            + " | every client | " + ("–" if not everyone else "met"
                                      if exact == everyone and not foreign else "missed")
            + " |")
        gapped = [r for r in filters.get("runs", []) if r.get("listener_gaps")]
        runs = len(filters.get("runs", []))
        rows.append(f"| D: runs in which the relay's LISTEN connection was replaced "
                    f"(notifications lost for every client) | {len(gapped)} of {runs} | none | "
                    + ("met" if not gapped else "missed") + " |")
    lines = ["## Goals: filters and compression", "",
             "Ratios of medians measured in one invocation; the sections "
             "[compression](#compression) and [filters](#filters) below hold the medians, "
             "their spread and the commands.", "", *rows, ""]
    capped = _compression_case(compression, "C")
    if capped:
        lines += [f"C runs {capped['case']['clients']:,} clients, not 1,000: each client's "
                  "backlog must stay under `PGWS_MAX_QUEUE_BYTES` (1 MiB), and 1,000 TCP flows "
                  "that start at once overflow the shaped link's queue (tbf, 1.5 MB) with their "
                  "initial windows alone, so flows sit in retransmission back-off and the relay "
                  "closes them as slow consumers (1013) in both variants: that measures the "
                  f"slow-consumer rule, not the link. {capped['case']['clients']:,} flows fill "
                  "the link without it (`bench/scenarios/compression.py`'s docstring).", ""]
    if sizes and small.get("matched_relay_cpu_us_per_notification") \
            and large.get("matched_relay_cpu_us_per_notification"):
        groups = filters.get("groups", 100)
        writes = [n // groups for n in sizes]
        per_write = [by_clients[str(n)].get("implied_us_per_write") for n in sizes]
        share = [by_clients[str(n)].get("writes_share_of_matched_cpu") for n in sizes]
        exact_share = [by_clients[str(n)].get("clients_exact_share") for n in sizes]
        nomatch = filters["summary"].get("ratios", {}).get("nomatch", {}).get("ratio")
        matched = filters["summary"].get("ratios", {}).get("matched", {}).get("ratio")
        text = (f"What D measures. Every client is in one of {groups} filter groups "
                f"(`payload.market_id=eq.<g>`), so a notification matching one group is "
                f"{writes[0]:,} socket writes at {sizes[0]:,} clients and {writes[-1]:,} at "
                f"{sizes[-1]:,}, {writes[-1] // max(1, writes[0])}× as many. The relay's CPU "
                f"per matched notification, {_fmt(small['matched_relay_cpu_us_per_notification'])}"
                f" and {_fmt(large['matched_relay_cpu_us_per_notification'])} µs, grows with the "
                "writes")
        if None not in per_write and None not in share:
            text += (f": each write costs {min(per_write):.1f}–{max(per_write):.1f} µs "
                     "((matched − no-match CPU per notification) / writes), and the writes are "
                     f"{share[0]:.0%} and {share[-1]:.0%} of the matched CPU")
        text += "."
        low = small.get("nomatch_relay_cpu_us_per_notification")
        high = large.get("nomatch_relay_cpu_us_per_notification")
        if low is not None and high is not None:
            text += (" The filter work itself is flat: a notification that matches no group (no "
                     f"write at all) costs {_fmt(low)} µs at {sizes[0]:,} clients and "
                     f"{_fmt(high)} µs at {sizes[-1]:,}"
                     + (f" ({nomatch:.2f}×)" if nomatch is not None else "") + ".")
        if matched is not None and matched > FILTERS_GOAL:
            text += (" The matched ratio misses its target because the number of writes per "
                     "notification grows with the clients, not because evaluating filters does.")
        if exact_share and None not in exact_share:
            counts = " and ".join(f"{n:,}" for n in sizes)
            if all(value == 1 for value in exact_share):
                text += (" Every client received exactly what its filter matched, nothing "
                         f"missing and nothing foreign, at {counts} clients "
                         "(`clients_exact_share` 100 %).")
            else:
                text += (" Clients that received exactly what their filter matched "
                         "(`clients_exact_share`, median of the runs): "
                         + ", ".join(f"{value:.1%} at {n:,}"
                                     for value, n in zip(exact_share, sizes, strict=True))
                         + ".")
        lines += [text, ""]
        gapped = [r for r in filters.get("runs", []) if r.get("listener_gaps")]
        if gapped:
            where = ", ".join(f"{n:,} clients" for n in sorted({r["clients"] for r in gapped}))
            lines += [f"In {len(gapped)} of {len(filters['runs'])} runs the relay's LISTEN "
                      f"connection was replaced during the run ({where}); "
                      "notifications committed meanwhile are lost for every client alike (see "
                      "[Reliability](#reliability)), so those runs are left out of "
                      "the medians and of the correctness row; their errors are in "
                      "`filters.json`.", ""]
    return lines


def _resume_result(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, "resume.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _relay_resumes(relays: list[dict[str, float]]) -> str:
    """What the relays' /metrics counted: resumes by outcome, deliveries replayed."""
    outcomes: dict[str, float] = {}
    replayed = 0.0
    for metrics in relays:
        for name, value in metrics.items():
            if name.startswith("pgws_resumes_total{outcome="):
                outcome = name.split('"')[1]
                outcomes[outcome] = outcomes.get(outcome, 0) + value
            elif name == "pgws_replayed_total":
                replayed += value
    if not outcomes:
        return ""
    return ("; the relays counted resumes " + ", ".join(
        f"{outcome} {value:.0f}" for outcome, value in outcomes.items())
        + f" and {replayed:,.0f} deliveries replayed")


def resume_goals(directory: str) -> list[str]:
    """The resume goals (bench/scenarios/resume.py's results/resume.json): each figure beside its
    target, the command that measured them, and the figures behind them."""
    resume = _resume_result(directory)
    if not resume:
        return []
    parts = resume["parts"]
    head = (f"`{resume['command']}` (run {resume['started']}, commit "
            f"{str(resume.get('commit', '?'))[:7]}"
            + (", with uncommitted changes" if resume.get("uncommitted") else "")
            + (f"; the checkout was at {resume['at_end']['commit'][:7]} when it ended"
               if resume.get("at_end", {}).get("commit", resume.get("commit"))
               != resume.get("commit") else "") + ")"
            + ("" if resume.get("complete", True) else " — incomplete"))
    rows = ["| goal | measured | target | status |", "|---|---|---|---|"]
    rows += [f"| {row['goal']}: {row['label']} | {row['measured']} | {row['target']} | "
             f"{row['status']} |" for row in resume_goal_rows(parts)]
    notes = []
    for name, label in (("reset", "One relay"), ("alternate", "Two relays")):
        part = parts.get(name)
        if not part or "lost" not in part:
            continue
        replayed, outage, age = part["replayed"], part["outage_s"], part["age_ms"]
        reasons = ", ".join(f"{why} × {n}" for why, n in part["reconnect_reasons"].items())
        notes.append(
            f"- {label} ({name}): {part['resets']} resets, {part['reconnects']} reconnects "
            f"({reasons}), {part['resumes']} resumes replaying {replayed['median']:g} messages "
            f"(median, max {replayed['max']}); outage (reset → next connection) median "
            f"{outage['median']} s, max {outage['max']} s; age of a message on arrival "
            f"(commit → receipt) p50 {age['p50']} ms, p99 {age['p99']} ms, max "
            f"{age['max']:.0f} ms; connections per relay {part['per_relay_connections']}"
            + _relay_resumes(part.get("relays", [])) + ".")
    replay = parts.get("replay")
    if replay:
        summary = replay["summary"]
        notes.append(
            f"- Replay: {summary['messages']:,} missed messages (`PGWS_HISTORY_MESSAGES="
            f"{summary['history_messages']}`), produced in "
            f"{summary.get('median_production_s', 0):.3f} s (median, first to last commit); "
            "first replayed message "
            f"{summary.get('median_first_s', 0):.4f} s after the connect began, last "
            f"{summary.get('median_last_replayed_s', 0):.3f} s, first live "
            f"{summary.get('median_live_s', 0):.3f} s (medians of "
            f"{summary['runs'] - summary['failed']} runs; "
            f"{len(replay.get('discarded', []))} disturbed runs made again, "
            f"{summary.get('still_disturbed', 0)} kept disturbed after the last retry).")
    burst = parts.get("burst")
    if burst:
        variants = burst["summary"]["variants"]
        cells = []
        for variant, text in (("off", "history off"), ("on", "history on"),
                              ("positioned", "history on, positioned clients")):
            entry = variants.get(variant, {})
            if "median_deliveries_per_s" in entry:
                low, high = entry["range_deliveries_per_s"]
                cells.append(f"{text} {_short(entry['median_deliveries_per_s'])} deliveries/s "
                             f"({_short(low)}–{_short(high)}), relay CPU "
                             f"{entry['median_relay_cpu_ms_per_1000']:.3f} ms / 1,000 deliveries, "
                             f"{entry['median_bytes_per_frame']:.0f} B per frame")
        notes.append(f"- Burst, {burst['clients']:,} clients, {burst['messages']:,} "
                     f"notifications of {burst['payload_bytes']} B in transactions of "
                     f"{burst['batch']}, medians of {variants['off'].get('runs', 0)} interleaved "
                     f"rounds ({len(burst.get('discarded', []))} disturbed runs made again, "
                     f"{burst.get('still_disturbed', 0)} kept disturbed after the last retry): "
                     + "; ".join(cells) + ".")
    memory = parts.get("memory")
    if memory and "history_alone" in memory:
        alone = memory["history_alone"]
        beyond = (alone["traced_bytes"] - alone["frame_bytes"]
                  - alone.get("dropped_but_held_frame_bytes", 0)) / max(alone["entries"], 1)
        notes.append(
            f"- Memory: {memory['sent']:,} Econia fills (mean {memory['payload_mean_bytes']} B) "
            f"over {memory['channels']:,} channels in {memory['fill_seconds']} s; relay RSS "
            f"{memory['rss_before_kib'] / 1024:.1f} → {memory['rss_after_kib'] / 1024:.1f} MiB "
            f"(peak {memory['rss_peak_kib'] / 1024:.1f}); the same texts into `History` alone: "
            f"{alone['entries']:,} entries kept in {alone['channels_kept']:,} channels, "
            f"accounted {alone['accounted_bytes'] / 1048576:.1f} MiB of "
            f"{alone['max_bytes'] / 1048576:.0f} MiB, traced "
            f"{alone['traced_bytes'] / 1048576:.1f} MiB: the frames kept plus {beyond:.0f} B "
            f"per entry kept (the accounting charges {ENTRY_OVERHEAD}).")
        samples = memory.get("samples", [])
        growth, bound = memory.get("rss_growth_bytes", 0), memory.get("bound_bytes", 0)
        if growth > bound >= alone["traced_bytes"] and len(samples) >= 3:
            tail = ", ".join(f"{(s['rss_kib'] - memory['rss_before_kib']) / 1024:.1f}"
                             for s in samples[-3:])
            points = ", ".join(f"{s['sent']:,}" for s in samples[-3:])
            notes.append(
                f"- The relay's RSS grows {growth / bound:.2f}× the bound while the structure "
                f"itself holds {alone['traced_bytes'] / 1048576:.1f} MiB (tracemalloc)"
                + (f"; when the history first reached the bound (the sample at "
                   f"{memory['at_first_bound']['sent']:,} fills) RSS had grown "
                   f"{memory['at_first_bound']['rss_growth_bytes'] / 1048576:.1f} MiB"
                   if memory.get("at_first_bound") else "")
                + ". The excess comes with the churn (entries dropped, new ones made): free "
                "space the allocator keeps between blocks, and its header on each ~700-byte "
                f"frame, which the accounting (frame + {ENTRY_OVERHEAD} B per entry) does not "
                "see. It levels "
                f"off: RSS growth at {points} fills: {tail} MiB.")
        held = alone.get("dropped_but_held_entries", 0) \
            if alone.get("dropped_but_held_frame_bytes") else 0
        if held:
            notes.append(
                f"- Why memory exceeds the bound: a channel's log drops its oldest entry by "
                "advancing an index, and deletes the dropped prefix of its list only once "
                "1,024 entries were dropped there (`relay/history.py`, `_Log.drop_head`, "
                "`_COMPACT_AT`). Until then the dropped entries, frames included, stay "
                f"referenced: here {held:,} of them "
                f"({alone['dropped_but_held_frame_bytes'] / 1048576:.1f} MiB of frames) beside "
                f"the {alone['entries']:,} the history counts. The excess is bounded only by "
                "channels × 1,023 entries, not by `PGWS_HISTORY_BYTES`.")
    notes += [f"- {note}" for note in resume.get("notes", [])]
    return ["## Goals: resumable streams", "", head + ". Scripted in "
            "`bench/scenarios/resume.py` (its docstring says how each part works); `--parts` runs "
            "any of reset, alternate, replay, burst, memory alone.", "", *rows, "", *notes, ""]


def scale_sections(directory: str) -> list[str]:
    """The scale sections (a fleet, PostgreSQL's limits, C100k), each rendered by its own script
    from its results file."""
    lines: list[str] = []
    for name, render_section in (("fleet", fleet_section), ("pglimits", pglimits_section)):
        path = os.path.join(directory, f"{name}.json")
        if os.path.exists(path):
            with open(path) as handle:
                lines += render_section(json.load(handle), Path(directory))
    if os.path.exists(os.path.join(directory, "c100k.json")):
        lines += c100k_section(Path(directory))
    return lines


def compression_section(compression: dict[str, Any]) -> list[str]:
    """Per case and variant: medians (min–max) of the rounds and deflate / plain."""
    variants = [v for v in VARIANTS if any(v in case["case"]["variants"]
                                           for case in compression["cases"])]
    link = compression.get("link") or {}
    lines = ["## compression", "", _provenance(compression, "rounds, variants interleaved")
             + ". Clients that offer permessage-deflate against clients that offer nothing "
             "(and, in part A, a relay with `PGWS_COMPRESSION=off`), the same Econia texts to "
             "each; part C on a veth link shaped by "
             f"`{link.get('qdisc', 'tbf rate 200mbit')}` (needs root).", ""]
    lines += [f"- {note}" for note in compression.get("notes", [])]
    lines.append("")
    for key, label in COMPRESSION_METRICS:
        if not any(_values(case["runs"], key) for case in compression["cases"]):
            continue
        header = ["case", *(VARIANTS[v] for v in variants),
                  "deflate / plain (per-round min–max)"]
        lines += [f"**{label}**", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for case in compression["cases"]:
            params = case["case"]
            name = (f"{params['goal'] + ': ' if params.get('goal') else ''}{params['label']}"
                    + ("" if "N=" in params["label"] else f", {params['clients']:,} clients"))
            cells = [_cell([r for r in case["runs"] if r["variant"] == v and "error" not in r],
                           key) if v in params["variants"] else "–" for v in variants]
            ratios = case["summary"]["ratios"].get("deflate/plain", {})
            ratio, per_round = ratios.get(key), ratios.get(f"per_round_{key}")
            text = "–" if ratio is None else f"{ratio:.3g}×"
            if ratio is not None and per_round and per_round["min"] != per_round["max"]:
                text += f" ({per_round['min']:.3g}–{per_round['max']:.3g})"
            lines.append("| " + " | ".join([name, *cells, text]) + " |")
        lines.append("")
    return lines


def filters_section(filters: dict[str, Any]) -> list[str]:
    """Relay CPU per notification and per delivery at each client count, and their ratio."""
    sizes = _sizes(filters)
    if not sizes:
        return []
    summary = filters["summary"]
    groups = filters.get("groups", 100)
    messages = filters.get("messages", {})
    lines = ["## filters", "", _provenance(filters, "rounds, client counts interleaved")
             + f". One channel, {groups} filter groups (`payload.market_id=eq.<g>`); per run "
             f"{messages.get('matched', 0):,} notifications that each match one group, then "
             f"{max(0, messages.get('nomatch', 1) - 1):,} that match none (and one marker "
             "matching group 1 to end the phase); relay CPU from /proc (10 ms "
             "ticks) from the producer's first statement to the last client's last message.",
             ""]
    if not filters.get("probe", {}).get("filters_applied", True):
        lines += ["**The relay ignored filters in this run: these figures measure no "
                  "filters.**", ""]
    header = ["clients", "runs used", "µs CPU per matched notification",
              "µs CPU per delivery (matched)", "µs CPU per notification, no match",
              "writes per matched notification", "implied µs per write",
              "writes' share of matched CPU", "clients exact"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n in sizes:
        entry = summary["by_clients"][str(n)]
        samples = [{f"{phase}_{key}": run["phases"][phase][key]
                    for phase in ("matched", "nomatch")
                    for key in ("relay_cpu_us_per_notification", "relay_cpu_us_per_delivery")
                    if run["phases"][phase][key] is not None}
                   for run in _filters_runs(filters, n)]
        per_write, share = entry.get("implied_us_per_write"), \
            entry.get("writes_share_of_matched_cpu")
        exact = entry.get("clients_exact_share")
        if not samples:
            lines.append(f"| {n:,} | 0 of {entry.get('runs', 0)} |"
                         + " – |" * (len(header) - 2))
            continue
        lines.append("| " + " | ".join([
            f"{n:,}", f"{entry.get('runs', 0) - entry.get('failed', 0)} of {entry.get('runs', 0)}",
            _cell(samples, "matched_relay_cpu_us_per_notification"),
            _cell(samples, "matched_relay_cpu_us_per_delivery"),
            _cell(samples, "nomatch_relay_cpu_us_per_notification"),
            f"{n // groups:,}", "–" if per_write is None else f"{per_write:.1f}",
            "–" if share is None else f"{share:.0%}",
            "–" if exact is None else f"{exact:.0%}"]) + " |")
    lines.append("")
    for phase, text in (("matched", "matched"), ("nomatch", "no match")):
        ratio = summary.get("ratios", {}).get(phase)
        if ratio:
            per_round = ratio["per_round"]
            spread = (f"; per round {per_round['median']:.2f}× "
                      f"({per_round['min']:.2f}–{per_round['max']:.2f})"
                      if per_round.get("median") is not None else "")
            lines.append(f"- CPU per notification, {text}: {sizes[-1]:,} / {sizes[0]:,} clients "
                         f"= {ratio['ratio']:.2f}× (ratio of medians{spread})")
    failed = [r for r in filters.get("runs", []) if "error" in r]
    for run in failed:
        lines.append(f"- left out: round {run.get('round')}, {run['clients']:,} clients: "
                     f"{run['error'].split(':')[0]}")
    return [*lines, ""] if lines[-1] else lines


def load(directory: str = RESULTS) -> dict[str, dict[str, Any]]:
    results = {}
    for scenario in METRICS:
        path = os.path.join(directory, f"{scenario}.json")
        if os.path.exists(path):
            with open(path) as handle:
                results[scenario] = json.load(handle)
    for case in results.get("slow", {}).get("cases", []):
        for samples in case["servers"].values():
            for sample in samples:  # results written before the per-client measure existed
                healthy = case["params"]["clients"] - sample["stalled"]
                sample.setdefault("per_healthy_client_per_s",
                                  sample["healthy_deliveries_per_s"] / healthy)
    return results


def render(results: dict[str, dict[str, Any]], preface: str = "") -> str:
    machine = next(iter(results.values()))["machine"] if results else {}
    lines = ["# Benchmarks", "",
             "Generated by `python -m bench.report` from `bench/results/*.json`. Every figure is",
             "the median of the runs with the spread (min–max) beside it; ratios compare",
             "medians measured in the same invocation (higher is better for pgws-relay).",
             f"Machine: {machine.get('cpus')} cores, {machine.get('platform')}, "
             f"Python {machine.get('python')}; relay, peers, producer and load clients all on",
             "it, over loopback. Set up once with `bash bench/setup.sh`.", ""]
    if preface:
        lines += [preface, ""]
    found = _filters_and_compression(RESULTS)
    lines += ["## Goals: throughput, latency and memory against the peers", "", *goals(results),
              "", *floor_section(RESULTS), *filters_and_compression_goals(found),
              *resume_goals(RESULTS), *scale_sections(RESULTS), *reliability_section(RESULTS)]
    charts = [_chart_burst(results["burst"]) if "burst" in results else None,
              _chart_latency(results["steady"]) if "steady" in results else None,
              _chart_rss(results.get("burst"), results.get("idle"))]
    for chart in charts:
        if chart:
            lines += [f"![{os.path.basename(chart)}]({chart})", ""]
    for scenario, result in results.items():
        lines += [f"## {scenario}", "", f"`{COMMANDS[scenario]}` (run {result['started']}, "
                  f"commit {result.get('commit', '7c79b3b')}, {result['runs']} runs per server)",
                  ""]
        lines += _table(result)
        if scenario == "workers":
            lines += _scaling(result)
    if "compression" in found:
        lines += compression_section(found["compression"])
    if "filters" in found:
        lines += filters_section(found["filters"])
    return "\n".join(lines) + "\n"


def _scaling(result: dict[str, Any]) -> list[str]:
    """Deliveries/s with W workers over W times the rate with one, per client count."""
    rates: dict[tuple[int, int], float] = {}
    for case in result["cases"]:
        values = _values(case["servers"].get("relay", []), "deliveries_per_s")
        if values:
            rates[(case["params"]["clients"], case["params"]["workers"])] = \
                statistics.median(values)
    lines = []
    for (clients, workers), rate in sorted(rates.items()):
        single = rates.get((clients, 1))
        if workers > 1 and single:
            lines.append(f"- N={clients}: {workers} workers deliver {rate / single:.2f}× one "
                         f"worker's rate, a scaling factor of {rate / single / workers:.2f}.")
    return [*lines, ""] if lines else []


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=RESULTS, help="directory of <scenario>.json")
    parser.add_argument("--out", default=os.path.join(BENCH, "RESULTS.md"))
    args = parser.parse_args()
    RESULTS = args.results
    preface_path = os.path.join(RESULTS, "PREFACE.md")
    preface = ""
    if os.path.exists(preface_path):
        with open(preface_path) as handle:
            preface = handle.read().strip()
    with open(args.out, "w") as handle:
        handle.write(render(load(RESULTS), preface))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

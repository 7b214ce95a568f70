"""What the metrics cost the fan-out: the burst with and without them, and with a scraper.

    python -m bench.scenarios.metrics_cost --before /tmp/pgws-before --rounds 10 \\
        --json bench/results/reliability/metrics-cost.json

Theory of operation
-------------------
This script owns one comparison (the goal: "metrics cost the hot path nothing measurable").
Each round runs the throughput scenario's ``burst --servers relay --runs 1 --cases
'N=1000 B=100'`` (1,000 clients on one channel, 4,000 notifications, 100 per commit) once for
each of three variants:

- ``before``: the build without metrics, from the checkout given as ``--before`` (its own
  throughput script, ``bench/run.py`` in that older layout, and its own ``.venv``, run with that
  checkout as the working directory);
- ``after``: this checkout (or ``--after``), no admin port;
- ``after_scraper``: the same with ``PGWS_ADMIN_PORT`` set to a free port, while a thread here
  GETs ``http://127.0.0.1:PORT/metrics`` every :data:`SCRAPE_INTERVAL` seconds for as long as
  the throughput script runs. Scrapes that fail before the relay is up are expected and counted
  apart; a run with no successful scrape is flagged (``scrape_ok`` false), since it measured nothing
  of the scraper.

The order of the three is rotated by one each round, so that each variant runs first, second
and third equally often and the machine's drift (other load, PostgreSQL's state, temperature)
falls on all of them alike. Before each run it waits (``--settle``, at most 30 s) for a second
in which the rest of the machine keeps less than half a core busy, since a shared machine's
test suites come in bursts; the wait is the same for every variant.

It reports, per variant, deliveries/s and the relay's CPU per 1,000 deliveries of every run,
their medians and min–max, the ratios of the medians to ``before``, and the median of the
per-round ratios (each round's variants ran within a minute of each other). It also records
the load average before each run and, per run, the CPU the whole machine spent beside what
the throughput script and its children spent, to show how shared the machine was; the same
figures over the quiet runs alone (``quiet``: the rest of the machine under
:data:`QUIET_OTHERS_CPU`) are given apart, the same filter for every variant.

Setting up the ``before`` checkout (the build without metrics, 723a29c), outside this one:

    git worktree add /tmp/pgws-before 723a29c
    python3 -m venv /tmp/pgws-before/.venv
    /tmp/pgws-before/.venv/bin/pip install -q -e '/tmp/pgws-before[test]'

(``--servers relay`` needs neither the Node peer nor matplotlib.) Both venvs should hold the
same versions of trio, psycopg and the rest; ``pip list`` in each tells.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from bench.parts.harness import Server, free_port, machine, write_json
from bench.parts.paths import ROOT

VARIANTS = ("before", "after", "after_scraper")
#: The case the issue names: burst at N=1,000 (the "burst-before-after" row measures the same).
CASE = "N=1000 B=100"
RUN_ARGS = ["burst", "--servers", "relay", "--runs", "1", "--cases", CASE]
#: The throughput script, relative to a checkout, and how to run it there: a module where it is
#: now, a file where older checkouts (such as the ``before`` build) have it.
THROUGHPUT = (("bench/scenarios/throughput.py", ["-m", "bench.scenarios.throughput"]),
              ("bench/scenarios/throughput.py", ["bench/scenarios/throughput.py"]))


def throughput_script(directory: str) -> tuple[str, list[str]]:
    """The throughput script of the checkout ``directory`` (its layout depends on its age) and
    the arguments that run it with that checkout as the working directory."""
    for script, command in THROUGHPUT:
        if os.path.exists(os.path.join(directory, script)):
            return script, command
    raise SystemExit(f"no throughput script in {directory} (looked for "
                     f"{', '.join(script for script, _ in THROUGHPUT)})")
#: The issue's scraper polls once a second (Prometheus' usual interval is 15–60 s: harsher).
SCRAPE_INTERVAL = 1.0
#: A scrape answers in milliseconds; longer means the relay is not up (or is gone).
SCRAPE_TIMEOUT = 2.0
#: One throughput run takes ~10 s here; this bounds a hung one.
RUN_TIMEOUT = 300.0
#: The counter a scrape reads to tell whether it landed during the burst (0 < value < total).
FRAMES = re.compile(rb"^pgws_frames_written_total (\S+)$", re.MULTILINE)
#: Before each run, wait up to this many seconds for a second in which the rest of the machine
#: keeps less than :data:`SETTLED_CORES` busy (a shared machine's test suites come in bursts);
#: the wait applies to every variant alike, and each run records how long it waited.
SETTLE = 30.0
SETTLED_CORES = 0.5
#: CPU seconds the rest of the machine may spend during a run for it to count as quiet:
#: PostgreSQL's own work for this burst is 0.6–0.8 s, and a neighbour's test suite on top of
#: it halves a run's rate. The summary gives the quiet runs' medians apart from all runs'.
QUIET_OTHERS_CPU = 1.5
#: Scrapes in a row for the CPU of one (the clock ticks at 10 ms: 200 make it exact enough).
SCRAPE_COST_SCRAPES = 200
#: Admin settings that must not leak into the variants without a scraper.
ADMIN_ENV = ("PGWS_ADMIN_PORT", "PGWS_ADMIN_HOST")


@dataclass
class Scraper:
    """GETs /metrics every :data:`SCRAPE_INTERVAL` s in a thread until :meth:`stop`."""

    port: int
    ok: int = 0
    failed_before_up: int = 0
    failed_after_up: int = 0
    #: Successful scrapes that saw 0 < pgws_frames_written_total < the final count.
    frames_seen: list[float] = field(default_factory=list)
    #: (seconds since start, error) of each failed scrape: refusals before the relay is up
    #: and after the throughput script has stopped it are expected; timeouts while it runs are not.
    errors: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        url = f"http://127.0.0.1:{self.port}/metrics"
        started = time.monotonic()
        while not self._stop.wait(SCRAPE_INTERVAL):
            try:
                with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as answer:
                    body = answer.read()
            except OSError as exc:  # URLError and timeouts are OSErrors.
                if self.ok:
                    self.failed_after_up += 1
                else:
                    self.failed_before_up += 1
                self.errors.append((round(time.monotonic() - started, 1),
                                    f"{type(exc).__name__}: {exc}"[:120]))
                continue
            self.ok += 1
            match = FRAMES.search(body)
            if match:
                self.frames_seen.append(float(match.group(1)))

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(SCRAPE_INTERVAL + SCRAPE_TIMEOUT + 1)
        top = max(self.frames_seen, default=0.0)
        return {"scrapes_ok": self.ok, "scrapes_failed_before_up": self.failed_before_up,
                "scrapes_failed_after_up": self.failed_after_up,
                "scrapes_mid_burst": sum(1 for seen in self.frames_seen if 0 < seen < top),
                "frames_written_last_scrape": self.frames_seen[-1] if self.frames_seen else None,
                "scrape_ok": self.ok > 0, "scrape_errors": self.errors}


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent outside idle and iowait since boot."""
    with open("/proc/stat") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def settle(limit: float) -> tuple[float, bool]:
    """Wait up to ``limit`` s for a quiet second; (seconds waited, whether it came)."""
    started = time.monotonic()
    while True:
        busy = _busy_seconds()
        time.sleep(1.0)
        if _busy_seconds() - busy < SETTLED_CORES:
            return round(time.monotonic() - started, 1), True
        if time.monotonic() - started >= limit:
            return round(time.monotonic() - started, 1), False


def _children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _git(directory: str, *args: str) -> str:
    """A read-only git query (no optional locks: others work in these checkouts)."""
    try:
        return subprocess.run(["git", "--no-optional-locks", "-C", directory, *args],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return ""


def checkout_info(directory: str) -> dict[str, Any]:
    """The commit of a checkout and which of the files that make the relay differ from it."""
    dirty = _git(directory, "status", "--porcelain", "--", "relay", throughput_script(directory)[0],
                 "bench/parts/harness.py", "bench/parts/harness.py", "pyproject.toml")
    return {"dir": directory, "commit": _git(directory, "rev-parse", "--short", "HEAD"),
            "uncommitted": dirty.splitlines()}


def run_once(variant: str, directory: str, python: str, settle_limit: float
             ) -> dict[str, Any]:
    """One throughput burst of this variant; its figures, or its error."""
    waited, settled = settle(settle_limit) if settle_limit > 0 else (0.0, False)
    env = {key: value for key, value in os.environ.items() if key not in ADMIN_ENV}
    scraper = None
    if variant == "after_scraper":
        scraper = Scraper(free_port())
        env["PGWS_ADMIN_PORT"] = str(scraper.port)
        env["PGWS_ADMIN_HOST"] = "127.0.0.1"
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    result: dict[str, Any] = {"variant": variant, "load_1m": round(os.getloadavg()[0], 2),
                              "settle_wait_s": waited, "settled": settled}
    busy, ours = _busy_seconds(), _children_seconds()
    started = time.monotonic()
    try:
        if scraper:
            scraper.start()
        proc = subprocess.run([python, *throughput_script(directory)[1], *RUN_ARGS, "--json", out],
                              cwd=directory, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT)
        if proc.returncode != 0:
            result["error"] = f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"
        else:
            with open(out) as handle:
                sample = json.load(handle)["cases"][0]["servers"]["relay"][0]
            if "error" in sample:
                result["error"] = sample["error"]
            else:
                result.update({key: round(sample[key], 4) for key in
                               ("deliveries_per_s", "cpu_ms_per_1000", "delivered_share",
                                "seconds")})
                result["deliveries_per_s"] = round(sample["deliveries_per_s"])
                if sample["delivered_share"] < 1:  # E.g. PostgreSQL restarted by someone.
                    result["error"] = (f"delivered {sample['delivered_share']:.1%} of the "
                                       "burst: not a measurement of the fan-out")
    except subprocess.TimeoutExpired:
        result["error"] = f"the throughput script did not finish within {RUN_TIMEOUT:g} s"
    finally:
        if scraper:
            result.update(scraper.stop())
        os.unlink(out)
    wall = time.monotonic() - started
    busy, ours = _busy_seconds() - busy, _children_seconds() - ours
    # PostgreSQL's share of "others" is part of every run alike; the rest is other people.
    result.update({"wall_s": round(wall, 1), "machine_busy_cpu_s": round(busy, 2),
                   "run_py_cpu_s": round(ours, 2), "others_cpu_s": round(busy - ours, 2)})
    return result


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: every run's figures, medians and spread; the ratios to ``before``."""
    summary: dict[str, Any] = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant and "error" not in r]
        rate = [r["deliveries_per_s"] for r in mine]
        cpu = [r["cpu_ms_per_1000"] for r in mine]
        summary[variant] = {"deliveries_per_s": rate, "cpu_ms_per_1000": cpu,
                            "median_deliveries_per_s": round(statistics.median(rate)) if rate
                            else None,
                            "min_deliveries_per_s": min(rate, default=None),
                            "max_deliveries_per_s": max(rate, default=None),
                            "median_cpu_ms_per_1000": round(statistics.median(cpu), 4) if cpu
                            else None,
                            "min_cpu_ms_per_1000": min(cpu, default=None),
                            "max_cpu_ms_per_1000": max(cpu, default=None),
                            "failed": sum(1 for r in runs if r["variant"] == variant
                                          and "error" in r)}
    ratios: dict[str, Any] = {}
    base = summary["before"]
    for variant in ("after", "after_scraper"):
        mine = summary[variant]
        if not (base["median_deliveries_per_s"] and mine["median_deliveries_per_s"]):
            continue
        paired_rate, paired_cpu = [], []
        for number in sorted({r["round"] for r in runs}):
            pair = {r["variant"]: r for r in runs if r["round"] == number and "error" not in r}
            if "before" in pair and variant in pair and pair["before"]["deliveries_per_s"]:
                paired_rate.append(pair[variant]["deliveries_per_s"]
                                   / pair["before"]["deliveries_per_s"])
                paired_cpu.append(pair[variant]["cpu_ms_per_1000"]
                                  / pair["before"]["cpu_ms_per_1000"])
        rounded = {k: round(v, 3) for k, v in (_stats(paired_rate) or {}).items()}
        ratios[f"{variant}_to_before"] = {
            "deliveries_per_s": round(mine["median_deliveries_per_s"]
                                      / base["median_deliveries_per_s"], 3),
            "cpu_ms_per_1000": round(mine["median_cpu_ms_per_1000"]
                                     / base["median_cpu_ms_per_1000"], 3),
            "per_round_deliveries_per_s": rounded,
            "per_round_cpu_ms_per_1000": {k: round(v, 3)
                                          for k, v in (_stats(paired_cpu) or {}).items()}}
    return {"runs": summary, "ratios": ratios}


def quiet(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs during which the rest of the machine stayed below :data:`QUIET_OTHERS_CPU`."""
    return [r for r in runs if r["others_cpu_s"] < QUIET_OTHERS_CPU]


def scrape_cost(scrapes: int = SCRAPE_COST_SCRAPES) -> dict[str, Any]:
    """The relay's CPU for one /metrics scrape: this checkout's relay, idle, scraped
    ``scrapes`` times in a row (less its idle CPU over the same time)."""
    admin = free_port()
    server = Server("relay", free_port(), {"PGWS_ADMIN_PORT": str(admin),
                                           "PGWS_ADMIN_HOST": "127.0.0.1"})
    url = f"http://127.0.0.1:{admin}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as answer:
            size = len(answer.read())  # The first scrape, uncounted: imports, first render.
        cpu, started = server.cpu_seconds(), time.monotonic()
        time.sleep(2.0)
        idle = (server.cpu_seconds() - cpu) / (time.monotonic() - started)
        cpu, started = server.cpu_seconds(), time.monotonic()
        for _ in range(scrapes):
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as answer:
                answer.read()
        wall = time.monotonic() - started
        spent = server.cpu_seconds() - cpu - idle * wall
    finally:
        server.stop()
    return {"scrapes": scrapes, "relay_cpu_ms_per_scrape": round(1000 * spent / scrapes, 2),
            "wall_ms_per_scrape": round(1000 * wall / scrapes, 2), "bytes": size,
            "share_of_a_core_at_1_per_s": round(spent / scrapes / SCRAPE_INTERVAL, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True,
                        help="checkout of the build without metrics, with its own .venv")
    parser.add_argument("--after", default=ROOT,
                        help="checkout with metrics (default: this one, run with this Python)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--settle", type=float, default=SETTLE,
                        help="seconds to wait at most for a quiet machine before each run "
                             "(0: do not wait)")
    parser.add_argument("--json", help="write the runs and the summary here")
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the JSON's notes (repeatable)")
    args = parser.parse_args()
    before = os.path.abspath(args.before)
    after = os.path.abspath(args.after)
    before_python = os.path.join(before, ".venv", "bin", "python")
    if not os.path.exists(before_python):
        raise SystemExit(f"{before_python} not found: set up the checkout (see --help's module "
                         "docstring)")
    after_python = (sys.executable if after == ROOT
                    else os.path.join(after, ".venv", "bin", "python"))
    where = {"before": (before, before_python), "after": (after, after_python),
             "after_scraper": (after, after_python)}
    load_start = [round(x, 2) for x in os.getloadavg()]
    started = time.strftime("%F %T")
    print(f"load average at start: {load_start}", flush=True)
    cost = scrape_cost()
    print(f"one /metrics scrape of an idle relay: {cost['relay_cpu_ms_per_scrape']} ms of its "
          f"CPU, {cost['bytes']:,} bytes", flush=True)
    head = {
        "what": f"burst {CASE} (1,000 clients, 4,000 notifications, 100 per commit), pgws-relay "
                "without metrics (before), with them and no admin port (after), and with the "
                f"admin port scraped every {SCRAPE_INTERVAL:g} s (after_scraper); one run each "
                f"per round, order rotated each round, {args.rounds} rounds",
        "command": "python -m bench.scenarios.metrics_cost --before " + args.before
                   + ("" if after == ROOT else f" --after {args.after}")
                   + f" --rounds {args.rounds}"
                   + ("" if args.settle == SETTLE else f" --settle {args.settle:g}")
                   + (f" --json {args.json}" if args.json else ""),
        "each_run": " ".join(["python", *throughput_script(after)[1], *RUN_ARGS[:-1],
                              f"'{CASE}'"]),
        "before": checkout_info(before), "after": checkout_info(after),
        "machine": machine(), "started": started, "load_average_start": load_start,
        "scrape_cost": cost,
        "notes": [
            "others_cpu_s: CPU the whole machine spent during a run beyond the throughput script "
            "and its children; PostgreSQL's work for the burst is in it for every variant alike, "
            "anything well above the usual is someone else's load.",
            "scrape_cost: this checkout's relay, idle, scraped "
            f"{cost['scrapes']} times in a row; its CPU per scrape less its idle CPU.",
            *args.note],
    }
    runs: list[dict[str, Any]] = []
    for number in range(args.rounds):
        order = VARIANTS[number % 3:] + VARIANTS[:number % 3]
        for variant in order:
            directory, python = where[variant]
            result = {"round": number + 1, **run_once(variant, directory, python, args.settle)}
            runs.append(result)
            _print_run(result)
        if args.json:  # After every round, so that a crash or ^C keeps what was measured.
            _write(args.json, _document(head, runs, args.settle, number + 1 == args.rounds))
    document = _document(head, runs, args.settle, True)
    for title, part in (("all runs", document),
                        (f"quiet runs (others' CPU < {QUIET_OTHERS_CPU:g} s)",
                         document["quiet"])):
        print(f"-- {title}")
        for variant in VARIANTS:
            s = part["runs"][variant]
            if s["median_deliveries_per_s"]:
                print(f"{variant:13} median {s['median_deliveries_per_s']:,} deliveries/s "
                      f"({s['min_deliveries_per_s']:,}–{s['max_deliveries_per_s']:,}, "
                      f"{len(s['deliveries_per_s'])} runs), CPU {s['median_cpu_ms_per_1000']}"
                      f" ms / 1,000 ({s['min_cpu_ms_per_1000']}–{s['max_cpu_ms_per_1000']}), "
                      f"{s['failed']} failed")
        for name, ratio in part["ratios"].items():
            print(f"{name}: deliveries/s {ratio['deliveries_per_s']}× (per round "
                  f"{ratio['per_round_deliveries_per_s']}), CPU {ratio['cpu_ms_per_1000']}×")
    print(f"load average at end: {document['load_average_end']}")
    if args.json:
        print(f"wrote {args.json}")


def _print_run(result: dict[str, Any]) -> None:
    figures = (result.get("error") or f"{result['deliveries_per_s']:,} deliveries/s, "
               f"{result['cpu_ms_per_1000']} ms CPU / 1,000")
    scrapes = (f", scrapes ok {result['scrapes_ok']} (mid-burst {result['scrapes_mid_burst']}),"
               f" failed {result['scrapes_failed_before_up']} before up + "
               f"{result['scrapes_failed_after_up']} after" if "scrapes_ok" in result else "")
    flag = "  ** NO SCRAPE SUCCEEDED **" if result.get("scrape_ok") is False else ""
    print(f"round {result['round']:2} {result['variant']:13} {figures}{scrapes}; load "
          f"{result['load_1m']}, others' CPU {result['others_cpu_s']} s, waited "
          f"{result['settle_wait_s']} s{'' if result['settled'] else ' (busy)'}{flag}",
          flush=True)


def _document(head: dict[str, Any], runs: list[dict[str, Any]], settle_limit: float,
              complete: bool) -> dict[str, Any]:
    """What --json holds: the set-up, the summaries (all runs, quiet runs) and every run."""
    return {
        **head, "complete": complete, "rounds_done": max((r["round"] for r in runs), default=0),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "settle": {"limit_s": settle_limit, "quiet_below_cores": SETTLED_CORES,
                   "runs_started_quiet": sum(1 for r in runs if r["settled"])},
        "runs_without_a_scrape": sum(1 for r in runs if r.get("scrape_ok") is False),
        **summarize(runs),
        "quiet": {"others_cpu_below_s": QUIET_OTHERS_CPU, **summarize(quiet(runs))},
        "all_runs": runs,
    }


def _write(path: str, document: dict[str, Any]) -> None:
    write_json(path, document)


if __name__ == "__main__":
    main()

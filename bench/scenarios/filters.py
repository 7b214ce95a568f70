"""Server-side filters: the relay's CPU per notification at 1,000 and 10,000 clients in the same
100 filter groups, and whether every client gets exactly what its filter matches.

    python -m bench.scenarios.filters --runs 3 --json bench/results/filters.json
    python -m bench.scenarios.filters --quick            # smoke version (200 and 2,000 clients)

Theory of operation
-------------------
One channel, ``fill_event``; ``--groups`` (100) filter groups: client i opens
``/fill_event/TOKEN?filter=payload.market_id=eq.<g>`` with g = i mod 100 + 1, so every group
has N/100 clients and the relay evaluates 100 distinct filter sets (all ``eq`` on one path:
one indexed path). Each run starts a fresh relay, connects the N clients and sends, in
transactions of 100 (``bench.parts.harness.Producer.send``), Econia ``fill_event`` texts as the
trigger writes them (:class:`bench.parts.harness.EconiaFeed`):

1. ``matched``: ``--messages`` notifications whose ``market_id`` is drawn at random from the
   groups' values, so each matches exactly one group. The plan gives each group its count;
   every client must receive exactly that many, each with its own ``market_id`` (the client
   checks every frame: ``foreign`` counts the others), nothing missing, nothing extra.
2. ``nomatch``: ``--nomatch-messages`` notifications whose ``market_id`` (1000 and up) matches
   no group, then one that matches group 1 (its arrival at group 1's clients tells that the
   relay has worked through the rest, since PostgreSQL delivers in order; it costs N/100
   writes, under 0.2 % of the phase's CPU). No other frame may arrive.

The relay's CPU (utime + stime from /proc, 10 ms ticks) is read when the producer begins and
when the last client got its last message of the phase; per notification = CPU / notifications
sent in the phase, per delivery = CPU / messages delivered. The goal: with matched
notifications, CPU per notification at 10,000 clients ≤ 1.2× that at 1,000. A matched
notification is 100 writes at 10,000 clients and 10 at 1,000, so the ``matched`` ratio is
dominated by the writes; ``nomatch`` isolates the routing and filter evaluation (no writes at
all), and the script reports both, plus the CPU per write implied by the difference.

The relay and the clients need file descriptors: the script raises its soft ``RLIMIT_NOFILE``
to the hard limit (20,000 here), which the relay and the client processes inherit; 10,000
connections are spread over ``--procs`` (4) client processes.

Before the runs, a probe tells whether the relay applies filters at all (a client whose filter
matches nothing must receive nothing). A relay that ignores them sends every client every
notification: the script then says so, scales the messages down so that a run stays short, and
checks that every client got everything (the figures are then no measurement of filters).
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import statistics
import sys
import time
from collections import Counter
from typing import Any

from bench.parts.harness import (
    Conn,
    EconiaFeed,
    FrameClients,
    OwnedServer,
    Producer,
    busy_seconds,
    check_econia_texts,
    econia_text,
    free_port,
    git_head,
    machine,
    own_seconds,
    raise_nofile,
    relay_source,
    settle,
    token,
    wait_for_db,
    write_json,
)

CHANNEL = "fill_event"
GOAL = 1.2
#: Deliveries per phase at most when the relay ignores filters (every client gets everything).
UNFILTERED_DELIVERIES = 2_000_000


def filter_path(group: int) -> str:
    return f"/{CHANNEL}/{token({'mode': 'r'})}?filter=payload.market_id=eq.{group}"


def probe(relay_env: dict[str, str], timeout: float = 30.0) -> dict[str, Any]:
    """Does the relay apply a ``filter``? One client filtered on a market nobody sends, one
    unfiltered; one notification; what each got."""
    server = OwnedServer("relay", free_port(), relay_env)
    try:
        conns = [Conn(filter_path(999_999), expected=None, market=999_999),
                 Conn(f"/{CHANNEL}/{token({'mode': 'r'})}", expected=1)]
        with FrameClients("127.0.0.1", server.port, conns, procs=1) as pool:
            producer = Producer()
            try:
                pool.start()
                producer.send([econia_text(CHANNEL, EconiaFeed(seed=7).row(CHANNEL, 1))], 1)
                done = pool.wait_done(timeout)
                time.sleep(0.5)  # Time for a frame the filtered client should not get.
                outcome = pool.results()
            finally:
                producer.close()
    finally:
        server.stop()
    filtered, plain = outcome["connections"]
    if done is None or plain["frames"] != 1:
        raise RuntimeError(f"probe: the unfiltered client got {plain['frames']} frames, not 1")
    return {"filters_applied": filtered["frames"] == 0, "filtered_client_frames":
            filtered["frames"]}


def plan(groups: int, matched: int, nomatch: int, seed: int | None
         ) -> tuple[list[int], list[int]]:
    """The market_id of every notification of the two phases (the last of ``nomatch`` is the
    end marker for group 1)."""
    rng = random.Random(seed)
    first = [rng.randint(1, groups) for _ in range(matched)]
    second = [1000 + rng.randrange(1000) for _ in range(nomatch)] + [1]
    return first, second


def run_once(clients: int, groups: int, markets: tuple[list[int], list[int]],
             filtered: bool, procs: int, seed: int | None, timeout: float,
             settle_limit: float, relay_env: dict[str, str]) -> dict[str, Any]:
    if not wait_for_db(60):
        return {"clients": clients, "error": "PostgreSQL did not answer within 60 s"}
    first, second = markets
    count1, count2 = Counter(first), Counter(second)
    feed = EconiaFeed(seed=seed)
    texts1 = [econia_text(CHANNEL, feed.row(CHANNEL, market)) for market in first]
    texts2 = [econia_text(CHANNEL, feed.row(CHANNEL, market)) for market in second]
    conns = []
    for i in range(clients):
        group = i % groups + 1
        if filtered:
            targets = [count1[group], count1[group] + count2[group]]
        else:
            targets = [len(first), len(first) + len(second)]
        conns.append(Conn(filter_path(group), expected=targets, market=group))
    waited, quiet = settle(settle_limit)
    busy, ours = busy_seconds(), own_seconds()
    result: dict[str, Any] = {"clients": clients, "groups": groups, "settle_wait_s": waited,
                              "settled": quiet, "load_1m": round(os.getloadavg()[0], 2)}
    server = OwnedServer("relay", free_port(), relay_env)
    try:
        started = time.monotonic()
        # The clients' own bound covers both phases; each phase's wait below is bounded too.
        with FrameClients("127.0.0.1", server.port, conns, procs=procs,
                          timeout=2 * timeout + 60) as pool:
            result["connect_seconds"] = round(time.monotonic() - started, 1)
            result["relay_rss_kib"] = server.memory_kib()
            producer = Producer()
            try:
                phases = {}
                pool.start()
                for name, texts in (("matched", texts1), ("nomatch", texts2)):
                    if name == "nomatch":
                        pool.next_phase()
                    cpu = server.cpu_seconds()
                    start = time.time()
                    producer.send(texts, 100)
                    done = pool.wait_done(timeout)
                    cpu = server.cpu_seconds() - cpu
                    phases[name] = {"notifications": len(texts), "relay_cpu_s": cpu,
                                    "seconds": (done or time.time()) - start,
                                    "timed_out": done is None}
                    if done is None:
                        break  # Messages are missing: the next phase cannot tell its end.
                phases.setdefault("nomatch", {"notifications": len(texts2), "relay_cpu_s": 0.0,
                                              "seconds": 0.0, "timed_out": True})
                time.sleep(1.0)  # Frames that should not come would arrive now.
                outcome = pool.results()
            finally:
                producer.close()
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["relay_log_tail"] = server.lines[-10:]
        return result
    finally:
        server.stop()
    per = outcome["connections"]
    final = [c.expected[-1] for c in conns]  # type: ignore[index]
    delivered = sum(c["frames"] for c in per)
    matched_deliveries = sum(c.expected[0] for c in conns)  # type: ignore[index]
    phases["matched"]["deliveries"] = matched_deliveries
    phases["nomatch"]["deliveries"] = delivered - matched_deliveries
    for phase in phases.values():
        phase["relay_cpu_us_per_notification"] = 1e6 * phase["relay_cpu_s"] / \
            phase["notifications"]
        # nomatch delivers nothing but its end marker (when filters apply): no per-delivery
        # figure there.
        phase["relay_cpu_us_per_delivery"] = (1e6 * phase["relay_cpu_s"] / phase["deliveries"]
                                              if phase["deliveries"] and (
                                                  phase is phases["matched"] or not filtered)
                                              else None)
    exact = sum(1 for c, want in zip(per, final, strict=True)
                if c["frames"] == want and (c["foreign"] == 0 or not filtered)
                and c["errors"] == 0)
    busy, ours = busy_seconds() - busy, own_seconds() - ours
    result.update({
        "filters_applied": filtered, "phases": phases, "delivered": delivered,
        "expected": sum(final), "clients_exact": exact,
        "clients_missing": sum(1 for c, want in zip(per, final, strict=True)
                               if c["frames"] < want),
        "clients_extra": sum(1 for c, want in zip(per, final, strict=True)
                             if c["frames"] > want),
        "foreign_frames": sum(c["foreign"] for c in per),
        "errors": sum(c["errors"] for c in per),
        "closed": sum(1 for c in per if c["closed"]),
        "client_cpu_s": outcome["client_cpu_s"], "machine_busy_cpu_s": round(busy, 2),
        "others_cpu_s": round(busy - ours, 2)})
    gaps = server.count(r"without LISTEN \(gap")
    result["listener_gaps"] = gaps
    if gaps:
        result["error"] = (f"the relay's listener reconnected {gaps} time(s) during the run "
                           "(notifications committed meanwhile are lost): "
                           + "; ".join(line for line in server.lines
                                     if "relay.sources.notify" in line
                                       and ("lost" in line or "gap" in line))[:600])
    elif any(p["timed_out"] for p in phases.values()):
        result["error"] = f"clients did not get their messages within {timeout:g} s"
    elif exact != clients:
        result["error"] = (f"{clients - exact} of {clients} clients did not get exactly what "
                           "their filter matches")
    return result


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {"by_clients": {}, "ratios": {}}
    for n in sizes:
        good = [r for r in runs if r["clients"] == n and "error" not in r]
        entry: dict[str, Any] = {"runs": sum(1 for r in runs if r["clients"] == n),
                                 "failed": sum(1 for r in runs if r["clients"] == n
                                               and "error" in r)}
        for phase in ("matched", "nomatch"):
            for key in ("relay_cpu_us_per_notification", "relay_cpu_us_per_delivery",
                        "relay_cpu_s", "seconds"):
                values = [r["phases"][phase][key] for r in good
                          if r["phases"][phase][key] is not None]
                entry[f"{phase}_{key}"] = _median(values)
                if values:
                    entry[f"{phase}_{key}_range"] = [min(values), max(values)]
        entry["clients_exact_share"] = _median([r["clients_exact"] / n for r in good])
        summary["by_clients"][str(n)] = entry
    small, large = (summary["by_clients"][str(n)] for n in (sizes[0], sizes[-1]))
    for phase in ("matched", "nomatch"):
        key = f"{phase}_relay_cpu_us_per_notification"
        if small.get(key) and large.get(key) is not None:
            paired = []
            for number in sorted({r["round"] for r in runs}):
                pair = {r["clients"]: r for r in runs if r["round"] == number
                        and "error" not in r}
                if sizes[0] in pair and sizes[-1] in pair:
                    low = pair[sizes[0]]["phases"][phase]["relay_cpu_us_per_notification"]
                    if low:
                        paired.append(pair[sizes[-1]]["phases"][phase]
                                      ["relay_cpu_us_per_notification"] / low)
            summary["ratios"][phase] = {
                "ratio": large[key] / small[key],
                "per_round": {"median": _median(paired), "min": min(paired, default=None),
                              "max": max(paired, default=None)}}
    # What one write costs, from the two phases: (matched − nomatch) CPU per notification,
    # divided by the writes per matched notification (N / groups).
    for n in sizes if all(r.get("filters_applied") for r in runs) else ():
        entry = summary["by_clients"][str(n)]
        if entry.get("matched_relay_cpu_us_per_notification") is not None and \
                entry.get("nomatch_relay_cpu_us_per_notification") is not None:
            per_write = ((entry["matched_relay_cpu_us_per_notification"]
                          - entry["nomatch_relay_cpu_us_per_notification"])
                         / max(1, n // int(runs[0]["groups"])))
            entry["implied_us_per_write"] = per_write
            entry["writes_share_of_matched_cpu"] = 1 - (
                entry["nomatch_relay_cpu_us_per_notification"]
                / entry["matched_relay_cpu_us_per_notification"])
    return summary


def _fmt(value: float | None, digits: str = ",.1f") -> str:
    return "–" if value is None else format(value, digits)


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None,
                        help="rounds (each runs every client count once); default 3, --quick 1")
    parser.add_argument("--quick", action="store_true", help="200 and 2,000 clients, one round")
    parser.add_argument("--clients", default=None,
                        help="comma-separated client counts, smallest first (default "
                             "1000,10000; --quick 200,2000)")
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--messages", type=int, default=None,
                        help="matched notifications per run (default 5,000; --quick 1,000)")
    parser.add_argument("--nomatch-messages", type=int, default=None,
                        help="notifications matching no group (default 40,000; --quick 5,000)")
    parser.add_argument("--procs", type=int, default=4, help="client processes per run")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--settle", type=float, default=None,
                        help="before each run, wait up to this many seconds for a quiet second "
                             "(under half a core busy); default 20, --quick 0")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--relay-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every relay run (repeatable), e.g. "
                             "PGWS_CHECK_LISTENER_INTERVAL=0")
    parser.add_argument("--note", action="append", default=[], help="a line for the notes")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    if args.settle is None:
        args.settle = 0.0 if args.quick else 20.0
    sizes = sorted(int(x) for x in (args.clients or ("200,2000" if args.quick
                                                     else "1000,10000")).split(","))
    matched = args.messages or (1000 if args.quick else 5000)
    nomatch = args.nomatch_messages or (5000 if args.quick else 40000)
    soft, hard = raise_nofile()
    if sizes[-1] + 100 > soft:
        raise SystemExit(f"{sizes[-1]:,} clients need more open files than the limit "
                         f"({soft:,}) allows the relay")
    print(f"open files: soft limit {soft:,} (hard {hard:,}), inherited by relay and clients")
    print(f"payload generator: {check_econia_texts()} rows rendered byte for byte as "
          "PostgreSQL's json_build_object does", flush=True)
    source = relay_source()
    print(f"relay imported from {source}", flush=True)
    relay_env = dict(item.split("=", 1) for item in args.relay_env)
    found = probe(relay_env)
    filtered = found["filters_applied"]
    if filtered:
        print("probe: the relay applies filters", flush=True)
    else:
        scale = max(1, -(-sizes[-1] * (matched + nomatch) // UNFILTERED_DELIVERIES))
        matched, nomatch = max(10, matched // scale), max(10, nomatch // scale)
        print(f"probe: the relay IGNORES filters (a client filtered on a market nobody sends "
              f"got {found['filtered_client_frames']} frame(s)): every client will get every "
              f"notification; messages scaled down to {matched:,} + {nomatch:,}; these figures "
              "do not measure filters", flush=True)
    head = {
        "what": f"filters: relay CPU per notification, {' vs '.join(map(str, sizes))} clients "
                f"on one channel in {args.groups} filter groups (payload.market_id=eq.<g>); "
                "matched notifications (each matches one group) and notifications matching no "
                "group; every client checked for exactly its matches",
        "command": "python -m bench.scenarios.filters " + shlex.join(sys.argv[1:]),
        **git_head(), "relay_source": source, "machine": machine(),
        "started": time.strftime("%F %T"), "rounds": runs, "groups": args.groups,
        "messages": {"matched": matched, "nomatch": nomatch + 1}, "probe": found,
        "open_files": {"soft": soft, "hard": hard}, "relay_env": relay_env,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "notes": ["relay CPU: utime + stime of the relay process from /proc (10 ms ticks), "
                  "from the producer's first statement to the last client's last message",
                  "nomatch: its last notification matches group 1 and marks the phase's end "
                  f"({sizes[-1] // args.groups} writes at {sizes[-1]:,} clients)",
                  *args.note]}
    all_runs: list[dict[str, Any]] = []
    for number in range(runs):
        markets = plan(args.groups, matched, nomatch, None if args.seed is None
                       else args.seed + number)
        order = sizes[number % len(sizes):] + sizes[:number % len(sizes)]
        for n in order:
            run = run_once(n, args.groups, markets, filtered, args.procs,
                           None if args.seed is None else args.seed + number, args.timeout,
                           args.settle, relay_env)
            run["round"] = number + 1
            all_runs.append(run)
            _print_run(run)
        if args.json:
            _write(args.json, head, all_runs, sizes, number + 1 == runs)
    summary = summarize(all_runs, sizes)
    print()
    print(f"   {'clients':>8} {'phase':8} {'µs CPU/notification':>20} {'µs CPU/delivery':>16} "
          f"{'exact clients':>14}")
    for n in sizes:
        entry = summary["by_clients"][str(n)]
        for phase in ("matched", "nomatch"):
            print(f"   {n:>8,} {phase:8} "
                  f"{_fmt(entry[f'{phase}_relay_cpu_us_per_notification']):>20} "
                  f"{_fmt(entry[f'{phase}_relay_cpu_us_per_delivery'], ',.2f'):>16} "
                  f"{_fmt(entry['clients_exact_share'], '.0%'):>14}")
        if "implied_us_per_write" in entry:
            print(f"   {n:>8,} writes: {entry['writes_share_of_matched_cpu']:.0%} of the matched "
                  f"CPU per notification, {entry['implied_us_per_write']:.2f} µs per write")
    for phase, ratio in summary["ratios"].items():
        target = f" (target ≤ {GOAL}×)" if phase == "matched" else ""
        per_round = _fmt(ratio["per_round"]["median"], ".2f")
        print(f"   {phase}: CPU per notification {sizes[-1]:,} / {sizes[0]:,} clients = "
              f"{ratio['ratio']:.2f}×{target}, per round {per_round}×")
    if not filtered:
        print("   (the relay ignored filters: no measurement of them)")
    print(f"reproduce: {head['command']}")
    if args.json:
        _write(args.json, head, all_runs, sizes, True)
        print(f"wrote {args.json}")


def _print_run(run: dict[str, Any]) -> None:
    if "phases" not in run:
        print(f"round {run['round']} {run['clients']:>6,} clients failed: {run.get('error')}",
              flush=True)
        return
    m, z = run["phases"]["matched"], run["phases"]["nomatch"]
    print(f"round {run['round']} {run['clients']:>6,} clients (connected in "
          f"{run['connect_seconds']} s): matched {m['relay_cpu_us_per_notification']:,.1f} µs/"
          f"notification ({m['relay_cpu_s']:.2f} s CPU, {m['deliveries']:,} deliveries), "
          f"nomatch {z['relay_cpu_us_per_notification']:,.1f} µs/notification; exact "
          f"{run['clients_exact']:,}/{run['clients']:,}, foreign {run['foreign_frames']:,}, "
          f"others' CPU {run['others_cpu_s']} s"
          + (f"  ** {run['error']}" if "error" in run else ""), flush=True)


def _write(path: str, head: dict[str, Any], runs: list[dict[str, Any]], sizes: list[int],
           complete: bool) -> None:
    summary = summarize(runs, sizes) if runs else {}
    matched = summary.get("ratios", {}).get("matched", {}).get("ratio")
    nomatch = summary.get("ratios", {}).get("nomatch", {}).get("ratio")
    # Filters' correctness is judged on the runs whose listener did not reconnect: a reconnect
    # loses notifications for everyone alike, which is a listener matter, reported apart.
    clean = [r for r in runs if "phases" in r and not r.get("listener_gaps")]
    exact = bool(clean) and all(r["clients_exact"] == r["clients"] for r in clean)
    gapped = [r for r in runs if r.get("listener_gaps")]
    goals = [
        {"goal": "D", "measure": f"relay CPU per matched notification, {sizes[-1]:,} / "
         f"{sizes[0]:,} clients", "ratio": matched, "target": f"≤ {GOAL}×",
         "status": ("not measured: the relay ignores filters" if not head["probe"]
                    ["filters_applied"] else "failed" if matched is None
                    else "met" if matched <= GOAL else "missed")},
        {"goal": "D (routing only)", "measure": "relay CPU per notification matching no "
         f"group, {sizes[-1]:,} / {sizes[0]:,} clients", "ratio": nomatch,
         "target": f"≤ {GOAL}×",
         "status": ("not measured: the relay ignores filters" if not head["probe"]
                    ["filters_applied"] else "failed" if nomatch is None
                    else "met" if nomatch <= GOAL else "missed")},
        {"goal": "D correctness", "measure": "every client received exactly the "
         "notifications its filter matches (runs without a listener reconnect)",
         "runs": len(clean), "foreign_frames": sum(r.get("foreign_frames", 0) for r in runs),
         "clients_extra": sum(r.get("clients_extra", 0) for r in runs),
         "status": "met" if exact else "missed"},
        {"goal": "no notification lost", "measure": "runs in which the relay's listener "
         "reconnected (notifications lost for every client)", "runs": len(runs),
         "runs_with_listener_gaps": len(gapped),
         "status": "met" if not gapped else f"missed in {len(gapped)} of {len(runs)} runs"},
    ]
    document = {**head, "complete": complete,
                "load_average_end": [round(x, 2) for x in os.getloadavg()],
                "summary": summary, "goals": goals, "runs": runs}
    write_json(path, document)


if __name__ == "__main__":
    main()

"""What permessage-deflate saves and costs: bytes per delivery, the burst, a capped link.

    python -m bench.scenarios.compression --json bench/results/compression.json   # 5 rounds
    python -m bench.scenarios.compression --quick                # smoke version, ~1 minute
    python -m bench.scenarios.compression --parts bytes,burst    # no capped link (no root)

Theory of operation
-------------------
Every case runs pgws-relay (the real ``pgws-relay`` command, one fresh process per run) and
compares variants of the same clients receiving the *same* notification texts:

- ``plain``: the clients offer no extension (the relay's default settings);
- ``deflate``: the clients offer ``permessage-deflate; client_max_window_bits``;
- ``off`` (part ``bytes`` only): they offer it, and the relay runs with
  ``PGWS_COMPRESSION=off``, so it must answer without it (bytes as ``plain``).

Payloads are Econia notifications as the triggers write them (:class:`bench.parts.harness.
EconiaFeed`, checked byte for byte against PostgreSQL's ``json_build_object`` at start-up):
``fill_event`` texts of ~630 bytes with random 64-hex addresses (80 % fresh, 20 % from a pool
of 64: most addresses never repeat, a pessimistic case for compression), random u128 order
ids, prices and sizes, the current time. Every fill is one distinct row, except in the
context case ``fill_event pairs`` which sends each fill twice as Econia's processor stores it
(one row per handle, ``emit_address`` maker then taker).

Parts (the issue's goals):

- ``bytes`` (A): bytes received at the client socket after the handshake (frame headers,
  payloads, anything else the relay sends) divided by the messages delivered, deflate vs
  plain; (a) clients of ``/fill_event/TOKEN`` and a ``fill_event`` stream, (b) clients of
  ``/TOKEN`` whose token's ``channels`` claim lists Econia's nine live channels (a token with
  ``channels`` and no channel in the URL subscribes to all of them), the producer sending
  Econia's mix over them (``ECONIA_MIX`` of ``bench/parts/workloads.py``). Goal: ≤ 0.40×.
- ``burst`` (B): the throughput scenario's burst shape (1,000 clients of one channel, 4,000
  notifications, 100 per transaction) with these payloads: deliveries/s, deflate vs plain.
  Goal: ≥ 0.8×.
- ``capped`` (C): a burst (200 clients of one channel, 1,000 notifications, 100 per
  transaction) with the clients in a network namespace behind a veth pair whose relay-side
  end is shaped to 200 Mbit/s by tbf (:mod:`bench.parts.netns`, which says why tbf; needs root); the
  relay stays in the host namespace, where PostgreSQL is, and listens on the veth's address.
  Goal: deliveries/s with deflate ≥ 2× plain. Why 200 clients and not 1,000: each client's
  backlog must stay under ``PGWS_MAX_QUEUE_BYTES`` (1 MiB; 1,000 × 635 B here), and 1,000 TCP
  flows that all start at once overflow tbf's 1.5 MB queue with their initial windows alone:
  tried here, whole windows were lost, some flows sat in retransmission back-off for over
  10 s and the relay closed them as slow consumers (1013), or they never got a byte, in both
  variants. That measures the slow-consumer rule, not the link; 200 flows fill the link
  (~190 Mbit/s of payload) without it.

Load clients (:class:`bench.parts.harness.FrameClients`) parse every frame header (compressed
frames have varying lengths) with a small C routine, so they stay cheap; only one connection
in ``--verify-every`` (50) inflates every message (one ``zlib.decompressobj(-15)`` per
connection, context takeover, ``00 00 ff ff`` appended) and checks it: per channel, the count
and SHA-256 of the texts received, in order, must equal the producer's. A frame with RSV1
clear is a plain text frame (a client that joins a running stream gets those until the
stream's next sync point); the share of compressed frames is reported.

Rounds interleave the variants (their order rotates each round) and each round's texts are
made once for all of its variants; the tables give medians over the rounds and the ratios of
those medians, plus the median of the per-round ratios. A run records how much CPU the rest
of the machine spent meanwhile (``others_cpu_s``: PostgreSQL's share for the run is in it
too), since other people's test suites share this machine.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from typing import Any

from bench.parts import netns
from bench.parts.harness import (
    Conn,
    EconiaFeed,
    FrameClients,
    OwnedServer,
    Producer,
    busy_seconds,
    check_econia_texts,
    free_port,
    git_head,
    machine,
    own_seconds,
    relay_source,
    settle,
    text_digests,
    token,
    wait_for_db,
    write_json,
)
from bench.parts.workloads import ECONIA_MIX

PARTS = ("bytes", "burst", "capped")
#: Econia's nine live channels (econia.md 2.1), as a multi-channel client's token lists them.
ECONIA_CHANNELS = sorted(set(ECONIA_MIX))
GOALS = {"bytes": 0.40, "burst": 0.8, "capped": 2.0}


def cases(parts: list[str], quick: bool) -> list[dict[str, Any]]:
    """Each case: its part, label, clients, messages, batch, channels cycled, URL kind."""
    out: list[dict[str, Any]] = []
    if "bytes" in parts:
        n, m = (20, 500) if quick else (100, 2000)
        out += [
            {"part": "bytes", "goal": "A(a)", "label": "fill_event, one channel",
             "clients": n, "messages": m, "batch": 100, "channels": ["fill_event"],
             "url": "channel", "variants": ["plain", "deflate", "off"]},
            {"part": "bytes", "goal": "A(b)", "label": "Econia mix, one multi-channel token",
             "clients": n, "messages": m, "batch": 100, "channels": ECONIA_MIX,
             "url": "token", "variants": ["plain", "deflate", "off"]},
            {"part": "bytes", "goal": None, "label": "fill_event pairs, one channel (context)",
             "clients": n, "messages": m, "batch": 100, "channels": ["fill_event"],
             "pairs": True, "url": "channel", "variants": ["plain", "deflate"]},
        ]
    if "burst" in parts:
        n, m = (100, 2000) if quick else (1000, 4000)
        out.append({"part": "burst", "goal": "B", "label": f"burst N={n} B=100, fill_event",
                    "clients": n, "messages": m, "batch": 100, "channels": ["fill_event"],
                    "url": "channel", "variants": ["plain", "deflate"]})
    if "capped" in parts:
        n, m = (100, 500) if quick else (200, 1000)
        out.append({"part": "capped", "goal": "C",
                    "label": f"burst N={n} B=100 on a 200 Mbit/s link, fill_event",
                    "clients": n, "messages": m, "batch": 100, "channels": ["fill_event"],
                    "url": "channel", "variants": ["plain", "deflate"]})
    return out


def connections(case: dict[str, Any], variant: str, expected: int, verify_every: int
                ) -> list[Conn]:
    if case["url"] == "channel":
        path = f"/{case['channels'][0]}/{token({'mode': 'r'})}"
    else:
        path = "/" + token({"mode": "r", "channels": ECONIA_CHANNELS})
    offer = variant in ("deflate", "off")
    return [Conn(path, expected=expected, deflate=offer, verify=i % verify_every == 0)
            for i in range(case["clients"])]


def run_once(case: dict[str, Any], variant: str, texts: list[str], digests: dict[str, Any],
             procs: int, verify_every: int, link: netns.CappedLink | None,
             timeout: float, settle_limit: float, relay_env: dict[str, str]
             ) -> dict[str, Any]:
    """One run: a fresh relay, the clients, the texts; what the clients got."""
    if not wait_for_db(60):
        return {"variant": variant, "error": "PostgreSQL did not answer within 60 s"}
    waited, quiet = settle(settle_limit)
    env = {**relay_env, **({"PGWS_COMPRESSION": "off"} if variant == "off" else {})}
    host = "127.0.0.1"
    if link is not None:
        host = env["PGWS_HOST"] = link.host_address
    conns = connections(case, variant, len(texts), verify_every)
    busy, ours = busy_seconds(), own_seconds()
    server = OwnedServer("relay", free_port(), env)
    result: dict[str, Any] = {"variant": variant, "settle_wait_s": waited, "settled": quiet,
                              "load_1m": round(os.getloadavg()[0], 2)}
    try:
        with FrameClients(host, server.port, conns, procs=procs,
                          prefix=link.exec_prefix() if link else (), timeout=timeout) as pool:
            producer = Producer()
            try:
                shaped = link.qdisc() if link else None
                cpu = server.cpu_seconds()
                pool.start()
                start = time.time()
                _, last_commit = producer.send(texts, case["batch"])
                done = pool.wait_done(timeout)
                cpu = server.cpu_seconds() - cpu
                if link is not None:
                    after = link.qdisc()
                    result["link"] = {key: after[key] - shaped[key] for key in after
                                      if shaped and key in shaped}
                outcome = pool.results()
            finally:
                producer.close()
            walker, negotiated = pool.walker, pool.negotiated
    except Exception as exc:  # A failed run is a result, not the end of the invocation.
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["relay_log_tail"] = server.lines[-10:]
        return result
    finally:
        server.stop()
    per = outcome["connections"]
    delivered = sum(c["frames"] for c in per)
    expected = len(texts) * len(per)
    end = done or outcome["last_frame"]
    verified = [i for i, conn in enumerate(conns) if conn.verify]
    bad = [i for i in verified if per[i]["digests"] != digests]
    busy, ours = busy_seconds() - busy, own_seconds() - ours
    result.update({
        "delivered": delivered, "expected": expected, "delivered_share": delivered / expected,
        "seconds": end - start, "deliveries_per_s": delivered / max(end - start, 1e-9),
        "producer_seconds": last_commit - start,
        "bytes": sum(c["bytes"] for c in per),
        "bytes_per_delivery": sum(c["bytes"] for c in per) / max(delivered, 1),
        "compressed_share": sum(c["compressed"] for c in per) / max(delivered, 1),
        "negotiated_share": negotiated / len(per),
        "extensions": sorted({c["extensions"] for c in per}),
        "verified": len(verified) - len(bad), "verify_failed": len(bad),
        "errors": sum(c["errors"] for c in per), "extra": sum(c["extra"] for c in per),
        "missing": sum(c["missing"] for c in per),
        "closed": sum(1 for c in per if c["closed"]),
        "close_codes": sorted({c["close_code"] for c in per if c["close_code"]}),
        "relay_cpu_s": cpu, "relay_cpu_ms_per_1000": 1e6 * cpu / max(delivered, 1),
        "client_cpu_s": outcome["client_cpu_s"], "timed_out": done is None,
        "walker": walker, "machine_busy_cpu_s": round(busy, 2),
        "others_cpu_s": round(busy - ours, 2)})
    result["listener_gaps"] = server.count(r"without LISTEN \(gap")
    if result["listener_gaps"]:
        result["error"] = (f"the relay's listener reconnected {result['listener_gaps']} time(s) "
                           "(notifications committed meanwhile are lost): " + "; ".join(
                               line for line in server.lines if "relay.sources.notify" in line
                               and ("lost" in line or "gap" in line))[:600])
        return result
    if bad:
        result["verify_failed_example"] = {"connection": bad[0], "got": per[bad[0]]["digests"]}
    if done is None:
        result["error"] = (f"not every client got every message within {timeout:g} s "
                           f"({delivered:,} of {expected:,})")
    elif delivered != expected or bad:
        result["error"] = (f"delivered {delivered:,} of {expected:,}, {len(bad)} verified "
                           "connection(s) received other texts")
    return result


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r and "error" not in r]
    return statistics.median(values) if values else None


def summarize(case: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("bytes_per_delivery", "deliveries_per_s", "relay_cpu_ms_per_1000",
            "compressed_share", "negotiated_share", "client_cpu_s", "delivered_share",
            "others_cpu_s")
    summary: dict[str, Any] = {"variants": {}, "ratios": {}}
    for variant in case["variants"]:
        mine = [r for r in runs if r["variant"] == variant]
        good = [r for r in mine if "error" not in r]
        summary["variants"][variant] = {
            "runs": len(mine), "failed": len(mine) - len(good),
            **{f"median_{key}": _median(mine, key) for key in keys},
            **{f"range_{key}": [min(r[key] for r in good), max(r[key] for r in good)]
               for key in ("bytes_per_delivery", "deliveries_per_s") if good}}
    base = summary["variants"]["plain"]
    for variant in case["variants"]:
        if variant == "plain":
            continue
        mine = summary["variants"][variant]
        ratios: dict[str, Any] = {}
        for key in ("bytes_per_delivery", "deliveries_per_s", "relay_cpu_ms_per_1000"):
            if base[f"median_{key}"] and mine[f"median_{key}"] is not None:
                ratios[key] = mine[f"median_{key}"] / base[f"median_{key}"]
            paired = []
            for number in sorted({r["round"] for r in runs}):
                pair = {r["variant"]: r for r in runs if r["round"] == number
                        and "error" not in r}
                if "plain" in pair and variant in pair and pair["plain"][key]:
                    paired.append(pair[variant][key] / pair["plain"][key])
            if paired:
                ratios[f"per_round_{key}"] = {"median": statistics.median(paired),
                                              "min": min(paired), "max": max(paired)}
        summary["ratios"][f"{variant}/plain"] = ratios
    return summary


def goal_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for entry in results:
        case = entry["case"]
        if not case["goal"]:
            continue
        ratios = entry["summary"]["ratios"].get("deflate/plain", {})
        deflate = entry["summary"]["variants"]["deflate"]
        key, target = (("bytes_per_delivery", GOALS["bytes"]) if case["part"] == "bytes"
                       else ("deliveries_per_s", GOALS[case["part"]]))
        value = ratios.get(key)
        compressed = deflate["median_compressed_share"] or 0.0
        if value is None:
            status = "failed"
        elif compressed == 0:
            status = "not measured: the relay sent no compressed frame"
        else:
            met = value <= target if key == "bytes_per_delivery" else value >= target
            status = "met" if met else "missed"
        rows.append({"goal": case["goal"], "case": case["label"], "measure": key,
                     "ratio": value, "target": f"{'≤' if key == 'bytes_per_delivery' else '≥'}"
                     f" {target}×", "status": status,
                     "deflate_compressed_share": compressed})
    return rows


def _fmt(value: float | None, digits: str = ",.0f") -> str:
    return "–" if value is None else format(value, digits)


def print_case(entry: dict[str, Any]) -> None:
    case, summary = entry["case"], entry["summary"]
    print(f"-- {case['label']} ({case['clients']} clients, {case['messages']} messages, "
          f"batch {case['batch']}; mean payload {entry['payload_mean_bytes']:.0f} B)")
    print(f"   {'variant':8} {'bytes/deliv':>12} {'deliveries/s':>13} {'relay CPU ms/1000':>18}"
          f" {'compressed':>10} {'negotiated':>10} {'client CPU s':>12} {'runs':>5}")
    for variant, s in summary["variants"].items():
        print(f"   {variant:8} {_fmt(s['median_bytes_per_delivery'], ',.1f'):>12} "
              f"{_fmt(s['median_deliveries_per_s']):>13} "
              f"{_fmt(s['median_relay_cpu_ms_per_1000'], '.3f'):>18} "
              f"{_fmt(s['median_compressed_share'], '.0%'):>10} "
              f"{_fmt(s['median_negotiated_share'], '.0%'):>10} "
              f"{_fmt(s['median_client_cpu_s'], '.2f'):>12} "
              f"{s['runs'] - s['failed']}/{s['runs']:<3}")
    for name, ratios in summary["ratios"].items():
        parts = [f"{key} {ratios[key]:.3f}× (per round {ratios['per_round_' + key]['median']:.3f}"
                 f"×)" for key in ("bytes_per_delivery", "deliveries_per_s") if key in ratios
                 and f"per_round_{key}" in ratios]
        print(f"   {name}: " + ", ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--runs", type=int, default=None,
                        help="rounds (each runs every variant once); default 5, --quick 1")
    parser.add_argument("--quick", action="store_true", help="small cases, one round")
    parser.add_argument("--procs", type=int, default=2, help="client processes per run")
    parser.add_argument("--verify-every", type=int, default=50,
                        help="one connection in this many inflates and checks every message")
    parser.add_argument("--rate", default="200mbit", help="the capped link's rate (tc)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds a run's clients may take to receive everything")
    parser.add_argument("--seed", type=int, default=None, help="seed of the payload generator")
    parser.add_argument("--settle", type=float, default=None,
                        help="before each run, wait up to this many seconds for a quiet second "
                             "(under half a core busy); default 20, --quick 0")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--relay-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every relay run (repeatable), e.g. "
                             "PGWS_CHECK_LISTENER_INTERVAL=0")
    parser.add_argument("--note", action="append", default=[], help="a line for the notes")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(PARTS)}")
    runs = args.runs or (1 if args.quick else 5)
    relay_env = dict(item.split("=", 1) for item in args.relay_env)
    if args.settle is None:
        args.settle = 0.0 if args.quick else 20.0
    compared = check_econia_texts()
    print(f"payload generator: {compared} rows rendered byte for byte as PostgreSQL's "
          "json_build_object does", flush=True)
    source = relay_source()
    print(f"relay imported from {source}", flush=True)
    chosen = cases(parts, args.quick)
    feed = EconiaFeed(seed=args.seed)
    head = {
        "what": "permessage-deflate: bytes per delivery, burst, capped link (see the script's "
                "docstring)",
        "command": "python -m bench.scenarios.compression " + shlex.join(sys.argv[1:]),
        **git_head(), "relay_source": source, "machine": machine(),
        "started": time.strftime("%F %T"), "rounds": runs, "verify_every": args.verify_every,
        "relay_env": relay_env,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "notes": ["bytes: everything received at the client socket after the handshake "
                  "(frame headers and payloads), not TCP/IP headers",
                  "deliveries/s: messages received by all clients / (time the last client "
                  "got its last message - time the producer began)",
                  "load clients walk frame headers in C; one connection in "
                  f"{args.verify_every} inflates and checks every message",
                  *args.note],
    }
    results = [{"case": case, "runs": [], "payload_mean_bytes": 0.0} for case in chosen]
    link: netns.CappedLink | None = None
    with netns.exit_on_signals():
        try:
            if "capped" in parts:
                stale = netns.remove_stale()
                if stale:
                    print(f"removed leftovers of earlier runs: {', '.join(stale)}")
                link = netns.CappedLink(rate=args.rate).open()
                head["link"] = link.describe()
                print(f"capped link: {link.describe()}", flush=True)
            for number in range(runs):
                for entry in results:
                    case = entry["case"]
                    texts = feed.texts(case["channels"], case["messages"],
                                       pairs=case.get("pairs", False))
                    entry["payload_mean_bytes"] = statistics.mean(len(t) for t in texts)
                    entry.setdefault("example", texts[0])
                    digests = text_digests(texts)
                    variants = case["variants"]
                    order = variants[number % len(variants):] + variants[:number %
                                                                          len(variants)]
                    for variant in order:
                        run = run_once(case, variant, texts, digests, args.procs,
                                       args.verify_every,
                                       link if case["part"] == "capped" else None,
                                       args.timeout, args.settle, relay_env)
                        run["round"] = number + 1
                        entry["runs"].append(run)
                        _print_run(case, run)
                if args.json:
                    _write(args.json, head, results, runs, number + 1 == runs)
        finally:
            if link is not None:
                link.close()
    print()
    for entry in results:
        entry["summary"] = summarize(entry["case"], entry["runs"])
        print_case(entry)
    goals = goal_rows(results)
    print("-- goals")
    for row in goals:
        print(f"   {row['goal']:5} {row['case']:45} {row['measure']:19} "
              f"{_fmt(row['ratio'], '.3f')}× (target {row['target']}): {row['status']}")
    print(f"reproduce: {head['command']}")
    if args.json:
        _write(args.json, head, results, runs, True)
        print(f"wrote {args.json}")


def _print_run(case: dict[str, Any], run: dict[str, Any]) -> None:
    if "delivered" not in run:
        print(f"round {run['round']} {case['label'][:40]:40} {run['variant']:8} failed: "
              f"{run.get('error')}", flush=True)
        return
    print(f"round {run['round']} {case['label'][:40]:40} {run['variant']:8} "
          f"{run['bytes_per_delivery']:7.1f} B/delivery {run['deliveries_per_s']:>11,.0f}/s "
          f"relay {run['relay_cpu_ms_per_1000']:.3f} ms/1000 compressed "
          f"{run['compressed_share']:.0%} verified {run['verified']}/"
          f"{run['verified'] + run['verify_failed']} others' CPU {run['others_cpu_s']} s"
          + (f" link dropped {run['link'].get('dropped')}" if run.get("link") else "")
          + (f"  ** {run['error']}" if "error" in run else ""), flush=True)


def _write(path: str, head: dict[str, Any], results: list[dict[str, Any]], rounds: int,
           complete: bool) -> None:
    document = {**head, "complete": complete,
                "load_average_end": [round(x, 2) for x in os.getloadavg()],
                "cases": [{**{k: v for k, v in entry.items() if k != "summary"},
                           "summary": entry.get("summary") or summarize(entry["case"],
                                                                       entry["runs"])}
                          for entry in results]}
    document["goals"] = goal_rows([{**entry, "summary": entry_summary} for entry, entry_summary
                                   in zip(results, (c["summary"] for c in document["cases"]),
                                          strict=True)])
    write_json(path, document)


if __name__ == "__main__":
    main()

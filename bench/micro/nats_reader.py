"""The NATS source's reader alone: CPU per message to read a stream into the hub's callback.

    python -m bench.micro.nats_reader                       # 30,000 messages, the local server
    python -m bench.micro.nats_reader --json bench/results/micro-nats-reader.json

Theory of operation
-------------------
A stream (``--stream``, made again each run) on the NATS server at ``--url`` (JetStream on) is
filled with ``--messages`` small payloads, then :class:`relay.sources.nats.NatsSource` reads it
from its start with a callback that only counts, so what is measured is the source: nats-py's
ordered consumer on its asyncio thread, the hop to Trio and the batches. The figure is this
process's CPU time (both threads) per message, from the source's start to the last message,
and the messages per second; a figure of this machine, to compare commits on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import time

import trio

from bench.parts.harness import write_json
from bench.parts.paths import ROOT
from relay.sources.nats import NatsSettings, NatsSource


async def _fill(url: str, stream: str, count: int) -> None:
    import nats
    from nats.js.api import StreamConfig

    connection = await nats.connect(url)
    js = connection.jetstream()
    with contextlib.suppress(Exception):  # Not there yet.
        await js.delete_stream(stream)
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"]))
    for start in range(0, count, 500):
        acks = [await js.publish_async(f"{stream}.c",
                                       json.dumps({"channel": "c", "n": n}).encode())
                for n in range(start, min(start + 500, count))]
        await asyncio.gather(*acks)
    await connection.close()


def measure(url: str, stream: str, count: int) -> dict[str, float]:
    asyncio.run(_fill(url, stream, count))
    got = [0]
    done = trio.Event()

    def publish(payloads: list[bytes], arrived: float, places: object = None) -> None:
        got[0] += len(payloads)
        if got[0] >= count:
            done.set()

    result: dict[str, float] = {}

    async def main() -> None:
        source = NatsSource(NatsSettings((url,), stream), publish, 5, 1e9)
        async with trio.open_nursery() as nursery:
            cpu, wall = time.process_time(), time.monotonic()
            nursery.start_soon(source.run)
            await done.wait()
            result["cpu_us_per_message"] = (time.process_time() - cpu) / got[0] * 1e6
            result["messages_per_s"] = got[0] / (time.monotonic() - wall)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--stream", default="pgws_micro_reader")
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--json")
    args = parser.parse_args()
    found = measure(args.url, args.stream, args.messages)
    print(f"{args.messages:,} messages: {found['cpu_us_per_message']:.1f} µs of CPU each, "
          f"{found['messages_per_s']:,.0f} messages/s")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        write_json(args.json, {"what": "the NATS source's reader alone (bench/micro/"
                                       "nats_reader.py)", "commit": commit,
                               "command": "python -m bench.micro.nats_reader --json "
                                          + args.json, "messages": args.messages, **found})


if __name__ == "__main__":
    main()

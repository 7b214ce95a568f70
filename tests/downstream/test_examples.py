"""The client examples (``examples/*.py``) run as a user would run them, against the real relay.

Each example is a subprocess with a timeout, given a token as its users get one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from websockets.sync.client import connect

from tests.helpers import TIMEOUT, Lines, RelayProcess, notify, token, unique_channel

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(name: str, *args: str) -> list[str]:
    return [sys.executable, str(EXAMPLES / name), *args]


def test_listen_example_prints_messages_verbatim_and_stops_after_count(
        relay: RelayProcess) -> None:
    channel = unique_channel("example")
    payloads = [json.dumps({"channel": channel, "payload": n}, separators=(", ", " : "))
                for n in range(3)]
    reader = token({"mode": "r", "channel": channel})
    proc = subprocess.Popen(
        example("listen.py", relay.url(""), reader, "--channel", channel, "--count", "3"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stderr = Lines()
        stderr.read_from(proc.stderr)
        stderr.wait_for(lambda: "connected" in stderr.items, what="the example to connect")
        notify(relay.env["PGWS_LISTEN_CHANNEL"], *payloads,
               json.dumps({"channel": channel, "payload": "one too many"}))
        assert proc.wait(TIMEOUT) == 0, "\n".join(stderr.items)
        out = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
    assert out.splitlines() == payloads


def test_send_example_reaches_a_reader_of_the_channel(relay: RelayProcess) -> None:
    channel = unique_channel("example")
    reader = token({"mode": "r", "channel": channel})
    with connect(relay.url(f"/{channel}/{reader}"), open_timeout=10) as other:
        writer = token({"mode": "w", "channel": channel})
        subprocess.run(example("send.py", relay.url(""), writer, "first", "second",
                               "--channel", channel),
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT,
                       check=True)
        envelopes = [json.loads(other.recv(timeout=TIMEOUT)) for _ in range(2)]
    assert [e["payload"] for e in envelopes] == ["first", "second"]
    assert {(e["channel"], e["event"], e["claims"]["mode"]) for e in envelopes} == {
        (channel, "WebsocketMessage", "w")}

"""Headless Chromium as the client: permessage-deflate and filters, decoded by a real browser.

Chromium offers ``permessage-deflate; client_max_window_bits`` and inflates every compressed
frame itself; a frame it could not inflate, or one that broke RFC 7692, would close the socket
(1002/1007) instead of delivering a message. The page is the relay's own ``Hello, Web!``; the
sockets are opened by script, and every wait is a Selenium wait on the page's state, never a
sleep. Skipped without a browser, except under CI (see ``browser`` in conftest).
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from tests.helpers import TIMEOUT, RelayProcess, eventually, notify, token

#: Opens one WebSocket per name → URL; records messages, the agreed extension and any close.
_OPEN = """
window.sockets = window.sockets || {};
window.received = window.received || {};
window.extensions = window.extensions || {};
window.closes = window.closes || {};
for (const [name, url] of Object.entries(arguments[0])) {
  const socket = new WebSocket(url);
  window.received[name] = [];
  socket.onopen = () => { window.extensions[name] = socket.extensions; };
  socket.onmessage = (event) => window.received[name].push(event.data);
  socket.onclose = (event) => { window.closes[name] = event.code; };
  window.sockets[name] = socket;
}
"""


def fill(n: int, market: int) -> str:
    row = {"txn_version": 154106900 + n, "event_idx": n,
           "maker_address": "0x" + os.urandom(32).hex(), "maker_custodian_id": 0,
           "maker_order_id": 18446744073709551616000001 + n, "maker_side": n % 2 == 0,
           "market_id": market, "price": 12345 + n, "size": 100 + n,
           "taker_address": "0x" + os.urandom(32).hex()}
    return '{"channel" : "fill_event", "payload" : ' + json.dumps(row) + "}"


def _wait(browser: Any, script: str, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, TIMEOUT, poll_frequency=0.05).until(
        lambda driver: driver.execute_script(script), what)


def test_chromium_decodes_shared_compressed_streams_with_filters_and_late_joins(
        browser: Any, relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    read = token({"mode": "r"})
    both = token({"mode": "r", "channels": ["fill_event", "cancel_order_event"]})
    browser.get(relay.url("/", "http"))
    first = {
        "all": relay.url(f"/fill_event/{read}"),
        "all_too": relay.url(f"/fill_event/{read}"),
        "seven": relay.url(f"/fill_event/{read}?filter=payload.market_id=eq.7"),
        "even": relay.url(f"/fill_event/{read}?filter=payload.maker_side=is.true"),
        "channels": relay.url(f"/{both}"),
    }
    browser.execute_script(_OPEN, first)
    _wait(browser, f"return Object.keys(window.extensions).length == {len(first)}",
          "every socket open")
    extensions = browser.execute_script("return window.extensions")
    assert set(extensions.values()) == {"permessage-deflate; client_no_context_takeover"}

    cancel = '{"channel" : "cancel_order_event", "payload" : {"market_id":7,"order_id":%d}}'
    sent: list[str] = []

    def send(count: int) -> None:
        batch = [fill(len(sent) + n, 7 + (len(sent) + n) % 2) if n % 5 else
                 cancel % (len(sent) + n) for n in range(count)]
        sent.extend(batch)
        notify(listen, *batch)

    send(20)
    send(1)
    # A late joiner on a stream whose compressor has history: plain frames, then shared ones.
    browser.execute_script(_OPEN, {"late": relay.url(f"/fill_event/{read}")})
    _wait(browser, "return window.extensions.late !== undefined", "the late socket open")
    joined_at = len(sent)
    # Until the stream's next sync point (at most a second after the last) the late client
    # gets plain frames; then it shares the restarted compressor. Go on until it has joined.
    joins = relay.stats()["compression_joins"]
    assert joins == len(first)  # The first five joined fresh compressors at once.

    def late_has_joined() -> bool:
        send(10)
        return relay.stats()["compression_joins"] > joins

    eventually(late_has_joined, what="the late client joined at a sync point")
    assert relay.stats()["compression_restarts"] >= 1
    for _ in range(3):
        send(10)
    fills = [m for m in sent if "fill_event" in m]
    wanted = {
        "all": fills, "all_too": fills,
        "seven": [m for m in fills if json.loads(m)["payload"]["market_id"] == 7],
        "even": [m for m in fills if json.loads(m)["payload"]["maker_side"]],
        "channels": sent,
        "late": [m for m in sent[joined_at:] if "fill_event" in m],
    }
    counts = " && ".join(f"window.received.{name}.length >= {len(messages)}"
                         for name, messages in wanted.items())
    _wait(browser, f"return {counts}", "every message in the browser")
    received = browser.execute_script("return window.received")
    for name, messages in wanted.items():
        assert received[name] == messages, name
    assert browser.execute_script("return window.closes") == {}
    browser.execute_script("for (const s of Object.values(window.sockets)) s.close(1000)")


_EVENTS = """
window.events = [];
window.lost = [];
const source = new EventSource(arguments[0]);
source.onmessage = (event) => window.events.push([event.data, event.lastEventId]);
source.addEventListener("lost", (event) => window.lost.push(event.data));
window.source = source;
"""


@pytest.mark.fault
def test_chromiums_eventsource_resumes_by_itself_after_its_connection_is_reset(
        browser: Any, relay: RelayProcess) -> None:
    """The relay's side of the stream is destroyed (``ss -K``); the browser reconnects on its
    own with ``Last-Event-ID`` and gets what was committed meanwhile, once, in order."""
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    browser.get(relay.url("/", "http"))
    browser.execute_script(_EVENTS, f"/chat/{token({'mode': 'r', 'channel': 'chat'})}")
    _wait(browser, "return window.source.readyState === 1", "the stream open")
    notify(listen, *(json.dumps({"channel": "chat", "n": n}) for n in range(1, 4)))
    _wait(browser, "return window.events.length === 3", "three events")
    killed = subprocess.run(["ss", "-K", "src", "127.0.0.1", "sport", "=", str(relay.port)],
                            capture_output=True, text=True, timeout=30)
    assert killed.returncode == 0, killed.stderr
    notify(listen, *(json.dumps({"channel": "chat", "n": n}) for n in range(4, 7)))
    _wait(browser, "return window.events.length >= 6", "the events committed meanwhile")
    events = browser.execute_script("return window.events")
    assert [json.loads(data)["n"] for data, _ in events] == [1, 2, 3, 4, 5, 6]
    assert len({last_id for _, last_id in events}) == 6
    assert browser.execute_script("return window.lost") == []

"""The live console (``relay/console/``) in a real headless Chromium, served by the real relay.

The page is loaded from the relay (``PGWS_ROOT_PATH`` = the console's package directory, as
``python -m relay.console`` prints it), connects over WebSocket like any browser client, and is
driven through its form. Every wait is a Selenium wait for something on the page (or a
``recv`` with a timeout), never a sleep.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and Selenium
(the ``test`` extra). Without them the tests are skipped, except under CI (``CI=true``), where
a missing browser fails them: CI must prove the console works.

``PGWS_CONSOLE_SCREENSHOT=docs/console.png pytest tests/browser/test_console.py`` also saves the
page, with live messages on it, as that PNG (the picture in docs/console.md).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.helpers import TIMEOUT, RelayProcess, notify, token, unique_channel

CONSOLE_DIR = Path(__file__).resolve().parents[2] / "relay" / "console"


class Page:
    """The console page in the browser, with the few gestures the tests need."""

    def __init__(self, driver, relay: RelayProcess) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.by = By
        self.wait = WebDriverWait(driver, TIMEOUT)
        driver.get(relay.url("/", scheme="http"))
        self.wait.until(lambda d: d.execute_script("return document.readyState") == "complete")

    def find(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list:
        return self.driver.find_elements(self.by.CSS_SELECTOR, css)

    def until(self, condition: Callable[[], object], what: str) -> object:
        return self.wait.until(lambda _: condition(), message=f"waiting for {what}")

    def connect(self, jwt: str, channels: str = "", transport: str = "websocket") -> None:
        from selenium.webdriver.support.ui import Select

        self.find("#token").send_keys(jwt)
        if channels:
            self.find("#channels").send_keys(channels)
        Select(self.find("#transport")).select_by_value(transport)
        self.find("#connect").click()

    def rows(self) -> list[dict[str, str]]:
        """The connections table, read in one round trip."""
        return self.driver.execute_script("""
            return Array.from(document.querySelectorAll("#connections tbody tr"), row => ({
                channel: row.dataset.channel, state: row.dataset.state,
                reconnects: row.querySelector(".reconnects").textContent,
                close: row.querySelector(".close").textContent}));""")

    def wait_open(self, count: int = 1) -> None:
        self.until(lambda: len(self.rows()) == count and
                   all(row["state"] == "open" for row in self.rows()),
                   f"{count} open connection(s)")
        assert self.find("#status").text == f"{count} of {count} open"

    def messages(self, kind: str = "data") -> list[tuple[str, str]]:
        """(channel label, text) of the listed messages of ``kind``, top to bottom, read in
        one round trip (the list holds up to 500)."""
        return [tuple(pair) for pair in self.driver.execute_script("""
            return Array.from(document.querySelectorAll("#messages li.msg." + arguments[0]),
                              li => [li.dataset.channel, li.querySelector("pre").textContent]);
            """, kind)]

    def positions(self) -> list[str]:
        """The positions shown beside the data messages, top to bottom."""
        return self.driver.execute_script("""
            return Array.from(document.querySelectorAll("#messages li.msg.data"),
                              li => li.querySelector(".position")?.textContent ?? "");""")

    def wait_message(self, text: str, kind: str = "data") -> None:
        self.until(lambda: any(text == shown for _, shown in self.messages(kind)),
                   f"{kind} message {text!r} on the page")


def econia_fill(channel: str, n: int) -> str:
    """An Econia-like notification (a trigger's json_build_object text, spacing and all)."""
    row = {"txn_version": 1040 + n, "event_idx": n % 3, "market_id": 3,
           "maker_order_id": 6182024 + n, "price": 1200 + 7 * (n % 5), "size": 25 * (n + 1),
           "taker_quote_fees_paid": 12 + n}
    return json.dumps({"channel": channel, "payload": row}, separators=(", ", " : "))


def test_console_directory_is_what_the_module_prints() -> None:
    printed = subprocess.run([sys.executable, "-m", "relay.console"], capture_output=True,
                             text=True, check=True, timeout=TIMEOUT).stdout.strip()
    assert Path(printed).is_absolute() and Path(printed) == CONSOLE_DIR
    assert {"index.html", "console.js", "console.css"} <= {p.name for p in CONSOLE_DIR.iterdir()}


def test_the_console_carries_the_javascript_client_library_unchanged() -> None:
    # The page imports the library from its own directory (package data, served by the relay);
    # clients/js/index.js is the library's one source, and this copy must not drift from it.
    library = CONSOLE_DIR.parents[1] / "clients" / "js" / "index.js"
    copy = CONSOLE_DIR / "pgws-relay-client.js"
    assert copy.read_bytes() == library.read_bytes(), \
        "cp clients/js/index.js relay/console/pgws-relay-client.js"
    assert 'from "./pgws-relay-client.js"' in (CONSOLE_DIR / "console.js").read_text()


def test_notify_shows_live_and_a_message_sent_from_the_page_reaches_another_client(
        browser, start_relay) -> None:
    relay = start_relay(PGWS_ROOT_PATH=str(CONSOLE_DIR))
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    channel = unique_channel("console")
    page = Page(browser, relay)
    assert page.driver.title == "pgws-relay console"

    page.connect(token({"mode": "rw"}), channel)
    page.wait_open()
    # The decoded payload is shown, unverified, and the send form appears for mode rw.
    assert page.find("#claim-mode").text == "rw"
    assert page.find("#send-form").is_displayed()

    # Markup in a message stays text: it is shown verbatim and creates no element.
    hostile = json.dumps({"channel": channel, "payload": "<img src=x onerror=alert(1)><b>hi</b>"})
    notify(listen, hostile)
    page.wait_message(hostile)
    assert page.find_all("#messages img") == [] and page.find_all("#messages b") == []

    fills = [econia_fill(channel, n) for n in range(6)]
    notify(listen, *fills)
    page.wait_message(fills[-1])
    shown = [text for _, text in page.messages()]
    assert shown[:6] == fills[::-1], "newest first, in delivery order"
    assert all(label == channel for label, _ in page.messages())
    page.until(lambda: page.find("#rate").text != "0.0 msg/s", "a non-zero rate")
    assert page.find("#count").text.startswith("7 received")

    # Typed and sent from the page: an independent client on the channel gets the envelope.
    reader = token({"mode": "r", "channel": channel})
    with connect(relay.url(f"/{channel}/{reader}"), open_timeout=10) as other:
        page.find("#send-text").send_keys("hello from the console")
        page.find("#send").click()
        envelope = json.loads(other.recv(timeout=TIMEOUT))
    assert envelope["channel"] == channel
    assert envelope["event"] == "WebsocketMessage"
    assert envelope["payload"] == "hello from the console"
    assert envelope["claims"]["mode"] == "rw"
    # The page (mode rw) reads its own message back, as upstream's echo.
    page.until(lambda: any(json.loads(text).get("payload") == "hello from the console"
                           for _, text in page.messages()), "the echo on the page")

    screenshot = os.environ.get("PGWS_CONSOLE_SCREENSHOT")
    if screenshot:
        notify(listen, *(econia_fill(channel, n) for n in range(6, 12)))
        page.wait_message(econia_fill(channel, 11))
        page.driver.execute_script("document.querySelector('.controls').scrollTop = 0")
        assert page.driver.save_screenshot(screenshot)


def test_over_server_sent_events_messages_show_with_positions_and_nothing_can_be_sent(
        browser, start_relay) -> None:
    relay = start_relay(PGWS_ROOT_PATH=str(CONSOLE_DIR))
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    channel = unique_channel("console")
    page = Page(browser, relay)
    page.connect(token({"mode": "rw"}), channel, transport="sse")
    page.wait_open()
    page.wait_message("connected (Server-Sent Events)", kind="event")
    # An event stream cannot carry a write, so the send form stays hidden even for mode rw.
    assert not page.find("#send-form").is_displayed()
    fills = [econia_fill(channel, n) for n in range(3)]
    notify(listen, *fills)
    page.wait_message(fills[-1])
    assert [text for _, text in page.messages()] == fills[::-1]
    positions = page.positions()
    assert len(set(positions)) == 3 and all(p.count(".") == 3 for p in positions), positions


@pytest.mark.fault
@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_after_a_reset_the_page_resumes_with_every_message_once_and_in_order(
        browser, start_relay, transport: str) -> None:
    """The relay's side of the connection is destroyed (``ss -K``) between two batches: the
    library reconnects from the last position shown and the page lists all six, no line lost."""
    relay = start_relay(PGWS_ROOT_PATH=str(CONSOLE_DIR))
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    channel = unique_channel("console")
    page = Page(browser, relay)
    page.connect(token({"mode": "r"}), channel, transport=transport)
    page.wait_open()
    sent = [json.dumps({"channel": channel, "n": n}) for n in range(6)]
    notify(listen, *sent[:3])
    page.wait_message(sent[2])
    killed = subprocess.run(["ss", "-K", "src", "127.0.0.1", "sport", "=", str(relay.port)],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert killed.returncode == 0, killed.stderr
    notify(listen, *sent[3:])
    page.until(lambda: page.rows()[0]["reconnects"] == "1", "one reconnect")
    page.wait_message(sent[5])
    assert [text for _, text in page.messages()] == sent[::-1]
    assert len(set(page.positions())) == 6
    assert not any(text.startswith("lost") for _, text in page.messages("event"))


@pytest.mark.slow
def test_a_token_pasted_while_connected_replaces_the_old_one_before_it_expires(
        browser, start_relay) -> None:
    relay = start_relay(PGWS_ROOT_PATH=str(CONSOLE_DIR))
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    channel = unique_channel("console")
    page = Page(browser, relay)
    expires = int(time.time()) + 6
    page.connect(token({"mode": "r", "channel": channel, "exp": expires}), channel)
    page.wait_open()
    page.find("#token").clear()
    page.find("#token").send_keys(token({"mode": "r", "channel": channel,
                                         "exp": int(time.time()) + 600}))
    page.until(lambda: any(text.startswith("token refreshed in place")
                           for _, text in page.messages("event")), "the refresh")
    page.until(lambda: time.time() > expires + 1, "the first token's exp behind us")
    message = json.dumps({"channel": channel, "payload": "after the first exp"})
    notify(listen, message)
    page.wait_message(message)
    assert page.rows()[0]["state"] == "open" and page.rows()[0]["reconnects"] == "0"


@pytest.mark.slow
def test_token_channels_several_connections_and_the_bounded_list(browser, start_relay) -> None:
    relay = start_relay(PGWS_ROOT_PATH=str(CONSOLE_DIR))
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    a, b, c = (unique_channel("console") for _ in range(3))
    page = Page(browser, relay)

    # No channel typed: one connection to /TOKEN, getting both of the token's channels.
    page.connect(token({"mode": "r", "channels": [a, b]}))
    page.wait_open(1)
    assert page.find("#claim-channels").text == f"{a}, {b}"
    assert not page.find("#send-form").is_displayed(), "mode r: nothing to send"
    notify(listen, json.dumps({"channel": a, "payload": 1}), json.dumps({"channel": c}),
           json.dumps({"channel": b, "payload": 2}))
    page.wait_message(json.dumps({"channel": b, "payload": 2}))
    assert [text for _, text in page.messages()] == [json.dumps({"channel": b, "payload": 2}),
                                                     json.dumps({"channel": a, "payload": 1})]

    # Two channels typed: two connections, /A/TOKEN and /B/TOKEN.
    page.find("#channels").send_keys(f"{a}, {b}")
    page.find("#connect").click()
    page.wait_open(2)
    assert sorted(row["channel"] for row in page.rows()) == sorted([a, b])
    page.find("#clear").click()
    # More than the page keeps (500), in two transactions, so that both the batch being
    # drawn and the lines already shown get trimmed. Distinct, so PostgreSQL folds none.
    payloads = [json.dumps({"channel": a if n % 2 else b, "n": n}) for n in range(520)]
    notify(listen, *payloads[:300])
    page.until(lambda: len(page.find_all("#messages li.msg")) == 300, "300 shown")
    notify(listen, *payloads[300:])
    page.until(lambda: page.find("#count").text.startswith("520 received"), "520 received")
    page.until(lambda: len(page.find_all("#messages li.msg")) == 500, "500 kept")
    assert page.find("#count").text == "520 received, 500 shown (max 500)"
    shown = page.messages()
    assert len(shown) == 500
    # Each connection keeps its own order, newest first; what was dropped is the oldest
    # twenty arrivals, so what each connection still shows is the end of what it was sent.
    sent = {a: [n for n in range(520) if n % 2], b: [n for n in range(520) if not n % 2]}
    for channel in (a, b):
        mine = [json.loads(text)["n"] for label, text in shown if label == channel]
        assert mine == sent[channel][::-1][:len(mine)]
    oldest_a = min(json.loads(text)["n"] for label, text in shown if label == a)

    # Oldest first, on request: the same 500, the other way round.
    page.find("#newest-first").click()
    page.until(lambda: [json.loads(t)["n"] for lb, t in page.messages() if lb == a][:1]
               == [oldest_a], "oldest first")
    assert len(page.messages()) == 500

def test_checks_before_connecting(browser, start_relay) -> None:
    relay = start_relay(PGWS_ROOT_PATH=str(CONSOLE_DIR))
    page = Page(browser, relay)
    page.connect(token({"mode": "r"}))  # No channel claim and no channel typed.
    page.until(lambda: "names no channel" in page.find("#form-error").text, "the error")
    page.find("#token").clear()
    page.connect(token({"mode": "r", "exp": int(time.time()) - 5}), "chat")
    page.until(lambda: "expired" in page.find("#form-error").text, "the expiry error")
    page.find("#token").clear()
    page.find("#channels").clear()
    page.connect(token({"mode": "r", "channels": ["a"]}), "b")
    page.until(lambda: "does not allow" in page.find("#form-error").text, "the channel error")
    assert page.rows() == [] and page.find("#status").text == "not connected"


@pytest.mark.slow
def test_expiry_close_3001_is_shown_and_not_retried(browser, start_relay) -> None:
    relay = start_relay(PGWS_ROOT_PATH=str(CONSOLE_DIR))
    channel = unique_channel("console")
    page = Page(browser, relay)
    # Long enough to open first even on a loaded machine; the relay closes it at exp.
    page.connect(token({"mode": "r", "exp": int(time.time()) + 6}), channel)
    page.wait_open()
    page.until(lambda: page.rows()[0]["state"] == "expired", "the expired state")
    row = page.rows()[0]
    assert row["close"].startswith("3001 JWT expired"), row
    assert row["reconnects"] == "0"
    page.wait_message(f"closed {row['close']}", kind="event")
    assert page.find("#status").text == "0 of 1 open"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_reconnects_after_the_relay_restarts(browser, start_relay) -> None:
    port = str(_free_port())
    first = start_relay(PGWS_ROOT_PATH=str(CONSOLE_DIR), PGWS_PORT=port)
    listen = first.env["PGWS_LISTEN_CHANNEL"]
    channel = unique_channel("console")
    page = Page(browser, first)
    page.connect(token({"mode": "r"}), channel)
    page.wait_open()

    first.signal(signal.SIGTERM)  # Every client gets 1001, then the relay exits.
    assert first.wait_exit() == 0
    page.until(lambda: page.rows()[0]["close"].startswith("1001"), "close 1001 shown")
    assert page.rows()[0]["state"] in ("waiting", "connecting")

    second = start_relay(PGWS_ROOT_PATH=str(CONSOLE_DIR), PGWS_PORT=port,
                         PGWS_LISTEN_CHANNEL=listen)
    page.until(lambda: page.rows()[0]["state"] == "open", "the connection open again")
    assert page.rows()[0]["reconnects"] == "1"
    assert page.find("#reconnects").text == "1"
    page.wait_message("reconnected (1)", kind="event")
    message = json.dumps({"channel": channel, "payload": "after the restart"})
    notify(second.env["PGWS_LISTEN_CHANNEL"], message)
    page.wait_message(message)

"""``PGWS_LOG_FORMAT``: the text lines as they always were, or one JSON object per line.

The formatter is checked on records made here (fields, tracebacks, values JSON cannot hold);
the real relay is checked end to end: every line it writes through start-up, a refused token,
a client's connect and close, the SIGUSR1 stats line and a SIGTERM shutdown parses as JSON,
with no token in any line.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import sys
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from relay.ops.logs import JsonFormatter, text_format
from tests.helpers import RelayProcess, token

#: ISO 8601, UTC, milliseconds.
ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
#: The text format: local time with milliseconds after a comma, then level, logger, message.
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\[worker \d+\] )?"
                       r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def _record(message: str, *args: object, exc_info: Any = None, **extra: object
            ) -> logging.LogRecord:
    record = logging.LogRecord("relay.test", logging.WARNING, __file__, 1, message, args,
                               exc_info)
    record.created, record.msecs = 1700000000.25, 250.0  # 2023-11-14T22:13:20.250Z
    for name, value in extra.items():
        setattr(record, name, value)
    return record


def _json(record: logging.LogRecord, worker: int | None = None) -> dict[str, Any]:
    line = JsonFormatter(worker).format(record)
    assert "\n" not in line
    return json.loads(line)


def test_a_record_is_one_object_with_the_formatted_message() -> None:
    assert _json(_record("client %s connected: mode %r", "1.2.3.4:5", "rw")) == {
        "time": "2023-11-14T22:13:20.250Z", "level": "WARNING", "logger": "relay.test",
        "message": "client 1.2.3.4:5 connected: mode 'rw'"}


def test_fields_passed_with_extra_and_the_worker_are_keys() -> None:
    record = _record("closing %s", "peer", peer="1.2.3.4:5", queued=123, channels=["a", "b"])
    document = _json(record, worker=1)
    assert (document["peer"], document["queued"], document["channels"]) == (
        "1.2.3.4:5", 123, ["a", "b"])
    assert document["worker"] == 1
    assert "worker" not in _json(record)


def test_an_extra_field_cannot_replace_the_events_own_keys() -> None:
    document = _json(_record("real", time="forged", level="DEBUG", logger="x", worker=9))
    assert (document["time"], document["level"], document["logger"], document["message"]) == (
        "2023-11-14T22:13:20.250Z", "WARNING", "relay.test", "real")
    assert "worker" not in document


def test_a_traceback_is_one_string_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("internal error", exc_info=sys.exc_info())
    document = _json(record)
    assert document["message"] == "internal error"
    assert document["exc_info"].startswith("Traceback (most recent call last):")
    assert document["exc_info"].endswith("ValueError: boom")


def test_values_json_cannot_hold_are_written_as_text() -> None:
    document = _json(_record("odd values", huge=10**30, sock=object, nested={1: {2}}))
    assert document["huge"] == str(10**30)
    assert document["sock"] == str(object)
    assert document["nested"] == {"1": str({2})}


def test_a_message_that_does_not_format_is_still_logged() -> None:
    assert _json(_record("%d clients", "many"))["message"] == "%d clients"


def test_newlines_stay_inside_the_line() -> None:
    assert _json(_record("two\nlines"))["message"] == "two\nlines"


def test_the_text_format_is_unchanged() -> None:
    assert text_format(None) == "%(asctime)s %(levelname)s %(name)s: %(message)s"
    assert text_format(3) == "%(asctime)s [worker 3] %(levelname)s %(name)s: %(message)s"


# -- the real relay ----------------------------------------------------------------------------

def _documents(relay: RelayProcess) -> list[dict[str, Any]]:
    documents = []
    for line in relay.lines:
        document = json.loads(line)  # Every line, not only the relay's own events.
        assert isinstance(document, dict), line
        assert {"time", "level", "logger", "message"} <= document.keys(), line
        assert ISO_UTC_MS.match(document["time"]), line
        documents.append(document)
    return documents


def _messages(documents: list[dict[str, Any]], pattern: str) -> list[dict[str, Any]]:
    return [document for document in documents if re.search(pattern, document["message"])]


def test_the_relay_writes_one_json_object_per_line(start_relay) -> None:
    relay = start_relay(PGWS_LOG_FORMAT="json")
    accepted = token({"mode": "r", "channel": "chat"})
    forged = token({"mode": "rw"}, "x" * 32)
    with pytest.raises(InvalidStatus):
        connect(relay.url(f"/chat/{forged}"), open_timeout=10).close()
    with connect(relay.url(f"/chat/{accepted}"), open_timeout=10, close_timeout=5):
        relay.wait_for_line(r"client .* connected")
    relay.wait_for_line(r"client .* disconnected")
    start = len(relay.lines)
    relay.signal(signal.SIGUSR1)
    relay.wait_for_line(r'"message":"stats: clients=0 ', start=start)
    relay.signal(signal.SIGTERM)
    assert relay.wait_exit() == 0
    relay.stop()

    documents = _documents(relay)
    for pattern, level in (("^pgws-relay .*: connects websockets", "INFO"),
                           ("^listening on 127\\.0\\.0\\.1:", "INFO"),
                           ("^PGWS_JWT_SECRET: HMAC secret is 32 bytes", "WARNING"),
                           ("^rejecting request from .*: 400 Error: JWSError", "INFO"),
                           ("^client .* connected: mode 'r'", "DEBUG"),
                           ("^client .* disconnected", "DEBUG"),
                           ("^stats: clients=0 ", "INFO"),
                           ("^received SIGTERM, shutting down$", "INFO"),
                           ("^stopped; ", "INFO")):
        found = _messages(documents, pattern)
        assert [document["level"] for document in found] == [level], pattern
        assert "worker" not in found[0]
    for part in (*accepted.split("."), *forged.split(".")):
        assert part not in relay.log


def test_each_worker_names_itself_in_its_json_lines(start_relay) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    relay = start_relay(wait=False, PGWS_LOG_FORMAT="json", PGWS_WORKERS="2",
                        PGWS_PORT=str(port))
    first, _ = relay.wait_for_line_at(r'"message":"listening on channel')
    relay.wait_for_line(r'"message":"listening on channel', start=first + 1)
    relay.signal(signal.SIGTERM)
    assert relay.wait_exit() == 0
    relay.stop()
    documents = _documents(relay)
    listening = _messages(documents, "^listening on channel")
    assert sorted(document["worker"] for document in listening) == [0, 1]
    # The supervisor's own line (the secret warning, once) has no worker.
    (warning,) = _messages(documents, "^PGWS_JWT_SECRET: ")
    assert "worker" not in warning


def test_text_lines_keep_their_format(relay: RelayProcess) -> None:
    relay.signal(signal.SIGTERM)
    assert relay.wait_exit() == 0
    relay.stop()
    assert relay.lines and all(TEXT_LINE.match(line) for line in relay.lines), relay.log
    assert not any(line.lstrip().startswith("{") for line in relay.lines)

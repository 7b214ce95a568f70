"""Econia's DSS feed, unchanged: its schema and triggers, its tokens, its client (econia.md)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from websockets.sync.client import connect

from tests.helpers import DB_URI, Lines, RelayProcess, token

ECONIA_SECRET = "econia_0000000000000000000000000"
CHANNELS = [
    "market_registration_event", "place_limit_order_event", "place_market_order_event",
    "place_swap_order_event", "fill_event", "change_order_size_event", "cancel_order_event",
    "recognized_market_event", "updated_limit_order", "new_limit_order", "new_market_order",
    "new_swap_order",
]
SCHEMA = Path(__file__).parent / "econia" / "schema.sql"
EVENT_CLIENT = Path(__file__).parent / "econia" / "event_client.py"

FILL_SQL = """
INSERT INTO fill_events VALUES (154106900, 3, '0xaa', '2024-01-02 03:04:05.123456+00', '0xaa', 0,
  18446744073709551616000001, true, 7, 12345, 1, 100, '0xbb', 1, 99, 250)"""
FILL_TEXT = (
    '{"channel" : "fill_event", "payload" : {"txn_version":154106900,"event_idx":3,'
    '"emit_address":"0xaa","time":"2024-01-02T03:04:05.123456+00:00","maker_address":"0xaa",'
    '"maker_custodian_id":0,"maker_order_id":18446744073709551616000001,"maker_side":true,'
    '"market_id":7,"price":12345,"sequence_number_for_trade":1,"size":100,'
    '"taker_address":"0xbb","taker_custodian_id":1,"taker_order_id":99,'
    '"taker_quote_fees_paid":250}}'
)
ORDER_INSERT_SQL = """
INSERT INTO aggregator.user_history VALUES (7, 42, '2024-01-02 03:04:05+00', NULL, '0xdd', 0, 500,
  'open', 'market', '0xcc', 'sell', NULL, NULL, 0, 3, NULL, NULL, NULL, NULL, NULL, NULL, 0)"""
ORDER_UPDATE_SQL = """
UPDATE aggregator.user_history SET total_filled = 500, remaining_size = 0,
  order_status = 'closed', last_updated_at = '2024-01-02 03:04:06+00'
WHERE market_id = 7 AND order_id = 42"""
ORDER_TEXT = (
    '{"channel" : "updated_limit_order", "payload" : {"market_id":7,"order_id":42,'
    '"created_at":"2024-01-02T03:04:05+00:00","last_updated_at":"2024-01-02T03:04:06+00:00",'
    '"integrator":"0xdd","total_filled":500,"remaining_size":0,"order_status":"closed",'
    '"order_type":"market","user":"0xcc","direction":"sell","price":null,'
    '"average_execution_price":null,"custodian_id":0,"self_match_behavior":3,'
    '"restriction":null,"last_increase_stamp":null,"min_base":null,"max_base":null,'
    '"min_quote":null,"max_quote":null,"total_fees_paid_in_quote_subunits":0}}'
)


@pytest.fixture
def econia_db() -> Iterator[str]:
    """A scratch database with Econia's tables and triggers; dropped afterwards."""
    name = f"pgws_econia_{secrets.token_hex(4)}"
    with psycopg.connect(DB_URI, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    uri = DB_URI.rsplit("/", 1)[0] + f"/{name}"
    try:
        with psycopg.connect(uri, autocommit=True) as db:
            db.execute(SCHEMA.read_text())
        yield uri
    finally:
        with psycopg.connect(DB_URI, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_sql(uri: str, *statements: str) -> None:
    with psycopg.connect(uri) as db:
        db.execute("SET TIME ZONE 'UTC'")
        for statement in statements:
            db.execute(statement)
        db.commit()


@pytest.fixture
def econia_relay(start_relay, econia_db: str) -> RelayProcess:
    relay = start_relay(PGWS_DB_URI=econia_db, PGWS_JWT_SECRET=ECONIA_SECRET,
                        PGWS_LISTEN_CHANNEL="econiaws", PGWS_CHECK_LISTENER_INTERVAL="1000")
    relay.db_uri = econia_db  # type: ignore[attr-defined]
    return relay


def test_event_py_style_client_prints_the_exact_text(econia_relay: RelayProcess) -> None:
    env = {**os.environ, "WS_URL": f"ws://127.0.0.1:{econia_relay.port}",
           "WS_CHANNEL": "fill_event", "JWT_SECRET": ECONIA_SECRET}
    client = subprocess.Popen([sys.executable, str(EVENT_CLIENT)], env=env, text=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    output = Lines()
    output.read_from(client.stdout)
    try:
        output.wait_for(lambda: "Opened connection" in output.items, what="the client to connect")
        run_sql(econia_relay.db_uri, FILL_SQL)  # type: ignore[attr-defined]
        output.wait_for(lambda: len(output.items) >= 2, what="the fill event")
        assert output.items[1] == FILL_TEXT
    finally:
        client.kill()
        client.wait(10)


def test_all_channels_token_receives_fills_and_order_updates(econia_relay: RelayProcess) -> None:
    all_channels = token({"mode": "r", "channels": CHANNELS}, ECONIA_SECRET)
    fills_only = token({"mode": "r", "channels": ["fill_event"]}, ECONIA_SECRET)
    base = f"ws://127.0.0.1:{econia_relay.port}"
    with connect(f"{base}/{all_channels}", open_timeout=10) as everything, \
            connect(f"{base}/{fills_only}", open_timeout=10) as fills:
        run_sql(econia_relay.db_uri, ORDER_INSERT_SQL)  # type: ignore[attr-defined]
        run_sql(econia_relay.db_uri, FILL_SQL, ORDER_UPDATE_SQL)  # type: ignore[attr-defined]
        received = [everything.recv(timeout=10) for _ in range(2)]
        assert fills.recv(timeout=10) == FILL_TEXT
        with pytest.raises(TimeoutError):
            fills.recv(timeout=0.5)  # updated_limit_order is not in this token
    assert received == [FILL_TEXT, ORDER_TEXT]
    assert json.loads(received[0])["payload"]["maker_order_id"] == 18446744073709551616000001


def test_nothing_arrives_before_commit(econia_relay: RelayProcess) -> None:
    fills = token({"mode": "r", "channels": ["fill_event"]}, ECONIA_SECRET)
    uri = econia_relay.db_uri  # type: ignore[attr-defined]
    with connect(f"ws://127.0.0.1:{econia_relay.port}/{fills}", open_timeout=10) as client, \
            psycopg.connect(uri) as db:
        db.execute("SET TIME ZONE 'UTC'")
        db.execute(FILL_SQL)
        with pytest.raises(TimeoutError):
            client.recv(timeout=0.5)
        db.commit()
        assert client.recv(timeout=10) == FILL_TEXT


def test_econia_negative_cases(econia_relay: RelayProcess) -> None:
    from websockets.exceptions import InvalidStatus

    base = f"ws://127.0.0.1:{econia_relay.port}"
    cases = {
        token({"mode": "r", "channels": ["fill_event"]}, "x" * 32):
            b"Error: JWSError JWSInvalidSignature",
        token({"channels": ["fill_event"]}, ECONIA_SECRET): b"Missing mode",
        token({"mode": "r", "channels": ["fill_event"], "exp": 1}, ECONIA_SECRET):
            b"Token expired",
    }
    for jwt_text, body in cases.items():
        with pytest.raises(InvalidStatus) as info:
            connect(f"{base}/{jwt_text}", open_timeout=10)
        assert (info.value.response.status_code, info.value.response.body) == (400, body)
    with pytest.raises(InvalidStatus) as info:
        connect(f"{base}/cancel_order_event/"
                f"{token({'mode': 'r', 'channels': ['fill_event']}, ECONIA_SECRET)}",
                open_timeout=10)
    assert info.value.response.body == b"No allowed channels"

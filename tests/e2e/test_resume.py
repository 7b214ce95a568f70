"""Resumable streams end to end: the real ``pgws-relay``, the real PostgreSQL, and the
``websockets`` package speaking the documented protocol (README, docs/resume.md) by hand.

The trio-websocket client library is tested in tests/e2e/test_subscription.py.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from relay.wire import positions
from relay.wire.positions import Control, Delivery
from tests.e2e.test_admin import admin_port, metric
from tests.helpers import DB_URI, SEALER, RelayProcess, eventually, notify, token

SUB = [positions.SUBPROTOCOL]


def _p(n: int, channel: str = "c", **fields: object) -> str:
    return json.dumps({"channel": channel, "n": n, **fields})


@contextlib.contextmanager
def _open(relay: RelayProcess, position: str | None = None, path: str = "/c",
          subprotocols: list[str] | None = SUB, query: str = "",
          compression: str | None = "deflate", **options: Any) -> Iterator[ClientConnection]:
    params = [query] if query else []
    if position is not None:
        params.append(f"from={position}")
    url = relay.url(path + ("?" + "&".join(params) if params else ""))
    headers = {"Authorization": f"Bearer {token({'mode': 'r'})}"}
    with connect(url, subprotocols=subprotocols, additional_headers=headers,  # type: ignore[arg-type]
                 compression=compression, open_timeout=10, **options) as client:
        yield client


def _read(client: ClientConnection, timeout: float = 10) -> Delivery | Control:
    message = client.recv(timeout=timeout)
    assert isinstance(message, str)
    return positions.read(message)


def _caught_up(*relays: RelayProcess) -> None:
    """Return once each relay has taken in every notification committed before the call: a
    marker committed after them reaches a client only after they went through the hub."""
    for relay in relays:
        marker = json.dumps({"channel": "caught-up", "marker": time.monotonic_ns()})
        with _open(relay, path="/caught-up", subprotocols=None) as watcher:
            notify(relay.env["PGWS_LISTEN_CHANNEL"], marker)
            while watcher.recv(timeout=10) != marker:
                pass


def _n(event: Delivery | Control) -> int:
    assert isinstance(event, Delivery), event
    return json.loads(event.payload)["n"]


def test_a_client_that_does_not_ask_gets_todays_bytes_and_no_subprotocol(relay) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with _open(relay, subprotocols=None) as client:
        assert client.subprotocol is None
        notify(listen, _p(1))
        assert client.recv(timeout=10) == _p(1)


@pytest.mark.parametrize("compression", ["deflate", None])
def test_positions_survive_a_reconnect(relay, compression) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with _open(relay, compression=compression) as client:
        assert client.subprotocol == positions.SUBPROTOCOL
        start = _read(client)
        assert isinstance(start, Control) and start.event == "position"
        notify(listen, _p(1), _p(2, "other"), _p(3))
        first, third = _read(client), _read(client)
        assert (first.payload, third.payload) == (_p(1), _p(3))  # type: ignore[union-attr]
    notify(listen, _p(4), _p(5, "other"))
    notify(listen, _p(6))
    _caught_up(relay)
    with _open(relay, third.position, compression=compression) as client:
        assert _read(client) == Control("resumed", third.position, None, 2)
        assert [_n(_read(client)) for _ in range(2)] == [4, 6]
        notify(listen, _p(7))
        live = _read(client)
        assert _n(live) == 7
    # A position is good for a fresh connection as often as one likes.
    with _open(relay, start.position, compression=compression) as client:
        assert _read(client) == Control("resumed", start.position, None, 5)
        assert [_n(_read(client)) for _ in range(5)] == [1, 3, 4, 6, 7]


def test_filters_apply_to_what_is_replayed(relay) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with _open(relay, query="filter=market=eq.2") as client:
        start = _read(client)
    notify(listen, *[_p(n, market=n % 3) for n in range(1, 10)])
    _caught_up(relay)
    with _open(relay, start.position, query="filter=market=eq.2") as client:
        assert _read(client) == Control("resumed", start.position, None, 3)
        assert [_n(_read(client)) for _ in range(3)] == [2, 5, 8]


class _Producer(threading.Thread):
    """Commits notifications ``0 … total-1`` on channel c, ``per_transaction`` at a time."""

    def __init__(self, listen: str, total: int, per_transaction: int = 10) -> None:
        super().__init__(daemon=True)
        self.listen, self.total, self.per_transaction = listen, total, per_transaction
        self.done = threading.Event()

    def run(self) -> None:
        with psycopg.connect(DB_URI, autocommit=True) as db:
            for first in range(0, self.total, self.per_transaction):
                with db.transaction():
                    for n in range(first, min(first + self.per_transaction, self.total)):
                        db.execute("SELECT pg_notify(%s, %s)", (self.listen, _p(n)))
        self.done.set()


def test_the_seam_under_load_has_no_gap_and_no_duplicate(start_relay) -> None:
    """Reconnect every 100 messages while a producer commits: replays race live traffic, and
    some connections end in the middle of their replay."""
    total, per_connection = 3000, 100
    # 30 resumes in a second or two from one address: not what the resume rate is about.
    relay = start_relay(PGWS_HISTORY_MESSAGES=str(total), PGWS_MAX_RESUMES_PER_SECOND_PER_IP="0")
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    seen: list[int] = []
    outcomes: list[str] = []
    with _open(relay, max_queue=None) as client:
        position = _read(client).position
        producer = _Producer(listen, total)
        producer.start()
    while len(seen) < total:
        # An unbounded client-side queue: the connection is left with its replay unread, and
        # a bounded one would stop reading the socket, so the close handshake would wait for
        # its timeout behind the unsent rest.
        with _open(relay, position, max_queue=None) as client:
            outcome = _read(client)
            outcomes.append(outcome.event)
            for _ in range(min(per_connection, total - len(seen))):
                event = _read(client)
                seen.append(_n(event))
                position = event.position
    producer.join(30)
    assert seen == list(range(total))
    assert outcomes == ["resumed"] * (total // per_connection)


def _history_small(start_relay) -> RelayProcess:
    return start_relay(PGWS_HISTORY_MESSAGES="5")


def test_a_position_that_fell_out_of_the_history_is_lost_expired(start_relay) -> None:
    relay = _history_small(start_relay)
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with _open(relay) as client:
        start = _read(client)
    notify(listen, *[_p(n) for n in range(10)])
    _caught_up(relay)
    with _open(relay, start.position) as client:
        lost = _read(client)
        assert (lost.event, lost.reason) == ("lost", "expired")  # type: ignore[union-attr]
        notify(listen, _p(10))
        after = _read(client)
        assert _n(after) == 10
    # After the lost event's position, the stream is whole again.
    with _open(relay, lost.position) as client:
        assert _read(client) == Control("resumed", lost.position, None, 1)
        assert _n(_read(client)) == 10


def _terminate_listener(application: str) -> int:
    with psycopg.connect(DB_URI, autocommit=True) as db:
        return len(db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND query ILIKE 'LISTEN%%'", (application,)
        ).fetchall())


def test_a_listener_gap_is_told_to_connected_and_to_returning_clients(start_relay) -> None:
    relay = start_relay(PGWS_DB_URI=f"{DB_URI}?application_name=pgws-resume-gap-test")
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with _open(relay) as client:
        _read(client)
        notify(listen, _p(1))
        before = _read(client)
        assert _terminate_listener("pgws-resume-gap-test") >= 1
        gap = _read(client, timeout=20)
        assert (gap.event, gap.reason) == ("lost", "gap")  # type: ignore[union-attr]
        notify(listen, _p(2))
        assert _n(_read(client)) == 2
    with _open(relay, before.position) as client:
        lost = _read(client)
        assert (lost.event, lost.reason) == ("lost", "gap")  # type: ignore[union-attr]
    with _open(relay, gap.position) as client:
        assert _read(client) == Control("resumed", gap.position, None, 1)
        assert _n(_read(client)) == 2


def test_a_position_no_process_knows_is_lost_unknown(relay) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    stranger = SEALER.seal(positions.Position(0x12345678, 3, 0x0123456789ABCDEF,
                                              int(time.time())))
    with _open(relay, stranger) as client:
        lost = _read(client)
        assert (lost.event, lost.reason) == ("lost", "unknown")  # type: ignore[union-attr]
        notify(listen, _p(1))
        assert _n(_read(client)) == 1


def test_a_client_resumes_on_another_relay_on_the_same_database(start_relay) -> None:
    first = start_relay()
    listen = first.env["PGWS_LISTEN_CHANNEL"]
    second = start_relay(PGWS_LISTEN_CHANNEL=listen)
    notify(listen, *[_p(n, "warmup") for n in range(positions.WINDOW)])
    with _open(first) as client:
        _read(client)
        notify(listen, _p(1), _p(2))
        _read(client)
        seen = _read(client)
    notify(listen, _p(3), _p(4, "other"), _p(5))
    _caught_up(second)
    with _open(second, seen.position) as client:
        assert _read(client) == Control("resumed", seen.position, None, 2)
        got = [_read(client), _read(client)]
        assert [_n(e) for e in got] == [3, 5]
        assert got[0].position.split(".")[0] != seen.position.split(".")[0]  # Its own epoch.
    # And back: the second relay's positions resume on the first.
    notify(listen, _p(6))
    _caught_up(first)
    with _open(first, got[1].position) as client:
        assert _read(client) == Control("resumed", got[1].position, None, 1)
        assert _n(_read(client)) == 6


def test_resume_requests_that_cannot_be_taken_get_400(start_relay, relay) -> None:
    position = positions.Position(1, 1, 1).text()
    cases = [
        (relay, "from=not-a-position", SUB, "Invalid position"),
        (relay, "from=" + position, None, "Resuming needs the pgws.resume.v1 subprotocol"),
        (start_relay(PGWS_HISTORY_MESSAGES="0"), "from=" + position, SUB,
         "Cannot resume: history is off (PGWS_HISTORY_MESSAGES=0)"),
    ]
    for target, query, subprotocols, body in cases:
        with pytest.raises(InvalidStatus) as refused, _open(target, query=query,
                                                            subprotocols=subprotocols):
            pass
        assert refused.value.response.status_code == 400
        assert refused.value.response.body.decode() == body
    assert "400 Invalid position" in relay.log


def test_with_history_off_the_subprotocol_is_not_selected(start_relay) -> None:
    relay = start_relay(PGWS_HISTORY_MESSAGES="0")
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with _open(relay) as client:
        assert client.subprotocol is None
        notify(listen, _p(1))
        assert client.recv(timeout=10) == _p(1)


def test_resumes_and_the_history_are_in_the_metrics(start_relay) -> None:
    relay = start_relay(PGWS_ADMIN_PORT="0", PGWS_HISTORY_MESSAGES="3")
    port = admin_port(relay)
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with _open(relay) as client:
        start = _read(client)
    notify(listen, _p(1), _p(2), _p(3, "d"))
    _caught_up(relay)
    with _open(relay, start.position) as client:
        assert _read(client) == Control("resumed", start.position, None, 2)
    notify(listen, *[_p(n) for n in range(4, 8)])
    _caught_up(relay)
    with _open(relay, start.position) as client:
        assert _read(client).reason == "expired"  # type: ignore[union-attr]
    assert eventually(lambda: metric(port, "pgws_resumes_total", outcome="resumed") == 1
                      and metric(port, "pgws_resumes_total", outcome="expired") == 1)
    assert metric(port, "pgws_replayed_total") == 2
    assert metric(port, "pgws_history_entries") == 6  # Three of c, one of d, two markers.
    assert metric(port, "pgws_history_bytes") > 4 * 512
    assert metric(port, "pgws_resumes_total", outcome="gap") == 0
    assert relay.stats()["resumed"] == 1


def test_a_replay_beyond_the_queue_bound_is_not_a_slow_consumer(start_relay) -> None:
    """The replay is history's bytes, already held: it does not count against the bound that
    closes slow consumers, which still applies to live traffic queued behind it."""
    relay = start_relay(PGWS_HISTORY_MESSAGES="5000", PGWS_MAX_QUEUE_BYTES="65536")
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with _open(relay, compression=None) as client:
        start = _read(client)
    pad = "x" * 200
    for first in range(0, 2000, 500):
        notify(listen, *[_p(n, pad=pad) for n in range(first, first + 500)])
    _caught_up(relay)
    with _open(relay, start.position, compression=None) as client:
        assert _read(client) == Control("resumed", start.position, None, 2000)
        assert [_n(_read(client)) for _ in range(2000)] == list(range(2000))
        notify(listen, _p(2000))
        assert _n(_read(client)) == 2000
    assert "slow consumer" not in relay.log


def test_a_refreshed_token_outlives_the_first_exp_and_refreshes_are_one_a_second(
        relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    first_exp = int(time.time()) + 1
    later = first_exp + 2

    def rw(exp: int) -> str:
        return token({"mode": "rw", "channel": "c", "exp": exp})

    def answer(client: Any) -> dict[str, Any]:
        found = json.loads(client.recv(timeout=10))
        while found.get("event") == "position":  # A checkpoint may come first.
            found = json.loads(client.recv(timeout=10))
        return found  # type: ignore[no-any-return]

    url = relay.url(f"/c/{rw(first_exp)}")
    with connect(url, subprotocols=SUB, open_timeout=10) as client:  # type: ignore[arg-type]
        assert _read(client).event == "position"  # type: ignore[union-attr]
        client.send(json.dumps({"event": "token", "token": rw(later)}))
        assert answer(client) == {"event": "token", "exp": later}
        # Each refresh is a signature check: one a second, the next is refused, the new holds.
        client.send(json.dumps({"event": "token", "token": rw(later + 60)}))
        assert answer(client) == {"event": "token-refused",
                                  "reason": "one token refresh a second at most"}
        client.send("hello")  # Not a token event: published, with the new token's claims.
        echo = _read(client)
        while isinstance(echo, Control):
            echo = _read(client)
        assert json.loads(echo.payload)["claims"]["exp"] == later
        notify(listen, _p(1))
        # The token taken ends the connection (3001), after the first exp had passed.
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                client.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3001
        assert time.time() >= later - 1 >= first_exp


def test_a_read_only_connection_refreshes_its_token_and_a_wider_one_does_not_widen_it(
        relay: RelayProcess) -> None:
    soon = int(time.time()) + 60
    read = token({"mode": "r", "channel": "c", "exp": soon})
    with connect(relay.url(f"/c/{read}"), subprotocols=SUB,  # type: ignore[arg-type]
                 open_timeout=10) as client:
        assert _read(client).event == "position"  # type: ignore[union-attr]
        wider = token({"mode": "rw", "channel": "c", "exp": soon + 60})
        client.send(json.dumps({"event": "token", "token": wider}))
        answer = json.loads(client.recv(timeout=10))
        while answer.get("event") == "position":
            answer = json.loads(client.recv(timeout=10))
        assert answer == {"event": "token", "exp": soon + 60}
        client.send("not published: the connection is still read-only")
        notify(relay.env["PGWS_LISTEN_CHANNEL"], _p(7))
        delivered = _read(client)
        while isinstance(delivered, Control):
            delivered = _read(client)
        assert json.loads(delivered.payload)["n"] == 7  # The first thing after: no echo.


@pytest.mark.slow
def test_one_connection_refreshed_ten_times_lives_past_every_tokens_exp(
        relay: RelayProcess) -> None:
    """Each token ends 3–4 seconds after it is sent, and a new one comes every second or so
    (the relay takes one a second): the connection outlives all ten, then ends at the last."""
    start = time.time()

    def rw(exp: float) -> str:
        return token({"mode": "rw", "channel": "c", "exp": int(exp)})

    with connect(relay.url(f"/c/{rw(start + 4)}"), subprotocols=SUB,  # type: ignore[arg-type]
                 open_timeout=10) as client:
        assert _read(client).event == "position"  # type: ignore[union-attr]
        taken = 0
        spacing = threading.Event()  # Never set: its wait paces the refreshes, as a client would.
        while taken < 10:
            spacing.wait(1.1)
            exp = int(time.time()) + 4  # At least 3 s ahead: a loaded machine is slow.
            client.send(json.dumps({"event": "token", "token": rw(exp)}))
            answer = json.loads(client.recv(timeout=10))
            while answer.get("event") == "position":
                answer = json.loads(client.recv(timeout=10))
            assert answer == {"event": "token", "exp": exp}, answer
            taken += 1
        assert time.time() > start + 4 + 5  # Well past the first token's end, still open.
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                client.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3001

"""End to end: ``filter`` query parameters and the ``filters`` claim, through the real relay.

Clients: the ``websockets`` package (which offers permessage-deflate, so these deliveries are
compressed), trio-websocket (which does not), and a raw socket where the bytes matter.
"""

from __future__ import annotations

import contextlib
import json
import random
from typing import Any
from urllib.parse import quote

import pytest
import trio
from trio_websocket import open_websocket_url
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from relay.wire import frames
from tests.helpers import RelayProcess, eventually, notify, raw_client, token

READ = token({"mode": "r"})
#: A u128 order id (numeric(39) in Econia's tables) and its neighbour: the same double.
BIG = 18446744073709551616000001
NEAR = BIG + 1


def fill(n: int, market: int, maker_side: bool, maker: str = "0xaa", order: int = 99) -> str:
    """An Econia fill_event notification as its trigger writes it (econia.md 2.3)."""
    row = {"txn_version": 154106900 + n, "event_idx": n, "maker_address": maker,
           "maker_order_id": order, "maker_side": maker_side, "market_id": market,
           "price": 12345 + n, "size": 100}
    return '{"channel" : "fill_event", "payload" : ' + json.dumps(row) + "}"


def query(*filters: str) -> str:
    return "?" + "&".join("filter=" + quote(text, safe="=.,") for text in filters)


def ws(relay: RelayProcess, path: str, **kwargs: Any):
    return connect(relay.url(path), open_timeout=10, close_timeout=5, **kwargs)


def received(client: Any, count: int) -> list[str]:
    return [client.recv(timeout=10) for _ in range(count)]


def test_filters_narrow_a_channel_to_what_each_client_asked_for(relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    rng = random.Random(7)
    events = [fill(n, rng.choice([6, 7, 8]), rng.random() < 0.5, rng.choice(["0xaa", "0xbb"]))
              for n in range(60)]
    cases = {
        "market 7": (("payload.market_id=eq.7",),
                     lambda p: p["market_id"] == 7),
        "market 7, maker side": (("payload.market_id=eq.7", "payload.maker_side=is.true"),
                                 lambda p: p["market_id"] == 7 and p["maker_side"] is True),
        "one maker": (("payload.maker_address=eq.0xbb",), lambda p: p["maker_address"] == "0xbb"),
        "markets 6 or 8": (("payload.market_id=in.(6,8)",), lambda p: p["market_id"] in (6, 8)),
        "not market 7": (("payload.market_id=neq.7",), lambda p: p["market_id"] != 7),
        "late fills": (("payload.txn_version=gte.154106930",),
                       lambda p: p["txn_version"] >= 154106930),
        "everything": ((), lambda p: True),
    }
    with contextlib.ExitStack() as stack:
        clients = {name: stack.enter_context(ws(relay, f"/fill_event/{READ}{query(*texts)}"))
                   for name, (texts, _) in cases.items()}
        notify(listen, *events)
        for name, (_, wanted) in cases.items():
            expected = [e for e in events if wanted(json.loads(e)["payload"])]
            assert expected, name
            assert received(clients[name], len(expected)) == expected, name
        # Nothing else came: two later fills that between them every filter matches arrive
        # next, each where it matches, and nothing of the first transaction before them.
        fences = [fill(1000, 7, True, "0xbb"), fill(1001, 8, True, "0xbb")]
        notify(listen, *fences)
        for name, (_, wanted) in cases.items():
            expected = [f for f in fences if wanted(json.loads(f)["payload"])]
            assert expected, name
            assert received(clients[name], len(expected)) == expected, name


def test_a_client_receives_nothing_its_filter_does_not_match(relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with ws(relay, f"/fill_event/{READ}{query('payload.market_id=eq.7')}") as seven:
        notify(listen, *[fill(n, 8, True) for n in range(20)])
        last = fill(100, 7, False)
        notify(listen, last)
        # The market-8 fills were committed first: had any passed, it would come before this.
        assert seven.recv(timeout=10) == last


def test_u128_ids_compare_exactly(relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    path = f"/fill_event/{READ}{query(f'payload.maker_order_id=eq.{BIG}')}"
    with ws(relay, path) as exact:
        near, hit = fill(1, 7, True, order=NEAR), fill(2, 7, True, order=BIG)
        notify(listen, near, hit)
        assert exact.recv(timeout=10) == hit  # NEAR is the same double as BIG, not the same id.


def test_the_claims_filters_cannot_be_widened_by_the_url(relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    only7 = token({"mode": "r", "filters": ["payload.market_id=eq.7"]})
    seven, eight = fill(1, 7, True), fill(2, 8, True)
    with ws(relay, f"/fill_event/{only7}") as claimed, \
            ws(relay, f"/fill_event/{only7}{query('payload.market_id=eq.8')}") as widened, \
            ws(relay, f"/fill_event/{only7}{query('payload.market_id=in.(7,8)')}") as listed, \
            ws(relay, f"/fill_event/{only7}{query('payload.maker_side=is.false')}") as narrowed:
        notify(listen, eight, seven)
        assert claimed.recv(timeout=10) == seven
        assert listed.recv(timeout=10) == seven
        late = fill(3, 7, False)
        notify(listen, late)
        assert claimed.recv(timeout=10) == late
        assert listed.recv(timeout=10) == late
        assert narrowed.recv(timeout=10) == late  # Not `seven` (maker side) nor `eight`.
        # Market 7 and market 8 at once: nothing, ever. Every frame the relay offered went to
        # the other three (2 + 2 + 1), so none went to it.
        assert relay.stats()["frames_offered"] == 5
        with pytest.raises(TimeoutError):
            widened.recv(timeout=0)


@pytest.mark.parametrize(("texts", "status_text"), [
    (("payload.market_id=like.7",), 'filter "payload.market_id=like.7": unknown operator'),
    (("payload.market_id=gt.seven",), 'filter "payload.market_id=gt.seven"'),
    (("payload.market_id=in.(1,2",), 'filter "payload.market_id=in.(1,2"'),
    (("payload.market_id",), 'filter "payload.market_id"'),
    (("payload.maker_side=is.maybe",), 'filter "payload.maker_side=is.maybe"'),
    (("payload.market_id=eq.7", ""), 'filter ""'),
])
def test_a_bad_filter_is_400_naming_it(relay: RelayProcess, texts: tuple[str, ...],
                                       status_text: str) -> None:
    with pytest.raises(InvalidStatus) as info:
        ws(relay, f"/fill_event/{READ}{query(*texts)}")
    response = info.value.response
    body = response.body.decode()
    assert response.status_code == 400
    assert body.startswith(status_text) and "\n" not in body, body
    assert "filter" in relay.wait_for_line(r"rejecting request from .*: 400 (.*)").group(1)
    # The relay goes on serving.
    with ws(relay, f"/fill_event/{READ}") as fine:
        payload = fill(1, 7, True)
        notify(relay.env["PGWS_LISTEN_CHANNEL"], payload)
        assert fine.recv(timeout=10) == payload


@pytest.mark.parametrize(("claim", "message"), [
    ("payload.market_id=eq.7", "Error: filters claim: expected a list of strings"),
    (["payload.market_id=eq.7", 7], "Error: filters claim: expected a list of strings"),
    (["payload.market_id=zz.7"], 'Error: filters claim "payload.market_id=zz.7"'),
])
def test_a_bad_filters_claim_refuses_the_token(relay: RelayProcess, claim: Any,
                                               message: str) -> None:
    with pytest.raises(InvalidStatus) as info:
        ws(relay, f"/fill_event/{token({'mode': 'r', 'filters': claim})}")
    assert info.value.response.status_code == 400
    assert info.value.response.body.decode().startswith(message)
    assert relay.stats()["rejected"] == 1


def test_filters_with_the_token_in_the_query_or_a_bearer_header(relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    filtered = query("payload.market_id=eq.7")
    with ws(relay, f"/fill_event{filtered}&jwt={READ}") as by_query, \
            ws(relay, f"/fill_event{filtered}",
               additional_headers={"Authorization": f"Bearer {READ}"}) as by_header:
        eight, seven = fill(1, 8, True), fill(2, 7, True)
        notify(listen, eight, seven)
        assert by_query.recv(timeout=10) == seven
        assert by_header.recv(timeout=10) == seven


def test_filters_apply_to_every_channel_of_a_multi_channel_token(relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    both = token({"mode": "r", "channels": ["fill_event", "place_market_order_event"]})
    order = ('{"channel" : "place_market_order_event", "payload" : {"market_id":7,'
             '"order_id":42,"size":500}}')
    other = order.replace('"market_id":7', '"market_id":9')
    with ws(relay, f"/{both}{query('payload.market_id=eq.7')}") as client:
        notify(listen, fill(1, 9, True), other, order, fill(2, 7, True))
        # Across channels, in PostgreSQL's order.
        assert received(client, 2) == [order, fill(2, 7, True)]


def test_a_client_without_filters_gets_exactly_the_bytes_it_got_before(
        relay: RelayProcess) -> None:
    """No ``filter`` and no compression offered: the very frames upstream would send."""
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    sock, _ = raw_client(relay.port, f"/fill_event/{READ}?other=ignored")
    filtered_sock, _ = raw_client(relay.port,
                                  f"/fill_event/{READ}{query('payload.market_id=eq.7')}")
    try:
        payloads = [fill(1, 7, True), fill(2, 8, False)]
        notify(listen, *payloads)
        expected = b"".join(frames.text(p.encode()) for p in payloads)
        data = b""
        while len(data) < len(expected):
            data += sock.recv(65536)
        assert data == expected
        only = frames.text(payloads[0].encode())
        data = b""
        while len(data) < len(only):
            data += filtered_sock.recv(65536)
        assert data == only
    finally:
        sock.close()
        filtered_sock.close()


async def test_trio_websocket_clients_with_filters(relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    url = relay.url(f"/fill_event/{READ}{query('payload.market_id=eq.7', 'payload.size=gt.50')}")
    with trio.fail_after(20):
        async with open_websocket_url(url) as client:
            small = fill(1, 7, True).replace('"size": 100', '"size": 10')
            hit = fill(2, 7, True)
            await trio.to_thread.run_sync(notify, listen, small, fill(3, 8, True), hit)
            assert await client.get_message() == hit


def test_distinct_filter_sets_per_channel_are_capped_with_a_503(start_relay: Any) -> None:
    relay = start_relay(PGWS_MAX_FILTER_SETS="2")
    path = f"/fill_event/{READ}"
    with ws(relay, path + query("payload.market_id=eq.7")), \
            ws(relay, path + query("payload.market_id=eq.8")) as eight:
        with pytest.raises(InvalidStatus) as info:
            ws(relay, path + query("payload.market_id=eq.9"))
        assert (info.value.response.status_code, info.value.response.body) == (
            503, b"Too many distinct filters")
        # A set the channel already has, and no filter at all, still fit.
        with ws(relay, path + query("payload.market_id=eq.7")), ws(relay, path):
            pass
        eight.close()
        # Once its last client is gone, a set's place is free again.
        eventually(lambda: _connects(relay, path + query("payload.market_id=eq.9")),
                   what="a free filter set")


def _connects(relay: RelayProcess, path: str) -> bool:
    try:
        with ws(relay, path):
            return True
    except InvalidStatus:
        return False

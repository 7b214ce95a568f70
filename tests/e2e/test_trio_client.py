"""End to end with trio-websocket as the client."""

from __future__ import annotations

import json

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.helpers import RelayProcess, notify, token


async def test_trio_websocket_receives_verbatim_and_echo(relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with trio.fail_after(20):
        async with open_websocket_url(relay.url(f"/room/{token({'mode': 'rw'})}")) as ws:
            payload = '{"channel" : "room", "n" : 1, "s" : "ünïcode"}'
            await trio.to_thread.run_sync(notify, listen, payload)
            assert await ws.get_message() == payload
            await ws.send_message("from trio")
            echo = json.loads(await ws.get_message())
            assert (echo["channel"], echo["payload"]) == ("room", "from trio")


async def test_trio_websocket_exp_close(relay: RelayProcess) -> None:
    import time

    expiring = token({"mode": "r", "exp": int(time.time()) + 2})
    with trio.fail_after(20):
        async with open_websocket_url(relay.url(f"/room/{expiring}")) as ws:
            try:
                await ws.get_message()
            except ConnectionClosed as closed:
                assert (closed.reason.code, closed.reason.reason) == (3001, "JWT expired")
            else:
                raise AssertionError("no close")

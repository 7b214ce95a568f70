"""Idle clients rest without a task (relay/transports/idle.py), and lose nothing by it.

An idle WebSocket client on a plain socket has no task of its own: it waits in its worker's
epoll. Everything a client does must still work through that rest: receiving (the hub writes to
its socket directly), sending, answering pings, being closed at its token's ``exp``, being
woken to write what its socket did not take, and the relay's shutdown. The admin listener's
``pgws_clients_resting`` says how many rest.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from wsproto.events import CloseConnection, Message, Pong, TextMessage

from bench.parts.harness import frame
from tests.e2e.test_admin import admin_port, metric
from tests.helpers import TIMEOUT, RelayProcess, eventually, notify, raw_client, token


def _resting(admin: int) -> float:
    return metric(admin, "pgws_clients_resting")


def test_idle_clients_rest_and_still_receive_send_and_are_closed_at_shutdown(
        start_relay) -> None:
    relay: RelayProcess = start_relay(PGWS_ADMIN_PORT="0")
    admin = admin_port(relay)
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(relay.url(f"/c/{token({'mode': 'rw'})}"),
                                               open_timeout=10)) for _ in range(20)]
        eventually(lambda: _resting(admin) == 20, what="20 clients resting")
        woken = metric(admin, "pgws_clients_woken_total")
        notify(listen, '{"channel":"c","n":1}')
        assert [c.recv(timeout=TIMEOUT) for c in clients] == ['{"channel":"c","n":1}'] * 20
        # Written to the resting sockets directly: nobody needed a task for it.
        assert metric(admin, "pgws_clients_woken_total") == woken
        # A client's message wakes it; its write reaches every reader, itself included.
        clients[0].send("from a resting client")
        for client in clients:
            envelope = json.loads(client.recv(timeout=TIMEOUT))
            assert envelope["payload"] == "from a resting client"
        assert metric(admin, "pgws_clients_woken_total") > woken
        eventually(lambda: _resting(admin) == 20, what="all resting again")
        # A ping from the client is answered (wakes it, then it rests again).
        clients[1].ping(b"still there?").wait(TIMEOUT)
        # Shutdown: each resting client gets 1001, and the relay exits 0.
        relay.signal(signal.SIGTERM)
        for client in clients:
            with pytest.raises(ConnectionClosed) as closed:
                client.recv(timeout=TIMEOUT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert relay.wait_exit() == 0


def test_a_resting_client_is_closed_at_its_tokens_exp(start_relay) -> None:
    relay: RelayProcess = start_relay(PGWS_ADMIN_PORT="0")
    admin = admin_port(relay)
    expires = int(time.time()) + 2
    with connect(relay.url(f"/c/{token({'mode': 'r', 'exp': expires})}"),
                 open_timeout=10) as client:
        eventually(lambda: _resting(admin) == 1, what="the client resting")
        with pytest.raises(ConnectionClosed) as closed:
            client.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (3001, "JWT expired")
    assert time.time() >= expires
    eventually(lambda: _resting(admin) == 0, what="nobody resting")


def test_a_resting_client_whose_socket_is_full_is_woken_to_write_the_rest(
        start_relay) -> None:
    relay: RelayProcess = start_relay(PGWS_ADMIN_PORT="0", PGWS_SEND_BUFFER="4096")
    admin = admin_port(relay)
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    sock, conn = raw_client(relay.port, f"/c/{token({'mode': 'r'})}", rcvbuf=4096)
    with contextlib.closing(sock):
        eventually(lambda: _resting(admin) == 1, what="the client resting")
        woken = metric(admin, "pgws_clients_woken_total")
        # Far more than both socket buffers hold while the client reads nothing: the rest is
        # queued, which needs a writer, which needs the client woken.
        payloads = [json.dumps({"channel": "c", "n": n, "pad": "x" * 4000}) for n in range(60)]
        notify(listen, *payloads)
        eventually(lambda: metric(admin, "pgws_clients_woken_total") > woken,
                   what="the client woken")
        received: list[str] = []
        partial = ""
        while len(received) < len(payloads):
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            conn.receive_data(data)
            for event in conn.events():
                if isinstance(event, TextMessage):
                    partial += event.data
                    if event.message_finished:
                        received.append(partial)
                        partial = ""
                assert not isinstance(event, CloseConnection), event
        assert received == payloads
        eventually(lambda: _resting(admin) == 1, what="resting again once written")


def test_a_frame_cut_by_a_rest_and_a_message_cut_into_fragments_arrive_whole(start_relay) -> None:
    relay: RelayProcess = start_relay(PGWS_ADMIN_PORT="0")
    admin = admin_port(relay)
    writer, conn = raw_client(relay.port, f"/c/{token({'mode': 'w'})}")
    with contextlib.closing(writer), connect(relay.url(f"/c/{token({'mode': 'r'})}"),
                                             open_timeout=10) as reader:
        eventually(lambda: _resting(admin) == 2, what="both resting")
        # Half a frame: the parser holds bytes, so it is kept while the connection rests.
        frame = conn.send(Message("cut in a frame"))
        writer.sendall(frame[:5])
        eventually(lambda: _resting(admin) == 2, what="resting with half a frame")
        writer.sendall(frame[5:])
        assert json.loads(reader.recv(timeout=TIMEOUT))["payload"] == "cut in a frame"
        # A message in two fragments: in between, the connection keeps its task (the message
        # so far is the reader's), and the reader alone rests.
        writer.sendall(conn.send(Message("cut in ", message_finished=False)))
        eventually(lambda: _resting(admin) == 1, what="the writer awake between fragments")
        writer.sendall(conn.send(Message("a message")))
        assert json.loads(reader.recv(timeout=TIMEOUT))["payload"] == "cut in a message"


def test_resting_clients_answer_the_servers_pings_without_being_woken(start_relay) -> None:
    relay: RelayProcess = start_relay(PGWS_ADMIN_PORT="0", PGWS_PING_INTERVAL="0.5")
    admin = admin_port(relay)
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with contextlib.ExitStack() as stack:
        # The websockets client answers every ping with a pong, as browsers do.
        clients = [stack.enter_context(connect(relay.url(f"/c/{token({'mode': 'r'})}"),
                                               open_timeout=10)) for _ in range(10)]
        eventually(lambda: _resting(admin) == 10, what="10 clients resting")
        woken = metric(admin, "pgws_clients_woken_total")
        pongs = metric(admin, "pgws_clients_pongs_at_rest_total")
        eventually(lambda: metric(admin, "pgws_clients_pongs_at_rest_total") >= pongs + 30,
                   what="three rounds of pongs read at rest")
        assert metric(admin, "pgws_clients_woken_total") == woken
        assert _resting(admin) == 10
        notify(listen, '{"channel":"c","n":1}')
        assert [c.recv(timeout=TIMEOUT) for c in clients] == ['{"channel":"c","n":1}'] * 10


def test_a_pong_and_a_message_in_one_write_wake_the_client_and_the_message_arrives(
        start_relay) -> None:
    relay: RelayProcess = start_relay(PGWS_ADMIN_PORT="0")
    admin = admin_port(relay)
    writer, conn = raw_client(relay.port, f"/c/{token({'mode': 'w'})}")
    with contextlib.closing(writer), connect(relay.url(f"/c/{token({'mode': 'r'})}"),
                                             open_timeout=10) as reader:
        eventually(lambda: _resting(admin) == 2, what="both resting")
        pongs = metric(admin, "pgws_clients_pongs_at_rest_total")
        writer.sendall(conn.send(Pong(b"1")) + conn.send(Message("behind a pong")))
        assert json.loads(reader.recv(timeout=TIMEOUT))["payload"] == "behind a pong"
        writer.sendall(conn.send(Pong(b"2")))  # A pong alone is read where it rests.
        eventually(lambda: metric(admin, "pgws_clients_pongs_at_rest_total") == pongs + 1,
                   what="the lone pong read at rest")


def test_a_client_flooding_pongs_while_it_rests_is_closed_for_its_frame_budget(
        start_relay) -> None:
    relay: RelayProcess = start_relay(PGWS_ADMIN_PORT="0",
                                      PGWS_MAX_CLIENT_FRAMES_PER_SECOND="10")
    admin = admin_port(relay)
    sock, conn = raw_client(relay.port, f"/c/{token({'mode': 'r'})}")
    with contextlib.closing(sock):
        eventually(lambda: _resting(admin) == 1, what="the client resting")
        # Pongs two at a time, each pair read where the connection rests before the next is
        # sent, faster than the budget's 10 frames a second (a pair takes a few ms).
        closes: list[CloseConnection] = []
        with contextlib.suppress(OSError):
            for _ in range(500):
                read = metric(admin, "pgws_clients_pongs_at_rest_total")
                sock.sendall(frame(0xA, b"ab") * 2)
                eventually(lambda before=read: metric(  # type: ignore[misc]
                    admin, "pgws_clients_pongs_at_rest_total") > before
                    or metric(admin, "pgws_clients_inbound_limited_total") > 0,
                    what="the pongs read")
                if metric(admin, "pgws_clients_inbound_limited_total") > 0:
                    break
        assert metric(admin, "pgws_clients_inbound_limited_total") == 1
        while not closes:
            data = sock.recv(65536)
            assert data, "closed without a close frame"
            conn.receive_data(data)
            closes = [e for e in conn.events() if isinstance(e, CloseConnection)]
        assert (closes[0].code, closes[0].reason) == (1008, "too many frames")


def test_many_pongs_in_one_read_are_handed_to_the_connections_task(start_relay) -> None:
    relay: RelayProcess = start_relay(PGWS_ADMIN_PORT="0")
    admin = admin_port(relay)
    sock, _ = raw_client(relay.port, f"/c/{token({'mode': 'r'})}")
    with contextlib.closing(sock):
        eventually(lambda: _resting(admin) == 1, what="the client resting")
        woken = metric(admin, "pgws_clients_woken_total")
        sock.sendall(frame(0xA, b"ab") * 40)  # More than a resting read takes.
        eventually(lambda: metric(admin, "pgws_clients_woken_total") > woken,
                   what="the client woken for them")
        eventually(lambda: _resting(admin) == 1, what="resting again")
        assert metric(admin, "pgws_clients_pongs_at_rest_total") == 0

"""Static files through the real relay (as upstream serves them, and where it does not), with
raw requests whose bytes we choose: dot segments, links out of the root, and targets that once
cost a traceback."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from tests.helpers import TIMEOUT, RelayProcess


def _exchange(relay: RelayProcess, target: bytes, method: bytes = b"GET"
              ) -> tuple[bytes, bytes]:
    """Send one request for ``target`` as given; the status line and the body of the answer."""
    start = len(relay.lines)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
        sock.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):  # Until the relay closes, as asked.
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.partition(b"\r\n")[0]
    assert status.startswith(b"HTTP/1.1 "), f"no HTTP answer to {target!r}: {data!r}"
    # The relay logs each answer after sending it: wait for it, so the log is complete.
    relay.wait_for_line(rf"HTTP {method.decode()} {status.split()[1].decode()} from",
                        start=start)
    return status, body


def _assert_no_traceback(relay: RelayProcess) -> None:
    assert "Traceback" not in relay.log and "internal error" not in relay.log, relay.log


def test_dot_segments_are_neither_served_nor_listed(start_relay, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SECRET=1")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]")
    (tmp_path / "sub" / ".git").mkdir(parents=True)
    (tmp_path / "sub" / ".git" / "config").write_text("[core]")
    (tmp_path / "app.js").write_text("1")
    relay = start_relay(PGWS_ROOT_PATH=str(tmp_path))

    for target in (b"/.env", b"/%2eenv", b"/.git/", b"/.git/config", b"/sub/.git/config",
                   b"/sub/%2Egit/config", b"/../../etc/passwd", b"/%2e%2e/%2e%2e/etc/passwd"):
        assert _exchange(relay, target) == (b"HTTP/1.1 404 Not Found", b"File not found"), target
    status, listing = _exchange(relay, b"/")
    assert status == b"HTTP/1.1 200 OK" and b"app.js" in listing and b"sub" in listing
    assert b".env" not in listing and b".git" not in listing
    status, sub = _exchange(relay, b"/sub/")
    assert status == b"HTTP/1.1 200 OK" and b".git" not in sub
    assert _exchange(relay, b"/app.js") == (b"HTTP/1.1 200 OK", b"1")
    _assert_no_traceback(relay)


def test_index_file_linked_out_of_the_root_is_not_served(start_relay, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root:x:0:0")
    www = tmp_path / "www"
    (www / "sub").mkdir(parents=True)
    (www / "sub" / "index.html").symlink_to(secret)
    (www / "page.html").write_text("<p>page</p>")
    (www / "in").mkdir()
    (www / "in" / "index.html").symlink_to("../page.html")  # Stays inside the root: served.
    relay = start_relay(PGWS_ROOT_PATH=str(www))

    status, body = _exchange(relay, b"/sub/")
    assert b"root:x" not in body and b"index.html" not in body, (status, body)
    assert _exchange(relay, b"/sub/index.html") == (b"HTTP/1.1 404 Not Found", b"File not found")
    assert _exchange(relay, b"/in/") == (b"HTTP/1.1 200 OK", b"<p>page</p>")
    _assert_no_traceback(relay)


def test_odd_targets_get_an_answer_not_a_traceback(start_relay, tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "dir" / "index.html")
    relay = start_relay(PGWS_ROOT_PATH=str(tmp_path))

    # (Raw bytes outside ASCII never reach the file server: h11 refuses the request line.)
    bad = (b"HTTP/1.1 400 Bad Request", b"Bad Request")
    not_found = (b"HTTP/1.1 404 Not Found", b"File not found")
    for target, expected in ((b"/%00", bad), (b"/file.txt%00.html", bad), (b"/%zz", bad),
                             (b"*", bad), (b"/%ff%fe", not_found),
                             (b"/" + b"a" * 300, not_found), (b"/a" * 3000, not_found),
                             (b"/fifo", not_found), (b"/dir/index.html", not_found),
                             (b"http://x/etc/passwd", not_found),
                             (b"http://x/file.txt", (b"HTTP/1.1 200 OK", b"x"))):
        assert _exchange(relay, target) == expected, target
        assert _exchange(relay, target, b"HEAD") == (expected[0], b""), target
    status, listing = _exchange(relay, b"/dir/")
    assert status == b"HTTP/1.1 200 OK" and b"index.html" not in listing
    _assert_no_traceback(relay)

"""A raw-socket fuzzer for the relay's HTTP handshake and WebSocket frames.

    python -m bench.reliability.fuzz --cases 100000 --procs 4 \
        --json bench/results/reliability/fuzz.json

Theory of operation
-------------------
Each case belongs to a family (:data:`FAMILIES`): a function of a seeded ``random.Random``
that returns what to send and the outcomes the relay may answer with. Handshake families send
a (broken) request on a new connection; plain-HTTP families a request for the relay's static
root (:func:`make_root`: dot files, a link out of the root); frame families first complete a
valid ``rw`` handshake on a channel of their own, then send (broken) frames, floods among them.
After sending, the client half-closes its side, so the relay always sees an end, and reads the
relay's answer:

- ``http <status>``: an HTTP response other than 101;
- ``close <code>``: a WebSocket close frame (after 101);
- ``data``: a text frame first (the echo of a valid message; the case then closes 1000);
- ``eof``: the connection closed with no answer.

(A case that expects the echo of a valid message does not half-close: the relay rightly
drops a client that ends its side before its message is published.) A case fails when its
outcome is not among the family's. Throughout, a normal ``rw`` client stays connected and
makes a round trip (message → NOTIFY → echo) every ``--check-every`` cases; at the end the
relay's ``stats:`` line must show that client alone, and the same tasks and open file
descriptors (other than the NOTIFY pool's, which grows on demand) as before the first case.
The relay must still be running.

``tests/e2e/test_fuzz.py`` runs a few hundred cases in CI; this script runs 100,000 for the report.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import hashlib
import hmac
import json
import multiprocessing as mp
import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.parts.harness import (
    SECRET,
    Server,
    commit,
    dumps,
    frame,
    free_port,
    handshake,
    machine,
    token,
)
from bench.parts.leaks import Relay, pool_at_rest, settled, sockets_open
from relay.transports.websocket import MAX_FRAGMENTS

#: The relay under fuzzing refuses client messages above this many bytes (1009).
MAX_MESSAGE = 4096
#: Frames per second one fuzzing client may send: above a fragment flood (the relay's cap of
#: 4,096 fragments answers it with 1009) and below a frame flood (answered with 1008).
MAX_FRAMES = 6000


def relay_env(root: str, admin_port: int) -> dict[str, str]:
    """Relay settings for fuzzing: the bench's secret (the cases' tokens are signed with it), a
    small message limit so that "oversized" is cheap to send, the static root ``root``, the
    admin listener on ``admin_port``, and no resume rate (the cases resume far more often than
    any client may, to reach the replay; the rate itself is tested in tests/e2e)."""
    return {"PGWS_JWT_SECRET": SECRET, "PGWS_MAX_MESSAGE_SIZE": str(MAX_MESSAGE),
            "PGWS_MAX_CLIENT_FRAMES_PER_SECOND": str(MAX_FRAMES), "PGWS_ROOT_PATH": root,
            "PGWS_ADMIN_PORT": str(admin_port), "PGWS_MAX_RESUMES_PER_SECOND_PER_IP": "0"}


def make_root(directory: str) -> str:
    """A static root in ``directory`` holding what must never be served: dot files and a
    directory whose index is a link out of the root."""
    os.makedirs(os.path.join(directory, ".git"), exist_ok=True)
    os.makedirs(os.path.join(directory, "out"), exist_ok=True)
    for name, text in ((".env", "SECRET=1"), (".git/config", "[core]"), ("app.js", "1")):
        with open(os.path.join(directory, name), "w") as handle:
            handle.write(text)
    index = os.path.join(directory, "out", "index.html")
    if not os.path.islink(index):
        os.symlink("/etc/passwd", index)
    return directory

#: Seconds a case waits for the relay's answer; far above any answer's time, so a timeout
#: means the relay did not answer.
_ANSWER_WAIT = 10.0
_RW = token({"mode": "rw"})
_BAD_CLOSE_CODES = (0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535)

Case = tuple[bytes, bytes, frozenset[str]]  # request, frames after a 101, allowed outcomes


def _request(target: str, headers: dict[str, str] | None = None) -> bytes:
    fields = {"Host": "127.0.0.1", "Upgrade": "websocket", "Connection": "Upgrade",
              "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
              "Sec-WebSocket-Version": "13", **(headers or {})}
    lines = [f"GET {target} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items() if v)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _valid_request(rng: random.Random) -> bytes:
    return _request(f"/fuzz{rng.getrandbits(32)}/{_RW}")


# -- handshake families ------------------------------------------------------------------------

def truncated_request(rng: random.Random) -> Case:
    request = _valid_request(rng)
    return request[:rng.randrange(len(request) - 1)], b"", frozenset({"eof", "http 400"})


def huge_headers(rng: random.Random) -> Case:
    value = "a" * rng.randrange(17_000, 100_000)
    return (_request(f"/c/{_RW}", {"X-Big": value}), b"",
            frozenset({"http 431", "http 400", "eof"}))


def garbage_request(rng: random.Random) -> Case:
    junk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 400)))
    return junk + b"\r\n\r\n", b"", frozenset({"http 400", "eof"})


def invalid_utf8_target(rng: random.Random) -> Case:
    junk = bytes(rng.choice(b"\x80\xbf\xc3\xff\xfe/%?") for _ in range(rng.randrange(1, 60)))
    target = b"/" + junk
    request = _valid_request(rng).replace(b"GET /", b"GET " + target + b"/", 1)
    return request, b"", frozenset({"http 400"})


def bad_websocket_headers(rng: random.Random) -> Case:
    spoil = rng.choice([{"Sec-WebSocket-Key": ""}, {"Sec-WebSocket-Version": "12"},
                        {"Connection": "keep-alive"}])
    return _request(f"/c/{_RW}", spoil), b"", frozenset({"http 400", "http 426"})


def odd_websocket_key(rng: random.Random) -> Case:
    # Not 16 bytes of base64: accepted, as upstream's library and wsproto do (a client that
    # sends one checks the answer against its own key); the case then half-closes.
    key = rng.choice(["short", "!!!!", "a" * 60])
    return _request(f"/c/{_RW}", {"Sec-WebSocket-Key": key}), b"", frozenset({"eof"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _signed(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """An HS256-signed token with any header, built by hand (PyJWT checks what it encodes)."""
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    signature = hmac.new(SECRET.encode(), head.encode(), hashlib.sha256).digest()
    return head + "." + _b64(signature)


#: JSON values of a type that no header member or channel claim may have.
_ODD_VALUES: tuple[Any, ...] = (None, 5, 1.5, True, [], ["HS256"], {}, {"a": 1})


def odd_token_header(rng: random.Random) -> Case:
    # A header member of the wrong type: an alg that is not a known name gets 400; other
    # members (kid, typ, cty, …) either make the token unreadable (400) or are ignored.
    member = rng.choice(["alg", "kid", "typ", "cty", "crit", "jku", "x5u", "b64"])
    value = rng.choice((*_ODD_VALUES, ""))
    header = {"alg": "HS256", member: value}
    allowed = {"http 400"} if member == "alg" else {"http 400", "eof"}
    return _request(f"/c/{_signed(header, {'mode': 'rw'})}"), b"", frozenset(allowed)


def wrong_typed_claims(rng: random.Random) -> Case:
    # Channel claims present with the wrong type fail closed (upstream ignores them as absent,
    # which opens every channel).
    not_a_list_of_strings = [value for value in _ODD_VALUES if value not in ([], ["HS256"])]
    claims = rng.choice([{"channels": "c"}, {"channels": ["c", rng.choice(_ODD_VALUES)]},
                         {"channel": ["c"]}, {"channel": rng.choice(_ODD_VALUES)},
                         {"channels": rng.choice(not_a_list_of_strings)}])
    target = rng.choice(["/c/", "/meta/", "/"])
    return _request(target + token({"mode": "rw", **claims})), b"", frozenset({"http 400"})


def mutated_token(rng: random.Random) -> Case:
    chars = list(_RW)
    for _ in range(rng.randrange(1, 4)):
        chars[rng.randrange(len(chars))] = rng.choice("AZaz09-_.=%")
    # A change in the last signature character's unused bits may leave the token valid.
    return _request(f"/c/{''.join(chars)}"), b"", frozenset({"http 400", "data", "eof"})


_READ = token({"mode": "r"})


def _segment(rng: random.Random) -> str:
    return rng.choice(["payload", "a", "0", "17", "market_id", "x" * rng.randrange(1, 40)])


def hostile_filter(rng: random.Random) -> Case:
    """Filter parameters as an attacker writes them: deep paths, too many, huge numbers, odd
    operators and lists; each is refused (400, or 503 at a cap) or served (then ended)."""
    def one() -> str:
        path = ".".join(_segment(rng) for _ in range(rng.randrange(1, 19)))
        op = rng.choice(["eq", "neq", "gt", "gte", "lt", "lte", "in", "is", "like", ""])
        value = rng.choice([
            str(rng.randrange(-10**6, 10**6)), "1e999999", "9" * rng.randrange(30, 120),
            "-0.0000001", "null", "true", "abc", "(" + ",".join(
                str(n) for n in range(rng.randrange(0, 300))) + ")", '("a,b",c)', "%00", ""])
        return f"{path}={op}.{value}" if op else path
    count = rng.choice([1, 2, rng.randrange(1, 40)])
    query = "&".join("filter=" + one() for _ in range(count))
    return (_request(f"/c{rng.randrange(4)}/{_READ}?{query}"), b"",
            frozenset({"http 400", "http 503", "eof"}))


def resume_position(rng: random.Random) -> Case:
    """``from=`` as an attacker writes it: positions in the grammar that no relay sealed (they
    open to noise: lost), out of it, too long, with and without the subprotocol."""
    hexes = "0123456789abcdef"

    def part(n: int) -> str:
        return "".join(rng.choice(hexes) for _ in range(n))
    position = rng.choice([
        f"{part(8)}.{part(rng.randrange(1, 17))}.{part(16)}.{part(8)}",
        f"{part(8)}.{part(16)}.{part(16)}.{int(time.time()):08x}",
        f"{part(8)}.{part(17)}.{part(16)}.{part(8)}", "0" * 60, part(rng.randrange(0, 80)),
        "not-a-position", "%00", f"{part(8)}..{part(16)}.{part(8)}"])
    headers = {"Sec-WebSocket-Protocol": "pgws.resume.v1"} if rng.random() < 0.8 else {}
    query = f"from={position}" + (f"&filter=n=eq.{rng.randrange(3)}" if rng.random() < 0.3
                                  else "")
    return (_request(f"/c{rng.randrange(4)}/{_READ}?{query}", headers), b"",
            frozenset({"http 400", "data"}))


# -- admin families (the admin listener) -------------------------------------------------------

def admin_request(rng: random.Random) -> Case:
    """Anything at the admin listener: a probe, garbage, a huge head, nothing at all."""
    request = rng.choice([
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"POST /health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /" + os.urandom(8).hex().encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nX: " + b"a" * rng.randrange(8000, 20000) + b"\r\n\r\n",
        bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200))) + b"\r\n\r\n", b""])
    return request, b"", frozenset({"http 200", "http 404", "http 405", "http 400",
                                    "http 431", "eof"})


# -- plain-HTTP families (the static root of make_root) ----------------------------------------

#: Targets that name something never served, and the status each gets.
_HIDDEN = ((b"/.env", 404), (b"/.git/config", 404), (b"/%2eenv", 404), (b"/%2Egit/config", 404),
           (b"/out/", 200), (b"/out/index.html", 404), (b"/app.js/..%2f.env", 404),
           (b"/%00", 400), (b"/app.js%00.html", 400), (b"/%zz", 400), (b"*", 400),
           (b"/%ff%fe", 404), (b"/" + b"a" * 5000, 404))


def hidden_path(rng: random.Random) -> Case:
    target, status = rng.choice(_HIDDEN)
    method = rng.choice([b"GET", b"HEAD"])
    return (method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"",
            frozenset({f"http {status}"}))


def slow_body(rng: random.Random) -> Case:
    # A body announced and never (or partly) sent: answered, then cut by the request's deadline
    # or at the client's end, never held.
    length = rng.randrange(1, 100_000)
    body = b"b" * rng.randrange(min(length, 1000))
    return (b"GET /app.js HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length + body,
            b"", frozenset({"http 200"}))


def pipelined(rng: random.Random) -> Case:
    count = rng.randrange(2, 1500)
    return b"GET /app.js HTTP/1.1\r\nHost: x\r\n\r\n" * count, b"", frozenset({"http 200"})


# -- frame families (after a valid handshake) -------------------------------------------------

def unmasked(rng: random.Random) -> Case:
    return _valid_request(rng), frame(1, b"hello", masked=False), frozenset({"close 1002"})


def reserved_opcode(rng: random.Random) -> Case:
    opcode = rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
    return _valid_request(rng), frame(opcode, b"x" * rng.randrange(10)), \
        frozenset({"close 1002"})


def rsv_bits(rng: random.Random) -> Case:
    return _valid_request(rng), frame(1, b"hi", rsv=rng.randrange(1, 8)), \
        frozenset({"close 1002"})


def control_too_long(rng: random.Random) -> Case:
    opcode = rng.choice([8, 9, 10])
    return _valid_request(rng), frame(opcode, b"p" * rng.randrange(126, 400)), \
        frozenset({"close 1002"})


def fragmented_control(rng: random.Random) -> Case:
    return _valid_request(rng), frame(rng.choice([9, 10]), b"ping", fin=False), \
        frozenset({"close 1002"})


def orphan_continuation(rng: random.Random) -> Case:
    return _valid_request(rng), frame(0, b"rest"), frozenset({"close 1002"})


def interleaved_data(rng: random.Random) -> Case:
    return (_valid_request(rng), frame(1, b"first", fin=False) + frame(rng.choice([1, 2]), b"x"),
            frozenset({"close 1002"}))


def invalid_utf8_text(rng: random.Random) -> Case:
    bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"])
    return _valid_request(rng), frame(1, b"ok " + bad + b" end"), frozenset({"close 1007"})


def oversized(rng: random.Random) -> Case:
    size = MAX_MESSAGE + 1 + rng.randrange(MAX_MESSAGE)
    return _valid_request(rng), frame(rng.choice([1, 2]), b"z" * size), \
        frozenset({"close 1009"})


def fragmented_oversized(rng: random.Random) -> Case:
    parts = [b"f" * 1000] * (MAX_MESSAGE // 1000 + 2)
    frames = frame(1, parts[0], fin=False) + b"".join(frame(0, part, fin=False)
                                                       for part in parts[1:-1])
    return _valid_request(rng), frames + frame(0, parts[-1]), frozenset({"close 1009"})


def bad_close(rng: random.Random) -> Case:
    choice = rng.randrange(3)
    if choice == 0:
        payload, expected = b"\x03", "close 1002"  # one byte: no room for a code
    elif choice == 1:
        payload, expected = rng.choice(_BAD_CLOSE_CODES).to_bytes(2, "big"), "close 1002"
    else:
        payload, expected = (1000).to_bytes(2, "big") + b"\xff\xfe", "close 1007"
    return _valid_request(rng), frame(8, payload), frozenset({expected})


def frame_flood(rng: random.Random) -> Case:
    # Two seconds' worth of frames at once: closed with 1008 when the relay parses them faster
    # than the budget refills. A relay slowed below that rate by other load (four fuzzing
    # processes flooding at once) is within the budget by definition; it then reads to the end
    # and the case ends with the client's half-close (tests/test_hostile_clients.py asserts
    # the 1008 where the rate is certain).
    count = 2 * MAX_FRAMES + rng.randrange(2000)
    ping = frame(9, b"", mask=b"\0\0\0\0")
    return _valid_request(rng), ping * count, frozenset({"close 1008", "eof"})


def fragment_flood(rng: random.Random) -> Case:
    # A message of more fragments than allowed, each empty (so the size limit never sees it).
    empty = frame(0, b"", fin=False, mask=b"\0\0\0\0")
    frames = frame(1, b"", fin=False) + empty * (MAX_FRAGMENTS + rng.randrange(500))
    return _valid_request(rng), frames, frozenset({"close 1009"})


def valid_close(rng: random.Random) -> Case:
    code = rng.choice([1000, 1001, 3000, 4999])
    return _valid_request(rng), frame(8, code.to_bytes(2, "big") + b"bye"), \
        frozenset({f"close {code}"})


def valid_fragmented(rng: random.Random) -> Case:
    text = "".join(rng.choice("abcé€😀") for _ in range(rng.randrange(1, 300))).encode()
    cut = rng.randrange(len(text) + 1)  # may split a UTF-8 sequence: still valid overall
    frames = frame(1, text[:cut], fin=False) + frame(9, b"ping") + frame(0, text[cut:])
    return _valid_request(rng), frames, frozenset({"data"})


def bad_mask(rng: random.Random) -> Case:
    # Masked with another key than the one announced: the relay decodes garbage, which is
    # either invalid UTF-8 (1007) or some valid text that it publishes.
    payload = bytes(rng.getrandbits(7) for _ in range(rng.randrange(1, 200)))
    return _valid_request(rng), frame(1, payload, true_mask=os.urandom(4)), \
        frozenset({"close 1007", "data"})


def random_bytes(rng: random.Random) -> Case:
    junk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300)))
    return _valid_request(rng), junk, frozenset(
        {"close 1002", "close 1007", "close 1009", "eof", "data"}
        | {f"close {code}" for code in range(1000, 5000)})


FAMILIES: dict[str, Callable[[random.Random], Case]] = {f.__name__: f for f in (
    truncated_request, huge_headers, garbage_request, invalid_utf8_target,
    bad_websocket_headers, odd_websocket_key, mutated_token, odd_token_header,
    wrong_typed_claims, hidden_path, slow_body, pipelined, unmasked, reserved_opcode, rsv_bits,
    control_too_long, fragmented_control, orphan_continuation, interleaved_data,
    invalid_utf8_text, oversized, fragmented_oversized, frame_flood, fragment_flood, bad_close,
    valid_close, valid_fragmented, bad_mask, random_bytes, hostile_filter, resume_position,
    admin_request)}
#: Families sent to the admin listener; the others go to the relay's port.
ADMIN_FAMILIES = frozenset({"admin_request"})


# -- running cases -------------------------------------------------------------------------------

def _outcome(sock: socket.socket, after_101: bytes, half_close: bool) -> str:
    """Send the frames (if the handshake succeeded) and read the relay's answer."""
    data = b""
    upgraded = False
    deadline = time.monotonic() + _ANSWER_WAIT
    while True:
        if not upgraded and b"\r\n\r\n" in data:
            status = int(data.split(b" ", 2)[1])
            if status != 101:
                return f"http {status}"
            upgraded = True
            data = data.split(b"\r\n\r\n", 1)[1]
            try:
                sock.sendall(after_101)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # Refused midway (a flood, say): what the relay answered is still to read.
        while upgraded and len(data) >= 2:
            opcode, size, head = data[0] & 0x0F, data[1] & 0x7F, 2
            if size == 126:
                size, head = int.from_bytes(data[2:4], "big"), 4
            elif size == 127:
                size, head = int.from_bytes(data[2:10], "big"), 10
            if len(data) < head + size:
                break
            if opcode == 8:
                return f"close {int.from_bytes(data[head:head + 2], 'big')}" if size >= 2 \
                    else "close 1005"
            if opcode in (1, 2):
                return "data"
            data = data[head + size:]  # A pong (for a ping in the case) or a server ping.
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return "no answer"
        except OSError:
            return "eof"
        if not chunk:
            return "eof"
        data += chunk


def run_case(port: int, admin_port: int, family: str, seed: int) -> tuple[str, bool]:
    """One case: its outcome, and whether the family allows it."""
    request, after_101, allowed = FAMILIES[family](random.Random(seed))
    if family in ADMIN_FAMILIES:
        port = admin_port
    # Half-closing ends what the relay reads; a case that wants its message's echo must not.
    half_close = "eof" in allowed or "data" not in allowed
    with socket.create_connection(("127.0.0.1", port), timeout=_ANSWER_WAIT) as sock:
        try:
            sock.sendall(request)
            if not after_101 and not request.endswith(b"\r\n\r\n"):
                sock.shutdown(socket.SHUT_WR)  # A truncated request: nothing more will come.
        except OSError:
            return "eof", "eof" in allowed
        outcome = _outcome(sock, after_101, half_close)
        if outcome == "data":
            # A valid message came back (its echo): end politely, the case is done.
            with contextlib.suppress(OSError):
                sock.sendall(frame(8, (1000).to_bytes(2, "big")))
    return outcome, outcome in allowed


class NormalClient:
    """The well-behaved client that must keep working throughout."""

    def __init__(self, port: int) -> None:
        self._sock = handshake(port, f"/normal/{_RW}")
        self._sock.settimeout(_ANSWER_WAIT)
        self.round_trips = 0

    def round_trip(self) -> bool:
        """Write a message; True when its echo comes back."""
        marker = f"normal {self.round_trips} {os.urandom(4).hex()}"
        self._sock.sendall(frame(1, marker.encode()))
        data = b""
        deadline = time.monotonic() + _ANSWER_WAIT
        self.round_trips += 1
        while marker.encode() not in data and time.monotonic() < deadline:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                return False
            if not chunk:
                return False
            data += chunk
        return marker.encode() in data

    def close(self) -> None:
        self._sock.close()


def _worker(port: int, admin_port: int, first: int, count: int, seed: int,
            results: Any) -> None:
    rng = random.Random(seed + first)
    names = sorted(FAMILIES)
    tally: collections.Counter[str] = collections.Counter()
    failures: list[dict[str, Any]] = []
    for n in range(first, first + count):
        family = names[rng.randrange(len(names))]
        case_seed = rng.getrandbits(32)
        outcome, ok = run_case(port, admin_port, family, case_seed)
        tally[f"{family}: {outcome}"] += 1
        if not ok and len(failures) < 20:
            failures.append({"case": n, "family": family, "seed": case_seed,
                             "outcome": outcome})
    results.put({"tally": dict(tally), "failures": failures})


def fuzz(server: Relay, admin_port: int, cases: int, procs: int = 1, seed: int = 1,
         check_every: int = 1000) -> dict[str, Any]:
    """Run ``cases`` cases against a running relay (started with :func:`relay_env`, its admin
    listener on ``admin_port``); what happened, and whether all was well."""
    normal = NormalClient(server.port)
    if not normal.round_trip():
        raise RuntimeError("the normal client's first round trip failed")
    before = settled(server, pool_at_rest)
    ctx = mp.get_context("fork")
    tally: collections.Counter[str] = collections.Counter()
    failures: list[dict[str, Any]] = []
    round_trips_ok = True
    done = 0
    while done < cases:
        batch = min(check_every, cases - done)
        results = ctx.Queue()
        shares = [batch // procs + (1 if i < batch % procs else 0) for i in range(procs)]
        starts = [done + sum(shares[:i]) for i in range(procs)]
        workers = [ctx.Process(target=_worker,
                               args=(server.port, admin_port, start, share, seed, results))
                   for start, share in zip(starts, shares, strict=True) if share]
        for worker in workers:
            worker.start()
        for _ in workers:
            outcome = results.get(timeout=600)
            tally.update(outcome["tally"])
            failures += outcome["failures"]
        for worker in workers:
            worker.join(60)
        done += batch
        round_trips_ok &= normal.round_trip() and server.proc.poll() is None
    # A leak is growth: "before" may have caught a connection's handler on its way out.
    after = settled(server, lambda stats: stats["clients"] == 1 and pool_at_rest(stats)
                    and stats["tasks"] <= before["tasks"]
                    and sockets_open(stats) <= sockets_open(before))
    normal.close()
    return {"cases": cases, "failures": failures[:50], "failed": len(failures),
            "round_trips": normal.round_trips, "round_trips_ok": round_trips_ok,
            "relay_running": server.proc.poll() is None, "before": before, "after": after,
            "leak_free": after["tasks"] <= before["tasks"]
            and sockets_open(after) <= sockets_open(before),
            "tally": dict(sorted(tally.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--check-every", type=int, default=1000)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        admin_port = free_port()
        server = Server("relay", free_port(), relay_env(make_root(root), admin_port))
        started = time.monotonic()
        try:
            result = fuzz(server, admin_port, args.cases, args.procs, args.seed,
                          args.check_every)
        finally:
            server.stop()
    result.update({"machine": machine(), "commit": commit(), "started": time.strftime("%F %T"),
                   "seconds": round(time.monotonic() - started, 1), "seed": args.seed,
                   "tracebacks": sum("Traceback" in line for line in server.lines)})
    print(f"{result['cases']} cases in {result['seconds']} s: {result['failed']} failed; "
          f"{result['round_trips']} normal round trips ok={result['round_trips_ok']}; "
          f"leak-free={result['leak_free']} (tasks {result['before']['tasks']} → "
          f"{result['after']['tasks']}, fds {result['before']['fds']} → "
          f"{result['after']['fds']}); tracebacks in the log: {result['tracebacks']}")
    for failure in result["failures"][:10]:
        print("  failed:", failure)
    if not result["round_trips_ok"]:
        print("the relay's last log lines:", *server.lines[-40:], sep="\n  ")
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(dumps(result))
    ok = (not result["failed"] and result["round_trips_ok"] and result["leak_free"]
          and not result["tracebacks"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

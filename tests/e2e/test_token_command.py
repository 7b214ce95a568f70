"""``pgws-relay token``: what it mints, a real relay with the same secret settings accepts.

Each secret kind is minted with the real command (a subprocess that sees only the secret
settings) and checked against the real relay over WebSockets: the token is accepted, and its
claims hold there (``mode r`` cannot write, the channel list is enforced, an ``exp`` in the past
gets ``400 Token expired``). The pure signing rules of :mod:`relay.auth.mint` are checked with
:func:`relay.auth.tokens.check`, the relay's own verification.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from relay.auth import mint, tokens
from tests.helpers import RELAY, SECRET, TIMEOUT, RelayProcess, notify

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()

RSA_PRIVATE = {**json.loads(RSAAlgorithm.to_jwk(RSA_KEY)), "kid": "rsa-1"}
RSA_PUBLIC = {**json.loads(RSAAlgorithm.to_jwk(RSA_KEY.public_key())), "kid": "rsa-pub"}
EC_PRIVATE = json.loads(ECAlgorithm.to_jwk(EC_KEY))
EC_PUBLIC = json.loads(ECAlgorithm.to_jwk(EC_KEY.public_key()))
ED_PRIVATE = {**json.loads(OKPAlgorithm.to_jwk(ED_KEY)), "kid": "ed-1"}
#: A set whose first key cannot sign (public only): the command must pick the second.
MIXED_SET = {"keys": [RSA_PUBLIC, ED_PRIVATE]}
RAW_48 = bytes(range(48))


def _settings(kind: str, directory: Path) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """For a secret kind: the token command's environment and flags, and the relay's settings.

    The command gets the same settings as the relay, except ``ec-public``, where the relay
    has only the public half of the key the command signs with.
    """
    b64 = base64.urlsafe_b64encode(RAW_48).decode()
    (directory / "secret").write_bytes(RAW_48 + b"\n")
    file_secret = {"PGWS_JWT_SECRET": f"@{directory / 'secret'}"}
    if kind == "hmac":
        return {"PGWS_JWT_SECRET": SECRET}, [], {"PGWS_JWT_SECRET": SECRET}
    if kind == "base64":
        both = {"PGWS_JWT_SECRET": b64, "PGWS_JWT_SECRET_BASE64": "True"}
        return both, [], both
    if kind == "file":
        return file_secret, [], file_secret
    if kind == "flags":
        return {}, ["--jwt-secret", b64, "--jwt-secret-base64", "True"], \
            {"PGWS_JWT_SECRET": b64, "PGWS_JWT_SECRET_BASE64": "True"}
    jwk: dict[str, Any] = {"rsa-jwk": RSA_PRIVATE, "ec-public": EC_PRIVATE,
                           "okp-jwk-set": MIXED_SET}[kind]
    relay_jwk = EC_PUBLIC if kind == "ec-public" else jwk
    return {"PGWS_JWT_SECRET": json.dumps(jwk)}, [], {"PGWS_JWT_SECRET": json.dumps(relay_jwk)}


def run_token(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The command with ``env`` as its only PGWS_* settings (no database URI: not needed)."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("PGWS_")}
    return subprocess.run([RELAY, "token", *args], env={**base, **env}, capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def minted(env: dict[str, str], *args: str) -> str:
    result = run_token(env, *args)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    (line,) = result.stdout.splitlines()
    return line


def refused(env: dict[str, str], *args: str) -> list[str]:
    result = run_token(env, *args)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    return result.stderr.splitlines()


def ws(relay: RelayProcess, path: str):
    return connect(relay.url(path), open_timeout=10, close_timeout=5)


def rejection(relay: RelayProcess, path: str) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as info:
        ws(relay, path).close()
    return info.value.response.status_code, info.value.response.body


@pytest.mark.parametrize("kind", ["hmac", "base64", "file", "flags", "rsa-jwk", "ec-public",
                                  "okp-jwk-set"])
def test_minted_tokens_are_accepted_and_their_claims_hold(start_relay, tmp_path: Path,
                                                          kind: str) -> None:
    secret_env, flags, relay_settings = _settings(kind, tmp_path)
    # The command reads the secret settings and nothing else.
    env = {**secret_env, "PGWS_PORT": "not a port"}
    relay = start_relay(**relay_settings)

    # Accepted; the relay sees the claims asked for (its write envelope echoes them).
    before = int(time.time())
    writer_token = minted(env, *flags, "--mode", "rw", "--channel", "chat", "--exp", "3600")
    after = int(time.time())
    with ws(relay, f"/chat/{writer_token}") as writer:
        writer.send("hello")
        claims = json.loads(writer.recv(timeout=10))["claims"]
    assert (claims["mode"], claims["channel"]) == ("rw", "chat")
    assert before + 3600 <= claims["exp"] <= after + 3600
    assert set(claims) == {"mode", "channel", "exp", "message_delivered_at"}
    if kind != "hmac":
        return  # What the claims mean does not depend on the key that signed them.

    # Mode r reads both channels of --channels but cannot write: its message is dropped, so
    # the first thing it receives is the w client's later message.
    reader_token = minted(env, *flags, "--mode", "r", "--channels", "chat,news")
    with ws(relay, f"/{reader_token}") as reader, \
            ws(relay, f"/chat/{minted(env, *flags, '--mode', 'w', '--channel', 'chat')}") as w:
        reader.send("from a reader")
        assert reader.ping().wait(10)  # The relay has read it.
        w.send("from a writer")
        envelope = json.loads(reader.recv(timeout=10))
        assert (envelope["payload"], envelope["claims"]["mode"]) == ("from a writer", "w")
        notify(relay.env["PGWS_LISTEN_CHANNEL"], '{"channel":"news","n":1}')
        assert reader.recv(timeout=10) == '{"channel":"news","n":1}'

    # --filter: the filters claim, which the relay applies (market 8 never arrives).
    market_token = minted(env, *flags, "--mode", "r", "--channel", "chat",
                          "--filter", "payload.market_id=eq.7")
    with ws(relay, f"/chat/{market_token}") as market:
        notify(relay.env["PGWS_LISTEN_CHANNEL"], '{"channel":"chat","payload":{"market_id":8}}',
               '{"channel":"chat","payload":{"market_id":7}}')
        assert market.recv(timeout=10) == '{"channel":"chat","payload":{"market_id":7}}'

    # A channel outside the token, and an exp in the past, are refused as upstream does.
    one_channel = minted(env, *flags, "--mode", "r", "--channel", "chat")
    assert rejection(relay, f"/news/{one_channel}") == (400, b"No allowed channels")
    expired = minted(env, *flags, "--mode", "r", "--channel", "chat", "--exp", "-60")
    assert rejection(relay, f"/chat/{expired}") == (400, b"Token expired")


def test_a_jwk_set_signs_with_its_first_signing_key_and_names_it() -> None:
    text = minted({"PGWS_JWT_SECRET": json.dumps(MIXED_SET)}, "--mode", "r", "--channel", "c")
    assert jwt.get_unverified_header(text)["kid"] == "ed-1"
    assert jwt.get_unverified_header(text)["alg"] == "EdDSA"
    jwt.decode(text, ED_KEY.public_key(), algorithms=["EdDSA"])


@pytest.mark.parametrize("env,args,line", [
    ({"PGWS_JWT_SECRET": json.dumps(RSA_PUBLIC)}, [],
     "pgws-relay token: the JWK (kid 'rsa-pub', kty 'RSA') cannot sign: it has no private key "
     "(only the public half)"),
    ({"PGWS_JWT_SECRET": json.dumps(MIXED_SET)}, ["--kid", "rsa-pub"],
     "pgws-relay token: no key of the JWK Set can sign: key 0 (kid 'rsa-pub', kty 'RSA'): it "
     "has no private key (only the public half)"),
    ({"PGWS_JWT_SECRET": json.dumps(MIXED_SET)}, ["--kid", "nope"],
     "pgws-relay token: no key of the JWK Set has kid 'nope'"),
    ({"PGWS_JWT_SECRET": SECRET}, ["--alg", "HS512"],
     "pgws-relay token: the HMAC secret cannot sign: it is 32 bytes; HS512 needs at least 64, "
     "so the relay would refuse the token"),
    ({"PGWS_JWT_SECRET": SECRET}, ["--alg", "RS256"],
     "pgws-relay token: the HMAC secret cannot sign: RS256 is not one of its algorithms "
     "(HS256, HS384, HS512)"),
    ({"PGWS_JWT_SECRET": "short"}, [],
     "pgws-relay: PGWS_JWT_SECRET: HMAC secret is 5 bytes; HS256 needs at least 32, so every "
     "token would be refused"),
    ({}, [], "pgws-relay: PGWS_JWT_SECRET: required but not set"),
    ({"PGWS_JWT_SECRET": "abc", "PGWS_JWT_SECRET_BASE64": "True"}, [],
     "pgws-relay: PGWS_JWT_SECRET: not valid base64: Incorrect padding"),
    ({"PGWS_JWT_SECRET": SECRET}, ["--filter", "payload.market_id=gt.seven"],
     'pgws-relay token: filters claim "payload.market_id=gt.seven": bad number "seven" '
     '(expected a JSON number)'),
], ids=["public-jwk", "kid-of-a-public-key", "unknown-kid", "hs512-too-long-for-the-secret",
        "rsa-alg-for-an-hmac-secret", "short-secret", "no-secret", "bad-base64", "bad-filter"])
def test_what_cannot_be_minted_exits_2_with_one_line(env: dict[str, str], args: list[str],
                                                     line: str) -> None:
    lines = refused(env, "--mode", "r", "--channel", "c", *args)
    assert lines == [line]
    assert RSA_PRIVATE["n"] not in lines[0] and RSA_PRIVATE["d"] not in lines[0]


@pytest.mark.parametrize("args", [["--mode", "x", "--channel", "c"], ["--mode", "r"],
                                  ["--mode", "r", "--channel", "a", "--channels", "a,b"],
                                  ["--mode", "r", "--channels", "a,,b"]])
def test_arguments_are_checked(args: list[str]) -> None:
    lines = refused({"PGWS_JWT_SECRET": SECRET}, *args)
    assert lines and lines[-1].startswith(("pgws-relay token: error: ", "pgws-relay token: a "))


# -- relay.auth.mint, checked by the relay's own verification --------------------------------------

def _grant(secret: bytes, text: str, channel: str | None = None) -> tokens.Grant:
    return tokens.check(text, channel, tokens.load_keys(secret), time.time())


def test_claims() -> None:
    assert mint.claims("r", ["a"], None, 100.5) == {"mode": "r", "channel": "a"}
    assert mint.claims("rw", ["a", "b"], -10, 100.5) == {
        "mode": "rw", "channels": ["a", "b"], "exp": 90}
    for mode, channels in (("R", ["a"]), ("r", []), ("r", [""])):
        with pytest.raises(mint.MintError):
            mint.claims(mode, channels, None, 0)
    assert mint.claims("r", ["a"], None, 0, ["payload.market_id=eq.7"]) == {
        "mode": "r", "channel": "a", "filters": ["payload.market_id=eq.7"]}
    with pytest.raises(mint.MintError, match='filters claim "payload.x=like.7": unknown'):
        mint.claims("r", ["a"], None, 0, ["payload.market_id=eq.7", "payload.x=like.7"])


@pytest.mark.parametrize("algorithm", [None, "HS256", "HS384"])
def test_an_hmac_secret_signs_what_it_is_long_enough_for(algorithm: str | None) -> None:
    text = mint.mint(RAW_48, {"mode": "r"}, algorithm)
    assert jwt.get_unverified_header(text)["alg"] == (algorithm or "HS256")
    assert _grant(RAW_48, text, "c").channels == ("c",)


@pytest.mark.parametrize("jwk,algorithm,expected", [
    (RSA_PRIVATE, None, "RS256"),
    ({**RSA_PRIVATE, "alg": "PS384"}, None, "PS384"),
    (RSA_PRIVATE, "PS512", "PS512"),
    (EC_PRIVATE, None, "ES256"),
    (json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()))), None, "ES384"),
    (ED_PRIVATE, None, "EdDSA"),
    ({"kty": "oct", "k": base64.urlsafe_b64encode(RAW_48).decode().rstrip("=")}, "HS384",
     "HS384"),
])
def test_a_private_jwk_signs_with_its_own_algorithm(jwk: dict, algorithm: str | None,
                                                    expected: str) -> None:
    secret = json.dumps(jwk).encode()
    text = mint.mint(secret, {"mode": "rw", "channel": "c"}, algorithm)
    assert jwt.get_unverified_header(text)["alg"] == expected
    assert _grant(secret, text).mode == "rw"


def test_a_key_the_relay_would_skip_is_never_chosen() -> None:
    # An encryption key (use enc) with private material comes first: the relay skips it.
    encryption = {**json.loads(RSAAlgorithm.to_jwk(
        rsa.generate_private_key(public_exponent=65537, key_size=2048))), "use": "enc",
        "kid": "enc"}
    verify_only = {**EC_PRIVATE, "key_ops": ["verify"], "kid": "verify-only"}
    secret = json.dumps({"keys": [encryption, verify_only, RSA_PRIVATE]}).encode()
    text = mint.mint(secret, {"mode": "r"})
    assert jwt.get_unverified_header(text)["kid"] == "rsa-1"
    assert _grant(secret, text, "c").mode == "r"
    with pytest.raises(mint.MintError, match=r"key 0 \(kid 'enc', kty 'RSA'\): the relay cannot "
                                             r"verify with it .*key 1 \(kid 'verify-only'.*"
                                             r"does not allow \"sign\""):
        mint.mint(json.dumps({"keys": [encryption, verify_only]}).encode(), {"mode": "r"})


def test_a_short_oct_jwk_cannot_sign() -> None:
    short = json.dumps({"kty": "oct", "k": "c2hvcnQ"}).encode()  # "short": 5 bytes
    with pytest.raises(mint.MintError, match="it is 5 bytes; HS256 needs at least 32"):
        mint.mint(short, {"mode": "r"})

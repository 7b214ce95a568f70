"""The security review's token findings, against the real ``pgws-relay`` and PostgreSQL.

1. A JWK Set is never an HMAC secret: a key it holds that cannot verify signatures is skipped
   with a warning, and a secret without a usable key stops the command with status 2.
5. ``channel``/``channels`` claims of the wrong type refuse the token (fail closed).
9. Malformed token headers get HTTP 400 ``Error: …``, never a traceback.
"""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.helpers import RelayProcess, relay_env, run_to_exit, token
from tests.unit.auth.test_tokens import X25519_JWK, hand_signed

META = "server-info"

SIGNER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SIGNING_JWK = {**json.loads(RSAAlgorithm.to_jwk(SIGNER.public_key())), "kid": "sig-1"}
ENCRYPTION_JWK = {
    **json.loads(RSAAlgorithm.to_jwk(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())),
    "kid": "enc-1", "use": "enc", "alg": "RSA-OAEP"}
JWKS_TEXT = json.dumps({"keys": [SIGNING_JWK, ENCRYPTION_JWK]})


def ws(relay: RelayProcess, path: str):
    return connect(relay.url(path), open_timeout=10, close_timeout=5)


def rejection(relay: RelayProcess, path: str) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as info:
        ws(relay, path).close()
    response = info.value.response
    return response.status_code, response.body


def _run(secret: str, **overrides: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of the command with this secret."""
    return run_to_exit(relay_env(PGWS_JWT_SECRET=secret, **overrides))


# -- 1: JWK Sets -------------------------------------------------------------------------------

def test_jwks_with_an_encryption_key_refuses_hs256_signed_with_its_text(start_relay) -> None:
    relay = start_relay(PGWS_JWT_SECRET=JWKS_TEXT)
    forged = hand_signed({"alg": "HS256", "typ": "JWT"}, {"mode": "rw"}, JWKS_TEXT.encode())
    assert rejection(relay, f"/chat/{forged}") == (400, b"Error: JWSError JWSInvalidSignature")
    with ws(relay, f"/chat/{token({'mode': 'rw'}, SIGNER, 'RS256')}"):
        pass  # 101: the signing key of the set still verifies.
    warnings = [line for line in relay.lines if "PGWS_JWT_SECRET: " in line]
    assert len(warnings) == 1, relay.log
    assert " WARNING " in warnings[0]
    assert "JWK Set key 1 (kid 'enc-1', kty 'RSA', alg 'RSA-OAEP', use 'enc')" in warnings[0]
    assert ENCRYPTION_JWK["n"] not in relay.log and SIGNING_JWK["n"] not in relay.log


@pytest.mark.parametrize("secret,overrides", [
    (json.dumps({"keys": [ENCRYPTION_JWK]}), {}),
    (json.dumps({"keys": [ENCRYPTION_JWK]}), {"PGWS_WORKERS": "2", "PGWS_PORT": "3999"}),
    (json.dumps(X25519_JWK), {}),
    (json.dumps({"keys": "not a list"}), {}),
], ids=["set-of-an-encryption-key", "same-with-workers", "single-x25519-jwk", "keys-not-a-list"])
def test_secret_without_a_usable_key_exits_2_with_one_line(secret: str,
                                                           overrides: dict[str, str]) -> None:
    status, stdout, stderr = _run(secret, **overrides)
    assert status == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("pgws-relay: PGWS_JWT_SECRET: ")
    assert "Traceback" not in stderr and stdout == ""
    for material in (ENCRYPTION_JWK["n"], X25519_JWK["x"]):
        assert material not in line


# -- 5: channel claims of the wrong type -------------------------------------------------------

def test_channel_claims_of_the_wrong_type_get_400_for_every_channel(start_relay) -> None:
    relay = start_relay(PGWS_META_CHANNEL=META)
    for claims in ({"channels": "chat"}, {"channels": ["chat", None]}, {"channel": ["chat"]}):
        signed = token({"mode": "rw", **claims})
        for path in (f"/chat/{signed}", f"/{META}/{signed}", f"/{signed}"):
            assert rejection(relay, path) == (400, b"No allowed channels"), (claims, path)
    with ws(relay, f"/chat/{token({'mode': 'rw', 'channels': ['chat']})}"):
        pass  # The right type still opens its channel.


# -- 9: malformed headers ----------------------------------------------------------------------

def test_malformed_headers_get_400_and_no_traceback(start_relay) -> None:
    relay = start_relay()
    headers = [{"alg": "HS256", "kid": 5}, {"alg": ["HS256"]}, {"alg": "HS256", "crit": 1},
               {"alg": "HS256", "typ": None}, ["HS256"]]
    start = len(relay.lines)
    for header in headers:
        status, body = rejection(relay, f"/chat/{hand_signed(header, {'mode': 'rw'})}")
        assert status == 400 and body.startswith(b"Error: "), (header, body)
        start = relay.wait_for_line_at(r"rejecting request from .*: 400 Error: ", start=start)[0]
        start += 1
    assert "Traceback" not in relay.log
    assert not [line for line in relay.lines if " ERROR " in line or " CRITICAL " in line]

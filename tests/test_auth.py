"""Tokens and channel rules (spec section 3), including upstream's ClaimsSpec, without sockets."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from relay import auth
from relay.auth import AuthError

SECRET = b"reallyreallyreallyreallyverysafe"
KEYS = auth.load_keys(SECRET)
NOW = time.time()

EXPIRED = {"mode": "r", "channel": "test", "exp": 1}
R = {"mode": "r"}
R_CHANNEL = {"mode": "r", "channel": "test"}
R_CHANNELS = {"mode": "r", "channels": ["test", "another test"]}
R_CHANNELS2 = {"mode": "r", "channels": ["test", "test2"]}
NO_MODE = {"channels": ["test", "test2"]}


def sign(claims: dict, key: object = SECRET, algorithm: str = "HS256", **header: object) -> str:
    return jwt.encode(claims, key, algorithm=algorithm, headers=header or None)


def check(claims: dict, channel: str | None = None, keys=KEYS) -> auth.Grant:
    return auth.check(sign(claims), channel, keys, NOW)


# -- upstream ClaimsSpec, one test per case ----------------------------------------------------

def test_claims_spec_1_expired_token_is_invalid() -> None:
    with pytest.raises(AuthError, match="^Token expired$"):
        check(EXPIRED)


def test_claims_spec_2_any_channel_when_token_has_no_channel_claims() -> None:
    grant = check(R, "test")
    assert (grant.channels, grant.mode, grant.claims) == (("test",), "r", {"mode": "r"})


def test_claims_spec_3_old_style_channel_claim() -> None:
    grant = check(R_CHANNEL, "test")
    assert (grant.channels, grant.mode, grant.claims) == (("test",), "r", R_CHANNEL)


def test_claims_spec_4_no_requested_channel_gives_all_token_channels() -> None:
    grant = check(R_CHANNELS)
    assert (grant.channels, grant.mode, grant.claims) == (("test", "another test"), "r",
                                                          R_CHANNELS)


def test_claims_spec_5_requested_channel_from_channels_claim() -> None:
    assert check(R_CHANNELS2, "test").channels == ("test",)


def test_claims_spec_6_channel_not_in_channels_claim_fails() -> None:
    with pytest.raises(AuthError, match="^No allowed channels$"):
        check(R_CHANNELS2, "notAllowed")


def test_claims_spec_7_no_mode_fails() -> None:
    with pytest.raises(AuthError, match="^Missing mode$"):
        check(NO_MODE, "test")


JWK = {"kty": "oct", "k": "cmVhbGx5cmVhbGx5cmVhbGx5cmVhbGx5dmVyeXNhZmU", "alg": "HS256"}


def test_claims_spec_8_jwk_secret() -> None:
    keys = auth.load_keys(json.dumps(JWK).encode())
    assert check(R_CHANNEL, "test", keys).channels == ("test",)


def test_claims_spec_9_jwks_secret() -> None:
    keys = auth.load_keys(json.dumps({"keys": [JWK]}).encode())
    assert check(R_CHANNEL, "test", keys).channels == ("test",)


def test_claims_spec_10_wrong_key_in_jwks() -> None:
    wrong = {"kty": "oct", "k": base64.urlsafe_b64encode(b"wrongkeywrongkeywrongkeywrongk")
             .decode().rstrip("=")}
    keys = auth.load_keys(json.dumps({"keys": [wrong]}).encode())
    with pytest.raises(AuthError):
        check(R_CHANNEL, "test", keys)


# -- rejection texts (spec 2.4) ----------------------------------------------------------------

def test_empty_token_is_missing_mode() -> None:
    with pytest.raises(AuthError, match="^Missing mode$"):
        auth.check("", "chat", KEYS, NOW)


def test_non_string_mode_is_missing_mode() -> None:
    with pytest.raises(AuthError, match="^Missing mode$"):
        check({"mode": 1}, "chat")


@pytest.mark.parametrize("text,parts", [("abc", 1), ("a.b", 2), ("a.b.c.d", 4)])
def test_wrong_number_of_parts(text: str, parts: int) -> None:
    with pytest.raises(AuthError) as info:
        auth.check(text, None, KEYS, NOW)
    assert str(info.value) == ("Error: JWSError (CompactDecodeError Invalid number of parts: "
                               f"Expected 3 parts; got {parts})")


def test_wrong_secret_is_invalid_signature() -> None:
    other = sign(R, b"x" * 32)
    with pytest.raises(AuthError, match=r"^Error: JWSError JWSInvalidSignature$"):
        auth.check(other, "chat", KEYS, NOW)


def test_tampered_payload_is_invalid_signature() -> None:
    header, _, signature = sign(R_CHANNEL).split(".")
    forged = base64.urlsafe_b64encode(b'{"mode":"rw","channel":"test"}').decode().rstrip("=")
    with pytest.raises(AuthError, match="JWSInvalidSignature"):
        auth.check(f"{header}.{forged}.{signature}", None, KEYS, NOW)


def test_alg_none_is_refused() -> None:
    unsigned = jwt.encode(R, None, algorithm="none")
    with pytest.raises(AuthError, match=r"^Error: JWSError JWSNoSignatures$"):
        auth.check(unsigned, "chat", KEYS, NOW)


@pytest.mark.parametrize("algorithm,length", [("HS256", 31), ("HS384", 47), ("HS512", 63)])
def test_hmac_key_shorter_than_hash_is_refused(algorithm: str, length: int) -> None:
    key = b"k" * length
    with pytest.warns(jwt.warnings.InsecureKeyLengthWarning):
        signed = sign(R, key, algorithm)
    with pytest.raises(AuthError, match="JWSInvalidSignature"):
        auth.check(signed, "chat", auth.load_keys(key), NOW)


def test_raw_secret_verifies_hs384_and_hs512_when_long_enough() -> None:
    key = b"s" * 64
    for algorithm in ("HS256", "HS384", "HS512"):
        grant = auth.check(sign(R, key, algorithm), "chat", auth.load_keys(key), NOW)
        assert grant.mode == "r"


def test_nbf_in_future() -> None:
    with pytest.raises(AuthError, match="^Error: JWTNotYetValid$"):
        check({"mode": "r", "nbf": NOW + 60}, "chat")


def test_iat_in_future() -> None:
    with pytest.raises(AuthError, match="^Error: JWTIssuedAtFuture$"):
        check({"mode": "r", "iat": NOW + 60}, "chat")


def test_exp_now_is_expired_and_exp_later_is_kept() -> None:
    with pytest.raises(AuthError, match="^Token expired$"):
        auth.check(sign({"mode": "r", "exp": int(NOW)}), "c", KEYS, int(NOW))
    grant = check({"mode": "r", "exp": NOW + 60}, "c")
    assert grant.expires_at == pytest.approx(NOW + 60)


def test_claims_that_do_not_decode() -> None:
    with pytest.raises(AuthError, match='^Error: JWTClaimsSetDecodeError "'):
        check({"mode": "r", "exp": "soon"}, "c")
    with pytest.raises(AuthError, match="^Error: JWTClaimsSetDecodeError"):
        check({"mode": "r", "aud": 5}, "c")


def test_signature_is_checked_before_mode() -> None:
    with pytest.raises(AuthError, match="JWSInvalidSignature"):
        auth.check(sign(NO_MODE, b"y" * 32), "test", KEYS, NOW)


def test_error_text_never_contains_the_token() -> None:
    for bad in (sign(R, b"z" * 32), sign(R)[:-3] + "!!!", "a" * 40 + "." + "b" * 40,
                sign(EXPIRED)):
        with pytest.raises(AuthError) as info:
            auth.check(bad, None, KEYS, NOW)
        assert bad not in str(info.value)
        assert bad.split(".")[-1] not in str(info.value)


# -- asymmetric keys, JWK and JWK Set ----------------------------------------------------------

def _jwk(public_key: object, algorithm_cls: type) -> dict:
    return json.loads(algorithm_cls.to_jwk(public_key))


@pytest.mark.parametrize("algorithm", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
def test_rsa_family(algorithm: str) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = auth.load_keys(json.dumps(_jwk(private.public_key(), RSAAlgorithm)).encode())
    assert auth.check(sign(R, private, algorithm), "c", keys, NOW).mode == "r"


@pytest.mark.parametrize("curve,algorithm", [(ec.SECP256R1(), "ES256"), (ec.SECP384R1(), "ES384"),
                                             (ec.SECP521R1(), "ES512"),
                                             (ec.SECP256K1(), "ES256K")])
def test_ec_family(curve: ec.EllipticCurve, algorithm: str) -> None:
    private = ec.generate_private_key(curve)
    keys = auth.load_keys(json.dumps(_jwk(private.public_key(), ECAlgorithm)).encode())
    assert auth.check(sign(R, private, algorithm), "c", keys, NOW).mode == "r"


def test_eddsa() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    keys = auth.load_keys(json.dumps(_jwk(private.public_key(), OKPAlgorithm)).encode())
    assert auth.check(sign(R, private, "EdDSA"), "c", keys, NOW).mode == "r"


def test_jwks_tries_every_key_and_ignores_kid() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_jwk = {**_jwk(private.public_key(), RSAAlgorithm), "kid": "one"}
    keyset = {"keys": [JWK, rsa_jwk]}
    keys = auth.load_keys(json.dumps(keyset).encode())
    assert auth.check(sign(R, private, "RS256", kid="nope"), "c", keys, NOW).mode == "r"
    assert auth.check(sign(R), "c", keys, NOW).mode == "r"


def test_hmac_token_against_rsa_key_is_invalid_signature() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = auth.load_keys(json.dumps(_jwk(private.public_key(), RSAAlgorithm)).encode())
    with pytest.raises(AuthError, match="JWSInvalidSignature"):
        auth.check(sign(R), "c", keys, NOW)


def test_json_that_is_not_a_jwk_is_a_raw_secret() -> None:
    secret = b'{"not": "a key", "padding": "xxxxxxxxxxxxxxxx"}'
    keys = auth.load_keys(secret)
    assert auth.check(sign(R, secret), "c", keys, NOW).mode == "r"


# -- modes and channel lists (3.2, 3.3) --------------------------------------------------------

@pytest.mark.parametrize("mode,read,write", [("r", True, False), ("w", False, True),
                                             ("rw", True, True), ("wr", False, False),
                                             ("R", False, False), ("", False, False)])
def test_modes(mode: str, read: bool, write: bool) -> None:
    grant = check({"mode": mode}, "c")
    assert (grant.can_read, grant.can_write) == (read, write)


def test_channel_and_channels_are_merged_without_duplicates() -> None:
    claims = {"mode": "r", "channel": "a", "channels": ["b", "a", "c"]}
    assert auth.allowed_channels(claims, None) == ["a", "b", "c"]


def test_channels_alone_are_kept_as_is() -> None:
    assert auth.allowed_channels({"channels": ["a", "a"]}, None) == ["a", "a"]


def test_channels_that_are_not_strings_are_ignored() -> None:
    assert auth.allowed_channels({"channels": ["a", 1]}, "x") == ["x"]
    with pytest.raises(AuthError, match="No allowed channels"):
        auth.allowed_channels({"channels": "a"}, None)


def test_no_channel_claims_and_no_path_channel() -> None:
    with pytest.raises(AuthError, match="^No allowed channels$"):
        check(R)


def test_big_integer_claims_stay_exact() -> None:
    claims = {"mode": "r", "order": 18446744073709551616000001}
    assert check(claims, "c").claims["order"] == 18446744073709551616000001

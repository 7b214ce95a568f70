"""Tokens and channel rules (spec section 3), including upstream's ClaimsSpec, without sockets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import warnings

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from relay.auth import tokens
from relay.auth.tokens import AuthError

SECRET = b"reallyreallyreallyreallyverysafe"
KEYS = tokens.load_keys(SECRET)
NOW = time.time()

EXPIRED = {"mode": "r", "channel": "test", "exp": 1}
R = {"mode": "r"}
R_CHANNEL = {"mode": "r", "channel": "test"}
R_CHANNELS = {"mode": "r", "channels": ["test", "another test"]}
R_CHANNELS2 = {"mode": "r", "channels": ["test", "test2"]}
NO_MODE = {"channels": ["test", "test2"]}


def sign(claims: dict, key: object = SECRET, algorithm: str = "HS256", **header: object) -> str:
    return jwt.encode(claims, key, algorithm=algorithm, headers=header or None)


def check(claims: dict, channel: str | None = None, keys=KEYS) -> tokens.Grant:
    return tokens.check(sign(claims), channel, keys, NOW)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: object, claims: object, secret: bytes = SECRET) -> str:
    """An HS256-signed token PyJWT would refuse to make: any header, any secret bytes (a JWK
    Set's text, a PEM key), signed with hmac and hashlib."""
    return hand_signed_text(json.dumps(header), json.dumps(claims), secret)


def hand_signed_text(header: str, payload: str, secret: bytes = SECRET) -> str:
    """Like :func:`hand_signed`, with the header and payload given as JSON text."""
    signing_input = f"{b64url(header.encode())}.{b64url(payload.encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


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
    keys = tokens.load_keys(json.dumps(JWK).encode())
    assert check(R_CHANNEL, "test", keys).channels == ("test",)


def test_claims_spec_9_jwks_secret() -> None:
    keys = tokens.load_keys(json.dumps({"keys": [JWK]}).encode())
    assert check(R_CHANNEL, "test", keys).channels == ("test",)


def test_claims_spec_10_wrong_key_in_jwks() -> None:
    wrong = {"kty": "oct", "k": base64.urlsafe_b64encode(b"wrongkeywrongkeywrongkeywrongk")
             .decode().rstrip("=")}
    keys = tokens.load_keys(json.dumps({"keys": [wrong]}).encode())
    with pytest.raises(AuthError):
        check(R_CHANNEL, "test", keys)


# -- rejection texts (upstream's) ---------------------------------------------------------------

def test_empty_token_is_missing_mode() -> None:
    with pytest.raises(AuthError, match="^Missing mode$"):
        tokens.check("", "chat", KEYS, NOW)


@pytest.mark.parametrize("mode", [1, ["rw"], {"r": True}, None, True])
def test_non_string_mode_is_missing_mode(mode: object) -> None:
    with pytest.raises(AuthError, match="^Missing mode$"):
        check({"mode": mode}, "chat")


@pytest.mark.parametrize("text,parts", [("abc", 1), ("a.b", 2), ("a.b.c.d", 4)])
def test_wrong_number_of_parts(text: str, parts: int) -> None:
    with pytest.raises(AuthError) as info:
        tokens.check(text, None, KEYS, NOW)
    assert str(info.value) == ("Error: JWSError (CompactDecodeError Invalid number of parts: "
                               f"Expected 3 parts; got {parts})")


def test_wrong_secret_is_invalid_signature() -> None:
    other = sign(R, b"x" * 32)
    with pytest.raises(AuthError, match=r"^Error: JWSError JWSInvalidSignature$"):
        tokens.check(other, "chat", KEYS, NOW)


def test_tampered_payload_is_invalid_signature() -> None:
    header, _, signature = sign(R_CHANNEL).split(".")
    forged = base64.urlsafe_b64encode(b'{"mode":"rw","channel":"test"}').decode().rstrip("=")
    with pytest.raises(AuthError, match="JWSInvalidSignature"):
        tokens.check(f"{header}.{forged}.{signature}", None, KEYS, NOW)


def test_alg_none_is_refused() -> None:
    unsigned = jwt.encode(R, None, algorithm="none")
    with pytest.raises(AuthError, match=r"^Error: JWSError JWSNoSignatures$"):
        tokens.check(unsigned, "chat", KEYS, NOW)


@pytest.mark.parametrize("algorithm", ["nOnE", "NONE", "hs256", "HS1", ""])
def test_alg_outside_the_list_is_refused_whatever_its_case(algorithm: str) -> None:
    signed = hand_signed({"alg": algorithm}, R)
    with pytest.raises(AuthError, match=r"^Error: JWSError JWSNoSignatures$"):
        tokens.check(signed, "chat", KEYS, NOW)


@pytest.mark.parametrize("algorithm,length", [("HS256", 31), ("HS384", 47), ("HS512", 63)])
def test_hmac_key_shorter_than_hash_is_refused(algorithm: str, length: int) -> None:
    key = b"k" * length
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Newer PyJWT warns about the short key; 2.8 does not.
        signed = sign(R, key, algorithm)
    with pytest.raises(AuthError, match="JWSInvalidSignature"):
        tokens.check(signed, "chat", tokens.load_keys(key), NOW)


def test_raw_secret_verifies_hs384_and_hs512_when_long_enough() -> None:
    key = b"s" * 64
    for algorithm in ("HS256", "HS384", "HS512"):
        grant = tokens.check(sign(R, key, algorithm), "chat", tokens.load_keys(key), NOW)
        assert grant.mode == "r"


def test_nbf_in_future() -> None:
    with pytest.raises(AuthError, match="^Error: JWTNotYetValid$"):
        check({"mode": "r", "nbf": NOW + 60}, "chat")


def test_iat_in_future() -> None:
    with pytest.raises(AuthError, match="^Error: JWTIssuedAtFuture$"):
        check({"mode": "r", "iat": NOW + 60}, "chat")


def test_exp_now_is_expired_and_exp_later_is_kept() -> None:
    with pytest.raises(AuthError, match="^Token expired$"):
        tokens.check(sign({"mode": "r", "exp": int(NOW)}), "c", KEYS, int(NOW))
    grant = check({"mode": "r", "exp": NOW + 60}, "c")
    assert grant.expires_at == pytest.approx(NOW + 60)


def test_claims_that_do_not_decode() -> None:
    with pytest.raises(AuthError, match='^Error: JWTClaimsSetDecodeError "'):
        check({"mode": "r", "exp": "soon"}, "c")
    with pytest.raises(AuthError, match="^Error: JWTClaimsSetDecodeError"):
        check({"mode": "r", "aud": 5}, "c")


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["soon", True, [1], {"at": 1}, "1700000000"])
def test_time_claims_of_the_wrong_type_are_refused(name: str, value: object) -> None:
    with pytest.raises(AuthError) as info:
        check({"mode": "r", name: value}, "c")
    assert str(info.value) == ('Error: JWTClaimsSetDecodeError "Error in $: parsing NumericDate '
                               f'failed, {name} is not a number"')


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_claims_with_nan_or_infinity_are_not_json(constant: str) -> None:
    # Python's json reads these; JSON, and so jose, does not. NaN would pass every time check.
    token = hand_signed_text('{"alg": "HS256"}', '{"mode": "r", "exp": ' + constant + "}")
    with pytest.raises(AuthError, match="^Error: JWTClaimsSetDecodeError"):
        tokens.check(token, "c", KEYS, NOW)


def test_exp_beyond_any_float_never_expires_and_does_not_crash() -> None:
    grant = check({"mode": "r", "exp": 10**400}, "c")
    assert grant.expires_at is None


def test_signature_is_checked_before_mode() -> None:
    with pytest.raises(AuthError, match="JWSInvalidSignature"):
        tokens.check(sign(NO_MODE, b"y" * 32), "test", KEYS, NOW)


def test_error_text_never_contains_the_token() -> None:
    for bad in (sign(R, b"z" * 32), sign(R)[:-3] + "!!!", "a" * 40 + "." + "b" * 40,
                sign(EXPIRED)):
        with pytest.raises(AuthError) as info:
            tokens.check(bad, None, KEYS, NOW)
        assert bad not in str(info.value)
        assert bad.split(".")[-1] not in str(info.value)


# -- asymmetric keys, JWK and JWK Set ----------------------------------------------------------

def _jwk(public_key: object, algorithm_cls: type) -> dict:
    jwk = json.loads(algorithm_cls.to_jwk(public_key))
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        # RFC 7518 6.2.1.2: coordinates have the curve's full length. PyJWT before 2.9 drops
        # leading zero bytes (always for P-521), and its own from_jwk then refuses the key.
        size = (public_key.curve.key_size + 7) // 8
        numbers = public_key.public_numbers()
        jwk["x"], jwk["y"] = (b64url(value.to_bytes(size, "big")) for value in (numbers.x,
                                                                                 numbers.y))
    return jwk


@pytest.mark.parametrize("algorithm", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
def test_rsa_family(algorithm: str) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = tokens.load_keys(json.dumps(_jwk(private.public_key(), RSAAlgorithm)).encode())
    assert tokens.check(sign(R, private, algorithm), "c", keys, NOW).mode == "r"


@pytest.mark.parametrize("curve,algorithm", [(ec.SECP256R1(), "ES256"), (ec.SECP384R1(), "ES384"),
                                             (ec.SECP521R1(), "ES512"),
                                             (ec.SECP256K1(), "ES256K")])
def test_ec_family(curve: ec.EllipticCurve, algorithm: str) -> None:
    private = ec.generate_private_key(curve)
    keys = tokens.load_keys(json.dumps(_jwk(private.public_key(), ECAlgorithm)).encode())
    assert tokens.check(sign(R, private, algorithm), "c", keys, NOW).mode == "r"


def test_eddsa() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    keys = tokens.load_keys(json.dumps(_jwk(private.public_key(), OKPAlgorithm)).encode())
    assert tokens.check(sign(R, private, "EdDSA"), "c", keys, NOW).mode == "r"


def test_jwks_tries_every_key_and_ignores_kid() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_jwk = {**_jwk(private.public_key(), RSAAlgorithm), "kid": "one"}
    keyset = {"keys": [JWK, rsa_jwk]}
    keys = tokens.load_keys(json.dumps(keyset).encode())
    assert tokens.check(sign(R, private, "RS256", kid="nope"), "c", keys, NOW).mode == "r"
    assert tokens.check(sign(R), "c", keys, NOW).mode == "r"


def test_hmac_token_against_rsa_key_is_invalid_signature() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = tokens.load_keys(json.dumps(_jwk(private.public_key(), RSAAlgorithm)).encode())
    with pytest.raises(AuthError, match="JWSInvalidSignature"):
        tokens.check(sign(R), "c", keys, NOW)


def test_only_a_raw_secret_says_it_is_one() -> None:
    # The command refuses a raw secret too short for HS256; a JWK's length is not the text's.
    assert tokens.read_secret(b"short").raw_secret is True
    assert tokens.read_secret(b'{"kty": "oct", "k": "c2hvcnQ"}').raw_secret is False
    assert tokens.read_secret(b'{"keys": [{"kty": "oct", "k": "c2hvcnQ"}]}').raw_secret is False


def test_json_that_is_not_a_jwk_is_a_raw_secret() -> None:
    secret = b'{"not": "a key", "padding": "xxxxxxxxxxxxxxxx"}'
    keys = tokens.load_keys(secret)
    assert tokens.check(sign(R, secret), "c", keys, NOW).mode == "r"
    array = b'[{"keys": "not a set"}, "xxxxxxxxxxxxxxxxxxxxxxxxx"]'
    assert tokens.check(hand_signed({"alg": "HS256"}, R, array), "c", tokens.load_keys(array),
                      NOW).mode == "r"


# -- a JWK or JWK Set is never an HMAC secret (review finding 1) ---------------------------------

RSA_SIGNER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_SIGNING_JWK = {**_jwk(RSA_SIGNER.public_key(), RSAAlgorithm), "kid": "sig-1", "use": "sig"}
RSA_ENCRYPTION_JWK = {
    **_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(),
           RSAAlgorithm),
    "kid": "enc-1", "use": "enc", "alg": "RSA-OAEP"}
X25519_JWK = {"kty": "OKP", "crv": "X25519", "x": b64url(
    x25519.X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))}
EC_KEY = ec.generate_private_key(ec.SECP256R1()).public_key()
LONG_OCT = b64url(b"o" * 32)

#: Keys a JWK Set may hold that verify no signature, whatever PyJWT makes of them.
UNUSABLE_JWKS = {
    "RSA-OAEP encryption key": RSA_ENCRYPTION_JWK,
    "RSA key with alg RSA-OAEP only": {k: v for k, v in RSA_ENCRYPTION_JWK.items() if k != "use"},
    "RSA key with use enc only": {**RSA_SIGNING_JWK, "use": "enc"},
    "EC key for ECDH-ES": {**_jwk(EC_KEY, ECAlgorithm), "alg": "ECDH-ES"},
    "oct key for A128KW": {"kty": "oct", "k": LONG_OCT, "alg": "A128KW"},
    "key_ops without verify": {**RSA_SIGNING_JWK, "use": "sig", "key_ops": ["encrypt"]},
    "X25519 key": X25519_JWK,
    "unknown alg": {**RSA_SIGNING_JWK, "alg": "RS1"},
    "unknown kty": {"kty": "XYZ", "k": LONG_OCT},
    "no kty": {"k": LONG_OCT},
    "empty oct key": {"kty": "oct", "k": ""},
    "oct key without k": {"kty": "oct"},
    "RSA key PyJWT cannot load": {"kty": "RSA", "n": 5, "e": "AQAB"},
    "EC key off its curve": {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
    "EC key on an unknown curve": {**_jwk(EC_KEY, ECAlgorithm), "crv": "P-999"},
    "not an object": "a string",
}


def _key_material(jwk: object) -> list[str]:
    return [str(jwk[name]) for name in ("n", "k", "x", "y", "d")
            if isinstance(jwk, dict) and name in jwk and len(str(jwk[name])) > 4]


def test_jwks_text_is_never_an_hmac_secret_when_a_key_cannot_be_loaded() -> None:
    # The review's case: one RS256 key and one RSA-OAEP key. The set's text used to become an
    # HMAC secret (PyJWT 2.10) or refuse every RS256 token (PyJWT 2.15), without a word.
    text = json.dumps({"keys": [RSA_SIGNING_JWK, RSA_ENCRYPTION_JWK]}).encode()
    keys = tokens.load_keys(text)
    with pytest.raises(AuthError, match="^Error: JWSError JWSInvalidSignature$"):
        tokens.check(hand_signed({"alg": "HS256", "typ": "JWT"}, R, text), "c", keys, NOW)
    assert tokens.check(sign(R, RSA_SIGNER, "RS256"), "c", keys, NOW).mode == "r"


def test_skipped_key_is_named_without_key_material() -> None:
    text = json.dumps({"keys": [RSA_SIGNING_JWK, RSA_ENCRYPTION_JWK]}).encode()
    loaded = tokens.read_secret(text)
    assert len(loaded.keys) == 1
    (line,) = loaded.skipped
    assert line == ("skipping JWK Set key 1 (kid 'enc-1', kty 'RSA', alg 'RSA-OAEP', use "
                    "'enc'): an encryption key (\"use\" is \"enc\")")


@pytest.mark.parametrize("name", UNUSABLE_JWKS)
def test_unusable_key_of_a_set_is_skipped_and_the_others_still_verify(name: str) -> None:
    jwk = UNUSABLE_JWKS[name]
    text = json.dumps({"keys": [jwk, RSA_SIGNING_JWK]}).encode()
    loaded = tokens.read_secret(text)
    assert len(loaded.keys) == 1 and len(loaded.skipped) == 1
    assert loaded.skipped[0].startswith("skipping JWK Set key 0")
    assert not any(material in loaded.skipped[0] for material in _key_material(jwk))
    assert tokens.check(sign(R, RSA_SIGNER, "RS256", kid="other"), "c", loaded.keys, NOW)
    with pytest.raises(AuthError, match="JWSInvalidSignature"):
        tokens.check(hand_signed({"alg": "HS256"}, R, text), "c", loaded.keys, NOW)


@pytest.mark.parametrize("name", UNUSABLE_JWKS)
def test_set_of_only_unusable_keys_is_a_secret_error(name: str) -> None:
    jwk = UNUSABLE_JWKS[name]
    with pytest.raises(tokens.SecretError) as info:
        tokens.load_keys(json.dumps({"keys": [jwk]}).encode())
    message = str(info.value)
    assert message.startswith("no key of the JWK Set can verify signatures: key 0")
    assert "\n" not in message
    assert not any(material in message for material in _key_material(jwk))


@pytest.mark.parametrize("name", [name for name, jwk in UNUSABLE_JWKS.items()
                                  if isinstance(jwk, dict) and "kty" in jwk])
def test_unusable_single_jwk_is_a_secret_error(name: str) -> None:
    jwk = UNUSABLE_JWKS[name]
    with pytest.raises(tokens.SecretError, match="^the JWK .* cannot verify signatures: ") as info:
        tokens.load_keys(json.dumps(jwk).encode())
    assert not any(material in str(info.value) for material in _key_material(jwk))


@pytest.mark.parametrize("members,message", [
    ('"not a list"', 'the JWK Set\'s "keys" is a string, not an array'),
    ("{}", 'the JWK Set\'s "keys" is an object, not an array'),
    ("null", 'the JWK Set\'s "keys" is null, not an array'),
    ("[]", "the JWK Set has no keys"),
])
def test_keys_member_that_is_not_a_list_of_keys_is_a_secret_error(members: str,
                                                                   message: str) -> None:
    with pytest.raises(tokens.SecretError) as info:
        tokens.load_keys(f'{{"keys": {members}, "padding": "{"x" * 32}"}}'.encode())
    assert str(info.value) == message


def test_jwks_with_a_private_key_verifies_with_its_public_half() -> None:
    private_jwk = {**json.loads(RSAAlgorithm.to_jwk(RSA_SIGNER)), "key_ops": ["sign"]}
    keys = tokens.load_keys(json.dumps({"keys": [private_jwk]}).encode())
    assert tokens.check(sign(R, RSA_SIGNER, "RS256"), "c", keys, NOW).mode == "r"


def test_jwk_alg_is_not_enforced_and_kid_is_ignored() -> None:
    # Spec 3.1: jose neither binds a key to its alg nor selects keys by kid.
    jwk = {**RSA_SIGNING_JWK, "alg": "RS256"}
    keys = tokens.load_keys(json.dumps({"keys": [jwk]}).encode())
    assert tokens.check(sign(R, RSA_SIGNER, "PS384", kid="sig-2"), "c", keys, NOW).mode == "r"


def test_rsa_jwk_secret_refuses_hs256_signed_with_its_text() -> None:
    text = json.dumps(RSA_SIGNING_JWK).encode()
    with pytest.raises(AuthError, match="^Error: JWSError JWSInvalidSignature$"):
        tokens.check(hand_signed({"alg": "HS256"}, R, text), "c", tokens.load_keys(text), NOW)


def test_pem_public_key_as_raw_secret_refuses_hs256_signed_with_its_text() -> None:
    # Upstream would take the PEM text as an HMAC secret; PyJWT refuses to, so such a token
    # is an invalid signature (a 400), not a crash.
    from cryptography.hazmat.primitives.serialization import PublicFormat as Format

    pem = RSA_SIGNER.public_key().public_bytes(Encoding.PEM, Format.SubjectPublicKeyInfo)
    keys = tokens.load_keys(pem)
    with pytest.raises(AuthError, match="^Error: JWSError JWSInvalidSignature$"):
        tokens.check(hand_signed({"alg": "HS256"}, R, pem), "c", keys, NOW)


# -- malformed headers: always a 400 text, never another exception (review finding 9) ---------

MALFORMED_HEADERS = [
    {"alg": "HS256", "kid": 5},
    {"alg": "HS256", "kid": None},
    {"alg": "HS256", "kid": ["a"]},
    {"alg": "HS256", "typ": {"t": 1}},
    {"alg": "HS256", "cty": 1.5},
    {"alg": "HS256", "jku": 1},
    {"alg": "HS256", "x5u": []},
    {"alg": "HS256", "x5t": False},
    {"alg": "HS256", "x5t#S256": 7},
    {"alg": "HS256", "x5c": "cert"},
    {"alg": "HS256", "x5c": [1]},
    {"alg": "HS256", "jwk": "key"},
    {"alg": "HS256", "crit": "exp"},
    {"alg": "HS256", "crit": ["exp"], "exp": 1},
    {"alg": "HS256", "crit": ["b64"], "b64": False},
    {"alg": "HS256", "crit": []},
    {"alg": "HS256", "crit": [{"a": 1}]},
    {"alg": "HS256", "b64": False},
    {"alg": "HS256", "b64": "no"},
]


@pytest.mark.parametrize("header", MALFORMED_HEADERS, ids=json.dumps)
def test_header_member_of_the_wrong_type_is_a_compact_decode_error(header: dict) -> None:
    with pytest.raises(AuthError, match=r"^Error: JWSError \(CompactDecodeError Invalid header"):
        tokens.check(hand_signed(header, R), "c", KEYS, NOW)


@pytest.mark.parametrize("algorithm", [["HS256"], {"HS256": 1}, 5, None, True, 2.5])
def test_alg_that_is_not_a_string_is_no_signatures(algorithm: object) -> None:
    with pytest.raises(AuthError, match=r"^Error: JWSError JWSNoSignatures$"):
        tokens.check(hand_signed({"alg": algorithm}, R), "c", KEYS, NOW)


@pytest.mark.parametrize("header", [["HS256"], "HS256", 5, None, {}])
def test_header_that_is_not_an_object_or_has_no_alg(header: object) -> None:
    with pytest.raises(AuthError, match=r"^Error: JWSError "):
        tokens.check(hand_signed(header, R), "c", KEYS, NOW)


def test_header_nested_too_deeply_is_a_compact_decode_error() -> None:
    deep = b64url(b"[" * 100_000 + b"]" * 100_000)
    token = f"{deep}.{b64url(b'{}')}.{b64url(b'x')}"
    with pytest.raises(AuthError, match=r"^Error: JWSError \(CompactDecodeError Invalid header"):
        tokens.check(token, "c", KEYS, NOW)


@pytest.mark.parametrize("segment", ["!!!!", "\u00e9t\u00e9", "AAAA", "e30", b64url(b"\xff\xfe{")])
def test_header_that_is_not_base64url_json_is_a_compact_decode_error(segment: str) -> None:
    token = f"{segment}.{b64url(b'{}')}.{b64url(b'x')}"
    with pytest.raises(AuthError, match=r"^Error: JWSError "):
        tokens.check(token, "c", KEYS, NOW)


# -- modes and channel lists (3.2, 3.3) --------------------------------------------------------

@pytest.mark.parametrize("mode,read,write", [("r", True, False), ("w", False, True),
                                             ("rw", True, True), ("wr", False, False),
                                             ("R", False, False), ("", False, False)])
def test_modes(mode: str, read: bool, write: bool) -> None:
    grant = check({"mode": mode}, "c")
    assert (grant.can_read, grant.can_write) == (read, write)


def test_channel_and_channels_are_merged_without_duplicates() -> None:
    claims = {"mode": "r", "channel": "a", "channels": ["b", "a", "c"]}
    assert tokens.allowed_channels(claims, None) == ["a", "b", "c"]


def test_channels_alone_are_kept_as_is() -> None:
    assert tokens.allowed_channels({"channels": ["a", "a"]}, None) == ["a", "a"]


WRONG_CHANNEL_CLAIMS = [
    {"channels": "chat"}, {"channels": ["chat", None]}, {"channels": ["chat", 1]},
    {"channels": {"chat": True}}, {"channels": None}, {"channels": 5},
    {"channel": ["chat"]}, {"channel": 5}, {"channel": None}, {"channel": {"name": "chat"}},
    {"channel": "chat", "channels": "chat"}, {"channel": ["chat"], "channels": ["chat"]},
]


@pytest.mark.parametrize("claims", WRONG_CHANNEL_CLAIMS, ids=json.dumps)
@pytest.mark.parametrize("requested", ["chat", "other", None])
def test_channel_claims_of_the_wrong_type_refuse_the_token(claims: dict,
                                                           requested: str | None) -> None:
    # Fail closed (where upstream does not): upstream ignores such a claim, which opens every
    # channel in the URL.
    with pytest.raises(AuthError, match="^No allowed channels$"):
        check({"mode": "rw", **claims}, requested)


def test_empty_channels_claim_keeps_upstream_meaning() -> None:
    # An empty array is of the right type: as upstream, no channel claim restricts the URL's.
    assert tokens.allowed_channels({"channels": []}, "x") == ["x"]


def test_no_channel_claims_and_no_path_channel() -> None:
    with pytest.raises(AuthError, match="^No allowed channels$"):
        check(R)


def test_big_integer_claims_stay_exact() -> None:
    claims = {"mode": "r", "order": 18446744073709551616000001}
    assert check(claims, "c").claims["order"] == 18446744073709551616000001


# -- the exact texts: what the operator reads for a skipped key, what a client reads in a 400 ---

#: The line :attr:`tokens.LoadedKeys.skipped` holds for each unusable key of UNUSABLE_JWKS (and a
#: few more), placed first in a set: the key named by index and kid/kty/crv/alg/use, then why.
SKIPPED_LINES = {
    "RSA-OAEP encryption key": "(kid 'enc-1', kty 'RSA', alg 'RSA-OAEP', use 'enc'): "
                               'an encryption key ("use" is "enc")',
    "RSA key with alg RSA-OAEP only": "(kid 'enc-1', kty 'RSA', alg 'RSA-OAEP'): "
                                      'an encryption key ("alg" is a JWE algorithm)',
    "RSA key with use enc only": "(kid 'sig-1', kty 'RSA', use 'enc'): "
                                 'an encryption key ("use" is "enc")',
    "EC key for ECDH-ES": "(kty 'EC', crv 'P-256', alg 'ECDH-ES'): "
                          'an encryption key ("alg" is a JWE algorithm)',
    "oct key for A128KW": "(kty 'oct', alg 'A128KW'): "
                          'an encryption key ("alg" is a JWE algorithm)',
    "key_ops without verify": "(kid 'sig-1', kty 'RSA', use 'sig'): "
                              'an encryption key ("key_ops" has neither "sign" nor "verify")',
    "X25519 key": "(kty 'OKP', crv 'X25519'): "
                  'a key-agreement key ("crv" is not Ed25519 or Ed448)',
    "unknown alg": "(kid 'sig-1', kty 'RSA', alg 'RS1', use 'sig'): "
                   '"alg" is not a signature algorithm this server accepts',
    "unknown kty": "(kty 'XYZ'): \"kty\" is not one of oct, RSA, EC, OKP",
    "no kty": ': no "kty"',
    "empty oct key": "(kty 'oct'): an empty HMAC key",
    "oct key without k": "(kty 'oct'): PyJWT cannot load it (KeyError)",
    "RSA key PyJWT cannot load": "(kty 'RSA'): PyJWT cannot load it (TypeError)",
    "EC key off its curve": "(kty 'EC', crv 'P-256'): PyJWT cannot load it (InvalidKeyError)",
    "EC key on an unknown curve": "(kty 'EC', crv 'P-999'): "
                                  '"crv" is not one of P-256, P-384, P-521, secp256k1',
    "not an object": ": not a JSON object",
}

MORE_UNUSABLE_JWKS = {
    "use neither sig nor enc": ({**RSA_SIGNING_JWK, "use": "wrap"},
                                "(kid 'sig-1', kty 'RSA', use 'wrap'): \"use\" is not \"sig\""),
    "key_ops not all strings": ({**RSA_SIGNING_JWK, "key_ops": ["verify", 1]},
                                "(kid 'sig-1', kty 'RSA', use 'sig'): "
                                '"key_ops" is not an array of strings'),
    "key_ops a string": ({**RSA_SIGNING_JWK, "key_ops": "verify"},
                         "(kid 'sig-1', kty 'RSA', use 'sig'): "
                         '"key_ops" is not an array of strings'),
    "kty an array": ({"kty": ["RSA"]}, '(kty an array): "kty" is not one of oct, RSA, EC, OKP'),
    "members of other types": ({"kid": 7, "kty": True, "crv": ["P-256"], "alg": None, "use": {}},
                               "(kid a number, kty a boolean, crv an array, alg null, "
                               'use an object): "use" is not "sig"'),
    "EC key with a crv of another type": ({"kty": "EC", "crv": ["P-256"]},
                                          "(kty 'EC', crv an array): "
                                          '"crv" is not one of P-256, P-384, P-521, secp256k1'),
    "OKP key with a crv of another type": ({"kty": "OKP", "crv": {"name": "Ed25519"}},
                                           "(kty 'OKP', crv an object): "
                                           'a key-agreement key ("crv" is not Ed25519 or Ed448)'),
    "kid of 40 characters": ({"kid": "k" * 40, "kty": "XYZ"},
                             f"(kid '{'k' * 40}', kty 'XYZ'): "
                             '"kty" is not one of oct, RSA, EC, OKP'),
    "kid of 41 characters": ({"kid": "k" * 41, "kty": "XYZ"},
                             f"(kid '{'k' * 40}…', kty 'XYZ'): "
                             '"kty" is not one of oct, RSA, EC, OKP'),
}


SKIPPED = {**{name: (jwk, SKIPPED_LINES[name]) for name, jwk in UNUSABLE_JWKS.items()},
           **MORE_UNUSABLE_JWKS}


@pytest.mark.parametrize("name", SKIPPED)
def test_a_skipped_key_is_named_and_its_reason_given_exactly(name: str) -> None:
    jwk, rest = SKIPPED[name]
    loaded = tokens.read_secret(json.dumps({"keys": [jwk, RSA_SIGNING_JWK]}).encode())
    separator = " " if rest.startswith("(") else ""
    assert loaded.skipped == (f"skipping JWK Set key 0{separator}{rest}",)


def test_every_reason_of_a_set_without_a_usable_key_is_listed() -> None:
    with pytest.raises(tokens.SecretError) as info:
        tokens.load_keys(json.dumps({"keys": [{"k": LONG_OCT}, "a string"]}).encode())
    assert str(info.value) == ('no key of the JWK Set can verify signatures: key 0: no "kty"; '
                               "key 1: not a JSON object")


@pytest.mark.parametrize("members,kind", [("true", "a boolean"), ("5", "a number"),
                                          ("1.5", "a number")])
def test_keys_member_of_a_scalar_type_is_named_by_its_json_type(members: str, kind: str) -> None:
    with pytest.raises(tokens.SecretError) as info:
        tokens.load_keys(f'{{"keys": {members}}}'.encode())
    assert str(info.value) == f'the JWK Set\'s "keys" is {kind}, not an array'


def test_a_single_jwk_that_cannot_verify_names_the_jwk() -> None:
    with pytest.raises(tokens.SecretError) as info:
        tokens.load_keys(json.dumps(X25519_JWK).encode())
    assert str(info.value) == ("the JWK (kty 'OKP', crv 'X25519') cannot verify signatures: "
                               'a key-agreement key ("crv" is not Ed25519 or Ed448)')


def _oct(secret: bytes) -> dict:
    return {"kty": "oct", "k": b64url(secret)}


def test_a_key_too_short_for_the_algorithm_is_passed_over_for_the_next() -> None:
    keys = tokens.load_keys(json.dumps({"keys": [_oct(b"short"), _oct(SECRET)]}).encode())
    assert check(R, "c", keys).mode == "r"


def test_a_key_whose_signature_does_not_match_is_passed_over_for_the_next() -> None:
    keys = tokens.load_keys(json.dumps({"keys": [_oct(b"w" * 32), _oct(SECRET)]}).encode())
    assert check(R, "c", keys).mode == "r"


HEADER_SEGMENT_TEXTS = [
    ("A", "Invalid header padding"),
    ("\u00e9t\u00e9", "Invalid header padding"),
    ("!!!!", "Invalid header string: Expecting value: line 1 column 1 (char 0)"),
    ("AAAA", "Invalid header string: Expecting value: line 1 column 1 (char 0)"),
    (b64url(b"\xff\xfe{"), "Invalid header string: not UTF-8"),
    (b64url(b'{"alg": "HS256", "x": NaN}'), "Invalid header string: NaN is not JSON"),
    (b64url(b'{"alg": "HS256", "x": -Infinity}'),
     "Invalid header string: -Infinity is not JSON"),
    (b64url(b"[1]"), "Invalid header string: must be a json object"),
]


@pytest.mark.parametrize("segment,text", HEADER_SEGMENT_TEXTS)
def test_a_header_that_does_not_decode_gets_its_exact_text(segment: str, text: str) -> None:
    token = f"{segment}.{b64url(b'{}')}.{b64url(b'x')}"
    with pytest.raises(AuthError) as info:
        tokens.check(token, "c", KEYS, NOW)
    assert str(info.value) == f"Error: JWSError (CompactDecodeError {text})"


def test_a_validly_signed_header_holding_nan_is_refused() -> None:
    token = hand_signed_text('{"alg": "HS256", "x": NaN}', json.dumps(R))
    with pytest.raises(AuthError) as info:
        tokens.check(token, "c", KEYS, NOW)
    assert str(info.value) == ("Error: JWSError (CompactDecodeError Invalid header string: "
                               "NaN is not JSON)")


@pytest.mark.parametrize("header", [{"alg": "HS256", "crit": ["exp"], "exp": 1},
                                    {"alg": "HS256", "crit": []}], ids=json.dumps)
def test_a_critical_header_is_refused_by_name(header: dict) -> None:
    with pytest.raises(AuthError) as info:
        tokens.check(hand_signed(header, R), "c", KEYS, NOW)
    assert str(info.value) == ("Error: JWSError (CompactDecodeError Invalid header: crit (no "
                               "extension is supported))")


def test_a_payload_or_signature_that_is_not_base64url_gets_pyjwts_text() -> None:
    header, payload, signature = sign(R).split(".")
    for token, text in ((f"{header}.{payload}.A", "Invalid crypto padding"),
                        (f"{header}.A.{signature}", "Invalid payload padding")):
        with pytest.raises(AuthError) as info:
            tokens.check(token, "c", KEYS, NOW)
        assert str(info.value) == f"Error: JWSError (CompactDecodeError {text})"


def test_a_header_rule_only_pyjwt_has_is_still_a_compact_decode_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Some PyJWT version may refuse a header _header lets through; that is a 400 all the same.
    def refuse(*args: object, **kwargs: object) -> None:
        raise jwt.exceptions.InvalidTokenError("a rule of a future PyJWT")

    monkeypatch.setattr(jwt.PyJWS, "decode", refuse)
    with pytest.raises(AuthError) as info:
        check(R, "c")
    assert str(info.value) == "Error: JWSError (CompactDecodeError Invalid header)"


@pytest.mark.parametrize("payload,text", [
    ("[1]", "Error in $: expected Object"),
    ('"claims"', "Error in $: expected Object"),
    ("not json", "Error in $: Expecting value: line 1 column 1 (char 0)"),
    ('{"mode": "r", "exp": NaN}', "Error in $: NaN is not JSON"),
    ("[" * 100_000 + "]" * 100_000, "Error in $: nested too deeply"),
])
def test_claims_that_do_not_decode_get_their_exact_text(payload: str, text: str) -> None:
    with pytest.raises(AuthError) as info:
        tokens.check(hand_signed_text('{"alg": "HS256"}', payload), "c", KEYS, NOW)
    assert str(info.value) == f'Error: JWTClaimsSetDecodeError "{text}"'


@pytest.mark.parametrize("audience", ["relay", ["relay", "other"], []])
def test_an_audience_of_a_string_or_strings_is_accepted(audience: object) -> None:
    assert check({"mode": "r", "aud": audience}, "c").claims["aud"] == audience


@pytest.mark.parametrize("audience", [5, ["relay", 5], {"aud": "relay"}, True])
def test_an_audience_of_another_type_is_refused(audience: object) -> None:
    with pytest.raises(AuthError) as info:
        check({"mode": "r", "aud": audience}, "c")
    assert str(info.value) == ('Error: JWTClaimsSetDecodeError "Error in $.aud: expected a string '
                               'or an array of strings"')


def test_iat_and_nbf_equal_to_now_are_valid_and_later_ones_are_not() -> None:
    tokens.check_claims({"iat": 100, "nbf": 100, "exp": 100.5}, 100)
    with pytest.raises(AuthError, match="^Error: JWTIssuedAtFuture$"):
        tokens.check_claims({"iat": 100.5}, 100)
    with pytest.raises(AuthError, match="^Error: JWTNotYetValid$"):
        tokens.check_claims({"nbf": 100.5}, 100)


def test_the_filters_claim_is_parsed_or_refuses_the_token() -> None:
    grant = tokens.authorize({"mode": "r", "filters": ["payload.market_id=eq.7"]}, "c")
    assert [str(f) for f in grant.filters] == ["payload.market_id=eq.7"]
    assert tokens.authorize({"mode": "r"}, "c").filters == frozenset()
    assert tokens.authorize({"mode": "r", "filters": []}, "c").filters == frozenset()
    for claim in ("payload.market_id=eq.7", None, [7], {"a": "b"}):
        with pytest.raises(tokens.AuthError,
                           match="^Error: filters claim: expected a list of strings$"):
            tokens.authorize({"mode": "r", "filters": claim}, "c")
    with pytest.raises(tokens.AuthError, match='^Error: filters claim "x=zz.1": unknown operator'):
        tokens.authorize({"mode": "r", "filters": ["x=zz.1"]}, "c")
    # The mode and channel rules come first, as upstream's texts do.
    with pytest.raises(tokens.AuthError, match="^Missing mode$"):
        tokens.authorize({"filters": ["x=zz.1"]}, "c")


# -- the grant cache -----------------------------------------------------------------------------

def test_the_grant_cache_shares_one_grant_per_token_and_channel() -> None:
    cache = tokens.GrantCache(KEYS)
    token = sign({"mode": "r", "channels": ["a", "b"]})
    first = cache.check(token, "a", NOW)
    assert cache.check(token, "a", NOW) is first
    other = cache.check(token, "b", NOW)  # Another channel asked for: a grant of its own.
    assert other is not first and other.channels == ("b",)
    assert cache.check(token, None, NOW).channels == ("a", "b")
    assert len(cache) == 3


def test_a_kept_grant_expires_and_starts_as_an_unkept_one_would() -> None:
    cache = tokens.GrantCache(KEYS)
    token = sign({"mode": "r", "exp": NOW + 10, "nbf": NOW - 5})
    cache.check(token, "chat", NOW)
    with pytest.raises(AuthError, match=f"^{tokens.TOKEN_EXPIRED}$"):
        cache.check(token, "chat", NOW + 10)
    early = sign({"mode": "r", "nbf": NOW + 5})
    with pytest.raises(AuthError, match=f"^{tokens.NOT_YET_VALID}$"):
        cache.check(early, "chat", NOW)
    assert len(cache) == 1  # Refusals are never kept,
    assert cache.check(early, "chat", NOW + 5).mode == "r"  # and the same token is let in later.
    issued = sign({"mode": "r", "iat": NOW})
    cache.check(issued, "chat", NOW)
    with pytest.raises(AuthError, match=f"^{tokens.ISSUED_AT_FUTURE}$"):
        cache.check(issued, "chat", NOW - 1)


def test_the_grant_cache_is_bounded_in_entries_and_token_length() -> None:
    cache = tokens.GrantCache(KEYS, size=3)
    signed = [sign({"mode": "r", "n": n}) for n in range(4)]
    for token in signed[:3]:
        cache.check(token, "chat", NOW)
    assert len(cache) == 3
    cache.check(signed[3], "chat", NOW)  # Full: emptied whole, then this one kept.
    assert len(cache) == 1
    long = sign({"mode": "r", "pad": "x" * tokens.GRANT_CACHE_TOKEN_CHARS})
    assert len(long) > tokens.GRANT_CACHE_TOKEN_CHARS
    assert cache.check(long, "chat", NOW).mode == "r"
    assert len(cache) == 1  # Checked, never kept.
    # Token and channel count together. Base64 turns 3 bytes into 4 characters: some padding
    # gives a token one character short of the limit, and a one-letter channel makes it exact.
    limit = next(token for n in range(tokens.GRANT_CACHE_TOKEN_CHARS)
                 if len(token := sign({"mode": "r", "pad": "x" * n}))
                 == tokens.GRANT_CACHE_TOKEN_CHARS - 1)
    cache.check(limit, "c", NOW)
    assert len(cache) == 2  # Exactly the limit is kept;
    cache.check(limit, "cc", NOW)
    assert len(cache) == 2  # one more is not: an open token cannot fill it with long names.
    channel = "x" * (tokens.GRANT_CACHE_TOKEN_CHARS - len(signed[0]) + 1)
    cache.check(signed[0], channel, NOW)
    assert len(cache) == 2


def test_a_bad_signature_is_refused_even_after_the_good_token_was_kept() -> None:
    cache = tokens.GrantCache(KEYS)
    token = sign({"mode": "r"})
    cache.check(token, "chat", NOW)
    head, payload, signature = token.split(".")
    forged = f"{head}.{payload}.{signature[:-2]}AA"
    with pytest.raises(AuthError):
        cache.check(forged, "chat", NOW)


def test_a_default_grant_cache_holds_4096_grants() -> None:
    cache = tokens.GrantCache(KEYS)
    token = sign({"mode": "r"})  # No channel claim: each channel asked for is a grant of its own.
    for n in range(4096):
        cache.check(token, f"c{n}", NOW)
    assert len(cache) == 4096
    cache.check(token, "one more", NOW)  # Full: emptied whole, then this one kept.
    assert len(cache) == 1


def test_a_token_of_4096_characters_is_kept_and_one_with_a_channel_too_long_is_not() -> None:
    # The bound as a number (the test above checks it only against the constant), and a token
    # asked for without a channel counts its own characters only.
    exact = next(token for n in range(4096)
                 if len(token := sign({"mode": "r", "channels": ["c"], "pad": "x" * n})) == 4096)
    cache = tokens.GrantCache(KEYS)
    cache.check(exact, None, NOW)
    assert len(cache) == 1
    cache.check(exact, "c", NOW)
    assert len(cache) == 1


def test_a_channel_claim_limits_the_connection_to_that_channel() -> None:
    assert check(R_CHANNEL).channels == ("test",)
    with pytest.raises(AuthError, match="^No allowed channels$"):
        check(R_CHANNEL, "other")

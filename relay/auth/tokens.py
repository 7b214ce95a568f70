"""Tokens: secret → keys, token → claims, claims + requested channel → what a client may do.

Theory of operation
-------------------
Three pure steps, each matching postgres-websockets (jose 0.12) point by point unless a line
below says otherwise:

1. :func:`read_secret` interprets the secret bytes as a JWK Set (a JSON object with ``keys``),
   else a single JWK (a JSON object with ``kty``), else a raw HMAC secret. A key is kept as key
   material, not bound to one algorithm: a raw secret verifies HS256, HS384 and HS512 alike, as
   upstream does. Unlike upstream, a JWK or JWK Set is never an HMAC secret (it is public, so
   anyone could sign with it): a key of a set that cannot verify signatures (an encryption key
   by ``use``, ``alg`` or ``key_ops``; an X25519/X448 key; an empty HMAC key; one that PyJWT
   cannot load) is skipped and named in :attr:`LoadedKeys.skipped`, and a JWK or JWK Set left
   without a usable key (or whose ``keys`` is not an array) is a :class:`SecretError`.
   :attr:`LoadedKeys.raw_secret` says when the secret was taken as a raw HMAC secret, so that
   the command can refuse one shorter than every HMAC algorithm needs (:data:`HMAC_MIN_BYTES`).
2. :func:`verify` checks the header's shape, then the signature with every key that fits the
   header's ``alg`` (PyJWT does the cryptography), then the time claims with zero skew. Every
   failure, however malformed the token, is an :class:`AuthError` whose text is the exact body
   of upstream's HTTP 400 (``Error: …`` for all but three texts of its own).
3. :func:`authorize` applies upstream's ``mode`` and ``channel``/``channels`` rules
   (https://github.com/diogob/postgres-websockets/blob/master/src/PostgresWebsockets/Claims.hs),
   except that a channel claim of the wrong type refuses the token instead of being ignored.
   A ``filters`` claim (this project's: a list of :mod:`relay.core.filters` texts) narrows what the
   client receives, on top of any ``filter`` URL parameters; one that is not a list of strings
   or does not parse refuses the token (``Error: filters claim: …``), never widens it.

Rules this module keeps: no sockets, no logging (callers log :attr:`LoadedKeys.skipped`), a
token never appears in an error text, and neither does key material.
"""

from __future__ import annotations

import binascii
import dataclasses
import json
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import DecodeError, InvalidKeyError, InvalidSignatureError, PyJWTError
from jwt.utils import base64url_decode

from relay.core import filters as filters_module
from relay.core.filters import Filters

#: The algorithms jose 0.12 accepts; anything else (``none`` first of all) is refused.
ALLOWED_ALGORITHMS = frozenset({
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
    "PS256", "PS384", "PS512", "EdDSA", "ES256K",
})

#: Which algorithms each kind of key can verify. EC keys are narrowed by curve below.
_FAMILY_ALGORITHMS: dict[str, frozenset[str]] = {
    "oct": frozenset({"HS256", "HS384", "HS512"}),
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "OKP": frozenset({"EdDSA"}),
}
_CURVE_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}

#: jose refuses HMAC keys shorter than the hash output (reported as an invalid signature). Public:
#: the command refuses a raw secret too short for HS256 and the token command checks its --alg.
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

#: JWE algorithms (RFC 7518 4.1 key management, 5.1 content encryption; RFC 8037 for OKP). A JWK
#: whose ``alg`` names one is an encryption key: it must verify nothing, even where PyJWT would
#: load it as a signature key (JWK Sets legitimately publish such keys beside signing keys).
_ENCRYPTION_ALGORITHMS = frozenset({
    "RSA1_5", "RSA-OAEP", "RSA-OAEP-256", "RSA-OAEP-384", "RSA-OAEP-512",
    "A128KW", "A192KW", "A256KW", "dir",
    "ECDH-ES", "ECDH-ES+A128KW", "ECDH-ES+A192KW", "ECDH-ES+A256KW",
    "A128GCMKW", "A192GCMKW", "A256GCMKW",
    "PBES2-HS256+A128KW", "PBES2-HS384+A192KW", "PBES2-HS512+A256KW",
    "A128CBC-HS256", "A192CBC-HS384", "A256CBC-HS512", "A128GCM", "A192GCM", "A256GCM",
})

#: ``key_ops`` values (RFC 7517 4.3) of a signature key; a JWK whose ``key_ops`` names neither
#: is for encryption or key agreement. ``sign`` counts: a private JWK verifies by its public half.
_SIGNATURE_KEY_OPS = frozenset({"sign", "verify"})

#: OKP curves that sign (RFC 8037); the others (X25519, X448) only agree keys.
_SIGNING_OKP_CURVES = frozenset({"Ed25519", "Ed448"})

#: PyJWT's loader for each key type. Each ignores the JWK's ``alg``, as upstream's jose does, and
#: behaves alike from PyJWT 2.8 to 2.15, unlike PyJWK, which picks its loader by ``alg``.
_LOADERS: dict[str, Callable[[Any], Any]] = {
    "oct": HMACAlgorithm.from_jwk, "RSA": RSAAlgorithm.from_jwk, "EC": ECAlgorithm.from_jwk,
    "OKP": OKPAlgorithm.from_jwk,
}

#: Characters of a ``kid``/``kty``/``alg`` value a warning shows, so one line stays one line.
_SHOWN_CHARS = 40

#: JWS header members (RFC 7515 4.1) that are strings. jose refuses a header whose member has
#: another JSON type, and PyJWT versions check different ones (2.8 only ``kid``), so they are
#: checked here, the same way whatever PyJWT is installed, before PyJWT sees the token.
_STRING_HEADERS = ("kid", "typ", "cty", "jku", "x5u", "x5t", "x5t#S256")

MISSING_MODE = "Missing mode"
TOKEN_EXPIRED = "Token expired"
NO_ALLOWED_CHANNELS = "No allowed channels"
#: How filter errors from the token name their source.
FILTERS_CLAIM = "filters claim"
INVALID_SIGNATURE = "Error: JWSError JWSInvalidSignature"
NO_SIGNATURES = "Error: JWSError JWSNoSignatures"
NOT_YET_VALID = "Error: JWTNotYetValid"
ISSUED_AT_FUTURE = "Error: JWTIssuedAtFuture"


class AuthError(Exception):
    """A token or request is refused; ``str()`` is the HTTP 400 body."""


class SecretError(ValueError):
    """The secret is a JWK or JWK Set without a key that can verify signatures.

    ``str()`` is one line naming the keys by index and ``kid``/``kty``/``alg``, never key
    material; the command prints it as a configuration error of ``PGWS_JWT_SECRET``.
    """


class _Unusable(Exception):
    """Why one JWK cannot verify signatures (a fixed text: no key material)."""


@dataclasses.dataclass(frozen=True)
class Key:
    """Verification key material and the algorithms it can check."""

    material: Any
    algorithms: frozenset[str]


@dataclasses.dataclass(frozen=True)
class LoadedKeys:
    """What a secret yields: its keys, and one line for each key of a JWK Set skipped."""

    keys: tuple[Key, ...]
    skipped: tuple[str, ...] = ()
    #: The secret is a raw HMAC secret (neither a JWK nor a JWK Set): its length is the key's.
    raw_secret: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """What an accepted token allows on this connection (slotted: one lives as long as each
    connection whose token is not shared)."""

    mode: str
    channels: tuple[str, ...]
    claims: dict[str, Any]
    #: The token's ``filters`` claim, parsed (empty without one).
    filters: Filters = filters_module.NONE

    @property
    def can_read(self) -> bool:
        return self.mode in ("r", "rw")

    @property
    def can_write(self) -> bool:
        return self.mode in ("w", "rw")

    @property
    def expires_at(self) -> float | None:
        exp = self.claims.get("exp")
        if not _is_number(exp):
            return None
        try:
            return float(exp)
        except OverflowError:
            return None  # Beyond any float (10**400): it passed the check, so it is in the future.


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value: object) -> str:
    """The JSON name of a value's type, for messages that must not show the value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _label(jwk: Any, index: int | None) -> str:
    """Names a key for the operator by index and kid/kty/crv/alg/use, never by key material."""
    name = "the JWK" if index is None else f"key {index}"
    if not isinstance(jwk, dict):
        return name
    shown = []
    for field in ("kid", "kty", "crv", "alg", "use"):
        if field in jwk:
            value = jwk[field]
            if isinstance(value, str):
                text = value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "…"
                shown.append(f"{field} {text!r}")
            else:
                shown.append(f"{field} {_json_type(value)}")
    return f"{name} ({', '.join(shown)})" if shown else name


def _check_purpose(jwk: dict[str, Any]) -> None:
    """Refuse a JWK that declares it is not for signatures (RFC 7517 4.2-4.4)."""
    if "use" in jwk and jwk["use"] != "sig":
        raise _Unusable('an encryption key ("use" is "enc")' if jwk["use"] == "enc"
                        else '"use" is not "sig"')
    if "alg" in jwk:
        algorithm = jwk["alg"]
        if isinstance(algorithm, str) and algorithm in _ENCRYPTION_ALGORITHMS:
            raise _Unusable('an encryption key ("alg" is a JWE algorithm)')
        if not (isinstance(algorithm, str) and algorithm in ALLOWED_ALGORITHMS):
            raise _Unusable('"alg" is not a signature algorithm this server accepts')
    if "key_ops" in jwk:
        operations = jwk["key_ops"]
        if not (isinstance(operations, list) and all(isinstance(op, str) for op in operations)):
            raise _Unusable('"key_ops" is not an array of strings')
        if not _SIGNATURE_KEY_OPS.intersection(operations):
            raise _Unusable('an encryption key ("key_ops" has neither "sign" nor "verify")')


def _jwk_key(jwk: Any) -> Key:
    """The verification key of one JWK, or :class:`_Unusable` saying why there is none."""
    if not isinstance(jwk, dict):
        raise _Unusable("not a JSON object")
    _check_purpose(jwk)
    kty = jwk.get("kty")
    loader = _LOADERS.get(kty) if isinstance(kty, str) else None
    if loader is None:
        raise _Unusable('"kty" is not one of oct, RSA, EC, OKP' if "kty" in jwk
                        else 'no "kty"')
    crv = jwk.get("crv") if isinstance(jwk.get("crv"), str) else None
    if kty == "OKP" and crv not in _SIGNING_OKP_CURVES:
        # Checked here because some PyJWT versions load X25519 keys (they then verify nothing).
        raise _Unusable('a key-agreement key ("crv" is not Ed25519 or Ed448)')
    if kty == "EC" and crv not in _CURVE_ALGORITHMS:
        raise _Unusable('"crv" is not one of P-256, P-384, P-521, secp256k1')
    if kty == "oct" and jwk.get("k") == "":
        # Checked here because PyJWT 2.8 loads an empty key (which then verifies nothing).
        raise _Unusable("an empty HMAC key")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = loader(jwk)
    except Exception as exc:
        # PyJWT and cryptography raise many types for a bad key, varying by version; any of them
        # makes the key unusable. Their messages can quote the key, so only the type is kept.
        raise _Unusable(f"PyJWT cannot load it ({type(exc).__name__})") from None
    if kty == "oct":
        # A key shorter than a hash is kept, as upstream: it verifies nothing (ClaimsSpec 10).
        return Key(parsed, _FAMILY_ALGORITHMS["oct"])
    # Verification needs the public half; a JWK may carry a private key.
    material = parsed.public_key() if hasattr(parsed, "public_key") else parsed
    if kty == "EC":
        return Key(material, frozenset({_CURVE_ALGORITHMS[str(crv)]}))
    return Key(material, _FAMILY_ALGORITHMS[kty])


def _key_set(members: Any) -> LoadedKeys:
    if not isinstance(members, list):
        raise SecretError(f'the JWK Set\'s "keys" is {_json_type(members)}, not an array')
    if not members:
        raise SecretError("the JWK Set has no keys")
    keys, reasons = [], []
    for index, jwk in enumerate(members):
        try:
            keys.append(_jwk_key(jwk))
        except _Unusable as unusable:
            reasons.append(f"{_label(jwk, index)}: {unusable}")
    if not keys:
        raise SecretError("no key of the JWK Set can verify signatures: " + "; ".join(reasons))
    return LoadedKeys(tuple(keys), tuple(f"skipping JWK Set {reason}" for reason in reasons))


def read_secret(secret: bytes) -> LoadedKeys:
    """Interpret secret bytes as a JWK Set, a JWK, or a raw HMAC secret (in that order).

    A JSON object with ``keys`` is a JWK Set and one with ``kty`` a JWK: never an HMAC secret,
    even when no key in it is usable (:class:`SecretError`, also for ``keys`` not an array).
    Unusable keys of a set are skipped; every other key is tried on every token, ``kid`` or not.
    Anything else, other JSON included, is a raw secret, as upstream.
    """
    try:
        document = json.loads(secret)
    except (ValueError, RecursionError):
        document = None
    if isinstance(document, dict) and "keys" in document:
        return _key_set(document["keys"])
    if isinstance(document, dict) and "kty" in document:
        try:
            return LoadedKeys((_jwk_key(document),))
        except _Unusable as unusable:
            raise SecretError(f"{_label(document, None)} cannot verify signatures: "
                              f"{unusable}") from None
    return LoadedKeys((Key(secret, _FAMILY_ALGORITHMS["oct"]),), raw_secret=True)


def load_keys(secret: bytes) -> tuple[Key, ...]:
    """The keys of :func:`read_secret`, for callers with no use for what was skipped."""
    return read_secret(secret).keys


def _compact_error(detail: str) -> AuthError:
    return AuthError(f"Error: JWSError (CompactDecodeError {detail})")


def _claims_error(detail: str) -> AuthError:
    return AuthError(f"Error: JWTClaimsSetDecodeError {json.dumps(detail)}")


def _refuse_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity; JSON (and so jose) has no such values.
    raise ValueError(f"{name} is not JSON")


def _header(segment: str) -> dict[str, Any]:
    """The token's header, checked for the shape jose requires; texts name no token content."""
    try:
        header = json.loads(base64url_decode(segment), parse_constant=_refuse_constant)
    except (binascii.Error, TypeError):
        raise _compact_error("Invalid header padding") from None
    except RecursionError:
        raise _compact_error("Invalid header string: nested too deeply") from None
    except ValueError as exc:
        # A UnicodeError's text quotes a byte of the token; json's name only a position.
        detail = "not UTF-8" if isinstance(exc, UnicodeError) else str(exc)
        raise _compact_error(f"Invalid header string: {detail}") from None
    if not isinstance(header, dict):
        raise _compact_error("Invalid header string: must be a json object")
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in ALLOWED_ALGORITHMS:
        raise AuthError(NO_SIGNATURES)  # As for "none": jose has no signature it can check.
    for name in _STRING_HEADERS:
        if name in header and not isinstance(header[name], str):
            raise _compact_error(f"Invalid header: {name} must be a string")
    if "jwk" in header and not isinstance(header["jwk"], dict):
        raise _compact_error("Invalid header: jwk must be an object")
    if "x5c" in header and not (isinstance(header["x5c"], list)
                                and all(isinstance(item, str) for item in header["x5c"])):
        raise _compact_error("Invalid header: x5c must be an array of strings")
    if "crit" in header:
        # RFC 7515 4.1.11: a critical extension not understood must be refused; none is.
        raise _compact_error("Invalid header: crit (no extension is supported)")
    if header.get("b64", True) is not True:
        raise _compact_error("Invalid header: b64 (RFC 7797) is not supported")
    return header


def _signature_payload(token: str, keys: Sequence[Key]) -> bytes:
    parts = token.split(".")
    if len(parts) != 3:
        raise _compact_error(f"Invalid number of parts: Expected 3 parts; got {len(parts)}")
    algorithm = _header(parts[0])["alg"]
    jws = jwt.PyJWS(options={"verify_signature": True})
    for key in keys:
        if algorithm not in key.algorithms:
            continue
        if algorithm in HMAC_MIN_BYTES and len(key.material) < HMAC_MIN_BYTES[algorithm]:
            continue
        try:
            with warnings.catch_warnings():
                # Short RSA keys only warn in PyJWT; jose accepts them, and so do we.
                warnings.simplefilter("ignore")
                return jws.decode(token, key.material, algorithms=[algorithm])
        except (InvalidSignatureError, InvalidKeyError, TypeError, ValueError):
            # Not this key: a wrong signature, or key material PyJWT refuses for this
            # algorithm (a PEM text as an HMAC secret, say).
            continue
        except DecodeError as exc:
            raise _compact_error(str(exc)) from None  # Payload or signature not base64url.
        except PyJWTError:
            # A header rule of some PyJWT version beyond those of _header: still a 400.
            raise _compact_error("Invalid header") from None
    raise AuthError(INVALID_SIGNATURE)


def check_claims(claims: dict[str, Any], now: float) -> None:
    """Check ``exp``, ``iat``, ``nbf`` (zero skew) and the shape of ``aud``, in jose's order."""
    for name in ("exp", "nbf", "iat"):
        if name in claims and not _is_number(claims[name]):
            raise _claims_error(f"Error in $: parsing NumericDate failed, {name} is not a number")
    audience = claims.get("aud")
    if audience is not None and not (
        isinstance(audience, str)
        or (isinstance(audience, list) and all(isinstance(item, str) for item in audience))
    ):
        raise _claims_error("Error in $.aud: expected a string or an array of strings")
    if "exp" in claims and claims["exp"] <= now:
        raise AuthError(TOKEN_EXPIRED)
    if "iat" in claims and claims["iat"] > now:
        raise AuthError(ISSUED_AT_FUTURE)
    if "nbf" in claims and claims["nbf"] > now:
        raise AuthError(NOT_YET_VALID)


def verify(token: str, keys: Sequence[Key], now: float) -> dict[str, Any]:
    """The claims of a valid token; an empty token has none (so ``Missing mode`` follows)."""
    if token == "":
        return {}
    payload = _signature_payload(token, keys)
    try:
        # The standard library keeps integers of any size exact (Econia order ids exceed 2^64).
        claims = json.loads(payload, parse_constant=_refuse_constant)
    except RecursionError:
        raise _claims_error("Error in $: nested too deeply") from None
    except ValueError as exc:
        raise _claims_error(f"Error in $: {exc}") from None
    if not isinstance(claims, dict):
        raise _claims_error("Error in $: expected Object")
    check_claims(claims, now)
    return claims


def allowed_channels(claims: dict[str, Any], requested: str | None) -> list[str]:
    """The channels a connection gets, or ``AuthError("No allowed channels")``, by upstream's rules.

    Fails closed where upstream is lenient (it ignores such claims, which opens every
    channel named in the URL): a ``channel`` claim that is present but not a string, or a
    ``channels`` claim that is present but not an array of strings, refuses the token. A claim
    present with the value ``null`` is of the wrong type too, not absent.
    """
    channel = claims.get("channel")
    channels = claims.get("channels")
    if "channel" in claims and not isinstance(channel, str):
        raise AuthError(NO_ALLOWED_CHANNELS)
    if "channels" in claims and not (
            isinstance(channels, list) and all(isinstance(item, str) for item in channels)):
        raise AuthError(NO_ALLOWED_CHANNELS)

    if channel is not None and channels is not None:
        allowed = list(dict.fromkeys([channel, *channels]))
    elif channel is not None:
        allowed = [channel]
    elif channels is not None:
        allowed = list(channels)
    else:
        allowed = []

    if requested is not None:
        chosen = [item for item in allowed if item == requested] if allowed else [requested]
    else:
        chosen = allowed
    if not chosen:
        raise AuthError(NO_ALLOWED_CHANNELS)
    return chosen


def claim_filters(claims: dict[str, Any]) -> Filters:
    """The ``filters`` claim, parsed; absent: none. Refuses the token when it is present but
    not a list of filter texts that parse (an authorisation that cannot be applied)."""
    if "filters" not in claims:
        return filters_module.NONE
    texts = claims["filters"]
    if not (isinstance(texts, list) and all(isinstance(text, str) for text in texts)):
        raise AuthError(f"Error: {FILTERS_CLAIM}: expected a list of strings")
    try:
        return filters_module.parse_all(texts, source=FILTERS_CLAIM)
    except filters_module.FilterError as bad:
        raise AuthError(f"Error: {bad}") from None


def authorize(claims: dict[str, Any], requested: str | None) -> Grant:
    """Spec 3.2: ``mode`` must be a string; then the channel rules of :func:`allowed_channels`,
    then the ``filters`` claim (:func:`claim_filters`)."""
    mode = claims.get("mode")
    if not isinstance(mode, str):
        raise AuthError(MISSING_MODE)
    channels = tuple(allowed_channels(claims, requested))
    return Grant(mode=mode, channels=channels, claims=claims, filters=claim_filters(claims))


def check(token: str, requested: str | None, keys: Sequence[Key], now: float) -> Grant:
    """The whole check in upstream's order: signature and claims, then mode, then channels."""
    return authorize(verify(token, keys, now), requested)


#: Distinct (token, channel) pairs whose grant :class:`GrantCache` keeps. Many clients present
#: the same token (a feed's one public read token, as Econia's): its signature is checked and
#: its claims parsed once instead of per connection, which saved ~12 % of a handshake's CPU in
#: a 100,000-client storm (bench/scenarios/c100k.py), and its clients share one grant in memory.
#: When full, the cache is emptied whole: a storm of distinct tokens costs one verification each,
#: as without a cache.
GRANT_CACHE_SIZE = 4096

#: A longer token and requested channel together are checked every time and never kept, so
#: the cache holds at most GRANT_CACHE_SIZE × this many characters of keys (16 MiB, and the
#: claims parsed from them), whatever clients send.
GRANT_CACHE_TOKEN_CHARS = 4096


class GrantCache:
    """:func:`check` with the grants of tokens already accepted kept, keyed by the exact token
    text and requested channel.

    A kept grant's time claims (``exp``, ``iat``, ``nbf``) are checked again at every use, so a
    kept token expires exactly when an unkept one would, with the same refusal; only
    acceptances are kept, so every refusal is computed (and worded) afresh. The keys are the
    ones read at start-up and never change, so a kept signature check stays true.
    """

    def __init__(self, keys: Sequence[Key], size: int = GRANT_CACHE_SIZE) -> None:
        self._keys = keys
        self._size = size
        self._grants: dict[tuple[str, str | None], Grant] = {}

    def __len__(self) -> int:
        return len(self._grants)

    def check(self, token: str, requested: str | None, now: float) -> Grant:
        key = (token, requested)
        grant = self._grants.get(key)
        if grant is not None:
            check_claims(grant.claims, now)
            return grant
        grant = check(token, requested, self._keys, now)
        if len(token) + len(requested or "") <= GRANT_CACHE_TOKEN_CHARS:
            if len(self._grants) >= self._size:
                self._grants.clear()
            self._grants[key] = grant
        return grant

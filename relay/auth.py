"""Tokens: secret → keys, token → claims, claims + requested channel → what a client may do.

Theory of operation
-------------------
Three pure steps, each matching postgres-websockets (jose 0.12) point by point:

1. :func:`load_keys` interprets the secret bytes as a JWK Set, else a single JWK, else a raw
   HMAC secret. A key is kept as key material, not bound to one algorithm: a raw secret verifies
   HS256, HS384 and HS512 alike, as upstream does.
2. :func:`verify` checks the signature with every key that fits the header's ``alg`` (PyJWT does
   the cryptography) and then the time claims with zero skew. Every failure is an
   :class:`AuthError` whose text is the exact body of upstream's HTTP 400.
3. :func:`authorize` applies the ``mode`` and ``channel``/``channels`` rules (spec 3.2, 3.3).

Rules this module keeps: no sockets, no logging, and a token never appears in an error text.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from typing import Any

import jwt
from jwt.exceptions import DecodeError, InvalidKeyError, PyJWKError, PyJWTError

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

#: jose refuses HMAC keys shorter than the hash output (reported as an invalid signature).
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

MISSING_MODE = "Missing mode"
TOKEN_EXPIRED = "Token expired"
NO_ALLOWED_CHANNELS = "No allowed channels"
INVALID_SIGNATURE = "Error: JWSError JWSInvalidSignature"
NO_SIGNATURES = "Error: JWSError JWSNoSignatures"
NOT_YET_VALID = "Error: JWTNotYetValid"
ISSUED_AT_FUTURE = "Error: JWTIssuedAtFuture"


class AuthError(Exception):
    """A token or request is refused; ``str()`` is the HTTP 400 body."""


@dataclasses.dataclass(frozen=True)
class Key:
    """Verification key material and the algorithms it can check."""

    material: Any
    algorithms: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Grant:
    """What an accepted token allows on this connection."""

    mode: str
    channels: tuple[str, ...]
    claims: dict[str, Any]

    @property
    def can_read(self) -> bool:
        return self.mode in ("r", "rw")

    @property
    def can_write(self) -> bool:
        return self.mode in ("w", "rw")

    @property
    def expires_at(self) -> float | None:
        exp = self.claims.get("exp")
        return float(exp) if _is_number(exp) else None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _jwk_key(jwk: dict[str, Any]) -> Key:
    kty = jwk.get("kty")
    parsed = jwt.PyJWK(jwk).key
    if kty == "oct":
        return Key(parsed, _FAMILY_ALGORITHMS["oct"])
    # Verification needs the public half; a JWK may carry a private key.
    material = parsed.public_key() if hasattr(parsed, "public_key") else parsed
    if kty == "EC":
        algorithm = _CURVE_ALGORITHMS.get(str(jwk.get("crv")))
        return Key(material, frozenset({algorithm} if algorithm else ()))
    return Key(material, _FAMILY_ALGORITHMS.get(str(kty), frozenset()))


def load_keys(secret: bytes) -> tuple[Key, ...]:
    """Interpret secret bytes as a JWK Set, a JWK, or a raw HMAC secret (in that order)."""
    try:
        document = json.loads(secret)
    except ValueError:
        document = None
    if isinstance(document, dict):
        try:
            if isinstance(document.get("keys"), list):
                return tuple(_jwk_key(jwk) for jwk in document["keys"])
            if "kty" in document:
                return (_jwk_key(document),)
        except (PyJWKError, InvalidKeyError, TypeError, ValueError):
            pass  # Not a usable JWK: upstream then takes the bytes as a raw secret.
    return (Key(secret, _FAMILY_ALGORITHMS["oct"]),)


def _compact_error(detail: str) -> AuthError:
    return AuthError(f"Error: JWSError (CompactDecodeError {detail})")


def _claims_error(detail: str) -> AuthError:
    return AuthError(f"Error: JWTClaimsSetDecodeError {json.dumps(detail)}")


def _signature_payload(token: str, keys: Sequence[Key]) -> bytes:
    parts = token.split(".")
    if len(parts) != 3:
        raise _compact_error(f"Invalid number of parts: Expected 3 parts; got {len(parts)}")
    jws = jwt.PyJWS(options={"verify_signature": True})
    try:
        header = jws.get_unverified_header(token)
    except DecodeError as exc:
        raise _compact_error(str(exc)) from None
    algorithm = header.get("alg")
    if algorithm not in ALLOWED_ALGORITHMS:
        raise AuthError(NO_SIGNATURES)
    for key in keys:
        if algorithm not in key.algorithms:
            continue
        if algorithm in _HMAC_MIN_BYTES and len(key.material) < _HMAC_MIN_BYTES[algorithm]:
            continue
        try:
            with warnings.catch_warnings():
                # Short RSA keys only warn in PyJWT; jose accepts them, and so do we.
                warnings.simplefilter("ignore")
                return jws.decode(token, key.material, algorithms=[algorithm])
        except DecodeError as exc:
            if "signature" not in str(exc).lower():
                raise _compact_error(str(exc)) from None
        except (PyJWTError, TypeError, ValueError):
            continue
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
        claims = json.loads(payload)
    except ValueError as exc:
        raise _claims_error(f"Error in $: {exc}") from None
    if not isinstance(claims, dict):
        raise _claims_error("Error in $: expected Object")
    check_claims(claims, now)
    return claims


def allowed_channels(claims: dict[str, Any], requested: str | None) -> list[str]:
    """Spec 3.3: the channels a connection gets, or ``AuthError("No allowed channels")``."""
    channel = claims.get("channel")
    channels = claims.get("channels")
    if not isinstance(channel, str):
        channel = None
    if not (isinstance(channels, list) and all(isinstance(item, str) for item in channels)):
        channels = None

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


def authorize(claims: dict[str, Any], requested: str | None) -> Grant:
    """Spec 3.2: ``mode`` must be a string; then the channel rules of :func:`allowed_channels`."""
    mode = claims.get("mode")
    if not isinstance(mode, str):
        raise AuthError(MISSING_MODE)
    return Grant(mode=mode, channels=tuple(allowed_channels(claims, requested)), claims=claims)


def check(token: str, requested: str | None, keys: Sequence[Key], now: float) -> Grant:
    """The whole check in upstream's order: signature and claims, then mode, then channels."""
    return authorize(verify(token, keys, now), requested)

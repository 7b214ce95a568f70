"""Minting tokens: the relay's secret + claims → a JWT the relay accepts (``pgws-relay token``).

Theory of operation
-------------------
:func:`claims` builds the claims a client needs (``mode``, ``channel`` or ``channels``,
``exp``, ``filters``); :func:`mint` signs them with the key the secret holds:

- A raw HMAC secret signs HS256, or HS384/HS512 on request, when it is at least as long as the
  hash (shorter, and the relay would refuse the token, as upstream does).
- A JWK, or the first key of a JWK Set that can sign (or the one ``kid`` names), signs with the
  JWK's ``alg`` when the relay verifies that algorithm with it, else with its family's usual
  one (HS256, RS256, the curve's ES algorithm, EdDSA); ``algorithm`` overrides both. A key can
  sign when it carries private material (an ``oct`` key always does) and is one the relay
  would keep: which secrets are JWKs, and which keys verify what, is asked of
  :func:`relay.auth.tokens.read_secret`, so a minted token is one the same secret verifies.

Rules this module keeps: pure (secret bytes and claims in, token text out; the caller passes
the time); no I/O, no logging; an error text names keys by index, ``kid`` and ``kty``, never
by key material, and never holds the secret.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm

from relay.auth import tokens
from relay.core import filters

#: The modes a client can be granted (upstream's); others open a connection that can do nothing.
MODES = ("r", "w", "rw")

#: The algorithm a key signs with when neither ``algorithm`` nor the JWK's ``alg`` says: the
#: first of these the key can verify (the families' most widely supported choices).
_PREFERRED_ALGORITHMS = ("HS256", "RS256", "ES256", "ES384", "ES512", "ES256K", "EdDSA")

#: PyJWT's loader for each key type; each gives the private key when the JWK has one.
_LOADERS: dict[str, Callable[[Any], Any]] = {
    "oct": HMACAlgorithm.from_jwk, "RSA": RSAAlgorithm.from_jwk, "EC": ECAlgorithm.from_jwk,
    "OKP": OKPAlgorithm.from_jwk,
}

#: Key types that can sign; a public key loads as something else.
_PRIVATE_KEY_TYPES = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey,
                      ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey, bytes)

#: Shown characters of a ``kid`` in an error (a kid is public, but may be long).
_SHOWN_CHARS = 40


class MintError(Exception):
    """No token can be minted as asked; ``str()`` is one line, with no key material."""


class _CannotSign(Exception):
    """Why one JWK cannot sign (a fixed text: no key material)."""


def claims(mode: str, channels: Sequence[str], expires_in: int | None, now: float,
           filter_texts: Sequence[str] = ()) -> dict[str, Any]:
    """The claims of a token for ``mode`` on ``channels`` (one: the ``channel`` claim, several:
    ``channels``), expiring ``expires_in`` seconds after ``now`` (None: never), narrowed by
    ``filter_texts`` (the ``filters`` claim, checked as the relay will read it)."""
    if mode not in MODES:
        raise MintError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not channels or not all(channels):
        raise MintError("a channel name must not be empty")
    result: dict[str, Any] = {"mode": mode}
    if len(channels) == 1:
        result["channel"] = channels[0]
    else:
        result["channels"] = list(channels)
    if expires_in is not None:
        result["exp"] = int(now) + expires_in
    if filter_texts:
        try:
            filters.parse_all(filter_texts, source=tokens.FILTERS_CLAIM)
        except filters.FilterError as exc:
            raise MintError(str(exc)) from None
        result["filters"] = list(filter_texts)
    return result


def _label(jwk: Mapping[str, Any], index: int | None) -> str:
    name = "the JWK" if index is None else f"key {index}"
    shown = [f"{field} {str(jwk[field])[:_SHOWN_CHARS]!r}" for field in ("kid", "kty")
             if isinstance(jwk.get(field), str)]
    return f"{name} ({', '.join(shown)})" if shown else name


def _hmac_length(secret: bytes, algorithm: str) -> None:
    need = tokens.HMAC_MIN_BYTES[algorithm]
    if len(secret) < need:
        raise _CannotSign(f"it is {len(secret)} bytes; {algorithm} needs at least {need}, so "
                          "the relay would refuse the token")


def _algorithm(verifies: frozenset[str], wanted: str | None, jwk_alg: object) -> str:
    if wanted is not None:
        if wanted not in verifies:
            raise _CannotSign(f"{wanted} is not one of its algorithms "
                              f"({', '.join(sorted(verifies))})")
        return wanted
    if isinstance(jwk_alg, str) and jwk_alg in verifies:
        return jwk_alg
    return next(name for name in _PREFERRED_ALGORITHMS if name in verifies)


def _jwk_signer(jwk: Mapping[str, Any], wanted: str | None) -> tuple[Any, str]:
    """The private key of ``jwk`` and the algorithm to sign with, or :class:`_CannotSign`."""
    try:
        # The relay's view: the algorithms it verifies with this key (none: it would skip it).
        (key,) = tokens.read_secret(json.dumps(jwk).encode()).keys
    except tokens.SecretError as exc:
        why = str(exc).rpartition("cannot verify signatures: ")[2]
        raise _CannotSign(f"the relay cannot verify with it ({why})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private = _LOADERS[str(jwk["kty"])](dict(jwk))
    except Exception as exc:
        # The relay loaded it, so this is rare; PyJWT's message may quote the key: type only.
        raise _CannotSign(f"PyJWT cannot load it ({type(exc).__name__})") from None
    if not isinstance(private, _PRIVATE_KEY_TYPES):
        raise _CannotSign("it has no private key (only the public half)")
    operations = jwk.get("key_ops")
    if isinstance(operations, list) and "sign" not in operations:
        raise _CannotSign('its "key_ops" does not allow "sign"')
    algorithm = _algorithm(key.algorithms, wanted, jwk.get("alg"))
    if isinstance(private, bytes):
        _hmac_length(private, algorithm)
    return private, algorithm


def _pick(document: Mapping[str, Any], wanted: str | None, kid: str | None
          ) -> tuple[Any, str, str | None]:
    """Key, algorithm and ``kid`` header from a JWK or JWK Set."""
    if "keys" in document:
        members = document["keys"]
        candidates = [(index, jwk) for index, jwk in enumerate(members)
                      if isinstance(jwk, dict) and (kid is None or jwk.get("kid") == kid)]
        if not candidates:
            raise MintError(f"no key of the JWK Set has kid {kid!r}" if kid is not None
                            else "no key of the JWK Set is a JSON object")
        reasons = []
        for index, jwk in candidates:
            try:
                key, algorithm = _jwk_signer(jwk, wanted)
            except _CannotSign as why:
                reasons.append(f"{_label(jwk, index)}: {why}")
                continue
            return key, algorithm, jwk.get("kid") if isinstance(jwk.get("kid"), str) else None
        raise MintError("no key of the JWK Set can sign: " + "; ".join(reasons))
    if kid is not None and document.get("kid") != kid:
        raise MintError(f"the JWK's kid is not {kid!r}")
    try:
        key, algorithm = _jwk_signer(document, wanted)
    except _CannotSign as why:
        raise MintError(f"{_label(document, None)} cannot sign: {why}") from None
    own_kid = document.get("kid")
    return key, algorithm, own_kid if isinstance(own_kid, str) else None


def mint(secret: bytes, token_claims: Mapping[str, Any], algorithm: str | None = None,
         kid: str | None = None) -> str:
    """``token_claims`` signed with the key of ``secret`` (see the module's docstring).

    ``algorithm``: sign with this one (it must be one the relay verifies with the key);
    ``kid``: the JWK Set key to use. :class:`MintError` when no token the relay accepts can be
    made; :class:`relay.auth.tokens.SecretError` when the secret has no usable key at all.
    """
    loaded = tokens.read_secret(secret)
    if loaded.raw_secret:
        if kid is not None:
            raise MintError("a kid picks a key of a JWK or JWK Set; the secret is an HMAC "
                            "secret")
        try:
            chosen = _algorithm(loaded.keys[0].algorithms, algorithm, None)
            _hmac_length(secret, chosen)
        except _CannotSign as why:
            raise MintError(f"the HMAC secret cannot sign: {why}") from None
        key: Any = secret
        headers = None
    else:
        key, chosen, key_id = _pick(json.loads(secret), algorithm, kid)
        headers = {"kid": key_id} if key_id is not None else None
    with warnings.catch_warnings():
        # PyJWT warns about short RSA keys; the relay accepts them (as jose does), so we sign.
        warnings.simplefilter("ignore")
        return jwt.encode(dict(token_claims), key, algorithm=chosen, headers=headers)

"""The keys that seal positions (:class:`relay.wire.positions.Sealer`), from the settings.

Theory of operation
-------------------
Every relay that serves one stream must seal a point to the same text and open every other
relay's texts, so they share a key: ``PGWS_POSITION_KEY`` (with ``PGWS_POSITION_KEY_PREVIOUS``
still opening positions during a rotation). Unset, a fleet already shares one secret, the
JWT secret: when it is an HMAC secret (raw, or a JWK Set with an ``oct`` key) the position key
is derived from it with keyed BLAKE2b under a label of its own, so the position key reveals
nothing of it. A public-key secret is no secret (anyone may hold the public key), so then each
relay process seals with a random key of its own, and positions resume on that process only:
one warning says so. A supervisor of several workers makes that random key once and hands it
to its workers, so they share it.

Pure: settings and secret in, keys and at most one warning out.
"""

from __future__ import annotations

import hashlib
import secrets

from relay.auth.tokens import LoadedKeys

#: The environment variable a supervisor sets for its workers when it made the key itself.
KEY_VARIABLE = "PGWS_POSITION_KEY"

_WARNING = ("PGWS_POSITION_KEY is unset and PGWS_JWT_SECRET holds no HMAC secret to derive one "
            "from: positions are sealed with a random key of this relay's own, so a client "
            "resumes only on this relay; set PGWS_POSITION_KEY, the same on every relay")


def is_hmac(loaded: LoadedKeys) -> bool:
    """Whether the JWT secret holds an HMAC key (a fleet shares it, and it is secret)."""
    return loaded.raw_secret or any(algorithm.startswith("HS") for key in loaded.keys
                                    for algorithm in key.algorithms)


def position_keys(key: bytes | None, previous: bytes | None, jwt_secret: bytes,
                  loaded: LoadedKeys) -> tuple[list[bytes], str | None]:
    """The keys to seal with (the first) and to open with (all), and a warning or None."""
    earlier = [previous] if previous is not None else []
    if key is not None:
        return [key, *earlier], None
    if is_hmac(loaded):
        derived = hashlib.blake2b(jwt_secret, digest_size=32, person=b"pgws-pos-of-jwt")
        return [derived.digest(), *earlier], None
    return [secrets.token_hex(32).encode(), *earlier], _WARNING

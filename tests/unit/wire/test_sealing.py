"""Sealed positions (relay/wire/positions.py's Sealer) and their keys (relay/auth/sealing.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.auth import sealing, tokens
from relay.wire import positions
from relay.wire.positions import Position, Sealer

KEY, OLD = b"k" * 32, b"o" * 32

_positions = st.builds(Position, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
                       st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))


@given(_positions)
def test_a_sealed_position_keeps_the_grammar_and_opens_to_itself(position: Position) -> None:
    text = Sealer([KEY]).seal(position)
    assert len(text) == positions.MAX_POSITION_LENGTH
    assert positions.parse_position(text) is not None  # What clients check: unchanged.
    assert Sealer([KEY]).open(text) == [position]


def test_one_point_seals_to_one_text_under_one_key_and_to_another_under_another() -> None:
    point = Position(1, 2, 3, 4)
    assert Sealer([KEY]).seal(point) == Sealer([KEY, OLD]).seal(point)
    assert Sealer([KEY]).seal(point) != Sealer([OLD]).seal(point)


def test_neighbouring_points_share_nothing_visible() -> None:
    """In the clear, seq counted the stream and digest was a hash of payloads; sealed, one
    step changes about half the bits of every part."""
    sealer = Sealer([KEY])
    a, b = (sealer.seal(Position(7, seq, 99, 1_700_000_000)).replace(".", "")
            for seq in (1000, 1001))
    differing = bin(int(a, 16) ^ int(b, 16)).count("1")
    assert 48 < differing < 144  # Of 192 bits.


def test_a_rotation_opens_positions_of_both_keys() -> None:
    point = Position(5, 6, 7, 8)
    old_text = Sealer([OLD]).seal(point)
    assert Sealer([KEY, OLD]).open(old_text)[1] == point
    assert Sealer([KEY, OLD]).open(old_text)[0] != point  # The current key reads noise.
    assert Sealer([KEY]).open("not a position") == []


def test_a_key_shorter_than_sixteen_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Sealer([b"x" * 15])
    with pytest.raises(ValueError):
        Sealer([])


def test_the_key_comes_from_the_setting_else_an_hmac_secret_else_a_random_one() -> None:
    hmac = tokens.read_secret(b"s" * 32)
    public = tokens.LoadedKeys(keys=())
    assert sealing.position_keys(KEY, OLD, b"s" * 32, hmac) == ([KEY, OLD], None)
    derived, warning = sealing.position_keys(None, None, b"s" * 32, hmac)
    assert warning is None and derived == sealing.position_keys(None, None, b"s" * 32, hmac)[0]
    assert derived[0] != b"s" * 32 and len(derived[0]) == 32  # Not the JWT secret itself.
    assert sealing.position_keys(None, None, b"t" * 32, hmac)[0] != derived
    one, warning = sealing.position_keys(None, None, b"{}", public)
    assert warning is not None and "PGWS_POSITION_KEY" in warning
    assert one != sealing.position_keys(None, None, b"{}", public)[0]  # Random each time.


def test_a_jwk_set_with_an_hmac_key_derives_the_position_key_too() -> None:
    secret = json.dumps({"keys": [{"kty": "oct", "k": "c3Nzc3Nzc3Nzc3Nzc3Nzc3Nzc3Nzc3Nzc3Nzc3Nz"}]})
    loaded = tokens.read_secret(secret.encode())
    assert not loaded.raw_secret and sealing.is_hmac(loaded)
    keys, warning = sealing.position_keys(None, OLD, secret.encode(), loaded)
    assert warning is None and keys[1:] == [OLD]
    assert keys == sealing.position_keys(None, OLD, secret.encode(), loaded)[0]


def test_without_a_previous_key_only_the_current_one_opens() -> None:
    hmac = tokens.read_secret(b"s" * 32)
    assert sealing.position_keys(KEY, None, b"s" * 32, hmac) == ([KEY], None)
    assert len(sealing.position_keys(None, None, b"s" * 32, hmac)[0]) == 1
    assert len(sealing.position_keys(None, None, b"{}", tokens.LoadedKeys(keys=()))[0]) == 1


def test_the_derived_key_is_pinned_so_relays_of_two_versions_open_each_others_positions() -> None:
    keys, _ = sealing.position_keys(None, None, b"s" * 32, tokens.read_secret(b"s" * 32))
    assert keys[0].hex() == "1d6429995b65aad6b2cb671349d4bb09b9f7317708b0e281290e2687a9ba9b2e"


def test_a_random_key_is_64_hex_characters_that_a_supervisor_can_pass_in_the_environment(
) -> None:
    (key,), _ = sealing.position_keys(None, None, b"{}", tokens.LoadedKeys(keys=()))
    assert len(key) == 64 and set(key.decode()) <= set("0123456789abcdef")


def test_the_sealed_text_of_a_point_is_pinned_so_relays_of_two_versions_agree() -> None:
    sealed = "71511741.ebf63d467663403f.da945529dcbcd3c6.6479c168"
    assert Sealer([KEY]).seal(Position(1, 2, 3, 4)) == sealed
    assert Sealer([KEY]).open(sealed) == [Position(1, 2, 3, 4)]


def test_a_key_of_exactly_sixteen_bytes_is_taken() -> None:
    point = Position(1, 2, 3, 4)
    assert Sealer([b"x" * 16]).open(Sealer([b"x" * 16]).seal(point)) == [point]


def test_a_short_seq_opens_as_its_zero_padded_sixteen_digits() -> None:
    """A text in the clear grammar may spell seq with 1 to 16 digits; both spellings are one
    text to open."""
    sealer = Sealer([KEY])
    digest, time = "0123456789abcdef", "6479c168"
    short = sealer.open(f"71511741.ebf.{digest}.{time}")
    assert short == sealer.open(f"71511741.0000000000000ebf.{digest}.{time}")
    assert short != sealer.open(f"71511741.ebf0000000000000.{digest}.{time}")

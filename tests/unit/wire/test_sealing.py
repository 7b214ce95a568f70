"""Sealed positions (relay/wire/positions.py's Sealer) and their keys (relay/auth/sealing.py)."""

from __future__ import annotations

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

"""The rate and address limits (relay/core/limits.py), without sockets or clocks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.limits import (
    AddressCount,
    InboundBudget,
    TokenBucket,
    WriteBucket,
    network_of,
    within_queue_bound,
)


def _takes(bucket: TokenBucket, now: float, amount: float = 1.0) -> int:
    """How many times ``amount`` can be taken at ``now`` (up to 10,000: a bucket that never
    runs dry fails the test instead of hanging it)."""
    count = 0
    while count < 10_000 and bucket.take(now, amount):
        count += 1
    return count


def test_a_bucket_starts_full_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10, burst=25, now=100.0)
    assert _takes(bucket, 100.0) == 25
    assert _takes(bucket, 100.5) == 5
    assert _takes(bucket, 200.0) == 25  # Never more than the burst, however long it rested.


def test_a_refused_take_spends_nothing() -> None:
    bucket = TokenBucket(rate=1, burst=10, now=0.0)
    assert not bucket.take(0.0, 11)
    assert bucket.take(0.0, 10)


def test_frame_budget_is_one_second_of_frames() -> None:
    budget = InboundBudget(frames_per_second=200, bytes_per_second=0, max_message_size=8000,
                           now=0.0)
    assert sum(budget.take_frame(0.0) for _ in range(300)) == 200
    assert sum(budget.take_frame(0.5) for _ in range(300)) == 100


def test_byte_budget_holds_at_least_two_of_the_largest_messages() -> None:
    small = InboundBudget(frames_per_second=0, bytes_per_second=1000, max_message_size=8000,
                          now=0.0)
    assert small.take_bytes(0.0, 16000)
    assert not small.take_bytes(0.0, 1)
    assert small.take_bytes(1.0, 1000)
    large = InboundBudget(frames_per_second=0, bytes_per_second=65536, max_message_size=8000,
                          now=0.0)
    assert large.take_bytes(0.0, 65536)
    assert not large.take_bytes(0.0, 1)


def test_zero_means_no_limit() -> None:
    budget = InboundBudget(frames_per_second=0, bytes_per_second=0, max_message_size=1, now=0.0)
    assert all(budget.take_frame(0.0) for _ in range(100_000))
    assert budget.take_bytes(0.0, 1 << 40)


@given(st.floats(0.5, 10_000), st.lists(st.tuples(st.floats(0, 2), st.floats(0.1, 100)),
                                         max_size=50))
def test_a_bucket_never_gives_more_than_its_burst_plus_its_rate(
        rate: float, steps: list[tuple[float, float]]) -> None:
    bucket = TokenBucket(rate, rate, 0.0)
    now, given_out = 0.0, 0.0
    for gap, amount in steps:
        now += gap
        if bucket.take(now, amount):
            given_out += amount
    assert given_out <= rate + rate * now + 1e-6


@pytest.mark.parametrize("host,network", [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("fe80::1%eth0", "fe80::/64"),
    ("unknown", "unknown"),
])
def test_addresses_count_per_ipv4_address_and_per_ipv6_64(host: str, network: str) -> None:
    assert network_of(host) == network


def test_an_address_gets_its_cap_and_its_places_back() -> None:
    counts = AddressCount(2)
    assert [counts.enter("a"), counts.enter("a"), counts.enter("a"), counts.enter("b")] == [
        True, True, False, True]
    counts.leave("a")
    assert counts.enter("a") and not counts.enter("a")


def test_a_cap_of_zero_is_no_cap() -> None:
    counts = AddressCount(0)
    assert all(counts.enter("a") for _ in range(1000))
    counts.leave("a")  # Nothing was counted: nothing to forget, and no error.


def test_a_write_bucket_holds_one_second_and_at_least_one_message() -> None:
    assert _takes(WriteBucket(5, 0.0), 0.0) == 5
    assert _takes(WriteBucket(0.5, 0.0), 0.0) == 1


@pytest.mark.parametrize("queued,adding,within", [
    (0, 65536, True), (0, 65537, False),  # exactly the bound is allowed, one byte more is not
    (65000, 536, True), (65000, 537, False),
    (65536, 0, True), (65537, 0, False),  # a half-written frame's rest alone
    (0, 0, True),
])
def test_the_queue_bound_is_inclusive_and_counts_what_is_queued_plus_the_frame(
        queued: int, adding: int, within: bool) -> None:
    assert within_queue_bound(queued, adding, 65536) is within
    assert within_queue_bound(queued, adding, 0) is (queued + adding == 0)

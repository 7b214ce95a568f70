"""The replication stream's bytes, as PostgreSQL's protocol documents them, without a server."""

from __future__ import annotations

import struct

import pytest

from relay.sources import replication
from relay.sources.replication import (
    PG_EPOCH_OFFSET_US,
    Committed,
    Keepalive,
    ProtocolError,
    Transactions,
    XLogData,
)


def _begin(final_lsn: int = 100, xid: int = 7) -> bytes:
    return struct.pack("!cQqI", b"B", final_lsn, 0, xid)


def _message(prefix: bytes, content: bytes, transactional: bool = True, lsn: int = 90) -> bytes:
    return struct.pack("!cBQ", b"M", 1 if transactional else 0, lsn) + prefix + b"\0" + \
        struct.pack("!I", len(content)) + content


def _commit(lsn: int, end: int, when_us: int = 5) -> bytes:
    return struct.pack("!cBQQq", b"C", 0, lsn, end, when_us)


def _feed(transactions: Transactions, *messages: bytes) -> list[Committed]:
    return [found for data in messages if (found := transactions.feed(data)) is not None]


def test_copy_data_is_xlogdata_or_a_keepalive_and_nothing_else() -> None:
    assert replication.read_copy_data(struct.pack("!cQQQ", b"w", 1, 2, 3) + b"pg") == \
        XLogData(1, 2, b"pg")
    assert replication.read_copy_data(struct.pack("!cQQB", b"k", 9, 3, 1)) == Keepalive(9, True)
    assert replication.read_copy_data(struct.pack("!cQQB", b"k", 9, 3, 0)) == Keepalive(9, False)
    for bad in (b"", b"x" + bytes(30), b"w" + bytes(10), b"k" + bytes(5)):
        with pytest.raises(ProtocolError):
            replication.read_copy_data(bad)


def test_a_status_update_confirms_one_position_with_postgresqls_clock() -> None:
    now_us = PG_EPOCH_OFFSET_US + 1234
    assert replication.standby_status(0x16B374D848, now_us, True) == struct.pack(
        "!cQQQQB", b"r", 0x16B374D848, 0x16B374D848, 0x16B374D848, 1234, 1)
    assert replication.standby_status(5, now_us)[-1] == 0


def test_lsns_read_and_write_as_postgresql_does() -> None:
    assert replication.format_lsn(0x16B374D848) == "16/B374D848"
    assert replication.parse_lsn("16/B374D848") == 0x16B374D848
    assert replication.parse_lsn("0/0") == 0
    for bad in ("16B374D848", "x/1", ""):
        with pytest.raises(ValueError):
            replication.parse_lsn(bad)


def test_a_committed_transaction_gives_its_messages_with_the_prefix_in_order() -> None:
    transactions = Transactions("chan", 1000)
    found = _feed(transactions, _begin(), _message(b"chan", b"one"),
                  _message(b"other", b"not ours"), _message(b"chan", b"late", False),
                  _message(b"chan", b"two"), b"R" + bytes(20), _commit(200, 210, 1_000_000))
    assert found == [Committed(200, 210, 1_000_000 + PG_EPOCH_OFFSET_US, (b"one", b"two"),
                               (0, 1))]
    assert not transactions.in_transaction


def test_a_message_over_the_bound_is_counted_and_the_rest_of_its_transaction_is_given() -> None:
    transactions = Transactions("p", 3)
    found = _feed(transactions, _begin(), _message(b"p", b"1234"), _message(b"p", b"123"),
                  _commit(50, 60))
    assert [c.messages for c in found] == [(b"123",)] and transactions.oversized == 1
    assert found[0].indices == (1,)  # Its place counts the one left out: alike on every reader.


def test_a_transaction_at_or_before_the_last_one_given_is_skipped() -> None:
    transactions = Transactions("p", 100)
    assert len(_feed(transactions, _begin(), _message(b"p", b"a"), _commit(50, 60))) == 1
    again = _feed(transactions, _begin(), _message(b"p", b"a"), _commit(50, 60),
                  _begin(), _message(b"p", b"older"), _commit(40, 45),
                  _begin(), _message(b"p", b"b"), _commit(70, 80))
    assert [c.messages for c in again] == [(b"b",)] and transactions.skipped == 2


def test_a_transaction_cut_by_a_lost_connection_is_forgotten_and_read_whole_again() -> None:
    transactions = Transactions("p", 100)
    assert _feed(transactions, _begin(), _message(b"p", b"half")) == []
    assert transactions.in_transaction
    transactions.reset()
    assert not transactions.in_transaction
    found = _feed(transactions, _begin(), _message(b"p", b"half"), _message(b"p", b"whole"),
                  _commit(9, 10))
    assert [c.messages for c in found] == [(b"half", b"whole")]


def test_a_message_outside_a_transaction_or_cut_short_is_refused() -> None:
    transactions = Transactions("p", 100)
    assert _feed(transactions, _message(b"p", b"stray"), _commit(1, 2)) == \
        [Committed(1, 2, PG_EPOCH_OFFSET_US + 5, (), ())]
    for bad in (_message(b"p", b"abc")[:-1], struct.pack("!cBQ", b"M", 1, 1) + b"noprefix",
                b"B" + bytes(3), b"C" + bytes(4)):
        transactions.feed(_begin())
        with pytest.raises(ProtocolError):
            transactions.feed(bad)

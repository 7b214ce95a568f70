"""The PROXY protocol v2 header (relay/wire/proxy.py), without sockets."""

from __future__ import annotations

import struct

import pytest

from relay.wire import proxy


def _split(header: bytes) -> tuple[bytes, bytes]:
    return header[:proxy.HEAD_LENGTH], header[proxy.HEAD_LENGTH:]


@pytest.mark.parametrize(("address", "port"), [("203.0.113.7", 51234), ("2001:db8::5", 443)])
def test_a_header_gives_back_the_client_it_names(address: str, port: int) -> None:
    head, rest = _split(proxy.header(address, port))
    carries, family, length = proxy.read_head(head)
    assert carries and length == len(rest)
    assert proxy.client(family, rest) == (address, port)


def test_tlvs_after_the_addresses_are_skipped() -> None:
    head, rest = _split(proxy.header("198.51.100.1", 80))
    tlv = b"\x05\x00\x04uniq"  # PP2_TYPE_UNIQUE_ID
    head = head[:14] + struct.pack("!H", len(rest) + len(tlv))
    _, family, length = proxy.read_head(head)
    assert proxy.client(family, (rest + tlv)[:length]) == ("198.51.100.1", 80)


def test_a_local_command_or_an_unspecified_family_carries_no_client() -> None:
    local = proxy.SIGNATURE + b"\x20\x00\x00\x00"
    assert proxy.read_head(local) == (False, 0, 0)
    unspec = proxy.SIGNATURE + b"\x21\x00\x00\x00"
    assert proxy.read_head(unspec)[0] is False


@pytest.mark.parametrize(("head", "why"), [
    (b"GET / HTTP/1.1\r\nHost", "no PROXY protocol v2 signature"),
    (b"PROXY TCP4 1.2.3.4 ", "no PROXY protocol v2 signature"),  # Version 1: not accepted.
    (proxy.SIGNATURE + b"\x11\x11\x00\x0c", "not version 2"),
    (proxy.SIGNATURE + b"\x22\x11\x00\x0c", "unknown command 2"),
    (proxy.SIGNATURE + b"\x21\x11" + struct.pack("!H", proxy.MAX_LENGTH + 1),
     f"a header of {proxy.MAX_LENGTH + 1} bytes"),
])
def test_anything_else_is_refused_with_its_reason(head: bytes, why: str) -> None:
    with pytest.raises(proxy.ProxyError, match=why):
        proxy.read_head(head[:16].ljust(16, b"\0"))


def test_the_longest_header_allowed_is_read() -> None:
    head = proxy.SIGNATURE + b"\x21\x11" + struct.pack("!H", proxy.MAX_LENGTH)
    assert proxy.read_head(head)[2] == proxy.MAX_LENGTH


@pytest.mark.parametrize(("family", "rest"), [(0x11, b"\0" * 11), (0x21, b"\0" * 35),
                                              (0x12, b"\0" * 12), (0x31, b"\0" * 216)])
def test_short_addresses_and_other_families_are_refused(family: int, rest: bytes) -> None:
    with pytest.raises(proxy.ProxyError):
        proxy.client(family, rest)


@pytest.mark.parametrize("length", [0x8000, 0xFFFF])
def test_a_length_over_32767_is_refused_not_read_as_negative(length: int) -> None:
    head = proxy.SIGNATURE + b"\x21\x11" + struct.pack("!H", length)
    with pytest.raises(proxy.ProxyError) as raised:
        proxy.read_head(head)
    assert str(raised.value) == f"a header of {length} bytes"


def test_each_refusal_is_logged_with_exactly_its_reason() -> None:
    for head, why in [(b"GET / HTTP/1.1\r\nHost", "no PROXY protocol v2 signature"),
                      (proxy.SIGNATURE + b"\x11\x11\x00\x0c", "not version 2")]:
        with pytest.raises(proxy.ProxyError) as raised:
            proxy.read_head(head)
        assert str(raised.value) == why
    with pytest.raises(proxy.ProxyError) as raised:
        proxy.client(0x21, b"\0" * 35)
    assert str(raised.value) == "address family 0x21 with 35 bytes"


@pytest.mark.parametrize(("address", "destination"), [("203.0.113.7", "2001:db8::1"),
                                                      ("2001:db8::5", "192.0.2.1")])
def test_a_header_with_a_destination_of_the_other_family_still_names_its_client(
        address: str, destination: str) -> None:
    head, rest = _split(proxy.header(address, 4711, destination, 443))
    _, family, length = proxy.read_head(head)
    assert length == len(rest) == (12 if "." in address else 36)
    assert proxy.client(family, rest) == (address, 4711)

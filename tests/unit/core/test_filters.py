"""Notification filters (relay/core/filters.py): the text grammar and its errors, every operator,
exactness beyond 64 bits, and the Index, against a reference evaluation written apart."""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core import filters as filters_module
from relay.core.filters import (
    NONE,
    NOT_JSON,
    Document,
    Filter,
    FilterError,
    Filters,
    Index,
    matches,
    parse,
    parse_all,
)

FILL = (
    '{"channel" : "fill_event", "payload" : {"txn_version":154106900,"event_idx":3,'
    '"emit_address":"0xaa","time":"2024-01-02T03:04:05.123456+00:00","maker_address":"0xaa",'
    '"maker_custodian_id":0,"maker_order_id":18446744073709551616000001,"maker_side":true,'
    '"market_id":7,"price":12345,"sequence_number_for_trade":1,"size":100,'
    '"taker_address":"0xbb","taker_custodian_id":1,"taker_order_id":99,'
    '"taker_quote_fees_paid":250}}'
)
U128_MAX = 2**128 - 1


def doc(payload: str | bytes) -> Document:
    """A Document as the hub makes one: orjson's parse, or NOT_JSON."""
    raw = payload.encode() if isinstance(payload, str) else payload
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = NOT_JSON
    return Document(raw, parsed)


def holds(text: str, payload: str | bytes) -> bool:
    return matches(frozenset({parse(text)}), doc(payload))


def refused(text: str, source: str = "filter") -> str:
    with pytest.raises(FilterError) as caught:
        parse(text, source=source)
    return str(caught.value)


# The grammar and its errors.


def test_a_filter_is_its_path_operator_and_value() -> None:
    one = parse("payload.market_id=eq.7")
    assert (one.path, one.op, one.value) == (("payload", "market_id"), "eq", "7")
    assert str(one) == "payload.market_id=eq.7"


def test_the_value_is_everything_after_the_operators_dot() -> None:
    one = parse("a=eq.x.y=z")
    assert (one.path, one.op, one.value) == (("a",), "eq", "x.y=z")
    assert holds("a=eq.x.y=z", '{"a": "x.y=z"}')


@pytest.mark.parametrize(("text", "reason"), [
    ("", "expected path=operator.value"),
    ("a", "expected path=operator.value"),
    ("a.b", "expected path=operator.value"),
    ("a=eq", "expected path=operator.value"),
    ("=eq.1", "empty path segment"),
    (".a=eq.1", "empty path segment"),
    ("a.=eq.1", "empty path segment"),
    ("a..b=eq.1", "empty path segment"),
    ("a=foo.7", 'unknown operator "foo" (known: eq, neq, gt, gte, lt, lte, in, is)'),
    ("a=not.eq.7", 'unknown operator "not" (known: eq, neq, gt, gte, lt, lte, in, is)'),
    ("a=like.x*", 'unknown operator "like" (known: eq, neq, gt, gte, lt, lte, in, is)'),
    ("a=EQ.7", 'unknown operator "EQ" (known: eq, neq, gt, gte, lt, lte, in, is)'),
    ("a=.7", 'unknown operator "" (known: eq, neq, gt, gte, lt, lte, in, is)'),
    ("a=is.x", 'bad is value "x" (allowed: null, true, false)'),
    ("a=is.NULL", 'bad is value "NULL" (allowed: null, true, false)'),
    ("a=is.", 'bad is value "" (allowed: null, true, false)'),
    ("a=in.1,2", "bad list: expected in.(item,...)"),
    ("a=in.(1,2", "bad list: expected in.(item,...)"),
    ("a=in.1,2)", "bad list: expected in.(item,...)"),
    ("a=in.(", "bad list: expected in.(item,...)"),
    ("a=in.)", "bad list: expected in.(item,...)"),
    ("a=in.", "bad list: expected in.(item,...)"),
    ('a=in.("a)', "bad list: unterminated quote"),
    ('a=in.(x,"a)', "bad list: unterminated quote"),
    ('a=in.("a\\")', "bad list: unterminated quote"),
    ('a=in.("a\\)', "bad list: unterminated quote"),
    ('a=in.(")', "bad list: unterminated quote"),
    ('a=in.("a"b)', "bad list: characters after a closing quote"),
    ('a=in.("a" ,b)', "bad list: characters after a closing quote"),
    ('a=in.("a""b")', "bad list: characters after a closing quote"),
])
def test_each_fault_is_named_with_the_text(text: str, reason: str) -> None:
    assert refused(text) == f"filter {json.dumps(text)}: {reason}"


@pytest.mark.parametrize("op", ["gt", "gte", "lt", "lte"])
@pytest.mark.parametrize("value", ["x", "", "+1", "01", "1.", ".5", " 1", "1 ", "0x10", "1e",
                                   "1e+", "--1", "NaN", "Infinity", "-Infinity", "true",
                                   "\u0661", "1_000"])
def test_an_ordering_needs_a_json_number(op: str, value: str) -> None:
    text = f"a={op}.{value}"
    assert refused(text) == \
        f"filter {json.dumps(text)}: bad number {json.dumps(value)} (expected a JSON number)"


@pytest.mark.parametrize("value", ["0", "-0", "7", "-7", "0.5", "-0.5", "1e2", "1E2", "1e+2",
                                   "1e-2", "1.5E-2", str(U128_MAX)])
def test_json_numbers_are_numbers(value: str) -> None:
    for op in ("gt", "gte", "lt", "lte"):
        assert parse(f"a={op}.{value}").value == value


def test_an_exponent_beyond_decimals_range_is_refused() -> None:
    text = "a=gt.1e1000000000000000000"
    assert refused(text) == \
        f'filter "{text}": bad number "1e1000000000000000000": exponent out of range'
    assert refused("a=eq.1e1000000000000000000").endswith("exponent out of range")


def test_huge_exponents_that_decimal_holds_compare_exactly() -> None:
    assert holds("a=lt.1e999999999999999999", '{"a": 5}')
    assert not holds("a=gt.1e999999999999999999", f'{{"a": {U128_MAX}}}')
    assert holds("a=gt.1e-999999999999999999", '{"a": 1}')
    assert not holds("a=gt.1e-999999999999999999", '{"a": 0}')
    assert not holds("a=eq.1e-999999999999999999", '{"a": 0}')


@pytest.mark.parametrize("text", ["a=eq.", "a=gt.", "a=in.(", "a=lte."])
def test_a_number_of_101_characters_is_refused(text: str) -> None:
    number = "1" * 101
    written = text + number + (")" if text.endswith("(") else "")
    assert refused(written).endswith(": bad number: longer than 100 characters")
    assert parse(written.replace(number, number[:100])).op == text[2:].split(".")[0]


def test_a_text_of_1024_characters_is_the_longest() -> None:
    text = "a=eq." + "x" * 1019
    assert len(text) == 1024
    assert parse(text).value == "x" * 1019
    longer = text + "x"
    assert refused(longer) == \
        f"filter {json.dumps(longer[:100])}...: longer than 1024 characters"


def test_a_message_repeats_at_most_100_characters_of_the_text() -> None:
    text = "a=foo." + "x" * 94
    assert refused(text) == f'filter "{text}": unknown operator "foo" ' \
        "(known: eq, neq, gt, gte, lt, lte, in, is)"
    assert refused(text + "y").startswith(f'filter "{text}"...: unknown operator')


def test_a_path_of_16_segments_is_the_longest() -> None:
    assert len(parse(".".join(["k"] * 16) + "=eq.1").path) == 16
    text = ".".join(["k"] * 17) + "=eq.1"
    assert refused(text) == f'filter "{text}": more than 16 path segments'


def test_a_list_of_256_items_is_the_longest() -> None:
    items = [str(i) for i in range(256)]
    assert len(parse(f"a=in.({','.join(items)})").operand.texts) == 256
    text = f"a=in.({','.join([*items, 'x'])})"
    assert refused(text).endswith(": bad list: more than 256 items")
    assert refused(f"a=in.({',' * 256})").endswith(": bad list: more than 256 items")


def test_a_set_of_32_filters_is_the_largest() -> None:
    texts = [f"a=neq.{i}" for i in range(32)]
    assert len(parse_all(texts)) == 32
    with pytest.raises(FilterError) as caught:
        parse_all([*texts, "b=eq.1"])
    assert str(caught.value) == "filter: too many filters (at most 32)"
    with pytest.raises(FilterError) as caught:
        parse_all([*texts, "b=eq.1"], source="filters claim")
    assert str(caught.value) == "filters claim: too many filters (at most 32)"


def test_the_source_word_begins_the_message() -> None:
    assert refused("a=foo.1", source="filters claim") == \
        'filters claim "a=foo.1": unknown operator "foo" (known: eq, neq, gt, gte, lt, lte, in, is)'
    with pytest.raises(FilterError) as caught:
        parse_all(["a=eq.1", "b=gt.x"], source="filters claim")
    assert str(caught.value) == \
        'filters claim "b=gt.x": bad number "x" (expected a JSON number)'
    with pytest.raises(FilterError) as caught:
        parse_all(["b=gt.x"])
    assert str(caught.value).startswith('filter "b=gt.x": ')


def test_a_filter_error_is_a_value_error_on_one_line() -> None:
    text = "a\nb\u2028=foo.\r1"
    message = refused(text)
    assert "\n" not in message and len(message.splitlines()) == 1
    assert message.startswith('filter "a\\nb\\u2028=foo.\\r1": unknown operator')
    assert issubclass(FilterError, ValueError)


def test_parse_all_gives_the_set() -> None:
    assert parse_all([]) == NONE == frozenset()
    assert parse_all(["a=eq.1", "b=eq.2", "a=eq.1"]) == {parse("a=eq.1"), parse("b=eq.2")}


# Canonical texts and equality.


@pytest.mark.parametrize(("text", "canonical"), [
    ("a=in.(b,a,b)", "a=in.(a,b)"),
    ('a=in.("x","y")', "a=in.(x,y)"),
    ('a=in.(c,"a,b")', 'a=in.("a,b",c)'),
    ('a=in.("\\"q",x\\y)', 'a=in.("\\"q",x\\y)'),
    ('a=in.("a,\\\\")', 'a=in.("a,\\\\")'),
    ('a=in.("\\x")', "a=in.(x)"),
    ('a=in.("")', 'a=in.("")'),
    ("a=in.(a,)", "a=in.(,a)"),
    ("a=in.(,)", 'a=in.("")'),
    ('a=in.(a"b)', 'a=in.(a"b)'),
    ("a=in.((x))", "a=in.((x))"),
    ("a=in.()", "a=in.()"),
    ("a=eq.7.0", "a=eq.7.0"),
    ("a.0.b=is.null", "a.0.b=is.null"),
])
def test_the_canonical_text_parses_back(text: str, canonical: str) -> None:
    assert str(parse(text)) == canonical
    assert parse(canonical) == parse(text)


def test_filters_that_mean_the_same_are_equal_and_hash_alike() -> None:
    one, other = parse("a=in.(b,a)"), parse('a=in.("a",b,b)')
    assert one == other and hash(one) == hash(other)
    assert len({one, other}) == 1
    assert parse("a=eq.7") != parse("a=eq.7.0")  # "7" and "7.0" are different strings.
    assert parse("a=eq.7") != parse("a=neq.7")
    assert parse("a=eq.7") != parse("b=eq.7")
    assert parse("a.b=eq.7") != parse("a=eq.b.7")
    assert isinstance(parse("a=eq.7"), Filter)


# Operators.


@pytest.mark.parametrize(("text", "payload", "expected"), [
    ("a=eq.7", '{"a": 7}', True),
    ("a=eq.7", '{"a": 7.0}', True),
    ("a=eq.7", '{"a": 70e-1}', True),
    ("a=eq.7", '{"a": "7"}', True),
    ("a=eq.7", '{"a": "7.0"}', False),
    ("a=eq.7", '{"a": 8}', False),
    ("a=eq.7", '{"a": 7.5}', False),
    ("a=eq.7.0", '{"a": 7}', True),
    ("a=eq.7.0", '{"a": "7"}', False),
    ("a=eq.1e2", '{"a": 100}', True),
    ("a=eq.-0", '{"a": 0}', True),
    ("a=eq.0", '{"a": -0.0}', True),
    ("a=eq.abc", '{"a": "abc"}', True),
    ("a=eq.abc", '{"a": "abd"}', False),
    ("a=eq.abc", '{"a": 7}', False),
    ("a=eq.", '{"a": ""}', True),
    ("a=eq.", '{"a": 0}', False),
    ("a=eq. 7", '{"a": 7}', False),
    ("a=eq. 7", '{"a": " 7"}', True),
    ("a=eq.true", '{"a": true}', True),
    ("a=eq.true", '{"a": false}', False),
    ("a=eq.true", '{"a": "true"}', True),
    ("a=eq.false", '{"a": false}', True),
    ("a=eq.false", '{"a": true}', False),
    ("a=eq.1", '{"a": true}', False),
    ("a=eq.0", '{"a": false}', False),
    ("a=eq.true", '{"a": 1}', False),
    ("a=eq.null", '{"a": null}', False),
    ("a=eq.{}", '{"a": {}}', False),
    ("a=eq.[]", '{"a": []}', False),
    ("a=eq.7", '{"a": [7]}', False),
    ("a=eq.7", '{"a": {"7": 7}}', False),
    ("a=eq.7", '{"b": 7}', False),
])
def test_eq(text: str, payload: str, expected: bool) -> None:
    assert holds(text, payload) is expected


@pytest.mark.parametrize(("text", "payload", "expected"), [
    ("a=neq.7", '{"a": 8}', True),
    ("a=neq.7", '{"a": 7}', False),
    ("a=neq.7", '{"a": 7.0}', False),
    ("a=neq.7", '{"a": 7.5}', True),
    ("a=neq.7", '{"a": "7"}', False),
    ("a=neq.7", '{"a": "8"}', True),
    ("a=neq.7", '{"b": 8}', False),
    ("a=neq.7", '{"a": null}', False),
    ("a=neq.7", '{"a": {}}', False),
    ("a=neq.7", '{"a": [8]}', False),
    ("a=neq.7", '{"a": true}', False),
    ("a=neq.abc", '{"a": 5}', False),
    ("a=neq.abc", '{"a": "abd"}', True),
    ("a=neq.abc", '{"a": "abc"}', False),
    ("a=neq.abc", '{"a": true}', False),
    ("a=neq.true", '{"a": false}', True),
    ("a=neq.true", '{"a": true}', False),
    ("a=neq.false", '{"a": true}', True),
    ("a=neq.false", '{"a": false}', False),
    ("a=neq.null", '{"a": null}', False),
    ("a=neq.1", '{"a": true}', False),
])
def test_neq(text: str, payload: str, expected: bool) -> None:
    assert holds(text, payload) is expected


@pytest.mark.parametrize(("op", "below", "equal", "above"), [
    ("gt", False, False, True),
    ("gte", False, True, True),
    ("lt", True, False, False),
    ("lte", True, True, False),
])
@pytest.mark.parametrize(("bound", "values"), [
    ("5", ("4", "5", "6")),
    ("5", ("4.999", "5.0", "5.001")),
    ("0.5", ("0.4", "0.5", "0.6")),
    ("-1e2", ("-101", "-100", "-99.5")),
    (str(U128_MAX - 1), (str(U128_MAX - 2), str(U128_MAX - 1), str(U128_MAX))),
    ("18446744073709551616000001", ("18446744073709551616000000", "18446744073709551616000001",
                                    "18446744073709551616000002")),
])
def test_orderings_at_below_and_above_their_bound(op: str, below: bool, equal: bool,
                                                   above: bool, bound: str,
                                                   values: tuple[str, str, str]) -> None:
    for value, expected in zip(values, (below, equal, above), strict=True):
        assert holds(f"a={op}.{bound}", f'{{"a": {value}}}') is expected, value


@pytest.mark.parametrize("op", ["gt", "gte", "lt", "lte"])
@pytest.mark.parametrize("value", ['"5"', '"9"', "true", "false", "null", "[5]", '{"a": 5}'])
def test_orderings_match_numbers_only(op: str, value: str) -> None:
    assert not holds(f"a={op}.5", f'{{"a": {value}}}')
    assert not holds(f"a={op}.0", f'{{"a": {value}}}')
    assert not holds(f"a={op}.1", f'{{"a": {value}}}')
    assert not holds(f"a={op}.5", '{"b": 5}')


@pytest.mark.parametrize(("text", "payload", "expected"), [
    ("a=in.(1,2,3)", '{"a": 2}', True),
    ("a=in.(1,2,3)", '{"a": 2.0}', True),
    ("a=in.(1,2,3)", '{"a": "2"}', True),
    ("a=in.(1,2,3)", '{"a": 4}', False),
    ("a=in.(1,2,3)", '{"a": "2.0"}', False),
    ("a=in.(1,2,3)", '{"a": [2]}', False),
    ("a=in.(1,2,3)", '{"b": 2}', False),
    ("a=in.(1.0)", '{"a": 1}', True),
    ('a=in.("a,b",c)', '{"a": "a,b"}', True),
    ('a=in.("a,b",c)', '{"a": "c"}', True),
    ('a=in.("a,b",c)', '{"a": "a"}', False),
    ('a=in.("a,b",c)', '{"a": "b"}', False),
    ('a=in.("say \\"hi\\"")', '{"a": "say \\"hi\\""}', True),
    ('a=in.("say \\"hi\\"")', '{"a": "say \\\\\\"hi\\\\\\""}', False),
    ('a=in.("x\\\\y")', '{"a": "x\\\\y"}', True),
    ('a=in.("\\x")', '{"a": "x"}', True),
    ('a=in.("\\x")', '{"a": "\\\\x"}', False),
    ("a=in.(x\\y)", '{"a": "x\\\\y"}', True),
    ('a=in.(a"b)', '{"a": "a\\"b"}', True),
    ("a=in.( a )", '{"a": " a "}', True),
    ("a=in.( a )", '{"a": "a"}', False),
    ("a=in.()", '{"a": ""}', False),
    ("a=in.()", '{"a": "()"}', False),
    ("a=in.(a,)", '{"a": ""}', True),
    ('a=in.("")', '{"a": ""}', True),
    ("a=in.((x))", '{"a": "(x)"}', True),
    ("a=in.(true)", '{"a": true}', True),
    ("a=in.(true)", '{"a": "true"}', True),
    ("a=in.(true)", '{"a": false}', False),
    ("a=in.(true)", '{"a": 1}', False),
    ("a=in.(false,0)", '{"a": false}', True),
    ("a=in.(1)", '{"a": true}', False),
    ("a=in.(0)", '{"a": false}', False),
    ("a=in.(null)", '{"a": null}', False),
    ("a=in.(null)", '{"b": 1}', False),
])
def test_in(text: str, payload: str, expected: bool) -> None:
    assert holds(text, payload) is expected


@pytest.mark.parametrize(("value", "null", "true", "false"), [
    ("null", True, False, False),
    ("true", False, True, False),
    ("false", False, False, True),
    ("0", False, False, False),
    ("1", False, False, False),
    ('""', False, False, False),
    ('"null"', False, False, False),
    ('"true"', False, False, False),
    ('"false"', False, False, False),
    ("{}", False, False, False),
    ("[]", False, False, False),
    ("1.5", False, False, False),
])
def test_is(value: str, null: bool, true: bool, false: bool) -> None:
    payload = f'{{"a": {value}}}'
    assert holds("a=is.null", payload) is null
    assert holds("a=is.true", payload) is true
    assert holds("a=is.false", payload) is false


def test_is_null_matches_a_missing_path_and_nothing_else_does() -> None:
    for payload in ('{"b": 1}', "{}", '{"a": 5}', "[]", '"text"', "5"):
        assert holds("a.x=is.null", payload)
        for text in ("a.x=is.true", "a.x=is.false", "a.x=eq.5", "a.x=neq.5", "a.x=gt.0",
                     "a.x=lt.9", "a.x=in.(5)"):
            assert not holds(text, payload), (text, payload)


# Paths.


@pytest.mark.parametrize(("text", "payload", "expected"), [
    ("a.0=eq.10", '{"a": [10, 20, 30]}', True),
    ("a.2=eq.30", '{"a": [10, 20, 30]}', True),
    ("a.1=eq.10", '{"a": [10, 20, 30]}', False),
    ("a.01=eq.20", '{"a": [10, 20, 30]}', True),
    ("a.3=eq.30", '{"a": [10, 20, 30]}', False),
    ("a.3=is.null", '{"a": [10, 20, 30]}', True),
    ("a.-1=eq.30", '{"a": [10, 20, 30]}', False),
    ("a.+1=eq.20", '{"a": [10, 20, 30]}', False),
    ("a.x=eq.10", '{"a": [10, 20, 30]}', False),
    ("a.\u0663=eq.40", '{"a": [10, 20, 30, 40]}', False),
    ("a.\u0663=eq.40", '{"a": {"\u0663": 40}}', True),
    ("a.0=eq.x", '{"a": {"0": "x"}}', True),
    ("a.0=eq.x", '{"a": {"00": "x"}}', False),
    ("a.0=eq.x", '{"a": "xyz"}', False),
    ("a.0.b=eq.1", '{"a": [{"b": 1}]}', True),
    ("1=eq.2", "[1, 2]", True),
    ("a=eq.5", "5", False),
    ("a.b=eq.5", '{"a": 5}', False),
    ("a.b=is.null", '{"a": 5}', True),
    ("a b=eq.1", '{"a b": 1}', True),
])
def test_paths(text: str, payload: str, expected: bool) -> None:
    assert holds(text, payload) is expected


def test_a_deep_path() -> None:
    path = ".".join(["k"] * 16)
    payload = '{"k": ' * 16 + "1" + "}" * 16
    assert holds(f"{path}=eq.1", payload)
    assert not holds(f"{path}=eq.2", payload)


# Documents: the fill event, exactness, payloads that are not JSON.


@pytest.mark.parametrize(("text", "expected"), [
    ("payload.market_id=eq.7", True),
    ("payload.market_id=eq.8", False),
    ("payload.maker_side=is.true", True),
    ("payload.maker_side=eq.true", True),
    ("payload.maker_side=is.false", False),
    ("payload.taker_address=eq.0xbb", True),
    ("payload.time=eq.2024-01-02T03:04:05.123456+00:00", True),
    ("payload.price=gte.12345", True),
    ("payload.price=gt.12345", False),
    ("channel=eq.fill_event", True),
    ("payload.maker_order_id=eq.18446744073709551616000001", True),
    ("payload.maker_order_id=eq.18446744073709551616000002", False),
    ("payload.maker_order_id=eq.18446744073709551616000000", False),
    ("payload.maker_order_id=neq.18446744073709551616000002", True),
    ("payload.maker_order_id=neq.18446744073709551616000001", False),
    ("payload.maker_order_id=in.(18446744073709551616000001)", True),
    ("payload.maker_order_id=in.(18446744073709551616000002,1)", False),
    ("payload.maker_order_id=gt.18446744073709551616000000", True),
    ("payload.maker_order_id=gt.18446744073709551616000001", False),
    ("payload.maker_order_id=gte.18446744073709551616000001", True),
    ("payload.maker_order_id=lt.18446744073709551616000002", True),
    ("payload.maker_order_id=lte.18446744073709551616000000", False),
    ("payload.maker_order_id=eq.1.8446744073709551616000001e25", True),
    ("payload.maker_order_id=eq.18446744073709551616000001.5", False),
])
def test_the_fill_event(text: str, expected: bool) -> None:
    assert holds(text, FILL) is expected


def test_orjson_cannot_tell_the_u128s_apart() -> None:
    # The premise of Document's exact parse: without it the tests above could not pass.
    one, other = b"18446744073709551616000001", b"18446744073709551616000002"
    assert orjson.loads(one) == orjson.loads(other)
    assert type(orjson.loads(str(U128_MAX).encode())) is float


def test_u128_boundaries() -> None:
    payload = f'{{"a": {U128_MAX}}}'
    assert holds(f"a=eq.{U128_MAX}", payload)
    assert not holds(f"a=eq.{U128_MAX + 1}", payload)
    assert not holds(f"a=eq.{U128_MAX - 1}", payload)
    assert holds(f"a=gt.{U128_MAX - 1}", payload)
    assert not holds(f"a=gt.{U128_MAX}", payload)
    assert holds(f"a=gte.{U128_MAX}", payload)
    assert holds(f"a=lt.{U128_MAX + 1}", payload)
    assert not holds(f"a=lt.{U128_MAX}", payload)
    assert holds(f"a=lte.{U128_MAX}", payload)
    assert holds(f"a=eq.{2**64}", f'{{"a": {2**64}}}')
    assert not holds(f"a=eq.{2**64}", f'{{"a": {2**64 + 1}}}')
    assert holds(f"a=eq.{-(2**63) - 1}", f'{{"a": {-(2**63) - 1}}}')
    assert not holds(f"a=eq.{-(2**63) - 2}", f'{{"a": {-(2**63) - 1}}}')


@pytest.mark.parametrize(("text", "expected"), [
    ("a=eq.0.1", True),
    ("a=eq.0.10", True),
    ("a=eq.1e-1", True),
    ("a=eq.0.1000000000000000055511151231257827", False),
    ("a=neq.0.1000000000000000055511151231257827", True),
    ("a=lt.0.1000000000000000055511151231257827", True),
    ("a=gt.0.1000000000000000055511151231257827", False),
    ("a=gt.0.09999999999999999999", True),
    ("a=in.(0.2,0.1)", True),
    ("a=eq.0.2", False),
])
def test_fractions_are_exact(text: str, expected: bool) -> None:
    assert holds(text, '{"a": 0.1}') is expected


def test_the_exact_parse_is_made_once_and_only_when_a_path_meets_a_float(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = json.loads

    def counting(payload: bytes, **options: Any) -> Any:
        calls.append(payload)
        return real(payload, **options)

    monkeypatch.setattr(filters_module.json, "loads", counting)
    document = doc('{"i": 1, "s": "x", "f": 1.5, "big": 18446744073709551616000001}')
    assert matches(parse_all(["i=eq.1", "s=eq.x", "i=gt.0", "missing=is.null"]), document)
    assert calls == []
    assert matches(parse_all(["f=eq.1.5"]), document)
    assert matches(parse_all(["big=gt.18446744073709551616000000", "f=lt.2"]), document)
    assert len(calls) == 1


def test_a_float_whose_exact_parse_fails_is_missing() -> None:
    # Values orjson read as ints need no exact parse; the float cannot be read exactly.
    document = Document(b"not what orjson read", {"a": 1, "b": 2.5})
    assert matches(parse_all(["a=eq.1"]), document)
    assert not matches(parse_all(["b=gt.2"]), document)
    assert not matches(parse_all(["b=neq.3"]), document)
    assert matches(parse_all(["b=is.null"]), document)
    # Decimal refuses an exponent that orjson rounds to 0.0.
    document = doc('{"a": 1e-99999999999999999999, "b": 1}')
    assert not holds("a=eq.0", '{"a": 1e-99999999999999999999}')
    assert matches(parse_all(["a=is.null", "b=eq.1"]), document)


@pytest.mark.parametrize("parsed", [NOT_JSON, None, 5, "text"])
def test_a_payload_that_is_not_json_matches_is_null_only(parsed: Any) -> None:
    document = Document(b"not json", parsed)
    assert matches(NONE, document)
    assert matches(parse_all(["a=is.null", "a.b.0=is.null"]), document)
    for text in ("a=eq.x", "a=neq.x", "a=gt.0", "a=lte.0", "a=in.(x)", "a=is.true",
                 "a=is.false"):
        assert not matches(parse_all([text]), document), text


def test_the_hub_sentinel_is_this_modules() -> None:
    from relay.core import envelope
    assert NOT_JSON is envelope.NOT_JSON


def test_a_set_matches_when_all_of_its_filters_do() -> None:
    document = doc(FILL)
    assert matches(NONE, document)
    assert matches(parse_all(["payload.market_id=eq.7", "payload.maker_side=is.true"]), document)
    assert not matches(parse_all(["payload.market_id=eq.7", "payload.maker_side=is.false"]),
                       document)
    assert not matches(parse_all(["payload.market_id=eq.8", "payload.maker_side=is.true"]),
                       document)


# A reference evaluation, written from the rules without the module's code: stdlib json with
# Fraction numbers, parsed again for every filter, and the filter taken from its parts, not its
# text.

_KEYS = ["a", "b", "0", "1"]
_SPECIAL_NUMBERS = ["7", "7.0", "70e-1", "0.1", "0.1000000000000000055511151231257827", "1e2",
                    "100", "-0", "-0.0", "1E-2", "0.01", "18446744073709551616000001",
                    "18446744073709551616000002", str(U128_MAX), str(2**64), str(-(2**63) - 1)]
_NUMBER_TEXTS = st.one_of(
    st.sampled_from(_SPECIAL_NUMBERS),
    st.integers(-(2**130), 2**130).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
_TEXTS = st.one_of(
    _NUMBER_TEXTS,
    st.sampled_from(["", "abc", "true", "false", "null", "a,b", '"q"', "x\\y", " 7", "a.b=c",
                     "(x)", ")"]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=4),
)
_MISSING = object()


class _Number:
    """A document number kept as its JSON text."""

    def __init__(self, text: str) -> None:
        self.text = text


def _to_json(value: Any) -> str:
    if isinstance(value, _Number):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(_to_json, value)) + "]"
    return json.dumps(value)


_LEAVES = st.one_of(st.none(), st.booleans(), _NUMBER_TEXTS.map(_Number), _TEXTS)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=3),
    max_leaves=12,
)
_DOCUMENTS = _VALUES.map(_to_json)


@st.composite
def _list_text(draw: st.DrawFn, items: list[str]) -> str:
    """An in-list holding ``items``, each quoted or not, where either is possible."""
    written = []
    for item in items:
        must = "," in item or item.startswith('"') or items == [""]
        if must or draw(st.booleans()):
            if draw(st.booleans()):  # A backslash before every character keeps each.
                body = "".join("\\" + char for char in item)
            else:
                body = item.replace("\\", "\\\\").replace('"', '\\"')
            written.append(f'"{body}"')
        else:
            written.append(item)
    return f"({','.join(written)})"


@st.composite
def _filters(draw: st.DrawFn) -> tuple[str, list[str], str, Any]:
    """A valid filter text, with the parts it was made of: path, operator and operand (the
    value text; for ``in``, the list of items)."""
    path = draw(st.lists(st.sampled_from(_KEYS), min_size=1, max_size=3))
    op = draw(st.sampled_from(["eq", "neq", "gt", "gte", "lt", "lte", "in", "is"]))
    if op in ("eq", "neq"):
        operand = value = draw(_TEXTS)
    elif op == "is":
        operand = value = draw(st.sampled_from(["null", "true", "false"]))
    elif op == "in":
        operand = draw(st.lists(_TEXTS, max_size=4))
        value = draw(_list_text(operand))
    else:
        operand = value = draw(_NUMBER_TEXTS)
    return f"{'.'.join(path)}={op}.{value}", path, op, operand


def _reference_number(text: str) -> int | Fraction | None:
    if not text.isascii() or text != text.strip():
        return None
    try:
        value = json.loads(text, parse_float=Fraction, parse_constant=lambda name: None)
    except ValueError:
        return None
    return value if type(value) in (int, Fraction) else None


def _reference_equal(value: Any, text: str) -> bool | None:
    """Whether a document value equals a filter text; None: not comparable."""
    if value is True or value is False:
        return value == (text == "true") if text in ("true", "false") else None
    if type(value) in (int, Fraction):
        number = _reference_number(text)
        return None if number is None else value == number
    if type(value) is str:
        return value == text
    return None


def _reference(path: list[str], op: str, operand: Any, payload: str) -> bool:
    value: Any = json.loads(payload, parse_float=Fraction)
    for segment in path:
        if isinstance(value, dict) and segment in value:
            value = value[segment]
        elif isinstance(value, list) and segment.isdecimal() and segment.isascii() \
                and int(segment) < len(value):
            value = value[int(segment)]
        else:
            value = _MISSING
            break
    if op == "is":
        return {"null": value is _MISSING or value is None, "true": value is True,
                "false": value is False}[operand]
    if op == "eq":
        return _reference_equal(value, operand) is True
    if op == "neq":
        return _reference_equal(value, operand) is False
    if op == "in":
        return any(_reference_equal(value, item) is True for item in operand)
    if type(value) not in (int, Fraction):
        return False
    bound = _reference_number(operand)
    assert bound is not None
    return {"gt": value > bound, "gte": value >= bound, "lt": value < bound,
            "lte": value <= bound}[op]


def _plant(node: Any, path: list[str], leaf: Any, in_array: bool) -> Any:
    """``node`` with ``leaf`` at ``path`` (digit segments make arrays when ``in_array``)."""
    if not path:
        return leaf
    segment, rest = path[0], path[1:]
    if in_array and segment.isdigit():
        array = list(node) if isinstance(node, list) else []
        array.extend([None] * (int(segment) + 1 - len(array)))
        array[int(segment)] = _plant(array[int(segment)], rest, leaf, in_array)
        return array
    members = dict(node) if isinstance(node, dict) else {}
    members[segment] = _plant(members.get(segment), rest, leaf, in_array)
    return members


def _leaves_like(text: str) -> list[Any]:
    """Document values that a filter value ``text`` may well meet."""
    like = [text, {"null": None, "true": True, "false": False}.get(text, text)]
    if _reference_number(text) is not None:
        like.append(_Number(text))
    return like


@st.composite
def _cases(draw: st.DrawFn) -> tuple[list[tuple[str, list[str], str, Any]], str]:
    """Filters, and a document that most of their paths lead into, often to their values."""
    chosen = draw(st.lists(_filters(), min_size=1, max_size=3))
    root = draw(_VALUES)
    for _, path, op, operand in chosen:
        if draw(st.integers(0, 3)):
            texts = operand if op == "in" else [operand]
            leaf = draw(st.sampled_from(texts).flatmap(lambda text: st.sampled_from(
                _leaves_like(text))) | _LEAVES if texts else _LEAVES)
            root = _plant(root, path, leaf, draw(st.booleans()))
    return chosen, _to_json(root)


@settings(max_examples=400)
@given(_cases())
def test_matches_agrees_with_the_reference(
        case: tuple[list[tuple[str, list[str], str, Any]], str]) -> None:
    chosen, payload = case
    document = doc(payload)
    expected = [_reference(path, op, operand, payload) for _, path, op, operand in chosen]
    for (text, *_), one in zip(chosen, expected, strict=True):
        assert matches(frozenset({parse(text)}), document) is one, text
    assert matches(parse_all(text for text, *_ in chosen), document) is all(expected)


@given(_filters())
def test_the_canonical_text_round_trips(chosen: tuple[str, list[str], str, Any]) -> None:
    one = parse(chosen[0])
    again = parse(str(one))
    assert again == one and str(again) == str(one)
    assert one.path == tuple(chosen[1]) and one.op == chosen[2]


@given(st.text(max_size=40) | st.text("a.=()\",\\eqintrulsg0179", max_size=40))
def test_any_text_parses_or_is_refused_on_one_line(text: str) -> None:
    try:
        one = parse(text)
    except FilterError as bad:
        message = str(bad)
        assert message.startswith(f"filter {json.dumps(text[:100])}")
        assert len(message.splitlines()) == 1
    else:
        assert parse(str(one)) == one


# The Index.


class _CountingDocument(Document):
    """A Document that counts the path lookups made of it."""

    __slots__ = ("reads",)

    def __init__(self, payload: str) -> None:
        super().__init__(payload.encode(), orjson.loads(payload))
        self.reads: Counter[Any] = Counter()

    def value_at(self, steps: Any) -> Any:
        self.reads[steps] += 1
        return super().value_at(steps)


def _steps(path: str) -> Any:
    return parse(f"{path}=is.null").steps


def test_an_eq_indexed_set_is_evaluated_only_when_its_value_is_found() -> None:
    index = Index()
    for i in range(50):
        index.add(parse_all([f"x=eq.{i}", "y=gt.0"]))
    document = _CountingDocument('{"x": 3, "y": 1}')
    assert index.matching(document) == [parse_all(["x=eq.3", "y=gt.0"])]
    assert document.reads == {_steps("x"): 1, _steps("y"): 1}
    document = _CountingDocument('{"x": 50, "y": 1}')
    assert index.matching(document) == []
    assert document.reads == {_steps("x"): 1}
    document = _CountingDocument('{"x": 3, "y": 0}')
    assert index.matching(document) == []


def test_a_set_is_indexed_by_a_path_already_indexed() -> None:
    index = Index()
    index.add(parse_all(["x=eq.1"]))
    index.add(parse_all(["x=eq.2", "a=eq.3"]))  # "a=eq.3" sorts first, but x costs nothing.
    document = _CountingDocument('{"x": 5, "a": 3}')
    assert index.matching(document) == []
    assert document.reads == {_steps("x"): 1}


def test_the_indexing_eq_filter_is_chosen_by_its_text_among_new_paths() -> None:
    index = Index()
    # Indexed by "k00=eq.1", the first text, whatever the order the set iterates in.
    index.add(frozenset(parse(f"k{i:02}=eq.1") for i in range(30)))
    payload = {f"k{i:02}": 1 for i in range(30)} | {"k00": 2}
    document = _CountingDocument(json.dumps(payload))
    assert index.matching(document) == []
    assert document.reads == {_steps("k00"): 1}


def test_unindexed_sets_are_evaluated_every_time() -> None:
    index = Index()
    index.add(NONE)
    index.add(parse_all(["y=gt.0"]))
    index.add(parse_all(["y=neq.1", "x=in.(1,2)"]))
    document = _CountingDocument('{"x": 2, "y": 2}')
    assert set(index.matching(document)) == {
        NONE, parse_all(["y=gt.0"]), parse_all(["y=neq.1", "x=in.(1,2)"])}
    assert document.reads[_steps("y")] == 2


def test_removed_sets_cost_nothing() -> None:
    index = Index()
    sets = [parse_all(["x=eq.1"]), parse_all(["x=eq.1.0", "z=eq.1"]), parse_all(["y=eq.true"]),
            parse_all(["z=gt.1"])]
    for one in sets:
        index.add(one)
    for one in sets:
        index.remove(one)
    document = _CountingDocument('{"x": 1, "y": true, "z": 2}')
    assert len(index) == 0
    assert index.matching(document) == []
    assert document.reads == {}


@pytest.mark.parametrize(("held", "payload", "expected"), [
    ("x=eq.1", '{"x": true}', False),
    ("x=eq.true", '{"x": 1}', False),
    ("x=eq.0", '{"x": false}', False),
    ("x=eq.false", '{"x": 0}', False),
    ("x=eq.true", '{"x": true}', True),
    ("x=eq.true", '{"x": "true"}', True),
    ("x=eq.false", '{"x": false}', True),
    ("x=eq.7", '{"x": 7.0}', True),
    ("x=eq.7", '{"x": "7"}', True),
    ("x=eq.7.0", '{"x": 7}', True),
    ("x=eq.7.0", '{"x": "7"}', False),
    ("x=eq.null", '{"x": null}', False),
    ("x=eq.7", '{"x": [7]}', False),
    ("x=eq.7", '{"x": {"7": 7}}', False),
    ("x=eq.18446744073709551616000001", '{"x": 18446744073709551616000002}', False),
    ("x=eq.18446744073709551616000001", '{"x": 18446744073709551616000001}', True),
])
def test_the_index_finds_what_eq_matches(held: str, payload: str, expected: bool) -> None:
    index = Index()
    index.add(parse_all([held]))
    assert (index.matching(doc(payload)) == [parse_all([held])]) is expected
    assert holds(held, payload) is expected


def test_sets_are_reference_counted() -> None:
    index = Index()
    one, other = parse_all(["x=eq.1"]), parse_all(["x=gt.0"])
    index.add(one)
    index.add(one)
    index.add(other)
    assert len(index) == 2
    index.remove(one)
    assert len(index) == 2
    assert set(index.matching(doc('{"x": 1}'))) == {one, other}
    index.remove(one)
    assert len(index) == 1
    assert index.matching(doc('{"x": 1}')) == [other]
    index.remove(other)
    assert len(index) == 0
    with pytest.raises(KeyError):
        index.remove(other)


def test_none_always_matches_when_held() -> None:
    index = Index()
    index.add(NONE)
    for payload in (b"{}", b"not json", FILL.encode(), b"null"):
        assert index.matching(doc(payload)) == [NONE]
    index.remove(NONE)
    assert index.matching(doc(b"{}")) == []


_INDEX_TEXTS = st.one_of(
    _filters().map(lambda chosen: chosen[0]),
    st.builds("{}=eq.{}".format, st.sampled_from(["a", "b", "a.0"]),
              st.sampled_from(["1", "1.0", "true", "false", "x", "7",
                               "18446744073709551616000001"])),
)
_INDEX_DOCUMENTS = _DOCUMENTS | st.fixed_dictionaries({
    "a": st.sampled_from(["1", "1.0", "true", "false", '"x"', '"1"', "7", "[1]",
                          "18446744073709551616000001"]),
    "b": st.sampled_from(["1", "true", '"x"', "null", "7"]),
}).map(lambda members: "{" + ",".join(f'"{k}":{v}' for k, v in members.items()) + "}")


@settings(max_examples=200)
@given(st.lists(st.lists(_INDEX_TEXTS, max_size=3).map(parse_all), min_size=1, max_size=6),
       st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=30),
       st.lists(_INDEX_DOCUMENTS, min_size=1, max_size=3))
def test_the_index_agrees_with_matches(pool: list[Filters], operations: list[tuple[bool, int]],
                                       payloads: list[str]) -> None:
    index = Index()
    held: Counter[Filters] = Counter()
    documents = [doc(payload) for payload in payloads]
    for adding, at in operations:
        chosen = pool[at % len(pool)]
        if adding:
            index.add(chosen)
            held[chosen] += 1
        elif held[chosen]:
            index.remove(chosen)
            held[chosen] -= 1
        else:
            with pytest.raises(KeyError):
                index.remove(chosen)
        assert len(index) == len(+held)
        for document in documents:
            found = index.matching(document)
            assert len(found) == len(set(found))
            assert set(found) == {one for one in +held if matches(one, document)}

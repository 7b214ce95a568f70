"""Filters: which of a channel's notifications a subscriber receives.

Theory of operation
-------------------
A client narrows a channel with ``filter`` query parameters, and a token may narrow it further
with a ``filters`` claim (a list of the same texts, applied on top of the URL's, so a client
cannot widen it). Each text is PostgREST's operator syntax over a dotted path into the
notification's JSON document: ``payload.market_id=eq.7``. :func:`parse` reads one text into a
:class:`Filter`, :func:`parse_all` a list into a set (:data:`Filters`) of which all must hold.

The hub parses each notification once (orjson, which it needs to route the payload anyway),
wraps it in a :class:`Document`, and asks the :class:`Index` of a channel's distinct filter
sets which of them match. Everything an evaluation needs is worked out at parse time (the path
as keys and indices, the operand as a number, a set of texts for ``in``), and the operators are
a table (:data:`_OPERATORS`: name to operand reader and test), so evaluating is a walk of
plain dict and list lookups and one comparison.

Rules this module keeps:

- Text: ``path=operator.value``, split at the first ``=``; the operator runs to the first
  ``.`` after it and the value is the rest (dots and ``=`` included). Values arrive
  percent-decoded; nothing is trimmed.
- Path: dot-separated, non-empty segments. In an object a segment is a key (also when it is
  all digits); in an array, ASCII digits are an index from 0 (leading zeros allowed, no sign,
  so no counting from the end). A missing key, an index past the end, a step into a scalar
  and a payload that is not JSON all leave the value *missing*, which every operator treats
  as null, so it is null.
- ``eq``/``neq`` compare by the document value's JSON type: a number numerically with a filter
  value that is a JSON number (``eq.7`` matches ``7`` and ``7.0``); a string as text (``eq.7``
  matches ``"7"``); a boolean with the texts ``true``/``false``. Anything else is not
  comparable, and neither operator matches it (SQL's NULL, neither equal nor unequal): null,
  objects, arrays, a missing value, a number against a value that is not a number
  (``neq.abc`` does not match 5), a boolean against a text other than ``true``/``false``.
- ``gt``/``gte``/``lt``/``lte``: the value must be a JSON number; they match numbers only.
- ``in.(a,b)``: each item as ``eq``; ``in.()`` matches nothing. The list is everything
  between the value's opening ``(`` and its closing ``)``. An item is either double-quoted,
  where a backslash keeps the next character whatever it is (``\\"`` a quote, ``\\\\`` a
  backslash, ``\\x`` an ``x``), as in PostgREST, or unquoted and taken as is up to the next
  comma, backslashes and quotes included; so ``(a,)`` holds ``a`` and the empty text.
- ``is.null`` (missing or null), ``is.true`` and ``is.false`` (the JSON booleans only).
- Numbers are exact: filter numbers are ``int`` or ``Decimal``, and a document value that
  orjson made a float (an integer beyond 64 bits, a fraction) is read again from an exact
  parse of the payload (stdlib json, ``Decimal`` fractions), made once per document and only
  when a filter's path meets a float. Should that parse fail where orjson did not, the value is
  missing. A filter number (in ``eq`` and ``in`` too) that is longer than
  ``_MAX_NUMBER_CHARS`` is refused rather than compared as text alone.
- Equal filters are equal objects with one canonical text, ``str(filter)``, that parses back
  to it: the value as written, except an ``in`` list, whose items are sorted, deduplicated and
  quoted only where needed.

It never raises while evaluating (any JSON shape, any payload), never uses a regular
expression while evaluating, and does no I/O. Errors are :class:`FilterError`: one line,
naming the filter text.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Any, Final, NamedTuple

from relay.core import envelope

#: One filter's text, in characters: a URL parameter or claim item longer than this is a
#: mistake or an attack, and it bounds the parse work and the size of the keys the hub holds.
_MAX_TEXT = 1024
#: Segments of one path: notification payloads are shallow, and every evaluation walks them.
_MAX_SEGMENTS = 16
#: Items of one ``in`` list: bounds the sets built at parse time.
_MAX_ITEMS = 256
#: Filters in one set (from the URL, or from the claim): each is evaluated per notification.
_MAX_FILTERS = 32
#: Characters of one filter number: a u128 takes 39 digits, so this is room enough, and it
#: keeps ``int()`` and comparisons with document numbers cheap.
_MAX_NUMBER_CHARS = 100
#: Characters of a refused text that its error repeats: messages stay short enough to log.
_MAX_SHOWN = 100

#: JSON's number grammar (RFC 8259), ASCII digits only; groups: fraction, exponent.
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
#: The exact types of document and filter numbers (``bool`` is an ``int`` but no number here).
_NUMBER_TYPES: Final = frozenset({int, Decimal})
_BOOLEANS: Final = {"true": True, "false": False}
_IS_VALUES: Final = {"null": None, "true": True, "false": False}

#: What a :class:`Document` is given as ``parsed`` for a payload that is not JSON: the marker
#: :func:`relay.core.envelope.parse` gives (``None`` is JSON's null), so the hub's parse passes as
#: is.
NOT_JSON: Final[Any] = envelope.NOT_JSON
#: A :class:`Document`'s exact parse, before it is needed.
_UNREAD: Final[Any] = object()

#: A path as walked: each segment with its array index (None: not digits, so no index).
Steps = tuple[tuple[str, int | None], ...]


class FilterError(ValueError):
    """A filter text that cannot be used; ``str()`` is one line naming the text and the fault."""


class _Bad(Exception):
    """A fault in a filter text, before :func:`parse` names the text."""


def _shown(text: str) -> str:
    """``text`` quoted for a one-line message: JSON-escaped, long texts cut short."""
    return json.dumps(text[:_MAX_SHOWN]) + ("..." if len(text) > _MAX_SHOWN else "")


def _number(text: str) -> int | Decimal | None:
    """The JSON number ``text`` is, exactly (``int`` for integers), or None if it is none."""
    match = _NUMBER.fullmatch(text)
    if match is None:
        return None
    if len(text) > _MAX_NUMBER_CHARS:
        raise _Bad(f"bad number: longer than {_MAX_NUMBER_CHARS} characters")
    if match.group(1) is None and match.group(2) is None:
        return int(text)
    try:
        return Decimal(text)
    except ArithmeticError:  # An exponent beyond Decimal's (10**18), which it refuses to hold.
        raise _Bad(f"bad number {_shown(text)}: exponent out of range") from None


class _Scalar(NamedTuple):
    """An ``eq``/``neq`` operand in each form a document value may be compared with."""

    text: str
    number: int | Decimal | None
    boolean: bool | None


class _Items(NamedTuple):
    """An ``in`` operand: its items as texts, as numbers and as booleans."""

    texts: frozenset[str]
    numbers: frozenset[int | Decimal]
    booleans: frozenset[bool]


def _read_scalar(text: str) -> tuple[str, _Scalar]:
    return text, _Scalar(text, _number(text), _BOOLEANS.get(text))


def _read_number(text: str) -> tuple[str, int | Decimal]:
    number = _number(text)
    if number is None:
        raise _Bad(f"bad number {_shown(text)} (expected a JSON number)")
    return text, number


def _read_is(text: str) -> tuple[str, bool | None]:
    if text not in _IS_VALUES:
        raise _Bad(f"bad is value {_shown(text)} (allowed: {', '.join(_IS_VALUES)})")
    return text, _IS_VALUES[text]


def _unquote(body: str, at: int) -> tuple[str, int]:
    """The quoted item opening just before ``body[at]``, and where its closing quote ends."""
    chars = []
    while at < len(body):
        char = body[at]
        if char == '"':
            return "".join(chars), at + 1
        if char == "\\":
            at += 1
            if at == len(body):
                break
            char = body[at]
        chars.append(char)
        at += 1
    raise _Bad("bad list: unterminated quote")


def _split_list(text: str) -> list[str]:
    """The items of an ``in`` value, ``(a,"b,c")``."""
    if len(text) < 2 or text[0] != "(" or text[-1] != ")":
        raise _Bad("bad list: expected in.(item,...)")
    body, items, at = text[1:-1], [], 0
    while body:  # `()` is the empty list; otherwise each comma is followed by an item.
        if len(items) == _MAX_ITEMS:
            raise _Bad(f"bad list: more than {_MAX_ITEMS} items")
        if body[at:at + 1] == '"':
            item, at = _unquote(body, at + 1)
            if at < len(body) and body[at] != ",":
                raise _Bad("bad list: characters after a closing quote")
        else:
            end = body.find(",", at)
            item, at = (body[at:], len(body)) if end < 0 else (body[at:end], end)
        items.append(item)
        if at == len(body):
            break
        at += 1  # The comma.
    return items


def _write_item(item: str) -> str:
    """``item`` as :func:`_split_list` reads it back: quoted only when it must be."""
    if "," in item or item.startswith('"'):
        return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return item


def _read_list(text: str) -> tuple[str, _Items]:
    items = _split_list(text)
    unique = sorted(set(items))
    # An empty item needs quotes only alone: `()` is the empty list, `(,a)` holds "" and a.
    canonical = '("")' if unique == [""] else f"({','.join(map(_write_item, unique))})"
    numbers = frozenset(number for number in map(_number, unique) if number is not None)
    booleans = frozenset(_BOOLEANS[item] for item in unique if item in _BOOLEANS)
    return canonical, _Items(frozenset(unique), numbers, booleans)


def _compare(operand: _Scalar, value: Any) -> bool | None:
    """Whether ``value`` equals the operand; None when the two are not comparable."""
    kind = type(value)
    if kind is str:
        return value == operand.text
    if kind is bool:
        return None if operand.boolean is None else value is operand.boolean
    if kind in _NUMBER_TYPES:
        return None if operand.number is None else value == operand.number
    return None


def _eq(operand: _Scalar, value: Any) -> bool:
    return _compare(operand, value) is True


def _neq(operand: _Scalar, value: Any) -> bool:
    return _compare(operand, value) is False


def _ordered(compare: Callable[[Any, Any], bool], bound: int | Decimal, value: Any) -> bool:
    """A numeric test: ``compare(value, bound)`` for document numbers, False for the rest."""
    return type(value) in _NUMBER_TYPES and compare(value, bound)


def _in(items: _Items, value: Any) -> bool:
    kind = type(value)
    if kind is str:
        return value in items.texts
    if kind is bool:
        return value in items.booleans
    # Equal ints and Decimals hash alike, so set membership is numeric equality, exactly.
    return kind in _NUMBER_TYPES and value in items.numbers


#: Each operator: how its value is read (to the canonical text and the operand) and how the
#: operand is tested against a document value. Order is the order errors list them in.
_OPERATORS: Final[dict[str, tuple[Callable[[str], tuple[str, Any]],
                                  Callable[[Any, Any], bool]]]] = {
    "eq": (_read_scalar, _eq),
    "neq": (_read_scalar, _neq),
    "gt": (_read_number, partial(_ordered, operator.gt)),
    "gte": (_read_number, partial(_ordered, operator.ge)),
    "lt": (_read_number, partial(_ordered, operator.lt)),
    "lte": (_read_number, partial(_ordered, operator.le)),
    "in": (_read_list, _in),
    "is": (_read_is, operator.is_),  # None, True, False: singletons. None is missing too.
}


@dataclass(frozen=True, slots=True)
class Filter:
    """One filter. Equality and hashing are by ``path``, ``op`` and the canonical ``value``;
    the other fields are what evaluation needs, worked out by :func:`parse`."""

    path: tuple[str, ...]
    op: str
    value: str
    steps: Steps = field(compare=False, repr=False)
    operand: Any = field(compare=False, repr=False)
    test: Callable[[Any, Any], bool] = field(compare=False, repr=False)

    def __str__(self) -> str:
        return f"{'.'.join(self.path)}={self.op}.{self.value}"


#: A filter set: all must hold; the empty set lets everything through.
Filters = frozenset[Filter]
NONE: Final[Filters] = frozenset()


def _parse(text: str) -> Filter:
    if len(text) > _MAX_TEXT:
        raise _Bad(f"longer than {_MAX_TEXT} characters")
    path_text, _, rest = text.partition("=")
    op, dot, value = rest.partition(".")
    if not dot:  # Without an `=` there is no rest to find the dot in either.
        raise _Bad("expected path=operator.value")
    path = tuple(path_text.split("."))
    if "" in path:
        raise _Bad("empty path segment")
    if len(path) > _MAX_SEGMENTS:
        raise _Bad(f"more than {_MAX_SEGMENTS} path segments")
    if op not in _OPERATORS:
        raise _Bad(f"unknown operator {_shown(op)} (known: {', '.join(_OPERATORS)})")
    read, test = _OPERATORS[op]
    canonical, operand = read(value)
    steps = tuple((key, int(key) if key.isascii() and key.isdigit() else None) for key in path)
    return Filter(path, op, canonical, steps, operand, test)


def parse(text: str, *, source: str = "filter") -> Filter:
    """The filter ``text`` is; ``source`` names where it came from in errors."""
    try:
        return _parse(text)
    except _Bad as bad:
        raise FilterError(f"{source} {_shown(text)}: {bad}") from None


def parse_all(texts: Iterable[str], *, source: str = "filter") -> Filters:
    """The set of the filters ``texts`` are (at most ``_MAX_FILTERS`` of them)."""
    parsed = []
    for text in texts:
        if len(parsed) == _MAX_FILTERS:
            raise FilterError(f"{source}: too many filters (at most {_MAX_FILTERS})")
        parsed.append(parse(text, source=source))
    return frozenset(parsed)


#: The fixed part of a filter's evaluation cost (:func:`cost`), in units of one path segment.
#: Measured worst cases (1,000 sets of 32 ``neq`` filters that all hold, each on its own path,
#: the value reached through the exact-number parse): 1.0–1.5 µs per filter at 1 segment,
#: 2.4–3.1 µs at 8 and 3.3–4.9 µs at 16, about 0.25–0.3 µs per unit at 4 + segments.
COST_FIXED = 4


def cost(one: Filter) -> int:
    """What evaluating ``one`` against a notification costs, in units (:data:`COST_FIXED`)."""
    return COST_FIXED + len(one.steps)


def set_cost(filters: Filters) -> int:
    """What a channel pays per notification to evaluate ``filters``, at most: every filter,
    less one ``eq`` filter (the cheapest), which the :class:`Index` answers with the lookup of
    its path (:func:`lookup_paths`: counted once per channel, however many sets share it)."""
    total = sum(map(cost, filters))
    return total - min((cost(one) for one in filters if one.op == "eq"), default=0)


def lookup_paths(filters: Filters) -> set[Steps]:
    """The paths the :class:`Index` may look up for ``filters``: those of its ``eq`` filters."""
    return {one.steps for one in filters if one.op == "eq"}


def _walk(value: Any, steps: Steps) -> Any:
    """What ``steps`` lead to in ``value``; None when there is nothing there."""
    for key, index in steps:
        kind = type(value)
        if kind is dict:
            value = value.get(key)
        elif kind is list and index is not None and index < len(value):
            value = value[index]
        else:
            return None
    return value


class Document:
    """One notification, parsed once: the orjson result, plus an exact parse made lazily
    (stdlib json, ints exact, ``Decimal`` fractions) only when a filter's path meets a float
    (a u128 that orjson made a float, or a real fraction).

    ``parsed`` is ``orjson.loads(payload)``, or :data:`NOT_JSON` when the payload is not JSON
    (any value that is neither object nor array behaves alike: every path is missing).
    """

    __slots__ = ("_exact", "parsed", "payload")

    def __init__(self, payload: bytes, parsed: Any) -> None:
        self.payload = payload
        self.parsed = parsed
        self._exact: Any = _UNREAD

    def value_at(self, steps: Steps) -> Any:
        """The exact value at a path (:attr:`Filter.steps`); None when missing (or null)."""
        value = _walk(self.parsed, steps)
        if type(value) is float:
            if self._exact is _UNREAD:
                try:
                    self._exact = json.loads(self.payload, parse_float=Decimal)
                except (ValueError, ArithmeticError, RecursionError):
                    self._exact = NOT_JSON  # Stricter than orjson: Decimal's exponent range.
            value = _walk(self._exact, steps)
        return value


def _all_hold(filters: Iterable[Filter], document: Document) -> bool:
    return all(one.test(one.operand, document.value_at(one.steps)) for one in filters)


def matches(filters: Filters, document: Document) -> bool:
    """Whether every filter of the set holds for ``document`` (the empty set: always)."""
    return _all_hold(filters, document)


def _keys(operand: _Scalar) -> tuple[Any, ...]:
    """The index keys under which an ``eq`` filter's set is found (see :func:`_key`)."""
    return (operand.text,) if operand.number is None else (operand.text, operand.number)


def _key(value: Any) -> Any:
    """The index key of a document value: ``eq.T`` holds exactly for the values whose key is
    among ``_keys(T)``. Strings are themselves (no number equals a text); booleans are the
    texts ``eq`` compares them with; numbers are themselves (an int and an equal Decimal are
    one dict key); anything else, None, which no set is filed under."""
    kind = type(value)
    if kind is str or kind in _NUMBER_TYPES:
        return value
    if kind is bool:
        return "true" if value else "false"
    return None


class Index:
    """Many filter sets (the distinct ones of one channel's subscribers), evaluated against one
    document at a time, at a cost that grows with distinct filters, not with subscribers, and
    for sets holding an ``eq`` filter not even with their number: sets are indexed by one of
    their eq filters (path -> canonical value -> sets), so a document costs one lookup per
    indexed path plus the evaluation of the remaining filters of the candidates found, plus
    the unindexed sets.
    """

    __slots__ = ("_by_path", "_held", "_unindexed")

    def __init__(self) -> None:
        #: Each set held: how many times it was added, and the eq filter indexing it.
        self._held: dict[Filters, tuple[int, Filter | None]] = {}
        #: Path -> key -> set -> the set's other filters (all but the indexing one).
        self._by_path: dict[Steps, dict[Any, dict[Filters, tuple[Filter, ...]]]] = {}
        self._unindexed: set[Filters] = set()

    def __len__(self) -> int:
        return len(self._held)

    def add(self, filters: Filters) -> None:
        """Hold ``filters`` once more (reference counted: each add wants one remove)."""
        held = self._held.get(filters)
        if held is not None:
            self._held[filters] = (held[0] + 1, held[1])
            return
        # A path already indexed costs no extra lookup per document; then any, but always the same.
        chosen = min((one for one in filters if one.op == "eq"), default=None,
                     key=lambda one: (one.steps not in self._by_path, str(one)))
        self._held[filters] = (1, chosen)
        if chosen is None:
            self._unindexed.add(filters)
            return
        rest = tuple(one for one in filters if one != chosen)
        table = self._by_path.setdefault(chosen.steps, {})
        for key in _keys(chosen.operand):
            table.setdefault(key, {})[filters] = rest

    def remove(self, filters: Filters) -> None:
        """Drop one hold of ``filters``; KeyError if it is not held."""
        count, chosen = self._held[filters]
        if count > 1:
            self._held[filters] = (count - 1, chosen)
            return
        del self._held[filters]
        if chosen is None:
            self._unindexed.remove(filters)
            return
        table = self._by_path[chosen.steps]
        for key in _keys(chosen.operand):
            sets = table[key]
            del sets[filters]
            if not sets:
                del table[key]
        if not table:
            del self._by_path[chosen.steps]

    def matching(self, document: Document) -> list[Filters]:
        """The held sets that ``document`` matches, each once (:data:`NONE`, if held, always)."""
        found = []
        for steps, table in self._by_path.items():
            # One value has one key, so a set filed under two keys is still found once.
            sets = table.get(_key(document.value_at(steps)))
            if sets is not None:
                found.extend(filters for filters, rest in sets.items()
                             if _all_hold(rest, document))
        found.extend(filters for filters in self._unindexed if _all_hold(filters, document))
        return found

"""Admission (relay/transports/admission.py), without sockets: the order of the checks, their
exact refusals, and the shared caps held and given back."""

from __future__ import annotations

import jwt
import pytest

from relay.auth import tokens
from relay.config import load
from relay.core import filters
from relay.core.history import History
from relay.transports.admission import Admission, Admitted, Held, Refusal
from relay.wire import positions

SECRET = "s" * 32
KEYS = tokens.read_secret(SECRET.encode()).keys
NOW = 1_800_000_000.0
SUB = [(b"sec-websocket-protocol", positions.SUBPROTOCOL.encode())]


def _token(**claims: object) -> str:
    return jwt.encode({"mode": "r", **claims}, SECRET, algorithm="HS256")


def _admission(history: History | None = None, **settings: str) -> Admission:
    config = load({"PGWS_DB_URI": "postgres://u@h/db", "PGWS_JWT_SECRET": SECRET, **settings})
    return Admission(config, KEYS, history)


def _admit(admission: Admission, target: str, headers: list[tuple[bytes, bytes]] | None = None,
           network: str = "10.0.0.1", monotonic: float = 0.0) -> tuple[Admitted | Refusal, Held]:
    held = Held()
    return admission.admit(target.encode(), headers or [], network, held, NOW, monotonic), held


def test_a_good_token_is_admitted_with_its_grant_and_filters() -> None:
    admitted, held = _admit(_admission(), f"/c/{_token()}?filter=n=eq.1")
    assert isinstance(admitted, Admitted)
    assert admitted.grant.channels == ("c",) and not admitted.positioned
    assert admitted.filters == filters.parse_all(["n=eq.1"])
    assert held.slot and held.channels == ("c",) and held.filters == admitted.filters


@pytest.mark.parametrize(("settings", "target", "headers", "refusal"), [
    ({"PGWS_ALLOWED_ORIGINS": "https://good.example"}, "/c/{t}",
     [(b"origin", b"https://evil.example")], Refusal(403, "Origin not allowed", "origin")),
    ({}, "/c/not-a-token", [], Refusal(400, "Error: JWSError (CompactDecodeError Invalid number "
                                          "of parts: Expected 3 parts; got 1)", "token")),
    ({}, "/c/{t}?filter=n=like.1", [], None),  # 400, the filter's own text
    ({}, "/c/{t}?from=abc", SUB, Refusal(400, "Invalid position", "position")),
    ({}, "/c/{t}?from=0", [],
     Refusal(400, "Resuming needs the pgws.resume.v1 subprotocol", "position")),
])
def test_each_refusal_has_its_status_text_and_reason(settings: dict[str, str], target: str,
                                                     headers: list, refusal: Refusal | None
                                                     ) -> None:
    admitted, _ = _admit(_admission(History(10, 1 << 20, 60), **settings),
                         target.format(t=_token()), headers)
    assert isinstance(admitted, Refusal)
    if refusal is None:
        assert (admitted.status, admitted.reason) == (400, "filter")
        assert admitted.text.startswith('filter "n=like.1": unknown operator "like"')
    else:
        assert admitted == refusal


def test_resuming_with_history_off_is_refused_with_the_setting_named() -> None:
    admitted, _ = _admit(_admission(None), f"/c/{_token()}?from=0", SUB)
    assert admitted == Refusal(400, "Cannot resume: history is off (PGWS_HISTORY_MESSAGES=0)",
                               "position")


def test_a_stopping_relay_refuses_before_anything_is_held() -> None:
    admission = _admission()
    admission.shutting_down = True
    admitted, held = _admit(admission, f"/c/{_token()}")
    assert admitted == Refusal(503, "Shutting down", "shutting_down") and not held.slot


def test_connection_slots_are_held_until_released_even_when_refused_later() -> None:
    admission = _admission(PGWS_MAX_CONNECTIONS="2")
    first, held_first = _admit(admission, f"/c/{_token()}")
    refused_later, held_refused = _admit(admission, "/c/not-a-token")
    assert isinstance(first, Admitted) and isinstance(refused_later, Refusal)
    assert held_refused.slot  # Held when the token was checked: the caller releases it.
    third, _ = _admit(admission, f"/c/{_token()}")
    assert third == Refusal(503, "Too many connections", "capacity")
    admission.release(held_refused, "10.0.0.1")
    assert isinstance(_admit(admission, f"/c/{_token()}")[0], Admitted)
    admission.release(held_first, "10.0.0.1")
    assert admission.slots == 1


def test_url_filters_narrow_a_claim_and_never_replace_it() -> None:
    claimed = _token(filters=["user=eq.alice"])
    admitted, held = _admit(_admission(), f"/c/{claimed}?filter=n=gt.1")
    assert isinstance(admitted, Admitted)
    assert admitted.filters == filters.parse_all(["user=eq.alice", "n=gt.1"])
    assert not held.claimed  # The URL made this set: it counts with the URL sets.
    _, as_issued = _admit(_admission(), f"/c/{claimed}")
    assert as_issued.claimed


def test_filter_sets_over_a_cap_are_refused_and_come_back_on_release() -> None:
    admission = _admission(PGWS_MAX_FILTER_SETS="1", PGWS_MAX_FILTER_SETS_PER_IP="0")
    _, held = _admit(admission, f"/c/{_token()}?filter=n=eq.1")
    assert _admit(admission, f"/c/{_token()}?filter=n=eq.2")[0] == Refusal(
        503, "Too many distinct filters", "capacity")
    admission.release(held, "10.0.0.1")
    assert isinstance(_admit(admission, f"/c/{_token()}?filter=n=eq.2")[0], Admitted)


def test_resumes_are_rate_limited_per_address() -> None:
    history = History(10, 1 << 20, 60)
    admission = _admission(history, PGWS_MAX_RESUMES_PER_SECOND_PER_IP="1")
    target = f"/c/{_token()}?from={history.position}"
    outcomes = [_admit(admission, target, SUB, monotonic=5.0)[0] for _ in range(3)]
    assert [type(o).__name__ for o in outcomes] == ["Admitted", "Admitted", "Refusal"]
    assert outcomes[2] == Refusal(429, "Too many resumes from this address", "resumes")
    assert isinstance(_admit(admission, target, SUB, network="10.0.0.2", monotonic=5.0)[0],
                      Admitted)
    resumed = outcomes[0]
    assert isinstance(resumed, Admitted) and resumed.positioned
    assert resumed.resume == positions.parse_position(history.position)


def test_an_origin_is_refused_only_when_allowed_origins_are_set_and_it_is_not_one_of_them(
) -> None:
    origin = [(b"origin", b"https://good.example")]
    assert isinstance(_admit(_admission(), f"/c/{_token()}", origin)[0], Admitted)
    restricted = _admission(PGWS_ALLOWED_ORIGINS="https://good.example")
    assert isinstance(_admit(restricted, f"/c/{_token()}", origin)[0], Admitted)
    assert isinstance(_admit(restricted, f"/c/{_token()}")[0], Admitted)  # No Origin: no browser.


def test_a_bearer_token_in_the_authorization_header_is_admitted() -> None:
    admitted, _ = _admit(_admission(), "/c", [(b"authorization", f"Bearer {_token()}".encode())])
    assert isinstance(admitted, Admitted) and admitted.grant.channels == ("c",)


def test_token_times_are_judged_at_the_time_given() -> None:
    admission = _admission()
    assert isinstance(_admit(admission, f"/c/{_token(exp=NOW + 1)}")[0], Admitted)
    expired = Refusal(400, tokens.TOKEN_EXPIRED, "token")
    assert _admit(admission, f"/c/{_token(exp=NOW)}")[0] == expired


def test_without_url_filters_the_grant_s_own_set_is_shared_and_there_is_no_resume() -> None:
    admitted, _ = _admit(_admission(), f"/c/{_token(filters=['user=eq.alice'])}")
    assert isinstance(admitted, Admitted)
    assert admitted.filters is admitted.grant.filters and admitted.resume is None


def test_filter_sets_over_the_cost_cap_are_refused() -> None:
    one = filters.set_cost(filters.parse_all(["n=gt.1"]))
    admission = _admission(PGWS_MAX_FILTER_COST=str(2 * one), PGWS_MAX_FILTER_SETS_PER_IP="0")
    for n in (1, 2):
        assert isinstance(_admit(admission, f"/c/{_token()}?filter=n=gt.{n}")[0], Admitted)
    assert _admit(admission, f"/c/{_token()}?filter=n=gt.3")[0] == Refusal(
        503, "Too many distinct filters", "capacity")


def test_distinct_url_filter_sets_are_capped_per_address() -> None:
    admission = _admission(PGWS_MAX_FILTER_SETS_PER_IP="1")
    assert isinstance(_admit(admission, f"/c/{_token()}?filter=n=eq.1")[0], Admitted)
    assert _admit(admission, f"/c/{_token()}?filter=n=eq.2")[0] == Refusal(
        503, "Too many distinct filters from this address", "capacity")
    assert isinstance(_admit(admission, f"/c/{_token()}?filter=n=eq.2", network="10.0.0.2")[0],
                      Admitted)


def test_a_resume_rate_under_one_per_second_still_bursts_one() -> None:
    history = History(10, 1 << 20, 60)
    admission = _admission(history, PGWS_MAX_RESUMES_PER_SECOND_PER_IP="0.5")
    target = f"/c/{_token()}?from={history.position}"
    outcomes = [_admit(admission, target, SUB, monotonic=5.0)[0] for _ in range(2)]
    assert [type(o).__name__ for o in outcomes] == ["Admitted", "Refusal"]
    assert isinstance(_admit(admission, target, SUB, monotonic=7.0)[0], Admitted)


def test_a_release_gives_back_one_slot_however_often_it_is_called() -> None:
    admission = _admission()
    held = [_admit(admission, f"/c/{_token()}")[1] for _ in range(3)]
    assert admission.slots == 3
    admission.release(held[0], "10.0.0.1")
    admission.release(held[0], "10.0.0.1")
    assert admission.slots == 2 and not held[0].slot


def test_a_claim_set_the_url_adds_filters_to_counts_with_the_url_sets_and_per_address() -> None:
    """Else any claim-bearing read token could fill the claim pool from one address, past the
    per-address cap, and lock out the users whose claims need a set."""
    admission = _admission(PGWS_MAX_FILTER_SETS="1", PGWS_MAX_FILTER_SETS_PER_IP="1")
    mallory = _token(filters=["payload.user=eq.mallory"])
    admitted, held = _admit(admission, f"/c/{mallory}?filter=n=neq.1")
    assert isinstance(admitted, Admitted) and not held.claimed
    assert _admit(admission, f"/c/{mallory}?filter=n=neq.2")[0] == Refusal(
        503, "Too many distinct filters from this address", "capacity")
    alice, held_alice = _admit(admission, f"/c/{_token(filters=['payload.user=eq.alice'])}")
    assert isinstance(alice, Admitted) and held_alice.claimed  # The claim pool is untouched.


def _cookie(token: str, name: str = "pgws_token") -> tuple[bytes, bytes]:
    return (b"cookie", f"theme=dark; {name}={token}; x=1".encode())


def test_a_cookie_token_is_taken_only_with_allowed_origins_and_from_one() -> None:
    good = [(b"origin", b"https://good.example"), _cookie(_token())]
    off, _ = _admit(_admission(), "/c", good)
    # Without PGWS_ALLOWED_ORIGINS the cookie is never read: no token at all.
    assert isinstance(off, Refusal) and off.status == 400
    admission = _admission(PGWS_ALLOWED_ORIGINS="https://good.example")
    admitted, _ = _admit(admission, "/c", good)
    assert isinstance(admitted, Admitted) and admitted.grant.channels == ("c",)
    other, _ = _admit(admission, "/c", [(b"origin", b"https://evil.example"), _cookie(_token())])
    assert other == Refusal(403, "Origin not allowed", "origin")
    nameless, _ = _admit(admission, "/c", [_cookie(_token())])
    assert nameless == Refusal(403, "Origin required with a cookie token", "origin")
    same_site, _ = _admit(admission, "/c", [_cookie(_token()),
                                             (b"sec-fetch-site", b"same-origin")])
    assert isinstance(same_site, Admitted)
    cross_site, _ = _admit(admission, "/c", [_cookie(_token()),
                                              (b"sec-fetch-site", b"cross-site")])
    assert cross_site == Refusal(403, "Origin required with a cookie token", "origin")


def test_the_url_the_query_and_the_header_win_over_the_cookie() -> None:
    admission = _admission(PGWS_ALLOWED_ORIGINS="https://good.example",
                           PGWS_TOKEN_COOKIE="relay")
    stale = _cookie(_token(exp=NOW - 10), "relay")
    for target, headers in ((f"/c/{_token()}", [stale]), (f"/c?jwt={_token()}", [stale]),
                            ("/c", [stale, (b"authorization", f"Bearer {_token()}".encode())])):
        admitted, _ = _admit(admission, target, headers)  # No Origin: not a cookie token.
        assert isinstance(admitted, Admitted), target
    expired, _ = _admit(admission, "/c", [stale, (b"origin", b"https://good.example")])
    assert isinstance(expired, Refusal) and expired.reason == "token"


def test_a_refreshed_token_must_cover_the_connection_with_the_same_filters() -> None:
    admission = _admission()
    # No channel in the URL: the connection has every channel of the claim.
    old = admission.admit(f"/{_token(mode='rw', channels=['c', 'd'], filters=['n=eq.1'])}"
                          .encode(), [], "10.0.0.1", Held(), NOW, 0.0)
    assert isinstance(old, Admitted) and old.grant.channels == ("c", "d")
    grant = old.grant

    def refresh(**claims: object) -> object:
        return admission.refresh(_token(**claims), grant, None, NOW)

    taken = refresh(mode="rw", channels=["c", "d", "e"], filters=["n=eq.1"], exp=NOW + 60)
    assert isinstance(taken, tokens.Grant) and taken.expires_at == NOW + 60
    assert refresh(mode="r", channels=["c", "d"], filters=["n=eq.1"]) == \
        "mode 'r' does not cover 'rw'"
    assert refresh(mode="rw", channels=["c"], filters=["n=eq.1"]) == \
        "the token does not grant every channel of the connection"
    assert refresh(mode="rw", channels=["c", "d"]) == \
        "the filters claim differs: open a new connection for other filters"
    assert refresh(mode="rw", channels=["c", "d"], filters=["n=eq.2"]) == \
        "the filters claim differs: open a new connection for other filters"
    assert str(refresh(mode="rw", channels=["c", "d"], filters=["n=eq.1"],
                                        exp=NOW - 1)) == "Token expired"
    assert admission.refresh(42, grant, None, NOW) == "the token must be a string"
    assert "JWSError" in str(admission.refresh("garbage", grant, None, NOW))


def test_a_wider_token_refreshes_a_read_only_connection_without_widening_it() -> None:
    admission = _admission()
    old = admission.admit(f"/c/{_token()}".encode(), [], "10.0.0.1", Held(), NOW, 0.0)
    assert isinstance(old, Admitted) and old.grant.mode == "r"
    taken = admission.refresh(_token(mode="rw", exp=NOW + 60), old.grant, "c", NOW)
    assert isinstance(taken, tokens.Grant)
    assert (taken.mode, taken.expires_at, taken.can_write) == ("r", NOW + 60, False)

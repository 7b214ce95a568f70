"""Pure bookkeeping without sockets: the delivery-time histogram, the hub's pending batches,
the merge of worker metrics and the listener's error classification."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.core.hub import Hub, Pending
from relay.core.stats import LATENCY_BUCKETS, REFUSAL_REASONS, Counters, LatencyHistogram, line
from relay.ops.admin import merge_worker_metrics
from relay.sources.outage import is_permanent
from relay.wire.frames import TEXT_FRAMES


def test_a_duration_on_a_bound_counts_in_that_bucket_and_all_above() -> None:
    histogram = LatencyHistogram()
    histogram.observe(0.001)          # exactly a bound: le="0.001" holds it
    histogram.observe(0.0011, 2)      # just above: the next bucket, twice
    histogram.observe(60.0)           # above every bound: +Inf only
    rows = dict(histogram.cumulative())
    assert rows["0.0005"] == 0
    assert rows["0.001"] == 1
    assert rows["0.0025"] == 3
    assert rows["10.0"] == 3
    assert rows["+Inf"] == 4 == histogram.count
    assert histogram.sum == pytest.approx(0.001 + 2 * 0.0011 + 60.0)
    assert [bound for bound, _ in histogram.cumulative()] == [
        *map(repr, LATENCY_BUCKETS), "+Inf"]


def test_durations_in_one_bucket_add_up() -> None:
    histogram = LatencyHistogram()
    histogram.observe(0.003)
    histogram.observe(0.004, 3)
    assert dict(histogram.cumulative())["0.005"] == 4 == histogram.count


def test_refusals_count_by_reason_and_in_all() -> None:
    counters = Counters()
    counters.refuse("token")
    counters.refuse("token")
    counters.refuse("origin")
    assert counters.rejected == 3
    assert counters.refused == {**dict.fromkeys(REFUSAL_REASONS, 0), "token": 2, "origin": 1}
    with pytest.raises(KeyError):
        counters.refuse("no such reason")


def test_the_stats_line_holds_the_integer_counters_only() -> None:
    text = line(clients=2)
    assert text.startswith("stats: clients=2 accepted=")
    assert "refused" not in text and "rejected=" in text


class _Recorder:
    """A subscriber that writes at once (False) or queues (True), as told."""

    def __init__(self, queues: bool) -> None:
        self.queues = queues
        self.tracked: list[Pending] = []

    def offer(self, frame: bytes) -> bool:
        return self.queues

    def track(self, pending: Pending) -> None:
        self.tracked.append(pending)

    def close(self, code: int, reason: str) -> None:
        pass


def test_a_batch_written_at_once_is_observed_at_the_end_of_the_pass() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
    hub.add(_Recorder(queues=False), ["a"])
    hub.add(_Recorder(queues=False), ["a", "b"])
    arrived = time.monotonic() - 0.2
    hub.publish([b'{"channel":"a"}', b'{"channel":"b"}', b'{"channel":"x"}'], arrived)
    times = hub.delivery_times
    assert times.count == 2  # Two routed notifications; the unrouted one is not a delivery.
    assert 0.2 <= times.sum / 2 < 5
    assert hub.routed == 2 and hub.offered == 3
    assert hub.offered_bytes == 3 * (2 + len(b'{"channel":"a"}'))


def test_a_queued_batch_is_observed_when_its_last_subscriber_has_written() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
    fast, slow, slower = _Recorder(False), _Recorder(True), _Recorder(True)
    for client in (fast, slow, slower):
        hub.add(client, ["a"])
    hub.publish([b'{"channel":"a","n":1}', b'{"channel":"a","n":2}'])
    assert hub.delivery_times.count == 0
    assert len(slow.tracked) == len(slower.tracked) == 1 and not fast.tracked
    pending = slow.tracked[0]
    assert pending is slower.tracked[0] and pending.waiting == 2
    pending.done()
    assert hub.delivery_times.count == 0
    pending.done()
    assert hub.delivery_times.count == 2  # Both notifications, once.
    pending.done()  # One call too many changes nothing.
    assert hub.delivery_times.count == 2


def test_a_queued_batch_counts_its_time_from_its_arrival() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
    slow = _Recorder(True)
    hub.add(slow, ["a"])
    hub.publish([b'{"channel":"a"}', b'{"channel":"a"}'], time.monotonic() - 0.2)
    slow.tracked[0].done()
    assert hub.delivery_times.count == 2
    assert 0.2 <= hub.delivery_times.sum / 2 < 5


def test_writes_done_before_the_pass_is_over_are_observed_when_it_is() -> None:
    histogram = LatencyHistogram()
    pending = Pending(time.monotonic(), histogram)
    pending.waiting = 2
    pending.done()
    pending.done()
    assert histogram.count == 0  # The pass has not said how many notifications it routed.
    pending.arm(3)
    assert histogram.count == 3


def test_routed_and_offered_add_up_over_batches() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
    hub.add(_Recorder(False), ["a"])
    hub.add(_Recorder(False), ["a"])
    hub.publish([b'{"channel":"a"}'])
    hub.publish([b'{"channel":"a"}', b'{"channel":"b"}'])
    assert (hub.routed, hub.offered, hub.delivery_times.count) == (2, 4, 2)


def test_nothing_is_observed_when_nothing_is_routed() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
    hub.add(_Recorder(True), ["a"])
    hub.publish([b'{"channel":"b"}'])
    assert hub.delivery_times.count == 0 and hub.routed == 0


_WORKER = """\
# HELP pgws_connections Open WebSocket connections.
# TYPE pgws_connections gauge
pgws_connections {n}
# HELP pgws_connections_refused_total Refused.
# TYPE pgws_connections_refused_total counter
pgws_connections_refused_total{{reason="token"}} {n}
# HELP pgws_delivery_seconds Delivery.
# TYPE pgws_delivery_seconds histogram
pgws_delivery_seconds_bucket{{le="0.001"}} {n}
pgws_delivery_seconds_bucket{{le="+Inf"}} {n}
pgws_delivery_seconds_count {n}
pgws_delivery_seconds_sum 0.5
"""


def test_worker_metrics_merge_into_one_family_each_with_a_worker_label() -> None:
    text = merge_worker_metrics([("0", _WORKER.format(n=2)), ("1", _WORKER.format(n=3))])
    families = {family.name: family for family in
                text_string_to_metric_families(text.decode())}
    assert text.decode().count("# TYPE pgws_connections gauge") == 1
    assert {(s.labels["worker"], s.value) for s in families["pgws_connections"].samples} == {
        ("0", 2), ("1", 3)}
    refused = families["pgws_connections_refused"]
    assert refused.type == "counter"
    assert {(s.labels["worker"], s.labels["reason"]) for s in refused.samples} == {
        ("0", "token"), ("1", "token")}
    histogram = families["pgws_delivery_seconds"]
    assert histogram.type == "histogram"
    assert {(s.name, s.labels.get("le"), s.labels["worker"]) for s in histogram.samples} >= {
        ("pgws_delivery_seconds_bucket", "+Inf", "1"), ("pgws_delivery_seconds_count", None, "0")}


def test_no_worker_answering_gives_an_empty_exposition() -> None:
    assert merge_worker_metrics([]) == b""


@pytest.mark.parametrize(("message", "permanent"), [
    ('connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  '
     'database "nope" does not exist', True),
    ('connection failed: ... failed: FATAL:  role "nobody" does not exist', True),
    ('connection failed: ... failed: FATAL:  password authentication failed for user "x"', True),
    ("connection failed: ... FATAL:  no pg_hba.conf entry for host", True),
    ('connection failed: ... FATAL:  role "x" is not permitted to log in', True),
    ("connection failed: ... fe_sendauth: no password supplied; password is required", True),
    ('connection failed: ... port 5432 failed: Connection refused', False),
    ("connection failed: ... FATAL:  the database system is starting up", False),
    ("connection failed: ... FATAL:  the database system is shutting down", False),
    ("connection failed: ... timeout expired", False),
    ("FATAL:  sorry, too many clients already", False),
])
def test_permanent_connection_errors_are_told_from_outages(message: str,
                                                            permanent: bool) -> None:
    assert is_permanent(message) is permanent


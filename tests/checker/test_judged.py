"""Verdicts to trust: order from the brokers' own orders, every expectation judged or listed,
every finding kept, latency on the brokers' clocks where they have one."""

from __future__ import annotations

import pytest
from history import MS, START, History

from flowcheck.checker import Checker, FindingKind, Recording, Verdict, check
from flowcheck.observations import Kind, Observation
from flowcheck.topology import Topology, loads

PIPE = """
brokers: {k: {kind: kafka}, s: {kind: redis}, r: {kind: rabbitmq}}
channels:
  orders: {broker: k, kind: topic}
  shipments: {broker: s, kind: stream}
  ex: {broker: r, kind: exchange, type: topic}
  billing: {broker: r, kind: queue, bindings: [{exchange: ex, key: "#"}]}
flows:
  f:
    correlate: $.id
    steps: [orders, {channel: shipments, deadline: 100ms}]
    deadline: 1s
    ordering: per-partition-key
"""


def run(top: Topology, h: History, end_ms: float = 60_000, **kw: object) -> Verdict:
    return check(
        top,
        h.items,  # recording order: as added
        start_ns=START - 1000 * MS,
        end_ns=START + int(end_ms * MS),
        **kw,  # type: ignore[arg-type]
    )


def found(v: Verdict) -> list[tuple[str, str | None]]:
    return [(f.kind.value, f.key) for fv in v.flows for f in fv.findings]


def unjudged(v: Verdict) -> dict[str, tuple[str, int]]:
    return {u.expectation: (u.why, u.chains) for fv in v.flows for u in fv.unjudged}


def ms_of(h: History) -> int:
    """The broker's millisecond clock now, on the same time line as History's wall clock."""
    return h.t // MS


# ---------------------------------------------------------------- order


def kafka_to_stream(h: History, keys: list[str], ids: list[int], *, read_ms: float) -> None:
    """Chains of one record key: on the topic in offset order, 10 ms apart, then into the
    stream with entry ids ``ids``, all seen by one XREAD reply (the same time)."""
    for n, key in enumerate(keys):
        h.at(n * 10).routed("orders", key, partition=0, offset=n, kafka_key="cust")
    h.at(read_ms)
    for key, eid in zip(keys, ids, strict=True):
        t = h.t
        h.routed("shipments", key, entry_id=f"{eid}-0", broker_ms=eid)
        h.t = t  # one read: every entry stamped with the same time


def test_a_time_tie_is_not_an_inversion() -> None:
    """Seen: a Redis tap stamps every entry of one XREAD reply alike; each tie was taken
    for 'overtook'. The entry ids hold the true order, and it is the topic's."""
    h = History()
    keys = [f"k{n}" for n in range(8)]
    kafka_to_stream(h, keys, [2000 + n for n in range(8)], read_ms=90)
    v = run(loads(PIPE), h)
    assert found(v) == []
    assert v.passed


def test_an_inversion_in_entry_ids_is_found_though_the_times_tie() -> None:
    h = History()
    kafka_to_stream(h, ["k0", "k1", "k2"], [2000, 2002, 2001], read_ms=90)
    v = run(loads(PIPE), h)
    assert found(v) == [("reordered", "k2")]
    assert v.flows[0].findings[0].message.startswith("'k2' overtook 'k1' at 'shipments'")


def test_places_in_two_partitions_decide_nothing() -> None:
    """Two chains of one key on two partitions: their offsets are two orders, never
    compared; nothing else is comparable either, and the verdict says so."""
    h = History()
    h.at(0).routed("orders", "a", partition=0, offset=5, kafka_key="cust")
    h.at(10).routed("orders", "b", partition=1, offset=1, kafka_key="cust")
    h.at(20).routed("shipments", "b", entry_id="1000-0", broker_ms=1000)
    h.at(30).routed("shipments", "a", entry_id="2000-0", broker_ms=2000)
    # Entry ids alone would say b first; the offsets of two partitions say nothing.
    v = run(loads(PIPE), h)
    assert found(v) == []
    why, chains = unjudged(v)["ordering per-partition-key"]
    assert "no broker order" in why
    assert chains == 1
    assert not v.passed


def test_a_queue_keeps_the_order_its_tap_received() -> None:
    """A RabbitMQ queue: the order of its deliveries to the tap, not their read times."""
    top = loads(
        PIPE.replace("steps: [orders, {channel: shipments", "steps: [orders, {channel: billing")
    )

    def history(order: list[str]) -> History:
        h = History()
        for n, key in enumerate(["k0", "k1", "k2"]):
            h.at(n * 10).routed("orders", key, partition=0, offset=n, kafka_key="cust")
        for key in order:
            h.at(50).routed("billing", key)  # one read: the same time for all
        return h

    assert found(run(top, history(["k0", "k1", "k2"]))) == []
    assert found(run(top, history(["k0", "k2", "k1"]))) == [("reordered", "k2")]


def test_a_chain_with_no_record_key_is_not_judged_for_order() -> None:
    h = History()
    h.at(0).routed("orders", "k0", partition=0, offset=0)
    h.at(20).routed("shipments", "k0", entry_id="1020-0", broker_ms=1020)
    v = run(loads(PIPE), h)
    assert unjudged(v) == {
        "ordering per-partition-key": ("no Kafka record key was seen on its messages", 1)
    }
    assert not v.passed
    assert [c.passed for c in v.flows[0].checks if c.name == "ordering"] == [False]


RETRY = """
brokers: {r: {kind: rabbitmq}, s: {kind: redis}}
channels:
  orders: {broker: r, kind: exchange, type: topic}
  billing:
    broker: r
    kind: queue
    bindings: [{exchange: orders, key: "#"}]
    dead_letter: {exchange: dlx, key: b}
  dlx: {broker: r, kind: exchange, type: direct}
  dlq: {broker: r, kind: queue, bindings: [{exchange: dlx, key: b}]}
flows:
  f:
    correlate: $.id
    steps:
      - orders
      - {channel: billing, retry: {max_attempts: 3}}
    dead_letters:
      - {when: {payload: {$.poison: true}}, channel: dlq, step: billing, attempts: 3}
    deadline: 1s
"""

JOBS = """
brokers: {s: {kind: redis}}
channels:
  jobs: {broker: s, kind: stream, groups: [w]}
flows:
  j:
    correlate: $.id
    steps: [{channel: jobs, retry: {max_attempts: 3, backoff: 500ms}}]
    deadline: 5s
"""


def test_deliveries_seen_in_one_read_say_nothing_of_the_backoff() -> None:
    """The Redis pending list is polled: two deliveries found in one poll share a time.
    That tie is no attempt made too early; the backoff of that retry went unseen."""
    h = History("j")
    h.at(0).routed("jobs", "j1", entry_id="1000-0", broker_ms=1000)
    h.at(900)
    for n in (1, 2):
        t = h.t
        h.add(Kind.DELIVERED if n == 1 else Kind.REDELIVERED, "jobs", "j1", delivery_count=n)
        h.t = t
    h.add(Kind.CONSUMED, "jobs", "j1")
    v = run(loads(JOBS), h)
    assert found(v) == []
    (u,) = v.flows[0].unjudged
    assert (u.expectation, u.chains) == ("retry backoff at 'jobs'", 1)


DECLINED = """
brokers: {k: {kind: kafka}}
channels:
  payments: {broker: k, kind: topic, retry: [payments-retry], dead_letter: payments-dlt}
  payments-retry: {broker: k, kind: topic}
  payments-dlt: {broker: k, kind: topic}
flows:
  d:
    correlate: kafka_key
    steps: [{channel: payments, retry: {max_attempts: 2, backoff: 1s}}]
    delivery: at-least-once
    deadline: 30s
    dead_letters:
      - {when: {payload: {$.status: declined}}, channel: payments-dlt, attempts: 2}
"""


def declined(retried_ms: float, dead_ms: float) -> Verdict:
    """A payment declined twice: a record on the retry topic when attempt 1 failed (Spring
    numbers it for attempt 2), one on the dead-letter topic when attempt 2 did."""
    h = History("d")
    body = {"id": "p1", "status": "declined"}
    h.at(0).routed("payments", "p1", body, partition=0, offset=0, kafka_key="p1", broker_ms=1000)
    for ms, channel, kind in (
        (retried_ms, "payments-retry", Kind.ROUTED),
        (dead_ms, "payments-dlt", Kind.DEAD_LETTERED),
    ):
        h.at(ms).add(
            kind,
            channel,
            "p1",
            body,
            partition=0,
            offset=0,
            kafka_key="p1",
            broker_ms=1000 + int(ms),
            delivery_count=2,
            **({"origin": "payments"} if kind is Kind.DEAD_LETTERED else {}),
        )
    return run(loads(DECLINED), h)


def test_a_kafka_retry_that_failed_too_soon_was_surely_early() -> None:
    """When a retry was made does not show on Kafka; when it failed does. Attempt 2 failing
    300 ms after attempt 1 did cannot have waited the 1 s backoff first."""
    v = declined(retried_ms=50, dead_ms=350)
    assert found(v) == [("backoff", "p1")]
    assert v.flows[0].findings[0].message == (
        "attempt 2 at 'payments' failed 300ms after attempt 1 did; the backoff asks for "
        "1000ms before it"
    )
    # Failing later proves nothing of when it started: unjudged, not a pass.
    v = declined(retried_ms=50, dead_ms=1_400)
    assert found(v) == []
    assert unjudged(v)["retry backoff at 'payments'"][1] == 1


# ---------------------------------------------------------------- unjudged


def billed(h: History, key: str, at: float, *, firehose: bool) -> None:
    h.at(at).routed("orders", key)
    h.routed("billing", key)
    if firehose:
        h.add(Kind.DELIVERED, "billing", key, delivery_count=1)


def test_attempts_no_tap_saw_are_unjudged_and_fail_the_gate() -> None:
    """Seen: with the firehose off, a queue's attempts are unseen and the retry rule was
    skipped silently: a green gate that judged nothing of it."""
    h = History()
    for n in range(5):
        billed(h, f"k{n}", n * 10, firehose=False)
    top = loads(RETRY)
    v = run(top, h)
    assert found(v) == []
    why, chains = unjudged(v)["retry max_attempts 3 at 'billing'"]
    assert chains == 5  # one entry for the flow, not one per chain
    assert "firehose" in why
    assert not v.passed
    assert not v.flows[0].passed
    retries = next(c for c in v.flows[0].checks if c.name == "retries")
    assert not retries.passed
    assert "not judged: retry max_attempts 3 at 'billing' on 5 chain(s)" in retries.message
    # Allowed by the user: still listed, and green.
    allowed = run(top, h, allow_unjudged=True)
    assert allowed.passed
    assert allowed.allow_unjudged
    assert unjudged(allowed) == unjudged(v)
    # ... or by the topology's gate, which Checker follows unless told otherwise.
    gated = loads(RETRY + "gate: {allow_unjudged: true}\n")
    assert run(gated, h).passed
    assert not run(gated, h, allow_unjudged=False).passed
    # With the firehose on, everything was judged.
    h = History()
    for n in range(5):
        billed(h, f"k{n}", n * 10, firehose=True)
    v = run(top, h)
    assert unjudged(v) == {}
    assert v.passed


def test_dead_letter_attempts_no_tap_saw_are_unjudged() -> None:
    h = History()
    body = {"id": "p1", "poison": True}
    h.at(0).routed("orders", "p1", body)
    h.routed("billing", "p1", body)
    h.add(Kind.DEAD_LETTERED, "dlq", "p1", body, reason="rejected", origin="billing")
    v = run(loads(RETRY), h)
    assert found(v) == []
    got = unjudged(v)
    assert got["dead letter to 'dlq' after 3 attempts at 'billing'"][1] == 1
    assert got["retry max_attempts 3 at 'billing'"][1] == 1


def test_a_failed_chain_lists_nothing_unjudged() -> None:
    """Its failure fails the flow's threshold: what else went unjudged on it changes nothing."""
    h = History()
    h.at(0).routed("orders", "k1")
    h.routed("billing", "k1")
    h.routed("billing", "k1")  # a second message: duplicated; no delivery seen either
    v = run(loads(RETRY), h)
    assert found(v) == [("duplicated", "k1")]
    assert unjudged(v) == {}


def test_no_decided_chain_is_not_green() -> None:
    """Seen: an empty trace, or one whose chains are all unknown, passed."""
    top = loads(RETRY)
    v = check(top, [], start_ns=START, end_ns=START + 60_000 * MS)
    assert not v.passed
    assert unjudged(v)["its chains, and every expectation judged on them"] == (
        "no chain was decided: 0 seen, 0 unknown",
        0,
    )
    chains = v.flows[0].checks[0]
    assert (chains.name, chains.passed) == ("chains", False)
    assert "not judged" in chains.message
    h = History()
    h.at(0).routed("orders", "k1")
    v = run(top, h, end_ms=100)  # ended before its deadline: unknown
    assert v.flows[0].unknown == 1
    assert unjudged(v)["its chains, and every expectation judged on them"] == (
        "no chain was decided: 1 seen, 1 unknown",
        1,
    )
    assert not v.passed


def test_a_latency_budget_with_no_usable_sample_is_unjudged() -> None:
    top = loads(
        RETRY.replace(
            "{channel: billing, retry: {max_attempts: 3}}",
            "{channel: billing, retry: {max_attempts: 3}, latency: {p99: 10ms}}",
        )
    )
    h = History()
    for n in range(3):
        h.at(n * 10).routed("orders", f"k{n}")
        h.at(n * 10).routed("billing", f"k{n}")  # same instant: a sample of 0, left out
        h.add(Kind.DELIVERED, "billing", f"k{n}", delivery_count=1)
    v = run(top, h)
    lat = v.flows[0].latency[0]
    assert (lat.stats.count, lat.stats.non_positive) == (0, 3)
    assert unjudged(v)["latency budget of orders -> billing"] == (
        "no sample: all 3 left out of the percentiles",
        0,
    )
    assert not v.passed


def test_a_recording_with_no_end_record_lists_the_chains_it_left_unknown() -> None:
    top = loads(RETRY)
    h = History()
    billed(h, "k1", 0, firehose=True)
    h.at(5_000).routed("orders", "k2")  # on its way when the recording stopped

    def finish(ended: str, allow: bool | None = None) -> Verdict:
        c = Checker(top, start_ns=START - 1000 * MS, allow_unjudged=allow)
        for o in h.items:
            c.feed(o)
        end = START + 5_100 * MS
        return c.finish(end, recording=Recording(ended=ended, end_ms=6_100.0))

    v = finish("unknown")
    assert v.flows[0].unknown == 1
    (u,) = v.unjudged
    assert (u.flow, u.chains) == (None, 1)
    assert "no end record" in u.why
    assert not v.passed
    assert finish("unknown", allow=True).passed
    # An end record says when watching stopped: the chain it cut short is still unjudged.
    stopped = finish("stopped")
    (u,) = stopped.unjudged
    assert (u.expectation, u.chains) == ("the chains still open when the recording ended", 1)
    assert "before their deadlines" in u.why
    assert not stopped.passed
    assert finish("stopped", allow=True).passed
    (u,) = finish("run").unjudged  # a run whose wait ended before the deadline: the same
    assert (u.chains, u.why.startswith("the run ended")) == (1, True)


def test_chains_first_seen_after_the_stop_are_not_judged() -> None:
    top = loads(RETRY)
    h = History()
    billed(h, "k1", 0, firehose=True)
    h.at(4_000).routed("orders", "k2")  # in flight when the stop is asked, at 4500ms
    h.at(4_100).routed("orders", "k5")  # in flight too
    h.at(4_800).routed("orders", "k3")  # after it
    h.routed("orders", "k4")
    h.at(4_900).routed("billing", "k5")  # k5 goes on after the stop: still its chain
    c = Checker(top, start_ns=START - 1000 * MS, stop_ns=START + 4_500 * MS)
    for o in h.items:
        c.feed(o)
    v = c.finish(START + 5_000 * MS, recording=Recording(ended="stopped", end_ms=6_000.0))
    assert v.recording is not None
    assert v.recording.after_stop == 2
    # k1, k2 and k5; k3 and k4 are not judged. k5 ended after the stop: judged whole.
    assert (v.flows[0].chains, v.flows[0].succeeded) == (3, 2)
    (u,) = v.unjudged  # k2, still inside its deadline at the end
    assert u.chains == 1


def test_a_dead_letter_seen_on_its_exchange_during_a_gap_is_unknown() -> None:
    """The dead-letter exchange leads to the rule's queue; a tap gap on that queue may
    have hidden its arrival there: not 'dead-lettered to the wrong channel'."""
    h = History()
    body = {"id": "p1", "poison": True}
    h.at(0).routed("orders", "p1", body)
    h.routed("billing", "p1", body)
    for n in (1, 2, 3):
        h.add(
            Kind.DELIVERED if n == 1 else Kind.REDELIVERED, "billing", "p1", body, delivery_count=n
        )
    h.routed("dlx", "p1", body)
    h.items.append(
        Observation(
            kind=Kind.GAP,
            broker="b",
            channel="dlq",
            mono_ns=h.t,
            wall=h.t / 1e9,
            until_ns=h.t + 50 * MS,
        )
    )
    v = run(loads(RETRY), h)
    assert found(v) == []
    assert v.flows[0].unknown == 1


# ---------------------------------------------------------------- every finding


def test_every_finding_is_kept_flow_level_ones_first() -> None:
    """Seen: a flow-level latency finding was cut from verdict.json behind 174 others."""
    top = loads(
        RETRY.replace(
            "{channel: billing, retry: {max_attempts: 3}}",
            "{channel: billing, retry: {max_attempts: 3}, latency: {p50: 1ms}}",
        )
    )
    h = History()
    for n in range(150):
        h.at(n * 10).routed("orders", f"lost{n}")  # never reaches billing
    for n in range(3):
        h.at(5_000 + n * 10).routed("orders", f"k{n}")
        h.at(5_000 + n * 10 + 5).routed("billing", f"k{n}")
        h.add(Kind.DELIVERED, "billing", f"k{n}", delivery_count=1)
    v = run(top, h)
    fv = v.flows[0]
    assert len(fv.findings) == 151
    assert fv.findings_total == {"lost": 150, "latency": 1}
    assert fv.findings[0].kind is FindingKind.LATENCY
    lost = fv.findings[1:]
    assert all(f.timeline for f in lost[:100])
    assert not any(f.timeline for f in lost[100:])


# ---------------------------------------------------------------- latency clocks

LATE = """
brokers:
  k: {kind: kafka}
  s: {kind: redis, tap_read_interval: 10ms}
  r: {kind: rabbitmq, tap_read_interval: 10ms}
channels:
  orders: {broker: k, kind: topic}
  jobs: {broker: s, kind: stream}
  ex: {broker: r, kind: exchange, type: topic}
  billing: {broker: r, kind: queue, bindings: [{exchange: ex, key: "#"}]}
flows:
  f:
    correlate: $.id
    steps: [jobs, billing]
    deadline: 1s
"""


def test_a_hop_from_a_stream_uses_the_entry_id_not_the_later_read() -> None:
    """Seen: the Redis tap read an entry after the RabbitMQ tap had the next step's copy:
    samples <= 0 were dropped. The entry id holds when the broker took it."""
    h = History()
    for n in range(4):
        h.at(n * 100)
        entry = ms_of(h)
        h.at(n * 100 + 3).routed("billing", f"k{n}")  # read at once
        h.at(n * 100 + 8).routed("jobs", f"k{n}", entry_id=f"{entry}-0", broker_ms=entry)
    h.items.sort(key=lambda o: o.mono_ns)
    v = run(loads(LATE), h)
    hop = v.flows[0].latency[0]
    assert hop.clock == "broker_ms+wall"
    assert (hop.stats.count, hop.stats.non_positive) == (4, 0)
    assert hop.stats.p50_ms == pytest.approx(3.0, abs=0.01)
    assert hop.error_ms == 11.0  # 1 ms of the entry id, 10 ms of the RabbitMQ tap


def test_both_ends_on_the_brokers_clocks() -> None:
    """Kafka to Redis: CreateTime to entry id. One XREAD reply read half a second late says
    nothing of the hop, and a step deadline is judged on the same figure."""
    h = History()
    for n in range(3):
        h.at(n * 10).routed(
            "orders", f"k{n}", partition=0, offset=n, kafka_key="cust", broker_ms=1000 + n * 10
        )
    h.at(600)
    for n in range(3):
        t = h.t
        h.routed("shipments", f"k{n}", entry_id=f"{1000 + n * 10 + n}-0", broker_ms=1000 + n * 11)
        h.t = t
    v = run(loads(PIPE), h)
    assert found(v) == []  # 0-2 ms by the brokers; 570-600 ms by the taps' reads
    hop = v.flows[0].latency[0]
    assert (hop.clock, hop.error_ms) == ("broker_ms", 1.0)
    # A zero on a millisecond clock is a hop under a millisecond: in the percentiles.
    assert (hop.stats.count, hop.stats.non_positive) == (3, 0)
    assert (hop.stats.p50_ms, hop.stats.max_ms) == (1.0, 2.0)
    assert v.flows[0].latency[-1].clock == "broker_ms"


def test_a_message_flowcheck_published_is_timed_from_its_publish() -> None:
    h = History()
    h.at(0).add(Kind.PUBLISHED, "jobs", "k1", fc_id="fc1")
    h.at(5).routed("billing", "k1")
    v = run(loads(LATE), h)
    hop = v.flows[0].latency[0]
    assert (hop.clock, hop.error_ms, hop.stats.count) == ("mono_ns", 10.0, 1)


def test_a_late_step_is_said_on_its_clock() -> None:
    h = History()
    h.at(0).routed("orders", "k1", partition=0, offset=0, kafka_key="c", broker_ms=1000)
    h.at(300).routed("shipments", "k1", entry_id="1250-0", broker_ms=1250)
    v = run(loads(PIPE), h)
    (late,) = v.flows[0].findings
    assert late.kind is FindingKind.LATE
    assert late.message == (
        "'shipments' came 250ms after 'orders'; its deadline is 100ms (clock broker_ms, within 1ms)"
    )


@pytest.mark.parametrize(("count", "kinds"), [(3, []), (2, [("retries", "p1")])])
def test_dead_letter_attempts_are_judged_without_a_retry_policy(
    count: int, kinds: list[tuple[str, str]]
) -> None:
    """A rule's ``attempts`` is an expectation of its own: judged from the dead letter's
    count (x-death, PEL) when the flow declares no retry policy, never skipped."""
    top = loads(RETRY.replace(", retry: {max_attempts: 3}", ""))
    h = History()
    body = {"id": "p1", "poison": True}
    h.at(0).routed("orders", "p1", body)
    h.routed("billing", "p1", body)
    h.add(
        Kind.DEAD_LETTERED,
        "dlq",
        "p1",
        body,
        reason="rejected",
        origin="billing",
        delivery_count=count,
    )
    v = run(top, h)
    assert found(v) == kinds
    assert unjudged(v) == {}


def test_dead_letter_attempts_without_a_retry_policy_no_tap_saw_are_unjudged() -> None:
    top = loads(RETRY.replace(", retry: {max_attempts: 3}", ""))
    h = History()
    body = {"id": "p1", "poison": True}
    h.at(0).routed("orders", "p1", body)
    h.routed("billing", "p1", body)
    h.add(Kind.DEAD_LETTERED, "dlq", "p1", body, reason="rejected", origin="billing")
    v = run(top, h)
    assert unjudged(v)["dead letter to 'dlq' after 3 attempts at 'billing'"][1] == 1
    assert not v.passed


def test_a_chain_seen_first_mid_way_is_named_where_it_appeared() -> None:
    """A message that appears at the second step and goes on to the third: unexpected at
    the step it appeared at (where a user looks for its publisher), not the last it got to."""
    top = loads(
        """
brokers: {k: {kind: kafka}}
channels:
  a: {broker: k, kind: topic}
  b: {broker: k, kind: topic}
  c: {broker: k, kind: topic}
flows:
  f: {correlate: $.id, steps: [a, b, c], deadline: 1s}
"""
    )
    h = History()
    h.at(5_000).routed("b", "ghost", partition=0, offset=0)
    h.at(5_010).routed("c", "ghost", partition=0, offset=0)
    [finding] = run(top, h).flows[0].findings
    assert (finding.kind, finding.key, finding.step) == (FindingKind.UNEXPECTED, "ghost", "b")
    assert finding.message == "seen at 'b' but never at the first step 'a'"

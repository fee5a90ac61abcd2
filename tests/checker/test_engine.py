"""The checker on hand-written histories: each defect found once, clean ones pass."""

from __future__ import annotations

import pytest
from history import MS, START, History

from flowcheck.checker import Cause, FindingKind, Verdict, check
from flowcheck.errors import TopologyError
from flowcheck.observations import RESENT_HEADER, Kind, Observation
from flowcheck.topology import Topology, loads

TOPOLOGY = """
brokers: {r: {kind: rabbitmq}, k: {kind: kafka}}
channels:
  orders: {broker: r, kind: exchange, type: topic}
  billing:
    broker: r
    kind: queue
    type: quorum
    bindings: [{exchange: orders, key: "#"}]
    delivery_limit: 2
    dead_letter: {exchange: dlx, key: b}
  dlx: {broker: r, kind: exchange, type: direct}
  dlq: {broker: r, kind: queue, bindings: [{exchange: dlx, key: b}]}
  pay: {broker: k, kind: topic}
flows:
  f:
    correlate: $.id
    steps: [orders, {channel: billing, retry: {max_attempts: 3}}, {channel: pay, latency: {p99: 50ms}}]
    deadline: 1s
    dead_letters:
      - {when: {payload: {$.poison: true}}, channel: dlq, reason: delivery_limit, attempts: 3}
"""


@pytest.fixture(scope="module")
def topology() -> Topology:
    return loads(TOPOLOGY)


def healthy(h: History, key: str, at: float, offset: int) -> None:
    h.at(at).routed("orders", key)
    h.routed("billing", key)
    h.add(Kind.DELIVERED, "billing", key, delivery_count=1)
    h.at(at + 20).routed("pay", key, partition=0, offset=offset)


def poison(
    h: History,
    key: str,
    at: float,
    deliveries: int = 3,
    reason: str = "delivery_limit",
    to: str = "dlq",
) -> None:
    body = {"id": key, "poison": True}
    h.at(at).routed("orders", key, body)
    h.routed("billing", key, body)
    for n in range(1, deliveries + 1):
        h.add(
            Kind.DELIVERED if n == 1 else Kind.REDELIVERED, "billing", key, body, delivery_count=n
        )
    if to:
        h.add(
            Kind.DEAD_LETTERED,
            to,
            key,
            body,
            reason=reason,
            origin="billing",
            delivery_count=deliveries - 1,
        )


def run(topology: Topology, h: History, end_ms: float = 60_000) -> Verdict:
    return check(topology, h.sorted(), start_ns=START - 1000 * MS, end_ns=START + int(end_ms * MS))


def kinds(v: Verdict) -> list[tuple[str, str | None]]:
    return [(f.kind.value, f.key) for f in v.flows[0].findings]


def test_clean_history_passes(topology: Topology) -> None:
    h = History()
    for i in range(10):
        healthy(h, f"k{i}", i * 10, i)
    poison(h, "p1", 200)
    v = run(topology, h)
    assert kinds(v) == []
    assert v.passed
    f = v.flows[0]
    assert (f.chains, f.succeeded, f.failed, f.unknown, f.dead_lettered) == (11, 11, 0, 0, 1)
    e2e = f.latency[-1]
    assert e2e.hop == "end-to-end"
    assert e2e.stats.count == 10


def test_loss_is_found_with_where_it_stopped(topology: Topology) -> None:
    h = History()
    healthy(h, "k1", 0, 0)
    h.at(10).routed("orders", "k2")
    h.routed("billing", "k2")
    v = run(topology, h)
    assert kinds(v) == [("lost", "k2")]
    lost = v.flows[0].findings[0]
    assert lost.cause == Cause.TIMED_OUT
    assert lost.next_step == "pay"
    assert "after 'billing'" in lost.message
    assert [s.channel for s in lost.timeline] == ["orders", "billing"]
    assert not v.passed


def test_unroutable_is_the_cause(topology: Topology) -> None:
    h = History()
    h.at(0).add(Kind.UNROUTABLE, "orders", "k1", reason="NO_ROUTE")
    h.routed("orders", "k1")
    v = run(topology, h)
    assert v.flows[0].findings[0].cause == Cause.UNROUTABLE


def test_duplicate_and_at_least_once(topology: Topology) -> None:
    h = History()
    healthy(h, "k1", 0, 0)
    h.at(21).routed("pay", "k1", partition=0, offset=1)
    assert kinds(run(topology, h)) == [("duplicated", "k1")]
    relaxed = loads(TOPOLOGY.replace("deadline: 1s", "deadline: 1s\n    delivery: at-least-once"))
    assert kinds(run(relaxed, h)) == []


def test_same_message_seen_twice_is_not_a_duplicate(topology: Topology) -> None:
    h = History()
    h.at(0).add(Kind.PUBLISHED, "orders", "k1", fc_id="a")
    h.routed("orders", "k1", fc_id="a")
    h.routed("billing", "k1")
    h.add(Kind.PUBLISHED, "pay", "k1", partition=0, offset=7)
    h.routed("pay", "k1", partition=0, offset=7)
    assert kinds(run(topology, h)) == []


def resent_history(order: list[str]) -> History:
    """Message k1 up to pay, where flowcheck wrote it twice: its first send (offset 3)
    lost the broker's answer, its second (offset 5) is marked as sent again. ``order``
    says in which order the tap and the publish show the copies."""
    h = History()
    h.at(0).routed("orders", "k1")
    h.routed("billing", "k1")
    copies = {
        "first": (Kind.ROUTED, 3, {}),
        "again": (Kind.ROUTED, 5, {RESENT_HEADER: "1"}),
        "published": (Kind.PUBLISHED, 5, {RESENT_HEADER: 1}),
    }
    h.at(20)
    for name in order:
        kind, offset, headers = copies[name]
        h.add(kind, "pay", "k1", fc_id="p1", partition=0, offset=offset, headers=headers)
    return h


@pytest.mark.parametrize(
    "order",
    [
        ["first", "again", "published"],
        ["published", "first", "again"],
        ["again", "published", "first"],
    ],
)
def test_copy_sent_again_by_flowcheck_is_not_a_duplicate(
    topology: Topology, order: list[str]
) -> None:
    assert kinds(run(topology, resent_history(order))) == []


@pytest.mark.parametrize(
    "order", [["first", "again", "published"], ["published", "first", "again"]]
)
def test_republished_copy_is_a_duplicate_even_after_a_resend(
    topology: Topology, order: list[str]
) -> None:
    # A consumer that republishes the message copies its x-flowcheck-id, not the marker.
    h = resent_history(order)
    h.add(Kind.ROUTED, "pay", "k1", fc_id="p1", partition=0, offset=9)
    assert kinds(run(topology, h)) == [("duplicated", "k1")]


def test_republished_copy_without_resend_is_a_duplicate(topology: Topology) -> None:
    h = resent_history(["first"])
    h.add(Kind.ROUTED, "pay", "k1", fc_id="p1", partition=0, offset=9)
    assert kinds(run(topology, h)) == [("duplicated", "k1")]


def test_marked_copy_of_another_message_is_another_message(topology: Topology) -> None:
    # The marker joins copies of one x-flowcheck-id only.
    h = resent_history(["first"])
    h.add(Kind.ROUTED, "pay", "k1", fc_id="p2", partition=0, offset=5, headers={RESENT_HEADER: "1"})
    assert kinds(run(topology, h)) == [("duplicated", "k1")]


def test_late_step_and_chain(topology: Topology) -> None:
    h = History()
    h.at(0).routed("orders", "k1")
    h.routed("billing", "k1")
    h.at(1500).routed("pay", "k1", partition=0, offset=0)
    v = run(topology, h)
    assert ("late", "k1") in kinds(v)


def test_poison_checks(topology: Topology) -> None:
    h = History()
    poison(h, "p1", 0, deliveries=5)
    poison(h, "p2", 100, reason="rejected")
    poison(h, "p3", 200, to="")
    poison(h, "p4", 300, deliveries=2)
    found = kinds(run(topology, h))
    assert ("retries", "p1") in found
    assert ("dead_letter", "p2") in found
    assert ("dead_letter", "p3") in found
    assert ("retries", "p4") in found


def test_healthy_message_must_not_be_dead_lettered(topology: Topology) -> None:
    h = History()
    h.at(0).routed("orders", "k1")
    h.routed("billing", "k1")
    h.add(Kind.DEAD_LETTERED, "dlq", "k1", reason="rejected", origin="billing")
    v = run(topology, h)
    assert kinds(v) == [("dead_letter", "k1")]
    assert v.flows[0].findings[0].cause == Cause.DEAD_LETTERED


def test_gap_and_end_make_chains_unknown_not_lost(topology: Topology) -> None:
    h = History()
    h.at(0).routed("orders", "k1")
    gap = Observation(
        kind=Kind.GAP,
        broker="b",
        channel="pay",
        mono_ns=START + 5 * MS,
        wall=0,
        until_ns=START + 900 * MS,
        reason="down",
    )
    h.items.append(gap)
    h.at(59_990).routed("orders", "k2")  # still within its deadline when the recording ends
    v = run(topology, h, end_ms=60_000)
    f = v.flows[0]
    assert kinds(v) == []
    assert (f.unknown, f.failed) == (2, 0)


def test_latency_budget(topology: Topology) -> None:
    h = History()
    for i in range(5):
        h.at(i * 10).routed("orders", f"k{i}")
        h.routed("billing", f"k{i}")
        h.at(i * 10 + 80).routed("pay", f"k{i}", partition=0, offset=i)
    v = run(topology, h)
    assert ("latency", None) in kinds(v)
    hop = next(lat for lat in v.flows[0].latency if lat.hop == "billing -> pay")
    assert not hop.passed
    assert hop.stats.p99_ms is not None
    assert hop.stats.p99_ms > 50
    # A RabbitMQ tap may see a message up to its read interval late, a Kafka tap up to its
    # fetch wait.
    late = {lat.hop: (lat.tap_late_ms, lat.tap_late_why) for lat in v.flows[0].latency}
    assert late == {
        "orders -> billing": (10.0, "broker 'r': tap_read_interval"),
        "billing -> pay": (100.0, "broker 'k': tap_fetch_wait"),
        "end-to-end": (100.0, "broker 'k': tap_fetch_wait"),
    }
    (finding,) = [f for f in v.flows[0].findings if f.kind is FindingKind.LATENCY]
    assert finding.message.endswith(
        "(5 samples, clock mono_ns; a tap may see a step up to 100ms late, "
        "broker 'k': tap_fetch_wait)"
    )


def test_latency_tells_how_late_the_taps_may_be() -> None:
    text = TOPOLOGY.replace("k: {kind: kafka}", "k: {kind: kafka, tap_fetch_wait: 5ms}")
    text = text.replace("r: {kind: rabbitmq}", "r: {kind: rabbitmq, tap_read_interval: 2ms}")
    text = text.replace("brokers: {", "brokers: {s: {kind: redis, tap_read_interval: 20ms}, ")
    text = text.replace(
        "  pay: {broker: k, kind: topic}",
        "  pay: {broker: k, kind: topic}\n  out: {broker: s, kind: stream}",
    )
    text = text.replace("latency: {p99: 50ms}}]", "latency: {p99: 50ms}}, out]")
    topology = loads(text)
    h = History()
    h.at(0).routed("orders", "k0")
    h.routed("billing", "k0")
    h.at(20).routed("pay", "k0", partition=0, offset=0)
    h.at(30).routed("out", "k0")
    v = run(topology, h)
    late = {lat.hop: (lat.tap_late_ms, lat.tap_late_why) for lat in v.flows[0].latency}
    assert late == {
        "orders -> billing": (2.0, "broker 'r': tap_read_interval"),
        "billing -> pay": (5.0, "broker 'k': tap_fetch_wait"),
        "pay -> out": (20.0, "broker 's': tap_read_interval"),  # the larger of the two ends
        "end-to-end": (20.0, "broker 's': tap_read_interval"),
    }


def test_success_rate_tolerates_what_it_declares() -> None:
    top = loads(TOPOLOGY.replace("deadline: 1s", "deadline: 1s\n    success_rate: 90%"))
    h = History()
    for i in range(10):
        healthy(h, f"k{i}", i * 10, i)
    h.at(500).routed("orders", "lost")
    h.routed("billing", "lost")
    v = run(top, h)
    assert ("lost", "lost") in kinds(v)
    assert v.flows[0].checks[0].passed  # 10 of 11 is above 90%
    assert v.passed


def test_never_published_needs_an_expectation(topology: Topology) -> None:
    h = History()
    healthy(h, "k1", 0, 0)
    v = check(
        topology, h.sorted(), start_ns=0, end_ns=START + 60_000 * MS, expected={"f": ["k1", "k9"]}
    )
    assert [(f.kind, f.key, f.cause) for f in v.flows[0].findings] == [
        (FindingKind.LOST, "k9", Cause.NEVER_PUBLISHED)
    ]


def test_silent_loss_configuration_is_flagged() -> None:
    top = loads(
        TOPOLOGY.replace(
            "    delivery_limit: 2\n    dead_letter: {exchange: dlx, key: b}\n",
            "    delivery_limit: 2\n",
        ).replace(
            "    dead_letters:\n      - {when: {payload: {$.poison: true}}, channel: dlq, reason: delivery_limit, attempts: 3}\n",
            "",
        )
    )
    v = check(top, [])
    assert [f.kind for f in v.flows[0].findings] == [FindingKind.CONFIG]
    assert not v.passed


def test_reorder_per_partition_key() -> None:
    top = loads(TOPOLOGY.replace("deadline: 1s", "deadline: 1s\n    ordering: per-partition-key"))
    h = History()
    h.at(0).routed("orders", "a")
    h.routed("billing", "a")
    h.at(1).routed("orders", "b")
    h.routed("billing", "b")
    h.at(20).routed("pay", "b", partition=0, offset=0, kafka_key="cust")
    h.at(21).routed("pay", "a", partition=0, offset=1, kafka_key="cust")
    assert ("reordered", "b") in kinds(run(top, h)) or ("reordered", "a") in kinds(run(top, h))


def test_schema_violation_names_the_path() -> None:
    top = loads(
        TOPOLOGY.replace(
            "  pay: {broker: k, kind: topic}",
            "  pay: {broker: k, kind: topic, schema: {json: {type: object, required: [amount]}}}",
        )
    )
    h = History()
    healthy(h, "k1", 0, 0)
    v = run(top, h)
    schema = [f for f in v.flows[0].findings if f.kind == FindingKind.SCHEMA]
    assert len(schema) == 1
    assert "'amount' is a required property" in schema[0].message


DEFAULT_EXCHANGE = """
brokers: {r: {kind: rabbitmq}}
channels:
  charge: {broker: r, kind: queue, dead_letter: {queue: charge.dead}}
  charge.dead: {broker: r, kind: queue}
  ship: {broker: r, kind: queue}
  orders: {broker: r, kind: queue, dead_letter: {queue: parking, published_by: worker}}
  parking: {broker: r, kind: queue}
services:
  worker: {consumes: [orders], publishes: [parking, ship]}
flows:
  f:
    correlate: $.id
    deadline: 1s
    steps: [{channel: charge, retry: {max_attempts: 3}}, ship]
    dead_letters: [{when: {payload: {$.poison: true}}, channel: charge.dead, step: charge}]
  g:
    correlate: $.id
    deadline: 1s
    steps: [orders, ship]
    dead_letters: [{when: {payload: {$.poison: true}}, channel: parking}]
"""


def test_a_dead_letter_through_the_default_exchange_is_unjudged_without_evidence() -> None:
    top = loads(DEFAULT_EXCHANGE)
    body = {"id": "p1", "poison": True}
    h = History()
    h.at(0).routed("charge", "p1", body)
    for n in (1, 2, 3):
        h.add(
            Kind.DELIVERED if n == 1 else Kind.REDELIVERED, "charge", "p1", body, delivery_count=n
        )
    v = run(top, h)
    assert kinds(v) == []  # never lost, never "not dead-lettered"
    (u,) = v.flows[0].unjudged
    assert "charge.dead" in u.expectation
    assert "unless something consumes the dead-letter queue with the firehose on" in u.why
    assert not v.passed
    # Its delivery from the dead-letter queue (x-death, through the firehose) is the evidence.
    h.at(500).add(Kind.DEAD_LETTERED, "charge.dead", "p1", body, reason="rejected", origin="charge")
    v = run(top, h)
    assert (kinds(v), v.flows[0].unjudged, v.flows[0].dead_lettered) == ([], [], 1)


def test_a_dead_letter_the_service_publishes_is_its_arrival_in_the_parking_queue() -> None:
    top = loads(DEFAULT_EXCHANGE)
    h = History("g")
    body = {"id": "p1", "poison": True}
    h.at(0).routed("orders", "p1", body)
    h.routed("parking", "p1", body)
    h.at(10).routed("orders", "k1")
    h.routed("ship", "k1")
    h.at(20).routed("orders", "p2", {"id": "p2", "poison": True})
    h.routed("ship", "p2", {"id": "p2", "poison": True})  # moved on instead
    v = check(top, h.sorted(), start_ns=START - 1000 * MS, end_ns=START + 60_000 * MS)
    g = next(f for f in v.flows if f.flow == "g")
    assert [(f.kind.value, f.key) for f in g.findings] == [("dead_letter", "p2")]
    assert g.dead_lettered == 1


def test_deliveries_from_a_step_no_message_was_seen_reaching_are_unrouted() -> None:
    top = loads(DEFAULT_EXCHANGE)
    h = History()
    for i in range(3):  # delivered from charge, but never seen reaching it
        h.at(i * 10).add(Kind.DELIVERED, "charge", f"k{i}", delivery_count=1)
    v = run(top, h)
    f = next(f for f in v.flows if f.flow == "f")
    assert [(x.kind.value, x.step) for x in f.findings] == [("unrouted", "charge")]
    assert "3 chain(s) delivered from 'charge'" in f.findings[0].message
    assert not f.passed
    # A recording that starts mid-flight: a delivery of an earlier message is no finding
    # once the step is seen reached at all.
    h.at(100).routed("charge", "k9")
    h.add(Kind.DELIVERED, "charge", "k9", delivery_count=1)
    h.at(120).routed("ship", "k9")
    f = next(f for f in run(top, h).flows if f.flow == "f")
    assert f.findings == []


def test_a_parking_queue_the_consuming_service_publishes_is_a_dead_letter_channel() -> None:
    top = loads(
        DEFAULT_EXCHANGE.replace(
            "dead_letter: {queue: parking, published_by: worker}", "name: orders"
        )
    )
    h = History("g")
    body = {"id": "p1", "poison": True}
    h.at(0).routed("orders", "p1", body)
    h.routed("parking", "p1", body)
    g = next(f for f in run(top, h).flows if f.flow == "g")
    assert (g.findings, g.dead_lettered) == ([], 1)
    # A service that does not publish it parks nothing there.
    with pytest.raises(TopologyError, match="no dead-letter route leads from 'orders', 'ship'"):
        loads(
            DEFAULT_EXCHANGE.replace("publishes: [parking, ship]", "publishes: [ship]").replace(
                "dead_letter: {queue: parking, published_by: worker}", "name: orders"
            )
        )

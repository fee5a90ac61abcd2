"""Messages per route: what each flow's chains brought to its steps, retry channels and
dead-letter channels, counted exactly from what the chains kept."""

from __future__ import annotations

from history import MS, START, History

from flowcheck.checker import RouteCount, Verdict, check
from flowcheck.observations import Kind
from flowcheck.topology import Topology, loads

KAFKA = """
brokers: {k: {kind: kafka}, s: {kind: redis}}
channels:
  payments: {broker: k, kind: topic, retry: [payments-retry], dead_letter: payments-dlt}
  payments-retry: {broker: k, kind: topic}
  payments-dlt: {broker: k, kind: topic}
  shipments: {broker: s, kind: stream, groups: [shipping]}
flows:
  f:
    correlate: $.id
    steps: [{channel: payments, retry: {max_attempts: 3}}, shipments]
    deadline: 1s
    dead_letters:
      - {when: {payload: {$.declined: true}}, step: payments, channel: payments-dlt, attempts: 3}
"""

RABBIT = """
brokers: {r: {kind: rabbitmq}}
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
flows:
  f:
    correlate: $.id
    steps: [orders, billing]
    deadline: 1s
"""


def run(top: Topology, h: History, end_ms: float) -> Verdict:
    return check(top, h.sorted(), start_ns=START - 1000 * MS, end_ns=START + int(end_ms * MS))


def routes(v: Verdict) -> list[tuple[str, str, str | None, int, int]]:
    got = v.flows[0].routes
    assert got is not None
    return [(r.channel, r.role, r.step, r.messages, r.redelivered) for r in got]


def test_retries_redeliveries_and_dead_letters_are_counted_per_route() -> None:
    top = loads(KAFKA)
    h = History()
    # k1: straight through, delivered once from the stream
    h.at(0).routed("payments", "k1", partition=0, offset=0)
    h.at(10).routed("shipments", "k1", entry_id="1-0")
    h.add(Kind.DELIVERED, "shipments", "k1", entry_id="1-0", delivery_count=1, group="shipping")
    # k2: one retry through the retry topic; the stream's pending list, polled, shows
    # its entry delivered 3 times at once: 2 redeliveries
    h.at(20).routed("payments", "k2", partition=0, offset=1)
    h.at(25).routed("payments-retry", "k2", partition=0, offset=0)
    h.at(30).routed("shipments", "k2", entry_id="2-0")
    h.add(Kind.DELIVERED, "shipments", "k2", entry_id="2-0", delivery_count=1, group="shipping")
    h.add(Kind.REDELIVERED, "shipments", "k2", entry_id="2-0", delivery_count=3, group="shipping")
    # k3: declined, retried twice, dead-lettered; the tap reads its dead letter twice
    declined = {"id": "k3", "declined": True}
    h.at(40).routed("payments", "k3", declined, partition=0, offset=2)
    h.at(45).routed("payments-retry", "k3", declined, partition=0, offset=1)
    h.at(50).routed("payments-retry", "k3", declined, partition=0, offset=2)
    for _ in range(2):
        h.at(55).add(
            Kind.DEAD_LETTERED,
            "payments-dlt",
            "k3",
            declined,
            partition=0,
            offset=0,
            origin="payments-retry",  # died on its retry topic: of step payments
            delivery_count=3,
        )
    # k4: its record read twice by the tap: one message
    for _ in range(2):
        h.at(60).routed("payments", "k4", partition=0, offset=3)
    h.at(70).routed("shipments", "k4", entry_id="3-0")
    # k5: the recording ends before its deadline: unknown, and counted all the same
    h.at(5_000).routed("payments", "k5", partition=0, offset=4)
    v = run(top, h, end_ms=5_100)
    flow = v.flows[0]
    assert (flow.chains, flow.unknown, flow.dead_lettered) == (5, 1, 1)
    assert routes(v) == [
        ("payments", "step", "payments", 5, 0),
        ("shipments", "step", "shipments", 3, 2),
        ("payments-retry", "retry", "payments", 3, 0),
        ("payments-dlt", "dead_letter", "payments", 1, 0),
    ]


def test_a_queue_counts_each_redelivery_and_its_dead_letters_where_they_were_seen() -> None:
    top = loads(RABBIT)
    h = History()
    h.at(0).routed("orders", "ok")
    h.routed("billing", "ok")
    h.add(Kind.DELIVERED, "billing", "ok", delivery_count=1)
    h.at(10).routed("orders", "bad")
    h.routed("billing", "bad")
    h.add(Kind.DELIVERED, "billing", "bad", delivery_count=1)
    h.add(Kind.REDELIVERED, "billing", "bad", delivery_count=2)
    h.add(Kind.REDELIVERED, "billing", "bad", delivery_count=3)  # no position: one each
    h.add(Kind.DEAD_LETTERED, "dlq", "bad", reason="delivery_limit", origin="billing")
    v = run(top, h, end_ms=60_000)
    # Every route of the flow is listed, a route nothing took at 0.
    assert routes(v) == [
        ("orders", "step", "orders", 2, 0),
        ("billing", "step", "billing", 2, 2),
        ("dlx", "dead_letter", "billing", 0, 0),
        ("dlq", "dead_letter", "billing", 1, 0),
    ]
    assert sum(r.messages for r in v.flows[0].routes or [] if r.role == "dead_letter") == 1


def test_an_older_verdict_has_no_routes() -> None:
    v = run(loads(RABBIT), History(), end_ms=10)
    old = v.flows[0].model_dump(exclude={"routes"})
    assert type(v.flows[0]).model_validate(old).routes is None
    assert RouteCount(channel="c", role="step", messages=1).redelivered == 0

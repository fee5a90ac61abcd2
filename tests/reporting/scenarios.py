"""Verdicts for reporter tests, made by the real checker from hand-written histories.

Run it to print the example of docs/verdict.md: ``.venv/bin/python tests/reporting/scenarios.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

# The history helpers live with the checker tests, which are not a package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "checker"))

from history import MS, START, History

from flowcheck.checker import Recording, Unjudged, Verdict, check
from flowcheck.observations import Kind, Observation
from flowcheck.topology import Topology, loads

TOPOLOGY = """
name: shop
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
  audit.in: {broker: k, kind: topic}
  audit.log: {broker: k, kind: topic}
  stray: {broker: k, kind: topic, schema: {json: {type: object, required: [amount]}}}
flows:
  checkout:
    correlate: $.id
    steps: [orders, {channel: billing, retry: {max_attempts: 3}}, {channel: pay, latency: {p99: 50ms}}]
    deadline: 1s
    dead_letters:
      - {when: {payload: {$.poison: true}}, channel: dlq, reason: delivery_limit, attempts: 3}
  audit:
    correlate: $.id
    steps: [audit.in, {channel: audit.log, latency: {p99: 100ms}}]
    deadline: 1s
"""

# The example in docs/verdict.md: a flow of three steps, one order lost on the way.
DOC_TOPOLOGY = """\
# topology
name: shop
brokers:
  rabbit: {kind: rabbitmq}
  kafka: {kind: kafka}
channels:
  orders: {broker: rabbit, kind: exchange, type: topic}
  billing:
    broker: rabbit
    kind: queue
    bindings: [{exchange: orders, key: "#"}]
  payments: {broker: kafka, kind: topic}
flows:
  checkout:
    correlate: $.id
    steps: [orders, billing, {channel: payments, latency: {p99: 50ms}}]
    deadline: 1s
"""


def topology() -> Topology:
    return loads(TOPOLOGY)


def run(
    top: Topology,
    observations: list[Observation],
    end_ms: float = 60_000,
    expected: dict[str, list[str]] | None = None,
) -> Verdict:
    items = sorted(observations, key=lambda o: o.mono_ns)
    return check(
        top,
        items,
        start_ns=START - 1000 * MS,
        end_ns=START + int(end_ms * MS),
        expected=expected,
    )


def healthy(h: History, key: str, at: float, offset: int, pay_after: float = 20) -> None:
    h.at(at).routed("orders", key)
    h.routed("billing", key)
    h.add(Kind.DELIVERED, "billing", key, delivery_count=1)  # the firehose shows it
    h.at(at + pay_after).routed("pay", key, partition=0, offset=offset)


def poison(h: History, key: str, at: float, deliveries: int) -> None:
    body = {"id": key, "poison": True}
    h.at(at).routed("orders", key, body)
    h.routed("billing", key, body)
    for n in range(1, deliveries + 1):
        kind = Kind.DELIVERED if n == 1 else Kind.REDELIVERED
        h.add(kind, "billing", key, body, delivery_count=n)
    h.add(
        Kind.DEAD_LETTERED,
        "dlq",
        key,
        body,
        reason="delivery_limit",
        origin="billing",
        delivery_count=deliveries - 1,
    )


def audit(n: int) -> History:
    a = History("audit")
    for i in range(n):
        a.at(i * 10).routed("audit.in", f"a{i}", partition=0, offset=i)
        a.at(i * 10 + 5).routed("audit.log", f"a{i}", partition=0, offset=i)
    return a


@cache
def failing() -> Verdict:
    """checkout fails in several ways at once; audit passes; a tap gap; a stray bad payload."""
    h = History("checkout")
    for i in range(5):
        healthy(h, f"k{i}", i * 10, i, pay_after=80)  # over the 50ms p99 budget
    h.at(100).routed("orders", "k-lost")
    h.routed("billing", "k-lost")
    h.at(200).add(Kind.UNROUTABLE, "orders", "k-unroutable", reason="NO_ROUTE")
    h.routed("orders", "k-unroutable")
    poison(h, "p-retried", 300, deliveries=5)  # the policy allows 3 attempts
    h.at(400).routed("orders", "k-dead")
    h.routed("billing", "k-dead")
    h.add(Kind.DEAD_LETTERED, "dlq", "k-dead", reason="rejected", origin="billing")
    stray = History("none")
    stray.at(50).routed("stray", "s1", {"id": "s1"}, partition=0, offset=0)
    gap = Observation(
        kind=Kind.GAP,
        broker="k",
        channel="audit.log",
        mono_ns=START + 30_000 * MS,
        wall=0,
        until_ns=START + 31_000 * MS,
        reason="consumer rebalance",
    )
    return run(topology(), [*h.items, *audit(3).items, *stray.items, gap])


@cache
def passing() -> Verdict:
    h = History("checkout")
    for i in range(4):
        healthy(h, f"k{i}", i * 10, i)
    poison(h, "p1", 100, deliveries=3)
    return run(topology(), [*h.items, *audit(3).items])


def lost(keys: Iterable[str]) -> Verdict:
    """One chain per key, each lost after billing."""
    h = History("checkout")
    for i, key in enumerate(keys):
        h.at(i * 10).routed("orders", key)
        h.routed("billing", key)
    return run(topology(), h.items)


def never_published() -> Verdict:
    """k9 was expected and never seen at all: a lost chain with nothing to draw."""
    h = History("checkout")
    healthy(h, "k1", 0, 0)
    return run(topology(), h.items, expected={"checkout": ["k1", "k9"]})


def same_instant() -> Verdict:
    """Chains whose first two steps were seen at the same instant: non-positive samples."""
    h = History("checkout")
    for i in range(3):
        h.at(i * 10).routed("orders", f"k{i}")
        h.at(i * 10).routed("billing", f"k{i}")
        h.at(i * 10 + 5).routed("pay", f"k{i}", partition=0, offset=i)
    return run(topology(), h.items)


RETRIES = Unjudged(
    flow="checkout",
    expectation="retry max_attempts 3 at 'billing'",
    why="deliveries on RabbitMQ are seen only with the firehose on (rabbitmqctl trace_on)",
    chains=4,
)
AUDIT_ORDER = Unjudged(
    flow="audit",
    expectation="ordering per-key",
    why="no two chains of one key were decided",
)
NO_END = Unjudged(
    expectation="the recording's end",
    why="the trace has no end record: chains open at the last observation are undecided",
)


def unjudged(*, allowed: bool) -> Verdict:
    """The passing verdict with expectations that could not be judged: one per flow and one
    of the recording as a whole, which has no end record. Not allowed, they fail the flows
    and the verdict, as the checker does; allowed, everything passes."""
    base = passing()
    flows = [
        flow.model_copy(
            update={"unjudged": [u], "passed": flow.passed and allowed},
        )
        for flow, u in zip(base.flows, (RETRIES, AUDIT_ORDER), strict=True)
    ]
    return base.model_copy(
        update={
            "flows": flows,
            "unjudged": [NO_END],
            "allow_unjudged": allowed,
            "passed": base.passed and allowed,
            "recording": Recording(ended="unknown", end_ms=None),
        }
    )


def recorded(ended: str = "stopped", end_ms: float | None = 61234.5) -> Verdict:
    """The passing verdict of a recording that ended as said."""
    return passing().model_copy(update={"recording": Recording(ended=ended, end_ms=end_ms)})


def doc_example() -> Verdict:
    h = History("checkout")
    h.at(0).routed("orders", "o-1")
    h.routed("billing", "o-1")
    h.at(20).routed("payments", "o-1", partition=0, offset=41)
    h.at(10).routed("orders", "o-2")
    h.routed("billing", "o-2")
    return run(loads(DOC_TOPOLOGY), h.items)


SHOP = Path(__file__).resolve().parents[2] / "topologies" / "shop.yaml"


@cache
def shop() -> tuple[Topology, Verdict]:
    """topologies/shop.yaml and a verdict of it: five orders shipped, one lost after
    billing, one poison order dead-lettered from billing as the flow expects."""
    from flowcheck.topology import load

    top = load(str(SHOP))
    h = History("order-to-shipment")
    for i in range(5):
        key = f"o{i}"
        body = {"order_id": key, "amount": 1, "address": "here"}
        h.at(i * 10).routed("shop.orders", key, body, routing_key="order.placed")
        h.routed("billing.orders", key, body)
        h.at(i * 10 + 30).routed("payments", key, body, partition=0, offset=i)
        h.at(i * 10 + 60).routed("shipments", key, body)
    lost = {"order_id": "o-lost", "amount": 1, "address": "here"}
    h.at(100).routed("shop.orders", "o-lost", lost, routing_key="order.placed")
    h.routed("billing.orders", "o-lost", lost)
    bad = {"order_id": "o-poison", "amount": 1, "address": "here", "poison": True}
    h.at(200).routed("shop.orders", "o-poison", bad, routing_key="order.placed")
    h.routed("billing.orders", "o-poison", bad)
    h.add(
        Kind.DEAD_LETTERED,
        "billing.orders.dlq",
        "o-poison",
        bad,
        reason="delivery_limit",
        origin="billing.orders",
    )
    return top, run(top, h.items)


@cache
def many(chains: int = 10_000, broken: int = 100) -> Verdict:
    """``chains`` chains of checkout, the first ``broken`` of them lost after billing (the
    rest complete), as the checker judges them: the scale the HTML report is held to."""
    h = History("checkout")
    for i in range(chains):
        key = f"order-{i:05d}"
        if i < broken:
            h.at(i).routed("orders", key)
            h.routed("billing", key)
        else:
            healthy(h, key, i, i)
    return run(topology(), h.items, end_ms=chains + 60_000)


if __name__ == "__main__":
    from flowcheck.reporting.json import dumps

    print(dumps(doc_example()), end="")

"""Duplicates are one message arriving more often than its guarantee allows, not two
messages under one correlation key: each distinct message at the first step is one more
round through the flow (two revisions of one order, say)."""

from __future__ import annotations

from typing import Any

from history import MS, START, History

from flowcheck.checker import Verdict, check
from flowcheck.observations import ID_HEADER, RESENT_HEADER, Kind
from flowcheck.topology import loads

SHOP = loads("""
brokers: {r: {kind: rabbitmq}, k: {kind: kafka}, s: {kind: redis}}
channels:
  orders: {broker: r, kind: exchange, type: topic}
  payments: {broker: k, kind: topic}
  shipments: {broker: s, kind: stream}
flows:
  f:
    correlate: $.id
    steps: [orders, payments, shipments]
    deadline: 1s
    ordering: per-key
    delivery: exactly-once
""")


def run(h: History) -> Verdict:
    return check(SHOP, h.items, start_ns=START - 1000 * MS, end_ns=START + 60_000 * MS)


def found(v: Verdict) -> list[tuple[str, str | None, str | None]]:
    return [(f.kind.value, f.key, f.step) for fv in v.flows for f in fv.findings]


def rev(n: int, **more: Any) -> dict[str, Any]:
    return {"id": "o1", "revision": n, **more}


def amended(h: History, *, fc: bool = False) -> None:
    """Order o1 placed twice, revision 1 then 2, each paid and shipped once."""
    for n in (1, 2):
        fields: dict[str, Any] = {}
        if fc:
            fields = {"fc_id": f"fc-{n}", "headers": {ID_HEADER: f"fc-{n}"}}
            h.at(n * 10 - 1).add(Kind.PUBLISHED, "orders", "o1", rev(n), **fields)
        h.at(n * 10).routed("orders", "o1", rev(n), **fields)
    for n in (1, 2):
        h.at(100 + n).routed("payments", "o1", rev(n), partition=0, offset=n)
    for n in (1, 2):
        ms = 1_000_000 + 200 + n
        h.at(200 + n).routed("shipments", "o1", rev(n), entry_id=f"{ms}-0", broker_ms=ms)


def test_two_revisions_under_one_key_are_two_messages_at_every_step() -> None:
    for fc in (False, True):  # placed by the system, or published by flowcheck
        h = History()
        amended(h, fc=fc)
        v = run(h)
        assert found(v) == [], fc
        assert v.passed
        assert (v.flows[0].chains, v.flows[0].succeeded) == (1, 1)


def test_flowcheck_publishing_the_same_body_twice_sent_one_message_twice() -> None:
    """An idempotency test: the same order published twice (flowcheck gives each publish
    its own id, and on RabbitMQ a message id from it). Under exactly-once the system must
    take it once: a second payment is a duplicate, as is the second copy itself."""
    h = History()
    for n in (1, 2):
        fields = {"fc_id": f"fc-{n}", "headers": {ID_HEADER: f"fc-{n}"}, "message_id": f"fc-{n}"}
        h.at(n * 10).routed("orders", "o1", rev(1), **fields)
        h.at(100 + n).routed("payments", "o1", rev(1), partition=0, offset=n)
    h.at(200).routed("shipments", "o1", rev(1), entry_id="1000200-0", broker_ms=1000200)
    assert found(run(h)) == [("duplicated", "o1", "orders"), ("duplicated", "o1", "payments")]


def test_one_revision_duplicated_downstream_is_a_duplicate_there() -> None:
    h = History()
    amended(h)
    h.at(150).routed("payments", "o1", rev(2), partition=0, offset=3)  # revision 2 again
    v = run(h)
    assert found(v) == [("duplicated", "o1", "payments")]
    [dup] = v.flows[0].findings
    assert (
        dup.message
        == "3 messages at 'payments', expected 2 (exactly-once, for 2 messages at 'orders')"
    )


def test_a_second_revision_that_never_ships_is_lost() -> None:
    h = History()
    amended(h)
    h.items = [
        o
        for o in h.items
        if not (o.channel == "shipments" and '"revision": 2' in (o.payload or ""))
    ]
    assert found(run(h)) == [("lost", "o1", "shipments")]


def test_a_redelivered_message_is_not_a_duplicate() -> None:
    """One message seen again with its broker identity: a tap reading a record again after
    a reconnect, a stream entry the group was handed twice."""
    h = History()
    h.at(0).routed("orders", "o1", rev(1))
    h.at(10).routed("payments", "o1", rev(1), partition=0, offset=7)
    h.at(20).routed("payments", "o1", rev(1), partition=0, offset=7)
    h.at(30).routed("shipments", "o1", rev(1), entry_id="1000030-0", broker_ms=1000030)
    h.at(40).add(
        Kind.DELIVERED, "shipments", "o1", rev(1), entry_id="1000030-0", group="g", delivery_count=1
    )
    h.at(50).routed("shipments", "o1", rev(1), entry_id="1000030-0", broker_ms=1000030)
    h.at(60).add(
        Kind.REDELIVERED,
        "shipments",
        "o1",
        rev(1),
        entry_id="1000030-0",
        group="g",
        delivery_count=2,
    )
    v = run(h)
    assert found(v) == []
    assert v.passed


def test_the_same_body_published_twice_is_a_duplicate_at_the_first_step() -> None:
    """A publisher sending one order again: a second copy at the first step (a RabbitMQ
    exchange shows no broker identity), and downstream, one more than came in."""
    h = History()
    h.at(0).routed("orders", "o1", rev(1), message_id="m1")
    h.at(5).routed("orders", "o1", rev(1), message_id="m1")
    h.at(10).routed("payments", "o1", rev(1), partition=0, offset=1)
    h.at(15).routed("payments", "o1", rev(1), partition=0, offset=2)
    for n in (1, 2):
        h.at(20 + n).routed(
            "shipments", "o1", rev(1), entry_id=f"100002{n}-0", broker_ms=1000020 + n
        )
    v = run(h)
    assert found(v) == [
        ("duplicated", "o1", "orders"),
        ("duplicated", "o1", "payments"),
        ("duplicated", "o1", "shipments"),
    ]
    assert v.flows[0].findings[0].message == "2 messages at 'orders', expected 1 (exactly-once)"


def test_a_copy_without_flowcheck_id_of_what_flowcheck_published_is_a_duplicate() -> None:
    h = History()
    h.at(0).routed("orders", "o1", rev(1), fc_id="fc-1", headers={ID_HEADER: "fc-1"})
    h.at(5).routed("orders", "o1", rev(1))  # the same body, re-sent without the header
    assert ("duplicated", "o1", "orders") in found(run(h))


def test_the_same_body_under_other_message_ids_is_two_messages() -> None:
    h = History()
    for n in (1, 2):
        h.at(n).routed("orders", "o1", rev(1), message_id=f"m{n}")
        h.at(10 + n).routed("payments", "o1", rev(1), partition=0, offset=n)
        ms = 1_000_020 + n
        h.at(20 + n).routed("shipments", "o1", rev(1), entry_id=f"{ms}-0", broker_ms=ms)
    assert found(run(h)) == []


def test_flowcheck_sending_a_message_again_is_one_message() -> None:
    """Flowcheck lost the broker's answer and sent again (RESENT_HEADER): both copies were
    written to the topic, at two offsets; they are one message, not two rounds."""
    top = loads("""
brokers: {k: {kind: kafka}, s: {kind: redis}}
channels:
  orders: {broker: k, kind: topic}
  shipments: {broker: s, kind: stream}
flows:
  f:
    correlate: $.id
    steps: [orders, shipments]
    deadline: 1s
    delivery: exactly-once
""")
    fc = {"fc_id": "fc-1"}
    h = History()
    h.at(0).routed("orders", "o1", rev(1), partition=0, offset=1, headers={ID_HEADER: "fc-1"}, **fc)
    again = {ID_HEADER: "fc-1", RESENT_HEADER: "1"}
    h.at(5).routed("orders", "o1", rev(1), partition=0, offset=2, headers=again, **fc)
    h.at(10).routed("shipments", "o1", rev(1), entry_id="1000010-0", broker_ms=1000010)
    v = check(top, h.items, start_ns=START - 1000 * MS, end_ns=START + 60_000 * MS)
    assert found(v) == []
    # Both copies consumed and shipped: one shipment too many.
    h.at(15).routed("shipments", "o1", rev(1), entry_id="1000015-0", broker_ms=1000015)
    v = check(top, h.items, start_ns=START - 1000 * MS, end_ns=START + 60_000 * MS)
    assert found(v) == [("duplicated", "o1", "shipments")]

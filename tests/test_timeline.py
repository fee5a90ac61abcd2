"""Per-chain timelines for `flowcheck inspect`: pure, from hand-made observations."""

from __future__ import annotations

from flowcheck.observations import Kind, Observation
from flowcheck.timeline import Timeline


def seen(
    kind: Kind,
    channel: str,
    count: int | None,
    entry_id: str | None = None,
    fc_id: str | None = None,
) -> Observation:
    return Observation(
        kind=kind,
        broker="b",
        channel=channel,
        mono_ns=0,
        wall=0.0,
        delivery_count=count,
        entry_id=entry_id,
        fc_id=fc_id,
    )


def test_retries_follow_the_brokers_count_not_the_observations() -> None:
    t = Timeline("f", "k1")
    # The pending-list poll saw deliveries 1 and 3 of one entry: 2 retries, not 1.
    t.items += [
        seen(Kind.DELIVERED, "shipments", 1, entry_id="1-0"),
        seen(Kind.REDELIVERED, "shipments", 3, entry_id="1-0"),
    ]
    assert t.retries == 2
    # Another entry on the same stream, delivered once: no retry of its own.
    t.items.append(seen(Kind.DELIVERED, "shipments", 1, entry_id="2-0"))
    assert t.retries == 2
    # A redelivery with no count (a RabbitMQ classic queue's redelivered flag) counts once.
    t.items.append(seen(Kind.REDELIVERED, "billing", None, fc_id="m1"))
    assert t.retries == 3
    # Published and routed copies are not deliveries.
    t.items.append(seen(Kind.ROUTED, "billing", 4, fc_id="m1"))
    assert t.retries == 3
    assert t.as_dict(0)["retries"] == 3

"""The one drawing of a chain's timeline, from observations or from a verdict's references."""

from __future__ import annotations

from typing import Any

from flowcheck.checker.verdict import Seen
from flowcheck.observations import Kind, Observation
from flowcheck.reporting import timeline


def observed(at_ms: float, kind: Kind, channel: str, **kw: Any) -> Observation:
    return Observation(
        kind=kind, broker="b", channel=channel, mono_ns=int(at_ms * 1e6) + 5_000_000, wall=0, **kw
    )


def test_observations_and_their_references_draw_alike() -> None:
    items = [
        observed(1.0, Kind.ROUTED, "orders", routing_key="order.placed"),
        observed(2.5, Kind.REDELIVERED, "billing", delivery_count=2, group="g"),
        observed(
            4.0, Kind.DEAD_LETTERED, "dlq", partition=0, offset=7, reason="r", origin="billing"
        ),
    ]
    seen = [
        Seen(
            kind=o.kind.value,
            channel=o.channel,
            at_ms=(o.mono_ns - 5_000_000) / 1e6,
            routing_key=o.routing_key,
            delivery_count=o.delivery_count,
            group=o.group,
            partition=o.partition,
            offset=o.offset,
            reason=o.reason,
            origin=o.origin,
        )
        for o in items
    ]
    missing = [("expected", "ship", "never came")]
    drawn = timeline.text(
        timeline.rows(items, start_ns=5_000_000, evidence=items[1:2], missing=missing)
    )
    assert drawn == timeline.text(timeline.rows(seen, evidence=seen[1:2], missing=missing))
    assert [" ".join(line.split()) for line in drawn] == [
        "at ms +ms kind channel where detail",
        "1.0 routed orders order.placed",
        "> 2.5 1.50 redelivered billing delivery 2; group g",
        "4.0 1.50 dead_lettered dlq p0@7 r; from billing",
        "x expected ship never came",
    ]


def test_a_long_timeline_is_drawn_as_its_ends() -> None:
    items = [observed(float(i), Kind.ROUTED, f"c{i}") for i in range(10)]
    kinds = [r.kind for r in timeline.rows(items, head=3, tail=2)]
    assert kinds == ["routed"] * 3 + ["... 5 more"] + ["routed"] * 2
    assert len(timeline.rows(items, head=3, tail=7)) == 10


def test_control_characters_from_messages_are_escaped() -> None:
    row = timeline.rows([observed(1.0, Kind.ROUTED, "q", routing_key="a\x1b[2Jb")])[0]
    assert row.where == "a\\x1b[2Jb"

"""Branched flows and consumer groups: the transform, and the checker on hand-written
histories (each fault found on its branch, with its key; clean ones pass)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from history import MS, START, History
from rich.console import Console

from flowcheck.checker import Cause, Verdict, check
from flowcheck.errors import TopologyError
from flowcheck.observations import Kind, Observation
from flowcheck.reporting.terminal import render
from flowcheck.topology import Topology, loads
from flowcheck.topology.transform import isolated

TOPOLOGY = """
brokers: {r: {kind: rabbitmq}, s: {kind: redis}}
channels:
  orders: {broker: r, kind: exchange, type: fanout}
  billing: {broker: r, kind: queue, bindings: [orders]}
  audit: {broker: r, kind: queue, bindings: [orders]}
  ships: {broker: s, kind: stream, groups: [billing, audit], max_length: 100}
flows:
  order:
    correlate: $.id
    deadline: 1s
    steps: [orders]
    branches:
      billing: {steps: [billing]}
      audit: {steps: [audit], deadline: 2s, delivery: at-least-once}
  ship:
    correlate: $.id
    deadline: 1s
    branches:
      billing: {steps: [{channel: ships, group: billing}]}
      audit:
        steps: [{channel: ships, group: audit}]
        retry: {max_attempts: 3}
"""
FLOWS = ("order/billing", "order/audit", "ship/billing", "ship/audit")


@pytest.fixture(scope="module")
def topology() -> Topology:
    return loads(TOPOLOGY)


class Story(History):
    """A history whose observations carry the key of every flow."""

    def add(
        self,
        kind: Kind,
        channel: str,
        key: str,
        payload: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Observation:
        obs = super().add(kind, channel, key, payload, **fields)
        self.items[-1] = obs = obs.replace(keys=dict.fromkeys(FLOWS, key))
        return obs


def run(topology: Topology, h: History, end_ms: float = 60_000) -> Verdict:
    return check(topology, h.sorted(), start_ns=START - 1000 * MS, end_ns=START + int(end_ms * MS))


def findings(v: Verdict) -> list[tuple[str, str, str | None, str | None]]:
    return [(f.flow or "", f.kind.value, f.key, f.cause) for fv in v.flows for f in fv.findings]


def fanout(h: History, key: str, at: float, *, audit: bool = True) -> None:
    h.at(at).routed("orders", key)
    h.routed("billing", key)
    if audit:
        h.routed("audit", key)


def entry(
    h: History, key: str, at: float, eid: str, groups: dict[str, list[Kind]] | None = None
) -> None:
    h.at(at).routed("ships", key, entry_id=eid)
    for group, kinds in (groups or {"billing": [], "audit": []}).items():
        count = 0
        for kind in kinds or [Kind.DELIVERED, Kind.CONSUMED]:
            count += kind is not Kind.CONSUMED and kind is not Kind.TRIMMED
            h.add(kind, "ships", key, entry_id=eid, group=group, delivery_count=count or None)


def test_branches_become_flows_of_their_own(topology: Topology) -> None:
    assert list(topology.flows) == list(FLOWS)
    billing, audit = topology.flows["order/billing"], topology.flows["order/audit"]
    assert [s.channel for s in billing.steps] == ["orders", "billing"]
    assert [s.channel for s in audit.steps] == ["orders", "audit"]
    assert (billing.branch_of, billing.deadline.total_seconds()) == ("order", 1)  # type: ignore[union-attr]
    assert (audit.deadline.total_seconds(), audit.delivery) == (2, "at-least-once")  # type: ignore[union-attr]
    assert topology.flows["ship/audit"].retry is not None
    assert topology.flows["ship/billing"].retry is None
    assert [(s.channel, s.group) for s in topology.flows["ship/audit"].steps] == [
        ("ships", "audit")
    ]


def test_isolation_prefixes_the_groups_steps_name(topology: Topology) -> None:
    mine = isolated(topology, "t1.")
    assert mine.flows["ship/audit"].steps[0].group == "t1.audit"
    assert mine.flows["ship/audit"].branch_of == "ship"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "f: {correlate: $.id, branches: {a: {steps: [{channel: ships, group: audti}]}}}",
            "f.branches.a.steps[0].group: stream 'ships' declares no group 'audti' "
            "(did you mean 'audit'?); add it to its 'groups'",
        ),
        (
            "f: {correlate: $.id, steps: [{channel: billing, group: audit}]}",
            "f.steps[0].group: 'billing' is a queue; only the steps of a Redis stream or a Kafka topic name a consumer group",
        ),
        ("f: {correlate: $.id}", "f: give steps, branches, or both"),
        (
            "f: {correlate: $.id, steps: [orders], branches: {a: {steps: [billing]}}}\n"
            "  f/a: {correlate: $.id, steps: [audit]}",
            "f.branches.a: flow 'f/a' is declared too; rename one",
        ),
        (
            "f: {correlate: $.id, steps: [orders], branches: {a: {steps: [bill]}}}",
            "f.branches.a.steps[0].channel: unknown channel 'bill'",
        ),
    ],
)
def test_mistakes_in_branches_are_located(text: str, error: str) -> None:
    head = TOPOLOGY.split("flows:")[0]
    with pytest.raises(TopologyError) as info:
        loads(f"{head}flows:\n  {text}\n", file="t.yaml")
    messages = [f"{p.line}: {p.message}" for p in info.value.problems]
    assert any(error in m for m in messages), messages
    assert all(p.line >= 9 for p in info.value.problems), messages  # the flows section


def test_common_steps_are_reported_once() -> None:
    head = TOPOLOGY.split("flows:")[0]
    text = "f: {correlate: $.id, steps: [nope], branches: {a: {steps: [billing]}, b: {steps: [audit]}}}"
    with pytest.raises(TopologyError) as info:
        loads(f"{head}flows:\n  {text}\n")
    assert len(info.value.problems) == 1


def test_clean_fanout_and_groups_pass(topology: Topology) -> None:
    h = Story()
    for i in range(5):
        fanout(h, f"o{i}", i * 10)
        entry(h, f"s{i}", i * 10 + 5, f"{i + 1}-0")
    v = run(topology, h)
    assert findings(v) == []
    assert v.passed
    assert [(f.flow, f.branch_of, f.chains) for f in v.flows] == [
        (name, name.split("/")[0], 5) for name in FLOWS
    ]


def test_a_message_missing_on_one_branch_is_lost_there_only(topology: Topology) -> None:
    h = Story()
    fanout(h, "o1", 0)
    fanout(h, "o2", 10, audit=False)
    v = run(topology, h)
    assert findings(v) == [("order/audit", "lost", "o2", "timed_out")]
    assert not v.passed


def test_an_entry_one_group_never_acknowledged_is_unacknowledged(topology: Topology) -> None:
    h = Story()
    entry(h, "s1", 0, "1-0")
    entry(h, "s2", 10, "2-0", {"billing": [], "audit": [Kind.DELIVERED]})
    v = run(topology, h)
    assert findings(v) == [("ship/audit", "unacknowledged", "s2", None)]
    [f] = v.flows[3].findings
    assert "group 'audit'" in f.message
    assert "still pending" in f.message


def test_an_entry_never_delivered_to_a_group_is_lost(topology: Topology) -> None:
    h = Story()
    h.at(0).routed("ships", "s1", entry_id="1-0")
    h.add(Kind.DELIVERED, "ships", "s1", entry_id="1-0", group="billing", delivery_count=1)
    h.add(Kind.CONSUMED, "ships", "s1", entry_id="1-0", group="billing", delivery_count=1)
    v = run(topology, h)
    assert findings(v) == [("ship/audit", "lost", "s1", Cause.NOT_DELIVERED)]


def test_an_entry_trimmed_before_a_group_read_it_is_lost(topology: Topology) -> None:
    h = Story()
    entry(h, "s1", 0, "1-0", {"billing": [], "audit": [Kind.TRIMMED]})
    v = run(topology, h)
    assert findings(v) == [("ship/audit", "lost", "s1", Cause.TRIMMED)]
    [f] = v.flows[3].findings
    assert f.message == "trimmed from 'ships' before group 'audit' read it"


def test_redelivery_to_a_group_is_a_duplicate_unless_a_retry_allows_it(
    topology: Topology,
) -> None:
    h = Story()
    twice = [Kind.DELIVERED, Kind.REDELIVERED, Kind.CONSUMED]
    entry(h, "s1", 0, "1-0", {"billing": twice, "audit": twice})
    v = run(topology, h)
    # billing declares no retry: a second delivery is a duplicate; audit allows 3 attempts.
    assert findings(v) == [("ship/billing", "duplicated", "s1", None)]


def test_a_group_not_done_when_the_recording_ends_is_unjudged(topology: Topology) -> None:
    h = Story()
    entry(h, "s1", 0, "1-0", {"billing": [], "audit": [Kind.DELIVERED]})
    v = run(topology, h, end_ms=100)
    assert findings(v) == []
    audit = v.flows[3]
    assert not audit.passed
    assert audit.unjudged
    assert "acknowledges" in audit.unjudged[0].expectation


def test_the_terminal_report_counts_flows_and_names_the_failing_branch(
    topology: Topology,
) -> None:
    h = Story()
    fanout(h, "o1", 0, audit=False)
    entry(h, "s1", 10, "1-0")
    out = io.StringIO()
    render(run(topology, h), Console(file=out, width=200))
    text = out.getvalue()
    assert "1 of 2 flows failed (4 branches, 1 failed)" in text
    assert "order/audit (a branch of order)" in text


def test_a_tap_gap_leaves_a_group_unjudged_not_lost(topology: Topology) -> None:
    h = Story()
    entry(h, "s1", 0, "1-0", {"billing": [], "audit": [Kind.DELIVERED]})
    h.items.append(
        Observation(
            kind=Kind.GAP,
            broker="s",
            channel="ships",
            mono_ns=START + 50 * MS,
            wall=0.0,
            until_ns=START + 60 * MS,
        )
    )
    v = run(topology, h)
    assert findings(v) == []
    audit = v.flows[3]
    assert not audit.passed
    assert "tap gap" in audit.unjudged[0].why

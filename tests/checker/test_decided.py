"""A Checker's on_decided: told of every chain as it is decided, the verdict unchanged."""

from __future__ import annotations

from history import START, History

from flowcheck.checker import Decided, check
from flowcheck.topology import loads

TOPOLOGY = loads(
    """
brokers: {r: {kind: rabbitmq}}
channels:
  a: {broker: r, kind: queue}
  b: {broker: r, kind: queue}
flows: {f: {correlate: $.id, steps: [a, b], deadline: 1s}}
"""
)


def test_each_chain_is_told_once_with_its_outcome_and_findings() -> None:
    h = History()
    h.at(0).routed("a", "ok")
    h.routed("b", "ok")
    h.at(10).routed("a", "lost")
    h.at(4000).routed("a", "late-start")  # the recording ends inside its window
    told: list[Decided] = []

    def decided(d: Decided) -> None:
        # The timeline is the chain's own list: read during the call, as documented.
        told.append(d)
        assert [s.channel for s in d.timeline()] == [o.channel for o in d.observations]

    verdict = check(TOPOLOGY, h.sorted(), start_ns=START, on_decided=decided)
    plain = check(TOPOLOGY, h.sorted(), start_ns=START)
    assert verdict == plain
    assert {d.key: d.outcome for d in told} == {
        "ok": "passed",
        "lost": "failed",
        "late-start": "unknown",
    }
    (lost,) = [d for d in told if d.key == "lost"]
    (finding,) = lost.findings
    assert finding.kind.value == "lost"
    # The trace id it gives is the one the verdict's finding carries.
    assert lost.trace_id == verdict.flows[0].findings[0].trace_id
    assert not next(d for d in told if d.key == "ok").findings

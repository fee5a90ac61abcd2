"""The gate's policy as a library call: a verdict in, passed, failed or gap out."""

from __future__ import annotations

from typing import Any

from flowcheck.checker import Finding, FindingKind, FlowVerdict, Seen, Unjudged, Verdict
from flowcheck.gate import Decision, allow_unjudged, decide

GAP = Seen(kind="gap", channel="orders", at_ms=10.0, until_ms=20.0, reason="tap down")
UNJUDGED = Unjudged(flow="f", expectation="retry max_attempts 3 at 'a'", why="firehose off")


def verdict(*, passed: bool = True, unknown: int = 0, gaps: int = 0, **more: Any) -> Verdict:
    flow = FlowVerdict(
        flow="f",
        passed=passed,
        chains=2 + unknown,
        succeeded=2,
        failed=0,
        unknown=unknown,
        dead_lettered=0,
        checks=[],
        latency=[],
        **({"findings": []} | more),
    )
    return Verdict(passed=passed, observations=6, flows=[flow], gaps=[GAP] * gaps)


def test_a_green_verdict_passes() -> None:
    assert decide(verdict()) == Decision("passed")
    assert decide(verdict(unknown=1)) == Decision("passed")  # unknown, but no tap gap hid it


def test_chains_a_tap_gap_hid_are_no_pass() -> None:
    hidden = verdict(unknown=2, gaps=1)
    assert decide(hidden) == Decision(
        "gap",
        "flowcheck: 2 chains unknown: a tap was not watching (1 gap); the gate cannot pass "
        "what it did not see (--allow-unjudged lets it)",
    )
    # A run its scenario's timeout cut short: the unknown chains are the timeout's.
    assert decide(hidden, gaps_block=False) == Decision("passed")
    allowed = hidden.model_copy(update={"allow_unjudged": True})
    assert decide(allowed) == Decision("passed")


def test_a_gap_outranks_unjudged_expectations_but_not_a_failed_check() -> None:
    red = verdict(passed=False, unknown=1, gaps=1, unjudged=[UNJUDGED])
    assert decide(red).result == "gap"
    lost = Finding(kind=FindingKind.LOST, flow="f", key="k", message="lost")
    failed = verdict(passed=False, unknown=1, gaps=1, findings=[lost])
    assert decide(failed) == Decision("failed")


def test_red_only_for_unjudged_expectations_says_so() -> None:
    decision = decide(verdict(passed=False, unjudged=[UNJUDGED]))
    assert decision.result == "failed"
    assert decision.why is not None
    assert decision.why.startswith("flowcheck: not green only because 1 declared expectation")


def test_the_flag_allows_or_leaves_it_to_the_topology() -> None:
    assert allow_unjudged(True) is True
    assert allow_unjudged(False) is None  # the topology's gate: {allow_unjudged: ...} says

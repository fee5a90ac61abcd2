"""Latency: every decided chain's hops go into the flow's histograms; at the end each hop
(and the whole chain) is held to its budget."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from flowcheck.checker._chain import Chain
from flowcheck.checker._hist import MONO, Hist, Span
from flowcheck.checker.verdict import Finding, FindingKind, Latency
from flowcheck.topology.model import DeadLetterRule
from flowcheck.topology.model import Latency as Budget

if TYPE_CHECKING:
    from flowcheck.checker._flow import FlowState


def applies(state: FlowState) -> bool:
    return True  # every flow reports its latencies, with a budget or without


def check(
    state: FlowState, chain: Chain, rule: DeadLetterRule | None, spans: list[Span | None]
) -> None:
    hops = state.hops
    for i in range(1, state.n):
        took = spans[i]
        if took is not None:
            hops[i].add(*took)
    if spans[-1] is not None:
        state.e2e.add(*spans[-1])


def latencies(state: FlowState) -> list[Latency]:
    """Each hop's figures, then the whole chain's, judged against their budgets."""
    flow, labels, late = state.flow, state.labels, state.late
    out: list[Latency] = []
    for i in range(1, len(flow.steps)):
        hop = f"{labels[i - 1]} -> {labels[i]}"
        out.append(judge(state, hop, state.hops[i], flow.steps[i].latency, late[i - 1], late[i]))
    out.append(judge(state, "end-to-end", state.e2e, flow.latency, late[0], late[-1]))
    return out


def judge(
    state: FlowState,
    hop: str,
    hist: Hist,
    budget: Budget | None,
    *ends: tuple[timedelta, str] | None,
) -> Latency:
    stats = hist.stats()
    budgets: dict[str, float] = {}
    passed = True
    # A sample is off by the last step's tap lateness less the first's: at most the larger.
    late = max((e for e in ends if e is not None), default=None, key=lambda e: e[0])
    late_ms = late[0].total_seconds() * 1000 if late else 0.0
    clock = hist.clock()
    if clock == MONO:
        tail = f"; a tap may see a step up to {late_ms:g}ms late, {late[1]}" if late else ""
    else:
        tail = f"; off by up to {hist.error_ms:g}ms" if hist.error_ms else ""
    if budget is not None:
        for p in ("p50", "p90", "p95", "p99", "max"):
            limit = getattr(budget, p)
            if limit is None:
                continue
            budgets[p] = limit.total_seconds() * 1000
            have = getattr(stats, f"{p}_ms")
            if have is not None and have > budgets[p]:
                passed = False
                state.add(
                    Finding(
                        kind=FindingKind.LATENCY,
                        flow=state.name,
                        step=hop,
                        message=f"{hop}: {p} is {have:.1f}ms, over its budget of {budgets[p]:.1f}ms ({stats.count} samples, clock {clock}{tail})",
                    )
                )
        # With no succeeded chain, the flow has failed, or judged nothing and says so.
        if stats.count == 0 and state.counts["succeeded"]:
            left = stats.non_positive + stats.unusable
            state.unjudge(
                "latency",
                f"latency budget of {hop}",
                f"no sample: all {left} left out of the percentiles"
                if left
                else "no sample: no chain was seen at both of its ends",
                0,
            )
    return Latency(
        hop=hop,
        clock=clock,
        error_ms=round(hist.error_ms, 3),
        stats=stats,
        histogram=hist.bins(),
        budget_ms=budgets,
        passed=passed,
        tap_late_ms=late_ms,
        tap_late_why=late[1] if late else None,
    )

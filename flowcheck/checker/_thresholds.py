"""Thresholds: the flow's success and error rates over its decided chains, and the
verdict of each check (a chain failure counts against the success rate; any other
finding, or an unjudged expectation unless allowed, fails its check)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowcheck.checker import _latency
from flowcheck.checker.verdict import (
    CHAIN_KINDS,
    CHECKS,
    Check,
    Finding,
    FindingKind,
    FlowVerdict,
    RouteCount,
    Unjudged,
)

if TYPE_CHECKING:
    from flowcheck.checker._flow import FlowState


def rates(state: FlowState) -> tuple[int, float, float, bool]:
    """(decided chains, success rate, the rate needed, whether the rates pass), recording
    a finding for each rate out of bounds."""
    flow, counts = state.flow, state.counts
    decided = counts["succeeded"] + counts["failed"]
    rate = counts["succeeded"] / decided if decided else 1.0
    need = flow.success_rate if flow.success_rate is not None else 1.0
    rate_ok = rate >= need - 1e-12
    if not decided:
        seen, unknown = counts["chains"], counts["unknown"]
        state.unjudge(
            "chains",
            "its chains, and every expectation judged on them",
            f"no chain was decided: {seen} seen, {unknown} unknown",
            unknown,
        )
    if flow.error_rate is not None and decided:
        errors = counts["failed"] / decided
        if errors > flow.error_rate + 1e-12:
            rate_ok = False
            state.add(
                Finding(
                    kind=FindingKind.THRESHOLD,
                    flow=state.name,
                    message=f"error rate {errors:.2%} is above {flow.error_rate:.2%}",
                )
            )
    if not rate_ok and flow.success_rate is not None and rate < need:
        state.add(
            Finding(
                kind=FindingKind.THRESHOLD,
                flow=state.name,
                message=f"success rate {rate:.2%} is below {need:.2%}",
            )
        )
    return decided, rate, need, rate_ok


def verdict(state: FlowState, allow_unjudged: bool) -> FlowVerdict:
    lat = _latency.latencies(state)
    decided, rate, need, rate_ok = rates(state)
    counts, totals = state.counts, state.totals
    unjudged = [
        Unjudged(flow=state.name, expectation=what, why=why, chains=n)
        for (_, what, why), n in state.unjudged.items()
    ]
    checks = []
    for name, kinds in CHECKS.items():
        n = sum(totals[k.value] for k in kinds)
        if name == "chains":
            passed = rate_ok
            msg = (
                f"{counts['succeeded']} of {decided} decided chains succeeded "
                f"({rate:.2%}, need {need:.2%}); {counts['unknown']} unknown"
                if decided
                else f"no chain decided ({counts['chains']} seen, {counts['unknown']} unknown)"
            )
        else:
            # Chain failures are judged by the success threshold; the others by their count.
            per_chain = sum(totals[k.value] for k in kinds & CHAIN_KINDS)
            other = n - per_chain
            passed = other == 0 and (per_chain == 0 or rate_ok)
            msg = "no findings" if n == 0 else f"{n} finding(s)"
        mine = [(what, why, c) for (check, what, why), c in state.unjudged.items() if check == name]
        if mine:
            passed = passed and allow_unjudged
            what, why, c = mine[0]
            on = f" on {c} chain(s)" if c else ""
            more = f" (and {len(mine) - 1} more)" if len(mine) > 1 else ""
            msg += f"; not judged: {what}{on}: {why}{more}"
        checks.append(Check(name=name, passed=passed, message=msg, findings=n))
    return FlowVerdict(
        flow=state.name,
        branch_of=state.flow.branch_of,
        passed=all(c.passed for c in checks),
        chains=counts["chains"],
        succeeded=counts["succeeded"],
        failed=counts["failed"],
        unknown=counts["unknown"],
        dead_lettered=counts["dead_lettered"],
        gave_up=counts["gave_up"],
        passing=state.passing.sample(),
        checks=checks,
        latency=lat,
        # Findings about the whole flow first: never behind the chains' many.
        findings=sorted(
            state.findings,
            key=lambda f: (
                f.key is not None,
                f.seen[0].at_ms if f.seen else (f.timeline[0].at_ms if f.timeline else 0.0),
            ),
        ),
        findings_total=dict(totals),
        unjudged=unjudged,
        over_time=state.series.model(),
        routes=[
            RouteCount(
                channel=channel,
                role=role,
                step=None if i is None else state.labels[i],
                messages=n,
                redelivered=again,
            )
            for (role, channel, i), (n, again) in state.route_counts.items()
        ],
    )

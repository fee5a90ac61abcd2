"""What every reporter needs from a verdict: findings per check, broken chains, numbers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# The verdict names each check but not the finding kinds it judges; that mapping
# lives only in the engine, so it is read from there rather than copied.
from flowcheck.checker.verdict import (
    CHAIN_KINDS,
    CHECKS,
    Check,
    Finding,
    FindingKind,
    FlowVerdict,
    Latency,
    Recording,
    Seen,
    Unjudged,
    Verdict,
)

CHECK_KINDS: Mapping[str, frozenset[FindingKind]] = {
    name: frozenset(kinds) for name, kinds in CHECKS.items()
}
PERCENTILES = ("p50", "p90", "p95", "p99", "max")


def findings_of(flow: FlowVerdict, check: Check) -> list[Finding]:
    """The listed findings that count against ``check`` (the engine may have cut some)."""
    kinds = CHECK_KINDS.get(check.name, frozenset())
    return [f for f in flow.findings if f.kind in kinds]


def listed_total(flow: FlowVerdict) -> tuple[int, int]:
    """(findings listed, findings counted): the engine keeps a bounded list."""
    return len(flow.findings), max(sum(flow.findings_total.values()), len(flow.findings))


@dataclass
class BrokenChain:
    """The findings about one chain, with its timeline drawn once."""

    key: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def timeline(self) -> list[Seen]:
        return self.findings[0].timeline

    @property
    def evidence(self) -> list[Seen]:
        return [s for f in self.findings for s in f.seen]


def broken_chains(flow: FlowVerdict) -> list[BrokenChain]:
    """Chain findings grouped by chain, in the order the engine listed them.

    A key can come back after its chain was decided (a new chain), so the start
    of the timeline is part of what identifies a chain.
    """
    chains: dict[tuple[str, float | None], BrokenChain] = {}
    for f in flow.findings:
        if f.kind not in CHAIN_KINDS or f.key is None:
            continue
        ident = (f.key, f.timeline[0].at_ms if f.timeline else None)
        chains.setdefault(ident, BrokenChain(f.key)).findings.append(f)
    return list(chains.values())


def other_findings(flow: FlowVerdict) -> list[Finding]:
    """Findings about the flow as a whole or about one message: no chain to draw."""
    return [f for f in flow.findings if f.kind not in CHAIN_KINDS or f.key is None]


def ms(value: float | None) -> str:
    """A duration in ms with as many decimals as its size deserves."""
    if value is None:
        return "-"
    if abs(value) < 10:
        return f"{value:.2f}"
    if abs(value) < 1000:
        return f"{value:.1f}"
    return f"{value:.0f}"


def stat(lat: Latency, percentile: str) -> float | None:
    """The value of ``percentile`` (a key of ``budget_ms``: p50 ... max)."""
    s = lat.stats
    values = {"p50": s.p50_ms, "p90": s.p90_ms, "p95": s.p95_ms, "p99": s.p99_ms, "max": s.max_ms}
    return values.get(percentile)


def over_budget(lat: Latency) -> list[str]:
    """The percentiles of ``lat`` above their budget."""
    return [
        p
        for p, limit in lat.budget_ms.items()
        if (have := stat(lat, p)) is not None and have > limit
    ]


def budget_text(lat: Latency) -> str:
    """``p99 50, max 200`` (ms), in percentile order; ``-`` when the hop has no budget."""
    ordered = sorted(
        lat.budget_ms.items(),
        key=lambda kv: PERCENTILES.index(kv[0]) if kv[0] in PERCENTILES else len(PERCENTILES),
    )
    return ", ".join(f"{p} {limit:g}" for p, limit in ordered) or "-"


def latency_problem(lat: Latency) -> str:
    """Why a hop failed its budget, in one line."""
    over = over_budget(lat)
    parts = [f"{p} {ms(stat(lat, p))}ms over its budget of {lat.budget_ms[p]:g}ms" for p in over]
    what = "; ".join(parts) or "over its budget"
    late = f"; a tap may see a step up to {lat.tap_late_ms:g}ms late" if lat.tap_late_ms else ""
    return f"{lat.hop}: {what} ({lat.stats.count} samples, clock {lat.clock}{late})"


def late_note(lat: Latency) -> str | None:
    """Why the samples of a hop with a budget may be off: its taps' lateness; None if exact."""
    if not (lat.tap_late_ms and lat.budget_ms):
        return None
    why = f" ({lat.tap_late_why})" if lat.tap_late_why else ""
    return (
        f"{lat.hop}: samples may be off by up to {lat.tap_late_ms:g}ms, "
        f"as a tap may see a step that late{why}"
    )


def finding_text(f: Finding) -> str:
    """A finding's message, then where its chain stopped when it did."""
    tail = []
    if f.cause is not None:
        tail.append(f"cause {f.cause.value}")
    if f.next_step is not None:
        tail.append(f"expected next {f.next_step}")
    return f.message + (f" [{'; '.join(tail)}]" if tail else "")


def finding_line(f: Finding) -> str:
    """One finding as plain text: kind, which chain, the message, where it stopped."""
    head = f.kind.value + (f" {f.key}" if f.key is not None else "")
    return f"{head}: {finding_text(f)}"


def timeline_line(timeline: list[Seen], limit: int = 12) -> str:
    """A chain's timeline on one line, for formats without room to draw it."""
    steps = [f"{s.kind} {s.channel} @{s.at_ms:.1f}ms" for s in timeline[:limit]]
    if len(timeline) > limit:
        steps.append(f"... {len(timeline) - limit} more")
    return " -> ".join(steps)


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def outcomes(flow: FlowVerdict) -> list[str]:
    """The flow's chains that ended unknown, dead-lettered or given up, where there are any."""
    counts = (
        (flow.unknown, "unknown"),
        (flow.dead_lettered, "dead-lettered"),
        (flow.gave_up, "gave up"),
    )
    return [f"{n} {what}" for n, what in counts if n]


def flow_counts(flow: FlowVerdict) -> str:
    return (
        f"{plural(flow.chains, 'chain')}: {flow.succeeded} succeeded, {flow.failed} failed, "
        f"{flow.unknown} unknown, {flow.dead_lettered} dead-lettered"
    )


# ---------------------------------------------------------------- unjudged, recording

WHOLE = "recording"  # what an unjudged expectation of no single flow is about


def all_unjudged(verdict: Verdict) -> list[tuple[str, Unjudged]]:
    """Every unjudged expectation with what it is about (its flow, or :data:`WHOLE`):
    those of the recording as a whole first, then each flow's, in the flows' order."""
    out = [(u.flow or WHOLE, u) for u in verdict.unjudged]
    out += [(u.flow or flow.flow, u) for flow in verdict.flows for u in flow.unjudged]
    return out


def unjudged_text(u: Unjudged) -> str:
    """``expectation: why (N chains)``."""
    chains = f" ({plural(u.chains, 'chain')})" if u.chains else ""
    return f"{u.expectation}: {u.why}{chains}"


def unjudged_status(verdict: Verdict) -> str:
    """What the unjudged expectations do to the verdict, in a few words."""
    if verdict.allow_unjudged:
        return "allowed (allow_unjudged): they do not fail the verdict"
    return "not allowed: the verdict cannot pass with them"


def recording_text(rec: Recording) -> str:
    """How the recording ended, in words: ``recording ended: stopped at 61234ms``."""
    at = f" at {ms(rec.end_ms)}ms" if rec.end_ms is not None else ""
    why = " (no end record: the recorder crashed or was killed)" if rec.ended == "unknown" else ""
    if rec.stop_ms is not None:
        why += f" (stop asked at {ms(rec.stop_ms)}ms)"
    if rec.after_stop:
        why += (
            f"; {plural(rec.after_stop, 'chain')} first seen after the stop was asked: not judged"
        )
    return f"recording ended: {rec.ended}{at}{why}"

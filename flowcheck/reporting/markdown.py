"""The verdict as a Markdown summary, for CI job pages ($GITHUB_STEP_SUMMARY and the like).

Headline, how the recording ended, a table of flows, the expectations that could
not be judged, the failed checks with their first findings, and the latency of
every hop. Text from the system under test (keys, channel names,
broker reasons) is escaped, so it can neither break a table nor turn into markup.
"""

from __future__ import annotations

import re

from flowcheck.checker.verdict import Finding, FlowVerdict, Verdict
from flowcheck.reporting._common import (
    PERCENTILES,
    all_unjudged,
    budget_text,
    findings_of,
    late_note,
    listed_total,
    ms,
    over_budget,
    plural,
    recording_text,
    stat,
    unjudged_status,
    unjudged_text,
)

MAX_FINDINGS = 5  # listed per failed check; a summary page is not a log
FLOW_COLUMNS = ["flow", "chains", "succeeded", "failed", "unknown", "dead-lettered"]
FLOW_COLUMNS += ["unjudged", "result"]

# What can start markup inside a line; '<' (HTML, autolinks) is written as an entity instead.
_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def escape(text: str) -> str:
    """``text`` safe in a Markdown paragraph or table cell: one line, no markup, no HTML."""
    text = _SPECIAL.sub(r"\\\1", text)
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return " ".join(text.split())  # a newline would end the table row


def dumps(verdict: Verdict, *, max_findings: int = MAX_FINDINGS) -> str:
    """The summary as Markdown, ending in a newline."""
    lines: list[str] = [_headline(verdict), ""]
    lines += _about(verdict)
    lines += _flow_table(verdict.flows)
    unjudged = all_unjudged(verdict)
    if unjudged:
        lines += ["### Unjudged expectations", ""]
        lines += [f"Declared, but not judged; {escape(unjudged_status(verdict))}.", ""]
        lines += [f"- **{escape(about)}**: {escape(unjudged_text(u))}" for about, u in unjudged]
        lines.append("")
    if verdict.findings:
        lines += ["### Findings outside any flow", ""]
        lines += [f"- {_finding(f)}" for f in verdict.findings[:max_findings]]
        if len(verdict.findings) > max_findings:
            lines.append(f"- … {len(verdict.findings) - max_findings} more")
        lines.append("")
    failing = [f for f in verdict.flows if not f.passed]
    if failing:
        lines += ["### Failed checks", ""]
        for flow in failing:
            lines += _failed_checks(flow, max_findings)
    if any(flow.latency for flow in verdict.flows):
        lines += ["### Latency", ""]
        lines += _latency_table(verdict.flows)
    if verdict.drift:
        lines += ["### The brokers differ from the topology", ""]
        lines.append("What was recorded is not the system the topology declares.")
        lines.append("")
        lines += [f"- {escape(d)}" for d in verdict.drift]
        lines.append("")
    if verdict.gaps:
        lines += ["### Tap gaps", ""]
        lines.append("Chains a gap covers are counted as unknown, not lost.")
        lines.append("")
        lines += [
            f"- {escape(g.channel)} from {ms(g.at_ms)} ms"
            + (f": {escape(g.reason)}" if g.reason else "")
            for g in verdict.gaps
        ]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------- parts


def _headline(verdict: Verdict) -> str:
    mark = "✅ PASS" if verdict.passed else "❌ FAIL"
    about = f": {escape(verdict.topology)}" if verdict.topology else ""
    return f"## {mark} flowcheck{about}"


def _about(verdict: Verdict) -> list[str]:
    failed = sum(1 for f in verdict.flows if not f.passed)
    flows = (
        f"{failed} of {plural(len(verdict.flows), 'flow')} failed"
        if failed
        else f"{plural(len(verdict.flows), 'flow')} passed"
    )
    parts = [flows, plural(verdict.observations, "observation")]
    if verdict.findings:
        parts.append(plural(len(verdict.findings), "finding") + " outside any flow")
    unjudged = len(all_unjudged(verdict))
    if unjudged:
        parts.append(f"{unjudged} unjudged" + (" (allowed)" if verdict.allow_unjudged else ""))
    if verdict.gaps:
        parts.append(plural(len(verdict.gaps), "tap gap"))
    out = [", ".join(parts) + f" (verdict format version {verdict.version}).", ""]
    if verdict.recording is not None:
        text = recording_text(verdict.recording)
        out += [escape(text[0].upper() + text[1:]) + ".", ""]
    return out


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _flow_table(flows: list[FlowVerdict]) -> list[str]:
    if not flows:
        return ["No flows were checked.", ""]
    out = [
        _row(FLOW_COLUMNS),
        _row(["---", "---:", "---:", "---:", "---:", "---:", "---:", "---"]),
    ]
    for f in flows:
        numbers = [f.chains, f.succeeded, f.failed, f.unknown, f.dead_lettered, len(f.unjudged)]
        result = "✅ pass" if f.passed else "❌ **fail**"
        out.append(_row([escape(f.flow), *map(str, numbers), result]))
    return [*out, ""]


def _finding(f: Finding) -> str:
    # Code spans only for flowcheck's own words: escapes do not work inside them.
    where = f" key {escape(f.key)}" if f.key is not None else ""
    tail = []
    if f.cause is not None:
        tail.append(f"cause `{f.cause.value}`")
    if f.next_step is not None:
        tail.append(f"expected next: {escape(f.next_step)}")
    if f.trace_id is not None:
        tail.append(f"trace `{f.trace_id}`")
    extra = f" ({'; '.join(tail)})" if tail else ""
    return f"`{f.kind.value}`{where}: {escape(f.message)}{extra}"


def _failed_checks(flow: FlowVerdict, limit: int) -> list[str]:
    out = [f"#### {escape(flow.flow)}", ""]
    if flow.unjudged:
        out.append(f"- **unjudged**: {plural(len(flow.unjudged), 'expectation')}, listed above")
    for check in flow.checks:
        if check.passed:
            continue
        out.append(f"- **{escape(check.name)}**: {escape(check.message)}")
        found = findings_of(flow, check)
        out += [f"  - {_finding(f)}" for f in found[:limit]]
        total = max(check.findings, len(found))
        if total > min(len(found), limit):
            out.append(f"  - … {total - min(len(found), limit)} more ({total} in all)")
    listed, total = listed_total(flow)
    if total > listed:
        out.append(f"- {total - listed} findings beyond the first {listed} were only counted")
    return [*out, ""]


def _latency_table(flows: list[FlowVerdict]) -> list[str]:
    out = [
        _row(["flow", "hop", "count", *PERCENTILES, "budget", "clock", "result"]),
        _row(["---", "---", "---:", *(["---:"] * len(PERCENTILES)), "---", "---", "---"]),
    ]
    notes: list[str] = []
    for flow in flows:
        for lat in flow.latency:
            over = over_budget(lat)
            values = [
                f"**{ms(stat(lat, p))}**" if p in over else ms(stat(lat, p)) for p in PERCENTILES
            ]
            result = "—" if not lat.budget_ms else ("✅ pass" if lat.passed else "❌ **fail**")
            out.append(
                _row(
                    [
                        escape(flow.flow),
                        escape(lat.hop),
                        str(lat.stats.count),
                        *values,
                        escape(budget_text(lat)),
                        escape(lat.clock),
                        result,
                    ]
                )
            )
            if lat.stats.non_positive:
                notes.append(
                    f"- {escape(flow.flow)}, {escape(lat.hop)}: "
                    f"{plural(lat.stats.non_positive, 'sample')} ≤ 0 ms left out of the "
                    "percentiles (clock skew, or copies seen at the same instant)"
                )
            if note := late_note(lat):
                notes.append(f"- {escape(flow.flow)}, {escape(note)}")
    out += ["", "Times in ms."]
    if notes:
        out += ["", *notes]
    return [*out, ""]

"""The verdict on a terminal, with rich: what failed first, then the numbers.

Every word that matters is printed as text (PASS, FAIL, ok), never only as a
colour, so the report reads the same in a CI log, through a pipe and at 80
columns. Untrusted strings (keys, channel names, broker reasons) go into
:class:`~rich.text.Text` objects, so brackets in them are never read as markup.
"""

from __future__ import annotations

from rich import box
from rich.console import Console, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from flowcheck.checker.verdict import (
    Finding,
    FindingKind,
    FlowVerdict,
    Latency,
    Seen,
    Unjudged,
    Verdict,
)
from flowcheck.reporting import timeline
from flowcheck.reporting._common import (
    BrokenChain,
    all_unjudged,
    broken_chains,
    budget_text,
    finding_text,
    flow_counts,
    late_note,
    listed_total,
    ms,
    other_findings,
    outcomes,
    over_budget,
    plural,
    recording_text,
    stat,
    unjudged_status,
    unjudged_text,
)

MAX_CHAINS = 10  # broken chains drawn per flow; the rest are counted
MAX_OTHER = 10  # findings without a chain listed per flow
TIMELINE_HEAD, TIMELINE_TAIL = 12, 4  # a longer timeline is drawn as its ends

FAIL, PASS = "bold red", "bold green"
_KIND_STYLE = {
    FindingKind.LOST: "red",
    FindingKind.DEAD_LETTER: "red",
    FindingKind.UNEXPECTED: "magenta",
    FindingKind.UNACKNOWLEDGED: "red",
}
SEEN_STYLE = {
    "dead_lettered": "red",
    "unroutable": "red",
    "redelivered": "yellow",
    "trimmed": "red",
}


def render(
    verdict: Verdict,
    console: Console,
    *,
    max_chains: int = MAX_CHAINS,
    all_latency: bool = False,
) -> None:
    """Print ``verdict``: a summary line, each failing flow in detail, then the passing ones.

    ``all_latency`` also prints the latency table of passing flows (a failing
    flow always gets one).
    """
    console.print(_summary(verdict))
    if verdict.recording is not None:
        console.print(Text(recording_text(verdict.recording)))
    unjudged = all_unjudged(verdict)
    if unjudged:
        console.print()
        style = "bold" if verdict.allow_unjudged else "bold red"
        console.print(
            Text(f"Unjudged expectations ({len(unjudged)}): {unjudged_status(verdict)}", style)
        )
        console.print(Padding(_unjudged(unjudged), (0, 0, 0, 2), expand=False))
    if verdict.drift:
        console.print()
        console.print(
            Text("The brokers differ from the topology: another system was recorded", "bold red")
        )
        for d in verdict.drift:
            console.print(Text(f"  {d}"))
    if verdict.gaps:
        console.print()
        console.print(Text("Tap gaps: the chains they cover are unknown, not lost", "bold"))
        console.print(Padding(_gaps(verdict.gaps), (0, 0, 0, 2), expand=False))
    if verdict.findings:
        console.print()
        console.print(Text("Findings outside any flow", "bold"))
        console.print(Padding(_findings(verdict.findings, MAX_OTHER), (0, 0, 0, 2), expand=False))
    for flow in verdict.flows:
        if not flow.passed:
            console.print()
            _failing_flow(console, flow, max_chains)
    passing = [f for f in verdict.flows if f.passed]
    if passing:
        console.print()
        console.print(_passing(passing, allowed=verdict.allow_unjudged))
        if all_latency:
            for flow in passing:
                console.print()
                _latency(console, f"Latency of {flow.flow}", flow.latency)


# ---------------------------------------------------------------- sections


def _summary(verdict: Verdict) -> Text:
    # A branch is judged as a flow; a flow fails if any of its branches does.
    names = {f.branch_of or f.flow for f in verdict.flows}
    failed = len({f.branch_of or f.flow for f in verdict.flows if not f.passed})
    branches = sum(1 for f in verdict.flows if f.branch_of)
    if failed:
        what = f"{failed} of {plural(len(names), 'flow')} failed"
    else:
        what = f"{plural(len(names), 'flow')} passed"
    if branches:
        broke = sum(1 for f in verdict.flows if f.branch_of and not f.passed)
        what += f" ({plural(branches, 'branch', 'branches')}" + (
            f", {broke} failed)" if broke else ")"
        )
    if verdict.findings:
        what += ", " + plural(len(verdict.findings), "other finding")
    unjudged = len(all_unjudged(verdict))
    if unjudged:
        what += f", {unjudged} unjudged" + (" (allowed)" if verdict.allow_unjudged else "")
    about = [plural(verdict.observations, "observation")]
    if verdict.gaps:
        about.append(plural(len(verdict.gaps), "tap gap"))
    return Text.assemble(
        ("PASS", PASS) if verdict.passed else ("FAIL", FAIL),
        "  ",
        (f"{verdict.topology}: ", "bold") if verdict.topology else "",
        what,
        f" ({', '.join(about)})",
    )


def _failing_flow(console: Console, flow: FlowVerdict, max_chains: int) -> None:
    branch = f" (a branch of {flow.branch_of})" if flow.branch_of else ""
    console.print(
        Text.assemble(("FAIL", FAIL), " ", (flow.flow, "bold"), branch, "  ", flow_counts(flow))
    )
    failed = [c for c in flow.checks if not c.passed]
    if failed:
        console.print(Text("  Failed checks", "bold"))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column()
        for c in failed:
            grid.add_row(Text(c.name, "red"), Text(c.message))
        console.print(Padding(grid, (0, 0, 0, 4), expand=False))

    chains = broken_chains(flow)
    if chains:
        shown = chains[:max_chains]
        console.print(Text(f"  Broken chains ({len(chains)})", "bold"))
        for chain in shown:
            console.print(Padding(_chain(chain), (0, 0, 0, 4), expand=False))
        if len(chains) > len(shown):
            console.print(
                Text(f"    ... {plural(len(chains) - len(shown), 'more broken chain')} not drawn")
            )

    others = other_findings(flow)
    if others:
        console.print(Text("  Other findings", "bold"))
        console.print(Padding(_findings(others, MAX_OTHER), (0, 0, 0, 4), expand=False))

    if flow.unjudged:
        console.print(
            Text(f"  Unjudged: {plural(len(flow.unjudged), 'expectation')}, listed above", "bold")
        )

    listed, total = listed_total(flow)
    if total > listed:
        per_kind = ", ".join(f"{k} {n}" for k, n in sorted(flow.findings_total.items()))
        console.print(
            Text(
                f"  ... and {total - listed} more findings, only counted "
                f"({total} in all: {per_kind})",
                "yellow",
            )
        )

    if flow.latency:
        _latency(console, "  Latency", flow.latency)


def _passing(flows: list[FlowVerdict], *, allowed: bool) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column()
    for flow in flows:
        # A flow with no chain passes, but only because nothing was there to judge.
        parts = [plural(flow.chains, "chain"), f"{flow.succeeded} succeeded"]
        if not flow.chains:
            parts = ["no chain seen"]
        parts += outcomes(flow)
        e2e = next((lat for lat in flow.latency if lat.hop == "end-to-end"), None)
        if e2e is not None and e2e.stats.count:
            parts.append(f"end-to-end p99 {ms(e2e.stats.p99_ms)}ms")
        _, total = listed_total(flow)
        if total:
            parts.append(plural(total, "finding") + " within tolerance")
        if flow.unjudged:
            parts.append(f"{len(flow.unjudged)} unjudged" + (" (allowed)" if allowed else ""))
        grid.add_row(Text("PASS", PASS), Text(flow.flow, "bold"), Text(", ".join(parts)))
    return grid


# ---------------------------------------------------------------- pieces


def _chain(chain: BrokenChain) -> RenderableType:
    """One broken chain: what went wrong, its timeline, and where it stopped."""
    out = Table.grid()
    out.add_column()
    head = Table.grid(padding=(0, 1))
    head.add_column(no_wrap=True)
    head.add_column()
    for n, f in enumerate(chain.findings):
        head.add_row(
            Text(f"key {chain.key}" if n == 0 else "", "bold"),
            Text.assemble((f.kind.value, _KIND_STYLE.get(f.kind, "yellow")), ": ", f.message),
        )
    out.add_row(head)
    trace_id = chain.findings[0].trace_id
    if trace_id:
        out.add_row(Padding(Text(f"trace {trace_id}", "dim"), (0, 0, 0, 2)))
    out.add_row(Padding(_timeline(chain), (0, 0, 0, 2), expand=False))
    return out


def _timeline(chain: BrokenChain) -> Table:
    missing = []
    for f in chain.findings:
        cause = f"cause {f.cause.value}" if f.cause is not None else ""
        if f.next_step is not None:
            missing.append(("expected", f.next_step, ", ".join(("never came", cause)).strip(", ")))
        elif f.cause is not None:
            missing.append(("stopped", "", cause))
    drawn = timeline.rows(
        chain.timeline,
        evidence=chain.evidence,
        missing=missing,
        head=TIMELINE_HEAD,
        tail=TIMELINE_TAIL,
    )
    return timeline_table(drawn)


def timeline_table(drawn: list[timeline.Row]) -> Table:
    """Rows of :func:`flowcheck.reporting.timeline.rows` as a table, kinds in colour."""
    table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="dim")
    for i, name in enumerate(timeline.COLUMNS):
        wide = name in ("channel", "where", "detail")
        table.add_column(
            name,
            justify="right" if i in timeline.RIGHT else "left",
            no_wrap=not wide,
            overflow="fold",
        )
    for r in drawn:
        if r.mark == "x":
            table.add_row(
                Text("x", FAIL),
                "",
                "",
                Text(r.kind, FAIL),
                Text(r.channel),
                "",
                Text(r.detail, "red"),
            )
            continue
        table.add_row(
            Text(r.mark, "bold"),
            Text(r.at),
            Text(r.delta, "dim"),
            Text(r.kind, "dim" if r.cut else SEEN_STYLE.get(r.kind, "")),
            Text(r.channel),
            Text(r.where),
            Text(r.detail),
        )
    return table


def _findings(findings: list[Finding], limit: int) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column()
    for f in findings[:limit]:
        about = f"key {f.key}: " if f.key is not None else ""
        grid.add_row(
            Text(f.kind.value, _KIND_STYLE.get(f.kind, "yellow")), Text(about + finding_text(f))
        )
    if len(findings) > limit:
        grid.add_row("", Text(f"... {len(findings) - limit} more", "dim"))
    return grid


def _unjudged(unjudged: list[tuple[str, Unjudged]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column()
    for about, u in unjudged:
        grid.add_row(Text(about, "bold"), Text(unjudged_text(u)))
    return grid


def _gaps(gaps: list[Seen]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column()
    for g in gaps[:MAX_OTHER]:
        until = f"to {ms(g.until_ms)}ms" if g.until_ms is not None else "to the end"
        grid.add_row(Text(g.channel), Text(f"from {ms(g.at_ms)}ms {until}"), Text(g.reason or ""))
    if len(gaps) > MAX_OTHER:
        grid.add_row(Text(f"... {len(gaps) - MAX_OTHER} more", "dim"), "", "")
    return grid


def _latency(console: Console, heading: str, latency: list[Latency]) -> None:
    """A table of the hops of one flow, under ``heading``; notes on dropped samples below."""
    if not latency:
        return
    clocks = {lat.clock for lat in latency}
    one_clock = len(clocks) == 1
    unit = "ms" + (f", clock {next(iter(clocks))}" if one_clock else "")
    console.print(Text.assemble((heading, "bold"), (f" ({unit})", "dim")))
    table = Table(
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        show_edge=False,
        header_style="bold",
    )
    table.add_column("hop", overflow="fold")
    table.add_column("count", justify="right", no_wrap=True)
    for p in ("p50", "p90", "p95", "p99", "max"):
        table.add_column(p, justify="right", no_wrap=True)
    table.add_column("budget", overflow="fold")
    table.add_column("result", no_wrap=True)
    if not one_clock:
        table.add_column("clock", no_wrap=True)
    notes: list[Text] = []
    for lat in latency:
        over = over_budget(lat)
        cells: list[RenderableType] = [Text(lat.hop), Text(str(lat.stats.count))]
        for p in ("p50", "p90", "p95", "p99", "max"):
            cells.append(Text(ms(stat(lat, p)), FAIL if p in over else ""))
        cells.append(Text(budget_text(lat)))
        if not lat.budget_ms:
            cells.append(Text("-", "dim"))
        else:
            cells.append(Text("ok", PASS) if lat.passed else Text("FAIL", FAIL))
        if not one_clock:
            cells.append(Text(lat.clock))
        table.add_row(*cells)
        if lat.stats.non_positive:
            notes.append(
                Text(
                    f"{lat.hop}: {plural(lat.stats.non_positive, 'sample')} <= 0 left out "
                    "(clock skew, or copies seen at the same instant)",
                    "yellow",
                )
            )
        if late := late_note(lat):
            notes.append(Text(late, "dim"))
    console.print(Padding(table, (0, 0, 0, 2), expand=False))
    for note in notes:
        console.print(Padding(note, (0, 0, 0, 2), expand=False))

"""The verdict as one self-contained HTML page: tables in plain HTML, plots drawn by bokeh.

The page carries bokeh's core JavaScript inline (1.3 MB; no widgets, tables or
MathJax): it opens offline, from a CI artifact viewer or a mail attachment, with
no CDN. Bokeh is imported only here, through the ``html`` extra.

What it shows: the headline and how the recording ended; the flows as paths of
channels (messages and p99 per hop); the broken chains over the recording's time;
per flow its counts, checks and unjudged expectations; each broken chain as a
swimlane (one lane per channel, time across, where it stopped and what was
expected next) with tap gaps shaded; the latency percentiles of every hop against
their budgets; the gaps; with the topology, the topology as a picture (services,
channels, retry and dead-letter routes, messages and p99 per hop on the edges); per
flow a sample of its passing chains.
The verdict lists a bounded number of findings, and past :data:`MAX_SWIMLANES`
chains per flow the rest are listed as text, and the page says so.
"""

from __future__ import annotations

from collections import Counter
from html import escape
from typing import TYPE_CHECKING, Any

from flowcheck._deps import require
from flowcheck.checker.verdict import FlowVerdict, Latency, Seen, Verdict
from flowcheck.reporting import _picture
from flowcheck.reporting._common import (
    PERCENTILES,
    BrokenChain,
    all_unjudged,
    broken_chains,
    budget_text,
    finding_text,
    flow_counts,
    ms,
    other_findings,
    plural,
    recording_text,
    stat,
    timeline_line,
    unjudged_status,
    unjudged_text,
)

if TYPE_CHECKING:
    from bokeh.model import Model

    from flowcheck.topology import Topology

MAX_SWIMLANES = 12  # drawn per flow; the rest are listed as text, the page stays light
KIND_COLORS = {
    "published": "#1f77b4",
    "routed": "#1f77b4",
    "delivered": "#2ca02c",
    "acked": "#2ca02c",
    "redelivered": "#ff7f0e",
    "nacked": "#ff7f0e",
    "dead_lettered": "#7f7f7f",
    "unroutable": "#d62728",
}

# Records script errors into the page itself, so a headless browser's DOM dump shows them.
_ERRORS_SCRIPT = """<script>
(function () {
  function note(text) {
    var box = document.getElementById("fc-errors");
    if (box) { box.textContent += text + "\\n"; } else { (window.fcErrors = window.fcErrors || []).push(text); }
  }
  window.addEventListener("error", function (e) { note("error: " + e.message); });
  window.addEventListener("unhandledrejection", function (e) { note("rejection: " + e.reason); });
  var original = console.error;
  console.error = function () { note("console.error: " + Array.prototype.join.call(arguments, " ")); original.apply(console, arguments); };
})();
</script>"""

# Says how many plots bokeh rendered, for tests and for a reader wondering about a blank page.
_READY_SCRIPT = """<script>
(function () {
  var box = document.getElementById("fc-errors");
  (window.fcErrors || []).forEach(function (t) { box.textContent += t + "\\n"; });
  var tries = 0;
  function drawn() {
    var n = 0;
    document.querySelectorAll("[data-root-id]").forEach(function (el) {
      if (el.shadowRoot || el.children.length) { n++; }
    });
    return n;
  }
  function poll() {
    var n = drawn();
    if (n >= EXPECTED || tries++ > 200) { document.body.setAttribute("data-rendered", n + " of EXPECTED");
      document.body.setAttribute("data-rendered-ms", String(Math.round(performance.now()))); return; }
    setTimeout(poll, 25);
  }
  poll();
})();
</script>"""

_STYLE = """<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 .pass { color: #2a7a2a; } h1 .fail { color: #b22; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
td.n { text-align: right; } tr.fail td.result, td.fail { color: #b22; font-weight: bold; }
td.pass { color: #2a7a2a; } .note { color: #555; } code { font-size: 90%; }
section.flow { border-top: 2px solid #ddd; margin-top: 1.5em; }
#fc-errors:empty { display: none; } #fc-errors { color: #b22; }
</style>"""


def dumps(
    verdict: Verdict, *, max_swimlanes: int = MAX_SWIMLANES, topology: Topology | None = None
) -> str:
    """The report as one HTML document, scripts inline; with the ``topology`` the verdict
    judged, it draws it too (services, channels, their routes, the verdict's figures)."""
    require("bokeh")
    from bokeh.document import Document
    from bokeh.embed import components
    from bokeh.resources import Resources

    plots: list[Model] = []
    body: list[str] = [_headline(verdict), *_what_failed(verdict)]
    body += _flow_table(verdict.flows)
    if topology is not None:
        body += _topology(topology, verdict, plots)
    paths = _flow_paths(verdict.flows)
    if paths is not None:
        body.append("<h2>Flows through the channels</h2>")
        body.append(
            "<p class='note'>Each flow's steps in order; on each hop, the messages that made "
            "it and their p99; a red cross where lost chains stopped; after the last step, "
            "the chains dead-lettered or given up.</p>"
        )
        body.append(_slot(plots, paths))
    unjudged = all_unjudged(verdict)
    if unjudged:
        body.append("<h2>Unjudged expectations</h2>")
        body.append(
            f"<p class='note'>Declared, but not judged; {_e(unjudged_status(verdict))}.</p>"
        )
        body.append("<ul id='unjudged'>")
        body += [f"<li><b>{_e(about)}</b>: {_e(unjudged_text(u))}</li>" for about, u in unjudged]
        body.append("</ul>")
    if verdict.findings:
        body.append("<h2>Findings outside any flow</h2><ul>")
        body += [f"<li>{_e(finding_text(f))}</li>" for f in verdict.findings]
        body.append("</ul>")
    body += _gaps(verdict.gaps)
    rates = _rates(verdict)
    broken = _over_time(verdict)
    if rates is not None or broken is not None:
        body.append("<h2>Over the recording</h2>")
    if rates is not None:
        body.append(
            "<p class='note'>Per flow, per second: chains completed (the throughput), "
            "failed, retries and dead letters, each counted when it happened; tap gaps "
            "shaded.</p>"
        )
        body.append(_slot(plots, rates))
    if broken is not None:
        body.append(
            "<p class='note'>When each listed broken chain started, per flow and kind of "
            "finding; tap gaps shaded.</p>"
        )
        body.append(_slot(plots, broken))
    if verdict.drift:
        body.append("<h2>The brokers differ from the topology</h2><ul>")
        body += [f"<li>{_e(d)}</li>" for d in verdict.drift]
        body.append("</ul>")
    for flow in verdict.flows:
        body += _flow_section(flow, verdict.gaps, plots, max_swimlanes)
    if plots:
        # All roots in one document at once: components() adds them one by one, and each
        # addition walks every model already there (seconds for a few dozen plots).
        doc = Document()
        with doc.models.freeze():
            for plot in plots:
                doc.add_root(plot)
    script, divs = components(plots) if plots else ("", ())
    html = "\n".join(body)
    for i, div in enumerate(divs):
        html = html.replace(f"<!--plot-{i}-->", div, 1)
    title = "flowcheck: " + ("PASS" if verdict.passed else "FAIL")
    if verdict.topology:
        title += f" ({verdict.topology})"
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{_e(title)}</title>\n{_STYLE}\n{_ERRORS_SCRIPT}\n"
        f"{Resources(mode='inline', components=['bokeh']).render_js() if plots else ''}\n</head>\n<body>\n"
        "<pre id='fc-errors'></pre>\n"
        f"{html}\n{script}\n{_READY_SCRIPT.replace('EXPECTED', str(len(plots)))}\n"
        "</body>\n</html>\n"
    )


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _slot(plots: list[Model], plot: Model) -> str:
    plots.append(plot)
    return f"<!--plot-{len(plots) - 1}-->"


# ---------------------------------------------------------------- tables


def _headline(verdict: Verdict) -> str:
    mark = "<span class='pass'>PASS</span>" if verdict.passed else "<span class='fail'>FAIL</span>"
    about = f": {_e(verdict.topology)}" if verdict.topology else ""
    failed = sum(1 for f in verdict.flows if not f.passed)
    flows = plural(len(verdict.flows), "flow")
    parts = [f"{failed} of {flows} failed" if failed else f"{flows} passed"]
    parts.append(plural(verdict.observations, "observation"))
    if verdict.gaps:
        parts.append(plural(len(verdict.gaps), "tap gap"))
    out = [f"<h1 id='headline'>{mark} flowcheck{about}</h1>", f"<p>{_e(', '.join(parts))}.</p>"]
    if verdict.recording is not None:
        text = recording_text(verdict.recording)
        out.append(f"<p class='note'>{_e(text[0].upper() + text[1:])}.</p>")
    return "\n".join(out)


def _what_failed(verdict: Verdict, most: int = 3) -> list[str]:
    """Each failed flow at the top, in a line: its failed checks, and its first broken
    chains with where each stopped; the flow's section below has the rest."""
    out = []
    for flow in verdict.flows:
        if flow.passed:
            continue
        why = [f"{c.name}: {c.message}" for c in flow.checks if not c.passed]
        why += [f"{u.expectation}: unjudged ({u.why})" for u in flow.unjudged]
        chains = broken_chains(flow)
        keys = [f"<li>key {_e(c.key)}: {_e(c.findings[0].message)}</li>" for c in chains[:most]]
        if len(chains) > most:
            keys.append(f"<li>and {plural(len(chains) - most, 'more broken chain')}</li>")
        out.append(
            f"<li><a href='#flow-{_e(flow.flow)}'>{_e(flow.flow)}</a> failed: "
            f"{_e('; '.join(why))}" + (f"<ul>{''.join(keys)}</ul>" if keys else "") + "</li>"
        )
    return ["<h2>What failed</h2>", "<ul id='what-failed'>", *out, "</ul>"] if out else []


def _flow_table(flows: list[FlowVerdict]) -> list[str]:
    if not flows:
        return ["<p>No flows were checked.</p>"]
    head = ["flow", "chains", "succeeded", "failed", "unknown", "dead-lettered", "gave up"]
    head += ["unjudged", "result"]
    out = ["<table id='flows'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for f in flows:
        numbers = [f.chains, f.succeeded, f.failed, f.unknown, f.dead_lettered, f.gave_up]
        numbers.append(len(f.unjudged))
        cells = "".join(f"<td class='n'>{n}</td>" for n in numbers)
        result = "pass" if f.passed else "fail"
        out.append(
            f"<tr class='{result}'><td><a href='#flow-{_e(f.flow)}'>{_e(f.flow)}</a></td>"
            f"{cells}<td class='result {result}'>{result}</td></tr>"
        )
    return [*out, "</table>"]


def _gaps(gaps: list[Seen]) -> list[str]:
    if not gaps:
        return []
    out = [
        "<h2>Tap gaps</h2>",
        "<p class='note'>Chains a gap covers are counted as unknown, "
        "not lost; the gaps are shaded on the timelines.</p>",
        "<table id='gaps'>",
        "<tr><th>channel</th><th>from (ms)</th><th>until (ms)</th><th>why</th></tr>",
    ]
    for g in gaps:
        until = ms(g.until_ms) if g.until_ms is not None else "end"
        out.append(
            f"<tr><td>{_e(g.channel)}</td><td class='n'>{ms(g.at_ms)}</td>"
            f"<td class='n'>{until}</td><td>{_e(g.reason or '')}</td></tr>"
        )
    return [*out, "</table>"]


def _flow_section(
    flow: FlowVerdict, gaps: list[Seen], plots: list[Model], max_swimlanes: int
) -> list[str]:
    result = "pass" if flow.passed else "fail"
    out = [
        f"<section class='flow' id='flow-{_e(flow.flow)}'>",
        f"<h2>Flow {_e(flow.flow)}: <span class='{result}'>{result}</span></h2>",
        f"<p>{_e(flow_counts(flow))}</p>",
        "<table class='checks'><tr><th>check</th><th>result</th><th>findings</th><th>message</th></tr>",
    ]
    for c in flow.checks:
        res = "pass" if c.passed else "fail"
        out.append(
            f"<tr><td>{_e(c.name)}</td><td class='{res}'>{res}</td>"
            f"<td class='n'>{c.findings}</td><td>{_e(c.message)}</td></tr>"
        )
    for u in flow.unjudged:
        out.append(
            f"<tr><td>{_e(u.expectation)}</td><td class='fail'>unjudged</td>"
            f"<td class='n'>{u.chains}</td><td>{_e(u.why)}</td></tr>"
        )
    out.append("</table>")
    if flow.latency:
        out.append("<h3>Latency</h3>")
        out += _latency_table(flow.latency)
        out.append(_slot(plots, _latency_plot(flow.latency)))
        spread = _latency_histograms(flow.latency)
        if spread is not None:
            out.append(
                "<p class='note'>How the samples of each hop and of the whole chain spread "
                "(log scale); budgets as dashed red lines.</p>"
            )
            out.append(_slot(plots, spread))
    chains = broken_chains(flow)
    if chains:
        out.append(f"<h3>Broken chains ({len(chains)} listed, {flow.failed} failed)</h3>")
        if len(chains) > max_swimlanes:
            out.append(
                f"<p class='note'>The first {max_swimlanes} are drawn; the other "
                f"{len(chains) - max_swimlanes} are listed below them.</p>"
            )
        for chain in chains[:max_swimlanes]:
            out.append(f"<div class='chain'><h4>key {_e(chain.key)}</h4><ul>")
            out += [f"<li>{_e(finding_text(f))}</li>" for f in chain.findings]
            out.append("</ul>")
            if chain.timeline:
                out.append(_slot(plots, _swimlane(chain, gaps)))
            out.append("</div>")
        rest = chains[max_swimlanes:]
        if rest:
            out.append("<ul class='rest'>")
            out += [
                f"<li><b>{_e(c.key)}</b>: {_e(finding_text(c.findings[0]))} "
                f"<code>{_e(timeline_line(c.timeline))}</code></li>"
                for c in rest
            ]
            out.append("</ul>")
    out += _passing(flow)
    others = other_findings(flow)
    if others:
        out.append("<h3>Other findings</h3><ul>")
        out += [f"<li>{_e(finding_text(f))}</li>" for f in others]
        out.append("</ul>")
    return [*out, "</section>"]


def _latency_table(latency: list[Latency]) -> list[str]:
    head = "".join(f"<th>{p} (ms)</th>" for p in PERCENTILES)
    out = [
        f"<table class='latency'><tr><th>hop</th><th>samples</th>{head}<th>budget</th>"
        "<th>result</th></tr>"
    ]
    for lat in latency:
        cells = "".join(f"<td class='n'>{ms(stat(lat, p))}</td>" for p in PERCENTILES)
        res = "pass" if lat.passed else "fail"
        out.append(
            f"<tr><td>{_e(lat.hop)}</td><td class='n'>{lat.stats.count}</td>{cells}"
            f"<td>{_e(budget_text(lat))}</td><td class='{res}'>{res}</td></tr>"
        )
    return [*out, "</table>"]


# ---------------------------------------------------------------- topology and samples


def _topology(topology: Topology, verdict: Verdict, plots: list[Model]) -> list[str]:
    fig = _picture.picture(topology, verdict)
    if fig is None:
        return []
    return [
        "<h2 id='topology'>The topology</h2>",
        "<p class='note'>Who publishes and consumes what: services (circles), channels "
        "(squares) in the order the flows pass them, the channels of retries and dead "
        f"letters under theirs. {_e(_picture.note(topology, verdict))}</p>",
        _slot(plots, fig),
    ]


def _passing(flow: FlowVerdict) -> list[str]:
    """The verdict's sample of passing chains: which ones, and how long each took."""
    if not flow.succeeded:
        return []
    shown = len(flow.passing)
    how = "all" if shown == flow.succeeded else "sampled"
    out = [
        "<h3>Passing chains</h3>",
        f"<p class='note passing'>{shown} of {flow.succeeded} passing chains shown ({how}).</p>",
    ]
    if flow.passing:
        out.append("<table class='passing'><tr><th>key</th><th>end to end (ms)</th></tr>")
        out += [
            f"<tr><td>{_e(p.key)}</td><td class='n'>{ms(p.took_ms)}</td></tr>" for p in flow.passing
        ]
        out.append("</table>")
    return out


# ---------------------------------------------------------------- plots

RATE_LINES = (  # (OverTime field, legend, color), drawn per second
    ("completed", "completed", "#2ca02c"),
    ("failed", "failed", "#d62728"),
    ("retries", "retries", "#ff7f0e"),
    ("dead_letters", "dead letters", "#7f7f7f"),
)


def _rates(verdict: Verdict) -> Model | None:
    """Per flow, its chains completed and failed, retries and dead letters per second over
    the recording (the verdict's bounded series), tap gaps shaded; one x axis for all."""
    from bokeh.layouts import column
    from bokeh.models import ColumnDataSource, DataRange1d, HoverTool, Range1d
    from bokeh.models.annotations import BoxAnnotation
    from bokeh.plotting import figure

    flows = [f for f in verdict.flows if f.over_time is not None and f.over_time.started]
    if not flows:
        return None
    end = max(len(f.over_time.started) * f.over_time.bucket_ms for f in flows if f.over_time)
    if verdict.recording is not None and verdict.recording.end_ms is not None:
        end = max(end, verdict.recording.end_ms)
    x_range = Range1d(start=0, end=end)
    figs = []
    for flow in flows:
        series = flow.over_time
        assert series is not None
        width = series.bucket_ms
        per_s = 1000 / width
        n = len(series.started)
        data: dict[str, list[float]] = {"t": [i * width for i in range(n)]}
        for name, _, _ in RATE_LINES:
            data[name] = [c * per_s for c in getattr(series, name)]
        fig = figure(
            x_range=x_range,
            y_range=DataRange1d(start=0),
            height=200,
            width=800,
            title=f"{flow.flow}: per second, in buckets of {ms(width)} ms",
            tools="xpan,xwheel_zoom,reset,save",
            toolbar_location="right",
        )
        source = ColumnDataSource(data)
        lines: list[Any] = [
            fig.step("t", name, source=source, mode="after", color=color, legend_label=label)
            for name, label, color in RATE_LINES
            if name == "completed" or any(data[name])  # the throughput, even if none
        ]
        tips = [(label, f"@{name}{{0.[00]}}/s") for name, label, _ in RATE_LINES]
        fig.add_tools(
            HoverTool(renderers=lines[:1], tooltips=[("from", "@t ms"), *tips], mode="vline")
        )
        for g in verdict.gaps:
            right = g.until_ms if g.until_ms is not None else end  # open to the end
            fig.add_layout(
                BoxAnnotation(left=g.at_ms, right=right, fill_color="#999999", fill_alpha=0.3)
            )
        fig.legend.location = "top_left"
        fig.legend.label_text_font_size = "9px"
        fig.yaxis.axis_label = "per second"
        figs.append(fig)
    figs[-1].xaxis.axis_label = "ms since the recording started"
    return column(*figs)


def _latency_histograms(latency: list[Latency]) -> Model | None:
    """Each hop's (and the whole chain's) samples in the verdict's log-spaced bins, two
    plots a row, its budgets as vertical lines."""
    from bokeh.layouts import gridplot
    from bokeh.models import DataRange1d, Range1d
    from bokeh.models.annotations import Label, Span
    from bokeh.plotting import figure

    figs = []
    for lat in latency:
        edges, counts = lat.histogram.edges_ms, lat.histogram.counts
        if not counts:
            continue
        left, right = edges[:-1], edges[1:]
        if left[0] <= 0:  # a sub-microsecond sample: no place for 0 on a log axis
            left = [right[0] / 2, *left[1:]]
        low = min(left[0], *lat.budget_ms.values()) if lat.budget_ms else left[0]
        high = max(right[-1], *lat.budget_ms.values()) if lat.budget_ms else right[-1]
        fig = figure(
            x_axis_type="log",
            x_range=Range1d(start=low / 1.5, end=high * 1.5),
            y_range=DataRange1d(start=0),
            height=220,
            width=395,
            title=f"{lat.hop} ({lat.stats.count} samples)",
            tools="xpan,xwheel_zoom,reset,save",
            toolbar_location=None,
        )
        fig.quad(left=left, right=right, bottom=0, top=counts, color="#6baed6", alpha=0.8)
        for p, limit in lat.budget_ms.items():
            fig.add_layout(
                Span(
                    location=limit,
                    dimension="height",
                    line_color="#d62728",
                    line_dash="dashed",
                    line_width=2,
                )
            )
            fig.add_layout(
                Label(
                    x=limit,
                    y=0,
                    y_units="screen",
                    x_offset=3,
                    y_offset=4,
                    text=f"budget {p}",
                    text_color="#d62728",
                    text_font_size="10px",
                )
            )
        fig.xaxis.axis_label = "ms"
        figs.append(fig)
    if not figs:
        return None
    return gridplot(figs, ncols=2)  # type: ignore[arg-type]


def _over_time(verdict: Verdict) -> Model | None:
    """The broken chains the verdict lists, placed at their start on the recording's time."""
    from bokeh.models import ColumnDataSource, FactorRange, HoverTool, Range1d
    from bokeh.models.annotations import BoxAnnotation
    from bokeh.plotting import figure

    data: dict[str, list[Any]] = {"t": [], "flow": [], "what": [], "key": [], "color": []}
    for flow in verdict.flows:
        for chain in broken_chains(flow):
            if not chain.timeline:
                continue
            kind = chain.findings[0].kind.value
            data["t"].append(chain.timeline[0].at_ms)
            data["flow"].append(flow.flow)
            data["what"].append(kind)
            data["key"].append(chain.key)
            data["color"].append("#7f7f7f" if kind == "dead_letter" else "#d62728")
    if not data["t"] and not verdict.gaps:
        return None
    names = [f.flow for f in verdict.flows][::-1] or ["recording"]
    fig = figure(
        y_range=FactorRange(factors=names),
        height=80 + 40 * len(names),
        width=800,
        tools="pan,xwheel_zoom,reset,save",
        toolbar_location="right",
    )
    dots = fig.scatter("t", "flow", source=ColumnDataSource(data), size=8, color="color", alpha=0.7)
    fig.add_tools(HoverTool(renderers=[dots], tooltips=[("", "@key: @what at @t ms")]))
    end = verdict.recording.end_ms if verdict.recording else None
    last = max([*data["t"], *(g.until_ms or g.at_ms for g in verdict.gaps)])
    for g in verdict.gaps:
        right = g.until_ms if g.until_ms is not None else (end or last)  # open to the end
        fig.add_layout(
            BoxAnnotation(left=g.at_ms, right=right, fill_color="#999999", fill_alpha=0.3)
        )
    if end:  # the whole recording across: when in it things broke, not a zoom on them
        fig.x_range = Range1d(start=0, end=max(end, last) * 1.02)
    fig.xaxis.axis_label = "ms since the recording started"
    return fig


def _flow_paths(flows: list[FlowVerdict]) -> Model | None:
    """The flows as rows of channels joined by their hops, the hops' counts and p99 on them."""
    from bokeh.models import ColumnDataSource, FactorRange, HoverTool, Range1d
    from bokeh.models.annotations import LabelSet
    from bokeh.plotting import figure

    rows = [f for f in flows if any(" -> " in lat.hop for lat in f.latency)]
    if not rows:
        return None
    nodes: dict[str, list[Any]] = {"x": [], "flow": [], "channel": []}
    edges: dict[str, list[Any]] = {"x0": [], "x1": [], "flow": [], "label": [], "color": []}
    ends: dict[str, list[Any]] = {"x": [], "flow": [], "label": []}
    lost: dict[str, list[Any]] = {"x": [], "flow": [], "label": []}
    width = 0
    for flow in rows:
        hops = [lat for lat in flow.latency if " -> " in lat.hop]
        steps = [hops[0].hop.split(" -> ")[0]] + [lat.hop.split(" -> ", 1)[1] for lat in hops]
        width = max(width, len(steps))
        for i, step in enumerate(steps):
            nodes["x"].append(i)
            nodes["flow"].append(flow.flow)
            nodes["channel"].append(step)
        for i, lat in enumerate(hops):
            edges["x0"].append(i + 0.08)
            edges["x1"].append(i + 0.92)
            edges["flow"].append(flow.flow)
            p99 = f", p99 {ms(lat.stats.p99_ms)} ms" if lat.stats.p99_ms is not None else ""
            edges["label"].append(f"{lat.stats.count}{p99}")
            edges["color"].append("#2ca02c" if lat.passed else "#d62728")
        # The lost chains the verdict lists, on the hop into the step that never came.
        stops = Counter(f.next_step for f in flow.findings if f.next_step in steps[1:])
        for step, n in stops.items():
            lost["x"].append(steps.index(step) - 0.5)
            lost["flow"].append(flow.flow)
            lost["label"].append(f"{n} lost before {step}")
        tail = [f"{flow.dead_lettered} dead-lettered"] if flow.dead_lettered else []
        tail += [f"{flow.gave_up} gave up"] if flow.gave_up else []
        tail += [f"{flow.failed} failed"] if flow.failed else []
        if tail:
            ends["x"].append(len(steps) - 1)
            ends["flow"].append(flow.flow)
            ends["label"].append(", ".join(tail))
    names = [f.flow for f in rows][::-1]
    fig = figure(
        y_range=FactorRange(factors=names),
        x_range=Range1d(start=-0.5, end=width + 0.5),
        height=60 + 60 * len(names),
        width=800,
        tools="pan,wheel_zoom,reset,save",
        toolbar_location="right",
    )
    fig.xaxis.visible = False
    fig.xgrid.visible = False
    edge_source = ColumnDataSource(edges)
    fig.segment("x0", "flow", "x1", "flow", source=edge_source, line_width=3, color="color")
    fig.add_layout(
        LabelSet(
            x="x0",
            y="flow",
            text="label",
            source=edge_source,
            y_offset=6,
            x_offset=8,
            text_font_size="10px",
        )
    )
    source = ColumnDataSource(nodes)
    dots = fig.scatter("x", "flow", source=source, size=14, color="#1f77b4")
    fig.add_layout(
        LabelSet(
            x="x",
            y="flow",
            text="channel",
            source=source,
            y_offset=-22,
            text_align="center",
            text_font_size="11px",
        )
    )
    if ends["x"]:
        fig.add_layout(
            LabelSet(
                x="x",
                y="flow",
                text="label",
                source=ColumnDataSource(ends),
                x_offset=12,
                y_offset=-4,
                text_color="#7f7f7f",
                text_font_size="10px",
            )
        )
    if lost["x"]:
        marks = ColumnDataSource(lost)
        fig.scatter("x", "flow", source=marks, marker="x", size=14, line_width=3, color="#d62728")
        fig.add_layout(
            LabelSet(
                x="x",
                y="flow",
                text="label",
                source=marks,
                y_offset=-38,  # under the channels' names
                text_align="center",
                text_color="#d62728",
                text_font_size="11px",
            )
        )
    fig.add_tools(HoverTool(renderers=[dots], tooltips=[("", "@flow: @channel")]))
    return fig


def _latency_plot(latency: list[Latency]) -> Model:
    """Each hop's percentiles as points on one line, its budgets as red bars across it."""
    from bokeh.models import ColumnDataSource, FactorRange, HoverTool, Range1d
    from bokeh.plotting import figure

    hops = [lat.hop for lat in latency][::-1]
    points: dict[str, list[Any]] = {"hop": [], "ms": [], "what": []}
    for lat in latency:
        for p in PERCENTILES:
            value = stat(lat, p)
            if value is not None:
                points["hop"].append(lat.hop)
                points["ms"].append(value)
                points["what"].append(p)
    budget: dict[str, list[Any]] = {"hop": [], "ms": [], "what": []}
    for lat in latency:
        for p, limit in lat.budget_ms.items():
            budget["hop"].append(lat.hop)
            budget["ms"].append(limit)
            budget["what"].append(f"budget {p}")
    top = max([*points["ms"], *budget["ms"], 1.0]) * 1.1
    fig = figure(
        y_range=FactorRange(factors=hops),
        x_range=Range1d(start=0, end=top),
        height=80 + 40 * len(hops),
        width=800,
        title="latency per hop (ms): p50 to max as a bar, each percentile a dot, budgets in red",
        toolbar_location="right",
        tools="pan,wheel_zoom,reset,save",
    )

    def spread(pick: Any) -> list[float]:
        return [
            pick(
                (v for h, v in zip(points["hop"], points["ms"], strict=True) if h == hop),
                default=0.0,
            )
            for hop in hops
        ]

    lows, highs = spread(min), spread(max)
    fig.hbar(y=hops, left=lows, right=highs, height=0.3, color="#c6dbef")
    source = ColumnDataSource(points)
    dots = fig.scatter("ms", "hop", source=source, size=9, color="#1f77b4")
    if budget["hop"]:
        bars = fig.scatter(
            "ms",
            "hop",
            source=ColumnDataSource(budget),
            marker="dash",
            angle=1.5708,
            size=26,
            line_width=3,
            color="#d62728",
        )
        fig.add_tools(HoverTool(renderers=[bars], tooltips=[("", "@what: @ms ms")]))
    fig.add_tools(HoverTool(renderers=[dots], tooltips=[("", "@hop @what: @ms ms")]))
    fig.xaxis.axis_label = "ms"
    return fig


def _swimlane(chain: BrokenChain, gaps: list[Seen]) -> Model:
    """One lane per channel, time across; a red cross where the expected next step should be."""
    from bokeh.models import ColumnDataSource, FactorRange, HoverTool, Range1d
    from bokeh.models.annotations import BoxAnnotation
    from bokeh.plotting import figure

    timeline = chain.timeline
    expected = next((f.next_step for f in chain.findings if f.next_step), None)
    lanes: list[str] = []
    for s in timeline:
        if s.channel not in lanes:
            lanes.append(s.channel)
    if expected and expected not in lanes:
        lanes.append(expected)
    first, last = timeline[0].at_ms, timeline[-1].at_ms
    span = max(last - first, 1.0)
    data = {
        "t": [s.at_ms for s in timeline],
        "lane": [s.channel for s in timeline],
        "kind": [s.kind for s in timeline],
        "color": [KIND_COLORS.get(s.kind, "#9467bd") for s in timeline],
        "detail": [s.reason or s.broker or "" for s in timeline],
    }
    fig = figure(
        y_range=FactorRange(factors=lanes[::-1]),
        x_range=Range1d(start=first - 0.1 * span, end=last + 0.3 * span),
        height=70 + 35 * len(lanes),
        width=800,
        tools="pan,wheel_zoom,reset,save",
        toolbar_location="right",
    )
    source = ColumnDataSource(data)
    fig.line("t", "lane", source=source, color="#bbbbbb", line_dash="dotted")
    dots = fig.scatter("t", "lane", source=source, size=10, color="color", legend_field="kind")
    fig.add_tools(HoverTool(renderers=[dots], tooltips=[("", "@kind @lane at @t ms @detail")]))
    if expected:
        at = last + 0.15 * span
        fig.scatter([at], [expected], marker="x", size=16, line_width=3, color="#d62728")
        # Left of the cross, on its lane: inside the plot, however long the name.
        fig.text(
            [at],
            [expected],
            text=[f"expected next: {expected}, never came"],
            text_align="right",
            text_baseline="middle",
            x_offset=-14,
            text_color="#d62728",
            text_font_size="11px",
        )
    for g in gaps:
        end = g.until_ms if g.until_ms is not None else last + span
        if g.at_ms <= last + 0.3 * span and end >= first - 0.1 * span:
            fig.add_layout(
                BoxAnnotation(left=g.at_ms, right=end, fill_color="#999999", fill_alpha=0.25)
            )
    fig.legend.location = "top_left"
    fig.legend.label_text_font_size = "9px"
    fig.xaxis.axis_label = "ms since the recording started"
    return fig

"""The topology as a picture, for the HTML report: services, channels and the routes
between them as a directed graph, the verdict's figures on its edges.

Channels are laid out in columns by how far down the flows they are (the longest
path of flow hops, service hand-offs and bindings leading to them); a service sits
in the column after the channels it consumes (before the first it publishes, for one
that only publishes); a channel that carries another's retries or dead letters sits
under it. The verdict holds per-hop figures (the chains timed across each hop, their
p99) and per flow the messages at each channel it touches (``FlowVerdict.routes``);
an edge it holds no count for says so ("?") rather than guessing one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from flowcheck.checker.verdict import FlowVerdict, Verdict
from flowcheck.reporting._common import ms
from flowcheck.topology import Queue, Step, Topology
from flowcheck.topology.routing import dead_letter_path

if TYPE_CHECKING:
    from bokeh.model import Model

Node = tuple[str, str]  # ("channel" | "service", name)

# kind of edge -> (color, dash, what the legend calls it)
EDGE_STYLES: dict[str, tuple[str, str, str]] = {
    "publish": ("#1f77b4", "solid", "publishes"),
    "consume": ("#2ca02c", "solid", "consumes"),
    "route": ("#8c8c8c", "solid", "exchange routes"),
    "hop": ("#8c8c8c", "dotted", "flow hop"),
    "retry": ("#ff7f0e", "dashed", "retries"),
    "dead letter": ("#7f7f7f", "dashed", "dead letters"),
}
NODE_COLORS = {
    "exchange": "#9467bd",
    "queue": "#ff9896",
    "topic": "#17becf",
    "stream": "#bcbd22",
    "service": "#2ca02c",
}
OVER = "#d62728"  # an edge with a hop over its latency budget

NOTE = (
    "Messages per edge: on a flow's hops, the chains timed across each hop and their p99 "
    "(the verdict's latency); on retry and dead-letter edges, the messages each flow's "
    "chains took there; hover a consume edge for the messages at that step and their "
    "redeliveries. Hover an edge for what it carries."
)
UNKNOWN = (
    " An edge says '?' where the verdict holds no count for it: no flow passes there, "
    "or the verdict was made before route counts."
)


@dataclass
class Edge:
    kind: str
    labels: list[str] = field(default_factory=list)  # drawn on the edge
    about: list[str] = field(default_factory=list)  # shown on hover
    over: bool = False
    counted: bool = False  # some flow's route counts cover it (perhaps at 0)


def side_channels(topology: Topology) -> dict[str, str]:
    """Channel -> the channel whose retries or dead letters it carries."""
    steps = {s.channel for f in topology.flows.values() for s in f.steps}
    out: dict[str, str] = {}
    for name, ch in topology.channels.items():
        carried = list(ch.retry_channels)
        if ch.dead_letter_channel:
            carried.append(ch.dead_letter_channel)
        carried += dead_letter_path(topology, name)
        for c in carried:
            if c != name and c not in steps and c in topology.channels:
                out.setdefault(c, name)
    return out


def depths(topology: Topology, side: dict[str, str]) -> dict[str, int]:
    """Column of each main channel: its longest path from a channel nothing leads to,
    over flow hops, then service hand-offs, then bindings; an edge closing a cycle is
    left out (a binding back to where a service publishes, say)."""
    main = [c for c in topology.channels if c not in side]
    after: dict[str, set[str]] = {c: set() for c in main}

    def reaches(a: str, b: str) -> bool:
        todo, seen = [a], {a}
        while todo:
            n = todo.pop()
            if n == b:
                return True
            for m in after[n] - seen:
                seen.add(m)
                todo.append(m)
        return False

    def link(a: str, b: str) -> None:
        if a != b and a in after and b in after and not reaches(b, a):
            after[a].add(b)

    for flow in topology.flows.values():
        for up, down in pairwise(flow.steps):
            link(up.channel, down.channel)
    for svc in topology.services.values():
        for c in svc.consumes:
            for p in svc.publishes:
                link(c.channel, p)
    for name, ch in topology.channels.items():
        if isinstance(ch, Queue):
            for b in ch.bindings:
                link(b.exchange, name)
    depth = dict.fromkeys(main, 0)
    for _ in main:  # longest paths in a DAG: settles within len(main) rounds
        changed = False
        for a in main:
            for z in after[a]:
                if depth[z] < depth[a] + 1:
                    depth[z] = depth[a] + 1
                    changed = True
        if not changed:
            break
    return depth


def layout(topology: Topology) -> dict[Node, tuple[float, float]]:
    """Where each node goes: (column, -row)."""
    side = side_channels(topology)
    depth = depths(topology, side)

    def root(c: str) -> str:
        seen = {c}
        while c in side and side[c] not in seen:
            c = side[c]
            seen.add(c)
        return c

    col: dict[Node, int] = {}
    order: list[Node] = []
    for (
        name
    ) in topology.channels:  # each main channel, then what carries its retries and dead letters
        if name in side:
            continue
        order.append(("channel", name))
        col[("channel", name)] = 2 * depth[name]
        for s in topology.channels:
            if s in side and root(s) == name:
                order.append(("channel", s))
                col[("channel", s)] = 2 * depth[name]
    for name, svc in topology.services.items():
        consumed = [
            col[("channel", c.channel)] for c in svc.consumes if ("channel", c.channel) in col
        ]
        published = [col[("channel", p)] for p in svc.publishes if ("channel", p) in col]
        node: Node = ("service", name)
        col[node] = max(consumed) + 1 if consumed else min(published, default=0) - 1
        order.append(node)
    rows: dict[int, int] = {}
    out: dict[Node, tuple[float, float]] = {}
    for node in order:
        x = col[node]
        out[node] = (float(x), -float(rows.get(x, 0)))
        rows[x] = rows.get(x, 0) + 1
    return out


def edges(topology: Topology, verdict: Verdict) -> dict[tuple[Node, Node], Edge]:
    out: dict[tuple[Node, Node], Edge] = {}

    def edge(a: Node, b: Node, kind: str) -> Edge:
        return out.setdefault((a, b), Edge(kind))

    channels = topology.channels
    for name, svc in topology.services.items():
        for c in svc.consumes:
            if c.channel in channels:
                e = edge(("channel", c.channel), ("service", name), "consume")
                e.about.append(
                    f"{name} consumes {c.channel}" + (f" (group {c.group})" if c.group else "")
                )
        for p in svc.publishes:
            if p in channels:
                edge(("service", name), ("channel", p), "publish").about.append(
                    f"{name} publishes to {p}"
                )
    for name, ch in channels.items():
        if isinstance(ch, Queue):
            for b in ch.bindings:
                if b.exchange in channels:
                    e = edge(("channel", b.exchange), ("channel", name), "route")
                    e.about.append(f"binding {b.key or '(no key)'}")
        for r in ch.retry_channels:
            if r in channels and r != name:
                edge(("channel", name), ("channel", r), "retry").about.append(f"retries of {name}")
        dead = [ch.dead_letter_channel] if ch.dead_letter_channel else []
        dead += dead_letter_path(topology, name)[:1]
        for d in dead:
            if d in channels and d != name:
                e = edge(("channel", name), ("channel", d), "dead letter")
                e.about.append(f"dead letters of {name}")
    flows = {f.flow: f for f in verdict.flows}
    for fname, flow in topology.flows.items():
        fv = flows.get(fname)
        if fv is None:
            continue
        _hops(topology, fname, flow.steps, fv, out, edge)
        if fv.routes is None:  # a verdict from before route counts
            _dead_letters(topology, fname, [s.channel for s in flow.steps], fv, out)
        else:
            _routes(topology, fname, {s.name or s.channel: s.channel for s in flow.steps}, fv, out)
    for e in out.values():
        if e.kind in ("retry", "dead letter") and not e.labels:
            what = "retries" if e.kind == "retry" else "dead letters"
            e.labels = [f"{what} 0" if e.counted else f"{what} ?"]
            if not e.counted:
                e.about.append("no count of it in the verdict")
    return out


def note(topology: Topology, verdict: Verdict) -> str:
    """What the picture's edges say, for the page; '?' explained only where drawn."""
    unknown = any(
        label.endswith(" ?") for e in edges(topology, verdict).values() for label in e.labels
    )
    return NOTE + (UNKNOWN if unknown else "")


def _routes(
    topology: Topology,
    fname: str,
    channel_of: dict[str, str],
    fv: FlowVerdict,
    out: dict[tuple[Node, Node], Edge],
) -> None:
    """A flow's route counts on the edges that carry them: retries on a step's retry
    edges, dead letters on its dead-letter edge (the most seen at any channel of its
    dead-letter path: each dead letter passes all of them), the messages and
    redeliveries at a step on the edges of its consumers."""
    routes = fv.routes or []

    def at(role: str, channels: list[str], step_channel: str) -> int | None:
        """The most messages seen at one of ``channels`` in ``role`` from steps on
        ``step_channel``; None when the flow counts none of them."""
        per: dict[str, int] = {}
        for r in routes:
            if (
                r.role == role
                and r.channel in channels
                and channel_of.get(r.step or "") == step_channel
            ):
                per[r.channel] = per.get(r.channel, 0) + r.messages
        return max(per.values()) if per else None

    def put(e: Edge, n: int, what: str, suffix: str = "") -> None:
        e.counted = True
        if n:  # a flow that saw none here is hovered only
            e.labels.append(f"{fname}: {n}{suffix}")
        e.about.append(f"{fname}: {n} {what}")

    steps = set(channel_of.values())
    for (a, b), e in out.items():
        x, y = a[1], b[1]
        if e.kind == "retry":
            n = at("retry", [y], x)
            if n is not None:
                put(e, n, f"retries on {y}")
        elif e.kind == "dead letter":
            ch = topology.channels[x]
            path = [ch.dead_letter_channel] if ch.dead_letter_channel else []
            path += dead_letter_path(topology, x)
            n = at("dead_letter", path, x)
            if n is not None:
                put(e, n, f"dead letters of {x}")
            retried = at("retry", [y], x)  # a dead-letter exchange that leads to retries
            if retried is not None:
                put(e, retried, f"retries through {y}", " retries")
            unsaid = sum(
                r.messages
                for r in routes
                if r.role == "dead_letter" and r.step is None and r.channel in path
            )
            if unsaid and x in steps:
                e.about.append(f"{fname}: {unsaid} dead letters that did not say where they died")
        elif e.kind == "consume":
            for r in routes:
                if r.role == "step" and r.channel == x and r.step is not None:
                    if r.redelivered:
                        e.labels.append(f"{fname}: {r.redelivered} redelivered")
                    again = f", {r.redelivered} redelivered" if r.redelivered else ""
                    e.about.append(f"{fname} at {r.step}: {r.messages} messages{again}")


def _hops(
    topology: Topology,
    fname: str,
    steps: list[Step],
    fv: FlowVerdict,
    out: dict[tuple[Node, Node], Edge],
    edge: Callable[[Node, Node, str], Edge],
) -> None:
    """Each hop's figures on the edge that carries it: the hand-off of a service that
    consumes the first channel and publishes to the second, else the binding, else a
    hop edge of its own."""
    hops = [lat for lat in fv.latency if lat.hop != "end-to-end"]
    for (up, down), lat in zip(pairwise(steps), hops, strict=False):
        a, b = up.channel, down.channel
        if a not in topology.channels or b not in topology.channels:
            continue
        via = next(
            (
                name
                for name, svc in topology.services.items()
                if b in svc.publishes and any(c.channel == a for c in svc.consumes)
            ),
            None,
        )
        if via is not None:
            e = out[(("service", via), ("channel", b))]
        elif (("channel", a), ("channel", b)) in out:
            e = out[(("channel", a), ("channel", b))]
        else:
            e = edge(("channel", a), ("channel", b), "hop")
        p99 = f", p99 {ms(lat.stats.p99_ms)} ms" if lat.stats.p99_ms is not None else ""
        if lat.stats.count or not e.labels:  # a flow that saw nothing here is hovered only
            e.labels.append(f"{fname}: {lat.stats.count}{p99}")
        e.about.append(f"{fname} {lat.hop}: {lat.stats.count} chains timed{p99}")
        e.over = e.over or not lat.passed


def _dead_letters(
    topology: Topology,
    fname: str,
    steps: list[str],
    fv: FlowVerdict,
    out: dict[tuple[Node, Node], Edge],
) -> None:
    """A flow's dead letters on the route they took, when its steps have only one."""
    routes = [(a, b) for (a, b), e in out.items() if e.kind == "dead letter" and a[1] in steps]
    if not fv.dead_lettered:
        return
    if len(routes) == 1:
        e = out[routes[0]]
        e.labels.append(f"{fname}: {fv.dead_lettered}")
        e.about.append(f"{fname}: {fv.dead_lettered} chains dead-lettered")
    else:
        for r in routes:
            out[r].about.append(
                f"{fname}: {fv.dead_lettered} dead-lettered over {len(routes)} routes, "
                "how many on each is not in the verdict"
            )


def picture(topology: Topology, verdict: Verdict) -> Model | None:
    """The graph as one bokeh plot; None for a topology with no channel."""
    from bokeh.models import ColumnDataSource, HoverTool, Range1d
    from bokeh.models.annotations import Arrow, LabelSet, VeeHead
    from bokeh.plotting import figure

    places = layout(topology)
    if not places:
        return None
    links = edges(topology, verdict)
    xs = [x for x, _ in places.values()]
    ys = [y for _, y in places.values()]
    width = max(800, 110 * int(max(xs) - min(xs) + 2))
    height = 190 + 100 * int(max(ys) * -1 + 1)  # the legend below takes some
    left, right, bottom, top = min(xs) - 0.8, max(xs) + 0.8, min(ys) - 0.7, 0.9
    fig = figure(
        x_range=Range1d(start=left, end=right),
        y_range=Range1d(start=bottom, end=top),
        width=width,
        height=height,
        tools="pan,wheel_zoom,reset,save",
        toolbar_location="right",
    )
    fig.axis.visible = False
    fig.grid.visible = False
    # px per data unit: each edge's ends stop a few pixels short of its nodes
    sx = width / (right - left)
    sy = height / (top - bottom)
    # edge labels: above an edge across, beside one down a column
    across: dict[str, list[Any]] = {"x": [], "y": [], "text": [], "color": []}
    down: dict[str, list[Any]] = {"x": [], "y": [], "text": [], "color": []}
    spots: dict[str, list[Any]] = {"x": [], "y": [], "about": []}  # where hovering tells
    for kind, (color, dash, legend) in EDGE_STYLES.items():
        data: dict[str, list[Any]] = {
            k: [] for k in ("x0", "y0", "x1", "y1", "cx0", "cy0", "cx1", "cy1", "color")
        }
        for (a, b), e in links.items():
            if e.kind != kind:
                continue
            (x0, y0), (x1, y1) = places[a], places[b]
            # back along a row, or over a node of it: arched over the row
            arched = y0 == y1 and (
                x1 < x0
                or any(y == y0 and min(x0, x1) < x < max(x0, x1) for x, y in places.values())
            )
            # down a column over a node of it: bowed to the left
            bowed = x0 == x1 and any(
                x == x0 and min(y0, y1) < y < max(y0, y1) for x, y in places.values()
            )
            if bowed:
                shift = 14 / sx
                ends = (x0 - shift, y0, x1 - shift, y1)
                controls = (x0 - 0.6, y0, x1 - 0.6, y1)
                mid = (x0 - 0.45, (y0 + y1) / 2)
            elif arched:
                lift = 14 / sy
                ends = (x0, y0 + lift, x1, y1 + lift)
                controls = (x0, y0 + 0.55, x1, y1 + 0.55)
                mid = ((x0 + x1) / 2, y0 + 0.41)
            else:
                dx, dy = (x1 - x0) * sx, (y1 - y0) * sy
                pull = min(14 / max((dx * dx + dy * dy) ** 0.5, 1.0), 0.4)
                ends = (
                    x0 + (x1 - x0) * pull,
                    y0 + (y1 - y0) * pull,
                    x1 - (x1 - x0) * pull,
                    y1 - (y1 - y0) * pull,
                )
                ax, ay, bx, by = ends
                controls = (  # on the line: straight, and the head points along it
                    ax + (bx - ax) / 3,
                    ay + (by - ay) / 3,
                    ax + 2 * (bx - ax) / 3,
                    ay + 2 * (by - ay) / 3,
                )
                mid = ((x0 + x1) / 2, (y0 + y1) / 2)
            for k, v in zip(("x0", "y0", "x1", "y1"), ends, strict=True):
                data[k].append(v)
            for k, v in zip(("cx0", "cy0", "cx1", "cy1"), controls, strict=True):
                data[k].append(v)
            data["color"].append(OVER if e.over else color)
            spots["x"].append(mid[0])
            spots["y"].append(mid[1])
            spots["about"].append("; ".join(e.about) or f"{a[1]} -> {b[1]}")
            if e.labels:
                into = down if abs(x1 - x0) < 0.3 and not bowed else across
                into["x"].append(mid[0])
                into["y"].append(mid[1])
                into["text"].append("\n".join(e.labels))
                into["color"].append(OVER if e.over else "#444444")
        if not data["x0"]:
            continue
        source = ColumnDataSource(data)
        fig.bezier(
            "x0",
            "y0",
            "x1",
            "y1",
            "cx0",
            "cy0",
            "cx1",
            "cy1",
            source=source,
            color="color",
            line_width=2,
            line_dash=dash,
            legend_label=legend,
        )
        bodyless: dict[str, Any] = {"line_alpha": 0.0}  # the curve is the body
        fig.add_layout(
            Arrow(
                end=VeeHead(size=8, line_color=color, fill_color=color),
                x_start="cx1",
                y_start="cy1",
                x_end="x1",
                y_end="y1",
                source=source,
                **bodyless,
            )
        )
    if spots["x"]:
        hover = fig.scatter("x", "y", source=ColumnDataSource(spots), size=14, alpha=0.0)
        fig.add_tools(HoverTool(renderers=[hover], tooltips=[("", "@about")]))
    nodes: dict[str, list[Any]] = {
        "x": [],
        "y": [],
        "name": [],
        "what": [],
        "color": [],
        "marker": [],
    }
    for (what, name), (x, y) in places.items():
        nodes["x"].append(x)
        nodes["y"].append(y)
        nodes["name"].append(name)
        if what == "service":
            nodes["what"].append("service")
            nodes["color"].append(NODE_COLORS["service"])
            nodes["marker"].append("circle")
        else:
            ch = topology.channels[name]
            nodes["what"].append(f"{ch.kind} on {ch.broker}")
            nodes["color"].append(NODE_COLORS.get(ch.kind, "#1f77b4"))
            nodes["marker"].append("square")
    source = ColumnDataSource(nodes)
    dots = fig.scatter("x", "y", source=source, size=16, color="color", marker="marker")
    fig.add_layout(
        LabelSet(
            x="x",
            y="y",
            text="name",
            source=source,
            y_offset=-24,
            text_align="center",
            text_font_size="11px",
        )
    )
    if across["x"]:
        fig.add_layout(
            LabelSet(
                x="x",
                y="y",
                text="text",
                source=ColumnDataSource(across),
                y_offset=5,
                text_align="center",
                text_baseline="bottom",
                text_font_size="10px",
                text_color="color",
            )
        )
    if down["x"]:
        fig.add_layout(
            LabelSet(
                x="x",
                y="y",
                text="text",
                source=ColumnDataSource(down),
                x_offset=6,
                y_offset=-6,
                text_align="left",
                text_baseline="middle",
                text_font_size="10px",
                text_color="color",
            )
        )
    fig.add_tools(HoverTool(renderers=[dots], tooltips=[("", "@name: @what")]))
    if fig.legend:  # none for a lone channel: no edge
        box = fig.legend[0]  # under the plot, off the nodes
        fig.center.remove(box)
        fig.add_layout(box, "below")
        box.label_text_font_size = "9px"
        box.orientation = "horizontal"
    return fig

"""A chain's timeline, drawn one way for every reader: the terminal report, ``flowcheck
inspect`` and the failure messages of :mod:`flowcheck.testing`.

:func:`rows` turns what was seen (observations, or the checker's :class:`Seen`
references to them) into rows of cells; :func:`text` lays them out as plain text,
:func:`flowcheck.reporting.terminal.timeline_table` as a rich table. Each row is
one observation: when (ms into the recording and since the row before), what
happened, the channel, where on the broker, and the details that tell copies
apart. ``>`` marks the rows a finding is about, ``x`` a step that never came.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass

from flowcheck.checker.verdict import Seen
from flowcheck.observations import Observation
from flowcheck.reporting._common import ms

__all__ = ["COLUMNS", "RIGHT", "Row", "detail", "indent", "printable", "rows", "text", "where"]

Item = Observation | Seen
COLUMNS = ("", "at ms", "+ms", "kind", "channel", "where", "detail")
RIGHT = frozenset({1, 2})  # the columns of numbers
# C0 and C1 control characters, as escapes: a terminal would act on them.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


@dataclass(frozen=True)
class Row:
    mark: str  # ">" a finding is about it, "x" a step that never came, "" otherwise
    at: str
    delta: str
    kind: str
    channel: str
    where: str
    detail: str
    cut: bool = False  # the "... N more" row in place of a long timeline's middle

    def cells(self) -> tuple[str, ...]:
        return astuple(self)[: len(COLUMNS)]


def rows(
    items: Sequence[Item],
    *,
    start_ns: int = 0,
    evidence: Iterable[Item] = (),
    missing: Iterable[tuple[str, str, str]] = (),
    head: int | None = None,
    tail: int = 0,
) -> list[Row]:
    """The rows of a timeline of ``items``, in the order given.

    ``start_ns`` is where ``at ms`` counts from, for observations (a :class:`Seen`
    has its own). ``evidence`` is marked ``>``; each of ``missing`` (what, channel,
    why) is an ``x`` row at the end. A timeline longer than ``head`` + ``tail``
    rows is drawn as its two ends (None: whole).
    """
    marked = {_ident(e, start_ns) for e in evidence}
    out: list[Row] = []
    if not items:
        out.append(Row("", "", "", "(nothing seen)", "", "", "", cut=True))
    drawn: list[Item | int] = list(items)
    if head is not None and len(items) > head + tail:
        cut = len(items) - head - tail
        drawn = [*items[:head], cut, *(items[-tail:] if tail else ())]
    prev: float | None = None
    for o in drawn:
        if isinstance(o, int):
            out.append(Row("", "", "", f"... {o} more", "", "", "", cut=True))
            prev = None
            continue
        at = _at_ms(o, start_ns)
        out.append(
            Row(
                ">" if _ident(o, start_ns) in marked else "",
                f"{at:.1f}",
                "" if prev is None else ms(at - prev),
                _kind(o),
                printable(o.channel),
                printable(where(o)),
                printable(detail(o)),
            )
        )
        prev = at
    for what, channel, why in missing:
        out.append(Row("x", "", "", what, printable(channel), "", printable(why)))
    return out


def text(drawn: Sequence[Row]) -> list[str]:
    """The rows under a header, in columns two spaces apart; trailing blanks dropped."""
    cells = [COLUMNS, *(r.cells() for r in drawn)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return [
        "  ".join(
            c.rjust(widths[i]) if i in RIGHT else c.ljust(widths[i]) for i, c in enumerate(line)
        ).rstrip()
        for line in cells
    ]


def indent(lines: Iterable[str], n: int = 2) -> list[str]:
    return [(" " * n + line) if line else "" for line in lines]


def where(o: Item) -> str:
    """Where on the broker: partition@offset, the stream entry id, or the routing key."""
    if o.partition is not None or o.offset is not None:
        return f"p{o.partition if o.partition is not None else '?'}@{o.offset}"
    if o.entry_id is not None:
        return o.entry_id
    return o.routing_key or ""


def detail(o: Item) -> str:
    """Which delivery, by which group, why (a dead letter's reason), from where."""
    parts: list[str] = []
    if o.delivery_count is not None:
        parts.append(f"delivery {o.delivery_count}")
    if o.group:
        parts.append(f"group {o.group}")
    if o.reason:
        parts.append(o.reason)
    if o.origin:
        parts.append(f"from {o.origin}")
    return "; ".join(parts)


def printable(value: str) -> str:
    """Text from the messages (keys, routing keys, reasons) with control characters escaped."""
    return value.translate(_CONTROLS)


def _at_ms(o: Item, start_ns: int) -> float:
    return o.at_ms if isinstance(o, Seen) else (o.mono_ns - start_ns) / 1e6


def _kind(o: Item) -> str:
    return o.kind if isinstance(o, Seen) else o.kind.value


def _ident(o: Item, start_ns: int) -> tuple[str, str, float]:
    return (_kind(o), o.channel, round(_at_ms(o, start_ns), 1))

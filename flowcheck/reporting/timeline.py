"""A chain's timeline as plain text: one row per observation, in the order seen."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flowcheck.observations import Observation

__all__ = ["detail", "indent", "table", "where"]


def where(o: Observation) -> str:
    if o.partition is not None or o.offset is not None:
        return f"p{o.partition if o.partition is not None else '?'}@{o.offset}"
    if o.entry_id is not None:
        return o.entry_id
    return o.routing_key or ""


def detail(o: Observation) -> str:
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


def table(rows: Sequence[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [
            (c.rjust(widths[i]) if i in right else c.ljust(widths[i])) for i, c in enumerate(r)
        ]
        out.append("  ".join(cells).rstrip())
    return out


def indent(lines: Iterable[str], n: int = 2) -> list[str]:
    return [(" " * n + line) if line else "" for line in lines]

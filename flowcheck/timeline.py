"""Group recorded observations into per-chain timelines (for ``flowcheck inspect``). Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flowcheck.observations import Kind, Observation

NO_KEY = "(no correlation key)"


@dataclass
class Timeline:
    """Everything seen for one correlation key of one flow, in the order it was seen."""

    flow: str
    key: str
    items: list[Observation] = field(default_factory=list)

    @property
    def retries(self) -> int:
        """Deliveries after the first, by the broker's count where it keeps one: a tap that
        polls (the Redis pending list) can miss a delivery in between; the count cannot."""
        most: dict[tuple[Any, ...], int] = {}
        uncounted = 0
        for o in self.items:
            if o.kind is not Kind.DELIVERED and o.kind is not Kind.REDELIVERED:
                continue
            if o.delivery_count:
                one = (o.channel, o.fc_id, o.message_id, o.entry_id, o.partition, o.offset)
                most[one] = max(most.get(one, 0), o.delivery_count)
            elif o.kind is Kind.REDELIVERED:
                uncounted += 1
        return sum(n - 1 for n in most.values()) + uncounted

    @property
    def dead_letters(self) -> list[Observation]:
        return [o for o in self.items if o.kind == Kind.DEAD_LETTERED]

    def hops(self) -> list[tuple[Observation, int | None]]:
        """Each observation with the ms since the previous one (None for the first)."""
        out: list[tuple[Observation, int | None]] = []
        prev: int | None = None
        for o in self.items:
            out.append((o, None if prev is None else (o.mono_ns - prev) // 1_000_000))
            prev = o.mono_ns
        return out

    def as_dict(self, start_ns: int) -> dict[str, Any]:
        return {
            "flow": self.flow,
            "key": self.key,
            "retries": self.retries,
            "dead_letters": len(self.dead_letters),
            "observations": [
                {
                    "at_ms": (o.mono_ns - start_ns) / 1e6,
                    "since_previous_ms": hop,
                    **o.as_dict(),
                }
                for o, hop in self.hops()
            ],
        }


@dataclass
class Filter:
    flow: str | None = None
    key: str | None = None
    channel: str | None = None
    since_ns: int | None = None  # relative to the trace start
    until_ns: int | None = None

    def wants(self, o: Observation, start_ns: int) -> bool:
        rel = o.mono_ns - start_ns
        if self.since_ns is not None and rel < self.since_ns:
            return False
        if self.until_ns is not None and rel > self.until_ns:
            return False
        return self.channel is None or o.channel == self.channel


@dataclass
class Census:
    """The flows and channels a trace holds, whatever the filter: a filter that matches
    nothing can then be told apart from a typo."""

    flows: set[str] = field(default_factory=set)
    channels: set[str] = field(default_factory=set)


def build(
    observations: Iterable[Observation],
    start_ns: int,
    filt: Filter | None = None,
    census: Census | None = None,
) -> tuple[list[Timeline], list[Observation]]:
    """Timelines by (flow, key), in order of first appearance; and the tap gaps."""
    filt = filt or Filter()
    census = census or Census()
    chains: dict[tuple[str, str], Timeline] = {}
    gaps: list[Observation] = []
    for o in observations:
        if o.kind == Kind.GAP:
            gaps.append(o)
            continue
        census.channels.add(o.channel)
        census.flows.update(o.keys)
        if not filt.wants(o, start_ns):
            continue
        keys = o.keys.items() if o.keys else [("", NO_KEY)]
        for flow, key in keys:
            if filt.flow is not None and flow != filt.flow:
                continue
            if filt.key is not None and key != filt.key:
                continue
            chain = chains.get((flow, key))
            if chain is None:
                chain = chains[(flow, key)] = Timeline(flow, key)
            chain.items.append(o)
    for chain in chains.values():
        chain.items.sort(key=lambda o: o.mono_ns)
    return list(chains.values()), gaps

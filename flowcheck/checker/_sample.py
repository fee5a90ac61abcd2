"""A bounded, even sample of a flow's passing chains for reports (``FlowVerdict.passing``).

Reservoir sampling (algorithm R): every succeeded chain has the same chance to be kept,
whatever their number, in constant memory. The generator is seeded by the flow's name,
so the same trace gives the same sample on every check.
"""

from __future__ import annotations

import random
import zlib

from flowcheck.checker.verdict import PASSING_SAMPLE, Passed


class Reservoir:
    def __init__(self, flow: str, size: int = PASSING_SAMPLE) -> None:
        self.size = size
        self.seen = 0
        self.kept: list[tuple[int, Passed]] = []  # (decision index, chain)
        self.rng = random.Random(zlib.crc32(flow.encode()))

    def offer(self, key: str, took_ns: float | None) -> None:
        self.seen += 1
        took = None if took_ns is None else round(took_ns / 1e6, 3)
        if len(self.kept) < self.size:
            self.kept.append((self.seen, Passed(key=key, took_ms=took)))
            return
        slot = self.rng.randrange(self.seen)  # kept with chance size/seen
        if slot < self.size:
            self.kept[slot] = (self.seen, Passed(key=key, took_ms=took))

    def sample(self) -> list[Passed]:
        """The kept chains, in the order they were decided."""
        return [p for _, p in sorted(self.kept, key=lambda k: k[0])]

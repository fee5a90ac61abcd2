"""A flow's counts over the recording's time, in a bounded number of equal buckets.

Buckets start 1 ms wide; when a time falls past the last of :data:`MAX_BUCKETS`, each
pair of buckets merges into one twice as wide, until it fits. Merging adds counts, so
totals stay exact and memory stays bounded, however long the recording.
"""

from __future__ import annotations

from flowcheck.checker.verdict import OverTime

MAX_BUCKETS = 120
BASE_NS = 1_000_000  # the first buckets' width: 1 ms

# What is counted, in OverTime's field order.
FIELDS = ("started", "completed", "failed", "unknown", "retries", "dead_letters", "gave_up")


class Series:
    def __init__(self, start_ns: int) -> None:
        self.start_ns = start_ns
        self.width_ns = BASE_NS
        self.rows: dict[str, list[int]] = {f: [] for f in FIELDS}
        self.size = 0  # buckets in use, in every row

    def add(self, field: str, at_ns: int, n: int = 1) -> None:
        i = self.reach(at_ns)
        self.rows[field][i] += n

    def reach(self, at_ns: int) -> int:
        """The bucket of ``at_ns`` (before the start: the first), made to exist."""
        i = max(at_ns - self.start_ns, 0) // self.width_ns
        if i < self.size:
            return i
        while i >= MAX_BUCKETS:  # floor(floor(t / w) / 2) == floor(t / 2w)
            self._merge()
            i >>= 1
        grow = i + 1 - self.size
        if grow > 0:
            for row in self.rows.values():
                row.extend([0] * grow)
            self.size = i + 1
        return i

    def _merge(self) -> None:
        for name, row in self.rows.items():
            if len(row) % 2:
                row.append(0)
            self.rows[name] = [row[j] + row[j + 1] for j in range(0, len(row), 2)]
        self.size = (self.size + 1) // 2
        self.width_ns *= 2

    def model(self) -> OverTime:
        return OverTime(bucket_ms=self.width_ns / 1e6, **self.rows)

"""Latency figures: how long a hop took, on which clock, and the histogram they are kept in."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable

from hdrh.histogram import HdrHistogram

from flowcheck.checker.verdict import Histogram, Percentiles
from flowcheck.observations import Kind, Observation

_PUBLISHED = Kind.PUBLISHED

# How long a hop took (ns), on which clock, within what error (ms).
Span = tuple[int, str, float]

# Clocks of a latency sample: both ends on the brokers' millisecond clocks (Kafka
# CreateTime, Redis entry id); both on flowcheck's monotonic clock (its publish time,
# a tap's read time); or the upstream end on a broker's clock and the downstream on
# this host's wall clock (a mix: off by the two clocks' skew).
BROKER, MONO, MIXED = "broker_ms", "mono_ns", "broker_ms+wall"


class Hist:
    """Latency samples of one hop, in HdrHistogram (microseconds, 3 significant digits).

    Samples are first rounded down to the histogram's own resolution and counted
    in a dict, then handed over in bulk: the same histogram, far fewer calls into
    its pure-Python recorder. No sample is dropped uncounted: those that cannot be
    in the percentiles are counted apart, and each sample's clock and error bound
    are kept.
    """

    FLUSH_AT = 4096  # distinct values held before handing them to the histogram
    TOP_US = 3_600_000_000  # the histogram's range: an hour
    BINS = 40  # at most, in the verdict's histogram

    def __init__(self) -> None:
        self.hist = HdrHistogram(1, self.TOP_US, 3)
        self.pending: dict[int, int] = {}
        self.coarse: dict[int, int] = {}  # every sample, its value cut to 7 significant bits
        self.non_positive = 0
        self.unusable = 0
        self.clocks: Counter[str] = Counter()
        self.error_ms = 0.0

    def add(self, ns: int, clock: str = MONO, error_ms: float = 0.0) -> None:
        self.clocks[clock] += 1
        if error_ms > self.error_ms:
            self.error_ms = error_ms
        # On a millisecond clock a zero is a hop under a millisecond: a real sample.
        if ns < 0 or (ns == 0 and clock == MONO):
            self.non_positive += 1
            return
        us = ns // 1000
        if us > self.TOP_US:
            self.unusable += 1
            return
        shift = us.bit_length() - 11  # keep 11 significant bits: finer than 3 decimal digits
        if shift > 0:
            us = us >> shift << shift
        pending = self.pending
        pending[us] = pending.get(us, 0) + 1
        if len(pending) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        coarse = self.coarse
        for us, n in self.pending.items():
            self.hist.record_value(us, n)
            # Kept apart at 7 significant bits (under 1% apart) for bins(): walking the
            # histogram's own buckets costs ~20 ms a hop, and the pytest API asks often.
            shift = us.bit_length() - 7
            c = us >> shift << shift if shift > 0 else us
            coarse[c] = coarse.get(c, 0) + n
        self.pending.clear()

    def clock(self) -> str:
        """The clocks the samples were taken on, the most used first."""
        if not self.clocks:
            return "none"
        return ", ".join(c for c, _ in sorted(self.clocks.items(), key=lambda c: (-c[1], c[0])))

    def stats(self) -> Percentiles:
        self.flush()
        n = self.hist.get_total_count()
        if n == 0:
            return Percentiles(count=0, non_positive=self.non_positive, unusable=self.unusable)

        def ms(q: float) -> float:
            return round(float(self.hist.get_value_at_percentile(q)) / 1000, 3)

        return Percentiles(
            count=n,
            non_positive=self.non_positive,
            unusable=self.unusable,
            p50_ms=ms(50),
            p90_ms=ms(90),
            p95_ms=ms(95),
            p99_ms=ms(99),
            max_ms=round(float(self.hist.get_max_value()) / 1000, 3),
        )

    def bins(self) -> Histogram:
        """The samples in at most :attr:`BINS` log-spaced bins, from the lowest value
        equivalent to the smallest to past the largest; each sample is placed by its
        value cut to 7 significant bits, so one may fall a bin low near an edge."""
        self.flush()
        hist = self.hist
        if hist.get_total_count() == 0:
            return Histogram()
        lo = max(hist.get_lowest_equivalent_value(hist.get_min_value()), 1)
        hi = hist.get_highest_equivalent_value(hist.get_max_value()) + 1
        # Bins no finer than 1% apart: the few values of a small sample keep some width.
        n = max(1, min(self.BINS, math.ceil(math.log(hi / lo) / math.log(1.01))))
        edges = [lo * (hi / lo) ** (k / n) for k in range(n + 1)]
        counts = [0] * n
        for value, count in self.coarse.items():
            # Below the first edge only a zero (a sub-microsecond hop) or the smallest
            # value cut down: the first bin.
            i = bisect_right(edges, value) - 1
            counts[min(max(i, 0), n - 1)] += count
        edges[0] = min(edges[0], float(hist.get_min_value()))
        # Empty bins at the top or bottom say nothing: cut them.
        first = next(i for i, c in enumerate(counts) if c)
        last = max(i for i, c in enumerate(counts) if c)
        return Histogram(
            edges_ms=[float(f"{e / 1000:.6g}") for e in edges[first : last + 2]],
            counts=counts[first : last + 1],
        )


def span(
    up: Iterable[Observation], down: Iterable[Observation], late: tuple[float, float], last: bool
) -> Span:
    """(ns, clock, error bound in ms) from the first message at one step to the first (or,
    with ``last``, the last) at a later one. ``late``: how late each end's tap may read."""
    ups, downs = list(up), list(down)
    if len(ups) == 1 and len(downs) == 1:  # the common case, as below without the lists
        u, d = ups[0], downs[0]
        u_ms, d_ms = u.broker_ms, d.broker_ms
        if u_ms is not None and d_ms is not None:
            return (d_ms - u_ms) * 1_000_000, BROKER, 1.0
        if u.kind is _PUBLISHED:
            return d.mono_ns - u.mono_ns, MONO, late[1]
        if u_ms is not None and d.wall > 0:
            return round(d.wall * 1e9) - u_ms * 1_000_000, MIXED, 1.0 + late[1]
        return d.mono_ns - u.mono_ns, MONO, max(late)
    ub = [o.broker_ms for o in ups if o.broker_ms is not None]
    db = [o.broker_ms for o in downs if o.broker_ms is not None]
    whole_up = len(ub) == len(ups)
    if whole_up and db and len(db) == len(downs):
        return ((max(db) if last else min(db)) - min(ub)) * 1_000_000, BROKER, 1.0
    d = max(downs, key=mono) if last else min(downs, key=mono)
    published = [o.mono_ns for o in ups if o.kind is _PUBLISHED]
    if published:  # flowcheck's own publish: no tap read in between
        return d.mono_ns - min(published), MONO, late[1]
    if whole_up and d.wall > 0:
        return round(d.wall * 1e9) - min(ub) * 1_000_000, MIXED, 1.0 + late[1]
    return d.mono_ns - min(o.mono_ns for o in ups), MONO, max(late)


def mono(o: Observation) -> int:
    return o.mono_ns


def on(span: Span) -> str:
    """How a figure was taken, for messages: said when not on flowcheck's monotonic clock."""
    return "" if span[1] == MONO else f" (clock {span[1]}, within {span[2]:g}ms)"

"""What the verdict carries for plots: each flow's counts over the recording, in bounded
buckets, and each hop's samples in bins."""

from __future__ import annotations

import random

from history import MS, START, History

from flowcheck.checker import OverTime, check
from flowcheck.checker._hist import Hist
from flowcheck.checker._series import BASE_NS, FIELDS, MAX_BUCKETS, Series
from flowcheck.observations import Kind, Observation
from flowcheck.topology import loads

TOPOLOGY = """
brokers: {r: {kind: rabbitmq}, k: {kind: kafka}}
channels:
  orders: {broker: r, kind: exchange, type: topic}
  billing:
    broker: r
    kind: queue
    type: quorum
    bindings: [{exchange: orders, key: "#"}]
    delivery_limit: 2
    dead_letter: {exchange: dlx, key: b}
  dlx: {broker: r, kind: exchange, type: direct}
  dlq: {broker: r, kind: queue, bindings: [{exchange: dlx, key: b}]}
  pay: {broker: k, kind: topic}
flows:
  f:
    correlate: $.id
    steps: [orders, {channel: billing, retry: {max_attempts: 3}}, pay]
    deadline: 1s
    dead_letters:
      - {when: {payload: {$.poison: true}}, channel: dlq, reason: delivery_limit, attempts: 3}
"""


def nonzero(series: OverTime, field: str) -> dict[int, int]:
    return {i: n for i, n in enumerate(getattr(series, field)) if n}


def test_merging_keeps_every_count_in_its_bucket() -> None:
    rng = random.Random(7)
    series = Series(start_ns=0)
    times = sorted(rng.randrange(0, 10 * 3600 * 10**9) for _ in range(5000))
    sizes = []
    for t in rng.sample(times, len(times)):  # out of order, as chains are decided
        series.add("started", t)
        series.add("retries", t, 3)
        sizes.append(series.size)
    out = series.model()
    assert max(sizes) <= MAX_BUCKETS
    assert len(out.started) == series.size
    assert all(len(getattr(out, f)) == series.size for f in FIELDS)
    assert sum(out.started) == 5000
    assert sum(out.retries) == 15000
    width = series.width_ns
    assert width == BASE_NS * 2 ** round((width // BASE_NS).bit_length() - 1)  # doubled only
    assert out.bucket_ms == width / 1e6
    expected = [0] * series.size
    for t in times:
        expected[t // width] += 1
    assert out.started == expected


def test_long_recording_stays_bounded() -> None:
    series = Series(start_ns=START)
    series.add("completed", START - 5 * MS)  # before the start: the first bucket
    series.reach(START + 30 * 24 * 3600 * 10**9)  # a month
    assert series.size <= MAX_BUCKETS
    assert series.size * series.width_ns > 30 * 24 * 3600 * 10**9
    assert series.model().completed[0] == 1


def test_counts_of_a_small_recording() -> None:
    h = History("f")
    # done: through at 0 ms (1000 ms after the recording started), paid at 20
    h.at(0).routed("orders", "done")
    h.routed("billing", "done")
    h.add(Kind.DELIVERED, "billing", "done", delivery_count=1)
    h.at(20).routed("pay", "done", partition=0, offset=0)
    # lost: never paid
    h.at(5000).routed("orders", "lost")
    h.routed("billing", "lost")
    # poison: delivered three times, dead-lettered as the flow expects
    body = {"id": "poison", "poison": True}
    h.at(10_000).routed("orders", "poison", body)
    h.routed("billing", "poison", body)
    for n in (1, 2, 3):
        kind = Kind.DELIVERED if n == 1 else Kind.REDELIVERED
        h.at(10_000 + 100 * n).add(kind, "billing", "poison", body, delivery_count=n)
    h.at(10_400).add(
        Kind.DEAD_LETTERED, "dlq", "poison", body, reason="delivery_limit", origin="billing"
    )
    # hidden: a tap gap on pay while it could have moved
    h.at(20_000).routed("orders", "hidden")
    h.routed("billing", "hidden")
    gap = Observation(
        kind=Kind.GAP,
        broker="k",
        channel="pay",
        mono_ns=START + 20_000 * MS,
        wall=0,
        until_ns=START + 20_500 * MS,
    )
    start = START - 1000 * MS
    verdict = check(loads(TOPOLOGY), [*h.sorted(), gap], start_ns=start, end_ns=START + 60_000 * MS)
    flow = verdict.flows[0]
    assert (flow.chains, flow.succeeded, flow.failed, flow.unknown) == (4, 2, 1, 1)
    series = flow.over_time
    assert series is not None
    assert series.bucket_ms == 512  # 61 s in at most 120 buckets: 1 ms doubled 9 times
    assert len(series.started) == 61_000 // 512 + 1  # up to the recording's end

    def at(ms: float) -> int:  # ms after START, as History counts them
        return int((1000 + ms) // 512)

    assert nonzero(series, "started") == {at(0): 1, at(5000): 1, at(10_000): 1, at(20_000): 1}
    assert nonzero(series, "completed") == {at(20): 1, at(10_400): 1}
    assert nonzero(series, "failed") == {at(5000): 1}
    assert nonzero(series, "unknown") == {at(20_000): 1}
    assert nonzero(series, "retries") == {at(10_200): 1, at(10_300): 1}
    assert at(10_200) != at(10_300)  # each retry at its own redelivery
    assert nonzero(series, "dead_letters") == {at(10_400): 1}
    assert nonzero(series, "gave_up") == {}


def test_expected_keys_never_seen_are_in_no_bucket() -> None:
    h = History("f")
    h.at(0).routed("orders", "seen")
    h.routed("billing", "seen")
    h.at(20).routed("pay", "seen", partition=0, offset=0)
    verdict = check(loads(TOPOLOGY), h.sorted(), expected={"f": ["seen", "never"]})
    flow = verdict.flows[0]
    assert flow.chains == 2
    assert flow.failed == 1
    assert flow.over_time is not None
    assert sum(flow.over_time.started) == 1
    assert sum(flow.over_time.failed) == 0


def test_histogram_bins_hold_every_sample_in_the_percentiles() -> None:
    rng = random.Random(3)
    hist = Hist()
    for _ in range(20_000):
        hist.add(int(rng.lognormvariate(15, 1.5)))
    hist.add(0)  # zero on flowcheck's clock: left out, counted apart
    hist.add(-5)
    hist.add(Hist.TOP_US * 1000 + 10**9)  # beyond an hour
    stats, bins = hist.stats(), hist.bins()
    assert stats.count == 20_000
    assert stats.non_positive == 2
    assert stats.unusable == 1
    assert sum(bins.counts) == stats.count
    assert len(bins.counts) <= Hist.BINS
    assert len(bins.edges_ms) == len(bins.counts) + 1
    assert bins.edges_ms == sorted(set(bins.edges_ms))
    assert bins.counts[0]
    assert bins.counts[-1]
    assert stats.max_ms is not None
    assert bins.edges_ms[-1] >= stats.max_ms


def test_histogram_of_one_value_and_of_none() -> None:
    hist = Hist()
    for _ in range(3):
        hist.add(1_500_000)
    bins = hist.bins()
    assert bins.counts == [3]
    assert bins.edges_ms[0] <= 1.5 < bins.edges_ms[1]
    assert Hist().bins().counts == []


def test_latency_in_the_verdict_carries_its_bins() -> None:
    h = History("f")
    for i in range(50):
        h.at(i * 10).routed("orders", f"k{i}")
        h.at(i * 10 + 1 + i % 7).routed("billing", f"k{i}")
        h.at(i * 10 + 9).routed("pay", f"k{i}", partition=0, offset=i)
    verdict = check(loads(TOPOLOGY), h.sorted())
    for lat in verdict.flows[0].latency:
        assert lat.stats.count == 50
        assert sum(lat.histogram.counts) == 50, lat.hop

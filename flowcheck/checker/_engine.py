"""The checker: (topology, observations) -> verdict. Pure: no I/O, no broker client.

It reads observations once, in recording order, and keeps state only for the
chains still open: a chain is decided as soon as its deadline window has
passed on the recording's own clock, then forgotten but for its counts,
latencies (HdrHistogram), findings (the timelines of the first MAX_FINDINGS of
a flow only) and the expectations it left unjudged.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from hdrh.histogram import HdrHistogram

from flowcheck.checker._match import matches
from flowcheck.checker._schema import SchemaCheck
from flowcheck.checker.verdict import (
    CHAIN_KINDS,
    CHECKS,
    Cause,
    Check,
    Finding,
    FindingKind,
    FlowVerdict,
    Latency,
    Percentiles,
    Recording,
    Seen,
    Unjudged,
    Verdict,
)
from flowcheck.observations import Kind, Observation, payload_json
from flowcheck.topology._types import format_duration
from flowcheck.topology.model import (
    DeadLetterRule,
    Exchange,
    Flow,
    Queue,
    RetryPolicy,
    Stream,
    Topic,
    Topology,
)
from flowcheck.topology.routing import dead_letter_path

DEFAULT_WINDOW = timedelta(seconds=60)  # how long a chain may take when the flow sets no deadline
GRACE_NS = 2_000_000_000  # taps see one event at slightly different times: wait this much more
BACKOFF_TOLERANCE_NS = 150_000_000  # taps poll some brokers (Redis PEL): allow this much early
MAX_FINDINGS = 100  # per flow, kept with their timelines; the rest without (memory)
MAX_TIMELINE = 40  # observations kept per chain for reports
SCHEMA_MEMORY = 65_536  # messages remembered so that one message's copies are checked once

# What a channel is to a flow: the step whose retries it carries, whether it is a
# dead-letter channel, the steps it is the channel of.
_Route = tuple[int | None, bool, list[int] | None]

# Where a message stood in one broker order: (which order, place in it). Places are
# comparable only within one order: a Kafka partition (offset), a Redis stream (entry
# id), or the order in which the observations of one channel (of one kind) were fed.
_Order = tuple[Any, ...]
_Places = dict[_Order, tuple[int, ...]]
_RANK = {"offset": 0, "entry": 1, "fed": 2}  # the broker's own orders first

# Plain names for the kinds: enum attribute lookups cost a descriptor call each.
_PUBLISHED, _ROUTED, _UNROUTABLE = Kind.PUBLISHED, Kind.ROUTED, Kind.UNROUTABLE
_DELIVERED, _REDELIVERED, _CONSUMED = Kind.DELIVERED, Kind.REDELIVERED, Kind.CONSUMED
_DEAD_LETTERED, _GAP = Kind.DEAD_LETTERED, Kind.GAP


def _ns(d: timedelta) -> int:
    return int(d.total_seconds() * 1e9)


def identity(obs: Observation) -> tuple[Any, ...]:
    """What makes two observations the same message at one channel.

    The broker's position first: a consumer that republishes a message it already
    processed copies its x-flowcheck-id, but the copy gets a new offset or entry id.
    """
    if obs.offset is not None:
        return ("kafka", obs.partition, obs.offset)
    if obs.entry_id is not None:
        return ("stream", obs.entry_id)
    if obs.fc_id is not None:
        return ("fc", obs.fc_id)
    return ("obs", id(obs))  # a RabbitMQ copy without an id: each one is its own message


def _which(
    arrived: Mapping[tuple[Any, ...], Observation], ident: tuple[Any, ...], obs: Observation
) -> tuple[Any, ...] | None:
    """The identity under which this message already arrived, None if it has not. Copies of
    one message with and without a broker position (flowcheck's publish and a tap without
    one) are the same message."""
    if ident in arrived:
        return ident
    fc = obs.fc_id
    if fc is None or not arrived:
        return None
    if ident[0] == "fc":
        return next((k for k, o in arrived.items() if o.fc_id == fc), None)
    return ("fc", fc) if ("fc", fc) in arrived else None


def _place(obs: Observation, seq: int) -> tuple[_Order, tuple[int, ...]]:
    """Where ``obs`` stands in its broker's order; ``seq`` is its place in the feed."""
    if obs.offset is not None:
        return ("offset", obs.channel, obs.partition), (obs.offset,)
    if obs.entry_id is not None:
        ms, _, n = obs.entry_id.partition("-")
        if ms.isdigit() and n.isdigit():
            return ("entry", obs.channel), (int(ms), int(n))
    # One tap reads one channel in its broker's order (a RabbitMQ queue delivers in
    # order); flowcheck's own publishes are another order, in publish-confirm order.
    return ("fed", obs.channel, obs.kind.value), (seq,)


def _compare(a: _Places, b: _Places) -> int | None:
    """-1 if ``a`` came first, 1 if ``b`` did, in an order both have a place in; None when
    no order holds both, or they tie: a tie decides nothing."""
    for order in sorted(a.keys() & b.keys(), key=lambda o: (_RANK[o[0]], repr(o))):
        x, y = a[order], b[order]
        if x != y:
            return -1 if x < y else 1
    return None


def _merged(places: Mapping[tuple[Any, ...], _Places]) -> _Places:
    """The first place of any of a step's messages, per order."""
    out: _Places = {}
    for per in places.values():
        for order, at in per.items():
            if order not in out or at < out[order]:
                out[order] = at
    return out


@dataclass
class _Chain:
    key: str
    first_ns: int
    arrivals: list[dict[tuple[Any, ...], Observation]]  # per step: message -> first arrival
    retry_arrivals: list[list[Observation]]  # per step: arrivals on its retry channels
    deliveries: list[list[Observation]]  # per step: DELIVERED / REDELIVERED evidence
    consumed: list[bool]
    dead: list[Observation] = field(default_factory=list)
    unroutable: Observation | None = None
    sample: Observation | None = None
    sample_first: bool = False
    timeline: list[Observation] = field(default_factory=list)
    # per step: message -> its place in each broker order it was seen in (ordered flows)
    places: list[dict[tuple[Any, ...], _Places]] = field(default_factory=list)

    def reached(self) -> int:
        """Index of the last step with an arrival, -1 if none."""
        return max((i for i, a in enumerate(self.arrivals) if a), default=-1)


# Clocks of a latency sample: both ends on the brokers' millisecond clocks (Kafka
# CreateTime, Redis entry id); both on flowcheck's monotonic clock (its publish time,
# a tap's read time); or the upstream end on a broker's clock and the downstream on
# this host's wall clock (a mix: off by the two clocks' skew).
BROKER, MONO, MIXED = "broker_ms", "mono_ns", "broker_ms+wall"


class _Hist:
    """Latency samples of one hop, in HdrHistogram (microseconds, 3 significant digits).

    Samples are first rounded down to the histogram's own resolution and counted
    in a dict, then handed over in bulk: the same histogram, far fewer calls into
    its pure-Python recorder. No sample is dropped uncounted: those that cannot be
    in the percentiles are counted apart, and each sample's clock and error bound
    are kept.
    """

    FLUSH_AT = 4096  # distinct values held before handing them to the histogram
    TOP_US = 3_600_000_000  # the histogram's range: an hour

    def __init__(self) -> None:
        self.hist = HdrHistogram(1, self.TOP_US, 3)
        self.pending: dict[int, int] = {}
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
        for us, n in self.pending.items():
            self.hist.record_value(us, n)
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


def _span(
    up: Iterable[Observation], down: Iterable[Observation], late: tuple[float, float], last: bool
) -> tuple[int, str, float]:
    """(ns, clock, error bound in ms) from the first message at one step to the first (or,
    with ``last``, the last) at a later one. ``late``: how late each end's tap may read."""
    ups, downs = list(up), list(down)
    ub = [o.broker_ms for o in ups if o.broker_ms is not None]
    db = [o.broker_ms for o in downs if o.broker_ms is not None]
    whole_up = len(ub) == len(ups)
    if whole_up and db and len(db) == len(downs):
        return ((max(db) if last else min(db)) - min(ub)) * 1_000_000, BROKER, 1.0
    d = max(downs, key=_mono) if last else min(downs, key=_mono)
    published = [o.mono_ns for o in ups if o.kind is _PUBLISHED]
    if published:  # flowcheck's own publish: no tap read in between
        return d.mono_ns - min(published), MONO, late[1]
    if whole_up and d.wall > 0:
        return round(d.wall * 1e9) - min(ub) * 1_000_000, MIXED, 1.0 + late[1]
    return d.mono_ns - min(o.mono_ns for o in ups), MONO, max(late)


def _mono(o: Observation) -> int:
    return o.mono_ns


class _FlowState:
    def __init__(self, name: str, flow: Flow, topology: Topology, start_ns: int) -> None:
        self.name = name
        self.flow = flow
        self.topology = topology
        self.start_ns = start_ns
        self.labels = [s.name or s.channel for s in flow.steps]
        self.window_ns = _ns(flow.deadline or DEFAULT_WINDOW) + GRACE_NS
        self.channel_steps: dict[str, list[int]] = {}
        # Channels a step's retries pass through: its declared retry channels, and the
        # dead-letter exchange of a queue whose dead letters all go to those (the
        # RabbitMQ delay-queue pattern: reject -> DLX -> retry queue with TTL -> back).
        self.retry_of: dict[str, int] = {}
        self.retry_declared: set[str] = set()
        self.retry_visible: list[bool] = []  # does the step declare retry channels?
        self.dead_channels: set[str] = {r.channel for r in flow.dead_letters}
        self.leads_to: dict[str, set[str]] = {}  # dead-letter exchange -> the queues it reaches
        for i, step in enumerate(flow.steps):
            self.channel_steps.setdefault(step.channel, []).append(i)
            ch = topology.channels.get(step.channel)
            declared = list(ch.retry) if isinstance(ch, (Queue, Topic)) else []
            self.retry_visible.append(bool(declared))
            for r in declared:
                self.retry_of.setdefault(r, i)
                self.retry_declared.add(r)
            if isinstance(ch, (Topic, Stream)) and ch.dead_letter:
                self.dead_channels.add(ch.dead_letter)
            path = dead_letter_path(topology, step.channel)
            if path:
                dlx, reached = path[0], path[1:]
                if reached and all(q in declared for q in reached):
                    self.retry_of.setdefault(dlx, i)
                else:
                    self.dead_channels.add(dlx)
                    self.dead_channels.update(q for q in reached if q not in declared)
                    self.leads_to.setdefault(dlx, set()).update(reached)
        self.dead_channels -= set(self.retry_of)
        self.watched = set(self.channel_steps) | self.dead_channels | set(self.retry_of)
        # One lookup per observation: what its channel is to this flow (the step whose
        # retries it carries, a dead-letter channel, the steps it is the channel of).
        self.route: dict[str, _Route] = {
            ch: (self.retry_of.get(ch), ch in self.dead_channels, self.channel_steps.get(ch))
            for ch in self.watched
        }
        self.n = len(flow.steps)
        self.rules_read_payload = any(r.when.payload for r in flow.dead_letters)
        self.deadline_ns = [None if s.deadline is None else _ns(s.deadline) for s in flow.steps]
        self.flow_deadline_ns = None if flow.deadline is None else _ns(flow.deadline)
        self.match = [s.match for s in flow.steps]
        self.need = [s.count for s in flow.steps]
        self.is_queue = [isinstance(topology.channels.get(s.channel), Queue) for s in flow.steps]
        self.is_exchange = [
            isinstance(topology.channels.get(s.channel), Exchange) for s in flow.steps
        ]
        self.late = [topology.tap_late(s.channel) for s in flow.steps]
        self.late_ms = [0.0 if t is None else t[0].total_seconds() * 1000 for t in self.late]
        self.ordered = flow.ordering != "none"
        self.is_topic = [isinstance(topology.channels.get(s.channel), Topic) for s in flow.steps]
        self.topic_steps = [i for i, topic in enumerate(self.is_topic) if topic]
        self.policies = [s.retry or flow.retry for s in flow.steps]
        self.has_policy = any(p is not None for p in self.policies)
        # Steps whose attempts only the consumer group's deliveries show (a stream's
        # pending list, polled): a run waits for that evidence before it may end.
        self.await_deliveries = [
            i
            for i, (s, p) in enumerate(zip(flow.steps, self.policies, strict=True))
            if p is not None
            and isinstance(ch := topology.channels.get(s.channel), Stream)
            and ch.groups
        ]
        self.chain_failures = 0  # findings that fail a chain, so far
        self.track_decided = False  # remember decided keys (runs only)
        self.decided: set[str] = set()
        self.chains: dict[str, _Chain] = {}
        self.expiry: list[tuple[int, int, str]] = []
        self.seq = itertools.count()
        self.counts: Counter[str] = Counter()
        self.findings: list[Finding] = []
        self.full = 0  # findings given their timeline so far (the first MAX_FINDINGS)
        self.totals: Counter[str] = Counter()
        # (check, expectation, why) -> chains it could not be judged on
        self.unjudged: Counter[tuple[str, str, str]] = Counter()
        self.deciding: list[tuple[str, str, str]] | None = None  # the chain being decided's
        self.hops = [_Hist() for _ in flow.steps]  # hops[i]: step i-1 -> step i (0 unused)
        self.e2e = _Hist()
        # ordering: group -> [(step-0 ns, key, [places per step]), ...] of decided chains
        self.order_groups: dict[str, list[tuple[int, str, list[_Places]]]] = {}
        self.order_log: deque[tuple[int, str]] = deque()  # (start, group) in decision order
        self.gaps: list[Observation] = []

    # ------------------------------------------------------------ feeding

    def feed(self, obs: Observation, key: str, route: _Route, seq: int = 0) -> bool:
        """Take one observation of chain ``key`` on a channel this flow watches (``route``
        says how; ``seq`` is its place in the feed); True if it opened the chain."""
        chain = self.chains.get(key)
        opened = chain is None
        if chain is None:
            n = self.n
            chain = _Chain(
                key,
                obs.mono_ns,
                [{} for _ in range(n)],
                [[] for _ in range(n)],
                [[] for _ in range(n)],
                [False] * n,
            )
            if self.ordered:
                chain.places = [{} for _ in range(n)]
            self.chains[key] = chain
            heapq.heappush(self.expiry, (obs.mono_ns + self.window_ns, next(self.seq), key))
        timeline = chain.timeline
        if len(timeline) < MAX_TIMELINE:
            timeline.append(obs)
        kind = obs.kind
        retry, dead, steps = route
        if retry is not None and (kind is _ROUTED or kind is _PUBLISHED or kind is _DEAD_LETTERED):
            chain.retry_arrivals[retry].append(obs)
            return opened
        if dead and (kind is _DEAD_LETTERED or kind is _ROUTED):
            chain.dead.append(obs)
            return opened
        if steps is None:
            return opened
        if kind is _ROUTED or kind is _PUBLISHED:
            first = steps[0]
            if kind is _ROUTED and obs.delivery_count and self.is_queue[first]:
                # Back on its queue after a dead-letter round trip (x-death): a retry.
                chain.retry_arrivals[first].append(obs)
                return opened
            ident = identity(obs)
            if len(steps) == 1:  # the common case, kept lean
                if self.match[first] is not None and not matches(self.match[first], obs):
                    return opened
                target = first
                known = _which(chain.arrivals[first], ident, obs)
            else:
                fitting = [i for i in steps if matches(self.match[i], obs)]
                if not fitting:
                    return opened
                known = None
                for i in fitting:
                    known = _which(chain.arrivals[i], ident, obs)
                    if known is not None:
                        target = i
                        break
                else:
                    room = [i for i in fitting if len(chain.arrivals[i]) < self.need[i]]
                    target = room[0] if room else fitting[-1]
            if self.ordered:  # every copy tells the message's place in its own order
                order, at = _place(obs, seq)
                chain.places[target].setdefault(known or ident, {}).setdefault(order, at)
            if known is not None:
                return opened  # the same message seen again (published, then routed)
            chain.arrivals[target][ident] = obs
            # Dead-letter rules look at the message as it entered the flow.
            if chain.sample is None or (target == 0 and not chain.sample_first):
                chain.sample = obs
                chain.sample_first = target == 0
        elif kind is _DELIVERED or kind is _REDELIVERED:
            for i in steps:
                chain.deliveries[i].append(obs)
        elif kind is _CONSUMED:
            for i in steps:
                chain.consumed[i] = True
        elif kind is _UNROUTABLE:
            chain.unroutable = chain.unroutable or obs
        return opened

    def expire(self, now_ns: int) -> int:
        """Decide the chains whose window has passed; returns when the next one is due."""
        while self.expiry and self.expiry[0][0] < now_ns:
            _, _, key = heapq.heappop(self.expiry)
            chain = self.chains.pop(key, None)
            if chain is not None:
                self.decide(chain, ended=False)
                if self.track_decided:
                    self.decided.add(key)
        return self.expiry[0][0] if self.expiry else now_ns

    def finish(self, end_ns: int) -> None:
        for chain in list(self.chains.values()):
            ended = chain.first_ns + self.window_ns > end_ns
            self.decide(chain, ended=ended)
        self.chains.clear()

    # ------------------------------------------------------------ deciding

    def add(self, finding: Finding) -> None:
        self.totals[finding.kind.value] += 1
        if finding.kind in CHAIN_KINDS:
            self.chain_failures += 1
        self.findings.append(finding)

    def unjudge(self, check: str, expectation: str, why: str, chains: int = 1) -> None:
        """``expectation`` (of ``check``) could not be judged on ``chains`` chains, for ``why``.
        While a chain is decided, held until it is known whether the chain failed."""
        if self.deciding is not None:
            self.deciding.append((check, expectation, why))
        else:
            self.unjudged[(check, expectation, why)] += chains

    def seen(self, obs: Observation) -> Seen:
        return _seen(obs, self.start_ns)

    def finding(
        self,
        kind: FindingKind,
        chain: _Chain,
        message: str,
        *,
        step: int | None = None,
        seen: Iterable[Observation] = (),
        **extra: Any,
    ) -> Finding:
        return Finding(
            kind=kind,
            flow=self.name,
            key=chain.key,
            step=None if step is None else self.labels[step],
            message=message,
            seen=[self.seen(o) for o in seen],
            timeline=self.timeline(chain),
            **extra,
        )

    def timeline(self, chain: _Chain) -> list[Seen]:
        """The chain as seen, for the first MAX_FINDINGS findings of the flow (memory)."""
        if self.full >= MAX_FINDINGS:
            return []
        self.full += 1
        return [self.seen(o) for o in chain.timeline]

    def gap_during(self, chain: _Chain) -> bool:
        """Was a tap blind on this flow's channels while the chain could have been moving?

        A chain first seen past its first step may have started up to a window
        earlier, hidden by a gap that had ended before anything else was seen.
        """
        if not self.gaps:
            return False
        end = chain.first_ns + self.window_ns
        start = chain.first_ns if chain.arrivals[0] else chain.first_ns - self.window_ns
        chans = self.watched
        return any(
            g.channel in chans and g.mono_ns <= end and (g.until_ns or end) >= start
            for g in self.gaps
        )

    def rule_for(self, chain: _Chain) -> DeadLetterRule | None:
        if not self.flow.dead_letters:
            return None
        # The message as it entered the flow; a dead letter if its arrivals went unseen.
        sample = chain.sample or (chain.dead[0] if chain.dead else None)
        if sample is None:
            return None
        parsed = payload_json(sample.payload) if self.rules_read_payload else None
        return next((r for r in self.flow.dead_letters if matches(r.when, sample, parsed)), None)

    def decide(self, chain: _Chain, *, ended: bool) -> None:
        if (
            chain.sample is None
            and not chain.dead
            and chain.unroutable is None
            and not any(chain.retry_arrivals)
        ):
            # Deliveries or acks alone (a late ack of a chain decided before): no message
            # of this chain was seen arriving anywhere, so there is nothing to judge.
            return
        before = self.chain_failures
        self.deciding = []
        rule = self.rule_for(chain)
        complete = all(len(a) >= need for a, need in zip(chain.arrivals, self.need, strict=True))
        # Per hop (index: its later step; None where an end is missing): how long it took,
        # on which clock, within what error. Deadlines and latency judge the same figures.
        spans = self.spans(chain)
        undecided = False
        if rule is not None:
            undecided = self.decide_poison(chain, rule, ended)
            if not undecided:
                self.check_deadlines(chain, spans)
        elif chain.dead:
            d = chain.dead[0]
            self.add(
                self.finding(
                    FindingKind.DEAD_LETTER,
                    chain,
                    f"healthy message dead-lettered to {d.channel!r}"
                    + (f" ({d.reason})" if d.reason else ""),
                    seen=chain.dead[:3],
                    cause=Cause.DEAD_LETTERED,
                )
            )
        elif complete:
            self.check_deadlines(chain, spans)
        else:
            undecided = self.decide_incomplete(chain, ended)
        if not undecided:
            if self.flow.delivery != "at-least-once":
                self.check_duplicates(chain)
            if self.has_policy:
                self.check_retries(chain, rule)
            elif rule is not None and rule.attempts is not None:
                self.check_rule_attempts(chain, rule, rule.attempts)
            self.record_latency(spans)
            if self.flow.ordering != "none":
                self.record_order(chain)
        failed = self.chain_failures > before
        if not failed:  # a failed chain fails the flow's threshold whatever went unjudged
            self.unjudged.update(self.deciding)
        self.deciding = None
        self.counts["chains"] += 1
        if undecided and not failed:
            self.counts["unknown"] += 1
        elif failed:
            self.counts["failed"] += 1
        else:
            self.counts["succeeded"] += 1
        if chain.dead:
            self.counts["dead_lettered"] += 1

    def decide_poison(self, chain: _Chain, rule: DeadLetterRule, ended: bool) -> bool:
        there = [d for d in chain.dead if d.channel == rule.channel]
        if there:
            if rule.reason is not None and not any(d.reason == rule.reason for d in there):
                self.add(
                    self.finding(
                        FindingKind.DEAD_LETTER,
                        chain,
                        f"dead-lettered to {rule.channel!r} with reason {there[0].reason!r}, expected {rule.reason!r}",
                        seen=there[:1],
                    )
                )
            return False
        if chain.dead:
            d = chain.dead[0]
            on_its_way = any(rule.channel in self.leads_to.get(x.channel, ()) for x in chain.dead)
            if on_its_way and (ended or self.gap_during(chain)):
                return True  # seen on the exchange that leads there; its arrival may be unseen
            self.add(
                self.finding(
                    FindingKind.DEAD_LETTER,
                    chain,
                    f"dead-lettered to {d.channel!r}, expected {rule.channel!r}",
                    seen=[d],
                )
            )
            return False
        if ended or self.gap_during(chain):
            return True
        # Processed as if healthy: at its first attempt it moved on past the rule's step
        # (every step, for a rule without one) or was acknowledged there; retried and
        # then dropped or passed on is "never dead-lettered".
        n = self.n
        at = self._step_index(rule.step)
        where = range(n) if at is None else [at]
        retried = any(
            chain.retry_arrivals[j] or any((o.delivery_count or 1) > 1 for o in chain.deliveries[j])
            for j in where
        )
        if at is None:
            passed = all(len(a) >= c for a, c in zip(chain.arrivals, self.need, strict=True))
        else:
            passed = chain.consumed[at] or any(chain.arrivals[j] for j in range(at + 1, n))
        healthy = passed and not retried
        what = "was processed as if healthy" if healthy else "was never dead-lettered"
        self.add(
            self.finding(
                FindingKind.DEAD_LETTER,
                chain,
                f"message matching the dead-letter rule {what}; expected it in {rule.channel!r}",
                step=self._step_index(rule.step),
                next_step=rule.channel,
            )
        )
        return False

    def _step_index(self, label: str | None) -> int | None:
        if label is None:
            return None
        return self.labels.index(label) if label in self.labels else None

    def decide_incomplete(self, chain: _Chain, ended: bool) -> bool:
        reached = chain.reached()
        dropped = chain.unroutable is not None and reached <= 0
        # The broker drops an unroutable message at once: no need to wait for a deadline.
        if (ended or self.gap_during(chain)) and not dropped:
            return True
        if not chain.arrivals[0] and not dropped:
            if chain.first_ns - self.start_ns <= self.window_ns:
                return True  # it may have started before the recording did
            first = (
                next(iter(chain.arrivals[reached].values())) if reached >= 0 else chain.timeline[0]
            )
            self.add(
                self.finding(
                    FindingKind.UNEXPECTED,
                    chain,
                    f"seen at {self.labels[max(reached, 0)]!r} but never at the first step {self.labels[0]!r}",
                    step=max(reached, 0),
                    seen=[first],
                )
            )
            return False
        nxt = reached + 1
        if reached < 0 and chain.unroutable is not None:
            # Published to the step's channel but routed nowhere: the next step never came.
            at = self.channel_steps.get(chain.unroutable.channel, [0])[0]
            nxt = min(at + 1, len(self.flow.steps) - 1)
        while nxt < len(self.flow.steps) and len(chain.arrivals[nxt]) >= self.flow.steps[nxt].count:
            nxt += 1  # a fan-out step may have some but not all of its messages
        if nxt >= len(self.flow.steps):
            nxt = next(
                i
                for i, (a, s) in enumerate(zip(chain.arrivals, self.flow.steps, strict=True))
                if len(a) < s.count
            )
        last = chain.timeline[-1]
        if chain.unroutable is not None:
            cause, why = (
                Cause.UNROUTABLE,
                f"unroutable at {chain.unroutable.channel!r} ({chain.unroutable.reason or 'no route'})",
            )
            seen = [chain.unroutable]
        elif (
            reached >= 0
            and chain.deliveries[reached]
            and not chain.consumed[reached]
            and self._acks_visible(reached)
        ):
            d = chain.deliveries[reached][-1]
            cause, why = (
                Cause.STUCK_PENDING,
                f"stuck at {self.labels[reached]!r}: delivered {d.delivery_count or 1} time(s), never acknowledged",
            )
            seen = [d]
        else:
            deadline = format_duration(timedelta(seconds=(self.window_ns - GRACE_NS) / 1e9))
            cause, why = (
                Cause.TIMED_OUT,
                f"timed out after {self.labels[reached]!r}: no {self.labels[nxt]!r} within {deadline}",
            )
            seen = [last]
        self.add(
            self.finding(
                FindingKind.LOST,
                chain,
                why,
                step=nxt,
                seen=seen,
                cause=cause,
                next_step=self.labels[nxt],
            )
        )
        return False

    def _acks_visible(self, step: int) -> bool:
        """Do taps see acknowledgements on this step's channel (Kafka commits, Redis XACK)?"""
        return isinstance(
            self.topology.channels.get(self.flow.steps[step].channel), (Topic, Stream)
        )

    def spans(self, chain: _Chain) -> list[tuple[int, str, float] | None]:
        """Per hop i (step i-1 -> i), then end to end: (ns, clock, error ms), None where an
        end is missing (end to end: for complete chains only)."""
        arrivals, late = chain.arrivals, self.late_ms
        out: list[tuple[int, str, float] | None] = [None]
        for i in range(1, self.n):
            a, b = arrivals[i - 1], arrivals[i]
            out.append(
                _span(a.values(), b.values(), (late[i - 1], late[i]), False) if a and b else None
            )
        whole = arrivals[0] and all(len(a) >= n for a, n in zip(arrivals, self.need, strict=True))
        out.append(
            _span(arrivals[0].values(), arrivals[-1].values(), (late[0], late[-1]), True)
            if whole
            else None
        )
        return out

    def check_deadlines(self, chain: _Chain, spans: list[tuple[int, str, float] | None]) -> None:
        deadlines = self.deadline_ns
        for i in range(1, self.n):
            limit, span = deadlines[i], spans[i]
            if limit is None or span is None or span[0] <= limit:
                continue
            self.add(
                self.finding(
                    FindingKind.LATE,
                    chain,
                    f"{self.labels[i]!r} came {span[0] / 1e6:.0f}ms after {self.labels[i - 1]!r}; "
                    f"its deadline is {format_duration(self.flow.steps[i].deadline or timedelta())}"
                    + _on(span),
                    step=i,
                    seen=[next(iter(chain.arrivals[i].values()))],
                )
            )
        limit = self.flow_deadline_ns
        if limit is not None and chain.arrivals[0] and chain.arrivals[-1]:
            late = self.late_ms
            took = _span(
                chain.arrivals[0].values(), chain.arrivals[-1].values(), (late[0], late[-1]), True
            )
            if took[0] > limit:
                assert self.flow.deadline is not None
                self.add(
                    self.finding(
                        FindingKind.LATE,
                        chain,
                        f"chain took {took[0] / 1e6:.0f}ms end to end; the flow's deadline is {format_duration(self.flow.deadline)}"
                        + _on(took),
                    )
                )

    def check_duplicates(self, chain: _Chain) -> None:
        if self.flow.delivery == "at-least-once":
            return
        for i, (arrived, step) in enumerate(zip(chain.arrivals, self.flow.steps, strict=True)):
            if len(arrived) > self.need[i]:
                extra = list(arrived.values())
                self.add(
                    self.finding(
                        FindingKind.DUPLICATED,
                        chain,
                        f"{len(arrived)} messages at {self.labels[i]!r}, expected {step.count} ({self.flow.delivery})",
                        step=i,
                        seen=extra[:5],
                    )
                )

    def attempts(self, chain: _Chain, i: int) -> int | None:
        """Deliveries of step ``i``'s message, the first included; None if nothing tells.

        Observations carry the number of the delivery they saw (adapters turn
        x-delivery-count, PEL counts and retry headers into that); arrivals on a
        step's retry channels count one attempt each.
        """
        if self.gap_during(chain):
            return None  # a tap was blind for part of it: attempts may have gone unseen
        counts = [o.delivery_count for o in chain.deliveries[i] if o.delivery_count]
        retried = chain.retry_arrivals[i]
        counts += [o.delivery_count for o in retried if o.delivery_count]
        for o in chain.dead:
            if o.kind is _DEAD_LETTERED and self._origin_step(o) == i:
                if o.delivery_count:
                    counts.append(o.delivery_count)
                elif self.retry_visible[i]:
                    counts.append(1)  # every retry would have shown on a retry channel
        on_retry_channels = sum(1 for o in retried if o.channel in self.retry_declared)
        if on_retry_channels:
            counts.append(1 + on_retry_channels)
        if (chain.deliveries[i] or (self.retry_visible[i] and chain.arrivals[i])) and not counts:
            counts.append(1)  # delivered once, or no record on a retry channel: one attempt
        return max(counts) if counts else None

    def unseen(self, chain: _Chain, i: int) -> str:
        """Why the attempts at step ``i`` could not be seen."""
        if self.gap_during(chain):
            return "a tap gap covered the chain: attempts may have gone unseen"
        name = self.flow.steps[i].channel
        ch = self.topology.channels.get(name)
        if isinstance(ch, Queue):
            return (
                f"no delivery was seen on queue {name!r}: RabbitMQ shows deliveries only "
                "through its firehose (rabbitmqctl trace_on)"
            )
        if isinstance(ch, Topic):
            return (
                f"a Kafka topic shows attempts only as records on its retry topics, "
                f"and {name!r} declares none"
            )
        if isinstance(ch, Stream):
            return f"no delivery was seen in the consumer-group pending list of {name!r}"
        return f"no delivery was seen on {name!r}"

    def _origin_step(self, obs: Observation) -> int | None:
        """The step a dead letter came from: its channel, or one of that step's retry channels."""
        origin = obs.origin or ""
        steps = self.channel_steps.get(origin)
        return steps[0] if steps else self.retry_of.get(origin)

    def delivery_times(self, chain: _Chain, i: int) -> dict[int, int]:
        """When each delivery of step ``i`` was first seen, by its number.

        Only delivery evidence counts: a record on a Kafka retry topic is written
        at once and consumed after its backoff, so its arrival says nothing of
        when the attempt was made.
        """
        by_count: dict[int, int] = {}
        for o in chain.deliveries[i]:
            if o.delivery_count:
                by_count.setdefault(o.delivery_count, o.mono_ns)
        return by_count

    def check_retries(self, chain: _Chain, rule: DeadLetterRule | None) -> None:
        for i, step in enumerate(self.flow.steps):
            policy: RetryPolicy | None = step.retry or self.flow.retry
            if policy is None or self.is_exchange[i]:
                continue  # an exchange is never consumed: nothing is attempted there
            if not (chain.arrivals[i] or chain.deliveries[i] or chain.retry_arrivals[i]):
                continue  # the chain never got here: nothing was attempted
            expected_exact = (
                rule is not None
                and (rule.step is None or rule.step == self.labels[i])
                and any(d.channel == rule.channel for d in chain.dead)
            )
            n = self.attempts(chain, i)
            if n is None:
                where = self.labels[i]
                why = self.unseen(chain, i)
                self.unjudge(
                    "retries", f"retry max_attempts {policy.max_attempts} at {where!r}", why
                )
                if rule is not None and rule.attempts is not None and expected_exact:
                    self.unjudge(
                        "retries",
                        f"dead letter to {rule.channel!r} after {rule.attempts} attempts at {where!r}",
                        why,
                    )
                if policy.backoff is not None:
                    self.unjudge("retries", f"retry backoff at {where!r}", why)
                continue
            if n > policy.max_attempts:
                self.add(
                    self.finding(
                        FindingKind.RETRIES,
                        chain,
                        f"{n} attempts at {self.labels[i]!r}; the retry policy allows {policy.max_attempts}",
                        step=i,
                        seen=chain.deliveries[i][-1:] or chain.retry_arrivals[i][-1:],
                    )
                )
            elif (
                expected_exact
                and n < policy.max_attempts
                and (rule is None or rule.attempts is None)
                and (rule is None or rule.step is not None or len(self.flow.steps) == 1)
            ):
                self.add(
                    self.finding(
                        FindingKind.RETRIES,
                        chain,
                        f"dead-lettered after {n} attempts at {self.labels[i]!r}; the retry policy gives {policy.max_attempts}",
                        step=i,
                        seen=chain.dead[:1],
                    )
                )
            elif (
                rule is not None
                and rule.attempts is not None
                and expected_exact
                and (rule.step is None or rule.step == self.labels[i])
                and n != rule.attempts
            ):
                self.add(
                    self.finding(
                        FindingKind.RETRIES,
                        chain,
                        f"dead-lettered after {n} attempts at {self.labels[i]!r}; expected {rule.attempts}",
                        step=i,
                        seen=chain.dead[:1],
                    )
                )
            if policy.backoff is not None:
                self.check_backoff(chain, i, policy, n)

    def check_rule_attempts(self, chain: _Chain, rule: DeadLetterRule, want: int) -> None:
        """A dead-letter rule's ``attempts`` where the flow declares no retry policy: the
        dead letter came after exactly that many attempts at the step it died on."""
        there = [d for d in chain.dead if d.channel == rule.channel]
        if not there:
            return  # not dead-lettered where the rule says: a dead-letter finding, not this
        at = self._step_index(rule.step)
        if at is None:
            at = next((s for d in there if (s := self._origin_step(d)) is not None), None)
        if at is None and self.n == 1:
            at = 0
        expectation = f"dead letter to {rule.channel!r} after {want} attempts"
        if at is None:
            self.unjudge(
                "retries", expectation, "the dead letter does not say which step it died at"
            )
            return
        n = self.attempts(chain, at)
        if n is None:
            self.unjudge("retries", f"{expectation} at {self.labels[at]!r}", self.unseen(chain, at))
        elif n != want:
            self.add(
                self.finding(
                    FindingKind.RETRIES,
                    chain,
                    f"dead-lettered after {n} attempts at {self.labels[at]!r}; expected {want}",
                    step=at,
                    seen=there[:1],
                )
            )

    def check_backoff(self, chain: _Chain, i: int, policy: RetryPolicy, attempts: int) -> None:
        """Each retry at least its backoff after the attempt before it. Only a pair of
        consecutive deliveries seen at different times is judged: two seen in one read
        (the same time) say nothing of the wait between them."""
        assert policy.backoff is not None
        b = policy.backoff
        times = self.delivery_times(chain, i)
        failed, slack = self.failure_times(chain, i, attempts)
        wait = b.initial.total_seconds()
        unseen = 0
        for n in range(1, attempts):
            least = wait * (1 - b.jitter) * 1e9 - BACKOFF_TOLERANCE_NS
            earlier, later = times.get(n), times.get(n + 1)
            if earlier is not None and later is not None and later != earlier:
                took = later - earlier
                if took < least:
                    self.add(
                        self.finding(
                            FindingKind.BACKOFF,
                            chain,
                            f"attempt {n + 1} at {self.labels[i]!r} came {took / 1e6:.0f}ms after attempt {n}; the backoff asks for {wait * 1000:.0f}ms",
                            step=i,
                        )
                    )
                    return
            else:
                unseen += 1
                # When the attempts were made is unseen, but when they failed may be: a
                # retry was surely early if attempt n+1 failed sooner after attempt n did
                # than the wait before it. Later than that proves nothing: still unjudged.
                earlier, later = failed.get(n), failed.get(n + 1)
                if earlier is not None and later is not None and later != earlier:
                    took = later - earlier
                    if took < least - slack:
                        self.add(
                            self.finding(
                                FindingKind.BACKOFF,
                                chain,
                                f"attempt {n + 1} at {self.labels[i]!r} failed {took / 1e6:.0f}ms after attempt {n} did; the backoff asks for {wait * 1000:.0f}ms before it",
                                step=i,
                            )
                        )
                        return
            wait *= b.multiplier
            if b.max is not None:
                wait = min(wait, b.max.total_seconds())
        if unseen:
            self.unjudge(
                "retries",
                f"retry backoff at {self.labels[i]!r}",
                "when its attempts were made was not seen (only deliveries a tap sees one by "
                "one, on a RabbitMQ firehose or a Redis pending list, carry their times)",
            )

    def failure_times(self, chain: _Chain, i: int, attempts: int) -> tuple[dict[int, int], int]:
        """When each attempt at a Kafka topic step was seen to fail, by its number, and how far
        off (ns) those times may be. A consumer with retry topics writes a record there when
        an attempt fails (numbered for the attempt to come, Spring's retry_topic-attempts),
        and one on the dead-letter topic when the last one does. On the brokers' clock when
        every record carries it."""
        if not self.is_topic[i]:
            return {}, 0
        retries = [o for o in chain.retry_arrivals[i] if o.channel in self.retry_declared]
        dead = [o for o in chain.dead if self._origin_step(o) == i][:1]
        recs = retries + dead
        if not recs:
            return {}, 0
        if all(o.broker_ms is not None for o in recs):
            at = {id(o): (o.broker_ms or 0) * 1_000_000 for o in recs}
            slack = 1_000_000
        else:
            at = {id(o): o.mono_ns for o in recs}
            late = [self.topology.tap_late(ch) for ch in {o.channel for o in recs}]
            slack = max((_ns(t[0]) for t in late if t is not None), default=0)
        counted = all(o.delivery_count for o in retries)
        out: dict[int, int] = {}
        for n, o in enumerate(retries, 1):
            out.setdefault((o.delivery_count or 0) - 1 if counted else n, at[id(o)])
        for o in dead:
            out.setdefault(attempts, at[id(o)])
        return out, slack

    def record_latency(self, spans: list[tuple[int, str, float] | None]) -> None:
        for i in range(1, self.n):
            span = spans[i]
            if span is not None:
                self.hops[i].add(*span)
        if spans[-1] is not None:
            self.e2e.add(*spans[-1])

    # ------------------------------------------------------------ ordering

    def record_order(self, chain: _Chain) -> None:
        """Order comes from the brokers' own orders (Kafka offsets within a partition, Redis
        entry ids within a stream, the order one tap read a channel in), never from tap
        read times; two places in different orders, or a tie, decide nothing."""
        if not chain.arrivals[0]:
            return
        if len(chain.arrivals[0]) > 1:  # one message at the first step has nothing to overtake
            self.check_within(chain)
        if self.flow.ordering != "per-partition-key":
            return  # per-key: each chain is its own key, ordered within itself
        what = "ordering per-partition-key"
        group = next((o.kafka_key for a in chain.arrivals for o in a.values() if o.kafka_key), None)
        if group is None:
            # Partitions are a topic's: a chain that reached none has no partition order.
            if any(chain.arrivals[i] for i in self.topic_steps):
                self.unjudge("ordering", what, "no Kafka record key was seen on its messages")
            return
        places = [_merged(p) for p in chain.places]
        start = min(o.mono_ns for o in chain.arrivals[0].values())
        entries = self.order_groups.setdefault(group, [])
        unplaced = 0  # chains that reached a later step with this one, in no common order
        for _, other_key, other in entries:
            if other_key == chain.key:
                continue
            # Only steps both chains reached can show an overtaking (a chain that ended in
            # a dead letter early has nothing to compare there).
            shared = [i for i in range(1, len(places)) if places[i] and other[i]]
            if not shared:
                continue
            first = _compare(other[0], places[0])  # -1: the other one came first
            judged = False
            for i in shared:
                now = None if first is None else _compare(other[i], places[i])
                if now is None:
                    continue
                judged = True
                if now != first:
                    earlier, later = (other_key, chain.key) if now > 0 else (chain.key, other_key)
                    self.add(
                        self.finding(
                            FindingKind.REORDERED,
                            chain,
                            f"{later!r} overtook {earlier!r} at {self.labels[i]!r} "
                            f"(ordering {self.flow.ordering}, group {group!r})",
                            step=i,
                            seen=list(chain.arrivals[i].values())[:1],
                        )
                    )
                    break
            unplaced += not judged
        if unplaced:
            self.unjudge(
                "ordering",
                what,
                "it and another chain of its key reached a later step, but no broker order "
                "(one partition, one stream, one queue) held both at two steps",
            )
        entries.append((start, chain.key, places))
        self.order_log.append((start, group))
        # Forget chains that started two windows ago: nothing can overtake them any more.
        horizon = start - 2 * self.window_ns
        while self.order_log and self.order_log[0][0] < horizon:
            old_start, old_group = self.order_log.popleft()
            kept = self.order_groups.get(old_group)
            if kept:
                kept[:] = [e for e in kept if e[0] > old_start]
                if not kept:
                    del self.order_groups[old_group]

    def in_order(self, chain: _Chain, i: int) -> list[Observation] | None:
        """The messages at step ``i`` in a broker order every one of them has a place in;
        None when there is none."""
        places = chain.places[i]
        per = [places.get(ident, {}) for ident in chain.arrivals[i]]
        common = set.intersection(*(set(p) for p in per)) if per else set()
        if not common:
            return None
        order = min(common, key=lambda o: (_RANK[o[0]], repr(o)))
        ranked = sorted(
            zip(per, chain.arrivals[i].values(), strict=True), key=lambda p: p[0][order]
        )
        return [o for _, o in ranked]

    def check_within(self, chain: _Chain) -> None:
        """Several messages of one chain at a step: they keep their first-step order (by trace id)."""
        what = f"ordering {self.flow.ordering}"
        why = "its messages at {step!r} were not all seen in one broker order"
        first = self.in_order(chain, 0)
        if first is None:
            self.unjudge("ordering", what, why.format(step=self.labels[0]))
            return
        order = {o.trace_id: n for n, o in enumerate(first) if o.trace_id}
        if len(order) < 2:
            return
        for i in range(1, len(chain.arrivals)):
            there = self.in_order(chain, i)
            if there is None:
                if chain.arrivals[i]:
                    self.unjudge("ordering", what, why.format(step=self.labels[i]))
                continue
            seq = [order[o.trace_id] for o in there if o.trace_id in order]
            for a, b in itertools.pairwise(seq):
                if b < a:
                    self.add(
                        self.finding(
                            FindingKind.REORDERED,
                            chain,
                            f"messages of key {chain.key!r} reached {self.labels[i]!r} out of their first-step order",
                            step=i,
                            seen=list(chain.arrivals[i].values())[:2],
                        )
                    )
                    return

    # ------------------------------------------------------------ result

    def verdict(self, allow_unjudged: bool) -> FlowVerdict:
        lat: list[Latency] = []
        for i in range(1, len(self.flow.steps)):
            budget = self.flow.steps[i].latency
            hop = f"{self.labels[i - 1]} -> {self.labels[i]}"
            lat.append(self._latency(hop, self.hops[i], budget, self.late[i - 1], self.late[i]))
        lat.append(
            self._latency("end-to-end", self.e2e, self.flow.latency, self.late[0], self.late[-1])
        )
        decided = self.counts["succeeded"] + self.counts["failed"]
        rate = self.counts["succeeded"] / decided if decided else 1.0
        need = self.flow.success_rate if self.flow.success_rate is not None else 1.0
        rate_ok = rate >= need - 1e-12
        if not decided:
            seen, unknown = self.counts["chains"], self.counts["unknown"]
            self.unjudge(
                "chains",
                "its chains, and every expectation judged on them",
                f"no chain was decided: {seen} seen, {unknown} unknown",
                unknown,
            )
        if self.flow.error_rate is not None and decided:
            errors = self.counts["failed"] / decided
            if errors > self.flow.error_rate + 1e-12:
                rate_ok = False
                self.add(
                    Finding(
                        kind=FindingKind.THRESHOLD,
                        flow=self.name,
                        message=f"error rate {errors:.2%} is above {self.flow.error_rate:.2%}",
                    )
                )
        if not rate_ok and self.flow.success_rate is not None and rate < need:
            self.add(
                Finding(
                    kind=FindingKind.THRESHOLD,
                    flow=self.name,
                    message=f"success rate {rate:.2%} is below {need:.2%}",
                )
            )
        unjudged = [
            Unjudged(flow=self.name, expectation=what, why=why, chains=n)
            for (_, what, why), n in self.unjudged.items()
        ]
        checks = []
        for name, kinds in CHECKS.items():
            n = sum(self.totals[k.value] for k in kinds)
            if name == "chains":
                passed = rate_ok
                msg = (
                    f"{self.counts['succeeded']} of {decided} decided chains succeeded "
                    f"({rate:.2%}, need {need:.2%}); {self.counts['unknown']} unknown"
                    if decided
                    else f"no chain decided ({self.counts['chains']} seen, {self.counts['unknown']} unknown)"
                )
            else:
                # Chain failures are judged by the success threshold; the others by their count.
                per_chain = sum(self.totals[k.value] for k in kinds & CHAIN_KINDS)
                other = n - per_chain
                passed = other == 0 and (per_chain == 0 or rate_ok)
                msg = "no findings" if n == 0 else f"{n} finding(s)"
            mine = [
                (what, why, c) for (check, what, why), c in self.unjudged.items() if check == name
            ]
            if mine:
                passed = passed and allow_unjudged
                what, why, c = mine[0]
                on = f" on {c} chain(s)" if c else ""
                more = f" (and {len(mine) - 1} more)" if len(mine) > 1 else ""
                msg += f"; not judged: {what}{on}: {why}{more}"
            checks.append(Check(name=name, passed=passed, message=msg, findings=n))
        return FlowVerdict(
            flow=self.name,
            passed=all(c.passed for c in checks),
            chains=self.counts["chains"],
            succeeded=self.counts["succeeded"],
            failed=self.counts["failed"],
            unknown=self.counts["unknown"],
            dead_lettered=self.counts["dead_lettered"],
            checks=checks,
            latency=lat,
            # Findings about the whole flow first: never behind the chains' many.
            findings=sorted(
                self.findings,
                key=lambda f: (
                    f.key is not None,
                    f.seen[0].at_ms if f.seen else (f.timeline[0].at_ms if f.timeline else 0.0),
                ),
            ),
            findings_total=dict(self.totals),
            unjudged=unjudged,
        )

    def _latency(
        self, hop: str, hist: _Hist, budget: Any, *ends: tuple[timedelta, str] | None
    ) -> Latency:
        stats = hist.stats()
        budgets: dict[str, float] = {}
        passed = True
        # A sample is off by the last step's tap lateness less the first's: at most the larger.
        late = max((e for e in ends if e is not None), default=None, key=lambda e: e[0])
        late_ms = late[0].total_seconds() * 1000 if late else 0.0
        clock = hist.clock()
        if clock == MONO:
            tail = f"; a tap may see a step up to {late_ms:g}ms late, {late[1]}" if late else ""
        else:
            tail = f"; off by up to {hist.error_ms:g}ms" if hist.error_ms else ""
        if budget is not None:
            for p in ("p50", "p90", "p95", "p99", "max"):
                limit = getattr(budget, p)
                if limit is None:
                    continue
                budgets[p] = limit.total_seconds() * 1000
                have = getattr(stats, f"{p}_ms")
                if have is not None and have > budgets[p]:
                    passed = False
                    self.add(
                        Finding(
                            kind=FindingKind.LATENCY,
                            flow=self.name,
                            step=hop,
                            message=f"{hop}: {p} is {have:.1f}ms, over its budget of {budgets[p]:.1f}ms ({stats.count} samples, clock {clock}{tail})",
                        )
                    )
            # With no succeeded chain, the flow has failed, or judged nothing and says so.
            if stats.count == 0 and self.counts["succeeded"]:
                left = stats.non_positive + stats.unusable
                self.unjudge(
                    "latency",
                    f"latency budget of {hop}",
                    f"no sample: all {left} left out of the percentiles"
                    if left
                    else "no sample: no chain was seen at both of its ends",
                    0,
                )
        return Latency(
            hop=hop,
            clock=clock,
            error_ms=round(hist.error_ms, 3),
            stats=stats,
            budget_ms=budgets,
            passed=passed,
            tap_late_ms=late_ms,
            tap_late_why=late[1] if late else None,
        )


def _on(span: tuple[int, str, float]) -> str:
    """How a figure was taken, for messages: said when not on flowcheck's monotonic clock."""
    return "" if span[1] == MONO else f" (clock {span[1]}, within {span[2]:g}ms)"


def _seen(obs: Observation, start_ns: int) -> Seen:
    return Seen(
        kind=obs.kind.value,
        channel=obs.channel,
        at_ms=round((obs.mono_ns - start_ns) / 1e6, 3),
        fc_id=obs.fc_id,
        message_id=obs.message_id,
        trace_id=obs.trace_id,
        partition=obs.partition,
        offset=obs.offset,
        entry_id=obs.entry_id,
        delivery_count=obs.delivery_count,
        reason=obs.reason,
        broker=obs.broker,
        routing_key=obs.routing_key,
        group=obs.group,
        origin=obs.origin,
        until_ms=None if obs.until_ns is None else round((obs.until_ns - start_ns) / 1e6, 3),
    )


class Checker:
    """Feed observations in recording order, then :meth:`finish` for the verdict."""

    def __init__(
        self,
        topology: Topology,
        *,
        start_ns: int | None = None,
        expected: Mapping[str, Iterable[str]] | None = None,
        allow_unjudged: bool | None = None,
    ) -> None:
        self.topology = topology
        # None: as the topology's gate says.
        self.allow_unjudged = (
            topology.gate.allow_unjudged if allow_unjudged is None else allow_unjudged
        )
        self.start_ns = start_ns
        self.expected = {f: set(keys) for f, keys in (expected or {}).items()}
        self.tracking = expected is not None  # remember decided keys: settled() is asked
        self.flows: dict[str, _FlowState] = {}
        self.states: list[_FlowState] = []
        self.by_channel: dict[str, list[tuple[_FlowState, _Route]]] = {}
        self.gaps: list[Observation] = []
        self.count = 0
        self.now = 0
        self.schema = SchemaCheck(topology)
        self.schema_seen: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self.other: list[Finding] = []
        self._ready = False
        self.next_expiry = 0  # no flow has a chain to decide before this time

    def _init(self, start_ns: int) -> None:
        self._ready = True
        self.start_ns = start_ns
        for name, flow in self.topology.flows.items():
            state = _FlowState(name, flow, self.topology, start_ns)
            # A run (it passes ``expected``) asks settled() of every chain it started.
            state.track_decided = self.tracking
            self.flows[name] = state
            self.states.append(state)
            for ch in state.watched:
                self.by_channel.setdefault(ch, []).append((state, state.route[ch]))
        self._config_findings()

    def _config_findings(self) -> None:
        for state in self.flows.values():
            for i, step in enumerate(state.flow.steps):
                ch = self.topology.channels.get(step.channel)
                silent = (
                    isinstance(ch, Queue)
                    and ch.delivery_limit is not None
                    and ch.dead_letter is None
                ) or (
                    isinstance(ch, Stream)
                    and ch.delivery_limit is not None
                    and ch.dead_letter is None
                )
                if silent:
                    state.add(
                        Finding(
                            kind=FindingKind.CONFIG,
                            flow=state.name,
                            step=state.labels[i],
                            message=f"{step.channel!r} has a delivery limit but no dead-letter route: messages over the limit are lost silently",
                        )
                    )

    def feed(self, obs: Observation) -> None:
        if not self._ready:
            self._init(obs.mono_ns if self.start_ns is None else self.start_ns)
        self.count += 1
        at = obs.mono_ns
        if at > self.now:
            self.now = at
            if at > self.next_expiry:
                self.next_expiry = min([state.expire(at) for state in self.states], default=at)
        kind = obs.kind
        if kind is _GAP:
            self.gaps.append(obs)
            for state in self.states:
                state.gaps.append(obs)
            return
        channel = obs.channel
        if (
            (kind is _ROUTED or kind is _PUBLISHED)
            and channel in self.schema.channels
            and self._first_copy(obs)
        ):
            self._check_schema(obs)
        watching = self.by_channel.get(channel)
        if watching is None:
            return
        keys = obs.keys
        for state, route in watching:
            key = keys.get(state.name)
            if key is None:
                continue
            if state.feed(obs, key, route, self.count):
                # A new chain may be due before what was due so far.
                due = at + state.window_ns
                if due < self.next_expiry:
                    self.next_expiry = due
            if self.expected:
                waiting = self.expected.get(state.name)
                if waiting:
                    waiting.discard(key)

    def _check_schema(self, obs: Observation) -> None:
        problem = self.schema.check(obs)
        if problem is None:
            return
        states = [state for state, _ in self.by_channel.get(obs.channel, ())]
        finding = Finding(
            kind=FindingKind.SCHEMA,
            flow=states[0].name if states else None,
            key=next(iter(obs.keys.values()), None),
            step=obs.channel,
            message=problem,
            seen=[_seen(obs, self.start_ns or 0)],
        )
        if states:
            states[0].add(finding)
        else:
            self.other.append(finding)

    def _first_copy(self, obs: Observation) -> bool:
        """Is this the first copy of its message on its channel (flowcheck's publish and a
        tap's arrival are two)? Remembers the last SCHEMA_MEMORY messages only."""
        # By flowcheck id first: flowcheck's publish may lack the position the tap's copy has.
        who = ("fc", obs.fc_id) if obs.fc_id is not None else identity(obs)
        if who[0] == "obs":
            return True  # nothing tells two copies apart: check each
        ident = (obs.channel, *who)
        seen = self.schema_seen
        if ident in seen:
            return False
        seen[ident] = None
        if len(seen) > SCHEMA_MEMORY:
            seen.popitem(last=False)  # O(1), unlike deleting a plain dict's first key
        return True

    def advance(self, now_ns: int) -> None:
        """Let time pass without an observation: decide chains whose window is over."""
        if not self._ready:
            self._init(self.start_ns if self.start_ns is not None else now_ns)
        if now_ns > self.now:
            self.now = now_ns
            self.next_expiry = min([state.expire(now_ns) for state in self.states], default=now_ns)

    def settled(self, flow: str, key: str) -> bool:
        """Has this chain reached its end: every step, or the dead letter it should be?

        True also once it has been decided. A runner waits for this, not for a clock.
        """
        state = self.flows[flow]
        chain = state.chains.get(key)
        if chain is None:
            return key in state.decided
        if chain.unroutable is not None and chain.reached() <= 0:
            return True  # the broker dropped it: nothing more will come
        rule = state.rule_for(chain)
        if rule is not None:  # a poison chain ends in its dead letter, wherever it got to
            return any(d.channel == rule.channel for d in chain.dead)
        if any(
            chain.arrivals[i] and not (chain.deliveries[i] or chain.consumed[i])
            for i in state.await_deliveries
        ):
            return False  # its attempts are judged from deliveries the taps have yet to see
        return all(len(a) >= n for a, n in zip(chain.arrivals, state.need, strict=True))

    def attempts(self, flow: str, key: str, dead: Observation | None = None) -> int | None:
        """Deliveries of the message of the open chain ``key`` of ``flow``, the first
        included, as the retry checks count them: at the step the dead letter ``dead``
        died on, else the most at any step. None if nothing tells or no such chain is open."""
        state = self.flows.get(flow)
        chain = None if state is None else state.chains.get(key)
        if state is None or chain is None:
            return None
        step = None if dead is None else state._origin_step(dead)
        steps = range(state.n) if step is None else (step,)
        return max((n for i in steps if (n := state.attempts(chain, i)) is not None), default=None)

    def finish(self, end_ns: int | None = None, *, recording: Recording | None = None) -> Verdict:
        """The verdict, judging every chain against the recording's end (``end_ns``; default
        the last observation). ``recording`` says how that end came, for the verdict."""
        if not self._ready:
            self._init(self.start_ns or 0)
        end = max(end_ns or 0, self.now)
        for name, keys in self.expected.items():
            state = self.flows.get(name)
            if state is None:
                continue
            for key in sorted(keys):  # what is left was never seen at all
                state.counts["chains"] += 1
                state.counts["failed"] += 1
                state.add(
                    Finding(
                        kind=FindingKind.LOST,
                        flow=name,
                        key=key,
                        step=state.labels[0],
                        cause=Cause.NEVER_PUBLISHED,
                        next_step=state.labels[0],
                        message=f"never seen at {state.labels[0]!r}: not published",
                    )
                )
        for state in self.flows.values():
            state.finish(end)
        allow = self.allow_unjudged
        flows = [s.verdict(allow) for s in self.flows.values()]
        unjudged = []
        unknown = sum(f.unknown for f in flows)
        if recording is not None and recording.ended == "unknown" and unknown:
            unjudged.append(
                Unjudged(
                    expectation="the chains still open when the recording ended",
                    why="the trace has no end record (the recorder crashed or was killed): "
                    "when watching stopped is not known, so they are unknown, not lost",
                    chains=unknown,
                )
            )
        return Verdict(
            passed=all(f.passed for f in flows) and not self.other and (allow or not unjudged),
            observations=self.count,
            topology=self.topology.name,
            gaps=[_seen(g, self.start_ns or 0) for g in self.gaps],
            flows=flows,
            findings=self.other,
            unjudged=unjudged,
            allow_unjudged=allow,
            recording=recording,
        )


def check(
    topology: Topology,
    observations: Iterable[Observation],
    *,
    start_ns: int | None = None,
    end_ns: int | None = None,
    expected: Mapping[str, Iterable[str]] | None = None,
    allow_unjudged: bool | None = None,
    recording: Recording | None = None,
) -> Verdict:
    """Check a whole history at once."""
    checker = Checker(topology, start_ns=start_ns, expected=expected, allow_unjudged=allow_unjudged)
    for obs in observations:
        checker.feed(obs)
    return checker.finish(end_ns, recording=recording)

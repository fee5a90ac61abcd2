"""The checker: (topology, observations) -> verdict. Pure: no I/O, no broker client.

It reads observations once, in recording order, and keeps state only for the
chains still open: a chain is decided as soon as its deadline window has
passed on the recording's own clock, then forgotten but for its counts and
latencies (HdrHistogram) and a bounded list of findings.
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
    Verdict,
)
from flowcheck.observations import Kind, Observation, payload_json
from flowcheck.topology._types import format_duration
from flowcheck.topology.model import (
    DeadLetterRule,
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
MAX_FINDINGS = 100  # per flow, kept in full; the rest are only counted
MAX_TIMELINE = 40  # observations kept per chain for reports
SCHEMA_MEMORY = 65_536  # messages remembered so that one message's copies are checked once

# What a channel is to a flow: the step whose retries it carries, whether it is a
# dead-letter channel, the steps it is the channel of.
_Route = tuple[int | None, bool, list[int] | None]

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


def _known(
    arrived: Mapping[tuple[Any, ...], Observation], ident: tuple[Any, ...], obs: Observation
) -> bool:
    """Has this message already arrived? Copies of one message with and without a broker
    position (flowcheck's publish and a tap without one) are the same message."""
    if ident in arrived:
        return True
    fc = obs.fc_id
    if fc is None or not arrived:
        return False
    if ident[0] == "fc":
        return any(o.fc_id == fc for o in arrived.values())
    return ("fc", fc) in arrived


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

    def reached(self) -> int:
        """Index of the last step with an arrival, -1 if none."""
        return max((i for i, a in enumerate(self.arrivals) if a), default=-1)


class _Hist:
    """Latency samples of one hop, in HdrHistogram (microseconds, 3 significant digits).

    Samples are first rounded down to the histogram's own resolution and counted
    in a dict, then handed over in bulk: the same histogram, far fewer calls into
    its pure-Python recorder. Non-positive samples are counted apart.
    """

    FLUSH_AT = 4096  # distinct values held before handing them to the histogram

    def __init__(self) -> None:
        self.hist = HdrHistogram(1, 3_600_000_000, 3)
        self.pending: dict[int, int] = {}
        self.non_positive = 0

    def add(self, ns: int) -> None:
        if ns <= 0:
            self.non_positive += 1
            return
        us = ns // 1000 or 1
        shift = us.bit_length() - 11  # keep 11 significant bits: finer than 3 decimal digits
        if shift > 0:
            us = us >> shift << shift
        pending = self.pending
        pending[us] = pending.get(us, 0) + 1
        if len(pending) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        for us, n in self.pending.items():
            self.hist.record_value(min(us, 3_600_000_000), n)
        self.pending.clear()

    def stats(self) -> Percentiles:
        self.flush()
        n = self.hist.get_total_count()
        if n == 0:
            return Percentiles(count=0, non_positive=self.non_positive)

        def ms(q: float) -> float:
            return round(float(self.hist.get_value_at_percentile(q)) / 1000, 3)

        return Percentiles(
            count=n,
            non_positive=self.non_positive,
            p50_ms=ms(50),
            p90_ms=ms(90),
            p95_ms=ms(95),
            p99_ms=ms(99),
            max_ms=round(float(self.hist.get_max_value()) / 1000, 3),
        )


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
        self.late = [topology.tap_late(s.channel) for s in flow.steps]
        self.policies = [s.retry or flow.retry for s in flow.steps]
        self.has_policy = any(p is not None for p in self.policies)
        self.chain_failures = 0  # findings that fail a chain, so far
        self.track_decided = False  # remember decided keys (runs with expectations only)
        self.decided: set[str] = set()
        self.chains: dict[str, _Chain] = {}
        self.expiry: list[tuple[int, int, str]] = []
        self.seq = itertools.count()
        self.counts: Counter[str] = Counter()
        self.findings: list[Finding] = []
        self.totals: Counter[str] = Counter()
        self.hops = [_Hist() for _ in flow.steps]  # hops[i]: step i-1 -> step i (0 unused)
        self.e2e = _Hist()
        # ordering: group -> [(step-0 ns, [position per step]), ...] of decided chains
        self.order_groups: dict[str, list[tuple[int, str, list[tuple[Any, ...] | None]]]] = {}
        self.order_log: deque[tuple[int, str]] = deque()  # (start, group) in decision order
        self.gaps: list[Observation] = []

    # ------------------------------------------------------------ feeding

    def feed(self, obs: Observation, key: str, route: _Route) -> bool:
        """Take one observation of chain ``key`` on a channel this flow watches (``route``
        says how); True if it opened the chain."""
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
                if _known(chain.arrivals[first], ident, obs):
                    return opened  # the same message seen again (published, then routed)
                target = first
            else:
                fitting = [i for i in steps if matches(self.match[i], obs)]
                if not fitting:
                    return opened
                if any(_known(chain.arrivals[i], ident, obs) for i in fitting):
                    return opened
                room = [i for i in fitting if len(chain.arrivals[i]) < self.need[i]]
                target = room[0] if room else fitting[-1]
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
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(finding)

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
            timeline=[self.seen(o) for o in chain.timeline],
            **extra,
        )

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
        rule = self.rule_for(chain)
        # First arrival time per step (None where nothing came): deadlines and latency.
        firsts: list[int | None] = []
        complete = True
        for a, need in zip(chain.arrivals, self.need, strict=True):
            if a:
                firsts.append(min([o.mono_ns for o in a.values()]))
                if len(a) < need:
                    complete = False
            else:
                firsts.append(None)
                complete = False
        undecided = False
        if rule is not None:
            undecided = self.decide_poison(chain, rule, ended)
            if not undecided:
                self.check_deadlines(chain, firsts)
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
            self.check_deadlines(chain, firsts)
        else:
            undecided = self.decide_incomplete(chain, ended)
        if not undecided:
            if self.flow.delivery != "at-least-once":
                self.check_duplicates(chain)
            if self.has_policy:
                self.check_retries(chain, rule)
            self.record_latency(chain, firsts, complete)
            if self.flow.ordering != "none":
                self.record_order(chain)
        failed = self.chain_failures > before
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
            if chain.first_ns - self.start_ns < self.window_ns:
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

    def check_deadlines(self, chain: _Chain, firsts: list[int | None]) -> None:
        deadlines = self.deadline_ns
        for i in range(1, len(firsts)):
            limit = deadlines[i]
            a, b = firsts[i - 1], firsts[i]
            if limit is None or a is None or b is None or b - a <= limit:
                continue
            self.add(
                self.finding(
                    FindingKind.LATE,
                    chain,
                    f"{self.labels[i]!r} came {(b - a) / 1e6:.0f}ms after {self.labels[i - 1]!r}; "
                    f"its deadline is {format_duration(self.flow.steps[i].deadline or timedelta())}",
                    step=i,
                    seen=[next(iter(chain.arrivals[i].values()))],
                )
            )
        limit = self.flow_deadline_ns
        if limit is not None and firsts[0] is not None and chain.arrivals[-1]:
            took = max([o.mono_ns for o in chain.arrivals[-1].values()]) - firsts[0]
            if took > limit:
                assert self.flow.deadline is not None
                self.add(
                    self.finding(
                        FindingKind.LATE,
                        chain,
                        f"chain took {took / 1e6:.0f}ms end to end; the flow's deadline is {format_duration(self.flow.deadline)}",
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
        if chain.deliveries[i] and not counts:
            counts.append(1)
        return max(counts) if counts else None

    def _origin_step(self, obs: Observation) -> int | None:
        """The step a dead letter came from: its channel, or one of that step's retry channels."""
        origin = obs.origin or ""
        steps = self.channel_steps.get(origin)
        return steps[0] if steps else self.retry_of.get(origin)

    def delivery_times(self, chain: _Chain, i: int) -> list[int]:
        """When each delivery of step ``i`` was seen, in delivery order.

        Only delivery evidence counts: a record on a Kafka retry topic is written
        at once and consumed after its backoff, so its arrival says nothing of
        when the attempt was made.
        """
        by_count: dict[int, int] = {}
        for o in chain.deliveries[i]:
            if o.delivery_count:
                by_count.setdefault(o.delivery_count, o.mono_ns)
        return [by_count[c] for c in sorted(by_count)]

    def check_retries(self, chain: _Chain, rule: DeadLetterRule | None) -> None:
        for i, step in enumerate(self.flow.steps):
            policy: RetryPolicy | None = step.retry or self.flow.retry
            if policy is None:
                continue
            n = self.attempts(chain, i)
            if n is None:
                continue
            expected_exact = (
                rule is not None
                and (rule.step is None or rule.step == self.labels[i])
                and any(d.channel == rule.channel for d in chain.dead)
            )
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
                self.check_backoff(chain, i, policy)

    def check_backoff(self, chain: _Chain, i: int, policy: RetryPolicy) -> None:
        assert policy.backoff is not None
        b = policy.backoff
        times = self.delivery_times(chain, i)
        wait = b.initial.total_seconds()
        for n in range(1, len(times)):
            least = wait * (1 - b.jitter) * 1e9 - BACKOFF_TOLERANCE_NS
            took = times[n] - times[n - 1]
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
            wait *= b.multiplier
            if b.max is not None:
                wait = min(wait, b.max.total_seconds())

    def record_latency(self, chain: _Chain, firsts: list[int | None], complete: bool) -> None:
        for i in range(1, len(firsts)):
            a, b = firsts[i - 1], firsts[i]
            if a is not None and b is not None:
                self.hops[i].add(b - a)
        start = firsts[0]
        if complete and start is not None:
            self.e2e.add(max(o.mono_ns for o in chain.arrivals[-1].values()) - start)

    # ------------------------------------------------------------ ordering

    def record_order(self, chain: _Chain) -> None:
        if not chain.arrivals[0]:
            return
        if len(chain.arrivals[0]) > 1:  # one message at the first step has nothing to overtake
            self.check_within(chain)
        if self.flow.ordering != "per-partition-key":
            return  # per-key: each chain is its own key, ordered within itself
        group = next((o.kafka_key for a in chain.arrivals for o in a.values() if o.kafka_key), None)
        if group is None:
            return
        positions = [_position(a) for a in chain.arrivals]
        start = min(o.mono_ns for o in chain.arrivals[0].values())
        entries = self.order_groups.setdefault(group, [])
        for other_start, other_key, other_pos in entries:
            for i in range(1, len(positions)):
                mine, theirs = positions[i], other_pos[i]
                if mine is None or theirs is None or other_key == chain.key:
                    continue
                if (start > other_start) != (mine > theirs) and start != other_start:
                    earlier, later = (
                        (other_key, chain.key) if other_start < start else (chain.key, other_key)
                    )
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
        entries.append((start, chain.key, positions))
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

    def check_within(self, chain: _Chain) -> None:
        """Several messages of one chain at a step: they keep their first-step order (by trace id)."""
        first = sorted(chain.arrivals[0].values(), key=_sort_key)
        order = {o.trace_id: n for n, o in enumerate(first) if o.trace_id}
        if len(order) < 2:
            return
        for i in range(1, len(chain.arrivals)):
            seq = [
                order[o.trace_id]
                for o in sorted(chain.arrivals[i].values(), key=_sort_key)
                if o.trace_id in order
            ]
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

    def verdict(self) -> FlowVerdict:
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
            findings=sorted(
                self.findings,
                key=lambda f: (
                    f.seen[0].at_ms if f.seen else (f.timeline[0].at_ms if f.timeline else 0.0)
                ),
            ),
            findings_total=dict(self.totals),
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
        tail = f"; a tap may see a step up to {late_ms:g}ms late, {late[1]}" if late else ""
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
                            message=f"{hop}: {p} is {have:.1f}ms, over its budget of {budgets[p]:.1f}ms ({stats.count} samples, clock mono_ns{tail})",
                        )
                    )
        return Latency(
            hop=hop,
            stats=stats,
            budget_ms=budgets,
            passed=passed,
            tap_late_ms=late_ms,
            tap_late_why=late[1] if late else None,
        )


def _position(arrived: Mapping[tuple[Any, ...], Observation]) -> tuple[Any, ...] | None:
    if not arrived:
        return None
    o = min(arrived.values(), key=_sort_key)
    return _sort_key(o)


def _sort_key(o: Observation) -> tuple[Any, ...]:
    # Within a Kafka partition the offset is the true order; elsewhere, arrival time.
    return (0, o.offset, 0) if o.offset is not None else (1, o.mono_ns, 0)


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
        allow_unjudged: bool = False,
    ) -> None:
        self.topology = topology
        self.allow_unjudged = allow_unjudged
        self.start_ns = start_ns
        self.expected = {f: set(keys) for f, keys in (expected or {}).items()}
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
            state.track_decided = name in self.expected
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
            if state.feed(obs, key, route):
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
        elif len(self.other) < MAX_FINDINGS:
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
        flows = [s.verdict() for s in self.flows.values()]
        return Verdict(
            passed=all(f.passed for f in flows) and not self.other,
            observations=self.count,
            topology=self.topology.name,
            gaps=[_seen(g, self.start_ns or 0) for g in self.gaps],
            flows=flows,
            findings=self.other,
            allow_unjudged=self.allow_unjudged,
            recording=recording,
        )


def check(
    topology: Topology,
    observations: Iterable[Observation],
    *,
    start_ns: int | None = None,
    end_ns: int | None = None,
    expected: Mapping[str, Iterable[str]] | None = None,
) -> Verdict:
    """Check a whole history at once."""
    checker = Checker(topology, start_ns=start_ns, expected=expected)
    for obs in observations:
        checker.feed(obs)
    return checker.finish(end_ns)

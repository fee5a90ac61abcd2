"""A flow's state: its route map, the chains still open (fed one observation at a time),
and what its decided chains left (counts, latencies, findings, unjudged expectations).

The checks themselves live one kind per module (see ``_decide.CHAIN_CHECKS``); they
record what they find through :meth:`FlowState.add` and :meth:`FlowState.unjudge`.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from flowcheck.checker import _attempts, _decide, _ordering, _paths, _thresholds
from flowcheck.checker._chain import (
    Chain,
    OnDecided,
    Places,
    identity,
    messages,
    place,
    seen,
    which,
)
from flowcheck.checker._hist import Hist, Span, span
from flowcheck.checker._match import matches
from flowcheck.checker._sample import Reservoir
from flowcheck.checker._series import Series
from flowcheck.checker.verdict import (
    CHAIN_KINDS,
    CheckName,
    Finding,
    FindingKind,
    FlowVerdict,
    RouteRole,
    Seen,
    chain_trace_id,
)
from flowcheck.checker.window import DEFAULT_WINDOW, GRACE_NS
from flowcheck.observations import Kind, Observation, payload_json
from flowcheck.topology.model import DeadLetterRule, Flow, GiveUpRule, SeqOrdering, Topology
from flowcheck.topology.routing import Route, flow_routes

# A route a flow's messages take: (role, channel, step index; None: a dead letter that
# did not say where it died).
RouteKey = tuple[RouteRole, str, int | None]

MAX_FINDINGS = 100  # per flow, kept with their timelines; the rest without (memory)
MAX_TIMELINE = 40  # observations kept per chain for reports

# Plain names for the kinds: enum attribute lookups cost a descriptor call each.
_PUBLISHED, _ROUTED, _UNROUTABLE = Kind.PUBLISHED, Kind.ROUTED, Kind.UNROUTABLE
_DELIVERED, _REDELIVERED, _CONSUMED = Kind.DELIVERED, Kind.REDELIVERED, Kind.CONSUMED
_DEAD_LETTERED, _TRIMMED = Kind.DEAD_LETTERED, Kind.TRIMMED


def ns(d: timedelta) -> int:
    return int(d.total_seconds() * 1e9)


class FlowState:
    def __init__(self, name: str, flow: Flow, topology: Topology, start_ns: int) -> None:
        self.name = name
        self.flow = flow
        self.topology = topology
        self.start_ns = start_ns
        self.labels = [s.name or s.channel for s in flow.steps]
        self.window_ns = ns(flow.deadline or DEFAULT_WINDOW) + GRACE_NS
        routes = flow_routes(topology, flow)
        self.routes = routes
        self.channel_steps = routes.steps
        self.retry_of = routes.retry_of
        self.retry_declared = routes.retry_declared
        self.retry_visible = routes.retry_visible
        self.leads_to = routes.leads_to
        self.watched = routes.watched
        # One lookup per observation: what its channel is to this flow.
        self.route: dict[str, Route] = routes.route
        self.n = len(flow.steps)
        self.rules_read_payload = any(r.when.payload for r in flow.dead_letters)
        self.gives_up = flow.gives_up
        self.giving: GiveUpRule | None = None  # the give-up rule of the chain being decided
        self.deadline_ns = [None if s.deadline is None else ns(s.deadline) for s in flow.steps]
        self.flow_deadline_ns = None if flow.deadline is None else ns(flow.deadline)
        self.match = [s.match for s in flow.steps]
        self.need = [s.count for s in flow.steps]
        # The consumer group each step is about (None: any group's evidence counts).
        self.groups = [s.group for s in flow.steps]
        self.grouped = any(self.groups)
        self.ending: int | None = None  # the recording's end, once finish() is called
        chans = [topology.channels.get(s.channel) for s in flow.steps]
        self.channels = chans
        self.returns_routed = [ch is not None and ch.returns_routed for ch in chans]
        self.consumed = [ch is None or ch.consumed for ch in chans]
        self.acks_visible = [ch is not None and ch.acks_visible for ch in chans]
        self.failures_recorded = [ch is not None and ch.failures_recorded for ch in chans]
        self.late = [topology.tap_late(s.channel) for s in flow.steps]
        self.late_ms = [0.0 if t is None else t[0].total_seconds() * 1000 for t in self.late]
        self.ordered = flow.ordering in ("per-key", "per-partition-key")
        self.by_seq = (
            _ordering.BySeq(self, flow.ordering) if isinstance(flow.ordering, SeqOrdering) else None
        )
        self.partitioned_steps = [
            i for i, ch in enumerate(chans) if ch is not None and ch.partitioned
        ]
        self.policies = [s.retry or flow.retry for s in flow.steps]
        self.has_policy = any(p is not None for p in self.policies)
        self.delivery = [s.delivery or flow.delivery for s in flow.steps]
        # Per step: how a retry the application re-publishes is told from a second message
        # (its counter, its id, or a passage through the step's retry channels); None:
        # every arrival is a message. ``retried``: some step has one (feed asks only then).
        self.retry_marks = [
            _attempts.mark(p, self.retry_visible[i]) for i, p in enumerate(self.policies)
        ]
        self.retried = any(m is not None for m in self.retry_marks)
        # Steps whose attempts only the consumer group's deliveries show (a stream's
        # pending list, polled): a run waits for that evidence before it may end.
        self.await_deliveries = [
            i
            for i, (ch, p) in enumerate(zip(chans, self.policies, strict=True))
            if p is not None and ch is not None and ch.attempts_polled
        ]
        # The checks this flow's decided chains get, in order.
        self.checks = [run for applies, run in _decide.CHAIN_CHECKS if applies(self)]
        self.chain_failures = 0  # findings that fail a chain, so far
        self.track_decided = False  # remember decided keys (runs only)
        self.on_decided: OnDecided | None = None  # told of every decided chain
        # False: follow which chains are open only (a drain); see Checker's judge.
        self.judge = True
        self.decided: set[str] = set()
        self.chains: dict[str, Chain] = {}
        self.expiry: list[tuple[int, int, str]] = []
        self.seq = itertools.count()
        self.counts: Counter[str] = Counter()
        self.findings: list[Finding] = []
        self.full = 0  # findings given their timeline so far (the first MAX_FINDINGS)
        self.totals: Counter[str] = Counter()
        # (check, expectation, why) -> chains it could not be judged on
        self.unjudged: Counter[tuple[str, str, str]] = Counter()
        # Steps some chain was seen reaching; chains only delivered from a step, per step.
        self.reached_steps: set[int] = set()
        self.unrouted: Counter[int] = Counter()
        self.deciding: list[tuple[str, str, str]] | None = None  # the chain being decided's
        # Did the chain being decided end where it should: complete, or under its dead-letter
        # rule (the latter judged by the dead-letter check)?
        self.ended_well = False
        self.hops = [Hist() for _ in flow.steps]  # hops[i]: step i-1 -> step i (0 unused)
        self.e2e = Hist()
        self.passing = Reservoir(name)  # a sample of the succeeded chains, for reports
        self.series = Series(start_ns)  # decided chains over the recording's time
        # ordering: group -> [(step-0 ns, key, [places per step]), ...] of decided chains
        self.order_groups: dict[str, list[tuple[int, str, list[Places]]]] = {}
        self.order_log: deque[tuple[int, str]] = deque()  # (start, group) in decision order
        self.gaps: list[Observation] = []
        # Messages of decided chains per route (role, channel, step or None): [messages,
        # redelivered]. Every route of the map is listed, even at 0; dead letters that
        # name another origin add theirs (bounded: channels x steps).
        self.route_counts: dict[RouteKey, list[int]] = {}
        self.step_routes: list[RouteKey] = [
            ("step", s.channel, i) for i, s in enumerate(flow.steps)
        ]
        for key in self.step_routes:
            self.route_counts[key] = [0, 0]
        for r, i in routes.retry_of.items():
            self.route_counts[("retry", r, i)] = [0, 0]
        dead = routes.dead
        for i, carried in enumerate(routes.carriers):
            for c in carried:
                if c in dead:
                    self.route_counts.setdefault(("dead_letter", c, i), [0, 0])
        told = {k[1] for k in self.route_counts if k[0] == "dead_letter"}
        for d in sorted(dead - told):
            self.route_counts[("dead_letter", d, None)] = [0, 0]

    # ------------------------------------------------------------ feeding

    def feed(self, obs: Observation, key: str, route: Route, seq: int = 0) -> bool:
        """Take one observation of chain ``key`` on a channel this flow watches (``route``
        says how; ``seq`` is its place in the feed); True if it opened the chain."""
        chain = self.chains.get(key)
        opened = chain is None
        if chain is None:
            n = self.n
            chain = Chain(
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
        judge = self.judge
        timeline = chain.timeline
        if judge and len(timeline) < MAX_TIMELINE:
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
            if kind is _ROUTED and obs.delivery_count and self.returns_routed[first]:
                # Back on its queue after a dead-letter round trip (x-death): a retry.
                chain.retry_arrivals[first].append(obs)
                return opened
            ident = identity(obs)
            if len(steps) == 1:  # the common case, kept lean
                if self.match[first] is not None and not matches(self.match[first], obs):
                    return opened
                target = first
                known = which(chain.arrivals[first], ident, obs)
            else:
                fitting = [i for i in steps if matches(self.match[i], obs)]
                if not fitting:
                    return opened
                known = None
                for i in fitting:
                    known = which(chain.arrivals[i], ident, obs)
                    if known is not None:
                        target = i
                        break
                else:
                    need = self.expected(chain)
                    room = [i for i in fitting if len(chain.arrivals[i]) < need[i]]
                    target = room[0] if room else fitting[-1]
            if judge:  # ordering decides nothing a drain asks (settled)
                if self.ordered:  # every copy tells the message's place in its own order
                    order, at = place(obs, seq)
                    chain.places[target].setdefault(known or ident, {}).setdefault(order, at)
                by_seq = self.by_seq
                if by_seq is not None and (by_seq.steps[target] or by_seq.poisonable):
                    by_seq.feed(chain, target, obs, known is None, seq)
            if known is not None:
                return opened  # the same message seen again (published, then routed)
            if self.retried and _attempts.again(self, chain, target, obs):
                return opened  # a later attempt of a message already here
            chain.arrivals[target][ident] = obs
            # Dead-letter rules look at the message as it entered the flow.
            if chain.sample is None or (target == 0 and not chain.sample_first):
                chain.sample = obs
                chain.sample_first = target == 0
        elif kind is _DELIVERED or kind is _REDELIVERED:
            for i in self.of_group(steps, obs):
                chain.deliveries[i].append(obs)
        elif kind is _CONSUMED:
            for i in self.of_group(steps, obs):
                chain.consumed[i] = True
        elif kind is _TRIMMED:
            for i in self.of_group(steps, obs):
                if self.groups[i] is not None:
                    chain.trimmed.setdefault(i, obs)
        elif kind is _UNROUTABLE:
            chain.unroutable = chain.unroutable or obs
        return opened

    def of_group(self, steps: list[int], obs: Observation) -> list[int]:
        """The steps among ``steps`` that a consumer group's evidence ``obs`` is about."""
        if not self.grouped:
            return steps
        groups = self.groups
        return [i for i in steps if groups[i] is None or groups[i] == obs.group]

    def expire(self, now_ns: int) -> int:
        """Decide (or, not judging, forget) the chains whose window has passed; returns
        when the next one is due."""
        while self.expiry and self.expiry[0][0] < now_ns:
            _, _, key = heapq.heappop(self.expiry)
            chain = self.chains.pop(key, None)
            if chain is not None:
                if self.judge:
                    _decide.decide(self, chain, ended=False)
                if self.track_decided:
                    self.decided.add(key)
        return self.expiry[0][0] if self.expiry else now_ns

    def finish(self, end_ns: int) -> int:
        """Decide every open chain at the recording's end; returns how many of them
        are unknown because it came before their window was over."""
        self.ending = end_ns
        self.series.reach(end_ns)  # the buckets span the whole recording
        cut = 0
        for chain in list(self.chains.values()):
            ended = chain.first_ns + self.window_ns > end_ns
            before = self.counts["unknown"]
            _decide.decide(self, chain, ended=ended)
            cut += ended and self.counts["unknown"] > before
        self.chains.clear()
        if self.by_seq is not None:
            self.by_seq.finish()
        _paths.findings(self)
        return cut

    # ------------------------------------------------------------ recording findings

    def add(self, finding: Finding) -> None:
        self.totals[finding.kind.value] += 1
        if finding.kind in CHAIN_KINDS:
            self.chain_failures += 1
        self.findings.append(finding)

    def unjudge(self, check: CheckName, expectation: str, why: str, chains: int = 1) -> None:
        """``expectation`` (of ``check``) could not be judged on ``chains`` chains, for ``why``.
        While a chain is decided, held until it is known whether the chain failed."""
        if self.deciding is not None:
            self.deciding.append((check, expectation, why))
        else:
            self.unjudged[(check, expectation, why)] += chains

    def seen(self, obs: Observation) -> Seen:
        return seen(obs, self.start_ns)

    def finding(
        self,
        kind: FindingKind,
        chain: Chain,
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
            trace_id=chain_trace_id(self.name, chain.key, (o.trace_id for o in chain.timeline)),
            **extra,
        )

    def timeline(self, chain: Chain) -> list[Seen]:
        """The chain as seen, for the first MAX_FINDINGS findings of the flow (memory)."""
        if self.full >= MAX_FINDINGS:
            return []
        self.full += 1
        return [self.seen(o) for o in chain.timeline]

    # ------------------------------------------------------------ what the checks ask

    def gap_during(self, chain: Chain) -> bool:
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

    def rule_for(self, chain: Chain) -> DeadLetterRule | None:
        if not self.flow.dead_letters:
            return None
        # The message as it entered the flow; a dead letter if its arrivals went unseen.
        sample = chain.sample or (chain.dead[0] if chain.dead else None)
        if sample is None:
            return None
        parsed = payload_json(sample.payload) if self.rules_read_payload else None
        return next((r for r in self.flow.dead_letters if matches(r.when, sample, parsed)), None)

    def give_up_for(self, chain: Chain) -> GiveUpRule | None:
        """The give-up rule the chain's message (as it entered the flow) matches."""
        sample = chain.sample
        if sample is None:
            return None
        parsed = (
            payload_json(sample.payload) if any(r.when.payload for r in self.gives_up) else None
        )
        return next((r for r in self.gives_up if matches(r.when, sample, parsed)), None)

    def rounds(self, chain: Chain) -> int:
        """How many times over the chain goes through the flow: once per distinct message
        its first step received (``step.count`` of them a round), at least once. Two
        revisions of one order under one key are two rounds, not a duplicate."""
        first = chain.arrivals[0]
        need = self.need[0]
        if len(first) <= need:  # the common case: nothing to tell apart
            return 1
        return max(1, -(-messages(first) // need))

    def expected(self, chain: Chain) -> list[int]:
        """Messages expected at each step: its ``count`` for each round (see rounds)."""
        r = self.rounds(chain)
        return self.need if r == 1 else [n * r for n in self.need]

    def complete(self, chain: Chain) -> bool:
        need = self.expected(chain)
        return all(len(a) >= n for a, n in zip(chain.arrivals, need, strict=True))

    def step_index(self, label: str | None) -> int | None:
        if label is None:
            return None
        return self.labels.index(label) if label in self.labels else None

    def origin_step(self, obs: Observation) -> int | None:
        """The step a dead letter came from: its channel, or one of that step's retry channels."""
        origin = obs.origin or ""
        steps = self.channel_steps.get(origin)
        return steps[0] if steps else self.retry_of.get(origin)

    def spans(self, chain: Chain) -> list[Span | None]:
        """Per hop i (step i-1 -> i), then end to end: (ns, clock, error ms), None where an
        end is missing (end to end: for complete chains only)."""
        arrivals, late = chain.arrivals, self.late_ms
        out: list[Span | None] = [None]
        for i in range(1, self.n):
            a, b = arrivals[i - 1], arrivals[i]
            out.append(
                span(a.values(), b.values(), (late[i - 1], late[i]), False) if a and b else None
            )
        whole = arrivals[0] and self.complete(chain)
        out.append(
            span(arrivals[0].values(), arrivals[-1].values(), (late[0], late[-1]), True)
            if whole
            else None
        )
        return out

    # ------------------------------------------------------------ result

    def verdict(self, allow_unjudged: bool) -> FlowVerdict:
        return _thresholds.verdict(self, allow_unjudged)

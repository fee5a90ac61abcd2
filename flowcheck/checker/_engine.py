"""The checker: (topology, observations) -> verdict. Pure: no I/O, no broker client.

It reads observations once, in recording order, and keeps state only for the
chains still open: a chain is decided as soon as its deadline window has
passed on the recording's own clock, then forgotten but for its counts,
latencies (HdrHistogram), findings (the timelines of the first MAX_FINDINGS of
a flow only) and the expectations it left unjudged.

Layout: ``_flow`` holds a flow's state and feeds it; ``_decide`` decides a chain and
runs the checks of its table, one kind per module (``_deadlines``, ``_delivery``,
``_retries``, ``_ordering``, ``_latency``, ``_dead_letters``); ``_schema`` checks
payloads as they are fed, ``_thresholds`` the flow's rates at the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flowcheck.checker import _dead_letters, _retries
from flowcheck.checker._chain import Decided, OnDecided, seen
from flowcheck.checker._flow import MAX_FINDINGS, MAX_TIMELINE, FlowState
from flowcheck.checker._schema import SchemaCheck
from flowcheck.checker.verdict import Cause, Finding, FindingKind, Recording, Unjudged, Verdict
from flowcheck.observations import Kind, Observation
from flowcheck.topology.model import Topology
from flowcheck.topology.routing import Route
from flowcheck.topology.transform import branched

__all__ = ["MAX_FINDINGS", "MAX_TIMELINE", "Checker", "Decided", "check"]

_PUBLISHED, _ROUTED, _GAP, _DRIFT = Kind.PUBLISHED, Kind.ROUTED, Kind.GAP, Kind.DRIFT


class Checker:
    """Feed observations in recording order, then :meth:`finish` for the verdict.

    ``on_decided``, when given, is told of each chain as it is decided
    (:class:`Decided`), during :meth:`feed`, :meth:`advance` or :meth:`finish`.

    ``judge=False`` only follows which chains are open, for :meth:`settled` (a
    recorder's drain): a chain is forgotten, not decided, once its window has passed,
    and what only a verdict needs (schemas, ordering, timelines) is skipped, at a
    fraction of the cost. Chains open and close exactly as when judging, and
    :meth:`settled` answers the same; such a checker gives no verdict."""

    def __init__(
        self,
        topology: Topology,
        *,
        start_ns: int | None = None,
        expected: Mapping[str, Iterable[str]] | None = None,
        allow_unjudged: bool | None = None,
        stop_ns: int | None = None,
        on_decided: OnDecided | None = None,
        judge: bool = True,
    ) -> None:
        self.judge = judge
        # Told of each chain as it is decided (an exporter of traces), while it is at
        # hand: the verdict keeps the timelines of a few broken chains only.
        self.on_decided = on_decided
        # A topology made in Python (not loaded) may still declare branches.
        topology = self.topology = branched(topology)
        # When the recording was asked to stop: chains first seen from then on are not
        # judged (the taps watched on only for the chains already in flight).
        self.stop_ns = stop_ns
        self.after_stop: dict[str, set[str]] = {}
        # None: as the topology's gate says.
        self.allow_unjudged = (
            topology.gate.allow_unjudged if allow_unjudged is None else allow_unjudged
        )
        self.start_ns = start_ns
        self.expected = {f: set(keys) for f, keys in (expected or {}).items()}
        self.tracking = expected is not None  # remember decided keys: settled() is asked
        self.flows: dict[str, FlowState] = {}
        self.states: list[FlowState] = []
        self.by_channel: dict[str, list[tuple[FlowState, Route]]] = {}
        self.gaps: list[Observation] = []
        self.drift: list[str] = []  # what apply found differing, from the trace's drift records
        self.count = 0
        self.now = 0
        self.schema = SchemaCheck(topology)
        self.other: list[Finding] = []
        self._ready = False
        self.next_expiry = 0  # no flow has a chain to decide before this time

    def _init(self, start_ns: int) -> None:
        self._ready = True
        self.start_ns = start_ns
        for name, flow in self.topology.flows.items():
            state = FlowState(name, flow, self.topology, start_ns)
            # A run (it passes ``expected``) asks settled() of every chain it started.
            state.track_decided = self.tracking
            state.on_decided = self.on_decided
            state.judge = self.judge
            self.flows[name] = state
            self.states.append(state)
            for ch in state.watched:
                self.by_channel.setdefault(ch, []).append((state, state.route[ch]))
        self._config_findings()

    def _config_findings(self) -> None:
        for state in self.flows.values():
            _dead_letters.config(state)

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
        if kind is _DRIFT:
            self.drift.append(obs.reason or obs.channel)
            return
        if kind is _GAP:
            self.gaps.append(obs)
            for state in self.states:
                state.gaps.append(obs)
            return
        channel = obs.channel
        if (
            self.judge
            and (kind is _ROUTED or kind is _PUBLISHED)
            and channel in self.schema.channels
            and self.schema.first_copy(obs)
        ):
            self._check_schema(obs)
        watching = self.by_channel.get(channel)
        if watching is None:
            return
        keys = obs.keys
        stop = self.stop_ns
        for state, route in watching:
            key = keys.get(state.name)
            if key is None:
                continue
            if stop is not None and at >= stop and key not in state.chains:
                self.after_stop.setdefault(state.name, set()).add(key)
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
            seen=[seen(obs, self.start_ns or 0)],
        )
        if states:
            states[0].add(finding)
        else:
            self.other.append(finding)

    def advance(self, now_ns: int) -> None:
        """Let time pass without an observation: decide chains whose window is over."""
        if not self._ready:
            self._init(self.start_ns if self.start_ns is not None else now_ns)
        if now_ns > self.now:
            self.now = now_ns
            self.next_expiry = min([state.expire(now_ns) for state in self.states], default=now_ns)

    def due(self) -> int | None:
        """When the window of the next open chain ends (it is decided once time passes
        it, by :meth:`advance` or a later observation); None when no chain is open."""
        return min((s.expiry[0][0] for s in self.states if s.expiry), default=None)

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
        if state.grouped and any(
            g is not None and chain.arrivals[i] and not chain.consumed[i] and i not in chain.trimmed
            for i, g in enumerate(state.groups)
        ):
            return False  # a consumer group has yet to read or acknowledge it
        return state.complete(chain)

    def attempts(self, flow: str, key: str, dead: Observation | None = None) -> int | None:
        """Deliveries of the message of the open chain ``key`` of ``flow``, the first
        included, as the retry checks count them: at the step the dead letter ``dead``
        died on, else the most at any step. None if nothing tells or no such chain is open."""
        state = self.flows.get(flow)
        chain = None if state is None else state.chains.get(key)
        if state is None or chain is None:
            return None
        step = None if dead is None else state.origin_step(dead)
        steps = range(state.n) if step is None else (step,)
        return max(
            (n for i in steps if (n := _retries.attempts(state, chain, i)) is not None),
            default=None,
        )

    def finish(self, end_ns: int | None = None, *, recording: Recording | None = None) -> Verdict:
        """The verdict, judging every chain against the recording's end (``end_ns``; default
        the last observation). ``recording`` says how that end came, for the verdict."""
        if not self.judge:
            raise ValueError("a checker made with judge=False gives no verdict")
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
        cut = sum(state.finish(end) for state in self.flows.values())
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
        elif recording is not None and cut:
            unjudged.append(
                Unjudged(
                    expectation="the chains still open when the recording ended",
                    why=(
                        "the run ended (its wait capped by the scenario's timeout, at most two "
                        "windows) before their deadlines had passed: whether they would have "
                        "completed is not known"
                        if recording.ended == "run"
                        else "it ended before their deadlines had passed: whether they would "
                        "have completed is not known (record on for the flow's window after "
                        "the last message: `flowcheck record --drain`)"
                    ),
                    chains=cut,
                )
            )
        if recording is not None and self.after_stop:
            after = sum(len(keys) for keys in self.after_stop.values())
            recording = recording.model_copy(update={"after_stop": after})
        return Verdict(
            passed=all(f.passed for f in flows) and not self.other and (allow or not unjudged),
            # a gap or drift record is no observation
            observations=self.count - len(self.gaps) - len(self.drift),
            drift=self.drift,
            topology=self.topology.name,
            gaps=[seen(g, self.start_ns or 0) for g in self.gaps],
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
    stop_ns: int | None = None,
    on_decided: OnDecided | None = None,
) -> Verdict:
    """Check a whole history at once."""
    checker = Checker(
        topology,
        start_ns=start_ns,
        expected=expected,
        allow_unjudged=allow_unjudged,
        stop_ns=stop_ns,
        on_decided=on_decided,
    )
    for obs in observations:
        checker.feed(obs)
    return checker.finish(end_ns, recording=recording)

"""Assertions about one chain: the messages of one flow with one correlation key."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from flowcheck.checker import CHAIN_KINDS, Finding, FindingKind, FlowVerdict
from flowcheck.checker.verdict import Cause, Seen
from flowcheck.observations import Kind, Observation
from flowcheck.reporting.timeline import detail, indent
from flowcheck.testing._waits import Within, spell
from flowcheck.topology.routing import flow_routes

if TYPE_CHECKING:
    from flowcheck.testing._session import FlowSession

_ARRIVALS = (Kind.PUBLISHED, Kind.ROUTED)


class Chain:
    """Assertions about one chain; get one from :meth:`FlowSession.chain`."""

    def __init__(self, fc: FlowSession, flow: str, key: str) -> None:
        self.fc = fc
        self.flow = flow
        self.key = key
        f = fc.topology.flows[flow]
        self.labels = [s.name or s.channel for s in f.steps]
        # Channels where a message of the flow is a dead letter, as the checker sees them.
        self.dead_channels = flow_routes(fc.topology, f).dead

    @property
    def observations(self) -> list[Observation]:
        return self.fc.chain_observations(self.flow, self.key)

    def __repr__(self) -> str:
        return f"<chain {self.flow} {self.key!r}>"

    def _dead(self) -> list[Observation]:
        return [
            o
            for o in self.observations
            if o.kind is Kind.DEAD_LETTERED
            or (o.channel in self.dead_channels and o.kind is Kind.ROUTED)
        ]

    def _verdict(self) -> tuple[FlowVerdict, list[Finding]]:
        fc = self.fc
        items = fc._chain_items([(self.flow, self.key)])
        seen = any(o.kind is not Kind.GAP for o in items)
        expected = None if seen else {self.flow: [self.key]}
        verdict = fc._judge(items, settle=True, expected=expected)
        fv = next(f for f in verdict.flows if f.flow == self.flow)
        return fv, [f for f in fv.findings if f.key == self.key and f.kind in CHAIN_KINDS]

    def _broken(self) -> Callable[[], bool]:
        """A test, cheap while nothing new comes: has the chain got a finding or a dead letter?"""
        seen = len(self.observations)

        def broken() -> bool:
            nonlocal seen
            now_seen = len(self.fc._by_chain.get((self.flow, self.key), ()))
            if now_seen == seen:
                return False
            seen = now_seen
            return bool(self._verdict()[1] or self._dead())

        return broken

    def _arrivals_at(self, step: int) -> list[Observation]:
        if step < 0:
            return []
        channel = self.fc.topology.flows[self.flow].steps[step].channel
        return [o for o in self.observations if o.channel == channel and o.kind in _ARRIVALS]

    def _reached(self) -> int:
        """Index of the last step the chain arrived at, -1 if none."""
        steps = self.fc.topology.flows[self.flow].steps
        seen = {o.channel for o in self.observations if o.kind in _ARRIVALS}
        return max((i for i, s in enumerate(steps) if s.channel in seen), default=-1)

    async def completes(
        self, within: Within | None = None, *, settle: Within | None = None
    ) -> list[Observation]:
        """Assert that the chain reaches every step of its flow, as the topology expects
        (no duplicate, nothing late, not dead-lettered), within ``within``.

        Once the last step is seen it keeps watching for the flow's settle time
        (``settle``, default :meth:`FlowSession.settle_for`) from that arrival, so
        that a copy the flow forbids, which taps may see late, is seen; it fails
        as soon as one comes. Returns the chain's observations.
        """
        __tracebackhide__ = True
        fc = self.fc
        checker = fc._checker
        assert checker is not None
        limit = fc._limit(within)
        quiet = fc.settle_for(self.flow, settle)
        settled = await fc._wait(lambda: checker.settled(self.flow, self.key), limit)
        _, findings = self._verdict()
        dead = self._dead()
        if settled and not findings and not dead and quiet > 0:
            end = max(o.mono_ns for o in self.observations)
            await fc._settle(end + int(quiet * 1e9), self._broken())
            _, findings = self._verdict()
            dead = self._dead()
        if settled and not findings and not dead:
            fc._record("completes", self.flow, True)
            return self.observations
        fc._record("completes", self.flow, False)
        lines = self._headline_completes(limit, settled, findings, dead)
        self._fail(lines, findings)

    def _headline_completes(
        self, limit: float, settled: bool, findings: list[Finding], dead: list[Observation]
    ) -> list[str]:
        who = f"{self.flow} {self.key!r}"
        items = self.observations
        if not any(o.kind is not Kind.GAP for o in items):
            seen = list(self.fc._keys.get(self.flow, {}))
            others = (
                f"; keys seen for {self.flow}: {', '.join(seen[:8])}"
                + (" ..." if len(seen) > 8 else "")
                if seen
                else f"; nothing at all was seen for {self.flow}"
            )
            return [
                f"{who} did not complete within {spell(limit)}: nothing with this key was "
                f"seen on any channel of the flow{others}"
            ]
        reached = self._reached()
        n = len(self.labels)
        stopped = (
            f"it stopped after {self.labels[reached]!r} (step {reached + 1} of {n})"
            if reached >= 0
            else f"it never reached the first step {self.labels[0]!r}"
        )
        lost = [f for f in findings if f.kind is FindingKind.LOST]
        nxt = next((f.next_step for f in lost if f.next_step), None)
        if nxt is None and reached + 1 < n:
            nxt = self.labels[reached + 1]
        if dead:
            d = _final(dead)
            head = f"{who} was dead-lettered to {d.channel!r} instead of completing"
            why = [f"{stopped}; dead letter" + (f": {detail(d)}" if detail(d) else "")]
        elif lost or not settled:
            cause = next((f.cause for f in lost if f.cause is not None), None)
            if cause is Cause.UNROUTABLE or cause is Cause.STUCK_PENDING:
                head = f"{who} did not complete: {lost[0].message}"
            else:
                head = f"{who} did not complete within {spell(limit)}"
            why = [f"{stopped}; expected next: {nxt!r}, which never came" if nxt else stopped]
        else:
            head = f"{who} completed, but not as the topology expects"
            why = []
        for f in findings:
            if f.kind is FindingKind.LOST and f.cause in (Cause.TIMED_OUT, None):
                continue  # said above, in this wait's own terms
            why.append(f"{f.kind.value}: {f.message}")
        tail = []
        if nxt is not None and not dead and (lost or not settled):
            said = next((f.cause.value for f in lost if f.cause is not None), "")
            tail.append(("expected", nxt, "never came" + (f" ({said})" if said else "")))
        # Marked: what the findings are about, and where the chain stopped.
        evidence: list[Observation | Seen] = [
            s
            for f in findings
            if not (f.kind is FindingKind.LOST and f.cause in (Cause.TIMED_OUT, None))
            for s in f.seen
        ]
        evidence += [_final(dead)] if dead else self._arrivals_at(reached)[-1:]
        return [
            head,
            *indent(why),
            "",
            *indent(self.fc._draw(items, evidence=evidence, tail=tail)),
        ]

    async def reaches(self, step: str, within: Within | None = None) -> Observation:
        """Assert that the chain arrives at ``step`` (a step label or channel) within
        ``within``; returns the first arrival there."""
        __tracebackhide__ = True
        steps = self.fc.topology.flows[self.flow].steps
        match = [s for s in steps if (s.name or s.channel) == step] or [
            s for s in steps if s.channel == step
        ]
        if not match:
            raise KeyError(f"{self.flow} has no step {step!r}; its steps are {self.labels}")
        channel = match[0].channel

        def arrived() -> Observation | None:
            return next(
                (o for o in self.observations if o.channel == channel and o.kind in _ARRIVALS),
                None,
            )

        limit = self.fc._limit(within)
        await self.fc._wait(lambda: arrived() is not None, limit)
        found = arrived()
        self.fc._record("reaches", self.flow, found is not None)
        if found is not None:
            return found
        reached = self._reached()
        where = (
            f"it got as far as {self.labels[reached]!r}"
            if reached >= 0
            else "it never reached the flow's first step"
        )
        lines = [
            f"{self.flow} {self.key!r} did not reach {step!r} within {spell(limit)}; {where}",
            "",
            *indent(self.fc._draw(self.observations, tail=[("expected", step, "never came")])),
        ]
        self._fail(lines, [])

    async def dead_lettered(
        self,
        channel: str | None = None,
        *,
        reason: str | None = None,
        attempts: int | None = None,
        within: Within | None = None,
    ) -> Observation:
        """Assert that the chain ends in a dead letter: on ``channel`` (default: any
        dead-letter channel of the flow), with ``reason`` (contained in the one
        the broker gives), after exactly ``attempts`` deliveries (the first
        included). Returns the dead letter's observation.
        """
        __tracebackhide__ = True
        fc = self.fc
        if channel is not None and channel not in fc.topology.channels:
            raise KeyError(
                f"no channel {channel!r} in the topology; it has {sorted(fc.topology.channels)}"
            )

        def candidates() -> list[Observation]:
            return [d for d in self._dead() if channel is None or d.channel == channel]

        def good(d: Observation) -> bool:
            return reason is None or (d.reason is not None and reason in d.reason)

        def satisfied() -> bool:
            found = [d for d in candidates() if good(d)]
            if not found:
                return False
            return attempts is None or self.attempts(_final(found)) == attempts

        def hopeless() -> bool:
            found = [d for d in candidates() if good(d)]
            n = self.attempts(_final(found)) if found else None
            return attempts is not None and n is not None and n > attempts

        limit = fc._limit(within)
        await fc._wait(lambda: satisfied() or hopeless(), limit)
        found = candidates()
        if satisfied():
            fc._record("dead_lettered", self.flow, True)
            return _final([d for d in found if good(d)])
        fc._record("dead_lettered", self.flow, False)
        where = f"to {channel!r}" if channel is not None else ""
        want = ", ".join(
            p
            for p in (
                f"with reason containing {reason!r}" if reason is not None else "",
                f"after {attempts} attempt(s)" if attempts is not None else "",
            )
            if p
        )
        head = f"{self.flow} {self.key!r} was not dead-lettered {where}".rstrip() + (
            f" {want}" if want else ""
        )
        why: list[str] = []
        if not found:
            other = self._dead()
            if other:
                why.append(
                    "its dead letters went to " + ", ".join(sorted({d.channel for d in other}))
                )
            else:
                reached = self._reached()
                why.append(
                    f"no dead letter within {spell(limit)}"
                    + (f"; it got as far as {self.labels[reached]!r}" if reached >= 0 else "")
                )
        else:
            d = _final(found)
            if not good(d):
                why.append(f"the dead letter's reason is {d.reason!r}")
            n = self.attempts(d)
            if attempts is not None and n != attempts:
                unseen = (
                    "a tap was not watching for part of the chain"
                    if fc._gaps
                    else "no delivery was seen (RabbitMQ shows deliveries only with the "
                    "firehose on: rabbitmqctl trace_on)"
                )
                why.append(
                    f"it took {n} attempt(s)"
                    if n is not None
                    else f"its attempts are unknown: {unseen}"
                )
        _, findings = self._verdict()
        for f in findings:
            why.append(f"{f.kind.value}: {f.message}")
        lines = [
            head,
            *indent(why),
            "",
            *indent(fc._draw(self.observations, evidence=[_final(found)] if found else [])),
        ]
        self._fail(lines, findings)

    def attempts(self, dead: Observation | None = None) -> int | None:
        """Deliveries of the chain's message, the first included; None if nothing tells
        (nothing delivered yet, or a tap gap while the chain was open).

        The checker's count (:meth:`flowcheck.checker.Checker.attempts`): the delivery
        numbers the taps saw (x-delivery-count, Redis PEL counts, retry headers), one per
        arrival on a retry channel. With ``dead``, only the step it died on counts.
        """
        fc = self.fc
        checker = fc._fed(fc._chain_items([(self.flow, self.key)]))
        return checker.attempts(self.flow, self.key, dead)

    def _fail(self, lines: list[str], findings: Sequence[Finding]) -> NoReturn:
        __tracebackhide__ = True
        self.fc._fail(
            lines, flow=self.flow, key=self.key, findings=findings, observations=self.observations
        )


def _final(dead: Sequence[Observation]) -> Observation:
    """The dead letter to talk about: the last one on a dead-letter queue, topic or stream
    (it carries the reason), else the last one seen (a dead-letter exchange)."""
    return next((d for d in reversed(dead) if d.kind is Kind.DEAD_LETTERED), dead[-1])

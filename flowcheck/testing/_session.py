"""The live test session: taps on the real brokers while a test runs, and the assertions
about flows as a whole (:meth:`FlowSession.check`, :meth:`FlowSession.never_published`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import anyio

from flowcheck.brokers import Drift, adapter
from flowcheck.checker import CHAIN_KINDS, Checker, Finding, FlowVerdict, Verdict
from flowcheck.checker.verdict import Seen, Unjudged
from flowcheck.errors import FlowcheckError, leaf
from flowcheck.observations import Kind, Observation, now
from flowcheck.recorder import apply_all, drift_observations
from flowcheck.reporting import outcomes, unjudged_text
from flowcheck.reporting.timeline import indent, rows, text
from flowcheck.testing._chain import Chain
from flowcheck.testing._results import FlowAssertionError, HopLatency, Took
from flowcheck.testing._waits import (
    DEFAULT_DEADLINE,
    Within,
    late_copy_breaks,
    seconds_of,
    settle_time,
    spell,
)
from flowcheck.topology.model import Kafka, Topology
from flowcheck.topology.transform import branched, branches_of, flow_channels, isolated
from flowcheck.trace import Header, Writer
from flowcheck.tracer import Tracer

# A settle wait that ends this much past its time had the event loop (and the taps) starved:
# it is made up for, this many times at most.
_STARVED_NS, _STARVED_ROUNDS = 10_000_000, 3
# Observations drawn in a failure message; a longer timeline is drawn as its two ends.
TIMELINE_HEAD, TIMELINE_TAIL = 24, 8
# An end far past every deadline: an assertion that judges "now" decides every chain still open.
_FAR = timedelta(days=1)
_SENT = (Kind.PUBLISHED, Kind.ROUTED, Kind.UNROUTABLE, Kind.DEAD_LETTERED)


class FlowSession:
    """Watch a topology's channels while a test runs, and assert on what flows through them.

    ``prefix`` isolates the test: every broker-side name and consumer group gets
    it (see :func:`isolated`), the channels are declared before the taps start
    and deleted when the session stops. ``flows`` limits the taps to the
    channels of those flows (and the brokers contacted to theirs). ``trace``
    is a file to record every observation to (JSON Lines, for
    ``flowcheck inspect``). ``deadline`` is how long assertions wait by default.
    ``settle`` is how long :meth:`Chain.completes` and :meth:`check` keep
    watching after a chain's end for a late copy its flow forbids; None (the
    default) derives it per flow from the taps' lateness (:func:`settle_time`).
    ``allow_unjudged`` lets :meth:`check` pass when the checker could not judge
    some declared expectation (each is still listed); None (the default) follows
    the topology's ``gate: {allow_unjudged: ...}``.

    Use ``async with FlowSession(...) as fc`` or :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        topology: Topology,
        *,
        prefix: str = "",
        flows: Sequence[str] | None = None,
        apply: bool = True,
        trace: str | os.PathLike[str] | None = None,
        deadline: Within = DEFAULT_DEADLINE,
        settle: Within | None = None,
        allow_unjudged: bool | None = None,
        name: str | None = None,
    ) -> None:
        topology = branched(topology)  # a flow's branches are flows (flow/branch)
        unknown = [f for f in flows or () if not branches_of(topology, f)]
        if unknown:
            raise FlowcheckError(
                f"unknown flow(s) {', '.join(map(repr, unknown))}; the topology has "
                f"{', '.join(map(repr, topology.flows)) or 'no flows'}"
            )
        self.source = topology
        self.topology = isolated(topology, prefix)
        self.prefix = prefix
        # A flow that branches stands for its branches.
        self.flows: list[str] = (
            [b for f in flows for b in branches_of(topology, f)]
            if flows is not None
            else list(topology.flows)
        )
        self.test_name = name
        self.deadline = seconds_of(deadline, "deadline")
        self.settle: float | None = None if settle is None else seconds_of(settle, "settle")
        self.allow_unjudged = allow_unjudged
        self.trace: Path | None = Path(trace) if trace is not None else None
        self.drift: list[Drift] = []
        watched = (
            flow_channels(self.topology, self.flows)
            if flows is not None
            else set(self.topology.channels)
        )
        self.channels: list[str] = sorted(watched)
        self._watched = frozenset(watched)
        self.brokers: list[str] = sorted({self.topology.channels[c].broker for c in watched})
        self._apply = apply
        self._cleanup = bool(prefix)
        self._items: list[Observation] = []
        # Indexes, so that waits cost per new observation, not per observation so far.
        self._keys: dict[str, dict[str, None]] = {f: {} for f in self.topology.flows}
        self._by_chain: dict[tuple[str, str], list[Observation]] = {}
        self._by_channel: dict[str, list[Observation]] = {}
        self._gaps: list[Observation] = []
        self._order: dict[int, int] = {}  # id of an observation -> its place in _items
        self._last_ns: dict[str, int] = {}  # flow -> when the taps last saw one of its chains
        # Messages this test published that no tap has seen yet, and those the taps
        # have seen (a tap may see a copy before its publish is confirmed).
        self._unseen: set[str] = set()
        self._tapped: set[str] = set()
        self._start_ns = 0
        self._start_wall = 0.0
        self._checker: Checker | None = None
        self._writer: Writer | None = None
        self._tracer: Tracer | None = None
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._changed = anyio.Event()
        self._ready = anyio.Event()
        self._stop = anyio.Event()
        self._seq = 0
        self._ended: tuple[int, float] | None = None  # (mono_ns, wall) when the taps stopped
        self.assertions: list[tuple[str, str | None, bool]] = []  # (what, flow, passed)
        self.failures: list[FlowAssertionError] = []

    def __repr__(self) -> str:
        own = f", prefix {self.prefix!r}" if self.prefix else ""
        return (
            f"<FlowSession topology {self.topology.name or '(unnamed)'!r}{own}, "
            f"{len(self.channels)} channels watched, {len(self._items)} observations>"
        )

    # ------------------------------------------------------------ life cycle

    async def __aenter__(self) -> FlowSession:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Declare the channels (when applying), connect, and return once every tap watches."""
        if self._task is not None:
            raise RuntimeError("this session has already been started")
        self._changed, self._ready, self._stop = anyio.Event(), anyio.Event(), anyio.Event()
        self._start_ns, wall = now()
        self._start_wall = wall
        # Expectations (empty) for every flow make the checker remember decided chains.
        checker = Checker(
            self.topology, start_ns=self._start_ns, expected={f: set() for f in self.topology.flows}
        )
        checker.advance(self._start_ns)  # ready to answer settled() before the first observation
        self._checker = checker
        if self.trace is not None:
            self.trace.parent.mkdir(parents=True, exist_ok=True)
            header = Header(
                topology=self.topology.name,
                started=wall,
                started_mono_ns=self._start_ns,
                test=self.test_name,
                prefix=self.prefix or None,
            )
            self._writer = Writer(str(self.trace), header)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._serve(), name=f"flowcheck taps {self.prefix}")
        await self._ready.wait()
        if self._error is not None:
            error = self._error
            await self._end_task()
            self._close_trace(keep=False)
            if self._cleanup and self._apply:
                # Whatever was declared before the failure: an isolated test leaves nothing.
                with contextlib.suppress(FlowcheckError, OSError):
                    await self._delete()
            raise error

    async def _serve(self) -> None:
        try:
            if self._apply:
                await self._declare()
            async with Tracer(self.topology, [self._observe], channels=self.channels) as tracer:
                self._tracer = tracer
                self._ready.set()
                await self._stop.wait()
                self._ended = now()  # the taps watched until here: the trace's end record
        except Exception as exc:  # kept and raised where it is useful: start, waits, stop
            self._error = leaf(exc)
        finally:
            self._tracer = None
            self._ready.set()
            self._wake()

    async def _declare(self) -> None:
        mono, wall = now()
        mine = [k for k, ch in self.topology.channels.items() if ch.broker in self.brokers]
        self.drift += await apply_all(self.topology, mine)
        if self._writer is not None:
            for obs in drift_observations(self.topology, self.drift, mono, wall):
                self._writer.write(obs)

    async def _end_task(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        await task

    async def stop(self, *, keep_trace: bool = True) -> None:
        """Stop the taps, delete an isolated test's channels, close the trace.

        ``keep_trace=False`` deletes the trace file (the plugin does so for
        tests that passed). Raises the taps' error if they failed mid-way.
        """
        if self._task is None:
            return
        await self._end_task()
        failed = self._error
        try:
            if self._cleanup and self._apply:
                await self._delete()
        finally:
            self._close_trace(keep=keep_trace)
        if failed is not None:
            raise FlowcheckError(f"the taps stopped during the test: {failed}") from failed

    async def _delete(self) -> None:
        for name in self.brokers:
            mine = [k for k, ch in self.topology.channels.items() if ch.broker == name]
            async with adapter(name, self.topology) as ad:
                await ad.delete(mine)

    def _close_trace(self, *, keep: bool) -> None:
        if self._writer is not None:
            if self._ended is not None and self._error is None:
                self._writer.end("stopped", *self._ended)  # a tap failure leaves no end
            self._writer.close()
            self._writer = None
            if not keep and self.trace is not None:
                self.trace.unlink(missing_ok=True)

    def flush_trace(self) -> None:
        """Make the trace file complete so far (for a failed test, before its report)."""
        if self._writer is not None:
            self._writer.flush()

    # ------------------------------------------------------------ observations

    def _observe(self, obs: Observation) -> None:
        self._order[id(obs)] = len(self._items)
        self._items.append(obs)
        if self._writer is not None:
            self._writer.write(obs)
        if self._checker is not None:
            self._checker.feed(obs)
        self._by_channel.setdefault(obs.channel, []).append(obs)
        if obs.kind is Kind.GAP:
            self._gaps.append(obs)
        if obs.fc_id is not None:
            if obs.kind is not Kind.PUBLISHED:
                self._tapped.add(obs.fc_id)
                self._unseen.discard(obs.fc_id)
            elif obs.fc_id not in self._tapped and self._echoed(obs):
                self._unseen.add(obs.fc_id)
        for flow, key in obs.keys.items():
            keys = self._keys.get(flow)
            if keys is not None:
                keys.setdefault(key, None)
            self._by_chain.setdefault((flow, key), []).append(obs)
            self._last_ns[flow] = max(self._last_ns.get(flow, 0), obs.mono_ns)
        self._wake()

    def _echoed(self, published: Observation) -> bool:
        """Will a tap of this test see the message of this PUBLISHED observation?"""
        adapter = None if self._tracer is None else self._tracer.adapters.get(published.broker)
        return (
            adapter is not None
            and published.channel in self._watched
            and adapter.echoes(published.channel)
        )

    def _wake(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    @property
    def observations(self) -> list[Observation]:
        """Everything the taps saw so far (and every publish), in the order seen."""
        return list(self._items)

    @property
    def started_ns(self) -> int:
        """The monotonic clock when the session started: ``at ms`` in timelines counts from it."""
        return self._start_ns

    @property
    def started_wall(self) -> float:
        """The wall clock (Unix seconds) when the session started, read with ``started_ns``."""
        return self._start_wall

    @property
    def ended_ns(self) -> int | None:
        """The monotonic clock when the taps stopped watching; None while they watch."""
        return None if self._ended is None else self._ended[0]

    def _alive(self) -> None:
        __tracebackhide__ = True
        if self._task is None and not self._items and self._checker is None:
            raise RuntimeError("this session is not started: use 'async with' or start()")
        if self._error is not None:
            raise FlowcheckError(f"the taps stopped: {self._error}") from self._error

    async def wait_for(
        self, predicate: Callable[[list[Observation]], bool], within: Within | None = None
    ) -> bool:
        """Wait until ``predicate(observations)`` holds (True) or ``within`` passes (False).

        Evaluated at once and after every new observation: the building block of
        every assertion here, for conditions they do not cover.
        """
        return await self._wait(lambda: predicate(self._items), self._limit(within))

    async def _wait(self, done: Callable[[], bool], limit: float) -> bool:
        __tracebackhide__ = True
        with anyio.move_on_after(limit):
            while True:
                changed = self._changed  # taken before the check: no change can be missed
                self._alive()
                if done():
                    return True
                await changed.wait()
        self._alive()
        return done()

    async def _until_decided(self, done: Callable[[], bool], limit: float) -> bool:
        """:meth:`_wait` for a test of chains that a deadline can decide: it also wakes when
        the checker's next chain is due, and lets its clock reach that time (a chain lost
        at its deadline brings no observation that would wake the wait)."""
        __tracebackhide__ = True
        checker = self._checker
        assert checker is not None
        give_up = now()[0] + int(limit * 1e9)
        while True:
            at = now()[0]
            checker.advance(at)
            left = give_up - at
            if left <= 0:
                self._alive()
                return done()
            due = checker.due()
            wake = give_up if due is None else min(give_up, max(due + 1, at + 1))

            def woken(planned: int | None = due) -> bool:
                # A chain opened meanwhile may be due before the one planned for.
                soon = checker.due()
                return done() or (soon is not None and (planned is None or soon < planned))

            if await self._wait(woken, (wake - at) / 1e9) and done():
                return True

    def _limit(self, within: Within | None) -> float:
        __tracebackhide__ = True
        return self.deadline if within is None else seconds_of(within, "within")

    def settle_for(self, flow: str, settle: Within | None = None) -> float:
        """Seconds to keep watching a chain of ``flow`` after its end: ``settle`` if given,
        else this session's ``settle``, else :func:`settle_time`. Zero for a flow that no
        late copy can break, whatever is given."""
        __tracebackhide__ = True
        self._flow(flow)
        if not late_copy_breaks(self.topology.flows[flow]):
            return 0.0
        if settle is not None:
            return seconds_of(settle, "settle")
        if self.settle is not None:
            return self.settle
        return settle_time(self.topology, flow).total_seconds()

    async def _settle(self, until_ns: int, broken: Callable[[], bool]) -> bool:
        """Wait until the monotonic clock reaches ``until_ns``, or until ``broken()`` holds
        (checked after every new observation); True if it did.

        A wait that ends well past ``until_ns`` means the event loop was starved (a busy
        machine): the taps were too, and what they have not read yet may be the copy
        looked for. So it waits again, as long as it overran, a few times at most.
        """
        __tracebackhide__ = True
        for _ in range(_STARVED_ROUNDS):
            left = (until_ns - now()[0]) / 1e9
            if left <= 0:
                break  # its time had passed before it began: the taps had their turns
            if await self._wait(broken, left):
                return True
            at = now()[0]
            overran = at - until_ns
            if overran <= _STARVED_NS:
                break
            until_ns = at + overran
        return broken()

    def _broken(self, flows: Sequence[str]) -> Callable[[], bool]:
        """A test, cheap while nothing new comes: has a chain of ``flows`` seen since the
        call got a finding? (The verdict that counts is judged afterwards, on everything.)"""
        done = len(self._items)
        wanted = set(flows)

        def broken() -> bool:
            nonlocal done
            new, done = self._items[done:], len(self._items)
            chains = {(f, k) for o in new for f, k in o.keys.items() if f in wanted}
            if not chains:
                return False
            keys = {k for _, k in chains}
            verdict = self._judge(self._chain_items(chains), settle=True)
            return any(
                f.kind in CHAIN_KINDS and f.key in keys
                for fv in verdict.flows
                if fv.flow in wanted
                for f in fv.findings
            )

        return broken

    def _chain_items(self, chains: Iterable[tuple[str, str]]) -> list[Observation]:
        """The observations of ``chains`` and every tap gap, in the order seen."""
        order = self._order
        out = {order[id(o)]: o for c in chains for o in self._by_chain.get(c, ())}
        out.update((order[id(g)], g) for g in self._gaps)
        return [out[i] for i in sorted(out)]

    # ------------------------------------------------------------ names and publishing

    def name(self, channel: str) -> str:
        """The broker-side name of ``channel`` (a channel key of the topology) in this test."""
        __tracebackhide__ = True
        if channel not in self.topology.channels:
            raise KeyError(
                f"no channel {channel!r} in the topology; it has {sorted(self.topology.channels)}"
            )
        return self.topology.channel_name(channel)

    def group(self, group: str) -> str:
        """The broker-side name of a consumer group the topology names, in this test."""
        return self.prefix + group

    def address(self, broker: str) -> str:
        """How to reach ``broker`` (a broker key): the URL, or the Kafka bootstrap servers."""
        __tracebackhide__ = True
        if broker not in self.topology.brokers:
            raise KeyError(
                f"no broker {broker!r} in the topology; it has {sorted(self.topology.brokers)}"
            )
        b = self.topology.brokers[broker]
        if isinstance(b, Kafka):
            return ",".join(b.bootstrap)
        return b.url.get_secret_value()

    def key(self, label: str = "key") -> str:
        """A correlation key no other test uses: ``label`` plus a random part and a counter."""
        self._seq += 1
        return f"{label}-{secrets.token_hex(4)}-{self._seq}"

    async def publish(
        self,
        channel: str,
        payload: bytes | str | Mapping[str, Any] | Sequence[Any],
        *,
        headers: Mapping[str, str] | None = None,
        key: str | None = None,
        routing_key: str | None = None,
    ) -> Observation:
        """Publish to ``channel`` (a channel key) through its broker.

        ``payload``: bytes, text, or anything JSON can encode. ``key`` is the
        Kafka record key, ``routing_key`` the RabbitMQ routing key. Returns the
        PUBLISHED observation (UNROUTABLE if RabbitMQ returned it); its
        ``keys`` are the correlation keys per flow.
        """
        __tracebackhide__ = True
        self._alive()
        if channel not in self.topology.channels:
            raise KeyError(
                f"no channel {channel!r} in the topology; it has {sorted(self.topology.channels)}"
            )
        tracer = self._tracer
        broker = self.topology.channels[channel].broker
        if tracer is None or broker not in tracer.adapters:
            raise FlowcheckError(
                f"cannot publish to {channel!r}: its broker {broker!r} is not connected in this "
                f"test (it watches the flows {', '.join(self.flows)})"
            )
        if isinstance(payload, bytes):
            body = payload
        elif isinstance(payload, str):
            body = payload.encode()
        else:
            body = json.dumps(payload).encode()
        return await tracer.publish(
            channel, body, headers=dict(headers or {}), key=key, routing_key=routing_key
        )

    # ------------------------------------------------------------ judging

    def _flow(self, flow: str) -> None:
        __tracebackhide__ = True
        if flow not in self.topology.flows:
            raise FlowcheckError(
                f"unknown flow {flow!r}; the topology has {', '.join(map(repr, self.topology.flows))}"
            )

    def _fed(
        self,
        items: Sequence[Observation],
        *,
        expected: Mapping[str, Iterable[str]] | None = None,
        flows: Sequence[str] | None = None,
    ) -> Checker:
        """A checker (of ``flows`` only, if given) that has been fed ``items``; its chains
        are still open."""
        topology = self.topology
        if flows is not None:
            topology = topology.model_copy(
                update={"flows": {f: v for f, v in topology.flows.items() if f in flows}}
            )
        checker = Checker(
            topology,
            start_ns=self._start_ns,
            expected=expected,
            allow_unjudged=self.allow_unjudged,
        )
        for obs in items:
            checker.feed(obs)
        return checker

    def _judge(
        self,
        items: Sequence[Observation],
        *,
        settle: bool,
        expected: Mapping[str, Iterable[str]] | None = None,
        flows: Sequence[str] | None = None,
    ) -> Verdict:
        """The checker's verdict on ``items`` (of ``flows`` only, if given); ``settle``
        decides every chain still open."""
        end, _ = now()
        if settle:
            end += int(_FAR.total_seconds() * 1e9)
        return self._fed(items, expected=expected, flows=flows).finish(end)

    def verdict(self) -> Verdict:
        """The verdict on everything seen so far; chains still inside their deadline are
        *unknown*, not lost. Asserts nothing: see :meth:`check`."""
        return self._judge(self._items, settle=False)

    def seen_keys(self, flow: str) -> list[str]:
        """The correlation keys of ``flow`` seen so far, in the order first seen."""
        return list(self._keys.get(flow, ()))

    def chain_observations(self, flow: str, key: str) -> list[Observation]:
        """What was seen of the chain ``key`` of ``flow``, in the order seen."""
        return list(self._by_chain.get((flow, key), ()))

    def chain(self, flow: str, key: str) -> Chain:
        """Assertions about one chain: the messages of ``flow`` with correlation key ``key``."""
        __tracebackhide__ = True
        self._flow(flow)
        return Chain(self, flow, key)

    async def never_published(
        self,
        channel: str,
        *,
        within: Within,
        key: str | None = None,
        flow: str | None = None,
    ) -> None:
        """Assert that nothing (with correlation ``key``, of ``flow`` if given) reaches
        ``channel`` during ``within``. Fails as soon as something does; passes only
        when the whole window has gone by, so keep ``within`` short."""
        __tracebackhide__ = True
        if channel not in self.topology.channels:
            raise KeyError(
                f"no channel {channel!r} in the topology; it has {sorted(self.topology.channels)}"
            )
        if channel not in self.channels:
            raise FlowcheckError(
                f"{channel!r} is not watched in this test (it watches the channels of "
                f"{', '.join(self.flows)}); widen the marker's flows= to see it"
            )
        if flow is not None:
            self._flow(flow)

        def hits() -> list[Observation]:
            return [
                o
                for o in self._by_channel.get(channel, ())
                if o.channel == channel
                and o.kind in _SENT
                and (
                    key is None
                    or (o.keys.get(flow) == key if flow is not None else key in o.keys.values())
                )
            ]

        limit = self._limit(within)
        await self._wait(lambda: bool(hits()), limit)
        found = hits()
        what = f"key {key!r}" if key is not None else "any message"
        owner = flow or next(
            (f for f in self.flows if channel in flow_channels(self.topology, [f])), None
        )
        self._record("never_published", owner, not found)
        if not found:
            return
        first = found[0]
        shown_flow = flow or next(iter(first.keys), None)
        timeline = (
            self.chain_observations(shown_flow, first.keys[shown_flow])
            if shown_flow is not None and shown_flow in first.keys
            else found
        )
        lines = [
            f"{what} reached {channel!r}, which it must never reach "
            f"({len(found)} time(s); the first at {self._at(first):.1f}ms)",
            "",
            *indent(self._draw(timeline, evidence=[first])),
        ]
        self._fail(lines, flow=shown_flow, key=key, observations=timeline)

    async def check(
        self, *flows: str, within: Within | None = None, settle: Within | None = None
    ) -> Verdict:
        """Assert that the flows (default: all this test watches) hold everything the
        topology expects of them: no chain lost, duplicated, reordered, late,
        retried or dead-lettered against the rules, latency within budget.

        Without names, the flows judged are those this test saw a chain of: a flow
        it never exercised is not its business (and with none at all, the check
        fails: it judged nothing). A flow named here must have seen at least one
        chain, and is judged on all it declares.

        Waits until every chain seen (and every key published) has reached its
        end and the taps have seen every message this test published, at most
        ``within``; chains still open then count as lost. A chain decided lost at its
        deadline (with the taps' grace) is not waited for. Then keeps watching for
        each flow's settle time (``settle``, default :meth:`settle_for`) past its
        last chain, for a late copy the flow forbids; it stops early when one
        comes. A flow named here must have seen at least one chain.
        """
        __tracebackhide__ = True
        # A flow that branches is checked as its branches.
        flows = tuple(b for f in flows for b in branches_of(self.topology, f) or [f])
        for f in flows:
            self._flow(f)
        names = list(flows) or self.flows
        checker = self._checker
        assert checker is not None

        # Every chain seen (publishes are observations too) until it has reached its end.
        open_chains: set[tuple[str, str]] = set()
        known = dict.fromkeys(names, 0)

        def settled() -> bool:
            for f in names:
                keys = self._keys.get(f, {})
                if len(keys) > known[f]:
                    open_chains.update((f, k) for k in list(keys)[known[f] :])
                    known[f] = len(keys)
            open_chains.difference_update([c for c in open_chains if checker.settled(*c)])
            # A chain can end before a second publish of its key has been seen at all:
            # judged then, that copy's arrivals downstream would be missed.
            return not open_chains and not self._unseen

        limit = self._limit(within)
        quiet = {f: self.settle_for(f, settle) for f in names}
        give_up = now()[0] + int(limit * 1e9)
        if not any(self._keys.get(f) for f in names):
            # Nothing seen yet: what the system published itself may still be on its way
            # to a tap (a Kafka tap reads at its fetch wait). Wait a tap's lateness for it.
            first = min(limit, max(quiet.values(), default=0.0))
            await self._wait(lambda: any(self._keys.get(f) for f in names), first)
        while await self._until_decided(settled, max(0.0, (give_up - now()[0]) / 1e9)):
            # Every chain has reached its end: watch for the settle time past the last one
            # seen, for a late copy that breaks what its flow declares.
            until = max(
                (self._last_ns[f] + int(q * 1e9) for f, q in quiet.items() if f in self._last_ns),
                default=0,
            )
            if await self._settle(until, self._broken(names)) or settled():
                break  # broken, or no chain opened meanwhile (else: wait for those too)
        judged = list(flows) or [f for f in names if self._keys.get(f)]
        verdict = self._judge(self._items, settle=True, flows=judged)
        mine = [fv for fv in verdict.flows if fv.flow in names]
        failing = [
            fv for fv in mine if not fv.passed or any(f.kind in CHAIN_KINDS for f in fv.findings)
        ]
        empty = [f for f in flows if not any(fv.flow == f and fv.chains for fv in mine)]
        if not judged:
            empty = list(names)  # no chain of any flow: a check that judged nothing
        allowed = verdict.allow_unjudged
        # Expectations of the recording as a whole that could not be judged fail it too.
        whole = [] if allowed else verdict.unjudged
        passed = not failing and not empty and not whole
        for f in names:
            self._record("check", f, passed)
        if passed:
            return verdict
        lines: list[str] = []
        if failing:
            what = ", ".join(f"{fv.flow} ({_counts(fv)})" for fv in failing)
            lines.append(f"flow check failed: {what}")
        elif whole:
            lines.append(f"flow check failed: {len(whole)} expectation(s) could not be judged")
        for f in empty:
            # What the taps could not watch of its steps says why (the firehose off).
            steps = {s.channel for s in self.topology.flows[f].steps}
            unwatched = sorted({g.reason for g in verdict.gaps if g.channel in steps and g.reason})
            lines.append(
                f"flow {f!r}: no chain was seen (nothing published or routed to its steps)"
                + "".join(f"; {why}" for why in unwatched)
            )
        if open_chains:
            lines.append(
                f"gave up after {spell(limit)} with {len(open_chains)} chain(s) still open; "
                "they count as lost"
            )
        for u in verdict.unjudged:
            lines.append(_unjudged_line(u, allowed))
        for fv in failing:
            lines += ["", *self._draw_flow(fv, allowed=allowed)]
        findings = [f for fv in failing for f in fv.findings]
        unjudged = [*verdict.unjudged, *(u for fv in failing for u in fv.unjudged)]
        self._fail(
            lines,
            flow=names[0] if len(names) == 1 else None,
            findings=findings,
            unjudged=unjudged,
        )

    def latency(self, flow: str, hop: str = "end-to-end") -> HopLatency:
        """Latency of ``hop`` of ``flow`` over the chains decided so far.

        ``hop`` is ``"end-to-end"``, a hop as reports name it (``"a -> b"``), or
        a step: the hop into that step. Values are :class:`Took`, comparable with
        ``"200ms"``; reading one with no samples fails with an explanation.
        """
        __tracebackhide__ = True
        self._flow(flow)
        fv = next(f for f in self.verdict().flows if f.flow == flow)
        hops = {lat.hop: lat for lat in fv.latency}
        lat = hops.get(hop) or next((v for h, v in hops.items() if h.endswith(f" -> {hop}")), None)
        if lat is None:
            raise KeyError(f"{flow} has no hop {hop!r}; its hops are {', '.join(map(repr, hops))}")
        s = lat.stats
        raw = {"p50": s.p50_ms, "p90": s.p90_ms, "p95": s.p95_ms, "p99": s.p99_ms, "max": s.max_ms}
        values = {p: (Took.of_ms(v) if v is not None and s.count else None) for p, v in raw.items()}
        budget = {p: Took.of_ms(v) for p, v in lat.budget_ms.items()}
        return HopLatency(
            flow=flow,
            hop=lat.hop,
            count=s.count,
            budget=budget,
            values=values,
            left_out=s.non_positive,
        )

    def timeline(self, flow: str, key: str) -> str:
        """The chain drawn as failure messages draw it, for a print while debugging."""
        return "\n".join(self._draw(self.chain_observations(flow, key)))

    # ------------------------------------------------------------ reporting

    def _record(self, what: str, flow: str | None, passed: bool) -> None:
        self.assertions.append((what, flow, passed))

    def _fail(
        self,
        lines: list[str],
        *,
        flow: str | None = None,
        key: str | None = None,
        findings: Sequence[Finding] = (),
        observations: Sequence[Observation] = (),
        unjudged: Sequence[Unjudged] = (),
    ) -> NoReturn:
        __tracebackhide__ = True
        if self.trace is not None:
            inspect = f"flowcheck inspect {self.trace}"
            if flow is not None:
                inspect += f" --flow {flow}"
            if key is not None:
                inspect += f" --key {key}"
            lines = [*lines, "", f"trace: {self.trace}", f"  {inspect}"]
        error = FlowAssertionError(
            "\n".join(lines),
            flow=flow,
            key=key,
            findings=findings,
            observations=observations,
            trace=self.trace,
            unjudged=unjudged,
        )
        self.failures.append(error)
        raise error

    def _at(self, obs: Observation) -> float:
        return (obs.mono_ns - self._start_ns) / 1e6

    def _draw(
        self,
        items: Sequence[Observation],
        *,
        evidence: Sequence[Observation | Seen] = (),
        tail: Sequence[tuple[str, str, str]] = (),
    ) -> list[str]:
        """A timeline as text: ``>`` marks the observations a finding is about,
        ``x`` the step that never came."""
        return text(
            rows(
                items,
                start_ns=self._start_ns,
                evidence=evidence,
                missing=tail,
                head=TIMELINE_HEAD,
                tail=TIMELINE_TAIL,
            )
        )

    def _draw_flow(self, fv: FlowVerdict, *, allowed: bool = False) -> list[str]:
        out = [f"{fv.flow}: {_counts(fv)}"]
        out += [_unjudged_line(u, allowed, indent=2) for u in fv.unjudged]
        failed = [c for c in fv.checks if not c.passed]
        for c in failed:
            out.append(f"  failed check {c.name}: {c.message}")
        by_chain: dict[str, list[Finding]] = {}
        others: list[Finding] = []
        for f in fv.findings:
            if f.kind in CHAIN_KINDS and f.key is not None:
                by_chain.setdefault(f.key, []).append(f)
            else:
                others.append(f)
        for key, found in list(by_chain.items())[:10]:
            out.append("")
            out.append(f"  key {key}:")
            for f in found:
                out.append(f"    {f.kind.value}: {f.message}")
            items = self.chain_observations(fv.flow, key)
            tail = [
                ("expected", f.next_step, "never came" + (f", {f.cause.value}" if f.cause else ""))
                for f in found
                if f.next_step is not None
            ]
            out += indent(
                self._draw(items, evidence=[s for f in found for s in f.seen], tail=tail), 4
            )
        if len(by_chain) > 10:
            out.append(f"  ... {len(by_chain) - 10} more broken chains")
        for f in others[:10]:
            out.append(f"  {f.kind.value}: {f.message}")
        return out


def _counts(fv: FlowVerdict) -> str:
    parts = [f"{fv.chains} chain(s)", f"{fv.succeeded} succeeded", f"{fv.failed} failed"]
    parts += outcomes(fv)
    if fv.unjudged:
        parts.append(f"{len(fv.unjudged)} unjudged")
    return ", ".join(parts)


def _unjudged_line(u: Unjudged, allowed: bool, indent: int = 0) -> str:
    """``not judged: EXPECTATION: WHY (N chains)``, and whether the user allowed that."""
    return " " * indent + "not judged" + (" (allowed)" if allowed else "") + ": " + unjudged_text(u)

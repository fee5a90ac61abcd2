"""Assertions on event flows, for integration tests: the API behind the pytest plugin.

A :class:`Flowcheck` watches a topology's channels on the real brokers while a
test runs. The test publishes (or lets its own code publish), then asserts::

    async with Flowcheck(topology, prefix="t-1.") as fc:
        await fc.publish("orders", {"order_id": "o-1"}, routing_key="order.placed")
        await fc.chain("order-billed", "o-1").completes(within="2s")
        await fc.never_published("billing.dlq", key="o-1", within="500ms")
        await fc.check("order-billed")           # nothing lost, duplicated, late, ...
        assert fc.latency("order-billed").p99 < "250ms"

Every assertion waits for the observations it needs and returns as soon as it
has them; none sleeps. ``completes`` and ``check`` then watch for the flow's
settle time past the chain's end (:func:`settle_time`), as taps may see a
forbidden copy late, and fail as soon as one comes. Only
:meth:`Flowcheck.never_published` waits its whole window, because there the
deadline itself is the event. A failed assertion
raises :class:`FlowAssertionError` (an :class:`AssertionError`) whose message
draws the chain's timeline, where it stopped and what was expected next.

With the pytest plugin (``flowcheck.pytest_plugin``) tests get a started
:class:`Flowcheck` from the ``flowcheck`` fixture; see docs/pytest.md.

Taps run in a task of their own, so a :class:`Flowcheck` may be started in one
task and stopped in another (pytest-asyncio runs fixture setup and teardown
that way). The broker clients are asyncio libraries: run it on asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import anyio
from pydantic import SecretStr

from flowcheck.brokers import Drift, adapter
from flowcheck.checker import (
    CHAIN_KINDS,
    Checker,
    Finding,
    FindingKind,
    FlowVerdict,
    Verdict,
)
from flowcheck.checker.verdict import Cause, Seen, Unjudged
from flowcheck.correlate import Correlator
from flowcheck.errors import FlowcheckError, UsageError, leaf
from flowcheck.observations import Kind, Observation, now
from flowcheck.reporting._common import ms as fmt_ms
from flowcheck.reporting._common import unjudged_text
from flowcheck.topology._types import format_duration, parse_duration
from flowcheck.topology.model import (
    Exchange,
    Flow,
    Kafka,
    RabbitMQ,
    Redis,
    Stream,
    Topic,
    Topology,
)
from flowcheck.topology.routing import dead_letter_path
from flowcheck.trace import Header, Writer
from flowcheck.tracer import Tracer

__all__ = [
    "DEFAULT_DEADLINE",
    "SETTLE_MARGIN",
    "Chain",
    "FlowAssertionError",
    "Flowcheck",
    "HopLatency",
    "Took",
    "isolated",
    "settle_time",
    "with_brokers",
]

DEFAULT_DEADLINE = timedelta(seconds=10)
# Added to the taps' lateness in a flow's settle time: how much later than its first copy a
# consumer's own second publish of one message may come (a retry, a send done twice).
SETTLE_MARGIN = timedelta(milliseconds=50)
# A settle wait that ends this much past its time had the event loop (and the taps) starved:
# it is made up for, this many times at most.
_STARVED_NS, _STARVED_ROUNDS = 10_000_000, 3
# Observations drawn in a failure message; a longer timeline is drawn as its two ends.
TIMELINE_HEAD, TIMELINE_TAIL = 24, 8
# An end far past every deadline: an assertion that judges "now" decides every chain still open.
_FAR = timedelta(days=1)
_ARRIVALS = (Kind.PUBLISHED, Kind.ROUTED)
_DELIVERIES = (Kind.DELIVERED, Kind.REDELIVERED)
_SENT = (Kind.PUBLISHED, Kind.ROUTED, Kind.UNROUTABLE, Kind.DEAD_LETTERED)

Within = str | float | timedelta


# ---------------------------------------------------------------- topology helpers


def isolated(topology: Topology, prefix: str) -> Topology:
    """``topology`` with ``prefix`` in front of every broker-side name and consumer group.

    Channel keys (what flows, reports and this API use) stay as they are; only
    the ``name`` each channel has on its broker changes. RabbitMQ's own
    ``amq.*`` exchanges keep their names. Stream groups and the groups of the
    services' ``consumes`` get the prefix too.
    """
    if not prefix:
        return topology
    channels: dict[str, Any] = {}
    for key, ch in topology.channels.items():
        name = ch.name or key
        update: dict[str, Any] = {}
        if not (isinstance(ch, Exchange) and name.startswith("amq.")):
            update["name"] = prefix + name
        if isinstance(ch, Stream) and ch.groups:
            update["groups"] = [prefix + g for g in ch.groups]
        channels[key] = ch.model_copy(update=update)
    services = {
        key: svc.model_copy(
            update={
                "consumes": [
                    c.model_copy(update={"group": prefix + c.group}) if c.group else c
                    for c in svc.consumes
                ]
            }
        )
        for key, svc in topology.services.items()
    }
    return topology.model_copy(update={"channels": channels, "services": services})


def with_brokers(
    topology: Topology,
    *,
    rabbitmq_url: str | None = None,
    kafka_bootstrap: str | None = None,
    redis_url: str | None = None,
) -> Topology:
    """``topology`` with every broker of a kind pointed at the given address (None: as is)."""
    brokers: dict[str, Any] = {}
    for name, b in topology.brokers.items():
        if isinstance(b, RabbitMQ) and rabbitmq_url:
            b = b.model_copy(update={"url": SecretStr(rabbitmq_url)})
        elif isinstance(b, Kafka) and kafka_bootstrap:
            parts = [p.strip() for p in kafka_bootstrap.split(",") if p.strip()]
            b = b.model_copy(update={"bootstrap": parts})
        elif isinstance(b, Redis) and redis_url:
            b = b.model_copy(update={"url": SecretStr(redis_url)})
        brokers[name] = b
    return topology.model_copy(update={"brokers": brokers})


def flow_channels(topology: Topology, flows: Iterable[str]) -> set[str]:
    """Every channel the taps must watch to follow ``flows``: steps, retries, dead letters."""
    wanted = set(flows)
    return {
        ch
        for ch, entries in Correlator(topology).rules.items()
        if any(f in wanted for f, _ in entries)
    }


def late_copy_breaks(flow: Flow) -> bool:
    """Can a copy seen after a chain of ``flow`` has reached its end break what the flow
    declares? A duplicate can (exactly-once, at-most-once), so can an arrival out of
    order (ordering) and one more attempt (a retry policy, a dead letter's attempts)."""
    return (
        flow.delivery != "at-least-once"
        or flow.ordering != "none"
        or flow.retry is not None
        or any(s.retry is not None for s in flow.steps)
        or any(r.attempts is not None for r in flow.dead_letters)
    )


def settle_time(topology: Topology, flow: str) -> timedelta:
    """How long to keep watching a chain of ``flow`` after it reached its end, for a late
    copy the flow forbids: the longest a tap of its channels may see a message late
    (:meth:`Topology.tap_late`), plus :data:`SETTLE_MARGIN`; zero for a flow that no
    late copy can break (:func:`late_copy_breaks`)."""
    if not late_copy_breaks(topology.flows[flow]):
        return timedelta(0)
    lateness = [
        late[0]
        for ch in sorted(flow_channels(topology, [flow]))
        if (late := topology.tap_late(ch)) is not None
    ]
    return max(lateness, default=timedelta(0)) + SETTLE_MARGIN


_ZERO = re.compile(r"\s*0+(?:\.0*)?\s*(?:us|µs|ms|s|m|h)?\s*")


def seconds(value: Within) -> float:
    """A wait: ``"2s"``, ``"250ms"``, a number of seconds, or a timedelta (``"0s"``: none)."""
    if isinstance(value, str) and _ZERO.fullmatch(value):
        return 0.0
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool):
        raise TypeError("write a duration like '2s' or a number of seconds")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a wait cannot be negative")
        return float(value)
    return parse_duration(value).total_seconds()


def _seconds_of(value: Within, what: str) -> float:
    """:func:`seconds`, failing with a :class:`UsageError` that names the argument."""
    __tracebackhide__ = True
    try:
        return seconds(value)
    except (TypeError, ValueError) as exc:
        # A typo in a test: say it in the test's terms, not as a trace through the parser.
        raise UsageError(f"{what}={value!r}: {exc}") from None


def _spell(value: float) -> str:
    return format_duration(timedelta(seconds=value)) if value > 0 else "0s"


# ---------------------------------------------------------------- results


class Took(timedelta):
    """A latency. Compares with durations as topologies write them (``"200ms"``),
    with numbers of seconds and with timedeltas: ``assert lat.p99 < "200ms"``."""

    @classmethod
    def of_ms(cls, value: float) -> Took:
        return cls(microseconds=round(value * 1000))

    @staticmethod
    def _other(other: object) -> timedelta | None:
        if isinstance(other, timedelta):
            return other
        if isinstance(other, str):
            return parse_duration(other)
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return timedelta(seconds=other)
        return None

    def __lt__(self, other: object) -> bool:
        o = self._other(other)
        if o is None:
            return NotImplemented
        return timedelta.__lt__(self, o)

    def __le__(self, other: object) -> bool:
        o = self._other(other)
        if o is None:
            return NotImplemented
        return timedelta.__le__(self, o)

    def __gt__(self, other: object) -> bool:
        o = self._other(other)
        if o is None:
            return NotImplemented
        return timedelta.__gt__(self, o)

    def __ge__(self, other: object) -> bool:
        o = self._other(other)
        if o is None:
            return NotImplemented
        return timedelta.__ge__(self, o)

    def __eq__(self, other: object) -> bool:
        o = self._other(other)
        if o is None:
            return NotImplemented
        return timedelta.__eq__(self, o)

    __hash__ = timedelta.__hash__

    @property
    def ms(self) -> float:
        return self / timedelta(milliseconds=1)

    def __repr__(self) -> str:
        return f"{fmt_ms(self.ms)}ms"

    __str__ = __repr__


class FlowAssertionError(AssertionError):
    """An event-flow assertion failed. The message is the report; the rest is for code."""

    def __init__(
        self,
        message: str,
        *,
        flow: str | None = None,
        key: str | None = None,
        findings: Sequence[Finding] = (),
        observations: Sequence[Observation] = (),
        trace: Path | None = None,
        unjudged: Sequence[Unjudged] = (),
    ) -> None:
        super().__init__(message)
        self.flow = flow
        self.key = key
        self.findings = list(findings)
        self.observations = list(observations)
        self.trace = trace
        self.unjudged = list(unjudged)  # expectations that could not be judged, and why


@dataclass(frozen=True)
class HopLatency:
    """Latency of one hop (or ``end-to-end``) of one flow, over the chains decided so far."""

    flow: str
    hop: str
    count: int
    budget: dict[str, Took] = field(default_factory=dict)
    values: dict[str, Took | None] = field(default_factory=dict)
    left_out: int = 0  # samples <= 0: copies of one message seen at the same instant

    def _get(self, percentile: str) -> Took:
        __tracebackhide__ = True
        value = self.values.get(percentile)
        if value is None:
            why = (
                f"its {self.left_out} sample(s) were <= 0 and left out (the taps saw both ends "
                "at the same instant, as for an exchange and its queue)"
                if self.left_out
                else "no chain has completed that hop (wait for one first, e.g. await "
                "flowcheck.chain(...).completes())"
            )
            raise FlowAssertionError(
                f"{self.flow}: no latency samples for {self.hop!r} yet: {why}", flow=self.flow
            )
        return value

    @property
    def p50(self) -> Took:
        __tracebackhide__ = True
        return self._get("p50")

    @property
    def p90(self) -> Took:
        __tracebackhide__ = True
        return self._get("p90")

    @property
    def p95(self) -> Took:
        __tracebackhide__ = True
        return self._get("p95")

    @property
    def p99(self) -> Took:
        __tracebackhide__ = True
        return self._get("p99")

    @property
    def max(self) -> Took:
        __tracebackhide__ = True
        return self._get("max")

    def __repr__(self) -> str:
        return f"<latency of {self.flow} {self.hop}: {self.count} sample(s)>"

    def __str__(self) -> str:
        have = ", ".join(f"{p} {v!r}" for p, v in self.values.items() if v is not None)
        budget = ", ".join(f"{p} {v!r}" for p, v in self.budget.items())
        return (
            f"{self.flow} {self.hop}: {self.count} sample(s)"
            + (f", {have}" if have else "")
            + (f" (budget {budget})" if budget else "")
        )


# ---------------------------------------------------------------- the session


class Flowcheck:
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

    Use ``async with Flowcheck(...) as fc`` or :meth:`start` / :meth:`stop`.
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
        unknown = [f for f in flows or () if f not in topology.flows]
        if unknown:
            raise FlowcheckError(
                f"unknown flow(s) {', '.join(map(repr, unknown))}; the topology has "
                f"{', '.join(map(repr, topology.flows)) or 'no flows'}"
            )
        self.source = topology
        self.topology = isolated(topology, prefix)
        self.prefix = prefix
        self.flows: list[str] = list(flows) if flows is not None else list(topology.flows)
        self.test_name = name
        self.deadline = _seconds_of(deadline, "deadline")
        self.settle: float | None = None if settle is None else _seconds_of(settle, "settle")
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
            f"<Flowcheck topology {self.topology.name or '(unnamed)'!r}{own}, "
            f"{len(self.channels)} channels watched, {len(self._items)} observations>"
        )

    # ------------------------------------------------------------ life cycle

    async def __aenter__(self) -> Flowcheck:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Declare the channels (when applying), connect, and return once every tap watches."""
        if self._task is not None:
            raise RuntimeError("this Flowcheck has already been started")
        self._changed, self._ready, self._stop = anyio.Event(), anyio.Event(), anyio.Event()
        self._start_ns, wall = now()
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
        for name in self.brokers:
            mine = [k for k, ch in self.topology.channels.items() if ch.broker == name]
            async with adapter(name, self.topology) as ad:
                drift = await ad.apply(mine)
            self.drift += drift
            for d in drift:
                if self._writer is not None:
                    self._writer.write(
                        Observation(
                            kind=Kind.DRIFT,
                            broker=name,
                            channel=d.channel,
                            mono_ns=mono,
                            wall=wall,
                            reason=str(d),
                        )
                    )

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

    def _alive(self) -> None:
        __tracebackhide__ = True
        if self._task is None and not self._items and self._checker is None:
            raise RuntimeError("this Flowcheck is not started: use 'async with' or start()")
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

    def _limit(self, within: Within | None) -> float:
        __tracebackhide__ = True
        return self.deadline if within is None else _seconds_of(within, "within")

    def settle_for(self, flow: str, settle: Within | None = None) -> float:
        """Seconds to keep watching a chain of ``flow`` after its end: ``settle`` if given,
        else this session's ``settle``, else :func:`settle_time`. Zero for a flow that no
        late copy can break, whatever is given."""
        __tracebackhide__ = True
        self._flow(flow)
        if not late_copy_breaks(self.topology.flows[flow]):
            return 0.0
        if settle is not None:
            return _seconds_of(settle, "settle")
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
        return checker.finish(end)

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
            *_indent(self._draw(timeline, evidence=[first])),
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
        ``within``; chains still open then count as lost. Then keeps watching for
        each flow's settle time (``settle``, default :meth:`settle_for`) past its
        last chain, for a late copy the flow forbids; it stops early when one
        comes. A flow named here must have seen at least one chain.
        """
        __tracebackhide__ = True
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
        while await self._wait(settled, max(0.0, (give_up - now()[0]) / 1e9)):
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
            lines.append(
                f"flow {f!r}: no chain was seen (nothing published or routed to its steps)"
            )
        if open_chains:
            lines.append(
                f"gave up after {_spell(limit)} with {len(open_chains)} chain(s) still open; "
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
        marked = {
            (
                e.kind if isinstance(e, Seen) else e.kind.value,
                e.channel,
                round(e.at_ms if isinstance(e, Seen) else self._at(e), 1),
            )
            for e in evidence
        }
        rows: list[tuple[str, ...]] = [("", "at ms", "+ms", "kind", "channel", "where", "detail")]
        if not items:
            rows.append(("", "", "", "(nothing seen)", "", "", ""))
        drawn: list[Observation | int] = list(items)
        if len(items) > TIMELINE_HEAD + TIMELINE_TAIL:
            cut = len(items) - TIMELINE_HEAD - TIMELINE_TAIL
            drawn = [*items[:TIMELINE_HEAD], cut, *items[-TIMELINE_TAIL:]]
        prev: float | None = None
        for o in drawn:
            if isinstance(o, int):
                rows.append(("", "", "", f"... {o} more", "", "", ""))
                prev = None
                continue
            at = self._at(o)
            mark = ">" if (o.kind.value, o.channel, round(at, 1)) in marked else ""
            rows.append(
                (
                    mark,
                    f"{at:.1f}",
                    "" if prev is None else fmt_ms(at - prev),
                    o.kind.value,
                    o.channel,
                    _where(o),
                    _detail(o),
                )
            )
            prev = at
        for kind, channel, detail in tail:
            rows.append(("x", "", "", kind, channel, "", detail))
        return _table(rows, right={1, 2})

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
            out += _indent(
                self._draw(items, evidence=[s for f in found for s in f.seen], tail=tail), 4
            )
        if len(by_chain) > 10:
            out.append(f"  ... {len(by_chain) - 10} more broken chains")
        for f in others[:10]:
            out.append(f"  {f.kind.value}: {f.message}")
        return out


def _counts(fv: FlowVerdict) -> str:
    parts = [f"{fv.chains} chain(s)", f"{fv.succeeded} succeeded", f"{fv.failed} failed"]
    if fv.unknown:
        parts.append(f"{fv.unknown} unknown")
    if fv.dead_lettered:
        parts.append(f"{fv.dead_lettered} dead-lettered")
    if fv.unjudged:
        parts.append(f"{len(fv.unjudged)} unjudged")
    return ", ".join(parts)


def _unjudged_line(u: Unjudged, allowed: bool, indent: int = 0) -> str:
    """``not judged: EXPECTATION: WHY (N chains)``, and whether the user allowed that."""
    return " " * indent + "not judged" + (" (allowed)" if allowed else "") + ": " + unjudged_text(u)


def _where(o: Observation) -> str:
    if o.partition is not None or o.offset is not None:
        return f"p{o.partition if o.partition is not None else '?'}@{o.offset}"
    if o.entry_id is not None:
        return o.entry_id
    return o.routing_key or ""


def _detail(o: Observation) -> str:
    parts: list[str] = []
    if o.delivery_count is not None:
        parts.append(f"delivery {o.delivery_count}")
    if o.group:
        parts.append(f"group {o.group}")
    if o.reason:
        parts.append(o.reason)
    if o.origin:
        parts.append(f"from {o.origin}")
    return "; ".join(parts)


def _table(rows: Sequence[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [
            (c.rjust(widths[i]) if i in right else c.ljust(widths[i])) for i, c in enumerate(r)
        ]
        out.append("  ".join(cells).rstrip())
    return out


def _indent(lines: Iterable[str], n: int = 2) -> list[str]:
    return [(" " * n + line) if line else "" for line in lines]


# ---------------------------------------------------------------- one chain


class Chain:
    """Assertions about one chain; get one from :meth:`Flowcheck.chain`."""

    def __init__(self, fc: Flowcheck, flow: str, key: str) -> None:
        self.fc = fc
        self.flow = flow
        self.key = key
        f = fc.topology.flows[flow]
        self.labels = [s.name or s.channel for s in f.steps]
        self.dead_channels = _dead_channels(fc.topology, flow)

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
        (``settle``, default :meth:`Flowcheck.settle_for`) from that arrival, so
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
                f"{who} did not complete within {_spell(limit)}: nothing with this key was "
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
            why = [f"{stopped}; dead letter" + (f": {_detail(d)}" if _detail(d) else "")]
        elif lost or not settled:
            cause = next((f.cause for f in lost if f.cause is not None), None)
            if cause is Cause.UNROUTABLE or cause is Cause.STUCK_PENDING:
                head = f"{who} did not complete: {lost[0].message}"
            else:
                head = f"{who} did not complete within {_spell(limit)}"
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
            *_indent(why),
            "",
            *_indent(self.fc._draw(items, evidence=evidence, tail=tail)),
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
            f"{self.flow} {self.key!r} did not reach {step!r} within {_spell(limit)}; {where}",
            "",
            *_indent(self.fc._draw(self.observations, tail=[("expected", step, "never came")])),
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
                    f"no dead letter within {_spell(limit)}"
                    + (f"; it got as far as {self.labels[reached]!r}" if reached >= 0 else "")
                )
        else:
            d = _final(found)
            if not good(d):
                why.append(f"the dead letter's reason is {d.reason!r}")
            n = self.attempts(d)
            if attempts is not None and n != attempts:
                why.append(
                    f"it took {n} attempt(s)"
                    if n is not None
                    else "its attempts are unknown: no delivery was seen (RabbitMQ shows "
                    "deliveries only with the firehose on: rabbitmqctl trace_on)"
                )
        _, findings = self._verdict()
        for f in findings:
            why.append(f"{f.kind.value}: {f.message}")
        lines = [
            head,
            *_indent(why),
            "",
            *_indent(fc._draw(self.observations, evidence=[_final(found)] if found else [])),
        ]
        self._fail(lines, findings)

    def attempts(self, dead: Observation | None = None) -> int | None:
        """Deliveries of the chain's message, the first included; None if nothing tells.

        Counted as the checker counts them: the delivery numbers the taps saw
        (x-delivery-count, Redis PEL counts, retry headers), one per arrival on a
        retry channel. With ``dead``, only the step it died on counts.
        """
        topo = self.fc.topology
        origin = dead.origin if dead is not None else None
        steps = [s.channel for s in topo.flows[self.flow].steps]
        if origin is not None and origin not in steps:
            owner = next(
                (s for s in steps if origin in getattr(topo.channels.get(s), "retry", [])), None
            )
            origin = owner or origin
        counted = [origin] if origin is not None else steps
        retries = {s: list(getattr(topo.channels.get(s), "retry", []) or []) for s in counted}
        counts: list[int] = []
        for o in self.observations:
            if o.kind in _DELIVERIES and o.channel in counted and o.delivery_count:
                counts.append(o.delivery_count)
        if dead is not None and dead.delivery_count:
            counts.append(dead.delivery_count)
        for rs in retries.values():
            n = sum(1 for o in self.observations if o.channel in rs and o.kind in _ARRIVALS)
            if n:
                counts.append(1 + n)
        if not counts and any(
            o.kind in _DELIVERIES and o.channel in counted for o in self.observations
        ):
            counts.append(1)
        return max(counts) if counts else None

    def _fail(self, lines: list[str], findings: Sequence[Finding]) -> NoReturn:
        __tracebackhide__ = True
        self.fc._fail(
            lines, flow=self.flow, key=self.key, findings=findings, observations=self.observations
        )


def _final(dead: Sequence[Observation]) -> Observation:
    """The dead letter to talk about: the last one on a dead-letter queue, topic or stream
    (it carries the reason), else the last one seen (a dead-letter exchange)."""
    return next((d for d in reversed(dead) if d.kind is Kind.DEAD_LETTERED), dead[-1])


def _dead_channels(topology: Topology, flow: str) -> set[str]:
    """Channels where a message of ``flow`` is a dead letter (as the checker sees them)."""
    f = topology.flows[flow]
    out = {r.channel for r in f.dead_letters}
    for step in f.steps:
        ch = topology.channels.get(step.channel)
        if isinstance(ch, (Topic, Stream)) and ch.dead_letter:
            out.add(ch.dead_letter)
        out.update(dead_letter_path(topology, step.channel))
    return out


def unique_prefix(test_name: str, worker: str | None = None, max_len: int = 32) -> str:
    """A per-test name prefix: the test's name squeezed into ``[a-z0-9-]``, the xdist
    worker, a random part, then a dot: valid in every broker's names."""
    base = "".join(c if c.isalnum() and c.isascii() else "-" for c in test_name.lower())
    while "--" in base:
        base = base.replace("--", "-")
    base = base.strip("-")[:max_len].strip("-") or "test"
    parts = [base, worker or "", secrets.token_hex(4)]
    return "-".join(p for p in parts if p) + "."

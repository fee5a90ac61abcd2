"""``flowcheck run``: apply the topology, tap it, publish a scenario, wait, check.

Waiting is on events: the run ends as soon as every chain it started has
reached its last step or its expected dead letter, or when its deadline has
passed on the clock; never after a fixed sleep. The trace ends with an end
record (``run``) at that moment, and the verdict is judged against it, as
``flowcheck check`` judges the trace: the two agree.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from flowcheck.checker import Checker, Recording, Verdict, window
from flowcheck.errors import FlowcheckError, UsageError, leaf
from flowcheck.observations import Kind, Observation, now
from flowcheck.recorder import apply_all, drift_observations
from flowcheck.scenario import Scenario, messages
from flowcheck.topology.model import Topology
from flowcheck.topology.transform import branches_of
from flowcheck.trace import Ended, Writer, new_header, run_trace
from flowcheck.tracer import Tracer

TICK = 0.25  # seconds: how often time is advanced while nothing is observed


@dataclass(frozen=True)
class Waiting:
    """Where the wait after publishing stands: for a progress display."""

    decided: int  # of the chains the run published
    chains: int  # the run published
    open: int  # chains of any flow seen and not yet at their end
    left_s: float  # till the wait gives up


@dataclass
class Outcome:
    verdict: Verdict
    trace: str
    published: int
    drift: list[str]
    cut_short: bool = False  # the scenario's timeout ended the wait before every window


async def run(
    topology: Topology,
    scenario: Scenario,
    out_dir: str,
    *,
    topology_path: str | None = None,
    apply: bool = True,
    progress: Callable[[str], None] | None = None,
    run_id: str | None = None,
    allow_unjudged: bool | None = None,
    cancelled: Callable[[], Ended | None] | None = None,
    waiting: Callable[[Waiting], None] | None = None,
) -> Outcome:
    """The trace goes to ``run_trace(out_dir, run_id)`` (``run_id`` default: random).

    When the run is cancelled, ``cancelled`` says how the recording ended (say
    ``interrupted`` for Ctrl-C), for the trace's end record; None (the default)
    writes none, as for a crash. ``waiting`` is told where the wait stands as it
    begins and then at most every :data:`TICK` seconds.
    """
    try:
        return await _run(
            topology,
            scenario,
            out_dir,
            topology_path,
            apply,
            progress or (lambda _: None),
            run_id or new_run_id(),
            allow_unjudged,
            cancelled or (lambda: None),
            waiting or (lambda _: None),
        )
    except BaseExceptionGroup as group:
        raise leaf(group) from None


async def _run(
    topology: Topology,
    scenario: Scenario,
    out_dir: str,
    topology_path: str | None,
    apply: bool,
    say: Callable[[str], None],
    run_id: str,
    allow_unjudged: bool | None,
    cancelled: Callable[[], Ended | None],
    show: Callable[[Waiting], None],
) -> Outcome:
    plan = list(messages(scenario, topology, run_id))
    # Keys known before publishing (all rules but traceparent): a missing one was never published.
    expected: dict[str, set[str]] = {}
    for m in plan:
        for name in branches_of(topology, m.flow):  # each branch awaits the key
            if not topology.flows[name].correlate.traceparent:
                expected.setdefault(name, set()).add(m.key)
    try:  # before declaring anything on the brokers
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the report directory {out_dir}: {exc.strerror}") from None
    found = await apply_all(topology) if apply else []
    drift = [str(d) for d in found]
    for d in drift:  # now, not with the verdict: a tap that cannot start must not hide it
        say(f"warning: drift: {d}")
    trace = run_trace(out_dir, run_id)
    header = new_header(topology.name, topology_path, run=run_id)
    mono, wall = header.started_mono_ns, header.started
    checker = Checker(topology, start_ns=mono, expected=expected, allow_unjudged=allow_unjudged)
    changed = anyio.Event()

    def observe(obs: Observation) -> None:
        nonlocal changed
        checker.feed(obs)
        changed.set()

    waiting: list[tuple[str, str]] = []
    shown = 0.0
    with Writer(trace, header) as writer:
        for obs in drift_observations(topology, found, mono, wall):  # as record writes it
            writer.write(obs)
            checker.feed(obs)  # as check reads it
        try:
            async with Tracer(topology, [writer.write, observe]) as tracer:
                say(f"taps ready; publishing {len(plan)} messages (run {run_id})")
                for m in plan:
                    if m.delay:
                        await anyio.sleep(m.delay)  # the scenario's rate: a schedule, not a wait
                    obs = await tracer.publish(
                        m.channel,
                        m.body,
                        headers=m.headers,
                        key=m.kafka_key,
                        routing_key=m.routing_key,
                    )
                    for name in branches_of(topology, m.flow):
                        key = obs.keys.get(name, m.key)
                        waiting.append((name, key))
                    if obs.kind == Kind.UNROUTABLE:
                        say(f"unroutable: {m.flow} {key} ({obs.reason})")
                longest = window(topology)
                # Chains of later flows open up to one window after publishing, and each
                # is decided one window after it opened: two windows bound the wait.
                limit = scenario.timeout or 2 * longest
                say(
                    f"published; waiting up to {limit.total_seconds():g}s for {len(waiting)} chains"
                )
                published = len(waiting)
                give_up = anyio.current_time() + limit.total_seconds()
                with anyio.move_on_after(limit.total_seconds()):
                    while True:
                        waiting = [(f, k) for f, k in waiting if not checker.settled(f, k)]
                        if not waiting and _all_settled(checker):
                            break
                        if (at := anyio.current_time()) - shown >= TICK:
                            shown = at
                            show(
                                Waiting(
                                    published - len(waiting),
                                    published,
                                    _still_open(checker),
                                    max(0.0, give_up - at),
                                )
                            )
                        changed = anyio.Event()
                        with anyio.move_on_after(TICK):
                            await changed.wait()
                        # A tap that is down records its gap only once it is back or stops:
                        # till then, a chain past its window may be one the gap hid.
                        if not any(ad.down for ad in tracer.adapters.values()):
                            checker.advance(now()[0])
                        if writer.due():
                            writer.flush()
                # Read before the taps close: they watched until now, not until closed.
                end, end_wall = now()
        except anyio.get_cancelled_exc_class():
            how = cancelled()
            if how is not None:
                writer.end(how, *now())
            raise
        except BaseExceptionGroup as group:
            if isinstance(leaf(group), FlowcheckError):
                writer.end("run", *now())  # as below: the taps watched until now
            raise
        except FlowcheckError:
            # A broker lost for good: the taps have stopped and recorded their gaps,
            # and the trace ends here, checkable as any other.
            writer.end("run", *now())
            raise
        writer.end("run", end, end_wall)
    # Judged against the end the trace records, as `flowcheck check` judges it: chains
    # still inside their deadline then (a scenario timeout shorter than the longest
    # deadline, or chains that started late) are unknown, not lost.
    cut_short = scenario.timeout is not None and scenario.timeout < longest
    end_ms = round((max(end, checker.now) - mono) / 1e6, 3)
    verdict = checker.finish(end_ns=end, recording=Recording(ended="run", end_ms=end_ms))
    return Outcome(
        verdict=verdict, trace=trace, published=len(plan), drift=drift, cut_short=cut_short
    )


def _all_settled(checker: Checker) -> bool:
    """Has every open chain, also those of flows the run did not publish to (a flow that
    starts where another goes on), reached its end? The verdict is judged at the end of
    the run, and a chain still moving then would be unknown."""
    return all(
        checker.settled(name, key) for name, state in checker.flows.items() for key in state.chains
    )


def _still_open(checker: Checker) -> int:
    return sum(
        not checker.settled(name, key)
        for name, state in checker.flows.items()
        for key in state.chains
    )


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]

"""Deciding a chain: first its fate (where it ended, or that it cannot be known yet), then
the checks in :data:`CHAIN_CHECKS`, each a function of the flow's state and the chain
that records what it finds through ``FlowState.add`` and ``FlowState.unjudge``.

A new check kind is one module and one entry in the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from flowcheck.checker import (
    _dead_letters,
    _deadlines,
    _delivery,
    _gives_up,
    _groups,
    _latency,
    _ordering,
    _paths,
    _retries,
)
from flowcheck.checker._chain import Chain, Decided, identity
from flowcheck.checker._hist import Span
from flowcheck.observations import Kind, Observation
from flowcheck.topology.model import DeadLetterRule

if TYPE_CHECKING:
    from flowcheck.checker._flow import FlowState, RouteKey

_REDELIVERED = Kind.REDELIVERED

# A check of a decided chain: (state, chain, its dead-letter rule, its spans per hop).
ChainCheck = Callable[["FlowState", Chain, DeadLetterRule | None, list[Span | None]], None]

# (does the flow ask for it?, the check), run in this order on every decided chain.
CHAIN_CHECKS: tuple[tuple[Callable[[FlowState], bool], ChainCheck], ...] = (
    (_deadlines.applies, _deadlines.check),
    (_delivery.applies, _delivery.check),
    (_groups.applies, _groups.check),
    (_retries.applies, _retries.check),
    (_latency.applies, _latency.check),
    (_ordering.applies, _ordering.check),
)


def decide(state: FlowState, chain: Chain, *, ended: bool) -> None:
    _paths.note(state, chain)
    if (
        chain.sample is None
        and not chain.dead
        and chain.unroutable is None
        and not any(chain.retry_arrivals)
    ):
        # Deliveries or acks alone (a late ack of a chain decided before): no message
        # of this chain was seen arriving anywhere, so there is nothing to judge.
        return
    routes(state, chain)
    before = state.chain_failures
    found = len(state.findings)
    state.deciding = []
    rule = state.rule_for(chain)
    # Per hop (index: its later step; None where an end is missing): how long it took,
    # on which clock, within what error. Deadlines and latency judge the same figures.
    spans = state.spans(chain)
    # Its fate first: where it ended, or that this cannot be known yet (undecided).
    state.ended_well = True
    # A give-up rule applies to a chain no dead-letter rule claims.
    give = state.giving = state.give_up_for(chain) if rule is None and state.gives_up else None
    fate = None if give is None else _gives_up.expected(state, chain, give, ended)
    if rule is not None:
        undecided = _dead_letters.poison(state, chain, rule, ended)
    elif fate is not None:
        undecided = fate
    elif chain.dead:
        _dead_letters.healthy(state, chain)
        undecided = state.ended_well = False
    elif state.complete(chain):
        undecided = False
    else:
        undecided = _delivery.incomplete(state, chain, ended)
        state.ended_well = False
    if not undecided:
        for run in state.checks:
            run(state, chain, rule, spans)
    failed = state.chain_failures > before
    gave_up = state.counts["gave_up"]
    state.giving = None
    # A failed chain fails the flow's threshold whatever went unjudged.
    if not failed and state.deciding:
        state.unjudged.update(state.deciding)
    state.deciding = None
    counts = state.counts
    counts["chains"] += 1
    outcome: Literal["passed", "failed", "unknown"]
    if undecided and not failed:
        outcome = "unknown"
    elif failed:
        outcome = "failed"
    else:
        outcome = "passed"
        whole = spans[-1]
        state.passing.offer(chain.key, None if whole is None else whole[0])
    counts["succeeded" if outcome == "passed" else outcome] += 1
    if state.on_decided is not None:
        state.on_decided(
            Decided(
                state.name,
                chain.key,
                outcome,
                state.findings[found:],
                chain.timeline,
                state.start_ns,
            )
        )
    if chain.dead:
        counts["dead_lettered"] += 1
    tally(state, chain, "unknown" if undecided and not failed else "failed" if failed else "")
    if counts["gave_up"] > gave_up:
        state.series.add("gave_up", _last(chain))


def routes(state: FlowState, chain: Chain) -> None:
    """Count the chain's messages per route: at each step, on each retry channel, in each
    dead-letter channel (per step they died at). From what the chain kept, once."""
    counts = state.route_counts
    for i, key in enumerate(state.step_routes):
        row = counts[key]
        row[0] += len(chain.arrivals[i])
        retried, delivered = chain.retry_arrivals[i], chain.deliveries[i]
        if not (retried or delivered):
            continue  # the common case: nothing tried again here
        again = _redeliveries(delivered) if delivered else 0
        for o in retried:
            if o.channel == key[1]:
                again += 1  # back at the step itself: a round trip, or published again
            else:
                counts.setdefault(("retry", o.channel, i), [0, 0])[0] += 1
        row[1] += again
    if chain.dead:
        dead: dict[RouteKey, set[tuple[object, ...]]] = {}
        for o in chain.dead:
            at: RouteKey = ("dead_letter", o.channel, state.origin_step(o))
            dead.setdefault(at, set()).add(identity(o))
        for at, ids in dead.items():
            counts.setdefault(at, [0, 0])[0] += len(ids)


def _redeliveries(delivered: list[Observation]) -> int:
    """Redeliveries among a step's delivery evidence. Where the message has a broker
    position (a Redis entry, a Kafka offset) its count tells how many, even when one
    poll showed several (a pending list); elsewhere each redelivery seen is one."""
    n = 0
    most: dict[tuple[object, ...], int] = {}
    for o in delivered:
        if o.kind is not _REDELIVERED:
            continue
        ident = identity(o)
        if o.delivery_count is None or ident[0] in ("fc", "obs"):
            n += 1
        else:
            k = (ident, o.group)
            most[k] = max(most.get(k, 1), o.delivery_count)
    return n + sum(c - 1 for c in most.values())


def tally(state: FlowState, chain: Chain, fate: str) -> None:
    """Count a decided chain in the flow's series over time; ``fate`` is failed, unknown
    or empty (it succeeded)."""
    series, first = state.series, chain.first_ns
    series.add("started", first)
    if fate:
        series.add(fate, first)
    else:
        ends = [o.mono_ns for a in chain.arrivals for o in a.values()]
        ends += [o.mono_ns for o in chain.dead]  # a poison message ends in its dead letter
        series.add("completed", max(ends, default=first))
    if chain.dead:
        series.add("dead_letters", chain.dead[0].mono_ns)
    for i in range(state.n):
        # The retries of step i, placed at the observations that showed them (the latest
        # ones); those only a count told of (a dead letter's), at that dead letter.
        shown = [o.mono_ns for o in chain.retry_arrivals[i]]
        shown += [
            o.mono_ns
            for o in chain.deliveries[i]
            if o.kind is _REDELIVERED or (o.delivery_count or 0) > 1
        ]
        if not (shown or chain.dead):
            continue  # nothing shows a second attempt: the common case, kept cheap
        n = _retries.attempts(state, chain, i)
        if n is None or n < 2:
            continue
        shown.sort()
        at = shown[1 - n :]
        for t in at:
            series.add("retries", t)
        if len(at) < n - 1:
            dead = [o.mono_ns for o in chain.dead if state.origin_step(o) == i]
            told = dead[0] if dead else at[-1] if at else first
            series.add("retries", told, n - 1 - len(at))


def _last(chain: Chain) -> int:
    """When the chain was last seen arriving, attempted or delivered."""
    times = [o.mono_ns for a in chain.arrivals for o in a.values()]
    times += [o.mono_ns for r in chain.retry_arrivals for o in r]
    times += [o.mono_ns for d in chain.deliveries for o in d]
    return max(times, default=chain.first_ns)

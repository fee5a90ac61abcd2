"""Deciding a chain: first its fate (where it ended, or that it cannot be known yet), then
the checks in :data:`CHAIN_CHECKS`, each a function of the flow's state and the chain
that records what it finds through ``FlowState.add`` and ``FlowState.unjudge``.

A new check kind is one module and one entry in the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

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
from flowcheck.checker._chain import Chain
from flowcheck.checker._hist import Span
from flowcheck.topology.model import DeadLetterRule

if TYPE_CHECKING:
    from flowcheck.checker._flow import FlowState

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
    before = state.chain_failures
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
    state.giving = None
    # A failed chain fails the flow's threshold whatever went unjudged.
    if not failed and state.deciding:
        state.unjudged.update(state.deciding)
    state.deciding = None
    counts = state.counts
    counts["chains"] += 1
    if undecided and not failed:
        counts["unknown"] += 1
    elif failed:
        counts["failed"] += 1
    else:
        counts["succeeded"] += 1
    if chain.dead:
        counts["dead_lettered"] += 1

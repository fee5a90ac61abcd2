"""Delivery: a chain that never completed (lost, stuck, unroutable, or seen first past its
first step), and messages delivered more often than the flow's delivery guarantee allows."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from flowcheck.checker import _attempts, _gives_up
from flowcheck.checker._chain import Chain
from flowcheck.checker._hist import Span
from flowcheck.checker.verdict import Cause, FindingKind
from flowcheck.checker.window import GRACE_NS
from flowcheck.topology import format_duration
from flowcheck.topology.model import DeadLetterRule

if TYPE_CHECKING:
    from flowcheck.checker._flow import FlowState


def incomplete(state: FlowState, chain: Chain, ended: bool) -> bool:
    """Judge a chain that did not reach every step; True if it cannot be decided yet."""
    reached = chain.reached()
    dropped = chain.unroutable is not None and reached <= 0
    labels = state.labels
    # The broker drops an unroutable message at once: no need to wait for a deadline.
    if (ended or state.gap_during(chain)) and not dropped:
        return True
    if not chain.arrivals[0] and not dropped:
        if chain.first_ns - state.start_ns <= state.window_ns:
            return True  # it may have started before the recording did
        # Named where it appeared: the first step it was seen at, not the last it reached.
        at = next((i for i, a in enumerate(chain.arrivals) if a), -1)
        first = next(iter(chain.arrivals[at].values())) if at >= 0 else chain.timeline[0]
        state.add(
            state.finding(
                FindingKind.UNEXPECTED,
                chain,
                f"seen at {labels[max(at, 0)]!r} but never at the first step {labels[0]!r}",
                step=max(at, 0),
                seen=[first],
            )
        )
        return False
    steps = state.flow.steps
    nxt = reached + 1
    if reached < 0 and chain.unroutable is not None:
        # Published to the step's channel but routed nowhere: the next step never came.
        at = state.channel_steps.get(chain.unroutable.channel, [0])[0]
        nxt = min(at + 1, len(steps) - 1)
    need = state.expected(chain)
    while nxt < len(steps) and len(chain.arrivals[nxt]) >= need[nxt]:
        nxt += 1  # a fan-out step may have some but not all of its messages
    if nxt >= len(steps):
        nxt = next(
            i for i, (a, n) in enumerate(zip(chain.arrivals, need, strict=True)) if len(a) < n
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
        and state.acks_visible[reached]
    ):
        d = chain.deliveries[reached][-1]
        cause, why = (
            Cause.STUCK_PENDING,
            f"stuck at {labels[reached]!r}: delivered {d.delivery_count or 1} time(s), never acknowledged",
        )
        seen = [d]
    elif reached >= 0 and state.has_policy and _gives_up.healthy(state, chain, reached, nxt):
        return False  # attempted several times, then nothing: given up, not lost
    else:
        deadline = format_duration(timedelta(seconds=(state.window_ns - GRACE_NS) / 1e9))
        cause, why = (
            Cause.TIMED_OUT,
            f"timed out after {labels[reached]!r}: no {labels[nxt]!r} within {deadline}",
        )
        seen = [last]
    state.add(
        state.finding(
            FindingKind.LOST,
            chain,
            why,
            step=nxt,
            seen=seen,
            cause=cause,
            next_step=labels[nxt],
        )
    )
    return False


def applies(state: FlowState) -> bool:
    return any(d != "at-least-once" for d in state.delivery)


def check(
    state: FlowState, chain: Chain, rule: DeadLetterRule | None, spans: list[Span | None]
) -> None:
    """More messages at a step than it expects: duplicates, for at-most/exactly-once (the
    step's own guarantee, else the flow's). A step expects its count once per distinct
    message the first step received (FlowState.rounds). An attempt counted twice is one too."""
    need = state.expected(chain)
    rounds = state.rounds(chain)
    per = "" if rounds == 1 else f", for {rounds} messages at {state.labels[0]!r}"
    for i, arrived in enumerate(chain.arrivals):
        delivery = state.delivery[i]
        if delivery == "at-least-once":
            continue
        if len(arrived) > need[i]:
            extra = list(arrived.values())
            state.add(
                state.finding(
                    FindingKind.DUPLICATED,
                    chain,
                    f"{len(arrived)} messages at {state.labels[i]!r}, expected {need[i]} ({delivery}{per})",
                    step=i,
                    seen=extra[:5],
                )
            )
        elif state.retried:
            for same in _attempts.duplicates(state, chain, i):
                state.add(
                    state.finding(
                        FindingKind.DUPLICATED,
                        chain,
                        f"attempt {same[0].delivery_count} came {len(same)} times at "
                        f"{state.labels[i]!r} (its retry counter says so), expected {need[i]} ({delivery}{per})",
                        step=i,
                        seen=same[:5],
                    )
                )
                break

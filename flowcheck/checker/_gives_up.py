"""Give-ups: a step's consumer stops trying a message and the chain ends there, with no
dead letter (Celery's default after its last retry: the task fails, the message is acked).

A message a give-up rule matches must stop at the rule's step (its attempts are judged
by :mod:`_retries`); one no rule matches that stops at a step after several attempts
gave up, which is a finding of its own: not ``lost``, where nothing shows a failed
attempt. That is told only where the topology says the application gives up or retries
by itself (the flow declares ``gives_up``, or the step's retry policy a ``counter`` or
an ``id``); elsewhere a chain that stops is lost, redelivered or not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowcheck.checker import _retries
from flowcheck.checker._chain import Chain
from flowcheck.checker.verdict import FindingKind
from flowcheck.topology.model import GiveUpRule

if TYPE_CHECKING:
    from flowcheck.checker._flow import FlowState


def expected(state: FlowState, chain: Chain, rule: GiveUpRule, ended: bool) -> bool | None:
    """Judge a chain its rule says a step gives up on; True if it cannot be decided yet,
    None if it never reached that step (then it is judged as any incomplete chain)."""
    at = state.labels.index(rule.step)
    if chain.dead:
        d = chain.dead[0]
        state.add(
            state.finding(
                FindingKind.DEAD_LETTER,
                chain,
                f"dead-lettered to {d.channel!r}; the give-up rule expects no dead letter",
                step=at,
                seen=chain.dead[:1],
            )
        )
        return False
    later = next((j for j in range(at + 1, state.n) if chain.arrivals[j]), None)
    if later is not None:
        state.add(
            state.finding(
                FindingKind.GIVE_UP,
                chain,
                f"message matching the give-up rule went on to {state.labels[later]!r}; "
                f"expected it to stop at {rule.step!r} after {rule.attempts} attempt(s)",
                step=at,
                seen=list(chain.arrivals[later].values())[:1],
            )
        )
        return False
    if not (chain.arrivals[at] or chain.retry_arrivals[at]):
        return None  # it never reached the step: judged as any incomplete chain
    if ended or state.gap_during(chain):
        return True  # it may yet move on
    state.counts["gave_up"] += 1
    return False


def healthy(state: FlowState, chain: Chain, at: int, nxt: int) -> bool:
    """Did a chain no rule matches give up at step ``at`` (attempted more than once there,
    nothing after)? If so, report it and return True."""
    policy = state.policies[at]
    if policy is None or not state.consumed[at]:
        return False
    if not (state.gives_up or policy.counter is not None or policy.id is not None):
        return False  # nothing says the application gives up: a chain that stops is lost
    n = _retries.attempts(state, chain, at)
    if n is None or n < 2:
        return False
    state.counts["gave_up"] += 1
    label = state.labels[at]
    state.add(
        state.finding(
            FindingKind.GIVE_UP,
            chain,
            f"healthy message given up at {label!r} after {n} attempts: no {state.labels[nxt]!r}",
            step=at,
            seen=(chain.retry_arrivals[at] or chain.deliveries[at])[-1:],
            next_step=state.labels[nxt],
        )
    )
    return True

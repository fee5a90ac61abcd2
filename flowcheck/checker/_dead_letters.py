"""Dead letters: a message a dead-letter rule matches ends in its dead letter (with the
rule's reason); a healthy one never does; and a channel that drops messages over its
delivery limit without a dead-letter route is a configuration finding."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowcheck.checker._chain import Chain
from flowcheck.checker.verdict import Cause, Finding, FindingKind
from flowcheck.topology.model import DeadLetterRule, Queue

if TYPE_CHECKING:
    from flowcheck.checker._flow import FlowState


def poison(state: FlowState, chain: Chain, rule: DeadLetterRule, ended: bool) -> bool:
    """Judge a chain its rule says must be dead-lettered; True if it cannot be decided yet."""
    there = [d for d in chain.dead if d.channel == rule.channel]
    if there:
        if rule.reason is not None and not any(d.reason == rule.reason for d in there):
            state.add(
                state.finding(
                    FindingKind.DEAD_LETTER,
                    chain,
                    f"dead-lettered to {rule.channel!r} with reason {there[0].reason!r}, expected {rule.reason!r}",
                    seen=there[:1],
                )
            )
        return False
    if chain.dead:
        d = chain.dead[0]
        on_its_way = any(rule.channel in state.leads_to.get(x.channel, ()) for x in chain.dead)
        if on_its_way and (ended or state.gap_during(chain)):
            return True  # seen on the exchange that leads there; its arrival may be unseen
        state.add(
            state.finding(
                FindingKind.DEAD_LETTER,
                chain,
                f"dead-lettered to {d.channel!r}, expected {rule.channel!r}",
                seen=[d],
            )
        )
        return False
    if ended or state.gap_during(chain):
        return True
    # Processed as if healthy: at its first attempt it moved on past the rule's step
    # (every step, for a rule without one) or was acknowledged there; retried and
    # then dropped or passed on is "never dead-lettered".
    n = state.n
    at = state.step_index(rule.step)
    where = range(n) if at is None else [at]
    retried = any(
        chain.retry_arrivals[j] or any((o.delivery_count or 1) > 1 for o in chain.deliveries[j])
        for j in where
    )
    if at is None:
        passed = state.complete(chain)
    else:
        passed = chain.consumed[at] or any(chain.arrivals[j] for j in range(at + 1, n))
    healthy = passed and not retried
    if not healthy and (why := unseen(state, rule, at)) is not None:
        state.unjudge("dead letters", f"dead letters in {rule.channel!r}", why)
        return False
    what = "was processed as if healthy" if healthy else "was never dead-lettered"
    state.add(
        state.finding(
            FindingKind.DEAD_LETTER,
            chain,
            f"message matching the dead-letter rule {what}; expected it in {rule.channel!r}",
            step=at,
            next_step=rule.channel,
        )
    )
    return False


# A dead letter the broker sends through the default exchange leaves no firehose
# record; a delivery from the dead-letter queue (with x-death) is the only evidence.
UNSEEN_DEFAULT_EXCHANGE = (
    "RabbitMQ shows no dead letter through the default exchange unless something "
    "consumes the dead-letter queue with the firehose on"
)


def unseen(state: FlowState, rule: DeadLetterRule, at: int | None) -> str | None:
    """Why no evidence of ``rule``'s dead letters can be expected, when the broker gives
    none: RabbitMQ moves them straight into a queue through the default exchange."""
    sources = range(state.n) if at is None else [at]
    for i in sources:
        q = state.channels[i]
        route = q.dead_letter if isinstance(q, Queue) else None
        if route is not None and route.queue == rule.channel and route.published_by is None:
            return UNSEEN_DEFAULT_EXCHANGE
    return None


def healthy(state: FlowState, chain: Chain) -> None:
    """A chain no rule matches was dead-lettered."""
    d = chain.dead[0]
    state.add(
        state.finding(
            FindingKind.DEAD_LETTER,
            chain,
            f"healthy message dead-lettered to {d.channel!r}"
            + (f" ({d.reason})" if d.reason else ""),
            seen=chain.dead[:3],
            cause=Cause.DEAD_LETTERED,
        )
    )


def config(state: FlowState) -> None:
    """Steps whose channel loses messages over its delivery limit without a trace."""
    for i, (step, ch) in enumerate(zip(state.flow.steps, state.channels, strict=True)):
        if ch is not None and ch.drops_over_limit:
            state.add(
                Finding(
                    kind=FindingKind.CONFIG,
                    flow=state.name,
                    step=state.labels[i],
                    message=f"{step.channel!r} has a delivery limit but no dead-letter route: messages over the limit are lost silently",
                )
            )

"""Retries: attempts within the retry policy (or the dead-letter rule's count), and each
retry at least its backoff after the attempt before it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowcheck.checker._chain import Chain
from flowcheck.checker._hist import Span
from flowcheck.checker.verdict import FindingKind
from flowcheck.observations import Kind
from flowcheck.topology.model import DeadLetterRule, RetryPolicy

if TYPE_CHECKING:
    from flowcheck.checker._flow import FlowState

BACKOFF_TOLERANCE_NS = 150_000_000  # taps poll some brokers (Redis PEL): allow this much early

_DEAD_LETTERED = Kind.DEAD_LETTERED


def applies(state: FlowState) -> bool:
    return (
        state.has_policy
        or any(r.attempts is not None for r in state.flow.dead_letters)
        or bool(state.gives_up)
    )


def check(
    state: FlowState, chain: Chain, rule: DeadLetterRule | None, spans: list[Span | None]
) -> None:
    if state.has_policy:
        policies(state, chain, rule)
    elif rule is not None and rule.attempts is not None:
        rule_attempts(state, chain, rule, rule.attempts)
    give = state.giving
    if give is not None and state.policies[at := state.labels.index(give.step)] is None:
        given_up(state, chain, at, give.attempts)


def given_up(state: FlowState, chain: Chain, at: int, want: int) -> None:
    """A give-up rule's ``attempts`` at a step without a retry policy."""
    if not (chain.arrivals[at] or chain.retry_arrivals[at]):
        return  # never got there: lost, not this
    n = attempts(state, chain, at)
    label = state.labels[at]
    if n is None:
        state.unjudge(
            "retries", f"give up after {want} attempts at {label!r}", unseen(state, chain, at)
        )
    elif n != want:
        state.add(
            state.finding(
                FindingKind.RETRIES,
                chain,
                f"given up after {n} attempts at {label!r}; expected {want}",
                step=at,
                seen=(chain.retry_arrivals[at] or chain.deliveries[at])[-1:],
            )
        )


def attempts(state: FlowState, chain: Chain, i: int) -> int | None:
    """Deliveries of step ``i``'s message, the first included; None if nothing tells.

    Observations carry the number of the delivery they saw (adapters turn
    x-delivery-count, PEL counts and retry headers into that); arrivals on a
    step's retry channels count one attempt each.
    """
    if state.gap_during(chain):
        return None  # a tap was blind for part of it: attempts may have gone unseen
    counts = [o.delivery_count for o in chain.deliveries[i] if o.delivery_count]
    retried = chain.retry_arrivals[i]
    if retried:  # most chains: never retried
        counts += [o.delivery_count for o in retried if o.delivery_count]
    visible = state.retry_visible[i]
    for o in chain.dead:
        if o.kind is _DEAD_LETTERED and state.origin_step(o) == i:
            if o.delivery_count:
                counts.append(o.delivery_count)
            elif visible:
                counts.append(1)  # every retry would have shown on a retry channel
    on_retry_channels = (
        sum(1 for o in retried if o.channel in state.retry_declared) if retried else 0
    )
    if on_retry_channels:
        counts.append(1 + on_retry_channels)
    if (chain.deliveries[i] or (visible and chain.arrivals[i])) and not counts:
        counts.append(1)  # delivered once, or no record on a retry channel: one attempt
    return max(counts) if counts else None


def unseen(state: FlowState, chain: Chain, i: int) -> str:
    """Why the attempts at step ``i`` could not be seen."""
    if state.gap_during(chain):
        return "a tap gap covered the chain: attempts may have gone unseen"
    name = state.flow.steps[i].channel
    ch = state.channels[i]
    return f"no delivery was seen on {name!r}" if ch is None else ch.unseen_attempts(name)


def policies(state: FlowState, chain: Chain, rule: DeadLetterRule | None) -> None:
    """Each step's attempts within its retry policy."""
    labels = state.labels
    for i, policy in enumerate(state.policies):
        if policy is None or not state.consumed[i]:
            continue  # an exchange is never consumed: nothing is attempted there
        if not (chain.arrivals[i] or chain.deliveries[i] or chain.retry_arrivals[i]):
            continue  # the chain never got here: nothing was attempted
        expected_exact = (
            rule is not None
            and (rule.step is None or rule.step == labels[i])
            and any(d.channel == rule.channel for d in chain.dead)
        )
        give = state.giving
        # Exactly this many: a give-up rule's at its step, else the policy's own.
        exact = give.attempts if give is not None and give.step == labels[i] else policy.attempts
        n = attempts(state, chain, i)
        if n is None:
            where = labels[i]
            why = unseen(state, chain, i)
            state.unjudge("retries", f"retry {policy.text()} at {where!r}", why)
            if exact is not None and give is not None and give.step == where:
                state.unjudge("retries", f"give up after {exact} attempts at {where!r}", why)
            if rule is not None and rule.attempts is not None and expected_exact:
                state.unjudge(
                    "retries",
                    f"dead letter to {rule.channel!r} after {rule.attempts} attempts at {where!r}",
                    why,
                )
            if policy.backoff is not None:
                state.unjudge("retries", f"retry backoff at {where!r}", why)
            continue
        if n > policy.most:
            state.add(
                state.finding(
                    FindingKind.RETRIES,
                    chain,
                    f"{n} attempts at {labels[i]!r}; the retry policy allows {policy.most}",
                    step=i,
                    seen=chain.deliveries[i][-1:] or chain.retry_arrivals[i][-1:],
                )
            )
        elif exact is not None and n != exact and not expected_exact:
            given = give is not None and give.step == labels[i]
            state.add(
                state.finding(
                    FindingKind.RETRIES,
                    chain,
                    f"given up after {n} attempts at {labels[i]!r}; expected {exact}"
                    if given
                    else f"{n} attempts at {labels[i]!r}; the retry policy gives exactly {exact}",
                    step=i,
                    seen=chain.retry_arrivals[i][-1:] or chain.deliveries[i][-1:],
                )
            )
        elif (
            expected_exact
            and n < policy.most
            and (rule is None or rule.attempts is None)
            and (rule is None or rule.step is not None or state.n == 1)
        ):
            state.add(
                state.finding(
                    FindingKind.RETRIES,
                    chain,
                    f"dead-lettered after {n} attempts at {labels[i]!r}; the retry policy gives {policy.most}",
                    step=i,
                    seen=chain.dead[:1],
                )
            )
        elif (
            rule is not None
            and rule.attempts is not None
            and expected_exact
            and (rule.step is None or rule.step == labels[i])
            and n != rule.attempts
        ):
            state.add(
                state.finding(
                    FindingKind.RETRIES,
                    chain,
                    f"dead-lettered after {n} attempts at {labels[i]!r}; expected {rule.attempts}",
                    step=i,
                    seen=chain.dead[:1],
                )
            )
        if policy.backoff is not None:
            backoff(state, chain, i, policy, n)


def rule_attempts(state: FlowState, chain: Chain, rule: DeadLetterRule, want: int) -> None:
    """A dead-letter rule's ``attempts`` where the flow declares no retry policy: the
    dead letter came after exactly that many attempts at the step it died on."""
    there = [d for d in chain.dead if d.channel == rule.channel]
    if not there:
        return  # not dead-lettered where the rule says: a dead-letter finding, not this
    at = state.step_index(rule.step)
    if at is None:
        at = next((s for d in there if (s := state.origin_step(d)) is not None), None)
    if at is None and state.n == 1:
        at = 0
    expectation = f"dead letter to {rule.channel!r} after {want} attempts"
    if at is None:
        state.unjudge("retries", expectation, "the dead letter does not say which step it died at")
        return
    n = attempts(state, chain, at)
    if n is None:
        state.unjudge("retries", f"{expectation} at {state.labels[at]!r}", unseen(state, chain, at))
    elif n != want:
        state.add(
            state.finding(
                FindingKind.RETRIES,
                chain,
                f"dead-lettered after {n} attempts at {state.labels[at]!r}; expected {want}",
                step=at,
                seen=there[:1],
            )
        )


def delivery_times(chain: Chain, i: int) -> dict[int, int]:
    """When each delivery of step ``i`` was first seen, by its number.

    Only delivery evidence counts: a record on a Kafka retry topic is written
    at once and consumed after its backoff, so its arrival says nothing of
    when the attempt was made.
    """
    by_count: dict[int, int] = {}
    for o in chain.deliveries[i]:
        if o.delivery_count:
            by_count.setdefault(o.delivery_count, o.mono_ns)
    return by_count


def backoff(state: FlowState, chain: Chain, i: int, policy: RetryPolicy, attempts: int) -> None:
    """Each retry at least its backoff after the attempt before it. Only a pair of
    consecutive deliveries seen at different times is judged: two seen in one read
    (the same time) say nothing of the wait between them."""
    assert policy.backoff is not None
    if attempts < 2:
        return  # no retry, no wait to judge (most chains: skip gathering their times)
    b = policy.backoff
    label = state.labels[i]
    times = delivery_times(chain, i)
    failed, slack = failure_times(state, chain, i, attempts)
    wait = b.initial.total_seconds()
    blind = 0
    for n in range(1, attempts):
        least = wait * (1 - b.jitter) * 1e9 - BACKOFF_TOLERANCE_NS
        earlier, later = times.get(n), times.get(n + 1)
        if earlier is not None and later is not None and later != earlier:
            took = later - earlier
            if took < least:
                state.add(
                    state.finding(
                        FindingKind.BACKOFF,
                        chain,
                        f"attempt {n + 1} at {label!r} came {took / 1e6:.0f}ms after attempt {n}; the backoff asks for {wait * 1000:.0f}ms",
                        step=i,
                    )
                )
                return
        else:
            blind += 1
            # When the attempts were made is unseen, but when they failed may be: a
            # retry was surely early if attempt n+1 failed sooner after attempt n did
            # than the wait before it. Later than that proves nothing: still unjudged.
            earlier, later = failed.get(n), failed.get(n + 1)
            if earlier is not None and later is not None and later != earlier:
                took = later - earlier
                if took < least - slack:
                    state.add(
                        state.finding(
                            FindingKind.BACKOFF,
                            chain,
                            f"attempt {n + 1} at {label!r} failed {took / 1e6:.0f}ms after attempt {n} did; the backoff asks for {wait * 1000:.0f}ms before it",
                            step=i,
                        )
                    )
                    return
        wait *= b.multiplier
        if b.max is not None:
            wait = min(wait, b.max.total_seconds())
    if blind:
        state.unjudge(
            "retries",
            f"retry backoff at {label!r}",
            "when its attempts were made was not seen (only deliveries a tap sees one by "
            "one, on a RabbitMQ firehose or a Redis pending list, carry their times)",
        )


def failure_times(
    state: FlowState, chain: Chain, i: int, attempts: int
) -> tuple[dict[int, int], int]:
    """When each attempt at a step was seen to fail, by its number, and how far off (ns)
    those times may be, where failures leave records (Kafka topics). A consumer with retry
    topics writes a record there when an attempt fails (numbered for the attempt to come,
    Spring's retry_topic-attempts), and one on the dead-letter topic when the last one
    does. On the brokers' clock when every record carries it."""
    if not state.failures_recorded[i]:
        return {}, 0
    retries = [o for o in chain.retry_arrivals[i] if o.channel in state.retry_declared]
    dead = [o for o in chain.dead if state.origin_step(o) == i][:1]
    recs = retries + dead
    if not recs:
        return {}, 0
    if all(o.broker_ms is not None for o in recs):
        at = {id(o): (o.broker_ms or 0) * 1_000_000 for o in recs}
        slack = 1_000_000
    else:
        at = {id(o): o.mono_ns for o in recs}
        late = [state.topology.tap_late(ch) for ch in {o.channel for o in recs}]
        slack = max((int(t[0].total_seconds() * 1e9) for t in late if t is not None), default=0)
    counted = all(o.delivery_count for o in retries)
    out: dict[int, int] = {}
    for n, o in enumerate(retries, 1):
        out.setdefault((o.delivery_count or 0) - 1 if counted else n, at[id(o)])
    for o in dead:
        out.setdefault(attempts, at[id(o)])
    return out, slack

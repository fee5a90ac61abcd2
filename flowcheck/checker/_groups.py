"""Consumer groups: a step that names its stream's group holds each entry that arrived
there to that group's evidence: delivered, acknowledged, once, and not trimmed unread."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowcheck.checker._chain import Chain
from flowcheck.checker._hist import Span
from flowcheck.checker.verdict import Cause, FindingKind
from flowcheck.topology.model import DeadLetterRule, Topic

if TYPE_CHECKING:
    from flowcheck.checker._flow import FlowState


def applies(state: FlowState) -> bool:
    return state.grouped


def check(
    state: FlowState, chain: Chain, rule: DeadLetterRule | None, spans: list[Span | None]
) -> None:
    # The recording ended before this chain's window did: what its groups have not done
    # yet they may still do, so it is not judged (a run waits for them: settled()).
    ended = state.ending is not None and chain.first_ns + state.window_ns > state.ending
    if rule is not None or chain.dead:
        return  # a dead-lettered entry is judged by the dead-letter checks
    for i, group in enumerate(state.groups):
        if group is None or not chain.arrivals[i]:
            continue
        label = state.labels[i]
        if state.gap_during(chain):
            state.unjudge(
                "delivery",
                f"group {group!r} at {label!r}",
                "a tap gap covered the chain: the group's evidence may have gone unseen",
            )
            continue
        delivered = chain.deliveries[i]
        acked = chain.consumed[i]
        trimmed = chain.trimmed.get(i)
        if isinstance(state.channels[i], Topic):
            # Kafka shows a group's progress only by its committed offsets.
            if acked:
                continue
            if ended:
                state.unjudge(
                    "delivery",
                    f"group {group!r} commits {label!r}",
                    "the recording ended before the group committed past the record",
                )
                continue
            first = next(iter(chain.arrivals[i].values()))
            state.add(
                state.finding(
                    FindingKind.UNACKNOWLEDGED,
                    chain,
                    f"group {group!r} never committed an offset past it at {label!r}",
                    step=i,
                    seen=[first],
                )
            )
        elif trimmed is not None and not delivered and not acked:
            state.add(
                state.finding(
                    FindingKind.LOST,
                    chain,
                    f"trimmed from {state.flow.steps[i].channel!r} before group {group!r} read it",
                    step=i,
                    seen=[trimmed],
                    cause=Cause.TRIMMED,
                    next_step=label,
                )
            )
        elif not delivered and not acked:
            if ended:
                state.unjudge(
                    "delivery",
                    f"group {group!r} reads {label!r}",
                    "the recording ended before the group read the entry",
                )
                continue
            state.add(
                state.finding(
                    FindingKind.LOST,
                    chain,
                    f"never delivered to group {group!r} at {label!r}",
                    step=i,
                    seen=list(chain.arrivals[i].values())[:1],
                    cause=Cause.NOT_DELIVERED,
                    next_step=label,
                )
            )
        elif not acked:
            if ended:
                state.unjudge(
                    "delivery",
                    f"group {group!r} acknowledges {label!r}",
                    "the recording ended before the group acknowledged the entry",
                )
                continue
            last = delivered[-1]
            state.add(
                state.finding(
                    FindingKind.UNACKNOWLEDGED,
                    chain,
                    f"delivered to group {group!r} at {label!r} {last.delivery_count or 1} "
                    "time(s), never acknowledged: still pending",
                    step=i,
                    seen=[last],
                )
            )
        else:
            times = max((o.delivery_count or 1 for o in delivered), default=1)
            if times > 1 and state.policies[i] is None and state.flow.delivery != "at-least-once":
                state.add(
                    state.finding(
                        FindingKind.DUPLICATED,
                        chain,
                        f"delivered {times} times to group {group!r} at {label!r}, expected "
                        f"once ({state.flow.delivery}; no retry policy allows more)",
                        step=i,
                        seen=delivered[:5],
                    )
                )

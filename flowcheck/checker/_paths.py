"""Deliveries without routes: a step's queue delivered messages of the flow, yet no
message was ever seen reaching it. The traffic came by a path the topology does not
declare (a queue bound to an exchange nobody publishes through, while the system
publishes around it), so the flow's chains cannot be judged as described."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowcheck.checker._chain import Chain
from flowcheck.checker.verdict import Finding, FindingKind

if TYPE_CHECKING:
    from flowcheck.checker._flow import FlowState


def note(state: FlowState, chain: Chain) -> None:
    """Count, per step, chains that reached it and chains only delivered from it."""
    for j in range(state.n):
        if chain.arrivals[j]:
            state.reached_steps.add(j)
        elif chain.deliveries[j]:
            state.unrouted[j] += 1


def findings(state: FlowState) -> None:
    """One finding per step that delivered chains but was never seen reached: only then,
    since a recording that starts mid-flight sees a few deliveries of earlier messages."""
    for j, n in sorted(state.unrouted.items()):
        if j in state.reached_steps:
            continue
        channel = state.flow.steps[j].channel
        state.add(
            Finding(
                kind=FindingKind.UNROUTED,
                flow=state.name,
                step=state.labels[j],
                message=(
                    f"{n} chain(s) delivered from {channel!r}, but no message was seen "
                    "reaching it: they came by a path the topology does not declare "
                    "(check its bindings, or how the system publishes there)"
                ),
            )
        )

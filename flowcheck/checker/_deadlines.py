"""Deadlines: each hop within its step's deadline, the whole chain within the flow's."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from flowcheck.checker._chain import Chain
from flowcheck.checker._hist import Span, on, span
from flowcheck.checker.verdict import FindingKind
from flowcheck.topology import format_duration
from flowcheck.topology.model import DeadLetterRule

if TYPE_CHECKING:
    from flowcheck.checker._flow import FlowState


def applies(state: FlowState) -> bool:
    return state.flow_deadline_ns is not None or any(d is not None for d in state.deadline_ns)


def check(
    state: FlowState, chain: Chain, rule: DeadLetterRule | None, spans: list[Span | None]
) -> None:
    if not state.ended_well:
        return  # judged on chains that ended where they should: complete, or dead-lettered
    deadlines = state.deadline_ns
    labels = state.labels
    for i in range(1, state.n):
        limit, took = deadlines[i], spans[i]
        if limit is None or took is None or took[0] <= limit:
            continue
        state.add(
            state.finding(
                FindingKind.LATE,
                chain,
                f"{labels[i]!r} came {took[0] / 1e6:.0f}ms after {labels[i - 1]!r}; "
                f"its deadline is {format_duration(state.flow.steps[i].deadline or timedelta())}"
                + on(took),
                step=i,
                seen=[next(iter(chain.arrivals[i].values()))],
            )
        )
    limit = state.flow_deadline_ns
    if limit is not None and chain.arrivals[0] and chain.arrivals[-1]:
        late = state.late_ms
        # The end-to-end span, already taken when the chain is complete.
        whole = spans[-1] or span(
            chain.arrivals[0].values(), chain.arrivals[-1].values(), (late[0], late[-1]), True
        )
        if whole[0] > limit:
            assert state.flow.deadline is not None
            state.add(
                state.finding(
                    FindingKind.LATE,
                    chain,
                    f"chain took {whole[0] / 1e6:.0f}ms end to end; the flow's deadline is {format_duration(state.flow.deadline)}"
                    + on(whole),
                )
            )

"""Ordering: messages keep their order, per chain (several messages of one key) and, for
``per-partition-key``, across the chains of one Kafka record key.

Order comes from the brokers' own orders (Kafka offsets within a partition, Redis entry
ids within a stream, the order one tap read a channel in), never from tap read times;
two places in different orders, or a tie, decide nothing.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from flowcheck.checker._chain import RANK, Chain, compare, merged
from flowcheck.checker._hist import Span
from flowcheck.checker.verdict import FindingKind
from flowcheck.observations import Observation
from flowcheck.topology.model import DeadLetterRule

if TYPE_CHECKING:
    from flowcheck.checker._flow import FlowState


def applies(state: FlowState) -> bool:
    return state.ordered


def check(
    state: FlowState, chain: Chain, rule: DeadLetterRule | None, spans: list[Span | None]
) -> None:
    if not chain.arrivals[0]:
        return
    if len(chain.arrivals[0]) > 1:  # one message at the first step has nothing to overtake
        within(state, chain)
    flow = state.flow
    if flow.ordering != "per-partition-key":
        return  # per-key: each chain is its own key, ordered within itself
    what = "ordering per-partition-key"
    group = next((o.kafka_key for a in chain.arrivals for o in a.values() if o.kafka_key), None)
    if group is None:
        # Partitions are a topic's: a chain that reached none has no partition order.
        if any(chain.arrivals[i] for i in state.partitioned_steps):
            state.unjudge("ordering", what, "no Kafka record key was seen on its messages")
        return
    places = [merged(p) for p in chain.places]
    start = min(o.mono_ns for o in chain.arrivals[0].values())
    entries = state.order_groups.setdefault(group, [])
    unplaced = 0  # chains that reached a later step with this one, in no common order
    for _, other_key, other in entries:
        if other_key == chain.key:
            continue
        # Only steps both chains reached can show an overtaking (a chain that ended in
        # a dead letter early has nothing to compare there).
        shared = [i for i in range(1, len(places)) if places[i] and other[i]]
        if not shared:
            continue
        first = compare(other[0], places[0])  # -1: the other one came first
        judged = False
        for i in shared:
            now = None if first is None else compare(other[i], places[i])
            if now is None:
                continue
            judged = True
            if now != first:
                earlier, later = (other_key, chain.key) if now > 0 else (chain.key, other_key)
                state.add(
                    state.finding(
                        FindingKind.REORDERED,
                        chain,
                        f"{later!r} overtook {earlier!r} at {state.labels[i]!r} "
                        f"(ordering {flow.ordering}, group {group!r})",
                        step=i,
                        seen=list(chain.arrivals[i].values())[:1],
                    )
                )
                break
        unplaced += not judged
    if unplaced:
        state.unjudge(
            "ordering",
            what,
            "it and another chain of its key reached a later step, but no broker order "
            "(one partition, one stream, one queue) held both at two steps",
        )
    entries.append((start, chain.key, places))
    log = state.order_log
    log.append((start, group))
    # Forget chains that started two windows ago: nothing can overtake them any more.
    horizon = start - 2 * state.window_ns
    while log and log[0][0] < horizon:
        old_start, old_group = log.popleft()
        kept = state.order_groups.get(old_group)
        if kept:
            kept[:] = [e for e in kept if e[0] > old_start]
            if not kept:
                del state.order_groups[old_group]


def in_order(chain: Chain, i: int) -> list[Observation] | None:
    """The messages at step ``i`` in a broker order every one of them has a place in;
    None when there is none."""
    places = chain.places[i]
    per = [places.get(ident, {}) for ident in chain.arrivals[i]]
    common = set.intersection(*(set(p) for p in per)) if per else set()
    if not common:
        return None
    order = min(common, key=lambda o: (RANK[o[0]], repr(o)))
    ranked = sorted(zip(per, chain.arrivals[i].values(), strict=True), key=lambda p: p[0][order])
    return [o for _, o in ranked]


def within(state: FlowState, chain: Chain) -> None:
    """Several messages of one chain at a step: they keep their first-step order (by trace id)."""
    what = f"ordering {state.flow.ordering}"
    why = "its messages at {step!r} were not all seen in one broker order"
    first = in_order(chain, 0)
    if first is None:
        state.unjudge("ordering", what, why.format(step=state.labels[0]))
        return
    order = {o.trace_id: n for n, o in enumerate(first) if o.trace_id}
    if len(order) < 2:
        return
    for i in range(1, len(chain.arrivals)):
        there = in_order(chain, i)
        if there is None:
            if chain.arrivals[i]:
                state.unjudge("ordering", what, why.format(step=state.labels[i]))
            continue
        seq = [order[o.trace_id] for o in there if o.trace_id in order]
        for a, b in itertools.pairwise(seq):
            if b < a:
                state.add(
                    state.finding(
                        FindingKind.REORDERED,
                        chain,
                        f"messages of key {chain.key!r} reached {state.labels[i]!r} out of their first-step order",
                        step=i,
                        seen=list(chain.arrivals[i].values())[:2],
                    )
                )
                return

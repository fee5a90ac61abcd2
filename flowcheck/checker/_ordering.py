"""Ordering: messages keep their order, per chain (several messages of one key) and, for
``per-partition-key``, across the chains of one Kafka record key.

Or, declared with a sequence field, messages of one entity arrive in increasing sequence
numbers at each step (:class:`BySeq`).

Order comes from the brokers' own orders (Kafka offsets within a partition, Redis entry
ids within a stream, the order one tap read a channel in), never from tap read times;
two places in different orders, or a tie, decide nothing.
"""

from __future__ import annotations

import bisect
import itertools
from typing import TYPE_CHECKING, Any

from flowcheck.checker._chain import Chain, Order, compare, merged, place, rank
from flowcheck.checker._hist import Span
from flowcheck.checker._match import MISSING
from flowcheck.checker.verdict import Finding, FindingKind
from flowcheck.observations import Observation, payload_json
from flowcheck.topology import path_segments, path_value
from flowcheck.topology.model import DeadLetterRule, SeqOrdering

if TYPE_CHECKING:
    from flowcheck.checker._flow import FlowState


def applies(state: FlowState) -> bool:
    return state.ordered or state.by_seq is not None


def check(
    state: FlowState, chain: Chain, rule: DeadLetterRule | None, spans: list[Span | None]
) -> None:
    if state.by_seq is not None:
        state.by_seq.check(chain, rule)
        return
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
    order = min(common, key=rank)
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


# ---------------------------------------------------------------- by a sequence field
#
# Per step and entity: the last message in each broker order (its place, seq and chain),
# for inversions; and the seqs seen as a range with the holes still open in it, for gaps.
# Both are a few numbers per entity, whatever the number of messages.


class Seqs:
    """The sequence numbers seen of one entity at one step: ``lo``..``hi`` but ``holes``."""

    __slots__ = ("hi", "holes", "lo")

    def __init__(self, n: int) -> None:
        self.lo = self.hi = n
        self.holes: list[list[int]] = []  # [first, last] missing, in increasing order

    def add(self, n: int) -> None:
        if n > self.hi:
            if n > self.hi + 1:
                self.holes.append([self.hi + 1, n - 1])
            self.hi = n
        elif n < self.lo:
            if n < self.lo - 1:
                self.holes.insert(0, [n + 1, self.lo - 1])
            self.lo = n
        else:
            k = bisect.bisect_right(self.holes, n, key=_start) - 1
            if k < 0:
                return
            a, b = self.holes[k]
            if n <= b:
                rest = [[a, n - 1]] if a < n else []
                if n < b:
                    rest.append([n + 1, b])
                self.holes[k : k + 1] = rest


def _start(hole: list[int]) -> int:
    return hole[0]


def value(obs: Observation, ref: tuple[str | int, ...] | str, parsed: Any) -> Any:
    """A payload path's value (``ref`` as segments) or a header's; MISSING if absent."""
    if isinstance(ref, str):
        return obs.headers.get(ref, MISSING)
    return path_value(parsed, ref, MISSING)


def whole(v: Any) -> int | None:
    """A sequence number: a whole number, or text of one (headers travel as text)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            return None
    return None


class BySeq:
    """Ordering by a sequence field, fed each copy of each message at its steps."""

    def __init__(self, state: FlowState, rule: SeqOrdering) -> None:
        self.state = state
        self.per = None if rule.per is None else ref(rule.per)
        self.seq = ref(rule.seq)
        self.parse = not (
            isinstance(self.seq, str) and (self.per is None or isinstance(self.per, str))
        )
        self.steps = [rule.at is None or label in rule.at for label in state.labels]
        self.what = f"ordering by {rule.seq}" + (f" per {rule.per}" if rule.per else "")
        self.names = (rule.per or "", rule.seq)
        # (step, order) -> entity -> (place, seq, chain key) of the latest message there
        self.last: dict[tuple[int, Order], dict[str, tuple[tuple[int, ...], int, str]]] = {}
        self.seen: list[dict[str, Seqs]] = [{} for _ in state.labels]
        # chain key -> its inversions so far: (step, message, observation)
        self.inversions: dict[str, list[tuple[int, str, Observation]]] = {}
        # open chain -> (entity, seq) of its first message, when a dead-letter rule may
        # end it early: the steps it is not meant to reach have no gap for its seq
        self.poisonable = bool(state.flow.dead_letters)
        self.first: dict[str, tuple[str, int]] = {}

    def feed(self, chain: Chain, step: int, obs: Observation, new: bool, feed_seq: int) -> None:
        judged = self.steps[step]  # else only read for a chain a dead-letter rule may end
        if not judged and (not new or chain.key in self.first):
            return
        parsed = payload_json(obs.payload) if self.parse else None
        if self.per is None:
            entity = ""
        else:
            e = value(obs, self.per, parsed)
            if e is MISSING or e is None or isinstance(e, (dict, list, bool)):
                if new and judged:
                    self.state.unjudge(
                        "ordering",
                        self.what,
                        f"a message had no {self.names[0]!r} (text or number)",
                    )
                return
            entity = str(e)
        n = whole(value(obs, self.seq, parsed))
        if n is None:
            if new and judged:
                self.state.unjudge(
                    "ordering", self.what, f"a message had no whole-number {self.names[1]!r}"
                )
            return
        if new and self.poisonable:
            self.first.setdefault(chain.key, (entity, n))
        if not judged:
            return
        if new:
            seen = self.seen[step]
            if (s := seen.get(entity)) is None:
                seen[entity] = Seqs(n)
            else:
                s.add(n)
        order, at = place(obs, feed_seq)
        last = self.last.setdefault((step, order), {})
        before = last.get(entity)
        if before is None or at > before[0]:
            last[entity] = (at, n, chain.key)
        if before is None or at == before[0] or n == before[1]:
            return  # a tie in broker order decides nothing; a repeated seq is delivery's
        if (at > before[0]) == (n > before[1]):
            return
        hi, lo = (before, (at, n, chain.key)) if at > before[0] else ((at, n, chain.key), before)
        who = f"{self.names[0]} {entity!r}: " if self.per is not None else ""
        msg = (
            f"{who}seq {lo[1]} (chain {lo[2]!r}) came after seq {hi[1]} (chain {hi[2]!r}) "
            f"at {self.state.labels[step]!r}"
        )
        found = self.inversions.setdefault(chain.key, [])
        if all(m != msg for _, m, _ in found):
            found.append((step, msg, obs))

    def check(self, chain: Chain, rule: DeadLetterRule | None) -> None:
        state = self.state
        for step, msg, obs in self.inversions.pop(chain.key, ()):
            state.add(state.finding(FindingKind.REORDERED, chain, msg, step=step, seen=[obs]))
        first = self.first.pop(chain.key, None)
        if rule is not None and first is not None:
            # Its dead-letter rule ends it early: the steps it never reached miss nothing.
            entity, n = first
            for i, seen in enumerate(self.seen):
                if self.steps[i] and not chain.arrivals[i]:
                    if (s := seen.get(entity)) is None:
                        seen[entity] = Seqs(n)
                    else:
                        s.add(n)

    def finish(self) -> None:
        """Holes still open at the end of the recording: gaps."""
        state = self.state
        for step, seen in enumerate(self.seen):
            for entity, s in seen.items():
                if not s.holes:
                    continue
                missing = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in s.holes)
                who = f"{self.names[0]} {entity!r}: " if self.per is not None else ""
                state.add(
                    Finding(
                        kind=FindingKind.SEQUENCE_GAP,
                        flow=state.name,
                        step=state.labels[step],
                        message=f"{who}seq {missing} never reached {state.labels[step]!r} "
                        f"(seen {s.lo} to {s.hi})",
                    )
                )
            seen.clear()
        self.last.clear()
        self.inversions.clear()
        self.first.clear()


def ref(field: str) -> tuple[str | int, ...] | str:
    return path_segments(field) if field.startswith("$") else field

"""Retries the application publishes again (Celery's ``self.retry``, Dramatiq's delay queue):
each is a new message to the broker, and one more attempt of the same message to the flow.

What tells an attempt from a second message is what the framework carries, declared on
the step's retry policy: a retry counter (an attempt is a value above the first; the same
value twice is a duplicate), the message's id (the same id again is an attempt, a new id
a second message), or, without either, a passage through one of the step's retry
channels (each passage lets one more arrival in as an attempt).

An attempt goes to the chain's ``retry_arrivals`` of its step, numbered in
``delivery_count``, where :mod:`_retries` counts it; the step's arrivals keep the
messages only, so duplicates, completeness and latency see each message once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowcheck.checker._chain import Chain
from flowcheck.checker._match import MISSING
from flowcheck.observations import Observation, payload_json
from flowcheck.topology import path_segments, path_value
from flowcheck.topology.model import Locator, RetryPolicy

if TYPE_CHECKING:
    from flowcheck.checker._flow import FlowState


@dataclass(frozen=True)
class Mark:
    """How a step's attempts are told apart: ``by`` is counter, id or passage."""

    by: str
    header: str | None = None
    path: tuple[str | int, ...] | None = None
    first: int = 0


def mark(policy: RetryPolicy | None, retry_channels: bool) -> Mark | None:
    if policy is not None and policy.counter is not None:
        c = policy.counter
        return Mark("counter", *_where(c), first=c.first)
    if policy is not None and policy.id is not None:
        return Mark("id", *_where(policy.id))
    return Mark("passage") if retry_channels else None


def _where(loc: Locator) -> tuple[str | None, tuple[str | int, ...] | None]:
    return loc.header, None if loc.payload is None else path_segments(loc.payload)


def value(m: Mark, obs: Observation) -> Any:
    """The counter's or id's value on ``obs``; MISSING when it carries none."""
    if m.header is not None:
        return obs.headers.get(m.header, MISSING)
    assert m.path is not None
    return path_value(payload_json(obs.payload), m.path, MISSING)


def number(m: Mark, obs: Observation) -> int | None:
    """The attempt ``obs`` is by its counter (1 = first); None if the counter is unreadable."""
    v = value(m, obs)
    if v is MISSING or v is None:
        return 1
    if isinstance(v, bool):
        return None
    try:
        n = int(v)
    except (TypeError, ValueError):
        return None
    return n - m.first + 1


def again(state: FlowState, chain: Chain, i: int, obs: Observation) -> bool:
    """Is ``obs``, arriving at step ``i`` as a new message, a later attempt of one already
    there? If so it is kept as one (in ``retry_arrivals``, numbered)."""
    m = state.retry_marks[i]
    if m is None:
        return False
    retried = chain.retry_arrivals[i]
    if m.by == "counter":
        n = number(m, obs)
        if n is None or n <= 1:
            return False  # a first attempt (or no counter to tell): a message
    elif m.by == "id":
        v = value(m, obs)
        if v is MISSING:
            return False
        earlier = [o for o in chain.arrivals[i].values() if value(m, o) == v]
        if not earlier:
            return False  # a new id: a message of its own
        n = 1 + len(earlier) + sum(1 for o in retried if value(m, o) == v)
    else:
        if len(chain.arrivals[i]) < state.expected(chain)[i]:
            return False
        passages = sum(1 for o in retried if o.channel in state.retry_declared)
        back = len(retried) - passages  # attempts already let in at the step itself
        if back >= passages:
            return False  # no passage through a retry channel left to account for it
        n = back + 2
    retried.append(obs.replace(delivery_count=n))
    return True


def duplicates(state: FlowState, chain: Chain, i: int) -> list[list[Observation]]:
    """Attempts by counter at step ``i`` that came more often than its messages: the same
    counter value twice is the same attempt twice."""
    m = state.retry_marks[i]
    if m is None or m.by != "counter" or not chain.retry_arrivals[i]:
        return []
    counted: Counter[int] = Counter()
    seen: dict[int, list[Observation]] = {}
    for o in chain.retry_arrivals[i]:
        if o.channel in state.retry_declared or o.delivery_count is None:
            continue
        counted[o.delivery_count] += 1
        seen.setdefault(o.delivery_count, []).append(o)
    need = state.expected(chain)[i]
    return [seen[n] for n, c in sorted(counted.items()) if c > need]

"""One chain's state while it is open, and where its messages stood in the brokers' orders."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from flowcheck.checker.verdict import Finding, Seen, chain_trace_id
from flowcheck.observations import RESENT_HEADER, Observation

# Where a message stood in one broker order: (which order, place in it). Places are
# comparable only within one order: a Kafka partition (offset), a Redis stream (entry
# id), or the order in which the observations of one channel (of one kind) were fed.
Order = tuple[Any, ...]
Places = dict[Order, tuple[int, ...]]
RANK = {"offset": 0, "entry": 1, "fed": 2}  # the broker's own orders first


def identity(obs: Observation) -> tuple[Any, ...]:
    """What makes two observations the same message at one channel.

    The broker's position first: a consumer that republishes a message it already
    processed copies its x-flowcheck-id, but the copy gets a new offset or entry id.
    """
    if obs.offset is not None:
        return ("kafka", obs.partition, obs.offset)
    if obs.entry_id is not None:
        return ("stream", obs.entry_id)
    if obs.fc_id is not None:
        return ("fc", obs.fc_id)
    return ("obs", id(obs))  # a RabbitMQ copy without an id: each one is its own message


def which(
    arrived: dict[tuple[Any, ...], Observation], ident: tuple[Any, ...], obs: Observation
) -> tuple[Any, ...] | None:
    """The identity under which this message already arrived, None if it has not. Copies of
    one message with and without a broker position (flowcheck's publish and a tap without
    one) are the same message, and so are copies flowcheck sent again (see _resent, which
    may put a copy in the place of the arrival it is one with)."""
    if ident in arrived:
        return ident
    fc = obs.fc_id
    if fc is None or not arrived:
        return None
    if ident[0] == "fc":
        return next((k for k, o in arrived.items() if o.fc_id == fc), None)
    if ("fc", fc) in arrived:
        return ("fc", fc)
    return _resent(arrived, obs, fc)


def _resent(
    arrived: dict[tuple[Any, ...], Observation], obs: Observation, fc: str
) -> tuple[Any, ...] | None:
    """The identity of the message ``obs`` is a copy of, where flowcheck sent it again
    (RESENT_HEADER) after losing the broker's answer: the copies, one without the
    marker and any with it, at one channel are one message, whatever their positions.

    A copy without the marker takes the place of a marked one that arrived first, so
    that a later copy without it (a consumer republishing the message) is one more."""
    for k, o in arrived.items():
        if o.fc_id != fc or o.channel != obs.channel:
            continue
        if RESENT_HEADER in obs.headers:
            return k
        if RESENT_HEADER in o.headers:
            # Keep the first arrival's time: it is when the message was first seen.
            arrived[k] = obs.replace(mono_ns=o.mono_ns, wall=o.wall)
            return k
    return None


def messages(arrived: Mapping[tuple[Any, ...], Observation]) -> int:
    """How many distinct messages a chain's first step received, its arrivals being one
    per broker identity (flowcheck's resent copies already one with their message).

    Two arrivals are the same message (a publisher sending it again, at a new offset or
    entry id, or flowcheck asked to publish it twice) when their bodies are the same and
    their message ids do not differ (equal, or either has none); else each is a message
    of its own. Flowcheck's own id, and the message id it sets from it, say nothing of
    what the message is: one body published twice is one message sent twice.
    """
    if len(arrived) <= 1:
        return len(arrived)
    firsts: list[Observation] = []
    for o in arrived.values():
        if not any(_same(o, f) for f in firsts):
            firsts.append(o)
    return len(firsts)


def _own_id(o: Observation) -> str | None:
    """The message id its publisher chose; not one flowcheck set from its own id."""
    return None if o.message_id == o.fc_id else o.message_id


def _same(a: Observation, b: Observation) -> bool:
    if a.fc_id is not None and a.fc_id == b.fc_id:
        return True
    x, y = _own_id(a), _own_id(b)
    if x is not None and y is not None and x != y:
        return False
    # The payload as kept (masked, cut at PAYLOAD_CAP), its size and, when cut, the hash
    # of the whole body.
    return a.payload == b.payload and a.size == b.size and a.sha256 == b.sha256


def place(obs: Observation, seq: int) -> tuple[Order, tuple[int, ...]]:
    """Where ``obs`` stands in its broker's order; ``seq`` is its place in the feed."""
    if obs.offset is not None:
        return ("offset", obs.channel, obs.partition), (obs.offset,)
    if obs.entry_id is not None:
        ms, _, n = obs.entry_id.partition("-")
        if ms.isdigit() and n.isdigit():
            return ("entry", obs.channel), (int(ms), int(n))
    # One tap reads one channel in its broker's order (a RabbitMQ queue delivers in
    # order); flowcheck's own publishes are another order, in publish-confirm order.
    return ("fed", obs.channel, obs.kind.value), (seq,)


_ranks: dict[Order, tuple[int, str]] = {}  # a topology has few orders: keys made once


def rank(order: Order) -> tuple[int, str]:
    """Where an order sorts among those two places share: the brokers' own first."""
    r = _ranks.get(order)
    if r is None:
        r = _ranks[order] = (RANK[order[0]], repr(order))
    return r


def compare(a: Places, b: Places) -> int | None:
    """-1 if ``a`` came first, 1 if ``b`` did, in an order both have a place in; None when
    no order holds both, or they tie: a tie decides nothing."""
    if len(a) == 1:  # the common case: a message seen in one order
        for order, x in a.items():
            y = b.get(order)
            return None if y is None or x == y else -1 if x < y else 1
    common = a.keys() & b.keys()
    for order in sorted(common, key=rank) if len(common) > 1 else common:
        x, y = a[order], b[order]
        if x != y:
            return -1 if x < y else 1
    return None


def merged(places: Mapping[tuple[Any, ...], Places]) -> Places:
    """The first place of any of a step's messages, per order. With one message, its own
    places, not a copy: read it, never change it."""
    if len(places) == 1:  # the common case: nothing to merge
        for only in places.values():
            return only
    out: Places = {}
    for per in places.values():
        for order, at in per.items():
            if order not in out or at < out[order]:
                out[order] = at
    return out


@dataclass
class Chain:
    key: str
    first_ns: int
    arrivals: list[dict[tuple[Any, ...], Observation]]  # per step: message -> first arrival
    retry_arrivals: list[list[Observation]]  # per step: arrivals on its retry channels
    deliveries: list[list[Observation]]  # per step: DELIVERED / REDELIVERED evidence
    consumed: list[bool]
    dead: list[Observation] = field(default_factory=list)
    unroutable: Observation | None = None
    sample: Observation | None = None
    sample_first: bool = False
    timeline: list[Observation] = field(default_factory=list)
    # per step: message -> its place in each broker order it was seen in (ordered flows)
    places: list[dict[tuple[Any, ...], Places]] = field(default_factory=list)
    # per step naming a consumer group: the entry trimmed before that group read it
    trimmed: dict[int, Observation] = field(default_factory=dict)

    def reached(self) -> int:
        """Index of the last step with an arrival, -1 if none."""
        return max((i for i, a in enumerate(self.arrivals) if a), default=-1)


# What a Seen copies from its observation as it is.
_AS_OBSERVED = (
    "channel",
    "fc_id",
    "message_id",
    "trace_id",
    "partition",
    "offset",
    "entry_id",
    "delivery_count",
    "reason",
    "broker",
    "routing_key",
    "group",
    "origin",
)


def seen(obs: Observation, start_ns: int) -> Seen:
    return Seen(
        kind=obs.kind.value,
        at_ms=round((obs.mono_ns - start_ns) / 1e6, 3),
        until_ms=None if obs.until_ns is None else round((obs.until_ns - start_ns) / 1e6, 3),
        **{name: getattr(obs, name) for name in _AS_OBSERVED},
    )


@dataclass(frozen=True, slots=True)
class Decided:
    """A chain as it was decided, for a :class:`~flowcheck.checker.Checker`'s
    ``on_decided``: its outcome, the findings its decision made, and its first
    MAX_TIMELINE observations (the chain's own list, not a copy: read it during the
    call). Made only when a callback is set; the verdict keeps none of them."""

    flow: str
    key: str
    outcome: Literal["passed", "failed", "unknown"]
    findings: Sequence[Finding]
    observations: Sequence[Observation]
    start_ns: int

    @property
    def trace_id(self) -> str:
        """The chain's trace id, as its findings carry it."""
        return chain_trace_id(self.flow, self.key, (o.trace_id for o in self.observations))

    def timeline(self) -> list[Seen]:
        return [seen(o, self.start_ns) for o in self.observations]


OnDecided = Callable[[Decided], None]

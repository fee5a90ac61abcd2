"""What the RabbitMQ adapter declares and binds, from the topology alone: no I/O.

``names`` maps each channel key of the broker to its name on the broker; keys of
other brokers, and names the topology does not know, stand for themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flowcheck.topology.model import Exchange, Queue, Topology
from flowcheck.topology.routing import dead_letter_route

Binding = tuple[str, str, dict[str, Any] | None]  # (exchange, routing key, arguments)


def queue_arguments(q: Queue, physical: Mapping[str, str]) -> dict[str, Any]:
    """The x-arguments that declare ``q`` as the topology describes it."""
    args: dict[str, Any] = {}
    if q.type == "quorum":
        args["x-queue-type"] = "quorum"
    if q.delivery_limit is not None:
        args["x-delivery-limit"] = q.delivery_limit
    if q.ttl is not None:
        args["x-message-ttl"] = int(q.ttl.total_seconds() * 1000)
    if q.max_length is not None:
        args["x-max-length"] = q.max_length
    if q.overflow is not None:
        args["x-overflow"] = q.overflow
    route = q.dead_letter
    if route is not None and route.published_by is None:  # a service's own: no x-arguments
        if route.queue is not None:  # through the default exchange, keyed by the queue's name
            args["x-dead-letter-exchange"] = ""
            args["x-dead-letter-routing-key"] = physical.get(route.queue, route.queue)
        else:
            args["x-dead-letter-exchange"] = physical.get(route.target, route.target)
            if route.key is not None:
                args["x-dead-letter-routing-key"] = route.key
    args.update(q.arguments)
    return args


def exchange_spec(ex: Exchange, names: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings, x-arguments) that declare ``ex``."""
    args = {}
    if ex.alternate:
        args["alternate-exchange"] = names.get(ex.alternate, ex.alternate)
    return {"type": ex.type, "durable": ex.durable}, args


def queue_spec(q: Queue, names: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings, x-arguments) that declare ``q``."""
    return {"durable": q.durable or q.type == "quorum"}, queue_arguments(q, names)


def queue_bindings(q: Queue, names: Mapping[str, str]) -> list[Binding]:
    """The bindings of ``q`` as the broker takes them."""
    return [
        (names.get(b.exchange, b.exchange), b.key, dict(b.arguments) or None) for b in q.bindings
    ]


def dead_letter_targets(topology: Topology) -> set[str]:
    """Queues that some queue's dead letters reach: messages with x-death there are
    dead letters."""
    return {q for key in topology.channels for q in dead_letter_route(topology, key)[1]}


def past_limit(topology: Topology, origin: str | None) -> int | None:
    """Deliveries of a message a quorum queue dead-lettered for its delivery limit: the
    broker does so once the message was returned more times than the limit, after
    limit + 1 deliveries. The limit is the topology's, which apply and drift keep
    equal to the broker's."""
    ch = topology.channels.get(origin or "")
    if isinstance(ch, Queue) and ch.delivery_limit is not None:
        return ch.delivery_limit + 1
    return None


def tap_bindings(topology: Topology, names: Mapping[str, str], key: str) -> list[Binding]:
    """Bindings for the twin of channel ``key``."""
    ch = topology.channels[key]
    if isinstance(ch, Queue):
        return queue_bindings(ch, names)
    assert isinstance(ch, Exchange)
    name = names[key]
    queues = [q for q in topology.channels.values() if isinstance(q, Queue)]
    routes = [
        (b.key, dict(b.arguments) or None) for q in queues for b in q.bindings if b.exchange == key
    ]
    routes += [
        (q.dead_letter.key, None)
        for q in queues
        if q.dead_letter and q.dead_letter.exchange == key and q.dead_letter.key
    ]
    if ch.alternate is not None:
        # A twin bound to everything would make every publish routable, and the
        # broker would never hand one to the alternate exchange: bind it only where
        # the topology routes, and let the alternate exchange's own tap see the rest.
        return sorted({(name, k, a) for k, a in routes if a is None}) + [
            (name, k, a) for k, a in routes if a is not None
        ]
    if ch.type == "topic":
        return [(name, "#", None)]
    if ch.type in ("fanout", "headers"):
        return [(name, "", None)]
    # direct: every key the topology routes through this exchange
    return [(name, k, None) for k in sorted({k for k, _ in routes})]


def seen_through_exchanges(topology: Topology, channels: Sequence[str]) -> set[str]:
    """The queues among ``channels`` whose copies the twins of their exchanges see.

    A twin of an exchange receives every message the topology routes through it,
    so a queue bound only to tapped topic, direct or fanout exchanges needs no twin
    of its own: which queues a message reached follows from its routing key, as
    the broker decides it. That halves what the broker delivers to the tap, and one
    delivery costs the tap far more than one observation. Headers bindings match on
    headers: such a queue keeps its twin.
    """
    tapped = set(channels)
    out: set[str] = set()
    for key in channels:
        q = topology.channels[key]
        if not isinstance(q, Queue) or not q.bindings:
            continue
        if all(
            b.exchange in tapped
            and not b.arguments
            and isinstance(ex := topology.channels[b.exchange], Exchange)
            and ex.type in ("topic", "direct", "fanout")
            for b in q.bindings
        ):
            out.add(key)
    return out


def firehose_keys(
    topology: Topology, names: Mapping[str, str], channels: Sequence[str]
) -> list[str]:
    """The firehose's routing keys for ``channels``: deliveries from their queues,
    publishes to their exchanges, and ("publish.") publishes straight to a queue."""
    keys = [
        f"{'deliver' if isinstance(topology.channels[k], Queue) else 'publish'}.{names[k]}"
        for k in channels
    ]
    if straight_queues(topology, names, channels):
        keys.append("publish.")
    return keys


def straight_queues(
    topology: Topology, names: Mapping[str, str], channels: Sequence[str]
) -> dict[str, str]:
    """Queues among ``channels`` without bindings (queue name -> channel): published to
    straight, through the default exchange, which takes no twin: only the firehose shows
    those publishes."""
    return {
        names[k]: k
        for k in channels
        if isinstance(q := topology.channels[k], Queue) and not q.bindings
    }


def firehose_needs(
    topology: Topology, names: Mapping[str, str], channels: Sequence[str]
) -> tuple[list[str], list[str]]:
    """What among ``channels`` only the firehose shows: (the queues fed through the default
    exchange, whose publishes no twin sees; the queues whose deliveries a flow judges,
    its steps with a retry policy or dead-letter rules that count attempts)."""
    straight = sorted(straight_queues(topology, names, channels).values())
    tapped = set(channels)
    counted: set[str] = set()
    for flow in topology.flows.values():
        counting = any(r.attempts is not None for r in flow.dead_letters)
        for step in flow.steps:
            if step.channel not in tapped or not isinstance(
                topology.channels.get(step.channel), Queue
            ):
                continue
            if step.retry is not None or flow.retry is not None or counting:
                counted.add(step.channel)
    return straight, sorted(counted)

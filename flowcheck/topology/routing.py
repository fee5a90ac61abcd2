"""Routing semantics as pure functions (no broker needed): RabbitMQ bindings, which
channels carry a message besides the one it was sent to, and a flow's route map."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

from flowcheck.topology.model import Exchange, Queue

if TYPE_CHECKING:
    from flowcheck.topology.model import Flow, Topology


@functools.lru_cache(maxsize=8192)  # taps and the checker ask the same few pairs again and again
def topic_matches(pattern: str, key: str) -> bool:
    """Does an AMQP topic binding ``pattern`` match routing ``key``?

    Words are separated by dots; ``*`` stands for exactly one word, ``#`` for
    zero or more words.
    """
    pat = pattern.split(".")
    words = key.split(".")

    @cache  # without it, patterns like '#.#.#.#.x' take exponential time
    def match(i: int, j: int) -> bool:
        while i < len(pat):
            if pat[i] == "#":
                # '#' may swallow 0..n words; try each split, shortest first.
                return any(match(i + 1, k) for k in range(j, len(words) + 1))
            if j >= len(words) or (pat[i] != "*" and pat[i] != words[j]):
                return False
            i += 1
            j += 1
        return j == len(words)

    return match(0, 0)


def routes(exchange_type: str, binding_key: str, routing_key: str | None) -> bool:
    """Would a message with ``routing_key`` reach a binding with ``binding_key``?

    ``routing_key=None`` means "not known here" and counts as a possible match.
    Headers exchanges match on headers, which a topology cannot know: possible.
    """
    if exchange_type in ("fanout", "headers") or routing_key is None:
        return True
    if exchange_type == "topic":
        return topic_matches(binding_key, routing_key)
    return binding_key == routing_key


def bound_queues(channels: Mapping[str, Any], exchange: str, routing_key: str | None) -> list[str]:
    """Keys of the queues in ``channels`` that a message sent to ``exchange`` with
    ``routing_key`` may reach (None: any key)."""
    chans = channels
    ex = chans.get(exchange)
    etype = ex.type if isinstance(ex, Exchange) else "headers"
    return [
        name
        for name, q in chans.items()
        if isinstance(q, Queue)
        and any(b.exchange == exchange and routes(etype, b.key, routing_key) for b in q.bindings)
    ]


def dead_letter_route(topology: Topology, queue: str) -> tuple[str | None, list[str]]:
    """The dead-letter exchange of ``queue`` (None: straight to a queue, through the
    default exchange, or none at all) and the queues its dead letters reach."""
    q = topology.channels.get(queue)
    if not isinstance(q, Queue) or q.dead_letter is None:
        return None, []
    route = q.dead_letter
    if route.exchange is None:
        return None, [route.target]
    return route.exchange, bound_queues(topology.channels, route.exchange, route.key)


def dead_letter_path(topology: Topology, queue: str) -> list[str]:
    """The dead-letter exchange of ``queue``, if it has one, and the queues its dead
    letters reach."""
    dlx, reached = dead_letter_route(topology, queue)
    return reached if dlx is None else [dlx, *reached]


def carriers(topology: Topology, channel: str) -> list[str]:
    """The channels that carry a message of a step on ``channel``: the channel itself, its
    retry channels, its dead-letter topic or stream, its dead-letter exchange and the
    queues that exchange reaches."""
    ch = topology.channels.get(channel)
    out = [channel]
    if ch is not None:
        out += ch.retry_channels
        if ch.dead_letter_channel:
            out.append(ch.dead_letter_channel)
    return out + dead_letter_path(topology, channel)


# What a channel is to a flow: the step whose retries it carries, whether it is a
# dead-letter channel, the steps it is the channel of.
Route = tuple[int | None, bool, list[int] | None]


@dataclass
class FlowRoutes:
    """Which channels are a flow's steps, which carry its retries and which its dead letters:
    the one map the checker, the correlator and the pytest API share."""

    steps: dict[str, list[int]]  # channel -> the steps it is the channel of
    # Channels a step's retries pass through: its declared retry channels, and the
    # dead-letter exchange of a queue whose dead letters all go to those (the
    # RabbitMQ delay-queue pattern: reject -> DLX -> retry queue with TTL -> back).
    retry_of: dict[str, int]
    retry_declared: set[str]
    retry_visible: list[bool]  # per step: does it declare retry channels?
    dead: set[str]  # channels where a message of the flow is a dead letter
    leads_to: dict[str, set[str]]  # dead-letter exchange -> the queues it reaches
    carriers: list[list[str]]  # per step: the channels that carry its message
    watched: set[str] = field(default_factory=set)  # every channel above
    route: dict[str, Route] = field(default_factory=dict)  # channel -> what it is to the flow


def flow_routes(topology: Topology, flow: Flow) -> FlowRoutes:
    """The route map of ``flow``: its steps', retries' and dead letters' channels."""
    routes = FlowRoutes({}, {}, set(), [], {r.channel for r in flow.dead_letters}, {}, [])
    for i, step in enumerate(flow.steps):
        routes.steps.setdefault(step.channel, []).append(i)
        routes.carriers.append(carriers(topology, step.channel))
        ch = topology.channels.get(step.channel)
        declared = list(ch.retry_channels) if ch is not None else []
        routes.retry_visible.append(bool(declared))
        for r in declared:
            routes.retry_of.setdefault(r, i)
            routes.retry_declared.add(r)
        if ch is not None and ch.dead_letter_channel:
            routes.dead.add(ch.dead_letter_channel)
        dlx, reached = dead_letter_route(topology, step.channel)
        if dlx is None:  # straight to a queue: no exchange on the way
            routes.dead.update(q for q in reached if q not in declared)
        elif reached and all(q in declared for q in reached):
            routes.retry_of.setdefault(dlx, i)
        else:
            routes.dead.add(dlx)
            routes.dead.update(q for q in reached if q not in declared)
            routes.leads_to.setdefault(dlx, set()).update(reached)
    routes.dead -= set(routes.retry_of)
    routes.watched = set(routes.steps) | routes.dead | set(routes.retry_of)
    routes.route = {
        ch: (routes.retry_of.get(ch), ch in routes.dead, routes.steps.get(ch))
        for ch in routes.watched
    }
    return routes

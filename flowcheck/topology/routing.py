"""Routing semantics as pure functions (no broker needed): RabbitMQ bindings, and which
channels carry a message besides the one it was sent to."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

from flowcheck.topology.model import Exchange, Queue, Stream, Topic

if TYPE_CHECKING:
    from flowcheck.topology.model import Topology


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


def dead_letter_path(topology: Topology, queue: str) -> list[str]:
    """The dead-letter exchange of ``queue`` and the queues its dead letters reach."""
    q = topology.channels.get(queue)
    if not isinstance(q, Queue) or q.dead_letter is None:
        return []
    dlx = q.dead_letter.exchange
    return [dlx, *bound_queues(topology.channels, dlx, q.dead_letter.key)]


def carriers(topology: Topology, channel: str) -> list[str]:
    """The channels that carry a message of a step on ``channel``: the channel itself, its
    retry channels, its dead-letter topic or stream, its dead-letter exchange and the
    queues that exchange reaches."""
    ch = topology.channels.get(channel)
    out = [channel]
    if isinstance(ch, (Queue, Topic)):
        out += ch.retry
    if isinstance(ch, (Topic, Stream)) and ch.dead_letter:
        out.append(ch.dead_letter)
    return out + dead_letter_path(topology, channel)

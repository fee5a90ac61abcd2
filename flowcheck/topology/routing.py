"""RabbitMQ routing semantics as pure functions (no broker needed)."""

from __future__ import annotations


def topic_matches(pattern: str, key: str) -> bool:
    """Does an AMQP topic binding ``pattern`` match routing ``key``?

    Words are separated by dots; ``*`` stands for exactly one word, ``#`` for
    zero or more words.
    """
    pat = pattern.split(".")
    words = key.split(".")

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

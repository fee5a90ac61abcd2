"""Does an observation satisfy a step's (or dead-letter rule's) ``match``? Pure."""

from __future__ import annotations

from typing import Any

from flowcheck.correlate import lookup
from flowcheck.observations import Observation, payload_json
from flowcheck.topology.model import Match
from flowcheck.topology.routing import topic_matches


def matches(match: Match | None, obs: Observation, parsed: Any = None) -> bool:
    """All conditions of ``match`` hold for ``obs`` (no match: always true).

    ``parsed`` is the payload already parsed as JSON, if the caller has it.
    """
    if match is None:
        return True
    for name, want in match.headers.items():
        if not _equal(obs.headers.get(name), want):
            return False
    if match.payload:
        doc = parsed if parsed is not None else payload_json(obs.payload)
        for path, want in match.payload.items():
            if not _equal(lookup(doc, path), want):
                return False
    if match.routing_key is not None and not topic_matches(
        match.routing_key, obs.routing_key or ""
    ):
        return False
    return match.key is None or obs.kafka_key == match.key


def _equal(have: Any, want: Any) -> bool:
    if have == want:
        return True
    # Headers travel as text on Kafka and Redis: compare "3" with 3, "true" with True.
    if isinstance(have, str) and not isinstance(want, str) and want is not None:
        text = ("true" if want else "false") if isinstance(want, bool) else str(want)
        return have == text
    return False

"""Correlation keys: which chain of which flow a message belongs to. Pure functions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowcheck.observations import as_text, payload_json, trace_id_of
from flowcheck.topology._types import path_segments
from flowcheck.topology.model import Correlate, Queue, Stream, Topic, Topology
from flowcheck.topology.routing import dead_letter_path


def lookup(obj: Any, path: str) -> Any:
    """The value at a payload path (``$.a.b[0]``), or None when it is absent."""
    for seg in path_segments(path):
        if isinstance(seg, int):
            if not isinstance(obj, list) or not -len(obj) <= seg < len(obj):
                return None
        elif not isinstance(obj, dict) or seg not in obj:
            return None
        obj = obj[seg]
    return obj


_UNPARSED: Any = object()


@dataclass(slots=True)
class Message:
    """What a rule may look at. ``properties`` are AMQP properties (message_id, ...)."""

    headers: Mapping[str, Any]
    payload: str | None
    properties: Mapping[str, Any]
    kafka_key: str | None = None
    _doc: Any = _UNPARSED

    def document(self) -> Any:
        """The payload parsed as JSON (None if it is not JSON), parsed at most once."""
        if self._doc is _UNPARSED:
            self._doc = payload_json(self.payload)
        return self._doc


def key_of(rule: Correlate, msg: Message) -> str | None:
    """The correlation key of ``msg`` under ``rule``, as text; None if it has none."""
    value: Any
    if rule.traceparent:
        value = trace_id_of(as_text(msg.headers.get("traceparent")))
    elif rule.header is not None:
        value = msg.headers.get(rule.header)
    elif rule.property is not None:
        value = msg.properties.get(rule.property)
    elif rule.json_path is not None:
        value = lookup(msg.document(), rule.json_path)
    else:
        value = msg.kafka_key
    if value is None or isinstance(value, (dict, list)):
        return None
    return as_text(value)


class Correlator:
    """Knows, per channel, which flows care about it and with which rule."""

    def __init__(self, topology: Topology) -> None:
        self.rules: dict[str, list[tuple[str, Correlate]]] = {}
        for fname, flow in topology.flows.items():
            for step in flow.steps:
                rule = step.correlate or flow.correlate
                self._add(step.channel, fname, rule)
                # Retries and dead letters of a step carry the same message.
                ch = topology.channels.get(step.channel)
                if isinstance(ch, (Queue, Topic)):
                    for r in ch.retry:
                        self._add(r, fname, rule)
                if isinstance(ch, (Topic, Stream)) and ch.dead_letter:
                    self._add(ch.dead_letter, fname, rule)
                for target in dead_letter_path(topology, step.channel):
                    self._add(target, fname, rule)
            for dl in flow.dead_letters:
                self._add(dl.channel, fname, flow.correlate)

    def _add(self, channel: str, flow: str, rule: Correlate) -> None:
        entries = self.rules.setdefault(channel, [])
        if all(f != flow for f, _ in entries):
            entries.append((flow, rule))

    def keys(self, channel: str, msg: Message) -> dict[str, str]:
        out: dict[str, str] = {}
        for flow, rule in self.rules.get(channel, ()):
            key = key_of(rule, msg)
            if key is not None:
                out[flow] = key
        return out

"""Correlation keys: which chain of which flow a message belongs to. Pure functions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from flowcheck.observations import TEXT_CAP, as_text, fit_text, payload_json, trace_id_of
from flowcheck.topology import path_segments, path_value
from flowcheck.topology.model import Correlate, Topology
from flowcheck.topology.routing import flow_routes
from flowcheck.topology.transform import branched


def lookup(obj: Any, path: str) -> Any:
    """The value at a payload path (``$.a.b[0]``), or None when it is absent."""
    return path_value(obj, path_segments(path))


_UNPARSED: Any = object()
_json = msgspec.json.Decoder().decode  # ~3x faster than json.loads, and reads bytes as they come


@dataclass(slots=True)
class Message:
    """What a rule may look at. ``properties`` are AMQP properties (message_id, ...).

    ``body``, when given, is the whole payload as received (``payload`` may be cut).
    """

    headers: Mapping[str, Any]
    payload: str | None
    properties: Mapping[str, Any]
    kafka_key: str | None = None
    body: bytes | None = None
    _doc: Any = _UNPARSED

    def document(self) -> Any:
        """The payload parsed as JSON (None if it is not JSON), parsed at most once."""
        if self._doc is _UNPARSED:
            self._doc = _document(self.body, self.payload)
        return self._doc


def _document(body: bytes | None, payload: str | None) -> Any:
    if body is None:
        return payload_json(payload)
    try:
        return _json(body)
    except (msgspec.DecodeError, ValueError):
        # Bad UTF-8, NaN, a BOM: json.loads on the text decides, as it always did.
        return payload_json(body.decode("utf-8", errors="replace"))
    except RecursionError:  # nested too deeply for either parser: unreadable, as for payload_json
        return None


def reader(segments: tuple[str | int, ...]) -> Callable[[bytes], Any] | None:
    """A function that decodes only the value at a path of object keys from a JSON body,
    skipping the rest of the document (2-4x faster than decoding it all). It returns
    None when the path is absent, and ``_UNPARSED`` when the body is not plain JSON
    (NaN, bad UTF-8): the caller then parses as :func:`Message.document` does. None
    for paths with an array index."""
    names = [seg for seg in segments if isinstance(seg, str)]
    if not names or len(names) != len(segments):
        return None
    # Nested one-field structs, innermost first: {"a": {"b": value}} for $.a.b.
    spec: Any = Any
    for depth, name in enumerate(reversed(names)):
        inner = spec if depth == 0 else spec | None
        spec = msgspec.defstruct(f"_At{depth}", [("v", inner, None)], rename={"v": name})
    decode = msgspec.json.Decoder(spec).decode
    levels = len(names)

    def read(body: bytes) -> Any:
        try:
            obj: Any = decode(body)
        except msgspec.ValidationError:
            return None  # JSON, but something on the path is not an object
        except msgspec.DecodeError:
            return _UNPARSED
        except RecursionError:
            # Nested too deeply (anywhere, even off the path): no parser reads it.
            return None
        for _ in range(levels):
            if obj is None:
                return None
            obj = obj.v
        return obj

    return read


Getter = Callable[[Message], Any]
# (headers, payload, properties, kafka key, body) -> correlation key per flow
KeyFn = Callable[
    [Mapping[str, Any], str | None, Mapping[str, Any], str | None, bytes | None], dict[str, str]
]


def getter(rule: Correlate) -> Getter:
    """A function that reads ``rule``'s raw value from a message: the rule is decided once."""
    if rule.traceparent:
        return lambda m: trace_id_of(as_text(m.headers.get("traceparent")))
    if rule.header is not None:
        name = rule.header
        return lambda m: m.headers.get(name)
    if rule.property is not None:
        prop = rule.property
        return lambda m: m.properties.get(prop)
    if rule.json_path is not None:
        segments = path_segments(rule.json_path)
        return lambda m: path_value(m.document(), segments)
    return lambda m: m.kafka_key


def key_of(rule: Correlate, msg: Message) -> str | None:
    """The correlation key of ``msg`` under ``rule``, as text; None if it has none."""
    return _key(getter(rule)(msg))


def _key(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    text = as_text(value)
    # A key from another system's payload may be huge, or hold a lone surrogate (a
    # JSON escape) that no trace line can: made fit once here, it stays one key.
    if text is not None and (len(text) > TEXT_CAP or not text.isascii()):
        return fit_text(text)
    return text


class Correlator:
    """Knows, per channel, which flows care about it and with which rule."""

    def __init__(self, topology: Topology) -> None:
        self.rules: dict[str, list[tuple[str, Correlate]]] = {}
        self._getters: dict[str, list[tuple[str, Getter]]] = {}
        topology = branched(topology)  # a topology made in Python, not loaded
        for fname, flow in topology.flows.items():
            routes = flow_routes(topology, flow)
            for step, carried in zip(flow.steps, routes.carriers, strict=True):
                rule = step.correlate or flow.correlate
                # Retries and dead letters of a step carry the same message.
                for channel in carried:
                    self._add(channel, fname, rule)
            for dl in flow.dead_letters:
                self._add(dl.channel, fname, flow.correlate)

        self.key_fns = {ch: self._compile(ch) for ch in self.rules}

    def _add(self, channel: str, flow: str, rule: Correlate) -> None:
        entries = self.rules.setdefault(channel, [])
        if all(f != flow for f, _ in entries):
            entries.append((flow, rule))
            self._getters.setdefault(channel, []).append((flow, getter(rule)))

    def keys(self, channel: str, msg: Message) -> dict[str, str]:
        out: dict[str, str] = {}
        for flow, get in self._getters.get(channel, ()):
            key = _key(get(msg))
            if key is not None:
                out[flow] = key
        return out

    def _compile(self, channel: str) -> KeyFn:
        """The channel's key function, as taps call it for every message."""
        (flow, rule), *more = self.rules[channel]
        if not more and rule.json_path is not None:
            # The common case, without building a Message: one flow, one payload path.
            segments = path_segments(rule.json_path)
            read = reader(segments)

            def one(
                headers: Mapping[str, Any],
                payload: str | None,
                properties: Mapping[str, Any],
                kafka_key: str | None,
                body: bytes | None,
            ) -> dict[str, str]:
                value = _UNPARSED
                if read is not None and body is not None:
                    value = read(body)
                if value is _UNPARSED:
                    value = path_value(_document(body, payload), segments)
                key = _key(value)
                return {} if key is None else {flow: key}

            return one

        return lambda headers, payload, properties, kafka_key, body: self.keys(
            channel, Message(headers, payload, properties, kafka_key, body)
        )

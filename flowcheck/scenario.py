"""Scenarios: the messages ``flowcheck run`` publishes to exercise a topology's flows.

A scenario is YAML, validated like a topology::

    send:
      - flow: order-to-shipment
        count: 100
        rate: 50            # messages per second; default: as fast as confirmed
        routing_key: order.placed
        payload: {order_id: "{key}", amount: 12.5, customer: "c{n}"}
      - flow: poison-order
        count: 2
        payload: {order_id: "{key}", poison: true}

Strings in ``payload``, ``headers``, ``key``, ``routing_key`` and ``kafka_key``
are templates: ``{n}`` is the message's number within its ``send`` (0, 1, ...),
``{i}`` its number in the whole scenario, ``{key}`` its correlation key,
``{run}`` an id unique to this run, ``{flow}`` the flow's name. A placeholder is
one of these plain names, optionally with a width (``{n:05}``, ``{n:>8}``): no
attribute or index access, no conversion, so a template can never reach into
Python objects nor build a giant string. A rendered message is capped at
MAX_BODY bytes, and a scenario's publishing schedule at MAX_SCHEDULE. The
correlation key is also put where the flow's rule looks for it (payload path,
header, Kafka key), so a payload need not mention it.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

from pydantic import Field

from flowcheck.errors import TopologyError, UsageError
from flowcheck.topology import Duration, document, format_duration, path_segments
from flowcheck.topology.model import Model, Topology
from flowcheck.topology.transform import branches_of

NAMES = ("n", "i", "key", "run", "flow")  # the placeholders a template may use
MAX_WIDTH = 64  # of a placeholder's format spec: "{n:>300000000}" would take gigabytes
MAX_BODY = 1024 * 1024  # bytes of one rendered message body
MAX_SCHEDULE = timedelta(hours=1)  # the longest a scenario's rates may make publishing take
# A width and nothing that changes the value: fill, align, sign, zero-padding, width.
_SPEC = re.compile(r"(?:.?[<>^=])?[+\- ]?0?(?P<width>\d{0,3})[sd]?")


class Send(Model):
    flow: str
    channel: str | None = Field(None, description="default: the flow's first step")
    count: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    rate: Annotated[float, Field(gt=0)] | None = Field(None, description="messages per second")
    key: str = Field("{run}-{flow}-{i}", description="correlation key template")
    routing_key: str | None = None
    kafka_key: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    payload: Any = Field(default_factory=dict)


class Scenario(Model):
    name: str | None = None
    send: list[Send] = Field(min_length=1)
    timeout: Duration | None = Field(None, description="give up waiting after this long")


@dataclass(frozen=True)
class Message:
    flow: str
    channel: str
    key: str
    body: bytes
    headers: dict[str, str]
    routing_key: str | None
    kafka_key: str | None
    delay: float  # seconds after the previous message of the same send


def load(path: str, topology: Topology) -> Scenario:
    """Read and check a scenario file against ``topology``; TopologyError lists every problem."""
    doc = document.read(path, what="scenario")
    scenario = None
    if doc.data is not None:
        try:
            scenario = Scenario.model_validate(doc.data)
        except Exception as exc:  # pydantic's ValidationError: located like topology errors
            errors = getattr(exc, "errors", None)
            if errors is None:
                raise
            document.report(doc, Scenario, (), errors())
    if scenario is not None:
        for i, send in enumerate(scenario.send):
            judged = branches_of(topology, send.flow)
            if not judged:
                doc.problem(
                    ("send", i, "flow"), f"send[{i}].flow: the topology has no flow {send.flow!r}"
                )
            elif send.channel is not None and send.channel not in topology.channels:
                doc.problem(
                    ("send", i, "channel"),
                    f"send[{i}].channel: the topology has no channel {send.channel!r}",
                )
            elif topology.flows[judged[0]].correlate.property is not None:
                doc.problem(
                    ("send", i, "flow"),
                    f"send[{i}]: scenarios cannot set AMQP properties yet; correlate by header or payload",
                )
        for i, send in enumerate(scenario.send):
            for where, text in _templates(send):
                problem = template_problem(text)
                if problem is not None:
                    doc.problem(("send", i, *where), f"send[{i}].{_dotted(where)}: {problem}")
        took = schedule(scenario)
        if took > MAX_SCHEDULE:
            slow = max(range(len(scenario.send)), key=lambda i: _send_time(scenario.send[i]))
            doc.problem(
                ("send", slow, "rate"),
                f"send[{slow}].rate: publishing this scenario would take "
                f"{_spell(took)}; a scenario may take at most {format_duration(MAX_SCHEDULE)}",
            )
    if doc.problems or scenario is None:
        raise TopologyError(sorted(doc.problems, key=lambda p: (p.line, p.column)))
    return scenario


def template_problem(text: str) -> str | None:
    """Why ``text`` is not a valid template, or None."""
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:  # "Single '}' encountered", unclosed "{"
        return f"template {text!r}: {exc}; write {{{{ and }}}} for literal braces"
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in NAMES:
            return (
                f"template {text!r}: unknown placeholder {{{name}}}; "
                f"a placeholder is one of {', '.join('{' + n + '}' for n in NAMES)}"
            )
        if conversion is not None:
            return f"template {text!r}: {{{name}!{conversion}}}: conversions are not supported"
        m = _SPEC.fullmatch(spec or "")
        if m is None or "{" in (spec or ""):
            return f"template {text!r}: {{{name}:{spec}}}: only a width may follow ':', like {{{name}:05}}"
        if m["width"] and int(m["width"]) > MAX_WIDTH:
            return f"template {text!r}: width {m['width']} is over {MAX_WIDTH}"
    return None


def schedule(scenario: Scenario) -> timedelta:
    """How long publishing takes at the scenario's rates (sends one after another)."""
    return timedelta(seconds=sum(_send_time(s) for s in scenario.send))


def _send_time(send: Send) -> float:
    return (send.count - 1) / send.rate if send.rate else 0.0


def _spell(d: timedelta) -> str:
    days = d.total_seconds() / 86400
    return f"{days / 365.25:.3g} years" if days > 365 else format_duration(d)


def _templates(send: Send) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """(path within the send, text) of every template string of ``send``."""
    yield ("key",), send.key
    for name in ("routing_key", "kafka_key"):
        value = getattr(send, name)
        if value is not None:
            yield (name,), value
    for k, v in send.headers.items():
        yield ("headers", k), v
    yield from _strings(send.payload, ("payload",))


def _strings(value: Any, at: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    if isinstance(value, str):
        yield at, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, (*at, k))
    elif isinstance(value, list):
        for n, v in enumerate(value):
            yield from _strings(v, (*at, n))


def _dotted(path: tuple[str | int, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def messages(scenario: Scenario, topology: Topology, run: str) -> Iterator[Message]:
    """Every message of the scenario, in publishing order, with its correlation key placed."""
    counter = itertools.count()
    for send in scenario.send:
        # A flow that branches is sent through its common steps: any branch's will do.
        flow = topology.flows[branches_of(topology, send.flow)[0]]
        channel = send.channel or flow.steps[0].channel
        rule = (flow.steps[0].correlate if send.channel is None else None) or flow.correlate
        for n in range(send.count):
            values = {"n": n, "i": next(counter), "run": run, "flow": send.flow}
            key = _fill(send.key, values)
            values["key"] = key
            payload = _fill(copy.deepcopy(send.payload), values)
            headers = {k: _fill(v, values) for k, v in send.headers.items()}
            kafka_key = _fill(send.kafka_key, values) if send.kafka_key else None
            if rule.json_path is not None and isinstance(payload, dict):
                _put(payload, rule.json_path, key)
            elif rule.header is not None:
                headers[rule.header] = key
            elif rule.kafka_key:
                kafka_key = key
            body = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            if len(body) > MAX_BODY:
                raise UsageError(
                    f"scenario send of flow {send.flow!r}: message {n} is {len(body)} bytes, "
                    f"over the {MAX_BODY} a scenario message may have"
                )
            yield Message(
                flow=send.flow,
                channel=channel,
                key=key,
                body=body,
                headers=headers,
                routing_key=_fill(send.routing_key, values) if send.routing_key else None,
                kafka_key=kafka_key,
                delay=(1 / send.rate) if send.rate and n else 0.0,
            )


def _fill(value: Any, values: dict[str, Any]) -> Any:
    if isinstance(value, str):
        problem = template_problem(value)  # scenarios built in code skip load()
        if problem is not None:
            raise UsageError(f"scenario {problem}")
        try:
            return value.format(**values)
        except (KeyError, IndexError, ValueError) as exc:  # "{key:05d}": a width for numbers
            raise UsageError(f"scenario template {value!r}: {exc}") from None
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    return value


def _put(doc: dict[str, Any], path: str, value: str) -> None:
    """Set ``path`` (names only) in ``doc`` unless it is already set."""
    segs = path_segments(path)
    node: Any = doc
    for seg in segs[:-1]:
        if not isinstance(seg, str) or not isinstance(node, dict):
            return
        node = node.setdefault(seg, {})
    last = segs[-1]
    if isinstance(node, dict) and isinstance(last, str):
        node.setdefault(last, value)

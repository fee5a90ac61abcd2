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
``{run}`` an id unique to this run. The correlation key is
also put where the flow's rule looks for it (payload path, header, Kafka key),
so a payload need not mention it.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field

from flowcheck.errors import TopologyError, UsageError
from flowcheck.topology import _yaml
from flowcheck.topology._errors import report
from flowcheck.topology._types import Duration, path_segments
from flowcheck.topology.model import Model, Topology


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
    doc = _yaml.read(path, what="scenario")
    scenario = None
    if doc.data is not None:
        try:
            scenario = Scenario.model_validate(doc.data)
        except Exception as exc:  # pydantic's ValidationError: located like topology errors
            errors = getattr(exc, "errors", None)
            if errors is None:
                raise
            report(doc, Scenario, (), errors())
    if scenario is not None:
        for i, send in enumerate(scenario.send):
            if send.flow not in topology.flows:
                doc.problem(
                    ("send", i, "flow"), f"send[{i}].flow: the topology has no flow {send.flow!r}"
                )
            elif send.channel is not None and send.channel not in topology.channels:
                doc.problem(
                    ("send", i, "channel"),
                    f"send[{i}].channel: the topology has no channel {send.channel!r}",
                )
            elif topology.flows[send.flow].correlate.property is not None:
                doc.problem(
                    ("send", i, "flow"),
                    f"send[{i}]: scenarios cannot set AMQP properties yet; correlate by header or payload",
                )
    if doc.problems or scenario is None:
        raise TopologyError(sorted(doc.problems, key=lambda p: (p.line, p.column)))
    return scenario


def messages(scenario: Scenario, topology: Topology, run: str) -> Iterator[Message]:
    """Every message of the scenario, in publishing order, with its correlation key placed."""
    counter = itertools.count()
    for send in scenario.send:
        flow = topology.flows[send.flow]
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
        try:
            return value.format(**values)
        except (KeyError, IndexError, ValueError) as exc:
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

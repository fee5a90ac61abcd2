"""Topologies made from topologies: one test's own names, other broker addresses, the
channels a few flows need."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import SecretStr

from flowcheck.topology.model import (
    Exchange,
    Flow,
    Kafka,
    RabbitMQ,
    Redis,
    Step,
    Stream,
    Topology,
)
from flowcheck.topology.routing import carriers

__all__ = ["branched", "branches_of", "flow_channels", "isolated", "with_brokers"]

# What a branch may hold differently from its flow.
_OVERRIDES = ("deadline", "delivery", "latency", "retry", "dead_letters")


def branched(topology: Topology) -> Topology:
    """``topology`` with each flow that declares branches made into one flow per branch,
    named ``flow/branch``: the flow's common steps, then the branch's, under the flow's
    expectations as the branch overrides them. Each is judged as a flow of its own; its
    ``branch_of`` names the flow it came from. A topology without branches is returned
    as it is."""
    if not any(flow.branches for flow in topology.flows.values()):
        return topology
    flows: dict[str, Flow] = {}
    for name, flow in topology.flows.items():
        if not flow.branches:
            flows[name] = flow
            continue
        for label, branch in flow.branches.items():
            update: dict[str, Any] = {"steps": [*flow.steps, *branch.steps], "branches": {}}
            for key in _OVERRIDES:
                if key in branch.model_fields_set:
                    update[key] = getattr(branch, key)
            if branch.description is not None:
                update["description"] = branch.description
            made = flow.model_copy(update=update)
            made._branch_of = name
            flows[f"{name}/{label}"] = made
    return topology.model_copy(update={"flows": flows})


def isolated(topology: Topology, prefix: str) -> Topology:
    """``topology`` with ``prefix`` in front of every broker-side name and consumer group.

    Channel keys (what flows, reports and this API use) stay as they are; only
    the ``name`` each channel has on its broker changes. RabbitMQ's own
    ``amq.*`` exchanges keep their names. Stream groups and the groups of the
    services' ``consumes`` get the prefix too.
    """
    if not prefix:
        return topology
    channels: dict[str, Any] = {}
    for key, ch in topology.channels.items():
        name = ch.name or key
        update: dict[str, Any] = {}
        if not (isinstance(ch, Exchange) and name.startswith("amq.")):
            update["name"] = prefix + name
        if isinstance(ch, Stream) and ch.groups:
            update["groups"] = [prefix + g for g in ch.groups]
        channels[key] = ch.model_copy(update=update)
    services = {
        key: svc.model_copy(
            update={
                "consumes": [
                    c.model_copy(update={"group": prefix + c.group}) if c.group else c
                    for c in svc.consumes
                ]
            }
        )
        for key, svc in topology.services.items()
    }
    flows = {key: _grouped(flow, prefix) for key, flow in topology.flows.items()}
    return topology.model_copy(update={"channels": channels, "services": services, "flows": flows})


def _grouped(flow: Flow, prefix: str) -> Flow:
    """``flow`` with ``prefix`` in front of the consumer group its steps name."""

    def steps(of: list[Step]) -> list[Step]:
        return [s.model_copy(update={"group": prefix + s.group}) if s.group else s for s in of]

    if not any(s.group for s in flow.steps) and not flow.branches:
        return flow
    branches = {k: b.model_copy(update={"steps": steps(b.steps)}) for k, b in flow.branches.items()}
    return flow.model_copy(update={"steps": steps(flow.steps), "branches": branches})


def with_brokers(
    topology: Topology,
    *,
    rabbitmq_url: str | None = None,
    kafka_bootstrap: str | None = None,
    redis_url: str | None = None,
) -> Topology:
    """``topology`` with every broker of a kind pointed at the given address (None: as is)."""
    brokers: dict[str, Any] = {}
    for name, b in topology.brokers.items():
        if isinstance(b, RabbitMQ) and rabbitmq_url:
            b = b.model_copy(update={"url": SecretStr(rabbitmq_url)})
        elif isinstance(b, Kafka) and kafka_bootstrap:
            parts = [p.strip() for p in kafka_bootstrap.split(",") if p.strip()]
            b = b.model_copy(update={"bootstrap": parts})
        elif isinstance(b, Redis) and redis_url:
            b = b.model_copy(update={"url": SecretStr(redis_url)})
        brokers[name] = b
    return topology.model_copy(update={"brokers": brokers})


def branches_of(topology: Topology, flow: str) -> list[str]:
    """The flows ``flow`` is judged as: itself, or, for a flow that branches, its branches
    (flow/branch); empty if the topology has no such flow."""
    if flow in topology.flows:
        return [flow]
    return [name for name, f in topology.flows.items() if f.branch_of == flow]


def flow_channels(topology: Topology, flows: Iterable[str]) -> set[str]:
    """Every channel the taps must watch to follow ``flows``: steps, retries, dead letters."""
    wanted = set(flows)
    out: set[str] = set()
    for name, flow in branched(topology).flows.items():
        if name in wanted or flow.branch_of in wanted:
            out.update(c for step in flow.steps for c in carriers(topology, step.channel))
            out.update(r.channel for r in flow.dead_letters)
    return out

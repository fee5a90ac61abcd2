"""What the Kafka adapter asks of the cluster, from the topology alone: no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flowcheck.brokers.base import Drift
from flowcheck.topology.model import Topic, Topology


def consumer_groups(topology: Topology, channels: Sequence[str]) -> dict[str, list[str]]:
    """Consumer groups the topology's services use, or its flows' steps name, per tapped
    channel."""
    out: dict[str, list[str]] = {}
    named = [(c.channel, c.group) for svc in topology.services.values() for c in svc.consumes]
    named += [(s.channel, s.group) for f in topology.flows.values() for s in f.steps]
    for channel, group in named:
        if channel in channels and group and group not in out.setdefault(channel, []):
            out[channel].append(group)
    return out


def topic_drift(key: str, t: Topic, partitions: int, replication: int) -> list[Drift]:
    """How a topic with ``partitions`` and ``replication`` on the cluster differs from ``t``."""
    drift = []
    if partitions != t.partitions:
        drift.append(Drift(key, "partitions", t.partitions, partitions))
    # Unset, the topology leaves the factor to the broker: nothing to differ.
    if t.replication is not None and replication != t.replication:
        drift.append(Drift(key, "replication", t.replication, replication))
    return drift


def shapes(described: Sequence[Any]) -> dict[str, tuple[int, int]]:
    """(partitions, replication factor) of each topic a DescribeTopics answer describes
    without error."""
    return {
        d["topic"]: (
            len(d["partitions"]),
            max((len(p.get("replicas") or ()) for p in d["partitions"]), default=0),
        )
        for d in described
        if not d.get("error_code")
    }

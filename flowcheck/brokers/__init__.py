"""Broker adapters, one module per broker, loaded only when used."""

from __future__ import annotations

import importlib

from flowcheck.brokers.base import Adapter, Drift, Sink
from flowcheck.correlate import Correlator
from flowcheck.topology.model import Topology

_MODULES = {
    "rabbitmq": "flowcheck.brokers.rabbitmq",
    "kafka": "flowcheck.brokers.kafka",
    "redis": "flowcheck.brokers.redis",
}


def adapter(name: str, topology: Topology, correlator: Correlator | None = None) -> Adapter:
    """The adapter for broker ``name`` of ``topology`` (not yet connected)."""
    kind = topology.brokers[name].kind
    module = importlib.import_module(_MODULES[kind])
    cls: type[Adapter] = module.ADAPTER
    return cls(name, topology, correlator)


__all__ = ["Adapter", "Drift", "Sink", "adapter"]

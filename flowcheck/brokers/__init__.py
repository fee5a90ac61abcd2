"""Broker adapters, one package per broker, loaded only when used.

Each broker has the same inner shape:

- ``<broker>/__init__.py``: the adapter, the only code here that talks to the
  broker (connect, apply, publish, tap, delete);
- ``<broker>/_plan.py``: what to declare and bind, from the topology alone;
- ``<broker>/_parse.py``: how the broker's messages and answers read (a message
  becomes the fields of an observation, a refusal becomes drift);

both pure, tested without a broker. :mod:`flowcheck.brokers.base` holds what
they share: the interface, observations, outages and the tap's reconnect loop.
Patches to a client library are installed when a broker is first used, never
at import.
"""

from __future__ import annotations

import importlib

from flowcheck.brokers.base import Adapter, Drift, Sink
from flowcheck.correlate import Correlator
from flowcheck.topology.model import Topology


def adapter(name: str, topology: Topology, correlator: Correlator | None = None) -> Adapter:
    """The adapter for broker ``name`` of ``topology`` (not yet connected): the ``ADAPTER``
    of the package named by the broker's kind, so a new broker needs no entry here."""
    kind = topology.brokers[name].kind
    module = importlib.import_module(f"{__name__}.{kind}")
    cls: type[Adapter] = module.ADAPTER
    return cls(name, topology, correlator)


__all__ = ["Adapter", "Drift", "Sink", "adapter"]

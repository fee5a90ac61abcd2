"""flowcheck: verify that events really flow through RabbitMQ, Kafka and Redis Streams."""

from flowcheck.errors import (
    BrokerAuthError,
    BrokerError,
    BrokerUnreachable,
    FlowcheckError,
    MissingDependency,
    Problem,
    TopologyError,
    UsageError,
)
from flowcheck.topology import Topology, check_file, load, loads

__version__ = "0.1.0"

__all__ = [
    "BrokerAuthError",
    "BrokerError",
    "BrokerUnreachable",
    "FlowcheckError",
    "MissingDependency",
    "Problem",
    "Topology",
    "TopologyError",
    "UsageError",
    "__version__",
    "check_file",
    "load",
    "loads",
]

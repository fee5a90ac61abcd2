"""The topology language: models, loading and validation.

Besides the models, the language's value types are public here (durations,
ratios, JSON paths): the checker, the assertions and the CLI read them too.
:mod:`flowcheck.topology.document` reads other YAML files (scenarios) the way
a topology is read.
"""

from flowcheck.topology._load import check_file, load, loads
from flowcheck.topology._types import (
    Duration,
    format_duration,
    parse_duration,
    parse_ratio,
    path_segments,
    path_value,
)
from flowcheck.topology.model import (
    Backoff,
    Binding,
    Broker,
    Channel,
    Consume,
    Correlate,
    DeadLetterRoute,
    DeadLetterRule,
    Exchange,
    Flow,
    Kafka,
    KafkaSecurity,
    Latency,
    Match,
    Queue,
    RabbitMQ,
    Redis,
    RetryPolicy,
    Schema,
    Service,
    Step,
    Stream,
    Topic,
    Topology,
)

__all__ = [
    "Backoff",
    "Binding",
    "Broker",
    "Channel",
    "Consume",
    "Correlate",
    "DeadLetterRoute",
    "DeadLetterRule",
    "Duration",
    "Exchange",
    "Flow",
    "Kafka",
    "KafkaSecurity",
    "Latency",
    "Match",
    "Queue",
    "RabbitMQ",
    "Redis",
    "RetryPolicy",
    "Schema",
    "Service",
    "Step",
    "Stream",
    "Topic",
    "Topology",
    "check_file",
    "format_duration",
    "load",
    "loads",
    "parse_duration",
    "parse_ratio",
    "path_segments",
    "path_value",
]

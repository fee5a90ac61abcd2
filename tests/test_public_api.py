"""Each package's public names, pinned: adding or removing one is a decision, made here too.

Code outside a package imports only these (tests/test_layers.py keeps private
modules private); every name listed must exist.
"""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "flowcheck": [
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
    ],
    "flowcheck.topology": [
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
        "GiveUpRule",
        "Kafka",
        "KafkaSecurity",
        "Latency",
        "Locator",
        "Match",
        "Queue",
        "RabbitMQ",
        "Redis",
        "RetryCounter",
        "RetryPolicy",
        "Schema",
        "SeqOrdering",
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
    ],
    "flowcheck.topology.document": ["Document", "read", "report"],
    "flowcheck.checker": [
        "CHAIN_KINDS",
        "CHECKS",
        "Cause",
        "Check",
        "Checker",
        "Decided",
        "Finding",
        "FindingKind",
        "FlowVerdict",
        "Histogram",
        "Latency",
        "Passed",
        "OpenChains",
        "OverTime",
        "Percentiles",
        "Recording",
        "RouteCount",
        "Seen",
        "Unjudged",
        "Verdict",
        "check",
        "window",
    ],
    "flowcheck.reporting": [
        "FORMATS",
        "html",
        "json",
        "junit",
        "markdown",
        "ms",
        "outcomes",
        "plural",
        "unjudged_text",
        "write_reports",
    ],
    "flowcheck.brokers": ["Adapter", "Drift", "Sink", "adapter"],
    "flowcheck.testing": [
        "DEFAULT_DEADLINE",
        "SETTLE_MARGIN",
        "TIMELINE_HEAD",
        "TIMELINE_TAIL",
        "Chain",
        "FlowAssertionError",
        "FlowSession",
        "Flowcheck",
        "HopLatency",
        "Took",
        "Within",
        "flow_channels",
        "isolated",
        "late_copy_breaks",
        "seconds",
        "settle_time",
        "unique_prefix",
        "with_brokers",
    ],
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_public_names_are_pinned(package: str) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(PUBLIC[package])
    assert len(set(module.__all__)) == len(module.__all__)


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_every_public_name_exists(package: str) -> None:
    module = importlib.import_module(package)
    assert [name for name in module.__all__ if not hasattr(module, name)] == []


def test_the_two_checkers_are_told_apart() -> None:
    # The topology's validator is not the checker that judges observations.
    validation = importlib.import_module("flowcheck.topology._check")
    assert hasattr(validation, "Validator")
    assert not hasattr(validation, "Checker")

"""The pieces of flowcheck.testing and the plugin that need no broker."""

from __future__ import annotations

from datetime import timedelta

import pytest

import flowcheck
from flowcheck import pytest_plugin, testing
from flowcheck.testing import FlowAssertionError, HopLatency, Took

from . import project

SHOP_LIKE = """
brokers:
  rabbit: {kind: rabbitmq}
  kafka: {kind: kafka}
  redis: {kind: redis}
channels:
  orders: {broker: rabbit, kind: exchange, type: topic}
  fanout: {broker: rabbit, kind: exchange, type: fanout, name: amq.fanout}
  billing: {broker: rabbit, kind: queue, bindings: [{exchange: orders, key: a}], name: bills}
  payments: {broker: kafka, kind: topic}
  shipments: {broker: redis, kind: stream, groups: [shipping]}
services:
  payer: {consumes: [{channel: payments, group: payer}]}
"""


def test_took_compares_with_durations_numbers_and_timedeltas() -> None:
    took = Took.of_ms(312.5)
    assert took < "400ms"
    assert took > "300ms"
    assert took <= 0.3125
    assert took >= timedelta(milliseconds=312)
    assert took == "312.5ms"
    assert not took < "1us"
    assert repr(took) == "312.5ms"
    assert took.ms == 312.5
    with pytest.raises(ValueError, match="a duration needs a unit"):
        assert took < "5"


def test_hop_latency_explains_missing_samples() -> None:
    empty = HopLatency(flow="f", hop="a -> b", count=0, values={"p99": None})
    with pytest.raises(FlowAssertionError, match="no chain has completed that hop"):
        assert empty.p99 < "1s"
    same_instant = HopLatency(flow="f", hop="a -> b", count=0, values={"p99": None}, left_out=2)
    with pytest.raises(FlowAssertionError, match="its 2 sample"):
        assert same_instant.p99 < "1s"
    full = HopLatency(flow="f", hop="end-to-end", count=3, values={"p99": Took.of_ms(5)})
    assert full.p99 < "6ms"
    assert repr(full) == "<latency of f end-to-end: 3 sample(s)>"


def test_isolated_prefixes_every_broker_side_name_and_group() -> None:
    topology = flowcheck.loads(SHOP_LIKE)
    iso = testing.isolated(topology, "t-1.")
    assert {k: iso.channel_name(k) for k in iso.channels} == {
        "orders": "t-1.orders",
        "fanout": "amq.fanout",  # RabbitMQ's own exchanges keep their names
        "billing": "t-1.bills",
        "payments": "t-1.payments",
        "shipments": "t-1.shipments",
    }
    shipments = iso.channels["shipments"]
    assert isinstance(shipments, flowcheck.topology.Stream)
    assert shipments.groups == ["t-1.shipping"]
    assert iso.services["payer"].consumes[0].group == "t-1.payer"
    assert testing.isolated(topology, "") is topology
    assert topology.channel_name("orders") == "orders"  # the original is untouched


def test_with_brokers_replaces_addresses_by_kind() -> None:
    topology = flowcheck.loads(SHOP_LIKE)
    moved = testing.with_brokers(
        topology, rabbitmq_url="amqp://x/", kafka_bootstrap="k1:9092, k2:9092"
    )
    rabbit, kafka, redis = (moved.brokers[b] for b in ("rabbit", "kafka", "redis"))
    assert isinstance(rabbit, flowcheck.topology.RabbitMQ)
    assert rabbit.url.get_secret_value() == "amqp://x/"
    assert isinstance(kafka, flowcheck.topology.Kafka)
    assert kafka.bootstrap == ["k1:9092", "k2:9092"]
    assert redis == topology.brokers["redis"]


def test_unique_prefix_is_a_valid_name_everywhere() -> None:
    a = testing.unique_prefix("test_x[param-Ünïcode/1]", "gw3")
    b = testing.unique_prefix("test_x[param-Ünïcode/1]", "gw3")
    assert a != b
    assert a.startswith("test-x-param-n-code-1-gw3-")
    assert a.endswith(".")
    assert all(c.isalnum() or c in "-." for c in a)
    assert testing.unique_prefix("[]").startswith("test-")


def test_seconds() -> None:
    assert testing.seconds("250ms") == 0.25
    assert testing.seconds(2) == 2.0
    assert testing.seconds(timedelta(minutes=1)) == 60.0
    with pytest.raises(ValueError, match="cannot be negative"):
        testing.seconds(-1)
    with pytest.raises(TypeError):
        testing.seconds(True)


def test_flow_channels_follow_retries_and_dead_letters() -> None:
    topology = flowcheck.loads(project.TOPOLOGY)
    assert testing.flow_channels(topology, ["job-done"]) == {"jobs", "jobs.dead"}
    assert testing.flow_channels(topology, ["order-billed"]) == {"orders", "billing"}


def test_unknown_flows_are_refused_at_once() -> None:
    topology = flowcheck.loads(project.TOPOLOGY)
    with pytest.raises(flowcheck.FlowcheckError, match="unknown flow"):
        testing.Flowcheck(topology, flows=["order-biled"])


def test_the_plugin_default_deadline_is_the_library_one() -> None:
    assert pytest_plugin.DEFAULT_DEADLINE == testing.DEFAULT_DEADLINE


def test_summary_lines() -> None:
    results = [
        (
            "t.py::a",
            {
                "topology": "shop",
                "failed": True,
                "assertions": [["completes", "f", False], ["check", "g", True]],
                "chains": {"f": 2, "g": 1},
                "findings": {"lost": 1},
                "failures": ["f 'k' did not complete within 1s"],
                "trace": "/tmp/t.jsonl",
            },
        ),
        ("t.py::b", {"problem": "flowcheck: rabbit: down\nmore", "failed": True}),
        ("t.py::c", {"problem": "flowcheck: rabbit: down\nmore", "failed": False}),
    ]
    assert pytest_plugin.summary_lines(results) == [
        "1 test(s) used flowcheck (topology shop): 0 passed, 1 failed; 2 assertion(s) on 2 flow(s)",
        "  f  1 assertion(s), 1 failed, 2 chain(s) seen",
        "  g  1 assertion(s), 0 failed, 1 chain(s) seen",
        "findings: lost 1",
        "  FAILED t.py::a: f 'k' did not complete within 1s",
        "traces of failed tests (flowcheck inspect FILE):",
        "  t.py::a  /tmp/t.jsonl",
        "setup problems:",
        "  flowcheck: rabbit: down (1 error(s), 1 test(s) skipped)",
    ]

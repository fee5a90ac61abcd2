"""The pieces of flowcheck.testing and the plugin that need no broker."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import flowcheck
from flowcheck import pytest_plugin, testing
from flowcheck.checker import Checker, FlowVerdict, Unjudged, Verdict
from flowcheck.correlate import Correlator
from flowcheck.observations import Kind, Observation, now
from flowcheck.testing import FlowAssertionError, HopLatency, Took

from . import project

ROOT = Path(__file__).resolve().parents[2]

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
    assert (took != "312.5ms") is False
    assert took != "312ms"
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
    assert testing.seconds("0s") == testing.seconds("0") == 0.0  # a settle time of none
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


def test_flow_channels_are_the_channels_the_correlator_keys() -> None:
    # What the taps watch for a flow and what the correlator gives a key for are one set.
    for topology in (
        flowcheck.loads(project.TOPOLOGY),
        flowcheck.load(str(ROOT / "topologies" / "shop.yaml")),
    ):
        for flow in topology.flows:
            assert testing.flow_channels(topology, [flow]) == {
                ch for ch, entries in Correlator(topology).rules.items() if flow in dict(entries)
            }


def test_the_public_names_of_flowcheck_testing() -> None:
    # Users import these from flowcheck.testing; a name that goes away breaks their tests.
    assert sorted(testing.__all__) == [
        "Chain",
        "DEFAULT_DEADLINE",
        "FlowAssertionError",
        "FlowSession",
        "Flowcheck",
        "HopLatency",
        "SETTLE_MARGIN",
        "TIMELINE_HEAD",
        "TIMELINE_TAIL",
        "Took",
        "Within",
        "flow_channels",
        "isolated",
        "late_copy_breaks",
        "seconds",
        "settle_time",
        "unique_prefix",
        "with_brokers",
    ]
    assert all(hasattr(testing, name) for name in testing.__all__)
    assert testing.Flowcheck is testing.FlowSession
    assert testing.FlowAssertionError.__module__ == "flowcheck.testing"


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
                "unjudged": 2,
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
        "expectations that could not be judged: 2",
        "  FAILED t.py::a: f 'k' did not complete within 1s",
        "traces of failed tests (flowcheck inspect FILE):",
        "  t.py::a  /tmp/t.jsonl",
        "setup problems:",
        "  flowcheck: rabbit: down (1 error(s), 1 test(s) skipped)",
    ]


RETRIES = Unjudged(
    flow="job-done",
    expectation="retry max_attempts 3 at 'jobs'",
    why="a tap gap hid the deliveries",
    chains=2,
)
NO_END = Unjudged(expectation="the recording's end", why="no end record")


def judged(*, allowed: bool, flow_passed: bool) -> Verdict:
    """A verdict as the checker gives it when ``job-done`` had an expectation it could not
    judge, and so had the recording as a whole."""
    flow = FlowVerdict(
        flow="job-done",
        passed=flow_passed,
        chains=2,
        succeeded=2,
        failed=0,
        unknown=0,
        dead_lettered=0,
        checks=[],
        latency=[],
        findings=[],
        unjudged=[RETRIES],
    )
    return Verdict(
        passed=allowed,
        observations=4,
        flows=[flow],
        unjudged=[NO_END],
        allow_unjudged=allowed,
    )


async def test_check_says_what_could_not_be_judged(monkeypatch: pytest.MonkeyPatch) -> None:
    fc = testing.Flowcheck(flowcheck.loads(project.TOPOLOGY), flows=["job-done"])
    fc._checker = Checker(fc.topology, start_ns=0)  # a session with nothing seen yet
    verdict = judged(allowed=False, flow_passed=False)
    monkeypatch.setattr(fc, "_judge", lambda items, **kw: verdict)
    with pytest.raises(FlowAssertionError) as caught:
        await fc.check("job-done", within=0)
    lines = str(caught.value).splitlines()
    assert lines[0] == (
        "flow check failed: job-done (2 chain(s), 2 succeeded, 0 failed, 1 unjudged)"
    )
    assert "not judged: the recording's end: no end record" in lines
    assert "job-done: 2 chain(s), 2 succeeded, 0 failed, 1 unjudged" in lines
    assert (
        "  not judged: retry max_attempts 3 at 'jobs': a tap gap hid the deliveries (2 chains)"
    ) in lines
    assert caught.value.unjudged == [NO_END, RETRIES]
    # Only the recording's own expectation was left unjudged: that fails the check too.
    verdict = judged(allowed=False, flow_passed=True)
    with pytest.raises(FlowAssertionError, match=r"1 expectation\(s\) could not be judged"):
        await fc.check("job-done", within=0)
    # Allowed: the check passes.
    verdict = judged(allowed=True, flow_passed=True)
    assert await fc.check("job-done", within=0) is verdict


def test_chain_attempts_are_the_checkers_count() -> None:
    fc = testing.FlowSession(flowcheck.loads(project.TOPOLOGY), flows=["job-done"])

    def seen(kind: Kind, channel: str, at_ms: int, **kw: Any) -> Observation:
        kw = {"keys": {"job-done": "j1"}, **kw}
        return Observation(
            kind=kind, broker="redis", channel=channel, mono_ns=at_ms * 10**6, wall=0, **kw
        )

    fc._observe(seen(Kind.ROUTED, "jobs", 1, entry_id="1-0"))
    fc._observe(seen(Kind.DELIVERED, "jobs", 2, entry_id="1-0", delivery_count=1))
    fc._observe(seen(Kind.REDELIVERED, "jobs", 3, entry_id="1-0", delivery_count=2))
    dead = seen(Kind.DEAD_LETTERED, "jobs.dead", 4, entry_id="2-0", delivery_count=3, origin="jobs")
    fc._observe(dead)
    checker = Checker(fc.topology, start_ns=0)
    for obs in fc.observations:
        checker.feed(obs)
    chain = fc.chain("job-done", "j1")
    assert chain.attempts() == chain.attempts(dead) == checker.attempts("job-done", "j1") == 3
    # A tap was not watching while the chain was open: deliveries may have gone unseen.
    gap = {"until_ns": 3 * 10**6, "reason": "reconnecting", "keys": {}}
    fc._observe(seen(Kind.GAP, "jobs", 2, **gap))
    assert chain.attempts(dead) is None


def test_the_session_tells_the_checker_whether_unjudged_is_allowed() -> None:
    topology = flowcheck.loads(project.TOPOLOGY)
    assert testing.Flowcheck(topology, allow_unjudged=True)._judge([], settle=True).allow_unjudged
    assert not testing.Flowcheck(topology)._judge([], settle=True).allow_unjudged


async def test_a_starved_settle_wait_makes_up_for_it() -> None:
    """A busy machine starves the event loop, and the taps in it: a settle wait that ends
    long past its time waits again, so a copy the taps read late is still seen."""
    fc = testing.Flowcheck(flowcheck.loads(project.TOPOLOGY))
    fc._checker = Checker(fc.topology, start_ns=0)
    copy = Observation(kind=Kind.ROUTED, broker="rabbit", channel="billing", mono_ns=1, wall=0)

    async def busy_then_read() -> None:
        time.sleep(0.1)  # noqa: ASYNC251 - the loop starved: nothing else runs meanwhile
        for _ in range(3):  # a tap takes a few turns of the loop to read what came
            await asyncio.sleep(0)
        fc._observe(copy)

    task = asyncio.get_running_loop().create_task(busy_then_read())
    until = now()[0] + 20_000_000
    assert await fc._settle(until, lambda: bool(fc.observations))
    await task

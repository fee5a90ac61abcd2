"""Late copies: ``completes()`` and ``check()`` keep watching for a flow's settle time after
a chain's end, so a duplicate that taps see after the chain completed still fails them.

The inner project runs a real consumer on RabbitMQ that writes every receipt once (clean)
or twice, 2 ms apart (the defect), to a RabbitMQ exchange and to a Redis stream.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

import flowcheck
from flowcheck.testing import SETTLE_MARGIN, Flowcheck, late_copy_breaks, settle_time

TOPOLOGY = """\
version: 1
name: receipts
brokers:
  rabbit: {kind: rabbitmq}
  redis: {kind: redis, tap_read_interval: 20ms}
channels:
  orders: {broker: rabbit, kind: exchange, type: topic}
  billing:
    broker: rabbit
    kind: queue
    bindings: [{exchange: orders, key: order.placed}]
  receipts: {broker: rabbit, kind: exchange, type: fanout}
  receipts.mail:
    broker: rabbit
    kind: queue
    bindings: [{exchange: receipts, key: ""}]
  ledger: {broker: redis, kind: stream}
flows:
  order-receipted:
    correlate: $.order_id
    steps: [orders, billing, receipts]
    deadline: 3s
  order-ledgered:
    correlate: $.order_id
    steps: [orders, billing, ledger]
    deadline: 3s
"""

# The consumer under test: for every order, a receipt on the exchange and a ledger entry;
# ``copies`` times, 2 ms apart (twice is the defect: a send done again).
CONFTEST = """\
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import aio_pika
import pytest
from redis.asyncio import Redis

from flowcheck.testing import Flowcheck


async def run_service(fc: Flowcheck, copies: int) -> None:
    connection = await aio_pika.connect(fc.address("rabbit"))
    redis = Redis.from_url(fc.address("redis"))
    try:
        channel = await connection.channel()
        receipts = await channel.get_exchange(fc.name("receipts"), ensure=False)

        async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            order = json.loads(message.body)
            body = json.dumps({"order_id": order["order_id"]})
            for n in range(copies):
                if n:
                    await asyncio.sleep(0.002)
                await receipts.publish(aio_pika.Message(body.encode()), routing_key="")
                await redis.xadd(fc.name("ledger"), {"payload": body})
            await message.ack()

        queue = await channel.get_queue(fc.name("billing"), ensure=False)
        await queue.consume(handle)
        await asyncio.Future()
    finally:
        await connection.close()
        await redis.aclose()


@pytest.fixture
async def service(flowcheck: Flowcheck, request: pytest.FixtureRequest) -> AsyncIterator[None]:
    task = asyncio.create_task(run_service(flowcheck, copies=request.param))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
"""

TESTS = """\
import anyio
import pytest

from flowcheck.testing import Flowcheck

FLOWS = ["order-receipted", "order-ledgered"]
twice = pytest.mark.parametrize("service", [2], indirect=True)
once = pytest.mark.parametrize("service", [1], indirect=True)


async def place(fc: Flowcheck, key: str) -> None:
    await fc.publish("orders", {"order_id": key}, routing_key="order.placed")


@twice
@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("n", range(3))
async def test_completes(flowcheck: Flowcheck, service: None, flow: str, n: int) -> None:
    key = flowcheck.key("order")
    await place(flowcheck, key)
    await flowcheck.chain(flow, key).completes()


@twice
@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("n", range(3))
async def test_check(flowcheck: Flowcheck, service: None, flow: str, n: int) -> None:
    await place(flowcheck, flowcheck.key("order"))
    await flowcheck.check(flow)


@once
@pytest.mark.parametrize("flow", FLOWS)
async def test_clean(flowcheck: Flowcheck, service: None, flow: str) -> None:
    keys = [flowcheck.key("order") for _ in range(3)]
    with anyio.fail_after(8):  # the settle waits end: a few ms past each chain's end
        for key in keys:
            await place(flowcheck, key)
        for key in keys:
            await flowcheck.chain(flow, key).completes()
        await flowcheck.check(flow)
"""


def test_a_late_duplicate_fails_completes_and_check(
    pytester: pytest.Pytester, broker_flags: list[str]
) -> None:
    pytester.makefile(".yaml", receipts=TOPOLOGY)
    pytester.makeconftest(CONFTEST)
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "flowcheck_topology = receipts.yaml\nflowcheck_isolate = true\nflowcheck_deadline = 5s\n"
    )
    pytester.makepyfile(test_receipts=TESTS)
    result = pytester.runpytest(*broker_flags, "-p", "no:cacheprovider")
    result.assert_outcomes(failed=12, passed=2)
    # Every failure is the duplicate, at the step the consumer wrote twice; nothing else.
    result.stdout.fnmatch_lines(["findings: duplicated 12"])
    out = result.stdout.str()
    for flow, step in (("order-receipted", "receipts"), ("order-ledgered", "ledger")):
        for n in range(3):
            assert f"FAILED test_receipts.py::test_completes[{n}-{flow}-2]" in out
            assert f"FAILED test_receipts.py::test_check[{n}-{flow}-2]" in out
        assert out.count(f"duplicated: 2 messages at {step!r}, expected 1 (exactly-once)") >= 6
    assert "lost" not in out.split("= flowcheck =")[-1]


def test_settle_time_comes_from_the_taps_lateness() -> None:
    topology = flowcheck.loads(TOPOLOGY)
    # The Redis stream's tap reads every 20ms; RabbitMQ's pushes every 10ms at most.
    assert settle_time(topology, "order-ledgered") == timedelta(milliseconds=20) + SETTLE_MARGIN
    assert settle_time(topology, "order-receipted") == timedelta(milliseconds=10) + SETTLE_MARGIN
    kafka = topology.model_copy(
        update={
            "brokers": {
                **topology.brokers,
                "redis": flowcheck.topology.Kafka(kind="kafka", tap_fetch_wait="150ms"),
            }
        }
    )
    assert settle_time(kafka, "order-ledgered") == timedelta(milliseconds=150) + SETTLE_MARGIN


def relaxed(extra: str = "") -> flowcheck.Topology:
    """The topology with order-receipted at-least-once, plus ``extra`` lines of that flow."""
    lines = "    delivery: at-least-once\n" + "".join(
        f"    {line}\n" for line in extra.split(";") if line
    )
    return flowcheck.loads(TOPOLOGY.replace("    deadline: 3s\n", "    deadline: 3s\n" + lines, 1))


def test_only_flows_a_late_copy_can_break_wait() -> None:
    assert not late_copy_breaks(relaxed().flows["order-receipted"])
    assert settle_time(relaxed(), "order-receipted") == timedelta(0)
    for extra in ("ordering: per-key", "retry: {max_attempts: 2}"):
        assert late_copy_breaks(relaxed(extra).flows["order-receipted"]), extra
    most = flowcheck.loads(
        TOPOLOGY.replace("    deadline: 3s\n", "    deadline: 3s\n    delivery: at-most-once\n", 1)
    )
    assert late_copy_breaks(most.flows["order-receipted"])
    fc = Flowcheck(relaxed(), settle="1s")
    assert fc.settle_for("order-receipted") == 0.0  # nothing to wait for, whatever is given
    assert fc.settle_for("order-ledgered") == 1.0
    assert fc.settle_for("order-ledgered", "250ms") == 0.25
    assert Flowcheck(relaxed()).settle_for("order-ledgered") == 0.07

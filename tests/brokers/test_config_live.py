"""The ``config`` finding on a real RabbitMQ: a quorum queue with a delivery limit and no
dead-letter route drops what its consumer keeps rejecting, and nothing shows where it went.

The same queue with a dead-letter route gives no ``config`` finding: the rejected
message is in the dead-letter queue, a ``dead_letter`` finding about the chain. With
that route and a worker that handles every job, runs under several seeds give no
finding at all. (Without the route, every run has the ``config`` finding: it is about
the topology, whatever the messages do.)
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from flowcheck.checker import Cause, Finding
from flowcheck.testing import FlowAssertionError, Flowcheck

from .conftest import load

WORK_YAML = """
brokers:
  rabbit: {{kind: rabbitmq, url: "${{FC_URL}}"}}
channels:
  jobs: {{broker: rabbit, kind: exchange, type: direct, durable: false}}
  work:
    broker: rabbit
    kind: queue
    type: quorum
    delivery_limit: 1
    bindings: [{{exchange: jobs, key: job}}]{dead_letter}
  results: {{broker: rabbit, kind: exchange, type: fanout, durable: false}}
  done: {{broker: rabbit, kind: queue, durable: false, bindings: [results]}}
  dead: {{broker: rabbit, kind: exchange, type: fanout, durable: false}}
  dlq: {{broker: rabbit, kind: queue, durable: false, bindings: [dead]}}
services:
  worker: {{consumes: [work], publishes: [results]}}
flows:
  jobs:
    correlate: $.order_id
    steps: [jobs, work, results]
    deadline: 1s
"""
DEAD_LETTER = "\n    dead_letter: {exchange: dead}"
KEYS = ["o-1", "o-2"]
WITHIN = 10.0  # seconds for check(): the chains are decided lost at 1 s + grace


@asynccontextmanager
async def rejecting(url: str, queue: str) -> AsyncIterator[Counter[str]]:
    """A worker whose handler always fails: every delivery of ``queue`` is nacked with
    requeue, so the quorum queue counts it towards its delivery limit. Yields the
    deliveries per order id."""
    deliveries: Counter[str] = Counter()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)

        async def refuse(message: AbstractIncomingMessage) -> None:
            deliveries[json.loads(message.body)["order_id"]] += 1
            await message.nack(requeue=True)

        await (await channel.get_queue(queue, ensure=False)).consume(refuse)
        yield deliveries
    finally:
        await connection.close()


async def judged(rabbitmq_url: str, unique: str, dead_letter: str) -> list[Finding]:
    """Publish KEYS through the rejecting worker's queue; the findings of check()."""
    topology = load(WORK_YAML.format(dead_letter=dead_letter), FC_URL=rabbitmq_url)
    async with Flowcheck(topology, prefix=f"{unique}.") as fc:
        work = fc.topology.channels["work"].name
        assert work == f"{unique}.work"
        async with rejecting(rabbitmq_url, work) as deliveries:
            for key in KEYS:
                await fc.publish("jobs", {"order_id": key}, routing_key="job")
            with pytest.raises(FlowAssertionError) as failed:
                await fc.check(within=WITHIN)
    # The broker gave up on each after its delivery limit: the first delivery and one more.
    assert deliveries == dict.fromkeys(KEYS, 2)
    return failed.value.findings


async def test_delivery_limit_without_dead_letter_route_is_a_config_finding(
    rabbitmq_url: str, unique: str
) -> None:
    findings = await judged(rabbitmq_url, unique, "")
    config = [(f.flow, f.key, f.step) for f in findings if f.kind.value == "config"]
    assert config == [("jobs", None, "work")], findings
    # The chains the queue dropped: lost, waiting for 'results', none dead-lettered.
    lost = {
        (f.flow, f.key, f.step, f.next_step, f.cause) for f in findings if f.kind.value == "lost"
    }
    assert lost == {("jobs", key, "results", "results", Cause.TIMED_OUT) for key in KEYS}, findings
    assert {f.kind.value for f in findings} <= {"config", "lost", "threshold"}, findings


async def test_delivery_limit_with_dead_letter_route_is_no_config_finding(
    rabbitmq_url: str, unique: str
) -> None:
    findings = await judged(rabbitmq_url, unique, DEAD_LETTER)
    assert not [f for f in findings if f.kind.value == "config"], findings
    # The rejected messages are in the dead-letter queue: that is what the chains say.
    dead = {f.key for f in findings if f.cause is Cause.DEAD_LETTERED}
    assert dead == set(KEYS), findings


@asynccontextmanager
async def working(url: str, queue: str, results: str) -> AsyncIterator[None]:
    """A worker that handles every delivery of ``queue``: publishes it to ``results``, acks."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        out = await channel.get_exchange(results, ensure=False)

        async def handle(message: AbstractIncomingMessage) -> None:
            async with message.process():
                await out.publish(aio_pika.Message(message.body), routing_key="")

        await (await channel.get_queue(queue, ensure=False)).consume(handle)
        yield
    finally:
        await connection.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_worker_that_handles_every_job_gives_no_finding(
    rabbitmq_url: str, unique: str, seed: int
) -> None:
    rng = random.Random(seed)
    keys = [f"o-{seed}-{n}" for n in range(rng.randint(2, 6))]
    topology = load(WORK_YAML.format(dead_letter=DEAD_LETTER), FC_URL=rabbitmq_url)
    async with Flowcheck(topology, prefix=f"{unique}.") as fc:
        names = fc.topology.channel_name
        async with working(rabbitmq_url, names("work"), names("results")):
            for key in keys:
                await fc.publish("jobs", {"order_id": key}, routing_key="job")
            verdict = await fc.check(within=WITHIN)
    assert [f for fv in verdict.flows for f in fv.findings] == []
    assert [(fv.flow, fv.chains, fv.succeeded) for fv in verdict.flows] == [
        ("jobs", len(keys), len(keys))
    ]
    assert verdict.passed

"""The test session against a real broker, without pytest's plugin in between."""

from __future__ import annotations

import time
from pathlib import Path

import aiokafka
import pytest
from redis.asyncio import Redis

import flowcheck
from flowcheck.observations import Kind
from flowcheck.testing import FlowAssertionError, FlowSession
from flowcheck.trace import Reader

TOPOLOGY = """\
version: 1
name: drifting
brokers:
  redis: {{kind: redis, url: '{url}'}}
channels:
  jobs: {{broker: redis, kind: stream}}
  events: {{broker: redis, kind: stream}}
flows:
  job-done:
    correlate: $.job_id
    steps: [events]
"""


async def test_the_drift_a_session_finds_is_kept_and_recorded(
    redis_url: str, redis: Redis, unique: str, tmp_path: Path
) -> None:
    # A key that is not a stream where the topology declares one: drift, left untouched.
    await redis.hset(f"{unique}.jobs", mapping={"a": "1"})
    topology = flowcheck.loads(TOPOLOGY.format(url=redis_url))
    trace = tmp_path / "t.jsonl"
    # Only events is tapped; every channel of its broker is declared.
    session = FlowSession(topology, prefix=f"{unique}.", flows=["job-done"], trace=trace)
    async with session as fc:
        assert [(d.channel, d.setting, d.have) for d in fc.drift] == [("jobs", "type", "hash")]
    drift = [o for o in Reader(str(trace)) if o.kind is Kind.DRIFT]
    assert [(o.broker, o.channel) for o in drift] == [("redis", "jobs")]
    assert drift[0].reason == str(fc.drift[0])


LOST = """\
version: 1
name: lost
brokers:
  redis: {{kind: redis, url: '{url}'}}
channels:
  jobs: {{broker: redis, kind: stream}}
  events: {{broker: redis, kind: stream}}
flows:
  job-done:
    correlate: $.job_id
    steps: [jobs, events]
    deadline: 200ms
"""


async def test_check_returns_once_a_lost_chain_is_decided(redis_url: str, unique: str) -> None:
    """A chain that never reaches its last step is decided lost when its window (deadline
    and the taps' grace) ends; check() fails then, not after the whole ``within``."""
    topology = flowcheck.loads(LOST.format(url=redis_url))
    within = 40.0
    async with FlowSession(topology, prefix=f"{unique}.") as fc:
        await fc.publish("jobs", {"job_id": "j-1"})
        start = time.monotonic()
        with pytest.raises(FlowAssertionError) as failed:
            await fc.check(within=within)
        took = time.monotonic() - start
    assert "lost" in str(failed.value)
    assert "gave up" not in str(failed.value)
    # The window is 2.2 s; a busy machine may take longer, never the 40 s of ``within``.
    assert took < within / 2, f"check() took {took:.1f}s"


OWN_PUBLISH = """\
version: 1
name: own-publish
brokers:
  kafka: {{kind: kafka, bootstrap: '{bootstrap}', tap_fetch_wait: 600ms}}
channels:
  orders: {{broker: kafka, kind: topic}}
flows:
  placed:
    correlate: $.order_id
    steps: [orders]
"""


async def test_check_waits_a_taps_lateness_for_what_the_system_published_itself(
    kafka_bootstrap: str, unique: str
) -> None:
    """The system under test publishes with its own client, not through the session: a
    check() right after must wait for the tap (here up to its 600 ms fetch wait), not
    fail at once with "no chain was seen"."""
    topology = flowcheck.loads(OWN_PUBLISH.format(bootstrap=kafka_bootstrap))
    async with FlowSession(topology, prefix=f"{unique}.") as fc:
        producer = aiokafka.AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(f"{unique}.orders", b'{"order_id": "o-1"}')
        finally:
            await producer.stop()
        verdict = await fc.check(within=10)
    (flow,) = verdict.flows
    assert (flow.flow, flow.chains, flow.succeeded) == ("placed", 1, 1)

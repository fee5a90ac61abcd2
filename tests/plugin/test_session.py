"""The test session against a real broker, without pytest's plugin in between."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

import flowcheck
from flowcheck.observations import Kind
from flowcheck.testing import FlowSession
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

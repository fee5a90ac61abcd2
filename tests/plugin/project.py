"""The small test project the plugin's tests write out: a topology and a worker helper."""

from __future__ import annotations

import textwrap

import pytest

TOPOLOGY = """\
version: 1
name: plugin-test
brokers:
  rabbit: {kind: rabbitmq}
  redis: {kind: redis}
channels:
  orders: {broker: rabbit, kind: exchange, type: topic}
  billing:
    broker: rabbit
    kind: queue
    bindings: [{exchange: orders, key: order.placed}]
  audit:
    broker: rabbit
    kind: queue
    bindings: [{exchange: orders, key: "order.#"}]
  jobs: {broker: redis, kind: stream, groups: [workers], delivery_limit: 3, dead_letter: jobs.dead}
  jobs.dead: {broker: redis, kind: stream}
flows:
  order-billed:
    correlate: $.order_id
    steps: [orders, billing]
    deadline: 2s
    latency: {p99: 1s}
  job-done:
    correlate: $.job_id
    steps: [{channel: jobs, retry: {max_attempts: 3}}]
    deadline: 5s
    delivery: at-least-once
    dead_letters:
      - {when: {payload: {$.poison: true}}, channel: jobs.dead, attempts: 3}
"""

# A worker the inner tests play: it takes a job from the group, has it redelivered
# (XCLAIM counts a delivery), then dead-letters it as a consumer would.
CONFTEST = """\
import json

from redis.asyncio import Redis

from flowcheck.testing import Flowcheck


async def fail_job(fc: Flowcheck, job_id: str, deliveries: int, reason: str) -> None:
    redis = Redis.from_url(fc.address("redis"))
    stream, group = fc.name("jobs"), fc.group("workers")
    try:
        reply = await redis.xreadgroup(group, "w1", {stream: ">"}, count=1, block=5000)
        entry_id = reply[0][1][0][0]
        for _ in range(deliveries - 1):
            await redis.xclaim(stream, group, "w1", min_idle_time=0, message_ids=[entry_id])
        dead = {"job_id": job_id, "poison": True}
        fields = {"payload": json.dumps(dead), "delivery_count": deliveries, "reason": reason}
        await redis.xadd(fc.name("jobs.dead"), fields)
        await redis.xack(stream, group, entry_id)
    finally:
        await redis.aclose()
"""

INI = """\
[pytest]
asyncio_default_fixture_loop_scope = function
flowcheck_topology = orders.yaml
"""


def make(pytester: pytest.Pytester, ini: str = "", **files: str) -> None:
    """The project: topology, worker helper, ``INI`` plus ``ini``, and test files."""
    pytester.makefile(".yaml", orders=TOPOLOGY)
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI + textwrap.dedent(ini))
    if files:
        pytester.makepyfile(**{name: textwrap.dedent(text) for name, text in files.items()})

"""Branched flows on the real brokers: a fanout exchange to two queues, a stream read by
two consumer groups; and a stream relayed by a group to another. Each fault is caught
on its branch with its key, step and cause; clean runs under several seeds pass."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import aio_pika
import anyio
import pytest
from redis.asyncio import Redis

from flowcheck.checker import Verdict, check
from flowcheck.observations import Kind, Observation
from flowcheck.testing import FlowSession
from flowcheck.topology import Topology
from flowcheck.tracer import Memory, Tracer

from .conftest import WITHIN, cleaned, load, read_group

STREAM_YAML = """
brokers:
  redis: {{kind: redis, url: "${{FC_URL}}"}}
channels:
  ships: {{broker: redis, kind: stream, name: "{p}.ships", groups: [billing, audit]}}
flows:
  ship:
    correlate: $.id
    deadline: 1s
    branches:
      billing: {{steps: [{{channel: ships, group: billing}}]}}
      audit: {{steps: [{{channel: ships, group: audit}}]}}
"""

FANOUT_YAML = """
brokers:
  rabbit: {{kind: rabbitmq, url: "${{FC_URL}}"}}
channels:
  orders: {{broker: rabbit, kind: exchange, type: fanout, name: "{p}.orders", durable: false}}
  done: {{broker: rabbit, kind: exchange, type: direct, name: "{p}.done", durable: false}}
  billing: {{broker: rabbit, kind: queue, name: "{p}.billing", durable: false, bindings: [orders]}}
  audit: {{broker: rabbit, kind: queue, name: "{p}.audit", durable: false, bindings: [orders]}}
  billed:
    broker: rabbit
    kind: queue
    name: "{p}.billed"
    durable: false
    bindings: [{{exchange: done, key: billing}}]
  audited:
    broker: rabbit
    kind: queue
    name: "{p}.audited"
    durable: false
    bindings: [{{exchange: done, key: audit}}]
flows:
  order:
    correlate: $.id
    deadline: 1s
    steps: [orders]
    branches:
      billing: {{steps: [billing, billed]}}
      audit: {{steps: [audit, audited]}}
"""


def judged(topology: Topology, items: list[Observation]) -> Verdict:
    # Judged as a recording that went on past every chain's window: each is decided.
    return check(topology, items, end_ns=max(o.mono_ns for o in items) + 10**12)


Found = tuple[str, str, str | None, str | None, str | None]  # flow, kind, key, step, cause


def findings(v: Verdict) -> list[Found]:
    return [
        (f.flow or "", f.kind.value, f.key, f.step, f.cause) for fv in v.flows for f in fv.findings
    ]


def evidence(kind: Kind, group: str) -> Callable[[list[Observation]], set[str]]:
    def keys(items: list[Observation]) -> set[str]:
        return {o.keys["ship/audit"] for o in items if o.kind is kind and o.group == group}

    return keys


async def drain(redis: Redis, stream: str, group: str, n: int, skip: set[str]) -> None:
    """Read ``n`` entries as ``group``; acknowledge all but those with an id in ``skip``."""
    got = 0
    with anyio.fail_after(WITHIN):
        while got < n:
            for entry_id, fields in await read_group(redis, stream, group, "w", count=n):
                got += 1
                if json.loads(fields["payload"])["id"] not in skip:
                    assert await redis.xack(stream, group, entry_id) == 1


async def groups_run(
    redis_url: str,
    redis: Redis,
    unique: str,
    seed: int,
    *,
    unacked: bool = False,
    unread: bool = False,
) -> tuple[Verdict, set[str]]:
    """``unacked``: the audit group never acknowledges one entry, drawn by ``seed``;
    ``unread``: it never reads the last one. Returns the verdict and that entry's id."""
    topology = load(STREAM_YAML.format(p=unique), FC_URL=redis_url)
    rng = random.Random(seed)
    keys = [f"s-{seed}-{i}" for i in range(rng.randint(3, 8))]
    faulty = {rng.choice(keys)} if unacked else set()
    skipped = set(keys[-1:]) if unread else set()  # a group reads a stream in order
    stream = f"{unique}.ships"
    async with cleaned(topology, "redis") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            for k in keys:
                await tracer.publish("ships", json.dumps({"id": k}).encode())
            await drain(redis, stream, "billing", len(keys), set())
            await drain(redis, stream, "audit", len(keys) - len(skipped), faulty)
            await memory.wait_for(
                lambda items: (
                    evidence(Kind.CONSUMED, "billing")(items) == set(keys)
                    and evidence(Kind.CONSUMED, "audit")(items) == set(keys) - faulty - skipped
                    and faulty <= evidence(Kind.DELIVERED, "audit")(items)
                ),
                WITHIN,
            )
    return judged(topology, memory.items), faulty | skipped


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_two_groups_that_each_read_and_ack_every_entry_pass(
    redis_url: str, redis: Redis, unique: str, seed: int
) -> None:
    verdict, _ = await groups_run(redis_url, redis, unique, seed)
    assert findings(verdict) == []
    assert verdict.passed
    assert [(f.flow, f.branch_of) for f in verdict.flows] == [
        ("ship/billing", "ship"),
        ("ship/audit", "ship"),
    ]


async def test_an_entry_one_group_never_acknowledges_is_caught_on_that_group(
    redis_url: str, redis: Redis, unique: str
) -> None:
    verdict, faulty = await groups_run(redis_url, redis, unique, 7, unacked=True)
    [key] = faulty
    assert findings(verdict) == [("ship/audit", "unacknowledged", key, "ships", None)]
    assert not verdict.passed


async def test_an_entry_one_group_never_reads_is_lost_to_that_group(
    redis_url: str, redis: Redis, unique: str
) -> None:
    verdict, skipped = await groups_run(redis_url, redis, unique, 9, unread=True)
    [key] = skipped
    assert findings(verdict) == [("ship/audit", "lost", key, "ships", "not_delivered")]
    assert not verdict.passed


async def test_entries_trimmed_before_a_slow_group_read_them_are_lost_to_it(
    redis_url: str, redis: Redis, unique: str
) -> None:
    topology = load(STREAM_YAML.format(p=unique), FC_URL=redis_url)
    stream = f"{unique}.ships"
    early, late = ["t-1", "t-2", "t-3"], ["t-4", "t-5"]
    async with cleaned(topology, "redis") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            for k in early:
                await tracer.publish("ships", json.dumps({"id": k}).encode())
            await drain(redis, stream, "billing", len(early), set())
            await memory.wait_for(
                lambda items: evidence(Kind.CONSUMED, "billing")(items) == set(early), WITHIN
            )
            # The producer caps the stream at two entries: the slow audit group has
            # read none of the first three, which go.
            for k in late:
                fields = {"payload": json.dumps({"id": k})}
                await redis.xadd(stream, fields, maxlen=2, approximate=False)  # type: ignore[arg-type]
            await memory.wait_for(
                lambda items: evidence(Kind.TRIMMED, "audit")(items) == set(early), WITHIN
            )
            await drain(redis, stream, "audit", len(late), set())
            await drain(redis, stream, "billing", len(late), set())
            await memory.wait_for(
                lambda items: (
                    evidence(Kind.CONSUMED, "audit")(items) == set(late)
                    and evidence(Kind.CONSUMED, "billing")(items) == {*early, *late}
                ),
                WITHIN,
            )
    verdict = judged(topology, memory.items)
    assert sorted(findings(verdict)) == [
        ("ship/audit", "lost", k, "ships", "trimmed") for k in early
    ]
    lost = verdict.flows[1].findings[0]
    assert lost.message == "trimmed from 'ships' before group 'audit' read it"


RELAY_YAML = """
brokers:
  redis: {{kind: redis, url: "${{FC_URL}}"}}
channels:
  ships: {{broker: redis, kind: stream, name: "{p}.ships", groups: [relay]}}
  shipped: {{broker: redis, kind: stream, name: "{p}.shipped"}}
flows:
  ship:
    correlate: $.id
    deadline: 1s
    steps: [ships, shipped]
"""


async def relay_run(
    redis_url: str, redis: Redis, unique: str, seed: int, *, stuck: bool
) -> tuple[Verdict, str | None]:
    """A relay reads ``ships`` as its group, writes each entry to ``shipped`` and acks it;
    with ``stuck``, one entry (drawn by ``seed``) it reads and then neither forwards nor
    acks: it stays pending, and its chain stops there."""
    topology = load(RELAY_YAML.format(p=unique), FC_URL=redis_url)
    rng = random.Random(seed)
    keys = [f"r-{seed}-{i}" for i in range(rng.randint(3, 8))]
    held = rng.choice(keys) if stuck else None
    stream = f"{unique}.ships"

    def of(kind: Kind, channel: str) -> Callable[[list[Observation]], set[str]]:
        def keys_(items: list[Observation]) -> set[str]:
            return {o.keys["ship"] for o in items if o.kind is kind and o.channel == channel}

        return keys_

    async with cleaned(topology, "redis") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            for k in keys:
                await tracer.publish("ships", json.dumps({"id": k}).encode())
            got = 0
            with anyio.fail_after(WITHIN):
                while got < len(keys):
                    for entry_id, fields in await read_group(
                        redis, stream, "relay", "w", count=len(keys)
                    ):
                        got += 1
                        if json.loads(fields["payload"])["id"] != held:
                            await redis.xadd(f"{unique}.shipped", {"payload": fields["payload"]})
                            assert await redis.xack(stream, "relay", entry_id) == 1
            moved = set(keys) - {held}
            await memory.wait_for(
                lambda items: (
                    of(Kind.ROUTED, "shipped")(items) == moved
                    and of(Kind.CONSUMED, "ships")(items) == moved
                    and (held is None or held in of(Kind.DELIVERED, "ships")(items))
                ),
                WITHIN,
            )
    return judged(topology, memory.items), held


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_relay_that_forwards_and_acks_every_entry_passes(
    redis_url: str, redis: Redis, unique: str, seed: int
) -> None:
    verdict, _ = await relay_run(redis_url, redis, unique, seed, stuck=False)
    assert findings(verdict) == []
    assert verdict.passed


async def test_an_entry_read_and_never_acked_is_lost_stuck_pending(
    redis_url: str, redis: Redis, unique: str
) -> None:
    verdict, held = await relay_run(redis_url, redis, unique, 4, stuck=True)
    assert findings(verdict) == [("ship", "lost", held, "shipped", "stuck_pending")]
    [lost] = verdict.flows[0].findings
    assert lost.next_step == "shipped"
    assert not verdict.passed


async def fanout_run(
    rabbitmq_url: str, unique: str, seed: int, *, drop: bool
) -> tuple[Verdict, str | None]:
    topology = load(FANOUT_YAML.format(p=unique), FC_URL=rabbitmq_url)
    rng = random.Random(seed)
    keys = [f"o-{seed}-{i}" for i in range(rng.randint(3, 8))]
    dropped = rng.choice(keys) if drop else None
    async with cleaned(topology, "rabbit") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            connection = await aio_pika.connect(rabbitmq_url)
            try:
                channel = await connection.channel()
                done = await channel.get_exchange(f"{unique}.done", ensure=False)

                async def work(queue: str, key: str) -> None:
                    q = await channel.get_queue(f"{unique}.{queue}", ensure=False)
                    got = 0
                    async with q.iterator() as messages:
                        async for message in messages:
                            async with message.process():
                                got += 1
                                body = json.loads(message.body)
                                if body["id"] != dropped or queue != "audit":
                                    await done.publish(aio_pika.Message(message.body), key)
                            if got == len(keys):
                                break

                with anyio.fail_after(WITHIN):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(work, "billing", "billing")
                        tg.start_soon(work, "audit", "audit")
                        for k in keys:
                            await tracer.publish("orders", json.dumps({"id": k}).encode())
                forwarded = {"billed": len(keys), "audited": len(keys) - (dropped is not None)}

                def arrived(items: list[Observation]) -> bool:
                    return all(
                        sum(o.kind is Kind.ROUTED and o.channel == ch for o in items) == n
                        for ch, n in forwarded.items()
                    )

                await memory.wait_for(arrived, WITHIN)
            finally:
                await connection.close()
    return judged(topology, memory.items), dropped


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_fanout_that_reaches_both_branches_passes(
    rabbitmq_url: str, unique: str, seed: int
) -> None:
    verdict, _ = await fanout_run(rabbitmq_url, unique, seed, drop=False)
    assert findings(verdict) == []
    assert verdict.passed
    assert [f.flow for f in verdict.flows] == ["order/billing", "order/audit"]


async def test_a_message_one_consumer_drops_is_lost_on_its_branch_only(
    rabbitmq_url: str, unique: str
) -> None:
    verdict, dropped = await fanout_run(rabbitmq_url, unique, 5, drop=True)
    assert findings(verdict) == [("order/audit", "lost", dropped, "audited", "timed_out")]
    [lost] = verdict.flows[1].findings
    assert lost.next_step == "audited"
    assert verdict.flows[0].passed
    assert not verdict.passed


@pytest.mark.parametrize("faulty", [None, "s-2"])
async def test_a_session_checks_a_branched_flow_by_its_name(
    redis_url: str, redis: Redis, unique: str, faulty: str | None
) -> None:
    topology = load(STREAM_YAML.format(p=unique), FC_URL=redis_url)
    stream = f"{unique}.ships"
    keys = ["s-1", "s-2", "s-3"]
    async with FlowSession(topology, flows=["ship"], deadline=5) as fc:
        for k in keys:
            await fc.publish("ships", {"id": k})
        await drain(redis, stream, "billing", len(keys), set())
        await drain(redis, stream, "audit", len(keys), {faulty} if faulty else set())
        if faulty is None:
            verdict = await fc.check("ship")
            assert [(f.flow, f.chains, f.passed) for f in verdict.flows] == [
                ("ship/billing", 3, True),
                ("ship/audit", 3, True),
            ]
        else:
            with pytest.raises(AssertionError, match="unacknowledged") as info:
                await fc.check("ship", within=1)
            assert "ship/audit" in str(info.value)
            assert faulty in str(info.value)


TOPIC_YAML = """
brokers:
  kafka: {{kind: kafka, bootstrap: "{bootstrap}"}}
channels:
  ships: {{broker: kafka, kind: topic, name: "{p}.ships"}}
flows:
  ship:
    correlate: $.id
    deadline: 1s
    branches:
      billing: {{steps: [{{channel: ships, group: "{p}.billing"}}]}}
      audit: {{steps: [{{channel: ships, group: "{p}.audit"}}]}}
"""


async def commit(bootstrap: str, topic: str, group: str, offset: int) -> None:
    """Commit ``offset`` for ``group`` on partition 0, as a consumer that assigned it
    itself (no group join: quick)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.commit({tp: offset})
    finally:
        await consumer.stop()


@pytest.mark.parametrize("behind", [0, 1])
async def test_a_kafka_group_that_never_commits_past_a_record_is_caught(
    kafka_bootstrap: str, unique: str, behind: int
) -> None:
    topology = load(TOPIC_YAML.format(p=unique, bootstrap=kafka_bootstrap))
    keys = ["k-1", "k-2", "k-3"]
    async with cleaned(topology, "kafka") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            for k in keys:
                await tracer.publish("ships", json.dumps({"id": k}).encode())
            await commit(kafka_bootstrap, f"{unique}.ships", f"{unique}.billing", len(keys))
            # The audit group stops short of the last record(s).
            await commit(kafka_bootstrap, f"{unique}.ships", f"{unique}.audit", len(keys) - behind)
            done = {"billing": set(keys), "audit": set(keys[: len(keys) - behind])}

            def committed(items: list[Observation]) -> bool:
                return all(
                    {
                        o.keys["ship/audit"]
                        for o in items
                        if o.kind is Kind.CONSUMED and o.group == f"{unique}.{g}"
                    }
                    == want
                    for g, want in done.items()
                )

            await memory.wait_for(committed, 30)
    verdict = judged(topology, memory.items)
    expected = [
        ("ship/audit", "unacknowledged", k, "ships", None) for k in keys[len(keys) - behind :]
    ]
    assert findings(verdict) == expected
    assert verdict.passed == (not expected)

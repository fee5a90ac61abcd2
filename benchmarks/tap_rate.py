"""Tap observe rate vs the raw client's consume rate, side by side in one run.

For each broker and round, a separate process publishes N messages as fast as
it can, and in this process either the raw client consumes them (RabbitMQ: the
real queue; Kafka: a group-less consumer; Redis: XREAD) or flowcheck's tap
observes them. Two modes:

  backlog  consume capacity: the consumer is attached and ready, but this
           process's event loop is held until the publisher has finished, so
           both sides then drain the same backlog as fast as they can
  live     the publisher runs while the consumer reads; a rate near the
           publish rate means the consumer keeps up

Rate = (N - 1) / (last received - first received). Raw and tap rounds
alternate; medians over the rounds, and the ratio tap / raw.

    .venv/bin/python benchmarks/tap_rate.py [--n 20000] [--rounds 5] [--modes backlog,live]
        [--brokers rabbitmq,kafka,redis]

Brokers come from FLOWCHECK_RABBITMQ_URL / FLOWCHECK_KAFKA_BOOTSTRAP /
FLOWCHECK_REDIS_URL; without a Kafka bootstrap the bundled local broker is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import anyio

from flowcheck import defaults
from flowcheck.brokers import adapter
from flowcheck.devkafka import LocalKafka
from flowcheck.topology import Topology, loads
from flowcheck.topology.model import Kafka
from flowcheck.tracer import Tracer

# The tap does what it does for users: a flow correlates by a payload path, so
# every observation parses its payload.
FLOW = """
flows: {f: {correlate: $.order_id, steps: [{channel: q}]}}
"""


def topology(broker: str, name: str, urls: dict[str, str], settings: str = "") -> Topology:
    """The benchmark's topology; ``settings``: more keys for the broker, like ", k: v"."""
    if broker == "rabbitmq":
        text = f"""
brokers: {{b: {{kind: rabbitmq, url: "{urls["rabbitmq"]}"{settings}}}}}
channels:
  ex: {{broker: b, kind: exchange, type: topic, name: {name}.ex}}
  q: {{broker: b, kind: queue, name: {name}.q, bindings: [{{exchange: ex, key: "#"}}]}}
"""
    elif broker == "kafka":
        text = f"""
brokers: {{b: {{kind: kafka, bootstrap: "{urls["kafka"]}"{settings}}}}}
channels: {{q: {{broker: b, kind: topic, name: {name}.q, partitions: 1}}}}
"""
    else:
        text = f"""
brokers: {{b: {{kind: redis, url: "{urls["redis"]}"{settings}}}}}
channels: {{q: {{broker: b, kind: stream, name: {name}.q}}}}
"""
    return loads(text + FLOW)


@contextlib.contextmanager
def broker_urls(brokers: str) -> Iterator[dict[str, str]]:
    """The brokers' addresses from the environment; the bundled Kafka-compatible broker,
    started for the run, when Kafka is among ``brokers`` and none is named."""
    urls = {
        "rabbitmq": defaults.rabbitmq_url(),
        "redis": defaults.redis_url(),
        "kafka": defaults.kafka_bootstrap() or "",
    }
    if urls["kafka"] or "kafka" not in brokers:
        yield urls
        return
    local = LocalKafka()
    local.start()
    try:
        yield dict(urls, kafka=local.bootstrap)
    finally:
        local.stop()


# ------------------------------------------------------------------ publisher process

BODY = json.dumps({"order_id": "o-12345678", "amount": 12.5, "items": list(range(10))}).encode()


def publish_process(broker: str, target: str, n: int, urls: dict[str, str]) -> None:
    asyncio.run(_publish(broker, target, n, urls))


async def _publish(broker: str, target: str, n: int, urls: dict[str, str]) -> None:
    if broker == "rabbitmq":
        import aio_pika

        conn = await aio_pika.connect(urls["rabbitmq"])
        async with conn:
            ch = await conn.channel(publisher_confirms=False)
            ex = await ch.get_exchange(target)
            for i in range(n):
                await ex.publish(aio_pika.Message(BODY, headers={"i": i}), routing_key="k")
            # A confirmed publish on a confirm channel waits until all earlier ones are in.
            sure = await conn.channel(publisher_confirms=True)
            await (await sure.get_exchange(target)).publish(
                aio_pika.Message(b"end"), routing_key="k"
            )
    elif broker == "kafka":
        import aiokafka

        producer = aiokafka.AIOKafkaProducer(bootstrap_servers=urls["kafka"], linger_ms=5)
        await producer.start()
        try:
            for i in range(n):
                await producer.send(target, BODY, headers=[("i", str(i).encode())])
            await producer.flush()
        finally:
            await producer.stop()
    else:
        import redis.asyncio as redis

        client = redis.from_url(urls["redis"])
        try:
            for start in range(0, n, 500):
                pipe = client.pipeline(transaction=False)
                for i in range(start, min(n, start + 500)):
                    pipe.xadd(target, {"payload": BODY, "i": str(i)})
                await pipe.execute()
        finally:
            await client.aclose()


# ------------------------------------------------------------------ consumers

BATCH = 1000  # records per fetch / XREAD / prefetch, on both sides, as the tap reads


class Clock:
    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.done = asyncio.Event()

    def hit(self) -> None:
        now = time.perf_counter()
        if self.count == 0:
            self.first = now
        self.count += 1
        if self.count >= self.n:
            self.last = now
            self.done.set()

    def rate(self) -> float:
        return (self.n - 1) / (self.last - self.first)


async def raw_consumer(
    broker: str, physical: str, urls: dict[str, str], clock: Clock, ready: asyncio.Event
) -> None:
    if broker == "rabbitmq":
        import aio_pika

        conn = await aio_pika.connect(urls["rabbitmq"])
        async with conn:
            ch = await conn.channel()
            await ch.set_qos(prefetch_count=BATCH)  # as the tap; no_ack ignores it anyway
            queue = await ch.get_queue(physical)

            async def on_message(msg: Any) -> None:
                if msg.body != b"end":
                    clock.hit()

            await queue.consume(on_message, no_ack=True)
            ready.set()
            await clock.done.wait()
    elif broker == "kafka":
        import aiokafka
        from aiokafka.structs import TopicPartition

        # The tap's batch size and its default fetch wait, so both sides read alike.
        wait = Kafka.model_fields["tap_fetch_wait"].default
        consumer = aiokafka.AIOKafkaConsumer(
            bootstrap_servers=urls["kafka"],
            group_id=None,
            enable_auto_commit=False,
            max_poll_records=BATCH,
            fetch_max_wait_ms=wait // timedelta(milliseconds=1),
        )
        await consumer.start()
        try:
            tp = TopicPartition(physical, 0)
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            consumer.seek(tp, end)
            ready.set()
            while not clock.done.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=BATCH)
                for records in batches.values():
                    for _ in records:
                        clock.hit()
        finally:
            await consumer.stop()
    else:
        import redis.asyncio as redis

        client = redis.from_url(urls["redis"], protocol=2)  # RESP2, as the tap reads
        try:
            # From the stream's last id, as the tap starts: "$" would skip whatever
            # arrives between one XREAD and the next.
            last: Any
            try:
                last = (await client.xinfo_stream(physical))["last-generated-id"]
            except redis.ResponseError:
                last = "0-0"  # no stream yet: everything in it will be new
            ready.set()
            while not clock.done.is_set():
                reply: Any = await client.xread({physical: last}, count=BATCH, block=200)
                for _, entries in reply or ():
                    for entry_id, _fields in entries:
                        last = entry_id
                        clock.hit()
        finally:
            await client.aclose()


async def tap_consumer(top: Topology, clock: Clock, ready: asyncio.Event) -> None:
    def sink(obs: Any) -> None:
        if obs.channel == "q" and obs.payload != "end":
            clock.hit()

    async with Tracer(top, [sink], channels=["q"]):
        ready.set()
        await clock.done.wait()


async def one_round(broker: str, side: str, mode: str, n: int, urls: dict[str, str]) -> float:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    top = topology(broker, name, urls)
    async with adapter("b", top) as ad:
        await ad.apply()
        try:
            clock = Clock(n)
            ready = asyncio.Event()
            physical = top.channel_name("q")
            runner: Callable[[], Awaitable[None]]
            if side == "raw":
                runner = lambda: raw_consumer(broker, physical, urls, clock, ready)  # noqa: E731
            else:
                runner = lambda: tap_consumer(top, clock, ready)  # noqa: E731
            task = asyncio.create_task(runner())
            await asyncio.wait_for(ready.wait(), 30)
            target = top.channel_name("ex") if broker == "rabbitmq" else physical
            proc = mp.get_context("spawn").Process(
                target=publish_process, args=(broker, target, n, urls)
            )
            proc.start()
            try:
                if mode == "backlog":
                    # Hold the event loop on purpose: the consumer stays attached but idle
                    # until every message is on the broker.
                    proc.join(120)
                await asyncio.wait_for(clock.done.wait(), 300)
            finally:
                await asyncio.to_thread(proc.join, 60)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            return clock.rate()
        finally:
            await ad.delete(list(top.channels))


async def main(args: argparse.Namespace, urls: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for mode in args.modes.split(","):
        for broker in args.brokers.split(","):
            raw: list[float] = []
            tap: list[float] = []
            for _ in range(args.rounds):
                # Alternate so drift in machine load hits both sides alike.
                raw.append(await one_round(broker, "raw", mode, args.n, urls))
                tap.append(await one_round(broker, "tap", mode, args.n, urls))
            r, t = statistics.median(raw), statistics.median(tap)
            rows.append(
                {
                    "mode": mode,
                    "broker": broker,
                    "raw_msgs_per_s": round(r),
                    "tap_msgs_per_s": round(t),
                    "ratio": round(t / r, 3),
                    "raw_all": [round(x) for x in raw],
                    "tap_all": [round(x) for x in tap],
                }
            )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--brokers", default="rabbitmq,kafka,redis")
    parser.add_argument("--modes", default="backlog,live")
    args = parser.parse_args()
    with broker_urls(args.brokers) as urls:
        rows = anyio.run(main, args, urls)
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {platform.machine()}, {mp.cpu_count()} cores, Python {platform.python_version()}; "
        f"N={args.n}, rounds={args.rounds}; load average {load}"
    )
    print(f"{'mode':<8} {'broker':<10} {'raw msg/s':>10} {'tap msg/s':>10} {'tap/raw':>8}")
    for row in rows:
        print(
            f"{row['mode']:<8} {row['broker']:<10} {row['raw_msgs_per_s']:>10} "
            f"{row['tap_msgs_per_s']:>10} {row['ratio']:>8}"
        )
    print(json.dumps(rows))

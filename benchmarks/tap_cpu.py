"""What a tap costs in CPU per message at a steady rate, against the raw client, in one run.

tap_rate.py measures how fast a tap can go; a tap attached to a real system mostly
sees messages one at a time, a few hundred a second, and there its cost is the
wake-ups, not the messages. For each broker and round a separate process publishes
N messages at a fixed rate, and in this process one of three consumers reads them:

  raw      the raw client, as in tap_rate.py (doing nothing per message)
  tap      flowcheck's tap with the broker's default read interval / fetch wait
  eager    the tap with a short one (RabbitMQ, Redis: 1ms; Kafka: 20ms), so it
           reads nearly every message as it comes

CPU = this process's CPU time from the publisher's start to the last message
received, per message. Sides alternate round by round; medians, and each tap
side / raw.

    PYTHONPATH=. .venv/bin/python benchmarks/tap_cpu.py [--rate 500] [--n 3000] [--rounds 3]
        [--brokers rabbitmq,kafka,redis]

Brokers as in tap_rate.py; without a Kafka bootstrap the bundled local broker is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from tap_rate import BODY, Clock, broker_urls, raw_consumer, tap_consumer, topology

from flowcheck.brokers import adapter

SIDES = ("raw", "tap", "eager")
EAGER = {
    "rabbitmq": ", tap_read_interval: 1ms",
    "redis": ", tap_read_interval: 1ms",
    "kafka": ", tap_fetch_wait: 20ms",
}


def publish_process(broker: str, target: str, n: int, rate: float, urls: dict[str, str]) -> None:
    asyncio.run(_publish(broker, target, n, rate, urls))


async def _publish(broker: str, target: str, n: int, rate: float, urls: dict[str, str]) -> None:
    """``n`` messages, message i at ``i / rate`` seconds from the start."""
    send: Callable[[int], Awaitable[Any]]
    close: Callable[[], Awaitable[Any]]
    if broker == "rabbitmq":
        import aio_pika

        conn = await aio_pika.connect(urls["rabbitmq"])
        ch = await conn.channel(publisher_confirms=False)
        ex = await ch.get_exchange(target)

        async def send(i: int) -> None:
            await ex.publish(aio_pika.Message(BODY, headers={"i": i}), routing_key="k")

        close = conn.close
    elif broker == "kafka":
        import aiokafka

        producer = aiokafka.AIOKafkaProducer(bootstrap_servers=urls["kafka"], linger_ms=0)
        await producer.start()

        async def send(i: int) -> None:
            await producer.send(target, BODY, headers=[("i", str(i).encode())])

        close = producer.stop
    else:
        import redis.asyncio as redis

        client = redis.from_url(urls["redis"])

        async def send(i: int) -> None:
            await client.xadd(target, {"payload": BODY, "i": str(i)})

        close = client.aclose
    try:
        start = time.perf_counter()
        for i in range(n):
            ahead = start + i / rate - time.perf_counter()
            if ahead > 0:
                await asyncio.sleep(ahead)  # the publisher's pace, not a wait for an event
            await send(i)
    finally:
        await close()


async def one_round(broker: str, side: str, n: int, rate: float, urls: dict[str, str]) -> float:
    """CPU microseconds per message this process spent on ``side``."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    top = topology(broker, name, urls, EAGER[broker] if side == "eager" else "")
    async with adapter("b", top) as ad:
        await ad.apply()
        try:
            clock = Clock(n)
            ready = asyncio.Event()
            physical = top.channel_name("q")
            if side == "raw":
                task = asyncio.create_task(raw_consumer(broker, physical, urls, clock, ready))
            else:
                task = asyncio.create_task(tap_consumer(top, clock, ready))
            await asyncio.wait_for(ready.wait(), 30)
            target = top.channel_name("ex") if broker == "rabbitmq" else physical
            proc = mp.get_context("spawn").Process(
                target=publish_process, args=(broker, target, n, rate, urls)
            )
            cpu = time.process_time()
            proc.start()
            try:
                await asyncio.wait_for(clock.done.wait(), n / rate + 120)
                cpu = time.process_time() - cpu
            finally:
                await asyncio.to_thread(proc.join, 60)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            return cpu / n * 1e6
        finally:
            await ad.delete(list(top.channels))


async def main(args: argparse.Namespace, urls: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for broker in args.brokers.split(","):
        cpu: dict[str, list[float]] = {side: [] for side in SIDES}
        for _ in range(args.rounds):
            for side in SIDES:  # alternate, so drift in machine load hits all alike
                cpu[side].append(await one_round(broker, side, args.n, args.rate, urls))
        med = {side: statistics.median(v) for side, v in cpu.items()}
        rows.append(
            {
                "broker": broker,
                "cpu_us_per_msg": {side: round(v, 1) for side, v in med.items()},
                "tap_vs_raw": round(med["tap"] / med["raw"], 2),
                "eager_vs_raw": round(med["eager"] / med["raw"], 2),
                "all": {side: [round(x, 1) for x in v] for side, v in cpu.items()},
            }
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=500, help="messages a second")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--brokers", default="rabbitmq,kafka,redis")
    args = parser.parse_args()
    with broker_urls(args.brokers) as urls:
        rows = anyio.run(main, args, urls)
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {platform.machine()}, {mp.cpu_count()} cores, Python {platform.python_version()}; "
        f"rate={args.rate:g}/s, N={args.n}, rounds={args.rounds}; load average {load}"
    )
    print("CPU µs per message, medians:")
    print(f"{'broker':<10} {'raw':>8} {'tap':>8} {'eager':>8} {'tap/raw':>8} {'eager/raw':>10}")
    for row in rows:
        c = row["cpu_us_per_msg"]
        print(
            f"{row['broker']:<10} {c['raw']:>8} {c['tap']:>8} {c['eager']:>8} "
            f"{row['tap_vs_raw']:>8} {row['eager_vs_raw']:>10}"
        )
    print(json.dumps(rows))

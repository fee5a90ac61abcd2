"""What the drain costs ``flowcheck record`` per observation, on against off, in one run.

To drain when asked to stop, the recorder follows every observation as it comes
(which chains are still open). This measures what that adds to its hot path: for
each broker and round a separate process publishes N orders at a fixed rate, each
order one message on channel ``a`` and then one on ``b`` (a two-step flow
correlated by ``$.order_id``, a distinct key per order, deadline 2s, so chains
open and close as in a live system), while this process runs ``record()`` on them
with the default drain (*drain*: ``OpenChains``), with the default drain fed to a
checker judging every chain as it closes (*judging*: what the recorder did before),
or ``drain=0`` (*no-drain*, as ``--no-drain``).

CPU = this process's CPU time from the publisher's start until the recorder has
counted every observation (seen at its 0.25 s tick), per observation; the drain
after the stop is not counted. Sides alternate round by round (each round in
turn reversed); medians, and each drain side / no-drain.

    PYTHONPATH=. .venv/bin/python benchmarks/record_drain.py [--rate 1000] [--n 10000]
        [--rounds 3] [--brokers redis,rabbitmq,kafka]

Brokers as in tap_rate.py; without a Kafka bootstrap the bundled local broker is used.
``--offline`` needs no broker: what the drain feeds alone, fed the same orders' 200,000
observations (1,000 orders a second on their own clock): a judging checker, a
``Checker(judge=False)``, and ``OpenChains`` before the stop (what the recorder feeds);
best of 3, CPU µs per observation, the garbage collector's passes included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from tap_rate import broker_urls

from flowcheck import recorder
from flowcheck.brokers import adapter
from flowcheck.checker import Checker, OpenChains
from flowcheck.observations import Kind, Observation
from flowcheck.topology import Topology, loads

SIDES = ("drain", "judging", "no-drain")
FLOW = """
flows: {f: {correlate: $.order_id, deadline: 2s, steps: [{channel: a}, {channel: b}]}}
"""


def topology(broker: str, name: str, urls: dict[str, str]) -> Topology:
    if broker == "rabbitmq":
        text = f"""
brokers: {{b: {{kind: rabbitmq, url: "{urls["rabbitmq"]}"}}}}
channels:
  ex: {{broker: b, kind: exchange, type: direct, name: {name}.ex}}
  a: {{broker: b, kind: queue, name: {name}.a, bindings: [{{exchange: ex, key: a}}]}}
  b: {{broker: b, kind: queue, name: {name}.b, bindings: [{{exchange: ex, key: b}}]}}
"""
    elif broker == "kafka":
        text = f"""
brokers: {{b: {{kind: kafka, bootstrap: "{urls["kafka"]}"}}}}
channels:
  a: {{broker: b, kind: topic, name: {name}.a, partitions: 1}}
  b: {{broker: b, kind: topic, name: {name}.b, partitions: 1}}
"""
    else:
        text = f"""
brokers: {{b: {{kind: redis, url: "{urls["redis"]}"}}}}
channels:
  a: {{broker: b, kind: stream, name: {name}.a}}
  b: {{broker: b, kind: stream, name: {name}.b}}
"""
    return loads(text + FLOW)


class Judging:
    """The drain as it was before OpenChains: a checker fed every observation, judging
    every chain as it closes."""

    def __init__(self, topology: Topology, *, start_ns: int) -> None:
        self.checker = Checker(topology, start_ns=start_ns)

    def feed(self, obs: Observation) -> None:
        self.checker.feed(obs)

    def stop(self, at_ns: int) -> None:
        self.checker.stop_ns = at_ns

    def advance(self, now_ns: int) -> None:
        self.checker.advance(now_ns)

    def settled(self) -> bool:
        c = self.checker
        return all(c.settled(name, key) for name, st in c.flows.items() for key in st.chains)


def body(i: int) -> bytes:
    return json.dumps({"order_id": f"o-{i:08d}", "amount": 12.5, "items": [1, 2, 3]}).encode()


def publish_process(
    broker: str, names: dict[str, str], n: int, rate: float, urls: dict[str, str]
) -> None:
    asyncio.run(_publish(broker, names, n, rate, urls))


async def _publish(
    broker: str, names: dict[str, str], n: int, rate: float, urls: dict[str, str]
) -> None:
    """``n`` orders, order i at ``i / rate`` seconds from the start: to ``a``, then ``b``."""
    send: Callable[[str, bytes], Awaitable[Any]]
    close: Callable[[], Awaitable[Any]]
    if broker == "rabbitmq":
        import aio_pika

        conn = await aio_pika.connect(urls["rabbitmq"])
        ch = await conn.channel(publisher_confirms=False)
        ex = await ch.get_exchange(names["ex"])

        async def send(step: str, data: bytes) -> None:
            await ex.publish(aio_pika.Message(data), routing_key=step)

        close = conn.close
    elif broker == "kafka":
        import aiokafka

        producer = aiokafka.AIOKafkaProducer(bootstrap_servers=urls["kafka"], linger_ms=0)
        await producer.start()

        async def send(step: str, data: bytes) -> None:
            await producer.send(names[step], data)

        close = producer.stop
    else:
        import redis.asyncio as redis

        client = redis.from_url(urls["redis"])

        async def send(step: str, data: bytes) -> None:
            await client.xadd(names[step], {"payload": data})

        close = client.aclose
    try:
        start = time.perf_counter()
        for i in range(n):
            ahead = start + i / rate - time.perf_counter()
            if ahead > 0:
                await asyncio.sleep(ahead)  # the publisher's pace, not a wait for an event
            data = body(i)
            await send("a", data)
            await send("b", data)
    finally:
        await close()


async def one_round(
    broker: str, side: str, n: int, rate: float, urls: dict[str, str], tmp: str
) -> float:
    """CPU microseconds per observation this process spent recording with ``side``."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    top = topology(broker, name, urls)
    names = {k: top.channel_name(k) for k in top.channels}
    want = 2 * n
    ready, done, stop = anyio.Event(), anyio.Event(), anyio.Event()
    cpu = [0.0, 0.0]

    def tick(counts: Counter[str]) -> None:
        if not done.is_set() and counts["a"] + counts["b"] >= want:
            cpu[1] = time.process_time()
            done.set()

    out = os.path.join(tmp, f"{name}.jsonl")
    # judging: the recorder's drain checker as it was, deciding every chain
    setattr(recorder, "OpenChains", Judging if side == "judging" else OpenChains)  # noqa: B010
    async with adapter("b", top) as ad:
        await ad.apply()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    lambda: recorder.record(
                        top,
                        out,
                        drain=0 if side == "no-drain" else None,
                        stop=stop,
                        on_ready=ready.set,
                        on_tick=tick,
                    )
                )
                with anyio.fail_after(30):
                    await ready.wait()
                proc = mp.get_context("spawn").Process(
                    target=publish_process, args=(broker, names, n, rate, urls)
                )
                cpu[0] = time.process_time()
                proc.start()
                try:
                    with anyio.fail_after(n / rate + 120):
                        await done.wait()
                finally:
                    await anyio.to_thread.run_sync(proc.join, 60)
                    stop.set()
            return (cpu[1] - cpu[0]) / want * 1e6
        finally:
            await ad.delete(list(top.channels))
            os.remove(out)


async def main(args: argparse.Namespace, urls: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for broker in args.brokers.split(","):
            cpu: dict[str, list[float]] = {side: [] for side in SIDES}
            for r in range(args.rounds):
                # alternate, and in turn which goes first, so drifting load hits both alike
                for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                    cpu[side].append(await one_round(broker, side, args.n, args.rate, urls, tmp))
            med = {side: statistics.median(v) for side, v in cpu.items()}
            ratios = {
                side: [round(d / o, 2) for d, o in zip(cpu[side], cpu["no-drain"], strict=True)]
                for side in ("drain", "judging")
            }
            rows.append(
                {
                    "broker": broker,
                    "cpu_us_per_obs": {side: round(v, 1) for side, v in med.items()},
                    "drain_vs_no_drain": round(med["drain"] / med["no-drain"], 2),
                    "judging_vs_no_drain": round(med["judging"] / med["no-drain"], 2),
                    "round_ratios": ratios,
                    "all": {side: [round(x, 1) for x in v] for side, v in cpu.items()},
                }
            )
    return rows


def offline(orders: int = 100_000) -> dict[str, float]:
    """The drain's checker alone: CPU µs per observation, judging and following."""
    top = topology("redis", "x", {"redis": "redis://127.0.0.1:1"})
    observations = []
    for i in range(orders):
        data = body(i).decode()
        key = json.loads(data)["order_id"]
        for j, ch in enumerate("ab"):
            observations.append(
                Observation(
                    kind=Kind.ROUTED,
                    broker="b",
                    channel=ch,
                    mono_ns=i * 1_000_000 + j * 100_000,
                    wall=0.0,
                    keys={"f": key},
                    entry_id=f"{i}-{j}",
                    payload=data,
                    size=len(data),
                )
            )
    out = {}
    makers: dict[str, Callable[[], Any]] = {
        "judging": lambda: Checker(top, start_ns=0),
        "following": lambda: Checker(top, start_ns=0, judge=False),
        "open_chains": lambda: OpenChains(top, start_ns=0),
    }
    for name, make in makers.items():
        best = float("inf")
        for _ in range(3):
            follower = make()
            cpu = time.process_time()
            for obs in observations:
                follower.feed(obs)
            best = min(best, time.process_time() - cpu)
        out[name] = round(best / len(observations) * 1e6, 2)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=1000, help="orders a second (2 obs each)")
    parser.add_argument("--n", type=int, default=10000, help="orders a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--brokers", default="redis")
    parser.add_argument("--offline", action="store_true", help="the checker alone, no broker")
    args = parser.parse_args()
    if args.offline:
        print(f"Python {platform.python_version()}; checker CPU µs per observation (best of 3):")
        print(json.dumps(offline()))
        raise SystemExit(0)
    with broker_urls(args.brokers) as urls:
        rows = anyio.run(main, args, urls)
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {platform.machine()}, {mp.cpu_count()} cores, Python {platform.python_version()}; "
        f"rate={args.rate:g} orders/s ({2 * args.rate:g} obs/s), N={args.n} orders, "
        f"rounds={args.rounds}; load average {load}"
    )
    print("recorder CPU µs per observation, medians:")
    print(
        f"{'broker':<10} {'drain':>8} {'judging':>8} {'no-drain':>9} {'drain/no':>9} {'judging/no':>11}"
    )
    for row in rows:
        c = row["cpu_us_per_obs"]
        print(
            f"{row['broker']:<10} {c['drain']:>8} {c['judging']:>8} {c['no-drain']:>9} "
            f"{row['drain_vs_no_drain']:>9} {row['judging_vs_no_drain']:>11}"
        )
    print(json.dumps(rows))

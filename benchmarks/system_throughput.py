"""The shop's own throughput with and without flowcheck's taps attached, in one run.

Modes, alternated round by round so machine drift hits all alike:
  bare       the shop alone
  taps       `flowcheck record` taps every channel from its own process, as it
             runs for users (RabbitMQ: twin queues; firehose off)
  firehose   the same with RabbitMQ's firehose on (rabbitmqctl trace_on), which
             adds deliveries and redeliveries to what the tap sees

Throughput = orders / (time from the first order placed to the last shipped).

    PYTHONPATH=. .venv/bin/python benchmarks/system_throughput.py [--orders 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from examples.shop import Brokers, Event, Settings, Shop
from examples.shop.topology import topology_yaml
from flowcheck import defaults
from flowcheck.devkafka import LocalKafka
from flowcheck.trace import Reader

MODES = ("bare", "taps", "firehose")


@asynccontextmanager
async def firehose(on: bool) -> AsyncIterator[None]:
    if not on:
        yield
        return
    await asyncio.to_thread(
        subprocess.run, ["rabbitmqctl", "trace_on"], check=True, capture_output=True
    )
    try:
        yield
    finally:
        await asyncio.to_thread(
            subprocess.run, ["rabbitmqctl", "trace_off"], check=True, capture_output=True
        )


@asynccontextmanager
async def recording(topology: str, workdir: Path) -> AsyncIterator[Path]:
    """`flowcheck record` in its own process, ready when it says so; stopped with SIGINT."""
    path = workdir / f"topology-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(topology)
    trace = path.with_suffix(".jsonl")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "flowcheck",
        "record",
        str(path),
        "--out",
        str(trace),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), 60)
    if b"recording" not in line:
        raise RuntimeError(f"flowcheck record did not start: {line!r}")
    try:
        yield trace
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 60)


async def one_round(mode: str, orders: int, brokers: Brokers, workdir: Path) -> tuple[float, int]:
    prefix = f"bench-{uuid.uuid4().hex[:6]}."
    async with Shop(Settings(brokers=brokers, prefix=prefix), remove=True) as shop:
        async with AsyncExitStack() as stack:
            trace = None
            if mode != "bare":
                await stack.enter_async_context(firehose(mode == "firehose"))
                trace = await stack.enter_async_context(
                    recording(topology_yaml(prefix, brokers), workdir)
                )
            start = time.perf_counter()
            await shop.place_orders(orders)
            await shop.wait_for(lambda s: s.total(Event.SHIPPED) >= orders, within=900)
            took = time.perf_counter() - start
        seen = sum(1 for _ in Reader(str(trace))) if trace is not None else 0
    return orders / took, seen


async def main(args: argparse.Namespace, brokers: Brokers, workdir: Path) -> dict[str, Any]:
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    observed: dict[str, list[int]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            rate, seen = await one_round(mode, args.orders, brokers, workdir)
            rates[mode].append(rate)
            observed[mode].append(seen)
    med = {m: statistics.median(v) for m, v in rates.items()}
    return {
        "orders": args.orders,
        "rounds": args.rounds,
        "orders_per_s": {m: round(v, 1) for m, v in med.items()},
        "ratio_vs_bare": {m: round(med[m] / med["bare"], 3) for m in MODES},
        "observations": {m: statistics.median(v) for m, v in observed.items()},
        "all": {m: [round(x, 1) for x in v] for m, v in rates.items()},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    local = None
    bootstrap = defaults.kafka_bootstrap()
    if bootstrap is None:
        local = LocalKafka()
        local.start()
        bootstrap = local.bootstrap
    try:
        brokers = Brokers(
            rabbitmq_url=defaults.rabbitmq_url(),
            kafka_bootstrap=bootstrap,
            redis_url=defaults.redis_url(),
        )
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(main(args, brokers, Path(tmp)))
    finally:
        if local is not None:
            local.stop()
    print(
        f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}; orders={args.orders}, rounds={args.rounds}"
    )
    print(f"{'mode':<10} {'orders/s':>9} {'vs bare':>8} {'observations':>13}")
    for m in MODES:
        print(
            f"{m:<10} {result['orders_per_s'][m]:>9} {result['ratio_vs_bare'][m]:>8} {result['observations'][m]:>13}"
        )
    print(json.dumps(result))

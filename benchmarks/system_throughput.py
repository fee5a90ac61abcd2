"""The shop's own throughput with and without flowcheck's taps attached, in one run.

Modes, alternated round by round so machine drift hits all alike:
  bare       the shop alone
  taps       `flowcheck record` taps every channel from its own process, as it
             runs for users (RabbitMQ: twin queues; firehose off)
  firehose   the same with RabbitMQ's firehose on (rabbitmqctl trace_on), which
             adds deliveries and redeliveries to what the tap sees
  against    with --against DIR: taps as in "taps", recorded by the flowcheck
             of another checkout (DIR), to compare two versions in one run
  taps:NAME  taps on broker NAME's channels only (rabbit, kafka, redis), to see
             which broker's tap costs what; chosen with --modes
  reads      the floor of any tap (benchmarks/reads_only.py): the same taps read
             every channel but observe, correlate and write nothing; chosen
             with --modes
  taps@DUR   taps with RabbitMQ's and Redis's tap_read_interval set to DUR
             (taps@50ms, say): what reading less often saves; chosen with --modes

Throughput = orders / (time from the first order placed to the last shipped).
Besides, the CPU time each process spent while the orders ran: the shop (this
process), the recorder, and the brokers when they run on this host (Linux
/proc): where the cost of tapping goes, whatever else the machine runs.

    PYTHONPATH=. .venv/bin/python benchmarks/system_throughput.py [--orders 2000] [--rounds 5]
        [--against DIR] [--modes bare,taps,taps:rabbitmq,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process so far (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


# Broker processes on this host whose CPU time is worth showing, by command name
# prefix (the bundled Kafka-compatible broker's binary name carries its version).
BROKER_PROCESSES = {"beam.smp": "rabbitmq", "tansu": "kafka", "redis-server": "redis"}


def local_brokers() -> dict[str, int]:
    """Local broker processes (name -> pid), found in /proc; none where there is no /proc.

    Of several matches the longest running: `rabbitmqctl` (which the firehose mode
    runs) is a short-lived beam.smp too."""
    found: dict[str, tuple[int, int]] = {}  # name -> (start time, pid)
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry}/comm") as fh:
                    comm = fh.read().strip()
                name = next((n for p, n in BROKER_PROCESSES.items() if comm.startswith(p)), None)
                if name is None:
                    continue
                with open(f"/proc/{entry}/stat") as fh:
                    started = int(fh.read().rpartition(")")[2].split()[19])
                if name not in found or started < found[name][0]:
                    found[name] = (started, int(entry))
    return {name: pid for name, (_, pid) in found.items()}


def paced(text: str, interval: str) -> str:
    """The topology with ``tap_read_interval: interval`` on its RabbitMQ and Redis brokers."""
    if not interval:
        return text
    doc = yaml.safe_load(text)
    for broker in doc["brokers"].values():
        if broker["kind"] in ("rabbitmq", "redis"):
            broker["tap_read_interval"] = interval
    return str(yaml.safe_dump(doc, sort_keys=False))


@dataclass
class Recording:
    trace: Path
    pid: int


@asynccontextmanager
async def recording(
    topology: str,
    workdir: Path,
    checkout: str | None = None,
    broker: str | None = None,
    reads_only: bool = False,
) -> AsyncIterator[Recording]:
    """`flowcheck record` in its own process, ready when it says so; stopped with SIGINT.

    ``checkout``: the directory whose flowcheck records (default: the one imported here);
    ``broker``: tap only that broker's channels; ``reads_only``: reads_only.py instead,
    which writes no trace.
    """
    env, cwd = dict(os.environ), None
    if checkout is not None:
        # `python -m` looks in its working directory first, then PYTHONPATH.
        env["PYTHONPATH"] = cwd = checkout
    path = workdir / f"topology-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(topology)
    trace = path.with_suffix(".jsonl")
    if reads_only:
        args = [str(Path(__file__).with_name("reads_only.py")), str(path)]
    else:
        args = ["-m", "flowcheck", "record", str(path), "--out", str(trace)]
        args += ["--broker", broker] if broker else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), 60)
    if b"recording" not in line:
        raise RuntimeError(f"flowcheck record did not start: {line!r}")
    try:
        yield Recording(trace, proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 60)


@dataclass
class Round:
    rate: float  # orders/s
    observations: int
    cpu: dict[str, float]  # process -> CPU seconds while the orders ran


async def one_round(
    mode: str, orders: int, brokers: Brokers, workdir: Path, against: str | None
) -> Round:
    prefix = f"bench-{uuid.uuid4().hex[:6]}."
    async with Shop(Settings(brokers=brokers, prefix=prefix), remove=True) as shop:
        async with AsyncExitStack() as stack:
            rec = None
            if mode != "bare":
                await stack.enter_async_context(firehose(mode == "firehose"))
                rec = await stack.enter_async_context(
                    recording(
                        paced(topology_yaml(prefix, brokers), mode.partition("@")[2]),
                        workdir,
                        against if mode == "against" else None,
                        mode.partition(":")[2] or None,
                        reads_only=mode == "reads",
                    )
                )
            pids = {"shop": os.getpid(), **local_brokers()}
            if rec is not None:
                pids["recorder"] = rec.pid
            cpu = {k: cpu_seconds(pid) for k, pid in pids.items()}
            start = time.perf_counter()
            await shop.place_orders(orders)
            await shop.wait_for(lambda s: s.total(Event.SHIPPED) >= orders, within=900)
            took = time.perf_counter() - start
            cpu = {k: cpu_seconds(pid) - cpu[k] for k, pid in pids.items()}
        seen = sum(1 for _ in Reader(str(rec.trace))) if rec and rec.trace.exists() else 0
    return Round(orders / took, seen, cpu)


async def main(args: argparse.Namespace, brokers: Brokers, workdir: Path) -> dict[str, Any]:
    modes = tuple(args.modes.split(",")) if args.modes else MODES
    if args.against:
        modes = (*modes, "against")
    if "bare" not in modes:
        modes = ("bare", *modes)  # every ratio is against it
    rounds: dict[str, list[Round]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            rounds[mode].append(await one_round(mode, args.orders, brokers, workdir, args.against))
    med = {m: statistics.median(r.rate for r in v) for m, v in rounds.items()}
    # CPU milliseconds per order, per process: where the cost of tapping goes.
    cpu_ms: dict[str, dict[str, float]] = {}
    for m, v in rounds.items():
        procs = sorted({p for r in v for p in r.cpu})
        cpu_ms[m] = {
            p: round(statistics.median(r.cpu.get(p, math.nan) for r in v) / args.orders * 1e3, 3)
            for p in procs
        }
    return {
        "orders": args.orders,
        "rounds": args.rounds,
        "orders_per_s": {m: round(v, 1) for m, v in med.items()},
        "ratio_vs_bare": {m: round(med[m] / med["bare"], 3) for m in modes},
        "observations": {
            m: statistics.median(r.observations for r in v) for m, v in rounds.items()
        },
        "recorder_cpu_us_per_observation": {
            m: round(statistics.median(r.cpu["recorder"] / r.observations * 1e6 for r in v), 1)
            for m, v in rounds.items()
            if m not in ("bare", "reads")
        },
        "cpu_ms_per_order": cpu_ms,
        "all": {m: [round(r.rate, 1) for r in v] for m, v in rounds.items()},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--against", metavar="DIR", help="also record with the flowcheck of this checkout"
    )
    parser.add_argument(
        "--modes", help="comma-separated modes to run (default: bare,taps,firehose)"
    )
    args = parser.parse_args()
    if args.against:
        args.against = str(Path(args.against).resolve())
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
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"orders={args.orders}, rounds={args.rounds}; load average {load}"
    )
    cpu = result["recorder_cpu_us_per_observation"]
    print(
        f"{'mode':<10} {'orders/s':>9} {'vs bare':>8} {'observations':>13} {'rec. CPU us/obs':>16}"
    )
    modes = list(result["orders_per_s"])
    for m in modes:
        print(
            f"{m:<10} {result['orders_per_s'][m]:>9} {result['ratio_vs_bare'][m]:>8} "
            f"{result['observations'][m]:>13} {cpu.get(m, '-'):>16}"
        )
    procs = sorted({p for v in result["cpu_ms_per_order"].values() for p in v})
    print("CPU ms per order while the orders ran:")
    print(f"{'mode':<10} " + " ".join(f"{p:>9}" for p in procs))
    for m in modes:
        row = result["cpu_ms_per_order"][m]
        print(f"{m:<10} " + " ".join(f"{row.get(p, '-'):>9}" for p in procs))
    print(json.dumps(result))

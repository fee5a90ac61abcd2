"""The fault suite's kit: one small flow per broker, the faults, and how to inject them.

A cell of the suite is a fault and a mode (``record``, ``run``, the pytest plugin).
Every fault is injected into one flowcheck process, found by its process id: the
RabbitMQ connections and Redis clients it holds (by their ``flowcheck-`` names and
the process's own sockets, so no other test's connection is touched), the bundled
Kafka broker the cell started itself, or the process itself (SIGTERM, SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from harness import rabbitmqctl
from redis.asyncio import Redis

from flowcheck.devkafka import LocalKafka
from flowcheck.observations import Kind, Observation
from flowcheck.trace import Reader

FLOW = "f"
CHAINS = 12  # chains a cell publishes: a few before the fault, the rest while it lasts
BEFORE = 4  # chains seen whole before the fault is injected
WITHIN = 45.0  # seconds for any one thing a cell waits on
POLL = 0.05  # seconds between looks at a file another process writes (no event to wait on)

_CHANNEL_KINDS = {
    "rabbitmq": (
        '{kind: exchange, type: topic, name: "%s.a"}',
        '{kind: queue, name: "%s.b", bindings: [{exchange: a, key: "c.*"}]}',
    ),
    "redis": ('{kind: stream, name: "%s.a"}', '{kind: stream, name: "%s.b"}'),
    "kafka": ('{kind: topic, name: "%s.a"}', '{kind: topic, name: "%s.b"}'),
}


@dataclass
class Cell:
    """What one cell runs against: a broker, its address, names of its own."""

    broker: str  # rabbitmq, redis or kafka
    address: str
    prefix: str
    kafka: LocalKafka | None = None  # the cell's own broker, for a fault that restarts it
    restarted: list[LocalKafka] = field(default_factory=list)

    @property
    def routed(self) -> bool:
        """Does the broker itself carry a chain from ``a`` to ``b`` (RabbitMQ's binding)?
        Elsewhere the publisher writes both steps, as the system would."""
        return self.broker == "rabbitmq"

    def topology(self) -> str:
        where = {"kafka": "bootstrap"}.get(self.broker, "url")
        a, b = (
            t.replace("{kind", "{broker: x, kind") % self.prefix
            for t in _CHANNEL_KINDS[self.broker]
        )
        return (
            f"name: {self.prefix}\n"
            f'brokers:\n  x: {{kind: {self.broker}, {where}: "{self.address}"}}\n'
            f"channels:\n  a: {a}\n  b: {b}\n"
            f"flows:\n  {FLOW}:\n    correlate: $.id\n    steps: [a, b]\n    deadline: 8s\n"
        )

    @property
    def rate(self) -> float:
        """Messages a second ``run`` publishes: slow enough that the fault lands while it
        publishes (closing a RabbitMQ connection takes rabbitmqctl seconds)."""
        return 3 if self.routed else 8

    @property
    def count(self) -> int:
        """Chains ``run`` publishes: publishing a step lasts a few seconds, less than the
        flow's deadline (``run`` publishes every ``a``, then every ``b``), and longer for
        RabbitMQ, whose fault lands late."""
        return round((8 if self.routed else 2.5) * self.rate)

    def scenario(self) -> str:
        sends = [("a", "c.x")] + ([] if self.routed else [("b", "")])
        lines = ["send:"]
        for channel, routing in sends:
            lines += [
                f"  - flow: {FLOW}",
                f"    channel: {channel}",
                f"    count: {self.count}",
                f"    rate: {self.rate}",
                '    key: "c{n}"',
                '    payload: {id: "{key}"}',
            ]
            if routing:
                lines.append(f"    routing_key: {routing}")
        return "\n".join(lines) + "\n"

    def steps(self) -> list[tuple[str, str | None]]:
        """What a chain's publisher writes: (channel, routing key)."""
        return [("a", "c.x")] + ([] if self.routed else [("b", None)])


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    name: str
    broker: str  # the broker of the cell's flow
    signal: int | None = None  # the fault is this signal to the flowcheck process
    keep_topics: bool = True  # Kafka: the restarted broker gets its topics back

    @property
    def lead(self) -> int:
        """Messages on ``a`` seen before the fault is set off: closing a RabbitMQ
        connection lands seconds after it is asked for (rabbitmqctl), so it is asked
        for early."""
        return 1 if self.broker == "rabbitmq" and not self.kills else BEFORE

    @property
    def kills(self) -> bool:
        return self.signal is not None

    def __str__(self) -> str:
        return self.name


FAULTS = [
    Fault("rabbitmq-close", "rabbitmq"),
    Fault("redis-kill", "redis"),
    Fault("kafka-restart", "kafka"),
    Fault("kafka-restart-empty", "kafka", keep_topics=False),
    # On Redis, whose chains the publisher writes step by step: one is left open.
    Fault("sigterm", "redis", signal=signal.SIGTERM),
    Fault("sigkill", "redis", signal=signal.SIGKILL),
]


def _ports(pid: int) -> set[int]:
    """The local TCP ports of the sockets process ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


async def rabbitmq_connections(pid: int) -> list[str]:
    """The flowcheck connections of process ``pid``, as RabbitMQ's connection pids.

    Listing and closing each start an Erlang VM (seconds on a busy host): a cell lists
    while flowcheck starts, then closes them all at once when the fault is due."""
    ports = _ports(pid)
    listing = await rabbitmqctl(
        "list_connections", "pid", "peer_port", "client_properties", "--no-table-headers"
    )
    return [
        conn
        for conn, port, props in (line.split("\t", 2) for line in listing.splitlines())
        if int(port) in ports and '{"connection_name","flowcheck-' in props
    ]


async def close_rabbitmq(connections: list[str]) -> None:
    """Close the connections from the broker's side, all at once."""
    async with anyio.create_task_group() as tg:
        for conn in connections:
            tg.start_soon(rabbitmqctl, "close_connection", conn, "flowcheck fault suite")


async def kill_redis(pid: int, url: str) -> int:
    """Kill, by id, the flowcheck clients of process ``pid`` (CLIENT KILL ID)."""
    ports = _ports(pid)
    client = Redis.from_url(url)
    try:
        killed = 0
        for c in await client.client_list():
            port = int(str(c["addr"]).rsplit(":", 1)[1])
            if port in ports and str(c.get("name", "")).startswith("flowcheck-"):
                killed += await client.client_kill_filter(_id=str(c["id"]))
        return killed
    finally:
        await client.aclose()


async def restart_kafka(cell: Cell, keep_topics: bool) -> None:
    """Kill the cell's Kafka broker and start an empty one on the same port; with
    ``keep_topics``, its topics are created again (their records are gone)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    old = cell.kafka
    assert old is not None
    assert old._proc is not None
    old._proc.kill()  # killed, not stopped: a graceful stop serves on while it shuts down
    await anyio.to_thread.run_sync(old.stop)
    again = await anyio.to_thread.run_sync(LocalKafka(port=old.port).start)
    cell.restarted.append(again)
    if keep_topics:
        admin = AIOKafkaAdminClient(bootstrap_servers=again.bootstrap)
        await admin.start()
        try:
            names = [f"{cell.prefix}.a", f"{cell.prefix}.b"]
            await admin.create_topics([NewTopic(n, 1, replication_factor=1) for n in names])
        finally:
            await admin.close()


async def aim(fault: Fault, cell: Cell, pid: int) -> Callable[[], Awaitable[None]]:
    """Aim ``fault`` at flowcheck process ``pid``, whose taps are watching: a function
    that injects it, hitting at least one thing."""
    if fault.signal is not None:
        return lambda: _signal(pid, fault.signal)
    if fault.broker == "rabbitmq":
        connections = await rabbitmq_connections(pid)
        assert connections
        return lambda: close_rabbitmq(connections)
    if fault.broker == "redis":

        async def kill() -> None:
            assert await kill_redis(pid, cell.address) >= 1

        return kill
    return lambda: restart_kafka(cell, fault.keep_topics)


async def _signal(pid: int, signum: int | None) -> None:
    assert signum is not None
    os.kill(pid, signum)


async def strike(fire: Callable[[], Awaitable[None]]) -> tuple[int, int]:
    """Inject; when (monotonic ns, the clock of every process here) it began and ended."""
    began = time.monotonic_ns()
    await fire()
    return began, time.monotonic_ns()


# --------------------------------------------------------------------------- waiting


async def until(what: str, done: Callable[[], Any], within: float = WITHIN) -> Any:
    """``done()``'s first true value; another process writes what it looks at, so it is
    looked at every POLL seconds, up to ``within`` (then the test fails, saying what)."""
    deadline = time.monotonic() + within
    while not (value := done()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {within:g}s waiting for {what}")
        await anyio.sleep(POLL)
    return value


def observed(trace: Path) -> list[dict[str, Any]]:
    """The complete lines of a trace file being written (the header left out)."""
    try:
        text = trace.read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[1:-1]  # the last piece may be half written
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def seen(trace: Path, channel: str, count: int) -> bool:
    """Has a tap seen ``count`` messages on ``channel``?"""
    kinds = ("routed", "delivered")
    return (
        sum(1 for o in observed(trace) if o.get("channel") == channel and o.get("kind") in kinds)
        >= count
    )


def complete(trace: Path, chains: int) -> bool:
    """Has the trace seen ``chains`` chains at their last step ``b``?"""
    return (
        sum(1 for o in observed(trace) if o.get("channel") == "b" and o.get("kind") != "gap")
        >= chains
    )


def reached(trace: Path, key: str) -> bool:
    """Has the chain ``key`` been seen at its last step ``b``?"""
    return any(
        o.get("channel") == "b"
        and o.get("kind") != "gap"
        and f'"{key}"' in (o.get("payload") or "")
        for o in observed(trace)
    )


def gap_closed(trace: Path) -> bool:
    return any(o.get("kind") == "gap" and o.get("until_ns") for o in observed(trace))


def gaps(trace: Path) -> list[Observation]:
    return [o for o in Reader(str(trace)) if o.kind is Kind.GAP]


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text


def judge(verdict: dict[str, Any]) -> tuple[int, int, int]:
    """The flow's (succeeded, failed, unknown) chains in a verdict.json, after asserting
    that nothing was called lost or failed."""
    (flow,) = [f for f in verdict["flows"] if f["flow"] == FLOW]
    kinds = {f["kind"] for f in flow["findings"]} | set(flow["findings_total"])
    assert "lost" not in kinds, flow["findings"]
    assert flow["failed"] == 0, flow["findings"]
    return flow["succeeded"], flow["failed"], flow["unknown"]

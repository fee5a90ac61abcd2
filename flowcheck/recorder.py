"""``flowcheck record``: tap a topology's channels and write every observation to a trace file."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from flowcheck.brokers import adapter
from flowcheck.brokers.base import Drift
from flowcheck.errors import leaf
from flowcheck.observations import Kind, Observation, now
from flowcheck.topology.model import Topology
from flowcheck.trace import Header, Writer, topology_hash
from flowcheck.tracer import Tracer

TICK = 0.25  # seconds between live-count refreshes and idle flushes


async def apply_all(topology: Topology) -> list[Drift]:
    """Declare every channel of the topology on its broker; return the drift found."""
    drift: list[Drift] = []
    for name in topology.brokers:
        if not any(ch.broker == name for ch in topology.channels.values()):
            continue
        async with adapter(name, topology) as ad:
            drift += await ad.apply()
    return drift


async def record(
    topology: Topology,
    out: str,
    *,
    topology_path: str | None = None,
    duration: float | None = None,
    apply: bool = False,
    on_tick: Callable[[Counter[str]], None] | None = None,
    on_ready: Callable[[], None] | None = None,
    stop: anyio.Event | None = None,
) -> Counter[str]:
    """Record until ``duration`` seconds pass, ``stop`` is set, or SIGINT/SIGTERM arrives.

    ``on_ready`` is called once every tap is watching. Returns the number of
    observations per channel. The trace file is complete and flushed when this
    returns, whatever stopped it.
    """
    stop = stop or anyio.Event()
    try:
        async with anyio.create_task_group() as signals:
            # Catch Ctrl-C from the very start, so even a stop while connecting is clean.
            await signals.start(_signals, stop)
            counts = await _record(
                topology, out, topology_path, duration, apply, on_tick, on_ready, stop
            )
            signals.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise leaf(group) from None
    return counts


async def _record(
    topology: Topology,
    out: str,
    topology_path: str | None,
    duration: float | None,
    apply: bool,
    on_tick: Callable[[Counter[str]], None] | None,
    on_ready: Callable[[], None] | None,
    stop: anyio.Event,
) -> Counter[str]:
    drift = await apply_all(topology) if apply else []
    mono, wall = now()
    header = Header(
        topology=topology.name,
        topology_sha256=topology_hash(topology_path) if topology_path else None,
        started=wall,
        started_mono_ns=mono,
    )
    with Writer(out, header) as writer:
        for d in drift:
            writer.write(
                Observation(
                    kind=Kind.DRIFT,
                    broker=topology.channels[d.channel].broker,
                    channel=d.channel,
                    mono_ns=mono,
                    wall=wall,
                    reason=str(d),
                )
            )
        tracer = Tracer(topology, [writer.write])
        async with tracer:
            if on_ready is not None:
                on_ready()
            deadline = None if duration is None else time.monotonic() + duration
            while not stop.is_set():
                with anyio.move_on_after(TICK):
                    await stop.wait()
                if writer.due():
                    writer.flush()
                if on_tick is not None:
                    on_tick(tracer.counts)
                if deadline is not None and time.monotonic() >= deadline:
                    stop.set()
        return tracer.counts


async def _signals(
    stop: anyio.Event, *, task_status: TaskStatus[None] = TASK_STATUS_IGNORED
) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            stop.set()
            return

"""The tracer's in-memory sink, without brokers."""

from __future__ import annotations

import anyio
import pytest

from flowcheck.observations import Kind, Observation, now
from flowcheck.tracer import Memory


def _obs(channel: str) -> Observation:
    mono, wall = now()
    return Observation(kind=Kind.ROUTED, broker="b", channel=channel, mono_ns=mono, wall=wall)


async def test_memory_wakes_every_waiter() -> None:
    memory = Memory()
    woken: list[str] = []

    async def wait(channel: str) -> None:
        await memory.wait_for(lambda items: any(o.channel == channel for o in items), 2)
        woken.append(channel)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait, "a")
        tg.start_soon(wait, "b")
        await anyio.wait_all_tasks_blocked()
        memory(_obs("b"))
        memory(_obs("a"))
    assert sorted(woken) == ["a", "b"]


async def test_memory_returns_at_once_when_the_predicate_already_holds() -> None:
    memory = Memory()
    memory(_obs("a"))
    assert len(await memory.wait_for(lambda items: len(items) == 1, 0.01)) == 1


async def test_memory_times_out() -> None:
    memory = Memory()
    with pytest.raises(TimeoutError):
        await memory.wait_for(lambda items: bool(items), 0.05)

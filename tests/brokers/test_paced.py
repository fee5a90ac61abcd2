"""Paced reads on a real socket pair: what waits, what does not, and for how long."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from flowcheck.brokers.rabbitmq._paced import FULL, PacedReads
from flowcheck.topology import loads

DEADLINE = 10  # seconds for anything that should happen at once


@dataclass
class Pair:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    paced: PacedReads
    transport: Any
    peer: socket.socket
    reads: list[tuple[float, int]]  # (loop time, bytes) of each read, as the stream got it


@asynccontextmanager
async def pair(interval: float, limit: int = 2**16) -> AsyncIterator[Pair]:
    ours, peer = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours, limit=limit)
    transport: Any = writer.transport
    inner = transport.get_protocol()
    loop = asyncio.get_running_loop()
    reads: list[tuple[float, int]] = []

    class Counting:  # the stream's protocol, counting its reads
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        def data_received(self, data: bytes) -> None:
            reads.append((loop.time(), len(data)))
            inner.data_received(data)

    paced = PacedReads(cast(asyncio.Protocol, Counting()), transport, interval)
    paced.active = True
    transport.set_protocol(paced)
    try:
        yield Pair(reader, writer, paced, transport, peer, reads)
    finally:
        writer.close()
        peer.close()


async def test_a_message_after_a_quiet_spell_is_read_at_once_and_what_follows_waits() -> None:
    async with pair(interval=0.3) as p:
        assert p.transport.is_reading()
        p.peer.sendall(b"a")
        assert await asyncio.wait_for(p.reader.readexactly(1), DEADLINE) == b"a"
        # The read paused the transport: what comes now gathers in the socket.
        assert not p.transport.is_reading()
        p.peer.sendall(b"b")
        p.peer.sendall(b"c")
        assert await asyncio.wait_for(p.reader.readexactly(2), DEADLINE) == b"bc"
        (first, _), (second, size) = p.reads
        assert size == 2  # both in one read
        assert second - first >= 0.3


async def test_a_full_read_does_not_pause_so_the_rate_is_never_capped() -> None:
    async with pair(interval=3600) as p:
        p.peer.sendall(b"x" * 4 * FULL)  # all in the socket before the loop reads
        await asyncio.wait_for(p.reader.readexactly(4 * FULL), DEADLINE)
        assert [n for _, n in p.reads] == [4 * FULL]
        assert p.transport.is_reading()
        assert p.paced._timer is None


async def test_the_streams_own_flow_control_is_left_to_it() -> None:
    async with pair(interval=3600, limit=8) as p:
        p.peer.sendall(b"y" * 100)  # over twice the stream's limit: it pauses the transport
        await asyncio.wait_for(p.reader.readexactly(1), DEADLINE)
        assert p.paced._timer is None  # no pause of ours to undo the stream's
        # Drained, the stream resumes reading by itself, and the rest comes.
        assert await asyncio.wait_for(p.reader.readexactly(99), DEADLINE) == b"y" * 99


async def test_until_active_and_after_stop_every_read_is_taken_at_once() -> None:
    async with pair(interval=3600) as p:
        p.paced.active = False  # a connection's setup: each read answers a request
        for n in range(3):
            p.peer.sendall(b"s")
            await asyncio.wait_for(p.reader.readexactly(1), DEADLINE)
            assert p.transport.is_reading(), n
        p.paced.active = True
        p.peer.sendall(b"t")
        await asyncio.wait_for(p.reader.readexactly(1), DEADLINE)
        assert not p.transport.is_reading()
        p.paced.stop()  # closing: the broker's answer must not wait out the pause
        assert p.transport.is_reading()
        assert p.paced._timer is None
        p.peer.sendall(b"u")
        assert await asyncio.wait_for(p.reader.readexactly(1), DEADLINE) == b"u"
        assert p.transport.is_reading()


async def test_a_closed_connection_is_seen_and_cancels_the_pause() -> None:
    async with pair(interval=3600) as p:
        p.peer.sendall(b"z")
        await asyncio.wait_for(p.reader.readexactly(1), DEADLINE)
        timer = p.paced._timer
        assert timer is not None
        p.writer.close()
        await asyncio.wait_for(p.writer.wait_closed(), DEADLINE)
        assert timer.cancelled()
        assert p.paced._timer is None


def test_a_rabbitmq_tap_may_be_as_late_as_its_read_interval() -> None:
    text = """
brokers: {r: {kind: rabbitmq, tap_read_interval: 2ms}, d: {kind: rabbitmq}}
channels: {q: {broker: r, kind: queue}, p: {broker: d, kind: queue}}
"""
    top = loads(text)
    assert top.tap_late("q") == (timedelta(milliseconds=2), "broker 'r': tap_read_interval")
    assert top.tap_late("p") == (timedelta(milliseconds=10), "broker 'd': tap_read_interval")

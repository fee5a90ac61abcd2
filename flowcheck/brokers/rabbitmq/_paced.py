"""Reading a RabbitMQ tap's connection at most once per interval while messages keep coming.

RabbitMQ pushes each delivery the moment it routes it. At a few hundred a second,
each one wakes the tap alone, and a wake-up costs the tap, and the system it shares
the machine with, far more than the message itself: the event loop, a receive call,
aiormq's reader task. Paused for a few milliseconds after each read, the socket
gathers what arrives meanwhile, and the next read takes it all at once.

Pacing starts only once the tap consumes: before that, every read is the answer
to a request (opening the connection, declaring and binding the twins), and each
would wait out the interval.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

# A read this large means messages come faster than pausing would gather them: read
# on at once, so pacing never caps the rate. (A TLS record holds at most 16 KiB.)
FULL = 16 * 1024


class PacedReads(asyncio.Protocol):
    """A stream's protocol, wrapped: after each read the transport pauses for ``interval``.

    A message that arrives while the tap idles is read at once; only messages that
    follow a read within the interval wait, at most that long. Off until ``active``.
    """

    def __init__(
        self, inner: asyncio.Protocol, transport: asyncio.Transport, interval: float
    ) -> None:
        self._inner = inner
        self._transport = transport
        self._interval = interval
        self._timer: asyncio.TimerHandle | None = None
        self.active = False

    def stop(self) -> None:
        """Read at once again, as when not yet active: a connection's close is a request too."""
        self.active = False
        if self._timer is not None:
            self._timer.cancel()
            self._resume()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)
        # A stream whose buffer is full pauses the transport itself and resumes it once
        # drained: leave it to that.
        if self.active and len(data) < FULL and self._transport.is_reading():
            self._transport.pause_reading()
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._resume)

    def _resume(self) -> None:
        self._timer = None
        if not self._transport.is_closing():
            self._transport.resume_reading()


class _PacedFactory(TransportFactory):
    """aiormq's own transport (TCP, or TLS for amqps), its reads paced."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.reads: PacedReads | None = None

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        base = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await base.create(url, **kwargs)
        transport: Any = writer.transport
        self.reads = PacedReads(transport.get_protocol(), transport, self.interval)
        transport.set_protocol(self.reads)
        return reader, writer


class PacedConnection(aio_pika.Connection):
    """An aio-pika connection that, once :meth:`pace` is called, reads at most once per
    ``interval`` while data keeps coming. Made by :func:`paced_connection`."""

    interval = 0.01

    async def connect(self, timeout: Any = None) -> None:  # noqa: ASYNC109 - aio-pika's signature
        # aio-pika hands its kwargs to aiormq's connection, which takes the factory.
        self._factory = self.kwargs["transport_factory"] = _PacedFactory(self.interval)
        await super().connect(timeout)

    def pace(self, on: bool = True) -> None:
        """Start pacing reads once the connection's setup requests are answered; stop
        before closing it."""
        reads = self._factory.reads
        if reads is not None:
            if on:
                reads.active = True
            else:
                reads.stop()


def paced_connection(interval: float) -> type[PacedConnection]:
    """A :class:`PacedConnection` class for ``aio_pika.connect(connection_class=...)``."""
    return type("Paced", (PacedConnection,), {"interval": interval})

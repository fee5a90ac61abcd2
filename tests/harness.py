"""Pieces of the real-broker test harness, kept out of conftest.py so they can be tested.

- probes: can a broker be reached? They return a ready-to-print failure message
  (broker, redacted address, variable to set) instead of raising.
- unique_prefix: a per-test name prefix, so tests never share queues, topics or keys.
- AmqpScope / KafkaScope / delete_keys: clients that remember what a test
  created and remove it afterwards.
- forwarder: a broker reached through a local TCP forwarder that a test can cut,
  so that the broker looks down to whatever connects through it.
- rabbitmq_vhost: a RabbitMQ virtual host of a test's own, for broker state (the
  firehose) that no other test or process may share.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aio_pika
import anyio
import anyio.abc
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiormq.exceptions import ChannelNotFoundEntity
from pamqp.common import Arguments
from redis.asyncio import Redis

from flowcheck import defaults
from flowcheck.redact import MASK, redact_url

PROBE_TIMEOUT = 5.0  # seconds; a broker that needs longer to say hello is not "up"
CLEANUP_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class Broker:
    name: str
    env_var: str


RABBITMQ = Broker("RabbitMQ", defaults.RABBITMQ_URL_VAR)
KAFKA = Broker("Kafka", defaults.KAFKA_BOOTSTRAP_VAR)
REDIS = Broker("Redis", defaults.REDIS_URL_VAR)


def _scrub(text: str, address: str) -> str:
    """Mask the address's password wherever a client library echoed it back."""
    try:
        password = urlsplit(address).password
    except ValueError:
        return text
    if not password:
        return text
    for secret in {password, unquote(password)}:  # as written in the URL, and decoded
        text = text.replace(secret, MASK)
    return text


def unreachable_message(broker: Broker, address: str, cause: BaseException) -> str:
    """What to tell the person running the tests; never contains a password."""
    detail = str(cause).rstrip(". ") or type(cause).__name__
    if isinstance(cause, TimeoutError):
        detail = "no answer in time"
    return (
        f"cannot connect to {broker.name} at {redact_url(address)}: {_scrub(detail, address)}. "
        f"Start {broker.name} there, or set {broker.env_var} to one that is running "
        "(`docker compose up -d --wait` starts all the brokers)."
    )


async def _probe(broker: Broker, address: str, check: Callable[[], Awaitable[None]]) -> str | None:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await check()
    except Exception as exc:  # any failure means "not usable"; the message says which
        return unreachable_message(broker, address, exc)
    return None


async def probe_rabbitmq(url: str) -> str | None:
    """None if RabbitMQ accepts a connection at ``url``, else the failure message."""

    async def check() -> None:
        connection = await aio_pika.connect(url, timeout=PROBE_TIMEOUT)
        await connection.close()

    return await _probe(RABBITMQ, url, check)


async def probe_kafka(bootstrap: str) -> str | None:
    """None if a Kafka client can bootstrap (a Metadata round trip) from ``bootstrap``."""

    async def check() -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=int(PROBE_TIMEOUT * 1000)
        )
        try:
            await admin.start()
        finally:
            await admin.close()

    return await _probe(KAFKA, bootstrap, check)


async def probe_redis(url: str) -> str | None:
    """None if Redis answers PING at ``url``, else the failure message."""

    async def check() -> None:
        client = Redis.from_url(
            url, socket_connect_timeout=PROBE_TIMEOUT, socket_timeout=PROBE_TIMEOUT
        )
        try:
            await client.ping()
        finally:
            await client.aclose()

    return await _probe(REDIS, url, check)


_NOT_NAME = re.compile(r"[^a-z0-9.-]+")


def unique_prefix(test_name: str, max_len: int = 40) -> str:
    """``test_name`` squeezed into [a-z0-9.-] plus a random suffix.

    The name says which test left something behind; the suffix keeps reruns,
    parametrized cases and pytest-xdist workers apart. The result is a valid
    RabbitMQ queue, Kafka topic and Redis key, and has no glob characters.
    """
    base = _NOT_NAME.sub("-", test_name.lower()).strip(".-")[:max_len].strip(".-")
    return f"{base or 'test'}-{secrets.token_hex(4)}"


@dataclass
class AmqpScope:
    """A RabbitMQ connection and channel that delete what was declared through them."""

    connection: AbstractConnection
    channel: AbstractChannel
    queues: list[str] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)

    @classmethod
    async def open(cls, url: str) -> AmqpScope:
        # A plain connection, not a robust one: a test should see a dropped
        # connection fail rather than have it quietly re-established.
        connection = await aio_pika.connect(url, timeout=PROBE_TIMEOUT)
        return cls(connection, await connection.channel())

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: Arguments = None,
    ) -> AbstractQueue:
        # Recorded first, so a declare that half-succeeds is still cleaned up.
        self.queues.append(name)
        return await self.channel.declare_queue(
            name, durable=durable, exclusive=exclusive, auto_delete=auto_delete, arguments=arguments
        )

    async def declare_exchange(
        self,
        name: str,
        type: aio_pika.ExchangeType = aio_pika.ExchangeType.TOPIC,
        *,
        durable: bool = False,
        arguments: Arguments = None,
    ) -> AbstractExchange:
        self.exchanges.append(name)
        return await self.channel.declare_exchange(name, type, durable=durable, arguments=arguments)

    async def queue_exists(self, name: str) -> bool:
        return await self._exists(name, queue=True)

    async def exchange_exists(self, name: str) -> bool:
        return await self._exists(name, queue=False)

    async def _exists(self, name: str, *, queue: bool) -> bool:
        # A passive declare of something missing closes its channel: use a spare one.
        async with self.connection.channel() as channel:
            try:
                if queue:
                    await channel.declare_queue(name, passive=True)
                else:
                    await channel.declare_exchange(name, passive=True)
            except ChannelNotFoundEntity:
                return False
        return True

    async def cleanup(self) -> None:
        """Delete every recorded queue and exchange; deleting a missing one is fine."""
        # A fresh channel: a test may have broken its own (e.g. a failed passive declare).
        async with self.connection.channel() as channel:
            for queue in reversed(self.queues):
                await channel.queue_delete(queue)
            for exchange in reversed(self.exchanges):
                await channel.exchange_delete(exchange)
        self.queues.clear()
        self.exchanges.clear()

    async def close(self) -> None:
        try:
            await self.cleanup()
        finally:
            await self.connection.close()


@dataclass
class KafkaScope:
    """An admin client plus producer/consumer factories; deletes the test's topics."""

    bootstrap: str
    prefix: str
    admin: AIOKafkaAdminClient
    topics: set[str] = field(default_factory=set)
    clients: list[Any] = field(default_factory=list)

    @classmethod
    async def open(cls, bootstrap: str, prefix: str) -> KafkaScope:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        return cls(bootstrap, prefix, admin)

    async def create_topic(self, name: str, partitions: int = 1) -> str:
        self.topics.add(name)
        await self.admin.create_topics([NewTopic(name, partitions, replication_factor=1)])
        return name

    async def topic_names(self) -> set[str]:
        names: list[str] = await self.admin.list_topics()
        return set(names)

    async def producer(self, **options: Any) -> AIOKafkaProducer:
        """A started producer, stopped by cleanup(); ``options`` go to AIOKafkaProducer."""
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, **options)
        await producer.start()
        self.clients.append(producer)
        return producer

    async def consumer(self, *topics: str, **options: Any) -> AIOKafkaConsumer:
        """A started consumer, stopped by cleanup(); ``options`` go to AIOKafkaConsumer."""
        consumer = AIOKafkaConsumer(*topics, bootstrap_servers=self.bootstrap, **options)
        await consumer.start()
        self.clients.append(consumer)
        return consumer

    async def cleanup(self) -> None:
        """Stop the clients, then delete recorded topics and any topic under the prefix."""
        # Clients first: their metadata refreshes would re-create an auto-created topic.
        while self.clients:
            await self.clients.pop().stop()
        existing = await self.topic_names()
        doomed = {t for t in existing if t in self.topics or t.startswith(self.prefix)}
        self.topics.clear()
        if not doomed:
            return
        await self.admin.delete_topics(sorted(doomed))
        # Kafka finishes a deletion asynchronously and offers nothing to wait on,
        # so poll the topic list, under a deadline, until the topics are gone.
        async with asyncio.timeout(CLEANUP_TIMEOUT):
            while doomed & await self.topic_names():  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        try:
            await self.cleanup()
        finally:
            await self.admin.close()


async def delete_keys(client: Redis, prefix: str) -> int:
    """Delete every key starting with ``prefix``; return how many went."""
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
    if not keys:
        return 0
    deleted: int = await client.unlink(*keys)
    return deleted


@asynccontextmanager
async def forwarder(
    url: str, default_port: int
) -> AsyncIterator[tuple[str, Callable[[], Awaitable[None]]]]:
    """``url`` reached through a local TCP forwarder: (the URL through it, cut).

    Cutting drops every forwarded connection and stops listening, so the
    broker looks down: reconnecting is refused until the test ends.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    local_port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def pipe(client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp(host, port) as upstream:

            async def copy(a: anyio.abc.SocketStream, b: anyio.abc.SocketStream) -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    async for chunk in a:
                        await b.send(chunk)
                await b.send_eof()

            async with anyio.create_task_group() as both:
                both.start_soon(copy, client, upstream)
                both.start_soon(copy, upstream, client)

    # Its own scope: cancelling the task group itself would cancel the test's body too.
    scope, closed = anyio.CancelScope(), anyio.Event()

    async def serve() -> None:
        try:
            with scope:
                async with listener:
                    await listener.serve(pipe)
        finally:
            closed.set()

    async def cut() -> None:
        scope.cancel()  # closes the listener and every connection through it
        await closed.wait()

    login = f"{parts.username}:{parts.password}@" if parts.password else ""
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        yield urlunsplit(parts._replace(netloc=f"{login}127.0.0.1:{local_port}")), cut
        await cut()


async def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl`` on the local node; its standard output."""
    result = await anyio.run_process(["rabbitmqctl", "-q", *args])
    return result.stdout.decode()


@asynccontextmanager
async def rabbitmq_vhost(url: str, name: str) -> AsyncIterator[str]:
    """A fresh virtual host ``name`` that ``url``'s user may use fully: the URL for it.

    Deleted afterwards, with everything in it; the broker's other virtual hosts are
    never touched.
    """
    await rabbitmqctl("add_vhost", name)
    try:
        user = unquote(urlsplit(url).username or "guest")
        await rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        yield urlunsplit(urlsplit(url)._replace(path="/" + quote(name, safe="")))
    finally:
        with anyio.CancelScope(shield=True):
            await rabbitmqctl("delete_vhost", name)

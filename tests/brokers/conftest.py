"""Shared pieces of the adapter tests against the real brokers.

A :class:`Kit` is what the shared (conformance) test bodies need to know about
one broker: a small topology with unique channel names, the channel to publish
to, the channels each message must then be seen on, and how the system itself
would consume N messages. ``kit`` is parametrized over the three brokers;
``adapter`` is a connected adapter for the kit's topology that deletes the
topology's channels afterwards.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import anyio
import anyio.abc
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from harness import forwarder
from redis.asyncio import Redis

import flowcheck
from flowcheck.brokers import Adapter
from flowcheck.brokers import adapter as make_adapter
from flowcheck.devkafka import LocalKafka
from flowcheck.errors import leaf
from flowcheck.observations import ID_HEADER, Kind, Observation
from flowcheck.topology import Topology
from flowcheck.tracer import Tracer

WITHIN = 10.0  # seconds to wait for one event on RabbitMQ or Redis; it takes milliseconds
KAFKA_WITHIN = 30.0  # Kafka: a group consumer needs ~5 s to join on the local broker
SECRET = "s3cr3t-Pa55w0rd-never-shown"
FLOW = "orders"  # every kit's flow correlates by $.order_id

Consume = Callable[[int], Awaitable[list[str]]]
# Publish as any other system would, with the broker's plain client: (body, headers).
# A body of None is a Kafka tombstone, or a Redis entry without the payload field.
Send = Callable[[bytes | None, dict[str, str]], Awaitable[None]]
Sender = Callable[[], AbstractAsyncContextManager[Send]]
BIG_BODY = 10 * 1024 * 1024  # the biggest body the tests send through a plain client
# The kit's topology reaching a broker the test can take down: (topology, take it down).
Outage = Callable[[], AbstractAsyncContextManager[tuple[Topology, Callable[[], Awaitable[None]]]]]


@dataclass(frozen=True)
class Kit:
    """One broker, as the shared test bodies see it."""

    kind: str  # "rabbitmq", "kafka" or "redis"
    label: str  # how the broker's errors name its kind: "RabbitMQ", "Kafka", "Redis"
    broker: str  # the broker's key in the topology
    prefix: str  # the test's unique name prefix; every channel name starts with it
    yaml: str
    topology: Topology
    publish_to: str  # channel key the tests publish to
    routing_key: str | None  # for publishes to a RabbitMQ exchange
    seen_on: tuple[str, ...]  # channels each published message must be tapped on
    consume: Consume  # consume N messages as the system would: their fc_ids, in order
    sender: Sender  # a plain client of the broker, publishing to ``publish_to``
    with_login: Callable[[str, int | None], Topology]  # (password, port or None) -> topology
    within: float
    outage: Outage


def order(n: int | str, **extra: object) -> bytes:
    """A JSON order whose correlation key (``$.order_id``) is ``o-<n>``."""
    return json.dumps({"order_id": f"o-{n}", **extra}).encode()


def of(items: Sequence[Observation], kind: Kind, channel: str | None = None) -> list[Observation]:
    """The observations of ``kind`` (on ``channel``), in the order they were made."""
    return [o for o in items if o.kind is kind and (channel is None or o.channel == channel)]


def ids(items: Sequence[Observation], kind: Kind, channel: str | None = None) -> list[str]:
    """The fc_ids of the observations of ``kind`` (on ``channel``), in order."""
    return [o.fc_id for o in of(items, kind, channel) if o.fc_id is not None]


def load(text: str, **env: str) -> Topology:
    return flowcheck.loads(text, env=env)


# ---------------------------------------------------------------- RabbitMQ


RABBITMQ_YAML = """
brokers:
  rabbit: {{kind: rabbitmq, url: "${{FC_URL}}"}}
channels:
  events: {{broker: rabbit, kind: exchange, type: topic, name: "{p}.events", durable: false}}
  inbox:
    broker: rabbit
    kind: queue
    name: "{p}.inbox"
    durable: false
    bindings: [{{exchange: events, key: "order.#"}}]
services:
  billing: {{publishes: [events], consumes: [inbox]}}
flows:
  orders:
    correlate: $.order_id
    steps: [events, inbox]
"""


def rabbitmq_kit(url: str, prefix: str) -> Kit:
    text = RABBITMQ_YAML.format(p=prefix)
    topology = load(text, FC_URL=url)

    async def consume(n: int) -> list[str]:
        got: list[str] = []
        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(f"{prefix}.inbox", passive=True)
            with anyio.fail_after(WITHIN):
                async with queue.iterator() as messages:
                    async for message in messages:
                        async with message.process():
                            got.append(str((message.headers or {})[ID_HEADER]))
                        if len(got) == n:
                            break
        finally:
            await connection.close()
        return got

    @asynccontextmanager
    async def sender() -> AsyncIterator[Send]:
        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel()
            exchange = await channel.get_exchange(f"{prefix}.events", ensure=False)

            async def send(body: bytes | None, headers: dict[str, str]) -> None:
                message = aio_pika.Message(body or b"", headers=dict(headers))
                await exchange.publish(message, routing_key="order.placed")

            yield send
        finally:
            await connection.close()

    def with_login(password: str, port: int | None) -> Topology:
        where = f"127.0.0.1:{port}" if port else _host_port(url, 5672)
        return load(text, FC_URL=f"amqp://guest:{password}@{where}/")

    @asynccontextmanager
    async def outage() -> AsyncIterator[tuple[Topology, Callable[[], Awaitable[None]]]]:
        async with forwarder(url, 5672) as (local, cut):
            yield load(text, FC_URL=local), cut

    return Kit(
        "rabbitmq",
        "RabbitMQ",
        "rabbit",
        prefix,
        text,
        topology,
        publish_to="events",
        routing_key="order.placed",
        seen_on=("events", "inbox"),
        consume=consume,
        sender=sender,
        with_login=with_login,
        within=WITHIN,
        outage=outage,
    )


# ---------------------------------------------------------------- Kafka


KAFKA_YAML = """
brokers:
  kafka: {{kind: kafka, bootstrap: "{bootstrap}"{security}}}
channels:
  events: {{broker: kafka, kind: topic, name: "{p}.events", partitions: 2}}
services:
  billing: {{consumes: [{{channel: events, group: "{p}.billing"}}]}}
flows:
  orders:
    correlate: $.order_id
    steps: [events]
"""


def kafka_kit(bootstrap: str, prefix: str) -> Kit:
    text = KAFKA_YAML.format(p=prefix, bootstrap=bootstrap, security="")
    topology = load(text)

    async def consume(n: int) -> list[str]:
        got: list[str] = []
        consumer = AIOKafkaConsumer(
            f"{prefix}.events",
            bootstrap_servers=bootstrap,
            group_id=f"{prefix}.billing",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            with anyio.fail_after(KAFKA_WITHIN):
                while len(got) < n:
                    batches = await consumer.getmany(timeout_ms=500)
                    for records in batches.values():
                        got += [dict(r.headers)[ID_HEADER].decode() for r in records]
                await consumer.commit()
        finally:
            await consumer.stop()
        return got

    @asynccontextmanager
    async def sender() -> AsyncIterator[Send]:
        # Room for BIG_BODY: the bundled broker takes it; a real one needs
        # message.max.bytes raised as well.
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=2 * BIG_BODY)
        await producer.start()
        try:

            async def send(body: bytes | None, headers: dict[str, str]) -> None:
                headers_ = [(k, v.encode()) for k, v in headers.items()]
                # A tombstone (a null value) must have a key; other records have none.
                key = b"tombstone" if body is None else None
                await producer.send_and_wait(f"{prefix}.events", body, key=key, headers=headers_)

            yield send
        finally:
            await producer.stop()

    def with_login(password: str, port: int | None) -> Topology:
        where = f"127.0.0.1:{port}" if port else bootstrap.split(",")[0]
        security = (
            ", security: {protocol: SASL_PLAINTEXT, sasl_mechanism: PLAIN, "
            'username: flowcheck, password: "${FC_PASSWORD}"}'
        )
        return load(
            KAFKA_YAML.format(p=prefix, bootstrap=where, security=security), FC_PASSWORD=password
        )

    @asynccontextmanager
    async def outage() -> AsyncIterator[tuple[Topology, Callable[[], Awaitable[None]]]]:
        # Clients reach Kafka at the address it advertises, not through a forwarder:
        # a broker of the test's own, stopped.
        local = await anyio.to_thread.run_sync(LocalKafka().start)
        try:
            ours = load(KAFKA_YAML.format(p=prefix, bootstrap=local.bootstrap, security=""))
            async with make_adapter("kafka", ours) as ad:  # gone with the broker: no clean-up
                await ad.apply()
            yield ours, lambda: anyio.to_thread.run_sync(local.stop)
        finally:
            await anyio.to_thread.run_sync(local.stop)

    return Kit(
        "kafka",
        "Kafka",
        "kafka",
        prefix,
        text,
        topology,
        publish_to="events",
        routing_key=None,
        seen_on=("events",),
        consume=consume,
        sender=sender,
        with_login=with_login,
        within=KAFKA_WITHIN,
        outage=outage,
    )


# ---------------------------------------------------------------- Redis


REDIS_YAML = """
brokers:
  redis: {{kind: redis, url: "${{FC_URL}}"}}
channels:
  events: {{broker: redis, kind: stream, name: "{p}.events", groups: [billing]}}
services:
  billing: {{consumes: [{{channel: events, group: billing}}]}}
flows:
  orders:
    correlate: $.order_id
    steps: [events]
"""


def redis_kit(url: str, prefix: str) -> Kit:
    text = REDIS_YAML.format(p=prefix)
    topology = load(text, FC_URL=url)
    stream = f"{prefix}.events"

    async def consume(n: int) -> list[str]:
        got: list[str] = []
        client = Redis.from_url(url)
        try:
            with anyio.fail_after(WITHIN):
                while len(got) < n:
                    for entry_id, fields in await read_group(
                        client, stream, "billing", "worker-1", count=n - len(got)
                    ):
                        got.append(fields[ID_HEADER])
                        await client.xack(stream, "billing", entry_id)
        finally:
            await client.aclose()
        return got

    @asynccontextmanager
    async def sender() -> AsyncIterator[Send]:
        client = Redis.from_url(url)
        try:

            async def send(body: bytes | None, headers: dict[str, str]) -> None:
                fields: dict[str, str | bytes] = dict(headers)
                if body is not None:
                    fields["payload"] = body
                await client.xadd(stream, fields)  # type: ignore[arg-type]

            yield send
        finally:
            await client.aclose()

    def with_login(password: str, port: int | None) -> Topology:
        where = f"127.0.0.1:{port}" if port else _host_port(url, 6379)
        return load(text, FC_URL=f"redis://flowcheck-nobody:{password}@{where}/0")

    @asynccontextmanager
    async def outage() -> AsyncIterator[tuple[Topology, Callable[[], Awaitable[None]]]]:
        async with forwarder(url, 6379) as (local, cut):
            yield load(text, FC_URL=local), cut

    return Kit(
        "redis",
        "Redis",
        "redis",
        prefix,
        text,
        topology,
        publish_to="events",
        routing_key=None,
        seen_on=("events",),
        consume=consume,
        sender=sender,
        with_login=with_login,
        within=WITHIN,
        outage=outage,
    )


async def read_group(
    client: Redis, stream: str, group: str, consumer: str, *, count: int
) -> list[tuple[str, dict[str, str]]]:
    """XREADGROUP of new entries (blocking up to 0.5 s): [(entry id, fields)], decoded."""
    reply: Any = await client.xreadgroup(group, consumer, {stream: ">"}, count=count, block=500)
    out: list[tuple[str, dict[str, str]]] = []
    for _, entries in reply or ():
        for entry_id, fields in entries:
            out.append((entry_id.decode(), {k.decode(): v.decode() for k, v in fields.items()}))
    return out


def _host_port(url: str, default_port: int) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or default_port}"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(params=["rabbitmq", "kafka", "redis"])
def kit(request: pytest.FixtureRequest, unique: str) -> Kit:
    """The broker under test (only that broker's session fixture is started)."""
    kind: str = request.param
    if kind == "rabbitmq":
        return rabbitmq_kit(request.getfixturevalue("rabbitmq_url"), unique)
    if kind == "kafka":
        return kafka_kit(request.getfixturevalue("kafka_bootstrap"), unique)
    return redis_kit(request.getfixturevalue("redis_url"), unique)


@asynccontextmanager
async def cleaned(topology: Topology, broker: str) -> AsyncIterator[Adapter]:
    """A connected adapter for ``broker``; the topology's channels on it are deleted after."""
    ad = make_adapter(broker, topology)
    await ad.connect()
    try:
        yield ad
    finally:
        try:
            await ad.delete(ad.channels())
        finally:
            await ad.close()


@pytest_asyncio.fixture
async def adapter(kit: Kit) -> AsyncIterator[Adapter]:
    """A connected adapter for the kit's topology (not yet applied); cleans up after."""
    async with cleaned(kit.topology, kit.broker) as ad:
        yield ad


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port that refuses connections: bound, so nobody else takes it, but not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def tap_raising(
    topology: Topology, then: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Tap until ``then`` returns (or, without it, stop at once); raise what the tap raised."""
    try:
        async with Tracer(topology, []):
            if then is not None:
                await then()
    except BaseExceptionGroup as group:
        raise leaf(group) from None

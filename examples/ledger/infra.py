"""Declare and remove the ledger's broker objects; both are idempotent."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from .config import PARTITIONS, Settings

TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code
TOPIC_DELETE_TIMEOUT = 15.0


async def setup(settings: Settings) -> None:
    """Declare every exchange, queue, topic, stream and group the ledger uses."""
    await _setup_kafka(settings)
    await _setup_redis(settings)
    await _setup_rabbitmq(settings)


async def teardown(settings: Settings) -> None:
    """Delete everything setup() declared. Stop the services first."""
    await _teardown_rabbitmq(settings)
    await _teardown_redis(settings)
    await _teardown_kafka(settings)


def _topics(settings: Settings) -> dict[str, int]:
    names = settings.names
    # Same count for the retry topic: a retried transaction keeps its partition, so one
    # poster consumer sees all of an account's attempts.
    return {names.tx: PARTITIONS, names.tx_retry: PARTITIONS, names.tx_dlt: 1}


async def _setup_kafka(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.brokers.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, partitions, replication_factor=1)
            for name, partitions in _topics(settings).items()
            if name not in existing
        ]
        if not wanted:
            return
        try:
            response: Any = await admin.create_topics(wanted)
        except TopicAlreadyExistsError:
            return
        for topic, code, *rest in getattr(response, "topic_errors", []):
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise RuntimeError(f"cannot create Kafka topic {topic}: error {code} {rest}")
    finally:
        await admin.close()


async def _teardown_kafka(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.brokers.kafka_bootstrap)
    await admin.start()
    try:
        doomed = set(_topics(settings)) & set(await admin.list_topics())
        if not doomed:
            return
        await admin.delete_topics(sorted(doomed))
        async with asyncio.timeout(TOPIC_DELETE_TIMEOUT):
            while doomed & set(await admin.list_topics()):  # noqa: ASYNC110 (nothing to wait on)
                await asyncio.sleep(0.05)
    finally:
        await admin.close()


async def _setup_redis(settings: Settings) -> None:
    names = settings.names
    redis = Redis.from_url(settings.brokers.redis_url)
    try:
        try:
            await redis.xgroup_create(names.posted, names.settler_group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
    finally:
        await redis.aclose()


async def _teardown_redis(settings: Settings) -> None:
    names = settings.names
    redis = Redis.from_url(settings.brokers.redis_url)
    try:
        await redis.delete(names.posted, names.posted_dead)
    finally:
        await redis.aclose()


async def _setup_rabbitmq(settings: Settings) -> None:
    names = settings.names
    connection = await aio_pika.connect(settings.brokers.rabbitmq_url)
    try:
        channel = await connection.channel()
        settled = await channel.declare_exchange(
            names.settled, aio_pika.ExchangeType.FANOUT, durable=True
        )
        await channel.declare_exchange(names.settled_v2, aio_pika.ExchangeType.FANOUT, durable=True)
        for queue in (names.audit, names.notify):
            declared = await channel.declare_queue(queue, durable=True)
            await declared.bind(settled)
    finally:
        await connection.close()


async def _teardown_rabbitmq(settings: Settings) -> None:
    names = settings.names
    connection = await aio_pika.connect(settings.brokers.rabbitmq_url)
    try:
        channel = await connection.channel()
        for queue in (names.audit, names.notify):
            await channel.queue_delete(queue)
        for exchange in (names.settled, names.settled_v2):
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()

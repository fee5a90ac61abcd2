"""Declare and remove the shop's broker objects; both are idempotent."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .config import (
    BILLING_DELIVERY_LIMIT,
    DEAD_LETTER_KEY,
    ORDER_PLACED,
    ORDER_REQUESTED,
    PAYMENTS_DLT_PARTITIONS,
    PAYMENTS_PARTITIONS,
    Settings,
)

TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code
TOPIC_DELETE_TIMEOUT = 15.0
# A dropped Redis connection (a restart, a failover, CLIENT KILL) is reconnected and the
# command sent again, waiting 50 ms, 100 ms, ... at most 2 s between tries: about 30 s
# in all before a service gives up. Without it, redis-py raises at the first drop.
REDIS_RETRIES = 20
REDIS_BACKOFF = ExponentialBackoff(cap=2.0, base=0.05)


def connect_redis(settings: Settings, service: str, **options: Any) -> Redis:
    """A Redis client for ``service`` that outlives a dropped connection. A command sent
    again may run twice (an XADD whose reply was lost): the shop handles Redis messages
    at least once. The connection is named (CLIENT SETNAME) after the service."""
    return Redis.from_url(
        settings.brokers.redis_url,
        client_name=settings.names.redis_client(service),
        retry=Retry(REDIS_BACKOFF, REDIS_RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        **options,
    )


async def setup(settings: Settings) -> None:
    """Declare every exchange, queue, binding, topic, stream and group the shop uses."""
    await setup_rabbitmq(settings)
    await setup_kafka(settings)
    await setup_redis(settings)


async def teardown(settings: Settings) -> None:
    """Delete everything setup() declared (under the settings' prefix). Stop the services first."""
    await teardown_rabbitmq(settings)
    await teardown_kafka(settings)
    await teardown_redis(settings)


async def setup_rabbitmq(settings: Settings) -> None:
    names = settings.names
    connection = await aio_pika.connect(settings.brokers.rabbitmq_url)
    try:
        channel = await connection.channel()
        orders = await channel.declare_exchange(
            names.orders_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        dlx = await channel.declare_exchange(
            names.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        billing = await channel.declare_queue(
            names.billing_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": BILLING_DELIVERY_LIMIT,
                "x-dead-letter-exchange": names.dead_letter_exchange,
                "x-dead-letter-routing-key": DEAD_LETTER_KEY,
            },
        )
        await billing.bind(orders, ORDER_PLACED)
        requests = await channel.declare_queue(names.checkout_requests, durable=True)
        await requests.bind(orders, ORDER_REQUESTED)
        dlq = await channel.declare_queue(names.billing_dlq, durable=True)
        await dlq.bind(dlx, DEAD_LETTER_KEY)
    finally:
        await connection.close()


async def teardown_rabbitmq(settings: Settings) -> None:
    names = settings.names
    connection = await aio_pika.connect(settings.brokers.rabbitmq_url)
    try:
        channel = await connection.channel()
        # Deleting something that is not there is not an error in AMQP 0-9-1.
        for queue in (names.checkout_requests, names.billing_queue, names.billing_dlq):
            await channel.queue_delete(queue)
        for exchange in (names.orders_exchange, names.dead_letter_exchange):
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


def _topics(settings: Settings) -> dict[str, int]:
    names = settings.names
    return {
        names.payments: PAYMENTS_PARTITIONS,
        names.payments_retry: PAYMENTS_PARTITIONS,  # same count: a retry keeps its partition
        names.payments_dlt: PAYMENTS_DLT_PARTITIONS,
    }


async def setup_kafka(settings: Settings) -> None:
    # Explicitly, before any client touches the topics: brokers that auto-create
    # topics would otherwise create them with their default partition count.
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
        except TopicAlreadyExistsError:  # a concurrent setup won the race
            return
        for topic, code, *rest in getattr(response, "topic_errors", []):
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise RuntimeError(f"cannot create Kafka topic {topic}: error {code} {rest}")
    finally:
        await admin.close()


async def teardown_kafka(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.brokers.kafka_bootstrap)
    await admin.start()
    try:
        doomed = set(_topics(settings)) & set(await admin.list_topics())
        if not doomed:
            return
        await admin.delete_topics(sorted(doomed))
        # Deletion finishes asynchronously; wait for it so that a setup() right
        # after does not find half-deleted topics.
        async with asyncio.timeout(TOPIC_DELETE_TIMEOUT):
            while doomed & set(await admin.list_topics()):  # noqa: ASYNC110 (nothing to wait on)
                await asyncio.sleep(0.05)
    finally:
        await admin.close()
    # The consumer group's committed offsets stay behind: aiokafka's admin client
    # cannot delete groups, and Kafka expires empty groups on its own.


async def setup_redis(settings: Settings) -> None:
    names = settings.names
    redis = Redis.from_url(settings.brokers.redis_url)
    try:
        try:
            # "0", not "$": entries written before the group existed are still shipped.
            await redis.xgroup_create(names.shipments, names.shipping_group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
    finally:
        await redis.aclose()


async def teardown_redis(settings: Settings) -> None:
    names = settings.names
    redis = Redis.from_url(settings.brokers.redis_url)
    try:
        await redis.delete(names.shipments, names.shipments_dead)  # groups go with the stream
    finally:
        await redis.aclose()

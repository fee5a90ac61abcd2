"""A FastStream app across RabbitMQ, Kafka and Redis Streams.

An order is published to the RabbitMQ exchange ``fs.orders`` (routing key
``order.placed``) and lands in the queue ``fs.accept``; the subscriber
``accept`` publishes it to the Kafka topic ``fs-accepted``; the subscriber
``forward`` (consumer group ``fs-forwarder``) adds it to the Redis stream
``fs-shipments``. FastStream declares the exchange and the queue itself.

Fault switches (:class:`Fault`) break one order each: ``lose`` makes
``accept`` drop it, ``duplicate`` makes ``accept`` publish it to Kafka twice.
Every name and the group start with the caller's prefix, so runs do not meet.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from faststream.kafka import KafkaBroker
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue
from faststream.redis import RedisBroker

EXCHANGE = "fs.orders"
QUEUE = "fs.accept"
KEY = "order.placed"
TOPIC = "fs-accepted"
GROUP = "fs-forwarder"
STREAM = "fs-shipments"
LOG = logging.getLogger(__name__)


class Fault(StrEnum):
    LOSE = "lose"
    DUPLICATE = "duplicate"


class Outcomes:
    """What became of each order (shipped, lost), for waits the caller bounds."""

    def __init__(self) -> None:
        self.ends: list[tuple[str, str]] = []
        self.changed = asyncio.Condition()

    async def end(self, order_id: str, how: str) -> None:
        async with self.changed:
            self.ends.append((order_id, how))
            self.changed.notify_all()

    async def wait(self, orders: Iterable[str], *, ends: int = 1) -> None:
        """Wait until each of ``orders`` has come to ``ends`` ends (2 for a duplicate)."""
        wanted = list(orders)

        def done() -> bool:
            seen = Counter(o for o, _ in self.ends)
            return all(seen[o] >= ends for o in wanted)

        async with self.changed:
            await self.changed.wait_for(done)


class App:
    """The three brokers and the two subscribers, under ``prefix``."""

    def __init__(
        self,
        rabbitmq_url: str,
        kafka_bootstrap: str,
        redis_url: str,
        prefix: str,
        *,
        faults: dict[Fault, str] | None = None,
    ) -> None:
        self.faults = dict(faults or {})
        self.outcomes = Outcomes()
        self.exchange = RabbitExchange(prefix + EXCHANGE, type=ExchangeType.DIRECT, durable=True)
        self.queue = RabbitQueue(prefix + QUEUE, routing_key=KEY, durable=True)
        self.topic, self.stream = prefix + TOPIC, prefix + STREAM
        self.rabbit = RabbitBroker(rabbitmq_url, logger=LOG)
        self.kafka = KafkaBroker(kafka_bootstrap, logger=LOG)
        self.redis = RedisBroker(redis_url, logger=LOG)
        self.rabbit.subscriber(self.queue, self.exchange)(self.accept)
        self.kafka.subscriber(self.topic, group_id=prefix + GROUP, auto_offset_reset="earliest")(
            self.forward
        )

    async def accept(self, order: dict[str, Any]) -> None:
        order_id = order["order_id"]
        if self.faults.get(Fault.LOSE) == order_id:
            await self.outcomes.end(order_id, "lost")
            return
        sends = 2 if self.faults.get(Fault.DUPLICATE) == order_id else 1
        for _ in range(sends):
            await self.kafka.publish(order, self.topic, key=order_id.encode())

    async def forward(self, order: dict[str, Any]) -> None:
        await self.redis.publish(order, stream=self.stream)
        await self.outcomes.end(order["order_id"], "shipped")

    async def start(self) -> None:
        # Producers first: accept publishes to Kafka, forward to Redis.
        await self.redis.start()
        await self.kafka.start()
        await self.rabbit.start()

    async def stop(self) -> None:
        await self.rabbit.stop()
        await self.kafka.stop()
        await self.redis.stop()

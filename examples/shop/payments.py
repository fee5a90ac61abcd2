"""payments-worker: consumes payments and payments-retry in one Kafka consumer group.

An approved payment becomes a shipment entry on the Redis stream shipments. A
declined one is retried once through payments-retry and then dead-lettered to
payments-dlt, with the headers Spring Kafka's retryable topics use, so that
tools built for Spring recognise the records. Offsets are committed after each
record is fully handled (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from contextlib import AsyncExitStack
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from .config import Fault, Settings
from .infra import connect_redis
from .messages import (
    ORDER_ID_HEADER,
    TRACE_HEADERS,
    BadMessage,
    Payment,
    decode,
    encode,
    shipment_payload,
    text,
)
from .stats import Event, Stats, checkpoint

# Spring Kafka header names (RetryTopicHeaders, KafkaHeaders.DLT_*); numbers are
# big-endian binary: attempts 4 bytes, timestamps and offsets 8, partitions 4.
ATTEMPTS = "retry_topic-attempts"
BACKOFF_TIMESTAMP = "retry_topic-backoff-timestamp"
DLT_ORIGINAL_TOPIC = "kafka_dlt-original-topic"
DLT_ORIGINAL_PARTITION = "kafka_dlt-original-partition"
DLT_ORIGINAL_OFFSET = "kafka_dlt-original-offset"
DLT_ORIGINAL_TIMESTAMP = "kafka_dlt-original-timestamp"
DLT_ORIGINAL_CONSUMER_GROUP = "kafka_dlt-original-consumer-group"
DLT_EXCEPTION_FQCN = "kafka_dlt-exception-fqcn"
DLT_EXCEPTION_MESSAGE = "kafka_dlt-exception-message"
DLT_EXCEPTION_STACKTRACE = "kafka_dlt-exception-stacktrace"
_OWN_HEADERS = ("retry_topic-", "kafka_dlt-")


class PaymentDeclined(Exception):
    """The card was declined."""


def settle(payment: Payment) -> None:
    """Raise PaymentDeclined unless the payment went through."""
    if payment.status != "approved":
        raise PaymentDeclined(f"payment for order {payment.order_id} was {payment.status}")


def int_header(headers: dict[str, bytes], name: str, default: int) -> int:
    value = headers.get(name)
    return default if value is None else int.from_bytes(value, "big", signed=True)


class PaymentsWorker:
    name = "payments-worker"

    def __init__(self, settings: Settings, stats: Stats) -> None:
        self.settings = settings
        self.stats = stats
        self.ready = asyncio.Event()
        self._producer: Any = None

    async def run(self) -> None:
        names, brokers = self.settings.names, self.settings.brokers
        async with AsyncExitStack() as stack:
            redis = connect_redis(self.settings, self.name)
            stack.push_async_callback(redis.aclose)
            self._producer = AIOKafkaProducer(bootstrap_servers=brokers.kafka_bootstrap, acks="all")
            stack.push_async_callback(self._producer.stop)
            await self._producer.start()
            consumer = AIOKafkaConsumer(
                bootstrap_servers=brokers.kafka_bootstrap,
                group_id=names.payments_group,
                enable_auto_commit=False,  # commit only what has been handled
                auto_offset_reset="earliest",  # a new group must not skip what came before it
                # Each payment is shipped when it comes, not with the next ones: a broker
                # holds a fetch open for up to this long while nothing new has come.
                fetch_max_wait_ms=10,
            )
            stack.push_async_callback(consumer.stop)
            await consumer.start()
            # Ready once the group has given us partitions, not when the client started:
            # until then nothing would be consumed (a group join takes seconds).
            consumer.subscribe([names.payments, names.payments_retry], listener=_Ready(self.ready))
            await self._consume(consumer, redis)

    async def _consume(self, consumer: Any, redis: Redis) -> None:
        # Partitions paused until their next record's retry is due, as Spring does:
        # the other partitions (and payments itself) keep flowing meanwhile.
        paused: dict[TopicPartition, float] = {}
        while True:
            checkpoint()
            now = time.time()
            if due := [tp for tp, at in paused.items() if at <= now]:
                for tp in due:
                    del paused[tp]
                assigned = consumer.assignment()
                consumer.resume(*(tp for tp in due if tp in assigned))
            wait_ms = 100
            if paused:
                wait_ms = max(1, min(wait_ms, int((min(paused.values()) - now) * 1000)))
            batches = await consumer.getmany(timeout_ms=wait_ms)
            for tp, records in batches.items():
                for record in records:
                    not_before = int_header(dict(record.headers), BACKOFF_TIMESTAMP, 0) / 1000
                    if not_before > time.time():
                        consumer.seek(tp, record.offset)
                        consumer.pause(tp)
                        paused[tp] = not_before
                        break
                    await self._handle(record, redis)
                    await self._commit(consumer, tp, record.offset + 1)

    @staticmethod
    async def _commit(consumer: Any, tp: TopicPartition, offset: int) -> None:
        commit = asyncio.ensure_future(consumer.commit({tp: offset}))
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            # Stopping: let the commit of a record already handled finish first,
            # or it is handled again after the restart (and fails unobserved now).
            with contextlib.suppress(Exception):
                await commit
            raise

    async def _handle(self, record: Any, redis: Redis) -> None:
        headers: dict[str, bytes] = dict(record.headers)
        order_id = text(headers.get(ORDER_ID_HEADER, b""))
        self.stats.record(Event.PAYMENTS_RECEIVED, order_id)
        attempt = int_header(headers, ATTEMPTS, 1)
        try:
            payment = Payment.from_payload(decode(record.value))
            settle(payment)
        except PaymentDeclined as exc:
            if attempt < self.settings.payment_attempts:
                await self._retry(record, attempt + 1)
                self.stats.record(Event.PAYMENTS_RETRIED, order_id)
            else:
                await self._dead_letter(record, attempt, exc)
                self.stats.record(Event.PAYMENTS_DEAD_LETTERED, order_id)
            return
        except BadMessage as exc:  # no retry can help
            await self._dead_letter(record, attempt, exc)
            self.stats.record(Event.PAYMENTS_DEAD_LETTERED, order_id)
            return
        fields: dict[FieldT, EncodableT] = {
            "payload": encode(shipment_payload(payment)),
            "order_id": payment.order_id,
        }
        fields.update({k: headers[k] for k in TRACE_HEADERS if k in headers})
        await redis.xadd(self.settings.names.shipments, fields)
        self.stats.record(Event.PAYMENTS_FORWARDED, order_id)

    def _carried(self, record: Any) -> list[tuple[str, bytes]]:
        """The record's own headers (order id, trace context), minus retry/DLT bookkeeping."""
        return [(k, v) for k, v in record.headers if not k.startswith(_OWN_HEADERS)]

    async def _retry(self, record: Any, attempt: int) -> None:
        backoff_ms = self.settings.payment_backoff_ms
        if Fault.EARLY_RETRY in self.settings.faults:
            backoff_ms = 0  # the injected fault: due at once
            self.stats.fault(
                Fault.EARLY_RETRY, text(dict(record.headers).get(ORDER_ID_HEADER, b""))
            )
        due_ms = int(time.time() * 1000) + backoff_ms
        headers = self._carried(record)
        headers += [
            (ATTEMPTS, attempt.to_bytes(4, "big")),
            (BACKOFF_TIMESTAMP, due_ms.to_bytes(8, "big")),
        ]
        # Same key, same partition number: payments-retry has as many partitions as payments.
        await self._producer.send_and_wait(
            self.settings.names.payments_retry,
            record.value,
            key=record.key,
            partition=record.partition,
            headers=headers,
        )

    async def _dead_letter(self, record: Any, attempts: int, exc: Exception) -> None:
        kind = type(exc)
        headers = self._carried(record)
        headers += [
            (ATTEMPTS, attempts.to_bytes(4, "big")),
            (DLT_ORIGINAL_TOPIC, str(record.topic).encode()),
            (DLT_ORIGINAL_PARTITION, int(record.partition).to_bytes(4, "big")),
            (DLT_ORIGINAL_OFFSET, int(record.offset).to_bytes(8, "big")),
            (DLT_ORIGINAL_TIMESTAMP, int(record.timestamp).to_bytes(8, "big")),
            (DLT_ORIGINAL_CONSUMER_GROUP, self.settings.names.payments_group.encode()),
            (DLT_EXCEPTION_FQCN, f"{kind.__module__}.{kind.__qualname__}".encode()),
            (DLT_EXCEPTION_MESSAGE, str(exc).encode()),
            (DLT_EXCEPTION_STACKTRACE, "".join(traceback.format_exception(exc)).encode()),
        ]
        await self._producer.send_and_wait(
            self.settings.names.payments_dlt, record.value, key=record.key, headers=headers
        )


class _Ready(ConsumerRebalanceListener):  # type: ignore[misc]
    """Sets ``ready`` when the group first assigns partitions to this consumer."""

    def __init__(self, ready: asyncio.Event) -> None:
        self.ready = ready

    async def on_partitions_revoked(self, revoked: Any) -> None:
        return None

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned:
            self.ready.set()

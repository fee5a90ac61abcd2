"""The ledger's services: teller (publisher), poster, settler, and the audit and notify readers.

teller publishes transactions to the Kafka topic ledger.tx, keyed by account.
poster runs one consumer per partition of ledger.tx (each assigned its
partition and that of ledger.tx-retry, committing in the group poster) and
writes the transactions to the Redis stream ledger.posted, each fetched batch
in one MULTI/EXEC transaction; a transaction in
no currency is retried through ledger.tx-retry and, after 3 attempts in all,
sent to ledger.tx-dlt with Spring Kafka's dead-letter headers. settler reads
ledger.posted in the group settler, in batches, and publishes each transaction
to the fanout exchange ledger.settled once (it is idempotent: a transaction
posted twice is settled once); one under a legal hold stays pending, is claimed
again once idle, and after 3 deliveries goes to ledger.posted-dead. The audit
and notify readers take what ledger.settled fans out to their queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Iterable
from typing import Any, cast

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from .config import PARTITIONS, Fault, Settings
from .messages import TX_ID, BadMessage, Kind, Tx, decode, encode, text
from .stats import Event, Stats, checkpoint

# Spring Kafka's header names; numbers are big-endian binary.
ATTEMPTS = "retry_topic-attempts"
BACKOFF_TIMESTAMP = "retry_topic-backoff-timestamp"
DLT_ORIGINAL_TOPIC = "kafka_dlt-original-topic"
DLT_EXCEPTION_FQCN = "kafka_dlt-exception-fqcn"
DLT_EXCEPTION_MESSAGE = "kafka_dlt-exception-message"
_OWN_HEADERS = ("retry_topic-", "kafka_dlt-")

SETTLER = "settler-1"

_Post = tuple[Tx, list[tuple[str, bytes]]]  # a transaction to post, with the headers it carries


def int_header(headers: dict[str, bytes], name: str, default: int) -> int:
    value = headers.get(name)
    return default if value is None else int.from_bytes(value, "big", signed=True)


class Teller:
    """Publishes a day's transactions to ledger.tx: one record batch per partition, an
    account's transactions in the order given, every account in the partition its
    name hashes to (CRC-32, so that a batch can be built for one partition)."""

    def __init__(self, settings: Settings, stats: Stats) -> None:
        self.settings = settings
        self.stats = stats
        self._producer: Any = None

    async def open(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.brokers.kafka_bootstrap, acks="all"
        )
        await self._producer.start()

    async def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def publish(self, txs: Iterable[Tx]) -> None:
        if self._producer is None:
            raise RuntimeError("Teller is not open")
        by_partition: dict[int, list[Tx]] = {}
        for tx in txs:
            by_partition.setdefault(partition_of(tx.account), []).append(tx)
        for partition, batch_txs in sorted(by_partition.items()):
            batch = self._producer.create_batch()
            for tx in batch_txs:
                appended = batch.append(
                    timestamp=None,
                    key=tx.account.encode(),
                    value=encode(tx.payload()),
                    headers=[(TX_ID, tx.tx_id.encode())],
                )
                if appended is None:
                    raise RuntimeError("a day's transactions do not fit in one record batch")
            sent = await self._producer.send_batch(
                batch, self.settings.names.tx, partition=partition
            )
            await sent
            for tx in batch_txs:
                self.stats.record(Event.PUBLISHED, tx.tx_id)


def partition_of(account: str) -> int:
    return zlib.crc32(account.encode()) % PARTITIONS


class Poster:
    name = "poster"

    def __init__(self, settings: Settings, stats: Stats) -> None:
        self.settings = settings
        self.stats = stats
        self.ready = asyncio.Event()
        self.released = asyncio.Event()  # reads nothing until set (Ledger's hold_poster)
        self._producer: Any = None
        self._late: set[asyncio.Task[None]] = set()  # delay fault: posts still to come

    async def run(self) -> None:
        brokers = self.settings.brokers
        redis = Redis.from_url(brokers.redis_url)
        self._producer = AIOKafkaProducer(bootstrap_servers=brokers.kafka_bootstrap, acks="all")
        consumers: list[AIOKafkaConsumer] = []
        try:
            await self._producer.start()
            for p in range(PARTITIONS):
                consumers.append(await self._consumer(p))
            self.ready.set()
            async with asyncio.TaskGroup() as group:
                for consumer in consumers:
                    group.create_task(self._consume(consumer, redis))
        finally:
            for task in self._late:
                task.cancel()
            for consumer in consumers:
                await consumer.stop()
            await self._producer.stop()
            await redis.aclose()

    async def _consumer(self, partition: int) -> AIOKafkaConsumer:
        # Assigned, not subscribed: one consumer per partition with no rebalancing,
        # committing its offsets in the group poster.
        names = self.settings.names
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.brokers.kafka_bootstrap,
            group_id=names.poster_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        consumer.assign(
            [TopicPartition(names.tx, partition), TopicPartition(names.tx_retry, partition)]
        )
        return consumer

    async def _consume(self, consumer: AIOKafkaConsumer, redis: Redis) -> None:
        held: dict[str, _Post] = {}  # reorder fault, by account
        await self.released.wait()
        while True:
            checkpoint()
            batches = await consumer.getmany(timeout_ms=100)
            for tp, records in batches.items():
                # Each fetched batch is posted in one transaction, then committed.
                posts: list[_Post] = []
                for record in records:
                    await self._handle(record, redis, held, posts)
                await self._write(redis, posts)
                await consumer.commit({tp: records[-1].offset + 1})

    async def _handle(
        self, record: Any, redis: Redis, held: dict[str, _Post], posts: list[_Post]
    ) -> None:
        headers: dict[str, bytes] = dict(record.headers)
        carried = [(k, v) for k, v in record.headers if not k.startswith(_OWN_HEADERS)]
        try:
            tx = Tx.from_payload(decode(record.value))
        except BadMessage as exc:
            await self._dead_letter(record, carried, 1, exc)
            return
        wait = int_header(headers, BACKOFF_TIMESTAMP, 0) / 1000 - time.time()
        if wait > 0:
            await asyncio.sleep(wait)  # a retry waits out its backoff
        faults, tx_id = self.settings.faults, tx.tx_id
        if tx.kind is Kind.REJECTED:
            await self._rejected(record, carried, tx_id, int_header(headers, ATTEMPTS, 1))
            return
        if faults.hit(Fault.DROP, tx_id):
            self.stats.fault(Fault.DROP, tx_id)  # committed, never posted
            return
        if faults.hit(Fault.DEAD_LETTER_HEALTHY, tx_id):
            await self._dead_letter(record, carried, 1, ValueError("refused by mistake"))
            self.stats.fault(Fault.DEAD_LETTER_HEALTHY, tx_id)
            return
        if faults.hit(Fault.DELAY, tx_id):
            task = asyncio.create_task(self._post_later(redis, tx, carried))
            self._late.add(task)
            task.add_done_callback(self._late.discard)
            return
        if faults.hit(Fault.REORDER, tx_id) and tx.account not in held:
            held[tx.account] = (tx, carried)
            return
        posts.append((tx, carried))
        if (earlier := held.pop(tx.account, None)) is not None:
            posts.append(earlier)  # overtaken by this transaction
            self.stats.fault(Fault.REORDER, tx_id)  # the overtaker: posted out of turn
        if faults.hit(Fault.DUPLICATE, tx_id):
            posts.append((tx, carried))
            self.stats.fault(Fault.DUPLICATE, tx_id)

    async def _rejected(
        self, record: Any, carried: list[tuple[str, bytes]], tx_id: str, attempt: int
    ) -> None:
        faults = self.settings.faults
        if attempt < self.settings.tx_attempts(tx_id):
            await self._retry(record, carried, attempt + 1)
            self.stats.record(Event.RETRIED, tx_id)
            return
        for fault in (Fault.RETRY_TOO_OFTEN, Fault.RETRY_TOO_LITTLE):
            if faults.hit(fault, tx_id):
                self.stats.fault(fault, tx_id)  # this was the attempt too many, or too few
        if faults.hit(Fault.SKIP_DEAD_LETTER, tx_id):
            self.stats.fault(Fault.SKIP_DEAD_LETTER, tx_id)  # committed, never dead-lettered
            return
        await self._dead_letter(record, carried, attempt, ValueError("no currency"))
        self.stats.record(Event.REJECTED, tx_id)

    async def _write(self, redis: Redis, posts: list[_Post]) -> None:
        if not posts:
            return
        async with redis.pipeline(transaction=True) as pipe:
            for tx, carried in posts:
                fields: dict[FieldT, EncodableT] = {"payload": encode(tx.payload())}
                fields.update(dict(carried))  # tx_id among them
                pipe.xadd(self.settings.names.posted, fields)
            await pipe.execute()
        for tx, _ in posts:
            self.stats.record(Event.POSTED, tx.tx_id)

    async def _post_later(self, redis: Redis, tx: Tx, carried: list[tuple[str, bytes]]) -> None:
        await asyncio.sleep(self.settings.faults.delay_ms / 1000)  # the injected fault itself
        await self._write(redis, [(tx, carried)])
        self.stats.fault(Fault.DELAY, tx.tx_id)

    async def _retry(self, record: Any, carried: list[tuple[str, bytes]], attempt: int) -> None:
        due_ms = int(time.time() * 1000) + self.settings.retry_backoff_ms
        headers = [
            *carried,
            (ATTEMPTS, attempt.to_bytes(4, "big")),
            (BACKOFF_TIMESTAMP, due_ms.to_bytes(8, "big")),
        ]
        await self._producer.send_and_wait(
            self.settings.names.tx_retry,
            record.value,
            key=record.key,
            partition=record.partition,
            headers=headers,
        )

    async def _dead_letter(
        self, record: Any, carried: list[tuple[str, bytes]], attempts: int, exc: Exception
    ) -> None:
        kind = type(exc)
        headers = [
            *carried,
            (ATTEMPTS, attempts.to_bytes(4, "big")),
            (DLT_ORIGINAL_TOPIC, str(record.topic).encode()),
            (DLT_EXCEPTION_FQCN, f"{kind.__module__}.{kind.__qualname__}".encode()),
            (DLT_EXCEPTION_MESSAGE, str(exc).encode()),
        ]
        await self._producer.send_and_wait(
            self.settings.names.tx_dlt, record.value, key=record.key, headers=headers
        )


Entry = tuple[str, dict[str, str]]


def _entries(raw: Iterable[Any]) -> list[Entry]:
    return [
        (text(eid), {text(k): text(v) for k, v in fields.items()})
        for eid, fields in raw
        if fields is not None
    ]


class Settler:
    name = "settler"

    def __init__(self, settings: Settings, stats: Stats) -> None:
        self.settings = settings
        self.stats = stats
        self.ready = asyncio.Event()
        self._settled: set[str] = set()  # idempotence: a transaction is settled once

    async def run(self) -> None:
        redis = Redis.from_url(self.settings.brokers.redis_url, decode_responses=True, protocol=2)
        connection = await aio_pika.connect_robust(self.settings.brokers.rabbitmq_url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            names = self.settings.names
            exchanges = {
                False: await channel.get_exchange(names.settled),
                True: await channel.get_exchange(names.settled_v2),
            }
            self.ready.set()
            while True:
                checkpoint()
                for entry in await self._reclaim(redis) + await self._read(redis):
                    if not await self._handle(redis, exchanges, *entry):
                        return  # the stop fault: for good, whatever is pending or unread
        finally:
            await connection.close()
            await redis.aclose()

    async def _read(self, redis: Redis) -> list[Entry]:
        names = self.settings.names
        reply = await redis.xreadgroup(
            names.settler_group,
            SETTLER,
            {names.posted: ">"},
            count=self.settings.settle_batch,
            block=50,
        )
        streams = cast("list[list[Any]]", reply or [])
        return [entry for _, raw in streams for entry in _entries(raw)]

    async def _reclaim(self, redis: Redis) -> list[Entry]:
        names, idle = self.settings.names, self.settings.claim_idle_ms
        pending = await redis.xpending_range(
            names.posted, names.settler_group, min="-", max="+", count=50, idle=idle
        )
        if not pending:
            return []
        claimed = await redis.xclaim(
            names.posted,
            names.settler_group,
            SETTLER,
            min_idle_time=idle,
            message_ids=[text(p["message_id"]) for p in pending],
        )
        return _entries(claimed)

    async def _handle(
        self,
        redis: Redis,
        exchanges: dict[bool, aio_pika.abc.AbstractExchange],
        entry_id: str,
        fields: dict[str, str],
    ) -> bool:
        """Settle one entry; False when the settler stops for good."""
        names, faults = self.settings.names, self.settings.faults
        try:
            tx = Tx.from_payload(decode(fields.get("payload", "")))
        except BadMessage:
            await redis.xack(names.posted, names.settler_group, entry_id)
            return True
        tx_id = tx.tx_id
        if faults.hit(Fault.STOP, tx_id):
            self.stats.fault(Fault.STOP, tx_id)
            return False
        if tx.kind is Kind.HELD:
            await self._held(redis, entry_id, fields, tx)
            return True
        if tx_id not in self._settled:
            misrouted = faults.hit(Fault.MIS_ROUTE, tx_id)
            message = aio_pika.Message(
                encode(tx.payload()),
                content_type="application/json",
                message_id=f"{tx_id}-settled",
                headers={TX_ID: tx_id},
            )
            await exchanges[misrouted].publish(message, routing_key="")
            self._settled.add(tx_id)
            if misrouted:
                self.stats.fault(Fault.MIS_ROUTE, tx_id)
            else:
                self.stats.record(Event.SETTLED, tx_id)
        await redis.xack(names.posted, names.settler_group, entry_id)
        return True

    async def _held(self, redis: Redis, entry_id: str, fields: dict[str, str], tx: Tx) -> None:
        names, tx_id = self.settings.names, tx.tx_id
        pending = await redis.xpending_range(
            names.posted, names.settler_group, min=entry_id, max=entry_id, count=1
        )
        deliveries = int(pending[0]["times_delivered"]) if pending else 1
        allowed = self.settings.settle_deliveries(tx_id)
        if deliveries < allowed:
            self.stats.record(Event.SETTLE_FAILED, tx_id)  # left pending
            return
        for fault in (Fault.RETRY_TOO_OFTEN, Fault.RETRY_TOO_LITTLE):
            if self.settings.faults.hit(fault, tx_id):
                self.stats.fault(fault, tx_id)
        if self.settings.faults.hit(Fault.SKIP_DEAD_LETTER, tx_id):
            await redis.xack(names.posted, names.settler_group, entry_id)
            self.stats.fault(Fault.SKIP_DEAD_LETTER, tx_id)
            return
        # The dead letter keeps the payload, not the entry's other fields.
        dead: dict[FieldT, EncodableT] = {
            "payload": fields.get("payload", ""),
            "reason": "legal hold",
            "delivery_count": deliveries,
            "original_id": entry_id,
        }
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xadd(names.posted_dead, dead)
            pipe.xack(names.posted, names.settler_group, entry_id)
            await pipe.execute()
        self.stats.record(Event.DEAD, tx_id)


class Readers:
    """The audit and notify services: take what ledger.settled fans out to their queues."""

    name = "readers"

    def __init__(self, settings: Settings, stats: Stats) -> None:
        self.settings = settings
        self.stats = stats
        self.ready = asyncio.Event()

    async def run(self) -> None:
        names = self.settings.names
        connection = await aio_pika.connect_robust(self.settings.brokers.rabbitmq_url)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=20)
            for queue_name, event in ((names.audit, Event.AUDITED), (names.notify, Event.NOTIFIED)):
                queue = await channel.get_queue(queue_name)
                await queue.consume(self._taker(event))
            self.ready.set()
            await asyncio.Future()  # until cancelled
        finally:
            with contextlib.suppress(Exception):
                await connection.close()

    def _taker(self, event: Event) -> Any:
        async def take(message: AbstractIncomingMessage) -> None:
            async with message.process():
                self.stats.record(event, text((message.headers or {}).get(TX_ID, "")))

        return take

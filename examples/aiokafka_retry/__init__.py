"""A plain aiokafka consumer group with a retry topic and a dead-letter topic.

The worker (one consumer in the group ``order-worker``) reads ``orders`` and
``orders-retry``. An order it processes goes to ``orders-done``. When
processing fails it publishes the order to ``orders-retry`` with the header
``retries`` one higher (the same group reads it back at once); after
``MAX_ATTEMPTS`` failed attempts it publishes it to ``orders-dlt`` with the
headers ``error`` and ``original-topic``. Each record's offset is committed
after its outcome is published (at-least-once, as most such workers do).

A *flaky* order fails its first attempt; a *poison* order (a negative amount)
fails every one. Fault switches (:class:`Fault`) break one order each:
``lose`` commits it without publishing anything, ``duplicate`` publishes it to
``orders-done`` twice, ``too_many_retries`` retries it past the allowed
attempts, ``no_dead_letter`` drops a poison order after its last attempt
instead of dead-lettering it. Every topic and the group start with the
caller's prefix, so runs do not meet.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

ORDERS = "orders"
RETRY = "orders-retry"
DLT = "orders-dlt"
DONE = "orders-done"
GROUP = "order-worker"
MAX_ATTEMPTS = 3
FETCH_WAIT_MS = 20  # some brokers answer a fetch only at its deadline: keep hops short
# The lowest session timeout Kafka accepts by default (group.min.session.timeout.ms):
# some brokers hold a new group's first join for half of it.
SESSION_TIMEOUT_MS, HEARTBEAT_MS = 6000, 500
POLL_MS = 100  # how soon the worker notices it is asked to stop


class Fault(StrEnum):
    LOSE = "lose"
    DUPLICATE = "duplicate"
    TOO_MANY_RETRIES = "too_many_retries"
    NO_DEAD_LETTER = "no_dead_letter"


class Failed(Exception):
    """Processing an order failed."""


class Outcomes:
    """What became of each order (done, dead, dropped, lost), for waits with a deadline."""

    def __init__(self) -> None:
        self.ends: list[tuple[str, str]] = []
        self.changed = asyncio.Condition()

    async def end(self, order_id: str, how: str) -> None:
        async with self.changed:
            self.ends.append((order_id, how))
            self.changed.notify_all()

    def of(self, order_id: str) -> list[str]:
        return [how for o, how in self.ends if o == order_id]

    async def wait(self, orders: Iterable[str], *, ends: int = 1) -> None:
        """Wait until each of ``orders`` has come to ``ends`` ends (2 for a duplicate);
        the caller bounds it (``asyncio.timeout``)."""
        wanted = list(orders)

        def done() -> bool:
            seen = Counter(o for o, _ in self.ends)
            return all(seen[o] >= ends for o in wanted)

        async with self.changed:
            await self.changed.wait_for(done)


class Worker:
    """The order worker of group ``prefix + GROUP`` on the topics ``prefix + name``."""

    def __init__(
        self, bootstrap: str, prefix: str, *, faults: dict[Fault, str] | None = None
    ) -> None:
        self.bootstrap = bootstrap
        self.faults = dict(faults or {})
        self.orders, self.retry = prefix + ORDERS, prefix + RETRY
        self.dlt, self.done = prefix + DLT, prefix + DONE
        self.group = prefix + GROUP
        self.outcomes = Outcomes()
        self.attempts: dict[str, int] = {}  # order -> attempts
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        self.consumer = AIOKafkaConsumer(
            self.orders,
            self.retry,
            bootstrap_servers=bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FETCH_WAIT_MS,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=HEARTBEAT_MS,
        )
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        self._task = asyncio.create_task(self._run(), name=f"worker {self.group}")

    async def stop(self) -> None:
        if self._task is not None:
            self._stop.set()  # the batch in hand is finished and committed first
            await self._task
            self._task = None
        await self.consumer.stop()
        await self.producer.stop()

    async def place(self, order_id: str, amount: float, kind: str = "healthy") -> None:
        """Publish an order to ``orders``, keyed by its id."""
        order = {"order_id": order_id, "amount": amount, "kind": kind}
        await self.producer.send_and_wait(
            self.orders, json.dumps(order).encode(), key=order_id.encode()
        )

    # ------------------------------------------------------------ the worker

    async def _run(self) -> None:
        while not self._stop.is_set():
            batches = await self.consumer.getmany(timeout_ms=POLL_MS)
            for tp, records in batches.items():
                for rec in records:
                    await self._handle(rec)
                await self.consumer.commit({tp: records[-1].offset + 1})

    async def _handle(self, rec: ConsumerRecord[bytes, bytes]) -> None:
        order = json.loads(rec.value or b"{}")
        order_id: str = order["order_id"]
        headers = {k: v.decode() for k, v in rec.headers}
        retries = int(headers.get("retries", "0"))
        self.attempts[order_id] = self.attempts.get(order_id, 0) + 1
        try:
            self._process(order, retries + 1)
        except Failed as exc:
            await self._failed(rec, order_id, retries, exc)
            return
        if self.faults.get(Fault.LOSE) == order_id:
            await self.outcomes.end(order_id, "lost")
            return
        sends = 2 if self.faults.get(Fault.DUPLICATE) == order_id else 1
        for _ in range(sends):
            await self.producer.send_and_wait(self.done, rec.value, key=rec.key)
            await self.outcomes.end(order_id, "done")

    def _process(self, order: dict[str, Any], attempt: int) -> None:
        if order["amount"] < 0:
            raise Failed(f"order {order['order_id']}: amount {order['amount']}")
        failures = 1 if order["kind"] == "flaky" else 0
        if self.faults.get(Fault.TOO_MANY_RETRIES) == order["order_id"]:
            failures = MAX_ATTEMPTS  # passes on one attempt more than allowed
        if attempt <= failures:
            raise Failed(f"order {order['order_id']}: attempt {attempt}")

    async def _failed(
        self, rec: ConsumerRecord[bytes, bytes], order_id: str, retries: int, exc: Failed
    ) -> None:
        allowed = MAX_ATTEMPTS + (1 if self.faults.get(Fault.TOO_MANY_RETRIES) == order_id else 0)
        if retries + 1 < allowed:
            headers = [("retries", str(retries + 1).encode())]
            await self.producer.send_and_wait(self.retry, rec.value, key=rec.key, headers=headers)
            return
        if self.faults.get(Fault.NO_DEAD_LETTER) == order_id:
            await self.outcomes.end(order_id, "dropped")
            return
        headers = [("error", str(exc).encode()), ("original-topic", self.orders.encode())]
        await self.producer.send_and_wait(self.dlt, rec.value, key=rec.key, headers=headers)
        await self.outcomes.end(order_id, "dead")

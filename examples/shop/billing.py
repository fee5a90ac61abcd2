"""billing: works the quorum queue billing.orders and publishes payments to Kafka.

A poison order fails on every delivery and is nacked with requeue; the quorum
queue counts the deliveries and dead-letters the order to shop.dlx once its
delivery limit is passed. Everything else becomes a payment record keyed by
customer (so Kafka keeps a customer's payments in order) with the order id in
a header, and the order is acked only after Kafka has acknowledged the record.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aiokafka import AIOKafkaProducer

from .config import BILLING_DELIVERY_LIMIT, Fault, Settings
from .messages import (
    DECLINED_CARD,
    ORDER_ID_HEADER,
    BadMessage,
    Order,
    Payment,
    decode,
    encode,
    text,
    trace_context,
)
from .stats import Event, Stats, checkpoint


class ChargeFailed(Exception):
    """The payment provider refused the order outright (not a decline: an error)."""


def charge(order: Order) -> Payment:
    """The billing decision: refused (poison), declined (the declined test card) or approved."""
    if order.poison or order.amount < 0:
        raise ChargeFailed(f"cannot charge {order.amount} {order.currency} for {order.order_id}")
    return Payment(
        order_id=order.order_id,
        revision=order.revision,
        customer=order.customer,
        amount=order.amount,
        currency=order.currency,
        status="declined" if order.card == DECLINED_CARD else "approved",
        address=order.address,
    )


@dataclass(slots=True)
class _Held:
    """reorder fault: a payment kept back, with its order message still unacked."""

    payment: Payment
    trace: dict[str, str]
    message: AbstractIncomingMessage


class Billing:
    name = "billing"

    def __init__(self, settings: Settings, stats: Stats) -> None:
        self.settings = settings
        self.stats = stats
        self.ready = asyncio.Event()
        self._producer: Any = None
        self._held: _Held | None = None
        self._timer: asyncio.Task[None] | None = None  # releases a held payment late
        self._late: set[asyncio.Task[None]] = set()  # latency and phantom faults: payments waiting
        self._fired: set[Fault] = set()  # the one-shot faults already injected

    async def run(self) -> None:
        names = self.settings.names
        connection = await aio_pika.connect_robust(self.settings.brokers.rabbitmq_url)
        try:
            self._producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.brokers.kafka_bootstrap, acks="all"
            )
            try:
                await self._producer.start()  # inside: a failed or cancelled start still stops
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=self.settings.billing_prefetch)
                queue = await channel.get_queue(names.billing_queue)
                async with queue.iterator() as messages:
                    self.ready.set()
                    async for message in messages:
                        checkpoint()
                        await self._handle(message)
            finally:
                await self._drop_hold()
                await self._producer.stop()
        finally:
            await connection.close()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            order = Order.from_payload(decode(message.body))
        except BadMessage:
            # No redelivery can fix a malformed order: straight to the dead letters.
            await message.reject(requeue=False)
            return
        self.stats.record(Event.BILLING_RECEIVED, order.order_id)
        trace = trace_context(message.headers)
        try:
            payment = charge(order)
        except ChargeFailed:
            await self._refuse(message, order)
            return
        if Fault.LATENCY in self.settings.faults:
            # The injected fault: this payment waits, the next orders are taken meanwhile
            # (up to the prefetch), so each payment is late by about the same.
            self._later(self._bill_later(message, payment, trace))
            return
        await self._bill(message, payment, trace)

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background; stopping cancels it."""
        task = asyncio.create_task(work)
        self._late.add(task)
        task.add_done_callback(self._late.discard)

    async def _phantom(self, like: Payment) -> None:
        # phantom fault: a payment of the same customer, for an order never placed.
        await asyncio.sleep(self.settings.phantom_delay_ms / 1000)
        ghost = replace(like, order_id=f"{like.order_id}-replay")
        await self._publish(ghost, {})
        self.stats.fault(Fault.PHANTOM, ghost.order_id)

    async def _bill_later(
        self, message: AbstractIncomingMessage, payment: Payment, trace: dict[str, str]
    ) -> None:
        await asyncio.sleep(self.settings.faults.latency_ms / 1000)
        await self._bill(message, payment, trace)

    async def _bill(
        self, message: AbstractIncomingMessage, payment: Payment, trace: dict[str, str]
    ) -> None:
        """Publish the payment of a charged order and ack the order (or inject a fault)."""
        approved = payment.status == "approved"
        if approved and self._once(Fault.DROP):
            await message.ack()  # acked, never published: the order is lost
            self.stats.fault(Fault.DROP, payment.order_id)
            return
        held = self._held
        if held is not None and held.payment.customer == payment.customer:
            # reorder fault: the customer's newer payment overtakes the older one.
            self._held = None
            await self._publish(payment, trace)
            await self._publish(held.payment, held.trace)
            await message.ack()
            await held.message.ack()
            self.stats.fault(Fault.REORDER, held.payment.order_id)
            return
        if approved and held is None and self._once(Fault.REORDER):
            self._held = _Held(payment, trace, message)
            self._timer = asyncio.create_task(self._release_later(self._held))
            return
        await self._publish(payment, trace)
        if approved and self._once(Fault.PHANTOM):
            self._later(self._phantom(payment))
        if approved and self._once(Fault.DUPLICATE):
            await self._publish(payment, trace)
            self.stats.fault(Fault.DUPLICATE, payment.order_id)
        await message.ack()

    async def _refuse(self, message: AbstractIncomingMessage, order: Order) -> None:
        # The quorum queue counts failed deliveries; the redelivered message says how many.
        failed_before = int(text((message.headers or {}).get("x-delivery-count", 0)))
        last = failed_before >= BILLING_DELIVERY_LIMIT
        if last and Fault.SKIP_DEAD_LETTER in self.settings.faults:
            await message.ack()  # swallowed: it never reaches billing.orders.dlq
            self.stats.fault(Fault.SKIP_DEAD_LETTER, order.order_id)
            return
        await message.nack(requeue=True)
        self.stats.record(Event.BILLING_REJECTED, order.order_id)
        if last:
            self.stats.record(Event.BILLING_GAVE_UP, order.order_id)

    async def _publish(self, payment: Payment, trace: dict[str, str]) -> None:
        headers = [(ORDER_ID_HEADER, payment.order_id.encode())]
        headers += [(k, v.encode()) for k, v in trace.items()]
        await self._producer.send_and_wait(
            self.settings.names.payments,
            encode(payment.payload()),
            key=payment.customer.encode(),
            headers=headers,
        )
        self.stats.record(Event.BILLED, payment.order_id)

    def _once(self, fault: Fault) -> bool:
        """Whether to inject the one-shot ``fault`` now (it is on and has not fired yet)."""
        if fault not in self.settings.faults or fault in self._fired:
            return False
        self._fired.add(fault)
        return True

    async def _release_later(self, held: _Held) -> None:
        # reorder fault without a second payment of that order in time: let it go, late.
        await asyncio.sleep(self.settings.reorder_hold_ms / 1000)
        if self._held is held:
            self._held = None
            await self._publish(held.payment, held.trace)
            await held.message.ack()

    async def _drop_hold(self) -> None:
        # Stopping: a held or late order stays unacked, so RabbitMQ redelivers it later.
        self._held = None
        for task in [*self._late, *([self._timer] if self._timer is not None else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

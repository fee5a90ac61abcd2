"""checkout: places orders on the RabbitMQ topic exchange shop.orders, with publisher confirms.

Orders come either from place_orders (checkout as a library) or, when checkout
runs as a service, from the queue checkout.requests: a storefront publishes
each order it wants placed to shop.orders with the routing key order.requested,
and checkout places it with order.placed, in the same trace (traceparent kept).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from types import TracebackType
from typing import Self

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from pamqp.common import FieldValue

from .config import MISROUTED_KEY, ORDER_PLACED, Fault, Faults, Settings
from .messages import (
    ORDER_ID_HEADER,
    BadMessage,
    Order,
    decode,
    encode,
    new_traceparent,
    now_iso,
    plan_orders,
    trace_context,
)
from .stats import Event, Stats, checkpoint


class Checkout:
    """A publisher with its own connection; use as ``async with Checkout(...)``."""

    def __init__(self, settings: Settings, stats: Stats | None = None) -> None:
        self.settings = settings
        self.stats = stats or Stats()
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._bad_schema_fired = False  # the bad-schema fault breaks one order only

    async def open(self) -> None:
        self._connection = await aio_pika.connect_robust(self.settings.brokers.rabbitmq_url)
        # Confirms: publish() returns only once the broker has taken the message.
        channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await channel.get_exchange(self.settings.names.orders_exchange)

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection, self._exchange = self._connection, None, None
            await connection.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(self, order: Order, faults: Faults | None = None) -> Order:
        """Publish one order; returns it as sent (placed_at and traceparent filled in)."""
        if self._exchange is None:
            raise RuntimeError("Checkout is not open")
        faults = self.settings.faults if faults is None else faults
        order = replace(
            order,
            placed_at=order.placed_at or now_iso(),
            traceparent=order.traceparent or new_traceparent(),
        )
        headers: dict[str, FieldValue] = {ORDER_ID_HEADER: order.order_id}
        if order.traceparent:
            headers["traceparent"] = order.traceparent
        routing_key = ORDER_PLACED
        if Fault.MIS_ROUTE in faults:
            routing_key = MISROUTED_KEY
            self.stats.fault(Fault.MIS_ROUTE, order.order_id)
        payload = order.payload()
        if Fault.BAD_SCHEMA in faults and not self._bad_schema_fired:
            self._bad_schema_fired = True
            payload["amount"] = str(payload["amount"])  # "12.5": not a number any more
            self.stats.fault(Fault.BAD_SCHEMA, order.order_id)
        message = aio_pika.Message(
            encode(payload),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=uuid.uuid4().hex,
            headers=headers,
        )
        # mandatory=False, as most publishers do: an unroutable order is confirmed
        # and silently dropped by the broker, which is what makes mis-routing hard to see.
        await self._exchange.publish(message, routing_key=routing_key, mandatory=False)
        self.stats.record(Event.PLACED, order.order_id)
        return order

    async def place_orders(
        self,
        n: int,
        *,
        poison: int = 0,
        declined: int = 0,
        bad_address: int = 0,
        amended: int = 0,
        faults: Faults | None = None,
    ) -> list[Order]:
        """Plan ``n`` orders (see plan_orders) and publish them in order; returns them as sent."""
        faults = self.settings.faults if faults is None else faults
        if Fault.REORDER in faults:
            # The fault inverts two payments of one customer: make sure one has two.
            amended = max(amended, 1)
        planned = plan_orders(
            n, poison=poison, declined=declined, bad_address=bad_address, amended=amended
        )
        return [await self.publish(order, faults) for order in planned]


async def place_orders(
    n: int,
    *,
    settings: Settings,
    poison: int = 0,
    declined: int = 0,
    bad_address: int = 0,
    amended: int = 0,
    stats: Stats | None = None,
) -> list[Order]:
    """Connect, place ``n`` orders, disconnect: checkout as a one-shot function."""
    async with Checkout(settings, stats) as checkout:
        return await checkout.place_orders(
            n, poison=poison, declined=declined, bad_address=bad_address, amended=amended
        )


class CheckoutService:
    """checkout as a service: places every order requested on checkout.requests."""

    name = "checkout"

    def __init__(self, settings: Settings, stats: Stats) -> None:
        self.settings = settings
        self.stats = stats
        self.ready = asyncio.Event()

    async def run(self) -> None:
        connection = await aio_pika.connect_robust(self.settings.brokers.rabbitmq_url)
        try:
            async with Checkout(self.settings, self.stats) as checkout:
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=self.settings.checkout_prefetch)
                queue = await channel.get_queue(self.settings.names.checkout_requests)
                async with queue.iterator() as requests:
                    self.ready.set()
                    async for request in requests:  # one at a time: orders keep their order
                        checkpoint()
                        await self._place(checkout, request)
        finally:
            await connection.close()

    @staticmethod
    async def _place(checkout: Checkout, request: AbstractIncomingMessage) -> None:
        try:
            order = Order.from_payload(decode(request.body))
        except BadMessage:
            await request.reject(requeue=False)  # nothing to place; no retry can fix it
            return
        traceparent = trace_context(request.headers).get("traceparent")
        await checkout.publish(replace(order, traceparent=traceparent))
        await request.ack()  # after the broker confirmed the order: none is lost in between

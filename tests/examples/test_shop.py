"""The example shop (examples/shop) on the real brokers: a clean run, then one test per fault.

Each test runs its own shop under the test's unique prefix and tears it down
after. Waits are on the shop's own counters, under deadlines; the evidence is
read back from the brokers. Kafka consumer-group joins are slow on some
brokers (~5 s on the local dev broker), so tests that only need billing run
billing alone and read the payments topic without a group.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml
from aio_pika.abc import AbstractIncomingMessage
from aiokafka import AIOKafkaConsumer, TopicPartition
from harness import AmqpScope
from redis.asyncio import Redis

from examples.shop import (
    Brokers,
    Event,
    Fault,
    Faults,
    Kind,
    Names,
    Service,
    Settings,
    Shop,
    Stats,
    plan_orders,
    setup,
    teardown,
)
from examples.shop.config import PAYMENTS_DLT_PARTITIONS, PAYMENTS_PARTITIONS
from examples.shop.messages import DECLINED_CARD, encode

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 60.0  # seconds; the runs take a few, this only bounds a failure
READ_TIMEOUT = 15.0


@pytest.fixture
def settings(rabbitmq_url: str, redis_url: str, kafka_bootstrap: str, unique: str) -> Settings:
    # Short waits between retries keep the tests quick; the defaults follow shop.yaml.
    return Settings(
        brokers=Brokers(rabbitmq_url, kafka_bootstrap, redis_url),
        prefix=f"{unique}.",
        claim_idle_ms=200,  # a stuck shipment waits 200 ms, then 400 ms, ...
        claim_backoff_max_ms=400,  # ... at most 400 ms
        payment_backoff_ms=200,
    )


def running(settings: Settings, *faults: Fault, services: frozenset[Service] | None = None) -> Shop:
    """A shop with ``faults`` on, declared on entry and torn down on exit."""
    return Shop(
        replace(settings, faults=Faults.of(*faults, latency_ms=300)),
        services=services if services is not None else frozenset(Service),
        remove=True,
    )


BILLING_ONLY = frozenset({Service.BILLING})


async def read_topic(bootstrap: str, topic: str, partitions: int) -> list[Any]:
    """Every record now in ``topic``, in offset order per partition, read without a group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        async with asyncio.timeout(READ_TIMEOUT):
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                batches = await consumer.getmany(timeout_ms=200)
                for batch in batches.values():
                    records.extend(batch)
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        await consumer.stop()


async def take(amqp: AmqpScope, queue_name: str, n: int) -> list[AbstractIncomingMessage]:
    """The first ``n`` messages of a queue, acked."""
    queue = await amqp.channel.get_queue(queue_name)
    got: list[AbstractIncomingMessage] = []
    async with asyncio.timeout(READ_TIMEOUT), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            got.append(message)
            if len(got) == n:
                break
    return got


async def ready_count(amqp: AmqpScope, queue_name: str) -> int:
    """Messages ready in a queue (delivered, unacked ones are not counted)."""
    queue = await amqp.channel.declare_queue(queue_name, passive=True)
    count = queue.declaration_result.message_count
    assert count is not None
    return count


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def entries(redis: Redis, stream: str) -> list[dict[str, str]]:
    reply = await redis.xrange(stream)
    return [{str(k): str(v) for k, v in (fields or {}).items()} for _, fields in reply or []]


def order_of(record: Any) -> str:
    """The order a payment record is about: its order_id header (the key is the customer)."""
    order: bytes = dict(record.headers)["order_id"]
    return order.decode()


def big_endian(headers: dict[str, bytes], name: str) -> int:
    return int.from_bytes(headers[name], "big", signed=True)


# --- A clean run: every route taken, every dead letter where shop.yaml says.


async def test_clean_run_ships_healthy_orders_and_dead_letters_the_rest(
    settings: Settings, amqp: AmqpScope, redis_client: Redis
) -> None:
    names = settings.names
    async with running(settings) as shop:
        orders = await shop.place_orders(20, poison=2, declined=2, bad_address=2)
        by_kind = {kind: {o.order_id for o in orders if o.kind is kind} for kind in Kind}
        assert [len(by_kind[k]) for k in Kind] == [14, 2, 2, 2]
        await shop.wait_for(
            lambda s: (
                s.total(Event.SHIPPED) == 14
                and s.total(Event.BILLING_GAVE_UP) == 2
                and s.total(Event.PAYMENTS_DEAD_LETTERED) == 2
                and s.total(Event.SHIPPING_DEAD_LETTERED) == 2
            ),
            within=DEADLINE,
        )
        stats = shop.stats
        assert set(stats.orders(Event.SHIPPED)) == by_kind[Kind.OK]
        assert not stats.faults

        # Poison: four deliveries (1 + delivery limit 3), then RabbitMQ dead-letters it.
        received = stats.orders(Event.BILLING_RECEIVED)
        assert {received[o] for o in by_kind[Kind.POISON]} == {4}
        assert {received[o] for o in by_kind[Kind.OK]} == {1}
        dead_orders = await take(amqp, names.billing_dlq, 2)
        assert {m.headers["order_id"] for m in dead_orders} == by_kind[Kind.POISON]
        for message in dead_orders:
            assert json.loads(message.body)["poison"] is True
            deaths = message.headers["x-death"]
            assert isinstance(deaths, list)
            [death] = deaths
            assert isinstance(death, dict)
            assert death["reason"] == "delivery_limit"
            assert death["queue"] == names.billing_queue
            assert death["count"] == 1
            assert message.routing_key == "billing.orders"

        # Declined: the original, one retry through payments-retry, then the DLT.
        bootstrap = settings.brokers.kafka_bootstrap
        retries = await read_topic(bootstrap, names.payments_retry, PAYMENTS_PARTITIONS)
        assert {order_of(r) for r in retries} == by_kind[Kind.DECLINED]
        assert {big_endian(dict(r.headers), "retry_topic-attempts") for r in retries} == {2}
        dlt = await read_topic(bootstrap, names.payments_dlt, PAYMENTS_DLT_PARTITIONS)
        assert {order_of(r) for r in dlt} == by_kind[Kind.DECLINED]
        for record in dlt:
            headers = dict(record.headers)
            assert json.loads(record.value)["status"] == "declined"
            assert headers["kafka_dlt-original-topic"] == names.payments_retry.encode()
            assert 0 <= big_endian(headers, "kafka_dlt-original-partition") < PAYMENTS_PARTITIONS
            assert big_endian(headers, "kafka_dlt-original-offset") >= 0
            assert headers["kafka_dlt-exception-fqcn"] == b"examples.shop.payments.PaymentDeclined"
            assert b"declined" in headers["kafka_dlt-exception-message"]
            assert big_endian(headers, "retry_topic-attempts") == 2
        assert {o for o, n in stats.orders(Event.PAYMENTS_RECEIVED).items() if n == 2} == (
            by_kind[Kind.DECLINED]
        )

        # Bad address: three deliveries, then shipments-dead.
        trace = {o.order_id: o.traceparent for o in orders}
        dead = await entries(redis_client, names.shipments_dead)
        assert {e["order_id"] for e in dead} == by_kind[Kind.BAD_ADDRESS]
        for entry in dead:
            assert entry["traceparent"] == trace[entry["order_id"]]
            assert entry["delivery_count"] == "3"
            assert entry["reason"].startswith("Undeliverable")
            assert json.loads(entry["payload"])["address"] is None
        pending = await redis_client.xpending(names.shipments, names.shipping_group)
        assert pending["pending"] == 0
        for order_id in by_kind[Kind.BAD_ADDRESS]:  # backoff 200 ms, then 400 ms
            first, second, third = stats.times(Event.SHIPPING_RECEIVED, order_id)
            # Redis counts idle time from its own delivery, a moment before the client sees it.
            assert second - first >= 0.19
            assert third - second >= 0.39

        # Trace context and order id travel along the whole chain.
        shipments = await entries(redis_client, names.shipments)
        assert len(shipments) == 16
        for entry in shipments:
            assert entry["traceparent"] == trace[entry["order_id"]]
            assert json.loads(entry["payload"])["order_id"] == entry["order_id"]
        payments = await read_topic(bootstrap, names.payments, PAYMENTS_PARTITIONS)
        assert len(payments) == 18
        customer = {o.order_id: o.customer for o in orders}
        for record in payments:
            headers = dict(record.headers)
            assert record.key.decode() == customer[order_of(record)]  # a customer's keep order
            assert headers["traceparent"].decode() == trace[order_of(record)]


# --- One test per fault switch: the fault really happens.


async def test_drop_loses_one_payment(settings: Settings, amqp: AmqpScope) -> None:
    async with running(settings, Fault.DROP, services=BILLING_ONLY) as shop:
        orders = await shop.place_orders(4)
        # Billed (published and acked by Kafka) three, dropped one.
        await shop.wait_for(lambda s: s.total(Event.BILLED) == 3 and bool(s.faults), DEADLINE)
        [(fault, dropped)] = shop.stats.faults
        assert fault is Fault.DROP
        payments = await read_topic(
            settings.brokers.kafka_bootstrap, settings.names.payments, PAYMENTS_PARTITIONS
        )
        keys = sorted(order_of(r) for r in payments)
        assert keys == sorted(o.order_id for o in orders if o.order_id != dropped)
        assert await ready_count(amqp, settings.names.billing_queue) == 0


async def test_duplicate_publishes_one_payment_twice(settings: Settings) -> None:
    async with running(settings, Fault.DUPLICATE, services=BILLING_ONLY) as shop:
        orders = await shop.place_orders(4)
        await shop.wait_for(lambda s: s.total(Event.BILLED) == 5, DEADLINE)
        [(_, doubled)] = shop.stats.faults
        payments = await read_topic(
            settings.brokers.kafka_bootstrap, settings.names.payments, PAYMENTS_PARTITIONS
        )
        keys = sorted(order_of(r) for r in payments)
        assert keys == sorted([o.order_id for o in orders] + [doubled])
        twins = [r for r in payments if order_of(r) == doubled]
        assert twins[0].value == twins[1].value


async def test_reorder_inverts_the_payments_of_one_order(settings: Settings) -> None:
    async with running(settings, Fault.REORDER, services=BILLING_ONLY) as shop:
        orders = await shop.place_orders(4)
        # Checkout amends one order, so that order is placed twice: revision 1, then 2.
        amended = [o for o in orders if o.revision == 2]
        assert len(amended) == 1
        key = amended[0].order_id
        assert [o.revision for o in orders if o.order_id == key] == [1, 2]
        await shop.wait_for(lambda s: s.total(Event.BILLED) == 5, DEADLINE)
        assert shop.stats.faults == [(Fault.REORDER, key)]
        payments = await read_topic(
            settings.brokers.kafka_bootstrap, settings.names.payments, PAYMENTS_PARTITIONS
        )
        same_key = [r for r in payments if order_of(r) == key]  # one partition, offset order
        assert [json.loads(r.value)["revision"] for r in same_key] == [2, 1]


async def test_latency_delays_every_payment(settings: Settings) -> None:
    async with running(settings, Fault.LATENCY, services=BILLING_ONLY) as shop:
        orders = await shop.place_orders(3)
        await shop.wait_for(lambda s: s.total(Event.BILLED) == 3, DEADLINE)
        stats = shop.stats
        for order in orders:
            [received] = stats.times(Event.BILLING_RECEIVED, order.order_id)
            [billed] = stats.times(Event.BILLED, order.order_id)
            assert billed - received >= 0.3
        # Seen from the brokers too: record CreateTime minus the order's placed_at.
        payments = await read_topic(
            settings.brokers.kafka_bootstrap, settings.names.payments, PAYMENTS_PARTITIONS
        )
        placed = {o.order_id: o.placed_at for o in orders}
        for record in payments:
            placed_ms = datetime.fromisoformat(placed[order_of(record)]).timestamp() * 1000
            assert record.timestamp - placed_ms >= 300


async def test_mis_route_reaches_no_queue(settings: Settings, amqp: AmqpScope, unique: str) -> None:
    async with running(settings, Fault.MIS_ROUTE, services=BILLING_ONLY) as shop:
        exchange = await amqp.channel.get_exchange(settings.names.orders_exchange)
        witness = await amqp.declare_queue(f"{unique}.witness", exclusive=True)
        await witness.bind(exchange, "#")
        misrouted = await shop.place_orders(3)
        # A correctly routed order afterwards: billing.orders is FIFO, so once billing
        # has it, anything routed before it would have been billed first.
        [sentinel] = await shop.place_orders(1, faults=Faults())
        await shop.wait_for(lambda s: s.total(Event.BILLED) == 1, DEADLINE)
        assert set(shop.stats.orders(Event.BILLING_RECEIVED)) == {sentinel.order_id}
        assert {o for _, o in shop.stats.faults} == {o.order_id for o in misrouted}
        seen = await take(amqp, witness.name, 4)
        assert [m.routing_key for m in seen] == ["order.placd"] * 3 + ["order.placed"]


@pytest.mark.parametrize("faults", [(), (Fault.MIS_ROUTE,)], ids=["clean", "mis-route"])
async def test_checkout_service_places_requested_orders_in_their_trace(
    settings: Settings, amqp: AmqpScope, unique: str, faults: tuple[Fault, ...]
) -> None:
    async with running(settings, *faults, services=frozenset({Service.CHECKOUT})) as shop:
        exchange = await amqp.channel.get_exchange(settings.names.orders_exchange)
        witness = await amqp.declare_queue(f"{unique}.witness", exclusive=True)
        await witness.bind(exchange, "#")
        [order] = plan_orders(1, run_id="r")
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        await exchange.publish(
            aio_pika.Message(encode(order.payload()), headers={"traceparent": traceparent}),
            routing_key="order.requested",
        )
        await shop.wait_for(lambda s: s.total(Event.PLACED) == 1, DEADLINE)
        request, placed = await take(amqp, witness.name, 2)
        assert request.routing_key == "order.requested"
        assert placed.routing_key == ("order.placd" if faults else "order.placed")
        assert placed.headers["traceparent"] == traceparent  # the same trace
        assert placed.headers["order_id"] == order.order_id
        assert json.loads(placed.body)["order_id"] == order.order_id
        assert json.loads(placed.body)["placed_at"]  # checkout stamps it
        assert await ready_count(amqp, settings.names.checkout_requests) == 0  # acked


async def test_retry_too_often_gives_a_stuck_shipment_five_deliveries(
    settings: Settings, redis_client: Redis
) -> None:
    async with running(settings, Fault.RETRY_TOO_OFTEN) as shop:
        orders = await shop.place_orders(3, bad_address=1)
        [stuck] = [o.order_id for o in orders if o.kind is Kind.BAD_ADDRESS]
        await shop.wait_for(
            lambda s: s.total(Event.SHIPPING_DEAD_LETTERED) == 1 and s.total(Event.SHIPPED) == 2,
            DEADLINE,
        )
        assert shop.stats.orders(Event.SHIPPING_RECEIVED)[stuck] == 5
        [entry] = await entries(redis_client, settings.names.shipments_dead)
        assert (entry["order_id"], entry["delivery_count"]) == (stuck, "5")


async def test_skip_dead_letter_swallows_poison_and_stuck_messages(
    settings: Settings, amqp: AmqpScope, redis_client: Redis
) -> None:
    names = settings.names
    async with running(settings, Fault.SKIP_DEAD_LETTER) as shop:
        orders = await shop.place_orders(4, poison=1, bad_address=1)
        lost = {o.order_id for o in orders if o.kind in (Kind.POISON, Kind.BAD_ADDRESS)}
        await shop.wait_for(lambda s: len(s.faults) == 2 and s.total(Event.SHIPPED) == 2, DEADLINE)
        assert {o for _, o in shop.stats.faults} == lost
        assert shop.stats.total(Event.BILLING_GAVE_UP) == 0
        # Billing acked the poison order on its last delivery: nothing was dead-lettered.
        assert await ready_count(amqp, names.billing_dlq) == 0
        # Shipping acked the stuck entry without writing the dead-letter stream.
        assert await redis_client.exists(names.shipments_dead) == 0
        pending = await redis_client.xpending(names.shipments, names.shipping_group)
        assert pending["pending"] == 0


async def test_early_retry_makes_a_declined_payments_retry_due_at_once(
    settings: Settings,
) -> None:
    async with running(settings, Fault.EARLY_RETRY) as shop:
        orders = await shop.place_orders(2, declined=1)
        [declined] = [o.order_id for o in orders if o.kind is Kind.DECLINED]
        await shop.wait_for(
            lambda s: s.total(Event.PAYMENTS_DEAD_LETTERED) == 1 and s.total(Event.SHIPPED) == 1,
            DEADLINE,
        )
        assert shop.stats.faults == [(Fault.EARLY_RETRY, declined)]
        [retry] = await read_topic(
            settings.brokers.kafka_bootstrap, settings.names.payments_retry, PAYMENTS_PARTITIONS
        )
        # Due no later than it was written: no backoff at all (else written + 200 ms).
        due = big_endian(dict(retry.headers), "retry_topic-backoff-timestamp")
        assert (order_of(retry), due <= retry.timestamp) == (declined, True)


async def test_bad_schema_sends_one_amount_as_a_string(settings: Settings, amqp: AmqpScope) -> None:
    async with running(settings, Fault.BAD_SCHEMA, services=BILLING_ONLY) as shop:
        queue = await amqp.declare_queue(f"{settings.prefix}witness", exclusive=True)
        await queue.bind(await amqp.channel.get_exchange(settings.names.orders_exchange), "#")
        orders = await shop.place_orders(3)
        await shop.wait_for(lambda s: s.total(Event.BILLED) == 3, DEADLINE)  # billed all the same
        assert shop.stats.faults == [(Fault.BAD_SCHEMA, orders[0].order_id)]
        amounts = [json.loads(m.body)["amount"] for m in await take(amqp, queue.name, 3)]
        assert amounts == [str(orders[0].amount), orders[1].amount, orders[2].amount]


async def test_phantom_publishes_a_payment_for_an_order_never_placed(settings: Settings) -> None:
    phantom = replace(settings, phantom_delay_ms=100)
    async with running(phantom, Fault.PHANTOM, services=BILLING_ONLY) as shop:
        orders = await shop.place_orders(2)
        await shop.wait_for(lambda s: s.total(Event.BILLED) == 3, DEADLINE)
        [(fault, ghost)] = shop.stats.faults
        assert (fault, ghost) == (Fault.PHANTOM, f"{orders[0].order_id}-replay")
        payments = await read_topic(
            settings.brokers.kafka_bootstrap, settings.names.payments, PAYMENTS_PARTITIONS
        )
        keys = sorted(order_of(r) for r in payments)
        assert keys == sorted([o.order_id for o in orders] + [ghost])


# --- Set-up, names and the command line.


async def test_setup_is_idempotent_and_teardown_removes_everything(
    settings: Settings, amqp: AmqpScope, redis_client: Redis
) -> None:
    names = settings.names
    try:
        await setup(settings)
        await setup(settings)  # again: nothing changes, nothing fails
        assert await amqp.queue_exists(names.billing_queue)
        assert await amqp.queue_exists(names.billing_dlq)
        assert await amqp.exchange_exists(names.dead_letter_exchange)
        groups = await redis_client.xinfo_groups(names.shipments)
        assert [g["name"] for g in groups] == [names.shipping_group]
    finally:
        await teardown(settings)
    assert not await amqp.queue_exists(names.billing_queue)
    assert not await amqp.exchange_exists(names.orders_exchange)
    assert await redis_client.exists(names.shipments) == 0
    await teardown(settings)  # and again


def test_names_cover_every_channel_and_group_of_shop_yaml() -> None:
    topology = yaml.safe_load((ROOT / "topologies" / "shop.yaml").read_text())
    wanted = set(topology["channels"])
    for service in topology["services"].values():
        wanted |= {c["group"] for c in service.get("consumes", []) if isinstance(c, dict)}
    mapping = Names.for_prefix("t-1.").mapping()
    assert set(mapping) == wanted
    assert all(actual == f"t-1.{name}" for name, actual in mapping.items())


def test_plan_orders_spreads_the_special_orders() -> None:
    orders = plan_orders(20, poison=2, declined=2, bad_address=2, amended=1, run_id="r")
    assert len(orders) == 21
    assert orders[0].kind is Kind.OK
    assert orders[1].order_id == orders[0].order_id
    kinds = [o.kind for o in orders if o.revision == 1]
    assert [k for k in kinds if k is not Kind.OK] == [Kind.POISON] * 2 + [Kind.DECLINED] * 2 + [
        Kind.BAD_ADDRESS
    ] * 2
    assert all(o.card == DECLINED_CARD for o in orders if o.kind is Kind.DECLINED)
    with pytest.raises(ValueError, match="at least"):
        plan_orders(2, poison=1, declined=1)


async def test_command_line_runs_until_idle(settings: Settings) -> None:
    env = {
        **os.environ,
        "FLOWCHECK_RABBITMQ_URL": settings.brokers.rabbitmq_url,
        "FLOWCHECK_KAFKA_BOOTSTRAP": settings.brokers.kafka_bootstrap,
        "FLOWCHECK_REDIS_URL": settings.brokers.redis_url,
    }
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-W", "error", "-m", "examples.shop", "run"),
        *("--orders", "4", "--bad-address", "1", "--prefix", settings.prefix),
        *("--claim-idle-ms", "200", "--until-idle", "--teardown"),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(DEADLINE):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode()
    assert process.returncode == 0, text
    assert "every order reached its end" in text
    assert "shipped 3, dead-lettered 1" in text


async def test_stats_wait_ends_when_the_condition_holds() -> None:
    stats = Stats()
    waiting = asyncio.create_task(stats.wait_for(lambda s: s.total(Event.SHIPPED) == 2, 5))
    stats.record(Event.SHIPPED, "a")
    await asyncio.sleep(0)  # let the waiter run once: it must still be waiting
    assert not waiting.done()
    stats.record(Event.SHIPPED, "b")
    await waiting
    with pytest.raises(TimeoutError):
        await stats.wait_for(lambda s: False, 0.01)


# --- Survives what production throws at it.


async def kill_redis_client(redis: Redis, name: str) -> str:
    """Kill the one connection named ``name`` (CLIENT KILL ID: no other client is touched);
    returns its id."""
    clients = [c for c in await redis.client_list() if c.get("name") == name]
    assert len(clients) == 1, clients
    killed = str(clients[0]["id"])
    assert await redis.client_kill_filter(_id=killed) == 1
    return killed


@pytest.mark.parametrize("service", [Service.SHIPPING, Service.PAYMENTS])
async def test_a_dropped_redis_connection_is_reconnected(
    settings: Settings, redis_client: Redis, service: Service
) -> None:
    name = settings.names.redis_client(service)
    async with running(settings) as shop:
        await shop.place_orders(2)
        await shop.wait_for(lambda s: s.total(Event.SHIPPED) == 2, within=DEADLINE)
        killed = await kill_redis_client(redis_client, name)
        await shop.place_orders(3)
        await shop.wait_for(lambda s: s.total(Event.SHIPPED) == 5, within=DEADLINE)
        now = [str(c["id"]) for c in await redis_client.client_list() if c.get("name") == name]
        assert now
        assert killed not in now

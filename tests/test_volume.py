"""The tracer at volume: every one of >= 10,000 messages across the three brokers is
observed while the shop's own consumers still receive every one of them."""

from __future__ import annotations

import json
from collections import defaultdict

import anyio

from examples.shop import Brokers, Event, Settings, Shop
from examples.shop.topology import topology_yaml
from flowcheck.observations import Kind, Observation
from flowcheck.topology import loads
from flowcheck.tracer import Tracer

ORDERS = 2600  # each order is a message on 4 channels: 10,400 messages in all
CHANNELS = ("shop.orders", "billing.orders", "payments", "shipments")


async def test_tap_sees_every_message_and_takes_none(
    unique: str, rabbitmq_url: str, kafka_bootstrap: str, redis_url: str
) -> None:
    prefix = f"{unique}."
    brokers = Brokers(
        rabbitmq_url=rabbitmq_url, kafka_bootstrap=kafka_bootstrap, redis_url=redis_url
    )
    topology = loads(topology_yaml(prefix, brokers))
    seen: dict[str, set[str]] = defaultdict(set)
    copies: dict[str, int] = defaultdict(int)
    all_seen = anyio.Event()

    def sink(obs: Observation) -> None:
        if obs.channel in CHANNELS and obs.kind == Kind.ROUTED:
            copies[obs.channel] += 1
            seen[obs.channel].add(json.loads(obs.payload or "{}")["order_id"])
            if all(len(seen[c]) >= ORDERS for c in CHANNELS):
                all_seen.set()

    async with Shop(Settings(brokers=brokers, prefix=prefix), remove=True) as shop:
        async with Tracer(topology, [sink], channels=list(CHANNELS)):
            orders = await shop.place_orders(ORDERS)
            await shop.wait_for(lambda s: s.total(Event.SHIPPED) >= ORDERS, within=600)
            with anyio.fail_after(60):
                await all_seen.wait()
        stats = shop.stats
    placed = {o.order_id for o in orders}
    # The system's side: every order billed, paid and shipped, each exactly once.
    assert stats.total(Event.BILLING_RECEIVED) == ORDERS
    assert stats.total(Event.PAYMENTS_RECEIVED) == ORDERS
    assert stats.total(Event.SHIPPED) == ORDERS
    assert set(stats.orders(Event.SHIPPED)) == placed
    # The tap's side: every message on every channel, each exactly once.
    for channel in CHANNELS:
        assert seen[channel] == placed, channel
        assert copies[channel] == ORDERS, channel
    assert sum(copies.values()) >= 10_000

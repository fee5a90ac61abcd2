"""The shop: a small real system on RabbitMQ, Kafka and Redis Streams (topologies/shop.yaml).

checkout publishes orders to the topic exchange shop.orders; billing works the
quorum queue billing.orders and publishes payments to the Kafka topic
payments; payments-worker turns approved payments into entries on the Redis
stream shipments (declined ones go through payments-retry to payments-dlt);
shipping consumes shipments (stuck ones end in shipments-dead). Each hop has
its retry and dead-letter route, and Faults switches on one bug each.

    async with Shop(Settings(prefix="demo.")) as shop:
        orders = await shop.place_orders(20, poison=2, declined=2, bad_address=2)
        await shop.run_until_idle(orders, idle_seconds=5)

or ``python -m examples.shop run --help``.
"""

from .checkout import Checkout, place_orders
from .config import Brokers, Fault, Faults, Names, Settings, broker_name
from .infra import setup, teardown
from .messages import Kind, Order, plan_orders
from .stats import Event, Stats
from .system import ALL_SERVICES, Service, ServiceFailed, Shop

__all__ = [
    "ALL_SERVICES",
    "Brokers",
    "Checkout",
    "Event",
    "Fault",
    "Faults",
    "Kind",
    "Names",
    "Order",
    "Service",
    "ServiceFailed",
    "Settings",
    "Shop",
    "Stats",
    "broker_name",
    "place_orders",
    "plan_orders",
    "setup",
    "teardown",
]

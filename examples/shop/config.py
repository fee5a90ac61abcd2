"""Broker addresses, broker-side names, tuning knobs and fault switches of the shop."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Self

# The same variables and defaults as flowcheck's own (flowcheck/defaults.py),
# duplicated on purpose: the shop is "someone else's system" and imports nothing
# from flowcheck.
RABBITMQ_URL_VAR = "FLOWCHECK_RABBITMQ_URL"
KAFKA_BOOTSTRAP_VAR = "FLOWCHECK_KAFKA_BOOTSTRAP"
REDIS_URL_VAR = "FLOWCHECK_REDIS_URL"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
KAFKA_BOOTSTRAP = "127.0.0.1:9092"
REDIS_URL = "redis://127.0.0.1:6379/0"

# Routing keys are not names of broker objects, so they never get the prefix:
# the prefix already isolates the exchanges they are used on.
ORDER_REQUESTED = "order.requested"  # a storefront asks checkout to place an order
ORDER_PLACED = "order.placed"
MISROUTED_KEY = "order.placd"  # the typo the mis-route fault publishes with
DEAD_LETTER_KEY = "billing.orders"

# Numbers the broker objects are declared with (topologies/shop.yaml).
BILLING_DELIVERY_LIMIT = 3  # quorum queue: the 4th failed delivery dead-letters
PAYMENTS_PARTITIONS = 3
PAYMENTS_DLT_PARTITIONS = 1


@dataclass(frozen=True, slots=True)
class Brokers:
    """Where the three brokers are."""

    rabbitmq_url: str = RABBITMQ_URL
    kafka_bootstrap: str = KAFKA_BOOTSTRAP
    redis_url: str = REDIS_URL

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Addresses from FLOWCHECK_* variables; unset or empty means the default."""
        env = os.environ if environ is None else environ
        return cls(
            rabbitmq_url=env.get(RABBITMQ_URL_VAR) or RABBITMQ_URL,
            kafka_bootstrap=env.get(KAFKA_BOOTSTRAP_VAR) or KAFKA_BOOTSTRAP,
            redis_url=env.get(REDIS_URL_VAR) or REDIS_URL,
        )


def broker_name(name: str, prefix: str = "") -> str:
    """The broker-side name of the shop object ``name`` (as spelled in shop.yaml).

    The one rule for every exchange, queue, topic, stream and consumer group:
    the prefix goes in front. Routing keys and header names are left alone.
    """
    return f"{prefix}{name}"


@dataclass(frozen=True, slots=True)
class Names:
    """Every broker-side name the shop uses, for one prefix."""

    prefix: str
    orders_exchange: str
    checkout_requests: str
    dead_letter_exchange: str
    billing_queue: str
    billing_dlq: str
    payments: str
    payments_retry: str
    payments_dlt: str
    shipments: str
    shipments_dead: str
    payments_group: str
    shipping_group: str

    @classmethod
    def for_prefix(cls, prefix: str = "") -> Self:
        def n(name: str) -> str:
            return broker_name(name, prefix)

        return cls(
            prefix=prefix,
            orders_exchange=n("shop.orders"),
            checkout_requests=n("checkout.requests"),
            dead_letter_exchange=n("shop.dlx"),
            billing_queue=n("billing.orders"),
            billing_dlq=n("billing.orders.dlq"),
            payments=n("payments"),
            payments_retry=n("payments-retry"),
            payments_dlt=n("payments-dlt"),
            shipments=n("shipments"),
            shipments_dead=n("shipments-dead"),
            payments_group=n("payments-worker"),
            shipping_group=n("shipping"),
        )

    def redis_client(self, service: str) -> str:
        """The name ``service``'s Redis connections carry (CLIENT SETNAME): what tells them
        apart in CLIENT LIST."""
        return f"{self.prefix}shop-{service}"

    def mapping(self) -> dict[str, str]:
        """shop.yaml name → broker-side name, for channels and groups alike."""
        logical = Names.for_prefix("")
        return {
            getattr(logical, f.name): getattr(self, f.name)
            for f in fields(self)
            if f.name != "prefix"
        }


class Fault(StrEnum):
    """One deliberate bug each, for flowcheck to catch."""

    # billing acks the first approved order without publishing its payment
    DROP = "drop"
    # billing publishes the first approved order's payment twice
    DUPLICATE = "duplicate"
    # billing holds the first approved payment back and publishes it right after the
    # customer's next payment: an inversion at payments, in offset order, with no
    # payment late (place_orders amends the first order at once, and the demo's
    # scenario has one customer order twice, so there is a next one; without one it
    # goes after reorder_hold_ms)
    REORDER = "reorder"
    # billing waits latency_ms before publishing every payment (and acking its order),
    # while it goes on taking the next orders: each payment is late, none waits for another
    LATENCY = "latency"
    # shipping gives a stuck shipment 5 deliveries instead of 3
    RETRY_TOO_OFTEN = "retry-too-often"
    # billing acks a poison order on its last delivery instead of letting RabbitMQ
    # dead-letter it; shipping acks a stuck shipment without writing shipments-dead
    SKIP_DEAD_LETTER = "skip-dead-letter"
    # checkout places orders with routing key order.placd: no queue is bound to it
    MIS_ROUTE = "mis-route"
    # payments-worker retries a declined payment at once instead of after its backoff
    # (payment_backoff_ms); caught where the topology declares that backoff
    EARLY_RETRY = "early-retry"
    # checkout sends the first order's amount as a string ("12.5", a decimal written
    # with str()): billing still parses it, but it breaks billing.orders' schema
    BAD_SCHEMA = "bad-schema"
    # billing publishes, phantom_delay_ms after its first approved payment, a payment
    # for an order id that was never placed (a stale job replayed)
    PHANTOM = "phantom"


@dataclass(frozen=True, slots=True)
class Faults:
    """The fault switches that are on; empty means a correct system."""

    enabled: frozenset[Fault] = frozenset()
    latency_ms: int = 750  # above payments' p99 budget of 500 ms in shop.yaml

    @classmethod
    def of(cls, *faults: Fault | str, latency_ms: int = 750) -> Self:
        return cls(frozenset(Fault(f) for f in faults), latency_ms)

    def __contains__(self, fault: object) -> bool:
        return fault in self.enabled

    def __bool__(self) -> bool:
        return bool(self.enabled)

    def names(self) -> list[str]:
        return sorted(f.value for f in self.enabled)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a running shop needs to know."""

    brokers: Brokers = field(default_factory=Brokers.from_env)
    prefix: str = ""
    faults: Faults = Faults()
    billing_prefetch: int = 10
    checkout_prefetch: int = 10  # order requests taken at a time (placed one by one)
    payment_attempts: int = 2  # the original delivery plus one through payments-retry
    payment_backoff_ms: int = 1000  # before the retry (the soundness suite declares 1s)
    shipping_delivery_limit: int = 3  # deliveries in all, the first included
    # A stuck shipment waits 500 ms, then 1 s, ... at most 2 s before its next
    # delivery. shop.yaml declares no backoff on stuck-shipment: the tap polls the
    # pending entries, and two deliveries between two polls would leave it unjudged.
    claim_idle_ms: int = 500
    claim_backoff_multiplier: float = 2.0
    claim_backoff_max_ms: int = 2000
    reorder_hold_ms: int = 2000  # reorder fault: the longest a payment is held back
    # phantom fault: the wait before the phantom payment. A chain first seen within its
    # flow's deadline (plus grace) of a recording's start may have begun before it, so
    # flowcheck flags a chain that skipped the first step only after that.
    phantom_delay_ms: int = 15_000

    @property
    def names(self) -> Names:
        return Names.for_prefix(self.prefix)

    def claim_backoff_ms(self, deliveries: int) -> int:
        """How long a shipment delivered ``deliveries`` times waits before the next delivery."""
        wait = self.claim_idle_ms * self.claim_backoff_multiplier ** max(0, deliveries - 1)
        return int(min(wait, max(self.claim_backoff_max_ms, self.claim_idle_ms)))

    def effective_shipping_limit(self) -> int:
        return 5 if Fault.RETRY_TOO_OFTEN in self.faults else self.shipping_delivery_limit


def parse_faults(values: Iterable[str], latency_ms: int = 750) -> Faults:
    """Faults from CLI words; raises ValueError naming the valid ones."""
    try:
        return Faults.of(*values, latency_ms=latency_ms)
    except ValueError:
        valid = ", ".join(f.value for f in Fault)
        bad = [v for v in values if v not in {f.value for f in Fault}]
        raise ValueError(f"unknown fault {', '.join(bad)}; choose from {valid}") from None

"""Broker addresses, broker-side names and fault switches of the ledger."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Self

# The same variables and defaults as flowcheck's own, duplicated on purpose: the
# ledger is "someone else's system" and imports nothing from flowcheck.
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
KAFKA_BOOTSTRAP = "127.0.0.1:9092"
REDIS_URL = "redis://127.0.0.1:6379/0"

PARTITIONS = 3  # ledger.tx and ledger.tx-retry: one poster consumer each
TX_ATTEMPTS = 3  # a rejected transaction: the original and two retries, then ledger.tx-dlt
SETTLE_DELIVERIES = 3  # a frozen account's entry: three deliveries, then ledger.posted-dead


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
            rabbitmq_url=env.get("FLOWCHECK_RABBITMQ_URL") or RABBITMQ_URL,
            kafka_bootstrap=env.get("FLOWCHECK_KAFKA_BOOTSTRAP") or KAFKA_BOOTSTRAP,
            redis_url=env.get("FLOWCHECK_REDIS_URL") or REDIS_URL,
        )


@dataclass(frozen=True, slots=True)
class Names:
    """Every broker-side name the ledger uses, for one prefix (in front of each)."""

    prefix: str
    tx: str
    tx_retry: str
    tx_dlt: str
    posted: str
    posted_dead: str
    settled: str
    settled_v2: str  # declared on the broker, in no topology: where the mis-route fault goes
    audit: str
    notify: str
    poster_group: str
    settler_group: str

    @classmethod
    def for_prefix(cls, prefix: str = "") -> Self:
        return cls(
            prefix,
            *(
                prefix + name
                for name in (
                    "ledger.tx",
                    "ledger.tx-retry",
                    "ledger.tx-dlt",
                    "ledger.posted",
                    "ledger.posted-dead",
                    "ledger.settled",
                    "ledger.settled-v2",
                    "ledger.audit",
                    "ledger.notify",
                    "poster",
                    "settler",
                )
            ),
        )

    def mapping(self) -> dict[str, str]:
        """Name without prefix -> broker-side name, for channels and groups alike."""
        logical = Names.for_prefix("")
        return {
            getattr(logical, f.name): getattr(self, f.name)
            for f in fields(self)
            if f.name != "prefix"
        }


class Fault(StrEnum):
    """One deliberate bug each; a fault hits only the transaction ids it names."""

    DROP = "drop"  # poster: commits the transaction without posting it
    DUPLICATE = "duplicate"  # poster: posts it twice
    # poster: holds it back until the next transaction of its account is posted
    REORDER = "reorder"
    DELAY = "delay"  # poster: posts it delay_ms late (its partition keeps flowing)
    # poster: sends a healthy transaction to ledger.tx-dlt instead of posting it
    DEAD_LETTER_HEALTHY = "dead-letter-healthy"
    # poster (rejected) and settler (frozen): give up without writing the dead letter
    SKIP_DEAD_LETTER = "skip-dead-letter"
    RETRY_TOO_OFTEN = "retry-too-often"  # poster and settler: one attempt more than allowed
    RETRY_TOO_LITTLE = "retry-too-little"  # poster and settler: one attempt less
    MIS_ROUTE = "mis-route"  # settler: publishes to ledger.settled-v2, which nothing reads
    STOP = "stop"  # settler: stops for good when it reads the transaction


@dataclass(frozen=True, slots=True)
class Faults:
    """Which transaction ids each fault hits; empty means a correct system."""

    hits: Mapping[Fault, frozenset[str]] = field(default_factory=dict)
    delay_ms: int = 1500  # above ledger.yaml's 1s deadline and 600ms budget for ledger.posted

    @classmethod
    def of(cls, fault: Fault | str, ids: Iterable[str], delay_ms: int = 1500) -> Self:
        return cls({Fault(fault): frozenset(ids)}, delay_ms)

    def hit(self, fault: Fault, tx_id: str) -> bool:
        return tx_id in self.hits.get(fault, ())

    def __bool__(self) -> bool:
        return any(self.hits.values())


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a running ledger needs to know."""

    brokers: Brokers = field(default_factory=Brokers.from_env)
    prefix: str = ""
    faults: Faults = Faults()
    settle_batch: int = 5  # XREADGROUP COUNT
    claim_idle_ms: int = 100  # a failed entry is claimed again once idle this long
    retry_backoff_ms: int = 50  # before a rejected transaction's next attempt

    @property
    def names(self) -> Names:
        return Names.for_prefix(self.prefix)

    def tx_attempts(self, tx_id: str) -> int:
        return _attempts(self.faults, tx_id, TX_ATTEMPTS)

    def settle_deliveries(self, tx_id: str) -> int:
        return _attempts(self.faults, tx_id, SETTLE_DELIVERIES)


def _attempts(faults: Faults, tx_id: str, allowed: int) -> int:
    if faults.hit(Fault.RETRY_TOO_OFTEN, tx_id):
        return allowed + 1
    if faults.hit(Fault.RETRY_TOO_LITTLE, tx_id):
        return allowed - 1
    return allowed

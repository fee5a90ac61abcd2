"""What the services did, counted per order, with waits that end as soon as a condition holds.

Tests and ``--until-idle`` wait on these instead of sleeping: every record()
re-checks the pending waits.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from .config import Fault


class Event(StrEnum):
    """Something a service did with one message; the part before the dot names the service."""

    PLACED = "checkout.placed"
    BILLING_RECEIVED = "billing.received"
    BILLING_REJECTED = "billing.rejected"  # nacked for redelivery
    BILLING_GAVE_UP = "billing.gave-up"  # nacked on the last delivery: RabbitMQ dead-letters it
    BILLED = "billing.billed"  # payment published (approved or declined)
    PAYMENTS_RECEIVED = "payments-worker.received"
    PAYMENTS_RETRIED = "payments-worker.retried"
    PAYMENTS_DEAD_LETTERED = "payments-worker.dead-lettered"
    PAYMENTS_FORWARDED = "payments-worker.forwarded"  # shipment written
    SHIPPING_RECEIVED = "shipping.received"
    SHIPPING_FAILED = "shipping.failed"  # left pending, to be reclaimed
    SHIPPED = "shipping.shipped"
    SHIPPING_DEAD_LETTERED = "shipping.dead-lettered"
    FAULT = "fault.injected"


# An order (revision) has reached the end of its road when one of these is recorded.
TERMINAL = frozenset(
    {
        Event.BILLING_GAVE_UP,
        Event.PAYMENTS_DEAD_LETTERED,
        Event.SHIPPED,
        Event.SHIPPING_DEAD_LETTERED,
    }
)


@dataclass(frozen=True, slots=True)
class Record:
    event: Event
    order_id: str
    at: float  # time.monotonic()


Predicate = Callable[["Stats"], bool]


def checkpoint() -> None:
    """Raise the current task's pending cancellation, if a library swallowed it.

    On Python 3.11, asyncio.wait_for (which redis-py and others use inside)
    drops a cancellation that arrives just as the awaited operation finishes
    (CPython issue 86296, fixed in 3.12); a consumer loop would then run on.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Stats:
    def __init__(self) -> None:
        self.log: list[Record] = []
        self.faults: list[tuple[Fault, str]] = []  # (fault, order id) as injected
        self.last_activity = time.monotonic()
        self._totals: Counter[Event] = Counter()
        self._by_order: dict[Event, Counter[str]] = {e: Counter() for e in Event}
        self._waiters: list[tuple[asyncio.Future[None], Predicate]] = []

    def record(self, event: Event, order_id: str) -> None:
        now = time.monotonic()
        self.log.append(Record(event, order_id, now))
        self.last_activity = now
        self._totals[event] += 1
        self._by_order[event][order_id] += 1
        self._wake()

    def fault(self, fault: Fault, order_id: str) -> None:
        self.faults.append((fault, order_id))
        self.record(Event.FAULT, order_id)

    def total(self, event: Event) -> int:
        return self._totals[event]

    def orders(self, event: Event) -> Counter[str]:
        """How often ``event`` happened to each order id."""
        return Counter(self._by_order[event])

    def times(self, event: Event, order_id: str) -> list[float]:
        return [r.at for r in self.log if r.event is event and r.order_id == order_id]

    def finished(self, order_ids: Counter[str]) -> bool:
        """Whether every order id reached a terminal event as often as it was placed."""
        ended: Counter[str] = Counter()
        for event in TERMINAL:
            ended.update(self._by_order[event])
        return all(ended[oid] >= n for oid, n in order_ids.items())

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts per service, for printing."""
        out: dict[str, dict[str, int]] = {}
        for event in Event:
            service, _, what = event.value.partition(".")
            out.setdefault(service, {})[what] = self._totals[event]
        return out

    async def wait_for(self, predicate: Predicate, within: float) -> None:
        """Return once ``predicate(self)`` holds; TimeoutError after ``within`` seconds."""
        if predicate(self):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (future, predicate)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(within):
                await future
        finally:
            self._waiters.remove(entry)

    def _wake(self) -> None:
        for future, predicate in self._waiters:
            if not future.done() and predicate(self):
                future.set_result(None)

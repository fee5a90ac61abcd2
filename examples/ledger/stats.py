"""What the services did, per transaction, with waits that end as soon as a condition holds."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from enum import StrEnum

from .config import Fault


class Event(StrEnum):
    """Something a service did with one transaction; the part before the dot names the service."""

    PUBLISHED = "teller.published"
    POSTED = "poster.posted"  # written to ledger.posted
    RETRIED = "poster.retried"  # sent to ledger.tx-retry
    REJECTED = "poster.rejected"  # sent to ledger.tx-dlt
    SETTLED = "settler.settled"  # published to ledger.settled
    SETTLE_FAILED = "settler.failed"  # left pending, to be claimed again
    DEAD = "settler.dead"  # written to ledger.posted-dead
    AUDITED = "audit.received"
    NOTIFIED = "notify.received"
    FAULT = "fault.injected"


Predicate = Callable[["Stats"], bool]


def checkpoint() -> None:
    """Raise the current task's pending cancellation, if a library swallowed it
    (asyncio.wait_for on Python 3.11 can, CPython issue 86296)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Stats:
    def __init__(self) -> None:
        self.faults: list[tuple[Fault, str]] = []  # (fault, transaction id) as injected
        self.last_activity = time.monotonic()
        self._by_tx: dict[Event, Counter[str]] = {e: Counter() for e in Event}
        self._waiters: list[tuple[asyncio.Future[None], Predicate]] = []

    def record(self, event: Event, tx_id: str) -> None:
        self.last_activity = time.monotonic()
        self._by_tx[event][tx_id] += 1
        for future, predicate in self._waiters:
            if not future.done() and predicate(self):
                future.set_result(None)

    def fault(self, fault: Fault, tx_id: str) -> None:
        self.faults.append((fault, tx_id))
        self.record(Event.FAULT, tx_id)

    def hit(self, fault: Fault) -> set[str]:
        """The transaction ids ``fault`` was injected on."""
        return {tx for f, tx in self.faults if f is fault}

    def count(self, event: Event, tx_id: str) -> int:
        return self._by_tx[event][tx_id]

    def ids(self, event: Event) -> set[str]:
        return set(self._by_tx[event])

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

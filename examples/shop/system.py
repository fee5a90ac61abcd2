"""The whole shop in one process: each consuming service is an asyncio task."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterable
from enum import StrEnum
from types import TracebackType
from typing import Protocol, Self

from .billing import Billing
from .checkout import Checkout, CheckoutService
from .config import Faults, Settings
from .infra import setup, teardown
from .messages import Order
from .payments import PaymentsWorker
from .shipping import Shipping
from .stats import Predicate, Stats

START_TIMEOUT = 30.0
STOP_GRACE = 5.0  # seconds a cancelled service gets to close its connections
STOP_ROUNDS = 3


class Service(StrEnum):
    CHECKOUT = "checkout"
    BILLING = "billing"
    PAYMENTS = "payments-worker"
    SHIPPING = "shipping"


ALL_SERVICES = frozenset(Service)


class _Runner(Protocol):
    name: str
    ready: asyncio.Event

    async def run(self) -> None: ...


class ServiceFailed(RuntimeError):
    """A service task ended with an error (its cause is chained)."""


class Shop:
    """Start with ``async with Shop(settings) as shop:``; leaving the block stops every service.

    ``declare`` runs setup() first; ``remove`` runs teardown() after stopping.
    ``services`` picks which services run. place_orders always works: it calls
    checkout as a library; the checkout service takes orders from checkout.requests.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        services: Iterable[Service | str] = ALL_SERVICES,
        declare: bool = True,
        remove: bool = False,
        stats: Stats | None = None,
    ) -> None:
        self.settings = settings
        self.services = frozenset(Service(s) for s in services)
        self.declare = declare
        self.remove = remove
        self.stats = stats or Stats()
        self.checkout = Checkout(settings, self.stats)
        self._runners: list[_Runner] = []
        self._tasks: dict[asyncio.Task[None], str] = {}

    async def start(self) -> None:
        if self.declare:
            await setup(self.settings)
        await self.checkout.open()
        makers: dict[Service, type[CheckoutService | Billing | PaymentsWorker | Shipping]] = {
            Service.CHECKOUT: CheckoutService,
            Service.BILLING: Billing,
            Service.PAYMENTS: PaymentsWorker,
            Service.SHIPPING: Shipping,
        }
        self._runners = [
            make(self.settings, self.stats) for s, make in makers.items() if s in self.services
        ]
        for runner in self._runners:
            self._tasks[asyncio.create_task(runner.run(), name=runner.name)] = runner.name
        # Ready = connected and consuming; a service that dies while starting fails start().
        ready = {asyncio.create_task(r.ready.wait()) for r in self._runners}
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while waiting := {task for task in ready if not task.done()}:
                    await asyncio.wait(
                        {*waiting, *self._tasks}, return_when=asyncio.FIRST_COMPLETED
                    )
                    self._raise_if_failed()
        finally:
            for task in ready:
                task.cancel()

    async def stop(self) -> None:
        """Cancel the services (each closes its own connections), then close checkout."""
        try:
            pending = set(self._tasks)
            for _ in range(STOP_ROUNDS):
                if not pending:
                    break
                # A second round only if a library swallowed the cancellation
                # (see stats.checkpoint) while the task waited on a broker.
                for task in pending:
                    task.cancel()
                _, pending = await asyncio.wait(pending, timeout=STOP_GRACE)
            if pending:
                raise RuntimeError(
                    f"services did not stop: {sorted(t.get_name() for t in pending)}"
                )
        finally:
            try:
                await self.checkout.close()
            finally:
                if self.remove:
                    await teardown(self.settings)

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failed = self._failure()
        await self.stop()
        if exc is None and failed is not None:
            raise failed

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
        """Place orders through checkout (see plan_orders); ``faults`` overrides the shop's."""
        return await self.checkout.place_orders(
            n,
            poison=poison,
            declined=declined,
            bad_address=bad_address,
            amended=amended,
            faults=faults,
        )

    async def wait_for(self, predicate: Predicate, within: float) -> None:
        """Wait until ``predicate(stats)`` holds; TimeoutError after ``within`` seconds,
        ServiceFailed as soon as a service dies."""
        waiter = asyncio.create_task(self.stats.wait_for(predicate, within))
        try:
            await asyncio.wait({waiter, *self._tasks}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                self._raise_if_failed()
            await waiter
        finally:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter

    async def run_until_idle(self, orders: list[Order], idle_seconds: float) -> bool:
        """Wait until every order has reached its end (True) or nothing happened for a while (False)."""
        expected = Counter(o.order_id for o in orders)
        while True:
            try:
                await self.wait_for(lambda s: s.finished(expected), within=idle_seconds)
            except TimeoutError:
                if time.monotonic() - self.stats.last_activity >= idle_seconds:
                    return False
            else:
                return True

    def _failure(self) -> ServiceFailed | None:
        for task, name in self._tasks.items():
            if task.done() and not task.cancelled():
                cause = task.exception()
                error = ServiceFailed(f"service {name} stopped: {cause!r}")
                error.__cause__ = cause
                return error
        return None

    def _raise_if_failed(self) -> None:
        if (failed := self._failure()) is not None:
            raise failed

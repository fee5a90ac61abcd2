"""The whole ledger in one process: each consuming service is an asyncio task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from types import TracebackType
from typing import Protocol, Self

from .config import Fault, Settings
from .infra import setup, teardown
from .messages import Kind, Tx
from .services import Poster, Readers, Settler, Teller
from .stats import Event, Predicate, Stats

START_TIMEOUT = 30.0
STOP_GRACE = 5.0  # seconds a cancelled service gets to close its connections
STOP_ROUNDS = 3

# Faults that end a transaction's road where they hit it.
ENDING = frozenset(
    {Fault.DROP, Fault.DEAD_LETTER_HEALTHY, Fault.SKIP_DEAD_LETTER, Fault.MIS_ROUTE, Fault.STOP}
)


class _Runner(Protocol):
    name: str
    ready: asyncio.Event

    async def run(self) -> None: ...


class ServiceFailed(RuntimeError):
    """A service task ended with an error (its cause is chained)."""


class Ledger:
    """Start with ``async with Ledger(settings) as ledger:``; leaving the block stops every service.

    ``declare`` runs setup() first; ``remove`` runs teardown() after stopping.
    ``hold_poster``: the poster connects but reads nothing until :meth:`release_poster`,
    so that it finds a backlog.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        declare: bool = True,
        remove: bool = False,
        hold_poster: bool = False,
    ) -> None:
        self.settings = settings
        self.declare = declare
        self.remove = remove
        self.stats = Stats()
        self.teller = Teller(settings, self.stats)
        self.poster = Poster(settings, self.stats)
        if not hold_poster:
            self.poster.released.set()
        self._runners: list[_Runner] = [
            self.poster,
            Settler(settings, self.stats),
            Readers(settings, self.stats),
        ]
        self._tasks: dict[asyncio.Task[None], str] = {}

    async def start(self) -> None:
        if self.declare:
            await setup(self.settings)
        await self.teller.open()
        for runner in self._runners:
            self._tasks[asyncio.create_task(runner.run(), name=runner.name)] = runner.name
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
        try:
            pending = {t for t in self._tasks if not t.done()}
            for _ in range(STOP_ROUNDS):
                if not pending:
                    break
                for task in pending:
                    task.cancel()
                _, pending = await asyncio.wait(pending, timeout=STOP_GRACE)
            if pending:
                raise RuntimeError(
                    f"services did not stop: {sorted(t.get_name() for t in pending)}"
                )
        finally:
            try:
                await self.teller.close()
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

    def release_poster(self) -> None:
        """Let a held poster start reading (see ``hold_poster``)."""
        self.poster.released.set()

    async def publish(self, txs: Iterable[Tx]) -> None:
        await self.teller.publish(txs)

    def at_rest(self, txs: Iterable[Tx]) -> bool:
        """Whether every transaction has reached the end of its road (or a fault ended it)."""
        stats = self.stats

        def done(tx: Tx) -> bool:
            if any(f in ENDING and t == tx.tx_id for f, t in stats.faults):
                return True
            if tx.kind is Kind.REJECTED:
                return stats.count(Event.REJECTED, tx.tx_id) > 0
            if tx.kind is Kind.HELD:
                return stats.count(Event.DEAD, tx.tx_id) > 0
            return all(stats.count(e, tx.tx_id) for e in (Event.AUDITED, Event.NOTIFIED))

        return all(done(tx) for tx in txs)

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

    async def settle(self, txs: Iterable[Tx], within: float) -> None:
        """Wait until every transaction is at rest (see at_rest)."""
        wanted = list(txs)
        await self.wait_for(lambda _: self.at_rest(wanted), within)

    def _failure(self) -> ServiceFailed | None:
        for task, name in self._tasks.items():
            if task.done() and not task.cancelled() and task.exception() is not None:
                cause = task.exception()
                error = ServiceFailed(f"service {name} stopped: {cause!r}")
                error.__cause__ = cause
                return error
        return None

    def _raise_if_failed(self) -> None:
        if (failed := self._failure()) is not None:
            raise failed

"""A real Celery chain on RabbitMQ: ``reserve`` -> ``charge`` -> ``ship``, one queue each.

Celery 5 publishes every task straight to its queue through RabbitMQ's default
exchange (although it also declares an exchange of the queue's name), with the
task id in the ``id`` header and the ``correlation_id`` property, and the retry
count in the ``retries`` header; a chain's next task is a new message (a new
id, the same ``root_id``) whose first argument is the previous task's result.

``charge`` fails a *flaky* order on its first attempt and a *poison* order
(a negative amount) on every attempt; ``self.retry`` re-sends the task (same
id, ``retries`` + 1) up to ``max_retries``. After the last attempt it rejects
the message without requeueing (``acks_late``), so RabbitMQ dead-letters it
through the default exchange to ``<charge queue>.dead``.

Fault switches (:class:`Fault`) break one order each, chosen by the caller:
``lose`` drops it at ``reserve`` (the chain stops), ``duplicate`` ships it
twice, ``too_many_retries`` lets ``charge`` retry it past the allowed attempts,
and ``no_dead_letter`` makes ``charge`` give a poison order up the way Celery
does by default (the task fails, the message is acked: no dead letter).
Every queue name starts with the caller's prefix; :meth:`Chain.close` deletes them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from enum import StrEnum
from typing import Any

from celery import Celery, chain  # type: ignore[import-untyped]
from celery.contrib.testing.worker import start_worker  # type: ignore[import-untyped]
from celery.exceptions import Ignore, Reject  # type: ignore[import-untyped]
from kombu.entity import Exchange, Queue

from examples.outcomes import Outcomes

RESERVE = "celery.reserve"
CHARGE = "celery.charge"
SHIP = "celery.ship"
DEAD = f"{CHARGE}.dead"  # where RabbitMQ dead-letters what charge rejects
MAX_RETRIES = 2  # charge: 3 attempts in all


class Fault(StrEnum):
    LOSE = "lose"
    DUPLICATE = "duplicate"
    TOO_MANY_RETRIES = "too_many_retries"
    NO_DEAD_LETTER = "no_dead_letter"


class Flaky(Exception):
    """A failure that goes away when the order is tried again."""


class Poison(Exception):
    """A failure that never goes away."""


def _queue(name: str, arguments: dict[str, str] | None = None) -> Queue:
    """A queue as Celery makes one for a queue name: bound to a direct exchange of the
    same name (which Celery then bypasses, publishing through the default exchange)."""
    exchange = Exchange(name, type="direct")  # type: ignore[no-untyped-call]
    queue: Queue = Queue(  # type: ignore[no-untyped-call]
        name, exchange, routing_key=name, queue_arguments=arguments
    )
    return queue


def _tick() -> None:
    pass


class Chain:
    """The three tasks on their own queues (``prefix`` + name), and a worker to run them."""

    def __init__(self, url: str, prefix: str, *, faults: dict[Fault, str] | None = None) -> None:
        self.faults = dict(faults or {})
        self.queues = {n: prefix + n for n in (RESERVE, CHARGE, SHIP)}
        self.dead_queue = prefix + DEAD
        self.outcomes = Outcomes()
        self.attempts: dict[str, int] = {}  # order -> attempts at charge
        self._lock = threading.Lock()
        self._duplicated = False
        # An in-memory result backend: Celery records a rejected task's failure there
        # before it rejects the message (without one the reject never happens).
        app = Celery(f"{prefix}shop", broker=url, backend="cache+memory://", set_as_current=False)
        dead_letter = {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.dead_queue,
        }
        app.conf.update(
            task_queues=[
                _queue(self.queues[RESERVE]),
                _queue(self.queues[CHARGE], dead_letter),
                _queue(self.queues[SHIP]),
            ],
            task_routes={f"{prefix}{n}": {"queue": q} for n, q in self.queues.items()},
            task_acks_late=True,  # a rejected task is dead-lettered, not dropped
            worker_prefetch_multiplier=16,  # 1 stalls an in-thread solo worker
            worker_enable_remote_control=False,  # no pidbox queues left behind
            worker_hijack_root_logger=False,
            broker_connection_retry_on_startup=True,
        )
        self.app = app

        # Celery binds plain functions only (task first): wrap the methods.
        @app.task(name=f"{prefix}{RESERVE}", bind=True, shared=False)  # type: ignore[untyped-decorator]
        def reserve(task: Any, order: dict[str, Any]) -> dict[str, Any]:
            return self._reserve(task, order)

        @app.task(name=f"{prefix}{CHARGE}", bind=True, shared=False, max_retries=MAX_RETRIES)  # type: ignore[untyped-decorator]
        def charge(task: Any, order: dict[str, Any]) -> dict[str, Any]:
            return self._charge(task, order)

        @app.task(name=f"{prefix}{SHIP}", bind=True, shared=False)  # type: ignore[untyped-decorator]
        def ship(task: Any, order: dict[str, Any]) -> dict[str, Any]:
            return self._ship(task, order)

        self.reserve, self.charge, self.ship = reserve, charge, ship
        with app.connection_for_write() as conn:
            # The dead-letter queue is not one of the task queues: no worker consumes it.
            for queue in [*app.conf.task_queues, _queue(self.dead_queue)]:
                queue.bind(conn.default_channel).declare()

    # ------------------------------------------------------------ the tasks

    def _reserve(self, task: Any, order: dict[str, Any]) -> dict[str, Any]:
        if self.faults.get(Fault.LOSE) == order["order_id"]:
            self.outcomes.end(order["order_id"], "lost")
            raise Ignore()  # the chain stops here
        return order

    def _charge(self, task: Any, order: dict[str, Any]) -> dict[str, Any]:
        order_id: str = order["order_id"]
        with self._lock:
            attempt = self.attempts[order_id] = self.attempts.get(order_id, 0) + 1
        failures = 1 if order.get("kind") == "flaky" else 0
        allowed = MAX_RETRIES
        if self.faults.get(Fault.TOO_MANY_RETRIES) == order_id:
            failures = allowed = MAX_RETRIES + 1  # one attempt more than allowed
        try:
            if order["amount"] < 0:
                raise Poison(f"order {order_id}: amount {order['amount']}")
            if attempt <= failures:
                raise Flaky(f"order {order_id}: attempt {attempt}")
        except (Flaky, Poison) as exc:
            if task.request.retries < allowed:
                raise task.retry(exc=exc, countdown=0, max_retries=allowed) from None
            if self.faults.get(Fault.NO_DEAD_LETTER) == order_id:
                self.outcomes.end(order_id, "given up")
                raise  # Celery's default: the task fails, its message is acked
            self.outcomes.end(order_id, "dead")
            raise Reject(exc, requeue=False) from None
        return order

    def _ship(self, task: Any, order: dict[str, Any]) -> dict[str, Any]:
        self.outcomes.end(order["order_id"], "shipped")
        if self.faults.get(Fault.DUPLICATE) == order["order_id"] and not self._duplicated:
            self._duplicated = True
            self.ship.delay(order)  # shipped again: a duplicate
        return order

    # ------------------------------------------------------------ running

    def place(self, order_id: str, amount: float, kind: str = "healthy") -> None:
        order = {"order_id": order_id, "amount": amount, "kind": kind}
        chain(self.reserve.s(order), self.charge.s(), self.ship.s()).apply_async()

    @contextmanager
    def running(self) -> Iterator[None]:
        """A worker (solo pool, in a thread of this process) for the life of the block."""
        worker: AbstractContextManager[Any] = start_worker(
            self.app, pool="solo", perform_ping_check=False, loglevel="CRITICAL"
        )
        with worker as controller:
            # The worker's event loop sleeps up to 10 s between timers and checks for
            # shutdown only when it wakes: a short timer keeps stopping quick.
            controller.hub.call_repeatedly(0.05, _tick)
            yield

    def queue_depth(self, queue: str) -> int:
        """Messages ready in ``queue``."""
        with self.app.connection_for_write() as conn:
            _, count, _ = conn.default_channel.queue_declare(queue, passive=True)
            return int(count)

    def close(self) -> None:
        """Delete every queue (and the exchanges Celery declared for them)."""
        with self.app.connection_for_write() as conn:
            ch = conn.default_channel
            for name in [*self.queues.values(), self.dead_queue]:
                ch.queue_delete(name)
                ch.exchange_delete(name)

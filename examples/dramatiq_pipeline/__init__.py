"""A real Dramatiq pipeline on RabbitMQ: ``validate`` hands each order to ``store``.

``store`` fails a *flaky* order on its first attempt (Dramatiq retries it
through its ``<queue>.DQ`` delay queue) and a *poison* order (a negative
amount) on every attempt, so Dramatiq dead-letters it to ``<queue>.XQ`` after
``max_retries``. Dramatiq publishes straight to its queues through RabbitMQ's
default exchange and carries the message id and its retry count in the JSON
body (``message_id``, ``options.retries``).

Fault switches (:class:`Fault`) break one order each, chosen by the caller:
``lose`` drops it at ``validate``, ``duplicate`` sends it to ``store`` twice,
``too_many_retries`` lets ``store`` retry it past the allowed attempts, and
``no_dead_letter`` makes ``store`` give a poison order up silently (acked, no
dead letter). Every queue name starts with the caller's prefix, so runs do not
meet; :meth:`Pipeline.close` deletes them.
"""

from __future__ import annotations

import threading
from enum import StrEnum
from typing import Any

import dramatiq
import pika  # type: ignore[import-untyped]
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import CurrentMessage, Middleware

from examples import outcomes

VALIDATE = "dramatiq.validate"
STORE = "dramatiq.store"
MAX_RETRIES = 2  # store: 3 attempts in all
BACKOFF_MS = 10  # Dramatiq's backoff factor: retries come back within tens of ms


class Fault(StrEnum):
    LOSE = "lose"
    DUPLICATE = "duplicate"
    TOO_MANY_RETRIES = "too_many_retries"
    NO_DEAD_LETTER = "no_dead_letter"


class Flaky(Exception):
    """A failure that goes away when the order is tried again."""


class Poison(Exception):
    """A failure that never goes away."""


class Outcomes(outcomes.Outcomes, Middleware):
    """What became of each order (stored, dead, given up, lost); as a Dramatiq middleware it
    also hears of the messages the worker rejects."""

    def after_nack(self, broker: Any, message: Any) -> None:
        if message.queue_name.endswith(STORE):  # nacked: RabbitMQ dead-letters it to .XQ
            self.end(message.kwargs["order_id"], "dead")


class Pipeline:
    """The two actors on their own queues (``prefix`` + name), and a worker to run them."""

    def __init__(self, url: str, prefix: str, *, faults: dict[Fault, str] | None = None) -> None:
        self.url = url
        self.faults = dict(faults or {})
        self.validate_queue = prefix + VALIDATE
        self.store_queue = prefix + STORE
        self.outcomes = Outcomes()
        self.attempts: dict[str, int] = {}  # order -> attempts at store
        self._lock = threading.Lock()
        self.broker = RabbitmqBroker(url=url)
        self.broker.add_middleware(CurrentMessage())
        self.broker.add_middleware(self.outcomes)
        retries = MAX_RETRIES + (5 if Fault.TOO_MANY_RETRIES in self.faults else 0)
        self.validate = dramatiq.actor(
            broker=self.broker,
            actor_name=f"{prefix}validate",
            queue_name=self.validate_queue,
            max_retries=0,
        )(self._validate)
        self.store = dramatiq.actor(
            broker=self.broker,
            actor_name=f"{prefix}store",
            queue_name=self.store_queue,
            max_retries=retries,
            min_backoff=BACKOFF_MS,
            max_backoff=BACKOFF_MS * 4,
        )(self._store)
        for queue in (self.validate_queue, self.store_queue):
            self.broker.declare_queue(queue, ensure=True)  # and its .DQ and .XQ
        self.worker: dramatiq.Worker | None = None

    # ------------------------------------------------------------ the actors

    def _validate(self, order_id: str, amount: float, kind: str = "healthy") -> None:
        if self.faults.get(Fault.LOSE) == order_id:
            self.outcomes.end(order_id, "lost")
            return
        self.store.send(order_id=order_id, amount=amount, kind=kind)
        if self.faults.get(Fault.DUPLICATE) == order_id:
            self.store.send(order_id=order_id, amount=amount, kind=kind)

    def _store(self, order_id: str, amount: float, kind: str = "healthy") -> None:
        with self._lock:
            attempt = self.attempts[order_id] = self.attempts.get(order_id, 0) + 1
        if amount < 0:
            if self.faults.get(Fault.NO_DEAD_LETTER) == order_id and attempt > MAX_RETRIES:
                self.outcomes.end(order_id, "given up")  # acked: no dead letter
                return
            raise Poison(f"order {order_id}: amount {amount}")
        failures = 1 if kind == "flaky" else 0
        if self.faults.get(Fault.TOO_MANY_RETRIES) == order_id:
            failures = MAX_RETRIES + 1  # one attempt more than allowed
        if attempt <= failures:
            raise Flaky(f"order {order_id}: attempt {attempt}")
        self.outcomes.end(order_id, "stored")

    # ------------------------------------------------------------ running

    def start(self) -> None:
        self.worker = dramatiq.Worker(self.broker, worker_threads=2, worker_timeout=50)
        self.worker.start()

    def place(self, order_id: str, amount: float, kind: str = "healthy") -> None:
        self.validate.send(order_id=order_id, amount=amount, kind=kind)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()  # joins its threads: acks and nacks are sent by then
            self.worker = None

    def queue_depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (its dead letters, for a ``.XQ``)."""
        with pika.BlockingConnection(pika.URLParameters(self.url)) as conn:
            ok = conn.channel().queue_declare(queue, passive=True)
            count: int = ok.method.message_count
            return count

    def close(self) -> None:
        """Stop the worker and delete every queue of this pipeline."""
        self.stop()
        self.broker.close()
        with pika.BlockingConnection(pika.URLParameters(self.url)) as conn:
            ch = conn.channel()
            for queue in (self.validate_queue, self.store_queue):
                for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                    ch.queue_delete(name)

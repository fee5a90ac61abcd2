"""The ledger: a small real system on Kafka, Redis Streams and RabbitMQ (topologies/ledger.yaml).

Its shape differs from the shop's: teller publishes transactions to a Kafka
topic of 3 partitions keyed by account; poster runs one consumer per partition
and writes them to a Redis stream (retrying rejected ones through a retry
topic, then a dead-letter topic); settler reads that stream in a consumer group,
in batches, retries through the pending entries list and dead-letters to a
stream, and publishes to a fanout exchange that feeds two queues. Faults
switches on one bug each, on the transaction ids it names.

    async with Ledger(Settings(prefix="demo.")) as ledger:
        txs = plan_txs(30, seed=1, run_id="r1", rejected=2, held=2)
        await ledger.publish(txs)
        await ledger.settle(txs, within=30)
"""

from .config import Brokers, Fault, Faults, Names, Settings
from .infra import setup, teardown
from .messages import Kind, Tx, plan_txs
from .stats import Event, Stats
from .system import Ledger, ServiceFailed

__all__ = [
    "Brokers",
    "Event",
    "Fault",
    "Faults",
    "Kind",
    "Ledger",
    "Names",
    "ServiceFailed",
    "Settings",
    "Stats",
    "Tx",
    "plan_txs",
    "setup",
    "teardown",
]

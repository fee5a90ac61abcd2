"""The floor of any tap: flowcheck's taps reading every channel, observing nothing.

system_throughput.py runs this in its "reads" mode, in place of `flowcheck record`:
the same taps with the same clients, twin queues, fetches and XREADs, but
``Adapter.observe`` returns one prebuilt observation and nothing is correlated,
counted or written. What the shop loses then is what reading alone costs it (the
clients, the event loop, the brokers' extra work), whatever a tap does with what it
reads.

    PYTHONPATH=. .venv/bin/python benchmarks/reads_only.py TOPOLOGY
Prints "recording" on stderr once every tap watches; stops on SIGINT or SIGTERM.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import anyio

from flowcheck.brokers.base import Adapter
from flowcheck.observations import Kind, Observation
from flowcheck.topology import load
from flowcheck.tracer import Tracer

ONE = Observation(kind=Kind.ROUTED, broker="b", channel="c", mono_ns=0, wall=0.0)


def observe(self: Adapter, *args: Any, **kwargs: Any) -> Observation:
    return ONE


async def main(path: str) -> None:
    Adapter.observe = observe  # type: ignore[method-assign]
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Tracer(load(path)):
            print("recording", file=sys.stderr, flush=True)
            async for _ in signals:
                return


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])

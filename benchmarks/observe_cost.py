"""What one message costs a tap, without a broker: the CPU time to turn a received
message into its observation, timed alone with timeit.

  observe   Adapter.observe() from a body and one header
  kafka     a Kafka consumer record to its observation (as the Kafka tap does)
  redis     a Redis stream entry to its observation (as the Redis tap does)

The message is tap_rate.py's: a 83-byte JSON order with one header, in a topology
whose flow correlates by `$.order_id`. Best of --repeat runs of --number calls
each, in microseconds per message. To compare two versions of flowcheck, run it
against each checkout in turn:

    .venv/bin/python benchmarks/observe_cost.py [--number 100000] [--repeat 15]
    PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/observe_cost.py
"""

from __future__ import annotations

import argparse
import json
import platform
import timeit
from types import SimpleNamespace
from typing import Any

import flowcheck
from flowcheck.brokers.kafka import KafkaAdapter
from flowcheck.brokers.redis import RedisAdapter
from flowcheck.observations import Kind
from flowcheck.topology import loads

FLOW = "flows: {f: {correlate: $.order_id, steps: [{channel: q}]}}\n"
BODY = json.dumps({"order_id": "o-12345678", "amount": 12.5, "items": list(range(10))}).encode()


def cases() -> dict[str, Any]:
    kafka = KafkaAdapter(
        "b",
        loads(
            'brokers: {b: {kind: kafka, bootstrap: "127.0.0.1:1"}}\n'
            "channels: {q: {broker: b, kind: topic, name: q}}\n" + FLOW
        ),
    )
    redis = RedisAdapter(
        "b",
        loads(
            'brokers: {b: {kind: redis, url: "redis://127.0.0.1:1"}}\n'
            "channels: {q: {broker: b, kind: stream, name: q}}\n" + FLOW
        ),
    )
    record = SimpleNamespace(
        headers=[("i", b"12")], key=None, value=BODY, partition=0, offset=5, timestamp=1
    )
    entry = [b"payload", BODY, b"i", b"12"]
    headers = {"i": "12"}
    # No adapter connects: these build observations only.
    return {
        "observe": lambda: redis.observe(Kind.ROUTED, "q", body=BODY, headers=headers),
        "kafka": lambda: kafka._record("q", record),
        "redis": lambda: redis._entry("q", "1700000000000-0", entry, "payload"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--number", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    out = {}
    for name, call in cases().items():
        best = min(timeit.repeat(call, number=args.number, repeat=args.repeat))
        out[name] = round(best / args.number * 1e6, 2)
    print(f"flowcheck from {flowcheck.__file__}; Python {platform.python_version()}")
    for name, us in out.items():
        print(f"{name:<8} {us:>6} µs")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

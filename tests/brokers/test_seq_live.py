"""Ordering by a sequence field, judged on what a real Redis stream carried: producers
that write each account's transactions in increasing seq pass, whatever the interleaving;
one that writes a seq after a higher one, or skips one, is found."""

from __future__ import annotations

import json
import random

import pytest
from redis.asyncio import Redis

from flowcheck.checker import Verdict, check
from flowcheck.observations import Kind
from flowcheck.topology import Topology
from flowcheck.tracer import Memory, Tracer

from .conftest import WITHIN, cleaned, load

TOPOLOGY = """
brokers:
  redis: {{kind: redis, url: "${{FC_URL}}"}}
channels:
  tx: {{broker: redis, kind: stream, name: "{p}.tx"}}
flows:
  posting:
    correlate: $.id
    steps: [tx]
    ordering: {{per: $.account, seq: $.seq}}
"""


async def record(
    topology: Topology, redis: Redis, stream: str, sends: list[tuple[str, int]]
) -> Verdict:
    """Write ``sends`` (account, seq) to the stream as a producer would, tap it, judge."""
    async with cleaned(topology, "redis") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]):
            for account, seq in sends:
                body = {"id": f"{stream}-{account}-{seq}", "account": account, "seq": seq}
                await redis.xadd(stream, {"payload": json.dumps(body)})
            await memory.wait_for(
                lambda items: (
                    sum(o.kind is Kind.ROUTED and o.channel == "tx" for o in items) >= len(sends)
                ),
                WITHIN,
            )
    end_ns = max(o.mono_ns for o in memory.items) + 10**12
    return check(topology, memory.items, end_ns=end_ns)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_interleaved_accounts_in_order_pass(
    seed: int, redis_url: str, redis: Redis, unique: str
) -> None:
    rng = random.Random(seed)
    queues = {a: [(a, n) for n in range(rng.randint(1, 5), 10)] for a in ("a", "b", "c")}
    sends = []
    while any(queues.values()):  # a random interleaving; each account's seqs in order
        sends.append(queues[rng.choice([a for a, q in queues.items() if q])].pop(0))
    verdict = await record(
        load(TOPOLOGY.format(p=unique), FC_URL=redis_url), redis, f"{unique}.tx", sends
    )
    assert [f.message for f in verdict.flows[0].findings] == []
    assert verdict.flows[0].unjudged == []
    assert verdict.flows[0].succeeded == len(sends)
    assert verdict.passed


async def test_an_inversion_and_a_gap_are_found(redis_url: str, redis: Redis, unique: str) -> None:
    stream = f"{unique}.tx"
    sends = [("a", 1), ("b", 1), ("a", 2), ("a", 4), ("b", 2), ("a", 3), ("b", 4), ("a", 5)]
    verdict = await record(load(TOPOLOGY.format(p=unique), FC_URL=redis_url), redis, stream, sends)
    got = sorted(
        (f.flow, f.kind.value, f.key or "", f.step, f.message) for f in verdict.flows[0].findings
    )
    assert got == [
        (
            "posting",
            "reordered",
            f"{stream}-a-3",
            "tx",
            f"$.account 'a': seq 3 (chain '{stream}-a-3') came after seq 4 "
            f"(chain '{stream}-a-4') at 'tx'",
        ),
        (
            "posting",
            "sequence_gap",
            "",  # about an entity, not a chain
            "tx",
            "$.account 'b': seq 3 never reached 'tx' (seen 1 to 4)",
        ),
    ]
    assert not verdict.passed

"""``match`` tests in a dead-letter rule, judged on what a real Redis carried.

A stream entry's fields other than the payload are headers, and arrive as text.
"""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from flowcheck.checker import FindingKind, check
from flowcheck.observations import Kind
from flowcheck.tracer import Memory, Tracer

from .conftest import WITHIN, cleaned, ids, load, read_group

TOPOLOGY = """
brokers:
  redis: {{kind: redis, url: "${{FC_URL}}"}}
channels:
  events:
    broker: redis
    kind: stream
    name: "{p}.events"
    groups: [billing]
    delivery_limit: 1
    dead_letter: dead
  dead: {{broker: redis, kind: stream, name: "{p}.dead"}}
services:
  billing: {{consumes: [{{channel: events, group: billing}}]}}
flows:
  orders:
    correlate: $.order_id
    steps: [events]
    dead_letters:
      - when:
          payload: {{$.amount: {{lt: 0}}}}
          headers: {{account: {{prefix: X-}}, tries: {{gte: 1}}}}
        channel: dead
"""

# (order, amount, account): the consumer refuses refunds to X- accounts, the rule's idea.
ORDERS: list[tuple[str, Any, str]] = [
    ("o-1", -5, "X-1"),  # refund to an X account: dead-lettered
    ("o-2", 5, "X-2"),  # a payment
    ("o-3", -3, "Y-3"),  # a refund to another account
    ("o-4", "-5", "X-4"),  # an amount written as text is not a number: not the rule's
    ("o-5", -0.5, "X-5"),
]


async def test_dead_letter_rule_with_comparisons_selects_the_right_messages(
    redis_url: str, redis: Redis, unique: str
) -> None:
    text = TOPOLOGY.format(p=unique)
    topology = load(text, FC_URL=redis_url)
    stream, dead = f"{unique}.events", f"{unique}.dead"
    async with cleaned(topology, "redis") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            sent = {
                order: await tracer.publish(
                    "events",
                    json.dumps({"order_id": order, "amount": amount}).encode(),
                    headers={"account": account, "tries": "1"},
                )
                for order, amount, account in ORDERS
            }
            fc_ids = {s.fc_id for s in sent.values()}
            await memory.wait_for(
                lambda items: fc_ids <= set(ids(items, Kind.ROUTED, "events")), WITHIN
            )

            entries: list[tuple[str, dict[str, str]]] = []
            while len(entries) < len(ORDERS):
                more = await read_group(redis, stream, "billing", "worker-1", count=len(ORDERS))
                assert more, "the entries the tap saw could not be read"
                entries += more
            moved = set()
            for entry_id, fields in entries:
                body = json.loads(fields["payload"])
                amount = body["amount"]
                refund = isinstance(amount, int | float) and amount < 0
                if refund and fields["account"].startswith("X-"):
                    gave_up: dict[Any, Any] = {**fields, "reason": "refund", "delivery_count": "1"}
                    await redis.xadd(dead, gave_up)
                    moved.add(body["order_id"])
                await redis.xack(stream, "billing", entry_id)
            assert moved == {"o-1", "o-5"}
            await memory.wait_for(
                lambda items: (
                    fc_ids <= set(ids(items, Kind.CONSUMED, "events"))
                    and {sent[o].fc_id for o in moved} <= set(ids(items, Kind.DEAD_LETTERED))
                ),
                WITHIN,
            )

    # Judged as a recording that went on past every chain's window: each is decided.
    end_ns = max(o.mono_ns for o in memory.items) + 10**12
    verdict = check(topology, memory.items, end_ns=end_ns)
    assert [f.message for f in verdict.flows[0].findings] == []
    assert verdict.flows[0].dead_lettered == 2
    assert verdict.passed

    # The same recording against rules that select other messages: each wrong choice
    # is a finding on exactly the chains it gets wrong.
    def wrong(when: str) -> set[tuple[FindingKind, str | None]]:
        other = load(
            text.replace(
                "when:\n"
                "          payload: {$.amount: {lt: 0}}\n"
                "          headers: {account: {prefix: X-}, tries: {gte: 1}}",
                f"when: {{{when}}}",
            ),
            FC_URL=redis_url,
        )
        return {
            (f.kind, f.key) for f in check(other, memory.items, end_ns=end_ns).flows[0].findings
        }

    dead = FindingKind.DEAD_LETTER
    # Without the account test, the refund to Y-3 should have been dead-lettered too.
    assert wrong("payload: {$.amount: {lt: 0}}") == {(dead, "o-3")}
    # -0.5 is not below -1: o-5 is a dead letter no rule expects.
    assert wrong("payload: {$.amount: {lt: -1}}, headers: {account: {prefix: X-}}") == {
        (dead, "o-5")
    }
    assert wrong("headers: {account: {in: [X-1, X-5]}}") == set()
    # Fields are text; "1" is read as the number 1, which is not below 1.
    assert wrong("headers: {account: {regex: '[15]$'}, tries: {lt: 1}}") == {
        (dead, "o-1"),
        (dead, "o-5"),
    }
    assert wrong("payload: {$.amount: {lte: -0.5}}, headers: {account: {suffix: '5'}}") == {
        (dead, "o-1")
    }

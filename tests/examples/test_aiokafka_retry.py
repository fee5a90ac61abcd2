"""A plain aiokafka consumer group with a retry topic and a dead-letter topic
(examples/aiokafka_retry) on the real Kafka, judged by flowcheck.

Each run is a session of its own under a unique prefix: flowcheck declares the
topics (and deletes them after), the worker joins its group, the test places
orders (through the session, which then knows what to wait for), waits for the worker to say what became of each one (an event, with a
deadline), then lets ``FlowSession.check`` judge what the taps saw and compares
the findings with the fault it switched on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

import flowcheck
from flowcheck.checker import Finding, FindingKind
from flowcheck.testing import FlowAssertionError, FlowSession

aiokafka_retry = pytest.importorskip("examples.aiokafka_retry")
Fault = aiokafka_retry.Fault

ROOT = Path(__file__).resolve().parents[2]
WITHIN = 20.0  # seconds; bounds only a failure (a group join is the slow part)
CHECK_WITHIN = 3.0  # past the flow's 2s deadline, for a lost chain
REPEATS = 5


@dataclass
class Order:
    order_id: str
    amount: float
    kind: str = "healthy"


@dataclass
class Run:
    findings: list[Finding]
    unjudged: list[str]
    ends: list[tuple[str, str]]
    attempts: dict[str, int]
    report: str = ""
    dead_lettered: int = 0

    def kinds(self) -> dict[str, set[FindingKind]]:
        out: dict[str, set[FindingKind]] = {}
        for f in self.findings:
            if f.kind is not FindingKind.THRESHOLD:
                out.setdefault(f.key or "", set()).add(f.kind)
        return out


HEALTHY = [Order(f"o-{n}", 10.0 + n) for n in range(4)]
FLAKY = Order("f-1", 5.0, "flaky")  # fails its first attempt
POISON = Order("p-1", -1.0)  # fails every attempt: dead-lettered after the third


async def run(
    bootstrap: str,
    prefix: str,
    orders: Sequence[Order],
    faults: dict[str, str] | None = None,
    *,
    twice: Sequence[str] = (),
) -> Run:
    topology = flowcheck.load(
        str(ROOT / "topologies" / "aiokafka_retry.yaml"),
        env={"FLOWCHECK_KAFKA_BOOTSTRAP": bootstrap},
    )
    switches = {Fault(k): v for k, v in (faults or {}).items()}
    async with FlowSession(topology, prefix=prefix, deadline=WITHIN) as fc:
        worker = aiokafka_retry.Worker(bootstrap, prefix, faults=switches)
        await worker.start()
        try:
            for o in orders:
                # Placed through the session, so that check() waits for the taps to see them.
                order = {"order_id": o.order_id, "amount": o.amount, "kind": o.kind}
                await fc.publish("orders", order, key=o.order_id)
            once = [o.order_id for o in orders if o.order_id not in twice]
            try:
                async with asyncio.timeout(WITHIN):
                    await worker.outcomes.wait(once)
                    await worker.outcomes.wait(twice, ends=2)
            except TimeoutError:
                pytest.fail(f"the worker did not finish in {WITHIN}s: {worker.outcomes.ends}")
        finally:
            await worker.stop()
        r = Run([], [], list(worker.outcomes.ends), dict(worker.attempts))
        try:
            verdict = await fc.check(within=CHECK_WITHIN)
            r.dead_lettered = sum(f.dead_lettered for f in verdict.flows)
        except FlowAssertionError as exc:
            r.findings = list(exc.findings)
            r.unjudged = [u.expectation for u in exc.unjudged]
            r.report = str(exc)
        return r


def expect(r: Run, wanted: dict[str, set[FindingKind]]) -> None:
    got = r.kinds()
    assert (got, r.unjudged) == (wanted, []), r.report


async def test_clean_runs_with_a_retry_and_a_dead_letter_give_no_findings(
    kafka_bootstrap: str, unique: str
) -> None:
    for n in range(REPEATS):
        r = await run(kafka_bootstrap, f"{unique}.{n}.", [*HEALTHY, FLAKY, POISON])
        assert r.attempts[FLAKY.order_id] == 2
        assert r.attempts[POISON.order_id] == 3
        assert (POISON.order_id, "dead") in r.ends
        expect(r, {})
        assert r.dead_lettered == 1


async def test_a_lost_message_is_lost(kafka_bootstrap: str, unique: str) -> None:
    r = await run(kafka_bootstrap, f"{unique}.", HEALTHY, {"lose": "o-1"})
    assert ("o-1", "lost") in r.ends
    expect(r, {"o-1": {FindingKind.LOST}})
    (lost,) = r.findings
    assert lost.step == "orders-done"


async def test_a_duplicate_is_duplicated(kafka_bootstrap: str, unique: str) -> None:
    r = await run(kafka_bootstrap, f"{unique}.", HEALTHY, {"duplicate": "o-1"}, twice=["o-1"])
    expect(r, {"o-1": {FindingKind.DUPLICATED}})
    (duplicated,) = r.findings
    assert duplicated.step == "orders-done"


async def test_too_many_retries_are_too_many(kafka_bootstrap: str, unique: str) -> None:
    r = await run(kafka_bootstrap, f"{unique}.", HEALTHY, {"too_many_retries": "o-1"})
    assert r.attempts["o-1"] == 4
    expect(r, {"o-1": {FindingKind.RETRIES}})


async def test_a_missing_dead_letter_is_missing(kafka_bootstrap: str, unique: str) -> None:
    r = await run(kafka_bootstrap, f"{unique}.", [*HEALTHY, POISON], {"no_dead_letter": "p-1"})
    assert (POISON.order_id, "dropped") in r.ends
    expect(r, {POISON.order_id: {FindingKind.DEAD_LETTER}})

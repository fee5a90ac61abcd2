"""A FastStream app across RabbitMQ, Kafka and Redis (examples/faststream_app) on the
real brokers, judged by flowcheck.

Each run is a session of its own under a unique prefix: flowcheck declares the
channels (FastStream's own declarations match them) and deletes them after,
the app's brokers start in the test's event loop, orders are placed through the
session (so ``check`` waits for the taps to see them), the test waits for the
app to say what became of each one (an event, with a deadline), then lets
``FlowSession.check`` judge.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

import flowcheck
from flowcheck.checker import Finding, FindingKind
from flowcheck.observations import Kind, Observation
from flowcheck.testing import FlowAssertionError, FlowSession

faststream_app = pytest.importorskip("examples.faststream_app")
Fault = faststream_app.Fault

ROOT = Path(__file__).resolve().parents[2]
WITHIN = 20.0  # seconds; bounds only a failure (a Kafka group join is the slow part)
CHECK_WITHIN = 3.0  # past the flows' 2s deadline, for a lost chain
REPEATS = 5
ORDERS = [f"o-{n}" for n in range(4)]
FLOW = "order-shipped"  # exchange, queue, Kafka topic, Redis stream


async def run(
    urls: tuple[str, str, str],
    prefix: str,
    faults: dict[str, str] | None = None,
    *,
    twice: Sequence[str] = (),
) -> tuple[list[Finding], list[str], list[tuple[str, str]], str, list[Observation]]:
    """(findings, unjudged, the app's ends, report, the stream's entries) of one run
    judged on the whole flow."""
    rabbitmq, kafka, redis = urls
    env = {
        "FLOWCHECK_RABBITMQ_URL": rabbitmq,
        "FLOWCHECK_KAFKA_BOOTSTRAP": kafka,
        "FLOWCHECK_REDIS_URL": redis,
    }
    topology = flowcheck.load(str(ROOT / "topologies" / "faststream_app.yaml"), env=env)
    switches = {Fault(k): v for k, v in (faults or {}).items()}
    async with FlowSession(topology, prefix=prefix, deadline=WITHIN) as fc:
        app = faststream_app.App(rabbitmq, kafka, redis, prefix, faults=switches)
        await app.start()
        try:
            for order_id in ORDERS:
                order = {"order_id": order_id, "amount": 10.0}
                await fc.publish("fs.orders", order, routing_key=faststream_app.KEY)
            once = [o for o in ORDERS if o not in twice]
            try:
                async with asyncio.timeout(WITHIN):
                    await app.outcomes.wait(once)
                    await app.outcomes.wait(twice, ends=2)
            except TimeoutError:
                pytest.fail(f"the app did not finish in {WITHIN}s: {app.outcomes.ends}")
        finally:
            await app.stop()
        ends = list(app.outcomes.ends)
        try:
            await fc.check(FLOW, within=CHECK_WITHIN)
        except FlowAssertionError as exc:
            findings, report = list(exc.findings), str(exc)
            unjudged = [u.expectation for u in exc.unjudged]
        else:
            findings, unjudged, report = [], [], ""
        entries = [
            o for o in fc.observations if o.channel == "fs-shipments" and o.kind is Kind.ROUTED
        ]
        return findings, unjudged, ends, report, entries


@pytest.fixture
def urls(rabbitmq_url: str, kafka_bootstrap: str, redis_url: str) -> tuple[str, str, str]:
    return rabbitmq_url, kafka_bootstrap, redis_url


def kinds(findings: list[Finding]) -> dict[str, set[FindingKind]]:
    out: dict[str, set[FindingKind]] = {}
    for f in findings:
        if f.kind is not FindingKind.THRESHOLD:
            out.setdefault(f.key or "", set()).add(f.kind)
    return out


async def test_clean_runs_give_no_findings(urls: tuple[str, str, str], unique: str) -> None:
    for n in range(REPEATS):
        findings, unjudged, ends, report, entries = await run(urls, f"{unique}.{n}.")
        assert sorted(ends) == [(o, "shipped") for o in ORDERS]
        assert (kinds(findings), unjudged) == ({}, []), report
        # FastStream's envelope unwrapped: the order is the payload, its headers the
        # entry's headers.
        assert sorted(json.loads(e.payload or "")["order_id"] for e in entries) == ORDERS
        for e in entries:
            assert e.headers["content-type"] == "application/json"
            assert e.headers["correlation_id"]
            assert "__data__" not in e.headers


async def test_a_lost_message_is_lost(urls: tuple[str, str, str], unique: str) -> None:
    findings, unjudged, ends, report, _ = await run(urls, f"{unique}.", {"lose": "o-1"})
    assert ("o-1", "lost") in ends
    assert (kinds(findings), unjudged) == ({"o-1": {FindingKind.LOST}}, []), report
    (lost,) = findings
    assert lost.step == "fs-accepted"


async def test_a_duplicate_is_duplicated(urls: tuple[str, str, str], unique: str) -> None:
    findings, unjudged, ends, report, _ = await run(
        urls, f"{unique}.", {"duplicate": "o-1"}, twice=["o-1"]
    )
    assert ends.count(("o-1", "shipped")) == 2
    assert (kinds(findings), unjudged) == ({"o-1": {FindingKind.DUPLICATED}}, []), report
    # Published twice to Kafka, and both copies shipped on to Redis.
    assert [f.step for f in findings if f.kind is FindingKind.DUPLICATED] == [
        "fs-accepted",
        "fs-shipments",
    ], report

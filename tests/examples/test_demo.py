"""The demo's own path (scripts/demo.py's ``demo()``): the clean shop passes the gate,
and each advertised fault fails it for its own reason, on the right flow and keys.

Each test runs the whole shop (checkout included) under its own prefix, lets
`flowcheck run` publish the demo's scenario, and reads back the verdict.json the
demo leaves. Which orders a fault hit comes from the shop's own counters; every
flow's chains are orders, by order id.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from examples.shop import Brokers, Event, Fault, Faults, Stats
from flowcheck.checker import Cause, FindingKind, FlowVerdict, Verdict

ROOT = Path(__file__).resolve().parents[2]
MAIN = "order-to-shipment"
FLOWS = {"order-to-shipment", "poison-order", "declined-payment", "stuck-shipment"}


def _load_demo() -> Callable[..., Coroutine[Any, Any, int]]:
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    demo: Callable[..., Coroutine[Any, Any, int]] = module.demo
    return demo


demo = _load_demo()


@dataclass
class Run:
    code: int
    verdict: Verdict
    stats: Stats

    def flow(self, name: str) -> FlowVerdict:
        return next(f for f in self.verdict.flows if f.flow == name)

    def kinds(self, name: str) -> set[FindingKind]:
        """The kinds of the flow's findings about chains (not the rates they add up to)."""
        return {f.kind for f in self.flow(name).findings} - {FindingKind.THRESHOLD}

    def failed(self) -> set[str]:
        return {f.flow for f in self.verdict.flows if not f.passed}

    def faulty(self, fault: Fault) -> set[str]:
        """Order ids the shop injected ``fault`` into."""
        return {order for f, order in self.stats.faults if f is fault}


@pytest.fixture
def gate(
    tmp_path: Path, unique: str, rabbitmq_url: str, kafka_bootstrap: str, redis_url: str
) -> Callable[..., Coroutine[Any, Any, Run]]:
    async def run(*faults: Fault) -> Run:
        reports = tmp_path / "reports"
        stats = Stats()
        brokers = Brokers(rabbitmq_url, kafka_bootstrap, redis_url)
        code = await demo(brokers, Faults.of(*faults), reports, f"{unique}.", stats=stats)
        verdict = Verdict.model_validate_json((reports / "verdict.json").read_text())
        return Run(code, verdict, stats)

    return run


Gate = Callable[..., Coroutine[Any, Any, Run]]


async def test_clean_demo_passes(gate: Gate) -> None:
    run = await gate()
    assert run.code == 0
    assert run.verdict.passed
    assert {f.flow for f in run.verdict.flows} == FLOWS
    for flow in run.verdict.flows:
        assert flow.findings == [], flow.flow
        assert flow.chains > 0, flow.flow
        assert flow.succeeded == flow.chains, flow.flow
    assert not run.stats.faults
    placed = run.stats.orders(Event.PLACED)
    assert len(placed) == 48  # every order of the scenario, placed by checkout
    assert run.stats.total(Event.SHIPPED) == 42


async def test_drop_is_a_lost_payment(gate: Gate) -> None:
    run = await gate(Fault.DROP)
    assert run.code == 1
    assert run.failed() == {MAIN}
    assert run.kinds(MAIN) == {FindingKind.LOST}
    [lost] = [f for f in run.flow(MAIN).findings if f.kind is FindingKind.LOST]
    assert (lost.cause, lost.step) == (Cause.TIMED_OUT, "payments")
    assert {lost.key} == run.faulty(Fault.DROP)


async def test_duplicate_is_a_duplicated_payment(gate: Gate) -> None:
    run = await gate(Fault.DUPLICATE)
    assert run.code == 1
    assert run.failed() == {MAIN}
    assert run.kinds(MAIN) == {FindingKind.DUPLICATED}
    found = [f for f in run.flow(MAIN).findings if f.kind is FindingKind.DUPLICATED]
    assert {f.key for f in found} == run.faulty(Fault.DUPLICATE)
    assert "payments" in {f.step for f in found}


async def test_reorder_is_an_inversion_in_offset_order_and_nothing_else(gate: Gate) -> None:
    run = await gate(Fault.REORDER)
    assert run.code == 1
    assert run.failed() == {MAIN}
    # Held back only until the customer's next payment: no latency budget is broken.
    assert run.kinds(MAIN) == {FindingKind.REORDERED}
    [held] = run.faulty(Fault.REORDER)  # the customer's first order, placed first
    [found] = [f for f in run.flow(MAIN).findings if f.kind is FindingKind.REORDERED]
    assert found.step == "payments"
    assert found.key != held
    assert f"{found.key!r} overtook {held!r} at 'payments'" in found.message
    assert "group 'regular-" in found.message  # the Kafka key: the customer
    assert [s.channel for s in found.seen] == ["payments"]


async def test_latency_breaks_the_budgets_and_nothing_else(gate: Gate) -> None:
    run = await gate(Fault.LATENCY)
    assert run.code == 1
    assert run.failed() == {MAIN}
    assert run.kinds(MAIN) == {FindingKind.LATENCY}
    steps = {f.step for f in run.flow(MAIN).findings}
    assert "billing.orders -> payments" in steps
    hop = next(h for h in run.flow(MAIN).latency if h.hop == "billing.orders -> payments")
    assert not hop.passed
    assert hop.stats.p99_ms is not None
    assert hop.stats.p99_ms > 500


async def test_retry_too_often_is_too_many_attempts(gate: Gate) -> None:
    run = await gate(Fault.RETRY_TOO_OFTEN)
    assert run.code == 1
    assert run.failed() == {"stuck-shipment"}
    assert run.kinds("stuck-shipment") == {FindingKind.RETRIES}
    stuck = set(run.stats.orders(Event.SHIPPING_DEAD_LETTERED))
    assert len(stuck) == 2
    found = run.flow("stuck-shipment").findings
    assert {f.key for f in found} == stuck
    assert all("5 attempts" in f.message for f in found)


async def test_skip_dead_letter_is_a_missing_dead_letter(gate: Gate) -> None:
    run = await gate(Fault.SKIP_DEAD_LETTER)
    assert run.code == 1
    swallowed = run.faulty(Fault.SKIP_DEAD_LETTER)
    assert len(swallowed) == 4  # two poison orders at billing, two stuck shipments
    assert run.failed() == {MAIN, "poison-order", "stuck-shipment"}
    for flow in (MAIN, "poison-order", "stuck-shipment"):
        assert run.kinds(flow) == {FindingKind.DEAD_LETTER}, flow
    main = {f.key for f in run.flow(MAIN).findings if f.kind is FindingKind.DEAD_LETTER}
    assert main == swallowed
    poison = {f.key for f in run.flow("poison-order").findings}
    stuck = {f.key for f in run.flow("stuck-shipment").findings}
    assert poison | stuck == swallowed
    assert not poison & stuck


async def test_mis_route_is_lost_as_unroutable(gate: Gate) -> None:
    run = await gate(Fault.MIS_ROUTE)
    assert run.code == 1
    misrouted = run.faulty(Fault.MIS_ROUTE)
    assert len(misrouted) == 48  # checkout mis-routes every order it places
    # Both flows that start at shop.orders lose every order there, and say why; the
    # flows downstream of billing saw no chain at all: judged nothing, so not green.
    assert run.failed() == {MAIN, "poison-order", "declined-payment", "stuck-shipment"}
    for flow in ("declined-payment", "stuck-shipment"):
        assert run.flow(flow).findings == [], flow
        [nothing] = run.flow(flow).unjudged
        assert nothing.why.startswith("no chain was decided: 0 seen"), flow
    for flow in (MAIN, "poison-order"):
        assert run.kinds(flow) == {FindingKind.LOST}, flow
        found = [f for f in run.flow(flow).findings if f.kind is FindingKind.LOST]
        assert {f.key for f in found} == misrouted, flow
        assert {(f.cause, f.step) for f in found} == {(Cause.UNROUTABLE, "billing.orders")}


async def test_bad_schema_is_a_schema_finding_on_billing_orders(gate: Gate) -> None:
    run = await gate(Fault.BAD_SCHEMA)
    assert run.code == 1
    [broken] = run.faulty(Fault.BAD_SCHEMA)  # the first order checkout placed
    assert run.failed() == {MAIN}
    found = [(f.kind, f.key, f.step) for f in run.flow(MAIN).findings]
    assert found == [(FindingKind.SCHEMA, broken, "billing.orders")]

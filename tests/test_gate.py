"""`flowcheck run` as a CI gate against the real shop: clean passes, each fault fails.

The shop (examples/shop) runs its billing, payments and shipping services on
the real brokers under a unique prefix; flowcheck publishes the orders from a
scenario, waits for every chain and checks topologies/shop.yaml's flows.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner

from examples.shop import Brokers, Fault, Faults, Service, Settings, Shop
from examples.shop.topology import topology_yaml
from flowcheck.checker import Cause, FindingKind, Verdict
from flowcheck.cli import cli
from flowcheck.recorder import record
from flowcheck.runner import Outcome, run
from flowcheck.scenario import Scenario
from flowcheck.topology import Topology, loads
from flowcheck.trace import Reader, topology_hash

WORKERS = [Service.BILLING, Service.PAYMENTS, Service.SHIPPING]
ORDER = (
    '{order_id: "{key}", revision: 1, customer: "c{n}", amount: 12.5, currency: EUR, '
    'card: "%s", address: %s, poison: %s, placed_at: ""}'
)
GOOD = ORDER % ("4242424242424242", '{street: "1 Main St", city: Springfield}', "false")


def send(count: int, payload: str, **extra: str) -> str:
    more = "".join(f"\n    {k}: {v}" for k, v in extra.items())
    return f"""
  - flow: order-to-shipment
    count: {count}
    routing_key: order.placed
    headers: {{order_id: "{{key}}"}}
    payload: {payload}{more}"""


CLEAN = (
    "send:"
    + send(8, GOOD)
    + send(1, ORDER % ("4242424242424242", '{street: "1 Main St", city: Springfield}', "true"))
    + send(1, ORDER % ("4000000000000002", '{street: "1 Main St", city: Springfield}', "false"))
    + send(1, ORDER % ("4242424242424242", "null", "false"))
)


@dataclass
class Env:
    prefix: str
    brokers: Brokers
    topology: Topology
    path: Path
    out: Path


@pytest.fixture
def env(
    tmp_path: Path, unique: str, rabbitmq_url: str, kafka_bootstrap: str, redis_url: str
) -> Env:
    prefix = f"{unique}."
    brokers = Brokers(
        rabbitmq_url=rabbitmq_url, kafka_bootstrap=kafka_bootstrap, redis_url=redis_url
    )
    text = topology_yaml(prefix, brokers)
    path = tmp_path / "shop.yaml"
    path.write_text(text)
    return Env(prefix, brokers, loads(text, str(path)), path, tmp_path / "reports")


def shop(env: Env, *faults: Fault) -> Shop:
    return Shop(
        Settings(brokers=env.brokers, prefix=env.prefix, faults=Faults.of(*faults)),
        services=WORKERS,
        remove=True,
    )


async def gate(env: Env, scenario: str, *faults: Fault) -> Outcome:
    async with shop(env, *faults):
        outcome = await run(env.topology, Scenario.model_validate(_yaml(scenario)), str(env.out))
    # The gate and an offline check of the trace it kept agree.
    code, verdict = offline(env, Path(outcome.trace))
    assert code == (0 if outcome.verdict.passed else 1)
    agree(outcome.verdict, verdict)
    return outcome


def offline(env: Env, trace: Path) -> tuple[int, Verdict]:
    """``flowcheck check`` of a trace: its exit code and verdict."""
    reports = trace.parent / f"check-{trace.stem}"
    args = ["check", str(env.path), str(trace), "--report-dir", str(reports)]
    result = CliRunner().invoke(cli, args)
    assert "no end record" not in result.output, result.output
    return result.exit_code, Verdict.model_validate_json((reports / "verdict.json").read_text())


def agree(gate: Verdict, check: Verdict) -> None:
    def judged(v: Verdict) -> list[object]:
        return [
            (
                f.flow,
                f.chains,
                f.succeeded,
                f.failed,
                f.unknown,
                f.findings_total,
                sorted((x.kind, x.key or "", x.cause or "", x.step or "") for x in f.findings),
            )
            for f in v.flows
        ]

    assert (check.passed, check.observations) == (gate.passed, gate.observations)
    assert check.recording == gate.recording
    assert gate.recording is not None
    assert gate.recording.ended == "run"
    assert judged(check) == judged(gate)


def _yaml(text: str) -> object:
    import yaml

    return yaml.safe_load(text)


def findings(verdict: Verdict, flow: str) -> list[tuple[FindingKind, Cause | None, str | None]]:
    fv = next(f for f in verdict.flows if f.flow == flow)
    return [(f.kind, f.cause, f.step) for f in fv.findings]


async def test_clean_run_passes_and_topology_matches_the_shop(env: Env) -> None:
    outcome = await gate(env, CLEAN)
    assert outcome.drift == []  # shop.yaml declares exactly what the shop declares
    main = next(f for f in outcome.verdict.flows if f.flow == "order-to-shipment")
    assert (main.chains, main.succeeded, main.dead_lettered) == (11, 11, 3), main.findings
    assert outcome.verdict.passed, [f.findings for f in outcome.verdict.flows]


async def test_drop_is_lost_at_payments(env: Env) -> None:
    verdict = (await gate(env, "send:" + send(5, GOOD), Fault.DROP)).verdict
    assert (FindingKind.LOST, Cause.TIMED_OUT, "payments") in findings(verdict, "order-to-shipment")
    assert not verdict.passed


async def test_duplicate_is_found(env: Env) -> None:
    verdict = (await gate(env, "send:" + send(5, GOOD), Fault.DUPLICATE)).verdict
    assert (FindingKind.DUPLICATED, None, "payments") in findings(verdict, "order-to-shipment")
    assert not verdict.passed


async def test_reorder_is_found(env: Env) -> None:
    # One order placed twice (revision 1, then 2): billing holds revision 1 back.
    amended = "".join(
        send(1, GOOD.replace("revision: 1", f"revision: {rev}"), key='"amended-{run}"')
        for rev in (1, 2)
    )
    verdict = (await gate(env, "send:" + amended + send(3, GOOD), Fault.REORDER)).verdict
    # The two revisions are two messages of one chain: reordered, never duplicated.
    assert set(findings(verdict, "order-to-shipment")) == {
        (FindingKind.THRESHOLD, None, None),
        (FindingKind.REORDERED, None, "payments"),
    }
    assert not verdict.passed


async def test_latency_over_budget(env: Env) -> None:
    verdict = (await gate(env, "send:" + send(5, GOOD), Fault.LATENCY)).verdict
    main = next(f for f in verdict.flows if f.flow == "order-to-shipment")
    hop = next(lat for lat in main.latency if lat.hop == "billing.orders -> payments")
    assert not hop.passed
    assert hop.stats.p99_ms is not None
    assert hop.stats.p99_ms > 500
    assert (FindingKind.LATENCY, None, "billing.orders -> payments") in findings(
        verdict, "order-to-shipment"
    )


async def test_retry_too_often(env: Env) -> None:
    scenario = "send:" + send(1, ORDER % ("4242424242424242", "null", "false"))
    verdict = (await gate(env, scenario, Fault.RETRY_TOO_OFTEN)).verdict
    assert (FindingKind.RETRIES, None, "shipments") in findings(verdict, "stuck-shipment")
    assert not verdict.passed


async def test_skip_dead_letter(env: Env) -> None:
    scenario = "send:" + send(
        1, ORDER % ("4242424242424242", '{street: "1 Main St", city: Springfield}', "true")
    )
    verdict = (await gate(env, scenario, Fault.SKIP_DEAD_LETTER)).verdict
    kinds = [k for k, _, _ in findings(verdict, "poison-order")]
    assert FindingKind.DEAD_LETTER in kinds
    assert not verdict.passed


async def test_cli_exit_codes(env: Env) -> None:
    scenario = env.path.parent / "scenario.yaml"
    scenario.write_text("send:" + send(3, GOOD))
    cmd = [
        sys.executable,
        "-m",
        "flowcheck",
        "run",
        str(env.path),
        "--scenario",
        str(scenario),
        "--report-dir",
    ]
    async with shop(env):
        clean = await anyio.run_process([*cmd, str(env.out / "clean")], check=False)
    async with shop(env, Fault.DROP):
        dropped = await anyio.run_process([*cmd, str(env.out / "dropped")], check=False)
    assert clean.returncode == 0, clean.stdout.decode() + clean.stderr.decode()
    assert dropped.returncode == 1, dropped.stdout.decode()
    assert b"lost: timed out after 'billing.orders'" in dropped.stdout
    for name, gated in [("clean", clean), ("dropped", dropped)]:
        reports = env.out / name
        assert (reports / "junit.xml").exists()
        # The trace names the topology file it was recorded with, so `check` can warn of edits.
        (trace,) = reports.glob("trace-*.jsonl")
        reader = Reader(str(trace))
        assert reader.header.topology_sha256 == topology_hash(str(env.path))
        # `flowcheck check` of the trace the gate kept says what the gate said.
        checked = await anyio.run_process(
            [*cmd[:3], "check", str(env.path), str(trace), "--report-dir", str(reports / "check")],
            check=False,
        )
        assert checked.returncode == gated.returncode, checked.stdout.decode()
        agree(
            Verdict.model_validate_json((reports / "verdict.json").read_text()),
            Verdict.model_validate_json((reports / "check" / "verdict.json").read_text()),
        )


async def test_mis_route_through_record_and_check(env: Env) -> None:
    """Here the shop's own checkout publishes; flowcheck records, then checks offline."""
    trace = env.path.parent / "trace.jsonl"
    ready, seen = anyio.Event(), anyio.Event()
    stop = anyio.Event()

    def tick(counts: Counter[str]) -> None:
        ready.set()
        if counts["shop.orders"] >= 3:
            seen.set()

    async with shop(env, Fault.MIS_ROUTE) as running, anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: record(
                env.topology, str(trace), topology_path=str(env.path), on_tick=tick, stop=stop
            )
        )
        with anyio.fail_after(30):
            await ready.wait()
        await running.place_orders(3)
        with anyio.fail_after(30):
            await seen.wait()
        stop.set()
    result = await anyio.run_process(
        [
            sys.executable,
            "-m",
            "flowcheck",
            "check",
            str(env.path),
            str(trace),
            "--report-dir",
            str(env.out),
        ],
        check=False,
    )
    out = result.stdout.decode()
    assert result.returncode == 1, out + result.stderr.decode()
    verdict = Verdict.model_validate_json((env.out / "verdict.json").read_text())
    for flow in ("order-to-shipment", "poison-order"):  # both start at shop.orders
        lost = [f for f in findings(verdict, flow) if f[0] == FindingKind.LOST]
        assert lost == [(FindingKind.LOST, Cause.UNROUTABLE, "billing.orders")] * 3
    assert "lost: unroutable at 'shop.orders'" in out

"""``flowcheck run`` on the ledger: flowcheck publishes the transactions itself while the
ledger runs, waits for every chain it started, and judges. It must agree with the record
and pytest-API paths (test_ledger.py) on a clean run and on faults that leave every
chain complete; and ``flowcheck check`` on the trace the run kept must say the same.

The run waits, per message, for the one flow its scenario entry names, so each
transaction names the flow where its road ends: a healthy one the audit flow (the
notify queue gets its copy at the same instant), a rejected one posting, a held one
settlement. Each transaction has an account of its own: flowcheck publishes one
record at a time, and with several transactions per account the per-account ordering
would be judged on tap read times (issue 15 item 1), true or false by chance.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import replace
from pathlib import Path

import pytest

from examples.ledger import Brokers, Fault, Kind, Ledger, Settings, Tx, plan_txs
from flowcheck import runner
from flowcheck.scenario import Scenario, Send

from .kit import (
    Found,
    Outcome,
    agree,
    check_trace,
    choose,
    clean_counts,
    expect,
    settings_with,
    succeeded,
    topology_file,
    verdict_found,
)

ENDS = {Kind.OK: "audit", Kind.REJECTED: "posting", Kind.HELD: "settlement"}


@pytest.fixture
def settings(rabbitmq_url: str, redis_url: str, kafka_bootstrap: str, unique: str) -> Settings:
    return Settings(brokers=Brokers(rabbitmq_url, kafka_bootstrap, redis_url), prefix=f"{unique}.")


def plan(seed: int) -> list[Tx]:
    txs = plan_txs(12, seed=seed, run_id=secrets.token_hex(3), accounts=3, rejected=1, held=1)
    return [replace(tx, account=f"{tx.account}-{tx.tx_id}") for tx in txs]


def scenario(txs: list[Tx]) -> Scenario:
    return Scenario(
        name="ledger",
        send=[
            Send(
                flow=ENDS[tx.kind],
                channel="ledger.tx",
                key=tx.tx_id,
                kafka_key=tx.account,
                headers={"tx_id": tx.tx_id},
                payload=tx.payload(),
            )
            for tx in txs
        ],
    )


async def gate(settings: Settings, tmp_path: Path, txs: list[Tx]) -> tuple[list[Outcome], Ledger]:
    """``flowcheck run``'s verdict, and ``flowcheck check``'s on the trace the run kept."""
    topology, path = topology_file(tmp_path, settings)
    async with Ledger(settings, remove=True) as ledger:
        outcome = await runner.run(
            topology, scenario(txs), str(tmp_path / "run"), topology_path=path
        )
    verdict = outcome.verdict
    ran = Outcome(
        "flowcheck run",
        verdict.passed,
        verdict_found(verdict),
        unknown=sum(fv.unknown for fv in verdict.flows),
        succeeded=succeeded(verdict),
    )
    offline = check_trace(path, outcome.trace, tmp_path / "reports")
    return [ran, replace(offline, path="check of the run's trace")], ledger


async def test_run_of_a_clean_ledger_passes(settings: Settings, tmp_path: Path) -> None:
    txs = plan(7)
    outcomes, ledger = await gate(settings, tmp_path, txs)
    assert not ledger.stats.faults
    agree(set(), outcomes, succeeded=clean_counts(txs))


POSTED = "ledger.posted"
HOP = "ledger.tx -> ledger.posted"


@pytest.mark.parametrize(
    ("fault", "kinds"),
    [
        (Fault.DUPLICATE, (("duplicated", POSTED),)),
        (Fault.DELAY, (("late", POSTED), ("latency", HOP), ("latency", "end-to-end"))),
    ],
    ids=str,
)
async def test_run_finds_the_fault(
    settings: Settings, tmp_path: Path, fault: Fault, kinds: tuple[tuple[str, str], ...]
) -> None:
    rng = random.Random(f"run-{fault}")
    txs = plan(rng.randrange(1 << 30))
    chosen = choose(rng, fault, txs)
    outcomes, ledger = await gate(settings_with(settings, fault, chosen), tmp_path, txs)
    hit = ledger.stats.hit(fault)
    assert hit == set(chosen)
    (first, step), *flow_level = kinds
    expected: set[Found] = expect("posting", first, hit, step) | {
        ("posting", k, None, at, None) for k, at in flow_level
    }
    agree(expected, outcomes)

"""Soundness of the verdict on the ledger (examples/ledger): a clean run repeated under
several seeds gives no finding, and each fault is found with its own kind, on its own
flow and step (and, for a lost chain, its cause), for exactly the transactions the
ledger says it hit, and nothing else.

Every run is checked two ways at once: recorded, stopped after the flows' deadlines
and checked offline with ``flowcheck check``, and through the pytest API. Which ids
a fault hits is drawn by a seeded RNG from the transactions that fault can hit.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from examples.ledger import Brokers, Event, Fault, Kind, Ledger, Settings, Tx, plan_txs

from .kit import (
    Found,
    agree,
    choose,
    clean_counts,
    expect,
    settings_with,
    watched_run,
)

SEEDS = [11, 23, 37, 41, 59]
FAULT_SEED = 2026


@pytest.fixture
def settings(rabbitmq_url: str, redis_url: str, kafka_bootstrap: str, unique: str) -> Settings:
    return Settings(brokers=Brokers(rabbitmq_url, kafka_bootstrap, redis_url), prefix=f"{unique}.")


def plan(seed: int) -> list[Tx]:
    return plan_txs(24, seed=seed, run_id=secrets.token_hex(3), accounts=6, rejected=2, held=2)


def flow_of(tx: Tx) -> tuple[str, str]:
    """The flow that judges what happens to a transaction's retries and dead letter, and
    the step it is retried at."""
    return ("posting", "ledger.tx") if tx.kind is Kind.REJECTED else ("settlement", "ledger.posted")


Expected = Callable[[list[Tx], set[str]], set[Found]]


def on_retry_flows(kind: str) -> Expected:
    """``kind`` on each hit transaction's retry flow, at its retried step (the step its
    dead-letter rule names)."""

    def expected(txs: list[Tx], hit: set[str]) -> set[Found]:
        return {
            (flow, kind, t.tx_id, at, None)
            for t in txs
            if t.tx_id in hit
            for flow, at in [flow_of(t)]
        }

    return expected


def on(
    flow: str,
    kind: str,
    step: str | None,
    cause: str | None = None,
    flow_level: tuple[tuple[str, str], ...] = (),
) -> Expected:
    """``kind`` at ``step`` (with ``cause``) for each hit transaction, and ``flow_level``
    findings (kind, step) about the whole flow."""

    def expected(txs: list[Tx], hit: set[str]) -> set[Found]:
        return expect(flow, kind, hit, step, cause) | {
            (flow, k, None, at, None) for k, at in flow_level
        }

    return expected


POSTED = "ledger.posted"
# The delayed posts: over ledger.posted's 1s deadline, its hop's 600ms p99 budget and
# the flow's 800ms end-to-end one.
DELAYED = (("latency", "ledger.tx -> ledger.posted"), ("latency", "end-to-end"))

# fault -> what the verdict must say, given the ids the ledger reports it hit
EXPECTED: dict[Fault, Expected] = {
    Fault.DROP: on("posting", "lost", POSTED, "timed_out"),
    Fault.DUPLICATE: on("posting", "duplicated", POSTED),
    Fault.REORDER: on("posting", "reordered", POSTED),
    Fault.DELAY: on("posting", "late", POSTED, flow_level=DELAYED),
    Fault.DEAD_LETTER_HEALTHY: on("posting", "dead_letter", None, "dead_lettered"),
    Fault.SKIP_DEAD_LETTER: on_retry_flows("dead_letter"),
    Fault.RETRY_TOO_OFTEN: on_retry_flows("retries"),
    Fault.RETRY_TOO_LITTLE: on_retry_flows("retries"),
    Fault.MIS_ROUTE: on("settlement", "lost", "ledger.settled", "timed_out"),
}


@pytest.mark.parametrize("seed", SEEDS)
async def test_clean_run_has_no_finding(settings: Settings, tmp_path: Path, seed: int) -> None:
    txs = plan(seed)
    run = await watched_run(settings, tmp_path, [txs])
    stats = run.ledger.stats
    assert not stats.faults
    # The run took every road: rejected, held and healthy transactions each reached their end.
    assert {Event.REJECTED, Event.DEAD, Event.SETTLED} <= {e for e in Event if stats.ids(e)}
    agree(set(), run.outcomes, succeeded=clean_counts(txs))


async def test_clean_backlog_posted_at_once_has_no_finding(
    settings: Settings, tmp_path: Path
) -> None:
    """The poster is held until two waves wait for it: it posts each partition's
    backlog in one transaction, so the stream's tap reads an account's transactions of
    both waves at one instant, in the right order."""
    txs = plan(SEEDS[0])
    seen: dict[str, int] = {}
    first: list[Tx] = []
    second: list[Tx] = []
    for tx in txs:  # each account's first two transactions, then the rest
        seen[tx.account] = seen.get(tx.account, 0) + 1
        (first if seen[tx.account] <= 2 else second).append(tx)
    run = await watched_run(settings, tmp_path, [first, second], backlog=True)
    assert not run.ledger.stats.faults
    agree(set(), run.outcomes, succeeded=clean_counts(txs))


@pytest.mark.parametrize("fault", [pytest.param(f, id=str(f)) for f in EXPECTED])
async def test_fault_is_found_where_it_was_injected(
    settings: Settings, tmp_path: Path, fault: Fault
) -> None:
    rng = random.Random(f"{FAULT_SEED}-{fault}")
    txs = plan(rng.randrange(1 << 30))
    chosen = choose(rng, fault, txs)
    run = await watched_run(settings_with(settings, fault, chosen), tmp_path, [txs])
    hit = run.ledger.stats.hit(fault)
    if fault is Fault.REORDER:
        assert len(hit) == len(chosen)  # the overtakers: one per transaction held back
    else:
        assert hit == set(chosen)
    agree(
        EXPECTED[fault](txs, hit),
        run.outcomes,
    )


async def test_stop_for_good_near_the_end_is_a_loss(settings: Settings, tmp_path: Path) -> None:
    rng = random.Random(f"{FAULT_SEED}-stop")
    txs = plan(rng.randrange(1 << 30))
    tail = plan_txs(4, seed=rng.randrange(1 << 30), run_id=secrets.token_hex(3), accounts=2)
    stop_at = rng.choice(tail).tx_id

    def stopped(ledger: Ledger) -> bool:
        stats = ledger.stats
        return bool(stats.hit(Fault.STOP)) and {t.tx_id for t in tail} <= stats.ids(Event.POSTED)

    run = await watched_run(
        settings_with(settings, Fault.STOP, [stop_at]), tmp_path, [txs, tail], until=stopped
    )
    stats = run.ledger.stats
    assert stats.hit(Fault.STOP) == {stop_at}
    lost = {t.tx_id for t in tail} - stats.ids(Event.SETTLED)
    assert stop_at in lost
    # The settler read the transaction it stopped at (and any others of its batch), and
    # never acknowledged them: stuck pending; those it never read timed out.
    causes = {key: cause for o in run.outcomes for _, _, key, _, cause in o.findings}
    assert causes.get(stop_at) == "stuck_pending", causes
    assert set(causes.values()) <= {"stuck_pending", "timed_out"}, causes
    agree({("settlement", "lost", k, "ledger.settled", causes.get(k)) for k in lost}, run.outcomes)

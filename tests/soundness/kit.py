"""The soundness suite's tools: one ledger run checked the three ways users check.

- record -> stop -> check: ``flowcheck.recorder.record`` taps the run until it
  is told to stop, after the flows' deadlines have passed in silence; then
  ``flowcheck check`` (the CLI's own entry point, in this process) judges the
  trace and writes verdict.json.
- the pytest API: a :class:`flowcheck.testing.Flowcheck` watches the same run;
  ``check()`` passes, or fails with the findings.
- ``flowcheck run``: :func:`flowcheck.runner.run` publishes the transactions
  itself while the ledger runs (a run of its own: see test_ledger_run.py).

Findings are compared as (flow, kind, key, step, cause): a flow-level finding has no key,
and only a ``lost`` chain (or a healthy message dead-lettered) has a cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio
import pytest

from examples.ledger import Brokers, Fault, Faults, Kind, Ledger, Settings, Tx
from examples.ledger.topology import LEDGER_YAML, topology_yaml
from flowcheck import cli
from flowcheck.checker import Finding, Verdict
from flowcheck.checker import window as window_of
from flowcheck.observations import Kind as ObsKind
from flowcheck.observations import Observation
from flowcheck.recorder import record
from flowcheck.testing import FlowAssertionError, Flowcheck, with_brokers
from flowcheck.topology import Topology, load

Found = tuple[str | None, str, str | None, str | None, str | None]  # flow, kind, key, step, cause

SETTLE = 60.0  # seconds; a run takes a few, this only bounds a failure
READY = 30.0


class KnownBug(AssertionError):
    """A path disagrees with the expected verdict in a way a known flowcheck bug explains.

    Tests mark ``xfail(strict=True, raises=KnownBug)``: any other failure still fails.
    """


def found(findings: Iterable[Finding]) -> set[Found]:
    return {(f.flow, f.kind.value, f.key, f.step, f.cause) for f in findings}


def verdict_found(verdict: Verdict) -> set[Found]:
    return found([*verdict.findings, *(f for fv in verdict.flows for f in fv.findings)])


def succeeded(verdict: Verdict) -> dict[str, int]:
    return {fv.flow: fv.succeeded for fv in verdict.flows}


def clean_counts(txs: Iterable[Tx]) -> dict[str, int]:
    """The chains each flow must judge a success in a clean run of ``txs``."""
    kinds = [tx.kind for tx in txs]
    healthy = kinds.count(Kind.OK)
    posted = healthy + kinds.count(Kind.HELD)
    return {"posting": len(kinds), "settlement": posted, "audit": healthy, "notify": healthy}


def expect(
    flow: str, kind: str, keys: Iterable[str], step: str | None, cause: str | None = None
) -> set[Found]:
    return {(flow, kind, k, step, cause) for k in keys}


@dataclass
class Outcome:
    """What one path concluded about one run."""

    path: str
    passed: bool
    findings: set[Found]
    unknown: int = 0
    detail: str = ""
    succeeded: dict[str, int] | None = None  # per flow; None when the path gave no verdict


def agree(
    expected: set[Found],
    outcomes: Sequence[Outcome],
    known: Iterable[str] = (),
    *,
    succeeded: dict[str, int] | None = None,
) -> None:
    """Every path found exactly ``expected`` (and passed iff it is empty), with no chain left
    unknown and, if given, ``succeeded`` chains per flow: a green verdict must have judged
    the run, not nothing. Paths in ``known`` are checked last and fail with
    :class:`KnownBug`."""
    buggy = set(known)
    for o in sorted(outcomes, key=lambda o: o.path in buggy):
        problems = []
        if o.findings != expected:
            missing, extra = (
                sorted(expected - o.findings, key=str),
                sorted(o.findings - expected, key=str),
            )
            problems.append(f"missing {missing}, unexpected {extra}")
        if o.passed != (not expected):
            problems.append(f"passed={o.passed}, expected {not expected}")
        if o.unknown:
            problems.append(f"{o.unknown} chain(s) unknown")
        if succeeded is not None and o.succeeded != succeeded:
            problems.append(f"succeeded chains {o.succeeded}, expected {succeeded}")
        if problems:
            error = KnownBug if o.path in buggy else AssertionError
            raise error(f"{o.path}: {'; '.join(problems)}\n{o.detail}")


def topology_file(tmp_path: Path, settings: Settings) -> tuple[Topology, str]:
    """ledger.yaml as it describes this run's ledger (prefixed names), written and loaded."""
    path = tmp_path / "ledger.yaml"
    path.write_text(topology_yaml(settings.prefix, settings.brokers), encoding="utf-8")
    return load(str(path)), str(path)


def base_topology(brokers: Brokers) -> Topology:
    """ledger.yaml unprefixed, on this session's brokers: what the pytest API isolates."""
    return with_brokers(
        load(str(LEDGER_YAML)),
        rabbitmq_url=brokers.rabbitmq_url,
        kafka_bootstrap=brokers.kafka_bootstrap,
        redis_url=brokers.redis_url,
    )


def check_trace(topology_path: str, trace: str, report_dir: Path) -> Outcome:
    """``flowcheck check TOPOLOGY TRACE --report-dir DIR``, as a user runs it."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["check", topology_path, trace, "--report-dir", str(report_dir)])
    code = exited.value.code
    assert code in (0, 1), f"flowcheck check exited {code}"
    verdict = Verdict.model_validate_json((report_dir / "verdict.json").read_text())
    return Outcome(
        "record -> check",
        passed=code == 0,
        findings=verdict_found(verdict),
        unknown=sum(fv.unknown for fv in verdict.flows),
        detail=json.dumps(
            [f.model_dump(exclude={"timeline"}) for fv in verdict.flows for f in fv.findings],
            default=str,
        )[:4000],
        succeeded=succeeded(verdict),
    )


@dataclass
class Recording:
    """A recording of one run: stop() it once the flows' deadlines have passed."""

    topology: Topology
    path: str
    trace: str
    stop_event: anyio.Event = field(default_factory=anyio.Event)
    task: asyncio.Task[object] | None = None

    async def stop(self, quiet_since: float) -> None:
        """Stop once every chain's deadline window has passed since ``quiet_since``
        (time.monotonic() when the system came to rest): what a user waits before
        stopping. Waiting for that time to pass is the event itself."""
        window = window_of(self.topology).total_seconds()
        await anyio.sleep(max(0.0, quiet_since + window - time.monotonic()))
        self.stop_event.set()
        assert self.task is not None
        await self.task


@contextlib.asynccontextmanager
async def recording(topology: Topology, path: str, trace: str) -> AsyncIterator[Recording]:
    """``flowcheck record`` in this process; the block runs once every tap watches."""
    rec = Recording(topology, path, trace)
    ready = asyncio.Event()
    rec.task = asyncio.create_task(
        record(
            topology,
            trace,
            topology_path=path,
            stop=rec.stop_event,
            on_ready=ready.set,
        )
    )
    waiter = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait({rec.task, waiter}, timeout=READY, return_when=asyncio.FIRST_COMPLETED)
        if rec.task.done():
            rec.task.result()  # the recorder failed to start: its error
        assert ready.is_set(), "the recorder's taps did not start in time"
        yield rec
    finally:
        waiter.cancel()
        if not rec.task.done():
            rec.stop_event.set()
            await rec.task


async def api_outcome(fc: Flowcheck, within: float) -> Outcome:
    """The pytest API's ``check()`` over every flow."""
    try:
        verdict = await fc.check(within=within)
    except FlowAssertionError as failed:
        return Outcome("pytest API", False, found(failed.findings), detail=str(failed)[:4000])
    return Outcome(
        "pytest API",
        verdict.passed,
        verdict_found(verdict),
        unknown=sum(fv.unknown for fv in verdict.flows),
        succeeded=succeeded(verdict),
    )


@dataclass
class Run:
    """One ledger run watched by the recorder and the pytest API at once."""

    txs: list[Tx]
    ledger: Ledger
    outcomes: list[Outcome]


def settings_with(
    settings: Settings, fault: Fault | None = None, ids: Iterable[str] = ()
) -> Settings:
    return replace(settings, faults=Faults.of(fault, ids) if fault else Faults())


async def watched_run(
    settings: Settings,
    tmp_path: Path,
    waves: Sequence[list[Tx]],
    *,
    until: Callable[[Ledger], bool] | None = None,
    backlog: bool = False,
) -> Run:
    """Run the ledger on ``waves`` of transactions (each published once the one before is
    at rest), recorded and watched by the pytest API; return what each path concluded.

    ``until``: the last wave is waited for until this holds instead (a fault leaves
    it unfinished); the paths then wait out the flows' deadlines themselves.
    ``backlog``: the poster reads nothing until every wave is published, each once
    the pytest API's taps have seen the one before on ledger.tx, and finds them all
    waiting.
    """
    topology, path = topology_file(tmp_path, settings)
    window = window_of(topology).total_seconds()
    trace = str(tmp_path / "trace.jsonl")
    async with (
        Flowcheck(base_topology(settings.brokers), prefix=settings.prefix, deadline=SETTLE) as fc,
        recording(topology, path, trace) as rec,
        Ledger(settings, remove=True, hold_poster=backlog) as ledger,
    ):
        if backlog:
            published = 0
            for wave in waves[:-1]:
                await ledger.publish(wave)
                published += len(wave)
                await saw(fc, "ledger.tx", published)
            await ledger.publish(waves[-1])
            ledger.release_poster()
            waves = [[tx for wave in waves for tx in wave]]
        for i, wave in enumerate(waves):
            if not backlog:
                await ledger.publish(wave)
            if until is not None and i == len(waves) - 1:
                await ledger.wait_for(lambda _: until(ledger), within=SETTLE)
            else:
                await ledger.settle(wave, within=SETTLE)
        quiet = time.monotonic()
        # Chains a fault left open never end: the API's check waits for them one
        # deadline window (the recorder below waits out the same window).
        api = await api_outcome(fc, within=window)
        await rec.stop(quiet)
    checked = check_trace(path, trace, tmp_path / "reports")
    return Run([tx for wave in waves for tx in wave], ledger, [api, checked])


async def saw(fc: Flowcheck, channel: str, n: int) -> None:
    """Wait until the pytest API's taps have seen ``n`` messages arrive on ``channel``."""

    def arrived(items: list[Observation]) -> bool:
        return sum(1 for o in items if o.channel == channel and o.kind is ObsKind.ROUTED) >= n

    assert await fc.wait_for(arrived, within=READY), f"the API's taps did not see {n} on {channel}"


# ---------------------------------------------------------------- choosing whom a fault hits


def healthy(txs: Sequence[Tx]) -> list[Tx]:
    return [tx for tx in txs if tx.kind is Kind.OK]


def reaches_stream(tx: Tx) -> bool:
    return tx.kind is not Kind.REJECTED


def overtakable(txs: Sequence[Tx]) -> list[Tx]:
    """Healthy transactions with a later one of the same account that is posted (it can
    overtake them), at most one per account."""
    out: dict[str, Tx] = {}
    for i, tx in enumerate(txs):
        later = any(t.account == tx.account and reaches_stream(t) for t in txs[i + 1 :])
        if tx.kind is Kind.OK and later and tx.account not in out:
            out[tx.account] = tx
    return list(out.values())


def last_of_account(txs: Sequence[Tx]) -> list[Tx]:
    """Healthy transactions no later transaction of their account can overtake."""
    return [
        tx
        for i, tx in enumerate(txs)
        if tx.kind is Kind.OK and not any(t.account == tx.account for t in txs[i + 1 :])
    ]


def choose(rng: random.Random, fault: Fault, txs: Sequence[Tx], n: int = 2) -> list[str]:
    """The transaction ids ``fault`` hits in this run: ``n`` of those it can hit, by ``rng``."""
    rejected = [t for t in txs if t.kind is Kind.REJECTED]
    held = [t for t in txs if t.kind is Kind.HELD]
    if fault in (Fault.SKIP_DEAD_LETTER, Fault.RETRY_TOO_OFTEN, Fault.RETRY_TOO_LITTLE):
        pool = [rng.choice(rejected), rng.choice(held)]  # one of each retry route
        return [t.tx_id for t in pool]
    if fault is Fault.REORDER:
        pool = overtakable(txs)
    elif fault is Fault.DELAY:
        pool = last_of_account(txs)
    else:
        pool = healthy(txs)
    return [t.tx_id for t in rng.sample(pool, n)]

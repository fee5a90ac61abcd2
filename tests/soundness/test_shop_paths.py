"""The shop, checked the three ways users check it: record -> stop -> check, run, and the pytest API.

Each case is one run of the real shop (examples/shop) on the real brokers, watched
at once by

- ``flowcheck record --apply --ready-file`` in a subprocess, started before the
  shop, stopped with SIGINT once every chain is decided, then ``flowcheck check``
  of its trace (exit code and verdict.json);
- a :class:`flowcheck.testing.Flowcheck` in the test (``check()``, the pytest
  API's gate);
- ``flowcheck run`` with a scenario of the same orders, which publishes them
  itself (as ``scripts/demo.py`` does): the shop's billing, payments and
  shipping services work them. Where the shop's checkout places the orders (the
  mis-route and bad-schema faults live there, and one clean run is placed that
  way, as in production), ``run`` cannot drive the shop: those cases are checked
  through the other two paths; so is the phantom fault, whose payment comes
  after ``run`` has stopped watching.

All paths must agree: the same passed/failed, the same findings (flow, kind,
key, step, cause), the same chain counts, none left unknown. The orders come from the shop's own planner (``plan_orders``), with ids
and amounts drawn from a seeded RNG; the expected findings come from what the
shop says it broke (its stats), never from a hard-coded verdict.

Every verdict is judged with unjudged expectations allowed (``--allow-unjudged``):
the shop's RabbitMQ quorum queue retries a poison order, and its delivery
attempts can only be seen through the firehose, which is vhost-wide and shared
with other processes, so it is left alone. Each case asserts that the only
expectations that may go unjudged are those attempts, the same on every path,
and the clean cases assert that a strict ``flowcheck check`` (no
``--allow-unjudged``) is green only when nothing went unjudged.

The topology is topologies/shop.yaml with shorter flow deadlines, so that a lost
chain is decided within seconds, and with the backoff the shop's payments-worker
keeps before a declined payment's retry (1s) declared on declined-payment. shop.yaml
leaves it out: a Kafka retry topic shows when an attempt failed, not when it began,
so a backoff kept is never judged (it stays unjudged, which the clean runs here
allow), but a retry that failed sooner after the attempt before it than the backoff
is caught (the early-retry fault). The shop's own timings are its defaults.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from anyio.streams.text import TextReceiveStream

from examples.shop import (
    ALL_SERVICES,
    Brokers,
    Event,
    Fault,
    Faults,
    Kind,
    Order,
    Settings,
    Shop,
    Stats,
    plan_orders,
)
from examples.shop.topology import topology_yaml
from flowcheck.checker import Verdict
from flowcheck.checker import window as window_of
from flowcheck.cli import READY_LINE
from flowcheck.testing import FlowAssertionError, Flowcheck, with_brokers
from flowcheck.topology import loads

ROOT = Path(__file__).resolve().parents[2]
FLOWCHECK = [sys.executable, "-m", "flowcheck"]
# Short flow deadlines: a lost chain is decided once its deadline has passed, and the
# cases that lose one wait that long.
DEADLINES = {
    "order-to-shipment": "6s",
    "poison-order": "6s",
    "declined-payment": "8s",
    "stuck-shipment": "8s",
}
PAYMENT_BACKOFF = "1s"  # Settings.payment_backoff_ms, declared on declined-payment
STEP = 60.0  # seconds; bounds each wait, only reached when something hangs
LATENCY_MS = 600  # the latency fault: over payments' 500 ms budget, under the deadlines
# The pytest API's check() waits this long at most for open chains, then judges them as
# past their deadline. Called once run has returned (every chain reached its end or its
# deadline), nothing it waits for is still on its way; called as soon as checkout has
# placed its orders, they are, for up to the longest deadline. (It waits the whole of it
# for a chain already lost: see the last test.)
API_WITHIN = 4.0
API_WITHIN_CHECKOUT = 10.0
LOST_WITHIN = 8.0


# ---------------------------------------------------------------- the orders


def plan(seed: int, faults: Faults, *, amended: int = 0) -> list[Order]:
    """The orders of one case: how many of each kind, their ids and amounts, from ``seed``.

    The shop's planner spreads the special orders and amends ``amended`` healthy
    ones (a second revision of the same id; the reorder fault needs one); the RNG
    picks the counts, the run id in every order id and each order's amount.
    """
    rng = random.Random(seed)
    n = rng.randint(4, 6)
    poison = 1 if Fault.SKIP_DEAD_LETTER in faults else rng.randint(0, 1)
    bad_address = 1 if faults.enabled & {Fault.SKIP_DEAD_LETTER, Fault.RETRY_TOO_OFTEN} else 0
    bad_address = bad_address or rng.randint(0, 1)
    declined = 1 if Fault.EARLY_RETRY in faults else rng.randint(0, 1)
    amended = max(amended, 1 if Fault.REORDER in faults else 0)
    orders = plan_orders(
        n,
        poison=poison,
        declined=declined,
        bad_address=bad_address,
        amended=amended,
        run_id=f"s{seed}-{rng.getrandbits(24):06x}",
    )
    amounts: dict[str, float] = {}
    out = []
    for order in orders:
        if order.kind is not Kind.POISON:  # a poison order is one billing cannot charge
            first = amounts.setdefault(order.order_id, round(rng.uniform(1, 500), 2))
            order = replace(order, amount=round(first + 5 * (order.revision - 1), 2))
        out.append(order)
    return out


def scenario(orders: list[Order]) -> str:
    """``flowcheck run``'s scenario: the same orders, one send each, in planned order."""
    send = [
        {
            "flow": "order-to-shipment",
            "key": order.order_id,
            "routing_key": "order.placed",
            "headers": {"order_id": order.order_id},
            "payload": order.payload(),
        }
        for order in orders
    ]
    return yaml.safe_dump({"name": "shop-orders", "send": send}, sort_keys=False)


# ---------------------------------------------------------------- verdicts compared


Found = tuple[str, str, str, str, str]  # (flow, kind, key, step, cause); "" where there is none


@dataclass
class Seen:
    """What one path said about the run."""

    path: str
    passed: bool
    exit_code: int | None
    verdict: Verdict

    def found(self) -> set[Found]:
        flows = [(fv.flow, f) for fv in self.verdict.flows for f in fv.findings]
        flows += [(f.flow or "", f) for f in self.verdict.findings]
        return {(flow, f.kind.value, f.key or "", f.step or "", f.cause or "") for flow, f in flows}

    def chains(self) -> dict[str, tuple[int, int, int, int]]:
        return {
            fv.flow: (fv.chains, fv.succeeded, fv.failed, fv.unknown) for fv in self.verdict.flows
        }

    def unjudged(self) -> set[tuple[str, str]]:
        return {(u.flow or "", u.expectation) for u in self.verdict.unjudged} | {
            (fv.flow, u.expectation) for fv in self.verdict.flows for u in fv.unjudged
        }

    def __str__(self) -> str:
        return f"{self.path}: passed={self.passed} {sorted(self.found())} {self.chains()}"


class PathsDisagree(AssertionError):
    """Two paths gave different verdicts on the same run."""


class TooSlow(AssertionError):
    """An assertion waited past the moment it could have decided."""


def agree(seen: list[Seen]) -> None:
    """Every path gave the same verdict: passed, findings, chains, what went unjudged;
    and each decided every chain (none left unknown)."""
    for s in seen:
        assert s.exit_code in (None, 0 if s.passed else 1), s.path
        assert s.verdict.passed == s.passed, s.path
    first, *rest = seen
    for other in rest:
        same = (first.passed, first.found(), first.chains(), first.unjudged()) == (
            other.passed,
            other.found(),
            other.chains(),
            other.unjudged(),
        )
        if not same:
            raise PathsDisagree(
                f"{first}\n{other}\nunjudged: {first.unjudged()} / {other.unjudged()}"
            )
    for s in seen:
        assert all(fv.unknown == 0 for fv in s.verdict.flows), str(s)


def unjudged_only_attempts(seen: Seen) -> None:
    """What went unjudged: nothing but attempts on RabbitMQ's billing.orders, where only
    the firehose shows deliveries (on or off: it is shared and left alone)."""
    for flow, expectation in seen.unjudged():
        if expectation == "its chains, and every expectation judged on them":
            continue  # a flow the fault left without a chain judged nothing, and says so
        if expectation.startswith("latency budget") and seen.chains()[flow][1] == 0:
            continue  # no chain of the flow got through: no latency sample to judge
        if (flow, expectation) == ("declined-payment", "retry backoff at 'payments'"):
            continue  # a retry topic shows when attempts failed, not when they began
        assert flow == "poison-order", (seen.path, flow, expectation)
        assert "billing.orders" in expectation or "attempts" in expectation, expectation


# ---------------------------------------------------------------- one run, three paths


@dataclass
class Env:
    prefix: str
    brokers: Brokers
    topology_path: Path
    out: Path
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture
def env(
    tmp_path: Path, unique: str, rabbitmq_url: str, kafka_bootstrap: str, redis_url: str
) -> Env:
    prefix = f"{unique}."
    brokers = Brokers(rabbitmq_url, kafka_bootstrap, redis_url)
    doc: dict[str, Any] = yaml.safe_load(topology_yaml(prefix, brokers))
    for flow, deadline in DEADLINES.items():
        doc["flows"][flow]["deadline"] = deadline
    doc["flows"]["declined-payment"]["steps"][0]["retry"]["backoff"] = PAYMENT_BACKOFF
    path = tmp_path / "shop.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
    return Env(prefix, brokers, path, tmp_path, environ)


@asynccontextmanager
async def recording(env: Env) -> AsyncIterator[tuple[Path, list[str]]]:
    """``flowcheck record --apply --ready-file`` until the block ends (then SIGINT);
    yields once its taps watch, as its stable stderr line and its ready file say."""
    trace, ready = env.out / "recorded.jsonl", env.out / "ready.json"
    cmd = [*FLOWCHECK, "record", str(env.topology_path), "--out", str(trace), "--apply"]
    said: list[str] = []  # its stderr, in lines once it has ended
    async with (
        await anyio.open_process([*cmd, "--ready-file", str(ready)], env=env.env) as proc,
        anyio.create_task_group() as tg,
    ):
        started, ready_line = anyio.Event(), anyio.Event()

        async def drain() -> None:
            assert proc.stderr is not None
            text = ""
            async for chunk in TextReceiveStream(proc.stderr):
                text += chunk  # a line may come in two chunks
                if READY_LINE in text.splitlines():
                    ready_line.set()
                    started.set()
            said[:] = text.splitlines()
            started.set()  # it ended: the assertion below says so

        tg.start_soon(drain)
        try:
            with anyio.fail_after(STEP):
                await started.wait()
            assert ready_line.is_set(), "\n".join(said)  # not ended before it was ready
            assert json.loads(ready.read_text())["trace"] == str(trace)
            yield trace, said
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
            with anyio.fail_after(STEP):
                code = await proc.wait()
    assert code == 0, "\n".join(said)
    assert "Traceback" not in "\n".join(said), "\n".join(said)


async def check_trace(env: Env, trace: Path, *, allow_unjudged: bool = True) -> Seen:
    """``flowcheck check`` of a recorded trace: its exit code and verdict.json."""
    reports = env.out / f"check-{'allow' if allow_unjudged else 'strict'}"
    args = ["check", str(env.topology_path), str(trace), "--report-dir", str(reports)]
    done = await anyio.run_process(
        [*FLOWCHECK, *args, *(["--allow-unjudged"] if allow_unjudged else [])],
        env=env.env,
        check=False,
    )
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode in (0, 1), output
    assert "no end record" not in output, output
    verdict = Verdict.model_validate_json((reports / "verdict.json").read_text())
    assert verdict.recording is not None
    assert verdict.recording.ended == "interrupted"  # SIGINT, as Ctrl-C
    return Seen("record+check", done.returncode == 0, done.returncode, verdict)


async def run_gate(env: Env, path: Path) -> Seen:
    """``flowcheck run`` publishing the scenario at ``path``, against the running shop."""
    reports = env.out / "run"
    done = await anyio.run_process(
        [
            *FLOWCHECK,
            *("run", str(env.topology_path), "--scenario", str(path)),
            *("--report-dir", str(reports), "--allow-unjudged"),
        ],
        env=env.env,
        check=False,
    )
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode in (0, 1), output
    verdict = Verdict.model_validate_json((reports / "verdict.json").read_text())
    return Seen("run", done.returncode == 0, done.returncode, verdict)


async def api_check(fc: Flowcheck, placed: Callable[[list[str]], bool], within: float) -> Seen:
    """The pytest API as a test uses it: wait until the taps have seen every order placed
    (``placed`` of the order ids seen), then ``check()``, which passes or raises."""
    assert await fc.wait_for(lambda _: placed(fc.seen_keys("order-to-shipment")))
    try:
        await fc.check(within=within)
    except FlowAssertionError:
        passed = False
    else:
        passed = True
    return Seen("pytest API", passed, None, fc.verdict())


@dataclass
class Case:
    """One run of the shop: its orders, what each path said, what the shop did."""

    seen: list[Seen]
    orders: list[Order]
    stats: Stats
    trace: Path  # what the recorder wrote

    def path(self, name: str) -> Seen:
        return next(s for s in self.seen if s.path == name)


async def run_case(
    env: Env,
    seed: int,
    *faults: Fault,
    by_checkout: bool = False,
    amended: int = 0,
    scenario_file: Path | None = None,
) -> Case:
    """One shop run with ``faults``, watched by all three paths; when the shop's
    checkout places the orders, ``run`` cannot drive it and two paths watch.

    ``run`` publishes the orders planned from ``seed``, or ``scenario_file`` as it is.
    """
    shop_faults = Faults.of(*faults, latency_ms=LATENCY_MS)
    orders = [] if scenario_file is not None else plan(seed, shop_faults, amended=amended)
    if scenario_file is None:
        scenario_file = env.out / "scenario.yaml"
        scenario_file.write_text(scenario(orders))
    sends: list[dict[str, Any]] = yaml.safe_load(scenario_file.read_text())["send"]
    # Order ids to be seen: an amended order is sent twice under one id; the shop's own
    # scenario makes up a new id for each order.
    total = len({o.order_id for o in orders}) or sum(int(s.get("count", 1)) for s in sends)

    topology = loads(env.topology_path.read_text(), str(env.topology_path))
    # The phantom payment comes once a chain first seen then can no longer have begun
    # before the taps started (a flow's deadline and grace after it); the pytest API
    # waits for its key too before it checks.
    phantom = Fault.PHANTOM in faults
    phantom_ms = int(window_of(topology).total_seconds() * 1000) + 1000

    def placed(seen: list[str]) -> bool:
        return len(seen) >= total + phantom

    settings = Settings(
        brokers=env.brokers, prefix=env.prefix, faults=shop_faults, phantom_delay_ms=phantom_ms
    )
    seen: list[Seen] = []
    async with recording(env) as (trace, _):
        fc = Flowcheck(topology, apply=False, deadline=STEP, allow_unjudged=True)
        async with fc, Shop(settings, services=ALL_SERVICES, remove=True) as shop:
            if by_checkout:
                for order in orders:
                    await shop.checkout.publish(order)
            else:
                seen.append(await run_gate(env, scenario_file))
            within = API_WITHIN_CHECKOUT if by_checkout else API_WITHIN
            seen.append(await api_check(fc, placed, within))
            stats = shop.stats
        # The recorder stops here (SIGINT), every chain decided, before the shop's teardown.
    seen.insert(0, await check_trace(env, trace))
    for s in seen:
        print(s)
    return Case(seen, orders, stats, trace)


# ---------------------------------------------------------------- what each fault must show


def hit(fault: Fault, case: Case) -> set[str]:
    """The order ids ``fault`` broke, as the shop reports them."""
    ids = {order_id for f, order_id in case.stats.faults if f is fault}
    if fault is Fault.RETRY_TOO_OFTEN:  # not reported as injected: counted deliveries show it
        received = case.stats.orders(Event.SHIPPING_RECEIVED)
        ids |= {o for o, n in received.items() if n > Settings().shipping_delivery_limit}
    if fault is Fault.LATENCY:  # every payment was late: every order billed
        ids |= set(case.stats.orders(Event.BILLED))
    assert ids, f"the shop never injected {fault}"
    return ids


# (flow, kind, step, cause) per order broken
PER_KEY: dict[Fault, list[tuple[str, str, str, str]]] = {
    # Billing took the order off its queue and published nothing.
    Fault.DROP: [("order-to-shipment", "lost", "payments", "timed_out")],
    # The second payment is worked too: two shipments.
    Fault.DUPLICATE: [
        ("order-to-shipment", "duplicated", "payments", ""),
        ("order-to-shipment", "duplicated", "shipments", ""),
    ],
    Fault.REORDER: [("order-to-shipment", "reordered", "payments", "")],
    Fault.LATENCY: [],  # a percentile of the hop, not one order
    Fault.RETRY_TOO_OFTEN: [("stuck-shipment", "retries", "shipments", "")],
    Fault.SKIP_DEAD_LETTER: [],  # per kind of order: see expected()
    # The broker returned the order: no queue is bound to the misspelt routing key.
    Fault.MIS_ROUTE: [
        ("order-to-shipment", "lost", "billing.orders", "unroutable"),
        ("poison-order", "lost", "billing.orders", "unroutable"),
    ],
    # Attempt 2 failed (dead letter) at once after attempt 1 did (retry record).
    Fault.EARLY_RETRY: [("declined-payment", "backoff", "payments", "")],
    # The first flow on the channel reports it; the step is the channel.
    Fault.BAD_SCHEMA: [("order-to-shipment", "schema", "billing.orders", "")],
    # Seen at payments, then shipments: flagged at the furthest step it reached.
    Fault.PHANTOM: [("order-to-shipment", "unexpected", "payments", "")],  # where it appeared
}
# Faults that live in checkout, or that come after run has stopped watching: run
# cannot drive them, the recording and the pytest API watch.
BY_CHECKOUT = {Fault.MIS_ROUTE, Fault.BAD_SCHEMA, Fault.PHANTOM}
# Findings that fail their chain, so order-to-shipment's success rate too.
CHAIN_KINDS = {"lost", "duplicated", "reordered", "dead_letter", "unexpected", "retries"}


def expected(fault: Fault, case: Case) -> set[Found]:
    """Every finding the fault must cause, and no other: per key the shop broke, and
    order-to-shipment's success rate (99%) once one of its chains fails."""
    ids = hit(fault, case)
    want = {
        (flow, kind, key, step, cause) for key in ids for flow, kind, step, cause in PER_KEY[fault]
    }
    if fault is Fault.SKIP_DEAD_LETTER:
        kinds = {o.order_id: o.kind for o in case.orders}
        for key in ids:
            if kinds[key] is Kind.POISON:  # acked on its last delivery: no billing.orders.dlq
                want |= {
                    ("order-to-shipment", "dead_letter", key, "billing.orders", ""),
                    ("poison-order", "dead_letter", key, "billing.orders", ""),
                }
            else:  # a stuck shipment acked without a shipments-dead entry
                assert kinds[key] is Kind.BAD_ADDRESS
                want |= {
                    ("order-to-shipment", "dead_letter", key, "shipments", ""),
                    ("stuck-shipment", "dead_letter", key, "", ""),  # a rule of the flow
                }
    if fault is Fault.LATENCY:  # every order waits LATENCY_MS: the hop, and p50 end to end
        want.add(("order-to-shipment", "latency", "", "billing.orders -> payments", ""))
        want.add(("order-to-shipment", "latency", "", "end-to-end", ""))
    if any(flow == "order-to-shipment" and kind in CHAIN_KINDS for flow, kind, *_ in want):
        want.add(("order-to-shipment", "threshold", "", "", ""))
    return want


SEEDS = [11, 23, 37, 41, 53]


@pytest.mark.parametrize("seed", SEEDS)
async def test_clean_shop_passes_on_every_path(env: Env, seed: int) -> None:
    case = await run_case(env, seed)
    assert [s.path for s in case.seen] == ["record+check", "run", "pytest API"]
    agree(case.seen)
    for s in case.seen:
        assert s.passed, str(s)
        assert s.found() == set(), str(s)
        unjudged_only_attempts(s)
    assert not case.stats.faults
    # Without --allow-unjudged, an expectation that went unjudged keeps the gate red.
    recorded = case.path("record+check")
    strict = await check_trace(env, case.trace, allow_unjudged=False)
    assert strict.passed == (not recorded.unjudged())
    assert strict.found() == recorded.found()


async def test_clean_shop_placing_its_own_orders_passes_on_both_paths(env: Env) -> None:
    """Checkout places the orders, as in production: record -> check and the pytest API."""
    case = await run_case(env, 61, by_checkout=True)
    assert [s.path for s in case.seen] == ["record+check", "pytest API"]
    agree(case.seen)
    for s in case.seen:
        assert s.passed, str(s)
        assert s.found() == set(), str(s)
        unjudged_only_attempts(s)
    assert not case.stats.faults


async def test_the_shops_own_scenario_passes_on_every_path(env: Env) -> None:
    """topologies/scenarios/shop.yaml, as the demo publishes it: healthy orders and one of
    each kind of bad order, at its own rate."""
    case = await run_case(env, 0, scenario_file=ROOT / "topologies" / "scenarios" / "shop.yaml")
    agree(case.seen)
    for s in case.seen:
        assert s.passed, str(s)
        assert s.found() == set(), str(s)
        unjudged_only_attempts(s)
    chains = case.path("run").chains()["order-to-shipment"]
    # 42 healthy (two by one customer), 2 poison, 2 declined, 2 bad addresses
    assert chains == (48, 48, 0, 0)


async def test_clean_shop_with_an_amended_order_passes_on_every_path(env: Env) -> None:
    """Checkout places a second revision of one order under the same order id (what
    ordering: per-key exists to check): two messages of one chain, not a duplicate."""
    case = await run_case(env, SEEDS[0], amended=1)
    assert [o.revision for o in case.orders].count(2) == 1
    agree(case.seen)
    for s in case.seen:
        assert s.passed, str(s)
        assert s.found() == set(), str(s)
        unjudged_only_attempts(s)
    assert not case.stats.faults


FAULT_SEED = 7


@pytest.mark.parametrize("fault", list(Fault))
async def test_fault_is_caught_on_every_path(env: Env, fault: Fault) -> None:
    by_checkout = fault in BY_CHECKOUT
    case = await run_case(env, FAULT_SEED, fault, by_checkout=by_checkout)
    want = expected(fault, case)
    # The recording and the pytest API first; then run must say what they said.
    for s in [s for s in case.seen if s.path != "run"]:
        assert not s.passed, str(s)
        assert s.found() == want, str(s)
        unjudged_only_attempts(s)
    agree(case.seen)


async def test_api_check_fails_a_lost_chain_once_its_deadline_has_passed(
    unique: str, rabbitmq_url: str, kafka_bootstrap: str, redis_url: str
) -> None:
    doc = yaml.safe_load((ROOT / "topologies" / "shop.yaml").read_text())
    doc["flows"]["order-to-shipment"]["deadline"] = "1s"
    doc["flows"]["order-to-shipment"]["steps"][3]["deadline"] = "1s"
    topology = with_brokers(
        loads(yaml.safe_dump(doc)),
        rabbitmq_url=rabbitmq_url,
        kafka_bootstrap=kafka_bootstrap,
        redis_url=redis_url,
    )
    [order] = plan_orders(1, run_id=unique)
    fc = Flowcheck(topology, prefix=f"{unique}.", flows=["order-to-shipment"])
    async with fc:
        # Nothing bills it: the chain stops at billing.orders, lost once its 1s deadline passes.
        await fc.publish(
            "shop.orders",
            order.payload(),
            routing_key="order.placed",
            headers={"order_id": order.order_id},
        )
        began = time.monotonic()
        with pytest.raises(FlowAssertionError) as failed:
            await fc.check(within=LOST_WITHIN)
        took = time.monotonic() - began
    lost = [(f.kind.value, f.key, f.step) for f in failed.value.findings if f.key]
    if lost != [("lost", order.order_id, "payments")]:
        pytest.fail(f"not the finding expected: {lost}")
    if took >= LOST_WITHIN / 2:
        raise TooSlow(f"check() took {took:.1f}s for a chain lost after 1s")

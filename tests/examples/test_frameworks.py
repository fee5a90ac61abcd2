"""Real task frameworks on the real RabbitMQ, judged by flowcheck: the Celery chain
(examples/celery_chain) and the Dramatiq pipeline (examples/dramatiq_pipeline).

Both frameworks publish straight to their queues through the default exchange,
which only RabbitMQ's firehose shows; the firehose is turned on in a virtual
host this module owns (never the default one, which other tests share), and
deleted after. Each test runs its own system under a unique prefix: it places
orders, waits for the system to say what became of each one (an event, with a
deadline), then lets ``FlowSession.check`` judge what the taps saw, and
compares the findings with the fault it switched on.

Each run reads the dead-letter queue before judging, so dead letters through the
default exchange leave the evidence RabbitMQ can give (a delivery with x-death).
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from harness import unique_prefix

import flowcheck
from flowcheck.checker import Finding, FindingKind
from flowcheck.testing import FlowAssertionError, FlowSession

ROOT = Path(__file__).resolve().parents[2]
WITHIN = 20.0  # seconds; the runs take well under one, this only bounds a failure
# The system has finished when flowcheck judges: this bounds only the wait for the
# taps' last copies, and must exceed the flows' deadline (2s) for a lost chain.
CHECK_WITHIN = 3.0
REPEATS = 5  # clean runs in a row, each with zero findings, on orders drawn from its seed

celery_chain = pytest.importorskip("examples.celery_chain")
dramatiq_pipeline = pytest.importorskip("examples.dramatiq_pipeline")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def vhost_url(rabbitmq_url: str) -> Iterator[str]:
    """A virtual host of this module's own, with the firehose on; deleted after."""
    vhost = unique_prefix("frameworks")
    rabbitmqctl("add_vhost", vhost)
    try:
        user = urlsplit(rabbitmq_url).username or "guest"
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        rabbitmqctl("trace_on", "-p", vhost)
        yield urlunsplit(urlsplit(rabbitmq_url)._replace(path=f"/{vhost}"))
    finally:
        rabbitmqctl("delete_vhost", vhost)


@dataclass
class Order:
    order_id: str
    amount: float
    kind: str = "healthy"  # or "flaky": fails its first attempt


@dataclass
class Run:
    """What one run of a system gave: flowcheck's findings, and the system's own account."""

    findings: list[Finding]
    unjudged: list[str]
    ends: list[tuple[str, str]]  # (order, how it ended), from the system
    attempts: dict[str, int]  # order -> attempts at the retrying step
    dead_letters: int  # messages in the dead-letter queue at the end
    report: str = ""
    gave_up: int = 0  # chains flowcheck counted as given up (when the check passed)

    def ids(self) -> set[tuple[str | None, str, str | None, str | None, str | None]]:
        """Every finding as (flow, kind, key, step, cause)."""
        return {(f.flow, f.kind.value, f.key, f.step, f.cause) for f in self.findings}

    def kinds(self, order_id: str | None = None) -> set[FindingKind]:
        """Finding kinds about chains (all, or ``order_id``'s)."""
        return {
            f.kind
            for f in self.findings
            if f.kind is not FindingKind.THRESHOLD and (order_id is None or f.key == order_id)
        }


@dataclass
class System:
    """One framework example behind the same few calls."""

    topology: str
    make: Callable[[str, str, dict[Any, str]], Any]
    dead_queue: Callable[[Any], str]
    start: Callable[[Any, ExitStack], None]


def _celery_start(chain: Any, stack: ExitStack) -> None:
    stack.enter_context(chain.running())


def _dramatiq_start(pipeline: Any, stack: ExitStack) -> None:
    pipeline.start()
    stack.callback(pipeline.stop)


CELERY = System(
    "celery_chain.yaml",
    lambda url, prefix, faults: celery_chain.Chain(url, prefix, faults=faults),
    lambda chain: chain.dead_queue,
    _celery_start,
)
DRAMATIQ = System(
    "dramatiq_pipeline.yaml",
    lambda url, prefix, faults: dramatiq_pipeline.Pipeline(url, prefix, faults=faults),
    lambda pipeline: f"{pipeline.store_queue}.XQ",
    _dramatiq_start,
)


async def run(
    system: System,
    url: str,
    prefix: str,
    orders: Sequence[Order],
    faults: dict[Any, str] | None = None,
    *,
    twice: Sequence[str] = (),
) -> Run:
    """Run ``system`` on ``orders`` under flowcheck; ``twice``: orders that end twice.

    Before judging, the run reads the dead-letter queue as a user who wants dead
    letters judged does: RabbitMQ shows a dead letter through the default exchange
    only when something consumes it (with the firehose on).
    """
    topology = flowcheck.load(
        str(ROOT / "topologies" / system.topology), env={"FLOWCHECK_RABBITMQ_URL": url}
    )
    app = await asyncio.to_thread(system.make, url, prefix, dict(faults or {}))
    try:
        # The frameworks declare their own queues (with their dead-letter arguments).
        async with FlowSession(topology, prefix=prefix, apply=False, deadline=WITHIN) as fc:
            stack = ExitStack()
            await asyncio.to_thread(system.start, app, stack)
            try:
                for o in orders:
                    await asyncio.to_thread(app.place, o.order_id, o.amount, o.kind)
                once = [o.order_id for o in orders if o.order_id not in twice]
                ended = await asyncio.to_thread(app.outcomes.wait, once, WITHIN)
                ended &= await asyncio.to_thread(app.outcomes.wait, twice, WITHIN, ends=2)
                assert ended, f"the system did not finish in {WITHIN}s: {app.outcomes.ends}"
                said = sum(1 for _, how in app.outcomes.ends if how == "dead")
                dead = await read_dead(url, system.dead_queue(app), said)
                findings: list[Finding] = []
                unjudged: list[str] = []
                report = ""
                gave_up = 0
                try:
                    verdict = await fc.check(within=CHECK_WITHIN)
                    gave_up = sum(f.gave_up for f in verdict.flows)
                except FlowAssertionError as exc:
                    findings = list(exc.findings)
                    unjudged = [u.expectation for u in exc.unjudged]
                    report = str(exc)
            finally:
                await asyncio.to_thread(stack.close)  # workers stopped: acks and nacks sent
            ends, attempts = list(app.outcomes.ends), dict(app.attempts)
            return Run(findings, unjudged, ends, attempts, dead, report, gave_up)
    finally:
        await asyncio.to_thread(app.close)


async def read_dead(url: str, queue: str, expect: int) -> int:
    """Consume the dead-letter queue ``queue``: wait (with a deadline) for the
    ``expect`` dead letters the system announced, then take any more already there;
    how many in all. (A system may say "dead" before its broker has moved the
    message: Celery rejects it after the task returns.)"""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        dlq = await channel.declare_queue(queue, passive=True)
        n = 0
        if expect:
            async with asyncio.timeout(WITHIN), dlq.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    n += 1
                    if n == expect:
                        break
        while (more := await dlq.get(fail=False)) is not None:
            await more.ack()
            n += 1
        return n


HEALTHY = [Order(f"o-{n}", 10.0 + n) for n in range(4)]


def healthy(seed: int) -> list[Order]:
    """The healthy orders of a clean run: how many, their ids and amounts, from ``seed``."""
    rng = random.Random(seed)
    return [Order(f"o-{seed}-{n}", round(rng.uniform(1, 500), 2)) for n in range(rng.randint(3, 6))]


FLAKY = Order("f-1", 5.0, "flaky")  # fails its first attempt, then passes
POISON = Order("p-1", -1.0)  # fails every attempt: dead-lettered after the last

SYSTEMS = pytest.mark.parametrize("system", [CELERY, DRAMATIQ], ids=["celery", "dramatiq"])


class Misjudged(AssertionError):
    """flowcheck's findings are not the ones the run calls for."""


def fault(system: System, name: str) -> Any:
    module = celery_chain if system is CELERY else dramatiq_pipeline
    return module.Fault(name)


def expect(r: Run, wanted: dict[str, set[FindingKind]]) -> None:
    """The findings are exactly ``wanted`` (order -> kinds), nothing unjudged."""
    got = {o: r.kinds(o) for o in {f.key or "" for f in r.findings}}
    got = {o: k for o, k in got.items() if k}
    if got != wanted or r.unjudged:
        raise Misjudged(f"findings {got}, expected {wanted}; unjudged {r.unjudged}\n{r.report}")


@SYSTEMS
async def test_clean_runs_without_retries_give_no_findings(
    system: System, vhost_url: str, unique: str
) -> None:
    for n in range(REPEATS):
        orders = healthy(n)
        r = await run(system, vhost_url, f"{unique}.{n}.", orders)
        assert sorted(r.ends) == sorted((o.order_id, END[system.topology]) for o in orders)
        assert r.dead_letters == 0
        expect(r, {})


@SYSTEMS
async def test_clean_runs_with_a_retry_give_no_findings(
    system: System, vhost_url: str, unique: str
) -> None:
    for n in range(REPEATS):
        r = await run(system, vhost_url, f"{unique}.{n}.", [*healthy(n), FLAKY])
        assert r.attempts[FLAKY.order_id] == 2
        assert r.dead_letters == 0
        expect(r, {})


# The poison order's dead letter, read from the dead-letter queue, is judged: it came
# after 3 attempts, with the reason its rule says.
@SYSTEMS
async def test_clean_runs_with_a_dead_letter_give_no_findings(
    system: System, vhost_url: str, unique: str
) -> None:
    for n in range(REPEATS):
        r = await run(system, vhost_url, f"{unique}.{n}.", [*healthy(n), FLAKY, POISON])
        assert r.attempts[POISON.order_id] == 3
        assert r.dead_letters == 1
        expect(r, {})


@SYSTEMS
async def test_a_lost_message_is_lost(system: System, vhost_url: str, unique: str) -> None:
    r = await run(system, vhost_url, f"{unique}.", HEALTHY, {fault(system, "lose"): "o-1"})
    assert ("o-1", "lost") in r.ends
    expect(r, {"o-1": {FindingKind.LOST}})
    flow, step = FLOW[system.topology], SECOND[system.topology]
    assert r.ids() == {(flow, "lost", "o-1", step, "timed_out")}


@SYSTEMS
async def test_a_duplicate_is_duplicated(system: System, vhost_url: str, unique: str) -> None:
    faults = {fault(system, "duplicate"): "o-1"}
    r = await run(system, vhost_url, f"{unique}.", HEALTHY, faults, twice=["o-1"])
    expect(r, {"o-1": {FindingKind.DUPLICATED}})
    assert r.ids() == {(FLOW[system.topology], "duplicated", "o-1", LAST[system.topology], None)}


@SYSTEMS
async def test_too_many_retries_are_too_many(system: System, vhost_url: str, unique: str) -> None:
    faults = {fault(system, "too_many_retries"): "o-1"}
    r = await run(system, vhost_url, f"{unique}.", HEALTHY, faults)
    assert r.attempts["o-1"] == 4
    expect(r, {"o-1": {FindingKind.RETRIES}})
    assert r.ids() == {(FLOW[system.topology], "retries", "o-1", SECOND[system.topology], None)}


@SYSTEMS
async def test_a_missing_dead_letter_is_unjudged_never_passed(
    system: System, vhost_url: str, unique: str
) -> None:
    """A dead letter through the default exchange that never came: RabbitMQ shows its
    absence no more than its presence (no firehose record either way), so the rule
    is not judged, and the check fails for it, naming the rule."""
    faults = {fault(system, "no_dead_letter"): POISON.order_id}
    r = await run(system, vhost_url, f"{unique}.", [*HEALTHY, POISON], faults)
    assert (POISON.order_id, "given up") in r.ends
    assert r.dead_letters == 0
    assert r.kinds() == set()
    assert r.unjudged == [f"dead letters in {DEAD_CHANNEL[system.topology]!r}"]
    assert "RabbitMQ shows no dead letter through the default exchange" in r.report


# Celery's default give-up (the task fails after its last retry, the message is acked,
# no dead letter), declared: orders p-* stop at the retrying step after 3 attempts.
GIVES_UP = """
    gives_up:
      - when: {payload: {"%s": {prefix: "p-"}}}
        step: %s
        attempts: 3
"""
ORDER_ID = {"celery_chain.yaml": "$[0][0].order_id", "dramatiq_pipeline.yaml": "$.kwargs.order_id"}


def giving_up(system: System, tmp_path: Path) -> System:
    """``system`` with its topology declaring the give-up of orders p-*, and no dead
    letter (the framework's default)."""
    text = (ROOT / "topologies" / system.topology).read_text()
    text, n = re.subn(r"\n    dead_letters:\n(?:      .*\n)+", "\n", text)
    assert n == 1, "the topology's dead_letters block was not found"
    path = tmp_path / system.topology
    path.write_text(text + GIVES_UP % (ORDER_ID[system.topology], SECOND[system.topology]))
    return replace(system, topology=str(path))


@SYSTEMS
async def test_an_expected_give_up_gives_no_findings(
    system: System, vhost_url: str, unique: str, tmp_path: Path
) -> None:
    declared = giving_up(system, tmp_path)
    for n in range(REPEATS):
        faults = {fault(system, "no_dead_letter"): POISON.order_id}
        orders = [*healthy(n), FLAKY, POISON]
        r = await run(declared, vhost_url, f"{unique}.{n}.", orders, faults)
        assert (POISON.order_id, "given up") in r.ends
        assert r.attempts[POISON.order_id] == 3
        assert r.dead_letters == 0
        expect(r, {})
        assert r.gave_up == 1


async def test_a_give_up_after_too_many_attempts_is_too_many(
    vhost_url: str, unique: str, tmp_path: Path
) -> None:
    faults = {fault(CELERY, "no_dead_letter"): "p-1", fault(CELERY, "too_many_retries"): "p-1"}
    r = await run(giving_up(CELERY, tmp_path), vhost_url, f"{unique}.", [*HEALTHY, POISON], faults)
    assert ("p-1", "given up") in r.ends
    assert r.attempts["p-1"] == 4
    expect(r, {"p-1": {FindingKind.RETRIES}})
    assert r.ids() == {("order-shipped", "retries", "p-1", "celery.charge", None)}


async def test_a_healthy_order_given_up_gave_up(
    vhost_url: str, unique: str, tmp_path: Path
) -> None:
    """An order the give-up rule does not match (x-1), failing every attempt and given up
    by the system: gave up at charge, not lost at ship."""
    stray = Order("x-1", -1.0)
    faults = {fault(CELERY, "no_dead_letter"): stray.order_id}
    r = await run(giving_up(CELERY, tmp_path), vhost_url, f"{unique}.", [*HEALTHY, stray], faults)
    assert (stray.order_id, "given up") in r.ends
    expect(r, {stray.order_id: {FindingKind.GIVE_UP}})
    assert r.ids() == {("order-shipped", "give_up", stray.order_id, "celery.charge", None)}
    (gave_up,) = r.findings
    assert gave_up.next_step == "celery.ship"
    assert "after 3 attempts" in gave_up.message


# The other two ways to tell a retry from a second message: Celery keeps the task id
# (header id) across retries; Dramatiq's retries pass through <queue>.DQ.
BY_ID = (
    "celery_chain.yaml",
    "retry: {max_attempts: 3, counter: {header: retries}}",
    "retry: {max_attempts: 3, id: {header: id}}",
)
BY_DELAY_QUEUE = (
    "dramatiq_pipeline.yaml",
    "retry: {max_attempts: 3, counter: $.options.retries}",
    "retry: {max_attempts: 3}",
)


def retried_by(system: System, tmp_path: Path, how: tuple[str, str, str]) -> System:
    name, counter, other = how
    text = (ROOT / "topologies" / name).read_text()
    assert counter in text
    text = text.replace(counter, other)
    if how is BY_DELAY_QUEUE:
        old = "    dead_letter: {queue: dramatiq.store.XQ}\n"
        new = (
            old
            + "    retry: [dramatiq.store.DQ]\n  dramatiq.store.DQ: {broker: rabbit, kind: queue}\n"
        )
        assert old in text, "the store queue's declaration was not found"
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return replace(system, topology=str(path))


@pytest.mark.parametrize(
    ("system", "how"), [(CELERY, BY_ID), (DRAMATIQ, BY_DELAY_QUEUE)], ids=["id", "delay-queue"]
)
async def test_retries_told_by_id_or_delay_queue(
    system: System, how: tuple[str, str, str], vhost_url: str, unique: str, tmp_path: Path
) -> None:
    told = retried_by(system, tmp_path, how)
    for n in range(REPEATS):
        r = await run(told, vhost_url, f"{unique}.{n}.", [*healthy(n), FLAKY])
        assert r.attempts[FLAKY.order_id] == 2
        expect(r, {})
    faults = {fault(system, "too_many_retries"): "o-1"}
    r = await run(told, vhost_url, f"{unique}.many.", HEALTHY, faults)
    assert r.attempts["o-1"] == 4
    expect(r, {"o-1": {FindingKind.RETRIES}})
    assert r.ids() == {(FLOW[system.topology], "retries", "o-1", SECOND[system.topology], None)}


DEAD_CHANNEL = {
    "celery_chain.yaml": "celery.charge.dead",
    "dramatiq_pipeline.yaml": "dramatiq.store.XQ",
}
END = {"celery_chain.yaml": "shipped", "dramatiq_pipeline.yaml": "stored"}
FLOW = {"celery_chain.yaml": "order-shipped", "dramatiq_pipeline.yaml": "order-stored"}
SECOND = {"celery_chain.yaml": "celery.charge", "dramatiq_pipeline.yaml": "dramatiq.store"}
LAST = {"celery_chain.yaml": "celery.ship", "dramatiq_pipeline.yaml": "dramatiq.store"}


WRONG_PATH = """\
version: 1
name: celery-chain-wrong-path
brokers:
  rabbit: {kind: rabbitmq, url: "${FLOWCHECK_RABBITMQ_URL}"}
channels:
  celery.reserve.x: {broker: rabbit, kind: exchange, type: direct, name: celery.reserve}
  celery.charge.x: {broker: rabbit, kind: exchange, type: direct, name: celery.charge}
  celery.ship.x: {broker: rabbit, kind: exchange, type: direct, name: celery.ship}
  celery.reserve: {broker: rabbit, kind: queue, bindings: [{exchange: celery.reserve.x, key: celery.reserve}]}
  celery.charge: {broker: rabbit, kind: queue, bindings: [{exchange: celery.charge.x, key: celery.charge}]}
  celery.ship: {broker: rabbit, kind: queue, bindings: [{exchange: celery.ship.x, key: celery.ship}]}
flows:
  order-shipped:
    correlate: $[0][0].order_id
    deadline: 2s
    steps: [celery.reserve, celery.charge, celery.ship]
"""


STEPS = ["celery.reserve", "celery.charge", "celery.ship"]  # WRONG_PATH's steps


async def test_a_topology_that_watches_the_wrong_path_says_so(
    vhost_url: str, unique: str, tmp_path: Path
) -> None:
    """The queues bound to the exchanges Celery declares for them, as a user reading
    the broker would write it; but Celery publishes through the default exchange."""
    path = tmp_path / "wrong-path.yaml"
    path.write_text(WRONG_PATH)
    r = await run(replace(CELERY, topology=str(path)), vhost_url, f"{unique}.", HEALTHY)
    assert r.report, "check() passed on a topology that saw no publish"
    # Each queue delivered the orders, and no message was seen reaching any of them.
    wanted = {("order-shipped", "unrouted", None, step, None) for step in STEPS}
    if r.ids() != wanted:
        raise Misjudged(f"findings {sorted(r.ids(), key=str)}, expected {wanted}\n{r.report}")
    if "deliver" not in r.report:
        raise Misjudged(f"the report does not say deliveries came without routes:\n{r.report}")


@pytest.fixture(scope="module")
def dark_url(rabbitmq_url: str) -> Iterator[str]:
    """A virtual host of this module's own with the firehose off (as it is by default)."""
    vhost = unique_prefix("frameworks-dark")
    rabbitmqctl("add_vhost", vhost)
    try:
        user = urlsplit(rabbitmq_url).username or "guest"
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield urlunsplit(urlsplit(rabbitmq_url)._replace(path=f"/{vhost}"))
    finally:
        rabbitmqctl("delete_vhost", vhost)


async def test_without_the_firehose_the_check_says_it_is_needed(dark_url: str, unique: str) -> None:
    r = await run(DRAMATIQ, dark_url, f"{unique}.", HEALTHY)
    assert r.report, "check() passed without seeing anything"
    if "firehose" not in r.report:
        raise Misjudged(f"the report does not name the firehose:\n{r.report}")


def test_flowcheck_imports_no_framework() -> None:
    """The frameworks are the examples' business: flowcheck's own modules never import them."""
    pattern = re.compile(r"^\s*(?:from|import)\s+(celery|dramatiq|faststream|kombu|pika)\b", re.M)
    found = [
        f"{path.relative_to(ROOT)}: {m.group(1)}"
        for path in sorted((ROOT / "flowcheck").rglob("*.py"))
        for m in pattern.finditer(path.read_text())
    ]
    assert found == []


@pytest.mark.parametrize("module", ["celery_chain", "dramatiq_pipeline"])
def test_the_example_runs_from_the_command_line(
    module: str, rabbitmq_url: str, unique: str
) -> None:
    """``python -m examples.<module>``, as docs/recipes.md runs it next to ``flowcheck record``."""
    cmd = [sys.executable, "-m", f"examples.{module}", "--prefix", f"{unique}."]
    cmd += ["--url", rabbitmq_url, "--orders", "2", "--fault", "duplicate=o-1", "--remove"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    end = "shipped" if module == "celery_chain" else "stored"
    assert lines[:4] == [
        f"o-0: {end} (1 attempt(s) at {RETRYING[module]})",
        f"o-1: {end}, {end} ({2 if module == 'dramatiq_pipeline' else 1} attempt(s) at "
        f"{RETRYING[module]})",
        f"f-0: {end} (2 attempt(s) at {RETRYING[module]})",
        f"p-0: dead (3 attempt(s) at {RETRYING[module]})",
    ]
    assert lines[4].endswith(": 1"), lines[4]  # the poison order's dead letter


RETRYING = {"celery_chain": "charge", "dramatiq_pipeline": "store"}

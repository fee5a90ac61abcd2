"""The fault suite: each fault (kit.FAULTS) during `record`, during `run` and under the
pytest plugin, on the real brokers.

Every cell injects its fault while chains are in flight, then asserts the gap (a
record naming the broker and the channels its tap did not watch), that no chain the
system delivered is called lost (a chain the gap hid is unknown), the documented exit
code, and that nothing printed a traceback.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio

from flowcheck.brokers import adapter
from flowcheck.topology import loads

from .kit import (
    BEFORE,
    CHAINS,
    FLOW,
    WITHIN,
    Cell,
    Fault,
    aim,
    complete,
    gap_closed,
    gaps,
    judge,
    no_traceback,
    reached,
    seen,
    strike,
    until,
)

FLOWCHECK = [sys.executable, "-m", "flowcheck"]
NOTICED_WITHIN = 5_000_000_000  # ns


def start(args: list[Any], log: Path, **options: Any) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, **options
        )


async def finish(proc: subprocess.Popen[bytes], within: float = WITHIN) -> int:
    """Its exit code (negative: the signal that ended it); killed past ``within``."""
    try:
        with anyio.fail_after(within):
            return await anyio.to_thread.run_sync(proc.wait)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check(topology: Path, trace: Path, out: Path, *flags: str) -> tuple[int, str, dict[str, Any]]:
    """`flowcheck check`: exit code, output, verdict."""
    done = subprocess.run(
        [*FLOWCHECK, "check", str(topology), str(trace), "--report-dir", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=WITHIN,
    )
    verdict = json.loads((out / "verdict.json").read_text())
    return done.returncode, done.stdout + done.stderr, verdict


def assert_gap(fault: Fault, trace: Path, verdict: dict[str, Any], window: tuple[int, int]) -> None:
    """A broker fault left gap records naming the broker and saying why, on the channels
    whose taps it blinded (``a`` always had records; a Kafka topic still empty when its
    broker died has no log to lose), covering the time of the fault; the verdict lists
    them. A signal leaves none: the trace just ends."""
    found = gaps(trace)
    if fault.kills:
        assert found == []
        return
    assert "a" in {g.channel for g in found} <= {"a", "b"}, found
    assert {g.broker for g in found} == {"x"}
    assert all(g.reason for g in found)
    # A tap notices a lost connection a moment after it is lost.
    began, ended = window[0], window[1] + NOTICED_WITHIN
    assert any(g.mono_ns <= ended and (g.until_ns or ended) >= began for g in found), found
    assert len(verdict["gaps"]) == len(found)


def expected_exit(fault: Fault, verdict: dict[str, Any], ended: bool) -> int:
    """docs/running.md: chains a gap hid make exit 3; chains still open when the
    recording ended (with or without an end record) are unjudged: exit 1; anything
    else here passed."""
    _, _, unknown = judge(verdict)
    if not unknown:
        return 0
    return 1 if fault.kills else 3


def write(cell: Cell, tmp_path: Path) -> Path:
    topology = tmp_path / "topology.yaml"
    topology.write_text(cell.topology())
    return topology


# --------------------------------------------------------------------------- record


async def test_record(fault: Fault, cell: Cell, tmp_path: Path) -> None:
    topology = write(cell, tmp_path)
    trace, ready, log = tmp_path / "trace.jsonl", tmp_path / "ready.json", tmp_path / "record.log"
    args = [*FLOWCHECK, "record", topology, "--out", trace, "--apply", "--ready-file", ready]
    if fault.kills:  # stop at the signal: no drain, so the chain in flight stays open
        args.append("--no-drain")
    proc = start(args, log)
    try:
        await until("the recorder's ready file", ready.exists)
        fire = await aim(fault, cell, proc.pid)
        async with adapter("x", loads(cell.topology())) as ad:

            async def chain(n: int | str) -> None:
                for channel, routing in cell.steps():
                    body = json.dumps({"id": f"c{n}"}).encode()
                    await ad.publish(channel, body, routing_key=routing)

            for n in range(BEFORE):
                await chain(n)
            await until(f"{BEFORE} chains recorded", lambda: complete(trace, BEFORE))
            if fault.kills:  # a chain in flight when the recorder dies
                await ad.publish("a", b'{"id": "c-open"}')
                await until("the open chain recorded", lambda: seen(trace, "a", BEFORE + 1))
            window = await strike(fire)
            for n in range(BEFORE, CHAINS):  # while the fault lasts
                await chain(n)
            if not fault.kills:
                await until("the tap watching again", lambda: gap_closed(trace))
                await chain("-after")  # seen whole once the tap is back
                await until("the chain after the gap", lambda: reached(trace, "c-after"))
                proc.send_signal(signal.SIGTERM)
        rc = await finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    said = log.read_text()
    no_traceback(said)
    assert rc == (-signal.SIGKILL if fault.signal == signal.SIGKILL else 0), said
    ended = _ended(trace)
    assert ended == (fault.signal != signal.SIGKILL)

    code, out, verdict = check(topology, trace, tmp_path / "reports")
    no_traceback(out)
    assert_gap(fault, trace, verdict, window)
    succeeded, _, unknown = judge(verdict)
    assert succeeded >= BEFORE
    assert code == expected_exit(fault, verdict, ended), out
    if fault.kills:
        assert unknown >= 1  # c-open: not lost, whatever the end
    if not ended:
        assert "has no end record" in out
        assert check(topology, trace, tmp_path / "allowed", "--allow-unjudged")[0] == 0


def _ended(trace: Path) -> bool:
    last = trace.read_text().rstrip("\n").rsplit("\n", 1)[-1]
    return "ended" in json.loads(last)


# --------------------------------------------------------------------------- run


async def test_run(fault: Fault, cell: Cell, tmp_path: Path) -> None:
    topology = write(cell, tmp_path)
    scenario, reports, log = tmp_path / "scenario.yaml", tmp_path / "run", tmp_path / "run.log"
    scenario.write_text(cell.scenario())
    proc = start(
        [*FLOWCHECK, "run", topology, "--scenario", scenario, "--report-dir", reports], log
    )
    try:
        await until("the run's taps", lambda: "taps ready" in log.read_text())
        trace = next(reports.glob("trace-*.jsonl"))
        fire = await aim(fault, cell, proc.pid)
        await until(f"{fault.lead} messages seen", lambda: seen(trace, "a", fault.lead))
        window = await strike(fire)
        assert fault.kills or proc.poll() is None, "the run ended before the fault: too few chains"
        rc = await finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    said = log.read_text()
    no_traceback(said)
    ended = _ended(trace)
    code, out, verdict = check(topology, trace, tmp_path / "reports")
    no_traceback(out)
    assert_gap(fault, trace, verdict, window)
    succeeded, _, unknown = judge(verdict)
    if fault.kills:  # no verdict of the run's own: the trace is checked
        assert rc == (143 if fault.signal == signal.SIGTERM else -signal.SIGKILL), said
        assert not (reports / "verdict.json").exists()
        assert ended == (fault.signal == signal.SIGTERM)
        assert code == expected_exit(fault, verdict, ended), out
        return
    # The run's verdict is the offline check's, exit code included (docs/running.md).
    assert rc == code == expected_exit(fault, verdict, ended), said + out
    mine = json.loads((reports / "verdict.json").read_text())
    assert judge(mine) == (succeeded, 0, unknown)
    assert succeeded + unknown == cell.count  # every chain published is seen, whole or hidden


# --------------------------------------------------------------------------- pytest plugin

INNER = """
import asyncio
import shutil
from pathlib import Path

import pytest

from flowcheck.testing import FlowSession

HERE = Path(__file__).parent
STEPS = {steps!r}


async def test_through_a_fault(flowcheck: FlowSession) -> None:
    async def chain(n: object) -> None:
        for channel, routing in STEPS:
            await flowcheck.publish(channel, {{"id": f"c{{n}}"}}, routing_key=routing)

    for n in range({before}):
        await chain(n)
    await flowcheck.chain("{flow}", "c{last}").completes()
    {open_one}
    flowcheck.flush_trace()  # what a kill may take is the last second not yet written
    (HERE / "ready").write_text("")
    for _ in range(int({within} / 0.05)):  # the fault comes from outside
        if (HERE / "struck").exists():
            break
        await asyncio.sleep(0.05)
    for n in range({before}, {chains}):
        await chain(n)
    await chain("-after")
    await flowcheck.chain("{flow}", "c-after").completes()
    flowcheck.flush_trace()
    shutil.copy(flowcheck.trace, HERE / "trace.jsonl")
    await flowcheck.check()
"""


async def test_plugin(fault: Fault, cell: Cell, tmp_path: Path) -> None:
    write(cell, tmp_path)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "flowcheck_topology = topology.yaml\n"
    )
    (tmp_path / "test_inner.py").write_text(
        INNER.format(
            steps=cell.steps(),
            before=BEFORE,
            last=BEFORE - 1,
            chains=CHAINS,
            flow=FLOW,
            within=WITHIN,
            open_one='await flowcheck.publish("a", {"id": "c-open"})  # in flight at the kill'
            if fault.kills
            else "",
        )
    )
    traces, log = tmp_path / "traces", tmp_path / "pytest.log"
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"]
    proc = start([*args, f"--flowcheck-trace-dir={traces}"], log, cwd=tmp_path)
    try:
        await until("the inner test's chains", (tmp_path / "ready").exists)
        window = await strike(await aim(fault, cell, proc.pid))
        (tmp_path / "struck").write_text("")
        rc = await finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    said = log.read_text()
    no_traceback(said)
    if fault.kills:  # the test dies with its process; the trace it was writing is kept
        assert rc == -(fault.signal or 0), said
        (trace,) = traces.iterdir()
    else:  # the test passes: its chains complete, its check holds
        assert rc == 0, said
        assert "1 passed" in said
        trace = tmp_path / "trace.jsonl"  # its copy: a passing test's trace is deleted
    code, out, verdict = check(tmp_path / "topology.yaml", trace, tmp_path / "reports")
    no_traceback(out)
    assert_gap(fault, trace, verdict, window)
    succeeded, _, unknown = judge(verdict)
    assert succeeded >= BEFORE
    assert unknown >= fault.kills
    assert code == expected_exit(fault, verdict, _ended(trace)), out

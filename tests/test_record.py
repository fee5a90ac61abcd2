"""`flowcheck record` and `flowcheck inspect` against the real brokers."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import pytest
from anyio.streams.text import TextReceiveStream
from click.testing import CliRunner, Result
from harness import forwarder
from pamqp.common import Arguments
from redis.asyncio import Redis

from flowcheck.checker import Finding, FindingKind, FlowVerdict, Unjudged, Verdict
from flowcheck.cli import _Echo, cli
from flowcheck.gate import only_unjudged
from flowcheck.observations import Kind, Observation
from flowcheck.recorder import record
from flowcheck.topology import loads
from flowcheck.trace import Header, Reader, Writer, topology_hash

FLOWCHECK = [sys.executable, "-m", "flowcheck"]


def _topology(prefix: str, rabbit: str, redis: str) -> str:
    return f"""
name: {prefix}
brokers:
  r: {{kind: rabbitmq, url: "{rabbit}"}}
  rd: {{kind: redis, url: "{redis}"}}
channels:
  orders: {{broker: r, kind: exchange, type: topic, name: {prefix}.orders}}
  billing:
    broker: r
    kind: queue
    name: {prefix}.billing
    bindings: [{{exchange: orders, key: order.*}}]
  ship: {{broker: rd, kind: stream, name: {prefix}.ship}}
flows:
  order:
    correlate: $.order_id
    steps: [orders, billing, ship]
"""


@pytest.fixture
def topology_file(tmp_path: Path, unique: str, rabbitmq_url: str, redis_url: str) -> Path:
    path = tmp_path / "topology.yaml"
    path.write_text(_topology(unique, rabbitmq_url, redis_url))
    return path


async def _cleanup(text: str) -> None:
    from flowcheck.brokers import adapter

    top = loads(text)
    for name in ("r", "rd"):
        async with adapter(name, top) as ad:
            await ad.delete([k for k, ch in top.channels.items() if ch.broker == name])


async def test_record_then_inspect(
    tmp_path: Path, topology_file: Path, unique: str, rabbitmq_url: str
) -> None:
    text = topology_file.read_text()  # noqa: ASYNC240 - a small local file
    top = loads(text)
    out = tmp_path / "trace.jsonl"
    stop = anyio.Event()
    ready = anyio.Event()
    enough = anyio.Event()
    counts: Counter[str] = Counter()

    def tick(seen: Counter[str]) -> None:
        ready.set()
        if seen["orders"] >= 3 and seen["billing"] >= 3:
            enough.set()

    try:
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                counts.update(
                    await record(
                        top,
                        str(out),
                        topology_path=str(topology_file),
                        apply=True,
                        on_tick=tick,
                        stop=stop,
                        drain=0,  # it waits for its observations itself
                    )
                )

            tg.start_soon(run)
            with anyio.fail_after(30):
                await ready.wait()
            conn = await aio_pika.connect(rabbitmq_url)
            async with conn:
                ch = await conn.channel()
                ex = await ch.get_exchange(f"{unique}.orders")
                for i in range(3):
                    await ex.publish(
                        aio_pika.Message(json.dumps({"order_id": f"o{i}"}).encode()),
                        routing_key="order.placed",
                    )
            with anyio.fail_after(30):
                await enough.wait()
            stop.set()
    finally:
        await _cleanup(text)
    assert counts["orders"] == 3
    assert counts["billing"] == 3

    reader = Reader(str(out))
    assert reader.header.topology == unique
    assert reader.header.topology_sha256 is not None
    assert len(list(reader)) == 6
    assert reader.problems == []

    result = CliRunner().invoke(cli, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    for i in range(3):
        assert f"order key o{i}" in result.output
    assert result.output.count("routed") == 6

    result = CliRunner().invoke(cli, ["inspect", str(out), "--key", "o1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["chains_total"] == 1
    chain = data["chains"][0]
    assert (chain["flow"], chain["key"]) == ("order", "o1")
    # Both copies of one publish: the taps may see them in either order.
    assert sorted(o["channel"] for o in chain["observations"]) == ["billing", "orders"]

    result = CliRunner().invoke(cli, ["inspect", str(out), "--channel", "billing", "--json"])
    assert {
        o["channel"] for c in json.loads(result.output)["chains"] for o in c["observations"]
    } == {"billing"}


def test_record_stops_cleanly_on_ctrl_c(tmp_path: Path, topology_file: Path) -> None:
    out = tmp_path / "trace.jsonl"
    proc = subprocess.Popen(
        [*FLOWCHECK, "record", str(topology_file), "--out", str(out), "--apply"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The recorder says so on stderr once every tap is watching.
        assert proc.stderr is not None
        readable, _, _ = select.select([proc.stderr], [], [], 30)
        assert readable, "recorder did not start within 30s"
        assert "recording 3 channels" in proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        anyio.run(_cleanup, topology_file.read_text())
    assert proc.returncode == 0, stderr
    assert "observations written" in stdout
    assert "Traceback" not in stderr
    assert Reader(str(out)).header.topology is not None


def test_record_usage_errors(tmp_path: Path, topology_file: Path) -> None:
    runner = CliRunner()
    existing = tmp_path / "exists.jsonl"
    existing.write_text("x")
    result = runner.invoke(cli, ["record", str(topology_file), "--out", str(existing)])
    assert result.exit_code == 2
    assert "never overwritten" in result.output

    broken = tmp_path / "broken.yaml"
    broken.write_text("brokers: {}\n")
    result = runner.invoke(cli, ["record", str(broken), "--out", str(tmp_path / "t.jsonl")])
    assert result.exit_code == 2
    assert "not a valid topology" in result.output

    result = runner.invoke(
        cli,
        ["record", str(topology_file), "--out", str(tmp_path / "t.jsonl"), "--duration", "soon"],
    )
    assert result.exit_code == 2
    assert "not a duration" in result.output


def test_record_out_that_cannot_be_created(tmp_path: Path, topology_file: Path) -> None:
    runner = CliRunner()
    missing = tmp_path / "missing" / "t.jsonl"
    result = runner.invoke(cli, ["record", str(topology_file), "--out", str(missing)])
    assert result.exit_code == 2, result.output
    assert f"cannot create {missing}: no directory {missing.parent}" in result.output

    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "elsewhere.jsonl")
    result = runner.invoke(cli, ["record", str(topology_file), "--out", str(dangling)])
    assert result.exit_code == 2, result.output
    assert "never overwritten" in result.output
    assert not (tmp_path / "elsewhere.jsonl").exists()


def test_record_unreachable_broker_exits_3(tmp_path: Path, unique: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        f"""
brokers: {{r: {{kind: rabbitmq, url: "amqp://guest:s3cret@127.0.0.1:1/"}}}}
channels: {{q: {{broker: r, kind: queue, name: {unique}.q}}}}
"""
    )
    out = tmp_path / "t.jsonl"
    result = CliRunner().invoke(cli, ["record", str(path), "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert "cannot reach RabbitMQ" in result.output
    assert "s3cret" not in result.output
    # Nothing was recorded: no header-only file to refuse the retry with "already exists".
    assert not out.exists()


def test_record_ctrl_c_while_connecting_stops_at_once(tmp_path: Path, unique: str) -> None:
    # A broker that accepts the connection and never answers: connecting hangs.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        path = tmp_path / "t.yaml"
        path.write_text(
            f"""
brokers: {{r: {{kind: rabbitmq, url: "amqp://guest:guest@127.0.0.1:{port}/"}}}}
channels: {{q: {{broker: r, kind: queue, name: {unique}.q}}}}
"""
        )
        out = tmp_path / "t.jsonl"
        proc = subprocess.Popen(
            [*FLOWCHECK, "record", str(path), "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            silent.settimeout(30)
            conn, _ = silent.accept()  # the recorder is connecting now
            with conn:
                proc.send_signal(signal.SIGINT)
                stdout, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    # Not "cannot reach RabbitMQ" after the client's own connect timeout.
    assert proc.returncode == 0, stderr
    assert "nothing recorded" in stdout
    assert "Traceback" not in stderr
    assert not out.exists()


def test_inspect_damaged_and_foreign_files(tmp_path: Path) -> None:
    runner = CliRunner()
    foreign = tmp_path / "x.jsonl"
    foreign.write_text('{"a": 1}\n')
    result = runner.invoke(cli, ["inspect", str(foreign)])
    assert result.exit_code == 2
    assert "not a flowcheck trace" in result.output
    result = runner.invoke(cli, ["inspect", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2
    assert "no such trace file" in result.output


def test_main_module_runs() -> None:
    proc = subprocess.run(
        [*FLOWCHECK, "--version"], capture_output=True, text=True, check=False, env={**os.environ}
    )
    assert proc.returncode == 0
    assert "flowcheck" in proc.stdout


def test_run_report_dir_that_cannot_be_created(tmp_path: Path, topology_file: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file, not a directory")
    result = CliRunner().invoke(cli, ["run", str(topology_file), "--report-dir", str(taken)])
    assert result.exit_code == 2, result.output
    assert f"cannot create the report directory {taken}: File exists" in result.output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_run_interrupted_gives_no_verdict_and_keeps_the_trace(
    tmp_path: Path, topology_file: Path, signum: signal.Signals
) -> None:
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("send: [{flow: order, routing_key: order.placed}]\n")  # 'ship' never comes
    reports = tmp_path / "reports"
    args = ["run", str(topology_file), "--scenario", str(scenario), "--report-dir", str(reports)]
    proc = subprocess.Popen(
        [*FLOWCHECK, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        while not any("published; waiting" in line for line in lines):
            readable, _, _ = select.select([proc.stderr], [], [], 30)
            assert readable, f"run did not publish within 30s: {lines}"
            lines.append(proc.stderr.readline())
            assert lines[-1], f"run ended early: {lines}"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=30)  # not the flow's 1m window
    finally:
        if proc.poll() is None:
            proc.kill()
        anyio.run(_cleanup, topology_file.read_text())
    assert proc.returncode == 128 + signum, stdout + stderr
    assert f"interrupted by {signum.name}: no verdict" in stderr
    assert "Traceback" not in stderr
    assert not (reports / "verdict.json").exists()  # undecided chains are not reported lost
    (trace,) = reports.glob("trace-*.jsonl")
    reader = Reader(str(trace))
    assert [o.kind.value for o in reader if o.channel == "orders"].count("published") == 1
    assert reader.problems == []
    # Its end record says how it ended, so `check` of it does not take it for a crash.
    assert reader.end is not None
    assert reader.end.ended == ("interrupted" if signum == signal.SIGINT else "stopped")


def test_check_refuses_a_trace_of_another_topology(tmp_path: Path) -> None:
    def topology(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"""
name: {name}
brokers: {{r: {{kind: rabbitmq}}}}
channels: {{q: {{broker: r, kind: queue}}}}
flows: {{f: {{correlate: $.id, steps: [q]}}}}
"""
        )
        return path

    recorded = topology("recorded")
    trace = tmp_path / "t.jsonl"
    header = Header(
        topology="recorded",
        topology_sha256=topology_hash(str(recorded)),
        started=0.0,
        started_mono_ns=0,
    )
    with Writer(str(trace), header):
        pass
    runner = CliRunner()
    # The trace holds no chain: allowed to judge nothing, so the exit code is the match's.
    result = runner.invoke(cli, ["check", str(recorded), str(trace), "--allow-unjudged"])
    assert result.exit_code == 0, result.output
    assert "different version" not in result.output

    recorded.write_text(recorded.read_text() + "# edited\n")
    result = runner.invoke(cli, ["check", str(recorded), str(trace), "--allow-unjudged"])
    assert result.exit_code == 0, result.output
    assert "recorded with a different version of" in result.output

    result = runner.invoke(cli, ["check", str(topology("other")), str(trace)])
    assert result.exit_code == 2, result.output
    assert "was recorded from topology 'recorded', not" in result.output
    assert "PASS" not in result.output


@dataclass
class Checked:
    result: Result
    verdict: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return self.result.exit_code

    @property
    def output(self) -> str:
        return self.result.output

    @property
    def passed(self) -> bool:
        return bool(self.verdict["passed"])


def test_check_warns_when_it_decided_no_chain(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        """
brokers: {r: {kind: rabbitmq}}
channels:
  a: {broker: r, kind: queue}
  b: {broker: r, kind: queue}
flows: {f: {correlate: $.id, steps: [a, b], deadline: 1s}}
"""
    )
    runner = CliRunner()

    def check(*at_s: float, allow: bool = False) -> Checked:
        trace = tmp_path / f"t{len(at_s)}{allow}.jsonl"
        with Writer(str(trace), Header(started=0.0, started_mono_ns=0)) as writer:
            end = max(at_s, default=0.0)
            for i, at in enumerate(at_s):
                writer.write(
                    Observation(
                        kind=Kind.ROUTED,
                        broker="r",
                        channel="a" if i % 2 == 0 else "b",
                        mono_ns=int(at * 1e9),
                        wall=at,
                        keys={"f": f"k{i // 2}"},
                    )
                )
            writer.end("stopped", int(end * 1e9), end)  # stopped at the last observation
        reports = tmp_path / trace.stem
        args = ["check", str(path), str(trace), "--report-dir", str(reports)]
        result = runner.invoke(cli, args + ["--allow-unjudged"] * allow)
        return Checked(result, json.loads((reports / "verdict.json").read_text()))

    none = check()
    # A verdict that judged nothing fails the gate, and says why.
    assert none.exit_code == 1, none.output
    assert "no chain was decided: 0 seen, 0 unknown" in none.output
    # Seen at a, the recording ends before the second could reach b: unknown.
    unknown = check(0.5)
    assert unknown.exit_code == 1, unknown.output
    assert "no chain was decided: 1 seen, 1 unknown" in unknown.output
    decided = check(0.5, 0.6)  # one chain completed: something was judged
    assert decided.exit_code == 0, decided.output
    assert "no chain was decided" not in decided.output
    # One more still open at the end: unjudged, not passed in silence.
    cut = check(0.5, 0.6, 0.7)
    assert cut.exit_code == 1, cut.output
    assert "no chain was decided" not in cut.output
    (u,) = cut.verdict["unjudged"]
    assert (u["expectation"], u["chains"]) == ("the chains still open when the recording ended", 1)
    # Allowed explicitly, it passes, and still says that it judged nothing.
    allowed = check(0.5, allow=True)
    assert allowed.exit_code == 0, allowed.output
    assert allowed.verdict["allow_unjudged"] is True
    assert "no chain was decided: 1 chain seen, all unknown" in allowed.output


def test_a_verdict_red_only_for_unjudged_expectations_says_so() -> None:
    unjudged = Unjudged(flow="f", expectation="retry max_attempts 3 at 'a'", why="firehose off")
    flow = FlowVerdict(
        flow="f",
        passed=False,
        chains=1,
        succeeded=1,
        failed=0,
        unknown=0,
        dead_lettered=0,
        checks=[],
        latency=[],
        findings=[],
        unjudged=[unjudged, unjudged],
    )
    verdict = Verdict(passed=False, observations=2, flows=[flow])
    assert only_unjudged(verdict) == (
        "flowcheck: not green only because 2 declared expectations went unjudged (first: "
        "flow 'f': retry max_attempts 3 at 'a': firehose off); --allow-unjudged lets such "
        "a verdict pass"
    )
    assert only_unjudged(verdict.model_copy(update={"passed": True})) is None  # allowed
    lost = Finding(kind=FindingKind.LOST, flow="f", key="k", message="lost")
    red = flow.model_copy(update={"findings": [lost], "findings_total": {"lost": 1}})
    assert only_unjudged(verdict.model_copy(update={"flows": [red]})) is None


def test_inspect_refuses_filters_that_drop_chains_silently(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    with Writer(str(trace), Header(started=0.0, started_mono_ns=0, topology="t")) as writer:
        for i in range(3):
            writer.write(
                Observation(
                    kind=Kind.ROUTED,
                    broker="r",
                    channel="q",
                    mono_ns=(i + 1) * 1_000_000_000,
                    wall=1.0,
                    keys={"f": f"k{i}"},
                )
            )
    runner = CliRunner()
    result = runner.invoke(cli, ["inspect", str(trace), "--limit", "-1"])
    assert result.exit_code == 2, result.output  # it printed all chains but the last
    assert "--limit" in result.output

    result = runner.invoke(cli, ["inspect", str(trace), "--since", "3s", "--until", "1s"])
    assert result.exit_code == 2, result.output
    assert "--since 3s is after --until 1s" in result.output

    result = runner.invoke(cli, ["inspect", str(trace), "--since", "2s", "--until", "2s"])
    assert result.exit_code == 0, result.output
    assert "f key k1" in result.output
    assert "k0" not in result.output
    assert "k2" not in result.output


def test_inspect_says_why_nothing_matched(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    with Writer(str(trace), Header(started=0.0, started_mono_ns=0, topology="t")) as writer:
        writer.write(
            Observation(
                kind=Kind.ROUTED, broker="r", channel="q", mono_ns=1, wall=1.0, keys={"f": "k0"}
            )
        )
    runner = CliRunner()
    for args, why in [
        (["--flow", "order"], "no chain: the trace has no flow 'order'; it has 'f'"),
        (["--channel", "billing"], "no chain: the trace has no channel 'billing'; it has 'q'"),
        (["--key", "k9"], "no chain matches these filters"),
    ]:
        result = runner.invoke(cli, ["inspect", str(trace), *args])
        assert result.exit_code == 0, result.output
        assert result.output == f"flowcheck: no chain: {why}\n".replace(
            "no chain: no chain", "no chain"
        )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "is a directory, not a scenario file"),
        ("", "this file is empty; a scenario needs at least 'send'"),
        ("# nothing yet\n", "this file holds only comments; a scenario needs 'send'"),
        ("---\n", "this file holds an empty document; a scenario needs 'send'"),
    ],
)
def test_run_names_a_bad_scenario_as_a_scenario(
    tmp_path: Path, topology_file: Path, content: str | None, expected: str
) -> None:
    scenario = tmp_path / "scenario.yaml"
    if content is None:
        scenario.mkdir()
    else:
        scenario.write_text(content)
    result = CliRunner().invoke(cli, ["run", str(topology_file), "--scenario", str(scenario)])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "topology" not in result.output


def test_record_unreachable_redis_hides_a_password_in_the_query(
    tmp_path: Path, unique: str
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        f"""
brokers: {{rd: {{kind: redis, url: "redis://127.0.0.1:1/0?password=s3cret"}}}}
channels: {{s: {{broker: rd, kind: stream, name: {unique}.s}}}}
"""
    )
    result = CliRunner().invoke(cli, ["record", str(path), "--out", str(tmp_path / "t.jsonl")])
    assert result.exit_code == 3, result.output
    assert "cannot reach Redis at redis://127.0.0.1:1/0?password=***" in result.output
    assert "s3cret" not in result.output


async def test_record_says_when_a_tap_goes_down_and_records_the_gap(
    tmp_path: Path, unique: str, redis_url: str, redis: Redis
) -> None:
    out = tmp_path / "trace.jsonl"
    path = tmp_path / "topology.yaml"
    async with forwarder(redis_url, 6379) as (through, cut):
        path.write_text(
            f'brokers: {{rd: {{kind: redis, url: "{through}"}}}}\n'
            f"channels: {{ship: {{broker: rd, kind: stream, name: {unique}.ship}}}}\n"
        )
        cmd = [*FLOWCHECK, "record", str(path), "--out", str(out), "--apply"]
        async with await anyio.open_process(cmd) as proc:
            assert proc.stderr is not None
            said: list[str] = []

            async def wait_for(text: str) -> None:
                with anyio.fail_after(30):
                    async for line in TextReceiveStream(proc.stderr):  # type: ignore[arg-type]
                        said.extend(line.splitlines())
                        if text in line:
                            return

            await wait_for("recording 1 channel")
            await cut()
            await wait_for("rd: tap down, recording a gap: ")
            proc.send_signal(signal.SIGINT)
            with anyio.fail_after(30):
                rc = await proc.wait()
            assert proc.stderr is not None
            async for rest in TextReceiveStream(proc.stderr):
                said.extend(rest.splitlines())
            assert proc.stdout is not None
            written = "".join([text async for text in TextReceiveStream(proc.stdout)])
    assert rc == 0, "\n".join(said)
    # The gap record is no observation: the counts say it apart.
    assert f"0 observations written to {out}, and 1 tap gap" in written, written
    assert "Traceback" not in "\n".join(said)
    # The client library's own lines (reconnects every few tenths) are said once each.
    library = [line for line in said if line.startswith("flowcheck: redis")]
    assert len(library) == len(set(library))
    [gap] = [o for o in Reader(str(out)) if o.kind is Kind.GAP]
    assert (gap.channel, gap.until_ns) == ("ship", None)
    assert gap.reason is not None
    assert gap.reason.startswith("rd: cannot reach Redis at redis://127.0.0.1:")  # why it lasted


def test_client_library_warnings_are_one_masked_line_once_a_minute(
    capsys: pytest.CaptureFixture[str],
) -> None:
    echo = _Echo()
    log = logging.getLogger("aiormq.connection")

    def lost(url: str) -> logging.LogRecord:
        return log.makeRecord(log.name, logging.WARNING, __file__, 1, "lost %s", (url,), None)

    for _ in range(3):  # a broker that stays down: the same line every reconnect
        echo.handle(lost("amqp://guest:pw@h/"))
    echo.handle(log.makeRecord(log.name, logging.WARNING, __file__, 1, "other", (), None))
    assert capsys.readouterr().err.splitlines() == [
        "flowcheck: aiormq.connection: lost amqp://guest:***@h/",
        "flowcheck: aiormq.connection: other",
    ]


def test_ctrl_c_is_exit_130_not_a_failed_check(tmp_path: Path) -> None:
    fifo = tmp_path / "trace.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [*FLOWCHECK, "inspect", str(fifo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Opening the writing end returns once inspect has opened the file: it now waits
        # for a header that never comes, with its Ctrl-C handling in place.
        with open(fifo, "w"):
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "flowcheck: interrupted"  # below the ^C the terminal echoed
    assert stdout == ""


def test_record_taps_only_the_brokers_named(tmp_path: Path, unique: str, redis_url: str) -> None:
    # RabbitMQ is unreachable here: only a recording that leaves it alone can succeed.
    path = tmp_path / "topology.yaml"
    path.write_text(_topology(unique, "amqp://guest:guest@127.0.0.1:1/", redis_url))
    out = tmp_path / "trace.jsonl"
    runner = CliRunner()
    args = ["record", str(path), "--out", str(out), "--duration", "100ms", "--apply"]
    try:
        result = runner.invoke(cli, [*args, "--broker", "rd"])
    finally:
        anyio.run(_delete_stream, redis_url, f"{unique}.ship")
    assert result.exit_code == 0, result.output
    assert "recording 1 channel" in result.output
    assert Reader(str(out)).header.topology == unique

    result = runner.invoke(cli, [*args, "--broker", "nosuch"])
    assert result.exit_code == 2, result.output
    assert "no broker 'nosuch' in" in result.output
    assert "it has 'r', 'rd'" in result.output


async def _delete_stream(url: str, key: str) -> None:
    client = Redis.from_url(url)
    try:
        await client.delete(key)
    finally:
        await client.aclose()


async def test_run_does_not_pass_chains_a_tap_gap_hid(
    tmp_path: Path, unique: str, redis_url: str, redis: Redis
) -> None:
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text('send: [{flow: order, count: 2, payload: {order_id: "{key}"}}]\n')
    path = tmp_path / "topology.yaml"
    async with forwarder(redis_url, 6379) as (through, cut):
        path.write_text(
            f'brokers: {{rd: {{kind: redis, url: "{through}"}}}}\n'
            "channels:\n"
            f"  orders: {{broker: rd, kind: stream, name: {unique}.orders}}\n"
            f"  shipped: {{broker: rd, kind: stream, name: {unique}.shipped}}\n"
            "flows: {order: {correlate: $.order_id, steps: [orders, shipped], deadline: 1s}}\n"
        )
        cmd = [*FLOWCHECK, "run", str(path), "--scenario", str(scenario)]
        cmd += ["--report-dir", str(tmp_path / "reports")]
        async with await anyio.open_process(cmd) as proc:
            assert proc.stderr is not None
            said: list[str] = []
            with anyio.fail_after(60):
                async for text in TextReceiveStream(proc.stderr):
                    said.extend(text.splitlines())
                    if "published; waiting" in text:
                        break
                await cut()  # nothing ships the orders, but the taps no longer see that
                rc = await proc.wait()
            async for text in TextReceiveStream(proc.stderr):
                said.extend(text.splitlines())
    assert rc == 3, "\n".join(said)
    assert said[-1] == (
        "flowcheck: 2 chains unknown: a tap was not watching (2 gaps); "
        "the gate cannot pass what it did not see (--allow-unjudged lets it)"
    )


async def _declare_by_hand(url: str, queue: str, arguments: Arguments) -> None:
    """Declare ``queue`` as someone else would; raises if it exists with other arguments."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments=arguments)
    finally:
        await connection.close()


def test_record_apply_refuses_drift_and_fails_to_run(
    tmp_path: Path, topology_file: Path, unique: str, rabbitmq_url: str
) -> None:
    hand: Arguments = {"x-max-length": 7}
    anyio.run(_declare_by_hand, rabbitmq_url, f"{unique}.billing", hand)
    out = tmp_path / "trace.jsonl"
    args = ["record", str(topology_file), "--out", str(out), "--duration", "100ms", "--apply"]
    try:
        result = CliRunner().invoke(cli, args)
        # The queue kept its own arguments: declaring it as the hand did still works.
        anyio.run(_declare_by_hand, rabbitmq_url, f"{unique}.billing", hand)
    finally:
        anyio.run(_cleanup, topology_file.read_text())
    # A failure to run, as an unreachable broker: never a recording that could pass.
    assert result.exit_code == 3, result.output
    (line,) = [x for x in result.output.splitlines() if "drift" in x or "differs" in x]
    assert line.startswith("flowcheck: the broker differs from the topology, nothing recorded: ")
    assert "billing: x-max-length is 7 on the broker, the topology does not set it" in line
    assert "recording" not in result.output
    assert not out.exists()


def test_run_warns_of_drift_before_it_stops_on_an_error(
    tmp_path: Path, topology_file: Path, unique: str, rabbitmq_url: str, redis_url: str
) -> None:
    # The stream's key holds a string: the tap cannot start, and the run stops with
    # exit 3; the drift apply found must still have been said.
    hand: Arguments = {"x-max-length": 7}
    anyio.run(_declare_by_hand, rabbitmq_url, f"{unique}.billing", hand)
    anyio.run(_set_string, redis_url, f"{unique}.ship")
    args = ["run", str(topology_file), "--report-dir", str(tmp_path / "reports")]
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        anyio.run(_cleanup_all, topology_file.read_text(), redis_url, f"{unique}.ship")
    assert result.exit_code == 3, result.output
    assert "flowcheck: warning: drift: billing: x-max-length is 7" in result.output
    assert "flowcheck: warning: drift: ship: type is 'string' on the broker" in result.output
    assert "cannot tap keys that are not streams" in result.output
    assert "Traceback" not in result.output
    # And the trace, kept for `flowcheck check`, opens with them, as record's does.
    (trace,) = (tmp_path / "reports").glob("trace-*.jsonl")
    drift = [o.channel for o in Reader(str(trace)) if o.kind is Kind.DRIFT]
    assert sorted(drift) == ["billing", "ship"]


def test_run_with_drift_judges_but_fails_to_run_and_check_agrees(
    tmp_path: Path, topology_file: Path, unique: str, rabbitmq_url: str
) -> None:
    # billing exists with a length limit the topology does not declare: the run judges
    # its chains, but a verdict on other channels than declared is never a pass (exit 3),
    # and the trace, checked offline, gives the same.
    hand: Arguments = {"x-max-length": 7}
    anyio.run(_declare_by_hand, rabbitmq_url, f"{unique}.billing", hand)
    reports = tmp_path / "reports"
    try:
        result = CliRunner().invoke(cli, ["run", str(topology_file), "--report-dir", str(reports)])
    finally:
        anyio.run(_cleanup, topology_file.read_text())
    assert result.exit_code == 3, result.output
    assert "the broker differs from the topology (billing: x-max-length is 7" in result.output
    assert "Traceback" not in result.output
    verdict = json.loads((reports / "verdict.json").read_text())
    assert verdict["drift"] == [
        "billing: x-max-length is 7 on the broker, the topology does not set it"
    ]
    (trace,) = reports.glob("trace-*.jsonl")
    done, offline = _check(topology_file, trace, tmp_path / "offline")
    assert done.returncode == 3, done.stdout + done.stderr
    assert offline["drift"] == verdict["drift"]


async def _set_string(url: str, key: str) -> None:
    client = Redis.from_url(url)
    try:
        await client.set(key, "not a stream")
    finally:
        await client.aclose()


async def _cleanup_all(text: str, redis_url: str, key: str) -> None:
    await _delete_stream(redis_url, key)  # any type: DEL does not care
    await _cleanup(text)


WINDOW_S = 3.0  # the lossy topology's deadline (1s) plus the checker's grace (2s)


@pytest.fixture
def lossy_file(tmp_path: Path, unique: str, rabbitmq_url: str, redis_url: str) -> Path:
    """The test topology with a 1s deadline; nothing moves an order from billing to ship."""
    path = tmp_path / "lossy.yaml"
    text = _topology(unique, rabbitmq_url, redis_url)
    path.write_text(
        text.replace(
            "steps: [orders, billing, ship]", "steps: [orders, billing, ship]\n    deadline: 1s"
        )
    )
    return path


def _wait_ready(proc: subprocess.Popen[str]) -> list[str]:
    """stderr up to the recorder's stable ready line (read as a script would)."""
    said: list[str] = []
    while "flowcheck: ready: every tap is watching" not in said:
        said += _read_lines(proc, said)
    return said


def _read_lines(proc: subprocess.Popen[str], said: list[str]) -> list[str]:
    """The next whole lines on stderr, read from its file descriptor: a text reader's
    buffer would hold lines that select() then never reports."""
    assert proc.stderr is not None
    fd, data = proc.stderr.fileno(), b""
    while not data.endswith(b"\n"):
        readable, _, _ = select.select([fd], [], [], 30)
        assert readable, f"the recorder said nothing more within 30s: {said}"
        chunk = os.read(fd, 65536)
        assert chunk, f"the recorder ended early: {said}"
        data += chunk
    return data.decode().splitlines()


async def _place(url: str, exchange: str, order_id: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        ex = await channel.get_exchange(exchange)
        await ex.publish(
            aio_pika.Message(json.dumps({"order_id": order_id}).encode()),
            routing_key="order.placed",
        )


def _check(
    topology: Path, trace: Path, reports: Path
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    done = subprocess.run(
        [*FLOWCHECK, "check", str(topology), str(trace), "--report-dir", str(reports)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done, json.loads((reports / "verdict.json").read_text())


@pytest.mark.parametrize(
    ("stop", "ended"),
    [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "stopped"), (None, "duration")],
)
def test_a_loss_near_the_end_of_a_recording_is_lost_not_unknown(
    tmp_path: Path,
    lossy_file: Path,
    unique: str,
    rabbitmq_url: str,
    stop: signal.Signals | None,
    ended: str,
) -> None:
    """As users check a system: record, start it once ready, stop the recorder after the
    flow's deadline, check. The one order placed never leaves billing."""
    out, ready = tmp_path / "trace.jsonl", tmp_path / "ready.json"
    cmd = [*FLOWCHECK, "record", str(lossy_file), "--out", str(out), "--apply"]
    cmd += ["--ready-file", str(ready)] + (["--duration", "6s"] if stop is None else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = _wait_ready(proc)
        # Written before the line is said, whole: a script may wait for either.
        assert json.loads(ready.read_text()) == {"pid": proc.pid, "trace": str(out)}
        placed = time.monotonic_ns()  # one clock for every process of this host
        anyio.run(_place, rabbitmq_url, f"{unique}.orders", f"{unique}-lost")
        if stop is not None:
            # The recorder watches in silence past the chain's deadline and grace.
            time.sleep(max(0.0, placed / 1e9 + WINDOW_S + 1.0 - time.monotonic()))
            proc.send_signal(stop)
        stdout, stderr = proc.communicate(timeout=30)
        assert "observations written to" in stdout
    finally:
        if proc.poll() is None:
            proc.kill()
        anyio.run(_cleanup, lossy_file.read_text())
    assert proc.returncode == 0, "\n".join(said) + stderr
    reader = Reader(str(out))
    first = min(o.mono_ns for o in reader if o.keys)
    assert reader.end is not None
    assert reader.end.ended == ended
    assert reader.end.mono_ns > first + WINDOW_S * 1e9, "stopped too soon for this test"

    done, verdict = _check(lossy_file, out, tmp_path / "reports")
    assert done.returncode == 1, done.stdout + done.stderr
    assert reader.end.stop_mono_ns is not None
    assert verdict["recording"] == {
        "ended": ended,
        "end_ms": pytest.approx((reader.end.mono_ns - reader.header.started_mono_ns) / 1e6),
        "stop_ms": pytest.approx((reader.end.stop_mono_ns - reader.header.started_mono_ns) / 1e6),
        "after_stop": 0,
    }
    (flow,) = verdict["flows"]
    assert (flow["failed"], flow["unknown"]) == (1, 0)
    assert [(f["kind"], f["key"], f["cause"], f["next_step"]) for f in flow["findings"]] == [
        ("lost", f"{unique}-lost", "timed_out", "ship")
    ]
    assert "no end record" not in done.stderr

    # Without its end record (a recorder killed), the end is unknown: so is the chain.
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(out.read_text().splitlines(keepends=True)[:-1]))
    done, verdict = _check(lossy_file, cut, tmp_path / "cut-reports")
    assert verdict["recording"]["ended"] == "unknown"
    (flow,) = verdict["flows"]
    assert (flow["failed"], flow["unknown"]) == (0, 1)
    assert done.returncode == (0 if verdict["passed"] else 1), done.stdout + done.stderr
    assert (
        f"flowcheck: warning: {cut} has no end record (the recorder crashed or was killed): "
        "it is judged to end at its last observation, and chains still inside their "
        "deadline then are unknown"
    ) in done.stderr.splitlines()


def test_record_ready_file_must_be_new_and_placeable(tmp_path: Path, topology_file: Path) -> None:
    runner = CliRunner()
    out = str(tmp_path / "t.jsonl")
    stale = tmp_path / "ready"
    stale.write_text("from an earlier recording")
    result = runner.invoke(
        cli, ["record", str(topology_file), "--out", out, "--ready-file", str(stale)]
    )
    assert result.exit_code == 2, result.output
    assert f"flowcheck: {stale} already exists; remove it first" in result.output
    missing = tmp_path / "missing" / "ready"
    result = runner.invoke(
        cli, ["record", str(topology_file), "--out", out, "--ready-file", str(missing)]
    )
    assert result.exit_code == 2, result.output
    assert f"cannot create {missing}: no directory {missing.parent}" in result.output
    assert not Path(out).exists()


# ---------------------------------------------------------------- stopping: the drain


async def _publish(top_text: str, channel: str, order_id: str) -> None:
    from flowcheck.brokers import adapter

    top = loads(top_text)
    async with adapter(top.channels[channel].broker, top) as ad:
        await ad.publish(
            channel,
            json.dumps({"order_id": order_id}).encode(),
            routing_key="order.placed" if channel == "orders" else None,
        )


Until = Any  # async (condition on the counts) -> None: wait until it holds


async def _record_and_stop(
    topology: Path,
    out: Path,
    *,
    seen: Any,
    then: Any,
    drain: float | None = None,
) -> None:
    """Record ``topology`` and place one order ("before"); once ``seen(counts)`` holds,
    ask the recorder to stop, and once it says it is stopping, ``await then(stop_now,
    until)``; return when the recording has ended."""
    text = topology.read_text()  # noqa: ASYNC240 - a small local file
    stop, stop_now, stopping, ready = (anyio.Event() for _ in range(4))
    waiting: list[tuple[Any, anyio.Event]] = []

    def tick(counts: Counter[str]) -> None:
        ready.set()
        for holds, event in waiting:
            if holds(counts):
                event.set()

    async def until(holds: Any) -> None:
        event = anyio.Event()
        waiting.append((holds, event))
        with anyio.fail_after(30):
            await event.wait()

    try:
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                await record(
                    loads(text),
                    str(out),
                    topology_path=str(topology),
                    apply=True,
                    on_tick=tick,
                    stop=stop,
                    stop_now=stop_now,
                    drain=drain,
                    on_stopping=lambda _: stopping.set(),
                )

            tg.start_soon(run)
            with anyio.fail_after(30):
                await ready.wait()
            await _publish(text, "orders", "before")
            await until(seen)
            stop.set()
            if drain != 0:  # else it stops at once, saying nothing
                with anyio.fail_after(30):
                    await stopping.wait()
                await then(stop_now, until)
    finally:
        await _cleanup(text)


async def test_a_stopped_recording_drains_the_chain_in_flight_and_leaves_later_ones_out(
    tmp_path: Path, topology_file: Path
) -> None:
    out = tmp_path / "trace.jsonl"
    text = topology_file.read_text()  # noqa: ASYNC240 - a small local file

    async def finish(stop_now: anyio.Event, until: Until) -> None:
        # Asked to stop mid-flight ("before" is at billing, not yet shipped): a new
        # order comes in after the request, then the system ships the first.
        await _publish(text, "orders", "after")
        await until(lambda c: c["orders"] >= 2)  # the taps still watch: they see it
        await _publish(text, "ship", "before")

    await _record_and_stop(
        topology_file, out, seen=lambda c: c["billing"] >= 1, then=finish, drain=60
    )
    reader = Reader(str(out))
    list(reader)
    assert reader.end is not None
    assert reader.end.stop_mono_ns is not None
    # It ended when "before" did, not a minute after the stop.
    assert reader.end.mono_ns - reader.end.stop_mono_ns < 30e9
    done, verdict = _check(topology_file, out, tmp_path / "reports")
    assert done.returncode == 0, done.stdout + done.stderr
    (flow,) = verdict["flows"]
    # "before" is judged whole; "after" began after the stop: not judged, but said.
    assert (flow["chains"], flow["succeeded"], flow["unknown"]) == (1, 1, 0)
    assert verdict["recording"]["after_stop"] == 1
    assert verdict["unjudged"] == []
    assert "1 chain first seen after the stop was asked: not judged" in done.stdout


async def test_stopping_now_leaves_the_chain_in_flight_unjudged(
    tmp_path: Path, topology_file: Path
) -> None:
    """What a second Ctrl-C does: stop at once, the chain in flight unjudged, not passed."""
    out = tmp_path / "trace.jsonl"

    async def now(stop_now: anyio.Event, until: Until) -> None:
        stop_now.set()

    await _record_and_stop(topology_file, out, seen=lambda c: c["billing"] >= 1, then=now, drain=60)
    done, verdict = _check(topology_file, out, tmp_path / "reports")
    assert done.returncode == 1, done.stdout + done.stderr
    (u,) = verdict["unjudged"]
    assert (u["expectation"], u["chains"]) == ("the chains still open when the recording ended", 1)
    assert (verdict["flows"][0]["unknown"], verdict["flows"][0]["failed"]) == (1, 0)
    said = [line for line in done.stderr.splitlines() if "not green only because" in line]
    assert len(said) == 1
    assert "the chains still open when the recording ended" in said[0]
    # Allowed explicitly, it passes: what was left unjudged was said.
    allowed = await anyio.run_process(
        [*FLOWCHECK, "check", str(topology_file), str(out), "--allow-unjudged"], check=False
    )
    assert allowed.returncode == 0, allowed.stdout.decode()


async def test_a_loss_just_before_the_stop_is_caught_after_the_drain(
    tmp_path: Path, lossy_file: Path
) -> None:
    """The case that passed in silence: stopped right after the last order was placed,
    with no wait for its deadline; the recorder drains it, and check finds it lost."""
    out = tmp_path / "trace.jsonl"

    async def nothing(stop_now: anyio.Event, until: Until) -> None:
        pass

    await _record_and_stop(lossy_file, out, seen=lambda c: c["orders"] >= 1, then=nothing)
    reader = Reader(str(out))
    list(reader)
    assert reader.end is not None
    assert reader.end.stop_mono_ns is not None
    # The default drain: until the chain's window (1s deadline + 2s grace) is over.
    first = min(o.mono_ns for o in Reader(str(out)) if o.keys)
    assert reader.end.mono_ns > first + WINDOW_S * 1e9
    assert reader.end.mono_ns - reader.end.stop_mono_ns < 20e9
    done, verdict = _check(lossy_file, out, tmp_path / "reports")
    assert done.returncode == 1, done.stdout + done.stderr
    (flow,) = verdict["flows"]
    assert (flow["failed"], flow["unknown"]) == (1, 0)
    assert [(f["kind"], f["key"], f["cause"]) for f in flow["findings"]] == [
        ("lost", "before", "timed_out")
    ]
    assert verdict["unjudged"] == []
    # Without the drain, the same chain is unjudged: never passed.
    out2 = tmp_path / "nodrain.jsonl"
    await _record_and_stop(lossy_file, out2, seen=lambda c: c["orders"] >= 1, then=nothing, drain=0)
    done, verdict = _check(lossy_file, out2, tmp_path / "reports2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert [u["chains"] for u in verdict["unjudged"]] == [1]


def test_record_says_it_is_draining_and_a_second_signal_stops_it(
    tmp_path: Path, lossy_file: Path, rabbitmq_url: str, unique: str
) -> None:
    out = tmp_path / "trace.jsonl"
    cmd = [*FLOWCHECK, "record", str(lossy_file), "--out", str(out), "--apply", "--drain", "60s"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = _wait_ready(proc)
        anyio.run(_place, rabbitmq_url, f"{unique}.orders", f"{unique}-open")  # never shipped
        proc.send_signal(signal.SIGINT)
        assert _read_lines(proc, said)[0] == (
            "flowcheck: stopping: watching up to 60s more for chains still in flight; "
            "press Ctrl-C again to stop now"
        )
        # The order is in flight, so it would watch a minute: a second Ctrl-C ends it now
        # (had the taps not seen the order by the first, it has ended already).
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        anyio.run(_cleanup, lossy_file.read_text())
    assert proc.returncode == 0, stderr
    assert "observations written to" in stdout
    reader = Reader(str(out))
    list(reader)
    assert reader.end is not None
    assert reader.end.ended == "interrupted"
    assert reader.end.stop_mono_ns is not None
    assert reader.end.mono_ns - reader.end.stop_mono_ns < 20e9
    done, verdict = _check(lossy_file, out, tmp_path / "reports")
    # In flight at the stop: unjudged; seen only after it: not judged. Never a pass.
    assert done.returncode == 1, done.stdout + done.stderr
    assert verdict["flows"][0]["failed"] == 0


def test_record_drain_options_are_checked_before_connecting(
    tmp_path: Path, topology_file: Path
) -> None:
    out = str(tmp_path / "t.jsonl")
    runner = CliRunner()
    result = runner.invoke(cli, ["record", str(topology_file), "--out", out, "--drain", "5"])
    assert result.exit_code == 2, result.output
    assert "a duration needs a unit: write 5s or 5ms" in result.output
    args = ["record", str(topology_file), "--out", out, "--drain", "5s", "--no-drain"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "give --drain or --no-drain, not both" in result.output
    assert not Path(out).exists()


async def test_run_stopped_by_a_broker_error_ends_its_trace(
    tmp_path: Path, topology_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowcheck import runner
    from flowcheck.errors import BrokerUnreachable
    from flowcheck.scenario import load as load_scenario
    from flowcheck.tracer import Tracer

    sent = 0
    publish = Tracer.publish

    async def failing(self: Tracer, *args: Any, **kwargs: Any) -> Observation:
        nonlocal sent
        sent += 1
        if sent > 1:  # a broker lost for good after the first message
            raise BrokerUnreachable("r", "lost the connection to RabbitMQ")
        return await publish(self, *args, **kwargs)

    monkeypatch.setattr(Tracer, "publish", failing)
    text = topology_file.read_text()  # noqa: ASYNC240 - a small local file
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("send: [{flow: order, count: 2, routing_key: order.placed}]\n")
    reports = tmp_path / "reports"
    top = loads(text)
    try:
        with pytest.raises(BrokerUnreachable):
            await runner.run(top, load_scenario(str(scenario), top), str(reports))
    finally:
        await _cleanup(text)
    (trace,) = reports.glob("trace-*.jsonl")
    reader = Reader(str(trace))
    assert [o.kind for o in reader if o.channel == "orders"].count(Kind.PUBLISHED) == 1
    assert reader.problems == []
    assert reader.end is not None  # checkable as any recording: not taken for a crash
    assert reader.end.ended == "run"

"""CI outputs of `check` and `run`: --json PATH|-, --junit PATH, --html PATH,
$GITHUB_STEP_SUMMARY."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner
from redis.asyncio import Redis

from flowcheck.checker import Verdict
from flowcheck.cli import cli
from flowcheck.observations import Kind, Observation
from flowcheck.trace import Header, Writer

FLOWCHECK = [sys.executable, "-m", "flowcheck"]
TOPOLOGY = """
name: t
brokers: {r: {kind: rabbitmq}}
channels:
  a: {broker: r, kind: queue}
  b: {broker: r, kind: queue}
flows: {f: {correlate: $.id, steps: [a, b], deadline: 1s}}
"""


def _trace(path: Path, seen: list[tuple[str, str, float]], end_s: float) -> None:
    """(key, channel, seconds into the recording) per observation, then an end record."""
    with Writer(str(path), Header(started=0.0, started_mono_ns=0, topology="t")) as writer:
        for key, channel, at in seen:
            writer.write(
                Observation(
                    kind=Kind.ROUTED,
                    broker="r",
                    channel=channel,
                    mono_ns=int(at * 1e9),
                    wall=at,
                    keys={"f": key},
                )
            )
        writer.end("stopped", int(end_s * 1e9), end_s)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A topology, a trace of one chain that completes and one lost at a, a trace of
    one chain that completes."""
    topology = tmp_path / "t.yaml"
    topology.write_text(TOPOLOGY)
    failing, passing = tmp_path / "failing.jsonl", tmp_path / "passing.jsonl"
    _trace(failing, [("k0", "a", 0.5), ("k0", "b", 0.75), ("k1", "a", 0.8)], 10.0)
    _trace(passing, [("k0", "a", 0.5), ("k0", "b", 0.75)], 10.0)
    return topology, failing, passing


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    return env | extra


def test_json_and_junit_files(tmp_path: Path, files: tuple[Path, Path, Path]) -> None:
    topology, failing, _ = files
    out, xml = tmp_path / "out" / "v.json", tmp_path / "j" / "junit.xml"
    args = ["check", str(topology), str(failing), "--json", str(out), "--junit", str(xml)]
    result = CliRunner(env=_env()).invoke(cli, args)
    assert result.exit_code == 1, result.output
    verdict = Verdict.model_validate_json(out.read_bytes())
    assert not verdict.passed
    assert [(f.flow, f.succeeded, f.failed) for f in verdict.flows] == [("f", 1, 1)]
    root = ET.parse(xml).getroot()
    assert root.get("failures") == "1"
    assert f"reports: {out}, {xml}" in result.output
    assert "FAIL" in result.output  # the terminal report still on stdout
    # Only these two: no report directory was asked for.
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "failing.jsonl",
        "junit.xml",
        "passing.jsonl",
        "t.yaml",
        "v.json",
    ]


@pytest.mark.parametrize("which", ["failing", "passing"])
def test_json_dash_is_the_verdict_alone_on_stdout(
    tmp_path: Path, files: tuple[Path, Path, Path], which: str
) -> None:
    topology, failing, passing = files
    trace = failing if which == "failing" else passing
    reports = tmp_path / "reports"
    done = subprocess.run(
        [
            *FLOWCHECK,
            "check",
            str(topology),
            str(trace),
            "--json",
            "-",
            "--report-dir",
            str(reports),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        check=False,
    )
    assert done.returncode == (1 if which == "failing" else 0), done.stderr
    verdict = json.loads(done.stdout)  # the whole of stdout is one JSON document
    assert verdict["passed"] is (which == "passing")
    assert done.stdout == (reports / "verdict.json").read_text(encoding="utf-8")
    # The terminal report and the paths went to stderr.
    assert ("FAIL" if which == "failing" else "PASS") in done.stderr
    assert f"reports: {reports / 'verdict.json'}" in done.stderr
    # report.html draws the topology the trace was checked against
    assert "<h2 id='topology'>" in (reports / "report.html").read_text(encoding="utf-8")


def test_junit_refuses_stdout(files: tuple[Path, Path, Path]) -> None:
    topology, _, passing = files
    result = CliRunner(env=_env()).invoke(
        cli, ["check", str(topology), str(passing), "--junit", "-"]
    )
    assert result.exit_code == 2, result.output
    assert "only --json can write to stdout" in result.output


def test_html_file(tmp_path: Path, files: tuple[Path, Path, Path]) -> None:
    topology, failing, _ = files
    page = tmp_path / "out" / "r.html"
    result = CliRunner(env=_env()).invoke(
        cli, ["check", str(topology), str(failing), "--html", str(page)]
    )
    assert result.exit_code == 1, result.output
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<span class='fail'>FAIL</span> flowcheck: t" in text
    assert "<h4>key k1</h4>" in text  # the chain lost at a
    assert f"reports: {page}\n" in result.output


def test_html_refuses_stdout(files: tuple[Path, Path, Path]) -> None:
    topology, _, passing = files
    result = CliRunner(env=_env()).invoke(
        cli, ["check", str(topology), str(passing), "--html", "-"]
    )
    assert result.exit_code == 2, result.output
    assert "only --json can write to stdout" in result.output


@pytest.mark.parametrize("command", ["check", "run"])
def test_html_without_bokeh_is_one_line(
    tmp_path: Path,
    files: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    topology, _, passing = files
    monkeypatch.setitem(sys.modules, "bokeh", None)  # what an import finds uninstalled
    page, reports = tmp_path / "r.html", tmp_path / "reports"
    args = [str(topology)] + ([str(passing)] if command == "check" else [])
    args += ["--html", str(page), "--report-dir", str(reports)]
    result = CliRunner(env=_env()).invoke(cli, [command, *args])
    assert result.exit_code == 2, result.output
    assert result.output == (
        "flowcheck: the Python package 'bokeh' is needed here but is not installed; "
        "install it with: pip install 'flowcheck[html]'\n"
    )
    # Said before any work: nothing judged, published or written.
    assert not page.exists()
    assert not reports.exists()


def test_unwritable_json_path_is_one_line(tmp_path: Path, files: tuple[Path, Path, Path]) -> None:
    topology, _, passing = files
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run(
        [*FLOWCHECK, "check", str(topology), str(passing), "--json", str(blocker / "v.json")],
        capture_output=True,
        text=True,
        env=_env(),
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "cannot write the json report" in done.stderr
    assert "Traceback" not in done.stderr


def test_step_summary_is_appended(tmp_path: Path, files: tuple[Path, Path, Path]) -> None:
    topology, failing, passing = files
    summary = tmp_path / "step-summary.md"
    summary.write_text("## an earlier step\n", encoding="utf-8")
    runner = CliRunner(env=_env(GITHUB_STEP_SUMMARY=str(summary)))
    result = runner.invoke(cli, ["check", str(topology), str(passing)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["check", str(topology), str(failing)])
    assert result.exit_code == 1, result.output
    assert f"reports: {summary}" in result.output
    text = summary.read_text(encoding="utf-8")
    assert text.startswith("## an earlier step\n")
    assert text.index("## ✅ PASS") < text.index("## ❌ FAIL")


def test_no_step_summary_when_unset(tmp_path: Path, files: tuple[Path, Path, Path]) -> None:
    topology, _, passing = files
    result = CliRunner(env=_env()).invoke(cli, ["check", str(topology), str(passing)])
    assert result.exit_code == 0, result.output
    assert "reports:" not in result.output


def test_unwritable_step_summary_is_one_line(
    tmp_path: Path, files: tuple[Path, Path, Path]
) -> None:
    topology, _, passing = files
    done = subprocess.run(
        [*FLOWCHECK, "check", str(topology), str(passing)],
        capture_output=True,
        text=True,
        env=_env(GITHUB_STEP_SUMMARY=str(tmp_path / "missing" / "summary.md")),
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "cannot append the summary to $GITHUB_STEP_SUMMARY" in done.stderr
    assert "Traceback" not in done.stderr


def _run_topology(tmp_path: Path, unique: str, redis_url: str, steps: str, deadline: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        f'brokers: {{rd: {{kind: redis, url: "{redis_url}"}}}}\n'
        "channels:\n"
        f"  orders: {{broker: rd, kind: stream, name: {unique}.orders}}\n"
        f"  shipped: {{broker: rd, kind: stream, name: {unique}.shipped}}\n"
        f"flows: {{order: {{correlate: $.order_id, steps: [{steps}], deadline: {deadline}}}}}\n"
    )
    return path


async def test_run_json_dash_junit_and_summary(
    tmp_path: Path, unique: str, redis_url: str, redis: Redis
) -> None:
    topology = _run_topology(tmp_path, unique, redis_url, "orders", "5s")
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text('send: [{flow: order, count: 2, payload: {order_id: "{key}"}}]\n')
    summary, xml = tmp_path / "summary.md", tmp_path / "junit.xml"
    cmd = [*FLOWCHECK, "run", str(topology), "--scenario", str(scenario)]
    page = tmp_path / "report.html"
    cmd += ["--report-dir", str(tmp_path / "reports"), "--json", "-", "--junit", str(xml)]
    cmd += ["--html", str(page)]
    with anyio.fail_after(60):
        done = await anyio.run_process(cmd, check=False, env=_env(GITHUB_STEP_SUMMARY=str(summary)))
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err
    verdict = Verdict.model_validate_json(out)  # stdout is the verdict alone
    assert [(f.flow, f.succeeded) for f in verdict.flows] == [("order", 2)]
    assert "published; waiting" in err
    assert "trace: " in err
    assert "PASS" in err
    root = ET.parse(xml).getroot()
    assert (root.get("failures"), root.find("testsuite/testcase") is not None) == ("0", True)
    assert f"{xml}, {page}, {summary}" in err
    assert "<span class='pass'>PASS</span>" in page.read_text(encoding="utf-8")
    assert summary.read_text(encoding="utf-8").startswith("## ✅ PASS")


async def test_run_says_how_its_wait_goes_every_few_seconds(
    tmp_path: Path, unique: str, redis_url: str, redis: Redis
) -> None:
    # Nothing ships the orders: the run waits out their deadline before it decides them.
    topology = _run_topology(tmp_path, unique, redis_url, "orders, shipped", "6s")
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text('send: [{flow: order, count: 2, payload: {order_id: "{key}"}}]\n')
    cmd = [*FLOWCHECK, "run", str(topology), "--scenario", str(scenario)]
    cmd += ["--report-dir", str(tmp_path / "reports")]
    with anyio.fail_after(60):
        done = await anyio.run_process(cmd, check=False, env=_env())
    err = done.stderr.decode()
    assert done.returncode == 1, err  # lost
    lines = err.splitlines()
    waited = [i for i, line in enumerate(lines) if line.startswith("flowcheck: waiting: ")]
    start = next(i for i, line in enumerate(lines) if "published; waiting up to" in line)
    # The wait is about 8s (the deadline, plus 2s): one line, maybe two, never one per tick.
    assert 1 <= len(waited) <= 2, err
    assert all(i > start for i in waited), err
    first = lines[waited[0]]
    assert first.startswith(
        "flowcheck: waiting: 0 of 2 published chains decided, 2 of any flow still open, "
    ), first
    assert first.endswith("s left"), first
    left = int(first.removesuffix("s left").rsplit(", ", 1)[1])
    assert 0 < left < 20, first

"""Scenario templates: plain placeholders only, bounded output, a bounded schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from flowcheck import scenario as scenarios
from flowcheck.cli import cli
from flowcheck.errors import TopologyError, UsageError
from flowcheck.topology import loads

TOPOLOGY = """
brokers: {rd: {kind: redis, url: "redis://127.0.0.1:6379/0"}}
channels: {orders: {broker: rd, kind: stream}}
flows:
  placed: {correlate: $.id, steps: [orders]}
"""


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    topology = tmp_path / "t.yaml"
    topology.write_text(TOPOLOGY)
    return topology, tmp_path / "s.yaml"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{key.__class__}", "unknown placeholder {key.__class__}"),
        ("{n.nope}", "unknown placeholder {n.nope}"),
        ("{key[x]}", "unknown placeholder {key[x]}"),
        ("{key.__class__.__init__.__globals__}", "unknown placeholder"),
        ("{nope}", "a placeholder is one of {n}, {i}, {key}, {run}, {flow}"),
        ("{n:>300000000}", "only a width may follow ':'"),
        ("{n:>999}", "width 999 is over 64"),
        ("{key!r}", "conversions are not supported"),
        ("{n", "write {{ and }} for literal braces"),
    ],
)
def test_a_bad_placeholder_is_named_with_its_line(
    files: tuple[Path, Path], template: str, expected: str
) -> None:
    topology, scenario = files
    scenario.write_text(f"send:\n  - flow: placed\n    payload:\n      note: {template!r}\n")
    result = CliRunner().invoke(cli, ["run", str(topology), "--scenario", str(scenario)])
    assert result.exit_code == 2, result.output
    assert f"{scenario}:4:" in result.output
    assert "send[0].payload.note" in result.output
    assert expected in result.output
    assert "Traceback" not in result.output


def test_placeholders_with_a_width_render(files: tuple[Path, Path]) -> None:
    _, scenario = files
    scenario.write_text(
        "send:\n  - {flow: placed, count: 2, key: 'k-{n:03}', payload: {at: '{i:>4}|{flow}'}}\n"
    )
    loaded = scenarios.load(str(scenario), loads(TOPOLOGY))
    sent = list(scenarios.messages(loaded, loads(TOPOLOGY), "run1"))
    assert [m.key for m in sent] == ["k-000", "k-001"]
    assert sent[1].body == b'{"at": "   1|placed", "id": "k-001"}'


def test_a_schedule_of_years_is_refused(files: tuple[Path, Path]) -> None:
    _, scenario = files
    scenario.write_text(
        "send:\n  - {flow: placed, count: 1}\n  - {flow: placed, count: 2,\n      rate: 0.000000001}\n"
    )
    with pytest.raises(TopologyError) as caught:
        scenarios.load(str(scenario), loads(TOPOLOGY))
    (problem,) = caught.value.problems
    assert problem.line == 4
    assert "publishing this scenario would take 31.7 years" in problem.message


def test_a_scenario_built_in_code_is_checked_too() -> None:
    built = scenarios.Scenario(
        send=[scenarios.Send(flow="placed", payload={"x": "{key.__class__}"})]
    )
    with pytest.raises(UsageError, match="unknown placeholder"):
        list(scenarios.messages(built, loads(TOPOLOGY), "run1"))


def test_a_huge_message_is_refused() -> None:
    built = scenarios.Scenario(
        send=[scenarios.Send(flow="placed", payload={"x": "{run}" * (scenarios.MAX_BODY // 4)})]
    )
    with pytest.raises(UsageError, match="over the 1048576 a scenario message may have"):
        list(scenarios.messages(built, loads(TOPOLOGY), "run1"))

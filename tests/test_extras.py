"""A missing broker client names the extra that installs it; nothing else breaks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowcheck.brokers import adapter
from flowcheck.cli import cli
from flowcheck.errors import MissingDependency
from flowcheck.topology import loads

CASES = [
    ("kafka", "aiokafka", "flowcheck.brokers.kafka", "{kind: kafka}"),
    ("rabbitmq", "aio_pika", "flowcheck.brokers.rabbitmq", "{kind: rabbitmq}"),
    ("redis", "redis", "flowcheck.brokers.redis", "{kind: redis}"),
]


@pytest.mark.parametrize(("extra", "module", "adapter_module", "broker"), CASES)
def test_missing_client_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, extra: str, module: str, adapter_module: str, broker: str
) -> None:
    kind = {"kafka": "topic", "rabbitmq": "queue", "redis": "stream"}[extra]
    topology = loads(f"brokers: {{b: {broker}}}\nchannels: {{c: {{broker: b, kind: {kind}}}}}\n")
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(sys.modules, adapter_module, raising=False)
    with pytest.raises(MissingDependency, match=rf"pip install 'flowcheck\[{extra}\]'"):
        adapter("b", topology)


def test_cli_reports_a_missing_client_as_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("brokers: {b: {kind: kafka}}\nchannels: {c: {broker: b, kind: topic}}\n")
    monkeypatch.setitem(sys.modules, "aiokafka", None)
    monkeypatch.delitem(sys.modules, "flowcheck.brokers.kafka", raising=False)
    result = CliRunner().invoke(cli, ["record", str(path), "--out", str(tmp_path / "t.jsonl")])
    assert result.exit_code == 2, result.output
    assert "pip install 'flowcheck[kafka]'" in result.output
    assert "Traceback" not in result.output

"""write_reports, and the promise that reporters never reach for a broker."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import scenarios

from flowcheck.checker import Verdict
from flowcheck.errors import UsageError
from flowcheck.reporting import FORMATS, write_reports


def test_writes_every_format_into_a_directory(tmp_path: Path) -> None:
    verdict = scenarios.failing()
    paths = write_reports(verdict, tmp_path / "reports")
    assert paths == {
        "json": tmp_path / "reports" / "verdict.json",
        "junit": tmp_path / "reports" / "junit.xml",
        "markdown": tmp_path / "reports" / "summary.md",
        "html": tmp_path / "reports" / "report.html",
    }
    assert Verdict.model_validate_json(paths["json"].read_bytes()) == verdict
    assert ET.parse(paths["junit"]).getroot().get("failures") == "6"
    assert paths["markdown"].read_text(encoding="utf-8").startswith("## ❌ FAIL")


def test_chosen_formats_and_paths(tmp_path: Path) -> None:
    verdict = scenarios.passing()
    only = write_reports(verdict, tmp_path, ["junit"])
    assert list(only) == ["junit"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junit.xml"]
    summary = tmp_path / "ci" / "step-summary.md"
    paths = write_reports(verdict, {"markdown": summary, "json": tmp_path / "v.json"})
    assert paths == {"markdown": summary, "json": tmp_path / "v.json"}
    assert json.loads((tmp_path / "v.json").read_text(encoding="utf-8"))["passed"] is True


def test_bad_requests_are_usage_errors(tmp_path: Path) -> None:
    verdict = scenarios.passing()
    with pytest.raises(UsageError, match=r"unknown report format.*'pdf'"):
        write_reports(verdict, tmp_path, ["json", "pdf"])
    with pytest.raises(UsageError, match=r"no path given for report format.*junit"):
        write_reports(verdict, {"json": tmp_path / "v.json"}, ["json", "junit"])
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(UsageError, match="cannot write the json report"):
        write_reports(verdict, blocker / "reports", ["json"])
    assert set(FORMATS) == {"json", "junit", "markdown", "html"}


def test_reporters_import_no_broker_client() -> None:
    code = (
        "import sys, flowcheck.reporting, flowcheck.reporting.terminal, flowcheck.reporting.live\n"
        "bad = sorted(m for m in sys.modules if m.startswith("
        "('aio_pika', 'aiormq', 'aiokafka', 'redis', 'flowcheck.brokers')))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

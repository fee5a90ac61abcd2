"""The HTML report: what it says, that it stays small, and that a real browser renders it.

The browser test needs Chromium (Debian's ``chromium``; .ci/run installs it) and fails,
not skips, without it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import scenarios

from flowcheck.checker import Histogram, Seen, Verdict
from flowcheck.errors import MissingDependency
from flowcheck.reporting import html, write_reports

CHROMIUM = "chromium"


def chromium() -> str:
    path = shutil.which(CHROMIUM)
    assert path is not None, (
        "the HTML report's browser test needs Chromium: apt-get install chromium (.ci/run does)"
    )
    return path


def browse(page: Path, tmp: Path, *extra: str) -> str:
    """Open ``page`` in headless Chromium and return its DOM once its scripts ran."""
    out = subprocess.run(
        [
            chromium(),
            "--headless=new",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            f"--user-data-dir={tmp / 'profile'}",
            "--virtual-time-budget=10000",
            *extra,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


def rendered(dom: str) -> tuple[int, int, str]:
    """(plots bokeh drew, plots on the page, script errors the page recorded) from a DOM dump."""
    count = re.search(r'data-rendered="(\d+) of (\d+)"', dom)
    assert count is not None, "the page never finished rendering its plots"
    errors = re.search(r'<pre id="fc-errors">(.*?)</pre>', dom, re.S)
    assert errors is not None
    return int(count.group(1)), int(count.group(2)), errors.group(1)


def test_failing_report_says_what_failed() -> None:
    page = html.dumps(scenarios.failing())
    assert page.startswith("<!DOCTYPE html>")
    assert "<span class='fail'>FAIL</span> flowcheck: shop" in page
    flows = re.search(r"<table id='flows'>(.*?)</table>", page, re.S)
    assert flows is not None
    rows = re.findall(r"<tr class='(\w+)'><td><a href='#flow-(\w+)'>", flows.group(1))
    assert rows == [("fail", "checkout"), ("pass", "audit")]
    # every check, judged: failed ones and passed ones
    assert "<tr><td>retries</td><td class='fail'>fail</td>" in page
    assert "<tr><td>ordering</td><td class='pass'>pass</td>" in page
    # the broken chains, each with its swimlane; the lost one says what was expected next
    for key in ("k-lost", "k-unroutable", "p-retried", "k-dead"):
        assert f"<h4>key {key}</h4>" in page
    assert "expected next: pay" in page
    assert "consumer rebalance" in page  # the tap gap
    assert "p99 50" in page  # the budget beside the percentiles
    # the flows as paths of channels: messages and p99 per hop, what ended badly
    assert "<h2>Flows through the channels</h2>" in page
    assert '"5, p99 79.9 ms"' in page
    assert '"2 dead-lettered, 4 failed"' in page
    assert "<h2>Over the recording</h2>" in page
    # per flow, per second over the recording: completed, failed, retries, dead letters
    lines = re.findall(r'"label":\{"type":"value","value":"([a-z ]+)"\}', page)
    assert sorted(lines) == ["completed", "completed", "dead letters", "failed", "retries"]
    assert "checkout: per second, in buckets of 512.0 ms" in page
    # per flow, each hop's samples and the whole chain's as a histogram; budgets as lines
    for title in ("orders -&gt; billing (8", "billing -&gt; pay (5", "end-to-end (5"):
        assert f'"text":"{title} samples)"' in page
    assert page.count('"name":"Quad"') == 3 * (3 + 2)  # a glyph and two copies (selection)
    assert page.count('"name":"Span"') == 2  # checkout's pay and audit's log: p99 budgets
    assert page.count('"text":"budget p99"') == 2
    # nothing to fetch: every script inline, no stylesheet or image from elsewhere
    assert not re.search(r"<script[^>]*\bsrc=|<link\b|<img\b", page)


def test_gaps_are_shaded_where_they_hid_a_chain() -> None:
    verdict = scenarios.failing()
    far = html.dumps(verdict)  # its gap is 30 s after every broken chain
    lost = next(f for f in verdict.flows[0].findings if f.key == "k-lost")
    at = lost.timeline[-1].at_ms
    near = Seen(kind="gap", channel="pay", at_ms=at, until_ms=at + 5, reason="tap down")
    shaded = html.dumps(verdict.model_copy(update={"gaps": [near]}))
    # on the recording's time (both: the broken chains and each flow's rates) and on the
    # timeline of the chain it hid (the near one)
    assert far.count('"name":"BoxAnnotation"') == 1 + 2
    assert shaded.count('"name":"BoxAnnotation"') == 2 + 2


def test_a_verdict_without_series_or_bins_still_renders() -> None:
    verdict = scenarios.failing()
    flows = [
        f.model_copy(
            update={
                "over_time": None,
                "latency": [lat.model_copy(update={"histogram": Histogram()}) for lat in f.latency],
            }
        )
        for f in verdict.flows
    ]
    page = html.dumps(verdict.model_copy(update={"flows": flows}))
    assert "<h2>Over the recording</h2>" in page  # the broken chains are still there
    assert '"name":"Step"' not in page
    assert '"name":"Quad"' not in page


def test_passing_and_unjudged_reports() -> None:
    page = html.dumps(scenarios.passing())
    assert "<span class='pass'>PASS</span>" in page
    assert "class='fail'" not in page
    page = html.dumps(scenarios.unjudged(allowed=False))
    assert "<ul id='unjudged'>" in page
    assert "retry max_attempts 3 at &#x27;billing&#x27;" in page
    assert "<td class='fail'>unjudged</td>" in page


def test_text_from_the_system_is_escaped() -> None:
    page = html.dumps(scenarios.lost(["<img src=x onerror=alert(1)>"]))
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def big() -> Verdict:
    """10,000 chains, 100 of them lost: the verdict the checker would give."""
    base = scenarios.lost([f"order-{i:05d}" for i in range(100)])
    flow = base.flows[0]
    flow = flow.model_copy(update={"chains": 10_000, "succeeded": 9_900})
    return base.model_copy(update={"flows": [flow, *base.flows[1:]]})


def test_ten_thousand_chains_stay_small() -> None:
    verdict = big()
    assert len(verdict.flows[0].findings) == 100
    started = time.perf_counter()
    page = html.dumps(verdict)
    took = time.perf_counter() - started
    assert len(page.encode()) < 3_000_000
    assert took < 5
    drawn = page.count("<div class='chain'>")
    assert drawn == html.MAX_SWIMLANES
    assert f"the other {100 - html.MAX_SWIMLANES} are listed below them" in page
    assert page.count("<li><b>order-") == 100 - html.MAX_SWIMLANES


def test_written_with_the_other_reports(tmp_path: Path) -> None:
    paths = write_reports(scenarios.failing(), tmp_path)
    assert paths["html"] == tmp_path / "report.html"
    assert "flowcheck: shop" in paths["html"].read_text(encoding="utf-8")


def test_report_command_renders_a_kept_trace(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from history import START, History

    from flowcheck.cli import cli
    from flowcheck.trace import Header, Writer

    topology = tmp_path / "shop.yaml"
    topology.write_text(scenarios.TOPOLOGY, encoding="utf-8")
    h = History("checkout")
    h.at(10).routed("orders", "k-lost")
    h.routed("billing", "k-lost")
    trace = tmp_path / "trace.jsonl"
    with Writer(str(trace), Header(started=0.0, started_mono_ns=START, topology="shop")) as w:
        for obs in h.items:
            w.write(obs)
        w.end("stopped", START + 60_000 * 1_000_000, 0.0)
    out = tmp_path / "out" / "shop.html"
    result = CliRunner().invoke(cli, ["report", str(topology), str(trace), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"report: {out} (FAIL)\n"
    page = out.read_text(encoding="utf-8")
    assert "<h4>key k-lost</h4>" in page
    assert "expected next: pay" in page
    missing = CliRunner().invoke(cli, ["report", str(topology), str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2


def test_renders_in_a_browser_without_errors(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(html.dumps(scenarios.failing()), encoding="utf-8")
    dom = browse(page, tmp_path, "--dump-dom")
    # the flows' paths, the rates and the broken chains over the recording, the latency
    # percentiles and histograms of both flows, and one swimlane per broken chain (4)
    assert rendered(dom) == (11, 11, "")
    assert '<h1 id="headline">' in dom
    shot = tmp_path / "report.png"
    browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1000,2400")
    assert shot.stat().st_size > 10_000


def test_the_browser_check_sees_script_errors(tmp_path: Path) -> None:
    broken = html.dumps(scenarios.failing()).replace(
        "</body>", "<script>undefinedFunction();</script></body>"
    )
    page = tmp_path / "broken.html"
    page.write_text(broken, encoding="utf-8")
    _, _, errors = rendered(browse(page, tmp_path, "--dump-dom"))
    assert "undefinedFunction" in errors


def test_big_report_renders_in_a_browser(tmp_path: Path) -> None:
    page = tmp_path / "big.html"
    page.write_text(html.dumps(big()), encoding="utf-8")
    started = time.perf_counter()
    dom = browse(page, tmp_path, "--dump-dom")
    took = time.perf_counter() - started
    # the flows' paths, the rates and the chains over the recording, checkout's latency
    # and its histogram (the lost chains' first hop), its first swimlanes, audit's latency
    plots = html.MAX_SWIMLANES + 6
    assert rendered(dom) == (plots, plots, "")
    assert took < 20  # a browser's start included: a generous bound on shared CI cores


def test_without_bokeh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flowcheck.reporting

    monkeypatch.setitem(sys.modules, "bokeh", None)  # what an import finds uninstalled
    with pytest.raises(MissingDependency, match=r"flowcheck\[html\]"):
        html.dumps(scenarios.passing())
    monkeypatch.setattr(flowcheck.reporting, "_has_bokeh", lambda: False)
    paths = write_reports(scenarios.passing(), tmp_path)
    assert sorted(paths) == ["json", "junit", "markdown"]

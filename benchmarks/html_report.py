"""The HTML report at scale: its size and how long a browser takes to draw it.

The verdict is the real checker's on a hand-written history (tests/reporting/scenarios.py,
``many``): ``--chains`` chains of the reporter tests' checkout flow, the first
``--broken`` of them lost after billing, the rest complete. The report is written with
its topology (so the topology picture is drawn), then opened ``--rounds`` times in
headless Chromium (``--dump-dom``); the page stamps on its body when it had drawn every
plot (``data-rendered-ms``, ms after navigation started), which is the figure, besides
the whole browser run. Without Chromium it prints the size only.

    PYTHONPATH=. .venv/bin/python benchmarks/html_report.py [--chains 10000] [--broken 100]
        [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "reporting"))

import scenarios  # noqa: E402

from flowcheck.reporting import html  # noqa: E402


def render(browser: str, page: Path, profile: Path) -> tuple[float, str, float]:
    """(ms until every plot was drawn, the page's 'drawn of expected', s the browser ran)."""
    started = time.perf_counter()
    out = subprocess.run(
        [
            browser,
            "--headless=new",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    took = time.perf_counter() - started
    at = re.search(r'data-rendered-ms="(\d+)"', out.stdout)
    drawn = re.search(r'data-rendered="([^"]+)"', out.stdout)
    if at is None or drawn is None:
        raise SystemExit("the page never stamped data-rendered-ms: its scripts did not finish")
    return float(at.group(1)), drawn.group(1), took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=10_000)
    parser.add_argument("--broken", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="where report.html goes (default: a temp dir)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="flowcheck-html-"))
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    verdict = scenarios.many(args.chains, args.broken)
    checked = time.perf_counter() - started
    started = time.perf_counter()
    text = html.dumps(verdict, topology=scenarios.topology())
    dumped = time.perf_counter() - started
    page = out / "report.html"
    page.write_text(text, encoding="utf-8")
    size = page.stat().st_size
    flow = verdict.flows[0]
    result: dict[str, Any] = {
        "chains": flow.chains,
        "broken": flow.failed,
        "passing_shown": len(flow.passing),
        "check_s": round(checked, 2),
        "dumps_s": round(dumped, 2),
        "bytes": size,
        "page": str(page),
    }
    print(f"verdict: {flow.chains} chains, {flow.failed} broken (checked in {checked:.1f} s)")
    print(f"report.html: {size / 1e6:.2f} MB, written in {dumped:.1f} s: {page}")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium not found: size only")
    else:
        renders = []
        for i in range(args.rounds):
            ms, drawn, took = render(browser, page, out / f"profile-{i}")
            renders.append((ms, took))
            print(
                f"round {i + 1}: plots drawn ({drawn}) {ms:.0f} ms after navigation; "
                f"browser ran {took:.1f} s"
            )
        result["rendered_ms"] = statistics.median(r[0] for r in renders)
        result["browser_s"] = round(statistics.median(r[1] for r in renders), 2)
        result["drawn"] = drawn
        print(
            f"median: drawn {result['rendered_ms']:.0f} ms after navigation, "
            f"browser {result['browser_s']} s"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

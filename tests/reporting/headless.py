"""Headless Chromium for the HTML report's tests: a page's DOM once its scripts ran,
and what the page says it drew and which script errors it met.

The tests need Chromium (Debian's ``chromium``; .ci/run installs it) and fail, not
skip, without it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

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

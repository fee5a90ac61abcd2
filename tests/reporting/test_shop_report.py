"""The report of the shop's failing demo (``./scripts/demo --fault drop``), as a person
opens it: the real shop on the real brokers, its report rendered by headless Chromium
without a script error, what failed and where the lost chain stopped on the page.

The screenshot is kept under the test's tmp_path (its path printed), taken as
``./scripts/demo --fault drop --screenshot docs/img/report.png`` takes the docs' one.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import anyio
from headless import browse, chromium, rendered

from examples.shop import Brokers, Fault, Faults
from flowcheck.checker import Cause, FindingKind, Verdict

ROOT = Path(__file__).resolve().parents[2]
MAIN = "order-to-shipment"


def _load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


async def test_failing_demo_report_reads_in_a_browser(
    tmp_path: Path, unique: str, rabbitmq_url: str, kafka_bootstrap: str, redis_url: str
) -> None:
    chromium()  # no browser: fail before the shop runs
    reports = tmp_path / "reports"
    brokers = Brokers(rabbitmq_url, kafka_bootstrap, redis_url)
    code = await demo.demo(brokers, Faults.of(Fault.DROP), reports, f"{unique}.")
    assert code == 1
    verdict = Verdict.model_validate_json((reports / "verdict.json").read_text())
    [flow] = [f for f in verdict.flows if not f.passed]
    assert flow.flow == MAIN
    [lost] = [f for f in flow.findings if f.kind is FindingKind.LOST]
    assert (lost.cause, lost.next_step) == (Cause.TIMED_OUT, "payments")

    page = reports / "report.html"
    dom = await anyio.to_thread.run_sync(browse, page, tmp_path, "--dump-dom")
    drawn, plots, errors = rendered(dom)
    assert errors == ""
    assert drawn == plots > 0
    # The headline, the failing flow in the table of flows, and the lost chain with
    # where it stopped, in what the browser holds after running the page's scripts.
    assert re.search(r'<h1 id="headline"><span class="fail">FAIL</span>', dom)
    row = re.search(rf'<tr class="fail"><td><a href="#flow-{MAIN}">{MAIN}</a>', dom)
    assert row is not None
    top = re.search(r'<ul id="what-failed">(.*?)</ul>\n', dom, re.S)
    assert top is not None
    assert f'<a href="#flow-{MAIN}">{MAIN}</a> failed: chains: 47 of 48' in top.group(1)
    assert f"<li>key {lost.key}: timed out after 'billing.orders': no 'payments'" in top.group(1)
    assert f"<h4>key {lost.key}</h4>" in dom
    assert '"1 lost before payments"' in dom  # on the flow's path
    assert "expected next: payments, never came" in dom  # on the chain's swimlane

    shot = await anyio.to_thread.run_sync(demo.screenshot, page, tmp_path / "report.png")
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert shot.stat().st_size > 20_000  # a page drawn, not a blank one
    print(f"screenshot of the shop's failing demo report: {shot}")

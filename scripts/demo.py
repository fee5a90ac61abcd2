"""The main job, end to end: the shop runs on real brokers and flowcheck checks it.

Starts a Kafka-compatible broker unless FLOWCHECK_KAFKA_BOOTSTRAP names one,
starts every service of the shop (examples/shop) under a fresh prefix, runs
`flowcheck run topologies/shop.yaml --scenario topologies/scenarios/shop.yaml`
against them, and removes what the shop declared. Exits with flowcheck's code.
Pass `--fault NAME` to break the shop on purpose and watch the gate fail, and
`--screenshot PATH` to save what headless Chromium shows of its HTML report
(`--fault drop --screenshot docs/img/report.png` makes the docs' picture).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from examples.shop import Brokers, Fault, Faults, Service, Settings, Shop, Stats
from examples.shop.topology import topology_yaml
from flowcheck import defaults
from flowcheck.devkafka import LocalKafka

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "topologies" / "scenarios" / "shop.yaml"


async def demo(
    brokers: Brokers, faults: Faults, reports: Path, prefix: str, *, stats: Stats | None = None
) -> int:
    """Run the shop with ``faults`` and gate it; returns flowcheck's exit code.

    ``reports`` gets the topology (shop.yaml with this run's names and addresses),
    the trace and the reports; ``stats`` counts what the shop did (faults included).
    """
    topology = reports / "shop.yaml"
    # shop.yaml, with this run's broker-side names and addresses
    text = topology_yaml(prefix, brokers)
    await asyncio.to_thread(reports.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(topology.write_text, text)
    settings = Settings(brokers=brokers, prefix=prefix, faults=faults)
    print(
        f"demo: starting the shop's services (prefix {prefix}, faults: {', '.join(faults.names()) or 'none'})",
        flush=True,
    )
    # Every service runs, checkout included: flowcheck publishes what a storefront
    # sends (order requests), so each fault happens where it lives in the shop.
    async with Shop(settings, services=list(Service), remove=True, stats=stats):
        cmd = [
            sys.executable,
            "-m",
            "flowcheck",
            "run",
            str(topology),
            "--scenario",
            str(SCENARIO),
            "--report-dir",
            str(reports),
        ]
        print("demo: " + " ".join(cmd[1:]), flush=True)
        proc = await asyncio.create_subprocess_exec(*cmd)
        return await proc.wait()


def screenshot(page: Path, out: Path, *, width: int = 1280, height: int = 2400) -> Path:
    """Save what headless Chromium shows of ``page`` in a window of ``width`` x ``height``,
    once its plots are drawn; the PNG is re-packed as a palette image to stay small."""
    from PIL import Image  # comes with bokeh, the html extra

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("demo: --screenshot needs Chromium (apt-get install chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                "--headless=new",
                "--disable-gpu",
                "--no-sandbox",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=10000",  # the plots' scripts run before the shot
                f"--screenshot={out}",
                f"--window-size={width},{height}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            timeout=120,
            check=True,
        )
    with Image.open(out) as shot:
        small = shot.convert("RGB").quantize(colors=256)
    small.save(out, optimize=True)
    return out


# The faults this gate catches. Not early-retry (shop.yaml declares no payment backoff:
# a retry topic shows when attempts failed, not when they began) nor phantom (it comes
# once run has stopped watching): tests/soundness/test_shop_paths.py catches those.
DEMO = [f for f in Fault if f not in {Fault.EARLY_RETRY, Fault.PHANTOM}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fault", action="append", default=[], choices=[f.value for f in DEMO])
    parser.add_argument("--reports", default="reports/demo", help="where the trace and reports go")
    parser.add_argument(
        "--screenshot", metavar="PATH", help="save a picture of the HTML report here (PNG)"
    )
    args = parser.parse_args()
    bootstrap = defaults.kafka_bootstrap()
    local = None
    if bootstrap is None:
        local = LocalKafka()
        local.start()
        bootstrap = local.bootstrap
        print(f"demo: started a local Kafka-compatible broker at {bootstrap}", flush=True)
    try:
        brokers = Brokers(
            rabbitmq_url=defaults.rabbitmq_url(),
            kafka_bootstrap=bootstrap,
            redis_url=defaults.redis_url(),
        )
        prefix = f"demo-{uuid.uuid4().hex[:6]}."
        code = asyncio.run(demo(brokers, Faults.of(*args.fault), Path(args.reports), prefix))
    finally:
        if local is not None:
            local.stop()
    verdict = "passed" if code == 0 else "failed" if code == 1 else f"could not run (exit {code})"
    print(f"demo: the gate {verdict}; reports in {args.reports}/", flush=True)
    if args.screenshot and code in (0, 1):
        shot = screenshot(Path(args.reports) / "report.html", Path(args.screenshot))
        print(f"demo: screenshot of the report: {shot}", flush=True)
    return code


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())

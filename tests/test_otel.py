"""Broken chains exported over OTLP/HTTP to a receiver the test runs, decoded from protobuf."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from otlp import Receiver, attrs

from flowcheck.checker.verdict import chain_trace_id
from flowcheck.cli import cli
from flowcheck.observations import Kind, Observation
from flowcheck.trace import Header, Writer

CARRIED = "4bf92f3577b34da6a3ce929d0e0e4736"
OTHER = "0af7651916cd43dd8448eb211c80319c"
STARTED = 1_700_000_000.0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A topology and a trace: k0 passes, k1 (carrying a traceparent) and k2 are lost at b,
    k1's message at a carries another trace too (a fan-in)."""
    topology = tmp_path / "t.yaml"
    topology.write_text(
        """
name: shop
brokers: {r: {kind: rabbitmq}}
channels:
  a: {broker: r, kind: queue}
  b: {broker: r, kind: queue}
flows: {f: {correlate: $.id, steps: [a, b], deadline: 1s}}
"""
    )
    trace = tmp_path / "t.jsonl"

    def obs(channel: str, at: float, key: str, **more: Any) -> Observation:
        return Observation(
            kind=Kind.ROUTED,
            broker="r",
            channel=channel,
            mono_ns=int(at * 1e9),
            wall=STARTED + at,
            keys={"f": key},
            **more,
        )

    with Writer(str(trace), Header(topology="shop", started=STARTED, started_mono_ns=0)) as w:
        w.write(obs("a", 0.1, "k0", message_id="m0"))
        w.write(obs("b", 0.2, "k0", message_id="m0"))
        w.write(obs("a", 0.3, "k1", message_id="m1", trace_id=CARRIED))
        w.write(
            Observation(
                kind=Kind.DELIVERED,
                broker="r",
                channel="a",
                mono_ns=int(0.4e9),
                wall=STARTED + 0.4,
                keys={"f": "k1"},
                message_id="m1",
                trace_id=OTHER,
            )
        )
        w.write(obs("a", 0.5, "k2", message_id="m2"))
        w.end("stopped", int(5e9), STARTED + 5)
    return topology, trace


def _flowcheck(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """flowcheck in a process of its own, as users run it: the OTLP exporter's HTTP client
    starts from a clean state, whatever earlier tests did to this process."""
    return subprocess.run(
        [sys.executable, "-m", "flowcheck", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_check_sends_each_broken_chain_as_a_trace(
    receiver: Receiver, files: tuple[Path, Path], tmp_path: Path
) -> None:
    topology, trace = files
    reports = tmp_path / "reports"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": "shop-check"}
    result = _flowcheck(["check", str(topology), str(trace), "--report-dir", str(reports)], env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "otel: 2 broken chains sent as traces" in result.stdout + result.stderr

    spans = receiver.spans()
    assert {service for service, _ in spans} == {"shop-check"}
    by_trace: dict[str, list[Span]] = {}
    for _, s in spans:
        by_trace.setdefault(s.trace_id.hex(), []).append(s)
    derived = chain_trace_id("f", "k2")
    # The passing chain k0 is not sent; k1 keeps the trace its message carried.
    assert set(by_trace) == {CARRIED, derived}

    k1 = by_trace[CARRIED]
    (root,) = [s for s in k1 if not s.parent_span_id]
    assert root.name == "flow f"
    assert attrs(root) == {"flowcheck.flow": "f", "flowcheck.key": "k1"}
    assert root.status.code == Status.STATUS_CODE_ERROR
    (event,) = root.events
    assert event.name == "flowcheck.lost"
    message = {a.key: a.value.string_value for a in event.attributes}["message"]
    verdict = json.loads((reports / "verdict.json").read_text())
    lost = [f for f in verdict["flows"][0]["findings"] if f["key"] == "k1"]
    assert message == lost[0]["message"]
    assert root.start_time_unix_nano == int(STARTED * 1e9 + 0.3e9)

    steps = sorted((s for s in k1 if s.parent_span_id), key=lambda s: s.start_time_unix_nano)
    assert all(s.parent_span_id == root.span_id for s in steps)
    assert [s.name for s in steps] == ["receive a", "receive a"]
    assert [s.kind for s in steps] == [Span.SPAN_KIND_CONSUMER] * 2
    assert attrs(steps[0]) == {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": "a",
        "messaging.operation.type": "receive",
        "messaging.message.id": "m1",
        "flowcheck.observation": "routed",
    }
    assert attrs(steps[1])["flowcheck.observation"] == "delivered"
    # A step lasts until the chain moved on.
    assert steps[0].end_time_unix_nano - steps[0].start_time_unix_nano == pytest.approx(
        1e8, abs=1e3
    )
    # The delivery's message carried another trace: a link to it (fan-in).
    assert not steps[0].links
    (link,) = steps[1].links
    assert link.trace_id.hex() == OTHER

    (k2_root,) = [s for s in by_trace[derived] if not s.parent_span_id]
    assert k2_root.status.code == Status.STATUS_CODE_ERROR
    # The verdict carries each broken chain's trace id, for a jump to Jaeger.
    assert {f["key"]: f["trace_id"] for f in verdict["flows"][0]["findings"]} == {
        "k1": CARRIED,
        "k2": derived,
    }


def test_nothing_is_sent_or_imported_without_an_endpoint(files: tuple[Path, Path]) -> None:
    topology, trace = files
    code = f"""
import os, sys
for name in list(os.environ):
    if name.startswith("OTEL_"):
        del os.environ[name]
from click.testing import CliRunner
from flowcheck.cli import cli
result = CliRunner().invoke(cli, ["check", {str(topology)!r}, {str(trace)!r}])
assert result.exit_code == 1, result.output
assert "otel:" not in result.output, result.output
print(sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_refused_export_is_a_warning_not_a_verdict(
    receiver: Receiver, files: tuple[Path, Path]
) -> None:
    topology, trace = files
    # The traces endpoint alone turns the export on; this one answers 404.
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url + "/elsewhere"}
    result = CliRunner().invoke(cli, ["check", str(topology), str(trace)], env=env)
    assert result.exit_code == 1, result.output
    assert "otel: the OTLP endpoint did not take the traces of 2 broken chains" in result.output
    assert "sent as traces" not in result.output
    assert receiver.spans() == []


def test_run_sends_the_broken_chain_with_the_trace_its_publish_carried(
    receiver: Receiver, tmp_path: Path, unique: str, rabbitmq_url: str, redis_url: str
) -> None:
    text = f"""
name: {unique}
brokers:
  r: {{kind: rabbitmq, url: "{rabbitmq_url}"}}
  rd: {{kind: redis, url: "{redis_url}"}}
channels:
  orders: {{broker: r, kind: exchange, type: topic, name: {unique}.orders}}
  billing:
    broker: r
    kind: queue
    name: {unique}.billing
    bindings: [{{exchange: orders, key: "#"}}]
  paid: {{broker: rd, kind: stream, name: {unique}.paid}}
flows:
  order: {{correlate: $.order_id, steps: [orders, billing, paid], deadline: 1s}}
"""
    topology = tmp_path / "t.yaml"
    topology.write_text(text)
    reports = tmp_path / "reports"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    try:
        result = _flowcheck(["run", str(topology), "--report-dir", str(reports)], env)
    finally:
        asyncio.run(_delete(text))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "otel: 1 broken chain sent as traces" in result.stdout + result.stderr
    verdict = json.loads((reports / "verdict.json").read_text())
    (lost,) = verdict["flows"][0]["findings"]
    carried = lost["trace_id"]
    # What flowcheck published carried a traceparent: the chain's trace is that one.
    assert carried in {s["trace_id"] for s in lost["timeline"]}
    spans = [s for _, s in receiver.spans()]
    assert {s.trace_id.hex() for s in spans} == {carried}
    (root,) = [s for s in spans if not s.parent_span_id]
    assert root.status.code == Status.STATUS_CODE_ERROR
    names = {s.name for s in spans if s.parent_span_id}
    assert {"send orders", "receive billing"} <= names, names


async def _delete(text: str) -> None:
    from flowcheck.brokers import adapter
    from flowcheck.topology import loads

    top = loads(text)
    for name in ("r", "rd"):
        async with adapter(name, top) as ad:
            await ad.delete([k for k, ch in top.channels.items() if ch.broker == name])

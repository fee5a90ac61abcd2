"""Chains exported over OTLP/HTTP to a receiver the test runs, decoded from protobuf."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
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
    assert "otel: chains sent as traces: 2 broken, 1 passing" in result.stderr

    spans = receiver.spans()
    assert {service for service, _ in spans} == {"shop-check"}
    by_trace = _by_trace(spans)
    derived = chain_trace_id("f", "k2")
    # k1 keeps the trace its message carried; k0 passed, and is sent too.
    assert set(by_trace) == {CARRIED, derived, chain_trace_id("f", "k0")}

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


def _by_trace(spans: list[tuple[str, Span]]) -> dict[str, list[Span]]:
    by_trace: dict[str, list[Span]] = {}
    for _, s in spans:
        by_trace.setdefault(s.trace_id.hex(), []).append(s)
    return by_trace


def _root(spans: list[Span]) -> Span:
    (root,) = [s for s in spans if not s.parent_span_id]
    return root


def test_a_passing_chain_is_a_trace_with_ok_status(
    receiver: Receiver, files: tuple[Path, Path]
) -> None:
    topology, trace = files
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    result = _flowcheck(["check", str(topology), str(trace)], env)
    assert result.returncode == 1, result.stdout + result.stderr
    k0 = _by_trace(receiver.spans())[chain_trace_id("f", "k0")]
    root = _root(k0)
    assert attrs(root) == {"flowcheck.flow": "f", "flowcheck.key": "k0"}
    assert root.status.code == Status.STATUS_CODE_OK
    assert not root.events
    steps = sorted((s for s in k0 if s.parent_span_id), key=lambda s: s.start_time_unix_nano)
    assert [s.name for s in steps] == ["receive a", "receive b"]
    assert [attrs(s)["messaging.message.id"] for s in steps] == ["m0", "m0"]
    assert root.start_time_unix_nano == int(STARTED * 1e9 + 0.1e9)


def test_sampling_at_ratio_zero_keeps_the_broken_chains_only(
    receiver: Receiver, files: tuple[Path, Path]
) -> None:
    topology, trace = files
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
    }
    result = _flowcheck(["check", str(topology), str(trace)], env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "otel: chains sent as traces: 2 broken, 0 passing" in result.stderr
    by_trace = _by_trace(receiver.spans())
    assert set(by_trace) == {CARRIED, chain_trace_id("f", "k2")}
    assert {_root(s).status.code for s in by_trace.values()} == {Status.STATUS_CODE_ERROR}


def test_the_branches_of_a_fan_out_link_to_each_other(receiver: Receiver, tmp_path: Path) -> None:
    topology = tmp_path / "t.yaml"
    topology.write_text(
        """
name: shop
brokers: {r: {kind: rabbitmq}}
channels:
  orders: {broker: r, kind: queue}
  billing: {broker: r, kind: queue}
  audit: {broker: r, kind: queue}
flows:
  order:
    correlate: $.id
    steps: [orders]
    branches: {billing: {steps: [billing]}, audit: {steps: [audit]}}
    deadline: 1s
"""
    )
    trace = tmp_path / "t.jsonl"
    with Writer(str(trace), Header(topology="shop", started=STARTED, started_mono_ns=0)) as w:
        for i, channel in enumerate(["orders", "billing", "audit"]):
            w.write(
                Observation(
                    kind=Kind.ROUTED,
                    broker="r",
                    channel=channel,
                    mono_ns=int((i + 1) * 1e8),
                    wall=STARTED + (i + 1) / 10,
                    keys={"order/billing": "o1", "order/audit": "o1"},
                    message_id="m1",
                )
            )
        w.end("stopped", int(5e9), STARTED + 5)
    result = _flowcheck(
        ["check", str(topology), str(trace)], {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "otel: chains sent as traces: 0 broken, 2 passing" in result.stderr
    by_trace = _by_trace(receiver.spans())
    billing, audit = chain_trace_id("order/billing", "o1"), chain_trace_id("order/audit", "o1")
    assert set(by_trace) == {billing, audit}
    for mine, other in [(billing, audit), (audit, billing)]:
        root, sibling = _root(by_trace[mine]), _root(by_trace[other])
        (link,) = root.links
        # The link names the sibling branch's own root span: Jaeger can jump to it.
        assert (link.trace_id.hex(), link.span_id) == (other, sibling.span_id)
        assert attrs(link)["flowcheck.link"] == "branch"


def test_record_sends_its_chains_once_the_recording_ends(
    receiver: Receiver, tmp_path: Path, unique: str, rabbitmq_url: str
) -> None:
    text = f"""
name: {unique}
brokers:
  r: {{kind: rabbitmq, url: "{rabbitmq_url}"}}
channels:
  orders: {{broker: r, kind: exchange, type: topic, name: {unique}.orders}}
  billing:
    broker: r
    kind: queue
    name: {unique}.billing
    bindings: [{{exchange: orders, key: "#"}}]
  paid:
    broker: r
    kind: queue
    name: {unique}.paid
    bindings: [{{exchange: orders, key: order.paid}}]
flows:
  placed: {{correlate: $.order_id, steps: [orders], deadline: 300ms}}
  paid: {{correlate: $.order_id, steps: [orders, paid], deadline: 300ms}}
"""
    topology = tmp_path / "t.yaml"
    topology.write_text(text)
    out = tmp_path / "trace.jsonl"
    cmd = [sys.executable, "-m", "flowcheck", "record", str(topology), "--out", str(out)]
    cmd += ["--apply", "--duration", "2s"]
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_ready(proc)
        asyncio.run(_place(rabbitmq_url, f"{unique}.orders", f"{unique}-o1"))
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        asyncio.run(_delete(text, ("r",)))
    assert proc.returncode == 0, stdout + stderr
    assert "otel: chains sent as traces: 1 broken, 1 passing" in stderr
    by_trace = _by_trace(receiver.spans())
    roots = {attrs(r)["flowcheck.flow"]: r for r in map(_root, by_trace.values())}
    assert set(roots) == {"placed", "paid"}
    assert roots["placed"].status.code == Status.STATUS_CODE_OK
    assert roots["paid"].status.code == Status.STATUS_CODE_ERROR
    assert [e.name for e in roots["paid"].events] == ["flowcheck.lost"]
    # The same traces flowcheck check names: the broken chain's id is the verdict's.
    reports = tmp_path / "reports"
    checked = _flowcheck(["check", str(topology), str(out), "--report-dir", str(reports)], {})
    verdict = json.loads((reports / "verdict.json").read_text())
    (lost,) = [f for fv in verdict["flows"] for f in fv["findings"]]
    assert lost["trace_id"] == roots["paid"].trace_id.hex(), checked.stderr


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    """Read stderr until the recorder says every tap is watching."""
    assert proc.stderr is not None
    while True:
        readable, _, _ = select.select([proc.stderr.fileno()], [], [], 30)
        assert readable, "the recorder said nothing within 30s"
        line = os.read(proc.stderr.fileno(), 65536).decode()
        assert line, "the recorder ended early"
        if "flowcheck: ready: every tap is watching" in line:
            return


async def _place(url: str, exchange: str, order_id: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        ex = await channel.get_exchange(exchange)
        await ex.publish(
            aio_pika.Message(json.dumps({"order_id": order_id}).encode()),
            routing_key="order.placed",
        )


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
print(sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))))
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
    assert "otel: the OTLP endpoint did not take every trace" in result.output
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
    assert "otel: chains sent as traces: 1 broken, 0 passing" in result.stderr
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


async def _delete(text: str, brokers: tuple[str, ...] = ("r", "rd")) -> None:
    from flowcheck.brokers import adapter
    from flowcheck.topology import loads

    top = loads(text)
    for name in brokers:
        async with adapter(name, top) as ad:
            await ad.delete([k for k, ch in top.channels.items() if ch.broker == name])


def test_a_chain_found_reordered_after_passing_is_sent_once_as_broken(
    receiver: Receiver, tmp_path: Path
) -> None:
    topology = tmp_path / "t.yaml"
    topology.write_text(
        """
name: ledger
brokers: {k: {kind: kafka}, s: {kind: redis}}
channels:
  orders: {broker: k, kind: topic}
  ledger: {broker: s, kind: stream}
flows:
  f:
    correlate: $.id
    steps: [orders, ledger]
    deadline: 1s
    ordering: {per: $.account, seq: $.seq}
"""
    )
    trace = tmp_path / "t.jsonl"

    def obs(channel: str, at: float, seq: int, **more: Any) -> Observation:
        broker = "k" if channel == "orders" else "s"
        body = json.dumps({"id": f"a-{seq}", "account": "a", "seq": seq})
        return Observation(
            kind=Kind.ROUTED,
            broker=broker,
            channel=channel,
            mono_ns=int(at * 1e9),
            wall=STARTED + at,
            keys={"f": f"a-{seq}"},
            payload=body,
            **more,
        )

    with Writer(str(trace), Header(topology="ledger", started=STARTED, started_mono_ns=0)) as w:
        # a-1 completes and passes at its deadline; a late copy of it reaches the ledger
        # after a-2 (seq 2): its key is decided again, reordered.
        w.write(obs("orders", 0.1, 1, partition=0, offset=0))
        w.write(obs("ledger", 0.2, 1, entry_id="2000-0", broker_ms=2000))
        w.write(obs("orders", 3.0, 2, partition=0, offset=1))
        w.write(obs("ledger", 3.1, 2, entry_id="5000-0", broker_ms=5000))
        w.write(obs("ledger", 3.2, 1, entry_id="5001-0", broker_ms=5001))
        w.end("stopped", int(10e9), STARTED + 10)
    reports = tmp_path / "reports"
    result = _flowcheck(
        ["check", str(topology), str(trace), "--report-dir", str(reports)],
        {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "otel: chains sent as traces: 1 broken, 1 passing" in result.stderr
    verdict = json.loads((reports / "verdict.json").read_text())
    kinds = {(f["kind"], f["key"]) for fv in verdict["flows"] for f in fv["findings"]}
    assert ("reordered", "a-1") in kinds
    by_trace = _by_trace(receiver.spans())
    a1, a2 = chain_trace_id("f", "a-1"), chain_trace_id("f", "a-2")
    assert set(by_trace) == {a1, a2}
    # One root for a-1, with its final status: broken, not an OK root beside an error one.
    (root,) = [s for s in by_trace[a1] if not s.parent_span_id]
    assert root.status.code == Status.STATUS_CODE_ERROR
    assert "flowcheck.reordered" in [e.name for e in root.events]
    assert _root(by_trace[a2]).status.code == Status.STATUS_CODE_OK

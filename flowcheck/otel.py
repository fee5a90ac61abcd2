"""Broken chains as OpenTelemetry traces, sent over OTLP after judging.

Only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
set: otherwise :func:`export` returns at once and the SDK is never imported. The
exporter reads the standard ``OTEL_EXPORTER_OTLP_*`` variables (headers, timeout, ...).

Each broken chain is one trace, with the trace id its findings carry
(:func:`flowcheck.checker.verdict.chain_trace_id`): the one its message carried
(``traceparent``), else one derived from its flow and key. A root span covers the chain, with error
status and each finding as an event; each observation of its timeline is a child
span with the messaging semantic conventions. A step whose message carried another
trace id (a fan-in or fan-out) links to that trace.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flowcheck.checker.verdict import chain_trace_id

if TYPE_CHECKING:
    from flowcheck.checker.verdict import Finding, Verdict
    from flowcheck.topology.model import Topology

ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
CAP = 1000  # broken chains exported per verdict at most: a storm of failures is sampled
# Observation kind -> messaging.operation.type
OPERATIONS = {
    "published": "send",
    "unroutable": "send",
    "routed": "receive",
    "delivered": "receive",
    "redelivered": "receive",
    "dead_lettered": "receive",
    "pending": "receive",
    "trimmed": "receive",
    "consumed": "settle",
}


def enabled() -> bool:
    return any(os.environ.get(name) for name in ENDPOINTS)


def broken_chains(findings: Iterable[Finding]) -> dict[tuple[str, str | None], list[Finding]]:
    """The findings of each broken chain, by (flow, key): those with a timeline."""
    chains: dict[tuple[str, str | None], list[Finding]] = defaultdict(list)
    for finding in findings:
        if finding.timeline and finding.flow is not None:
            chains[(finding.flow, finding.key)].append(finding)
    return chains


def export(verdict: Verdict, topology: Topology, started: float) -> tuple[int, bool]:
    """Send each broken chain of ``verdict`` as a trace; ``started`` is the recording's
    start (Unix seconds), what the timelines' times count from. (Chains, whether the
    receiver took them all.)"""
    return export_findings((f for fv in verdict.flows for f in fv.findings), topology, started)


def export_findings(
    findings: Iterable[Finding], topology: Topology, started: float
) -> tuple[int, bool]:
    """:func:`export` for findings of any origin (a test's failed assertions)."""
    if not enabled():
        return 0, True
    chains = list(broken_chains(findings).items())[:CAP]
    if not chains:
        return 0, True
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    ids = _ids()
    exporter = _exporter()
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "flowcheck")})
    provider = TracerProvider(resource=resource, id_generator=ids)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("flowcheck")
    systems: dict[str, str] = {name: b.kind for name, b in topology.brokers.items()}
    try:
        for (flow, key), findings in chains:
            _chain(tracer, ids, systems, flow, key, findings, started)
    finally:
        provider.shutdown()  # flushes: every span is sent before the verdict's exit
    return len(chains), not exporter.failed


def _valid(trace_id: str) -> bool:
    try:
        return len(trace_id) == 32 and int(trace_id, 16) != 0
    except ValueError:
        return False


def _ns(started: float, at_ms: float) -> int:
    return int(started * 1e9 + at_ms * 1e6)


def _chain(
    tracer: Any,
    ids: Any,
    systems: dict[str, str],
    flow: str,
    key: str | None,
    findings: list[Finding],
    started: float,
) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

    # A test may assert on one chain twice: each finding once.
    findings = list({(f.kind, f.step, f.message): f for f in findings}.values())
    timeline = sorted(
        {s: None for f in findings for s in f.timeline}, key=lambda s: s.at_ms
    )  # the findings of one chain share its timeline: each observation once
    trace_id = findings[0].trace_id or chain_trace_id(
        flow, key or "", (s.trace_id for s in timeline)
    )
    ids.next_trace_id = int(trace_id, 16)
    first, last = timeline[0].at_ms, timeline[-1].at_ms
    root = tracer.start_span(
        f"flow {flow}",
        start_time=_ns(started, first),
        attributes={"flowcheck.flow": flow, "flowcheck.key": key or ""},
    )
    for f in findings:
        root.add_event(
            f"flowcheck.{f.kind.value}",
            attributes={
                "flowcheck.finding": f.kind.value,
                "message": f.message,
                **({"flowcheck.step": f.step} if f.step else {}),
                **({"flowcheck.cause": f.cause.value} if f.cause else {}),
            },
            timestamp=_ns(started, last),
        )
    root.set_status(Status(StatusCode.ERROR, findings[0].message))
    context = trace.set_span_in_context(root)
    for i, seen in enumerate(timeline):
        operation = OPERATIONS.get(seen.kind, "receive")
        attributes: dict[str, Any] = {
            "messaging.system": systems.get(seen.broker or "", seen.broker or ""),
            "messaging.destination.name": seen.channel,
            "messaging.operation.type": operation,
            "flowcheck.observation": seen.kind,
        }
        optional = {
            "messaging.message.id": seen.message_id,
            "messaging.rabbitmq.destination.routing_key": seen.routing_key,
            "messaging.consumer.group.name": seen.group,
            "messaging.destination.partition.id": None
            if seen.partition is None
            else str(seen.partition),
            "messaging.kafka.offset": seen.offset,
            "flowcheck.id": seen.fc_id,
            "flowcheck.delivery_count": seen.delivery_count,
            "flowcheck.reason": seen.reason,
        }
        attributes.update({k: v for k, v in optional.items() if v is not None})
        links = []
        if seen.trace_id and _valid(seen.trace_id) and seen.trace_id.lower() != trace_id:
            other = SpanContext(
                trace_id=int(seen.trace_id, 16),
                span_id=int(hashlib.sha256(seen.trace_id.encode()).hexdigest()[:16], 16) or 1,
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
            )
            links.append(Link(other, {"flowcheck.link": "message trace"}))
        # A step lasts until the chain's next observation: what it took to move on.
        end = timeline[i + 1].at_ms if i + 1 < len(timeline) else seen.at_ms
        span = tracer.start_span(
            f"{operation} {seen.channel}",
            context=context,
            kind=SpanKind.PRODUCER if operation == "send" else SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
            start_time=_ns(started, seen.at_ms),
        )
        if seen.kind in ("dead_lettered", "unroutable", "trimmed"):
            span.set_status(Status(StatusCode.ERROR, seen.reason or seen.kind))
        span.end(end_time=_ns(started, end))
    root.end(end_time=_ns(started, last))


def _ids() -> Any:
    """An id generator: span ids at random, the trace id of the next root span set by
    the caller (``next_trace_id``)."""
    from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

    class Ids(IdGenerator):
        def __init__(self) -> None:
            self.random = RandomIdGenerator()
            self.next_trace_id = 0

        def generate_span_id(self) -> int:
            return self.random.generate_span_id()

        def generate_trace_id(self) -> int:
            return self.next_trace_id or self.random.generate_trace_id()

    return Ids()


def _exporter() -> Any:
    """The OTLP/HTTP exporter (configured by the OTEL_EXPORTER_OTLP_* variables), noting
    whether an export failed (the exporter logs why)."""
    from collections.abc import Sequence

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExportResult

    class Exporter(OTLPSpanExporter):
        failed = False

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            result = super().export(spans)
            if result is not SpanExportResult.SUCCESS:
                self.failed = True
            return result

    return Exporter()

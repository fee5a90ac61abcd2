"""Chains as OpenTelemetry traces, sent over OTLP/HTTP.

Only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
set: otherwise :func:`start` returns None and the SDK is never imported. The
exporter reads the standard ``OTEL_EXPORTER_OTLP_*`` variables (headers, timeout, ...),
the sampler ``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_SAMPLER_ARG``.

Each chain is one trace, with the trace id its findings carry
(:func:`flowcheck.checker.verdict.chain_trace_id`): the one its message carried
(``traceparent``), else one derived from its flow and key. A root span covers the
chain, with error status and each finding as an event when it broke, OK when it
passed; each observation of its timeline is a child span with the messaging semantic
conventions. A step whose message carried another trace id (a fan-in) links to that
trace; a branch of a flow (fan-out) links to its sibling branches' chains.

Chains go as the checker decides them (:meth:`Export.decided`, a ``Checker``'s
``on_decided``), so almost nothing is kept per chain: broken ones always (at most CAP),
passing and unknown ones as the sampler says. Each chain (flow and key: one trace id) is
sent once, with its final status: a key decided again later (a late copy opens a new
chain, which sequence ordering may find reordered) would otherwise give its trace an OK
root and an error root. So the passing chains of flows that declare ``ordering`` are held
(at most HOLD, the oldest sent first past that) until :meth:`Export.close`, and dropped
if their key breaks meanwhile; a chain sent as broken is never sent again.
:func:`export_observations` judges a whole recording again for its export (record, run,
the pytest plugin).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from flowcheck.checker.verdict import chain_trace_id

if TYPE_CHECKING:
    from flowcheck.checker import Decided, Finding, Seen
    from flowcheck.observations import Observation
    from flowcheck.topology.model import Topology

ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
TIMEOUTS = ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
CAP = 1000  # broken chains exported per run at most: a storm of failures is cut
BATCH = 512  # spans per OTLP request
HOLD = 1000  # passing chains of ordered flows held until the end, at most (memory)
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


def timeout_set() -> bool:
    """Did the user set the OTLP timeout (else the exporter's 10s)?"""
    return any(os.environ.get(name) for name in TIMEOUTS)


class Sent(NamedTuple):
    broken: int  # broken chains sent
    passing: int  # passing chains the sampler kept
    unknown: int  # chains that could not be judged, the sampler kept
    ok: bool  # the receiver took every request (after a refusal, nothing more is sent)


def start(topology: Topology, started: float, *, timeout: float | None = None) -> Export | None:
    """An export for one run, None without an endpoint (nothing imported then).
    ``started``: the recording's start (Unix seconds), what timelines count from;
    ``timeout``: seconds an OTLP request may take, instead of the variables'."""
    return Export(topology, started, timeout) if enabled() else None


def export_observations(
    topology: Topology,
    observations: Iterable[Observation],
    *,
    started: float,
    start_ns: int,
    stop_ns: int | None = None,
    end_ns: int | Callable[[], int | None] | None = None,
    findings: Iterable[Finding] = (),
    timeout: float | None = None,
) -> Sent | None:
    """Judge ``observations`` (a recording, in order) again, as ``flowcheck check`` does,
    and send every chain: broken ones always, the others as sampled. ``findings``'
    broken chains (a run's verdict, a test's failed assertions) go first and win over
    the new judgement. ``started``: the recording's start (Unix seconds), with
    ``start_ns`` its monotonic time; ``stop_ns``: when the stop was asked; ``end_ns``:
    when the taps stopped (or a callable asked once every observation is read), default
    the last observation. None without an endpoint (nothing imported then)."""
    from flowcheck.checker import Checker

    out = start(topology, started, timeout=timeout)
    if out is None:
        return None
    out.findings(findings)
    checker = Checker(topology, start_ns=start_ns, stop_ns=stop_ns, on_decided=out.decided)
    for obs in observations:
        checker.feed(obs)
    end = end_ns() if callable(end_ns) else end_ns
    again = checker.finish(end)
    out.findings(f for fv in again.flows for f in fv.findings)  # failed after deciding
    return out.close()


def broken_chains(findings: Iterable[Finding]) -> dict[tuple[str, str | None], list[Finding]]:
    """The findings of each broken chain, by (flow, key): those with a timeline."""
    chains: dict[tuple[str, str | None], list[Finding]] = {}
    for finding in findings:
        if finding.timeline and finding.flow is not None:
            chains.setdefault((finding.flow, finding.key), []).append(finding)
    return chains


class Export:
    """One run's traces: chains as the checker decides them (:meth:`decided`), and the
    broken chains of findings made elsewhere (:meth:`findings`); :meth:`close` sends
    what is left."""

    def __init__(self, topology: Topology, started: float, timeout: float | None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision

        self.started = started
        self.ids = _ids()
        self.batches = _batches(_exporter(timeout))
        service = os.environ.get("OTEL_SERVICE_NAME", "flowcheck")
        # The sampler the variables name; it judges passing chains only, once per chain.
        self.sampler = TracerProvider(shutdown_on_exit=False).sampler
        self.keep = Decision.RECORD_AND_SAMPLE
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service}),
            id_generator=self.ids,
            sampler=ALWAYS_ON,
            shutdown_on_exit=False,
        )
        self.provider.add_span_processor(self.batches)
        self.tracer = self.provider.get_tracer("flowcheck")
        self.systems = {name: b.kind for name, b in topology.brokers.items()}
        # flow -> its sibling branches (fan-out), for links
        self.siblings: dict[str, list[str]] = {}
        for name, flow in topology.flows.items():
            if flow.branch_of is not None:
                self.siblings.setdefault(flow.branch_of, []).append(name)
        self.branch_of = {n: f.branch_of for n, f in topology.flows.items() if f.branch_of}
        self.sent: set[tuple[str, str | None]] = set()  # broken chains sent (at most CAP)
        # Flows whose keys may break after a passing decision (ordering): their passing
        # chains wait in ``held`` until close, the oldest sent past HOLD.
        self.ordered = {n for n, f in topology.flows.items() if f.ordering != "none"}
        self.held: dict[tuple[str, str | None], tuple[list[Seen], str, bool]] = {}
        self.kept = {"passed": 0, "unknown": 0}  # chains the sampler kept, by outcome
        self.over = 0  # broken chains past CAP, not sent

    def decided(self, d: Decided) -> None:
        """A ``Checker``'s ``on_decided``: send the chain, if broken or sampled."""
        if d.outcome == "failed":
            self._broken(d.flow, d.key, d.timeline(), list(d.findings))
            return
        chain = (d.flow, d.key)
        if chain in self.sent or chain in self.held:
            return  # broken already (a run's verdict, judged live), or decided before
        trace_id = d.trace_id
        sampled = self.sampler.should_sample(None, int(trace_id, 16), f"flow {d.flow}")
        if sampled.decision is not self.keep:
            return
        self.kept[d.outcome] += 1
        unknown = d.outcome == "unknown"
        if d.flow not in self.ordered:
            self._chain(d.flow, d.key, d.timeline(), [], trace_id, unknown=unknown)
            return
        self.held[chain] = (d.timeline(), trace_id, unknown)
        if len(self.held) > HOLD:
            self._release(next(iter(self.held)))

    def findings(self, findings: Iterable[Finding]) -> None:
        """Send the broken chains of ``findings`` not sent yet (those with a timeline):
        a verdict's chains failed after their decision, a test's failed assertions."""
        for (flow, key), found in broken_chains(findings).items():
            if (flow, key) not in self.sent:
                timeline = sorted({s: None for f in found for s in f.timeline}, key=_at)
                self._broken(flow, key, timeline, found)

    def close(self) -> Sent:
        """Send what is left (the held passing chains first); how it went."""
        while self.held:
            self._release(next(iter(self.held)))
        self.provider.shutdown()
        kept = self.kept
        return Sent(len(self.sent), kept["passed"], kept["unknown"], not self.batches.failed)

    def _broken(
        self, flow: str, key: str | None, timeline: list[Seen], findings: list[Finding]
    ) -> None:
        if (flow, key) in self.sent:
            return
        held = self.held.pop((flow, key), None)
        if held is not None:  # it passed first: only its final, broken status goes
            self.kept["unknown" if held[2] else "passed"] -= 1
        if len(self.sent) >= CAP:
            self.over += 1
            return
        self.sent.add((flow, key))
        # A test may assert on one chain twice: each finding once.
        findings = list({(f.kind, f.step, f.message): f for f in findings}.values())
        trace_id = findings[0].trace_id or chain_trace_id(
            flow, key or "", (s.trace_id for s in timeline)
        )
        self._chain(flow, key, timeline, findings, trace_id)

    def _release(self, chain: tuple[str, str | None]) -> None:
        timeline, trace_id, unknown = self.held.pop(chain)
        self._chain(chain[0], chain[1], timeline, [], trace_id, unknown=unknown)

    def _chain(
        self,
        flow: str,
        key: str | None,
        timeline: list[Seen],
        findings: list[Finding],
        trace_id: str,
        *,
        unknown: bool = False,
    ) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Link, SpanKind, Status, StatusCode

        if not timeline:
            return
        first, last = timeline[0].at_ms, timeline[-1].at_ms
        links = [
            Link(
                _remote(chain_trace_id(other, key or "", (s.trace_id for s in timeline)), other),
                {"flowcheck.link": "branch", "flowcheck.flow": other},
            )
            for other in self.siblings.get(self.branch_of.get(flow, ""), ())
            if other != flow
        ]
        self.ids.next_trace_id = int(trace_id, 16)
        self.ids.next_span_id = _root_span_id(trace_id, flow)
        root = self.tracer.start_span(
            f"flow {flow}",
            start_time=self._ns(first),
            attributes={
                "flowcheck.flow": flow,
                "flowcheck.key": key or "",
                **({"flowcheck.outcome": "unknown"} if unknown else {}),
            },
            links=links,
        )
        self.ids.next_trace_id = self.ids.next_span_id = 0
        for f in findings:
            root.add_event(
                f"flowcheck.{f.kind.value}",
                attributes={
                    "flowcheck.finding": f.kind.value,
                    "message": f.message,
                    **({"flowcheck.step": f.step} if f.step else {}),
                    **({"flowcheck.cause": f.cause.value} if f.cause else {}),
                },
                timestamp=self._ns(last),
            )
        if findings:
            root.set_status(Status(StatusCode.ERROR, findings[0].message))
        elif not unknown:  # unknown: not judged, neither OK nor an error
            root.set_status(Status(StatusCode.OK))
        context = trace.set_span_in_context(root)
        for i, seen in enumerate(timeline):
            operation = OPERATIONS.get(seen.kind, "receive")
            attributes: dict[str, Any] = {
                "messaging.system": self.systems.get(seen.broker or "", seen.broker or ""),
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
            carried = seen.trace_id
            step_links = []
            if carried and _valid(carried) and carried.lower() != trace_id:
                # Fan-in: the message carried another trace (another chain's, or its
                # producer's): a link to it.
                step_links.append(Link(_remote(carried.lower()), {"flowcheck.link": "message"}))
            # A step lasts until the chain's next observation: what it took to move on.
            end = timeline[i + 1].at_ms if i + 1 < len(timeline) else seen.at_ms
            span = self.tracer.start_span(
                f"{operation} {seen.channel}",
                context=context,
                kind=SpanKind.PRODUCER if operation == "send" else SpanKind.CONSUMER,
                attributes=attributes,
                links=step_links,
                start_time=self._ns(seen.at_ms),
            )
            if seen.kind in ("dead_lettered", "unroutable", "trimmed"):
                span.set_status(Status(StatusCode.ERROR, seen.reason or seen.kind))
            span.end(end_time=self._ns(end))
        root.end(end_time=self._ns(last))

    def _ns(self, at_ms: float) -> int:
        return int(self.started * 1e9 + at_ms * 1e6)


def _at(seen: Seen) -> float:
    return seen.at_ms


def _valid(trace_id: str) -> bool:
    try:
        return len(trace_id) == 32 and int(trace_id, 16) != 0
    except ValueError:
        return False


def _root_span_id(trace_id: str, flow: str | None = None) -> int:
    """The root span id of a chain's trace: from its trace id (and flow, as branches
    of one message may share a trace), so that links can name it without state."""
    seed = trace_id if flow is None else f"{trace_id}\0{flow}"
    return int(hashlib.sha256(seed.encode()).hexdigest()[:16], 16) or 1


def _remote(trace_id: str, flow: str | None = None) -> Any:
    from opentelemetry.trace import SpanContext, TraceFlags

    return SpanContext(
        trace_id=int(trace_id, 16),
        span_id=_root_span_id(trace_id, flow),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )


def _ids() -> Any:
    """An id generator: ids at random, but the trace and span id of the next root span
    set by the caller (``next_trace_id``, ``next_span_id``)."""
    from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

    class Ids(IdGenerator):
        def __init__(self) -> None:
            self.random = RandomIdGenerator()
            self.next_trace_id = 0
            self.next_span_id = 0

        def generate_span_id(self) -> int:
            return self.next_span_id or self.random.generate_span_id()

        def generate_trace_id(self) -> int:
            return self.next_trace_id or self.random.generate_trace_id()

    return Ids()


def _batches(exporter: Any) -> Any:
    """A span processor that sends BATCH spans a request, in the caller's thread: memory
    stays bounded and no span is dropped for a full queue (the SDK's batch processor
    drops). After a request fails, the rest is dropped: a receiver that is down costs
    one timeout, not one per batch."""
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
    from opentelemetry.sdk.trace.export import SpanExportResult

    class Batches(SpanProcessor):
        def __init__(self) -> None:
            self.spans: list[ReadableSpan] = []
            self.failed = False

        def on_end(self, span: ReadableSpan) -> None:
            if self.failed:
                return
            self.spans.append(span)
            if len(self.spans) >= BATCH:
                self.flush()

        def flush(self) -> None:
            spans, self.spans = self.spans, []
            if spans and not self.failed:
                self.failed = exporter.export(spans) is not SpanExportResult.SUCCESS

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            self.flush()
            return not self.failed

        def shutdown(self) -> None:
            self.flush()
            exporter.shutdown()

    return Batches()


def _exporter(timeout: float | None) -> Any:
    """The OTLP/HTTP exporter, configured by the OTEL_EXPORTER_OTLP_* variables."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(timeout=timeout)

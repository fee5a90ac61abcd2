"""W3C trace context on the messages flowcheck publishes, through OpenTelemetry.

With an OpenTelemetry tracer provider configured, each publish is a PRODUCER
span (``send <destination>``, messaging semantic conventions) and its context
goes into the headers. Without one, flowcheck still injects a fresh, valid
``traceparent`` so chains can be correlated by trace id.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

_tracer = trace.get_tracer("flowcheck")


@contextmanager
def producer_span(
    system: str, destination: str, headers: MutableMapping[str, Any], **attributes: Any
) -> Iterator[trace.Span]:
    """Open a PRODUCER span for one publish and inject its context into ``headers``."""
    attrs = {
        "messaging.system": system,
        "messaging.operation.type": "send",
        "messaging.destination.name": destination,
        **{k: v for k, v in attributes.items() if v is not None},
    }
    with _tracer.start_as_current_span(
        f"send {destination}", kind=SpanKind.PRODUCER, attributes=attrs
    ) as span:
        ctx = None
        if not span.get_span_context().is_valid:
            # No SDK: make a valid context of our own so the message is traceable.
            own = SpanContext(
                trace_id=int.from_bytes(secrets.token_bytes(16), "big") or 1,
                span_id=int.from_bytes(secrets.token_bytes(8), "big") or 1,
                is_remote=False,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
            )
            ctx = trace.set_span_in_context(NonRecordingSpan(own))
        propagate.inject(headers, context=ctx)
        yield span

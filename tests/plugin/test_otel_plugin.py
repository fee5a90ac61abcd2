"""The pytest plugin sends every chain a test saw over OTLP: its failed assertions' and
the broken ones always, the passing ones as sampled."""

from __future__ import annotations

import socket

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from otlp import Receiver, attrs

from flowcheck.checker.verdict import chain_trace_id

from . import project

LOST = """
    import pytest

    from flowcheck.testing import Flowcheck

    pytestmark = pytest.mark.asyncio


    async def test_lost(flowcheck: Flowcheck) -> None:
        await flowcheck.publish("orders", {"order_id": "o-1"}, routing_key="order.misplaced")
        await flowcheck.check("order-billed", within="300ms")
"""


def test_a_failed_chain_is_sent_as_a_trace(
    pytester: pytest.Pytester, broker_flags: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    project.make(pytester, "flowcheck_isolate = true\n", test_lost=LOST)
    with Receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        # In a process of its own: the exporter's HTTP client does not survive the
        # module juggling of in-process runs after other inner runs.
        result = pytester.runpytest_subprocess(*broker_flags)
        spans = [s for _, s in receiver.spans()]
    result.assert_outcomes(failed=1)
    (root,) = [s for s in spans if not s.parent_span_id]
    assert root.name == "flow order-billed"
    assert attrs(root)["flowcheck.key"] == "o-1"
    assert root.status.code == Status.STATUS_CODE_ERROR
    assert [e.name for e in root.events] == ["flowcheck.lost"]
    steps = [s for s in spans if s.parent_span_id == root.span_id]
    assert steps, "no span for the chain's steps"
    assert {attrs(s)["messaging.system"] for s in steps} == {"rabbitmq"}
    # The trace is the one flowcheck's publish put in the message's traceparent,
    # not one derived from flow and key.
    assert root.trace_id.hex() != chain_trace_id("order-billed", "o-1")


PASSED = """
    import pytest

    from flowcheck.testing import Flowcheck

    pytestmark = pytest.mark.asyncio


    async def test_billed(flowcheck: Flowcheck) -> None:
        await flowcheck.publish("orders", {"order_id": "o-2"}, routing_key="order.placed")
        await flowcheck.chain("order-billed", "o-2").completes(within="5s")
"""


def test_a_passing_chain_is_sent_with_ok_status(
    pytester: pytest.Pytester, broker_flags: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    project.make(pytester, "flowcheck_isolate = true\n", test_billed=PASSED)
    with Receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        result = pytester.runpytest_subprocess(*broker_flags)
        spans = [s for _, s in receiver.spans()]
    result.assert_outcomes(passed=1)
    roots = [s for s in spans if not s.parent_span_id]
    (root,) = [r for r in roots if attrs(r)["flowcheck.flow"] == "order-billed"]
    assert attrs(root)["flowcheck.key"] == "o-2"
    assert root.status.code == Status.STATUS_CODE_OK
    assert not root.events
    steps = [s for s in spans if s.parent_span_id == root.span_id]
    assert {attrs(s)["messaging.destination.name"] for s in steps} >= {"orders", "billing"}


def test_an_endpoint_that_is_down_holds_teardown_up_briefly_and_says_so(
    pytester: pytest.Pytester, broker_flags: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    project.make(pytester, "flowcheck_isolate = true\n", test_lost=LOST)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    for name in ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    result = pytester.runpytest_subprocess(*broker_flags)
    result.assert_outcomes(failed=1, warnings=1)
    # The exporter's own 10s of retries are cut to the plugin's bound, in one warning line.
    result.stdout.fnmatch_lines(
        [
            "*PytestWarning: flowcheck: otel: the OTLP endpoint did not take the traces "
            "of 1 broken and 0 other chain(s) within 2s; the test went on without them"
        ]
    )

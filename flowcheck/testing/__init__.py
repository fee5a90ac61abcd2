"""Assertions on event flows, for integration tests: the API behind the pytest plugin.

A :class:`FlowSession` watches a topology's channels on the real brokers while a
test runs. The test publishes (or lets its own code publish), then asserts::

    async with FlowSession(topology, prefix="t-1.") as fc:
        await fc.publish("orders", {"order_id": "o-1"}, routing_key="order.placed")
        await fc.chain("order-billed", "o-1").completes(within="2s")
        await fc.never_published("billing.dlq", key="o-1", within="500ms")
        await fc.check("order-billed")           # nothing lost, duplicated, late, ...
        assert fc.latency("order-billed").p99 < "250ms"

Every assertion waits for the observations it needs and returns as soon as it
has them; none sleeps. ``completes`` and ``check`` then watch for the flow's
settle time past the chain's end (:func:`settle_time`), as taps may see a
forbidden copy late, and fail as soon as one comes. Only
:meth:`FlowSession.never_published` waits its whole window, because there the
deadline itself is the event. A failed assertion
raises :class:`FlowAssertionError` (an :class:`AssertionError`) whose message
draws the chain's timeline, where it stopped and what was expected next.

With the pytest plugin (``flowcheck.pytest_plugin``) tests get a started
:class:`FlowSession` from the ``flowcheck`` fixture; see docs/pytest.md.

Taps run in a task of their own, so a :class:`FlowSession` may be started in one
task and stopped in another (pytest-asyncio runs fixture setup and teardown
that way). The broker clients are asyncio libraries: run it on asyncio.

``Flowcheck`` is another name of :class:`FlowSession`, the name it had first: code
and docs that import it keep working.

The package's modules: ``_session`` (the session, its waits and the assertions on
flows), ``_chain`` (the assertions on one chain), ``_results`` (what they return and
raise), ``_waits`` (durations and settle times). The topology transforms live in
:mod:`flowcheck.topology.transform` (re-exported here), the timeline drawing in
:mod:`flowcheck.reporting.timeline`.
"""

from flowcheck.testing._chain import Chain
from flowcheck.testing._results import FlowAssertionError, HopLatency, Took
from flowcheck.testing._session import TIMELINE_HEAD, TIMELINE_TAIL, FlowSession
from flowcheck.testing._waits import (
    DEFAULT_DEADLINE,
    SETTLE_MARGIN,
    Within,
    late_copy_breaks,
    seconds,
    settle_time,
    unique_prefix,
)
from flowcheck.topology.transform import flow_channels, isolated, with_brokers

Flowcheck = FlowSession  # the first name of the session class; kept for users' code and docs

# Tracebacks and reprs name the classes where users import them from.
for _cls in (Chain, FlowAssertionError, FlowSession, HopLatency, Took):
    _cls.__module__ = __name__
del _cls

__all__ = [
    "DEFAULT_DEADLINE",
    "SETTLE_MARGIN",
    "TIMELINE_HEAD",
    "TIMELINE_TAIL",
    "Chain",
    "FlowAssertionError",
    "FlowSession",
    "Flowcheck",
    "HopLatency",
    "Took",
    "Within",
    "flow_channels",
    "isolated",
    "late_copy_breaks",
    "seconds",
    "settle_time",
    "unique_prefix",
    "with_brokers",
]

"""Durations in the tests' terms: waits, deadlines, a flow's settle time; per-test names."""

from __future__ import annotations

import re
import secrets
from datetime import timedelta

from flowcheck.errors import UsageError
from flowcheck.topology import format_duration, parse_duration
from flowcheck.topology.model import Flow, Topology
from flowcheck.topology.transform import flow_channels

DEFAULT_DEADLINE = timedelta(seconds=10)
# Added to the taps' lateness in a flow's settle time: how much later than its first copy a
# consumer's own second publish of one message may come (a retry, a send done twice).
SETTLE_MARGIN = timedelta(milliseconds=50)

Within = str | float | timedelta


def late_copy_breaks(flow: Flow) -> bool:
    """Can a copy seen after a chain of ``flow`` has reached its end break what the flow
    declares? A duplicate can (exactly-once, at-most-once), so can an arrival out of
    order (ordering) and one more attempt (a retry policy, a dead letter's attempts)."""
    return (
        flow.delivery != "at-least-once"
        or flow.ordering != "none"
        or flow.retry is not None
        or any(s.retry is not None for s in flow.steps)
        or any(r.attempts is not None for r in flow.dead_letters)
    )


def settle_time(topology: Topology, flow: str) -> timedelta:
    """How long to keep watching a chain of ``flow`` after it reached its end, for a late
    copy the flow forbids: the longest a tap of its channels may see a message late
    (:meth:`Topology.tap_late`), plus :data:`SETTLE_MARGIN`; zero for a flow that no
    late copy can break (:func:`late_copy_breaks`)."""
    if not late_copy_breaks(topology.flows[flow]):
        return timedelta(0)
    lateness = [
        late[0]
        for ch in sorted(flow_channels(topology, [flow]))
        if (late := topology.tap_late(ch)) is not None
    ]
    return max(lateness, default=timedelta(0)) + SETTLE_MARGIN


_ZERO = re.compile(r"\s*0+(?:\.0*)?\s*(?:us|µs|ms|s|m|h)?\s*")


def seconds(value: Within) -> float:
    """A wait: ``"2s"``, ``"250ms"``, a number of seconds, or a timedelta (``"0s"``: none)."""
    if isinstance(value, str) and _ZERO.fullmatch(value):
        return 0.0
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool):
        raise TypeError("write a duration like '2s' or a number of seconds")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a wait cannot be negative")
        return float(value)
    return parse_duration(value).total_seconds()


def seconds_of(value: Within, what: str) -> float:
    """:func:`seconds`, failing with a :class:`UsageError` that names the argument."""
    __tracebackhide__ = True
    try:
        return seconds(value)
    except (TypeError, ValueError) as exc:
        # A typo in a test: say it in the test's terms, not as a trace through the parser.
        raise UsageError(f"{what}={value!r}: {exc}") from None


def spell(value: float) -> str:
    return format_duration(timedelta(seconds=value)) if value > 0 else "0s"


def unique_prefix(test_name: str, worker: str | None = None, max_len: int = 32) -> str:
    """A per-test name prefix: the test's name squeezed into ``[a-z0-9-]``, the xdist
    worker, a random part, then a dot: valid in every broker's names."""
    base = "".join(c if c.isalnum() and c.isascii() else "-" for c in test_name.lower())
    while "--" in base:
        base = base.replace("--", "-")
    base = base.strip("-")[:max_len].strip("-") or "test"
    parts = [base, worker or "", secrets.token_hex(4)]
    return "-".join(p for p in parts if p) + "."

"""How long the checker waits for a chain before deciding it: what a run or a recording
must outlast for every chain it started to be decided."""

from __future__ import annotations

from datetime import timedelta

from flowcheck.topology.model import Topology

DEFAULT_WINDOW = timedelta(seconds=60)  # how long a chain may take when the flow sets no deadline
GRACE_NS = 2_000_000_000  # taps see one event at slightly different times: wait this much more


def window(topology: Topology) -> timedelta:
    """The longest window of the topology's flows: a chain is decided this long after it
    was first seen (its flow's deadline, or the default, plus the taps' grace)."""
    longest = max(
        (f.deadline or DEFAULT_WINDOW for f in topology.flows.values()), default=DEFAULT_WINDOW
    )
    return longest + timedelta(microseconds=GRACE_NS // 1000)

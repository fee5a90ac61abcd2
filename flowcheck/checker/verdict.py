"""The verdict: what the checker concluded, per flow. Stable and documented (docs/verdict.md).

Reporters read a :class:`Verdict` and nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

VERDICT_VERSION = 1


class FindingKind(StrEnum):
    LOST = "lost"  # an expected step never came (see ``cause``)
    DUPLICATED = "duplicated"  # more messages at a step than the flow allows
    UNEXPECTED = "unexpected"  # a chain seen mid-way that never started
    REORDERED = "reordered"  # two messages of one ordering key swapped
    SEQUENCE_GAP = "sequence_gap"  # sequence numbers of an entity never seen at a step
    LATE = "late"  # a step or the chain came after its deadline
    RETRIES = "retries"  # too many or too few attempts
    BACKOFF = "backoff"  # attempts closer together than the backoff allows
    DEAD_LETTER = "dead_letter"  # missing, wrong place, wrong reason, or a healthy one
    GIVE_UP = "give_up"  # a healthy message given up after several attempts, or an expected give-up that went on
    SCHEMA = "schema"  # a payload that breaks its channel's schema
    LATENCY = "latency"  # a percentile over its budget
    THRESHOLD = "threshold"  # success or error rate outside its bound
    CONFIG = "config"  # the topology itself loses messages silently
    UNROUTED = "unrouted"  # deliveries from a step that no message was seen reaching
    UNACKNOWLEDGED = "unacknowledged"  # delivered to a consumer group, still pending


# Findings that make the chain they are about a failed one (judged by the success threshold).
CHAIN_KINDS = {
    FindingKind.LOST,
    FindingKind.DUPLICATED,
    FindingKind.UNEXPECTED,
    FindingKind.REORDERED,
    FindingKind.LATE,
    FindingKind.RETRIES,
    FindingKind.BACKOFF,
    FindingKind.DEAD_LETTER,
    FindingKind.GIVE_UP,
    FindingKind.UNACKNOWLEDGED,
}


# The checks of every flow (JUnit test cases), and the finding kinds each one judges.
CheckName = Literal[
    "chains", "delivery", "ordering", "deadlines", "retries", "dead letters", "latency", "schema"
]
CHECKS: dict[CheckName, set[FindingKind]] = {
    "chains": {FindingKind.LOST, FindingKind.GIVE_UP, FindingKind.THRESHOLD},
    "delivery": {
        FindingKind.DUPLICATED,
        FindingKind.UNEXPECTED,
        FindingKind.UNROUTED,
        FindingKind.UNACKNOWLEDGED,
    },
    "ordering": {FindingKind.REORDERED, FindingKind.SEQUENCE_GAP},
    "deadlines": {FindingKind.LATE},
    "retries": {FindingKind.RETRIES, FindingKind.BACKOFF},
    "dead letters": {FindingKind.DEAD_LETTER, FindingKind.CONFIG},
    "latency": {FindingKind.LATENCY},
    "schema": {FindingKind.SCHEMA},
}


class Cause(StrEnum):
    NEVER_PUBLISHED = "never_published"
    UNROUTABLE = "unroutable"
    STUCK_PENDING = "stuck_pending"
    DEAD_LETTERED = "dead_lettered"
    TIMED_OUT = "timed_out"
    NOT_DELIVERED = "not_delivered"  # never delivered to the step's consumer group
    TRIMMED = "trimmed"  # trimmed from its stream before the step's consumer group read it


class Seen(BaseModel):
    """A short reference to one observation, for reports."""

    model_config = ConfigDict(frozen=True)

    kind: str
    channel: str
    at_ms: float = Field(description="ms since the recording started (monotonic clock)")
    fc_id: str | None = None
    message_id: str | None = None
    trace_id: str | None = None
    partition: int | None = None
    offset: int | None = None
    entry_id: str | None = None
    delivery_count: int | None = None
    reason: str | None = None
    broker: str | None = None
    routing_key: str | None = None
    group: str | None = None
    origin: str | None = Field(None, description="for dead letters: the channel it died on")
    until_ms: float | None = Field(None, description="for tap gaps: when watching resumed")


class Finding(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: FindingKind
    flow: str | None
    key: str | None = None
    step: str | None = None
    message: str
    cause: Cause | None = None
    next_step: str | None = Field(None, description="for lost chains: the step that never came")
    seen: list[Seen] = Field(default_factory=list, description="the observations it is about")
    timeline: list[Seen] = Field(default_factory=list, description="the chain, for broken ones")
    trace_id: str | None = Field(
        None,
        description="for chain findings: the chain's trace id, the one its message carried "
        "(traceparent) or else one derived from flow and key; the trace exported over OTLP",
    )


def chain_trace_id(flow: str, key: str, carried: Iterable[str | None] = ()) -> str:
    """A chain's trace id, 32 hex digits: the first valid one of ``carried`` (the trace
    ids its observations carried, in order), else one derived from flow and key, the
    same on every check of the same trace."""
    for trace_id in carried:
        if trace_id and len(trace_id) == 32:
            try:
                if int(trace_id, 16):
                    return trace_id.lower()
            except ValueError:
                continue
    return hashlib.sha256(f"{flow}\0{key}".encode()).hexdigest()[:32]


class Percentiles(BaseModel):
    model_config = ConfigDict(frozen=True)

    count: int
    non_positive: int = Field(
        0,
        description="samples below zero, or zero on flowcheck's clock (clock skew, "
        "same-instant copies), not in the percentiles",
    )
    unusable: int = Field(
        0, description="samples beyond the histogram's range (an hour), not in the percentiles"
    )
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None


class Histogram(BaseModel):
    """The samples of a hop in at most 40 bins, spaced evenly on a log scale between the
    smallest and the largest (the histogram's own resolution: a microsecond, three
    significant digits). Bin ``i`` holds the samples from ``edges_ms[i]`` up to
    ``edges_ms[i + 1]``; the counts add up to ``stats.count``."""

    model_config = ConfigDict(frozen=True)

    edges_ms: list[float] = Field(
        default_factory=list, description="the bins' edges, one more than the bins; ascending"
    )
    counts: list[int] = Field(default_factory=list, description="samples per bin")


class Latency(BaseModel):
    model_config = ConfigDict(frozen=True)

    hop: str = Field(description="'a -> b' for a hop, 'end-to-end' for the chain")
    clock: str = Field(
        "mono_ns",
        description="the clocks the samples were taken on, most used first: broker_ms, "
        "mono_ns, broker_ms+wall (a mix); none without samples",
    )
    error_ms: float = Field(0.0, description="how far off a sample may be, at most")
    stats: Percentiles
    histogram: Histogram = Field(
        default_factory=Histogram,
        description="the samples of the percentiles in log-spaced bins, to draw",
    )
    budget_ms: dict[str, float] = Field(default_factory=dict)
    passed: bool = True
    tap_late_ms: float = Field(
        0.0,
        description="how late a tap may see this hop's first or last step (its broker's tap "
        "settings): each sample may be off by up to this much",
    )
    tap_late_why: str | None = Field(
        None, description="the setting behind tap_late_ms, like \"broker 'kafka': tap_fetch_wait\""
    )


class Check(BaseModel):
    """One named check of one flow: a JUnit test case."""

    model_config = ConfigDict(frozen=True)

    name: str
    passed: bool
    message: str
    findings: int = 0


class Unjudged(BaseModel):
    """A declared expectation the checker could not judge, and why. A verdict with one
    is not green unless the user allowed it (``allow_unjudged``)."""

    model_config = ConfigDict(frozen=True)

    flow: str | None = Field(None, description="None for the recording as a whole")
    expectation: str = Field(
        description="what was declared, like \"retry max_attempts 3 at 'charge'\""
    )
    why: str = Field(description="why it could not be judged")
    chains: int = Field(0, description="chains it could not be judged on (0: not per chain)")


class Recording(BaseModel):
    """How the recording the verdict judged ended: what ``check`` judges against."""

    model_config = ConfigDict(frozen=True)

    ended: str = Field(
        description="stopped | duration | interrupted | run | unknown (no end record: crashed)"
    )
    end_ms: float | None = Field(None, description="ms since the recording started")
    stop_ms: float | None = Field(
        None,
        description="when the stop was asked, ms since the recording started, if the taps "
        "watched on after it for the chains in flight (None: they stopped at once)",
    )
    after_stop: int = Field(
        0, description="chains first seen after the stop was asked: outside it, not judged"
    )


# Passing chains kept per flow, a sample for reports: the rest are counted, not listed.
PASSING_SAMPLE = 20


class Passed(BaseModel):
    """One chain that succeeded, of a flow's bounded sample (``FlowVerdict.passing``)."""

    model_config = ConfigDict(frozen=True)

    key: str
    took_ms: float | None = Field(
        None, description="end to end, first step to last; None when not measured"
    )


class OverTime(BaseModel):
    """A flow's chains, retries and dead letters over the recording, in equal time buckets.

    Bucket ``i`` covers ``[i * bucket_ms, (i + 1) * bucket_ms)`` ms since the recording
    started (the monotonic clock of ``at_ms``); the buckets reach the recording's end.
    There are at most 120: they start 1 ms wide and double in width (pairs merged) as
    the recording outgrows them, so every count is exact. A chain is counted once it
    is decided: started, failed and unknown at its first observation, completed (it
    succeeded) at its last arrival, dead-lettered at its first dead letter, gave up at
    its last attempt. Retries (attempts after the first, as the retries check counts
    them) are placed at the redeliveries or retry-channel arrivals that showed them.
    Expected keys never seen at all (a run's) are in no bucket."""

    model_config = ConfigDict(frozen=True)

    bucket_ms: float = Field(description="the width of every bucket, ms")
    started: list[int] = Field(description="chains first seen, per bucket")
    completed: list[int] = Field(
        description="chains that succeeded, at their last arrival (or dead letter)"
    )
    failed: list[int] = Field(description="chains that failed, at their start")
    unknown: list[int] = Field(description="chains left unknown, at their start")
    retries: list[int] = Field(description="attempts after a message's first")
    dead_letters: list[int] = Field(description="chains dead-lettered, at their dead letter")
    gave_up: list[int] = Field(description="chains a step gave up on, at their last attempt")


RouteRole = Literal["step", "retry", "dead_letter"]


class RouteCount(BaseModel):
    """The messages of a flow's chains that arrived at one channel in one role: as one of
    its steps, as a retry of a step (a retry channel), or as a dead letter. Counted once a
    chain is decided, for every chain of ``FlowVerdict.chains`` (succeeded, failed or
    unknown), from what the chain kept: exact for those, nothing per message kept."""

    model_config = ConfigDict(frozen=True)

    channel: str = Field(description="the channel, by its name in the topology")
    role: RouteRole = Field(description="step | retry | dead_letter")
    step: str | None = Field(
        None,
        description="the step: the one it is (step), whose retries it carries (retry), "
        "the dead letters died at (dead_letter; None when they did not say)",
    )
    messages: int = Field(
        description="step: distinct messages (copies are one); retry: arrivals on the "
        "retry channel, one per passage; dead_letter: distinct dead letters"
    )
    redelivered: int = Field(
        0,
        description="step: later attempts seen at the step itself (redeliveries, messages "
        "back after a retry round trip or published again); 0 for the other roles",
    )


class FlowVerdict(BaseModel):
    model_config = ConfigDict(frozen=True)

    flow: str
    branch_of: str | None = Field(
        None, description="for a branch (flow named flow/branch): the flow it branches from"
    )
    passed: bool
    chains: int
    succeeded: int
    failed: int
    unknown: int = Field(description="chains a tap gap or the end of the recording left undecided")
    dead_lettered: int
    gave_up: int = Field(0, description="chains a step gave up on, with no dead letter")
    checks: list[Check]
    latency: list[Latency]
    findings: list[Finding]
    findings_total: dict[str, int] = Field(default_factory=dict, description="per kind")
    unjudged: list[Unjudged] = Field(
        default_factory=list, description="declared expectations that could not be judged"
    )
    passing: list[Passed] = Field(
        default_factory=list,
        description=f"a sample of the chains that succeeded, at most {PASSING_SAMPLE}, drawn "
        "evenly from all of them (a reservoir seeded by the flow's name), in decision order",
    )
    over_time: OverTime | None = Field(
        None, description="its chains over the recording's time; None from a verdict without"
    )
    routes: list[RouteCount] | None = Field(
        None,
        description="messages of its chains per channel it touches: steps, retry channels, "
        "dead-letter channels; None from a verdict without",
    )


class Verdict(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: int = VERDICT_VERSION
    passed: bool
    observations: int
    topology: str | None = None
    gaps: list[Seen] = Field(default_factory=list)
    flows: list[FlowVerdict]
    findings: list[Finding] = Field(default_factory=list, description="findings of no single flow")
    unjudged: list[Unjudged] = Field(
        default_factory=list, description="what could not be judged, of no single flow"
    )
    allow_unjudged: bool = Field(
        False, description="the user allowed a pass with unjudged expectations"
    )
    recording: Recording | None = None
    drift: list[str] = Field(
        default_factory=list,
        description="settings on the brokers that differ from the topology, as apply found "
        "them: what was recorded is not the system the topology declares",
    )

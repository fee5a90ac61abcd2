"""The checker: turns observations into a verdict. Pure: it never touches a broker."""

from flowcheck.checker._engine import Checker, Decided, check
from flowcheck.checker._open import OpenChains
from flowcheck.checker.verdict import (
    CHAIN_KINDS,
    CHECKS,
    Cause,
    Check,
    Finding,
    FindingKind,
    FlowVerdict,
    Histogram,
    Latency,
    OverTime,
    Passed,
    Percentiles,
    Recording,
    RouteCount,
    Seen,
    Unjudged,
    Verdict,
)
from flowcheck.checker.window import window

__all__ = [
    "CHAIN_KINDS",
    "CHECKS",
    "Cause",
    "Check",
    "Checker",
    "Decided",
    "Finding",
    "FindingKind",
    "FlowVerdict",
    "Histogram",
    "Latency",
    "OpenChains",
    "OverTime",
    "Passed",
    "Percentiles",
    "Recording",
    "RouteCount",
    "Seen",
    "Unjudged",
    "Verdict",
    "check",
    "window",
]

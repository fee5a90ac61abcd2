"""The gate: what a verdict means for a job that waits on it. Pure: no I/O.

``flowcheck check``, ``flowcheck run`` and the pytest plugin read their
``--allow-unjudged`` setting through :func:`allow_unjudged`, and the commands
turn a verdict into a result with :func:`decide`; the command line maps the
result to its exit code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flowcheck.checker.verdict import Verdict
from flowcheck.reporting import plural

# passed; failed (a check failed, or an expectation went unjudged); gap (nothing
# failed, but chains a tap gap hid are unknown: the gate cannot pass what it did not see);
# drift (the brokers' channels differ from the topology's: another system was judged)
Result = Literal["passed", "failed", "gap", "drift"]


@dataclass(frozen=True)
class Decision:
    result: Result
    why: str | None = None  # one line that says why, when the verdict alone does not


def allow_unjudged(flag: bool) -> bool | None:
    """An ``--allow-unjudged`` flag as the checker takes it: set, unjudged expectations
    pass; unset, None: the topology's ``gate: {allow_unjudged: ...}`` says."""
    return True if flag else None


def decide(verdict: Verdict, *, gaps_block: bool = True) -> Decision:
    """The result of ``verdict``.

    ``gaps_block``: a chain left unknown while a tap was not watching is one a tap
    gap hid; unless unjudged expectations are allowed, the result is ``gap`` when
    nothing else failed (off for a run its scenario's timeout cut short: there,
    unknown chains are the timeout's).
    """
    if verdict.drift:
        return Decision(
            "drift",
            f"flowcheck: the broker differs from the topology ({'; '.join(verdict.drift)}): "
            "what was recorded is not the system the topology declares, so the gate cannot "
            "pass it (make the topology say what the broker has)",
        )
    why = only_unjudged(verdict)
    unseen = sum(f.unknown for f in verdict.flows)
    hidden = unseen and verdict.gaps and not verdict.allow_unjudged
    if gaps_block and hidden and (verdict.passed or why):
        return Decision(
            "gap",
            f"flowcheck: {plural(unseen, 'chain')} unknown: a tap was not watching "
            f"({plural(len(verdict.gaps), 'gap')}); the gate cannot pass what it did not see "
            "(--allow-unjudged lets it)",
        )
    return Decision("passed" if verdict.passed else "failed", why)


def only_unjudged(verdict: Verdict) -> str | None:
    """The line that says a verdict failed for nothing but unjudged expectations."""
    unjudged = [*verdict.unjudged, *(u for f in verdict.flows for u in f.unjudged)]
    found = len(verdict.findings) + sum(
        sum(f.findings_total.values()) or len(f.findings) for f in verdict.flows
    )
    if verdict.passed or not unjudged or found:
        return None
    first = unjudged[0]
    where = f"flow {first.flow!r}: " if first.flow else ""
    return (
        f"flowcheck: not green only because {plural(len(unjudged), 'declared expectation')} "
        f"went unjudged (first: {where}{first.expectation}: {first.why}); "
        "--allow-unjudged lets such a verdict pass"
    )

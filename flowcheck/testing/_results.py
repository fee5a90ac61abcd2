"""What assertions return and raise: latencies that compare with ``"200ms"``, the error."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from flowcheck.checker import Finding
from flowcheck.checker.verdict import Unjudged
from flowcheck.observations import Observation
from flowcheck.reporting import ms as fmt_ms
from flowcheck.topology import parse_duration


def _compared(op: Callable[[timedelta, timedelta], bool]) -> Callable[[Took, object], bool]:
    """``op`` of timedelta, with the other side read as :meth:`Took._other` reads it."""

    def compare(self: Took, other: object) -> bool:
        o = self._other(other)
        return NotImplemented if o is None else op(self, o)

    return compare


class Took(timedelta):
    """A latency. Compares with durations as topologies write them (``"200ms"``),
    with numbers of seconds and with timedeltas: ``assert lat.p99 < "200ms"``."""

    @classmethod
    def of_ms(cls, value: float) -> Took:
        return cls(microseconds=round(value * 1000))

    @staticmethod
    def _other(other: object) -> timedelta | None:
        if isinstance(other, timedelta):
            return other
        if isinstance(other, str):
            return parse_duration(other)
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return timedelta(seconds=other)
        return None

    __lt__ = _compared(timedelta.__lt__)
    __le__ = _compared(timedelta.__le__)
    __gt__ = _compared(timedelta.__gt__)
    __ge__ = _compared(timedelta.__ge__)
    __eq__ = _compared(timedelta.__eq__)
    __ne__ = _compared(timedelta.__ne__)
    __hash__ = timedelta.__hash__

    @property
    def ms(self) -> float:
        return self / timedelta(milliseconds=1)

    def __repr__(self) -> str:
        return f"{fmt_ms(self.ms)}ms"

    __str__ = __repr__


class FlowAssertionError(AssertionError):
    """An event-flow assertion failed. The message is the report; the rest is for code."""

    def __init__(
        self,
        message: str,
        *,
        flow: str | None = None,
        key: str | None = None,
        findings: Sequence[Finding] = (),
        observations: Sequence[Observation] = (),
        trace: Path | None = None,
        unjudged: Sequence[Unjudged] = (),
    ) -> None:
        super().__init__(message)
        self.flow = flow
        self.key = key
        self.findings = list(findings)
        self.observations = list(observations)
        self.trace = trace
        self.unjudged = list(unjudged)  # expectations that could not be judged, and why


@dataclass(frozen=True)
class HopLatency:
    """Latency of one hop (or ``end-to-end``) of one flow, over the chains decided so far."""

    flow: str
    hop: str
    count: int
    budget: dict[str, Took] = field(default_factory=dict)
    values: dict[str, Took | None] = field(default_factory=dict)
    left_out: int = 0  # samples <= 0: copies of one message seen at the same instant

    def _get(self, percentile: str) -> Took:
        __tracebackhide__ = True
        value = self.values.get(percentile)
        if value is None:
            why = (
                f"its {self.left_out} sample(s) were <= 0 and left out (the taps saw both ends "
                "at the same instant, as for an exchange and its queue)"
                if self.left_out
                else "no chain has completed that hop (wait for one first, e.g. await "
                "flowcheck.chain(...).completes())"
            )
            raise FlowAssertionError(
                f"{self.flow}: no latency samples for {self.hop!r} yet: {why}", flow=self.flow
            )
        return value

    @property
    def p50(self) -> Took:
        __tracebackhide__ = True
        return self._get("p50")

    @property
    def p90(self) -> Took:
        __tracebackhide__ = True
        return self._get("p90")

    @property
    def p95(self) -> Took:
        __tracebackhide__ = True
        return self._get("p95")

    @property
    def p99(self) -> Took:
        __tracebackhide__ = True
        return self._get("p99")

    @property
    def max(self) -> Took:
        __tracebackhide__ = True
        return self._get("max")

    def __repr__(self) -> str:
        return f"<latency of {self.flow} {self.hop}: {self.count} sample(s)>"

    def __str__(self) -> str:
        have = ", ".join(f"{p} {v!r}" for p, v in self.values.items() if v is not None)
        budget = ", ".join(f"{p} {v!r}" for p, v in self.budget.items())
        return (
            f"{self.flow} {self.hop}: {self.count} sample(s)"
            + (f", {have}" if have else "")
            + (f" (budget {budget})" if budget else "")
        )

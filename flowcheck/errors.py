"""flowcheck's exceptions: one tree, rooted at :class:`FlowcheckError`.

::

    FlowcheckError
    ├── UsageError            a file that cannot be read, an argument that makes no sense
    ├── TopologyError         the topology has problems (all of them in ``.problems``)
    ├── MissingDependency     a broker client is not installed; names the extra to install
    ├── BrokerError           translated from the broker clients at the broker boundary
    │   ├── BrokerUnreachable   connection refused, DNS failure, timeout
    │   └── BrokerAuthError     wrong credentials, permission denied
    └── DriftError            channels on the broker differ from the topology (record --apply)

Messages never contain secrets: URLs are redacted before they are formatted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class FlowcheckError(Exception):
    """Root of every error flowcheck raises on purpose."""


class UsageError(FlowcheckError):
    """A file is missing or unreadable, or the arguments contradict each other."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem found in a topology file, at a 1-based line and column."""

    file: str
    line: int
    column: int
    message: str
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        tag = "warning: " if self.severity == "warning" else ""
        return f"{self.file}:{self.line}:{self.column}: {tag}{self.message}"


class TopologyError(FlowcheckError):
    """A topology failed validation; ``problems`` lists every problem found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        errors = [p for p in self.problems if p.severity == "error"]
        super().__init__("\n".join(str(p) for p in errors) or "invalid topology")


class MissingDependency(FlowcheckError):
    """An optional library (a broker client, bokeh) is not installed."""

    def __init__(self, module: str, extra: str) -> None:
        self.module = module
        self.extra = extra
        super().__init__(
            f"the Python package {module!r} is needed here but is not installed; "
            f"install it with: pip install 'flowcheck[{extra}]'"
        )


class BrokerError(FlowcheckError):
    """A broker operation failed; raised instead of the client library's own errors."""

    def __init__(self, broker: str, message: str) -> None:
        self.broker = broker
        super().__init__(f"{broker}: {message}")


class BrokerUnreachable(BrokerError):
    """The broker could not be reached at all."""


class BrokerAuthError(BrokerError):
    """The broker refused the credentials or the operation."""


class DriftError(FlowcheckError):
    """Channels that exist on the broker differ from the topology: recording against
    them would judge a system other than the one described. ``drift`` holds each
    difference (:class:`flowcheck.brokers.base.Drift`)."""

    def __init__(self, drift: Sequence[object]) -> None:
        self.drift = tuple(drift)
        super().__init__(
            "the broker differs from the topology, nothing recorded: "
            + "; ".join(str(d) for d in self.drift)
            + " (apply never changes what exists: make the topology say what the broker has)"
        )


def leaf(error: BaseException) -> BaseException:
    """The one real error inside (nested) exception groups, or ``error`` itself.

    Task groups wrap a single failure in a group; users should see the failure.
    """
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error

"""What ``flowcheck record`` shows while it records: a table of the tapped channels
(redrawn in place on a terminal, printed once at the end elsewhere) and a line
whenever a tap goes down or watches again. A tap gap is no observation: the table
counts gap records in a column of their own."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from flowcheck.reporting._common import plural
from flowcheck.topology.model import Topology

if TYPE_CHECKING:  # reporters import no broker module
    from flowcheck.brokers.base import Drift


class RecordView:
    """Feed it the recorder's callbacks (:meth:`tick`, :meth:`status`, :meth:`drifted`)
    and use it as a context manager around the recording."""

    def __init__(
        self, console: Console, topology: Topology, channels: Sequence[str], out: str
    ) -> None:
        self.console = console
        self.topology = topology
        self.channels = list(channels)
        self.out = out
        self.seen: dict[str, int] = {}
        self.gaps: Counter[str] = Counter()  # the recorder's ``gaps``: filled as it records
        self.down: dict[str, tuple[int, str]] = {}
        self.live = (
            Live(self.table(), console=console, auto_refresh=False, transient=False)
            if console.is_terminal
            else None
        )

    def table(self) -> Table:
        t = Table(title=f"recording to {self.out}", title_justify="left")
        t.add_column("channel")
        t.add_column("broker")
        t.add_column("observations", justify="right")
        t.add_column("gaps", justify="right")
        t.add_column("tap")
        for name in self.channels:
            broker = self.topology.channels[name].broker
            tap = "[red]down: gap[/red]" if broker in self.down else "watching"
            t.add_row(name, broker, str(self.seen.get(name, 0)), str(self.gaps.get(name, 0)), tap)
        return t

    def tick(self, counts: Mapping[str, int]) -> None:
        self.seen.update(counts)

    def status(self, now_down: dict[str, tuple[int, str]]) -> None:
        """Say when a tap goes down and comes back, above the table (and in a CI log)."""
        for broker, (_, why) in now_down.items():
            if broker not in self.down:
                self.console.print(f"[red]{broker}: tap down, recording a gap: {escape(why)}[/red]")
        for broker, (since, _) in self.down.items():
            if broker not in now_down:
                gone = (time.monotonic_ns() - since) / 1e9
                self.console.print(f"{broker}: tap watching again after {gone:.1f}s")
        self.down = dict(now_down)
        if self.live is not None:
            self.live.update(self.table(), refresh=True)

    def drifted(self, drift: Sequence[Drift]) -> None:
        # soft_wrap: one line per drift, whole, for a CI log to grep.
        for d in drift:
            self.console.print(f"flowcheck: warning: drift: {escape(str(d))}", soft_wrap=True)

    def finish(self, counts: Mapping[str, int]) -> str:
        """Show the final counts (the table, where it was not live); returns the line
        that says what was written."""
        self.seen = dict(counts)
        if self.live is None:
            self.console.print(self.table())
        written = f"{plural(sum(counts.values()), 'observation')} written to {self.out}"
        gaps = sum(self.gaps.values())
        return written + (f", and {plural(gaps, 'tap gap')}" if gaps else "")

    def __enter__(self) -> RecordView:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.live is not None:
            self.live.__exit__(t, e, tb)

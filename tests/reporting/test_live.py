"""flowcheck record's live view: counts per channel, tap gaps apart from observations."""

from __future__ import annotations

import io
import time

from rich.console import Console

from flowcheck.reporting.live import RecordView
from flowcheck.topology import loads

TOPOLOGY = """
brokers: {rd: {kind: redis, url: "redis://127.0.0.1:1/0"}}
channels:
  ship: {broker: rd, kind: stream, name: live.ship}
  bill: {broker: rd, kind: stream, name: live.bill}
"""


def test_the_view_counts_gaps_apart_and_says_when_a_tap_goes_down() -> None:
    console = Console(file=io.StringIO(), width=100, record=True)
    assert not console.is_terminal  # printed once at the end, as in a CI log
    view = RecordView(console, loads(TOPOLOGY), ["ship", "bill"], "t.jsonl")
    with view:
        view.tick({"ship": 3})
        view.status({"rd": (time.monotonic_ns(), "cannot reach Redis")})
        view.gaps["ship"] += 1  # the recorder counts the gap records it writes
        view.gaps["bill"] += 1
        view.status({})
    assert (
        view.finish({"ship": 3, "bill": 0}) == "3 observations written to t.jsonl, and 2 tap gaps"
    )
    lines = console.export_text().splitlines()
    assert lines[0] == "rd: tap down, recording a gap: cannot reach Redis"
    assert lines[1].startswith("rd: tap watching again after ")
    rows = {r.split()[1]: r.split()[1:-1] for r in lines if r.startswith("│")}
    assert rows["ship"] == ["ship", "│", "rd", "│", "3", "│", "1", "│", "watching"]
    assert rows["bill"] == ["bill", "│", "rd", "│", "0", "│", "1", "│", "watching"]


def test_no_gap_no_gap_words() -> None:
    view = RecordView(Console(file=io.StringIO()), loads(TOPOLOGY), ["ship"], "t.jsonl")
    assert view.finish({"ship": 1}) == "1 observation written to t.jsonl"

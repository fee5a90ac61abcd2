"""What fuzzing found, kept as plain regression tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowcheck.errors import TopologyError
from flowcheck.topology import loads
from flowcheck.trace import Reader


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("\x1b", "<string>:1:1:"),
        ("a: 1\nb: x\x1by\n", "<string>:2:5:"),
        (b"a: \x1b", "<string>:1:4:"),
    ],
)
def test_a_control_character_is_one_located_line(text: str | bytes, where: str) -> None:
    with pytest.raises(TopologyError) as info:
        loads(text)
    assert str(info.value) == f"{where} the character U+001B is not allowed in YAML " + (
        "(control characters are not allowed)"
    )


def test_a_name_with_a_line_break_stays_on_its_problem_s_line() -> None:
    with pytest.raises(TopologyError) as info:
        loads('brokers: {"a\\nb": {kind: redis}, "c\\x85": []}\nchannels: {}\n')
    lines = str(info.value).splitlines()
    assert all(line.startswith("<string>:") for line in lines), lines
    assert any("a\\nb" in line for line in lines), lines


def test_a_damaged_line_quoting_a_key_with_a_line_break_is_one_line(tmp_path: Path) -> None:
    """Found by the trace fuzzer: msgspec's message names the unknown key, which came
    from the file, line break and all."""
    trace = tmp_path / "t.jsonl"
    header = b'{"format": "flowcheck-trace", "version": 1, "started": 0.0, "started_mono_ns": 0}'
    good = b'{"kind": "published", "broker": "b", "channel": "a", "mono_ns": 0, "wall": 0.0}'
    trace.write_bytes(b"\n".join([header, good, b'{"\\n":']) + b"\n")
    reader = Reader(str(trace))
    list(reader)
    assert reader.problems
    assert "\n" not in reader.describe()

"""What fuzzing found, kept as plain regression tests."""

from __future__ import annotations

import pytest

from flowcheck.errors import TopologyError
from flowcheck.topology import loads


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

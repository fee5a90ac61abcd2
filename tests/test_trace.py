"""Trace files: round trip, damaged files keep their intact lines, clear errors."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from flowcheck.errors import UsageError
from flowcheck.observations import PAYLOAD_CAP, Kind, Observation, clean_headers, cut_payload
from flowcheck.trace import Header, Reader, TraceError, Writer


def _obs(i: int, **fields: Any) -> Observation:
    return Observation(kind=Kind.ROUTED, broker="b", channel="c", mono_ns=i, wall=1.0 + i, **fields)


def _write(path: Path, n: int) -> None:
    with Writer(str(path), Header(started=0.0, started_mono_ns=0, topology="t")) as w:
        for i in range(n):
            w.write(_obs(i, keys={"flow": f"k{i}"}))


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    _write(path, 3)
    reader = Reader(str(path))
    got = list(reader)
    assert [o.keys for o in got] == [{"flow": "k0"}, {"flow": "k1"}, {"flow": "k2"}]
    assert reader.header.topology == "t"
    assert reader.problems == []


def test_writer_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    _write(path, 1)
    with pytest.raises(UsageError, match="never overwritten"):
        _write(path, 1)
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "nowhere.jsonl")
    with pytest.raises(UsageError, match="never overwritten"):
        _write(dangling, 1)
    assert not (tmp_path / "nowhere.jsonl").exists()


def test_writer_names_a_trace_it_cannot_create(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cannot create the trace file .*: No such file"):
        _write(tmp_path / "missing" / "t.jsonl", 1)


def test_truncated_last_line_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    _write(path, 3)
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # cut inside the last observation
    reader = Reader(str(path))
    assert len(list(reader)) == 2
    assert reader.problems == [(4, "the last line is cut off (recording interrupted?)")]


def test_corrupt_middle_line_is_skipped_and_named(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    _write(path, 3)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b'{"kind": "routed", garbage\n'
    path.write_bytes(b"".join(lines))
    reader = Reader(str(path), strict=True)
    seen: list[Observation] = []
    with pytest.raises(TraceError, match=r"line 3: not valid JSON.*2 intact observations"):
        seen.extend(reader)
    assert [o.mono_ns for o in seen] == [0, 2]


def test_line_of_the_wrong_shape_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    _write(path, 3)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"mono_ns":1,', b'"mono_ns":"soon",')
    lines[3] = lines[3].replace(b'"kind":"routed"', b'"kind":"teleported"')
    path.write_bytes(b"".join(lines))
    reader = Reader(str(path))
    assert [o.mono_ns for o in reader] == [0]
    assert reader.problems == [
        (3, "mono_ns: expected `int`, got `str`"),
        (4, "kind: invalid enum value 'teleported'"),
    ]


def test_not_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"hello": 1}\n')
    with pytest.raises(TraceError, match="not a flowcheck trace"):
        Reader(str(path))
    with pytest.raises(TraceError, match="no such trace file"):
        Reader(str(tmp_path / "missing.jsonl"))


def test_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(
        json.dumps({"format": "flowcheck-trace", "version": 99, "started": 0, "started_mono_ns": 0})
        + "\n"
    )
    with pytest.raises(TraceError, match="upgrade flowcheck"):
        Reader(str(path))


def test_big_payload_is_cut_with_size_and_hash() -> None:
    body = b"x" * (PAYLOAD_CAP * 3)
    payload, size, digest = cut_payload(body)
    assert size == len(body)
    assert len(payload) == PAYLOAD_CAP
    assert digest is not None
    assert len(digest) == 64
    assert cut_payload(b"small")[2] is None


def test_headers_are_json_safe_and_redacted() -> None:
    got = clean_headers(
        {
            "authorization": "Bearer abc",
            "x-death": [{"count": 1, "queue": b"q"}],
            "n": 1,
            "x-origin": {"host": "billing", "db": {"user": "app", "password": "hunter2"}},
        }
    )
    assert got == {
        "authorization": "***",
        "x-death": [{"count": 1, "queue": "q"}],
        "n": 1,
        "x-origin": {"host": "billing", "db": {"user": "app", "password": "***"}},
    }
    json.dumps(got)


def test_every_damaged_line_is_named_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    _write(path, 40)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[17] = b"\n"  # blank
    lines[25] = b'{"kind": "routed", garbage\n'
    lines[33] = lines[33].replace(b'"channel":"c"', b'"channel":7')
    path.write_bytes(b"".join(lines))
    reader = Reader(str(path))
    got = [o.mono_ns for o in reader]
    assert got == [i for i in range(40) if i + 1 not in (17, 25, 33)]
    assert reader.problems == [
        (18, "not valid JSON"),
        (26, "not valid JSON"),
        (34, "channel: expected `str`, got `int`"),
    ]
    assert reader.count == 37


def test_a_big_file_without_newlines_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "dump.bin"
    path.write_bytes(b"x" * (32 * 1024 * 1024))
    tracemalloc.start()
    try:
        with pytest.raises(TraceError, match="not a flowcheck trace"):
            Reader(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024  # the header's limit, not the file's size


def test_end_record_round_trip_and_absence(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with Writer(str(path), Header(started=0.0, started_mono_ns=0, topology="t")) as w:
        w.write(_obs(1))
        w.end("interrupted", 7_000_000_000, 8.5)
    assert path.read_text().splitlines()[-1] == (
        '{"ended":"interrupted","mono_ns":7000000000,"wall":8.5}'
    )
    reader = Reader(str(path))
    assert [o.mono_ns for o in reader] == [1]  # the end is no observation
    assert reader.end is not None
    assert (reader.end.ended, reader.end.mono_ns, reader.end.wall) == ("interrupted", 7e9, 8.5)
    assert (reader.problems, reader.count) == ([], 1)

    # A trace without one (a crash, or written before end records existed) reads as before.
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))
    reader = Reader(str(path))
    assert [o.mono_ns for o in reader] == [1]
    assert (reader.end, reader.problems) == (None, [])


def test_damaged_or_misplaced_end_record_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with Writer(str(path), Header(started=0.0, started_mono_ns=0, topology="t")) as w:
        w.write(_obs(1))
        w.end("stopped", 5, 6.0)
    good = path.read_bytes()
    end_line = good.splitlines(keepends=True)[-1]

    path.write_bytes(good[:-5])  # cut inside the end record: it crashed while writing it
    reader = Reader(str(path))
    assert [o.mono_ns for o in reader] == [1]
    assert reader.end is None
    assert reader.problems == [(3, "the last line is cut off (recording interrupted?)")]

    path.write_bytes(good.replace(b'"stopped"', b'"exploded"'))
    reader = Reader(str(path))
    list(reader)
    assert reader.end is None
    assert reader.problems == [(3, "ended: invalid enum value 'exploded'")]

    # An observation after it: the end record was not the end.
    path.write_bytes(good + good.splitlines(keepends=True)[1])
    reader = Reader(str(path))
    assert len(list(reader)) == 2
    assert reader.end is None
    assert reader.problems == [(4, "an observation after the end record")]
    assert end_line == b'{"ended":"stopped","mono_ns":5,"wall":6.0}\n'


@pytest.mark.parametrize("command", ["inspect", "check"])
def test_a_deeply_nested_header_is_one_clear_error(tmp_path: Path, command: str) -> None:
    from click.testing import CliRunner

    from flowcheck.cli import cli

    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep.jsonl"
    header = {"format": "flowcheck-trace", "started": 0, "started_mono_ns": 0}
    path.write_text(json.dumps(header)[:-1] + f', "x": {deep}}}\n')
    args = [str(path)] if command == "inspect" else ["topologies/shop.yaml", str(path)]
    result = CliRunner().invoke(cli, [command, *args])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.strip().splitlines() == [
        f"flowcheck: {path}: not a flowcheck trace (its first line is JSON nested too deeply)"
    ]

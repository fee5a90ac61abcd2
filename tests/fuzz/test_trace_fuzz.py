"""The trace reader and ``flowcheck inspect``, fed hostile files: damaged lines are named,
anything else is a clean TraceError (exit 2), never a traceback."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from flowcheck.cli import cli
from flowcheck.observations import Kind
from flowcheck.trace import Reader, TraceError

from .conftest import FUZZ, bounded, clean

HEADER = {"format": "flowcheck-trace", "version": 1, "started": 0.0, "started_mono_ns": 0}
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = {
    "kind": st.one_of(st.sampled_from([k.value for k in Kind]), JSON),
    "broker": st.one_of(st.just("b"), JSON),
    "channel": st.one_of(st.sampled_from(["a", "b"]), JSON),
    "mono_ns": st.one_of(st.integers(-(2**70), 2**70), JSON),
    "wall": st.one_of(st.floats(), JSON),
    "keys": st.one_of(st.dictionaries(st.sampled_from(["f", "g"]), st.text(max_size=5)), JSON),
    "fc_id": st.one_of(st.text(max_size=5), JSON),
    "until_ns": st.one_of(st.integers(), JSON),
    "payload": st.one_of(st.text(max_size=30), JSON),
    "headers": st.one_of(st.dictionaries(st.text(max_size=5), JSON), JSON),
    "delivery_count": st.one_of(st.integers(), JSON),
}
OBSERVATION = st.fixed_dictionaries(
    {k: FIELDS[k] for k in ("kind", "broker", "channel", "mono_ns", "wall")},
    optional={
        k: v for k, v in FIELDS.items() if k not in ("kind", "broker", "channel", "mono_ns", "wall")
    },
)
END = st.fixed_dictionaries(
    {"ended": st.one_of(st.sampled_from(["stopped", "run"]), JSON), "mono_ns": JSON, "wall": JSON}
)
LINE = st.one_of(
    OBSERVATION.map(lambda d: json.dumps(d).encode()),
    END.map(lambda d: json.dumps(d).encode()),
    JSON.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=60),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
)


def _read(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.jsonl"
        path.write_bytes(data)
        try:
            with bounded():
                reader = Reader(str(path))
                count = sum(1 for _ in reader)
            assert count == reader.count
            assert all(n >= 2 for n, _ in reader.problems)
            if reader.problems:
                assert "\n" not in reader.describe()
        except TraceError as exc:
            clean(exc)
        except Exception as exc:
            clean(exc)
        with bounded():
            for args in ([], ["--json"]):
                result = CliRunner().invoke(cli, ["inspect", str(path), *args])
                assert result.exit_code in (0, 1, 2), result.output
                if result.exception is not None and not isinstance(result.exception, SystemExit):
                    raise result.exception


@FUZZ
@given(st.binary(max_size=600))
def test_any_bytes(data: bytes) -> None:
    _read(data)


@FUZZ
@given(
    st.one_of(
        JSON,
        st.fixed_dictionaries(
            {k: st.one_of(st.just(v), JSON) for k, v in HEADER.items() if k != "version"},
            optional={"x": JSON, "version": st.one_of(st.integers(), JSON), "topology": JSON},
        ),
    )
)
def test_any_header(header: Any) -> None:
    _read(json.dumps(header).encode() + b"\n")


@FUZZ
@given(st.lists(LINE, max_size=12), st.booleans())
def test_a_header_then_any_lines(lines: list[bytes], cut: bool) -> None:
    body = b"\n".join([json.dumps(HEADER).encode(), *lines])
    _read(body if cut else body + b"\n")

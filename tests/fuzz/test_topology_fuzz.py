"""The topology loader, fed hostile text: only clean, located TopologyErrors come out."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

from flowcheck.errors import TopologyError
from flowcheck.topology import loads

from .conftest import FUZZ, bounded, clean

SHOP = (Path(__file__).parents[2] / "topologies" / "shop.yaml").read_text()
LOCATED = re.compile(r"^<string>:\d+:\d+: \S")

# What a topology's values are made of, and words the language knows.
WORDS = [
    "brokers", "channels", "services", "flows", "gate", "redact", "kind", "rabbitmq", "kafka",
    "redis", "exchange", "queue", "topic", "stream", "broker", "steps", "correlate", "channel",
    "json", "header", "deadline", "retry", "dead_letters", "match", "payload", "headers",
    "bindings", "groups", "latency", "max", "p99", "count", "delivery", "ordering", "when",
    "url", "schema", "$.id", "$.a[0].b", "2s", "250ms", "99%", "${X}", "${X:-y}", "<<", "*", "&a",
]  # fmt: skip
SCALARS = st.one_of(
    st.sampled_from(WORDS),
    st.text(max_size=20),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(WORDS), st.text(max_size=8)), inner, max_size=4),
    ),
    max_leaves=30,
)


def _load(text: str | bytes) -> None:
    try:
        with bounded():
            loads(text)
    except TopologyError as exc:
        clean(exc, one_line=False)
        for line in str(exc).splitlines():
            assert LOCATED.match(line), line
    except Exception as exc:  # anything else is a crash the user would see as a traceback
        clean(exc)


@FUZZ
@given(st.text(max_size=400))
def test_any_text(text: str) -> None:
    _load(text)


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes(data: bytes) -> None:
    _load(data)


@FUZZ
@given(VALUES)
def test_any_yaml_document(doc: Any) -> None:
    _load(yaml.safe_dump(doc, allow_unicode=True))


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["brokers", "channels", "services", "flows", "gate", "redact"]),
        VALUES,
        max_size=6,
    )
)
def test_any_sections(doc: dict[str, Any]) -> None:
    _load(yaml.safe_dump(doc, allow_unicode=True))


@FUZZ
@given(st.data())
def test_the_shop_topology_mutated(data: st.DataObject) -> None:
    """A real topology with a few lines replaced, cut or doubled."""
    lines = SHOP.splitlines()
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(lines) - 1))
        how = data.draw(st.sampled_from(["replace", "cut", "double", "indent", "value"]))
        if how == "replace":
            lines[at] = data.draw(st.text(max_size=40))
        elif how == "cut":
            lines[at] = lines[at][: data.draw(st.integers(0, len(lines[at])))]
        elif how == "double":
            lines.insert(at, lines[at])
        elif how == "indent":
            lines[at] = " " * data.draw(st.integers(0, 6)) + lines[at].lstrip()
        else:
            key, colon, _ = lines[at].partition(":")
            if colon:
                value = yaml.safe_dump(data.draw(VALUES), default_flow_style=True).strip()
                lines[at] = f"{key}: {value.removesuffix('...').strip()}"
    _load("\n".join(lines) + "\n")

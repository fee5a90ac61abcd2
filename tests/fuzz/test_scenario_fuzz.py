"""Scenario files and their templates, fed hostile input: a clean error or bounded messages."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import event, given
from hypothesis import strategies as st

from flowcheck.errors import TopologyError, UsageError
from flowcheck.scenario import MAX_BODY, load, messages
from flowcheck.topology import loads

from .conftest import FUZZ, bounded, clean

TOPOLOGY = loads(
    """
brokers:
  redis: {kind: redis}
  kafka: {kind: kafka}
channels:
  events: {broker: redis, kind: stream}
  records: {broker: kafka, kind: topic}
flows:
  by-json: {correlate: $.order.id, steps: [events]}
  by-header: {correlate: {header: x-id}, steps: [events]}
  by-key: {correlate: {kafka_key: true}, steps: [records]}
  by-index: {correlate: "$.items[0].id", steps: [events]}
"""
)
PIECES = ["{n}", "{i}", "{key}", "{run}", "{flow}", "{n:05}", "{n:>8}", "{", "}", "{{", "}}",
          "{x}", "{n!r}", "{n:999}", "{key:05d}", "{n.real}", "{0}", "{}", ":", "a", "é"]  # fmt: skip
TEMPLATE = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=6).map(
    "".join
)
VALUE = st.recursive(
    st.one_of(TEMPLATE, st.integers(), st.floats(), st.booleans(), st.none()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(TEMPLATE, st.sampled_from(["order", "id", "items"])), inner, max_size=3
        ),
    ),
    max_leaves=15,
)
SEND = st.fixed_dictionaries(
    {"flow": st.one_of(st.sampled_from(["by-json", "by-header", "by-key", "by-index"]), VALUE)},
    optional={
        "count": st.one_of(st.integers(-1, 5), st.integers(), VALUE),
        "rate": st.one_of(st.floats(), st.integers(), VALUE),
        "key": st.one_of(TEMPLATE, VALUE),
        "routing_key": TEMPLATE,
        "kafka_key": TEMPLATE,
        "headers": st.one_of(st.dictionaries(TEMPLATE, TEMPLATE, max_size=3), VALUE),
        "payload": VALUE,
        "channel": st.one_of(st.sampled_from(["events", "records", "nope"]), VALUE),
    },
)
SCENARIO = st.one_of(
    VALUE,
    st.fixed_dictionaries(
        {"send": st.one_of(st.lists(SEND, max_size=3), VALUE)},
        optional={"name": VALUE, "timeout": st.one_of(st.sampled_from(["1s", "0s", "1y"]), VALUE)},
    ),
)


def _render(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.yaml"
        path.write_text(text)
        try:
            with bounded():
                scenario = load(str(path), TOPOLOGY)
                for msg in itertools.islice(messages(scenario, TOPOLOGY, "run1"), 20):
                    assert len(msg.body) <= MAX_BODY
                    assert isinstance(msg.key, str)
            event("rendered")
        except TopologyError as exc:
            event("invalid scenario")
            clean(exc, one_line=False)
        except UsageError as exc:
            event("not rendered")
            clean(exc)
        except Exception as exc:
            clean(exc)


@FUZZ
@given(SCENARIO)
def test_any_scenario(doc: Any) -> None:
    _render(yaml.safe_dump(doc, allow_unicode=True))


@FUZZ
@given(st.text(max_size=300))
def test_any_text(text: str) -> None:
    _render(text)


GOOD = [
    "{n}",
    "{i}",
    "{key}",
    "{run}",
    "{flow}",
    "{n:05}",
    "{n:>8}",
    "{key:>64}",
    "{{",
    "}}",
    "{n:x<9}",
]
GOOD_TEMPLATE = st.lists(
    st.one_of(
        st.sampled_from(GOOD), st.text(alphabet=st.characters(exclude_characters="{}"), max_size=5)
    ),
    max_size=6,
).map("".join)
GOOD_VALUE = st.recursive(
    st.one_of(GOOD_TEMPLATE, st.integers(), st.floats(allow_nan=False), st.booleans(), st.none()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["order", "id", "items", "x"]), inner, max_size=3),
    ),
    max_leaves=15,
)
GOOD_SEND = st.fixed_dictionaries(
    {"flow": st.sampled_from(["by-json", "by-header", "by-key", "by-index"])},
    optional={
        "count": st.integers(1, 5),
        "rate": st.floats(0.5, 1000),
        "key": GOOD_TEMPLATE,
        "routing_key": GOOD_TEMPLATE,
        "kafka_key": GOOD_TEMPLATE,
        "headers": st.dictionaries(st.text(max_size=5), GOOD_TEMPLATE, max_size=3),
        "payload": GOOD_VALUE,
    },
)


@FUZZ
@given(st.lists(GOOD_SEND, min_size=1, max_size=3))
def test_scenarios_that_look_right(sends: list[dict[str, Any]]) -> None:
    _render(yaml.safe_dump({"send": sends}, allow_unicode=True))

"""``match`` tests on one observation: each operator, types, absence, text headers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from flowcheck.checker._match import matches
from flowcheck.observations import Kind, Observation
from flowcheck.topology import Match


def obs(
    payload: Any = None,
    headers: dict[str, Any] | None = None,
    key: str | None = None,
    routing_key: str | None = None,
) -> Observation:
    return Observation(
        kind=Kind.PUBLISHED,
        broker="b",
        channel="c",
        mono_ns=0,
        wall=0.0,
        headers=headers or {},
        payload=None if payload is None else json.dumps(payload),
        kafka_key=key,
        routing_key=routing_key,
    )


def on_payload(test: Any, value: Any) -> bool:
    """Does ``$.v: test`` hold for a payload where v is ``value`` (absent: the sentinel)?"""
    doc = {} if value is ABSENT else {"v": value}
    return matches(Match.model_validate({"payload": {"$.v": test}}), obs(doc))


ABSENT: Any = object()

PAYLOAD_CASES = [
    # (test, value, holds)
    (3, 3, True),
    (3, 3.0, True),
    (3, "3", True),  # equality reads text, as it always has
    (3, True, False),  # a boolean is not a number
    (1, True, False),
    (True, 1, False),
    (True, True, True),
    ("a", "a", True),
    (None, None, True),
    (None, ABSENT, True),  # an absent field reads as null for equality
    ([1, 2], [1, 2], True),
    ({"eq": {"a": 1}}, {"a": 1}, True),
    ({"eq": {"a": 1}}, {"a": 2}, False),
    ({"ne": "x"}, "y", True),
    ({"ne": "x"}, "x", False),
    ({"ne": "x"}, ABSENT, True),
    ({"lt": 0}, -0.5, True),
    ({"lt": 0}, 0, False),
    ({"lte": 0}, 0, True),
    ({"gt": 10}, 11, True),
    ({"gte": 10}, 9.99, False),
    ({"lt": 0}, "-5", False),  # text in a payload is not a number
    ({"lt": 0}, True, False),
    ({"lt": 0}, None, False),
    ({"lt": 0}, ABSENT, False),
    ({"lt": 0}, [-1], False),
    ({"lt": "m"}, "a", True),
    ({"lt": "m"}, "z", False),
    ({"lt": "m"}, 1, False),  # numbers never compare with strings
    ({"gte": 0, "lt": 100}, 50, True),
    ({"gte": 0, "lt": 100}, 100, False),
    ({"prefix": "X"}, "X-42", True),
    ({"prefix": "X"}, "Y-42", False),
    ({"prefix": "1"}, 12, False),
    ({"suffix": "7"}, "A-17", True),
    ({"suffix": "7"}, "A-71", False),
    ({"regex": "7$"}, "id-17", True),
    ({"regex": "7$"}, "id-71", False),
    ({"regex": "^A-\\d+$"}, "A-12", True),
    ({"regex": "\\d"}, "ab3c", True),  # found anywhere
    ({"regex": "7"}, 7, False),
    ({"in": ["a", "b"]}, "b", True),
    ({"in": ["a", "b"]}, "c", False),
    ({"in": ["a", 2]}, 2, True),
    ({"in": ["a", 2]}, "2", True),
    ({"in": [1]}, True, False),
    ({"in": ["a"]}, ABSENT, False),
    ({"in": [None]}, ABSENT, True),
    ({"not_in": ["a", "b"]}, "c", True),
    ({"not_in": ["a", "b"]}, "a", False),
    ({"not_in": ["a"]}, ABSENT, True),
    ({"exists": True}, None, True),  # null is present
    ({"exists": True}, ABSENT, False),
    ({"exists": False}, ABSENT, True),
    ({"exists": False}, 0, False),
    ({"exists": True, "prefix": "X"}, "X", True),
    ({"exists": True, "prefix": "X"}, "Y", False),
]


@pytest.mark.parametrize(("test", "value", "holds"), PAYLOAD_CASES)
def test_payload(test: Any, value: Any, holds: bool) -> None:
    assert on_payload(test, value) is holds


def test_nested_paths_and_indexes() -> None:
    m = Match.model_validate(
        {"payload": {"$.items[0].sku": {"prefix": "A-"}, "$.items[1].qty": {"gt": 1}}}
    )
    assert matches(m, obs({"items": [{"sku": "A-1", "qty": 1}, {"sku": "B", "qty": 2}]}))
    assert not matches(m, obs({"items": [{"sku": "B-1"}, {"qty": 5}]}))
    assert not matches(m, obs({"items": [{"sku": "A-1"}]}))
    assert not matches(m, obs({"items": "none"}))


def test_not_json_passes_only_absence() -> None:
    lt = Match.model_validate({"payload": {"$.v": {"lt": 0}}})
    gone = Match.model_validate({"payload": {"$.v": {"exists": False}}})
    text = Observation(
        kind=Kind.PUBLISHED, broker="b", channel="c", mono_ns=0, wall=0.0, payload="not json"
    )
    assert not matches(lt, text)
    assert matches(gone, text)


@pytest.mark.parametrize(
    ("test", "value", "holds"),
    [
        ({"lt": 0}, "-5", True),  # Kafka and Redis headers are text
        ({"lt": 0}, "5", False),
        ({"lt": 0}, -5, True),  # RabbitMQ keeps the number
        ({"gte": 1.5}, "1.5", True),
        ({"lt": 0}, "minus five", False),
        ({"lt": "b"}, "a", True),
        (3, "3", True),
        (3, 3, True),
        (True, "true", True),
        (True, "1", False),
        ({"in": [1, 2]}, "2", True),
        ({"prefix": "X"}, "X1", True),
        ({"prefix": "1"}, 12, False),
        ({"exists": True}, "", True),
    ],
)
def test_header(test: Any, value: Any, holds: bool) -> None:
    m = Match.model_validate({"headers": {"h": test}})
    assert matches(m, obs(headers={"h": value})) is holds


def test_absent_header() -> None:
    def holds(test: Any) -> bool:
        return matches(Match.model_validate({"headers": {"h": test}}), obs(headers={"o": "1"}))

    assert holds({"exists": False})
    assert holds({"ne": "x"})
    assert holds({"not_in": ["x"]})
    assert not holds({"exists": True})
    assert not holds({"lt": 0})
    assert not holds("x")


def test_record_key() -> None:
    m = Match.model_validate({"key": {"prefix": "eu-"}})
    assert matches(m, obs(key="eu-7"))
    assert not matches(m, obs(key="us-7"))
    assert not matches(m, obs())
    assert matches(Match.model_validate({"key": "eu-7"}), obs(key="eu-7"))
    assert matches(Match.model_validate({"key": {"exists": False}}), obs())


def test_all_conditions_must_hold() -> None:
    m = Match.model_validate(
        {
            "headers": {"account": {"prefix": "X"}},
            "payload": {"$.amount": {"lt": 0}},
            "routing_key": "order.*",
        }
    )
    good = obs({"amount": -1}, {"account": "X1"}, routing_key="order.refund")
    assert matches(m, good)
    assert not matches(m, obs({"amount": 1}, {"account": "X1"}, routing_key="order.refund"))
    assert not matches(m, obs({"amount": -1}, {"account": "Y1"}, routing_key="order.refund"))
    assert not matches(m, obs({"amount": -1}, {"account": "X1"}, routing_key="pay.refund"))


def test_parsed_payload_is_used() -> None:
    m = Match.model_validate({"payload": {"$.amount": {"lt": 0}}})
    # The caller's parse wins over the text: the matcher does not parse again.
    assert matches(m, obs({"amount": 5}), {"amount": -5})


def test_compiled_once_and_never_part_of_equality() -> None:
    spec = {"payload": {"$.id": {"regex": "7$"}}}
    m = Match.model_validate(spec)
    assert m.payload["$.id"].pattern is not None
    assert matches(m, obs({"id": "17"}))
    slot = m.__pydantic_private__["_compiled"]  # type: ignore[index]
    first = slot.test
    assert first is not None
    assert not matches(m, obs({"id": "71"}))
    assert slot.test is first
    assert m == Match.model_validate(spec)  # one compiled, the other not
    # A copy with other conditions shares the slot object but not its test.
    other = m.model_copy(update={"payload": {"$.id": "71"}})
    assert matches(other, obs({"id": "71"}))
    assert matches(m, obs({"id": "17"}))


def test_no_match_always_holds() -> None:
    assert matches(None, obs())

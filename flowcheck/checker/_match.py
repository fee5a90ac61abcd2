"""Does an observation satisfy a step's (or dead-letter rule's) ``match``? Pure.

A match is turned once into a chain of small closures (:func:`compile_match`) and
kept on the model: the engine asks per observation, so nothing is parsed per call.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from flowcheck.observations import Observation, payload_json
from flowcheck.topology import path_segments, path_value
from flowcheck.topology.model import Compiled, Condition, Match
from flowcheck.topology.routing import topic_matches

Test = Callable[[Observation, Any], bool]
Pred = Callable[[Any], bool]

MISSING: Any = object()  # no such header, payload field or record key


def matches(match: Match | None, obs: Observation, parsed: Any = None) -> bool:
    """All conditions of ``match`` hold for ``obs`` (no match: always true).

    ``parsed`` is the payload already parsed as JSON, if the caller has it.
    """
    if match is None:
        return True
    slot: Compiled = match.__pydantic_private__["_compiled"]  # type: ignore[index]
    if slot.owner is not match:
        slot.test, slot.owner = compile_match(match), match
    return slot.test(obs, parsed)  # type: ignore[no-any-return]


def compile_match(match: Match) -> Test:
    """``match`` as one function of (observation, parsed payload or None)."""
    headers = tuple((name, predicate(want, text=True)) for name, want in match.headers.items())
    payload = tuple(
        (path_segments(path), predicate(want, text=False)) for path, want in match.payload.items()
    )
    pattern = match.routing_key
    key = None if match.key is None else predicate(match.key, text=False)

    def test(obs: Observation, parsed: Any) -> bool:
        if headers:
            have = obs.headers
            for name, pred in headers:
                if not pred(have.get(name, MISSING)):
                    return False
        if payload:
            doc = parsed if parsed is not None else payload_json(obs.payload)
            for segments, pred in payload:
                if not pred(path_value(doc, segments, MISSING)):
                    return False
        if pattern is not None and not topic_matches(pattern, obs.routing_key or ""):
            return False
        if key is not None:
            return key(MISSING if obs.kafka_key is None else obs.kafka_key)
        return True

    return test


def predicate(want: Any, *, text: bool) -> Pred:
    """A test of one value (MISSING when absent). A plain value is equality.

    ``text``: the value may arrive as text (headers on Kafka and Redis), so a
    number is also compared with the text's number.
    """
    if not isinstance(want, Condition):
        return _eq(want)
    given = want.model_fields_set
    preds: list[Pred] = []
    if "exists" in given:
        preds.append(_present if want.exists else _absent)
    if "eq" in given:
        preds.append(_eq(want.eq))
    if "ne" in given:
        preds.append(_not(_eq(want.ne)))
    if "in_" in given and want.in_ is not None:
        preds.append(_one_of(want.in_))
    if "not_in" in given and want.not_in is not None:
        preds.append(_not(_one_of(want.not_in)))
    for name, op in _ORDER:
        if name in given:
            preds.append(_compare(op, getattr(want, name), text))
    if want.prefix is not None:
        start = want.prefix
        preds.append(lambda v: isinstance(v, str) and v.startswith(start))
    if want.suffix is not None:
        end = want.suffix
        preds.append(lambda v: isinstance(v, str) and v.endswith(end))
    if want.pattern is not None:
        search = want.pattern.search
        preds.append(lambda v: isinstance(v, str) and search(v) is not None)
    if len(preds) == 1:
        return preds[0]
    every = tuple(preds)

    def all_of(value: Any) -> bool:
        return all(pred(value) for pred in every)

    return all_of


_ORDER = (("lt", operator.lt), ("lte", operator.le), ("gt", operator.gt), ("gte", operator.ge))


def _present(value: Any) -> bool:
    return value is not MISSING


def _absent(value: Any) -> bool:
    return value is MISSING


def _not(pred: Pred) -> Pred:
    return lambda value: not pred(value)


def _eq(want: Any) -> Pred:
    if isinstance(want, str):
        return lambda value: value == want  # the common case: no conversion
    if want is None:
        # An absent field reads as null, as it always has.
        return lambda value: value is None or value is MISSING
    return lambda value: _equal(value, want)


def _equal(have: Any, want: Any) -> bool:
    """``have == want``, where a boolean equals only a boolean, and text equals a number
    or boolean written the same way (headers travel as text on Kafka and Redis)."""
    if isinstance(have, str):
        if isinstance(want, bool):
            return have == ("true" if want else "false")
        return have == str(want) if isinstance(want, (int, float)) else False
    if isinstance(have, bool) or isinstance(want, bool):
        return have is want
    return bool(have == want)


def _one_of(items: list[Any]) -> Pred:
    strings = frozenset(i for i in items if isinstance(i, str))
    others = tuple(_eq(i) for i in items if not isinstance(i, str))

    def one_of(value: Any) -> bool:
        if isinstance(value, str) and value in strings:
            return True
        return any(eq(value) for eq in others)

    return one_of


def _compare(op: Callable[[Any, Any], bool], bound: Any, text: bool) -> Pred:
    if isinstance(bound, str):
        return lambda value: isinstance(value, str) and op(value, bound)

    def number(value: Any) -> bool:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return op(value, bound)
        if text and isinstance(value, str):
            try:
                return op(float(value), bound)
            except ValueError:
                return False
        return False

    return number

"""Correlation keys from headers, properties, payload paths, Kafka keys and traceparent."""

from __future__ import annotations

import pytest

from flowcheck.correlate import Correlator, Message, key_of, lookup
from flowcheck.observations import parse_json, payload_json
from flowcheck.topology import Correlate, loads


def _msg(**kw: object) -> Message:
    base: dict[str, object] = {"headers": {}, "payload": None, "properties": {}}
    base.update(kw)
    return Message(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rule", "msg", "key"),
    [
        ({"json": "$.order.id"}, _msg(payload='{"order": {"id": 42}}'), "42"),
        ({"json": "$.items[1]"}, _msg(payload='{"items": ["a", "b"]}'), "b"),
        ({"json": "$.missing"}, _msg(payload='{"order": 1}'), None),
        ({"json": "$.order"}, _msg(payload='{"order": {"id": 1}}'), None),  # not a scalar
        ({"json": "$.id"}, _msg(payload="not json"), None),
        ({"header": "x-order"}, _msg(headers={"x-order": b"o-1"}), "o-1"),
        ({"property": "correlation_id"}, _msg(properties={"correlation_id": "c"}), "c"),
        ({"kafka_key": True}, _msg(kafka_key="k"), "k"),
        (
            {"traceparent": True},
            _msg(
                headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
            ),
            "0af7651916cd43dd8448eb211c80319c",
        ),
        ({"traceparent": True}, _msg(headers={"traceparent": "garbage"}), None),
    ],
)
def test_key_of(rule: dict[str, object], msg: Message, key: str | None) -> None:
    assert key_of(Correlate.model_validate(rule), msg) == key


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"order": {"id": 42}}', "42"),
        (b'{"order": {"id": "o-\xff"}}', "o-\ufffd"),  # bad UTF-8: replaced, as in the text
        (b'{"order": {"id": 1}, "x": NaN}', "1"),  # what json.loads accepts still counts
        (b"not json", None),
        (b"", None),
    ],
)
def test_payload_path_reads_the_raw_body(body: bytes, key: str | None) -> None:
    # The cut payload text is not what a rule reads: the whole body is.
    msg = _msg(payload=body[:3].decode("utf-8", "replace"), body=body)
    assert key_of(Correlate.model_validate({"json": "$.order.id"}), msg) == key


def test_lookup_out_of_range_and_wrong_shape() -> None:
    assert lookup({"a": [1]}, "$.a[3]") is None
    assert lookup({"a": {"0": 1}}, "$.a[0]") is None
    assert lookup({"a": [1]}, "$.a.b") is None
    assert lookup({"a": [{"b": False}]}, "$.a[0].b") is False


def test_correlator_covers_retry_and_dead_letter_channels() -> None:
    topology = loads(
        """
brokers: {k: {kind: kafka}}
channels:
  pay: {broker: k, kind: topic, retry: [pay-retry], dead_letter: pay-dlt}
  pay-retry: {broker: k, kind: topic}
  pay-dlt: {broker: k, kind: topic}
flows:
  f:
    correlate: kafka_key
    steps: [pay]
"""
    )
    c = Correlator(topology)
    msg = _msg(kafka_key="order-7")
    assert c.keys("pay", msg) == {"f": "order-7"}
    assert c.keys("pay-retry", msg) == {"f": "order-7"}
    assert c.keys("pay-dlt", msg) == {"f": "order-7"}
    assert c.keys("other", msg) == {}


def test_json_nested_too_deeply_is_unreadable_not_an_error() -> None:
    deep = '{"id": "o-1", "x": ' + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json(deep)
    assert payload_json(deep) is None
    assert key_of(Correlate(json_path="$.id"), _msg(payload=deep, body=deep.encode())) is None

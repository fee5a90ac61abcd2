"""How adapters build observations: every field lands where it belongs, and the
correlation key functions taps use agree with the rules."""

from __future__ import annotations

import pytest

from flowcheck.brokers import adapter
from flowcheck.correlate import Correlator, Message
from flowcheck.observations import ID_HEADER, PAYLOAD_CAP, Kind, Observation
from flowcheck.topology import loads

TOPOLOGY = """
brokers: {k: {kind: kafka, bootstrap: "127.0.0.1:1"}}
channels:
  orders: {broker: k, kind: topic, name: orders}
  audit: {broker: k, kind: topic, name: audit}
  lines: {broker: k, kind: topic, name: lines}
flows:
  placed: {correlate: $.order.id, steps: [{channel: orders}]}
  audited: {correlate: $.order.id, steps: [{channel: audit}]}
  by_header: {correlate: {header: x-order}, steps: [{channel: audit}]}
  by_line: {correlate: "$.items[1].sku", steps: [{channel: lines}]}
"""

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_observe_puts_every_field_in_its_place() -> None:
    # observe() builds the observation positionally (it is the tap's hot path): a
    # field added or moved in Observation must not shift the others.
    ad = adapter("k", loads(TOPOLOGY))
    body = b'{"order": {"id": 7}}'
    obs = ad.observe(
        Kind.DEAD_LETTERED,
        "orders",
        body=body,
        headers={ID_HEADER: b"fc-1", "traceparent": TRACEPARENT, "password": "s3cret"},
        properties={"message_id": "m-1"},
        kafka_key="k-1",
        at=(123, 4.5),
        broker_ms=99,
        routing_key="rk",
        partition=3,
        offset=41,
        entry_id="1-2",
        group="g",
        delivery_count=5,
        reason="boom",
        origin="audit",
    )
    assert obs == Observation(
        kind=Kind.DEAD_LETTERED,
        broker="k",
        channel="orders",
        mono_ns=123,
        wall=4.5,
        broker_ms=99,
        fc_id="fc-1",
        message_id="m-1",
        trace_id="0af7651916cd43dd8448eb211c80319c",
        keys={"placed": "7"},
        routing_key="rk",
        kafka_key="k-1",
        partition=3,
        offset=41,
        entry_id="1-2",
        group="g",
        headers={ID_HEADER: "fc-1", "traceparent": TRACEPARENT, "password": "***"},
        payload=body.decode(),
        size=len(body),
        delivery_count=5,
        reason="boom",
        origin="audit",
    )


def test_observe_defaults() -> None:
    ad = adapter("k", loads(TOPOLOGY))
    obs = ad.observe(Kind.ROUTED, "orders")
    assert (obs.kind, obs.channel, obs.keys, obs.headers, obs.payload, obs.size) == (
        Kind.ROUTED,
        "orders",
        {},
        {},
        None,
        0,
    )
    assert obs.mono_ns > 0
    assert obs.wall > 0


BIG = b'{"order": {"id": "big"}, "pad": "' + b"x" * PAYLOAD_CAP + b'"}'


@pytest.mark.parametrize(
    "body",
    [
        b'{"order": {"id": 7}}',
        b'{"order": {"id": "o-1"}}',
        b'{"order": {"id": {"nested": 1}}}',  # not a scalar: no key
        b'{"order": {"id": NaN}, "x": NaN}',  # msgspec refuses NaN, json.loads does not
        b'{"order": null}',
        b'{"order": 5}',  # on the path, not an object
        b'{"order": {"id": null}}',
        b'{"order": {"id": true}}',
        b'{"order": {"id": 1.5e3}}',
        b'{"order": {"id": [1, 2]}}',
        b'[{"order": {"id": 1}}]',  # an array at the top
        b'"just a string"',
        b'{"order": {"id": 1}, "order": {"id": 2}}',  # duplicate keys: the last one
        b'{"ord\\u0065r": {"id": "escaped"}}',
        b'{"other": {"deep": [{"x": {"y": 1}}]}, "order": {"id": "after"}}',
        b'{"order": {"id": 1}',  # truncated
        b'{"items": [{"sku": "a"}, {"sku": "b"}]}',
        b"not json",
        b"\xff\xfe broken utf-8",
        b"",
        BIG,  # cut in the observation, read whole by the rule
    ],
)
@pytest.mark.parametrize("channel", ["orders", "audit", "lines"])
def test_key_functions_agree_with_the_rules(body: bytes, channel: str) -> None:
    correlator = Correlator(loads(TOPOLOGY))
    headers = {"x-order": "h-1"}
    payload = body[:PAYLOAD_CAP].decode("utf-8", errors="replace")
    fast = correlator.key_fns[channel](headers, payload, {}, None, body)
    assert fast == correlator.keys(channel, Message(headers, payload, {}, None, body))
    if body == BIG and channel != "lines":
        assert fast.get("placed" if channel == "orders" else "audited") == "big"

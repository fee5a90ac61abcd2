"""A flow's route map: which channels are its steps, carry its retries, hold its dead
letters; the one map the checker, the correlator and the pytest API share."""

from __future__ import annotations

from flowcheck.correlate import Correlator
from flowcheck.topology import Topology, loads
from flowcheck.topology.routing import flow_routes

TOPOLOGY = """
brokers: {r: {kind: rabbitmq}, k: {kind: kafka}, s: {kind: redis}}
channels:
  orders: {broker: r, kind: exchange, type: fanout}
  retry-dlx: {broker: r, kind: exchange, type: fanout}
  billing:
    broker: r
    kind: queue
    bindings: [{exchange: orders}]
    dead_letter: retry-dlx
    retry: [billing-wait]
  billing-wait:
    broker: r
    kind: queue
    bindings: [{exchange: retry-dlx}]
    ttl: 1s
    dead_letter: orders
  pay: {broker: k, kind: topic, retry: [pay-retry], dead_letter: pay-dlt}
  pay-retry: {broker: k, kind: topic}
  pay-dlt: {broker: k, kind: topic}
  ship: {broker: s, kind: stream, groups: [g], delivery_limit: 3, dead_letter: ship-dead}
  ship-dead: {broker: s, kind: stream}
flows:
  f:
    correlate: {json: $.id}
    steps: [orders, billing, pay, ship]
    dead_letters: [{when: {payload: {$.bad: true}}, channel: pay-dlt}]
"""


def _topology() -> Topology:
    return loads(TOPOLOGY)


def test_retries_and_dead_letters_of_every_broker() -> None:
    t = _topology()
    routes = flow_routes(t, t.flows["f"])
    assert routes.steps == {"orders": [0], "billing": [1], "pay": [2], "ship": [3]}
    # The delay-queue pattern: a DLX whose queues are all retry queues carries retries.
    assert routes.retry_of == {"billing-wait": 1, "retry-dlx": 1, "pay-retry": 2}
    assert routes.dead == {"pay-dlt", "ship-dead"}
    assert routes.retry_visible == [False, True, True, False]
    assert routes.route["retry-dlx"] == (1, False, None)
    assert routes.route["pay-dlt"] == (None, True, None)
    assert routes.route["ship"] == (None, False, [3])
    assert routes.watched == set(routes.route)


def test_the_correlator_keys_every_channel_of_the_map() -> None:
    t = _topology()
    assert set(Correlator(t).rules) == flow_routes(t, t.flows["f"]).watched


def test_channels_answer_their_broker_questions() -> None:
    ch = _topology().channels
    assert [ch[c].consumed for c in ("orders", "billing", "pay", "ship")] == [
        False,
        True,
        True,
        True,
    ]
    assert ch["billing"].retry_channels == ["billing-wait"]
    assert ch["billing"].dead_letter_channel is None  # through its exchange
    assert ch["pay"].dead_letter_channel == "pay-dlt"
    assert ch["pay"].partitioned
    assert not ch["ship"].partitioned
    assert ch["ship"].attempts_polled
    assert not ch["ship-dead"].attempts_polled
    assert ch["billing"].returns_routed
    assert not ch["pay"].returns_routed
    assert not ch["ship"].drops_over_limit
    assert "firehose" in ch["billing"].unseen_attempts("billing")

"""The brokers' planning and parsing, and the base's reconnect loop, without a broker.

What each adapter declares, binds and makes of a broker's answers is a pure
function of the topology and the answer: tested here directly. The same behaviour
is tested end to end against the real brokers in the other modules.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from aiokafka import errors as kafka_errors

from flowcheck.brokers import adapter, base
from flowcheck.brokers.base import Drift
from flowcheck.brokers.kafka import _parse as kafka_parse
from flowcheck.brokers.kafka import _plan as kafka_plan
from flowcheck.brokers.rabbitmq import _parse as rabbit_parse
from flowcheck.brokers.rabbitmq import _plan as rabbit_plan
from flowcheck.brokers.redis import RedisAdapter
from flowcheck.brokers.redis import _parse as redis_parse
from flowcheck.brokers.redis import _plan as redis_plan
from flowcheck.errors import BrokerUnreachable
from flowcheck.observations import Kind, Observation
from flowcheck.topology.model import Exchange, Queue, Topic, Topology

from .conftest import load

RABBIT = load(
    """
brokers:
  rb: {kind: rabbitmq, url: "amqp://guest:guest@127.0.0.1:1/"}
channels:
  events: {broker: rb, kind: exchange, type: topic, name: p.events}
  jobs: {broker: rb, kind: exchange, type: direct, name: p.jobs}
  kinds: {broker: rb, kind: exchange, type: headers, name: p.kinds}
  safe: {broker: rb, kind: exchange, type: direct, name: p.safe, alternate: strays}
  strays: {broker: rb, kind: exchange, type: fanout, name: p.strays}
  dead: {broker: rb, kind: exchange, type: direct, name: p.dead}
  inbox:
    broker: rb
    kind: queue
    name: p.inbox
    bindings: [{exchange: events, key: "order.#"}]
  work:
    broker: rb
    kind: queue
    type: quorum
    name: p.work
    delivery_limit: 3
    ttl: 2s
    bindings: [{exchange: jobs, key: job}, {exchange: jobs, key: chore}, {exchange: safe, key: a}]
    dead_letter: {exchange: dead, key: failed}
  refunds:
    broker: rb
    kind: queue
    name: p.refunds
    bindings: [{exchange: kinds, arguments: {x-match: all, kind: refund}}]
  dlq: {broker: rb, kind: queue, name: p.dlq, bindings: [{exchange: dead, key: failed}]}
  straight: {broker: rb, kind: queue, name: p.straight}
"""
)
NAMES = {k: RABBIT.channel_name(k) for k in RABBIT.channels}


def _queue(key: str) -> Queue:
    q = RABBIT.channels[key]
    assert isinstance(q, Queue)
    return q


# ---------------------------------------------------------------- RabbitMQ: plan


def test_a_queue_is_declared_with_the_arguments_the_topology_gives() -> None:
    assert rabbit_plan.queue_spec(_queue("work"), NAMES) == (
        {"durable": True},
        {
            "x-queue-type": "quorum",
            "x-delivery-limit": 3,
            "x-message-ttl": 2000,
            "x-dead-letter-exchange": "p.dead",
            "x-dead-letter-routing-key": "failed",
        },
    )
    exchange = RABBIT.channels["safe"]
    assert isinstance(exchange, Exchange)
    assert rabbit_plan.exchange_spec(exchange, NAMES) == (
        {"type": "direct", "durable": True},
        {"alternate-exchange": "p.strays"},
    )


def test_each_twin_is_bound_as_its_channel_routes() -> None:
    def bound(key: str) -> list[rabbit_plan.Binding]:
        return rabbit_plan.tap_bindings(RABBIT, NAMES, key)

    assert bound("events") == [("p.events", "#", None)]  # topic: everything
    assert bound("strays") == [("p.strays", "", None)]
    # direct: every key the topology routes through it, dead-letter keys too
    assert bound("jobs") == [("p.jobs", "chore", None), ("p.jobs", "job", None)]
    assert bound("dead") == [("p.dead", "failed", None)]
    # with an alternate: only where the topology routes, so strays still reach it
    assert bound("safe") == [("p.safe", "a", None)]
    assert bound("refunds") == [("p.kinds", "", {"x-match": "all", "kind": "refund"})]
    assert bound("straight") == []


def test_queues_behind_tapped_routing_exchanges_need_no_twin() -> None:
    everything = list(RABBIT.channels)
    seen = rabbit_plan.seen_through_exchanges(RABBIT, everything)
    # refunds: a headers binding; work: bound to an exchange with an alternate... still
    # direct, so seen; straight: no bindings, only the firehose sees it.
    assert seen == {"inbox", "work", "dlq"}
    assert rabbit_plan.seen_through_exchanges(RABBIT, ["inbox"]) == set()


def test_the_firehose_is_bound_for_deliveries_publishes_and_straight_queues() -> None:
    assert rabbit_plan.firehose_keys(RABBIT, NAMES, ["events", "inbox"]) == [
        "publish.p.events",
        "deliver.p.inbox",
    ]
    assert rabbit_plan.straight_queues(RABBIT, NAMES, ["inbox", "straight"]) == {
        "p.straight": "straight"
    }
    assert rabbit_plan.firehose_keys(RABBIT, NAMES, ["straight"]) == [
        "deliver.p.straight",
        "publish.",
    ]


def test_dead_letter_targets_and_the_delivery_limit() -> None:
    assert rabbit_plan.dead_letter_targets(RABBIT) == {"dlq"}
    assert rabbit_plan.past_limit(RABBIT, "work") == 4
    assert rabbit_plan.past_limit(RABBIT, "inbox") is None
    assert rabbit_plan.past_limit(RABBIT, None) is None


# ---------------------------------------------------------------- RabbitMQ: parse

REFUSED = (
    "PRECONDITION_FAILED - inequivalent arg '{arg}' for queue 'p.work' in vhost '/': "
    "received {want} but current is {have}"
)


@pytest.mark.parametrize(
    ("arg", "want", "have", "ours", "expected"),
    [
        ("x-max-length", "'10'", "'20'", 10, 20),
        ("durable", "'true'", "'false'", True, False),
        ("x-queue-type", "the value 'quorum' of type 'longstr'", "none", "quorum", None),
        ("x-message-ttl", "none", "the value '500' of type 'long'", None, 500),
        ("x-overflow", "'reject-publish'", "'drop head'", "reject-publish", "drop head"),
    ],
)
def test_a_refused_declare_says_which_setting_differs(
    arg: str, want: str, have: str, ours: Any, expected: Any
) -> None:
    text = REFUSED.format(arg=arg, want=want, have=have)
    assert rabbit_parse.differing(text, {arg: ours}) == (arg, ours, expected)
    assert rabbit_parse.differing("PRECONDITION_FAILED - invalid arg 'x-foo'", {}) is None


def _props(**fields: Any) -> Any:
    base_fields = dict.fromkeys(
        ("message_id", "correlation_id", "app_id", "message_type", "user_id", "reply_to")
    )
    return SimpleNamespace(**{"headers": None, **base_fields, **fields})


def _copy(props: Any, *, dead_letters: bool = False, unroutable: bool = False) -> Any:
    return rabbit_parse.read_copy(
        props,
        "order.placed",
        dead_letters=dead_letters,
        by_physical={v: k for k, v in NAMES.items()},
        past_limit=lambda origin: rabbit_plan.past_limit(RABBIT, origin),
        unroutable=unroutable,
    )


def test_a_copy_reads_as_routed_unroutable_or_dead_lettered() -> None:
    plain = _copy(_props(message_id="m-1", app_id="shop"))
    assert (plain.kind, plain.routing_key, plain.delivery_count) == (
        Kind.ROUTED,
        "order.placed",
        None,
    )
    assert plain.properties["message_id"] == "m-1"
    assert plain.properties["app_id"] == "shop"
    stray = _copy(_props(), unroutable=True)
    assert stray.kind is Kind.UNROUTABLE
    death = {"count": 2, "reason": b"delivery_limit", "queue": b"p.work"}
    # Back on a work queue after a dead-letter round trip: arrival count + 1.
    again = _copy(_props(headers={"x-death": [death]}))
    assert (again.kind, again.delivery_count) == (Kind.ROUTED, 3)
    # On a dead-letter queue: why, from where, after the limit's deliveries.
    dead = _copy(_props(headers={"x-death": [death]}), dead_letters=True)
    assert (dead.kind, dead.reason, dead.origin, dead.delivery_count) == (
        Kind.DEAD_LETTERED,
        "delivery_limit",
        "work",
        4,
    )
    counted = _copy(_props(headers={"x-death": [death], "x-delivery-count": 5}), dead_letters=True)
    assert counted.delivery_count == 5


def _firehose(rk: str, **meta: Any) -> Any:
    by_physical = {v: k for k, v in NAMES.items()}
    return rabbit_parse.read_firehose(meta, rk, by_physical, {"p.straight": "straight"})


def test_the_firehose_reads_deliveries_redeliveries_and_unroutable_publishes() -> None:
    props = {"headers": {"x-delivery-count": 1}, "message_id": "m"}
    key, again = _firehose("deliver.p.work", properties=props, routing_keys=[b"job"])
    assert (key, again.kind, again.delivery_count, again.routing_key) == (
        "work",
        Kind.REDELIVERED,
        2,
        "job",
    )
    assert again.properties == {"message_id": "m"}
    key, first = _firehose("deliver.p.inbox", properties={}, redelivered=False)
    assert (key, first.kind, first.delivery_count) == ("inbox", Kind.DELIVERED, 1)
    _, lost = _firehose("publish.p.events", routed_queues=[], routing_keys=["x"])
    assert (lost.kind, lost.reason) == (Kind.UNROUTABLE, "NO_ROUTE")
    key, straight = _firehose("publish.", routing_keys=["p.straight"], routed_queues=["q"])
    assert (key, straight.kind) == ("straight", Kind.ROUTED)
    # Routed publishes are the twins' to see; other channels are not tapped.
    assert _firehose("publish.p.events", routed_queues=["p.inbox"]) is None
    assert _firehose("deliver.elsewhere") is None
    assert _firehose("publish.", routing_keys=["p.other"]) is None


# ---------------------------------------------------------------- Redis


def test_redis_urls_lose_the_options_that_change_replies() -> None:
    url = "redis://h:1/0?protocol=3&decode_responses=true&health_check_interval=2"
    assert redis_plan.own_options(url) == "redis://h:1/0?health_check_interval=2"
    assert redis_plan.own_options("redis://h/0?protocol=3") == "redis://h/0"
    assert redis_plan.own_options("redis://h/0") == "redis://h/0"


def test_a_stream_entry_reads_as_routed_or_dead_lettered() -> None:
    fields = [b"x-flowcheck-id", b"f", b"payload", b'{"a": 1}', b"attempts", b"3", 7, 8]
    body, headers, kind, count, origin, reason = redis_parse.read_entry(fields, "payload", None)
    assert (body, kind, count, origin) == (b'{"a": 1}', Kind.ROUTED, None, None)
    assert headers == {"x-flowcheck-id": "f", "attempts": "3", "7": "8"}
    fields += [b"error", b"boom"]
    _, _, kind, count, origin, reason = redis_parse.read_entry(fields, "payload", "orders")
    assert (kind, count, origin, reason) == (Kind.DEAD_LETTERED, 3, "orders", "boom")
    # Another writer's count that is no number is no count.
    odd = [b"payload", b"", b"attempts", "²".encode()]
    assert redis_parse.read_entry(odd, "payload", "orders")[3] is None
    assert redis_parse.read_entry([b"k", b"v"], "payload", None)[0] is None


def test_a_groups_pending_entries_become_deliveries_and_acknowledgements() -> None:
    seen: dict[str, int] = {"1-0": 0, "2-0": 0, "3-0": 1, "4-0": 0}
    pending = {"2-0": (1, "w1"), "3-0": (2, "w2"), "9-0": (1, "w1")}
    events, acked = redis_parse.pending_evidence(pending, seen, "4-0", "4-0")
    assert events == [
        (Kind.DELIVERED, "2-0", 1, None),
        (Kind.REDELIVERED, "3-0", 2, "consumer w2"),
        # 1-0 and 4-0: delivered and acknowledged between two polls
        (Kind.DELIVERED, "1-0", 1, None),
        (Kind.CONSUMED, "1-0", 1, None),
        (Kind.DELIVERED, "4-0", 1, None),
        (Kind.CONSUMED, "4-0", 1, None),
    ]
    assert acked == ["1-0", "4-0"]
    assert seen == {"2-0": 1, "3-0": 2}  # 9-0: not read by the tap yet
    events, acked = redis_parse.pending_evidence({}, seen, "4-0", "2-0")
    assert events == [(Kind.CONSUMED, "2-0", 1, None)]
    assert seen == {"3-0": 2}


def test_redis_reply_helpers() -> None:
    assert redis_parse.field([b"length", 3, b"entries-added", 10], "entries-added") == 10
    assert redis_parse.field([b"length", 3], "entries-added") is None
    assert redis_parse.field(None, "length") is None
    assert redis_parse.deleted(added=10, added_at_start=4, read=5) == 1
    assert redis_parse.id_key("17-3") > redis_parse.id_key("17-2") > redis_parse.id_key("9")
    assert redis_parse.not_streams({"b": "hash", "a": "string"}) == (
        "cannot tap keys that are not streams: 'a' holds a string, 'b' holds a hash"
    )


# ---------------------------------------------------------------- Kafka

KAFKA = load(
    """
brokers:
  k: {kind: kafka, bootstrap: "127.0.0.1:1"}
channels:
  orders: {broker: k, kind: topic, name: p.orders, partitions: 3, replication: 2}
  orders-dlt: {broker: k, kind: topic, name: p.orders.DLT}
services:
  billing: {consumes: [{channel: orders, group: billing}, {channel: orders, group: audit}]}
  mail: {consumes: [{channel: orders, group: billing}, {channel: orders-dlt}]}
"""
)


def test_kafka_plans_groups_and_drift() -> None:
    # Each group once; a consumer without a group leaves no evidence to poll.
    assert kafka_plan.consumer_groups(KAFKA, ["orders", "orders-dlt"]) == {
        "orders": ["billing", "audit"]
    }
    topic = KAFKA.channels["orders"]
    assert isinstance(topic, Topic)
    assert kafka_plan.topic_drift("orders", topic, 3, 2) == []
    assert kafka_plan.topic_drift("orders", topic, 1, 3) == [
        Drift("orders", "partitions", 3, 1),
        Drift("orders", "replication", 2, 3),
    ]
    described = [
        {"topic": "a", "partitions": [{"replicas": [1, 2]}, {"replicas": [1]}]},
        {"topic": "b", "partitions": [], "error_code": 3},
    ]
    assert kafka_plan.shapes(described) == {"a": (2, 2)}


def test_a_kafka_record_reads_its_headers_and_dead_letter_origin() -> None:
    raw = [("retry_topic-attempts", (2).to_bytes(4, "big")), ("x", b"\xff"), ("n", None)]
    headers = kafka_parse.read_headers(raw)
    assert headers == {"retry_topic-attempts": 2, "x": "\ufffd", "n": None}
    assert kafka_parse.read_dead_letter(headers, None, {}) == (Kind.ROUTED, None, None, 2)
    dlt = {"kafka_dlt-original-topic": "p.orders", "kafka_dlt-exception-fqcn": "Boom"}
    assert kafka_parse.read_dead_letter(dlt, "elsewhere", {"p.orders": "orders"}) == (
        Kind.DEAD_LETTERED,
        "orders",
        "Boom",
        None,
    )
    assert kafka_parse.read_dead_letter({}, "orders", {})[1] == "orders"


def test_create_topics_refusals_but_not_topics_that_exist() -> None:
    exists = kafka_errors.TopicAlreadyExistsError.errno
    invalid = kafka_errors.InvalidReplicationFactorError.errno
    errors = [("a", 0, None), ("b", exists, None), ("c", invalid, "only 1 broker")]
    refused = kafka_parse.refused(errors, exists, kafka_errors.for_code)
    assert list(refused) == ["c"]
    assert "only 1 broker" in refused["c"]


def test_commit_evidence_is_released_in_offset_order() -> None:
    evidence = kafka_parse.Evidence({"orders": ["billing"]})
    seen = [
        Observation(Kind.ROUTED, "k", "orders", n, 0.0, offset=n, partition=0) for n in range(3)
    ]
    for obs in seen:
        evidence.seen("orders", 0, obs)
    assert evidence.committed("orders", "billing", 0, 2) == seen[:2]
    assert evidence.committed("orders", "billing", 0, 2) == []
    evidence.forget("orders", 0)
    assert evidence.committed("orders", "billing", 0, 9) == []


# ---------------------------------------------------------------- the base


def _adapter(topology: Topology = RABBIT) -> base.Adapter:
    return adapter(next(iter(topology.brokers)), topology)


async def test_reopen_backs_off_until_the_broker_answers() -> None:
    attempts: list[int] = []
    failures: list[str] = []

    async def open_() -> str:
        attempts.append(len(attempts))
        if len(attempts) < 3:
            raise BrokerUnreachable("rb", f"attempt {len(attempts)}")
        return "connection"

    assert await base.Adapter.reopen(open_, lambda e: failures.append(str(e))) == "connection"
    assert failures == ["rb: attempt 1", "rb: attempt 2"]


async def test_reconnecting_records_each_outage_and_raises_when_it_cannot_start() -> None:
    ad = _adapter()
    got: list[Observation] = []
    opened: list[int] = []
    outages = ["lost once", "lost twice"]

    async def open_() -> int:
        opened.append(len(opened))
        if len(opened) == 2:
            raise BrokerUnreachable("rb", "refused")
        return len(opened)

    async def watch(conn: int, watching: Any) -> str:
        watching()
        if not outages:
            await anyio.sleep_forever()
        return outages.pop(0)

    closed: list[int] = []

    async def close(conn: int) -> None:
        closed.append(conn)

    channels: Sequence[str] = ["events"]
    both = anyio.Event()

    def sink(obs: Observation) -> None:
        got.append(obs)
        if len(got) == 2:
            both.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ad.reconnecting, channels, sink, open_, watch, close)
            await both.wait()
            tg.cancel_scope.cancel()
    assert closed == [1, 3, 4]
    assert [(o.kind, o.reason) for o in got] == [
        (Kind.GAP, "rb: refused"),  # the newest reason of an outage counts
        (Kind.GAP, "lost twice"),
    ]
    assert all(o.until_ns is not None for o in got)

    async def never(*_: Any) -> Any:
        raise BrokerUnreachable("rb", "no broker")

    with pytest.raises(BrokerUnreachable):
        await _adapter().reconnecting(channels, got.append, never, watch, close)


def test_a_brief_outage_stays_shown_after_the_tap_is_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ad = _adapter()
    clock = [1_000_000_000]
    monkeypatch.setattr(base, "now", lambda: (clock[0], 0.0))
    got: list[Observation] = []
    ad.went_down("blip")
    since = clock[0]
    clock[0] += 1_000_000
    assert ad.came_back(["events"], got.append)
    assert ad.watching
    assert ad.down == (since, "blip")  # a poller four times a second still sees it
    [gap] = got
    assert (gap.mono_ns, gap.until_ns) == (since, since + 1_000_000)  # the true end
    clock[0] = since + base.SHOWN_FOR_NS
    assert ad.down is None
    assert not ad.came_back(["events"], got.append)
    ad.went_down("again")
    assert not ad.watching
    assert ad.down == (clock[0], "again")


def test_importing_the_brokers_patches_nothing() -> None:
    # A system under test in the same process keeps its libraries as they are until
    # a tap or client starts.
    probe = (
        "import logging, pamqp.decode as d\n"
        "before = dict(d.METHODS), dict(d.TABLE_MAPPING)\n"
        "import flowcheck.brokers.kafka, flowcheck.brokers.rabbitmq, flowcheck.brokers.redis\n"
        "assert (dict(d.METHODS), dict(d.TABLE_MAPPING)) == before\n"
        "loggers = logging.Logger.manager.loggerDict.items()\n"
        "assert not [n for n, g in loggers if isinstance(g, logging.Logger) and g.filters]\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


DEFAULT_DLX = load(
    """
brokers:
  rb: {kind: rabbitmq, url: "amqp://guest:guest@127.0.0.1:1/"}
channels:
  store: {broker: rb, kind: queue, name: p.store, dead_letter: {queue: store.XQ}}
  store.XQ: {broker: rb, kind: queue, name: p.store.XQ}
  orders: {broker: rb, kind: queue, name: p.orders, dead_letter: {queue: parking, published_by: worker}}
  parking: {broker: rb, kind: queue, name: p.parking}
services:
  worker: {consumes: [orders], publishes: [parking]}
"""
)


def test_a_dead_letter_route_to_a_queue_goes_through_the_default_exchange() -> None:
    names = {k: DEFAULT_DLX.channel_name(k) for k in DEFAULT_DLX.channels}
    store = DEFAULT_DLX.channels["store"]
    assert isinstance(store, Queue)
    assert rabbit_plan.queue_arguments(store, names) == {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "p.store.XQ",
    }
    # The service publishes its dead letters itself: the broker is told nothing.
    orders = DEFAULT_DLX.channels["orders"]
    assert isinstance(orders, Queue)
    assert rabbit_plan.queue_arguments(orders, names) == {}
    assert rabbit_plan.dead_letter_targets(DEFAULT_DLX) == {"store.XQ", "parking"}
    # Neither has bindings: only the firehose shows what reaches them.
    assert rabbit_plan.straight_queues(DEFAULT_DLX, names, ["store.XQ", "parking"]) == {
        "p.store.XQ": "store.XQ",
        "p.parking": "parking",
    }


def test_the_firehose_reads_a_delivery_from_a_dead_letter_queue_as_the_dead_letter() -> None:
    by_physical = {DEFAULT_DLX.channel_name(k): k for k in DEFAULT_DLX.channels}
    direct = {"p.store.XQ": "store.XQ", "p.parking": "parking"}
    death = {"count": 1, "reason": b"rejected", "queue": b"p.store", "exchange": b""}
    props = {"headers": {"x-death": [death]}, "message_id": None}
    meta = {"properties": props, "routing_keys": [b"p.store"], "redelivered": 0}
    read = rabbit_parse.read_firehose(meta, "deliver.p.store.XQ", by_physical, direct, {"store.XQ"})
    assert read is not None
    key, dead = read
    assert (key, dead.kind, dead.reason, dead.origin) == (
        "store.XQ",
        Kind.DEAD_LETTERED,
        "rejected",
        "store",
    )
    # Without x-death, or on a queue nothing dead-letters into: a plain delivery.
    plain = {**meta, "properties": {"headers": {}}}
    read = rabbit_parse.read_firehose(
        plain, "deliver.p.store.XQ", by_physical, direct, {"store.XQ"}
    )
    assert read is not None
    assert read[1].kind is Kind.DELIVERED
    read = rabbit_parse.read_firehose(meta, "deliver.p.store.XQ", by_physical, direct)
    assert read is not None
    assert read[1].kind is Kind.DELIVERED
    # The service's own dead letter is a publish straight to the parking queue.
    read = rabbit_parse.read_firehose(
        {"routing_keys": ["p.parking"], "routed_queues": ["p.parking"]},
        "publish.",
        by_physical,
        direct,
    )
    assert read is not None
    assert (read[0], read[1].kind) == ("parking", Kind.ROUTED)


def test_the_firehose_is_needed_for_straight_queues_and_judged_attempts() -> None:
    top = load(
        """
brokers:
  rb: {kind: rabbitmq, url: "amqp://guest:guest@127.0.0.1:1/"}
channels:
  events: {broker: rb, kind: exchange, type: topic}
  inbox: {broker: rb, kind: queue, bindings: [{exchange: events, key: "#"}]}
  store: {broker: rb, kind: queue}
flows:
  f:
    correlate: $.id
    steps: [events, {channel: inbox, retry: {max_attempts: 3}}]
"""
    )
    names = {k: top.channel_name(k) for k in top.channels}
    assert rabbit_plan.firehose_needs(top, names, list(top.channels)) == (["store"], ["inbox"])
    # Only what is tapped: a bound queue without attempts to count needs nothing.
    assert rabbit_plan.firehose_needs(top, names, ["events"]) == ([], [])


@pytest.mark.parametrize(
    ("seen", "last_delivered", "oldest", "gone"),
    [
        # Unread, past the group's last delivery, below the stream's first entry: trimmed.
        ({"1-0": 0, "2-0": 0, "3-0": 0}, "0-0", "3-0", ["1-0", "2-0"]),
        # The stream is empty: every unread entry went.
        ({"1-0": 0}, "0-0", None, ["1-0"]),
        # Delivered already (pending, or read up to): not the group's loss to trimming.
        ({"1-0": 2, "2-0": 0}, "2-0", "5-0", []),
        # Still in the stream: the group may yet read it.
        ({"4-0": 0}, "0-0", "3-0", []),
        # Read by the tap after the poll found the stream empty: added since, not trimmed
        # (a fresh stream's first entry, acknowledged before the next poll, was once
        # reported trimmed, and its chain never saw a delivery).
        ({"1-0": 0, "7-0": 0}, "0-0", None, ["1-0"]),
    ],
)
def test_redis_entries_trimmed_before_a_group_read_them(
    seen: dict[str, int], last_delivered: str, oldest: str | None, gone: list[str]
) -> None:
    assert redis_parse.trimmed_unread(seen, last_delivered, oldest, "5-0") == gone


def faststream_binary(body: Any, headers: dict[str, str] | None = None) -> bytes:
    """The ``__data__`` FastStream's RedisBroker writes for ``body`` (its default format)."""
    parser = pytest.importorskip("faststream.redis.parser")
    encode = parser.BinaryMessageFormatV1.encode(
        message=body, reply_to=None, headers=headers, correlation_id="c-1"
    )
    return bytes(anyio.run(lambda: encode))


def test_faststream_binary_envelope_unwraps_as_faststream_reads_it() -> None:
    parser = pytest.importorskip("faststream.redis.parser")
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    data = faststream_binary({"order_id": "o-1"}, {"traceparent": trace, "x-empty": ""})
    body, headers = parser.BinaryMessageFormatV1.parse(data)
    assert redis_parse.faststream_envelope(data) == (body, headers)
    assert (body, headers["traceparent"], headers["correlation_id"]) == (
        b'{"order_id": "o-1"}',
        trace,
        "c-1",
    )
    # In a stream entry: the body is the payload, the envelope's headers its headers
    # (over the entry's other fields).
    fields = [b"__data__", data, b"correlation_id", b"field", b"where", b"entry"]
    read = redis_parse.read_entry(fields, "__data__", None)
    assert read[:3] == (body, {**headers, "where": "entry"}, Kind.ROUTED)
    # Only in FastStream's own field: elsewhere the bytes are another writer's payload.
    assert redis_parse.read_entry([b"payload", data], "payload", None)[:2] == (data, {})
    # No headers, a body that is not JSON.
    bare = data[:8] + b"\x00\x01\x00\x00\x00\x12\x00\x00\x00\x14\x00\x00"
    assert redis_parse.faststream_envelope(bare + b"\x00\xff") == (b"\x00\xff", {})


@pytest.mark.parametrize(
    ("data", "body", "headers"),
    [
        # FastStream before 0.6 (JSONMessageFormat): the body as text, and its headers.
        (
            b'{"data": "{\\"order_id\\": \\"o-1\\"}", "headers": {"correlation_id": "c-1"}}',
            b'{"order_id": "o-1"}',
            {"correlation_id": "c-1"},
        ),
        # Its reader takes the headers as missing, and other JSON values as they are.
        (b'{"data": "plain text"}', b"plain text", {}),
        (
            b'{"data": "", "headers": {"n": 1, "ok": true, "no": null}}',
            b"",
            {"n": "1", "ok": "true", "no": "null"},
        ),
    ],
)
def test_faststream_json_envelopes_unwrap(
    data: bytes, body: bytes, headers: dict[str, str]
) -> None:
    assert redis_parse.faststream_envelope(data) == (body, headers)
    assert redis_parse.read_entry([b"__data__", data], "__data__", None)[:2] == (body, headers)
    # Only in FastStream's own field: elsewhere such JSON is the application's payload.
    assert redis_parse.read_entry([b"payload", data], "payload", None)[:2] == (data, {})


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b'{"order_id": "o-1"}',  # a plain JSON body: FastStream with no envelope
        b'{"data": "x", "headers": {}, "more": 1}',
        b'{"data": 7, "headers": {}}',
        b'{"data": "x", "headers": []}',
        b'["data", "headers"]',
        b"{not json",
        b"\x89BIN\r\n\x1a\n\x00\x02" + bytes(10),  # a version FastStream never wrote
        b"\x89PNG\r\n\x1a\n" + bytes(20),
    ],
)
def test_what_is_no_faststream_envelope_stays_the_payload(data: bytes) -> None:
    assert redis_parse.faststream_envelope(data) is None
    assert redis_parse.read_entry([b"__data__", data], "__data__", None)[:2] == (data, {})


def test_a_truncated_faststream_envelope_stays_the_payload() -> None:
    data = faststream_binary({"order_id": "o-1"}, {"traceparent": "t"})
    body_at = len(data) - len(b'{"order_id": "o-1"}')
    for end in range(body_at):
        cut = data[:end]
        assert redis_parse.faststream_envelope(cut) is None, end
        assert redis_parse.read_entry([b"__data__", cut], "__data__", None)[:2] == (cut, {})
    # The format has no body length: a body cut short is the body there is.
    assert redis_parse.faststream_envelope(data[: body_at + 3]) == (
        b'{"o',
        {"correlation_id": "c-1", "content-type": "application/json", "traceparent": "t"},
    )
    # Offsets that overrun the entry, or a header block that does not end at the body.
    for at, value in (
        (10, 0xFFFFFFFF),
        (14, 0xFFFFFFFF),
        (14, 19),  # the body before the header count
        (14, body_at - 1),
        (14, body_at + 1),
    ):
        bad = data[:at] + value.to_bytes(4, "big") + data[at + 4 :]
        assert redis_parse.faststream_envelope(bad) is None, (at, value)
    # FastStream writes a header's length in characters, not bytes: an envelope its own
    # reader gives back whole, as raw bytes; so does flowcheck.
    odd = faststream_binary({"order_id": "o-1"}, {"who": "é"})
    parser = pytest.importorskip("faststream.redis.parser")
    assert parser.BinaryMessageFormatV1.parse(odd) == (odd, {})
    assert redis_parse.faststream_envelope(odd) is None


def test_random_bytes_never_break_the_faststream_reader() -> None:
    parser = pytest.importorskip("faststream.redis.parser")
    rng = random.Random(7)
    real = faststream_binary({"order_id": "o-1"}, {"traceparent": "t"})
    unwrapped = 0
    for n in range(3000):
        size = rng.randrange(0, 64)
        noise = rng.randbytes(size)
        if n % 3 == 1:  # past the magic bytes: only the envelope's own checks remain
            noise = redis_parse.FASTSTREAM_MAGIC + b"\x00\x01" + noise
        elif n % 3 == 2:  # a real envelope with a few bytes changed
            spoilt = bytearray(real)
            for _ in range(rng.randrange(1, 4)):
                spoilt[rng.randrange(8, len(real))] = rng.randrange(256)
            noise = bytes(spoilt)
        read = redis_parse.faststream_envelope(noise)
        if read is not None:  # then exactly as FastStream itself reads it
            unwrapped += 1
            assert read == parser.BinaryMessageFormatV1.parse(noise), noise
        body = redis_parse.read_entry([b"__data__", noise], "__data__", None)[0]
        assert body == (noise if read is None else read[0])
    assert unwrapped > 0  # the spoilt envelopes whose change left them whole


def test_a_faststream_entry_correlates_by_body_header_and_traceparent() -> None:
    top = load(
        """
brokers:
  redis: {kind: redis, url: "redis://127.0.0.1:1/0"}
channels:
  ships: {broker: redis, kind: stream, payload_field: __data__}
flows:
  by-body: {correlate: $.order_id, steps: [ships]}
  by-header: {correlate: {header: correlation_id}, steps: [ships]}
  by-trace: {correlate: traceparent, steps: [ships]}
"""
    )
    trace = "0af7651916cd43dd8448eb211c80319c"
    data = faststream_binary(
        {"order_id": "o-1"},
        {"traceparent": f"00-{trace}-b7ad6b7169203331-01", "x-kind": "shipment"},
    )
    obs = RedisAdapter("redis", top)._entry("ships", "1-0", [b"__data__", data], "__data__")
    assert (obs.kind, obs.payload, obs.trace_id) == (Kind.ROUTED, '{"order_id": "o-1"}', trace)
    assert obs.keys == {"by-body": "o-1", "by-header": "c-1", "by-trace": trace}
    assert obs.headers["x-kind"] == "shipment"  # what a step's match.headers reads

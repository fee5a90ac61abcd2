"""RabbitMQ adapter: dead letters, firehose deliveries, unroutable publishes, drift, gaps.

Needs ``rabbitmqctl`` for the broker under test (the firehose and killing connections).
"""

from __future__ import annotations

import contextvars
import datetime
import decimal
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
import anyio
import pamqp.decode
import pamqp.encode
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage
from anyio.streams.text import TextReceiveStream
from harness import AmqpScope, rabbitmq_vhost, rabbitmqctl
from pamqp.commands import Basic
from pamqp.common import Arguments

from flowcheck.brokers.rabbitmq import RabbitMQAdapter
from flowcheck.brokers.rabbitmq import _parse as rabbitmq_parse
from flowcheck.brokers.rabbitmq._plan import seen_through_exchanges
from flowcheck.checker import FindingKind
from flowcheck.errors import BrokerAuthError, BrokerError
from flowcheck.observations import TEXT_CAP, Kind, Observation, encode
from flowcheck.redact import MASK
from flowcheck.testing import FlowAssertionError, Flowcheck
from flowcheck.trace import Reader
from flowcheck.tracer import Memory, Tracer

from .conftest import (
    FLOW,
    RABBITMQ_YAML,
    SECRET,
    WITHIN,
    cleaned,
    ids,
    load,
    of,
    order,
    rabbitmq_kit,
    tap_raising,
)

DEAD_LETTER_YAML = """
brokers:
  rabbit: {{kind: rabbitmq, url: "${{FC_URL}}"}}
channels:
  jobs: {{broker: rabbit, kind: exchange, type: direct, name: "{p}.jobs", durable: false}}
  work:
    broker: rabbit
    kind: queue
    type: quorum
    name: "{p}.work"
    delivery_limit: 1
    bindings: [{{exchange: jobs, key: job}}]
    dead_letter: {{exchange: dead}}
  dead: {{broker: rabbit, kind: exchange, type: fanout, name: "{p}.dead", durable: false}}
  dlq: {{broker: rabbit, kind: queue, name: "{p}.dlq", durable: false, bindings: [dead]}}
services:
  worker: {{consumes: [work]}}
flows:
  orders:
    correlate: $.order_id
    steps: [jobs, work]
"""


async def close_connections_named(name: str) -> int:
    """Close, from the broker side, every connection whose connection_name is ``name``."""
    listing = await rabbitmqctl(
        "list_connections", "pid", "client_properties", "--no-table-headers"
    )
    # One line per connection: <pid> TAB [{"product","aiormq"},{"connection_name","<name>"},...]
    marker = f'{{"connection_name","{name}"}}'
    doomed = [
        pid
        for pid, _, properties in (line.partition("\t") for line in listing.splitlines())
        if marker in properties
    ]
    for pid in doomed:
        await rabbitmqctl("close_connection", pid, "flowcheck test: simulated network loss")
    return len(doomed)


@pytest_asyncio.fixture
async def firehose(rabbitmq_url: str, unique: str) -> AsyncIterator[str]:
    """The URL of a virtual host of this test's own with RabbitMQ's firehose
    (``trace_on``) on: the firehose is per virtual host, so no other test or process
    sees it, and deleting the virtual host ends it."""
    async with rabbitmq_vhost(rabbitmq_url, unique) as url:
        await rabbitmqctl("trace_on", "-p", unique)
        yield url


async def test_delivery_limit_dead_letters_after_redeliveries(firehose: str, unique: str) -> None:
    topology = load(DEAD_LETTER_YAML.format(p=unique), FC_URL=firehose)
    # What the system's consumer was handed: (redelivered, x-delivery-count) per delivery.
    deliveries: list[tuple[bool | None, object]] = []

    async def refuse(message: AbstractIncomingMessage) -> None:
        deliveries.append((message.redelivered, (message.headers or {}).get("x-delivery-count")))
        await message.nack(requeue=True)

    async with cleaned(topology, "rabbit") as ad:
        assert await ad.apply() == []
        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            sent = await tracer.publish("jobs", order(1), routing_key="job")
            connection = await aio_pika.connect(firehose)
            try:
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=1)
                queue = await channel.get_queue(f"{unique}.work", ensure=False)
                await queue.consume(refuse)

                def settled(items: list[Observation]) -> bool:
                    traced = [
                        o
                        for o in items
                        if o.channel == "work" and o.kind in (Kind.DELIVERED, Kind.REDELIVERED)
                    ]
                    return (
                        sent.fc_id in ids(items, Kind.DEAD_LETTERED, "dlq")
                        and len(traced) >= len(deliveries) >= 2
                    )

                await memory.wait_for(settled, WITHIN)
            finally:
                await connection.close()

    # delivery_limit 1: the first delivery and one redelivery, then the broker dead-letters.
    assert deliveries == [(False, None), (True, 1)]
    [dead] = of(memory.items, Kind.DEAD_LETTERED)
    assert (dead.channel, dead.fc_id, dead.reason, dead.origin) == (
        "dlq",
        sent.fc_id,
        "delivery_limit",
        "work",
    )
    assert dead.keys == {FLOW: "o-1"}
    assert dead.trace_id == sent.trace_id
    # Dead-lettered for its delivery limit: the broker delivered it limit + 1 times, as
    # the consumer saw, though the dead letter carries no delivery count of its own.
    assert dead.delivery_count == len(deliveries) == 2
    # The firehose saw both deliveries on the work queue, numbered.
    on_work = [o for o in memory.items if o.channel == "work" and o.kind is not Kind.ROUTED]
    assert [(o.kind, o.delivery_count, o.fc_id) for o in on_work] == [
        (Kind.DELIVERED, 1, sent.fc_id),
        (Kind.REDELIVERED, 2, sent.fc_id),
    ]
    assert all(o.keys == {FLOW: "o-1"} for o in on_work)


STRAIGHT_YAML = """
brokers:
  rabbit: {{kind: rabbitmq, url: "${{FC_URL}}"}}
channels:
  inbox: {{broker: rabbit, kind: queue, name: "{p}.inbox", durable: false}}
flows:
  orders:
    correlate: $.order_id
    steps: [inbox]
"""


async def test_the_firehose_shows_publishes_straight_to_a_queue(firehose: str, unique: str) -> None:
    topology = load(STRAIGHT_YAML.format(p=unique), FC_URL=firehose)
    async with cleaned(topology, "rabbit") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]):
            # As a system publishes to a work queue: through the default exchange.
            connection = await aio_pika.connect(firehose)
            try:
                channel = await connection.channel()
                for n, queue in enumerate(("inbox", "elsewhere", "inbox")):
                    await channel.default_exchange.publish(
                        aio_pika.Message(order(n)), routing_key=f"{unique}.{queue}"
                    )
            finally:
                await connection.close()
            # The firehose keeps publish order: once the last is seen, so is the rest.
            await memory.wait_for(lambda items: len(items) >= 2, WITHIN)

    assert [(o.kind, o.channel, o.keys) for o in memory.items] == [
        (Kind.ROUTED, "inbox", {FLOW: "o-0"}),
        (Kind.ROUTED, "inbox", {FLOW: "o-2"}),
    ]


async def test_a_queue_published_to_straight_must_exist_to_be_tapped(
    rabbitmq_url: str, unique: str
) -> None:
    topology = load(STRAIGHT_YAML.format(p=unique), FC_URL=rabbitmq_url)
    with pytest.raises(BrokerError) as caught:
        await tap_raising(topology)
    assert str(caught.value) == (
        f"rabbit: cannot tap: NOT_FOUND - no queue '{unique}.inbox' in vhost '/'; run apply first"
    )


async def test_unroutable_publish_is_observed(rabbitmq_url: str, unique: str) -> None:
    kit = rabbitmq_kit(rabbitmq_url, unique)  # topic exchange "events"; "inbox" binds order.#
    async with cleaned(kit.topology, "rabbit") as ad:
        await ad.apply()

        # No tap: the broker returns the mandatory publish.
        returned = await ad.publish("events", order(1), routing_key="invoice.paid")
        assert returned.kind is Kind.UNROUTABLE
        assert (returned.channel, returned.routing_key, returned.reason) == (
            "events",
            "invoice.paid",
            "NO_ROUTE",
        )
        assert returned.fc_id is not None
        assert returned.keys == {FLOW: "o-1"}

        # With a tap, whose own binding makes every publish routable: judged by the topology.
        memory = Memory()
        async with Tracer(kit.topology, [memory]) as tracer:
            lost = await tracer.publish("events", order(2), routing_key="invoice.paid")
            kept = await tracer.publish("events", order(3), routing_key="order.placed")
            await memory.wait_for(
                lambda items: (
                    lost.fc_id in ids(items, Kind.UNROUTABLE, "events")
                    and kept.fc_id in ids(items, Kind.ROUTED, "inbox")
                ),
                WITHIN,
            )

    [unroutable] = of(memory.items, Kind.UNROUTABLE)
    assert (unroutable.fc_id, unroutable.routing_key) == (lost.fc_id, "invoice.paid")
    assert unroutable.keys == {FLOW: "o-2"}
    assert unroutable.reason
    # The inbox (whose tap copy follows publish order) never got the lost one.
    assert ids(memory.items, Kind.ROUTED, "inbox") == [kept.fc_id]
    assert ids(memory.items, Kind.ROUTED, "events") == [kept.fc_id]


ALTERNATE_YAML = """
brokers:
  rabbit: {{kind: rabbitmq, url: "${{FC_URL}}"}}
channels:
  events:
    {{broker: rabbit, kind: exchange, type: topic, name: "{p}.events", durable: false,
     alternate: strays}}
  strays: {{broker: rabbit, kind: exchange, type: fanout, name: "{p}.strays", durable: false}}
  inbox:
    broker: rabbit
    kind: queue
    name: "{p}.inbox"
    durable: false
    bindings: [{{exchange: events, key: "order.#"}}]
  unrouted:
    broker: rabbit
    kind: queue
    name: "{p}.unrouted"
    durable: false
    bindings: [{{exchange: strays, key: ""}}]
flows:
  orders:
    correlate: $.order_id
    steps: [events, inbox]
"""


async def test_a_tap_leaves_strays_to_the_alternate_exchange(
    rabbitmq_url: str, unique: str
) -> None:
    topology = load(ALTERNATE_YAML.format(p=unique), FC_URL=rabbitmq_url)

    def order_ids(items: list[Observation], channel: str) -> list[str]:
        return [json.loads(o.payload or "{}")["order_id"] for o in of(items, Kind.ROUTED, channel)]

    async with cleaned(topology, "rabbit") as ad:
        assert await ad.apply() == []
        memory = Memory()
        async with Tracer(topology, [memory]):
            # The system publishes a message no queue binds, then one the inbox takes.
            connection = await aio_pika.connect(rabbitmq_url)
            try:
                channel = await connection.channel()
                events = await channel.get_exchange(f"{unique}.events", ensure=False)
                await events.publish(aio_pika.Message(order(1)), routing_key="invoice.paid")
                await events.publish(aio_pika.Message(order(2)), routing_key="order.placed")
                # The broker still hands the stray to the alternate exchange, as untapped.
                queue = await channel.get_queue(f"{unique}.unrouted", ensure=False)
                with anyio.fail_after(WITHIN):
                    async with queue.iterator() as messages:
                        async for message in messages:
                            async with message.process():
                                stray = json.loads(message.body)["order_id"]
                            break
            finally:
                await connection.close()
            await memory.wait_for(
                lambda items: (
                    "o-1" in order_ids(items, "unrouted") and "o-2" in order_ids(items, "inbox")
                ),
                WITHIN,
            )

    assert stray == "o-1"
    assert order_ids(memory.items, "strays") == ["o-1"]
    assert order_ids(memory.items, "events") == ["o-2"]  # the twin is bound where queues are
    assert of(memory.items, Kind.UNROUTABLE) == []


async def test_queue_declared_classic_by_hand_drifts_from_quorum(
    amqp: AmqpScope, rabbitmq_url: str, unique: str
) -> None:
    await amqp.declare_queue(f"{unique}.work", durable=True)
    topology = load(
        f"""
brokers:
  rabbit: {{kind: rabbitmq, url: "${{FC_URL}}"}}
channels:
  work: {{broker: rabbit, kind: queue, type: quorum, name: "{unique}.work"}}
""",
        FC_URL=rabbitmq_url,
    )
    async with cleaned(topology, "rabbit") as ad:
        drift = await ad.apply()
        assert [(d.channel, d.setting, d.want) for d in drift] == [
            ("work", "x-queue-type", "quorum")
        ]
        assert "x-queue-type" in str(drift[0])
        assert drift[0].have != "quorum"
        # Reported again, not "fixed": flowcheck never deletes a queue to redeclare it.
        assert [d.setting for d in await ad.apply()] == ["x-queue-type"]


MANY_YAML = """
brokers:
  rabbit: {{kind: rabbitmq, url: "${{FC_URL}}"}}
channels:
  jobs: {{broker: rabbit, kind: exchange, type: topic, name: "{p}.jobs", durable: false}}
  dead: {{broker: rabbit, kind: exchange, type: fanout, name: "{p}.dead", durable: false}}
  work:
    broker: rabbit
    kind: queue
    name: "{p}.work"
    ttl: 1m
    max_length: 10
    overflow: reject-publish
    dead_letter: {{exchange: dead, key: dl}}
  other: {{broker: rabbit, kind: queue, name: "{p}.other", bindings: [{{exchange: jobs, key: job}}]}}
  dlq: {{broker: rabbit, kind: queue, name: "{p}.dlq", bindings: [dead]}}
"""


async def test_every_setting_that_differs_is_reported_and_the_rest_is_declared(
    amqp: AmqpScope, rabbitmq_url: str, unique: str
) -> None:
    # RabbitMQ names one difference per declare, and closes the channel for it.
    await amqp.declare_exchange(f"{unique}.jobs", aio_pika.ExchangeType.DIRECT, durable=True)
    hand: Arguments = {
        "x-message-ttl": 30000,
        "x-overflow": "drop-head",
        "x-dead-letter-exchange": "some where",  # a name with a space is read whole
        "x-max-priority": 5,
    }
    await amqp.declare_queue(f"{unique}.work", durable=False, arguments=hand)
    topology = load(MANY_YAML.format(p=unique), FC_URL=rabbitmq_url)
    async with cleaned(topology, "rabbit") as ad:
        for _ in range(2):  # reported again, not "fixed"
            drift = await ad.apply()
            # In the order the broker checks them: by channel, then as it likes.
            assert sorted((d.channel, d.setting, d.want, d.have) for d in drift) == [
                ("jobs", "durable", False, True),
                ("jobs", "type", "topic", "direct"),
                ("work", "durable", True, False),
                ("work", "x-dead-letter-exchange", f"{unique}.dead", "some where"),
                ("work", "x-dead-letter-routing-key", "dl", None),
                ("work", "x-max-length", 10, None),
                ("work", "x-max-priority", None, 5),
                ("work", "x-message-ttl", 60000, 30000),
                ("work", "x-overflow", "reject-publish", "drop-head"),
            ]
        said = {d.setting: str(d) for d in drift}
        assert said["x-max-length"] == (
            "work: x-max-length is not set on the broker, the topology says 10"
        )
        assert said["x-max-priority"] == (
            "work: x-max-priority is 5 on the broker, the topology does not set it"
        )
        # Nothing was changed: declaring both as the hand did still works.
        await amqp.declare_exchange(f"{unique}.jobs", aio_pika.ExchangeType.DIRECT, durable=True)
        await amqp.declare_queue(f"{unique}.work", durable=False, arguments=hand)
        # The rest was declared, and bound, to the exchange as it is (direct: "job" still routes).
        assert await amqp.queue_exists(f"{unique}.dlq")
        exchange = await amqp.channel.get_exchange(f"{unique}.jobs")
        await exchange.publish(aio_pika.Message(b"x"), routing_key="job")  # confirmed: enqueued
        other = await amqp.channel.get_queue(f"{unique}.other")
        message = await other.get(fail=False)
        assert message is not None
        assert message.body == b"x"
        await message.ack()


async def test_arguments_the_broker_refuses_are_an_error_not_drift(
    amqp: AmqpScope, rabbitmq_url: str, unique: str
) -> None:
    topology = load(
        f"""
brokers:
  rabbit: {{kind: rabbitmq, url: "${{FC_URL}}"}}
channels:
  work: {{broker: rabbit, kind: queue, name: "{unique}.work", arguments: {{x-max-length: "10"}}}}
""",
        FC_URL=rabbitmq_url,
    )
    async with cleaned(topology, "rabbit") as ad:
        with pytest.raises(BrokerError) as caught:
            await ad.apply()
    message = str(caught.value)
    assert message.startswith(
        f"rabbit: cannot declare queue 'work': PRECONDITION_FAILED - invalid arg "
        f"'x-max-length' for queue '{unique}.work' in vhost "
    )
    assert message.endswith('"expected integer, got longstr"')
    assert not await amqp.queue_exists(f"{unique}.work")


async def test_a_user_who_may_not_configure_gets_a_clear_error(
    rabbitmq_url: str, unique: str
) -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed: cannot create a user without configure rights")
    user, password = f"{unique}-user", "n0t-Shown-pw"
    await rabbitmqctl("add_user", user, password)
    try:
        vhost = urlsplit(rabbitmq_url).path[1:] or "/"
        await rabbitmqctl("set_permissions", "-p", unquote(vhost), user, "^$", ".*", ".*")
        parts = urlsplit(rabbitmq_url)
        url = urlunsplit(
            parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port or 5672}")
        )
        topology = load(MANY_YAML.format(p=unique), FC_URL=url)
        async with RabbitMQAdapter("rabbit", topology) as ad:
            with pytest.raises(BrokerAuthError) as caught:
                await ad.apply()
    finally:
        await rabbitmqctl("delete_user", user)
    assert str(caught.value) == (
        f"rabbit: permission denied: ACCESS_REFUSED - access to exchange '{unique}.jobs' "
        f"in vhost '{unquote(vhost)}' refused for user '{user}'"
    )
    assert password not in str(caught.value)


async def test_tap_reports_gap_and_resumes_after_losing_its_connection(
    rabbitmq_url: str, unique: str
) -> None:
    kit = rabbitmq_kit(rabbitmq_url, unique)
    async with cleaned(kit.topology, "rabbit") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(kit.topology, [memory]) as tracer:
            tap = tracer.adapters["rabbit"]
            assert isinstance(tap, RabbitMQAdapter)

            def tapped(fc_id: str | None) -> Callable[[list[Observation]], bool]:
                return lambda items: all(
                    fc_id in ids(items, Kind.ROUTED, ch) for ch in ("events", "inbox")
                )

            before = await tracer.publish("events", order(1), routing_key="order.placed")
            await memory.wait_for(tapped(before.fc_id), WITHIN)

            assert await close_connections_named(tap.connection_name("tap")) == 1
            await memory.wait_for(
                lambda items: {o.channel for o in of(items, Kind.GAP)} == {"events", "inbox"},
                WITHIN,
            )

            after = await tracer.publish("events", order(2), routing_key="order.placed")
            await memory.wait_for(tapped(after.fc_id), WITHIN)

    gaps = of(memory.items, Kind.GAP)
    assert sorted(g.channel for g in gaps) == ["events", "inbox"]
    first_seen = max(o.mono_ns for o in of(memory.items, Kind.ROUTED) if o.fc_id == before.fc_id)
    resumed = min(o.mono_ns for o in of(memory.items, Kind.ROUTED) if o.fc_id == after.fc_id)
    for gap in gaps:
        assert gap.until_ns is not None
        assert first_seen < gap.mono_ns <= gap.until_ns < resumed
        assert gap.reason
    for channel in ("events", "inbox"):
        assert ids(memory.items, Kind.ROUTED, channel) == [before.fc_id, after.fc_id]


async def test_record_says_when_the_tap_loses_its_connection_for_a_moment(
    rabbitmq_url: str, unique: str, tmp_path: Path
) -> None:
    """A connection closed and reopened at once (a blip far shorter than `flowcheck
    record`'s refresh) is still announced, down and back, and its gap recorded. In a
    virtual host of its own, so that every tap connection there is this recording's."""
    out = tmp_path / "trace.jsonl"
    path = tmp_path / "topology.yaml"
    async with rabbitmq_vhost(rabbitmq_url, unique) as url:
        path.write_text(RABBITMQ_YAML.format(p=unique))
        cmd = [sys.executable, "-m", "flowcheck", "record", str(path), "--out", str(out)]
        cmd.append("--apply")
        said: list[str] = []
        async with await anyio.open_process(cmd, env={**os.environ, "FC_URL": url}) as proc:
            assert proc.stderr is not None
            lines = TextReceiveStream(proc.stderr)

            async def wait_for(text: str) -> None:
                with anyio.fail_after(WITHIN):
                    async for chunk in lines:
                        said.extend(chunk.splitlines())
                        if text in chunk:
                            return

            try:
                await wait_for("every tap is watching")
                assert await close_connections_in(unique, "flowcheck-tap-") == 1
                await wait_for("rabbit: tap down, recording a gap: connection to RabbitMQ lost")
                await wait_for("rabbit: tap watching again after ")
            finally:
                proc.send_signal(signal.SIGINT)
                with anyio.fail_after(WITHIN):
                    rc = await proc.wait()
    assert rc == 0, "\n".join(said)
    gaps = [o for o in Reader(str(out)) if o.kind is Kind.GAP]
    assert sorted(g.channel for g in gaps) == ["events", "inbox"]
    for gap in gaps:
        assert gap.until_ns is not None
        assert gap.reason == "connection to RabbitMQ lost"


async def close_connections_in(vhost: str, prefix: str) -> int:
    """Close, from the broker side, the connections of ``vhost`` whose connection_name
    starts with ``prefix``."""
    listing = await rabbitmqctl(
        "list_connections", "pid", "vhost", "client_properties", "--no-table-headers"
    )
    marker = f'{{"connection_name","{prefix}'
    doomed = [
        pid
        for pid, where, properties in (line.split("\t", 2) for line in listing.splitlines())
        if where == vhost and marker in properties
    ]
    for pid in doomed:
        await rabbitmqctl("close_connection", pid, "flowcheck test: simulated network loss")
    return len(doomed)


async def test_a_virtual_host_that_does_not_exist_is_a_clear_error(
    rabbitmq_url: str, unique: str
) -> None:
    parts = urlsplit(rabbitmq_url)
    url = urlunsplit(parts._replace(path=f"/{unique}"))
    topology = load(
        'brokers: {b: {kind: rabbitmq, url: "${FC_URL}"}}\n'
        "channels: {q: {broker: b, kind: queue, name: q}}\n",
        FC_URL=url,
    )
    with pytest.raises(BrokerAuthError) as caught:
        async with RabbitMQAdapter("b", topology):
            pass
    message = str(caught.value)
    assert f"would not open virtual host '{unique}'" in message
    if parts.password:
        assert f":{parts.password}@" not in message  # the user name may be the same word


async def test_tapping_an_exchange_never_declared_is_a_clear_error(
    rabbitmq_url: str, unique: str
) -> None:
    kit = rabbitmq_kit(rabbitmq_url, unique)  # not applied: nothing of it exists
    with pytest.raises(BrokerError, match=rf"no exchange '{unique}.events'.*run apply first"):
        await tap_raising(kit.topology)


SEEN_THROUGH_YAML = """
brokers:
  rabbit: {{kind: rabbitmq, url: "${{FC_URL}}"}}
channels:
  events: {{broker: rabbit, kind: exchange, type: topic, name: "{p}.events", durable: false}}
  inbox:
    broker: rabbit
    kind: queue
    name: "{p}.inbox"
    durable: false
    bindings: [{{exchange: events, key: "order.*"}}, {{exchange: events, key: "*.placed"}}]
  by-kind: {{broker: rabbit, kind: exchange, type: headers, name: "{p}.by-kind", durable: false}}
  refunds:
    broker: rabbit
    kind: queue
    name: "{p}.refunds"
    durable: false
    bindings: [{{exchange: by-kind, arguments: {{x-match: all, kind: refund}}}}]
flows:
  orders:
    correlate: $.order_id
    steps: [events, inbox]
"""


async def test_queues_are_seen_through_their_exchanges_or_their_own_twin(
    rabbitmq_url: str, unique: str
) -> None:
    topology = load(SEEN_THROUGH_YAML.format(p=unique), FC_URL=rabbitmq_url)
    async with cleaned(topology, "rabbit") as ad:
        assert isinstance(ad, RabbitMQAdapter)
        await ad.apply()
        # A topic-bound queue needs no twin; a headers-bound one, or one whose exchange
        # is not tapped, does.
        assert seen_through_exchanges(topology, list(topology.channels)) == {"inbox"}
        assert seen_through_exchanges(topology, ["inbox"]) == set()

        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            both = await tracer.publish("events", order(1), routing_key="order.placed")
            one = await tracer.publish("events", order(2), routing_key="order.paid")
            none = await tracer.publish("events", order(3), routing_key="invoice.paid")
            refund = await tracer.publish("by-kind", order(4), headers={"kind": "refund"})
            other = await tracer.publish("by-kind", order(5), headers={"kind": "sale"})
            last = await tracer.publish("events", order(6), routing_key="x.placed")
            await memory.wait_for(
                lambda items: (
                    last.fc_id in ids(items, Kind.ROUTED, "inbox")
                    and refund.fc_id in ids(items, Kind.ROUTED, "refunds")
                    and other.fc_id in ids(items, Kind.ROUTED, "by-kind")
                ),
                WITHIN,
            )
        # Matching two bindings is one copy, as on the broker.
        assert ids(memory.items, Kind.ROUTED, "inbox") == [both.fc_id, one.fc_id, last.fc_id]
        assert none.fc_id in ids(memory.items, Kind.UNROUTABLE, "events")
        assert ids(memory.items, Kind.ROUTED, "refunds") == [refund.fc_id]

        memory = Memory()
        async with Tracer(topology, [memory], channels=["inbox"]) as tracer:
            alone = await tracer.publish("events", order(7), routing_key="order.placed")
            await memory.wait_for(
                lambda items: alone.fc_id in ids(items, Kind.ROUTED, "inbox"), WITHIN
            )
        assert {o.channel for o in memory.items if o.kind is not Kind.PUBLISHED} == {"inbox"}


PACED_YAML = """
brokers:
  rabbit: {{kind: rabbitmq, url: "${{FC_URL}}", tap_read_interval: 300ms}}
channels:
  events: {{broker: rabbit, kind: exchange, type: topic, name: "{p}.events", durable: false}}
"""


async def test_while_messages_keep_coming_the_tap_reads_once_per_interval(
    rabbitmq_url: str, unique: str
) -> None:
    topology = load(PACED_YAML.format(p=unique), FC_URL=rabbitmq_url)
    async with cleaned(topology, "rabbit") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            first = await tracer.publish("events", order(1), routing_key="a")
            await memory.wait_for(lambda items: first.fc_id in ids(items, Kind.UNROUTABLE), WITHIN)
            # Read at once after a quiet spell; what follows within the interval waits.
            rest = [await tracer.publish("events", order(n), routing_key="a") for n in (2, 3)]
            await memory.wait_for(
                lambda items: all(m.fc_id in ids(items, Kind.UNROUTABLE) for m in rest), WITHIN
            )
        seen = {o.fc_id: o.mono_ns for o in of(memory.items, Kind.UNROUTABLE)}
        assert all(seen[m.fc_id] - seen[first.fc_id] >= 300_000_000 for m in rest)


def _raw_timestamp(seconds: datetime.datetime | time.struct_time | int) -> bytes:
    """pamqp's timestamp encoder, letting an int through as it is: what clients that
    write milli- or microseconds put on the wire."""
    if isinstance(seconds, int):
        return seconds.to_bytes(8, "big")
    return ORIGINAL_TIMESTAMP(seconds)


ORIGINAL_TIMESTAMP = pamqp.encode.timestamp


def _raw_short_string(value: str | bytes) -> bytes:
    """pamqp's short string encoder, letting bytes through as they are: what a Go or C
    client may send as a message id or routing key."""
    if isinstance(value, bytes):
        return len(value).to_bytes(1, "big") + value
    return ORIGINAL_SHORT_STRING(value)


ORIGINAL_SHORT_STRING = pamqp.encode.short_string


async def test_every_amqp_table_type_and_odd_properties_of_other_publishers(
    rabbitmq_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(pamqp.encode.METHODS, "timestamp", _raw_timestamp)
    monkeypatch.setitem(pamqp.encode.METHODS, "shortstr", _raw_short_string)
    kit = rabbitmq_kit(rabbitmq_url, unique)
    when = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    tables: dict[str, Any] = {
        "nested": {"a": {"b": [1, "x", bytearray(b"\xff"), {"token": SECRET}]}},
        "login": {"password": SECRET, "user": "u"},
        "array": [1, 2.5, True, None, decimal.Decimal("3.14"), when],
        "bytes": bytearray(b"\x00\xff"),
        "decimal": decimal.Decimal("-1.000001"),
        "timestamp": when,
        "bool": False,
        "void": None,
        "long-long": -(2**62),
        "long-string": "L" * (64 * 1024),
    }
    messages: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "tables": (tables, {}),
        "properties": ({}, {"message_id": "", "correlation_id": "c" * 255, "app_id": "é"}),
        "microseconds": ({}, {"timestamp": 1_700_000_000_000_000}),
        "max-timestamp": ({}, {"timestamp": 2**64 - 1}),
        "not-utf8": ({}, {"message_id": b"\xff\xfe-1", "correlation_id": b"\xc3\x28"}),
        "after": ({}, {}),
    }
    async with cleaned(kit.topology, "rabbit") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(kit.topology, [memory]):
            connection = await aio_pika.connect(rabbitmq_url)
            try:
                channel = await (await connection.channel()).get_underlay_channel()
                for n, (case, (headers, properties)) in enumerate(messages.items()):
                    await channel.basic_publish(
                        order(n),
                        exchange=f"{unique}.events",
                        routing_key=b"order.\xff" if case == "not-utf8" else "order.placed",  # type: ignore[arg-type]
                        properties=Basic.Properties(
                            headers={"x-case": case, **headers}, **properties
                        ),
                    )
            finally:
                await connection.close()
            await memory.wait_for(
                lambda items: len(of(items, Kind.ROUTED, "events")) >= len(messages), WITHIN
            )

    assert of(memory.items, Kind.GAP) == []  # the tap never lost its connection
    seen = {o.headers["x-case"]: o for o in of(memory.items, Kind.ROUTED, "events")}
    assert sorted(seen) == sorted(messages)
    assert [seen[c].keys for c in messages] == [{FLOW: f"o-{n}"} for n in range(len(messages))]
    headers = seen["tables"].headers
    assert headers["nested"] == {"a": {"b": [1, "x", "\ufffd", {"token": MASK}]}}
    assert headers["login"] == {"password": MASK, "user": "u"}
    assert headers["array"] == [1, 2.5, True, None, "3.14", str(when)]
    assert (headers["bytes"], headers["decimal"], headers["timestamp"]) == (
        "\x00\ufffd",
        "-1.000001",
        str(when),
    )
    assert (headers["bool"], headers["void"], headers["long-long"]) == (False, None, -(2**62))
    assert headers["long-string"].startswith("L" * TEXT_CAP)
    assert len(headers["long-string"]) < TEXT_CAP + 200
    odd = seen["not-utf8"]
    assert (odd.message_id, odd.routing_key) == ("\ufffd\ufffd-1", "order.\ufffd")
    for obs in memory.items:
        assert SECRET not in encode(obs).decode()


def test_lenient_amqp_decoding_is_the_taps_alone() -> None:
    # A system under test in the same process (pytest) must fail on such a frame as
    # it would without flowcheck: only the tap's own connections decode it anyway.
    rabbitmq_parse.install_lenient()  # as a tap does when it starts
    odd = b"\x02\xff\xfe"
    with pytest.raises(UnicodeDecodeError):
        pamqp.decode.METHODS["shortstr"](odd)
    with pytest.raises(ValueError, match="out of range"):
        pamqp.decode.METHODS["timestamp"]((2**63 - 1).to_bytes(8, "big"))

    def in_a_tap() -> tuple[Any, Any]:
        rabbitmq_parse.lenient.set(True)
        return (
            pamqp.decode.METHODS["shortstr"](odd),
            pamqp.decode.METHODS["timestamp"]((2**63 - 1).to_bytes(8, "big")),
        )

    assert contextvars.copy_context().run(in_a_tap) == ((3, "\ufffd\ufffd"), (8, 2**63 - 1))


# The conformance topology, its tap slowed to one read a second.
SLOW_TAP_YAML = RABBITMQ_YAML.format(p="t").replace(
    'url: "${FC_URL}"}', 'url: "${FC_URL}", tap_read_interval: 1s}'
)


async def test_check_waits_for_the_taps_to_see_every_publish(
    rabbitmq_url: str, unique: str
) -> None:
    topology = load(SLOW_TAP_YAML, FC_URL=rabbitmq_url)
    async with Flowcheck(topology, prefix=f"{unique}.", deadline="5s") as fc:
        await fc.publish("events", order(1), routing_key="order.placed")
        await fc.chain("orders", "o-1").completes()
        # The tap read the first copy and now waits a second before it reads again:
        # the chain has reached its end, but the second copy is still on its way.
        await fc.publish("events", order(1), routing_key="order.placed")
        with pytest.raises(FlowAssertionError) as failed:
            await fc.check("orders")
    assert [(f.kind, f.step) for f in failed.value.findings] == [
        (FindingKind.DUPLICATED, "events"),
        (FindingKind.DUPLICATED, "inbox"),
    ]


def test_a_tap_sees_publishes_to_exchanges_without_an_alternate() -> None:
    more = (
        "  strays: {broker: rabbit, kind: exchange, type: fanout}\n"
        "  plain: {broker: rabbit, kind: exchange, type: fanout}\n"
        "services:"
    )
    text = SLOW_TAP_YAML.replace("durable: false}", "durable: false, alternate: strays}")
    topology = load(text.replace("services:", more), FC_URL="amqp://127.0.0.1/")
    ad = RabbitMQAdapter("rabbit", topology)
    # A queue is published to through the default exchange, which no twin can watch.
    assert {k: ad.echoes(k) for k in topology.channels} == {
        "events": False,
        "inbox": False,
        "strays": True,
        "plain": True,
    }


DEFAULT_DLX_YAML = """
brokers:
  rabbit: {{kind: rabbitmq, url: "${{FC_URL}}"}}
channels:
  work: {{broker: rabbit, kind: queue, name: "{p}.work", durable: false, dead_letter: {{queue: dead}}}}
  dead: {{broker: rabbit, kind: queue, name: "{p}.work.XQ", durable: false}}
flows:
  orders:
    correlate: $.order_id
    steps: [work]
    dead_letters: [{{when: {{payload: {{$.poison: true}}}}, channel: dead, reason: rejected}}]
"""


async def test_a_dead_letter_through_the_default_exchange_shows_when_it_is_consumed(
    firehose: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Declared as Dramatiq declares its queues, and seen as the broker shows it: no
    record of the dead letter itself, only its delivery from the dead-letter queue."""
    topology = load(DEFAULT_DLX_YAML.format(p=unique), FC_URL=firehose)
    async with cleaned(topology, "rabbit") as ad:
        assert await ad.apply() == []
        memory = Memory()
        caplog.set_level("WARNING", logger="flowcheck.brokers.rabbitmq")
        async with Tracer(topology, [memory]) as tracer:
            assert caplog.records == []  # the firehose is on: nothing to say
            sent = await tracer.publish("work", order(1, poison=True))
            connection = await aio_pika.connect(firehose)
            try:
                channel = await connection.channel()
                # A framework declaring the queue with its own arguments: the same ones.
                framework: Arguments = {
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": f"{unique}.work.XQ",
                }
                work = await channel.declare_queue(
                    f"{unique}.work", durable=False, arguments=framework
                )
                parked: list[AbstractIncomingMessage] = []
                arrived = anyio.Event()

                async def refuse(message: AbstractIncomingMessage) -> None:
                    await message.reject(requeue=False)

                async def park(message: AbstractIncomingMessage) -> None:
                    parked.append(message)
                    arrived.set()

                await work.consume(refuse)
                dead = await channel.get_queue(f"{unique}.work.XQ", ensure=False)
                await dead.consume(park, no_ack=True)
                with anyio.fail_after(WITHIN):
                    await arrived.wait()
                deaths: Any = parked[0].headers["x-death"]
                assert deaths[0]["reason"] == "rejected"
                await memory.wait_for(lambda items: bool(of(items, Kind.DEAD_LETTERED)), WITHIN)
            finally:
                await connection.close()
    [routed] = of(memory.items, Kind.ROUTED, "work")  # the firehose's publish. record
    assert routed.fc_id == sent.fc_id
    [dead_letter] = of(memory.items, Kind.DEAD_LETTERED)
    assert (dead_letter.channel, dead_letter.reason, dead_letter.origin, dead_letter.fc_id) == (
        "dead",
        "rejected",
        "work",
        sent.fc_id,
    )
    assert dead_letter.keys == {FLOW: "o-1"}


async def test_the_tap_says_when_the_firehose_is_off(
    rabbitmq_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """In a virtual host of its own, whose firehose is off, as it is by default."""
    async with rabbitmq_vhost(rabbitmq_url, unique) as url:
        topology = load(DEFAULT_DLX_YAML.format(p=unique), FC_URL=url)
        async with cleaned(topology, "rabbit") as ad:
            await ad.apply()
            memory = Memory()
            with caplog.at_level("WARNING", logger="flowcheck.brokers.rabbitmq"):
                async with Tracer(topology, [memory]):
                    pass
    [said] = [r.getMessage() for r in caplog.records]
    assert said == (
        f"rabbit: RabbitMQ's firehose is off for virtual host {unique!r}, and only it shows "
        f"publishes straight to 'dead', 'work': turn it on (rabbitmqctl trace_on -p {unique}) "
        "before recording"
    )
    gaps = of(memory.items, Kind.GAP)
    assert sorted(g.channel for g in gaps) == ["dead", "work"]
    assert all(g.until_ns is None and "firehose is off" in (g.reason or "") for g in gaps)

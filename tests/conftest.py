"""Real-broker test harness: addresses, probes, per-test names and self-cleaning clients.

Brokers come from FLOWCHECK_RABBITMQ_URL, FLOWCHECK_REDIS_URL and
FLOWCHECK_KAFKA_BOOTSTRAP (see flowcheck.defaults). Without a Kafka bootstrap a
local Kafka-compatible broker is started for the session. A broker that cannot
be reached fails the tests that need it: a skipped integration test looks like a
passing one in CI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import NoReturn

import pytest
import pytest_asyncio
from harness import (
    KAFKA,
    AmqpScope,
    KafkaScope,
    delete_keys,
    probe_kafka,
    probe_rabbitmq,
    probe_redis,
    unique_prefix,
)
from redis.asyncio import Redis

from flowcheck import defaults
from flowcheck.devkafka import LocalKafka
from flowcheck.errors import FlowcheckError


def _fail(message: str) -> NoReturn:
    # pytrace=False: no traceback, so no local variable can show a URL with its password.
    pytest.fail(message, pytrace=False)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def rabbitmq_url() -> str:
    """The RabbitMQ URL to test against, known to accept connections."""
    url = defaults.rabbitmq_url()
    if problem := await probe_rabbitmq(url):
        _fail(problem)
    return url


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def redis_url() -> str:
    """The Redis URL to test against, known to answer PING."""
    url = defaults.redis_url()
    if problem := await probe_redis(url):
        _fail(problem)
    return url


@pytest.fixture(scope="session")
def _kafka_server() -> Iterator[str]:
    """The configured Kafka bootstrap, or a local broker run for this session."""
    if given := defaults.kafka_bootstrap():
        yield given
        return
    local = LocalKafka()
    try:
        local.start()
    except FlowcheckError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:  # failed outside the except block, so no chained traceback is printed
        hint = "" if KAFKA.env_var in problem else f"\nOr set {KAFKA.env_var} to a running Kafka."
        _fail(problem + hint)
    try:
        yield local.bootstrap
    finally:
        local.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def kafka_bootstrap(_kafka_server: str) -> str:
    """A Kafka bootstrap ("host:port[,host:port]") that answers Metadata requests."""
    if problem := await probe_kafka(_kafka_server):
        _fail(problem)
    return _kafka_server


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> str:
    """A name prefix for this test only: the sanitised test name plus a random suffix."""
    return unique_prefix(request.node.name)


@pytest_asyncio.fixture
async def amqp(rabbitmq_url: str) -> AsyncIterator[AmqpScope]:
    """A RabbitMQ connection and channel; queues/exchanges declared through it are deleted."""
    scope = await AmqpScope.open(rabbitmq_url)
    try:
        yield scope
    finally:
        await scope.close()


@pytest_asyncio.fixture
async def kafka(kafka_bootstrap: str, unique: str) -> AsyncIterator[KafkaScope]:
    """Kafka admin plus producer/consumer factories; the test's topics are deleted after."""
    scope = await KafkaScope.open(kafka_bootstrap, unique)
    try:
        yield scope
    finally:
        await scope.close()


@pytest_asyncio.fixture
async def redis(redis_url: str, unique: str) -> AsyncIterator[Redis]:
    """A redis.asyncio client; keys starting with the test's ``unique`` prefix are deleted after."""
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        try:
            await delete_keys(client, unique)
        finally:
            await client.aclose()

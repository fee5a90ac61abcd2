"""Where flowcheck looks for brokers when nothing else is said: this machine's defaults.

docker-compose.yml publishes the same ports; a test keeps the two in step.
"""

from __future__ import annotations

import os

RABBITMQ_URL_VAR = "FLOWCHECK_RABBITMQ_URL"
KAFKA_BOOTSTRAP_VAR = "FLOWCHECK_KAFKA_BOOTSTRAP"
REDIS_URL_VAR = "FLOWCHECK_REDIS_URL"

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
KAFKA_BOOTSTRAP = "127.0.0.1:9092"
REDIS_URL = "redis://127.0.0.1:6379/0"


def rabbitmq_url() -> str:
    return os.environ.get(RABBITMQ_URL_VAR) or RABBITMQ_URL


def kafka_bootstrap() -> str | None:
    """The Kafka named by the environment, or None: then tests start a local one."""
    return os.environ.get(KAFKA_BOOTSTRAP_VAR) or None


def redis_url() -> str:
    return os.environ.get(REDIS_URL_VAR) or REDIS_URL

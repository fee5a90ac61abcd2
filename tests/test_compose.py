"""docker-compose.yml must start brokers where flowcheck.defaults looks for them.

Docker cannot run here, so the file is parsed and checked, not started.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from flowcheck import defaults

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


@dataclass(frozen=True, slots=True)
class Published:
    host_ip: str | None
    host_port: int
    container_port: int


def _published(service: dict[str, Any]) -> list[Published]:
    """The service's fixed host ports, from short ("[ip:]host:container") or long syntax."""
    result = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            if "published" in entry:
                result.append(
                    Published(entry.get("host_ip"), int(entry["published"]), int(entry["target"]))
                )
            continue
        parts = str(entry).split("/")[0].rsplit(":", 2)
        if len(parts) == 1:
            continue  # container port only: Docker picks a random host port
        host_ip = parts[0] if len(parts) == 3 else None
        result.append(Published(host_ip, int(parts[-2]), int(parts[-1])))
    return result


def _split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """'NAME://host:port,...' as {NAME: (host, port)}; an empty host means all interfaces."""
    result = {}
    for item in value.split(","):
        name, _, address = item.strip().partition("://")
        result[name] = _split_host_port(address)
    return result


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    found: dict[str, dict[str, Any]] = document["services"]
    return found


@pytest.fixture(scope="module")
def kafka_env(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    environment = services["kafka"]["environment"]
    assert isinstance(environment, dict), "keep the Kafka environment a mapping"
    return {key: str(value) for key, value in environment.items()}


def test_compose_has_the_expected_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"rabbitmq", "kafka", "redis", "jaeger"}
    assert "management" in services["rabbitmq"]["image"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["jaeger"]["image"].startswith("jaegertracing/all-in-one:")


@pytest.mark.parametrize("name", ["rabbitmq", "kafka", "redis", "jaeger"])
def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]], name: str) -> None:
    check = services[name].get("healthcheck")
    assert check, f"{name} has no healthcheck"
    assert not check.get("disable", False)
    test = check["test"]
    assert isinstance(test, list), f"{name}: write the healthcheck test as a list"
    assert test[0] in {"CMD", "CMD-SHELL"}, f"{name}: healthcheck test {test!r}"


@pytest.mark.parametrize(
    ("name", "address"),
    [
        pytest.param("rabbitmq", defaults.RABBITMQ_URL, id="rabbitmq"),
        pytest.param("redis", defaults.REDIS_URL, id="redis"),
        pytest.param("kafka", f"kafka://{defaults.KAFKA_BOOTSTRAP}", id="kafka"),
    ],
)
def test_published_port_matches_defaults(
    services: dict[str, dict[str, Any]], name: str, address: str
) -> None:
    url = urlsplit(address)
    published = {p.host_port: p for p in _published(services[name])}
    assert url.port in published, f"{name} does not publish port {url.port} of {address}"
    host_ip = published[url.port].host_ip
    assert host_ip in (None, "0.0.0.0", url.hostname), f"{name} published on {host_ip}"


def test_rabbitmq_credentials_match_defaults(services: dict[str, dict[str, Any]]) -> None:
    url = urlsplit(defaults.RABBITMQ_URL)
    environment = services["rabbitmq"]["environment"]
    assert environment["RABBITMQ_DEFAULT_USER"] == url.username
    assert environment["RABBITMQ_DEFAULT_PASS"] == url.password


def test_jaeger_publishes_ui_and_otlp(services: dict[str, dict[str, Any]]) -> None:
    ports = {(p.host_port, p.container_port) for p in _published(services["jaeger"])}
    assert {(16686, 16686), (4317, 4317), (4318, 4318)} <= ports


def test_kafka_advertises_the_default_bootstrap_on_the_published_port(
    services: dict[str, dict[str, Any]], kafka_env: dict[str, str]
) -> None:
    listeners = _listeners(kafka_env["KAFKA_LISTENERS"])
    advertised = _listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    wanted = _split_host_port(defaults.KAFKA_BOOTSTRAP)
    names = [name for name, address in advertised.items() if address == wanted]
    assert names, f"no listener advertises {defaults.KAFKA_BOOTSTRAP}: {advertised}"
    # The advertised host port must reach, through the published port, the
    # container port that this same listener binds.
    published = {p.host_port: p.container_port for p in _published(services["kafka"])}
    assert published.get(wanted[1]) == listeners[names[0]][1]


def test_kafka_kraft_controller_is_wired(kafka_env: dict[str, str]) -> None:
    listeners = _listeners(kafka_env["KAFKA_LISTENERS"])
    advertised = _listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(
        item.split(":") for item in kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    controller = kafka_env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert controller in listeners
    assert controller not in advertised, "the controller listener is not for clients"
    assert set(listeners) <= set(protocols)
    assert kafka_env["KAFKA_INTER_BROKER_LISTENER_NAME"] in set(advertised) - {controller}
    # The single voter is this node, reached on its controller port.
    voter_id, _, voter = kafka_env["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    assert voter_id == kafka_env["KAFKA_NODE_ID"]
    assert _split_host_port(voter)[1] == listeners[controller][1]
    # Replication factors above 1 cannot be met by one node.
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert kafka_env[key] == "1", key


def test_kafka_cluster_id_is_a_base64_uuid(kafka_env: dict[str, str]) -> None:
    # Kafka refuses to format storage with an id that is not 16 bytes, base64url.
    cluster_id = kafka_env["CLUSTER_ID"]
    try:
        raw = base64.urlsafe_b64decode(cluster_id + "==")
    except binascii.Error:
        pytest.fail(f"CLUSTER_ID {cluster_id!r} is not base64url")
    assert len(cluster_id) == 22
    assert len(raw) == 16

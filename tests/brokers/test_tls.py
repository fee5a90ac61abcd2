"""TLS to every broker: the ``tls`` settings, checked by validate, used end to end
against TLS listeners these tests start, and each way TLS fails told in one line.

Redis: redis-server's own TLS port. RabbitMQ and Kafka: a TLS-terminating relay
(Python's ssl, OpenSSL) in front of a plain broker, since neither the shared RabbitMQ
nor the bundled Kafka broker can be given a TLS listener here; flowcheck's side of
the connection (aio-pika, aiokafka) is the real thing.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
from click.testing import CliRunner
from redis import Redis as SyncRedis

import flowcheck
from flowcheck.brokers import adapter as make_adapter
from flowcheck.cli import cli
from flowcheck.errors import BrokerError, TopologyError
from flowcheck.observations import Kind
from flowcheck.topology import Topology
from flowcheck.trace import Reader
from flowcheck.tracer import Memory, Tracer

from .conftest import KAFKA_WITHIN, WITHIN, cleaned, ids, order
from .tls_kit import (
    KEY_PASSWORD,
    Certs,
    free_port,
    make_certs,
    redis_tls,
    tansu,
    tls_relay,
)

FLOWCHECK = [sys.executable, "-m", "flowcheck"]


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def redis_port(certs: Certs) -> Iterator[int]:
    """A Redis TLS port that takes clients with or without a certificate."""
    with redis_tls(certs, clients="optional") as port:
        yield port


@pytest.fixture(scope="session")
def redis_mtls_port(certs: Certs) -> Iterator[int]:
    """A Redis TLS port that wants a client certificate signed by ca.pem."""
    with redis_tls(certs, clients="yes") as port:
        yield port


def topology_in(dir: Path, text: str) -> Path:
    """``text`` written as a topology in ``dir`` (where the certificates are)."""
    path = dir / "topology.yaml"
    path.write_text(text)
    return path


def redis_yaml(port: int, prefix: str, tls: str, scheme: str = "rediss") -> str:
    return f"""
brokers:
  redis: {{kind: redis, url: "{scheme}://127.0.0.1:{port}/0", tls: {tls}}}
channels:
  events: {{broker: redis, kind: stream, name: "{prefix}.events"}}
flows:
  orders: {{correlate: $.order_id, steps: [events]}}
"""


def load_in(certs: Certs, text: str) -> Topology:
    return flowcheck.load(str(topology_in(certs.dir, text)))


async def connect_error(topology: Topology, broker: str) -> str:
    ad = make_adapter(broker, topology)
    with pytest.raises(BrokerError) as caught:
        await ad.connect()
    await ad.close()
    message = str(caught.value)
    assert "\n" not in message
    assert KEY_PASSWORD not in message
    return message


# ---------------------------------------------------------------- validate


def problems(certs: Certs, text: str) -> list[str]:
    path = topology_in(certs.dir, text)
    with pytest.raises(TopologyError) as caught:
        flowcheck.load(str(path))
    return [str(p) for p in caught.value.problems]


def test_relative_files_are_read_from_the_topology_directory(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # nowhere near the certificates
    topology = load_in(
        certs, redis_yaml(1, "t", "{ca_file: ca.pem, cert_file: client.pem, key_file: client.key}")
    )
    tls = topology.brokers["redis"].tls
    assert tls is not None
    assert tls.path("ca_file") == certs["ca.pem"]
    assert tls.path("key_file") == certs["client.key"]
    kafka = load_in(
        certs,
        """
brokers:
  k: {kind: kafka, bootstrap: "127.0.0.1:1", security: {protocol: SSL, ca_file: ca.pem}}
channels:
  t: {kind: topic, broker: k}
""",
    ).brokers["k"]
    assert isinstance(kafka, flowcheck.topology.model.Kafka)
    settings = kafka.tls_settings()
    assert settings is not None
    assert settings.path("ca_file") == certs["ca.pem"]


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ("{ca_file: nope.pem}", "brokers.redis.tls.ca_file: no such file: nope.pem"),
        ("{ca_file: san.ext}", "brokers.redis.tls.ca_file: san.ext holds no PEM certificate"),
        (
            "{cert_file: client.pem, key_file: server.key}",
            "brokers.redis.tls.key_file: server.key is not the private key of cert_file client.pem",
        ),
        (
            "{cert_file: client.pem, key_file: locked.key}",
            "brokers.redis.tls.key_file: locked.key is an encrypted key and set key_password",
        ),
        (
            "{cert_file: client.pem, key_file: locked.key, key_password: wrong}",
            "brokers.redis.tls.key_file: locked.key is an encrypted key and the key_password "
            "is wrong",
        ),
        ("{key_file: client.key}", "brokers.redis.tls.key_file: is set without cert_file"),
    ],
)
def test_validate_checks_the_files(certs: Certs, tls: str, expected: str) -> None:
    found = problems(certs, redis_yaml(1, "t", tls))
    assert len(found) == 1, found
    assert found[0].startswith(f"{certs.dir / 'topology.yaml'}:3:")
    assert expected in found[0]


def test_validate_refuses_tls_without_a_tls_url_or_protocol(certs: Certs) -> None:
    found = problems(certs, redis_yaml(1, "t", "{ca_file: ca.pem}", scheme="redis"))
    assert any("brokers.redis.tls: is set but the URL is redis://" in p for p in found), found
    found = problems(
        certs,
        """
brokers:
  rabbit: {kind: rabbitmq, url: "amqp://127.0.0.1:5672/", tls: {ca_file: ca.pem}}
  k: {kind: kafka, bootstrap: "127.0.0.1:1", tls: {ca_file: ca.pem}}
channels:
  q: {kind: queue, broker: rabbit}
  t: {kind: topic, broker: k}
""",
    )
    assert any("brokers.rabbit.tls: is set but the URL is amqp://" in p for p in found), found
    assert any(
        "brokers.k.tls: is set but protocol PLAINTEXT does not use TLS" in p for p in found
    ), found


def test_validate_refuses_tls_options_in_the_url_beside_tls(certs: Certs) -> None:
    # tls replaces the URL's own TLS options: both set would drop one without a word.
    found = problems(
        certs,
        """
brokers:
  rabbit: {kind: rabbitmq, url: "amqps://127.0.0.1:5671/?cafile=x.pem&heartbeat=5",
           tls: {ca_file: ca.pem}}
  redis: {kind: redis, url: "rediss://127.0.0.1:6380/0?ssl_cert_reqs=none&ssl_ca_certs=x.pem",
          tls: {ca_file: ca.pem}}
channels:
  q: {kind: queue, broker: rabbit}
  s: {kind: stream, broker: redis}
""",
    )
    assert any("brokers.rabbit.tls: is set and so is the URL's cafile:" in p for p in found), found
    assert any(
        "brokers.redis.tls: is set and so is the URL's ssl_cert_reqs, ssl_ca_certs:" in p
        for p in found
    ), found
    assert not any("heartbeat" in p for p in found), found
    # Either one alone is fine.
    load_in(certs, redis_yaml(1, "t", "{ca_file: ca.pem}"))


def test_validate_refuses_oauthbearer(certs: Certs) -> None:
    found = problems(
        certs,
        """
brokers:
  k:
    kind: kafka
    bootstrap: "127.0.0.1:1"
    security: {protocol: SASL_SSL, sasl_mechanism: OAUTHBEARER}
channels:
  t: {kind: topic, broker: k}
""",
    )
    assert len(found) == 1, found
    assert ":6:" in found[0]
    assert "brokers.k.security.sasl_mechanism: OAUTHBEARER needs a token provider" in found[0]


def test_validate_refuses_the_same_file_twice_on_kafka(certs: Certs) -> None:
    found = problems(
        certs,
        """
brokers:
  k:
    kind: kafka
    bootstrap: "127.0.0.1:1"
    security: {protocol: SSL, ca_file: ca.pem}
    tls: {ca_file: ca.pem}
channels:
  t: {kind: topic, broker: k}
""",
    )
    assert any("security.ca_file: is set twice" in p for p in found), found


def test_key_password_opens_an_encrypted_key_and_is_never_shown(certs: Certs) -> None:
    from flowcheck import tls

    topology = load_in(
        certs,
        redis_yaml(
            1,
            "t",
            f"{{cert_file: client.pem, key_file: locked.key, key_password: {KEY_PASSWORD}}}",
        ),
    )
    settings = topology.brokers["redis"].tls
    tls.context(settings)
    assert KEY_PASSWORD not in repr(topology)


# ---------------------------------------------------------------- Redis, live


async def test_redis_tap_and_publish_over_tls_with_a_ca(
    certs: Certs, redis_port: int, unique: str
) -> None:
    topology = load_in(certs, redis_yaml(redis_port, unique, "{ca_file: ca.pem}"))
    async with cleaned(topology, "redis") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            sent = await tracer.publish("events", order(1))
            await memory.wait_for(lambda items: sent.fc_id in ids(items, Kind.ROUTED), WITHIN)


async def test_redis_server_name_is_the_name_checked(certs: Certs, redis_port: int) -> None:
    # The certificate is for localhost and 127.0.0.1.
    good = load_in(certs, redis_yaml(redis_port, "t", "{ca_file: ca.pem, server_name: localhost}"))
    ad = make_adapter("redis", good)
    await ad.connect()
    await ad.close()
    bad = load_in(certs, redis_yaml(redis_port, "t", "{ca_file: ca.pem, server_name: example.org}"))
    message = await connect_error(bad, "redis")
    assert message.endswith(
        "TLS: the server's certificate is not for example.org; "
        "set tls.server_name to a name the certificate carries"
    )


def test_redis_record_over_mutual_tls(
    certs: Certs, redis_mtls_port: int, unique: str, tmp_path: Path
) -> None:
    """flowcheck record, as a user runs it, from another directory, with a client
    certificate: what another client publishes over TLS ends up in the trace."""
    path = topology_in(
        certs.dir,
        redis_yaml(
            redis_mtls_port,
            unique,
            "{ca_file: ca.pem, cert_file: client.pem, key_file: locked.key, "
            'key_password: "${FC_KEY_PASSWORD}"}',
        ),
    )
    out = tmp_path / "trace.jsonl"
    root = str(Path(flowcheck.__file__).parents[1])  # this flowcheck, run from elsewhere
    env = {**os.environ, "FC_KEY_PASSWORD": KEY_PASSWORD, "PYTHONPATH": root}
    proc = subprocess.Popen(
        [*FLOWCHECK, "record", str(path), "--out", str(out), "--apply"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    client = SyncRedis(
        host="127.0.0.1",
        port=redis_mtls_port,
        ssl=True,
        ssl_ca_certs=certs["ca.pem"],
        ssl_certfile=certs["client.pem"],
        ssl_keyfile=certs["client.key"],
    )
    try:
        assert proc.stderr is not None
        readable, _, _ = select.select([proc.stderr], [], [], 30)
        assert readable, "recorder did not start within 30s"
        line = proc.stderr.readline()
        assert "recording 1 channel" in line, line
        client.xadd(f"{unique}.events", {"payload": order("tls")})
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        client.delete(f"{unique}.events")
        client.close()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert KEY_PASSWORD not in stdout + stderr + out.read_text()
    result = CliRunner().invoke(cli, ["inspect", str(out), "--key", "o-tls"])
    assert result.exit_code == 0, result.output
    assert "routed" in result.output
    assert len(list(Reader(str(out)))) >= 1


async def test_redis_tls_failures_are_one_line(
    certs: Certs, redis_port: int, redis_mtls_port: int, redis_url: str
) -> None:
    untrusted = load_in(certs, redis_yaml(redis_port, "t", "{ca_file: other-ca.pem}"))
    assert (await connect_error(untrusted, "redis")).endswith(
        "TLS: the server's certificate is not trusted by ca_file other-ca.pem"
    )
    no_cert = load_in(certs, redis_yaml(redis_mtls_port, "t", "{ca_file: ca.pem}"))
    # The server's alert, or (when it closes first) the connection closed at once.
    assert (await connect_error(no_cert, "redis")).endswith(
        "client certificate, set tls.cert_file and tls.key_file"
    )
    stranger = load_in(
        certs,
        redis_yaml(
            redis_mtls_port,
            "t",
            "{ca_file: ca.pem, cert_file: stranger.pem, key_file: stranger.key}",
        ),
    )
    assert "TLS: the server did not accept the client certificate stranger.pem" in (
        await connect_error(stranger, "redis")
    )
    system = load_in(certs, redis_yaml(redis_port, "t", "null"))  # the system's CAs
    assert (
        "TLS: the server's certificate is not trusted by the system's CA certificates; "
        "set tls.ca_file to the CA that signed it"
    ) in await connect_error(system, "redis")
    shared = urlsplit(redis_url)._replace(scheme="rediss").geturl()  # a plain port
    plain = load_in(
        certs, redis_yaml(0, "t", "{ca_file: ca.pem}").replace("rediss://127.0.0.1:0/0", shared)
    )
    assert "no TLS answer: is it a TLS port?" in await connect_error(plain, "redis")
    unverified = load_in(certs, redis_yaml(redis_port, "t", "{verify: false}"))
    ad = make_adapter("redis", unverified)
    await ad.connect()  # verify: false takes any certificate
    await ad.close()


def record_fails(certs: Certs, text: str, tmp_path: Path) -> str:
    """What ``flowcheck record`` prints when it cannot connect: one line, exit 3."""
    path = topology_in(certs.dir, text)
    result = subprocess.run(
        [*FLOWCHECK, "record", str(path), "--out", str(tmp_path / "t.jsonl")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_redis_record_failure_is_one_line_and_exit_3(
    certs: Certs, redis_port: int, tmp_path: Path
) -> None:
    line = record_fails(certs, redis_yaml(redis_port, "t", "{ca_file: other-ca.pem}"), tmp_path)
    assert line.endswith("TLS: the server's certificate is not trusted by ca_file other-ca.pem")


# ---------------------------------------------------------------- RabbitMQ, through a relay


@pytest.fixture(scope="session")
def amqps_port(certs: Certs) -> Iterator[int]:
    with tls_relay(certs, 5672) as port:
        yield port


@pytest.fixture(scope="session")
def amqps_mtls_port(certs: Certs) -> Iterator[int]:
    with tls_relay(certs, 5672, clients=True) as port:
        yield port


def rabbit_yaml(port: int, prefix: str, tls: str) -> str:
    return f"""
brokers:
  rabbit: {{kind: rabbitmq, url: "amqps://guest:guest@127.0.0.1:{port}/", tls: {tls}}}
channels:
  events: {{broker: rabbit, kind: exchange, type: topic, name: "{prefix}.events", durable: false}}
  inbox:
    broker: rabbit
    kind: queue
    name: "{prefix}.inbox"
    durable: false
    bindings: [{{exchange: events, key: "order.#"}}]
flows:
  orders: {{correlate: $.order_id, steps: [events, inbox]}}
"""


async def test_rabbitmq_tap_and_publish_over_mutual_tls(
    certs: Certs, amqps_mtls_port: int, unique: str
) -> None:
    topology = load_in(
        certs,
        rabbit_yaml(
            amqps_mtls_port,
            unique,
            "{ca_file: ca.pem, cert_file: client.pem, key_file: client.key}",
        ),
    )
    async with cleaned(topology, "rabbit") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            sent = await tracer.publish("events", order(1), routing_key="order.placed")
            await memory.wait_for(
                lambda items: sent.fc_id in ids(items, Kind.ROUTED, "inbox"), WITHIN
            )


async def test_rabbitmq_tls_failures_are_one_line(
    certs: Certs, amqps_port: int, amqps_mtls_port: int
) -> None:
    untrusted = load_in(certs, rabbit_yaml(amqps_port, "t", "{ca_file: other-ca.pem}"))
    assert (await connect_error(untrusted, "rabbit")).endswith(
        "TLS: the server's certificate is not trusted by ca_file other-ca.pem"
    )
    no_cert = load_in(certs, rabbit_yaml(amqps_mtls_port, "t", "{ca_file: ca.pem}"))
    assert (await connect_error(no_cert, "rabbit")).endswith(
        "client certificate, set tls.cert_file and tls.key_file"
    )
    plain = load_in(certs, rabbit_yaml(5672, "t", "{ca_file: ca.pem}"))
    assert (await connect_error(plain, "rabbit")).endswith(
        "TLS: the server does not speak TLS on this port (a plain port?)"
    )


def test_rabbitmq_record_failure_is_one_line_and_exit_3(
    certs: Certs, amqps_port: int, tmp_path: Path
) -> None:
    line = record_fails(certs, rabbit_yaml(amqps_port, "t", "{ca_file: other-ca.pem}"), tmp_path)
    assert line.endswith("TLS: the server's certificate is not trusted by ca_file other-ca.pem")


# ---------------------------------------------------------------- Kafka, through a relay


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def kafka_tls_port(certs: Certs) -> AsyncIterator[int]:
    """A bundled Kafka broker reached only through a TLS relay that wants a client
    certificate: the broker advertises the relay's port."""
    relay = free_port()
    plain = free_port()
    with tansu(plain, relay), tls_relay(certs, plain, port=relay, clients=True) as port:
        yield port


def kafka_yaml(port: int, prefix: str, tls: str) -> str:
    return f"""
brokers:
  kafka:
    kind: kafka
    bootstrap: "127.0.0.1:{port}"
    security: {{protocol: SSL}}
    tls: {tls}
channels:
  events: {{broker: kafka, kind: topic, name: "{prefix}.events", partitions: 1}}
flows:
  orders: {{correlate: $.order_id, steps: [events]}}
"""


async def test_kafka_tap_and_publish_over_mutual_tls(
    certs: Certs, kafka_tls_port: int, unique: str
) -> None:
    topology = load_in(
        certs,
        kafka_yaml(
            kafka_tls_port, unique, "{ca_file: ca.pem, cert_file: client.pem, key_file: client.key}"
        ),
    )
    async with cleaned(topology, "kafka") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            sent = await tracer.publish("events", order(1))
            await memory.wait_for(lambda items: sent.fc_id in ids(items, Kind.ROUTED), KAFKA_WITHIN)


async def test_kafka_tls_failures_are_one_line(certs: Certs, kafka_tls_port: int) -> None:
    untrusted = load_in(certs, kafka_yaml(kafka_tls_port, "t", "{ca_file: other-ca.pem}"))
    message = await connect_error(untrusted, "kafka")
    assert isinstance(message, str)
    assert message.endswith("TLS: the server's certificate is not trusted by ca_file other-ca.pem")
    no_cert = load_in(certs, kafka_yaml(kafka_tls_port, "t", "{ca_file: ca.pem}"))
    assert (await connect_error(no_cert, "kafka")).endswith(
        "client certificate, set tls.cert_file and tls.key_file"
    )


def test_kafka_record_failure_is_one_line_and_exit_3(
    certs: Certs, kafka_tls_port: int, tmp_path: Path
) -> None:
    line = record_fails(certs, kafka_yaml(kafka_tls_port, "t", "{ca_file: ca.pem}"), tmp_path)
    assert line.endswith("client certificate, set tls.cert_file and tls.key_file")

"""Kafka adapter: Spring-style retry and dead-letter topics, group commits, drift, tap start.

Kept few: a group consumer needs about 5 s to join on the local Kafka-compatible broker.
"""

from __future__ import annotations

import logging
import re
import sys
from types import SimpleNamespace
from typing import Any

import aiokafka.codec
import anyio
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import OffsetOutOfRangeError
from aiokafka.record.util import calc_crc32c
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from harness import KafkaScope

import flowcheck.brokers.kafka as kafka_module
from flowcheck.brokers import adapter as make_adapter
from flowcheck.brokers.kafka import RESENT_HEADER, KafkaAdapter
from flowcheck.brokers.kafka._parse import judge as _judge
from flowcheck.devkafka import LocalKafka
from flowcheck.errors import BrokerError, BrokerUnreachable
from flowcheck.observations import TEXT_CAP, Kind, Observation, encode
from flowcheck.tracer import Memory, Tracer

from .conftest import FLOW, KAFKA_WITHIN, cleaned, ids, load, of, order, tap_raising

TOPICS_YAML = """
brokers:
  kafka: {{kind: kafka, bootstrap: "{bootstrap}"}}
channels:
  payments:
    broker: kafka
    kind: topic
    name: "{p}.payments"
    partitions: {partitions}
    retry: [payments-retry]
    dead_letter: payments-dlt
  payments-retry: {{broker: kafka, kind: topic, name: "{p}.payments-retry-0"}}
  payments-dlt: {{broker: kafka, kind: topic, name: "{p}.payments-dlt"}}
services:
  billing: {{consumes: [{{channel: payments, group: "{p}.billing"}}]}}
flows:
  orders:
    correlate: $.order_id
    steps: [payments]
"""


def topology_yaml(bootstrap: str, prefix: str, partitions: int = 1) -> str:
    return TOPICS_YAML.format(bootstrap=bootstrap, p=prefix, partitions=partitions)


def big_endian(n: int, size: int = 4) -> bytes:
    return n.to_bytes(size, "big", signed=True)


async def test_spring_dead_letter_and_retry_records(
    kafka_bootstrap: str, kafka: KafkaScope, unique: str
) -> None:
    topology = load(topology_yaml(kafka_bootstrap, unique))
    async with cleaned(topology, "kafka") as ad:
        await ad.apply()
        producer = await kafka.producer()
        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            sent = await tracer.publish("payments", order(1))
            assert sent.offset is not None
            # What Spring's @RetryableTopic and DeadLetterPublishingRecoverer write: the
            # original record's headers plus their own, integers as big-endian binary.
            original = [
                (k, str(sent.headers[k]).encode()) for k in ("x-flowcheck-id", "traceparent")
            ]
            await producer.send_and_wait(
                f"{unique}.payments-retry-0",
                order(1),
                headers=[
                    *original,
                    ("retry_topic-attempts", big_endian(2)),
                    ("retry_topic-backoff-timestamp", big_endian(1_700_000_000_000, 8)),
                ],
            )
            await producer.send_and_wait(
                f"{unique}.payments-dlt",
                order(1),
                headers=[
                    *original,
                    ("kafka_dlt-original-topic", f"{unique}.payments".encode()),
                    ("kafka_dlt-original-partition", big_endian(0)),
                    ("kafka_dlt-original-offset", big_endian(sent.offset, 8)),
                    ("kafka_dlt-exception-fqcn", b"com.example.PaymentDeclinedException"),
                    ("kafka_dlt-exception-message", b"card declined"),
                    ("retry_topic-attempts", big_endian(3)),
                ],
            )
            await memory.wait_for(
                lambda items: (
                    sent.fc_id in ids(items, Kind.DEAD_LETTERED, "payments-dlt")
                    and sent.fc_id in ids(items, Kind.ROUTED, "payments-retry")
                ),
                KAFKA_WITHIN,
            )

    [retried] = of(memory.items, Kind.ROUTED, "payments-retry")
    assert retried.delivery_count == 2
    assert retried.keys == {FLOW: "o-1"}
    [dead] = of(memory.items, Kind.DEAD_LETTERED)
    assert (dead.channel, dead.origin, dead.reason) == (
        "payments-dlt",
        "payments",
        "com.example.PaymentDeclinedException",
    )
    assert dead.delivery_count == 3
    assert (dead.fc_id, dead.trace_id, dead.keys) == (sent.fc_id, sent.trace_id, {FLOW: "o-1"})
    assert dead.headers["kafka_dlt-original-offset"] == sent.offset


async def test_group_commits_are_consumed_evidence_for_exactly_the_committed_records(
    kafka_bootstrap: str, kafka: KafkaScope, unique: str
) -> None:
    topology = load(topology_yaml(kafka_bootstrap, unique))
    async with cleaned(topology, "kafka") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            sent = [await tracer.publish("payments", order(i)) for i in range(5)]
            offsets = [o.offset for o in sent if o.offset is not None]
            assert offsets == sorted(offsets)
            assert len(offsets) == 5

            consumer: AIOKafkaConsumer = await kafka.consumer(
                f"{unique}.payments",
                group_id=f"{unique}.billing",
                auto_offset_reset="earliest",
                enable_auto_commit=False,
            )
            got = 0
            while got < 5:
                batches = await consumer.getmany(timeout_ms=int(KAFKA_WITHIN * 1000))
                assert batches, "the group consumer received nothing"
                got += sum(len(records) for records in batches.values())
            tp = TopicPartition(f"{unique}.payments", 0)

            def consumed(items: list[Observation]) -> list[str]:
                return ids(items, Kind.CONSUMED, "payments")

            # The committed offset is the next record to read: 3 records are done ...
            await consumer.commit({tp: offsets[2] + 1})
            await memory.wait_for(lambda items: len(consumed(items)) >= 3, KAFKA_WITHIN)
            assert consumed(memory.items) == [o.fc_id for o in sent[:3]]
            # ... then a fourth.
            await consumer.commit({tp: offsets[3] + 1})
            await memory.wait_for(lambda items: len(consumed(items)) >= 4, KAFKA_WITHIN)
            assert consumed(memory.items) == [o.fc_id for o in sent[:4]]

    for obs in of(memory.items, Kind.CONSUMED):
        assert obs.group == f"{unique}.billing"
        assert obs.keys == {FLOW: f"o-{[o.fc_id for o in sent].index(obs.fc_id)}"}


async def test_topic_with_other_partition_count_drifts(
    kafka_bootstrap: str, kafka: KafkaScope, unique: str
) -> None:
    await kafka.create_topic(f"{unique}.payments", partitions=1)
    topology = load(topology_yaml(kafka_bootstrap, unique, partitions=3))
    async with cleaned(topology, "kafka") as ad:
        drift = await ad.apply(["payments"])
        assert [(d.channel, d.setting, d.want, d.have) for d in drift] == [
            ("payments", "partitions", 3, 1)
        ]
        assert "partitions" in str(drift[0])


async def test_topic_with_more_partitions_and_another_replication_drifts_untouched(
    kafka_bootstrap: str, kafka: KafkaScope, unique: str
) -> None:
    await kafka.create_topic(f"{unique}.payments", partitions=4)  # replication factor 1
    text = topology_yaml(kafka_bootstrap, unique, partitions=1)
    topology = load(text.replace("partitions: 1\n", "partitions: 1\n    replication: 2\n", 1))
    async with cleaned(topology, "kafka") as ad:
        for _ in range(2):  # reported again, not "fixed"
            drift = await ad.apply()
            assert [(d.channel, d.setting, d.want, d.have) for d in drift] == [
                ("payments", "partitions", 1, 4),
                ("payments", "replication", 2, 1),
            ]
        assert str(drift[1]) == ("payments: replication is 1 on the broker, the topology says 2")
        described = await kafka.admin.describe_topics([f"{unique}.payments"])
        assert [len(p["replicas"]) for p in described[0]["partitions"]] == [1, 1, 1, 1]
        # The rest of the topology was still applied.
        assert {f"{unique}.payments-retry-0", f"{unique}.payments-dlt"} <= await kafka.topic_names()


async def test_a_topic_the_broker_refuses_to_create_is_a_clear_error(
    kafka_bootstrap: str, kafka: KafkaScope, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kafka refuses, say, more replicas than it has brokers in the response, not by
    # raising; the bundled broker refuses nothing, so its answer for one topic is made up.
    refused = f"{unique}.payments"
    topology = load(topology_yaml(kafka_bootstrap, unique))
    async with cleaned(topology, "kafka") as ad:
        assert isinstance(ad, KafkaAdapter)
        real = ad.admin.create_topics

        async def create_topics(new: list[NewTopic], *args: Any, **kwargs: Any) -> Any:
            response = await real([t for t in new if t.name != refused], *args, **kwargs)
            error = (refused, 38, "Replication factor: 3 larger than available brokers: 1.")
            return SimpleNamespace(topic_errors=[*response.topic_errors, error])

        monkeypatch.setattr(ad.admin, "create_topics", create_topics)
        with anyio.fail_after(5), pytest.raises(BrokerError) as info:  # not the metadata wait
            await ad.apply()
        assert str(info.value) == (
            f"kafka: Kafka at {kafka_bootstrap} would not create topic {refused!r}: "
            "INVALID_REPLICATION_FACTOR "
            "(Replication factor: 3 larger than available brokers: 1.)"
        )
        assert {f"{unique}.payments-retry-0", f"{unique}.payments-dlt"} <= await kafka.topic_names()


async def test_unreachable_is_one_error_with_aiokafkas_reasons(
    closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    ad = KafkaAdapter("kafka", load(topology_yaml(f"127.0.0.1:{closed_port}", "t")))
    with caplog.at_level(logging.DEBUG, "aiokafka"), pytest.raises(BrokerUnreachable) as info:
        await ad.connect()
    await ad.close()
    assert str(info.value).startswith(f"kafka: cannot reach Kafka at 127.0.0.1:{closed_port}: ")
    assert f'Unable connect to "127.0.0.1:{closed_port}"' in str(info.value)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no loose lines


async def test_a_start_that_got_through_still_logs_its_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # aiokafka shuffles the bootstrap addresses, so a real dead one is not always tried:
    # a client whose start logs as aiokafka's does when one of several addresses is down.
    class Client:
        async def start(self) -> None:
            logging.getLogger("aiokafka.client").error('Unable connect to "k1:9092": refused')

    ad = KafkaAdapter("kafka", load(topology_yaml("k1:9092,k2:9092", "t")))
    with caplog.at_level(logging.WARNING, "aiokafka"):
        await ad._start(Client())
    assert [r.getMessage() for r in caplog.records] == ['Unable connect to "k1:9092": refused']


class HeldAnswers:
    """Forwards Kafka connections, passing each one's first answer and holding the rest.

    The first answer is ApiVersions; holding the next (a bootstrap's Metadata) pins a
    client's start at the point where cancelling it used to leak its connection.
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.holding = anyio.Event()
        self.release = anyio.Event()
        self.closed = anyio.Event()  # every forwarded connection closed by its client
        self.open = 0

    async def serve(self, client: SocketStream) -> None:
        self.open += 1
        up = await anyio.connect_tcp(*self.upstream)
        async with client, up, anyio.create_task_group() as tg:
            tg.start_soon(self._answers, BufferedByteReceiveStream(up), client)
            async for chunk in client:
                await up.send(chunk)
            tg.cancel_scope.cancel()
        self.open -= 1
        if not self.open:
            self.closed.set()

    async def _answers(self, up: BufferedByteReceiveStream, client: SocketStream) -> None:
        first = True
        while True:
            size = await up.receive_exactly(4)
            frame = size + await up.receive_exactly(int.from_bytes(size, "big"))
            if not first and not self.release.is_set():
                self.holding.set()
                await self.release.wait()
            first = False
            await client.send(frame)


async def test_a_start_cancelled_before_the_metadata_answer_leaves_no_connection_open(
    kafka_bootstrap: str, unique: str
) -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        proxy = HeldAnswers(kafka_bootstrap.split(",")[0])
        port = listener.extra(SocketAttribute.local_port)
        ad = KafkaAdapter("kafka", load(topology_yaml(f"127.0.0.1:{port}", unique)))
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, proxy.serve)
            with anyio.fail_after(10):
                async with anyio.create_task_group() as starting:
                    starting.start_soon(ad.connect)
                    await proxy.holding.wait()
                    starting.cancel_scope.cancel()
                    proxy.release.set()
                await proxy.closed.wait()
            tg.cancel_scope.cancel()
        await ad.close()


def test_tap_fetch_wait_is_the_topologys() -> None:
    text = topology_yaml("127.0.0.1:9092", "t")
    assert KafkaAdapter("kafka", load(text))._tap_args()["fetch_max_wait_ms"] == 100
    text = text.replace("bootstrap:", "tap_fetch_wait: 2.5s, bootstrap:")
    assert KafkaAdapter("kafka", load(text))._tap_args()["fetch_max_wait_ms"] == 2500


async def test_tap_starts_at_the_end_offsets(
    kafka_bootstrap: str, kafka: KafkaScope, unique: str
) -> None:
    topology = load(topology_yaml(kafka_bootstrap, unique, partitions=2))
    topic = f"{unique}.payments"
    async with cleaned(topology, "kafka") as ad:
        await ad.apply()
        producer = await kafka.producer()
        for partition in (0, 1, 0, 1):
            await producer.send_and_wait(topic, order("early"), partition=partition)
        memory = Memory()
        async with Tracer(topology, [memory], channels=["payments"]):
            late = []
            for partition in (0, 1):
                meta = await producer.send_and_wait(topic, order("late"), partition=partition)
                late.append((meta.partition, meta.offset))
            await memory.wait_for(
                lambda items: len(of(items, Kind.ROUTED, "payments")) >= 2, KAFKA_WITHIN
            )

    routed = of(memory.items, Kind.ROUTED, "payments")
    # Per partition the early records come first: had the tap read them, they would be here.
    assert sorted((o.partition, o.offset) for o in routed) == sorted(late) == [(0, 2), (1, 2)]
    assert all(o.keys == {FLOW: "o-late"} for o in routed)


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_compressed_records_are_tapped(
    kafka_bootstrap: str, kafka: KafkaScope, unique: str, codec: str
) -> None:
    # Producers outside Python often compress their batches; the tap reads every codec
    # Kafka allows.
    topology = load(topology_yaml(kafka_bootstrap, unique))
    async with cleaned(topology, "kafka") as ad:
        await ad.apply()
        producer = await kafka.producer(compression_type=codec)
        memory = Memory()
        async with Tracer(topology, [memory]):
            bodies = [order(i) for i in range(3)]
            for body in bodies:
                await producer.send(f"{unique}.payments", body)
            await producer.flush()
            await memory.wait_for(lambda items: len(of(items, Kind.ROUTED)) == 3, KAFKA_WITHIN)
    routed = of(memory.items, Kind.ROUTED)
    assert [o.payload for o in routed] == [b.decode() for b in bodies]
    assert [o.keys for o in routed] == [{FLOW: f"o-{i}"} for i in range(3)]


PRODUCE_LZ4 = """
import asyncio, sys
from aiokafka import AIOKafkaProducer

async def main():
    producer = AIOKafkaProducer(bootstrap_servers=sys.argv[1], compression_type="lz4")
    await producer.start()
    try:
        await producer.send_and_wait(sys.argv[2], b'{"order_id": "o-1"}')
    finally:
        await producer.stop()

asyncio.run(main())
"""


async def test_a_codec_the_tap_cannot_read_is_a_clear_error(
    kafka_bootstrap: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topology = load(topology_yaml(kafka_bootstrap, unique))
    async with cleaned(topology, "kafka") as ad:
        await ad.apply()
        # As if lz4 were not installed here; the record comes from another process.
        monkeypatch.setattr(aiokafka.codec, "has_lz4", lambda: False)

        async def produce_and_wait() -> None:
            await anyio.run_process(
                [sys.executable, "-c", PRODUCE_LZ4, kafka_bootstrap, f"{unique}.payments"]
            )
            with anyio.fail_after(KAFKA_WITHIN):  # a deadline, should the tap not fail
                await anyio.sleep_forever()

        with pytest.raises(BrokerError) as caught:
            await tap_raising(topology, produce_and_wait)
    error = caught.value  # the leaf, as `flowcheck record` reports it
    assert isinstance(error, BrokerError)
    assert str(error).endswith(
        "UnsupportedCodecError: Libraries for lz4 compression codec not found"
    )


async def test_odd_keys_and_headers_of_other_producers(
    kafka_bootstrap: str, kafka: KafkaScope, unique: str
) -> None:
    topology = load(topology_yaml(kafka_bootstrap, unique))
    topic = f"{unique}.payments"
    huge = b"k" * (1024 * 1024)
    records: dict[str, tuple[bytes | None, list[tuple[str, bytes | None]]]] = {
        "null-headers": (None, [("a", None), ("x-flowcheck-id", None), ("traceparent", None)]),
        # Duplicate names: the last one counts, as Kafka's Headers.lastHeader reads them.
        "duplicates": (
            None,
            [("a", b"1"), ("a", b"2"), ("x-flowcheck-id", b"one"), ("x-flowcheck-id", b"two")],
        ),
        "binary": (None, [("b", b"\xff\xfe\x00ok")]),
        "huge-key": (huge, []),
        "huge-header": (None, [("n" * 5000, b"v"), ("x-flowcheck-id", huge)]),
    }
    async with cleaned(topology, "kafka") as ad:
        await ad.apply()
        producer = await kafka.producer(max_request_size=8 * len(huge))
        memory = Memory()
        async with Tracer(topology, [memory], channels=["payments"]):
            for case, (key, headers) in records.items():
                await producer.send_and_wait(
                    topic, order(case), key=key, headers=[("x-case", case.encode()), *headers]
                )
            await memory.wait_for(
                lambda items: len(of(items, Kind.ROUTED, "payments")) >= len(records), KAFKA_WITHIN
            )

    routed = of(memory.items, Kind.ROUTED, "payments")
    assert sorted(o.headers["x-case"] for o in routed) == sorted(records)
    seen = {o.headers["x-case"]: o for o in routed}
    assert all(o.keys == {FLOW: f"o-{case}"} for case, o in seen.items())
    assert seen["null-headers"].headers == {
        "x-case": "null-headers",
        "a": None,
        "x-flowcheck-id": None,
        "traceparent": None,
    }
    assert (
        seen["null-headers"].fc_id,
        seen["null-headers"].trace_id,
        seen["null-headers"].kafka_key,
    ) == (None, None, None)
    assert seen["duplicates"].headers == {"x-case": "duplicates", "a": "2", "x-flowcheck-id": "two"}
    assert seen["duplicates"].fc_id == "two"
    assert seen["binary"].headers["b"] == "\ufffd\ufffd\x00ok"
    big = seen["huge-key"].kafka_key
    assert big is not None
    assert big.startswith("k" * TEXT_CAP)
    assert len(big) < TEXT_CAP + 200
    odd = seen["huge-header"]
    assert odd.fc_id is not None
    assert len(odd.fc_id) < TEXT_CAP + 200
    assert all(len(name) < TEXT_CAP + 200 for name in odd.headers)
    assert len(odd.headers["x-flowcheck-id"]) < TEXT_CAP + 200
    for obs in routed:
        assert len(encode(obs)) < 32 * 1024


def with_header_name_bytes(batch: Any, name: str, raw: bytes) -> None:
    """Make ``batch`` carry header name ``raw`` where it says ``name``, as a client that
    writes arbitrary bytes would (aiokafka itself writes only UTF-8); the CRC is redone."""
    buf = bytearray(batch._build())
    old = name.encode()
    assert len(raw) == len(old)
    assert buf.count(old) == 1
    at = buf.index(old)
    buf[at : at + len(old)] = raw
    # A record batch's CRC-32C covers everything after its CRC field (bytes 17-20).
    buf[17:21] = calc_crc32c(bytes(buf[21:])).to_bytes(4, "big")
    batch._buffer = bytes(buf)


async def test_a_header_name_that_is_not_utf8_gaps_its_partition_only(
    kafka_bootstrap: str, kafka: KafkaScope, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    topology = load(topology_yaml(kafka_bootstrap, unique, partitions=2))
    topic = f"{unique}.payments"
    async with cleaned(topology, "kafka") as ad:
        await ad.apply()
        producer = await kafka.producer()
        memory = Memory()
        async with Tracer(topology, [memory], channels=["payments"]):
            # One batch on partition 0: a readable record, the unreadable one, another.
            batch = producer.create_batch()
            for case in ("before", "bad", "after"):
                headers = [("x-case", case.encode())]
                if case == "bad":
                    headers.append(("name-\u00e9", b"v"))
                assert batch.append(key=None, value=order(case), timestamp=None, headers=headers)
            with_header_name_bytes(batch, "name-\u00e9", b"name-\xff\xfe")
            await (await producer.send_batch(batch, topic, partition=0))
            await memory.wait_for(lambda items: bool(of(items, Kind.GAP, "payments")), KAFKA_WITHIN)
            # The other partition is still watched.
            await producer.send_and_wait(
                topic, order("later"), partition=1, headers=[("x-case", b"later")]
            )
            await memory.wait_for(
                lambda items: any(
                    o.headers.get("x-case") == "later" for o in of(items, Kind.ROUTED, "payments")
                ),
                KAFKA_WITHIN,
            )

    seen = sorted(o.headers["x-case"] for o in of(memory.items, Kind.ROUTED, "payments"))
    assert seen == ["before", "later"]
    (gap,) = of(memory.items, Kind.GAP, "payments")
    assert gap.until_ns is None  # the partition stays unwatched to the end
    assert gap.reason == (
        f"partition 0 of {topic}: the record at offset 1 has a header name that is not"
        " UTF-8, which the Kafka client cannot read; the tap stopped reading this partition"
    )
    assert caplog.messages == [f"kafka: {gap.reason}"]  # what `flowcheck record` prints


# ---------------------------------------------------------------- a log replaced under the tap

# The gap a replaced log leaves: where the tap was (3) and where the new log starts (0).
# Which check notices first depends on timing: the new log still short of the tap's
# position, or already past it with other records where the tap's last one was.
REPLACED = (
    r"partition 0 of {topic}: (the log ends at offset \d+, before the tap's position 3"
    r"|the record at offset 2 is not the one that was there \(the log ends at offset \d+\))"
    r": the log was replaced or truncated \(a topic re-created, a broker restarted without"
    r" its data\); the tap reads it again from offset 0, where it now starts"
)


async def send_each(bootstrap: str, topic: str, bodies: list[bytes]) -> None:
    """Publish ``bodies`` one record at a time, as another system would."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for body in bodies:
            await producer.send_and_wait(topic, body, partition=0)
    finally:
        await producer.stop()


async def create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, replication_factor=1)])
    finally:
        await admin.close()


def payloads(items: list[Observation]) -> list[str | None]:
    return [o.payload for o in of(items, Kind.ROUTED, "payments")]


@pytest.mark.parametrize("seen", [True, False], ids=["old-records-observed", "written-before"])
async def test_a_broker_restarted_without_its_data_is_a_gap_and_the_new_log_is_read(
    unique: str, seen: bool
) -> None:
    # A broker of the test's own: the session's serves the other tests.
    local = await anyio.to_thread.run_sync(LocalKafka().start)
    again: LocalKafka | None = None
    try:
        topology = load(topology_yaml(local.bootstrap, unique))
        topic = f"{unique}.payments"
        async with make_adapter("kafka", topology) as ad:  # gone with the broker: no clean-up
            await ad.apply(["payments"])
        old = [order(f"old-{i}") for i in range(3)]
        new = [order(f"new-{i}") for i in range(5)]  # more than the tap's position
        if not seen:  # the tap starts after them: it never observes a record of that log
            await send_each(local.bootstrap, topic, old)
        memory = Memory()
        async with Tracer(topology, [memory], channels=["payments"]):
            if seen:
                await send_each(local.bootstrap, topic, old)
                await memory.wait_for(lambda items: len(payloads(items)) == 3, KAFKA_WITHIN)
            await anyio.to_thread.run_sync(local.stop)
            again = await anyio.to_thread.run_sync(LocalKafka(port=local.port).start)
            await create_topic(again.bootstrap, topic)
            await send_each(again.bootstrap, topic, new)
            expected = [b.decode() for b in (old if seen else []) + new]
            await memory.wait_for(lambda items: len(payloads(items)) >= len(expected), KAFKA_WITHIN)
    finally:
        for broker in (local, again):
            if broker is not None:
                await anyio.to_thread.run_sync(broker.stop)

    assert payloads(memory.items) == expected
    replaced = [o for o in of(memory.items, Kind.GAP, "payments") if "replaced" in (o.reason or "")]
    assert len(replaced) == 1
    assert re.fullmatch(REPLACED.format(topic=re.escape(topic)), replaced[0].reason or "")


@pytest.mark.parametrize("count", [5, 1], ids=["past-the-position", "short-of-it"])
async def test_a_topic_deleted_and_created_again_is_a_gap_and_the_new_log_is_read(
    kafka_bootstrap: str, kafka: KafkaScope, unique: str, count: int
) -> None:
    topology = load(topology_yaml(kafka_bootstrap, unique))
    topic = f"{unique}.payments"
    old = [order(f"old-{i}") for i in range(3)]
    new = [order(f"new-{i}") for i in range(count)]
    async with cleaned(topology, "kafka") as ad:
        await ad.apply(["payments"])
        memory = Memory()
        async with Tracer(topology, [memory], channels=["payments"]):
            await send_each(kafka_bootstrap, topic, old)
            await memory.wait_for(lambda items: len(payloads(items)) == 3, KAFKA_WITHIN)
            await kafka.admin.delete_topics([topic])
            with anyio.fail_after(KAFKA_WITHIN):
                while topic in await kafka.topic_names():  # noqa: ASYNC110 - no event for it
                    await anyio.sleep(0.05)
            await kafka.create_topic(topic)
            await send_each(kafka_bootstrap, topic, new)
            await memory.wait_for(lambda items: len(payloads(items)) >= 3 + count, KAFKA_WITHIN)

    assert payloads(memory.items) == [b.decode() for b in old + new]
    (gap,) = of(memory.items, Kind.GAP, "payments")
    assert gap.until_ns is not None  # watched again
    if count >= 3:
        assert re.fullmatch(REPLACED.format(topic=re.escape(topic)), gap.reason or "")
    else:  # nothing where the tap was: only the log's end tells
        assert gap.reason == ends_before(topic, count)


def ends_before(topic: str, end: int) -> str:
    """The gap of a log that now ends before the tap's position, 3."""
    return (
        f"partition 0 of {topic}: the log ends at offset {end}, before the tap's position 3:"
        " the log was replaced or truncated (a topic re-created, a broker restarted without"
        " its data); the tap reads it again from offset 0, where it now starts"
    )


async def test_a_fetch_out_of_range_is_a_gap_and_the_log_is_read_from_its_start(
    kafka_bootstrap: str, kafka: KafkaScope, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kafka answers a fetch beyond a partition's end with OFFSET_OUT_OF_RANGE, which
    # aiokafka raises; the bundled broker answers it with nothing, so the tap's reads
    # raise here as they would on Kafka. The health poll's hints are off: only the fetch
    # error can tell.
    real = AIOKafkaConsumer.getmany

    async def getmany(self: AIOKafkaConsumer, *partitions: Any, **kwargs: Any) -> Any:
        got = await real(self, *partitions, **kwargs)
        if not partitions and not got:  # the tap's own reads name no partition
            assigned = sorted(self.assignment())
            ends = await self.end_offsets(assigned)
            beyond = {tp: p for tp in assigned if (p := await self.position(tp)) > ends[tp]}
            if beyond:
                raise OffsetOutOfRangeError(beyond)
        return got

    async def no_hints(*args: Any) -> None:
        pass

    monkeypatch.setattr(AIOKafkaConsumer, "getmany", getmany)
    monkeypatch.setattr(KafkaAdapter, "_suspect", no_hints)
    topology = load(topology_yaml(kafka_bootstrap, unique))
    topic = f"{unique}.payments"
    async with cleaned(topology, "kafka") as ad:
        await ad.apply(["payments"])
        memory = Memory()
        async with Tracer(topology, [memory], channels=["payments"]):
            await send_each(kafka_bootstrap, topic, [order(f"old-{i}") for i in range(3)])
            await memory.wait_for(lambda items: len(payloads(items)) == 3, KAFKA_WITHIN)
            await kafka.admin.delete_topics([topic])
            with anyio.fail_after(KAFKA_WITHIN):
                while topic in await kafka.topic_names():  # noqa: ASYNC110 - no event for it
                    await anyio.sleep(0.05)
            await kafka.create_topic(topic)
            await send_each(kafka_bootstrap, topic, [order("new-0")])  # short of the position
            await memory.wait_for(lambda items: len(payloads(items)) >= 4, KAFKA_WITHIN)

    assert payloads(memory.items)[3:] == [order("new-0").decode()]
    (gap,) = of(memory.items, Kind.GAP, "payments")
    assert gap.reason == ends_before(topic, 1)


@pytest.mark.parametrize(
    ("position", "begin", "end", "same", "why"),
    [
        (5, 0, 12, True, None),
        (5, 0, 12, None, None),
        (0, 0, 0, None, None),  # an empty log, nothing observed yet
        (5, 5, 12, None, None),  # retention took only what the tap had read
        (5, 5, 5, None, None),
        (
            5,
            0,
            3,
            None,
            "the log ends at offset 3, before the tap's position 5: the log was replaced or"
            " truncated (a topic re-created, a broker restarted without its data); the tap"
            " reads it again from offset 0, where it now starts",
        ),
        (
            5,
            9,
            20,
            None,
            "the log starts at offset 9, after the tap's position 5: records 5 to 8 were"
            " deleted before the tap read them (retention, a replaced log); the tap reads on"
            " from offset 9",
        ),
        (
            5,
            0,
            12,
            False,
            "the record at offset 4 is not the one that was there (the log ends at"
            " offset 12): the log was replaced or truncated (a topic re-created, a broker"
            " restarted without its data); the tap reads it again from offset 0, where it now"
            " starts",
        ),
    ],
)
def test_where_the_tap_reads_a_partition_whose_log_changed(
    position: int, begin: int, end: int, same: bool | None, why: str | None
) -> None:
    # The decision alone: retention deleting unread records (a log that starts after the
    # tap's position) cannot be made to happen on the bundled broker.
    assert _judge(position, begin, end, same) == why


def test_the_tap_never_moves_its_position_by_itself() -> None:
    # "earliest" or "latest" would skip what retention deleted without a word.
    assert (
        KafkaAdapter("kafka", load(topology_yaml("k:9092", "t")))._tap_args()["auto_offset_reset"]
        == "none"
    )


class Failing:
    """A producer whose sends fail with ``errors``, one each, then succeed: what a broker
    that restarts while flowcheck publishes gives (its answers are not chosen at will)."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.sent: list[dict[str, bytes]] = []

    async def send_and_wait(self, topic: str, **kw: Any) -> Any:
        self.sent.append(dict(kw["headers"]))
        if self.errors:
            raise self.errors.pop(0)
        return SimpleNamespace(partition=0, offset=len(self.sent) - 1, timestamp=-1)


async def test_publish_sends_again_after_a_retriable_error_and_marks_the_copies() -> None:
    ad = KafkaAdapter("kafka", load(topology_yaml("127.0.0.1:9092", "t")))
    ad.producer = Failing(kafka_errors.UnknownError(), kafka_errors.KafkaConnectionError())
    obs = await ad.publish("payments", order("o1"))
    assert [h.get(RESENT_HEADER) for h in ad.producer.sent] == [None, b"1", b"2"]
    assert len({h["x-flowcheck-id"] for h in ad.producer.sent}) == 1
    assert obs.kind is Kind.PUBLISHED
    assert obs.offset == 2
    assert obs.headers[RESENT_HEADER] == 2


async def test_publish_gives_up_after_reconnect_within(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_module, "RECONNECT_WITHIN", 0.3)
    ad = KafkaAdapter("kafka", load(topology_yaml("127.0.0.1:9092", "t")))
    ad.producer = Failing(*[kafka_errors.NodeNotReadyError()] * 100)
    with anyio.fail_after(5), pytest.raises(BrokerUnreachable) as info:
        await ad.publish("payments", order("o1"))
    assert str(info.value).startswith("kafka: Kafka at 127.0.0.1:9092 did not take a record for ")
    assert 1 < len(ad.producer.sent) < 100


async def test_publish_does_not_send_again_after_an_error_that_stays() -> None:
    ad = KafkaAdapter("kafka", load(topology_yaml("127.0.0.1:9092", "t")))
    ad.producer = Failing(kafka_errors.MessageSizeTooLargeError())
    with pytest.raises(BrokerError, match="MessageSizeTooLargeError"):
        await ad.publish("payments", order("o1"))
    assert len(ad.producer.sent) == 1

"""Kafka adapter (aiokafka): create topics, publish keyed records, tap without a group.

The tap is a consumer with no group, assigned every partition of each tapped
topic and positioned at the end offsets read when the tap starts, so it
neither joins nor disturbs the system's consumer groups. Committed offsets of
the groups the topology names are polled as evidence of consumption.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import anyio
import anyio.lowlevel

from flowcheck import tls
from flowcheck._deps import require
from flowcheck.brokers.base import Adapter, Drift, Sink, new_id
from flowcheck.errors import BrokerAuthError, BrokerError, BrokerUnreachable
from flowcheck.observations import ID_HEADER, RESENT_HEADER, Kind, Observation, now
from flowcheck.propagation import producer_span
from flowcheck.topology.model import Kafka, Topic

aiokafka = require("aiokafka")
from aiokafka import errors as kafka_errors  # noqa: E402 - after the dependency check
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402
from aiokafka.conn import create_conn  # noqa: E402
from aiokafka.structs import TopicPartition  # noqa: E402

from flowcheck.brokers.kafka import _parse, _plan  # noqa: E402
from flowcheck.brokers.kafka._parse import (  # noqa: E402
    BINARY_INT_HEADERS,
    Evidence,
    Logs,
    Mark,
    decode_header,
    fingerprint,
    judge,
    named,
    since,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0
POLL_MS = 500
BATCH = 1000
OFFSETS_POLL = 0.5  # seconds between committed-offset polls
HEALTH_POLL = 1.0  # seconds between broker health checks (gap detection)
CHECK_WAIT = 5.0  # seconds a check may wait for the broker's answers
RECONNECT_WITHIN = 30.0  # seconds a publish waits for a lost broker to answer again
RESEND_PAUSE = (0.1, 2.0)  # seconds between sends of one record: first, at most

__all__ = [
    "ADAPTER",
    "BINARY_INT_HEADERS",
    "RECONNECT_WITHIN",
    "RESENT_HEADER",
    "KafkaAdapter",
    "decode_header",
]


# Errors that mean the broker would not take flowcheck's login.
_LOGIN_ERRORS = (
    kafka_errors.AuthenticationFailedError,
    kafka_errors.AuthenticationMethodNotSupported,
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.UnsupportedSaslMechanismError,  # the listener does not offer this mechanism
    kafka_errors.IllegalSaslStateError,  # e.g. SASL sent to a PLAINTEXT listener
)


def _passing(exc: BaseException) -> bool:
    """Does this send error pass once the broker answers again? Kafka's retriable
    errors (the producer retries them itself only while it has a connection), and a
    broker just restarted answers UnknownError for a moment. Not KafkaTimeoutError: the
    producer gave up after its own request timeout, longer than RECONNECT_WITHIN."""
    if isinstance(exc, kafka_errors.KafkaError):
        return exc.retriable or isinstance(exc, kafka_errors.UnknownError)
    return isinstance(exc, (TimeoutError, OSError))


class _Held:
    """aiokafka's log records from one client start, kept until it is known how it went."""

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []
        self.active = True


_holding: contextvars.ContextVar[_Held | None] = contextvars.ContextVar("_holding", default=None)


class _Hold(logging.Filter):
    # aiokafka logs why each bootstrap address failed, then raises "Unable to bootstrap":
    # a failed start becomes one error that carries those reasons, not loose log lines.
    # Tasks the start creates inherit the context, hence the flag, not the variable alone.
    def filter(self, record: logging.LogRecord) -> bool:
        held = _holding.get()
        if held is None or not held.active:
            return True
        held.records.append(record)
        return False


def _hold_logs() -> None:
    """Put a _Hold on aiokafka's loggers (once; each client start does so): a logger's
    filters do not see its children's records, so each of them gets one."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if (
            name.startswith("aiokafka")
            and isinstance(logger, logging.Logger)
            and not any(isinstance(f, _Hold) for f in logger.filters)
        ):
            logger.addFilter(_Hold())


class KafkaAdapter(Adapter):
    kind = "kafka"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cfg = self.settings(Kafka)
        self.admin: Any = None
        self.producer: Any = None
        self._origin = self.dead_letter_origins()

    # ------------------------------------------------------------ connection

    def _client_args(self) -> dict[str, Any]:
        sec = self.cfg.security
        args: dict[str, Any] = {
            "bootstrap_servers": list(self.cfg.bootstrap),
            "client_id": self.cfg.client_id,
            "security_protocol": sec.protocol,
        }
        if sec.sasl_mechanism is not None:
            args["sasl_mechanism"] = sec.sasl_mechanism
            args["sasl_plain_username"] = sec.username
            args["sasl_plain_password"] = sec.password.get_secret_value() if sec.password else None
        if sec.protocol.endswith("SSL"):
            try:
                args["ssl_context"] = tls.context(self.cfg.tls_settings())
            except tls.TLSFileError as exc:
                raise BrokerError(self.name, f"tls.{exc.key}: {exc}") from None
        return args

    def _where(self) -> str:
        return f"Kafka at {','.join(self.cfg.bootstrap)}"

    def _translate(self, exc: BaseException) -> BaseException:
        if isinstance(exc, _LOGIN_ERRORS):
            return BrokerAuthError(
                self.name, f"{self._where()} refused the login ({type(exc).__name__})"
            )
        if isinstance(
            exc,
            (
                kafka_errors.TopicAuthorizationFailedError,
                kafka_errors.ClusterAuthorizationFailedError,
                kafka_errors.GroupAuthorizationFailedError,
            ),
        ):
            return BrokerAuthError(
                self.name, f"{self._where()}: permission denied ({type(exc).__name__})"
            )
        if isinstance(exc, (kafka_errors.KafkaConnectionError, TimeoutError, OSError)):
            return BrokerUnreachable(self.name, f"cannot reach {self._where()} ({named(exc)})")
        if isinstance(exc, kafka_errors.KafkaError):
            return BrokerError(self.name, f"{self._where()}: {named(exc)}")
        return exc

    async def _start(self, client: Any) -> None:
        _hold_logs()
        held = _Held()
        token = _holding.set(held)
        try:
            # Never cancelled halfway from outside: aiokafka's bootstrap leaves its
            # connection open when cancelled between connecting and the metadata
            # answer. A cancelled caller waits for the start, then closes the client.
            with anyio.CancelScope(shield=True), anyio.fail_after(CONNECT_TIMEOUT):
                await client.start()
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException as exc:
            held.active = False
            with anyio.CancelScope(shield=True):
                await client.close() if hasattr(client, "close") else await client.stop()
            cause = exc
            if (
                isinstance(exc, kafka_errors.KafkaConnectionError)
                and self.cfg.security.sasl_mechanism is not None
            ):
                cause = await self._login_failure() or exc
            error = self._translate(cause)
            why = None
            if self.cfg.security.protocol.endswith("SSL"):
                logged = " ".join(r.getMessage() for r in held.records)
                host = self.cfg.bootstrap[0].rpartition(":")[0]
                why = tls.explain(cause, self.cfg.tls_settings(), host, logged, opening=True)
                if why is None and isinstance(cause, TimeoutError):
                    why = "no answer in time (TLS: is it a TLS listener?)"
            if why is not None:
                error = BrokerUnreachable(self.name, f"{self._where()}: {why}")
            elif isinstance(error, BrokerUnreachable) and held.records:
                reasons = "; ".join(dict.fromkeys(r.getMessage() for r in held.records))
                error = BrokerUnreachable(self.name, f"cannot reach {self._where()}: {reasons}")
            raise error from None
        else:
            held.active = False
            for record in held.records:  # a start that got through: its warnings still count
                logging.getLogger(record.name).handle(record)
        finally:
            _holding.reset(token)

    async def _login_failure(self) -> BaseException | None:
        """The login error behind a failed bootstrap, if that was the cause.

        aiokafka only logs why each bootstrap address failed and then reports
        "Unable to bootstrap", so a refused login would look like an unreachable
        broker: connect to each address once more, alone, to find out.
        """
        args = self._client_args()
        for address in self.cfg.bootstrap:
            host, _, port = address.rpartition(":")
            try:
                with anyio.fail_after(CONNECT_TIMEOUT):
                    conn = await create_conn(
                        host,
                        int(port),
                        client_id=args["client_id"],
                        request_timeout_ms=int(CONNECT_TIMEOUT * 1000),
                        ssl_context=args.get("ssl_context"),
                        security_protocol=args["security_protocol"],
                        sasl_mechanism=args.get("sasl_mechanism"),
                        sasl_plain_username=args.get("sasl_plain_username"),
                        sasl_plain_password=args.get("sasl_plain_password"),
                    )
            except _LOGIN_ERRORS as exc:
                refused: BaseException = exc
                return refused
            except (kafka_errors.KafkaError, TimeoutError, OSError, ValueError):
                continue
            conn.close()
        return None

    async def connect(self) -> None:
        self.admin = AIOKafkaAdminClient(
            **self._client_args(), request_timeout_ms=int(CONNECT_TIMEOUT * 1000)
        )
        await self._start(self.admin)

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None
        if self.admin is not None:
            await self.admin.close()
            self.admin = None

    # ------------------------------------------------------------ apply

    async def _partitions(self, names: Sequence[str]) -> dict[str, int]:
        """Partition count of each existing topic among ``names``."""
        return {name: parts for name, (parts, _) in (await self._shapes(names)).items()}

    async def _shapes(self, names: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(partitions, replication factor) of each existing topic among ``names``."""
        if not names:
            return {}
        existing = set(await self.admin.list_topics())
        wanted = [n for n in names if n in existing]
        if not wanted:
            return {}
        return _plan.shapes(await self.admin.describe_topics(wanted))

    async def apply(self, channels: Sequence[str] | None = None) -> list[Drift]:
        keys = list(channels) if channels is not None else self.channels()
        topics = {k: self.topology.channels[k] for k in keys}
        drift: list[Drift] = []
        try:
            have = await self._shapes([self._names[k] for k in keys])
            new = []
            for key, t in topics.items():
                assert isinstance(t, Topic)
                name = self._names[key]
                if name in have:
                    drift += _plan.topic_drift(key, t, *have[name])
                else:
                    new.append(
                        NewTopic(
                            name, num_partitions=t.partitions, replication_factor=t.replication or 1
                        )
                    )
            if new:
                response = await self.admin.create_topics(new)
                refused = self._refused(response)
                # Wait for the others: the error should not leave them half made.
                await self._await_topics([n.name for n in new if n.name not in refused])
                if refused:
                    raise BrokerError(
                        self.name,
                        f"{self._where()} would not create "
                        + "; ".join(f"topic {n!r}: {why}" for n, why in refused.items()),
                    )
        except kafka_errors.KafkaError as exc:
            raise self._translate(exc) from None
        except TimeoutError:
            raise BrokerError(
                self.name,
                f"{self._where()}: new topics did not show up in its metadata "
                f"within {CONNECT_TIMEOUT:g}s",
            ) from None
        return drift

    @staticmethod
    def _refused(response: Any) -> dict[str, str]:
        return _parse.refused(
            response.topic_errors, kafka_errors.TopicAlreadyExistsError.errno, kafka_errors.for_code
        )

    async def _await_topics(self, names: list[str]) -> None:
        """Wait until the new topics show up in metadata with all their partitions."""
        with anyio.fail_after(CONNECT_TIMEOUT):
            while set(await self._partitions(names)) != set(names):  # noqa: ASYNC110 - metadata has no event to wait on
                await anyio.sleep(0.05)

    # ------------------------------------------------------------ publish

    async def publish(
        self,
        channel: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        key: str | None = None,
        routing_key: str | None = None,
    ) -> Observation:
        if self.producer is None:
            producer = aiokafka.AIOKafkaProducer(**self._client_args(), acks="all", linger_ms=0)
            await self._start(producer)
            self.producer = producer
        fc_id = new_id()
        hdrs: dict[str, Any] = {**(headers or {}), ID_HEADER: fc_id}
        topic = self._names[channel]
        with producer_span(
            "kafka",
            topic,
            hdrs,
            **{"messaging.message.id": fc_id, "messaging.kafka.message.key": key},
        ):
            meta = await self._send(topic, body, key, hdrs)
        return self.observe(
            Kind.PUBLISHED,
            channel,
            body=body,
            headers=hdrs,
            kafka_key=key,
            partition=meta.partition,
            offset=meta.offset,
            broker_ms=meta.timestamp if meta.timestamp >= 0 else None,
        )

    async def _send(self, topic: str, body: bytes, key: str | None, hdrs: dict[str, Any]) -> Any:
        """Write one record and wait for the broker's acknowledgement; its metadata.

        An error that passes once the broker answers again (a lost connection, a broker
        just restarted) sends the record again, as it was (the same x-flowcheck-id), with
        RESENT_HEADER added to ``hdrs``: the send before may have been written. A broker
        that does not take it within RECONNECT_WITHIN is a BrokerUnreachable.
        """
        deadline: float | None = None  # for the broker to answer again, from the first failure
        pause, resent = RESEND_PAUSE[0], 0
        while True:
            try:
                return await self.producer.send_and_wait(
                    topic,
                    value=body,
                    key=key.encode() if key is not None else None,
                    headers=[(k, str(v).encode()) for k, v in hdrs.items()],
                )
            except (kafka_errors.KafkaError, TimeoutError, OSError) as exc:
                if not _passing(exc):
                    raise self._translate(exc) from None
                if deadline is None:
                    deadline = anyio.current_time() + RECONNECT_WITHIN
                left = deadline - anyio.current_time()
                if left <= 0:
                    raise BrokerUnreachable(
                        self.name,
                        f"{self._where()} did not take a record for {RECONNECT_WITHIN:g}s "
                        f"while publishing: {named(exc)}",
                    ) from None
                log.debug("%s: sending again to %s after %s", self.name, topic, named(exc))
            await anyio.sleep(min(pause, left))  # back off while the broker recovers
            pause = min(pause * 2, RESEND_PAUSE[1])
            resent += 1
            hdrs[RESENT_HEADER] = resent

    # ------------------------------------------------------------ tap

    async def tap(
        self, channels: Sequence[str], sink: Sink, *, ready: anyio.Event | None = None
    ) -> None:
        names = [self._names[k] for k in channels]
        consumer = aiokafka.AIOKafkaConsumer(**self._tap_args())
        await self._start(consumer)
        try:
            try:
                parts = await self._partitions(names)
                tps = [TopicPartition(n, p) for n, count in parts.items() for p in range(count)]
                missing = sorted(set(names) - set(parts))
                if missing:
                    raise BrokerError(
                        self.name,
                        f"cannot tap topics that do not exist: {', '.join(missing)}; run apply first",
                    )
                consumer.assign(tps)
                ends = await consumer.end_offsets(tps)
                for tp in tps:
                    consumer.seek(tp, ends[tp])
            except kafka_errors.KafkaError as exc:
                raise self._translate(exc) from None
            state = Evidence(_plan.consumer_groups(self.topology, channels))
            start = now()
            ahead = {tp: Mark(ends[tp], int(start[1] * 1000), None) for tp in tps}
            logs = Logs()

            def take(batches: dict[Any, list[Any]]) -> None:
                # One time for the batch: its records arrived together, and a
                # clock read per record would only add the time spent on the others.
                at = now()
                for tp, records in batches.items():
                    key = self._by_physical[tp.topic]
                    watched = key in state.groups  # some group's commits to watch
                    for rec in records:
                        obs = self._record(key, rec, at)
                        sink(obs)
                        if watched:
                            state.seen(key, rec.partition, obs)
                    if records:
                        last = records[-1]
                        ahead[tp] = Mark(last.offset + 1, last.timestamp, fingerprint(last))

            # Reads the record before the tap's position in each partition, when asked.
            probe = aiokafka.AIOKafkaConsumer(**self._tap_args())
            await self._start(probe)
            try:
                probe.assign(tps)
                for tp in tps:
                    probe.seek(tp, ends[tp])
                probe.pause(*tps)
                # The record before each start position, so that a log replaced before
                # the tap observed anything of it is told too.
                before = {tp: ends[tp] - 1 for tp in tps if ends[tp] > 0}
                for tp, last in (await self._fingerprints(probe, before)).items():
                    ahead[tp] = ahead[tp]._replace(last=last)

                async def answered(topics: set[str], back: bool) -> None:
                    await self._suspect(probe, logs, ahead, topics, back)

                if ready is not None:
                    ready.set()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._poll_offsets, state, sink)
                    tg.start_soon(self._watch_health, channels, sink, answered)
                    while True:
                        try:
                            batches = await consumer.getmany(timeout_ms=POLL_MS, max_records=BATCH)
                        except kafka_errors.OffsetOutOfRangeError as exc:
                            # The position lies outside the log: the check says where it is now.
                            where = exc.args[0] if exc.args else None
                            logs.suspect.update(where if isinstance(where, dict) else tps)
                            batches = {}
                        except kafka_errors.KafkaError as exc:  # e.g. a codec not installed
                            raise self._translate(exc) from None
                        except UnicodeDecodeError:
                            await self._drop_unreadable(consumer, ahead, take, sink, start[0])
                            continue
                        # Before every batch: a log replaced while the tap waited gives
                        # records at the tap's position too, only other ones. Not on a
                        # partition the tap stopped reading for good.
                        due = (logs.suspect | batches.keys()) - consumer.paused()
                        if due:
                            held = await self._check(
                                due, probe, consumer, logs, ahead, state, sink, start[0]
                            )
                            batches = {tp: r for tp, r in batches.items() if tp not in held}
                        take(batches)
            finally:
                with anyio.CancelScope(shield=True):
                    await probe.stop()
        finally:
            with anyio.CancelScope(shield=True):
                await consumer.stop()

    async def _suspect(
        self,
        probe: Any,
        logs: Logs,
        ahead: dict[Any, Mark],
        topics: set[str],
        back: bool,
    ) -> None:
        """After each health poll: mark the partitions whose log may have been replaced.

        Those of a topic that was missing and is back, all of them after an outage, and
        any whose log now ends before the tap's position. The tap checks them.
        """
        live = [tp for tp in ahead if tp.topic in topics]
        logs.suspect.update(tp for tp in live if back or tp.topic in logs.missing)
        logs.missing = {tp.topic for tp in ahead} - topics
        if not live:
            return
        try:
            with anyio.fail_after(CHECK_WAIT):
                ends = await probe.end_offsets(live)
        except (kafka_errors.KafkaError, TimeoutError, OSError):
            return  # only a hint: the health poll says whether the broker answers
        logs.suspect.update(tp for tp in live if ends[tp] < ahead[tp].next)

    async def _check(
        self,
        tps: set[Any],
        probe: Any,
        consumer: Any,
        logs: Logs,
        ahead: dict[Any, Mark],
        state: Evidence,
        sink: Sink,
        started: int,
    ) -> set[Any]:
        """Check that each of ``tps`` still holds the log the tap read; returns the partitions
        whose fetched records must not be taken.

        A log whose bounds no longer hold the tap's position, or whose record before it is
        not the one that was there, was replaced, truncated or deleted from: the tap
        records a gap and reads it from where it now starts. Where the broker does not
        answer, the partition's records wait for the next check.
        """
        ordered = sorted(tps)
        # The cheap question first: is the record before each position the one observed?
        wanted = {tp: ahead[tp].next - 1 for tp in ordered if ahead[tp].last is not None}
        found = await self._fingerprints(probe, wanted)
        unsure = []
        for tp in ordered:
            if found.get(tp) is not None and found[tp] == ahead[tp].last:
                logs.suspect.discard(tp)
            else:
                unsure.append(tp)
        if not unsure:
            return set()
        try:
            with anyio.fail_after(CHECK_WAIT):
                begins = await probe.beginning_offsets(unsure)
                ends = await probe.end_offsets(unsure)
        except kafka_errors.KafkaError as exc:
            if not exc.retriable:
                raise self._translate(exc) from None
            return self._hold(consumer, logs, ahead, unsure)
        except (TimeoutError, OSError):
            return self._hold(consumer, logs, ahead, unsure)
        held: set[Any] = set()
        for tp in unsure:
            mark = ahead[tp]
            logs.suspect.discard(tp)
            # None: no record observed yet, or none at that offset now (compacted away, or
            # the log ends before it): the bounds tell.
            seen = found.get(tp)
            why = judge(mark.next, begins[tp], ends[tp], None if seen is None else False)
            if why is None:
                continue
            held.add(tp)
            consumer.seek(tp, begins[tp])
            mono, wall = now()
            ahead[tp] = Mark(begins[tp], int(wall * 1000), None)
            key = self._by_physical[tp.topic]
            state.forget(key, tp.partition)  # commits of the new log are not about those
            reason = f"partition {tp.partition} of {tp.topic}: {why}"
            log.warning("%s: %s", self.name, reason)  # `flowcheck record` prints it
            sink(self.gap(key, since(started, mark.ms), mono, reason))
        return held

    @staticmethod
    def _hold(consumer: Any, logs: Logs, ahead: dict[Any, Mark], tps: list[Any]) -> set[Any]:
        """Leave ``tps`` unread until a check gets through."""
        for tp in tps:
            consumer.seek(tp, ahead[tp].next)
        logs.suspect.update(tps)
        return set(tps)

    async def _fingerprints(
        self, probe: Any, wanted: dict[Any, int]
    ) -> dict[Any, tuple[int, int, int] | None]:
        """The fingerprint of the record at each wanted offset (None: not there: compacted
        away, out of the log's range); a partition that gives nothing in time is left out:
        not known."""
        found: dict[Any, tuple[int, int, int] | None] = {}
        if not wanted:
            return found
        # A broker holds a fetch it has nothing for up to the fetch wait: a read that gives
        # nothing at all in twice that leaves the rest not known (say, beyond the log's end).
        wait = POLL_MS + 2 * (self.cfg.tap_fetch_wait // timedelta(milliseconds=1))
        for tp, offset in wanted.items():
            probe.seek(tp, offset)
        probe.resume(*wanted)
        try:
            with anyio.move_on_after(CHECK_WAIT):
                while len(found) < len(wanted):
                    rest = [tp for tp in wanted if tp not in found]
                    try:
                        # One record a read: only the wanted one is decoded (an unreadable
                        # one may follow it; see _drop_unreadable).
                        batches = await probe.getmany(*rest, timeout_ms=wait, max_records=1)
                    except kafka_errors.OffsetOutOfRangeError as exc:
                        where = exc.args[0] if exc.args else None
                        gone = [tp for tp in rest if not isinstance(where, dict) or tp in where]
                        found.update(dict.fromkeys(gone))  # the log's bounds tell the rest
                        probe.pause(*gone)
                        continue
                    except (kafka_errors.KafkaError, UnicodeDecodeError):
                        break  # not known: the bounds tell
                    if not batches:
                        break
                    for tp, records in batches.items():
                        if records and tp not in found:
                            first = records[0]
                            found[tp] = fingerprint(first) if first.offset == wanted[tp] else None
                            probe.pause(tp)
        finally:
            probe.pause(*wanted)  # no reading in the background until the next check
            for tp, offset in wanted.items():
                # Drops what it fetched beyond the record (up to a fetch's size a partition)
                # and any answer still to come for the wanted offset.
                probe.seek(tp, offset + 1)
        return found

    async def _drop_unreadable(
        self,
        consumer: Any,
        ahead: dict[Any, Mark],
        take: Callable[[dict[Any, list[Any]]], None],
        sink: Sink,
        started: int,
    ) -> None:
        """Stop reading the partition that holds a record the client cannot decode.

        aiokafka fails every read of a partition at a record whose header name is not
        UTF-8 (other clients can write one), and loses the records the failed read had
        taken. Each partition is read alone, from its last observed record, to find it;
        what precedes it is observed, and its channel gets a gap to the end of the tap.
        """
        tps = sorted(consumer.assignment() - consumer.paused())
        for tp in tps:
            consumer.seek(tp, ahead[tp][0])
        consumer.pause(*tps)
        bad = None
        for tp in tps:
            consumer.resume(tp)
            try:
                # One record a read, so the position stops at the unreadable one; the failed
                # read took fewer than BATCH records, so it lies within BATCH of the last
                # observed. (End offsets cannot bound this: the bundled test broker reports
                # a multi-record batch's first offset + 1 as its end.)
                for _ in range(BATCH):
                    got = await consumer.getmany(tp, timeout_ms=POLL_MS, max_records=1)
                    if not got:
                        break
                    take(got)
            except UnicodeDecodeError:
                bad = tp
                break
            except kafka_errors.KafkaError as exc:
                raise self._translate(exc) from None
            finally:
                consumer.pause(tp)  # for good, if it is the one
        if bad is None:  # not found: the next failed read looks again
            consumer.resume(*tps)
            return
        offset = await consumer.position(bad)
        consumer.resume(*(tp for tp in tps if tp != bad))
        # Unwatched since the unreadable record was written, at the earliest after the
        # last one observed there.
        unwatched = since(started, ahead[bad].ms)
        reason = (
            f"partition {bad.partition} of {bad.topic}: the record at offset {offset} has"
            " a header name that is not UTF-8, which the Kafka client cannot read;"
            " the tap stopped reading this partition"
        )
        log.warning("%s: %s", self.name, reason)  # `flowcheck record` prints it
        sink(self.gap(self._by_physical[bad.topic], unwatched, None, reason))

    def _tap_args(self) -> dict[str, Any]:
        """The tap's consumer: group-less, so it takes no record from any group."""
        return dict(
            self._client_args(),
            group_id=None,
            enable_auto_commit=False,
            # Raise, not skip, where the position is outside the log: the tap records the gap.
            auto_offset_reset="none",
            max_poll_records=BATCH,
            # Kafka answers a fetch as soon as a record arrives, so this wait only sets how
            # often an idle tap asks; a broker that answers only near the deadline (the
            # bundled test broker) delays observations by up to this much.
            fetch_max_wait_ms=self.cfg.tap_fetch_wait // timedelta(milliseconds=1),
        )

    def _record(self, key: str, rec: Any, at: tuple[int, float] | None = None) -> Observation:
        headers = _parse.read_headers(rec.headers)
        kind, origin, reason, count = _parse.read_dead_letter(
            headers, self._origin.get(key), self._by_physical
        )
        ts = rec.timestamp
        return self.observe(
            kind,
            key,
            body=rec.value,  # None for a tombstone: no payload, not an empty one
            headers=headers,
            kafka_key=None if rec.key is None else rec.key.decode("utf-8", errors="replace"),
            at=at,
            partition=rec.partition,
            offset=rec.offset,
            broker_ms=ts if ts is not None and ts >= 0 else None,
            delivery_count=count,
            origin=origin,
            reason=reason,
        )

    async def _poll_offsets(self, state: Evidence, sink: Sink) -> None:
        """Turn the groups' committed offsets into CONSUMED evidence for the records seen.

        A consumer that names the group but never subscribes reads its commits
        (OffsetFetch) without joining it, so the group's own members are undisturbed.
        """
        readers: dict[str, Any] = {}
        try:
            for group in {g for groups in state.groups.values() for g in groups}:
                reader = aiokafka.AIOKafkaConsumer(
                    **self._client_args(), group_id=group, enable_auto_commit=False
                )
                await self._start(reader)
                readers[group] = reader
            while readers:
                for (key, group, partition), pending in list(state.open.items()):
                    if not pending:
                        continue
                    tp = TopicPartition(self._names[key], partition)
                    try:
                        offset = await readers[group].committed(tp)
                    except kafka_errors.KafkaError:
                        continue  # the group may not exist yet; try again next round
                    if offset is None:
                        continue
                    for obs in state.committed(key, group, partition, offset):
                        sink(obs.replace(kind=Kind.CONSUMED, group=group, **_stamp()))
                await anyio.sleep(OFFSETS_POLL)  # polling interval, not a wait for an event
        finally:
            with anyio.CancelScope(shield=True):
                for reader in readers.values():
                    await reader.stop()

    async def _watch_health(
        self,
        channels: Sequence[str],
        sink: Sink,
        answered: Callable[[set[str], bool], Awaitable[None]] | None = None,
    ) -> None:
        """Mark a gap while the cluster does not answer: what the tap sees then is late.

        ``answered`` gets the topics of each answer and whether it ends an outage.
        """
        try:
            while True:
                try:
                    with anyio.fail_after(HEALTH_POLL * 2):
                        topics = await self.admin.list_topics()
                    back = self.came_back(channels, sink)
                except (kafka_errors.KafkaError, TimeoutError, OSError) as exc:
                    if self.watching:
                        self.went_down(f"Kafka did not answer ({type(exc).__name__})")
                else:
                    if answered is not None:
                        await answered(set(topics), back)
                await anyio.sleep(HEALTH_POLL)  # polling interval, not a wait for an event
        finally:
            self.stopped_down(channels, sink)

    # ------------------------------------------------------------ delete

    async def delete(self, channels: Sequence[str]) -> None:
        names = [self._names[k] for k in channels]
        if self.producer is not None:
            # Its metadata refreshes name the topics it sent to, and a broker that
            # auto-creates topics would bring them back; the next publish starts another.
            producer, self.producer = self.producer, None
            await producer.stop()
        try:
            existing = set(await self.admin.list_topics())
            doomed = [n for n in names if n in existing]
            if doomed:
                await self.admin.delete_topics(doomed)
        except kafka_errors.KafkaError as exc:
            raise self._translate(exc) from None


def _stamp() -> dict[str, Any]:
    mono, wall = now()
    return {"mono_ns": mono, "wall": wall}


ADAPTER = KafkaAdapter

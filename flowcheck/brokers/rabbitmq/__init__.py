"""RabbitMQ adapter (aio-pika): declare, publish with confirms, tap passively.

Tapping never takes a message from the system's own consumers: every tapped
queue gets a server-named, exclusive twin bound exactly like it, so the
broker routes a copy to the twin; every exchange gets a twin bound to all its
keys (only to the topology's, if it has an alternate exchange). The firehose
(``rabbitmqctl trace_on``), when it is on, adds deliveries and redeliveries;
when it is off its binding simply receives nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio

from flowcheck import tls
from flowcheck._deps import require
from flowcheck.brokers.base import Adapter, Drift, Sink, new_id, reach
from flowcheck.errors import BrokerAuthError, BrokerError, BrokerUnreachable
from flowcheck.observations import ID_HEADER, RESENT_HEADER, Kind, Observation, now
from flowcheck.propagation import producer_span
from flowcheck.redact import redact_url
from flowcheck.topology.model import Exchange, Queue, RabbitMQ
from flowcheck.topology.routing import bound_queues

aio_pika = require("aio_pika")
from aio_pika import exceptions as amqp_errors  # noqa: E402 - after the dependency check
from aiormq import exceptions as aiormq_errors  # noqa: E402
from aiormq.abc import DeliveredMessage  # noqa: E402

from flowcheck.brokers.rabbitmq import _parse, _plan  # noqa: E402
from flowcheck.brokers.rabbitmq._paced import paced_connection  # noqa: E402
from flowcheck.brokers.rabbitmq._parse import Reading  # noqa: E402
from flowcheck.brokers.rabbitmq._plan import queue_arguments  # noqa: E402

TRACE_EXCHANGE = "amq.rabbitmq.trace"
PROBES = 16  # declares per channel to find each setting that differs, at most
RECONNECT_WITHIN = 30.0  # seconds a publish waits for a lost broker to come back
CONFIRM_WITHIN = 30.0  # seconds a publish waits for the broker's confirm
# Seconds the tap waits for the firehose to show its probe: it shows it at once when on.
FIREHOSE_WITHIN = 1.0
# What a publish raises when its connection is gone: closed by the broker or the network
# (aiormq says "<Connection ...> closed" with a plain RuntimeError, before aio-pika's
# connection knows), or silent (no confirm in time).
_LOST = (ConnectionError, RuntimeError, TimeoutError)
_reason = _parse.reason
log = logging.getLogger(__name__)

__all__ = [
    "ADAPTER",
    "CONFIRM_WITHIN",
    "RECONNECT_WITHIN",
    "RESENT_HEADER",
    "RabbitMQAdapter",
    "queue_arguments",
]


class _Raised(logging.Filter):
    # aiormq logs why it could not open a connection, then raises it; flowcheck
    # translates the error into one line of its own, so the log line is a duplicate.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error when creating transport")


def _quiet_transport_errors() -> None:
    """Put a _Raised on aiormq's connection logger (once; when a connection first opens,
    not on import: a system under test in the same process keeps its logging as it is)."""
    logger = logging.getLogger("aiormq.connection")
    if not any(isinstance(f, _Raised) for f in logger.filters):
        logger.addFilter(_Raised())


class RabbitMQAdapter(Adapter):
    kind = "rabbitmq"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.settings(RabbitMQ)
        self.url, self.tls, self.read_interval = reach(cfg)
        self.vhost = cfg.vhost
        self.connection: Any = None
        self._publish_channel: Any = None
        self._stale = False  # the client connection was given up, closed or not
        self._reconnecting: anyio.Lock | None = None  # made in the event loop, when needed
        # Queues that some queue dead-letters into: messages with x-death there are dead letters.
        self._dead_letter_queues = _plan.dead_letter_targets(self.topology)
        self._past_limit = functools.partial(_plan.past_limit, self.topology)
        self._firehose_checked = False  # said once per tap, not on every reconnect

    # ------------------------------------------------------------ connection

    async def _open(self, purpose: str) -> Any:
        kwargs: dict[str, Any] = {
            "timeout": 10,
            "client_properties": {"connection_name": self.connection_name(purpose)},
        }
        if self.vhost is not None:
            kwargs["virtualhost"] = self.vhost
        if purpose == "tap":
            kwargs["connection_class"] = paced_connection(self.read_interval)
        _quiet_transport_errors()
        secure = urlsplit(self.url).scheme == "amqps"
        if secure and self.tls is not None:
            try:
                kwargs["ssl_context"] = tls.context(self.tls)
            except tls.TLSFileError as exc:
                raise BrokerError(self.name, f"tls.{exc.key}: {exc}") from None
        try:
            try:
                return await aio_pika.connect(self.url, **kwargs)
            except Exception as exc:
                why = (
                    tls.explain(exc, self.tls, urlsplit(self.url).hostname, opening=True)
                    if secure
                    else None
                )
                if why is None:
                    raise
                raise BrokerUnreachable(
                    self.name, f"RabbitMQ at {redact_url(self.url)}: {why}"
                ) from None
        except amqp_errors.ProbableAuthenticationError as exc:
            raise BrokerAuthError(
                self.name, f"RabbitMQ at {redact_url(self.url)} refused the login ({exc})"
            ) from None
        except amqp_errors.AuthenticationError as exc:
            raise BrokerAuthError(
                self.name, f"RabbitMQ at {redact_url(self.url)} refused the login ({exc})"
            ) from None
        except amqp_errors.InvalidFrameError as exc:
            # aiormq reports RabbitMQ closing the connection instead of opening the
            # virtual host as an unexpected frame, without the broker's reason.
            if "Connection.Close" not in str(exc):
                raise BrokerError(
                    self.name, f"RabbitMQ at {redact_url(self.url)}: {_reason(exc)}"
                ) from None
            raise BrokerAuthError(
                self.name,
                f"RabbitMQ at {redact_url(self.url)} would not open virtual host "
                f"{self._vhost_name()!r}: it does not exist, or this user may not use it",
            ) from None
        except (TimeoutError, OSError, amqp_errors.AMQPConnectionError) as exc:
            reason = _reason(exc)
            if "vhost" in reason or "NOT_ALLOWED" in reason or "ACCESS_REFUSED" in reason:
                raise BrokerAuthError(
                    self.name, f"RabbitMQ at {redact_url(self.url)}: {reason}"
                ) from None
            raise BrokerUnreachable(
                self.name, f"cannot reach RabbitMQ at {redact_url(self.url)} ({reason})"
            ) from None

    def _vhost_name(self) -> str:
        if self.vhost is not None:
            return self.vhost
        return unquote(urlsplit(self.url).path[1:]) or "/"  # as aio-pika reads the URL

    async def connect(self) -> None:
        self.connection = await self._open("client")
        self._stale = False

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
            self.connection = None
            self._publish_channel = None

    async def _client(self, deadline: float | None = None) -> Any:
        """The client connection; reopened if it was lost, waiting until ``deadline``
        (anyio's clock; default RECONNECT_WITHIN from now) for the broker to come back."""
        if self.connection is None:
            await self.connect()
        if not (self._stale or _gone(self.connection)):
            return self.connection
        if self._reconnecting is None:
            self._reconnecting = anyio.Lock()
        async with self._reconnecting:  # concurrent publishes: one new connection
            if not (self._stale or _gone(self.connection)):
                return self.connection
            self._publish_channel = None
            if deadline is None:
                deadline = anyio.current_time() + RECONNECT_WITHIN
            failures: list[BrokerUnreachable] = []
            with anyio.move_on_after(deadline - anyio.current_time()):
                self.connection = await self.reopen(lambda: self._open("client"), failures.append)
                self._stale = False
                return self.connection
        last = (
            str(failures[-1]).removeprefix(f"{self.name}: ")
            if failures
            else f"RabbitMQ at {redact_url(self.url)} did not answer"
        )
        raise BrokerUnreachable(
            self.name,
            f"lost the connection to RabbitMQ and could not reconnect within "
            f"{RECONNECT_WITHIN:g}s: {last}",
        )

    async def _drop_client(self, conn: Any) -> None:
        """Give up the client connection ``conn`` (lost, or silent): the next use opens
        another. Once only: a concurrent publish may have replaced it already."""
        if conn is None or conn is not self.connection or self._stale:
            return
        self._publish_channel = None
        self._stale = True
        if not conn.is_closed:
            with anyio.move_on_after(1, shield=True), contextlib.suppress(Exception):
                await conn.close()

    async def _channel(self) -> Any:
        return await (await self._client()).channel(publisher_confirms=False)

    # ------------------------------------------------------------ apply

    async def apply(self, channels: Sequence[str] | None = None) -> list[Drift]:
        keys = list(channels) if channels is not None else self.channels()
        # Exchanges first: the queues' bindings and dead-letter routes name them.
        exchanges = [(k, c) for k in keys if isinstance(c := self.topology.channels[k], Exchange)]
        queues = [(k, c) for k in keys if isinstance(c := self.topology.channels[k], Queue)]
        declares = [(k, *_plan.exchange_spec(c, self._names), self._exchange) for k, c in exchanges]
        declares += [(k, *_plan.queue_spec(c, self._names), self._queue) for k, c in queues]
        drift: list[Drift] = []
        ch = await self._channel()
        try:
            for key, spec, args, declare in declares:
                ch, d = await self._declare(ch, key, spec, args, declare)
                drift += d
            for key, q in queues:
                queue = await ch.get_queue(self._names[key], ensure=False)
                for exchange, rk, arguments in _plan.queue_bindings(q, self._names):
                    await queue.bind(exchange, routing_key=rk, arguments=arguments)
        except aiormq_errors.ChannelAccessRefused as exc:
            raise BrokerAuthError(self.name, f"permission denied: {_reason(exc)}") from None
        except amqp_errors.AMQPError as exc:
            raise BrokerError(self.name, f"declaring channels failed: {_reason(exc)}") from None
        finally:
            if not ch.is_closed:
                await ch.close()
        return drift

    async def _exchange(
        self, ch: Any, key: str, spec: dict[str, Any], args: dict[str, Any]
    ) -> None:
        await ch.declare_exchange(
            self._names[key], spec["type"], durable=spec["durable"], arguments=args or None
        )

    async def _queue(self, ch: Any, key: str, spec: dict[str, Any], args: dict[str, Any]) -> None:
        await ch.declare_queue(self._names[key], durable=spec["durable"], arguments=args)

    async def _declare(
        self,
        ch: Any,
        key: str,
        spec: dict[str, Any],
        args: dict[str, Any],
        declare: Callable[[Any, str, dict[str, Any], dict[str, Any]], Awaitable[None]],
    ) -> tuple[Any, list[Drift]]:
        """Declare channel ``key`` by ``declare(ch, key, spec, args)``; its drift, every setting.

        RabbitMQ names only the first setting that differs, and closes the channel.
        To find the next, declare again with that setting as the broker has it:
        declaring what already exists, as it exists, changes nothing.
        """
        spec, args = dict(spec), dict(args)
        drift: list[Drift] = []
        for _ in range(PROBES):
            try:
                await declare(ch, key, spec, args)
                return ch, drift
            except amqp_errors.ChannelPreconditionFailed as exc:
                ch = await self._channel()  # the broker closed the last one
                text = _reason(exc)
                differs = _parse.differing(text, {**args, **spec})
                if differs is None and not drift:
                    # Not a difference from what exists but a declaration the broker
                    # refuses (an invalid argument): nothing to carry on with.
                    await ch.close()
                    kind = type(self.topology.channels[key]).__name__.lower()
                    raise BrokerError(self.name, f"cannot declare {kind} {key!r}: {text}") from None
                if differs is None or any(d.setting == differs[0] for d in drift):
                    return ch, drift  # cannot declare it as the broker has it: this is all
                arg, want, have = differs
                drift.append(Drift(key, arg, want, have))
                if arg in spec:
                    spec[arg] = have
                elif have is None:
                    args.pop(arg, None)
                else:
                    args[arg] = have
        return ch, drift

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
        ch_cfg = self.topology.channels[channel]
        fc_id = new_id()
        hdrs: dict[str, Any] = {**(headers or {}), ID_HEADER: fc_id}
        if isinstance(ch_cfg, Queue):
            rk, destination = self._names[channel], ""  # the default exchange
        else:
            rk, destination = routing_key or "", self._names[channel]
        kind, reason = Kind.PUBLISHED, None
        with producer_span(
            "rabbitmq",
            destination or rk,
            hdrs,
            **{"messaging.message.id": fc_id, "messaging.rabbitmq.destination.routing_key": rk},
        ):
            try:
                await self._send(destination, rk, body, hdrs)
            except amqp_errors.DeliveryError as exc:
                reply = getattr(getattr(exc, "message", None), "reply_text", None) or "NO_ROUTE"
                kind, reason = Kind.UNROUTABLE, str(reply)
            except amqp_errors.ChannelNotFoundEntity:
                self._publish_channel = None
                raise BrokerError(
                    self.name, f"exchange {destination!r} does not exist; run apply first"
                ) from None
            except amqp_errors.AMQPError as exc:
                self._publish_channel = None
                raise BrokerError(
                    self.name, f"publish to {channel!r} failed: {_reason(exc)}"
                ) from None
        return self.observe(
            kind,
            channel,
            body=body,
            headers=hdrs,
            properties={"message_id": fc_id},
            routing_key=rk,
            reason=reason,
        )

    async def _send(self, exchange: str, rk: str, body: bytes, hdrs: dict[str, Any]) -> None:
        """Publish to ``exchange`` ("": the default one) and wait for the broker's confirm.

        A connection lost meanwhile is reopened and the message sent again, as it was
        (the same x-flowcheck-id and message_id), with RESENT_HEADER added to ``hdrs``:
        its first copy may have reached the broker. A broker away for RECONNECT_WITHIN
        is a BrokerUnreachable.
        """
        deadline: float | None = None  # for the broker to come back, from the first loss
        resent = 0
        while True:
            sent, conn = False, None
            try:
                conn = await self._client(deadline)
                if self._publish_channel is None or self._publish_channel.is_closed:
                    self._publish_channel = await conn.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                pch = self._publish_channel
                target = (
                    pch.default_exchange
                    if not exchange
                    else await pch.get_exchange(exchange, ensure=False)
                )
                message = aio_pika.Message(
                    body,
                    headers=hdrs,
                    message_id=hdrs[ID_HEADER],
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                sent = True
                await target.publish(
                    message, routing_key=rk, mandatory=True, timeout=CONFIRM_WITHIN
                )
                return
            except _LOST as exc:
                await self._drop_client(conn)
                if deadline is None:
                    deadline = anyio.current_time() + RECONNECT_WITHIN
                elif anyio.current_time() >= deadline:  # back each time, gone each time
                    raise BrokerUnreachable(
                        self.name,
                        f"the connection to RabbitMQ kept failing for {RECONNECT_WITHIN:g}s "
                        f"while publishing: {_reason(exc)}",
                    ) from None
            if sent:
                resent += 1
                hdrs[RESENT_HEADER] = resent

    def echoes(self, channel: str) -> bool:
        # A publish to a queue goes through the default exchange, which no twin can be
        # bound to; only the firehose, when it is on, shows it.
        # An exchange with an alternate hands what its twin misses to the alternate,
        # whose tap this test may not run.
        ch = self.topology.channels[channel]
        return isinstance(ch, Exchange) and ch.alternate is None

    # ------------------------------------------------------------ tap

    async def tap(
        self, channels: Sequence[str], sink: Sink, *, ready: anyio.Event | None = None
    ) -> None:
        _parse.install_lenient()
        _parse.lenient.set(True)  # this task's connections, and aiormq's tasks for them
        started = False

        async def watch(conn: Any, watching: Callable[[], None]) -> str:
            nonlocal started
            closed = anyio.Event()
            conn.close_callbacks.add(lambda *_: closed.set())
            try:
                await self._start_twins(conn, channels, sink)
                conn.pace()
                watching()
                started = True
                if ready is not None:
                    ready.set()
                await closed.wait()
                return "connection to RabbitMQ lost"
            except amqp_errors.AMQPError as exc:
                if not started and isinstance(exc, amqp_errors.ChannelNotFoundEntity):
                    # e.g. an exchange never declared: retrying cannot help
                    raise BrokerError(
                        self.name, f"cannot tap: {_reason(exc)}; run apply first"
                    ) from None
                return f"tap failed: {_reason(exc)}"

        async def close(conn: Any) -> None:
            if not conn.is_closed:
                conn.pace(False)
                await conn.close()

        await self.reconnecting(channels, sink, lambda: self._open("tap"), watch, close)

    async def _start_twins(self, conn: Any, channels: Sequence[str], sink: Sink) -> None:
        ch = await conn.channel(publisher_confirms=False)
        # Consume on aiormq's channel beneath aio-pika: aio-pika would wrap every
        # message in an IncomingMessage and run the callback in a second task, a
        # sixth of the tap's time; the tap only reads. no_ack: the broker pushes
        # without waiting for acks (prefetch does not apply to no_ack consumers).
        amqp = await ch.get_underlay_channel()
        derived = _plan.seen_through_exchanges(self.topology, channels)
        for key in channels:
            bindings = [] if key in derived else _plan.tap_bindings(self.topology, self._names, key)
            if not bindings:  # seen through an exchange's twin, or nothing routes there
                continue
            twin = await ch.declare_queue(exclusive=True, auto_delete=True)
            for exchange, rk, args in bindings:
                await twin.bind(exchange, routing_key=rk, arguments=args)
            await amqp.basic_consume(twin.name, self._on_twin(key, sink, derived), no_ack=True)
        firehose = await ch.declare_queue(exclusive=True, auto_delete=True)
        direct = _plan.straight_queues(self.topology, self._names, channels)
        # The firehose names the queue a publish was for, even when there is none, so
        # the queues must exist for those publishes to have reached them (NOT_FOUND: the
        # tap stops, "run apply first").
        for name in direct:
            await ch.declare_queue(name, passive=True)
        for rk in _plan.firehose_keys(self.topology, self._names, channels):
            await firehose.bind(TRACE_EXCHANGE, routing_key=rk)
        await amqp.basic_consume(firehose.name, self._on_firehose(sink, direct), no_ack=True)
        if not self._firehose_checked:
            self._firehose_checked = True
            await self._check_firehose(ch, amqp, channels, sink)

    async def _check_firehose(
        self, ch: Any, amqp: Any, channels: Sequence[str], sink: Sink
    ) -> None:
        """Say, once, when the topology needs the firehose and it is off for the virtual
        host; the queues only it shows publishes to get a gap for the whole recording."""
        straight, counted = _plan.firehose_needs(self.topology, self._names, channels)
        if not (straight or counted) or await self._firehose_on(ch, amqp):
            return
        vhost = self._vhost_name()
        what = []
        if straight:
            what.append(f"publishes straight to {', '.join(map(repr, straight))}")
        if counted:
            what.append(f"deliveries from {', '.join(map(repr, counted))}")
        log.warning(
            "%s: RabbitMQ's firehose is off for virtual host %r, and only it shows %s: "
            "turn it on (rabbitmqctl trace_on -p %s) before recording",
            self.name,
            vhost,
            " and ".join(what),
            vhost,
        )
        start, _ = now()
        why = (
            f"RabbitMQ's firehose is off for virtual host {vhost!r}: publishes straight to "
            f"this queue, through the default exchange, are not seen (rabbitmqctl trace_on)"
        )
        for key in straight:
            sink(self.gap(key, start, None, why))

    async def _firehose_on(self, ch: Any, amqp: Any) -> bool:
        """Is the firehose on for this virtual host? A publish to a queue that does not
        exist shows there if it is, and changes nothing else."""
        probe = await ch.declare_queue(exclusive=True, auto_delete=True)
        target = f"flowcheck.firehose-probe.{new_id()}"
        seen = anyio.Event()

        async def on_message(msg: DeliveredMessage) -> None:
            keys: Any = (msg.header.properties.headers or {}).get("routing_keys") or []
            if target in (_parse.as_str(k) for k in keys):
                seen.set()

        await probe.bind(TRACE_EXCHANGE, routing_key="publish.")
        tag = (await amqp.basic_consume(probe.name, on_message, no_ack=True)).consumer_tag
        await ch.default_exchange.publish(
            aio_pika.Message(b""), routing_key=target, mandatory=False
        )
        with anyio.move_on_after(FIREHOSE_WITHIN):
            await seen.wait()
        await amqp.basic_cancel(tag)
        await probe.delete(if_unused=False, if_empty=False)
        return seen.is_set()

    def _on_twin(self, key: str, sink: Sink, derived: set[str]) -> Any:
        exchange = isinstance(self.topology.channels[key], Exchange)

        # Routing keys repeat: match them against the bindings once (~2 µs each).
        @functools.lru_cache(maxsize=1024)
        def reached(rk: str) -> tuple[bool, tuple[str, ...]]:
            """(routable, the queues seen through this exchange that the key reaches)."""
            queues = bound_queues(self.topology.channels, key, rk)
            return bool(queues), tuple(q for q in queues if q in derived)

        async def on_message(msg: DeliveredMessage) -> None:
            if not exchange:
                self._observe_copy(key, msg, sink)
                return
            routable, queues = reached(msg.routing_key or "")
            # The twin itself makes every publish routable, so mandatory returns cannot
            # fire while tapping: judge routability by the topology's own bindings.
            self._observe_copy(key, msg, sink, unroutable=not routable)
            for q in queues:
                self._observe_copy(q, msg, sink)

        return on_message

    def _observe_copy(
        self, key: str, msg: DeliveredMessage, sink: Sink, *, unroutable: bool = False
    ) -> None:
        """Report the copy of ``msg`` that reached channel ``key``."""
        reading = _parse.read_copy(
            msg.header.properties,
            msg.routing_key,
            dead_letters=key in self._dead_letter_queues,
            by_physical=self._by_physical,
            past_limit=self._past_limit,
            unroutable=unroutable,
        )
        sink(self._observe(key, msg.body, reading))

    def _on_firehose(self, sink: Sink, direct: Mapping[str, str]) -> Any:
        """Deliveries and unroutable publishes; and publishes straight to the ``direct``
        queues (queue name -> channel), which no twin sees, and dead letters read there."""
        dead = frozenset(direct.values()) & self._dead_letter_queues

        async def on_message(msg: DeliveredMessage) -> None:
            meta: Mapping[str, Any] = msg.header.properties.headers or {}
            read = _parse.read_firehose(
                meta, msg.routing_key or "", self._by_physical, direct, dead
            )
            if read is not None:
                sink(self._observe(read[0], msg.body, read[1]))

        return on_message

    def _observe(self, key: str, body: bytes, r: Reading) -> Observation:
        return self.observe(
            r.kind,
            key,
            body=body,
            headers=r.headers,
            properties=r.properties,
            routing_key=r.routing_key,
            delivery_count=r.delivery_count,
            reason=r.reason,
            origin=r.origin,
        )

    # ------------------------------------------------------------ delete

    async def delete(self, channels: Sequence[str]) -> None:
        ch = await self._channel()
        try:
            for key in channels:
                cfg = self.topology.channels[key]
                if isinstance(cfg, Queue):
                    await ch.queue_delete(self._names[key])
                else:
                    await ch.exchange_delete(self._names[key])
        finally:
            if not ch.is_closed:
                await ch.close()


def _gone(conn: Any) -> bool:
    """Is aio-pika's connection ``conn`` closed? aiormq's beneath it knows first."""
    transport = conn.transport
    return bool(conn.is_closed or transport is None or transport.connection.is_closed)


ADAPTER = RabbitMQAdapter

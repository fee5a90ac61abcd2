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
import contextvars
import functools
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio

from flowcheck._deps import require
from flowcheck.brokers.base import Adapter, Drift, Sink, new_id
from flowcheck.errors import BrokerAuthError, BrokerError, BrokerUnreachable
from flowcheck.observations import ID_HEADER, Kind, Observation
from flowcheck.propagation import producer_span
from flowcheck.redact import redact_url
from flowcheck.topology.model import Exchange, Queue, RabbitMQ
from flowcheck.topology.routing import bound_queues, dead_letter_path

aio_pika = require("aio_pika")
from aio_pika import exceptions as amqp_errors  # noqa: E402 - after the dependency check
from aiormq import exceptions as aiormq_errors  # noqa: E402
from aiormq.abc import DeliveredMessage  # noqa: E402
from pamqp import decode as amqp_decode  # noqa: E402

from flowcheck.brokers._paced import paced_connection  # noqa: E402

TRACE_EXCHANGE = "amq.rabbitmq.trace"
# RabbitMQ's answer to a declare that differs from what exists. A side is "none" (not
# set), 'v' or "the value 'v' of type 't'"; values may hold spaces.
_SIDE = r"(?:(?P<{0}none>none)|the value '(?P<{0}typed>.*?)' of type '(?P<{0}type>[^']+)'|'(?P<{0}plain>.*?)')"
_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?:queue|exchange) '.*?' in vhost '.*?': "
    rf"received {_SIDE.format('want_')} but current is {_SIDE.format('have_')}$"
)
_INT_TYPES = frozenset({"byte", "unsignedbyte", "short", "unsignedshort", "signedint"})
_INT_TYPES |= {"unsignedint", "long", "timestamp"}
PROBES = 16  # declares per channel to find each setting that differs, at most
RECONNECT_MAX = 2.0  # seconds between reconnection attempts, at most
RECONNECT_WITHIN = 30.0  # seconds a publish waits for a lost broker to come back
CONFIRM_WITHIN = 30.0  # seconds a publish waits for the broker's confirm
# Marks a message sent again because its connection was lost before the broker
# confirmed it: the value counts the sends after the first. The copies share their
# x-flowcheck-id and message_id, so the checker takes them for one message.
RESENT_HEADER = "x-flowcheck-resent"
# What a publish raises when its connection is gone: closed by the broker or the network
# (aiormq says "<Connection ...> closed" with a plain RuntimeError, before aio-pika's
# connection knows), or silent (no confirm in time).
_LOST = (ConnectionError, RuntimeError, TimeoutError)


# pamqp fails a whole frame on a value it cannot decode, and aiormq then drops the
# connection: the tap would lose every copy its exclusive twins held. These decode
# such values instead, but only on the tap's own connections: aiormq's tasks for a
# connection inherit the context it was opened in, and the tap marks its own. Any
# other connection in the process (a system under test, in pytest) decodes as before.
_decode_timestamp = amqp_decode.timestamp
_decode_short_str = amqp_decode.short_str
_lenient: contextvars.ContextVar[bool] = contextvars.ContextVar("_lenient", default=False)


def _timestamp(value: bytes) -> tuple[int, Any]:
    """An AMQP timestamp as pamqp decodes it (a datetime), or, on a tap's connection, its
    number when no datetime can hold it: past the year 9999, as a publisher writing
    microseconds sends."""
    try:
        return _decode_timestamp(value)
    except (ValueError, OverflowError, OSError):
        if not _lenient.get():
            raise
        return 8, int.from_bytes(value[:8], "big")


def _short_str(value: bytes) -> tuple[int, str]:
    """A short string (message_id, correlation_id, routing key, ...) as pamqp decodes it,
    or, on a tap's connection, with replacement characters when it is not UTF-8, as a
    Go or C client may send."""
    try:
        return _decode_short_str(value)
    except UnicodeDecodeError:
        if not _lenient.get():
            raise
        length = value[0]
        return length + 1, value[1 : length + 1].decode("utf-8", errors="replace")


amqp_decode.METHODS["timestamp"] = _timestamp
amqp_decode.TABLE_MAPPING[b"T"] = _timestamp
amqp_decode.METHODS["shortstr"] = _short_str


def queue_arguments(q: Queue, physical: Mapping[str, str]) -> dict[str, Any]:
    """The x-arguments that declare ``q`` as the topology describes it."""
    args: dict[str, Any] = {}
    if q.type == "quorum":
        args["x-queue-type"] = "quorum"
    if q.delivery_limit is not None:
        args["x-delivery-limit"] = q.delivery_limit
    if q.ttl is not None:
        args["x-message-ttl"] = int(q.ttl.total_seconds() * 1000)
    if q.max_length is not None:
        args["x-max-length"] = q.max_length
    if q.overflow is not None:
        args["x-overflow"] = q.overflow
    if q.dead_letter is not None:
        args["x-dead-letter-exchange"] = physical.get(
            q.dead_letter.exchange, q.dead_letter.exchange
        )
        if q.dead_letter.key is not None:
            args["x-dead-letter-routing-key"] = q.dead_letter.key
    args.update(q.arguments)
    return args


class RabbitMQAdapter(Adapter):
    kind = "rabbitmq"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        assert isinstance(cfg, RabbitMQ)
        self.url = cfg.url.get_secret_value()
        self.vhost = cfg.vhost
        self.read_interval = cfg.tap_read_interval.total_seconds()
        self.connection: Any = None
        self._publish_channel: Any = None
        self._stale = False  # the client connection was given up, closed or not
        self._reconnecting: anyio.Lock | None = None  # made in the event loop, when needed
        self._by_physical = {self._names[k]: k for k in self._names}
        # Queues that some queue dead-letters into: messages with x-death there are dead letters.
        self._dead_letter_queues = self._dead_letter_targets()

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
        try:
            return await aio_pika.connect(self.url, **kwargs)
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

    async def _reopen(self, purpose: str, failed: Callable[[BrokerUnreachable], None]) -> Any:
        """A new ``purpose`` connection, retried with growing pauses while the broker
        cannot be reached; ``failed`` hears of each failed attempt and may raise."""
        delay = 0.1
        while True:
            try:
                return await self._open(purpose)
            except BrokerUnreachable as exc:
                failed(exc)
                await anyio.sleep(delay)  # back off before the next attempt
                delay = min(delay * 2, RECONNECT_MAX)

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
                self.connection = await self._reopen("client", failures.append)
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
        exchanges = [
            (k, self.topology.channels[k])
            for k in keys
            if isinstance(self.topology.channels[k], Exchange)
        ]
        queues = [
            (k, self.topology.channels[k])
            for k in keys
            if isinstance(self.topology.channels[k], Queue)
        ]
        drift: list[Drift] = []
        ch = await self._channel()
        try:
            for key, ex in exchanges:
                assert isinstance(ex, Exchange)
                args = {}
                if ex.alternate:
                    args["alternate-exchange"] = self._names.get(ex.alternate, ex.alternate)
                spec = {"type": ex.type, "durable": ex.durable}
                ch, d = await self._declare(ch, key, spec, args, self._exchange)
                drift += d
            for key, q in queues:
                assert isinstance(q, Queue)
                spec = {"durable": q.durable or q.type == "quorum"}
                args = queue_arguments(q, self._names)
                ch, d = await self._declare(ch, key, spec, args, self._queue)
                drift += d
            for key, q in queues:
                assert isinstance(q, Queue)
                queue = await ch.get_queue(self._names[key], ensure=False)
                for b in q.bindings:
                    await queue.bind(
                        self._names.get(b.exchange, b.exchange),
                        routing_key=b.key,
                        arguments=dict(b.arguments) or None,
                    )
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
                m = _INEQUIVALENT.search(text)
                arg: str = m["arg"] if m else ""
                if m is None and not drift:
                    # Not a difference from what exists but a declaration the broker
                    # refuses (an invalid argument): nothing to carry on with.
                    await ch.close()
                    kind = type(self.topology.channels[key]).__name__.lower()
                    raise BrokerError(self.name, f"cannot declare {kind} {key!r}: {text}") from None
                if m is None or any(d.setting == arg for d in drift):
                    return ch, drift  # cannot declare it as the broker has it: this is all
                want = spec.get(arg, args.get(arg))
                have = _side(m, "have_", want)
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
                return self.observe(
                    Kind.UNROUTABLE,
                    channel,
                    body=body,
                    headers=hdrs,
                    properties={"message_id": fc_id},
                    routing_key=rk,
                    reason=str(reply),
                )
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
            Kind.PUBLISHED,
            channel,
            body=body,
            headers=hdrs,
            properties={"message_id": fc_id},
            routing_key=rk,
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

    def _dead_letter_targets(self) -> set[str]:
        """Queues that some queue's dead letters reach."""
        return {
            q for key in self.topology.channels for q in dead_letter_path(self.topology, key)[1:]
        }

    def _tap_bindings(self, key: str) -> list[tuple[str, str, dict[str, Any] | None]]:
        """(exchange, routing key, arguments) bindings for the twin of channel ``key``."""
        ch = self.topology.channels[key]
        if isinstance(ch, Queue):
            return [
                (self._names.get(b.exchange, b.exchange), b.key, dict(b.arguments) or None)
                for b in ch.bindings
            ]
        assert isinstance(ch, Exchange)
        name = self._names[key]
        routes = [
            (b.key, dict(b.arguments) or None)
            for q in self.topology.channels.values()
            if isinstance(q, Queue)
            for b in q.bindings
            if b.exchange == key
        ]
        routes += [
            (q.dead_letter.key, None)
            for q in self.topology.channels.values()
            if isinstance(q, Queue)
            and q.dead_letter
            and q.dead_letter.exchange == key
            and q.dead_letter.key
        ]
        if ch.alternate is not None:
            # A twin bound to everything would make every publish routable, and the
            # broker would never hand one to the alternate exchange: bind it only where
            # the topology routes, and let the alternate exchange's own tap see the rest.
            return sorted({(name, k, a) for k, a in routes if a is None}) + [
                (name, k, a) for k, a in routes if a is not None
            ]
        if ch.type == "topic":
            return [(name, "#", None)]
        if ch.type in ("fanout", "headers"):
            return [(name, "", None)]
        # direct: every key the topology routes through this exchange
        return [(name, k, None) for k in sorted({k for k, _ in routes})]

    async def tap(
        self, channels: Sequence[str], sink: Sink, *, ready: anyio.Event | None = None
    ) -> None:
        _lenient.set(True)  # this task's connections, and aiormq's tasks for them
        started = False

        def failed(exc: BrokerUnreachable) -> None:
            if self.down is None:
                raise exc  # cannot start at all: that is the caller's problem
            self.went_down(str(exc))

        try:
            while True:
                conn = await self._reopen("tap", failed)
                closed = anyio.Event()
                conn.close_callbacks.add(lambda *_, ev=closed: ev.set())
                try:
                    await self._start_twins(conn, channels, sink)
                    conn.pace()
                    self.came_back(channels, sink)
                    started = True
                    if ready is not None:
                        ready.set()
                    await closed.wait()
                    reason = "connection to RabbitMQ lost"
                except amqp_errors.AMQPError as exc:
                    if not started and isinstance(exc, amqp_errors.ChannelNotFoundEntity):
                        # e.g. an exchange never declared: retrying cannot help
                        raise BrokerError(
                            self.name, f"cannot tap: {_reason(exc)}; run apply first"
                        ) from None
                    reason = f"tap failed: {_reason(exc)}"
                finally:
                    with anyio.CancelScope(shield=True):
                        if not conn.is_closed:
                            conn.pace(False)
                            await conn.close()
                self.went_down(reason)
        finally:
            self.stopped_down(channels, sink)

    def _seen_through_exchanges(self, channels: Sequence[str]) -> set[str]:
        """The queues among ``channels`` whose copies the twins of their exchanges see.

        A twin of an exchange receives every message the topology routes through it,
        so a queue bound only to tapped topic, direct or fanout exchanges needs no twin
        of its own: which queues a message reached follows from its routing key, as
        the broker decides it. That halves what the broker delivers to the tap, and one
        delivery costs the tap far more than one observation. Headers bindings match on
        headers: such a queue keeps its twin.
        """
        tapped = set(channels)
        out: set[str] = set()
        for key in channels:
            q = self.topology.channels[key]
            if not isinstance(q, Queue) or not q.bindings:
                continue
            if all(
                b.exchange in tapped
                and not b.arguments
                and isinstance(ex := self.topology.channels[b.exchange], Exchange)
                and ex.type in ("topic", "direct", "fanout")
                for b in q.bindings
            ):
                out.add(key)
        return out

    async def _start_twins(self, conn: Any, channels: Sequence[str], sink: Sink) -> None:
        ch = await conn.channel(publisher_confirms=False)
        # Consume on aiormq's channel beneath aio-pika: aio-pika would wrap every
        # message in an IncomingMessage and run the callback in a second task, a
        # sixth of the tap's time; the tap only reads. no_ack: the broker pushes
        # without waiting for acks (prefetch does not apply to no_ack consumers).
        amqp = await ch.get_underlay_channel()
        derived = self._seen_through_exchanges(channels)
        for key in channels:
            bindings = [] if key in derived else self._tap_bindings(key)
            if not bindings:  # seen through an exchange's twin, or nothing routes there
                continue
            twin = await ch.declare_queue(exclusive=True, auto_delete=True)
            for exchange, rk, args in bindings:
                await twin.bind(exchange, routing_key=rk, arguments=args)
            await amqp.basic_consume(twin.name, self._on_twin(key, sink, derived), no_ack=True)
        firehose = await ch.declare_queue(exclusive=True, auto_delete=True)
        for key in channels:
            kind = "deliver" if isinstance(self.topology.channels[key], Queue) else "publish"
            await firehose.bind(TRACE_EXCHANGE, routing_key=f"{kind}.{self._names[key]}")
        # A queue without bindings is published to straight, through the default exchange,
        # which takes none: only the firehose shows those publishes ("publish." is its key).
        direct = {
            self._names[k]: k
            for k in channels
            if isinstance(q := self.topology.channels[k], Queue) and not q.bindings
        }
        if direct:
            # The firehose names the queue a publish was for, even when there is none, so
            # the queues must exist for those publishes to have reached them (NOT_FOUND: the
            # tap stops, "run apply first").
            for name in direct:
                await ch.declare_queue(name, passive=True)
            await firehose.bind(TRACE_EXCHANGE, routing_key="publish.")
        await amqp.basic_consume(firehose.name, self._on_firehose(sink, direct), no_ack=True)

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

    def _past_limit(self, origin: str | None) -> int | None:
        """Deliveries of a message a quorum queue dead-lettered for its delivery limit: the
        broker does so once the message was returned more times than the limit, after
        limit + 1 deliveries. The limit is the topology's, which apply and drift keep
        equal to the broker's."""
        ch = self.topology.channels.get(origin or "")
        if isinstance(ch, Queue) and ch.delivery_limit is not None:
            return ch.delivery_limit + 1
        return None

    def _observe_copy(
        self, key: str, msg: DeliveredMessage, sink: Sink, *, unroutable: bool = False
    ) -> None:
        """Report the copy of ``msg`` that reached channel ``key``."""
        props = msg.header.properties
        headers: Mapping[str, Any] = props.headers or {}
        deaths = headers.get("x-death")
        kind = Kind.ROUTED
        reason = origin = None
        number: int | None = None
        if unroutable:
            kind = Kind.UNROUTABLE
            reason = "no queue of the topology is bound for this routing key"
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
            latest = deaths[0]
            # delivery_count is the number of the delivery an observation stands for.
            # x-death's count counts deaths, not deliveries: back on a work queue after
            # a dead-letter round trip, this is arrival number count + 1.
            number = _int(latest.get("count")) + 1
            if key in self._dead_letter_queues:
                kind = Kind.DEAD_LETTERED
                reason = _str(latest.get("reason"))
                q = _str(latest.get("queue"))
                origin = self._by_physical.get(q or "", q)
                # Failed deliveries before the death, if the broker says; else unknown.
                count = headers.get("x-delivery-count")
                number = _int(count) if count is not None else None
                if number is None and reason == "delivery_limit":
                    number = self._past_limit(origin)
        sink(
            self.observe(
                kind,
                key,
                body=msg.body,
                headers=headers,
                properties=_props(props),
                routing_key=msg.routing_key,
                delivery_count=number,
                reason=reason,
                origin=origin,
            )
        )

    def _on_firehose(self, sink: Sink, direct: Mapping[str, str]) -> Any:
        """Deliveries and unroutable publishes; and publishes straight to the ``direct``
        queues (queue name -> channel), which no twin sees."""

        async def on_message(msg: DeliveredMessage) -> None:
            meta: Mapping[str, Any] = msg.header.properties.headers or {}
            rk = msg.routing_key or ""
            event, _, name = rk.partition(".")
            routing = meta.get("routing_keys") or []
            straight = event == "publish" and not name  # the default exchange's key: a queue
            if straight:
                key = direct.get((_str(routing[0]) if routing else None) or "")
            else:
                key = self._by_physical.get(name)
            if key is None:
                return
            props = meta.get("properties") or {}
            headers = dict(props.get("headers") or {}) if isinstance(props, Mapping) else {}
            number: int | None = None
            reason = None
            if event == "deliver":
                redelivered = bool(meta.get("redelivered"))
                count = headers.get("x-delivery-count")
                kind = (
                    Kind.REDELIVERED
                    if redelivered or (count is not None and _int(count) > 0)
                    else Kind.DELIVERED
                )
                # x-delivery-count counts earlier failed deliveries: this is delivery number
                # count + 1. Without it, a first delivery is number 1; a classic queue's
                # redelivery does not say which number it is.
                if count is not None:
                    number = _int(count) + 1
                elif kind is Kind.DELIVERED:
                    number = 1
            elif event == "publish" and meta.get("routed_queues") == []:
                kind = Kind.UNROUTABLE
                reason = "NO_ROUTE"
            elif straight:
                kind = Kind.ROUTED
            else:
                return  # publishes that were routed are already seen by the twins
            mid = props.get("message_id") if isinstance(props, Mapping) else None
            sink(
                self.observe(
                    kind,
                    key,
                    body=msg.body,
                    headers=headers,
                    properties={"message_id": mid},
                    routing_key=_str(routing[0]) if routing else None,
                    delivery_count=number,
                    reason=reason,
                )
            )

        return on_message

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


def _props(p: Any) -> dict[str, Any]:
    """The AMQP properties correlation rules may read, by their topology names."""
    return {
        "message_id": p.message_id,
        "correlation_id": p.correlation_id,
        "app_id": p.app_id,
        "type": p.message_type,
        "user_id": p.user_id,
        "reply_to": p.reply_to,
    }


def _side(m: re.Match[str], side: str, ours: Any) -> Any:
    """One side of an inequivalent-arg answer as a value: None where it is not set.

    The broker names the type only when the other side is not set; otherwise the
    value is read as the same kind as ``ours``, or, where it reads the same as
    ``ours`` (so differs only in type), as the kind it looks like.
    """
    if m[f"{side}none"]:
        return None
    if m[f"{side}type"] is not None:
        text, kind = m[f"{side}typed"], m[f"{side}type"]
        if kind in _INT_TYPES and re.fullmatch(r"-?\d+", text):
            return int(text)
        if kind == "bool" and text in ("true", "false"):
            return text == "true"
        return text
    text = m[f"{side}plain"]
    if isinstance(ours, bool) or (str(ours).lower() == text and text in ("true", "false")):
        return text == "true" if text in ("true", "false") else text
    if (isinstance(ours, int) or str(ours) == text) and re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


def _reason(exc: BaseException) -> str:
    text = " ".join(str(a) for a in exc.args if a is not None) or type(exc).__name__
    return text.replace("\n", " ")


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _str(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return None if value is None else str(value)


ADAPTER = RabbitMQAdapter

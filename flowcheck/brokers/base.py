"""The interface every broker adapter implements: apply, publish, tap.

Adapters are the only code that imports a broker client. They translate the
client's errors into :mod:`flowcheck.errors` and report what they see as
:class:`~flowcheck.observations.Observation` records through a sink.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar, TypeVar

import anyio

from flowcheck.correlate import Correlator
from flowcheck.errors import BrokerUnreachable
from flowcheck.observations import (
    ID_HEADER,
    TEXT_CAP,
    Kind,
    Observation,
    as_text,
    clean_headers,
    cut_payload,
    fit_text,
    now,
    redaction,
    trace_id_of,
)
from flowcheck.topology.model import TLS, Broker, RabbitMQ, Redis, Topology

Sink = Callable[[Observation], None]
C = TypeVar("C")
B = TypeVar("B", bound=Broker)

RECONNECT_MAX = 2.0  # seconds between reconnection attempts, at most
# An outage shorter than this stays in Adapter.down until this long after it began:
# whoever polls ``down`` (`flowcheck record` says "tap down" from it four times a
# second) sees a connection that was lost and reopened at once, not only the gap.
SHOWN_FOR_NS = 500_000_000


@dataclass(frozen=True, slots=True)
class Drift:
    """A channel on the broker that differs from the topology; None: the setting is not set."""

    channel: str
    setting: str
    want: Any
    have: Any

    def __str__(self) -> str:
        have = "is not set" if self.have is None else f"is {self.have!r}"
        want = "does not set it" if self.want is None else f"says {self.want!r}"
        return f"{self.channel}: {self.setting} {have} on the broker, the topology {want}"


def reach(cfg: RabbitMQ | Redis) -> tuple[str, TLS | None, float]:
    """How a broker named by URL is reached: its URL (the secret revealed), its TLS
    settings and its taps' read interval in seconds."""
    return cfg.url.get_secret_value(), cfg.tls, cfg.tap_read_interval.total_seconds()


class Adapter(abc.ABC):
    """One broker of a topology. Use as an async context manager (connects, closes)."""

    kind: ClassVar[str]

    def __init__(self, name: str, topology: Topology, correlator: Correlator | None = None) -> None:
        self.name = name
        self.topology = topology
        self.config: Broker = topology.brokers[name]
        self.correlator = correlator or Correlator(topology)
        self._key_fns = self.correlator.key_fns
        self._redaction = redaction(topology)  # applied after the keys are read
        # Broker-side name of each of this broker's channels, and back.
        self._names = {k: self.physical(k) for k in self.channels()}
        self._by_physical = {v: k for k, v in self._names.items()}
        # Tells this adapter's connections apart from every other flowcheck's on the broker.
        self.instance = new_id()[:12]
        # While the tap cannot watch: since when (monotonic ns) and why. Gaps come from it.
        self._down: tuple[int, str] | None = None
        self._shown: tuple[int, str] | None = None  # the last outage, for SHOWN_FOR_NS
        self._down_changed: anyio.Event | None = None

    def connection_name(self, purpose: str) -> str:
        """The name this adapter's ``purpose`` connections ("client", "tap") carry on the
        broker: RabbitMQ's connection_name property, Redis's CLIENT SETNAME."""
        return f"flowcheck-{purpose}-{self.instance}"

    def channels(self) -> list[str]:
        """Keys of the topology's channels on this broker."""
        return [k for k, ch in self.topology.channels.items() if ch.broker == self.name]

    def physical(self, channel: str) -> str:
        return self.topology.channel_name(channel)

    def settings(self, kind: type[B]) -> B:
        """This broker's part of the topology, as the ``kind`` it must be."""
        if not isinstance(self.config, kind):
            raise TypeError(f"{self.name} is a {type(self.config).__name__}, not a {kind.__name__}")
        return self.config

    def dead_letter_origins(self) -> dict[str, str]:
        """Channel that holds dead letters -> the channel whose dead letters it holds, for
        brokers whose dead letters a channel of the topology names (Kafka, Redis)."""
        return {
            dead: key
            for key, ch in self.topology.channels.items()
            if (dead := getattr(ch, "dead_letter", None)) and isinstance(dead, str)
        }

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def apply(self, channels: Sequence[str] | None = None) -> list[Drift]:
        """Declare ``channels`` (default: all of this broker's) idempotently; report drift."""

    @abc.abstractmethod
    async def publish(
        self,
        channel: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        key: str | None = None,
        routing_key: str | None = None,
    ) -> Observation:
        """Send one message; returns its PUBLISHED observation (or UNROUTABLE on RabbitMQ)."""

    @abc.abstractmethod
    async def tap(
        self, channels: Sequence[str], sink: Sink, *, ready: anyio.Event | None = None
    ) -> None:
        """Observe ``channels`` passively until cancelled; set ``ready`` once watching."""

    def echoes(self, channel: str) -> bool:
        """Does a tap on ``channel`` see what :meth:`publish` sends to it?"""
        return True

    @abc.abstractmethod
    async def delete(self, channels: Sequence[str]) -> None:
        """Remove ``channels`` from the broker (tests and clean-up)."""

    async def __aenter__(self) -> Adapter:
        await self.connect()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------ outages

    @property
    def down(self) -> tuple[int, str] | None:
        """While the tap cannot watch: (since, monotonic ns; why). An outage shorter than
        SHOWN_FOR_NS is still shown until that long after it began: the tap watches again
        already, and its gap is recorded with its true end."""
        if self._down is None and self._shown is not None:
            if now()[0] - self._shown[0] < SHOWN_FOR_NS:
                return self._shown
            self._shown = None
        return self._down

    async def down_changed(self) -> None:
        """Return when the tap next goes down or comes back."""
        if self._down_changed is None:
            self._down_changed = anyio.Event()
        await self._down_changed.wait()

    def _set_down(self, value: tuple[int, str] | None) -> None:
        self._shown = self._down if value is None else None
        self._down = value
        changed, self._down_changed = self._down_changed, None
        if changed is not None:
            changed.set()

    def went_down(self, reason: str) -> None:
        """The tap stopped watching; while it stays down, the newest reason replaces the last."""
        self._set_down((self._down[0] if self._down else now()[0], reason))

    @property
    def watching(self) -> bool:
        """Is the tap watching now (whatever :attr:`down` still shows)?"""
        return self._down is None

    def came_back(self, channels: Sequence[str], sink: Sink) -> bool:
        """The tap watches again: record the gap on each of ``channels``. Was it down?"""
        if self._down is None:
            return False
        (since, reason), (end, _) = self._down, now()
        for key in channels:
            sink(self.gap(key, since, end, reason))
        self._set_down(None)
        return True

    def stopped_down(self, channels: Sequence[str], sink: Sink) -> None:
        """The tap ends while down: its gap runs to the end of the recording."""
        if self._down is not None:
            since, reason = self._down
            for key in channels:
                sink(self.gap(key, since, None, reason))
            self._set_down(None)
        self._shown = None

    @staticmethod
    async def reopen(
        open_: Callable[[], Awaitable[C]], failed: Callable[[BrokerUnreachable], None]
    ) -> C:
        """``open_()``, retried with growing pauses while the broker cannot be reached;
        ``failed`` hears of each failed attempt and may raise."""
        delay = 0.1
        while True:
            try:
                return await open_()
            except BrokerUnreachable as exc:
                failed(exc)
                await anyio.sleep(delay)  # back off before the next attempt
                delay = min(delay * 2, RECONNECT_MAX)

    async def reconnecting(
        self,
        channels: Sequence[str],
        sink: Sink,
        open_: Callable[[], Awaitable[C]],
        watch: Callable[[C, Callable[[], None]], Awaitable[str]],
        close: Callable[[C], Awaitable[None]],
    ) -> None:
        """A tap's life, the same on every broker that pushes to a connection: open one
        (while the broker cannot be reached, retry; the first attempt must succeed),
        ``watch(conn, watching)`` through it until it is lost (it calls ``watching()``
        once it watches, and returns why it stopped), close it, record the outage.
        Until cancelled; a tap that ends while down records its gap to the end."""

        def failed(exc: BrokerUnreachable) -> None:
            if self._down is None:
                raise exc  # cannot start at all: that is the caller's problem
            self.went_down(str(exc))

        def watching() -> None:
            self.came_back(channels, sink)

        try:
            while True:
                conn = await self.reopen(open_, failed)
                try:
                    reason = await watch(conn, watching)
                finally:
                    with anyio.CancelScope(shield=True):
                        await close(conn)
                self.went_down(reason)
        finally:
            self.stopped_down(channels, sink)

    # ------------------------------------------------------------ helpers for subclasses

    def gap(self, channel: str, start: int, end: int | None, reason: str) -> Observation:
        """A GAP: the tap did not watch ``channel`` from ``start`` to ``end`` (monotonic ns;
        None: to the end of the recording)."""
        mono, wall = now()
        return Observation(
            kind=Kind.GAP,
            broker=self.name,
            channel=channel,
            mono_ns=start,
            wall=wall - (mono - start) / 1e9,
            until_ns=end,
            reason=reason,
        )

    def observe(
        self,
        kind: Kind,
        channel: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, Any] | None = None,
        properties: Mapping[str, Any] | None = None,
        kafka_key: str | None = None,
        at: tuple[int, float] | None = None,
        broker_ms: int | None = None,
        routing_key: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
        entry_id: str | None = None,
        group: str | None = None,
        delivery_count: int | None = None,
        reason: str | None = None,
        origin: str | None = None,
    ) -> Observation:
        """Build an observation, computing identity and correlation keys from the message.

        ``at`` is when it was received (monotonic ns, wall s), default now: a tap
        gives every record of one fetch the fetch's time.

        Taps call this for every message they see: it copies and parses nothing it
        does not need.
        """
        mono, wall = now() if at is None else at
        hdrs: Mapping[str, Any] = headers if headers is not None else _NONE
        props: Mapping[str, Any] = properties if properties is not None else _NONE
        payload: str | None = None
        digest: str | None = None
        size = 0
        if body is not None:
            payload, size, digest = cut_payload(body, self._redaction)
        key_fn = self._key_fns.get(channel)
        # Rules read the whole body: a payload path must still resolve when the
        # observation keeps only the first PAYLOAD_CAP bytes.
        keys = {} if key_fn is None else key_fn(hdrs, payload, props, kafka_key, body)
        tp = hdrs.get("traceparent")
        fc_id = hdrs.get(ID_HEADER)
        mid = props.get("message_id")
        # Positional, in field order: a call with this many keywords costs 4x as much,
        # and this runs for every message a tap sees (tests pin the order).
        # Ids, keys and reasons of other systems' messages may be anything: bounded text.
        return Observation(
            kind,
            self.name,
            channel,
            mono,
            wall,
            broker_ms,
            fc_id
            if fc_id is None or (type(fc_id) is str and len(fc_id) <= TEXT_CAP)
            else _text(fc_id),
            mid if mid is None or (type(mid) is str and len(mid) <= TEXT_CAP) else _text(mid),
            None if tp is None else trace_id_of(as_text(tp)),
            keys,
            routing_key,
            kafka_key if kafka_key is None or len(kafka_key) <= TEXT_CAP else fit_text(kafka_key),
            partition,
            offset,
            entry_id,
            group,
            clean_headers(hdrs, self._redaction) if hdrs else {},
            payload,
            size,
            digest,
            delivery_count,
            reason if reason is None or len(reason) <= TEXT_CAP else fit_text(reason),
            origin if origin is None or len(origin) <= TEXT_CAP else fit_text(origin),
        )


_NONE: Mapping[str, Any] = MappingProxyType({})


def _text(value: Any) -> str | None:
    text = as_text(value)
    return None if text is None else fit_text(text)


def new_id() -> str:
    """A fresh flowcheck message id."""
    return uuid.uuid4().hex

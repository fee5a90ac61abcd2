"""The interface every broker adapter implements: apply, publish, tap.

Adapters are the only code that imports a broker client. They translate the
client's errors into :mod:`flowcheck.errors` and report what they see as
:class:`~flowcheck.observations.Observation` records through a sink.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar

import anyio

from flowcheck.correlate import Correlator
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
from flowcheck.topology.model import Broker, Topology

Sink = Callable[[Observation], None]


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
        # Broker-side name of each of this broker's channels.
        self._names = {k: self.physical(k) for k in self.channels()}
        # Tells this adapter's connections apart from every other flowcheck's on the broker.
        self.instance = new_id()[:12]
        # While the tap cannot watch: since when (monotonic ns) and why. Gaps come from it.
        self.down: tuple[int, str] | None = None
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

    # ------------------------------------------------------------ helpers for subclasses

    async def down_changed(self) -> None:
        """Return when :attr:`down` next changes."""
        if self._down_changed is None:
            self._down_changed = anyio.Event()
        await self._down_changed.wait()

    def _set_down(self, value: tuple[int, str] | None) -> None:
        self.down = value
        changed, self._down_changed = self._down_changed, None
        if changed is not None:
            changed.set()

    def went_down(self, reason: str) -> None:
        """The tap stopped watching; while it stays down, the newest reason replaces the last."""
        self._set_down((self.down[0] if self.down else now()[0], reason))

    def came_back(self, channels: Sequence[str], sink: Sink) -> None:
        """The tap watches again: record the gap on each of ``channels``."""
        if self.down is not None:
            (since, reason), (end, _) = self.down, now()
            for key in channels:
                sink(self.gap(key, since, end, reason))
            self._set_down(None)

    def stopped_down(self, channels: Sequence[str], sink: Sink) -> None:
        """The tap ends while down: its gap runs to the end of the recording."""
        if self.down is not None:
            since, reason = self.down
            for key in channels:
                sink(self.gap(key, since, None, reason))
            self._set_down(None)

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

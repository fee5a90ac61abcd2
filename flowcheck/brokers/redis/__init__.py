"""Redis Streams adapter (redis.asyncio): declare groups, XADD, tap without a group.

The tap reads with plain ``XREAD`` (no group), so it takes nothing from the
system's consumer groups, and polls each group's Pending Entries List for
deliveries, redeliveries (delivery count above 1) and acknowledgements.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio

from flowcheck import tls
from flowcheck._deps import require
from flowcheck.brokers.base import Adapter, Drift, Sink, new_id, reach
from flowcheck.errors import BrokerAuthError, BrokerError, BrokerUnreachable
from flowcheck.observations import ID_HEADER, Kind, Observation, now
from flowcheck.propagation import producer_span
from flowcheck.redact import redact_url
from flowcheck.topology.model import Redis, Stream

redis_asyncio = require("redis.asyncio")
from redis import exceptions as redis_errors  # noqa: E402 - after the dependency check

from flowcheck.brokers.redis._parse import (  # noqa: E402
    deleted,
    entry_ms,
    field,
    id_key,
    not_streams,
    pending_evidence,
    read_entry,
    trimmed_unread,
)
from flowcheck.brokers.redis._parse import text as _s  # noqa: E402
from flowcheck.brokers.redis._plan import REPLY_OPTIONS, own_options, pause  # noqa: E402

log = logging.getLogger(__name__)

BLOCK_MS = 500  # XREAD block time: bounds how long a stop waits
BATCH = 1000
PEL_POLL = 0.1  # seconds between Pending Entries List polls
IDLE_POLL = 1.0  # between polls while no entry the tap read waits for a group
COUNT_EVERY = 1.0  # seconds between counts of entries deleted before the tap read them
_LOST = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)  # the tap reconnects

__all__ = [
    "ADAPTER",
    "REPLY_OPTIONS",
    "RedisAdapter",
    "entry_ms",
    "id_key",
    "own_options",
    "pause",
]


class RedisAdapter(Adapter):
    kind = "redis"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.settings(Redis)
        self.url, self.tls, self.read_interval = reach(cfg)
        self.db = cfg.db
        self.client: Any = None
        self._origin = self.dead_letter_origins()

    def _stream(self, key: str) -> Stream:
        ch = self.topology.channels[key]
        assert isinstance(ch, Stream)
        return ch

    # ------------------------------------------------------------ connection

    def _client(self, purpose: str) -> Any:
        kwargs: dict[str, Any] = {
            "socket_connect_timeout": 5,
            "socket_timeout": 10 + BLOCK_MS / 1000,
            "client_name": self.connection_name(purpose),
        }
        if self.db is not None:
            kwargs["db"] = self.db
        # Replies as flowcheck reads them, whatever the URL asks for: RESP2 (RESP3
        # turns XREAD's reply into a map; every Redis-compatible server speaks RESP2,
        # and redis-py parses stream entries ~6% faster in it) and bytes (decoded
        # replies fail on a body that is not UTF-8, which the tap must still see).
        try:
            client = redis_asyncio.from_url(
                own_options(self.url), protocol=2, decode_responses=False, **kwargs
            )
        except ValueError as exc:  # an option of the URL redis-py cannot read
            raise BrokerError(self.name, f"Redis URL {redact_url(self.url)}: {exc}") from None
        if self.tls is not None and urlsplit(self.url).scheme == "rediss":
            # Set on the pool: the URL's choice of connection class wins over an argument.
            client.connection_pool.connection_class = _tls_connection(self._tls_context())
        return client

    async def _open(self, purpose: str) -> Any:
        client = self._client(purpose)
        try:
            await client.ping()
        except BaseException as exc:
            await client.aclose()
            raise self._translate(exc, opening=True) from None
        return client

    def _tls_context(self) -> ssl.SSLContext:
        try:
            return tls.context(self.tls)
        except tls.TLSFileError as exc:
            raise BrokerError(self.name, f"tls.{exc.key}: {exc}") from None

    def _translate(self, exc: BaseException, *, opening: bool = False) -> BaseException:
        where = f"Redis at {redact_url(self.url)}"
        if urlsplit(self.url).scheme == "rediss" and (
            why := tls.explain(exc, self.tls, urlsplit(self.url).hostname, opening=opening)
        ):
            return BrokerUnreachable(self.name, f"{where}: {why}")
        if isinstance(exc, redis_errors.TimeoutError) and urlsplit(self.url).scheme == "rediss":
            return BrokerUnreachable(
                self.name, f"cannot reach {where} ({exc}; no TLS answer: is it a TLS port?)"
            )
        if isinstance(exc, (redis_errors.AuthenticationError, redis_errors.AuthorizationError)):
            return BrokerAuthError(self.name, f"{where} refused the login ({exc})")
        if isinstance(exc, redis_errors.ResponseError) and any(
            s in str(exc) for s in ("NOAUTH", "WRONGPASS", "NOPERM")
        ):
            return BrokerAuthError(self.name, f"{where}: {exc}")
        if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)):
            return BrokerUnreachable(self.name, f"cannot reach {where} ({exc})")
        if isinstance(exc, redis_errors.RedisError):
            return BrokerError(self.name, f"{where}: {exc}")
        return exc

    async def connect(self) -> None:
        self.client = await self._open("client")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # ------------------------------------------------------------ apply

    async def apply(self, channels: Sequence[str] | None = None) -> list[Drift]:
        keys = list(channels) if channels is not None else self.channels()
        drift: list[Drift] = []
        try:
            for key in keys:
                name = self._names[key]
                kind = await self.client.type(name)
                kind = kind.decode() if isinstance(kind, bytes) else str(kind)
                if kind not in ("none", "stream"):
                    drift.append(Drift(key, "type", "stream", kind))
                    continue
                for group in self._stream(key).groups:
                    try:
                        await self.client.xgroup_create(name, group, id="$", mkstream=True)
                    except redis_errors.ResponseError as exc:
                        if "BUSYGROUP" not in str(exc):
                            raise
        except redis_errors.RedisError as exc:
            raise self._translate(exc) from None
        return drift

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
        stream = self._stream(channel)
        fc_id = new_id()
        hdrs: dict[str, Any] = {**(headers or {}), ID_HEADER: fc_id}
        with producer_span("redis", self._names[channel], hdrs, **{"messaging.message.id": fc_id}):
            fields = {**{k: str(v) for k, v in hdrs.items()}, stream.payload_field: body}
            try:
                raw = await self.client.xadd(self._names[channel], fields, maxlen=stream.max_length)
            except redis_errors.RedisError as exc:
                raise self._translate(exc) from None
        entry_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        return self.observe(
            Kind.PUBLISHED,
            channel,
            body=body,
            headers=hdrs,
            entry_id=entry_id,
            broker_ms=entry_ms(entry_id),
        )

    # ------------------------------------------------------------ tap

    async def tap(
        self, channels: Sequence[str], sink: Sink, *, ready: anyio.Event | None = None
    ) -> None:
        state = _TapState(channels={k: self._names[k] for k in channels})
        started = False

        async def watch(client: Any, watching: Callable[[], None]) -> str:
            nonlocal started
            try:
                if not started:
                    if wrong := await state.start(client):
                        raise BrokerError(self.name, not_streams(wrong))
                    started = True
                watching()
                if ready is not None:
                    ready.set()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._read, client, state, sink)
                    tg.start_soon(self._poll_pending, client, state, sink)
            except _LOST as exc:
                return f"connection to Redis lost ({exc})"
            except BaseExceptionGroup as group:
                lost = group.subgroup(_LOST)
                if lost is None or group.subgroup(
                    lambda e: not isinstance(e, (*_LOST, BaseExceptionGroup))
                ):
                    raise
                return f"connection to Redis lost ({lost.exceptions[0]})"
            return "the tap stopped reading"

        async def close(client: Any) -> None:
            await client.aclose()

        await self.reconnecting(channels, sink, lambda: self._open("tap"), watch, close)

    async def _read(self, client: Any, state: _TapState, sink: Sink) -> None:
        by_name = {v: k for k, v in state.channels.items()}
        # A connection of its own, used directly: the client would hand each command
        # a pooled connection, and the pool silently replaces one the server closed
        # while it was idle, which would hide from the tap that it was cut off.
        pool = client.connection_pool
        conn = await pool.get_connection()
        try:
            while True:
                started = time.monotonic()  # the clock anyio.sleep uses, at a tenth the cost
                names = list(state.last)
                ids = [state.last[n] for n in names]
                infos: list[Any] | None = None
                if state.counted and started >= state.next_count:
                    # Once a second, atomically, a read that does not wait and each stream's
                    # count of entries ever added: after a read that took all there was,
                    # added - read = what was deleted before the tap could read it.
                    reply, *infos = await self._read_counting(conn, names, ids)
                else:
                    await conn.send_command(
                        "XREAD", "COUNT", BATCH, "BLOCK", BLOCK_MS, "STREAMS", *names, *ids
                    )
                    try:
                        reply = await conn.read_response()
                    except redis_errors.ResponseError as exc:  # e.g. a key replaced by a string
                        raise self._translate(exc) from None
                got = dict.fromkeys(names, 0)
                most = 0  # the most entries one stream gave: BATCH means more are waiting
                for raw_name, entries in reply or ():
                    most = max(most, len(entries))
                    if not entries:
                        continue
                    name = _s(raw_name)
                    got[name] = len(entries)
                    state.read[name] = state.read.get(name, 0) + len(entries)
                    key = by_name[name]
                    stream = self._stream(key)
                    groups = stream.groups
                    at = now()  # one time per reply: its entries arrived together
                    for raw_id, flat in entries:
                        entry_id = _s(raw_id)
                        obs = self._entry(key, entry_id, flat, stream.payload_field, at)
                        sink(obs)
                        if groups:
                            # Kept only for the groups' evidence about the entry, which
                            # drops it once every group has acknowledged it.
                            state.identity[entry_id] = {
                                "fc_id": obs.fc_id,
                                "keys": obs.keys,
                                "trace_id": obs.trace_id,
                            }
                            for group in groups:
                                state.unacked.setdefault((key, group), {}).setdefault(entry_id, 0)
                    if groups:
                        state.arrived.set()
                    # Once a batch: the PEL poll never runs in the middle of one.
                    state.last[name] = entry_id
                if infos is not None:
                    self._count_deleted(state, by_name, names, got, infos, sink)
                if 0 < most < BATCH:
                    await anyio.sleep(pause(started, time.monotonic(), self.read_interval))
        finally:
            with anyio.CancelScope(shield=True):
                await pool.release(conn)

    async def _read_counting(self, conn: Any, names: list[str], ids: list[str]) -> list[Any]:
        """[XREAD's reply, then each stream's XINFO STREAM reply], read in one transaction."""
        commands: list[tuple[Any, ...]] = [
            ("MULTI",),
            ("XREAD", "COUNT", BATCH, "STREAMS", *names, *ids),
            *(("XINFO", "STREAM", n) for n in names),
            ("EXEC",),
        ]
        await conn.send_packed_command(conn.pack_commands(commands))
        try:
            for _ in commands[:-1]:
                await conn.read_response()  # OK, then QUEUED for each command
            replies = await conn.read_response()
        except redis_errors.ResponseError as exc:
            raise self._translate(exc) from None
        if isinstance(replies[0], redis_errors.ResponseError):  # e.g. a key replaced by a string
            raise self._translate(replies[0])
        return list(replies)

    def _count_deleted(
        self,
        state: _TapState,
        by_name: Mapping[str, str],
        names: list[str],
        got: Mapping[str, int],
        infos: list[Any],
        sink: Sink,
    ) -> None:
        """Mark a gap where entries were deleted (trimmed by MAXLEN or MINID, or XDEL)
        before the tap read them: the checker must not count them lost."""
        mono = now()[0]
        for name, info in zip(names, infos, strict=True):
            if got[name] >= BATCH or isinstance(info, redis_errors.ResponseError):
                continue  # more entries wait, or no stream yet: the count would be early
            added = field(info, "entries-added")
            if added is None or name not in state.added:
                continue
            missed = deleted(added, state.added[name], state.read.get(name, 0))
            if missed > state.missed.get(name, 0):
                since = state.counted_at.get(name, state.started_ns)
                new = missed - state.missed.get(name, 0)
                reason = (
                    f"{new} {'entry' if new == 1 else 'entries'} of stream {name!r} were"
                    " deleted (trimmed, or XDEL) before the tap could read them"
                )
                log.warning("%s: %s", self.name, reason)  # `flowcheck record` prints it
                sink(self.gap(by_name[name], since, mono, reason))
                state.missed[name] = missed
            state.counted_at[name] = mono
        state.next_count = time.monotonic() + COUNT_EVERY

    def _entry(
        self,
        key: str,
        entry_id: str,
        fields: Sequence[Any],
        payload_field: str,
        at: tuple[int, float] | None = None,
    ) -> Observation:
        """The observation of an entry; ``fields`` as Redis gives them: name, value, ..."""
        body, headers, kind, count, origin, reason = read_entry(
            fields, payload_field, self._origin.get(key)
        )
        return self.observe(
            kind,
            key,
            body=body,
            headers=headers,
            at=at,
            entry_id=entry_id,
            broker_ms=entry_ms(entry_id),
            delivery_count=count,
            origin=origin,
            reason=reason,
        )

    async def _poll_pending(self, client: Any, state: _TapState, sink: Sink) -> None:
        groups = [(k, g) for k in state.channels for g in self._stream(k).groups]
        if not groups:
            return
        while True:
            # Before the poll, so that an entry read while it runs cuts the next wait short.
            arrived = state.arrived = anyio.Event()
            # Every group's info and first page of pending entries in one round trip:
            # a command costs the tap (and Redis) several times what its reply does.
            pipe = client.pipeline(transaction=False)
            # What the tap had read before the poll asks: only those entries existed when
            # the stream's first entry was read (the reader goes on meanwhile).
            read_before = dict(state.last)
            for key, group in groups:
                name = state.channels[key]
                # The stream's first entry before the group's info: an entry below it that
                # the group had not read by the later info was trimmed before it could.
                pipe.xrange(name, "-", "+", count=1)
                pipe.xinfo_groups(name)
                pipe.xpending_range(name, group, min="-", max="+", count=BATCH)
            replies = await pipe.execute(raise_on_error=False)
            for i, (key, group) in enumerate(groups):
                first, infos, rows = replies[3 * i : 3 * i + 3]
                if any(isinstance(r, redis_errors.ResponseError) for r in (first, infos, rows)):
                    continue  # the stream, or the group, does not exist yet
                oldest = _s(first[0][0]) if first else None
                known = read_before.get(state.channels[key], "0-0")
                await self._poll_group(client, state, sink, key, group, infos, rows, oldest, known)
            polled = time.monotonic()
            if not any(state.unacked.get(g) for g in groups):
                # Every entry read is acknowledged: until the tap reads another, no group
                # delivers or acknowledges one (short of XGROUP SETID), so an idle tap
                # need not ask ten times a second.
                with anyio.move_on_after(IDLE_POLL):
                    await arrived.wait()
            # Never more often than every PEL_POLL, however often entries come.
            await anyio.sleep(max(0.0, polled + PEL_POLL - time.monotonic()))

    async def _poll_group(
        self,
        client: Any,
        state: _TapState,
        sink: Sink,
        key: str,
        group: str,
        infos: list[dict[Any, Any]],
        rows: list[dict[str, Any]],
        oldest: str | None,
        read_before: str,
    ) -> None:
        name = state.channels[key]
        info = next((i for i in infos if _s(i.get("name")) == group), None)
        if info is None:
            return
        pending: dict[str, tuple[int, str]] = {}
        while True:
            for row in rows:
                eid = _s(row["message_id"])
                pending[eid] = (int(row["times_delivered"]), _s(row["consumer"]))
            if len(rows) < BATCH:
                break
            ms, seq = id_key(_s(rows[-1]["message_id"]))
            rows = await client.xpending_range(
                name, group, min=f"{ms}-{seq + 1}", max="+", count=BATCH
            )
        seen = state.unacked.setdefault((key, group), {})
        last_delivered = _s(info.get("last-delivered-id")) or "0-0"
        gone = trimmed_unread(seen, last_delivered, oldest, read_before)
        for eid in gone:
            del seen[eid]
            why = f"trimmed from stream {name!r} before group {group!r} read it"
            sink(self._evidence(state, Kind.TRIMMED, key, eid, group, reason=why))
        events, acked = pending_evidence(pending, seen, state.last.get(name, "0-0"), last_delivered)
        for kind, eid, count, reason in events:
            sink(self._evidence(state, kind, key, eid, group, delivery_count=count, reason=reason))
        for eid in [*acked, *gone]:
            if not any(eid in other for other in state.unacked.values()):
                state.identity.pop(eid, None)

    def _evidence(
        self, state: _TapState, kind: Kind, key: str, eid: str, group: str, **fields: Any
    ) -> Observation:
        """A delivery or acknowledgement, carrying the identity its entry was read with."""
        mono, wall = now()
        return Observation(
            kind=kind,
            broker=self.name,
            channel=key,
            mono_ns=mono,
            wall=wall,
            entry_id=eid,
            broker_ms=entry_ms(eid),
            group=group,
            **state.identity.get(eid, {}),
            **fields,
        )

    # ------------------------------------------------------------ delete

    async def delete(self, channels: Sequence[str]) -> None:
        try:
            await self.client.delete(*[self._names[k] for k in channels])
        except redis_errors.RedisError as exc:
            raise self._translate(exc) from None


class _TapState:
    """Where the tap is: last id read per stream, entries not yet acknowledged per group."""

    def __init__(self, channels: dict[str, str]) -> None:
        self.channels = channels  # key -> stream name
        self.last: dict[str, str] = {}
        # (channel, group) -> entry id -> deliveries seen so far (0: read, not yet seen pending)
        self.unacked: dict[tuple[str, str], dict[str, int]] = {}
        # entry id -> fc_id, keys, trace_id as read, for the evidence about it
        self.identity: dict[str, dict[str, Any]] = {}
        self.arrived = anyio.Event()  # the tap read entries some group will receive
        # For entries deleted before the tap read them, per stream: entries added before
        # the tap started (Redis 7+ counts them), read since, found deleted so far.
        self.added: dict[str, int] = {}
        self.read: dict[str, int] = {}
        self.missed: dict[str, int] = {}
        self.counted = False  # the server counts added entries
        self.next_count = 0.0  # time.monotonic() of the next count
        self.started_ns = 0
        self.counted_at: dict[str, int] = {}  # monotonic ns of each stream's last count

    async def start(self, client: Any) -> dict[str, str]:
        """Read each stream's last id; return the keys that hold another type (name -> type)."""
        wrong: dict[str, str] = {}
        self.started_ns = now()[0]
        self.counted = True
        for name in self.channels.values():
            kind = _s(await client.type(name))
            if kind == "none":
                self.last[name] = "0-0"  # no such stream yet: everything in it will be new
                self.added[name] = 0
            elif kind != "stream":
                wrong[name] = kind
            else:
                info = await client.xinfo_stream(name)
                self.last[name] = _s(info["last-generated-id"])
                added = info.get("entries-added")
                if added is None:  # before Redis 7: deletions cannot be told from the counts
                    self.counted = False
                else:
                    self.added[name] = int(added)
        return wrong


ADAPTER = RedisAdapter


def _tls_connection(context: ssl.SSLContext) -> type[Any]:
    """redis-py's TLS connection class, using ``context`` instead of building its own
    from ssl_* options (which cannot say which name the certificate must carry)."""

    base: Any = redis_asyncio.SSLConnection

    class TLSConnection(base):  # type: ignore[misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.ssl_context.context = context

    return TLSConnection

"""Redis Streams adapter (redis.asyncio): declare groups, XADD, tap without a group.

The tap reads with plain ``XREAD`` (no group), so it takes nothing from the
system's consumer groups, and polls each group's Pending Entries List for
deliveries, redeliveries (delivery count above 1) and acknowledgements.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio

from flowcheck._deps import require
from flowcheck.brokers.base import Adapter, Drift, Sink, new_id
from flowcheck.errors import BrokerAuthError, BrokerError, BrokerUnreachable
from flowcheck.observations import ID_HEADER, Kind, Observation, now
from flowcheck.propagation import producer_span
from flowcheck.redact import redact_url
from flowcheck.topology.model import Redis, Stream

redis_asyncio = require("redis.asyncio")
from redis import exceptions as redis_errors  # noqa: E402 - after the dependency check

log = logging.getLogger(__name__)

BLOCK_MS = 500  # XREAD block time: bounds how long a stop waits
BATCH = 1000
PEL_POLL = 0.1  # seconds between Pending Entries List polls
IDLE_POLL = 1.0  # between polls while no entry the tap read waits for a group
COUNT_EVERY = 1.0  # seconds between counts of entries deleted before the tap read them
RECONNECT_MAX = 2.0
_LOST = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)  # the tap reconnects
# Fields a dead-letter entry may carry to say why and after how many deliveries.
REASON_FIELDS = ("reason", "error", "exception")
COUNT_FIELDS = ("delivery_count", "deliveries", "attempts")


# URL options that would change the replies flowcheck reads: it sets them itself.
REPLY_OPTIONS = frozenset({"protocol", "decode_responses", "encoding", "encoding_errors"})


def own_options(url: str) -> str:
    """``url`` without REPLY_OPTIONS in its query (redis-py lets the URL's win)."""
    base, _, query = url.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    if all(k not in REPLY_OPTIONS for k, _ in pairs):
        return url
    kept = [(k, v) for k, v in pairs if k not in REPLY_OPTIONS]
    return f"{base}?{urlencode(kept)}" if kept else base


def entry_ms(entry_id: str) -> int:
    """The server's millisecond clock, from an entry id ``<ms>-<seq>``."""
    return int(entry_id.split("-", 1)[0])


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class RedisAdapter(Adapter):
    kind = "redis"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        assert isinstance(cfg, Redis)
        self.url = cfg.url.get_secret_value()
        self.db = cfg.db
        self.read_interval = cfg.tap_read_interval.total_seconds()
        self.client: Any = None
        # dead-letter stream -> the stream whose dead letters it holds
        self._origin = {
            ch.dead_letter: k
            for k, ch in self.topology.channels.items()
            if isinstance(ch, Stream) and ch.dead_letter
        }

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
            return redis_asyncio.from_url(
                own_options(self.url), protocol=2, decode_responses=False, **kwargs
            )
        except ValueError as exc:  # an option of the URL redis-py cannot read
            raise BrokerError(self.name, f"Redis URL {redact_url(self.url)}: {exc}") from None

    async def _open(self, purpose: str) -> Any:
        client = self._client(purpose)
        try:
            await client.ping()
        except BaseException as exc:
            await client.aclose()
            raise self._translate(exc) from None
        return client

    def _translate(self, exc: BaseException) -> BaseException:
        where = f"Redis at {redact_url(self.url)}"
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
        delay = 0.1
        try:
            while True:
                try:
                    client = await self._open("tap")
                except BrokerUnreachable as exc:
                    if not started:
                        raise
                    self.went_down(str(exc))
                    await anyio.sleep(delay)  # back off before reconnecting
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
                delay = 0.1
                reason = "the tap stopped reading"
                try:
                    if not started:
                        if wrong := await state.start(client):
                            raise BrokerError(self.name, _not_streams(wrong))
                        started = True
                    self.came_back(channels, sink)
                    if ready is not None:
                        ready.set()
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._read, client, state, sink)
                        tg.start_soon(self._poll_pending, client, state, sink)
                except _LOST as exc:
                    reason = f"connection to Redis lost ({exc})"
                except BaseExceptionGroup as group:
                    lost = group.subgroup(_LOST)
                    if lost is None or group.subgroup(
                        lambda e: not isinstance(e, (*_LOST, BaseExceptionGroup))
                    ):
                        raise
                    reason = f"connection to Redis lost ({lost.exceptions[0]})"
                finally:
                    with anyio.CancelScope(shield=True):
                        await client.aclose()
                self.went_down(reason)
        finally:
            self.stopped_down(channels, sink)

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
            added = _field(info, "entries-added")
            if added is None or name not in state.added:
                continue
            missed = added - state.added[name] - state.read.get(name, 0)
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
        """The observation of an entry; ``fields`` as Redis gives them: name, value, ...
        (a repeated name: the last value counts)."""
        body: Any = None  # an entry without the payload field has no payload
        headers: dict[str, str] = {}
        pairs = iter(fields)
        # Decoded inline, pairs taken straight from the reply: this runs for every entry.
        for k, v in zip(pairs, pairs, strict=True):
            name = k.decode("utf-8", errors="replace") if type(k) is bytes else _s(k)
            if name == payload_field:
                body = v
            else:
                headers[name] = v.decode("utf-8", errors="replace") if type(v) is bytes else _s(v)
        if body is not None and type(body) is not bytes:
            body = str(body).encode()
        kind = Kind.ROUTED
        origin = reason = None
        count: int | None = None
        if key in self._origin:
            kind = Kind.DEAD_LETTERED
            origin = self._origin[key]
            reason = next((headers[f] for f in REASON_FIELDS if f in headers), None)
            text = next((headers[f] for f in COUNT_FIELDS if f in headers), None)
            # Other writers' counts: str.isdigit takes "²", int() does not, nor 5000 digits.
            if text is not None and text.isascii() and text.isdigit() and len(text) < 19:
                count = int(text)
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
            for key, group in groups:
                name = state.channels[key]
                pipe.xinfo_groups(name)
                pipe.xpending_range(name, group, min="-", max="+", count=BATCH)
            replies = await pipe.execute(raise_on_error=False)
            for i, (key, group) in enumerate(groups):
                infos, rows = replies[2 * i], replies[2 * i + 1]
                if isinstance(infos, redis_errors.ResponseError) or isinstance(
                    rows, redis_errors.ResponseError
                ):
                    continue  # the stream, or the group, does not exist yet
                await self._poll_group(client, state, sink, key, group, infos, rows)
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
    ) -> None:
        name = state.channels[key]
        info = next((i for i in infos if _s(i.get("name")) == group), None)
        if info is None:
            return
        last_delivered = id_key(_s(info.get("last-delivered-id")) or "0-0")
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
        read_up_to = id_key(state.last.get(name, "0-0"))
        for eid, (count, consumer) in pending.items():
            if id_key(eid) > read_up_to:
                # Not read by the tap yet: wait for it, so the evidence carries the
                # entry's identity (fc_id, keys) and is reported once.
                continue
            before = seen.get(eid, 0)
            if count > before:
                kind = Kind.DELIVERED if count == 1 else Kind.REDELIVERED
                sink(
                    self._evidence(
                        state,
                        kind,
                        key,
                        eid,
                        group,
                        delivery_count=count,
                        reason=None if count == 1 else f"consumer {consumer}",
                    )
                )
                seen[eid] = count
        for eid in [e for e in seen if e not in pending and id_key(e) <= last_delivered]:
            if seen[eid] == 0:  # delivered and acknowledged between two polls
                sink(self._evidence(state, Kind.DELIVERED, key, eid, group, delivery_count=1))
            sink(
                self._evidence(
                    state, Kind.CONSUMED, key, eid, group, delivery_count=max(seen[eid], 1)
                )
            )
            del seen[eid]
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


def _field(reply: Any, name: str) -> int | None:
    """An integer field of a raw XINFO STREAM reply (name, value, ... as bytes, which the
    tap's connections always read); None if absent."""
    if not isinstance(reply, list):
        return None
    want = name.encode()
    for i in range(0, len(reply) - 1, 2):
        if reply[i] == want:
            value = reply[i + 1]
            return value if isinstance(value, int) else None
    return None


def _not_streams(wrong: Mapping[str, str]) -> str:
    keys = ", ".join(f"{name!r} holds a {kind}" for name, kind in sorted(wrong.items()))
    return f"cannot tap keys that are not streams: {keys}"


def pause(started: float, now: float, interval: float) -> float:
    """Seconds to wait before the next read, so that reads start ``interval`` apart.

    While entries keep coming, each read would bring one or two, and a read costs
    the tap far more than an entry: waiting gathers them. A read that blocked
    until its entry came started long ago, so a sparse entry is never held back;
    after a full batch the caller reads again at once, so the rate is not capped.
    The price: an entry may be observed up to ``interval`` late.
    """
    return max(0.0, started + interval - now)


def _s(value: Any) -> str:
    if type(value) is bytes:  # what the client returns, unless it was told to decode
        return value.decode("utf-8", errors="replace")
    return value if type(value) is str else str(value)


ADAPTER = RedisAdapter

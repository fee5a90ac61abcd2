"""Redis Streams adapter: group deliveries from the PEL, dead-letter streams, gaps."""

from __future__ import annotations

import contextlib
import itertools
import time
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from flowcheck.brokers.redis import RedisAdapter
from flowcheck.errors import BrokerError
from flowcheck.observations import TEXT_CAP, Kind, Observation, encode
from flowcheck.redact import MASK
from flowcheck.tracer import Memory, Tracer

from .conftest import (
    FLOW,
    REDIS_YAML,
    SECRET,
    WITHIN,
    cleaned,
    ids,
    load,
    of,
    order,
    read_group,
    redis_kit,
    tap_raising,
)

DEAD_LETTER_YAML = """
brokers:
  redis: {{kind: redis, url: "${{FC_URL}}"}}
channels:
  events:
    broker: redis
    kind: stream
    name: "{p}.events"
    groups: [billing]
    delivery_limit: 3
    dead_letter: dead
  dead: {{broker: redis, kind: stream, name: "{p}.dead"}}
services:
  billing: {{consumes: [{{channel: events, group: billing}}]}}
flows:
  orders:
    correlate: $.order_id
    steps: [events]
"""


def evidence(
    items: list[Observation], fc_id: str | None
) -> list[tuple[Kind, int | None, str | None]]:
    """(kind, delivery count, group) of the group evidence about one message, in order."""
    return [
        (o.kind, o.delivery_count, o.group)
        for o in items
        if o.fc_id == fc_id and o.kind in (Kind.DELIVERED, Kind.REDELIVERED, Kind.CONSUMED)
    ]


@pytest.mark.parametrize("claim", ["xclaim", "xautoclaim"])
async def test_claimed_entry_is_redelivered_then_consumed(
    redis_url: str, redis: Redis, unique: str, claim: str
) -> None:
    kit = redis_kit(redis_url, unique)
    stream = f"{unique}.events"
    async with cleaned(kit.topology, "redis") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(kit.topology, [memory]) as tracer:
            sent = await tracer.publish("events", order(1))
            await memory.wait_for(lambda items: sent.fc_id in ids(items, Kind.ROUTED), WITHIN)

            # worker-1 reads it and never acknowledges it.
            [(entry_id, fields)] = await read_group(redis, stream, "billing", "worker-1", count=1)
            assert fields["x-flowcheck-id"] == sent.fc_id
            await memory.wait_for(lambda items: len(evidence(items, sent.fc_id)) == 1, WITHIN)

            # worker-2 takes the stuck entry over: the broker counts a second delivery.
            claimed: Any
            if claim == "xclaim":
                claimed = await redis.xclaim(stream, "billing", "worker-2", 0, [entry_id])
            else:
                _, claimed, _ = await redis.xautoclaim(stream, "billing", "worker-2", 0, "0-0")
            assert [e[0].decode() for e in claimed] == [entry_id]
            await memory.wait_for(lambda items: len(evidence(items, sent.fc_id)) == 2, WITHIN)

            assert await redis.xack(stream, "billing", entry_id) == 1
            await memory.wait_for(lambda items: len(evidence(items, sent.fc_id)) == 3, WITHIN)

    assert evidence(memory.items, sent.fc_id) == [
        (Kind.DELIVERED, 1, "billing"),
        (Kind.REDELIVERED, 2, "billing"),
        (Kind.CONSUMED, 2, "billing"),
    ]
    for obs in memory.items:
        if obs.fc_id == sent.fc_id and obs.kind is not Kind.PUBLISHED:
            assert (obs.channel, obs.entry_id) == ("events", entry_id)
            assert obs.keys == {FLOW: "o-1"}
            assert obs.trace_id == sent.trace_id
    [redelivered] = of(memory.items, Kind.REDELIVERED)
    assert redelivered.reason is not None
    assert "worker-2" in redelivered.reason


async def test_an_idle_tap_polls_the_pending_lists_again_as_soon_as_it_reads_an_entry(
    redis_url: str, redis: Redis, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowcheck.brokers import redis as module

    # Idle, the poll would wait an hour: only reading an entry can bring it back.
    monkeypatch.setattr(module, "IDLE_POLL", 3600.0)
    kit = redis_kit(redis_url, unique)
    stream = f"{unique}.events"
    async with cleaned(kit.topology, "redis") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(kit.topology, [memory]) as tracer:

            async def round_trip(n: int) -> None:
                sent = await tracer.publish("events", order(n))
                await memory.wait_for(lambda items: sent.fc_id in ids(items, Kind.ROUTED), WITHIN)
                [(entry_id, _)] = await read_group(redis, stream, "billing", "w", count=1)
                assert await redis.xack(stream, "billing", entry_id) == 1
                await memory.wait_for(lambda items: len(evidence(items, sent.fc_id)) == 2, WITHIN)
                assert evidence(memory.items, sent.fc_id) == [
                    (Kind.DELIVERED, 1, "billing"),
                    (Kind.CONSUMED, 1, "billing"),
                ]

            await round_trip(1)
            await round_trip(2)  # after the first was acknowledged: the tap was idle again


async def test_entry_moved_to_dead_letter_stream_is_dead_lettered(
    redis_url: str, redis: Redis, unique: str
) -> None:
    topology = load(DEAD_LETTER_YAML.format(p=unique), FC_URL=redis_url)
    stream, dead = f"{unique}.events", f"{unique}.dead"
    async with cleaned(topology, "redis") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]) as tracer:
            sent = await tracer.publish("events", order(7))
            await memory.wait_for(lambda items: sent.fc_id in ids(items, Kind.ROUTED), WITHIN)

            # The consumer gives up, as the usual pattern does: XADD to the dead-letter
            # stream with the entry's fields and why, then XACK the original.
            [(entry_id, fields)] = await read_group(redis, stream, "billing", "worker-1", count=1)
            moved: dict[Any, Any] = {**fields, "reason": "PaymentDeclined", "delivery_count": "3"}
            await redis.xadd(dead, moved)
            await redis.xack(stream, "billing", entry_id)
            await memory.wait_for(
                lambda items: (
                    sent.fc_id in ids(items, Kind.DEAD_LETTERED, "dead")
                    and sent.fc_id in ids(items, Kind.CONSUMED, "events")
                ),
                WITHIN,
            )

    [dead_letter] = of(memory.items, Kind.DEAD_LETTERED)
    assert (dead_letter.channel, dead_letter.origin, dead_letter.reason) == (
        "dead",
        "events",
        "PaymentDeclined",
    )
    assert dead_letter.delivery_count == 3
    assert dead_letter.keys == {FLOW: "o-7"}
    assert dead_letter.trace_id == sent.trace_id
    assert dead_letter.payload == order(7).decode()


async def test_tap_reports_gap_and_loses_nothing_written_during_it(
    redis_url: str, redis: Redis, unique: str
) -> None:
    kit = redis_kit(redis_url, unique)
    stream = f"{unique}.events"
    async with cleaned(kit.topology, "redis") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(kit.topology, [memory]) as tracer:
            tap = tracer.adapters["redis"]
            assert isinstance(tap, RedisAdapter)
            before = await tracer.publish("events", order(1))
            await memory.wait_for(lambda items: before.fc_id in ids(items, Kind.ROUTED), WITHIN)

            # Kill the tap's connections and write entries in one transaction: the
            # entries land while the tap has no connection at all. A consumer of the
            # group reads the first of them at once, so the PEL has it before the tap
            # has read it.
            victims = [
                client["id"]
                for client in await redis.client_list()
                if client["name"] == tap.connection_name("tap")
            ]
            assert victims
            async with redis.pipeline(transaction=True) as pipe:
                for victim in victims:
                    pipe.client_kill_filter(_id=victim)
                for n in range(5):
                    pipe.xadd(stream, {"payload": order(f"gap-{n}")})
                pipe.xreadgroup("billing", "worker-1", {stream: ">"}, count=2)
                replies = await pipe.execute()
            assert replies[: len(victims)] == [1] * len(victims)
            during = [r.decode() for r in replies[len(victims) : len(victims) + 5]]

            def caught_up(items: list[Observation]) -> bool:
                return (
                    bool(of(items, Kind.GAP))
                    and set(during) <= {o.entry_id for o in of(items, Kind.ROUTED)}
                    and during[0] in {o.entry_id for o in of(items, Kind.DELIVERED)}
                )

            await memory.wait_for(caught_up, WITHIN)
            after = await tracer.publish("events", order(2))
            await memory.wait_for(lambda items: after.fc_id in ids(items, Kind.ROUTED), WITHIN)

    [gap] = of(memory.items, Kind.GAP)
    assert gap.channel == "events"
    assert gap.until_ns is not None
    assert gap.reason
    routed = of(memory.items, Kind.ROUTED)
    [first] = [o for o in routed if o.fc_id == before.fc_id]
    assert first.mono_ns < gap.mono_ns <= gap.until_ns
    # Every entry exactly once, in stream order; those written in the gap seen after it.
    assert [o.entry_id for o in routed] == [before.entry_id, *during, after.entry_id]
    for obs in routed:
        if obs.entry_id in during:
            assert obs.mono_ns > gap.until_ns
            assert obs.keys == {FLOW: f"o-gap-{during.index(obs.entry_id)}"}
    # The group's deliveries (the entry from before and the first written in the gap):
    # each once, with the entry's identity.
    delivered = of(memory.items, Kind.DELIVERED)
    assert sorted((o.entry_id, o.group, o.delivery_count) for o in delivered) == [
        (before.entry_id, "billing", 1),
        (during[0], "billing", 1),
    ]
    assert {o.entry_id: o.keys for o in delivered} == {
        before.entry_id: {FLOW: "o-1"},
        during[0]: {FLOW: "o-gap-0"},
    }


async def test_entries_deleted_before_the_tap_read_them_are_a_gap_not_a_loss(
    redis_url: str, redis: Redis, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    text = REDIS_YAML.format(p=unique).replace(
        "kind: redis,", "kind: redis, tap_read_interval: 1s,"
    )
    topology = load(text, FC_URL=redis_url)
    stream = f"{unique}.events"

    async def add(n: int) -> str:
        # As a system that trims its stream exactly to its two newest entries.
        entry = await redis.xadd(stream, {"payload": order(n)}, maxlen=2, approximate=False)
        return entry.decode() if isinstance(entry, bytes) else entry

    def routed(items: list[Observation]) -> list[str | None]:
        return [o.entry_id for o in of(items, Kind.ROUTED)]

    async with cleaned(topology, "redis") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]):
            first = await add(0)
            await memory.wait_for(lambda items: first in routed(items), WITHIN)
            # Read a moment ago, the tap waits (its read interval) before the next read:
            # two of the next four are trimmed away before it reads them.
            before = time.monotonic_ns()
            later = [await add(n) for n in range(1, 5)]
            after = time.monotonic_ns()
            await memory.wait_for(
                lambda items: bool(of(items, Kind.GAP)) and later[-1] in routed(items), WITHIN
            )

    assert routed(memory.items) == [first, *later[2:]]
    [gap] = of(memory.items, Kind.GAP)
    assert gap.channel == "events"
    assert gap.reason == (
        f"2 entries of stream '{stream}' were deleted (trimmed, or XDEL) before the tap could"
        " read them"
    )
    assert gap.until_ns is not None
    assert gap.mono_ns <= before < after <= gap.until_ns
    assert caplog.messages == [f"redis: {gap.reason}"]  # what `flowcheck record` prints


@pytest.mark.parametrize("option", ["protocol=3", "decode_responses=True"])
async def test_reply_options_in_the_url_do_not_change_what_the_tap_reads(
    redis_url: str, unique: str, option: str
) -> None:
    # RESP3 changes the shape of XREAD's reply; decoded replies fail on a body that is
    # not UTF-8. flowcheck sets both itself.
    url = redis_url + ("&" if "?" in redis_url else "?") + option
    kit = redis_kit(url, unique)
    system = redis_kit(redis_url, unique)  # the system's consumer reads as before
    odd_body = b"\xff\xfe not UTF-8"
    async with cleaned(kit.topology, "redis") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(kit.topology, [memory]) as tracer:
            sent = await tracer.publish("events", order(1))
            odd = await tracer.publish("events", odd_body)
            assert await system.consume(1) == [sent.fc_id]
            await memory.wait_for(
                lambda items: (
                    (Kind.CONSUMED, 1, "billing") in evidence(items, sent.fc_id)
                    and odd.fc_id in ids(items, Kind.ROUTED)
                ),
                WITHIN,
            )
    [routed] = [o for o in of(memory.items, Kind.ROUTED) if o.fc_id == sent.fc_id]
    assert routed.keys == {FLOW: "o-1"}
    [seen] = [o for o in of(memory.items, Kind.ROUTED) if o.fc_id == odd.fc_id]
    assert seen.size == len(odd_body)


async def test_a_url_option_redis_cannot_read_is_a_clear_error(redis_url: str, unique: str) -> None:
    url = redis_url + ("&" if "?" in redis_url else "?") + "socket_timeout=soon"
    kit = redis_kit(url, unique)
    with pytest.raises(BrokerError, match="Invalid value for 'socket_timeout'"):
        async with RedisAdapter(kit.broker, kit.topology):
            pass


async def test_a_key_that_is_not_a_stream_is_a_clear_error(
    redis_url: str, redis: Redis, unique: str
) -> None:
    kit = redis_kit(redis_url, unique)
    await redis.set(f"{unique}.events", "not a stream")
    try:
        with pytest.raises(BrokerError, match=rf"'{unique}.events' holds a string"):
            await tap_raising(kit.topology)
    finally:
        await redis.delete(f"{unique}.events")


async def test_a_stream_replaced_by_another_type_while_tapped_is_a_clear_error(
    redis_url: str, redis: Redis, unique: str
) -> None:
    kit = redis_kit(redis_url, unique)
    stream = f"{unique}.events"

    async def replace_and_wait() -> None:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.delete(stream)
            pipe.set(stream, "not a stream")
            await pipe.execute()
        await anyio.Event().wait()  # until the tap fails

    try:
        with pytest.raises(BrokerError, match="WRONGTYPE"), anyio.fail_after(WITHIN):
            await tap_raising(kit.topology, replace_and_wait)
    finally:
        await redis.delete(stream)


class _Done(Exception):
    pass


class _Scripted:
    """A connection that answers XREAD from a script, then stops the tap."""

    def __init__(self, stream: bytes, batches: list[int]) -> None:
        self.replies: list[Any] = [
            [[stream, [[f"1-{i}".encode(), [b"payload", b"{}"]] for i in range(n)]]] if n else None
            for n in batches
        ]
        self.connection_pool = self
        self.released = False

    async def get_connection(self) -> _Scripted:
        return self

    async def release(self, conn: _Scripted) -> None:
        self.released = True

    async def send_command(self, *args: Any) -> None:
        assert args[0] == "XREAD"

    async def read_response(self) -> Any:
        if not self.replies:
            raise _Done
        return self.replies.pop(0)


async def test_the_tap_waits_between_reads_only_after_a_batch_that_was_not_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flowcheck.brokers import redis as module

    text = REDIS_YAML.format(p="t").replace(
        "kind: redis,", "kind: redis, tap_read_interval: 250ms,"
    )
    adapter = RedisAdapter("redis", load(text, FC_URL="redis://127.0.0.1:6379"))
    state = module._TapState({"events": "t.events"})
    state.last["t.events"] = "0-0"
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(anyio, "sleep", sleep)  # the tap's pause, and nothing else here
    seen: list[Observation] = []
    conn = _Scripted(b"t.events", [module.BATCH, 3, 0, module.BATCH, 1])
    with pytest.raises(_Done):
        await adapter._read(conn, state, seen.append)
    assert len(seen) == 2 * module.BATCH + 4
    assert conn.released
    # One wait after each short batch (3, then 1), of at most the interval; none after
    # a full batch (the rate is not capped) or an empty reply (the read blocked).
    assert len(waits) == 2
    assert all(0 < w <= 0.25 for w in waits)


class _QuietPipeline:
    """Replies to the PEL poll: the stream is empty, the group exists, nothing is pending."""

    def __init__(self, polls: list[float]) -> None:
        self.polls = polls

    def xrange(self, name: str, *_: Any, **__: Any) -> None:
        pass

    def xinfo_groups(self, name: str) -> None:
        pass

    def xpending_range(self, name: str, group: str, **_: Any) -> None:
        pass

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.polls.append(time.monotonic())
        if len(self.polls) > 5:
            raise _Done
        return [[], [{"name": b"billing", "last-delivered-id": b"0-0", "pending": 0}], []]


async def test_entries_coming_all_the_time_do_not_make_the_pel_poll_run_more_often(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flowcheck.brokers import redis as module

    monkeypatch.setattr(module, "PEL_POLL", 0.05)
    adapter = RedisAdapter("redis", load(REDIS_YAML.format(p="t"), FC_URL="redis://127.0.0.1:6379"))
    state = module._TapState({"events": "t.events"})
    state.last["t.events"] = "0-0"
    polls: list[float] = []

    class Client:
        def pipeline(self, transaction: bool) -> _QuietPipeline:
            return _QuietPipeline(polls)

    async def reader() -> None:  # the tap reading entries every millisecond
        while True:
            state.arrived.set()
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        with contextlib.suppress(_Done):  # the sixth poll
            await adapter._poll_pending(Client(), state, lambda obs: None)
        tg.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    assert len(gaps) == 5
    assert min(gaps) >= 0.05


def test_pause_holds_back_only_reads_that_come_sooner_than_the_interval() -> None:
    from flowcheck.brokers.redis import pause

    assert pause(started=10.0, now=10.004, interval=0.01) == pytest.approx(0.006)
    assert pause(started=10.0, now=12.0, interval=0.01) == 0.0  # the read blocked: no wait


GROUPS_YAML = """
brokers:
  redis: {{kind: redis, url: "${{FC_URL}}"}}
channels:
  events: {{broker: redis, kind: stream, name: "{p}.events", groups: [billing, shipping]}}
  jobs: {{broker: redis, kind: stream, name: "{p}.jobs", groups: [billing]}}
"""


async def test_a_key_that_is_not_a_stream_drifts_untouched_and_the_rest_is_declared(
    redis_url: str, redis: Redis, unique: str
) -> None:
    await redis.hset(f"{unique}.jobs", mapping={"a": "1"})
    first = await redis.xadd(f"{unique}.events", {"x": "1"})
    # A group at another id than apply's "$": the topology says nothing of where a
    # group starts, so it is no drift, and it stays where it is.
    await redis.xgroup_create(f"{unique}.events", "billing", id="0")
    topology = load(GROUPS_YAML.format(p=unique), FC_URL=redis_url)
    async with cleaned(topology, "redis") as ad:
        for _ in range(2):  # reported again, not "fixed"
            drift = await ad.apply()
            assert [(d.channel, d.setting, d.want, d.have) for d in drift] == [
                ("jobs", "type", "stream", "hash")
            ]
        assert str(drift[0]) == "jobs: type is 'hash' on the broker, the topology says 'stream'"
        assert await redis.hgetall(f"{unique}.jobs") == {b"a": b"1"}
        groups = await redis.xinfo_groups(f"{unique}.events")
        assert {g["name"]: g["last-delivered-id"] for g in groups} == {
            b"billing": b"0-0",
            b"shipping": first,
        }


async def test_odd_entries_of_other_writers_on_a_dead_letter_stream(
    redis_url: str, redis: Redis, unique: str
) -> None:
    topology = load(DEAD_LETTER_YAML.format(p=unique), FC_URL=redis_url)
    dead = f"{unique}.dead"
    entries: dict[str, dict[Any, Any]] = {
        # Counts other writers put there: "²" is a digit to str.isdigit, not to int().
        "superscript": {"payload": order(1), "delivery_count": "²"},
        "long-count": {"payload": order(2), "attempts": "9" * 5000},
        "binary-names": {"payload": order(3), b"\xff\xfe": b"\xff", b"": b"", b"password": b"pw"},
        "huge-name": {
            "payload": order(4),
            "n" * 5000: "v",
            "n" * 5000 + "-password": SECRET,  # its secret past where the name is cut
            "reason": "r" * 5000,
        },
        "no-payload": {"order_id": "o-5"},
    }
    async with cleaned(topology, "redis") as ad:
        await ad.apply()
        memory = Memory()
        async with Tracer(topology, [memory]):
            for case, fields in entries.items():
                await redis.xadd(dead, {"x-case": case, **fields})
            await memory.wait_for(
                lambda items: len(of(items, Kind.DEAD_LETTERED, "dead")) >= len(entries), WITHIN
            )

    seen = {o.headers["x-case"]: o for o in of(memory.items, Kind.DEAD_LETTERED, "dead")}
    assert sorted(seen) == sorted(entries)
    assert seen["superscript"].delivery_count is None
    assert seen["long-count"].delivery_count is None
    assert seen["binary-names"].headers == {
        "x-case": "binary-names",
        "\ufffd\ufffd": "\ufffd",
        "": "",
        "password": MASK,
    }
    huge = seen["huge-name"]
    assert all(len(name) < TEXT_CAP + 200 for name in huge.headers)
    assert SECRET not in encode(huge).decode()
    assert huge.reason is not None
    assert len(huge.reason) < TEXT_CAP + 200
    assert (seen["no-payload"].payload, seen["no-payload"].size) == (None, 0)
    assert [seen[c].keys for c in entries] == [{FLOW: f"o-{n}"} for n in range(1, 5)] + [{}]

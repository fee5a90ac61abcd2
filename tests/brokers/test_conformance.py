"""What every adapter must do, one test body for all three brokers (see ``Kit`` in conftest)."""

from __future__ import annotations

import hashlib
import json
import re
import traceback
from collections import Counter
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner

import flowcheck.tracer as tracer_module
from flowcheck.brokers import Adapter
from flowcheck.brokers import adapter as make_adapter
from flowcheck.cli import cli
from flowcheck.errors import BrokerAuthError, BrokerError, BrokerUnreachable
from flowcheck.observations import (
    HEADERS_KEPT,
    LEFT_OUT,
    PAYLOAD_CAP,
    TEXT_CAP,
    Kind,
    Observation,
    encode,
    trace_id_of,
)
from flowcheck.redact import MASK
from flowcheck.trace import Header, Reader, Writer
from flowcheck.tracer import Memory, Tracer

from .conftest import BIG_BODY, FLOW, SECRET, Kit, ids, of, order

N = 20


async def test_apply_is_idempotent(kit: Kit, adapter: Adapter) -> None:
    assert await adapter.apply() == []
    assert await adapter.apply() == []


async def test_publish_returns_a_published_observation(kit: Kit, adapter: Adapter) -> None:
    await adapter.apply()
    body = order(1)

    obs = await adapter.publish(
        kit.publish_to, body, headers={"x-tenant": "acme"}, routing_key=kit.routing_key
    )

    assert obs.kind is Kind.PUBLISHED
    assert (obs.broker, obs.channel) == (kit.broker, kit.publish_to)
    assert obs.fc_id is not None
    assert re.fullmatch(r"[0-9a-f]{32}", obs.fc_id)
    assert obs.headers["x-flowcheck-id"] == obs.fc_id
    assert obs.headers["x-tenant"] == "acme"
    # A W3C traceparent was injected, and the observation carries its trace id.
    traceparent = obs.headers["traceparent"]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", traceparent)
    assert obs.trace_id is not None
    assert obs.trace_id == trace_id_of(traceparent)
    assert obs.keys == {FLOW: "o-1"}
    assert (obs.payload, obs.size, obs.sha256) == (body.decode(), len(body), None)

    second = await adapter.publish(kit.publish_to, order(2), routing_key=kit.routing_key)
    assert second.fc_id != obs.fc_id
    assert second.trace_id != obs.trace_id
    assert second.keys == {FLOW: "o-2"}


async def test_tap_sees_every_message_exactly_once(kit: Kit, adapter: Adapter) -> None:
    await adapter.apply()
    memory = Memory()
    async with Tracer(kit.topology, [memory]) as tracer:
        published = [
            await tracer.publish(kit.publish_to, order(i), routing_key=kit.routing_key)
            for i in range(N)
        ]
        sent = {o.fc_id for o in published}
        assert len(sent) == N

        def seen_everywhere(items: list[Observation]) -> bool:
            return all(sent <= set(ids(items, Kind.ROUTED, ch)) for ch in kit.seen_on)

        await memory.wait_for(seen_everywhere, kit.within)

    by_id = {o.fc_id: o for o in published}
    for channel in kit.seen_on:
        routed = of(memory.items, Kind.ROUTED, channel)
        assert Counter(o.fc_id for o in routed) == Counter(sent), channel
        for o in routed:
            # The tapped copy carries the identity the publish gave it.
            assert o.fc_id is not None
            mine = by_id[o.fc_id]
            assert (o.trace_id, o.keys, o.payload) == (mine.trace_id, mine.keys, mine.payload)
    assert ids(memory.items, Kind.PUBLISHED) == [o.fc_id for o in published]


async def test_tap_does_not_take_messages_from_the_system(kit: Kit, adapter: Adapter) -> None:
    await adapter.apply()
    memory = Memory()
    async with Tracer(kit.topology, [memory]) as tracer:
        sent = [
            _id(await tracer.publish(kit.publish_to, order(i), routing_key=kit.routing_key))
            for i in range(N)
        ]
        await memory.wait_for(
            lambda items: set(sent) <= set(ids(items, Kind.ROUTED, kit.publish_to)), kit.within
        )

        received = await kit.consume(N)

        assert len(received) == N
        assert sorted(received) == sorted(sent)
        tapped = ids(memory.items, Kind.ROUTED, kit.publish_to)
        assert len(tapped) == N
        assert sorted(tapped) == sorted(sent)


async def test_big_payload_is_cut_keeping_size_and_hash(kit: Kit, adapter: Adapter) -> None:
    await adapter.apply()
    body = order("big", blob="x" * (20 * 1024))
    assert len(body) > PAYLOAD_CAP
    memory = Memory()
    async with Tracer(kit.topology, [memory]) as tracer:
        published = await tracer.publish(kit.publish_to, body, routing_key=kit.routing_key)
        await memory.wait_for(
            lambda items: published.fc_id in ids(items, Kind.ROUTED, kit.publish_to), kit.within
        )
    [routed] = of(memory.items, Kind.ROUTED, kit.publish_to)
    for obs in (published, routed):
        assert obs.size == len(body)
        assert obs.sha256 == hashlib.sha256(body).hexdigest()
        assert obs.payload == body[:PAYLOAD_CAP].decode()
        # The correlation key is read from the whole body, not the cut one.
        assert obs.keys == {FLOW: "o-big"}


async def test_secret_headers_are_redacted(kit: Kit, adapter: Adapter) -> None:
    await adapter.apply()
    headers = {"authorization": f"Bearer {SECRET}", "x-api-key": SECRET, "x-tenant": "acme"}
    memory = Memory()
    async with Tracer(kit.topology, [memory]) as tracer:
        published = await tracer.publish(
            kit.publish_to, order(1), headers=headers, routing_key=kit.routing_key
        )
        await memory.wait_for(
            lambda items: published.fc_id in ids(items, Kind.ROUTED, kit.publish_to), kit.within
        )
    [routed] = of(memory.items, Kind.ROUTED, kit.publish_to)
    for obs in (published, routed):
        assert obs.headers["authorization"] == MASK
        assert obs.headers["x-api-key"] == MASK
        assert obs.headers["x-tenant"] == "acme"
    for obs in memory.items:
        assert SECRET not in encode(obs).decode()


def _assert_names_broker_not_secret(kit: Kit, exc: BrokerError) -> None:
    message = str(exc)
    assert exc.broker == kit.broker
    assert message.startswith(f"{kit.broker}: ")
    assert kit.label in message
    assert SECRET not in message
    assert SECRET not in "".join(traceback.format_exception(exc))


async def test_wrong_password_is_an_auth_error(kit: Kit) -> None:
    ad = make_adapter(kit.broker, kit.with_login(SECRET, None))
    with pytest.raises(BrokerAuthError) as info:
        await ad.connect()
    _assert_names_broker_not_secret(kit, info.value)
    await ad.close()


async def test_closed_port_is_unreachable(kit: Kit, closed_port: int) -> None:
    ad = make_adapter(kit.broker, kit.with_login(SECRET, closed_port))
    with pytest.raises(BrokerUnreachable) as info:
        await ad.connect()
    _assert_names_broker_not_secret(kit, info.value)
    assert f"127.0.0.1:{closed_port}" in str(info.value)
    await ad.close()


def test_kits_name_every_channel_with_the_unique_prefix(kit: Kit) -> None:
    # The isolation of every other test here rests on this.
    for key in kit.topology.channels:
        assert kit.topology.channel_name(key).startswith(kit.prefix)


def _id(obs: Observation) -> str:
    assert obs.fc_id is not None
    return obs.fc_id


async def test_a_tap_that_ends_while_its_broker_is_down_records_the_gap(
    kit: Kit, adapter: Adapter
) -> None:
    """Stopping while the broker is down: the gap runs to the end; nothing is claimed seen."""
    await adapter.apply()  # reached directly; the taps reach it through what the test cuts
    memory = Memory()
    async with kit.outage() as (topology, take_down), Tracer(topology, [memory]) as tracer:
        ad = tracer.adapters[kit.broker]
        assert ad.down is None
        await take_down()
        with anyio.fail_after(kit.within):
            while ad.down is None:
                await ad.down_changed()
        since, reason = ad.down
    gaps = of(memory.items, Kind.GAP)
    assert sorted(g.channel for g in gaps) == sorted(ad.channels())
    for gap in gaps:
        assert (gap.mono_ns, gap.until_ns, gap.reason) == (since, None, reason)
        assert reason


async def test_a_tap_too_slow_to_start_is_a_broker_error(
    kit: Kit, adapter: Adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    await adapter.apply()
    monkeypatch.setattr(tracer_module, "READY_WITHIN", 0.0)
    with pytest.raises(BrokerError) as info:
        async with Tracer(kit.topology, []):
            pass
    assert str(info.value) == f"{kit.broker}: the tap did not start watching within 0s"


# ---------------------------------------------------------------- messages from other systems

CASE = "x-case"  # a header naming each message a test sends through a plain client
LINE_MAX = 256 * 1024  # bytes: no trace line may be longer, whatever the message
Sent = dict[str, tuple[bytes | None, dict[str, str]]]  # case -> (body, headers)


async def _trace_sent(kit: Kit, path: Path, messages: Sent) -> list[Observation]:
    """Tap while a plain client publishes ``messages`` (case -> body, headers), recording
    to a trace file at ``path``; return what was observed once every case was seen on every
    channel it should be."""
    memory = Memory()
    header = Header(topology=kit.topology.name, started=0.0, started_mono_ns=0)
    with Writer(str(path), header) as writer:
        async with Tracer(kit.topology, [memory, writer.write]), kit.sender() as send:
            for case, (body, headers) in messages.items():
                await send(body, {CASE: case, **headers})

            def all_seen(items: list[Observation]) -> bool:
                return all(
                    set(messages) <= {o.headers.get(CASE) for o in of(items, Kind.ROUTED, ch)}
                    for ch in kit.seen_on
                )

            await memory.wait_for(all_seen, kit.within)
    return memory.items


def _assert_trace_is_whole(path: Path, observed: list[Observation]) -> str:
    """The trace holds what was observed, every line intact and bounded, and inspect reads
    it; returns what inspect printed."""
    reader = Reader(str(path))
    assert list(reader) == observed
    assert reader.problems == []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        assert len(line) < LINE_MAX, f"line {number} is {len(line)} bytes"
    printed = ""
    for args in (["--json"], []):
        result = CliRunner().invoke(cli, ["inspect", str(path), "--limit", "1000", *args])
        assert result.exit_code == 0, result.output
        assert result.exception is None
        printed = result.output
    return printed


def _once_each(kit: Kit, items: list[Observation], cases: list[str]) -> dict[str, Observation]:
    """The one ROUTED observation of each case on the channel published to (checked to be
    exactly one on every channel it reaches)."""
    for channel in kit.seen_on:
        counts = Counter(o.headers.get(CASE) for o in of(items, Kind.ROUTED, channel))
        assert {c: counts[c] for c in cases} == dict.fromkeys(cases, 1), channel
    return {str(o.headers[CASE]): o for o in of(items, Kind.ROUTED, kit.publish_to)}


async def test_a_huge_body_from_another_system_is_cut_keeping_size_and_hash(
    kit: Kit, adapter: Adapter, tmp_path: Path
) -> None:
    await adapter.apply()
    # The key comes last: it is read from the whole body, not the cut one.
    body = b'{"blob": "' + b"x" * BIG_BODY + b'", "order_id": "o-big"}'
    path = tmp_path / "trace.jsonl"

    items = await _trace_sent(kit, path, {"big": (body, {})})

    obs = _once_each(kit, items, ["big"])["big"]
    assert obs.size == len(body)
    assert obs.sha256 == hashlib.sha256(body).hexdigest()
    assert obs.payload == body[:PAYLOAD_CAP].decode()
    assert obs.keys == {FLOW: "o-big"}
    _assert_trace_is_whole(path, items)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# case -> (body, the correlation keys its observations must carry)
ODD_BODIES: dict[str, tuple[bytes | None, dict[str, str]]] = {
    "binary": (b"\xff\xfe\x00\x80 not UTF-8 \xc3\x28", {}),
    "empty": (b"", {}),
    "none": (None, {}),  # a Kafka tombstone; a Redis entry without the payload field
    "array": (b"[1, 2, 3]", {}),
    "string": (b'"o-1"', {}),
    "not-json": (b"order_id=o-1", {}),
    "missing": (b'{"id": "o-1"}', {}),
    "null": (b'{"order_id": null}', {}),
    "number": (b'{"order_id": 42}', {FLOW: "42"}),
    "object": (b'{"order_id": {"id": "o-1"}}', {}),
    "deep": (json.dumps({"x": 1}).replace("1", _nested(5000)).encode(), {}),
    "deep-key": (b'{"order_id": ' + _nested(5000).encode() + b"}", {}),
    # JSON escapes a lone surrogate, which no trace line (UTF-8) can hold as it is.
    "surrogate": (b'{"order_id": "o-\\ud800"}', {FLOW: "o-\\ud800"}),
    # Rich markup, a terminal escape sequence, a trailing backslash: printed as they are.
    "markup": (
        b'{"order_id": "o-[/]x[bold red]\\u001b[31m\\\\"}',
        {FLOW: "o-[/]x[bold red]\x1b[31m\\"},
    ),
}


async def test_odd_bodies_from_another_system_are_each_observed_once(
    kit: Kit, adapter: Adapter, tmp_path: Path
) -> None:
    await adapter.apply()
    path = tmp_path / "trace.jsonl"
    sent: Sent = {case: (body, {}) for case, (body, _) in ODD_BODIES.items()}

    items = await _trace_sent(kit, path, sent)

    seen = _once_each(kit, items, list(sent))
    for case, (body, keys) in ODD_BODIES.items():
        obs = seen[case]
        assert obs.size == len(body or b""), case
        if body is None and kit.kind != "rabbitmq":  # AMQP has no absent body: it sent b""
            assert obs.payload is None, case  # not an empty payload: schemas do not judge it
        else:
            assert obs.payload == (body or b"").decode("utf-8", errors="replace"), case
        assert obs.keys == keys, case
    printed = _assert_trace_is_whole(path, items)
    assert "key o-\\ud800\n" in printed
    assert "key o-[/]x[bold red]\\x1b[31m\\\n" in printed


async def test_huge_correlation_keys_are_bounded_and_stay_apart(
    kit: Kit, adapter: Adapter, tmp_path: Path
) -> None:
    await adapter.apply()
    path = tmp_path / "trace.jsonl"
    huge = "k" * (1024 * 1024)
    sent: Sent = {
        "a": (json.dumps({"order_id": huge + "a"}).encode(), {}),
        "a-again": (json.dumps({"order_id": huge + "a"}).encode(), {}),
        "b": (json.dumps({"order_id": huge + "b"}).encode(), {}),
    }

    items = await _trace_sent(kit, path, sent)

    seen = _once_each(kit, items, list(sent))
    keys = {case: seen[case].keys[FLOW] for case in sent}
    assert all(len(k) < TEXT_CAP + 200 for k in keys.values())
    assert keys["a"] == keys["a-again"] != keys["b"]
    _assert_trace_is_whole(path, items)


async def test_odd_headers_from_another_system_are_bounded_and_secrets_masked(
    kit: Kit, adapter: Adapter, tmp_path: Path
) -> None:
    await adapter.apply()
    path = tmp_path / "trace.jsonl"
    secrets = {
        "authorization": f"Bearer {SECRET}",
        "Password": SECRET,
        "x-auth-token": SECRET,
        "db_password": SECRET,
        "Cookie": f"session={SECRET}",
    }
    nested = json.dumps({"user": "u", "login": {"password": SECRET, "items": [{"token": SECRET}]}})
    deep = "[" * 3000 + json.dumps({"password": SECRET}) + "]" * 3000
    sent: Sent = {
        "secrets": (order(1), {**secrets, "x-tenant": "acme"}),
        # Kafka and Redis headers nest only as JSON text: its secrets are masked too.
        "nested": (order(4), {"x-meta": nested, "x-deep": deep, "x-list": "[1, 2]"}),
        "long": (order(2), {"x-long": "h" * (64 * 1024)}),
        # As many as an AMQP header frame (128 KiB by default) holds
        "many": (order(3), {f"x-field-{i}": "v" * 50 for i in range(500)}),
    }

    items = await _trace_sent(kit, path, sent)

    seen = _once_each(kit, items, list(sent))
    assert seen["secrets"].headers == {
        **dict.fromkeys(secrets, MASK),
        "x-tenant": "acme",
        CASE: "secrets",
    }
    long = seen["long"].headers["x-long"]
    assert long.startswith("h" * TEXT_CAP)
    assert len(long) < TEXT_CAP + 200
    many = seen["many"].headers
    assert len(many) == HEADERS_KEPT + 1
    assert many[LEFT_OUT] == 501 - HEADERS_KEPT  # and the x-case header, which comes first
    assert json.loads(seen["nested"].headers["x-meta"]) == {
        "user": "u",
        "login": {"password": MASK, "items": [{"token": MASK}]},
    }
    assert seen["nested"].headers["x-deep"] == MASK  # too deep to look through
    assert seen["nested"].headers["x-list"] == "[1, 2]"
    assert {c: o.keys for c, o in seen.items()} == {
        "nested": {FLOW: "o-4"},
        "secrets": {FLOW: "o-1"},
        "long": {FLOW: "o-2"},
        "many": {FLOW: "o-3"},
    }
    for obs in items:
        assert SECRET not in encode(obs).decode()
    _assert_trace_is_whole(path, items)

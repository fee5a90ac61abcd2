"""RabbitMQ publishing when the broker drops flowcheck's connection.

Only flowcheck's own publishing connection is closed, by its connection name (or,
for ``flowcheck run`` in a process of its own, every flowcheck connection in a
virtual host made for the test), so other tests and processes are undisturbed.
Needs ``rabbitmqctl`` for the broker under test.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc
import pytest
from harness import rabbitmq_vhost

from flowcheck.brokers import rabbitmq
from flowcheck.brokers.rabbitmq import RESENT_HEADER, RabbitMQAdapter
from flowcheck.checker import FindingKind, Verdict, check
from flowcheck.errors import BrokerUnreachable
from flowcheck.observations import Kind, Observation
from flowcheck.topology.model import RabbitMQ
from flowcheck.tracer import Memory, Tracer

from .conftest import RABBITMQ_YAML, WITHIN, cleaned, ids, load, of, order, rabbitmq_kit
from .test_rabbitmq import close_connections_in, close_connections_named

CLOSES = 2  # connection losses each test makes at least
MAX_CLOSES = 6  # ... and at most, until one of them cost a publish its confirm
AFTER = 20  # messages published after the last loss: publishing went on
CLOSING_WITHIN = 120.0  # seconds for all the closing (rabbitmqctl takes a second or more)

PAST_WINDOWS = 3600 * 10**9  # ns: an end past every flow's window, nothing undecided


class Progress:
    """Counts what a publishing task has published; waits for a count."""

    def __init__(self) -> None:
        self.sent: list[Observation] = []
        self._changed = anyio.Event()

    def add(self, obs: Observation) -> None:
        self.sent.append(obs)
        self._changed.set()
        self._changed = anyio.Event()

    async def reach(self, count: int) -> None:
        while len(self.sent) < count:
            await self._changed.wait()


def resent(items: list[Observation]) -> list[Observation]:
    return [o for o in items if RESENT_HEADER in o.headers]


async def test_publishing_goes_on_when_its_connection_is_closed(
    rabbitmq_url: str, unique: str
) -> None:
    kit = rabbitmq_kit(rabbitmq_url, unique)
    progress = Progress()
    memory = Memory()
    closes = 0
    async with cleaned(kit.topology, "rabbit") as ad:
        await ad.apply()
        async with Tracer(kit.topology, [memory]) as tracer:
            client = tracer.adapters["rabbit"]
            assert isinstance(client, RabbitMQAdapter)
            done = anyio.Event()  # no more closing

            async def publish() -> None:
                n = 0
                while not done.is_set():
                    progress.add(
                        await tracer.publish("events", order(n), routing_key="order.placed")
                    )
                    n += 1
                for _ in range(AFTER):
                    progress.add(
                        await tracer.publish("events", order(n), routing_key="order.placed")
                    )
                    n += 1

            with anyio.fail_after(CLOSING_WITHIN):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(publish)
                    # Close while publishing, each time on a connection that is publishing:
                    # until a loss struck a publish waiting for its confirm.
                    while closes < CLOSES or (not resent(progress.sent) and closes < MAX_CLOSES):
                        await progress.reach(len(progress.sent) + 10)
                        assert await close_connections_named(client.connection_name("client")) == 1
                        closes += 1
                    done.set()
            sent = progress.sent
            fc_ids = {o.fc_id for o in sent}

            def all_routed(items: list[Observation]) -> bool:
                return all(fc_ids <= set(ids(items, Kind.ROUTED, ch)) for ch in kit.seen_on)

            await memory.wait_for(all_routed, WITHIN)

    assert closes >= CLOSES
    assert [o.kind for o in sent] == [Kind.PUBLISHED] * len(sent)
    assert len(fc_ids) == len(sent)  # a message sent again is still one message
    again = resent(sent)
    assert again, f"none of {closes} connection losses struck a publish awaiting its confirm"
    for o in again:
        assert int(o.headers[RESENT_HEADER]) >= 1
        assert o.message_id == o.fc_id
    # The tap sees the marked copies: a reader of the trace can tell them.
    routed_again = {o.fc_id for o in resent(of(memory.items, Kind.ROUTED, "events"))}
    assert routed_again
    assert routed_again <= fc_ids
    assert not of(memory.items, Kind.GAP)  # only the publishing connection was closed

    end = max(o.mono_ns for o in memory.items) + PAST_WINDOWS
    verdict = check(kit.topology, memory.items, end_ns=end)
    flow = verdict.flows[0]
    kinds = [f.kind for f in verdict.findings + flow.findings]
    assert FindingKind.DUPLICATED not in kinds
    assert (flow.chains, flow.succeeded, flow.failed) == (len(sent), len(sent), 0), kinds
    # Every message routed on each step: as often as the tap saw it, but once per fc_id.
    for channel in kit.seen_on:
        assert set(ids(memory.items, Kind.ROUTED, channel)) == fc_ids


async def test_a_broker_that_stays_away_is_a_broker_error(
    rabbitmq_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rabbitmq, "RECONNECT_WITHIN", 1.0)
    kit = rabbitmq_kit(rabbitmq_url, unique)
    async with cleaned(kit.topology, "rabbit") as direct:
        await direct.apply()
        async with kit.outage() as (topology, cut), RabbitMQAdapter("rabbit", topology) as ad:
            first = await ad.publish("events", order(1), routing_key="order.placed")
            assert first.kind is Kind.PUBLISHED
            await cut()  # the broker stays away: every reconnection is refused
            started = anyio.current_time()
            with pytest.raises(BrokerUnreachable) as caught, anyio.fail_after(WITHIN):
                await ad.publish("events", order(2), routing_key="order.placed")
            took = anyio.current_time() - started
    assert took < WITHIN
    message = str(caught.value)
    assert message.startswith(
        "rabbit: lost the connection to RabbitMQ and could not reconnect within 1s: "
        "cannot reach RabbitMQ at amqp://"
    ), message
    assert "\n" not in message
    password = urlsplit(rabbitmq_url).password
    if password:
        assert f":{password}@" not in message


async def test_a_broker_that_never_answers_again_is_a_broker_error(
    rabbitmq_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker's port takes connections but nothing answers: bounded all the same."""
    monkeypatch.setattr(rabbitmq, "RECONNECT_WITHIN", 1.0)
    kit = rabbitmq_kit(rabbitmq_url, unique)
    held: list[anyio.abc.SocketStream] = []

    async def hold(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            held.append(stream)  # accepted, never answered
            await anyio.sleep_forever()

    serving = anyio.CancelScope()

    async def serve(listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        with serving:
            async with listener:
                await listener.serve(hold)

    async with cleaned(kit.topology, "rabbit") as direct:
        await direct.apply()
        async with kit.outage() as (topology, cut), anyio.create_task_group() as tg:
            ad = RabbitMQAdapter("rabbit", topology)
            await ad.connect()
            try:
                await ad.publish("events", order(1), routing_key="order.placed")
                await cut()
                port = urlsplit(ad.url).port
                assert port is not None
                # Where the broker was, a port that takes connections and says nothing.
                silent = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
                tg.start_soon(serve, silent)
                with pytest.raises(BrokerUnreachable) as caught, anyio.fail_after(WITHIN):
                    await ad.publish("events", order(2), routing_key="order.placed")
            finally:
                serving.cancel()
                await ad.close()
    assert held  # it did try to reconnect
    assert str(caught.value).startswith(
        "rabbit: lost the connection to RabbitMQ and could not reconnect within 1s: "
        "RabbitMQ at amqp://"
    )
    assert str(caught.value).endswith(" did not answer")


@asynccontextmanager
async def deafened(url: str) -> AsyncIterator[tuple[str, Callable[[], None]]]:
    """``url`` through a local forwarder: (the URL through it, deafen). Deafening drops
    what the broker sends on the connections open then, without closing them, as a
    network losing every packet one way would; the client's frames still reach the
    broker, and connections opened later are forwarded both ways."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    deaf: list[anyio.Event] = []  # one per connection

    async def pipe(client: anyio.abc.SocketStream) -> None:
        muted = anyio.Event()
        deaf.append(muted)
        async with client, await anyio.connect_tcp(host, port) as upstream:

            async def copy(
                a: anyio.abc.SocketStream, b: anyio.abc.SocketStream, lossy: bool
            ) -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    async for chunk in a:
                        if not (lossy and muted.is_set()):
                            await b.send(chunk)
                await anyio.sleep_forever()  # the sockets stay open until the end

            async with anyio.create_task_group() as both:
                both.start_soon(copy, client, upstream, False)
                both.start_soon(copy, upstream, client, True)

    def deafen() -> None:
        for muted in deaf:
            muted.set()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    local_port = listener.extra(anyio.abc.SocketAttribute.local_port)
    login = f"{parts.username}:{parts.password}@" if parts.password else ""
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, pipe)
        try:
            yield urlunsplit(parts._replace(netloc=f"{login}127.0.0.1:{local_port}")), deafen
        finally:
            tg.cancel_scope.cancel()


async def test_a_message_whose_confirm_was_lost_is_sent_again_and_counted_once(
    rabbitmq_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker routes a message but its confirm never arrives (the connection stays
    open): the message goes again on a new connection, marked; the broker then holds
    two copies, and the checker counts one message."""
    monkeypatch.setattr(rabbitmq, "CONFIRM_WITHIN", 1.0)
    kit = rabbitmq_kit(rabbitmq_url, unique)
    memory = Memory()
    async with cleaned(kit.topology, "rabbit") as direct:
        await direct.apply()
        async with Tracer(kit.topology, [memory]), deafened(rabbitmq_url) as (url, deafen):
            ad = RabbitMQAdapter("rabbit", load(kit.yaml, FC_URL=url))
            await ad.connect()
            try:
                first = await ad.publish("events", order(1), routing_key="order.placed")
                deafen()
                with anyio.fail_after(WITHIN):
                    second = await ad.publish("events", order(2), routing_key="order.placed")
            finally:
                await ad.close()

            fc_id = second.fc_id
            assert fc_id is not None

            def twice(items: list[Observation]) -> bool:
                return all(ids(items, Kind.ROUTED, ch).count(fc_id) == 2 for ch in kit.seen_on)

            await memory.wait_for(twice, WITHIN)
    assert RESENT_HEADER not in first.headers
    assert second.kind is Kind.PUBLISHED
    assert second.headers[RESENT_HEADER] == 1
    for channel in kit.seen_on:
        copies = [o for o in of(memory.items, Kind.ROUTED, channel) if o.fc_id == second.fc_id]
        assert [o.headers.get(RESENT_HEADER) for o in copies] == [None, 1]
        assert {o.message_id for o in copies} == {second.fc_id}
    history = sorted([first, second, *memory.items], key=lambda o: o.mono_ns)
    verdict = check(kit.topology, history, end_ns=history[-1].mono_ns + PAST_WINDOWS)
    flow = verdict.flows[0]
    assert FindingKind.DUPLICATED not in [f.kind for f in verdict.findings + flow.findings]
    assert (flow.chains, flow.succeeded, flow.failed) == (2, 2, 0)


# ---------------------------------------------------------------- flowcheck run

RUN_COUNT = 600
RUN_RATE = 150  # messages per second: publishing lasts ~4 s, time for the losses
RUN_WITHIN = 180.0  # seconds for the whole run, losses included


@pytest.mark.parametrize("doomed", ["client", "every"])
async def test_flowcheck_run_survives_its_connections_being_closed(
    rabbitmq_url: str, unique: str, tmp_path: Path, doomed: str
) -> None:
    """``flowcheck run`` as a user runs it, in a virtual host of its own so that every
    flowcheck connection there is this run's: its publishing connection closed, or
    every one of its connections (the tap's too)."""
    vhost = unique
    async with rabbitmq_vhost(rabbitmq_url, vhost) as url:
        topology = tmp_path / "topology.yaml"
        text = RABBITMQ_YAML.format(p=unique).replace("${FC_URL}", "${FC_RUN_URL}")
        # A short deadline: a chain a tap gap leaves unknown is waited for that long.
        text = text.replace(
            "    steps: [events, inbox]\n", "    steps: [events, inbox]\n    deadline: 5s\n"
        )
        assert "deadline: 5s" in text
        topology.write_text(text)
        scenario = tmp_path / "scenario.yaml"
        scenario.write_text(
            f"send:\n  - flow: orders\n    count: {RUN_COUNT}\n    rate: {RUN_RATE}\n"
            "    routing_key: order.placed\n"
        )
        reports = tmp_path / "reports"
        cmd = [sys.executable, "-m", "flowcheck", "run", str(topology)]
        cmd += ["--scenario", str(scenario), "--report-dir", str(reports)]
        env = {**_environ(), "FC_RUN_URL": url}
        stderr = bytearray()
        closes = 0
        with anyio.fail_after(RUN_WITHIN):
            async with await anyio.open_process(cmd, env=env) as proc:
                publishing = anyio.Event()

                async def read_stderr() -> None:
                    assert proc.stderr is not None
                    async for chunk in proc.stderr:
                        stderr.extend(chunk)
                        if b"taps ready; publishing" in stderr:
                            publishing.set()
                    publishing.set()  # ended without publishing: the assertions tell

                stdout = bytearray()

                async def read_stdout() -> None:
                    assert proc.stdout is not None
                    async for chunk in proc.stdout:
                        stdout.extend(chunk)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(read_stderr)
                    tg.start_soon(read_stdout)
                    await publishing.wait()
                    while closes < CLOSES and proc.returncode is None:
                        closes += await _close_connections(vhost, doomed)
                        if b"published;" in stderr:
                            break
                    await proc.wait()
    out = stdout.decode() + stderr.decode()
    assert closes >= 1, out  # the run was still publishing when its connection was closed
    assert "Traceback" not in out
    assert list(reports.glob("trace-*.jsonl"))
    verdict = Verdict.model_validate_json((reports / "verdict.json").read_text())
    flow = verdict.flows[0]
    assert FindingKind.DUPLICATED not in [f.kind for f in flow.findings]
    if doomed == "client":
        assert proc.returncode == 0, out
        assert (flow.chains, flow.succeeded) == (RUN_COUNT, RUN_COUNT)
    else:
        # The tap was blind for a while: chains its gaps cover may be unknown, and a gate
        # that could not see them all says so (exit 3, with a verdict). None is lost.
        assert proc.returncode in (0, 3), out
        assert flow.chains == RUN_COUNT
        assert flow.failed == 0
        assert flow.succeeded + flow.unknown == RUN_COUNT


# ``flowcheck run`` with a shorter wait for a lost broker than the default 30 s.
RUN_IMPATIENT = (
    "import flowcheck.brokers.rabbitmq as r; r.RECONNECT_WITHIN = 1.0; "
    "from flowcheck.cli import main; main()"
)


async def test_flowcheck_run_whose_broker_goes_away_is_exit_3(
    rabbitmq_url: str, unique: str, tmp_path: Path
) -> None:
    """The broker goes away for good mid-publish: one clear line, exit 3, the trace kept."""
    kit = rabbitmq_kit(rabbitmq_url, unique)
    async with cleaned(kit.topology, "rabbit") as direct, kit.outage() as (through, cut):
        await direct.apply()
        # The broker through a forwarder of the test's own: cutting it disturbs no one else.
        broker = through.brokers["rabbit"]
        assert isinstance(broker, RabbitMQ)
        url = broker.url.get_secret_value()
        topology = tmp_path / "topology.yaml"
        topology.write_text(kit.yaml)
        scenario = tmp_path / "scenario.yaml"
        scenario.write_text(
            f"send:\n  - flow: orders\n    count: {RUN_COUNT}\n    rate: {RUN_RATE}\n"
            "    routing_key: order.placed\n"
        )
        reports = tmp_path / "reports"
        cmd = [sys.executable, "-c", RUN_IMPATIENT, "run", str(topology)]
        cmd += ["--scenario", str(scenario), "--report-dir", str(reports), "--no-apply"]
        stderr, stdout = bytearray(), bytearray()
        with anyio.fail_after(RUN_WITHIN):
            async with await anyio.open_process(cmd, env={**_environ(), "FC_URL": url}) as proc:
                publishing = anyio.Event()

                async def read_stderr() -> None:
                    assert proc.stderr is not None
                    async for chunk in proc.stderr:
                        stderr.extend(chunk)
                        if b"taps ready; publishing" in stderr:
                            publishing.set()
                    publishing.set()

                async def read_stdout() -> None:
                    assert proc.stdout is not None
                    async for chunk in proc.stdout:
                        stdout.extend(chunk)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(read_stderr)
                    tg.start_soon(read_stdout)
                    await publishing.wait()
                    await cut()
                    await proc.wait()
    out = stdout.decode() + stderr.decode()
    assert "Traceback" not in out
    assert proc.returncode == 3, out
    last = stderr.decode().strip().splitlines()[-1]
    assert last.startswith(
        "flowcheck: rabbit: lost the connection to RabbitMQ and could not reconnect within 1s: "
        "cannot reach RabbitMQ at amqp://"
    ), out
    password = urlsplit(rabbitmq_url).password
    if password:
        assert f":{password}@" not in out
    traces = list(reports.glob("trace-*.jsonl"))
    assert len(traces) == 1
    assert traces[0].read_text().count("\n") > 1  # the header and what was seen


async def _close_connections(vhost: str, purpose: str) -> int:
    """Close flowcheck's ``purpose`` connections in ``vhost`` ("every": all of them);
    how many there were."""
    return await close_connections_in(
        vhost, "flowcheck-" if purpose == "every" else f"flowcheck-{purpose}-"
    )


def _environ() -> dict[str, str]:
    return dict(os.environ)

"""``flowcheck record``: tap a topology's channels and write every observation to a trace file."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial

import anyio

from flowcheck.brokers import adapter
from flowcheck.brokers.base import Drift
from flowcheck.checker import OpenChains, window
from flowcheck.errors import UsageError, leaf
from flowcheck.observations import Kind, Observation, now
from flowcheck.signals import Caught, watch
from flowcheck.topology.model import Topology
from flowcheck.trace import Ended, Writer, new_header
from flowcheck.tracer import Tracer

TICK = 0.25  # seconds between live-count refreshes and idle flushes


async def apply_all(topology: Topology, channels: Sequence[str] | None = None) -> list[Drift]:
    """Declare the topology's channels (default: every one) on their brokers; return the
    drift found."""
    wanted = set(topology.channels if channels is None else channels)
    drift: list[Drift] = []
    for name in topology.brokers:
        mine = [k for k, ch in topology.channels.items() if ch.broker == name and k in wanted]
        if not mine:
            continue
        async with adapter(name, topology) as ad:
            drift += await ad.apply(mine)
    return drift


def drift_observations(
    topology: Topology, drift: Sequence[Drift], mono: int, wall: float
) -> list[Observation]:
    """The drift ``apply`` found, as DRIFT observations for the head of a trace."""
    return [
        Observation(
            kind=Kind.DRIFT,
            broker=topology.channels[d.channel].broker,
            channel=d.channel,
            mono_ns=mono,
            wall=wall,
            reason=str(d),
        )
        for d in drift
    ]


async def record(
    topology: Topology,
    out: str,
    *,
    topology_path: str | None = None,
    duration: float | None = None,
    apply: bool = False,
    on_tick: Callable[[Counter[str]], None] | None = None,
    on_ready: Callable[[], None] | None = None,
    on_down: Callable[[dict[str, tuple[int, str]]], None] | None = None,
    stop: anyio.Event | None = None,
    channels: Sequence[str] | None = None,
    on_drift: Callable[[Sequence[Drift]], None] | None = None,
    gaps: Counter[str] | None = None,
    drain: float | None = None,
    on_stopping: Callable[[float], None] | None = None,
    stop_now: anyio.Event | None = None,
) -> Counter[str]:
    """Record until ``duration`` seconds pass, ``stop`` is set, or SIGINT/SIGTERM arrives.

    Asked to stop, the taps watch on for up to ``drain`` seconds (default: the
    topology's longest window, :func:`flowcheck.checker.window`; 0: stop at once) so
    the chains in flight then are decided, not cut short: until every chain seen
    before the stop has reached its end, or ``stop_now`` is set, or a second signal
    comes. ``on_stopping`` hears how long that may take, when it begins.

    The trace ends with its end record: when the taps stopped watching, and why
    (``duration``, ``stopped`` for ``stop`` or SIGTERM, ``interrupted`` for SIGINT),
    and when the stop was asked if they watched on after it.

    ``channels`` limits the taps (and ``apply``) to those channels. ``on_ready`` is
    called once every tap is watching; every tick, ``on_tick`` with the counts and
    ``on_down`` with the brokers whose taps cannot watch (since, why). Returns the
    number of observations per channel; a tap gap is no observation: ``gaps``, when
    given, counts the gap records per channel. ``on_drift`` hears of drift as soon as
    ``apply`` finds it (a tap that then fails to start must not hide it). The trace
    file is complete and flushed when this returns, whatever stopped it. A stop before
    every tap is watching abandons connecting; then, as after an error that early, no
    trace file is left.
    """
    stop = stop or anyio.Event()
    stop_now = stop_now or anyio.Event()
    drain = window(topology).total_seconds() if drain is None else drain
    if not topology.flows:
        drain = 0  # no chain to wait for
    connected = anyio.Event()
    counts: Counter[str] = Counter()
    gaps = Counter() if gaps is None else gaps
    how: list[Ended] = []  # why it stopped, when not for ``stop``
    caught = Caught()

    def tally(obs: Observation) -> None:
        (gaps if obs.kind is Kind.GAP else counts)[obs.channel] += 1

    def signalled() -> None:
        how.append(caught.ended or "stopped")
        if stop.is_set():
            stop_now.set()  # already stopping (its duration ran out): stop now
        stop.set()
        if not connected.is_set():
            stop_now.set()  # before the taps watch, nothing is in flight: abandon

    async def session() -> None:
        drift = await apply_all(topology, channels) if apply else []
        if drift and on_drift is not None:
            on_drift(drift)
        header = new_header(topology.name, topology_path)
        mono, wall = header.started_mono_ns, header.started
        writer = Writer(out, header)
        # Fed as the taps see it, to tell when every chain in flight at the stop has ended:
        # it follows which chains are open, cheaply, and judges none (check's work).
        checker = OpenChains(topology, start_ns=mono) if drain > 0 else None
        sinks = [writer.write, tally] + ([checker.feed] if checker is not None else [])
        try:
            with writer:
                for obs in drift_observations(topology, drift, mono, wall):
                    writer.write(obs)
                tracer = Tracer(topology, sinks, channels=channels)
                async with tracer:
                    connected.set()
                    if on_ready is not None:
                        on_ready()
                    deadline = None if duration is None else time.monotonic() + duration

                    def refresh() -> None:
                        if writer.due():
                            writer.flush()
                        if on_tick is not None:
                            on_tick(counts)
                        if on_down is not None:
                            on_down({n: ad.down for n, ad in tracer.adapters.items() if ad.down})

                    while not stop.is_set():
                        with anyio.move_on_after(TICK):
                            await stop.wait()
                        refresh()
                        if deadline is not None and time.monotonic() >= deadline:
                            how.append("duration")
                            stop.set()
                    asked = None
                    if checker is not None and not stop_now.is_set():
                        asked = now()[0]
                        checker.stop(asked)  # chains first seen from now on are not judged
                        if on_stopping is not None:
                            on_stopping(drain)
                        until = time.monotonic() + drain
                        while not stop_now.is_set() and time.monotonic() < until:
                            # A tap that is down may hide a chain's end: wait the window out.
                            if not any(ad.down for ad in tracer.adapters.values()):
                                checker.advance(now()[0])
                                if checker.settled():
                                    break
                            with anyio.move_on_after(min(TICK, until - time.monotonic())):
                                await stop_now.wait()
                            refresh()
                    # Read before the taps close: they watched until now, not until closed.
                    end = now()
                writer.end(how[0] if how else "stopped", *end, stop_mono_ns=asked)
        except BaseException:
            # A recording that never began leaves no file: a header alone would block the retry.
            if not connected.is_set() and writer.count == 0:
                os.remove(out)
            raise

    try:
        async with anyio.create_task_group() as tg:
            # Catch Ctrl-C from the very start: before the taps watch, it abandons connecting.
            await tg.start(partial(watch, again=stop_now.set), caught, signalled)
            with anyio.CancelScope() as connecting:
                tg.start_soon(_abandon, stop, connected, connecting)
                await session()
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise leaf(group) from None
    return counts


async def _abandon(stop: anyio.Event, connected: anyio.Event, scope: anyio.CancelScope) -> None:
    await stop.wait()
    if not connected.is_set():
        scope.cancel()


def write_ready(path: str, text: str) -> None:
    """Write ``text`` to ``path`` at once or not at all (a temporary file renamed), so
    whoever waits for the file never reads half of it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UsageError(f"cannot write the ready file {path}: {exc.strerror}") from None

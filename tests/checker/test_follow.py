"""A checker made with ``judge=False``, and ``OpenChains`` (what ``flowcheck record``
drains with: lists of observations until the stop, then such a checker), follow the
open chains exactly as a judging checker does: the same chains open, each as settled, after
every observation and as time passes, on generated histories with observations
missing (so some chains never settle) and a stop asked part way."""

from __future__ import annotations

import pytest
from generate import MS, SHAPES, History, render, scenarios
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowcheck.checker import Checker, OpenChains
from flowcheck.observations import Observation

FOLLOW = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def drawn(shape: object, data: st.DataObject) -> tuple[History, list[Observation], int]:
    """A generated history, some of its observations dropped, and where the stop comes."""
    h = render(data.draw(scenarios(shape)))  # type: ignore[arg-type]
    n = len(h.observations)
    dropped = set(data.draw(st.lists(st.integers(0, n - 1), max_size=max(1, n // 5))))
    kept = [o for i, o in enumerate(h.observations) if i not in dropped]
    return h, kept, data.draw(st.integers(0, len(kept)))


def open_chains(c: Checker) -> dict[str, dict[str, bool]]:
    return {name: {k: c.settled(name, k) for k in s.chains} for name, s in c.flows.items()}


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
@FOLLOW
@given(data=st.data())
def test_a_checker_that_does_not_judge_follows_the_same_open_chains(
    shape: object, data: st.DataObject
) -> None:
    h, kept, stop_at = drawn(shape, data)
    judging = Checker(h.shape.topology, start_ns=h.start_ns)
    following = Checker(h.shape.topology, start_ns=h.start_ns, judge=False)
    for i, obs in enumerate(kept):
        if i == stop_at:
            judging.stop_ns = following.stop_ns = obs.mono_ns
        judging.feed(obs)
        following.feed(obs)
        assert open_chains(following) == open_chains(judging)
    assert following.after_stop == judging.after_stop
    last = max((o.mono_ns for o in kept), default=h.start_ns)
    for later in range(0, h.shape.window_ms + 2_000, 500):  # the drain's clock
        judging.advance(last + later * MS)
        following.advance(last + later * MS)
        assert open_chains(following) == open_chains(judging)
    assert not any(s.chains for s in following.flows.values())  # every window has passed


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
@FOLLOW
@given(data=st.data())
def test_open_chains_follows_the_chains_a_checker_keeps_open(
    shape: object, data: st.DataObject
) -> None:
    """What the recorder drains with: lists until the stop, a following checker after."""
    h, kept, stop_at = drawn(shape, data)
    judging = Checker(h.shape.topology, start_ns=h.start_ns)
    following = OpenChains(h.shape.topology, start_ns=h.start_ns)
    for i, obs in enumerate(kept):
        if i == stop_at:
            judging.stop_ns = obs.mono_ns
            following.stop(obs.mono_ns)
        judging.feed(obs)
        following.feed(obs)
        if following.stopped:
            assert open_chains(following.checker) == open_chains(judging)
        else:
            assert {f: set(keys) for f, keys in following.open.items()} == {
                f: set(s.chains) for f, s in judging.flows.items()
            }
    if not following.stopped:
        last = max((o.mono_ns for o in kept), default=h.start_ns)
        judging.stop_ns = last
        following.stop(last)
    assert open_chains(following.checker) == open_chains(judging)
    assert following.checker.after_stop == judging.after_stop
    last = max((o.mono_ns for o in kept), default=h.start_ns)
    for later in range(0, h.shape.window_ms + 2_000, 500):  # the drain's clock
        judging.advance(last + later * MS)
        following.advance(last + later * MS)
        assert open_chains(following.checker) == open_chains(judging)
        assert following.settled() == all(
            open_chains(judging)[f][k] for f in judging.flows for k in judging.flows[f].chains
        )


def test_a_checker_that_does_not_judge_gives_no_verdict() -> None:
    c = Checker(SHAPES[0].topology, judge=False)
    with pytest.raises(ValueError, match="no verdict"):
        c.finish()

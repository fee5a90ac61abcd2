"""Property-based tests of the checker: generated clean histories pass, and each injected
defect is found once, as the right finding, for the right chain, step and message.

Histories come from ``generate.py``: realistic observations of two topologies
(RabbitMQ exchange -> quorum queue with DLX/DLQ -> Kafka topic with retry topic
and DLT -> Redis stream with group and dead-letter stream; and Redis stream ->
Kafka topic correlated by header), many chains with random keys, timings,
retries and poison messages.

Each defect property takes a clean history, injects exactly one defect into one
chain and checks the verdict holds exactly the expected finding for that chain,
naming the step and the injected observation (fc_id / offset / entry_id) where
the checker records one. At the end, minimal histories of the checker bugs these
properties once found keep them fixed.

FLOWCHECK_PROPERTY_EXAMPLES=200 runs each defect property deeper (default 20).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import pytest
from generate import (
    MS,
    SHAPES,
    SHOP,
    START_NS,
    ChainPlan,
    History,
    Scenario,
    Shape,
    arrivals,
    render,
    replace,
    same,
    scenarios,
    span_us,
    unjudged,
    with_step,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flowcheck.checker import Cause, Finding, FindingKind, Verdict, check
from flowcheck.observations import Kind, Observation
from flowcheck.topology import loads

# Deterministic: the same examples on every run, and no example database on disk.
# Clean histories get the most examples; each defect fewer (every verdict costs the
# checker ~60ms of percentile work, and the file should stay under a minute).
CLEAN = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROPERTY = settings(CLEAN, max_examples=int(os.environ.get("FLOWCHECK_PROPERTY_EXAMPLES", "20")))

shapes = pytest.mark.parametrize("name", [s.name for s in SHAPES])
SHAPE = {s.name: s for s in SHAPES}
DEAD = {c for shape in SHAPES for step in shape.steps for c in step.dead}


# ---------------------------------------------------------------- helpers


def run(h: History, *, end_ns: int | None = None, allow_unjudged: bool | None = None) -> Verdict:
    return check(
        h.shape.topology,
        h.observations,
        start_ns=h.start_ns,
        end_ns=h.end_ns if end_ns is None else end_ns,
        allow_unjudged=allow_unjudged,
    )


def all_findings(v: Verdict) -> list[Finding]:
    return [f for fv in v.flows for f in fv.findings] + list(v.findings)


def describe(v: Verdict) -> list[tuple[str, str | None, str | None, str]]:
    return [(f.kind.value, f.key, f.step, f.message) for f in all_findings(v)]


def only(v: Verdict, key: str | None, kind: FindingKind) -> Finding:
    """The one finding of the verdict, which must be ``kind`` about ``key``."""
    found = all_findings(v)
    assert [(f.kind, f.key) for f in found] == [(kind, key)], describe(v)
    assert not v.passed
    return found[0]


def seen_is(finding: Finding, obs: Observation) -> None:
    assert any(same(s, obs) for s in finding.seen), (finding.seen, obs)


def label(shape: Shape, i: int) -> str:
    return shape.steps[i].label


def draw_chain(data: st.DataObject, sc: Scenario, fate: str = "healthy") -> ChainPlan:
    return sc.plans[data.draw(st.sampled_from(sc.of("healthy" if fate == "healthy" else "poison")))]


def dead_obs(h: History, p: ChainPlan) -> list[Observation]:
    return [o for o in h.by_chain[p.key] if o.channel in DEAD]


# ---------------------------------------------------------------- clean histories


@shapes
@CLEAN
@given(data=st.data())
def test_clean_histories_have_no_findings(name: str, data: st.DataObject) -> None:
    shape = SHAPE[name]
    sc = data.draw(scenarios(shape))
    h = render(sc)
    v = run(h)
    assert describe(v) == []
    # Green only when everything declared was judged; what was not is listed, per chain.
    want = unjudged(sc)
    (fv,) = v.flows
    assert {u.expectation: u.chains for u in fv.unjudged} == want
    assert v.passed == (not want)
    assert run(h, allow_unjudged=True).passed
    poison = sum(p.poison is not None for p in sc.plans)
    assert (fv.chains, fv.succeeded, fv.failed, fv.unknown) == (len(sc.plans), len(sc.plans), 0, 0)
    assert fv.dead_lettered == poison
    assert all(c.passed for c in fv.checks) == (not want)
    e2e = fv.latency[-1]
    assert e2e.hop == "end-to-end"
    last = len(shape.steps) - 1
    assert e2e.stats.count == sum(p.dies_at in (None, last) for p in sc.plans)


# ---------------------------------------------------------------- loss


@shapes
@PROPERTY
@given(data=st.data())
def test_loss_is_found_where_the_chain_stopped(name: str, data: st.DataObject) -> None:
    shape = SHAPE[name]
    sc = data.draw(scenarios(shape))
    p = draw_chain(data, sc)
    j = data.draw(st.integers(0, len(shape.steps) - 2), label="stopped after")
    drop_ack = data.draw(st.booleans(), label="no ack either")
    h = render(replace(sc, p.index, stop_after=j, drop_ack=drop_ack))
    v = run(h)
    lost = only(v, p.key, FindingKind.LOST)
    assert lost.step == lost.next_step == label(shape, j + 1)
    spec = shape.steps[j]
    if spec.kind == "stream" and drop_ack:
        # Redis shows the entry pending in its group: delivered, never acknowledged.
        assert lost.cause == Cause.STUCK_PENDING
        assert lost.message.startswith(f"stuck at {label(shape, j)!r}")
        seen_is(lost, h.get(p.key, "delivery", j, p.steps[j].attempts))
    else:
        assert lost.cause == Cause.TIMED_OUT
        assert lost.message.startswith(
            f"timed out after {label(shape, j)!r}: no {label(shape, j + 1)!r} within"
        )
        seen_is(lost, h.by_chain[p.key][-1])
    assert [s.channel for s in lost.timeline] == [o.channel for o in h.by_chain[p.key]]
    assert v_counts(v) == (len(sc.plans), len(sc.plans) - 1, 1, 0)


def v_counts(v: Verdict) -> tuple[int, int, int, int]:
    (fv,) = v.flows
    return fv.chains, fv.succeeded, fv.failed, fv.unknown


# ---------------------------------------------------------------- duplicates


@shapes
@PROPERTY
@given(data=st.data())
def test_a_second_message_at_a_step_is_a_duplicate(name: str, data: st.DataObject) -> None:
    shape = SHAPE[name]
    sc = data.draw(scenarios(shape))
    p = draw_chain(data, sc)
    j = data.draw(st.integers(0, len(shape.steps) - 1), label="step")
    later = data.draw(st.integers(1, 50_000), label="us after the original")
    h = render(replace(sc, p.index, dup_at=j, dup_us=later))
    dup = only(run(h), p.key, FindingKind.DUPLICATED)
    assert dup.step == label(shape, j)
    assert dup.message == f"2 messages at {label(shape, j)!r}, expected 1 (exactly-once)"
    seen_is(dup, h.get(p.key, "dup", j))
    seen_is(dup, h.get(p.key, "arrival", j))


# ---------------------------------------------------------------- ordering


@PROPERTY
@given(data=st.data())
def test_two_chains_of_one_record_key_swapped_are_reordered(data: st.DataObject) -> None:
    shape = SHOP
    kafka = next(i for i, s in enumerate(shape.steps) if s.kind == "topic")
    sc = data.draw(scenarios(shape, ensure=["healthy"]))
    a, b = data.draw(st.permutations(sc.of("healthy")))[:2]
    sc = replace(sc, b, customer=sc.plans[a].customer)
    h = render(sc)
    customer = sc.plans[a].customer
    there = sorted(
        (arrivals(h, p.key)[0], p.index)
        for p in sc.plans
        if p.customer == customer and kafka in arrivals(h, p.key)
    )
    n = data.draw(st.integers(0, len(there) - 2), label="pair")
    (_, first), (_, second) = there[n], there[n + 1]
    before = h.get(sc.plans[first].key, "arrival", kafka)
    h = render(sc, swap=(first, second, kafka))
    later = sc.plans[second].key
    found = only(run(h), later, FindingKind.REORDERED)
    assert found.step == label(shape, kafka)
    assert found.message.startswith(
        f"{later!r} overtook {sc.plans[first].key!r} at {label(shape, kafka)!r}"
    )
    assert [s.offset for s in found.seen] == [before.offset]
    seen_is(found, h.get(later, "arrival", kafka))


# ---------------------------------------------------------------- deadlines


@shapes
@PROPERTY
@given(data=st.data())
def test_a_step_after_its_deadline_is_late(name: str, data: st.DataObject) -> None:
    shape = SHAPE[name]
    sc = data.draw(scenarios(shape))
    p = draw_chain(data, sc)
    j = data.draw(st.sampled_from([i for i, s in enumerate(shape.steps) if s.deadline_ms]))
    deadline = shape.steps[j].deadline_ms
    assert deadline is not None
    t = arrivals(render(sc), p.key)
    hop = (t[j] - t[j - 1]) // 1000
    late = (deadline + data.draw(st.integers(20, 300), label="ms late")) * 1000
    sc = replace(sc, p.index, steps=with_step(p, j, hop_us=p.steps[j].hop_us + late - hop))
    h = render(sc)
    t = arrivals(h, p.key)
    v = run(h)
    found = all_findings(v)
    step_late = [f for f in found if f.step is not None]
    chain_late = [f for f in found if f.step is None]
    assert [(f.kind, f.key, f.step) for f in step_late] == [
        (FindingKind.LATE, p.key, label(shape, j))
    ], describe(v)
    assert step_late[0].message.startswith(
        f"{label(shape, j)!r} came {(t[j] - t[j - 1]) / 1e6:.0f}ms after {label(shape, j - 1)!r}"
    )
    seen_is(step_late[0], h.get(p.key, "arrival", j))
    # The whole chain is late too only when it took longer than the flow's deadline.
    total = t[len(shape.steps) - 1] - t[0]
    assert [(f.kind, f.key) for f in chain_late] == (
        [(FindingKind.LATE, p.key)] if total > shape.deadline_ms * MS else []
    )
    assert v_counts(v)[2] == 1


@PROPERTY
@given(data=st.data())
def test_a_chain_after_the_flows_deadline_is_late(data: st.DataObject) -> None:
    shape = SHOP  # three hops with a 2.5s deadline each, 6s end to end
    sc = data.draw(scenarios(shape))
    p = draw_chain(data, sc)
    # Every hop just over 2s, within its 2.5s deadline; the last consumer quick, so that
    # its acknowledgement still falls in the chain's window (a later one is ignored:
    # test_a_late_acknowledgement_is_not_an_unexpected_chain).
    steps = list(p.steps)
    steps[-1] = dataclasses.replace(steps[-1], attempts=1)
    for j in range(1, len(shape.steps)):
        want = data.draw(st.integers(2_050, 2_200), label="hop ms") * 1000
        hop = want - span_us(shape, steps[j - 1], j - 1)
        steps[j] = dataclasses.replace(steps[j], hop_us=hop)
    h = render(replace(sc, p.index, steps=steps))
    t = arrivals(h, p.key)
    total = t[len(shape.steps) - 1] - t[0]
    assert total > shape.deadline_ms * MS
    late = only(run(h), p.key, FindingKind.LATE)
    assert late.step is None
    assert late.message == (f"chain took {total / 1e6:.0f}ms end to end; the flow's deadline is 6s")


# ---------------------------------------------------------------- latency


@PROPERTY
@given(data=st.data())
def test_a_slow_hop_breaks_its_latency_budget(data: st.DataObject) -> None:
    shape = SHOP
    assert shape.hop_budget is not None
    j, budget_ms = shape.hop_budget
    sc = data.draw(scenarios(shape))
    for p in sc.plans:
        if p.dies_at is None or p.dies_at >= j:
            want = data.draw(st.integers(budget_ms + 100, 2_400), label="hop ms") * 1000
            sp = with_step(p, j, hop_us=want - span_us(shape, p.steps[j - 1], j - 1))
            sc = replace(sc, p.index, steps=sp)
    v = run(render(sc))
    found = only(v, None, FindingKind.LATENCY)
    hop = f"{label(shape, j - 1)} -> {label(shape, j)}"
    assert found.step == hop
    assert found.message.startswith(f"{hop}: p50 is ")
    samples = sum(p.dies_at is None or p.dies_at >= j for p in sc.plans)
    # The hop ends on Kafka (billing -> payments), whose tap may see a record a fetch wait late.
    assert (shape.topology.flows[shape.flow].steps[j].channel, j) == ("payments", 2)
    assert found.message.endswith(
        f"over its budget of {budget_ms:.1f}ms ({samples} samples, clock mono_ns; "
        "a tap may see a step up to 100ms late, broker 'kafka': tap_fetch_wait)"
    )
    assert v_counts(v) == (len(sc.plans), len(sc.plans), 0, 0)


# ---------------------------------------------------------------- retries and backoff


def retry_target(data: st.DataObject, sc: Scenario, steps: list[int]) -> tuple[ChainPlan, int]:
    """A chain and one of ``steps`` it reaches (the poison's own step included)."""
    shape = sc.shape
    fate = data.draw(st.sampled_from(["healthy", "poison"]), label="fate")
    p = draw_chain(data, sc, fate)
    reach = len(shape.steps) - 1 if p.dies_at is None else p.dies_at
    j = data.draw(st.sampled_from([i for i in steps if i <= reach]), label="step")
    return p, j


@shapes
@PROPERTY
@given(data=st.data())
def test_more_attempts_than_the_policy_allows(name: str, data: st.DataObject) -> None:
    shape = SHAPE[name]
    sc = data.draw(scenarios(shape, ensure=["poison"]))
    p, j = retry_target(data, sc, shape.retry_steps())
    m = shape.max_attempts
    h = render(replace(sc, p.index, steps=with_step(p, j, attempts=m + 1)))
    found = only(run(h), p.key, FindingKind.RETRIES)
    assert found.step == label(shape, j)
    assert found.message == f"{m + 1} attempts at {label(shape, j)!r}; the retry policy allows {m}"
    last = "retry" if shape.steps[j].kind == "topic" else "delivery"
    seen_is(found, h.get(p.key, last, j, m + 1))


@shapes
@PROPERTY
@given(data=st.data())
def test_attempts_closer_than_the_backoff(name: str, data: st.DataObject) -> None:
    shape = SHAPE[name]
    sc = data.draw(scenarios(shape, ensure=["poison"]))
    p, j = retry_target(data, sc, shape.backoff_steps())
    m = shape.max_attempts
    n = data.draw(st.integers(1, m - 1), label="retry")
    least = shape.least_gap_ms(n)
    gap = data.draw(st.integers(max(1_000, int(least * 1000) - 100_000), int(least * 1000) - 5_000))
    attempts = max(p.steps[j].attempts, n + 1)
    steps = with_step(p, j, attempts=attempts, gaps_us={n: gap})
    v = run(render(replace(sc, p.index, steps=steps)))
    found = only(v, p.key, FindingKind.BACKOFF)
    assert found.step == label(shape, j)
    assert found.message.startswith(
        f"attempt {n + 1} at {label(shape, j)!r} came {gap / 1000:.0f}ms after attempt {n}; "
        f"the backoff asks for {shape.backoff_ms[n - 1]}ms"
    )


@shapes
@PROPERTY
@given(data=st.data())
def test_a_poison_message_dead_lettered_too_soon(name: str, data: st.DataObject) -> None:
    shape = SHAPE[name]
    sc = data.draw(scenarios(shape, ensure=["poison"]))
    p = draw_chain(data, sc, "poison")
    assert p.poison is not None
    r = p.poison
    rule = shape.rules[r]
    m = shape.max_attempts
    k = data.draw(st.integers(1, m - 1), label="attempts")
    # A DLT record with neither retry records nor an attempts header is covered apart
    # (test_a_kafka_record_dead_lettered_at_its_first_attempt_is_too_soon).
    dlc = p.dlc or (shape.steps[r].kind == "topic" and k == 1)
    h = render(replace(sc, p.index, dlc=dlc, steps=with_step(p, r, attempts=k)))
    v = run(h)
    found = all_findings(v)
    assert {(f.kind, f.key, f.step) for f in found} == {
        (FindingKind.RETRIES, p.key, label(shape, r))
    }, describe(v)
    # One finding: the rule's own count where it gives one, else the policy's.
    expected = (
        f"dead-lettered after {k} attempts at {label(shape, r)!r}; expected {rule.attempts}"
        if rule.attempts is not None
        else f"dead-lettered after {k} attempts at {label(shape, r)!r}; the retry policy gives {m}"
    )
    assert [f.message for f in found] == [expected]
    dead = dead_obs(h, p)
    for f in found:
        assert f.seen
        assert any(same(f.seen[0], o) for o in dead)
    assert v_counts(v)[2] == 1


# ---------------------------------------------------------------- dead letters


@PROPERTY
@given(data=st.data())
def test_a_poison_message_dead_lettered_elsewhere(data: st.DataObject) -> None:
    shape = SHOP
    sc = data.draw(scenarios(shape, ensure=["poison"]))
    p = draw_chain(data, sc, "poison")
    assert p.poison is not None
    g = data.draw(st.sampled_from([i for i in shape.dl_steps() if i != p.poison]), label="dies at")
    steps = with_step(p, g, attempts=shape.max_attempts)
    if g > p.poison:
        steps = with_step(ChainPlan(**{**p.__dict__, "steps": steps}), p.poison, attempts=1)
    h = render(replace(sc, p.index, dies_at=g, steps=steps))
    found = only(run(h), p.key, FindingKind.DEAD_LETTER)
    first = dead_obs(h, p)[0]
    rule = shape.rules[p.poison]
    assert found.message == f"dead-lettered to {first.channel!r}, expected {rule.channel!r}"
    seen_is(found, first)


@PROPERTY
@given(data=st.data())
def test_a_poison_message_dead_lettered_for_the_wrong_reason(data: st.DataObject) -> None:
    shape = SHOP
    sc = data.draw(scenarios(shape, ensure=["poison"]))
    p = draw_chain(data, sc, "poison")
    assert p.poison is not None
    rule = shape.rules[p.poison]
    reason = data.draw(st.sampled_from(shape.steps[p.poison].wrong_reasons), label="reason")
    h = render(replace(sc, p.index, dead_reason=reason))
    found = only(run(h), p.key, FindingKind.DEAD_LETTER)
    assert found.message == (
        f"dead-lettered to {rule.channel!r} with reason {reason!r}, expected {rule.reason!r}"
    )
    seen_is(found, h.get(p.key, "dead", rule.channel))


@shapes
@PROPERTY
@given(data=st.data())
def test_a_poison_message_never_dead_lettered(name: str, data: st.DataObject) -> None:
    shape = SHAPE[name]
    sc = data.draw(scenarios(shape, ensure=["poison"]))
    p = draw_chain(data, sc, "poison")
    assert p.poison is not None
    rule = shape.rules[p.poison]
    as_healthy = data.draw(st.booleans(), label="went through as if healthy")
    if as_healthy:
        steps = with_step(p, p.poison, attempts=1)
        h = render(replace(sc, p.index, dies_at=None, steps=steps))
        what = "was processed as if healthy"
    else:
        h = render(replace(sc, p.index, no_dead=True))
        what = "was never dead-lettered"
    found = only(run(h), p.key, FindingKind.DEAD_LETTER)
    assert found.message == (
        f"message matching the dead-letter rule {what}; expected it in {rule.channel!r}"
    )
    assert found.step == (label(shape, p.poison) if rule.step_named else None)
    assert found.next_step == rule.channel


@shapes
@PROPERTY
@given(data=st.data())
def test_a_healthy_message_dead_lettered(name: str, data: st.DataObject) -> None:
    shape = SHAPE[name]
    sc = data.draw(scenarios(shape))
    p = draw_chain(data, sc)
    g = data.draw(st.sampled_from(shape.dl_steps()), label="dies at")
    k = data.draw(st.integers(1, shape.max_attempts), label="attempts")
    h = render(replace(sc, p.index, dies_at=g, steps=with_step(p, g, attempts=k)))
    found = only(run(h), p.key, FindingKind.DEAD_LETTER)
    assert found.cause == Cause.DEAD_LETTERED
    first = dead_obs(h, p)[0]
    assert found.message.startswith(f"healthy message dead-lettered to {first.channel!r}")
    spec = shape.steps[g]
    seen_is(found, h.get(p.key, "dead", spec.dead[-1]))


# ---------------------------------------------------------------- schema


@PROPERTY
@given(data=st.data())
def test_a_payload_breaking_its_schema(data: st.DataObject) -> None:
    shape = SHOP
    sc = data.draw(scenarios(shape, ensure=["poison"]))
    i = data.draw(st.sampled_from(sorted(shape.schema)), label="step")
    bad = data.draw(st.sampled_from(shape.schema[i]), label="payload")
    p = sc.plans[
        data.draw(
            st.sampled_from([q.index for q in sc.plans if q.dies_at is None or q.dies_at >= i])
        )
    ]
    h = render(replace(sc, p.index, bad_at=i, bad=bad))
    v = run(h)
    found = all_findings(v)
    assert {(f.kind, f.key) for f in found} == {(FindingKind.SCHEMA, p.key)}, describe(v)
    channel = shape.steps[i].channel
    copies = [
        o
        for o in h.by_chain[p.key]
        if o.channel == channel and o.kind in (Kind.PUBLISHED, Kind.ROUTED)
    ]
    # One message, maybe seen twice (flowcheck's PUBLISHED and the tap's ROUTED): at least
    # one finding for the message.
    assert len(found) == 1
    seen_is(found[0], copies[0])
    for f in found:
        assert f.flow == shape.flow
        assert f.step == channel
        assert f.message.startswith(f"payload on {channel!r} breaks its schema at {bad.path}: ")
        assert len(f.seen) == 1
        assert any(same(f.seen[0], o) for o in copies)
    assert not v.passed
    assert v_counts(v) == (len(sc.plans), len(sc.plans), 0, 0)


# ---------------------------------------------------------------- unroutable


@PROPERTY
@given(data=st.data())
def test_an_unroutable_publish_is_the_cause_of_the_loss(data: st.DataObject) -> None:
    shape = SHOP
    sc = data.draw(scenarios(shape))
    p = draw_chain(data, sc)
    # While tapping, the twin queue makes the publish routable: flowcheck's PUBLISHED
    # comes with the twin's UNROUTABLE (no queue of the topology is bound for the key).
    # Without a tap, the broker returns the mandatory publish: UNROUTABLE alone.
    how = data.draw(st.sampled_from(["tap", "return"]), label="seen by")
    fc = True if how == "tap" else data.draw(st.booleans(), label="published by flowcheck")
    h = render(replace(sc, p.index, fc=fc, unroutable=how))
    lost = only(run(h), p.key, FindingKind.LOST)
    assert lost.cause == Cause.UNROUTABLE
    assert lost.step == lost.next_step == label(shape, 1)
    assert lost.message.startswith(f"unroutable at {shape.steps[0].channel!r} (")
    seen_is(lost, h.get(p.key, "unroutable"))


# ---------------------------------------------------------------- gaps and the end


@shapes
@PROPERTY
@given(data=st.data())
def test_a_tap_gap_makes_broken_chains_unknown_never_lost(name: str, data: st.DataObject) -> None:
    shape = SHAPE[name]
    sc = data.draw(scenarios(shape))
    p = draw_chain(data, sc)
    j = data.draw(st.integers(0, len(shape.steps) - 2), label="stopped after")
    h = render(replace(sc, p.index, stop_after=j))
    mine = h.by_chain[p.key]
    channels = sorted(
        {s.channel for s in shape.steps}
        | {c for s in shape.steps for c in s.dead}
        | {s.retry_channel for s in shape.steps if s.retry_channel}
    )
    channel = data.draw(st.sampled_from(channels), label="gap on")
    # The gap starts while the chain is open and ends before its window does.
    first, last = mine[0].mono_ns, mine[-1].mono_ns
    g0 = data.draw(st.integers(first + 1, last + 1_000 * MS), label="gap start")
    g1 = min(g0 + data.draw(st.integers(1, 3_000)) * MS, first + (shape.window_ms - 500) * MS)
    assume(g1 > g0)
    gap = Observation(
        kind=Kind.GAP,
        broker="b",
        channel=channel,
        mono_ns=g0,
        wall=0.0,
        until_ns=g1,
        reason="connection lost",
    )
    # The tap saw nothing on that channel meanwhile; it reports the gap when it is back.
    hidden = {id(o) for o in h.observations if o.channel == channel and g0 <= o.mono_ns <= g1}
    kept = [o for o in h.observations if id(o) not in hidden]
    at = next((n for n, o in enumerate(kept) if o.mono_ns > g1), len(kept))
    feed = [*kept[:at], gap, *kept[at:]]
    # Which chains the gap leaves undecided: those it hides a step (or a dead letter) of.
    unknown, seen_chains = 0, 0
    for q in sc.plans:
        rendered = h.by_chain[q.key]
        still = [o for o in rendered if id(o) not in hidden]
        if not still:
            continue
        seen_chains += 1
        steps = {i for i in range(len(shape.steps)) if (q.key, "arrival", i) in h.tagged}
        kept_steps = {
            i
            for i in steps
            if any(
                id(h.tagged[(q.key, tag, i)]) not in hidden
                for tag in ("arrival", "routed")
                if (q.key, tag, i) in h.tagged
            )
        }
        dead = [o for o in rendered if o.kind is Kind.DEAD_LETTERED or o.channel in DEAD]
        dead_kept = [o for o in dead if id(o) not in hidden]
        if q.poison is not None:
            # Dead-lettered where it should be: decided, even if the gap hid some of its
            # attempts (then they are not judged) or every arrival. Seen only on the
            # dead-letter exchange on its way there: its arrival may be what the gap hid.
            there = [o for o in dead_kept if o.channel == shape.rules[q.poison].channel]
            unknown += bool(dead) and not there
        elif kept_steps != steps or q.index == p.index:
            unknown += 1
    v = check(shape.topology, feed, start_ns=h.start_ns, end_ns=h.end_ns)
    assert describe(v) == []
    (fv,) = v.flows
    assert (fv.chains, fv.succeeded, fv.failed, fv.unknown) == (
        seen_chains,
        seen_chains - unknown,
        0,
        unknown,
    )
    assert unknown >= 1
    assert [(g.channel, g.kind) for g in v.gaps] == [(channel, "gap")]
    # Attempts the gap may have hidden are not judged: listed, and the verdict is not green.
    clean = unjudged(sc)
    # So may everything, when the gap hid every chain: nothing decided, no latency sample.
    why = ("tap gap", "no chain was decided", "no sample")
    assert all(u.expectation in clean or any(w in u.why for w in why) for u in fv.unjudged), (
        fv.unjudged
    )
    assert v.passed == (not fv.unjudged)
    assert check(
        shape.topology, feed, start_ns=h.start_ns, end_ns=h.end_ns, allow_unjudged=True
    ).passed


@shapes
@PROPERTY
@given(data=st.data())
def test_the_end_of_the_recording_leaves_open_chains_unknown(
    name: str, data: st.DataObject
) -> None:
    shape = SHAPE[name]
    sc = data.draw(scenarios(shape))
    h = render(sc)
    p = max(sc.plans, key=lambda q: h.by_chain[q.key][0].mono_ns)  # the last to start
    if not p.healthy:
        assert p.poison is not None
        steps = with_step(p, p.poison, attempts=1)
        sc = replace(sc, p.index, poison=None, dies_at=None, steps=steps)
        p = sc.plans[p.index]
    j = data.draw(st.integers(0, len(shape.steps) - 2), label="stopped after")
    h = render(replace(sc, p.index, stop_after=j))
    end = max(o.mono_ns for o in h.observations) + MS
    assert end < h.by_chain[p.key][0].mono_ns + shape.window_ms * MS
    v = run(h, end_ns=end)
    assert describe(v) == []
    (fv,) = v.flows
    assert fv.failed == 0
    assert fv.unknown == 1
    clean = unjudged(sc)  # the open chain's own expectations are not judged: it is undecided
    assert all(clean.get(u.expectation, 0) >= u.chains for u in fv.unjudged), fv.unjudged
    assert v.passed == (not fv.unjudged)
    assert run(h, end_ns=end, allow_unjudged=True).passed


# ---------------------------------------------------------------- engine bugs found by the properties
#
# Minimal histories of what the properties above found; each test says what the checker
# should do.

T0 = 10_000.0  # ms after the recording's start: well past one window


def _at(
    kind: Kind,
    channel: str,
    key: str,
    ms: float,
    *,
    flow: str = "order",
    payload: dict[str, Any] | None = None,
    **fields: Any,
) -> Observation:
    body = payload if payload is not None else {"id": key, "customer": "c1", "amount": 5}
    return Observation(
        kind=kind,
        broker="b",
        channel=channel,
        mono_ns=START_NS + int((T0 + ms) * MS),
        wall=0.0,
        keys={flow: key},
        payload=json.dumps(body),
        **fields,
    )


def _shop_chain(
    key: str, *, fail: str | None = None, until: str = "shipments"
) -> list[Observation]:
    """A SHOP chain as the taps see it (orders -> billing -> payments -> shipments), up to
    ``until``; ``fail`` marks it poison for that step's dead-letter rule."""
    extra = {} if fail is None else {"fail": fail}
    rabbit = {"id": key, "customer": "c1", "amount": 5, **extra}
    kafka = {"id": key, "customer": "c1", "amount": 5, "currency": "EUR", **extra}
    redis = {"id": key, "customer": "c1", "address": "x", **extra}
    out = [
        _at(Kind.ROUTED, "orders", key, 0, payload=rabbit, fc_id="f1"),
        _at(Kind.ROUTED, "billing", key, 1, payload=rabbit, fc_id="f1"),
        _at(Kind.DELIVERED, "billing", key, 2, payload=rabbit, fc_id="f1", delivery_count=1),
    ]
    if until == "billing":
        return out
    out.append(
        _at(Kind.ROUTED, "payments", key, 10, payload=kafka, partition=0, offset=0, kafka_key="c1")
    )
    if until == "payments":
        return out
    return [
        *out,
        _at(Kind.ROUTED, "shipments", key, 20, payload=redis, entry_id="1-0"),
        _at(Kind.DELIVERED, "shipments", key, 21, payload=redis, entry_id="1-0", delivery_count=1),
    ]


def _check(shape: Shape, observations: list[Observation]) -> Verdict:
    observations = sorted(observations, key=lambda o: o.mono_ns)
    return check(shape.topology, observations, start_ns=START_NS, end_ns=START_NS + 600_000 * MS)


def test_a_kafka_record_dead_lettered_at_its_first_attempt_is_too_soon() -> None:
    chain = _shop_chain("k1", fail="payments", until="payments")
    dlt = _at(
        Kind.DEAD_LETTERED,
        "payments-dlt",
        "k1",
        30,
        payload={"id": "k1", "customer": "c1", "amount": 5, "currency": "EUR", "fail": "payments"},
        partition=0,
        offset=0,
        kafka_key="c1",
        origin="payments",
        reason="com.shop.PaymentDeclined",
    )
    v = _check(SHOP, [*chain, dlt])
    found = only(v, "k1", FindingKind.RETRIES)
    assert found.message == (
        "dead-lettered after 1 attempts at 'payments'; the retry policy gives 3"
    )


def test_a_poison_message_dead_lettered_too_soon_is_one_finding() -> None:
    chain = _shop_chain("k1", fail="billing", until="billing")
    dlq = _at(
        Kind.DEAD_LETTERED,
        "billing.dlq",
        "k1",
        5,
        payload={"id": "k1", "customer": "c1", "amount": 5, "fail": "billing"},
        fc_id="f1",
        origin="billing",
        reason="delivery_limit",
        delivery_count=0,
    )
    only(_check(SHOP, [*chain, dlq]), "k1", FindingKind.RETRIES)


def test_two_records_with_a_copied_flowcheck_id_are_a_duplicate() -> None:
    chain = _shop_chain("k1", until="payments")
    first = chain[-1].replace(fc_id="f1")
    second = first.replace(offset=1, mono_ns=first.mono_ns + MS)
    v = _check(SHOP, [*chain[:-1], first, second, *_shop_chain("k1")[-2:]])
    found = only(v, "k1", FindingKind.DUPLICATED)
    assert [s.offset for s in found.seen] == [0, 1]


def test_a_late_acknowledgement_is_not_an_unexpected_chain() -> None:
    ack = _at(
        Kind.CONSUMED,
        "shipments",
        "k1",
        9_000,
        payload={"id": "k1", "customer": "c1", "address": "x"},
        entry_id="1-0",
        group="shipping",
        delivery_count=1,
    )
    v = _check(SHOP, [*_shop_chain("k1"), ack])
    assert describe(v) == []


def test_a_gap_that_hid_the_first_step_leaves_the_chain_unknown() -> None:
    gap = Observation(
        kind=Kind.GAP,
        broker="b",
        channel="orders",
        mono_ns=START_NS + int((T0 - 5) * MS),
        wall=0.0,
        until_ns=START_NS + int((T0 + 0.5) * MS),
        reason="connection lost",
    )
    v = _check(SHOP, [gap, *_shop_chain("k1")[1:]])
    assert describe(v) == []
    assert v_counts(v) == (1, 0, 0, 1)


def test_a_gap_that_hid_a_retry_is_not_a_retries_finding() -> None:
    poison = {"id": "k1", "customer": "c1", "amount": 5, "currency": "EUR", "fail": "payments"}
    gap = Observation(
        kind=Kind.GAP,
        broker="b",
        channel="payments-retry",
        mono_ns=START_NS + int((T0 + 50) * MS),
        wall=0.0,
        until_ns=START_NS + int((T0 + 400) * MS),
        reason="connection lost",
    )
    retry = _at(
        Kind.ROUTED,
        "payments-retry",
        "k1",
        700,
        payload=poison,
        partition=0,
        offset=1,
        kafka_key="c1",
        delivery_count=3,
    )
    dlt = _at(
        Kind.DEAD_LETTERED,
        "payments-dlt",
        "k1",
        1_400,
        payload=poison,
        partition=0,
        offset=0,
        kafka_key="c1",
        origin="payments-retry",
        reason="com.shop.PaymentDeclined",
    )
    v = _check(SHOP, [*_shop_chain("k1", fail="payments", until="payments"), gap, retry, dlt])
    assert describe(v) == []


def test_a_poison_message_stuck_at_the_last_step_was_never_dead_lettered() -> None:
    chain = _shop_chain("k1", fail="shipping")
    body = json.loads(chain[-1].payload or "{}")
    redeliveries = [
        _at(Kind.REDELIVERED, "shipments", "k1", ms, payload=body, entry_id="1-0", delivery_count=n)
        for n, ms in ((2, 400), (3, 1_100))
    ]
    found = only(_check(SHOP, [*chain, *redeliveries]), "k1", FindingKind.DEAD_LETTER)
    assert found.message == (
        "message matching the dead-letter rule was never dead-lettered; "
        "expected it in 'shipments-dead'"
    )


def test_a_poison_message_late_at_a_step_is_late() -> None:
    chain = _shop_chain("k1", fail="payments", until="payments")
    late = chain[-1].replace(mono_ns=chain[-1].mono_ns + 3_000 * MS)
    dlt = _at(
        Kind.DEAD_LETTERED,
        "payments-dlt",
        "k1",
        3_100,
        payload=json.loads(late.payload or "{}"),
        partition=0,
        offset=0,
        kafka_key="c1",
        origin="payments",
        reason="com.shop.PaymentDeclined",
        delivery_count=3,
    )
    v = _check(SHOP, [*chain[:-1], late, dlt])
    late_findings = [f for f in all_findings(v) if f.kind is FindingKind.LATE]
    assert [(f.key, f.step) for f in late_findings] == [("k1", "payments")]


def test_one_broken_message_is_one_schema_finding() -> None:
    bad = {"id": "k1", "customer": "c1", "amount": -5}
    published = _at(Kind.PUBLISHED, "orders", "k1", 0, payload=bad, fc_id="f1")
    routed = _at(Kind.ROUTED, "orders", "k1", 0.2, payload=bad, fc_id="f1")
    v = _check(SHOP, [published, routed, *_shop_chain("k1")[1:]])
    only(v, "k1", FindingKind.SCHEMA)


RETRY_QUEUE_YAML = """
brokers:
  rabbit: {kind: rabbitmq}
channels:
  work: {broker: rabbit, kind: exchange, type: direct}
  retry: {broker: rabbit, kind: exchange, type: direct}
  jobs:
    broker: rabbit
    kind: queue
    bindings: [{exchange: work, key: jobs}]
    dead_letter: {exchange: retry, key: jobs}
    retry: [jobs.wait]
  jobs.wait:
    broker: rabbit
    kind: queue
    bindings: [{exchange: retry, key: jobs}]
    ttl: 1s
    dead_letter: {exchange: work, key: jobs}
flows:
  job:
    correlate: $.id
    steps: [work, jobs]
    deadline: 10s
    retry: {max_attempts: 3, backoff: 1s}
"""


def test_the_rabbitmq_retry_queue_pattern_is_a_retry() -> None:
    topology = loads(RETRY_QUEUE_YAML)

    def job(kind: Kind, channel: str, ms: float, **fields: Any) -> Observation:
        return _at(kind, channel, "j1", ms, flow="job", payload={"id": "j1"}, fc_id="f1", **fields)

    # What the RabbitMQ tap reports for one rejection, a 1s wait in jobs.wait, and success.
    history = [
        job(Kind.PUBLISHED, "work", 0, routing_key="jobs"),
        job(Kind.ROUTED, "work", 0.2, routing_key="jobs"),
        job(Kind.ROUTED, "jobs", 0.4, routing_key="jobs"),
        job(Kind.DELIVERED, "jobs", 1, delivery_count=1),
        job(Kind.ROUTED, "retry", 5, routing_key="jobs", delivery_count=2),
        job(Kind.DEAD_LETTERED, "jobs.wait", 5.2, reason="rejected", origin="jobs"),
        job(Kind.ROUTED, "work", 1_005, routing_key="jobs", delivery_count=2),
        job(Kind.DEAD_LETTERED, "jobs", 1_005.2, reason="expired", origin="jobs.wait"),
        job(Kind.DELIVERED, "jobs", 1_006, delivery_count=1),
    ]
    v = check(topology, history, start_ns=START_NS, end_ns=START_NS + 600_000 * MS)
    assert describe(v) == []

"""Retries the application re-publishes (counted as attempts, never duplicates), exact
attempts, expected give-ups and per-step delivery guarantees, on hand-written histories
shaped like what the RabbitMQ firehose shows for Celery and Dramatiq."""

from __future__ import annotations

from typing import Any

from history import MS, START, History

from flowcheck.checker import Verdict, check
from flowcheck.observations import Kind
from flowcheck.topology import Topology, loads

CHANNELS = """
brokers: {r: {kind: rabbitmq}}
channels:
  reserve: {broker: r, kind: queue}
  charge: {broker: r, kind: queue, retry: [charge.DQ]}
  charge.DQ: {broker: r, kind: queue}
  ship: {broker: r, kind: queue}
"""


def topology(flow: str) -> Topology:
    return loads(CHANNELS + "flows:\n  f:\n" + flow)


# Celery: the counter is a header, 0 on the first attempt.
CELERY = """\
    correlate: $.id
    deadline: 1s
    steps:
      - reserve
      - {channel: charge, retry: {max_attempts: 3, counter: {header: retries}}}
      - ship
"""


def attempt(h: History, channel: str, key: str, n: int, **body: Any) -> None:
    """One attempt as the firehose shows it: the publish straight to the queue, and its
    delivery (always "delivery 1": to the broker each attempt is a new message)."""
    h.routed(channel, key, {"id": key, **body}, headers={"retries": n - 1})
    h.add(Kind.DELIVERED, channel, key, {"id": key, **body}, delivery_count=1)


def celery(h: History, key: str, at: float, tries: int, ship: bool = True) -> None:
    h.at(at).routed("reserve", key)
    for n in range(1, tries + 1):
        attempt(h, "charge", key, n)
    if ship:
        h.routed("ship", key)


def run(t: Topology, h: History) -> Verdict:
    return check(t, h.sorted(), start_ns=START - 1000 * MS, end_ns=START + 60_000 * MS)


def found(v: Verdict) -> set[tuple[str, str | None]]:
    return {(f.kind.value, f.key) for f in v.flows[0].findings}


def test_retries_by_counter_are_attempts_not_duplicates() -> None:
    h = History()
    celery(h, "once", 0, 1)
    celery(h, "twice", 10, 2)
    celery(h, "thrice", 20, 3)
    v = run(topology(CELERY), h)
    assert found(v) == set()
    assert v.flows[0].succeeded == 3


def test_too_many_attempts_by_counter() -> None:
    h = History()
    celery(h, "k", 0, 4)
    v = run(topology(CELERY), h)
    assert found(v) == {("retries", "k")}
    assert "4 attempts at 'charge'" in v.flows[0].findings[0].message


def test_the_same_counter_twice_is_a_duplicate() -> None:
    h = History()
    h.at(0).routed("reserve", "first")
    attempt(h, "charge", "first", 1)
    attempt(h, "charge", "first", 1)  # a second message, not a retry
    h.routed("ship", "first")
    h.at(10).routed("reserve", "retry")
    attempt(h, "charge", "retry", 1)
    attempt(h, "charge", "retry", 2)
    attempt(h, "charge", "retry", 2)  # the retry published twice
    h.routed("ship", "retry")
    v = run(topology(CELERY), h)
    assert found(v) == {("duplicated", "first"), ("duplicated", "retry")}


def test_a_payload_counter_absent_on_the_first_attempt() -> None:
    flow = CELERY.replace("{header: retries}", "$.options.retries")
    h = History()
    h.at(0).routed("reserve", "k")
    for n in range(3):
        body: dict[str, Any] = {"id": "k", "options": {"retries": n} if n else {}}
        h.routed("charge", "k", body)
    h.routed("ship", "k")
    assert found(run(topology(flow), h)) == set()
    h.routed("charge", "k", {"id": "k", "options": {"retries": 3}})
    assert found(run(topology(flow), h)) == {("retries", "k")}


def test_the_same_id_is_an_attempt_and_a_new_id_a_duplicate() -> None:
    flow = CELERY.replace("counter: {header: retries}", "id: {header: task}")
    h = History()
    h.at(0).routed("reserve", "retried")
    for _ in range(3):
        h.routed("charge", "retried", headers={"task": "t1"})
    h.routed("ship", "retried")
    h.at(10).routed("reserve", "twice")
    h.routed("charge", "twice", headers={"task": "t2"})
    h.routed("charge", "twice", headers={"task": "t3"})
    h.routed("ship", "twice")
    h.at(20).routed("reserve", "many")
    for _ in range(4):
        h.routed("charge", "many", headers={"task": "t4"})
    h.routed("ship", "many")
    v = run(topology(flow), h)
    assert found(v) == {("duplicated", "twice"), ("retries", "many")}


def test_a_passage_through_a_delay_queue_lets_one_attempt_in() -> None:
    flow = CELERY.replace(", counter: {header: retries}", "")
    h = History()
    h.at(0).routed("reserve", "retried")
    h.routed("charge", "retried")
    h.routed("charge.DQ", "retried")
    h.routed("charge", "retried")
    h.routed("ship", "retried")
    h.at(10).routed("reserve", "twice")
    h.routed("charge", "twice")
    h.routed("charge", "twice")  # no passage before it: a second message
    h.routed("ship", "twice")
    v = run(topology(flow), h)
    assert found(v) == {("duplicated", "twice")}


def test_without_a_mark_a_republished_retry_is_a_duplicate() -> None:
    channels = CHANNELS.replace(", retry: [charge.DQ]", "")
    t = loads(channels + "flows:\n  f:\n" + CELERY.replace(", counter: {header: retries}", ""))
    h = History()
    celery(h, "k", 0, 2)
    assert found(run(t, h)) == {("duplicated", "k")}


def test_exact_attempts() -> None:
    flow = CELERY.replace("max_attempts: 3", "attempts: 2")
    h = History()
    celery(h, "two", 0, 2)
    celery(h, "one", 10, 1)
    celery(h, "three", 20, 3)
    v = run(topology(flow), h)
    assert found(v) == {("retries", "one"), ("retries", "three")}
    assert any("gives exactly 2" in f.message for f in v.flows[0].findings)


GIVES_UP = (
    CELERY
    + """\
    gives_up:
      - {when: {payload: {$.amount: {lt: 0}}}, step: charge, attempts: 3}
"""
)


def poison(h: History, key: str, at: float, tries: int, ship: bool = False) -> None:
    h.at(at).routed("reserve", key, {"id": key, "amount": -1})
    for n in range(1, tries + 1):
        attempt(h, "charge", key, n, amount=-1)
    if ship:
        h.routed("ship", key, {"id": key, "amount": -1})


def test_an_expected_give_up_is_counted() -> None:
    h = History()
    poison(h, "p", 0, 3)
    celery(h, "ok", 10, 2)
    v = run(topology(GIVES_UP), h)
    assert found(v) == set()
    fv = v.flows[0]
    assert (fv.gave_up, fv.succeeded, fv.failed) == (1, 2, 0)


def test_an_expected_give_up_is_judged_with_its_attempts() -> None:
    h = History()
    poison(h, "early", 0, 2)
    poison(h, "late", 10, 4)
    poison(h, "on", 20, 3, ship=True)
    v = run(topology(GIVES_UP), h)
    assert found(v) == {("retries", "early"), ("retries", "late"), ("give_up", "on")}
    early = next(f for f in v.flows[0].findings if f.key == "early")
    assert early.message == "given up after 2 attempts at 'charge'; expected 3"


def test_a_healthy_message_given_up_is_not_lost() -> None:
    h = History()
    celery(h, "gave", 0, 3, ship=False)
    celery(h, "lost", 10, 1, ship=False)
    v = run(topology(GIVES_UP), h)
    assert found(v) == {("give_up", "gave"), ("lost", "lost")}
    gave = next(f for f in v.flows[0].findings if f.key == "gave")
    assert (gave.step, gave.next_step) == ("charge", "ship")
    assert "after 3 attempts" in gave.message
    assert v.flows[0].gave_up == 1


def test_delivery_per_step() -> None:
    flow = """\
    correlate: $.id
    delivery: at-least-once
    steps: [reserve, charge, {channel: ship, delivery: exactly-once}]
"""
    h = History()
    h.at(0).routed("reserve", "k")
    h.routed("reserve", "k")
    h.routed("charge", "k")
    h.routed("charge", "k")
    h.routed("ship", "k")
    h.at(10).routed("reserve", "d")
    h.routed("charge", "d")
    h.routed("ship", "d")
    h.routed("ship", "d")
    v = run(topology(flow), h)
    assert found(v) == {("duplicated", "d")}
    assert v.flows[0].findings[0].step == "ship"

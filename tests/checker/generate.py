"""Hypothesis strategies for realistic observation histories, and the defects the checker must find.

A history is drawn as *plans* (one per chain: its fate, its timings, its
identities), then *rendered* into the observations the real taps produce:

- RabbitMQ: flowcheck's PUBLISHED (with ``fc_id``) and the twin queues' ROUTED
  copies; the firehose's DELIVERED / REDELIVERED with ``x-delivery-count`` + 1;
  a dead letter seen on the dead-letter exchange (ROUTED, x-death count) and as
  DEAD_LETTERED on the queue bound to it (reason, origin, x-delivery-count).
- Kafka: ROUTED records with partition (by record key), offset and CreateTime;
  retries as records on the retry topic (``retry_topic-attempts``); dead letters
  on the DLT with ``kafka_dlt-*`` headers; CONSUMED copies from committed offsets.
- Redis Streams: PUBLISHED / ROUTED entries with entry ids from the server clock;
  DELIVERED / REDELIVERED from the PEL with delivery counts; CONSUMED on XACK;
  dead letters as entries of the dead-letter stream.

Clean plans keep every timing valid (each step after the previous one, retries
spaced by the backoff, hops within their deadlines and latency budgets); a
defect is a change to one plan (or, for a reorder, a swap of two offsets).
Offsets and entry ids are given after all chains are laid out in time, as a
broker would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hypothesis import strategies as st

from flowcheck.checker.verdict import Seen
from flowcheck.observations import ID_HEADER, Kind, Observation
from flowcheck.topology import Topology, loads

MS = 1_000_000
US = 1_000
START_NS = 5_000 * 1_000 * MS  # the recording's monotonic clock at its start
WALL0 = 1_750_000_000.0  # Unix time at START_NS
TOLERANCE_MS = 150  # the checker's BACKOFF_TOLERANCE_NS, in ms
GRACE_MS = 2_000  # the checker's GRACE_NS, in ms

StepKind = Literal["exchange", "queue", "topic", "stream"]


# ---------------------------------------------------------------- shapes


@dataclass(frozen=True)
class StepSpec:
    """One step of a flow, as the generator needs to know it."""

    label: str
    channel: str
    kind: StepKind
    broker: str
    hop_us: tuple[int, int] = (200, 5_000)  # previous step's departure -> arrival here
    deadline_ms: int | None = None
    retry_channel: str | None = None  # Kafka retry topic
    dead: tuple[str, ...] = ()  # where its dead letters are seen (RabbitMQ: dlx, then dlq)
    dead_reason: str | None = None  # the reason the broker or consumer writes
    wrong_reasons: tuple[str, ...] = ()
    partitions: int = 1
    group: str | None = None
    retries_seen: bool = True  # do taps see its attempts (deliveries or retry records)?


@dataclass(frozen=True)
class RuleSpec:
    """A dead-letter rule, by the step whose consumer gives up."""

    channel: str
    reason: str | None
    attempts: int | None
    step_named: bool  # the rule names its step


@dataclass(frozen=True)
class BadPayload:
    """A payload that breaks a channel's schema, and where the checker must say it breaks."""

    changes: tuple[tuple[str, Any], ...]  # field -> new value (None: removed)
    path: str


@dataclass(frozen=True, repr=False)
class Shape:
    """A topology, its one flow, and how its messages look on the wire."""

    name: str
    topology: Topology
    flow: str
    steps: tuple[StepSpec, ...]
    max_attempts: int
    backoff_ms: tuple[int, ...]  # wait before attempt 2, 3, ... (one more than max_attempts needs)
    jitter: float
    deadline_ms: int
    rules: dict[int, RuleSpec]  # dying step -> the rule its poison messages match
    ordering: bool  # per-partition-key ordering is asserted
    correlate_header: str | None  # correlation by header (else by $.id)
    poison_header: str | None  # poison messages carry this header = "yes" (else payload $.fail)
    schema: dict[int, tuple[BadPayload, ...]] = field(default_factory=dict)
    hop_budget: tuple[int, int] | None = None  # (step, p50 ms) latency budget of a hop
    unroutable_key: str | None = None  # a routing key nothing in the topology binds

    def __repr__(self) -> str:
        return f"<shape {self.name}>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    @property
    def window_ms(self) -> int:
        return self.deadline_ms + GRACE_MS

    def dl_steps(self) -> list[int]:
        return [i for i, s in enumerate(self.steps) if s.dead]

    def retry_steps(self) -> list[int]:
        return [i for i, s in enumerate(self.steps) if s.kind != "exchange" and s.retries_seen]

    def backoff_steps(self) -> list[int]:
        """Steps whose deliveries taps see one by one (a RabbitMQ queue, a Redis group)."""
        return [i for i in self.retry_steps() if self.steps[i].kind in ("queue", "stream")]

    def least_gap_ms(self, n: int) -> float:
        """The least spacing the checker accepts between attempt ``n`` and ``n + 1``."""
        return self.backoff_ms[n - 1] * (1 - self.jitter) - TOLERANCE_MS


# The shop, the one definition of it: benchmarks/checker.py generates its recordings for
# this topology too (its channels, correlation, schemas and deadlines).
SHOP_YAML = """
name: shop
brokers:
  rabbit: {kind: rabbitmq}
  kafka: {kind: kafka}
  redis: {kind: redis}
channels:
  orders:
    broker: rabbit
    kind: exchange
    type: topic
    schema:
      json:
        type: object
        required: [id, customer, amount]
        properties:
          id: {type: string}
          customer: {type: string}
          amount: {type: number, minimum: 0}
  billing:
    broker: rabbit
    kind: queue
    type: quorum
    bindings: [{exchange: orders, key: "order.#"}]
    delivery_limit: 2
    dead_letter: {exchange: dlx, key: billing}
  dlx: {broker: rabbit, kind: exchange, type: direct}
  billing.dlq: {broker: rabbit, kind: queue, bindings: [{exchange: dlx, key: billing}]}
  payments:
    broker: kafka
    kind: topic
    partitions: 3
    key: $.customer
    retry: [payments-retry]
    dead_letter: payments-dlt
    schema:
      json:
        type: object
        required: [id, amount, currency]
        properties:
          amount: {type: number}
          currency: {enum: [EUR, USD]}
  payments-retry: {broker: kafka, kind: topic, partitions: 3}
  payments-dlt: {broker: kafka, kind: topic, partitions: 3}
  shipments:
    broker: redis
    kind: stream
    groups: [shipping]
    delivery_limit: 3
    dead_letter: shipments-dead
  shipments-dead: {broker: redis, kind: stream}
services:
  checkout: {publishes: [orders]}
  billing: {consumes: [billing], publishes: [payments]}
  payments:
    consumes: [{channel: payments, group: payments}, {channel: payments-retry, group: payments}]
    publishes: [shipments, payments-retry, payments-dlt]
  shipping: {consumes: [{channel: shipments, group: shipping}], publishes: [shipments-dead]}
flows:
  order:
    correlate: $.id
    steps:
      - orders
      - {channel: billing, deadline: 2500ms, latency: {p50: 1500ms}}
      - {channel: payments, deadline: 2500ms, latency: {p50: 1500ms}}
      - {channel: shipments, name: shipping, deadline: 2500ms}
    deadline: 6s
    ordering: per-partition-key
    retry: {max_attempts: 3, backoff: {initial: 300ms, multiplier: 2, max: 1s}}
    latency: {p50: 4s}
    dead_letters:
      - when: {payload: {$.fail: billing}}
        step: billing
        channel: billing.dlq
        reason: delivery_limit
        attempts: 3
      - when: {payload: {$.fail: payments}}
        step: payments
        channel: payments-dlt
        reason: com.shop.PaymentDeclined
      - when: {payload: {$.fail: shipping}}
        step: shipping
        channel: shipments-dead
        reason: delivery_limit
"""

JOBS_YAML = """
name: jobs
brokers:
  redis: {kind: redis}
  kafka: {kind: kafka}
channels:
  jobs:
    broker: redis
    kind: stream
    groups: [workers]
    delivery_limit: 4
    dead_letter: jobs-dead
  jobs-dead: {broker: redis, kind: stream}
  results: {broker: kafka, kind: topic, partitions: 2}
services:
  api: {publishes: [jobs]}
  worker: {consumes: [{channel: jobs, group: workers}], publishes: [results, jobs-dead]}
flows:
  job:
    correlate: {header: x-job-id}
    steps: [jobs, {channel: results, deadline: 4s}]
    deadline: 4s
    retry: {max_attempts: 4, backoff: 400ms}
    dead_letters:
      - {when: {headers: {x-poison: "yes"}}, channel: jobs-dead, attempts: 4}
"""

SHOP = Shape(
    name="shop",
    topology=loads(SHOP_YAML),
    flow="order",
    steps=(
        StepSpec("orders", "orders", "exchange", "rabbit"),
        StepSpec(
            "billing",
            "billing",
            "queue",
            "rabbit",
            hop_us=(200, 5_000),
            deadline_ms=2_500,
            dead=("dlx", "billing.dlq"),
            dead_reason="delivery_limit",
            wrong_reasons=("rejected", "expired", "maxlen"),
        ),
        StepSpec(
            "payments",
            "payments",
            "topic",
            "kafka",
            hop_us=(1_000, 30_000),
            deadline_ms=2_500,
            retry_channel="payments-retry",
            dead=("payments-dlt",),
            dead_reason="com.shop.PaymentDeclined",
            wrong_reasons=("java.lang.IllegalStateException", "com.shop.Timeout"),
            partitions=3,
            group="payments",
        ),
        StepSpec(
            "shipping",
            "shipments",
            "stream",
            "redis",
            hop_us=(500, 10_000),
            deadline_ms=2_500,
            dead=("shipments-dead",),
            dead_reason="delivery_limit",
            wrong_reasons=("rejected", "ValueError"),
            group="shipping",
        ),
    ),
    max_attempts=3,
    backoff_ms=(300, 600, 1_000, 1_000),
    jitter=0.0,
    deadline_ms=6_000,
    rules={
        1: RuleSpec("billing.dlq", "delivery_limit", 3, True),
        2: RuleSpec("payments-dlt", "com.shop.PaymentDeclined", None, True),
        3: RuleSpec("shipments-dead", "delivery_limit", None, True),
    },
    ordering=True,
    correlate_header=None,
    poison_header=None,
    schema={
        0: (
            BadPayload((("amount", -5),), "$.amount"),
            BadPayload((("amount", "12.50"),), "$.amount"),
            BadPayload((("customer", 42),), "$.customer"),
        ),
        2: (
            BadPayload((("currency", "GBP"),), "$.currency"),
            BadPayload((("amount", None),), "$"),
        ),
    },
    hop_budget=(2, 1_500),
    unroutable_key="refund.issued",
)

JOBS = Shape(
    name="jobs",
    topology=loads(JOBS_YAML),
    flow="job",
    steps=(
        StepSpec(
            "jobs",
            "jobs",
            "stream",
            "redis",
            dead=("jobs-dead",),
            dead_reason="too many deliveries",
            wrong_reasons=(),
            group="workers",
        ),
        StepSpec(
            "results",
            "results",
            "topic",
            "kafka",
            hop_us=(1_000, 30_000),
            deadline_ms=4_000,
            partitions=2,
            retries_seen=False,
        ),
    ),
    max_attempts=4,
    backoff_ms=(400, 400, 400, 400, 400),
    jitter=0.0,
    deadline_ms=4_000,
    rules={0: RuleSpec("jobs-dead", None, 4, False)},
    ordering=False,
    correlate_header="x-job-id",
    poison_header="x-poison",
)

SHAPES = (SHOP, JOBS)


# ---------------------------------------------------------------- plans


@dataclass
class StepPlan:
    hop_us: int  # previous departure -> arrival (0 at the first step)
    queue_us: int  # arrival -> first attempt
    attempts: int
    extra_us: list[int]  # per retry, over the backoff wait
    proc_us: int  # last attempt -> departure
    ack_us: int  # departure -> consumption evidence (commit, XACK)
    gaps_us: dict[int, int] = field(default_factory=dict)  # retry n -> exact spacing (defects)


@dataclass
class ChainPlan:
    index: int
    key: str
    customer: str
    desired_us: int
    amount: float
    fc: bool  # flowcheck published it (x-flowcheck-id)
    propagate: bool  # downstream producers copy its headers, x-flowcheck-id included
    dlx_first: bool | None  # RabbitMQ dead letters: seen on the dlx too (first or second), or not
    dlc: bool  # Kafka DLT / Redis dead entry carries the attempt count
    poison: int | None  # the dying step of the dead-letter rule it matches (None: healthy)
    dies_at: int | None  # where its consumer dead-letters it (None: it goes through)
    steps: list[StepPlan]
    # defects
    stop_after: int | None = None  # loss: nothing after this step
    drop_ack: bool = False  # ... nor its consumption evidence there
    no_dead: bool = False  # retried, then never dead-lettered
    dead_reason: str | None = None
    dup_at: int | None = None
    dup_us: int = 0
    dup_same_fc: bool = False  # the duplicate carries the original's (copied) x-flowcheck-id
    bad_at: int | None = None
    bad: BadPayload | None = None
    unroutable: Literal["tap", "return"] | None = None

    @property
    def healthy(self) -> bool:
        return self.poison is None and self.dies_at is None


Fate = Literal["healthy", "poison"]


@dataclass
class Scenario:
    shape: Shape
    plans: list[ChainPlan]

    def of(self, fate: Fate) -> list[int]:
        if fate == "healthy":
            return [p.index for p in self.plans if p.healthy]
        return [p.index for p in self.plans if p.poison is not None]


def _pick(rng: random.Random, lo: int, hi: int) -> int:
    """A value in [lo, hi], the bounds themselves often."""
    return rng.choice((lo, hi, rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi)))


def _step_plan(rng: random.Random, shape: Shape, i: int, attempts: int) -> StepPlan:
    spec = shape.steps[i]
    return StepPlan(
        hop_us=0 if i == 0 else _pick(rng, *spec.hop_us),
        queue_us=_pick(rng, 500, 20_000),
        attempts=attempts,
        extra_us=[_pick(rng, 0, 40_000) for _ in range(shape.max_attempts + 1)],
        proc_us=_pick(rng, 2_000, 60_000),
        ack_us=_pick(rng, 5_000, 300_000),
    )


@st.composite
def chain_plans(
    draw: st.DrawFn, shape: Shape, index: int, fate: Fate, customers: int, prefix: str
) -> ChainPlan:
    """One clean chain. Its fate and attempts are drawn; its timings come from a drawn seed
    (drawing each of them costs more than the checker takes to judge the history)."""
    m = shape.max_attempts
    poison: int | None = None
    if fate == "poison":
        poison = draw(st.sampled_from(sorted(shape.rules)))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    steps = []
    for i, spec in enumerate(shape.steps):
        if i == poison:
            attempts = m
        elif spec.kind == "exchange" or not spec.retries_seen:
            attempts = 1
        else:  # most messages go through at once; some need a retry or two
            attempts = rng.choice([1, 1, 1, *range(1, m + 1)])
        steps.append(_step_plan(rng, shape, i, attempts))
    return ChainPlan(
        index=index,
        key=f"{prefix}{index}",
        customer=f"cust-{draw(st.integers(1, customers))}",
        desired_us=draw(st.integers(0, 20_000_000)),
        amount=rng.randint(1, 100_000) / 100,
        fc=rng.random() < 0.5,
        propagate=rng.random() < 0.5,
        dlx_first=rng.choice([True, False, None]),
        dlc=rng.random() < 0.5,
        poison=poison,
        dies_at=poison,
        steps=steps,
    )


@st.composite
def scenarios(
    draw: st.DrawFn, shape: Shape, ensure: Sequence[Fate] = (), max_extra: int = 8
) -> Scenario:
    """Clean histories: the chains in ``ensure`` (at least two healthy ones) and a few more."""
    fates: list[Fate] = ["healthy", "healthy", *ensure]
    fates += draw(st.lists(st.sampled_from(["healthy", "poison"]), max_size=max_extra))
    customers = draw(st.integers(1, 4))
    prefix = draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)) + "-"
    plans = [draw(chain_plans(shape, i, fate, customers, prefix)) for i, fate in enumerate(fates)]
    return Scenario(shape, plans)


# ---------------------------------------------------------------- rendering


@dataclass
class _Ref:
    """A message's place on a Kafka topic or Redis stream, known once all is laid out."""

    channel: str
    partition: int | None
    value: int | str | None = None


@dataclass
class _Ev:
    t_ns: int
    kind: Kind
    channel: str
    broker: str
    chain: str
    tag: tuple[Any, ...]
    payload: dict[str, Any]
    headers: dict[str, Any]
    fields: dict[str, Any]
    ref: _Ref | None = None


@dataclass
class History:
    """Rendered observations, in recording order, and where each tagged one is."""

    shape: Shape
    plans: list[ChainPlan]
    observations: list[Observation]
    tagged: dict[tuple[Any, ...], Observation]
    by_chain: dict[str, list[Observation]]

    @property
    def start_ns(self) -> int:
        return START_NS

    @property
    def end_ns(self) -> int:
        """Well past every chain's window."""
        last = max(o.mono_ns for o in self.observations)
        return last + (self.shape.window_ms + 10_000) * MS

    def get(self, key: str, *tag: Any) -> Observation:
        return self.tagged[(key, *tag)]

    def chain(self, index: int) -> ChainPlan:
        return self.plans[index]


def trace_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def fc_of(key: str, n: int = 0) -> str:
    return hashlib.md5(f"{key}/{n}".encode()).hexdigest()


def partition_of(kafka_key: str, partitions: int) -> int:
    return zlib.crc32(kafka_key.encode()) % partitions


class _Renderer:
    def __init__(self, shape: Shape) -> None:
        self.shape = shape

    # -------------------------------------------------- message contents

    def body(self, p: ChainPlan, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Payload and headers of the chain's message at step ``i``."""
        shape = self.shape
        spec = shape.steps[i]
        tp = f"00-{trace_of(p.key)}-{fc_of(p.key, i)[:16]}-01"
        headers: dict[str, Any] = {"traceparent": tp}
        rabbit = spec.broker == "rabbit"
        if p.fc and (i == 0 or rabbit or p.propagate):
            headers[ID_HEADER] = fc_of(p.key)
        if shape.correlate_header:
            headers[shape.correlate_header] = p.key
        if shape.name == "shop":
            payload: dict[str, Any] = {"id": p.key, "customer": p.customer}
            if spec.kind == "topic":
                payload.update(amount=p.amount, currency="EUR")
            elif spec.kind == "stream":
                payload.update(address=f"{p.customer} street {p.index}")
            else:
                payload.update(amount=p.amount)
        else:
            payload = {"task": "resize", "n": p.index} if i == 0 else {"ok": True, "n": p.index}
        if p.poison is not None:
            if shape.poison_header:
                headers[shape.poison_header] = "yes"
            else:
                payload["fail"] = shape.steps[p.poison].label
        bad_here = p.bad_at == i or (
            p.bad_at is not None and rabbit and shape.steps[p.bad_at].broker == "rabbit"
        )
        if p.bad is not None and bad_here:
            for name, value in p.bad.changes:
                if value is None:
                    payload.pop(name, None)
                else:
                    payload[name] = value
        return payload, headers

    # -------------------------------------------------- one chain

    def chain(self, p: ChainPlan, start_us: int) -> list[_Ev]:
        shape = self.shape
        evs: list[_Ev] = []
        depart = start_us
        last = len(shape.steps) - 1 if p.stop_after is None else p.stop_after

        def ev(
            t: int,
            kind: Kind,
            channel: str,
            i: int,
            tag: tuple[Any, ...],
            *,
            ref: _Ref | None = None,
            headers: dict[str, Any] | None = None,
            **fields: Any,
        ) -> _Ev:
            payload, hdrs = self.body(p, i)
            e = _Ev(
                t * US,
                kind,
                channel,
                shape.steps[i].broker,
                p.key,
                tag,
                payload,
                {**hdrs, **(headers or {})},
                fields,
                ref,
            )
            evs.append(e)
            return e

        for i, spec in enumerate(shape.steps):
            if i > last:
                break
            sp = p.steps[i]
            t = depart + sp.hop_us
            ch = spec.channel
            dies = p.dies_at == i
            if spec.kind == "exchange":
                rk = "order.placed"
                if p.unroutable is not None:
                    rk = shape.unroutable_key or rk
                    if p.unroutable == "tap":
                        if p.fc:
                            ev(t, Kind.PUBLISHED, ch, i, ("arrival", i), routing_key=rk)
                        ev(
                            t + 300,
                            Kind.UNROUTABLE,
                            ch,
                            i,
                            ("unroutable",),
                            routing_key=rk,
                            reason="no queue of the topology is bound for this routing key",
                        )
                    else:
                        ev(
                            t,
                            Kind.UNROUTABLE,
                            ch,
                            i,
                            ("unroutable",),
                            routing_key=rk,
                            reason="NO_ROUTE",
                        )
                    return evs
                if p.fc:
                    ev(t, Kind.PUBLISHED, ch, i, ("arrival", i), routing_key=rk)
                    ev(t + 150, Kind.ROUTED, ch, i, ("routed", i), routing_key=rk)
                else:
                    ev(t, Kind.ROUTED, ch, i, ("arrival", i), routing_key=rk)
                if p.dup_at == i:
                    self._dup(p, i, t + p.dup_us, ev)
                depart = t
                continue
            if spec.kind == "queue":
                ev(t, Kind.ROUTED, ch, i, ("arrival", i), routing_key="order.placed")
                if p.dup_at == i:
                    self._dup(p, i, t + p.dup_us, ev)
                times = self._attempt_times(sp, t + sp.queue_us)
                for n, at in enumerate(times, start=1):
                    ev(
                        at,
                        Kind.DELIVERED if n == 1 else Kind.REDELIVERED,
                        ch,
                        i,
                        ("delivery", i, n),
                        headers={} if n == 1 else {"x-delivery-count": n - 1},
                        routing_key="order.placed",
                        delivery_count=n,
                    )
                depart = times[-1] + sp.proc_us
                if dies:
                    if not p.no_dead:
                        self._dead(p, i, depart, len(times), ev)
                    return evs
                continue
            if spec.kind == "topic":
                kk = p.customer if shape.name == "shop" else p.key
                ref = _Ref(ch, partition_of(kk, spec.partitions))
                ev(t, Kind.ROUTED, ch, i, ("arrival", i), ref=ref, kafka_key=kk)
                if p.dup_at == i:
                    self._dup(p, i, t + p.dup_us, ev, kafka_key=kk)
                first_try = t + sp.queue_us
                if not (p.drop_ack and p.stop_after == i) and spec.group:
                    ev(
                        first_try + sp.ack_us,
                        Kind.CONSUMED,
                        ch,
                        i,
                        ("consumed", i),
                        ref=ref,
                        kafka_key=kk,
                        group=spec.group,
                    )
                # Non-blocking retries (Spring @RetryableTopic): a failed attempt republishes
                # the record to the retry topic at once; its consumer waits out the backoff.
                tries = [first_try]
                n_attempts = sp.attempts if spec.retries_seen else 1
                for n in range(2, n_attempts + 1):
                    assert spec.retry_channel is not None
                    at = tries[-1] + sp.extra_us[(n - 2) % len(sp.extra_us)] + 1_000
                    ev(
                        at,
                        Kind.ROUTED,
                        spec.retry_channel,
                        i,
                        ("retry", i, n),
                        ref=_Ref(spec.retry_channel, partition_of(kk, spec.partitions)),
                        headers={"retry_topic-attempts": n},
                        kafka_key=kk,
                        delivery_count=n,
                    )
                    tries.append(at + self.shape.backoff_ms[n - 2] * 1000)
                depart = tries[-1] + sp.proc_us
                if dies:
                    if not p.no_dead:
                        self._dead(p, i, depart, len(tries), ev, kafka_key=kk)
                    return evs
                continue
            # a Redis stream
            ref = _Ref(ch, None)
            if i == 0 and p.fc:
                ev(t, Kind.PUBLISHED, ch, i, ("arrival", i), ref=ref)
                ev(t + 400, Kind.ROUTED, ch, i, ("routed", i), ref=ref)
            else:
                ev(t, Kind.ROUTED, ch, i, ("arrival", i), ref=ref)
            if p.dup_at == i:
                self._dup(p, i, t + p.dup_us, ev)
            times = self._attempt_times(sp, t + sp.queue_us)
            for n, at in enumerate(times, start=1):
                ev(
                    at,
                    Kind.DELIVERED if n == 1 else Kind.REDELIVERED,
                    ch,
                    i,
                    ("delivery", i, n),
                    ref=ref,
                    group=spec.group,
                    delivery_count=n,
                    reason=None if n == 1 else "consumer worker-2",
                )
            depart = times[-1] + sp.proc_us
            if dies:
                if not p.no_dead:
                    dead = self._dead(p, i, depart, len(times), ev)
                    ev(
                        dead + sp.ack_us,
                        Kind.CONSUMED,
                        ch,
                        i,
                        ("consumed", i),
                        ref=ref,
                        group=spec.group,
                        delivery_count=len(times),
                    )
                return evs
            if not (p.drop_ack and p.stop_after == i):
                ev(
                    depart + sp.ack_us,
                    Kind.CONSUMED,
                    ch,
                    i,
                    ("consumed", i),
                    ref=ref,
                    group=spec.group,
                    delivery_count=len(times),
                )
        return evs

    def _attempt_times(self, sp: StepPlan, first: int) -> list[int]:
        times = [first]
        for n in range(1, sp.attempts):
            gap = sp.gaps_us.get(n)
            if gap is None:
                wait = self.shape.backoff_ms[n - 1] * 1000
                gap = wait + sp.extra_us[(n - 1) % len(sp.extra_us)]
            times.append(times[-1] + gap)
        return times

    def _dup(self, p: ChainPlan, i: int, t: int, ev: Any, **fields: Any) -> None:
        """A second copy of the chain's message at step ``i``: at the first step, the same
        message published again (its body, without flowcheck's id: a second id would be
        a second message flowcheck sent); past it, one message more than came in."""
        spec = self.shape.steps[i]
        headers: dict[str, Any] = {}
        if i == 0:
            if not p.dup_same_fc:
                headers[ID_HEADER] = None  # a publisher sending the same body again
        elif spec.broker == "rabbit":
            headers[ID_HEADER] = fc_of(p.key, 1)  # a second publish
        elif not p.dup_same_fc:
            headers[ID_HEADER] = None  # a producer that does not copy headers
        ref = (
            _Ref(spec.channel, partition_of(fields["kafka_key"], spec.partitions))
            if (spec.kind == "topic")
            else (_Ref(spec.channel, None) if spec.kind == "stream" else None)
        )
        extra = {"routing_key": "order.placed"} if spec.broker == "rabbit" else {}
        ev(t, Kind.ROUTED, spec.channel, i, ("dup", i), ref=ref, headers=headers, **extra, **fields)

    def _dead(self, p: ChainPlan, i: int, t: int, attempts: int, ev: Any, **fields: Any) -> int:
        """The chain's dead letter after ``attempts`` at step ``i``; returns when it was seen."""
        spec = self.shape.steps[i]
        reason = p.dead_reason or spec.dead_reason
        if spec.kind == "queue":
            dlx, dlq = spec.dead
            death = {"x-death": [{"queue": spec.channel, "reason": reason, "count": 1}]}
            seq = {None: [dlq], True: [dlx, dlq], False: [dlq, dlx]}[p.dlx_first]
            for n, ch in enumerate(seq):
                at = t + 200 * n
                if ch == dlx:  # the dead-letter exchange's twin: x-death count, no reason
                    ev(
                        at,
                        Kind.ROUTED,
                        dlx,
                        i,
                        ("dead", dlx),
                        headers=death,
                        routing_key="billing",
                        delivery_count=2,
                    )
                else:  # x-delivery-count: failed deliveries before the death, if given
                    count = attempts - 1 if p.dlc else None
                    ev(
                        at,
                        Kind.DEAD_LETTERED,
                        dlq,
                        i,
                        ("dead", dlq),
                        headers={**death, "x-delivery-count": count},
                        routing_key="billing",
                        reason=reason,
                        origin=spec.channel,
                        delivery_count=count,
                    )
            return t
        (ch,) = spec.dead
        if spec.kind == "topic":
            origin = spec.channel
            if attempts > 1 and p.dlx_first and spec.retry_channel:  # the plan's coin, reused
                origin = spec.retry_channel  # it last failed on the retry topic
            headers: dict[str, Any] = {
                "kafka_dlt-original-topic": origin,
                "kafka_dlt-exception-fqcn": reason,
            }
            if p.dlc:
                headers["retry_topic-attempts"] = attempts
            ev(
                t,
                Kind.DEAD_LETTERED,
                ch,
                i,
                ("dead", ch),
                ref=_Ref(ch, partition_of(fields["kafka_key"], spec.partitions)),
                headers=headers,
                reason=reason,
                origin=origin,
                delivery_count=attempts if p.dlc else None,
                **fields,
            )
            return t
        headers = {"reason": reason, "deliveries": str(attempts)}
        ev(
            t,
            Kind.DEAD_LETTERED,
            ch,
            i,
            ("dead", ch),
            ref=_Ref(ch, None),
            headers=headers,
            reason=reason,
            origin=spec.channel,
            delivery_count=attempts,
        )
        return t

    # -------------------------------------------------- the whole history

    def render(self, plans: Sequence[ChainPlan]) -> tuple[list[_Ev], dict[str, int]]:
        """Events of every chain, chains of one record key one after the other."""
        evs: list[_Ev] = []
        starts: dict[str, int] = {}
        free: dict[str, int] = {}  # record key -> when its previous chain is done
        for p in sorted(plans, key=lambda q: (q.desired_us, q.index)):
            start = START_NS // US + (self.shape.window_ms + 1_000) * 1_000 + p.desired_us
            if self.shape.ordering:
                start = max(start, free.get(p.customer, 0) + 1_000 + p.index)
            mine = self.chain(p, start)
            starts[p.key] = start
            if mine:
                free[p.customer] = max(e.t_ns for e in mine) // US
            evs.extend(mine)
        return evs, starts


def _entry_id(t_ns: int, last: dict[str, tuple[int, int]], stream: str) -> str:
    ms = int((WALL0 + (t_ns - START_NS) / 1e9) * 1000)
    prev = last.get(stream)
    seq = prev[1] + 1 if prev is not None and prev[0] >= ms else 0
    ms = max(ms, prev[0]) if prev is not None else ms
    last[stream] = (ms, seq)
    return f"{ms}-{seq}"


def layout(evs: list[_Ev]) -> list[_Ev]:
    """Recording order, with offsets and entry ids given as the brokers would."""
    order = sorted(range(len(evs)), key=lambda n: (evs[n].t_ns, n))
    out = [evs[n] for n in order]
    offsets: dict[tuple[str, int | None], int] = {}
    last: dict[str, tuple[int, int]] = {}
    for e in out:
        ref = e.ref
        if ref is None or ref.value is not None:
            continue
        if ref.partition is not None:
            k = (ref.channel, ref.partition)
            ref.value = offsets.get(k, 0)
            offsets[k] = ref.value + 1
        else:
            ref.value = _entry_id(e.t_ns, last, ref.channel)
    return out


def to_observations(shape: Shape, plans: list[ChainPlan], evs: list[_Ev]) -> History:
    obs: list[Observation] = []
    tagged: dict[tuple[Any, ...], Observation] = {}
    by_chain: dict[str, list[Observation]] = {}
    for e in evs:
        fields = dict(e.fields)
        if e.ref is not None:
            if e.ref.partition is not None:
                fields.update(partition=e.ref.partition, offset=e.ref.value)
            else:
                assert isinstance(e.ref.value, str)
                fields.update(entry_id=e.ref.value, broker_ms=int(e.ref.value.split("-")[0]))
        headers = {k: v for k, v in e.headers.items() if v is not None}
        body = json.dumps(e.payload, sort_keys=True)
        fc = headers.get(ID_HEADER)
        tp = headers.get("traceparent")
        wall = WALL0 + (e.t_ns - START_NS) / 1e9
        if e.broker == "kafka" and "broker_ms" not in fields:
            fields["broker_ms"] = int(wall * 1000)
        o = Observation(
            kind=e.kind,
            broker=e.broker,
            channel=e.channel,
            mono_ns=e.t_ns,
            wall=wall,
            fc_id=fc,
            message_id=fc if e.broker == "rabbit" else None,
            trace_id=tp.split("-")[1] if isinstance(tp, str) else None,
            keys={shape.flow: e.chain},
            headers=headers,
            payload=body,
            size=len(body.encode()),
            **fields,
        )
        obs.append(o)
        tagged[(e.chain, *e.tag)] = o
        by_chain.setdefault(e.chain, []).append(o)
    return History(shape, plans, obs, tagged, by_chain)


def render(scenario: Scenario, swap: tuple[int, int, int] | None = None) -> History:
    """Observations of the scenario's plans; ``swap=(a, b, step)`` swaps the offsets of
    chains ``a`` and ``b`` at a Kafka step (a reorder)."""
    shape = scenario.shape
    r = _Renderer(shape)
    evs, _ = r.render(scenario.plans)
    evs = layout(evs)
    if swap is not None:
        a, b, step = swap
        ka, kb = scenario.plans[a].key, scenario.plans[b].key
        ra = next(e.ref for e in evs if e.chain == ka and e.tag == ("arrival", step))
        rb = next(e.ref for e in evs if e.chain == kb and e.tag == ("arrival", step))
        assert ra is not None
        assert rb is not None
        assert ra.partition == rb.partition
        ra.value, rb.value = rb.value, ra.value
    return to_observations(shape, scenario.plans, evs)


def replace(scenario: Scenario, index: int, **changes: Any) -> Scenario:
    """The scenario with one chain's plan changed."""
    plans = list(scenario.plans)
    plans[index] = dataclasses.replace(plans[index], **changes)
    return Scenario(scenario.shape, plans)


def with_step(plan: ChainPlan, i: int, **changes: Any) -> list[StepPlan]:
    """The plan's steps with step ``i`` changed."""
    steps = list(plan.steps)
    steps[i] = dataclasses.replace(steps[i], **changes)
    return steps


# ---------------------------------------------------------------- timings of a rendered chain


def arrivals(h: History, key: str) -> dict[int, int]:
    """First arrival time (ns) per step of a rendered chain."""
    out: dict[int, int] = {}
    for i, _ in enumerate(h.shape.steps):
        o = h.tagged.get((key, "arrival", i))
        if o is not None:
            out[i] = o.mono_ns
    return out


def span_us(shape: Shape, sp: StepPlan, i: int) -> int:
    """Arrival at step ``i`` -> departure towards the next step, as rendered."""
    spec = shape.steps[i]
    if spec.kind == "exchange":
        return 0
    r = _Renderer(shape)
    if spec.kind == "topic":
        at = sp.queue_us
        for n in range(2, (sp.attempts if spec.retries_seen else 1) + 1):
            at += sp.extra_us[(n - 2) % len(sp.extra_us)] + 1_000 + shape.backoff_ms[n - 2] * 1000
        return at + sp.proc_us
    return r._attempt_times(sp, sp.queue_us)[-1] + sp.proc_us


# ---------------------------------------------------------------- comparing with the verdict


def unjudged(scenario: Scenario) -> dict[str, int]:
    """The expectations a clean scenario leaves unjudged, with the chains each is about:
    attempts no tap sees (a step with ``retries_seen=False``), and the backoff of retries
    whose times no tap sees (a Kafka topic's retries are records on its retry topic,
    written at once: when each attempt was made does not show)."""
    shape = scenario.shape
    out: dict[str, int] = {}
    for p in scenario.plans:
        last = len(shape.steps) - 1 if p.dies_at is None else p.dies_at
        for i in range(last + 1):
            spec = shape.steps[i]
            if spec.kind == "exchange":
                continue
            where = f"at {spec.label!r}"
            if not spec.retries_seen:
                for what in (f"retry max_attempts {shape.max_attempts}", "retry backoff"):
                    out[f"{what} {where}"] = out.get(f"{what} {where}", 0) + 1
            elif spec.kind == "topic" and p.steps[i].attempts > 1:
                out[f"retry backoff {where}"] = out.get(f"retry backoff {where}", 0) + 1
    return out


def same(seen: Seen, obs: Observation) -> bool:
    """Is ``seen`` the verdict's reference to ``obs``?"""
    return (
        seen.kind == obs.kind.value
        and seen.channel == obs.channel
        and seen.fc_id == obs.fc_id
        and seen.partition == obs.partition
        and seen.offset == obs.offset
        and seen.entry_id == obs.entry_id
        and seen.delivery_count == obs.delivery_count
        and seen.at_ms == round((obs.mono_ns - START_NS) / 1e6, 3)
    )


def dump(observations: Sequence[Observation]) -> str:
    """A compact listing of observations, for failure messages and bug reports."""
    lines = []
    for o in observations:
        at = (o.mono_ns - START_NS) / 1e6
        parts = [f"{at:10.1f}ms", f"{o.kind.value:13}", f"{o.channel:14}", str(o.keys)]
        for name in (
            "fc_id",
            "partition",
            "offset",
            "entry_id",
            "delivery_count",
            "reason",
            "origin",
            "kafka_key",
            "until_ns",
        ):
            value = getattr(o, name)
            if value is not None:
                parts.append(f"{name}={value}")
        lines.append(" ".join(parts))
    return "\n".join(lines)

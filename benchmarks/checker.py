"""`flowcheck check` end to end on generated recordings: its throughput and peak memory,
beside a naive checker and the bare cost of reading the file, or beside another version
of flowcheck (``--baseline REF``).

Recordings are generated once (and cached) for the shop topology of the checker's
property tests (``SHOP_YAML`` in tests/checker/generate.py): an order on a RabbitMQ
exchange, its billing queue, a Kafka topic keyed by customer and a Redis stream,
correlated by ``$.id``, with the observations the taps produce (PUBLISHED / ROUTED /
DELIVERED / CONSUMED) and the recorder's header and end record. Chains start at a
steady rate, so the number of open chains stays about the same however long the
recording is; a small share of them are lost, duplicated or late, and a few orders
break the exchange's schema, so the checker has findings to produce.

For each size, every measurement runs in a fresh process and is repeated ``--rounds``
times (the naive baseline ``--naive-rounds``; ``--budget`` minutes may cut rounds past
the first), modes interleaved; the tables give medians:

    parse      json.loads on every line (the standard library): the bare cost of parsing
               the file, what any Python tool that reads it pays; the 2x target's yardstick
    read       iterate flowcheck.trace.Reader over the file: lines decoded (msgspec) into
               typed observations, the part of `flowcheck check` that is not checking
    naive      what one writes first: every observation in a list, grouped by key in
               dicts, everything sorted, percentiles by sorting all latencies
    flowcheck  `python -m flowcheck check TOPOLOGY TRACE --report-dir DIR` with this tree on
               PYTHONPATH: wall time from spawn to exit (interpreter start included)
    baseline   the same command with git REF's flowcheck package on PYTHONPATH

`flowcheck check` must give a verdict (exit 0 or 1) without warnings; anything else
(exit 2: a bad topology or trace, 3: a tap gap) stops the benchmark with its message.

    PYTHONPATH=. .venv/bin/python benchmarks/checker.py [--sizes 100000,1000000,4000000]
        [--rounds 3] [--naive-rounds 1] [--budget 15] [--workdir DIR] [--chain-rate 250]
        [--modes parse,read,naive,flowcheck] [--baseline REF]
    PYTHONPATH=. .venv/bin/python benchmarks/checker.py --profile 1000000   # cProfile

For parse, read and naive, seconds are the work inside the child process (after
imports); "process s" is the whole child from spawn to exit. The last line is JSON with
every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import heapq
import io
import itertools
import json
import math
import os
import platform
import pstats
import random
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the repository: the tree measured by default
FLOW = "order"
GEN_VERSION = 2  # bump when the generated files change: cached files are then regenerated
DEFAULT_SIZES = (100_000, 1_000_000, 4_000_000)
DEFAULT_CHAIN_RATE = 250.0  # chains started per second of recording
WINDOW_S = 8.0  # the flow's deadline (6s) + the checker's grace (2s): how long a chain stays open
CUSTOMER_EVERY_S = (
    10.0  # a customer's next order this long after its last: ordered, never overlapping
)
MODES = ("parse", "read", "naive", "flowcheck", "baseline")
MS = 1_000_000  # ns
MONO0 = 7_200_000_000_000  # the recording's monotonic clock at its start (2 hours of uptime)
WALL0 = 1_750_000_000.0  # and the wall clock then


def shop_yaml() -> str:
    """The shop topology of the checker's property tests: one definition for both."""
    sys.path.insert(0, str(ROOT / "tests" / "checker"))
    from generate import SHOP_YAML

    return SHOP_YAML


# Share of chains with each defect (one defect a chain at most), and the rest.
LOST_AT_BILLING = 0.002  # billed never: no payments record
LOST_AT_PAYMENTS = 0.002  # paid, never shipped
DUPLICATED = 0.002  # the payment published twice (a producer retry): exactly-once broken
LATE = 0.002  # shipped 2.6-3.4s after the payment: the step's 2.5s deadline missed
SCHEMA_BROKEN = 0.001  # the order has no amount: a schema finding, the chain itself succeeds
PUBLISHED_BY_FLOWCHECK = 0.1  # orders flowcheck published itself (PUBLISHED + fc_id)

# ------------------------------------------------------------------ generator

# Event tags, in the order a chain produces them.
PUB, EX, Q, QDEL, PAY, PAYC, PAY2, PAY2C, SHIP, SHIPD, SHIPC = range(11)


@dataclass
class _Order:
    """One chain as the generator knows it: the JSON fragments its observations share
    (encoded once), and broker positions, filled in when its records are written."""

    partition: int
    rabbit: str  # from fc_id (or message_id) to the end of a RabbitMQ observation
    pay_head: str  # trace_id .. partition, up to the offset
    pay_tail: str  # headers, payload, size
    ship_head: str  # trace_id, keys, up to the entry id
    ship_tail: str  # headers, payload, size
    offsets: list[int] = field(default_factory=list)
    pay_ms: list[int] = field(default_factory=list)
    entry_id: str = ""
    ship_ms: int = 0


@dataclass
class Recording:
    trace: Path
    topology: Path
    meta: dict[str, Any]


class _Positions:
    """Kafka offsets per partition and Redis entry ids, handed out in recording order."""

    def __init__(self) -> None:
        self.offsets = [0, 0, 0]
        self.last_ms = 0
        self.seq = 0

    def offset(self, partition: int) -> int:
        n = self.offsets[partition]
        self.offsets[partition] = n + 1
        return n

    def entry_id(self, ms: int) -> str:
        if ms <= self.last_ms:
            self.seq += 1
            ms = self.last_ms
        else:
            self.last_ms, self.seq = ms, 0
        return f"{ms}-{self.seq}"


def _line(tag: int, ns: int, o: _Order, pos: _Positions) -> str:
    """The JSON line of one observation, as Writer writes it: fields in model order,
    defaults left out. Built from pre-encoded fragments: json.dumps per line is slow."""
    wall = round(WALL0 + (ns - MONO0) / 1e9, 6)
    head = f'"mono_ns":{ns},"wall":{wall!r}'
    if tag <= QDEL:  # RabbitMQ: the exchange and queue twins, the firehose delivery
        kind = "published" if tag == PUB else "delivered" if tag == QDEL else "routed"
        channel = "orders" if tag in (PUB, EX) else "billing"
        end = ',"delivery_count":1}' if tag == QDEL else "}"
        return f'{{"kind":"{kind}","broker":"rabbit","channel":"{channel}",{head},{o.rabbit}{end}'
    if tag <= PAY2C:  # Kafka: the record, then the group's commit past it
        if tag in (PAY, PAY2):
            o.offsets.append(pos.offset(o.partition))
            o.pay_ms.append(int(wall * 1000))
        n = 0 if tag in (PAY, PAYC) else 1
        kind, group = ("routed", "") if tag in (PAY, PAY2) else ("consumed", '"group":"payments",')
        return (
            f'{{"kind":"{kind}","broker":"kafka","channel":"payments",{head},'
            f'"broker_ms":{o.pay_ms[n]},{o.pay_head}{o.offsets[n]},{group}{o.pay_tail}'
        )
    if tag == SHIP:  # Redis: the entry, then the group's PEL evidence
        o.ship_ms = int(wall * 1000)
        o.entry_id = pos.entry_id(o.ship_ms)
        return (
            f'{{"kind":"routed","broker":"redis","channel":"shipments",{head},'
            f'"broker_ms":{o.ship_ms},{o.ship_head}{o.entry_id}",{o.ship_tail}'
        )
    kind = "delivered" if tag == SHIPD else "consumed"
    return (
        f'{{"kind":"{kind}","broker":"redis","channel":"shipments",{head},'
        f'"broker_ms":{o.ship_ms},{o.ship_head}{o.entry_id}","group":"shipping","delivery_count":1}}'
    )


_json = json.JSONEncoder(separators=(",", ":")).encode


def _iso(ns: int) -> str:
    t = WALL0 + (ns - MONO0) / 1e9
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _chain(
    i: int, t0: int, customer: str, rng: random.Random, defects: Counter[str]
) -> tuple[_Order, list[tuple[int, int]]]:
    """One order's chain starting at ``t0``: its state and its (time, tag) events."""
    oid = f"ord-{i:08d}-{rng.getrandbits(24):06x}"
    trace = f"{rng.getrandbits(128):032x}"

    def tp() -> str:
        return f"00-{trace}-{rng.getrandbits(64):016x}-01"

    broken = rng.random() < SCHEMA_BROKEN
    # A broken order is never flowcheck's own: one arrival on the exchange, one finding.
    published = not broken and rng.random() < PUBLISHED_BY_FLOWCHECK
    fc_id = f"{rng.getrandbits(128):032x}" if published else None
    address = {
        "name": f"Customer {customer}",
        "street": f"{1 + i % 180} Market Street",
        "city": rng.choice(("Berlin", "Lyon", "Porto", "Turin", "Utrecht")),
        "zip": f"{rng.randrange(10000, 99999)}",
    }
    amount = round(rng.uniform(5, 400), 2)
    order: dict[str, Any] = {
        "id": oid,
        "revision": 1,
        "customer": customer,
        "amount": amount,
        "currency": "EUR",
        "card": "4242424242424242",
        "address": address,
        "placed_at": _iso(t0),
    }
    if broken:
        del order["amount"]
        defects["schema"] += 1
    order_headers = {"traceparent": tp()}
    if fc_id is not None:
        order_headers["x-flowcheck-id"] = fc_id
    order_body = json.dumps(order)
    pay_body = json.dumps(
        {
            "id": oid,
            "customer": customer,
            "amount": amount,
            "currency": "EUR",
            "status": "approved",
            "card_last4": "4242",
            "charged_at": _iso(t0 + 20 * MS),
        }
    )
    ship_body = json.dumps(
        {
            "id": oid,
            "customer": customer,
            "address": address,
            "carrier": "dhl",
            "created_at": _iso(t0 + 80 * MS),
        }
    )
    message_id = fc_id or f"{rng.getrandbits(128):032x}"
    keys = _json({FLOW: oid})
    partition = zlib.crc32(customer.encode()) % 3  # the payments topic is keyed by customer
    o = _Order(
        partition=partition,
        rabbit=(f'"fc_id":"{fc_id}",' if fc_id else "")
        + f'"message_id":"{message_id}","trace_id":"{trace}","keys":{keys},'
        + f'"routing_key":"order.placed","headers":{_json(order_headers)},'
        + f'"payload":{_json(order_body)},"size":{len(order_body)}',
        pay_head=f'"trace_id":"{trace}","keys":{keys},"kafka_key":{_json(customer)},'
        + f'"partition":{partition},"offset":',
        pay_tail=f'"headers":{_json({"traceparent": tp()})},'
        + f'"payload":{_json(pay_body)},"size":{len(pay_body)}}}',
        ship_head=f'"trace_id":"{trace}","keys":{keys},"entry_id":"',
        ship_tail=f'"headers":{_json({"traceparent": tp()})},'
        + f'"payload":{_json(ship_body)},"size":{len(ship_body)}}}',
    )
    ev: list[tuple[int, int]] = []
    t = t0
    if published:
        ev.append((t, PUB))
        t += rng.randint(200_000, 600_000)
    ev.append((t, EX))
    t += rng.randint(50_000, 1_000_000)
    ev.append((t, Q))
    ev.append((t + rng.randint(MS // 2, 5 * MS), QDEL))
    u = rng.random()
    if u < LOST_AT_BILLING:
        defects["lost"] += 1
        return o, ev
    u -= LOST_AT_BILLING
    t += int(min(rng.lognormvariate(math.log(15 * MS), 0.6), 2000 * MS))
    ev.append((t, PAY))
    ev.append((t + rng.randint(100 * MS, 1100 * MS), PAYC))
    if u < DUPLICATED:
        defects["duplicated"] += 1
        t2 = t + rng.randint(5 * MS, 50 * MS)
        ev.append((t2, PAY2))
        ev.append((t2 + rng.randint(100 * MS, 1100 * MS), PAY2C))
    u -= DUPLICATED
    if u < LOST_AT_PAYMENTS:
        defects["lost"] += 1
        return o, ev
    u -= LOST_AT_PAYMENTS
    if u < LATE:
        defects["late"] += 1
        t += rng.randint(2600 * MS, 3400 * MS)
    else:
        t += int(min(rng.lognormvariate(math.log(40 * MS), 0.7), 2000 * MS))
    ev.append((t, SHIP))
    t += rng.randint(50 * MS, 600 * MS)
    ev.append((t, SHIPD))
    ev.append((t + rng.randint(10_000, 200_000), SHIPC))
    return o, ev


def generate(workdir: Path, n: int, chain_rate: float, seed: int = 1) -> Recording:
    """A recording of exactly ``n`` observations (cached in ``workdir``) and its topology."""
    from flowcheck.topology import loads
    from flowcheck.trace import Header, topology_hash

    workdir.mkdir(parents=True, exist_ok=True)
    text = shop_yaml()
    topo = workdir / "shop.yaml"
    if not topo.exists() or topo.read_text() != text:
        topo.write_text(text)
    # A changed topology is a new recording: its header holds the topology's hash.
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    stem = f"shop-{n}-r{chain_rate:g}-s{seed}-v{GEN_VERSION}-{digest}"
    trace = workdir / f"{stem}.trace.jsonl"
    meta_path = workdir / f"{stem}.meta.json"
    if trace.exists() and meta_path.exists():
        return Recording(trace, topo, json.loads(meta_path.read_text()))
    print(f"generating {n:,} observations -> {trace}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    rng = random.Random(seed)
    defects: Counter[str] = Counter()
    pos = _Positions()
    # As the recorder writes it: the topology's name, which `flowcheck check` matches.
    header = Header(
        topology=loads(text).name,
        topology_sha256=topology_hash(str(topo)),
        started=WALL0,
        started_mono_ns=MONO0,
    )
    heap: list[tuple[int, int, int, _Order]] = []
    seq = itertools.count()
    written = scheduled = chains = 0
    last_ns = MONO0
    customers = max(1, round(chain_rate * CUSTOMER_EVERY_S))
    t = MONO0 + 1_000 * MS
    tmp = trace.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(header.model_dump_json() + "\n")
        out: list[str] = []
        while scheduled < n:
            while heap and heap[0][0] < t:  # every later chain starts at t or after
                last_ns, _, tag, o = heapq.heappop(heap)
                out.append(_line(tag, last_ns, o, pos))
                written += 1
            if len(out) >= 10_000:
                fh.write("\n".join(out) + "\n")
                out.clear()
            # Customers take turns: each one's orders are CUSTOMER_EVERY_S apart, so the
            # flow's per-partition-key ordering holds and is judged on every chain.
            customer = f"cust-{chains % customers:06d}"
            o, events = _chain(chains, t, customer, rng, defects)
            chains += 1
            for ns, tag in events:
                heapq.heappush(heap, (ns, next(seq), tag, o))
            scheduled += len(events)
            t += max(1, int(rng.expovariate(chain_rate) * 1e9))
        # The recording stops after the n-th observation: the last chains are cut short.
        while heap and written < n:
            last_ns, _, tag, o = heapq.heappop(heap)
            out.append(_line(tag, last_ns, o, pos))
            written += 1
        # The recording was stopped then, on purpose: its end record, as the recorder writes it.
        wall = round(WALL0 + (last_ns - MONO0) / 1e9, 6)
        out.append(_json({"ended": "stopped", "mono_ns": last_ns, "wall": wall}))
        fh.write("\n".join(out) + "\n")
    _validate_sample(tmp, 2_000)
    meta = {
        "observations": n,
        "chains": chains,
        "chain_rate": chain_rate,
        "open_chains": min(round(chain_rate * WINDOW_S), chains),
        "recorded_s": round((t - MONO0) / 1e9, 1),
        "bytes": tmp.stat().st_size,
        "defects_injected": dict(sorted(defects.items())),
        "generator_version": GEN_VERSION,
        "seed": seed,
        "generate_s": round(time.perf_counter() - started, 1),
    }
    tmp.replace(trace)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return Recording(trace, topo, meta)


def _validate_sample(path: Path, lines: int) -> None:
    """The header and the first lines read back through flowcheck's own Reader."""
    from flowcheck.trace import Reader

    reader = Reader(str(path))
    for _ in itertools.islice(reader, lines):
        pass
    if reader.problems:
        raise SystemExit(f"generated trace is not valid: {reader.describe()}")


# ------------------------------------------------------------------ the naive baseline


def naive_check(topology_path: str, trace_path: str) -> tuple[int, dict[str, Any]]:
    """What one writes first: everything in memory, grouped by key, sorted, percentiles by sort.

    It knows the parts of the checker's rules this recording exercises (arrivals per
    step, step match, duplicates, deadlines, the open window at the end, schemas);
    no retries, dead letters, gaps or ordering.
    """
    from jsonschema.validators import validator_for

    from flowcheck.correlate import lookup
    from flowcheck.observations import Kind, Observation, payload_json
    from flowcheck.topology import Match, load
    from flowcheck.topology.routing import topic_matches
    from flowcheck.trace import Reader

    topology = load(topology_path)
    reader = Reader(trace_path)
    observations = list(reader)
    observations.sort(key=lambda o: o.mono_ns)
    start_ns = reader.header.started_mono_ns
    end_ns = observations[-1].mono_ns if observations else start_ns
    arrival = (Kind.ROUTED, Kind.PUBLISHED)

    validators: dict[str, Any] = {}
    for name, ch in topology.channels.items():
        schema = ch.payload_schema
        if schema is not None and schema.json_schema is not None:
            validators[name] = validator_for(schema.json_schema)(schema.json_schema)
    schema_problems = 0
    for o in observations:
        v = validators.get(o.channel)
        if v is None or o.kind not in arrival or o.payload is None or o.sha256 is not None:
            continue
        try:
            doc = json.loads(o.payload)
        except ValueError:
            schema_problems += 1
            continue
        if not v.is_valid(doc):
            schema_problems += 1

    def fits(m: Match | None, o: Observation) -> bool:
        if m is None:
            return True
        if any(o.headers.get(h) != want for h, want in m.headers.items()):
            return False
        if m.payload:
            doc = payload_json(o.payload)
            if any(lookup(doc, p) != want for p, want in m.payload.items()):
                return False
        if m.routing_key is not None and not topic_matches(m.routing_key, o.routing_key or ""):
            return False
        return m.key is None or o.kafka_key == m.key

    def identity(o: Observation) -> tuple[Any, ...]:
        if o.fc_id is not None:
            return ("fc", o.fc_id)
        if o.offset is not None:
            return ("kafka", o.partition, o.offset)
        if o.entry_id is not None:
            return ("stream", o.entry_id)
        return ("obs", id(o))

    result: dict[str, Any] = {}
    for fname, flow in topology.flows.items():
        steps = flow.steps
        window = (flow.deadline.total_seconds() if flow.deadline else 60.0) * 1e9 + 2e9
        by_key: dict[str, list[Observation]] = {}
        for o in observations:
            key = o.keys.get(fname)
            if key is not None:
                by_key.setdefault(key, []).append(o)
        c: Counter[str] = Counter()
        samples: list[list[int]] = [[] for _ in steps]  # [0]: end to end, [i]: hop i-1 -> i
        for chain in by_key.values():
            chain.sort(key=lambda o: o.mono_ns)
            arrivals: list[dict[tuple[Any, ...], Observation]] = [{} for _ in steps]
            for o in chain:
                if o.kind not in arrival:
                    continue
                fitting = [
                    i for i, s in enumerate(steps) if s.channel == o.channel and fits(s.match, o)
                ]
                ident = identity(o)
                if not fitting or any(ident in arrivals[i] for i in fitting):
                    continue
                room = [i for i in fitting if len(arrivals[i]) < steps[i].count]
                arrivals[room[0] if room else fitting[-1]][ident] = o
            first_ns = chain[0].mono_ns
            firsts = [min(o.mono_ns for o in got.values()) if got else None for got in arrivals]
            complete = all(len(got) >= st.count for got, st in zip(arrivals, steps, strict=True))
            failures = 0
            if complete:
                for i in range(1, len(steps)):
                    limit, before, after = steps[i].deadline, firsts[i - 1], firsts[i]
                    if (
                        limit is not None
                        and before is not None
                        and after is not None
                        and after - before > limit.total_seconds() * 1e9
                    ):
                        c["late"] += 1
                        failures += 1
                last = max(o.mono_ns for o in arrivals[-1].values())
                if (
                    flow.deadline is not None
                    and firsts[0] is not None
                    and last - firsts[0] > flow.deadline.total_seconds() * 1e9
                ):
                    c["late"] += 1
                    failures += 1
            elif first_ns + window > end_ns or (not arrivals[0] and first_ns - start_ns < window):
                c["chains"] += 1
                c["unknown"] += 1
                continue
            else:
                c["lost" if arrivals[0] else "unexpected"] += 1
                failures += 1
            if flow.delivery != "at-least-once":
                for got, st in zip(arrivals, steps, strict=True):
                    if len(got) > st.count:
                        c["duplicated"] += 1
                        failures += 1
            for i in range(1, len(steps)):
                before, after = firsts[i - 1], firsts[i]
                if before is not None and after is not None:
                    samples[i].append(after - before)
            if complete and firsts[0] is not None:
                samples[0].append(max(o.mono_ns for o in arrivals[-1].values()) - firsts[0])
            c["chains"] += 1
            c["failed" if failures else "succeeded"] += 1
        # Percentiles the first way that comes to mind: sort every sample.
        positive = [sorted(x for x in hop if x > 0) for hop in samples]
        result[fname] = {
            "chains": c["chains"],
            "succeeded": c["succeeded"],
            "failed": c["failed"],
            "unknown": c["unknown"],
            "lost": c["lost"],
            "duplicated": c["duplicated"],
            "late": c["late"],
            "schema": schema_problems,
            "latency_samples": [len(hop) for hop in positive[1:]] + [len(positive[0])],
            "e2e_ms": _percentiles(positive[0]),
            "hops_ms": [_percentiles(hop) for hop in positive[1:]],
        }
    return len(observations), result


def _percentiles(xs: list[int]) -> dict[str, float | None]:
    """Nearest-rank percentiles in ms of sorted nanosecond samples."""

    def at(q: float) -> float | None:
        if not xs:
            return None
        return round(xs[max(0, math.ceil(q / 100 * len(xs)) - 1)] / 1e6, 3)

    return {"p50": at(50), "p99": at(99), "max": at(100)}


def _counts(verdict: dict[str, Any]) -> dict[str, Any] | None:
    """The figures the sanity check compares, from flowcheck's verdict as JSON."""
    fv = next((f for f in verdict.get("flows", ()) if f.get("flow") == FLOW), None)
    if fv is None:
        return None
    totals = fv.get("findings_total", {})
    lat = fv.get("latency", [])
    e2e: dict[str, Any] = next((x["stats"] for x in lat if x.get("hop") == "end-to-end"), {})
    return {
        "chains": fv["chains"],
        "succeeded": fv["succeeded"],
        "failed": fv["failed"],
        "unknown": fv["unknown"],
        "lost": totals.get("lost", 0),
        "duplicated": totals.get("duplicated", 0),
        "late": totals.get("late", 0),
        "schema": totals.get("schema", 0),
        "latency_samples": [x["stats"]["count"] for x in lat],
        "e2e_ms": {"p50": e2e.get("p50_ms"), "p99": e2e.get("p99_ms"), "max": e2e.get("max_ms")},
    }


def _find_verdict(doc: Any) -> dict[str, Any] | None:
    """The verdict inside whatever JSON the CLI prints (the verdict itself, or wrapped)."""
    if isinstance(doc, dict):
        if isinstance(doc.get("flows"), list):
            return doc
        for v in doc.values():
            found = _find_verdict(v)
            if found is not None:
                return found
    elif isinstance(doc, list):
        for v in doc:
            found = _find_verdict(v)
            if found is not None:
                return found
    return None


# ------------------------------------------------------------------ child processes


def _maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def child(mode: str, topology: str, trace: str, result: str) -> None:
    """Run one baseline measurement in this (fresh) process; write its figures to ``result``."""
    # The same imports for every mode, before the clock starts.
    import flowcheck.checker
    import flowcheck.topology
    import flowcheck.trace

    out: dict[str, Any] = {"mode": mode}
    rss_before = _maxrss_mib()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if mode == "parse":
        n = 0
        with open(trace, "rb") as fh:
            fh.readline()  # the header
            for line in fh:
                if not line.startswith(b'{"ended"'):  # the end record
                    json.loads(line)
                    n += 1
        out |= {"observations": n}
    elif mode == "read":
        reader = flowcheck.trace.Reader(trace)
        n = 0
        for _ in reader:
            n += 1
        out |= {"observations": n, "problems": len(reader.problems)}
    elif mode == "naive":
        n, flows = naive_check(topology, trace)
        out |= {"observations": n, "counts": flows.get(FLOW)}
    elif mode == "profile":
        profiler = cProfile.Profile()
        profiler.enable()
        topo = flowcheck.topology.load(topology)
        reader = flowcheck.trace.Reader(trace)
        checker = flowcheck.checker.Checker(topo, start_ns=reader.header.started_mono_ns)
        for obs in reader:
            checker.feed(obs)
        verdict = checker.finish()
        verdict.model_dump_json()
        profiler.disable()
        buf = io.StringIO()
        stats = pstats.Stats(profiler, stream=buf)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(30)
        out |= {"observations": verdict.observations, "profile": buf.getvalue()}
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    out["work_s"] = time.perf_counter() - wall0
    out["cpu_s"] = time.process_time() - cpu0
    out["maxrss_mib"] = _maxrss_mib()
    out["rss_after_imports_mib"] = rss_before
    Path(result).write_text(json.dumps(out))


class BenchError(SystemExit):
    """The benchmark cannot measure what it says: it stops with this message."""


@dataclass
class Run:
    """One measurement: the process as the parent saw it, and the child's own figures."""

    mode: str
    observations: int
    seconds: float  # what is measured: `flowcheck check` spawn to exit; else the work after imports
    cpu_s: float  # CPU time of the same span
    process_s: float  # spawn to exit, interpreter start included
    process_cpu_s: float
    maxrss_mib: float
    extra: dict[str, Any]


def _wait(
    cmd: list[str], env: dict[str, str] | None, stdout: str, stderr: str, cwd: Path | None = None
) -> tuple[int, float, Any]:
    """Run ``cmd``; its exit code, wall seconds, and resource usage (wait4: its own)."""
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    return os.waitstatus_to_exitcode(status), wall, usage


def _tail(path: str, lines: int = 12) -> str:
    return "\n".join(Path(path).read_text(errors="replace").strip().splitlines()[-lines:])


def spawn(mode: str, rec: Recording) -> Run:
    """Run a baseline ``mode`` (parse, read, naive, profile) in a fresh interpreter."""
    with tempfile.TemporaryDirectory(prefix="fc-bench-") as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode]
        cmd += ["--topology", str(rec.topology), "--trace", str(rec.trace), "--result", result]
        err = os.path.join(tmp, "stderr.txt")
        code, wall, usage = _wait(cmd, None, os.devnull, err)
        if code != 0 or not os.path.exists(result):
            raise BenchError(f"{mode} on {rec.trace} failed (exit {code}):\n{_tail(err)}")
        out: dict[str, Any] = json.loads(Path(result).read_text())
    return Run(
        mode=mode,
        observations=int(out.get("observations") or rec.meta["observations"]),
        seconds=float(out.pop("work_s")),
        cpu_s=float(out.pop("cpu_s")),
        process_s=wall,
        process_cpu_s=usage.ru_utime + usage.ru_stime,
        maxrss_mib=float(out.pop("maxrss_mib")),
        extra=out,
    )


# ------------------------------------------------------------------ the flowcheck command

VERDICTS = (0, 1)  # `flowcheck check`: 0 every flow passed, 1 one failed; any other: no verdict


@dataclass(frozen=True)
class Tree:
    """A flowcheck source tree `flowcheck check` runs from (PYTHONPATH)."""

    mode: str  # flowcheck (the tree the benchmark is in) or baseline (--baseline REF)
    path: Path
    label: str


def checks(trees: list[Tree], rec: Recording) -> list[Run]:
    """`python -m flowcheck check TOPOLOGY TRACE --report-dir DIR` from each tree, all
    started at once (one tree: alone), each timed end to end: wall time from spawn to
    exit. Anything but a verdict stops the benchmark."""
    with tempfile.TemporaryDirectory(prefix="fc-bench-") as tmp:
        started: dict[int, tuple[Tree, float, str, str, str, list[str]]] = {}
        for n, tree in enumerate(trees):
            reports = os.path.join(tmp, f"reports-{n}")
            argv = ["check", str(rec.topology), str(rec.trace), "--report-dir", reports]
            env = {**os.environ, "PYTHONPATH": str(tree.path), "PYTHONHASHSEED": "0"}
            out, err = os.path.join(tmp, f"stdout-{n}.txt"), os.path.join(tmp, f"stderr-{n}.txt")
            with open(out, "wb") as fo, open(err, "wb") as fe:
                t0 = time.perf_counter()
                # In the tree: `python -m` puts the working directory first on sys.path.
                proc = subprocess.Popen(
                    [sys.executable, "-m", "flowcheck", *argv],
                    stdout=fo,
                    stderr=fe,
                    env=env,
                    cwd=tree.path,
                )
            started[proc.pid] = (tree, t0, reports, out, err, argv)
        ended: dict[int, tuple[int, float, Any]] = {}
        while len(ended) < len(started):
            pid, status, usage = os.wait4(-1, 0)  # whichever ends first: its own end time
            if pid in started:
                wall = time.perf_counter() - started[pid][1]
                ended[pid] = (os.waitstatus_to_exitcode(status), wall, usage)
        runs = []
        for pid, (tree, _, reports, out, err, argv) in started.items():
            code, wall, usage = ended[pid]
            shown = (
                f"`PYTHONPATH={tree.path} python -m flowcheck {shlex.join(argv)}` ({tree.label})"
            )
            if code not in VERDICTS:
                raise BenchError(f"{shown} exited {code}, no verdict:\n{_tail(err) or _tail(out)}")
            if "warning" in Path(err).read_text(errors="replace"):
                raise BenchError(
                    f"{shown} warned; the recording is not what it should be:\n{_tail(err)}"
                )
            written = Path(reports) / "verdict.json"
            verdict = _find_verdict(json.loads(written.read_text())) if written.exists() else None
            counts = _counts(verdict) if verdict is not None else None
            if verdict is None or counts is None:
                raise BenchError(f"{shown} exited {code} but wrote no verdict of flow {FLOW!r}")
            cpu = usage.ru_utime + usage.ru_stime
            runs.append(
                Run(
                    mode=tree.mode,
                    observations=int(verdict.get("observations") or rec.meta["observations"]),
                    seconds=wall,
                    cpu_s=cpu,
                    process_s=wall,
                    process_cpu_s=cpu,
                    maxrss_mib=usage.ru_maxrss / 2**10,  # KiB on Linux
                    extra={"exit_code": code, "counts": counts},
                )
            )
    return runs


def git(*args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def current_tree() -> Tree:
    """The tree this script is in, as it is on disk (uncommitted changes included)."""
    head = git("rev-parse", "--short", "HEAD")
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "flowcheck") else ""
    return Tree("flowcheck", ROOT, f"this tree, {head}{dirty}")


def export(ref: str, into: Path) -> Tree:
    """``ref``'s flowcheck package, exported (git archive) into ``into``."""
    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    data = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", sha, "flowcheck"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return Tree("baseline", into, f"--baseline {ref} = {sha[:10]}")


# ------------------------------------------------------------------ reporting


def median_run(runs: list[Run]) -> dict[str, Any]:
    def med(f: Callable[[Run], float]) -> float:
        return statistics.median(f(r) for r in runs)

    n = runs[0].observations
    work = med(lambda r: r.seconds)
    cpu = med(lambda r: r.cpu_s)
    return {
        "observations": n,
        "seconds": round(work, 3),
        "obs_per_s": round(n / work) if work > 0 else None,
        "cpu_s": round(cpu, 3),
        "obs_per_cpu_s": round(n / cpu) if cpu > 0 else None,
        "peak_rss_mib": round(med(lambda r: r.maxrss_mib), 1),
        "process_s": round(med(lambda r: r.process_s), 3),
        "process_cpu_s": round(med(lambda r: r.process_cpu_s), 3),
        "rounds": [
            {
                "seconds": round(r.seconds, 3),
                "cpu_s": round(r.cpu_s, 3),
                "peak_rss_mib": round(r.maxrss_mib, 1),
            }
            for r in runs
        ],
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }
    with contextlib.suppress(OSError):
        cpu = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.*)", cpu)
        if m:
            info["cpu"] = m.group(1).strip()
    with contextlib.suppress(OSError, AttributeError):
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    mem = _meminfo()
    if mem:
        info["mem_total_gib"] = round(mem.get("MemTotal", 0) / 2**20, 1)
        info["mem_available_gib"] = round(mem.get("MemAvailable", 0) / 2**20, 1)
    return info


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB (empty where there is none)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[name] = int(parts[0])
    return out


def compare(naive: dict[str, Any] | None, fc: dict[str, Any] | None) -> dict[str, Any]:
    """Naive and flowcheck counts side by side; ``ok`` when every count agrees."""
    if naive is None or fc is None:
        return {
            "ok": None,
            "why": "counts missing from " + ("naive" if naive is None else "flowcheck"),
        }
    keys = ("chains", "succeeded", "failed", "unknown", "lost", "duplicated", "late", "schema")
    diff = {
        k: (naive.get(k), fc.get(k))
        for k in (*keys, "latency_samples")
        if naive.get(k) != fc.get(k)
    }
    return {"ok": not diff, "differences": diff}


def fmt_n(n: float) -> str:
    return f"{n:,.0f}"


def print_size(size: dict[str, Any]) -> None:
    meta = size["recording"]
    print()
    print(
        f"== {fmt_n(size['observations'])} observations: {fmt_n(meta['chains'])} chains, "
        f"~{fmt_n(min(meta['open_chains'], meta['chains']))} open at a time, {meta['bytes'] / 2**20:,.1f} MiB file, "
        f"defects injected {meta['defects_injected']}; medians of {size['rounds_run']} round(s)"
    )
    print(f"{'':<12}{'seconds':>10}{'obs/s':>12}{'cpu s':>9}{'peak RSS MiB':>14}{'process s':>11}")
    for mode, r in size["results"].items():
        if r is None:
            print(f"{mode:<12}{'skipped':>10}  {size.get('skipped', {}).get(mode, '')}")
            continue
        print(
            f"{mode:<12}{r['seconds']:>10.2f}{fmt_n(r['obs_per_s'] or 0):>12}{r['cpu_s']:>9.2f}"
            f"{r['peak_rss_mib']:>14.1f}{r['process_s']:>11.2f}"
        )
    waited = [
        f"{mode} {r['cpu_s'] / r['seconds']:.2f}"
        for mode, r in size["results"].items()
        if r and r["seconds"] > 0 and r["cpu_s"] / r["seconds"] < 0.9
    ]
    if waited:
        print(
            f"note: cpu s / seconds is low ({', '.join(waited)}): the process waited for a "
            "core, the machine was busy; these seconds are not the code's own"
        )
    ratios = size["ratios"]
    if ratios.get("flowcheck_obs_per_s") is not None:
        parts = [
            f"flowcheck / {name} time: {ratios[key]:.2f}x"
            + (" (target <= 2x)" if name == "parse" else "")
            for name, key in (
                ("parse", "flowcheck_over_parse"),
                ("read", "flowcheck_over_read"),
                ("naive", "flowcheck_over_naive"),
            )
            if key in ratios
        ]
        parts.append(f"flowcheck {fmt_n(ratios['flowcheck_obs_per_s'])} obs/s (target >= 100,000)")
        print("; ".join(parts))
    vs = size.get("vs_baseline")
    if vs is not None:
        print(
            f"flowcheck / baseline: time {vs['time']:.3f} (median of round ratios "
            f"{vs['time_paired']:.3f}), cpu {vs['cpu']:.3f} ({vs['cpu_paired']:.3f}), "
            f"best rounds: time {vs['time_best']:.3f}, cpu {vs['cpu_best']:.3f}; "
            f"peak RSS {vs['rss']:.3f}; "
            f"times {vs['rounds']}"
        )
        same = size["verdicts_agree"]
        print(
            "verdicts: the same counts"
            if same["ok"]
            else f"verdicts: MISMATCH flowcheck vs baseline: {same['differences']}"
        )
    sanity = size.get("sanity")
    if sanity is not None:
        if sanity["ok"]:
            fc = size["counts"]["flowcheck"]
            print(
                "sanity: naive and flowcheck agree: "
                + ", ".join(
                    f"{k} {fc[k]:,}"
                    for k in (
                        "chains",
                        "succeeded",
                        "failed",
                        "unknown",
                        "lost",
                        "duplicated",
                        "late",
                        "schema",
                    )
                )
            )
        elif sanity["ok"] is None:
            print(f"sanity: not compared ({sanity['why']})")
        else:
            print(f"sanity: MISMATCH naive vs flowcheck: {sanity['differences']}")
        naive, fc = size["counts"].get("naive"), size["counts"].get("flowcheck")
        if naive and fc:
            print(
                f"end-to-end latency ms: naive (exact) {naive['e2e_ms']}, flowcheck (HdrHistogram) {fc['e2e_ms']}"
            )


def growth(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for a, b in itertools.pairwise(sizes):
        for mode in MODES:
            ra, rb = a["results"].get(mode), b["results"].get(mode)
            if not ra or not rb:
                continue
            obs_x = b["observations"] / a["observations"]
            time_x = rb["seconds"] / ra["seconds"]
            cpu_x = rb["cpu_s"] / ra["cpu_s"]
            rows.append(
                {
                    "mode": mode,
                    "from": a["observations"],
                    "to": b["observations"],
                    "observations_x": round(obs_x, 2),
                    "time_x": round(time_x, 2),
                    # 1.0: time grows exactly with the observations; 2.0: quadratic.
                    "exponent": round(math.log(time_x) / math.log(obs_x), 3),
                    "time_per_10x_obs": round(time_x ** (1 / math.log10(obs_x)), 2),
                    "cpu_x": round(cpu_x, 2),
                    "cpu_exponent": round(math.log(cpu_x) / math.log(obs_x), 3),
                    "memory_x": round(rb["peak_rss_mib"] / ra["peak_rss_mib"], 2),
                }
            )
    return rows


def print_growth(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print()
    print("== growth (1.00 exponent: linear time; memory x1.00: flat memory)")
    print(
        f"{'mode':<11}{'observations':>24}{'time x':>9}{'x per 10x obs':>15}{'exponent':>10}"
        f"{'cpu exp.':>10}{'memory x':>10}"
    )
    for r in rows:
        span = f"{fmt_n(r['from'])} -> {fmt_n(r['to'])}"
        print(
            f"{r['mode']:<11}{span:>24}{r['time_x']:>9.2f}{r['time_per_10x_obs']:>15.2f}"
            f"{r['exponent']:>10.3f}{r['cpu_exponent']:>10.3f}{r['memory_x']:>10.2f}"
        )


# ------------------------------------------------------------------ main


def parse_sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        mult = 1
        if part.endswith("k"):
            part, mult = part[:-1], 1_000
        elif part.endswith("m"):
            part, mult = part[:-1], 1_000_000
        out.append(int(float(part) * mult))
    return out


def _tree_imports(tree: Tree) -> None:
    """`python -m flowcheck` from ``tree`` must import that tree's package, not an installed one."""
    env = {**os.environ, "PYTHONPATH": str(tree.path)}
    code = "import flowcheck; print(flowcheck.__file__)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tree.path,
        capture_output=True,
        text=True,
        check=False,
    )
    where = Path(proc.stdout.strip() or ".").resolve()
    if proc.returncode != 0 or not where.is_relative_to(tree.path.resolve()):
        raise BenchError(
            f"flowcheck from {tree.path} ({tree.label}) imports {where}: {proc.stderr.strip()}"
        )


def bench(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir or os.path.join(tempfile.gettempdir(), "flowcheck-bench")).resolve()
    sizes = parse_sizes(args.sizes)
    default_modes = "flowcheck,baseline" if args.baseline else "parse,read,naive,flowcheck"
    modes = [m.strip() for m in (args.modes or default_modes).split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise BenchError(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    if ("baseline" in modes) != bool(args.baseline):
        raise BenchError("the baseline mode and --baseline REF go together")
    with tempfile.TemporaryDirectory(prefix="fc-baseline-") as tmp:
        trees = {"flowcheck": current_tree()}
        if args.baseline:
            trees["baseline"] = export(args.baseline, Path(tmp))
        for tree in trees.values():
            _tree_imports(tree)
        _bench(args, workdir, sizes, modes, trees)


def _bench(
    args: argparse.Namespace,
    workdir: Path,
    sizes: list[int],
    modes: list[str],
    trees: dict[str, Tree],
) -> None:
    info = machine()
    print(
        f"machine: {info['platform']}, {info['cores']} cores"
        + (f" ({info['cpu']})" if info.get("cpu") else "")
        + f", Python {info['python']}; load average {info.get('load_avg')}; "
        f"{info.get('mem_available_gib')} of {info.get('mem_total_gib')} GiB available"
    )
    for tree in trees.values():
        print(
            f"{tree.mode}: `python -m flowcheck check TOPOLOGY TRACE --report-dir DIR` from {tree.path} ({tree.label})"
        )
    print(
        f"rounds: {args.rounds}, naive {args.naive_rounds} (medians); workdir: {workdir}",
        flush=True,
    )

    recordings = [generate(workdir, n, args.chain_rate) for n in sizes]
    # The budget counts from here (generating recordings is a one-time cost). Every size
    # gets one round; a further round runs only if it and one round of each larger size,
    # extrapolated from this size, still fit.
    deadline = time.monotonic() + args.budget * 60 if args.budget > 0 else math.inf
    out_sizes: list[dict[str, Any]] = []
    rss_per_obs: float | None = None  # the naive baseline's, to skip sizes it cannot hold
    for index, rec in enumerate(recordings):
        n = rec.meta["observations"]
        later = sum(r.meta["observations"] for r in recordings[index + 1 :]) / n
        first_round = 0.0  # seconds the first round of this size took, all modes
        next_round = 0.0  # ... and what a further round takes (the naive baseline only once)
        rounds_run = 0
        runs: dict[str, list[Run]] = {m: [] for m in modes}
        skipped: dict[str, str] = {}
        if "naive" in modes and rss_per_obs is not None:
            need = rss_per_obs * n * 1.15
            avail = _meminfo().get("MemAvailable", 0) / 2**10
            if avail and need > 0.8 * avail:
                skipped["naive"] = f"needs ~{need / 1024:.1f} GiB, {avail / 1024:.1f} GiB available"
        for round_ in range(max(args.rounds, args.naive_rounds)):
            if round_ > 0 and time.monotonic() + next_round + first_round * later > deadline:
                print(
                    f"  {fmt_n(n)}: {round_} round(s) only, to stay within --budget "
                    f"{args.budget:g} min",
                    file=sys.stderr,
                    flush=True,
                )
                break
            spent = 0.0
            next_round = 0.0
            # Interleaved, so drifting machine load hits every mode alike; every other
            # round in reverse, so neither of two versions always runs first.
            order = modes if round_ % 2 == 0 else modes[::-1]
            together = [trees[m] for m in order if m in trees] if args.together else []
            done = {r.mode: r for r in checks(together, rec)} if round_ < args.rounds else {}
            for mode in order:
                wanted = args.naive_rounds if mode == "naive" else args.rounds
                if mode in skipped or round_ >= wanted:
                    continue
                if mode in done:
                    run = done[mode]
                else:
                    run = checks([trees[mode]], rec)[0] if mode in trees else spawn(mode, rec)
                runs[mode].append(run)
                spent += run.process_s
                if round_ + 1 < wanted:
                    next_round += run.process_s
                print(
                    f"  {fmt_n(n)} {mode}: {run.seconds:.2f}s, {run.maxrss_mib:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
                if mode == "read" and run.extra.get("problems"):
                    raise BenchError(f"{rec.trace}: Reader found damaged lines: {run.extra}")
            rounds_run += 1
            if round_ == 0:
                first_round = spent
        if runs.get("naive"):
            rss_per_obs = max(r.maxrss_mib for r in runs["naive"]) / n
        results: dict[str, Any] = {m: (median_run(runs[m]) if runs[m] else None) for m in modes}
        counts = {m: runs[m][0].extra.get("counts") for m in ("naive", *trees) if runs.get(m)}
        ratios: dict[str, Any] = {}
        fc, rd, nv = results.get("flowcheck"), results.get("read"), results.get("naive")
        pa = results.get("parse")
        if fc:
            ratios["flowcheck_obs_per_s"] = fc["obs_per_s"]
            if pa:
                ratios["flowcheck_over_parse"] = round(fc["seconds"] / pa["seconds"], 3)
            if rd:
                ratios["flowcheck_over_read"] = round(fc["seconds"] / rd["seconds"], 3)
            if nv:
                ratios["flowcheck_over_naive"] = round(fc["seconds"] / nv["seconds"], 3)
        size: dict[str, Any] = {
            "observations": n,
            "recording": {k: v for k, v in rec.meta.items() if k != "observations"},
            "trace": str(rec.trace),
            "results": results,
            "ratios": ratios,
            "counts": counts,
            "skipped": skipped,
            "rounds_run": rounds_run,
        }
        if "naive" in counts and "flowcheck" in counts:
            size["sanity"] = compare(counts["naive"], counts["flowcheck"])
        if "baseline" in counts and "flowcheck" in counts:
            size["vs_baseline"] = versus(runs["flowcheck"], runs["baseline"])
            size["verdicts_agree"] = compare(counts["baseline"], counts["flowcheck"])
        out_sizes.append(size)
        print_size(size)
    rows = growth(out_sizes)
    print_growth(rows)
    print()
    print(
        json.dumps(
            {
                "benchmark": "checker",
                "machine": info,
                "trees": {m: {"path": str(t.path), "label": t.label} for m, t in trees.items()},
                "rounds": args.rounds,
                "naive_rounds": args.naive_rounds,
                "chain_rate": args.chain_rate,
                "sizes": out_sizes,
                "growth": rows,
            }
        )
    )


def versus(now: list[Run], before: list[Run]) -> dict[str, Any]:
    """This tree against the baseline: ratios of medians (< 1: faster, smaller), the
    median of the rounds' own ratios (each round ran both, one after the other), and the
    ratio of the best rounds."""

    def ratio(f: Callable[[Run], float], of: Callable[..., float] = statistics.median) -> float:
        return round(of(map(f, now)) / of(map(f, before)), 3)

    pairs = list(zip(now, before, strict=False))
    return {
        "time": ratio(lambda r: r.seconds),
        "time_paired": round(statistics.median(a.seconds / b.seconds for a, b in pairs), 3),
        "cpu": ratio(lambda r: r.cpu_s),
        "cpu_paired": round(statistics.median(a.cpu_s / b.cpu_s for a, b in pairs), 3),
        # Other work on the machine only ever adds time: the best rounds are the code's own.
        "time_best": ratio(lambda r: r.seconds, min),
        "cpu_best": ratio(lambda r: r.cpu_s, min),
        "rss": ratio(lambda r: r.maxrss_mib),
        "rounds": [f"{a.seconds:.2f}/{b.seconds:.2f}" for a, b in pairs],
    }


def profile(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir or os.path.join(tempfile.gettempdir(), "flowcheck-bench"))
    rec = generate(workdir, parse_sizes(args.profile)[0], args.chain_rate)
    run = spawn("profile", rec)
    print(
        f"the checker (Reader -> Checker.feed -> finish) under cProfile on "
        f"{fmt_n(run.observations)} observations: {run.seconds:.2f}s (profiling slows it "
        f"down), {run.maxrss_mib:.0f} MiB"
    )
    print(run.extra["profile"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        default=",".join(str(n) for n in DEFAULT_SIZES),
        help="observations per recording, comma-separated (100k, 1m also work)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="repetitions per size and mode")
    parser.add_argument(
        "--naive-rounds",
        type=int,
        default=1,
        help="repetitions of the naive baseline (slow and big: once keeps the run short)",
    )
    parser.add_argument("--workdir", help="where generated recordings are cached")
    parser.add_argument(
        "--budget",
        type=float,
        default=15,
        help="minutes (after generating recordings); rounds past the first are dropped "
        "when they would not fit; 0: no limit",
    )
    parser.add_argument(
        "--chain-rate",
        type=float,
        default=DEFAULT_CHAIN_RATE,
        help=f"chains started per recorded second (open chains ~ rate x {WINDOW_S:g}s)",
    )
    parser.add_argument(
        "--modes",
        help="which of parse,read,naive,flowcheck,baseline (default: parse,read,naive,flowcheck; "
        "with --baseline: flowcheck,baseline)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run `flowcheck check` of git REF's flowcheck package (exported to a "
        "temporary directory), alternating with this tree's on the same recordings",
    )
    parser.add_argument(
        "--together",
        action="store_true",
        help="start this tree's and the baseline's `flowcheck check` at the same time in each "
        "round (one core each), so both meet the same machine load; default: one after the other",
    )
    parser.add_argument("--profile", metavar="SIZE", help="cProfile the checker on one size")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--topology", help=argparse.SUPPRESS)
    parser.add_argument("--trace", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # this tree's flowcheck, whatever else is installed
    if args.child:
        child(args.child, args.topology, args.trace, args.result)
    elif args.profile:
        profile(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()

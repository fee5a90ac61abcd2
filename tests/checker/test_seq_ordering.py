"""Ordering by a sequence field: per entity, increasing seqs in each broker order."""

from __future__ import annotations

from history import MS, START, History
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcheck.checker import Verdict, check
from flowcheck.observations import Kind
from flowcheck.topology import Topology, loads

TOP = """
brokers: {k: {kind: kafka}, s: {kind: redis}}
channels:
  orders: {broker: k, kind: topic}
  ledger: {broker: s, kind: stream}
flows:
  f:
    correlate: $.id
    steps: [orders, ledger]
    deadline: 1s
    ordering: {per: $.account, seq: $.seq AT}
"""


def top(at: str = "") -> Topology:
    return loads(TOP.replace(" AT", f", at: [{at}]" if at else ""))


def run(t: Topology, h: History) -> Verdict:
    return check(t, h.items, start_ns=START - 1000 * MS, end_ns=START + 60_000 * MS)


def found(v: Verdict) -> list[tuple[str, str | None, str | None]]:
    return [(f.kind.value, f.key, f.step) for fv in v.flows for f in fv.findings]


def story(
    h: History, seqs: list[tuple[str, int]], *, stream: list[int] | None = None, part: int = 0
) -> None:
    """One chain per (account, seq): on the topic in offset order, then into the stream in
    the order of ``stream`` (indexes into ``seqs``; default the same order)."""
    for n, (acct, seq) in enumerate(seqs):
        body = {"id": f"{acct}-{seq}", "account": acct, "seq": seq}
        h.at(n * 10).routed("orders", f"{acct}-{seq}", body, partition=part, offset=n)
    for m, n in enumerate(stream if stream is not None else range(len(seqs))):
        acct, seq = seqs[n]
        body = {"id": f"{acct}-{seq}", "account": acct, "seq": seq}
        h.at(200 + m * 10).routed(
            "ledger", f"{acct}-{seq}", body, entry_id=f"{2000 + m}-0", broker_ms=2000 + m
        )


def test_increasing_seqs_per_account_pass() -> None:
    h = History()
    # Two accounts interleaved; each one's seqs increase. The first seq (5) is no gap.
    story(h, [("a", 5), ("b", 1), ("a", 6), ("b", 2), ("a", 7)])
    v = run(top(), h)
    assert found(v) == []
    assert v.passed


def test_an_inversion_names_the_entity_both_seqs_and_both_chains() -> None:
    h = History()
    story(h, [("a", 1), ("a", 3), ("a", 2)], stream=[0, 1, 2])
    v = run(top(), h)
    assert found(v) == [("reordered", "a-2", "orders"), ("reordered", "a-2", "ledger")]
    msg = v.flows[0].findings[0].message
    assert msg == "$.account 'a': seq 2 (chain 'a-2') came after seq 3 (chain 'a-3') at 'orders'"
    assert not v.passed


def test_at_limits_the_steps() -> None:
    h = History()
    # In order on the topic, inverted in the stream; only the topic is asked.
    story(h, [("a", 1), ("a", 2), ("a", 3)], stream=[0, 2, 1])
    assert found(run(top("orders"), h)) == []
    h = History()
    story(h, [("a", 1), ("a", 2), ("a", 3)], stream=[0, 2, 1])
    assert found(run(top("ledger"), h)) == [("reordered", "a-2", "ledger")]


def test_a_gap_is_found_with_its_missing_numbers() -> None:
    h = History()
    story(h, [("a", 1), ("a", 2), ("a", 5), ("a", 7), ("b", 1)])
    v = run(top(), h)
    gaps = [f for fv in v.flows for f in fv.findings if f.kind.value == "sequence_gap"]
    assert [(f.step, f.message) for f in gaps] == [
        ("orders", "$.account 'a': seq 3-4, 6 never reached 'orders' (seen 1 to 7)"),
        ("ledger", "$.account 'a': seq 3-4, 6 never reached 'ledger' (seen 1 to 7)"),
    ]
    assert not v.passed
    assert not next(c for c in v.flows[0].checks if c.name == "ordering").passed


def test_a_seq_lost_after_the_first_step_is_a_gap_there_only() -> None:
    h = History()
    story(h, [("a", 1), ("a", 2), ("a", 3)], stream=[0, 2])
    v = run(top(), h)
    kinds = sorted(found(v))
    assert ("sequence_gap", None, "ledger") in kinds
    assert ("lost", "a-2", "ledger") in kinds
    assert not any(k == "sequence_gap" and s == "orders" for k, _, s in kinds)


def test_a_late_seq_fills_its_gap_and_is_an_inversion() -> None:
    h = History()
    story(h, [("a", 1), ("a", 3), ("a", 2)], stream=[0, 1, 2])
    kinds = {k for k, _, _ in found(run(top(), h))}
    assert kinds == {"reordered"}


def test_a_tie_in_broker_order_decides_nothing() -> None:
    """Two messages at one place of one order (the same offset, read twice under two
    chains): their seqs disagree, but nothing tells which came first."""
    t = loads(TOP.replace("steps: [orders, ledger]", "steps: [orders]").replace(" AT", ""))
    for first, then in ((2, 1), (1, 2)):
        h = History()
        body = {"id": "x", "account": "a", "seq": first}
        h.at(0).routed("orders", "x", body, partition=0, offset=7)
        body = {"id": "y", "account": "a", "seq": then}
        h.at(10).routed("orders", "y", body, partition=0, offset=7)
        assert found(run(t, h)) == []


def test_two_partitions_are_two_orders_never_compared() -> None:
    t = loads(TOP.replace("steps: [orders, ledger]", "steps: [orders]").replace(" AT", ""))
    h = History()
    h.at(0).routed("orders", "x", {"id": "x", "account": "a", "seq": 2}, partition=0, offset=0)
    h.at(10).routed("orders", "y", {"id": "y", "account": "a", "seq": 1}, partition=1, offset=0)
    assert found(run(t, h)) == []
    h = History()
    h.at(0).routed("orders", "x", {"id": "x", "account": "a", "seq": 2}, partition=0, offset=0)
    h.at(10).routed("orders", "y", {"id": "y", "account": "a", "seq": 1}, partition=0, offset=1)
    assert found(run(t, h)) == [("reordered", "y", "orders")]


def test_a_message_without_the_fields_is_counted_unjudged() -> None:
    t = loads(TOP.replace("steps: [orders, ledger]", "steps: [orders]").replace(" AT", ""))
    h = History()
    h.at(0).routed("orders", "x", {"id": "x", "account": "a", "seq": 1}, partition=0, offset=0)
    h.at(1).routed("orders", "y", {"id": "y", "seq": 2}, partition=0, offset=1)
    h.at(2).routed("orders", "z", {"id": "z", "account": "a", "seq": "two"}, partition=0, offset=2)
    h.at(3).routed("orders", "w", {"id": "w", "account": "a", "seq": 1.5}, partition=0, offset=3)
    v = run(t, h)
    assert found(v) == []
    got = {u.why: u.chains for fv in v.flows for u in fv.unjudged}
    assert got == {
        "a message had no '$.account' (text or number)": 1,
        "a message had no whole-number '$.seq'": 2,
    }
    assert {u.expectation for fv in v.flows for u in fv.unjudged} == {
        "ordering by $.seq per $.account"
    }
    assert not v.passed


def test_headers_and_one_global_sequence() -> None:
    """No ``per``: one sequence for the whole flow; ``seq`` from a header (text)."""
    t = loads(
        TOP.replace("steps: [orders, ledger]", "steps: [orders]").replace(
            "{per: $.account, seq: $.seq AT}", "{seq: x-seq}"
        )
    )
    h = History()
    for n, seq in enumerate(["1", "2", "4", "3"]):
        h.at(n).routed("orders", f"k{n}", partition=0, offset=n, headers={"x-seq": seq})
    v = run(t, h)
    assert found(v) == [("reordered", "k3", "orders")]
    assert (
        v.flows[0].findings[0].message
        == "seq 3 (chain 'k3') came after seq 4 (chain 'k2') at 'orders'"
    )


# ---------------------------------------------------------------- against a naive model


def naive(sends: list[tuple[str, int]]) -> set[tuple[str, str | None, str]]:
    """Every message with a lower seq than its entity's message just before it; every
    seq missing between an entity's lowest and highest, written as ranges."""
    out: set[tuple[str, str | None, str]] = set()
    last: dict[str, int] = {}
    for acct, seq in sends:
        if acct in last and seq < last[acct]:
            out.add(("reordered", f"{acct}-{seq}", f"after {last[acct]}"))
        last[acct] = seq
    for acct in sorted(last):
        seen = {s for a, s in sends if a == acct}
        missing = [n for n in range(min(seen), max(seen) + 1) if n not in seen]
        runs: list[list[int]] = []
        for n in missing:
            if runs and runs[-1][1] == n - 1:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        if runs:
            text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
            out.add(("sequence_gap", None, f"'{acct}': seq {text} never"))
    return out


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 15)), unique=True, max_size=30))
def test_findings_match_a_naive_model(sends: list[tuple[str, int]]) -> None:
    t = loads(TOP.replace("steps: [orders, ledger]", "steps: [orders]").replace(" AT", ""))
    h = History()
    for n, (acct, seq) in enumerate(sends):
        body = {"id": f"{acct}-{seq}", "account": acct, "seq": seq}
        h.at(n).routed("orders", f"{acct}-{seq}", body, partition=0, offset=n)
    got = set()
    for f in run(t, h).flows[0].findings:
        if f.kind.value == "reordered":
            got.add(
                ("reordered", f.key, f"after {f.message.split('came after seq ')[1].split()[0]}")
            )
        else:
            got.add((f.kind.value, f.key, f.message.split("$.account ")[1].split(" reached")[0]))
    assert got == naive(sends)


DEAD = """
brokers: {r: {kind: rabbitmq}}
channels:
  orders: {broker: r, kind: exchange, type: topic}
  billing:
    broker: r
    kind: queue
    bindings: [{exchange: orders, key: "#"}]
    dead_letter: {exchange: dlx, key: b}
  dlx: {broker: r, kind: exchange, type: direct}
  dlq: {broker: r, kind: queue, bindings: [{exchange: dlx, key: b}]}
  done: {broker: r, kind: exchange, type: fanout}
flows:
  f:
    correlate: $.id
    steps: [orders, billing, done]
    deadline: 1s
    ordering: {per: $.account, seq: $.seq, at: [done]}
    dead_letters:
      - {when: {payload: {$.poison: true}}, channel: dlq, step: billing}
"""


def test_a_seq_dead_lettered_as_its_rule_says_is_no_gap() -> None:
    def history(dead: bool) -> History:
        h = History()
        for n in (1, 2, 3):
            body = {"id": f"a-{n}", "account": "a", "seq": n, "poison": n == 2}
            h.at(n * 10).routed("orders", f"a-{n}", body)
            h.routed("billing", f"a-{n}", body)
            if n != 2:
                h.routed("done", f"a-{n}", body)
            elif dead:
                h.add(
                    Kind.DEAD_LETTERED, "dlq", f"a-{n}", body, reason="rejected", origin="billing"
                )
        return h

    v = run(loads(DEAD), history(dead=True))
    assert found(v) == []
    assert v.passed
    # Not dead-lettered: the rule's finding, and still no gap (the rule's message was
    # never meant to reach 'done').
    v = run(loads(DEAD), history(dead=False))
    assert [k for k, _, _ in found(v)] == ["dead_letter"]

"""The terminal report: failures first, broken chains drawn, readable at 80 columns."""

from __future__ import annotations

import io

import scenarios
from rich.console import Console

from flowcheck.checker import Verdict
from flowcheck.reporting.terminal import render


def text(
    verdict: Verdict, width: int = 100, *, max_chains: int = 10, all_latency: bool = False
) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    render(verdict, console, max_chains=max_chains, all_latency=all_latency)
    return console.export_text()


def block(out: str, start: str, end: str) -> str:
    """The lines from the first containing ``start`` up to the next containing ``end``."""
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if start in line)
    last = next(i for i in range(first + 1, len(lines)) if end in lines[i])
    return "\n".join(lines[first:last])


def test_leads_with_the_overall_result() -> None:
    out = text(scenarios.failing())
    assert out.splitlines()[0] == (
        "FAIL  shop: 1 of 2 flows failed, 1 other finding (42 observations, 1 tap gap)"
    )
    first = text(scenarios.passing()).splitlines()[0]
    assert first.startswith("PASS  shop: 2 flows passed")


def test_a_tap_gap_is_counted_apart_from_the_observations() -> None:
    verdict = scenarios.failing()
    assert verdict.observations == 42  # the gap record is in gaps, not here
    assert len(verdict.gaps) == 1
    assert "(42 observations, 1 tap gap)" in text(verdict).splitlines()[0]


def test_failing_flow_lists_only_its_failed_checks() -> None:
    checks = block(text(scenarios.failing()), "Failed checks", "Broken chains")
    assert "FAIL checkout" in text(scenarios.failing())
    for name in ("chains", "retries", "dead letters", "latency"):
        assert f"    {name} " in checks
    for name in ("delivery", "ordering", "deadlines", "schema"):
        assert f"    {name} " not in checks
    assert "5 of 9 decided chains succeeded" in checks


def test_broken_chain_is_drawn_with_where_it_stopped() -> None:
    verdict = scenarios.failing()
    lost = next(f for f in verdict.flows[0].findings if f.key == "k-lost")
    chain = block(text(verdict), "key k-lost", "key k-unroutable")
    lines = chain.splitlines()
    assert "lost: timed out after 'billing': no 'pay' within 1s" in lines[0]
    # Its trace id: where to look in Jaeger when the chains are exported over OTLP.
    assert lines[1].split() == ["trace", str(lost.trace_id)]
    assert lines[2].split() == ["at", "ms", "+ms", "kind", "channel", "where", "detail"]
    assert lines[3].split() == ["1100.0", "routed", "orders"]
    # '>' marks the observation the finding points at: the last one seen.
    assert lines[4].split() == [">", "1100.1", "0.10", "routed", "billing"]
    assert lines[5].split() == ["x", "expected", "pay", "never", "came,", "cause", "timed_out"]


def test_chain_never_seen_still_says_what_was_expected() -> None:
    chain = block(text(scenarios.never_published()), "key k9", "Latency")
    lines = chain.splitlines()
    assert "lost: never seen at 'orders': not published" in lines[0]
    assert "(nothing seen)" in lines[2]
    assert lines[3].split()[:3] == ["x", "expected", "orders"]
    assert lines[3].endswith("never came, cause never_published")


def test_timeline_shows_deliveries_and_reasons() -> None:
    out = text(scenarios.failing())
    retried = " ".join(block(out, "key p-retried", "key k-dead").split())
    assert "retries: 5 attempts at 'billing'; the retry policy allows 3" in retried
    assert "redelivered billing delivery 5" in retried
    assert "dead_lettered dlq delivery 4; delivery_limit; from billing" in retried
    unroutable = " ".join(block(out, "key k-unroutable", "key p-retried").split())
    assert "unroutable orders NO_ROUTE" in unroutable
    assert "cause unroutable" in unroutable
    dead = block(out, "key k-dead", "Other findings")
    assert "stopped" in dead
    assert "cause dead_lettered" in dead


def test_latency_table_per_failing_flow() -> None:
    table = block(text(scenarios.failing()), "Latency (ms, clock mono_ns)", "PASS")
    header, _, *rows = table.splitlines()[1:]
    assert header.split() == [
        *("hop", "count", "p50", "p90", "p95", "p99", "max", "budget", "result")
    ]
    hop = next(r for r in rows if r.strip().startswith("billing -> pay"))
    assert hop.split()[3] == "5"  # the count
    assert hop.split()[-3:] == ["p99", "50", "FAIL"]
    e2e = next(r for r in rows if r.strip().startswith("end-to-end"))
    assert e2e.split()[-2:] == ["-", "-"]  # no budget, no verdict


def test_passing_flows_take_one_line_each() -> None:
    out = text(scenarios.failing())
    passing = [line for line in out.splitlines() if line.startswith("PASS")]
    assert passing == ["PASS  audit  3 chains, 3 succeeded, end-to-end p99 5.00ms"]
    assert out.index("FAIL checkout") < out.index("PASS  audit")
    clean = text(scenarios.passing())
    assert "Failed checks" not in clean
    assert "Latency" not in clean
    assert "Latency of audit" in text(scenarios.passing(), all_latency=True)


def test_gaps_and_findings_outside_flows() -> None:
    out = text(scenarios.failing())
    assert "audit.log  from 31000ms to 32000ms  consumer rebalance" in out
    outside = block(out, "Findings outside any flow", "FAIL checkout")
    assert "schema  key s1: payload on 'stray' breaks its schema" in outside


def test_broken_chains_are_capped() -> None:
    out = text(scenarios.lost(f"lost-{i:02d}" for i in range(15)))
    assert "Broken chains (15)" in out
    assert "key lost-09" in out
    assert "key lost-10" not in out
    assert "... 5 more broken chains not drawn" in out
    assert "key lost-02" not in text(
        scenarios.lost(f"lost-{i:02d}" for i in range(15)), max_chains=2
    )


def test_the_engine_keeps_every_finding() -> None:
    verdict = scenarios.lost(f"k{i}" for i in range(105))
    assert len(verdict.flows[0].findings) == 105
    assert "only counted" not in text(verdict)


def test_non_positive_samples_are_noted() -> None:
    out = text(scenarios.same_instant(), all_latency=True)
    assert "orders -> billing: 3 samples <= 0 left out" in out


def test_a_budget_on_a_late_tap_is_noted() -> None:
    out = " ".join(text(scenarios.failing()).split())
    assert (
        "billing -> pay: samples may be off by up to 100ms, as a tap may see a step that "
        "late (broker 'k': tap_fetch_wait)"
    ) in out


def test_unjudged_expectations_are_listed_and_fail() -> None:
    out = text(scenarios.unjudged(allowed=False))
    lines = out.splitlines()
    assert lines[0] == "FAIL  shop: 2 of 2 flows failed, 3 unjudged (28 observations)"
    assert lines[1] == (
        "recording ended: unknown (no end record: the recorder crashed or was killed)"
    )
    listed = " ".join(block(out, "Unjudged expectations (3)", "FAIL checkout").split())
    assert "Unjudged expectations (3): not allowed: the verdict cannot pass with them" in listed
    assert (
        "recording the recording's end: the trace has no end record: chains open at the last "
        "observation are undecided"
    ) in listed
    assert (
        "checkout retry max_attempts 3 at 'billing': deliveries on RabbitMQ are seen only with "
        "the firehose on (rabbitmqctl trace_on) (4 chains)"
    ) in listed
    assert "audit ordering per-key: no two chains of one key were decided" in listed
    checkout = block(out, "FAIL checkout", "Latency")
    assert "  Unjudged: 1 expectation, listed above" in checkout
    assert "PASS" not in out


def test_allowed_unjudged_expectations_are_listed_as_allowed() -> None:
    out = text(scenarios.unjudged(allowed=True))
    assert (
        out.splitlines()[0] == "PASS  shop: 2 flows passed, 3 unjudged (allowed) (28 observations)"
    )
    assert (
        "Unjudged expectations (3): allowed (allow_unjudged): they do not fail the verdict" in out
    )
    assert "(4 chains)" in out
    passing = [line.rstrip() for line in out.splitlines() if line.startswith("PASS  ")]
    assert passing[1:] == [
        "PASS  checkout  5 chains, 5 succeeded, 1 dead-lettered, end-to-end p99 20.0ms, "
        "1 unjudged (allowed)",
        "PASS  audit     3 chains, 3 succeeded, end-to-end p99 5.00ms, 1 unjudged (allowed)",
    ]
    assert "unjudged" not in text(scenarios.passing())


def test_how_the_recording_ended() -> None:
    assert text(scenarios.recorded()).splitlines()[1] == "recording ended: stopped at 61234ms"
    assert (
        text(scenarios.recorded("duration", 30000.0)).splitlines()[1]
        == "recording ended: duration at 30000ms"
    )
    assert "recording ended" not in text(scenarios.passing())  # no recording given


def test_fits_80_columns_without_colour() -> None:
    for verdict in (
        scenarios.failing(),
        scenarios.passing(),
        scenarios.unjudged(allowed=False),
        scenarios.unjudged(allowed=True),
    ):
        file = io.StringIO()
        render(verdict, Console(file=file, width=80))  # not a terminal: no colour
        out = file.getvalue()
        assert "\x1b[" not in out
        assert all(len(line) <= 80 for line in out.splitlines())
        assert "FAIL" in out or "PASS" in out


def test_untrusted_text_is_not_markup() -> None:
    out = text(scenarios.lost(["[bold]order[/bold]", "[/]"]))
    assert "key [bold]order[/bold]" in out
    assert "key [/]" in out

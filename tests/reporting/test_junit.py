"""JUnit XML: parsed back as a CI tool would, counts and failure messages checked."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import scenarios

from flowcheck.checker import Verdict
from flowcheck.reporting import junit


def parse(verdict: Verdict, **options: int) -> ET.Element:
    text = junit.dumps(verdict, **options)
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n')
    return ET.fromstring(text.encode("utf-8"))


def suite(root: ET.Element, name: str) -> ET.Element:
    found = root.find(f"testsuite[@name='{name}']")
    assert found is not None, f"no testsuite {name!r}"
    return found


def case(s: ET.Element, name: str) -> ET.Element:
    found = next((c for c in s.iter("testcase") if c.get("name") == name), None)
    assert found is not None, f"no testcase {name!r}"
    return found


def failure(c: ET.Element) -> ET.Element:
    found = c.find("failure")
    assert found is not None, f"testcase {c.get('name')!r} did not fail"
    return found


def test_counts_add_up() -> None:
    for verdict in (
        scenarios.failing(),
        scenarios.passing(),
        scenarios.unjudged(allowed=False),
        scenarios.unjudged(allowed=True),
    ):
        root = parse(verdict)
        assert root.tag == "testsuites"
        cases = list(root.iter("testcase"))
        failed = [c for c in cases if c.find("failure") is not None]
        skipped = [c for c in cases if c.find("skipped") is not None]
        assert root.get("tests") == str(len(cases))
        assert root.get("failures") == str(len(failed))
        assert root.get("skipped") == str(len(skipped))
        for s in root.iter("testsuite"):
            assert s.get("tests") == str(len(s.findall("testcase")))
            assert s.get("failures") == str(len(s.findall("testcase/failure")))
            assert s.get("skipped") == str(len(s.findall("testcase/skipped")))
            assert s.get("errors") == "0"


def test_an_unjudged_expectation_is_a_failed_test_case() -> None:
    root = parse(scenarios.unjudged(allowed=False))
    assert root.get("failures") == "3"
    assert root.get("skipped") == "0"
    checkout = suite(root, "checkout")
    f = failure(case(checkout, "unjudged: retry max_attempts 3 at 'billing'"))
    assert f.get("type") == "unjudged"
    assert f.get("message") == (
        "not judged: retry max_attempts 3 at 'billing': deliveries on RabbitMQ are seen only "
        "with the firehose on (rabbitmqctl trace_on) (4 chains)"
    )
    assert (f.text or "").startswith("checkout: retry max_attempts 3 at 'billing'")
    audit = failure(case(suite(root, "audit"), "unjudged: ordering per-key"))
    assert audit.get("message") == (
        "not judged: ordering per-key: no two chains of one key were decided"
    )
    whole = suite(root, "flowcheck")
    end = failure(case(whole, "unjudged: the recording's end"))
    assert end.get("type") == "unjudged"
    assert (end.text or "").startswith("recording: the recording's end: the trace has no end")
    assert whole.find("testcase[@name='outside flows']") is None  # no findings, no gaps
    out = whole.findtext("system-out") or ""
    assert "recording ended: unknown (no end record: the recorder crashed or was killed)" in out
    assert "unjudged expectations: not allowed: the verdict cannot pass with them" in out


def test_an_allowed_unjudged_expectation_is_skipped() -> None:
    root = parse(scenarios.unjudged(allowed=True))
    assert root.get("failures") == "0"
    assert root.get("skipped") == "3"
    c = case(suite(root, "checkout"), "unjudged: retry max_attempts 3 at 'billing'")
    assert c.find("failure") is None
    skipped = c.find("skipped")
    assert skipped is not None
    assert skipped.get("message", "").startswith(
        "allowed unjudged: retry max_attempts 3 at 'billing': deliveries on RabbitMQ"
    )
    assert suite(root, "flowcheck").get("skipped") == "1"


def test_how_the_recording_ended() -> None:
    whole = suite(parse(scenarios.recorded()), "flowcheck")
    props = {p.get("name"): p.get("value") for p in whole.iter("property")}
    assert props == {"recording_ended": "stopped", "recording_end_ms": "61234.5"}
    assert whole.get("tests") == "0"
    assert (whole.findtext("system-out") or "").startswith("recording ended: stopped at 61234ms")
    unknown = suite(parse(scenarios.unjudged(allowed=False)), "flowcheck")
    assert {p.get("name"): p.get("value") for p in unknown.iter("property")} == {
        "recording_ended": "unknown"
    }


def test_one_suite_per_flow_one_case_per_check_and_budget() -> None:
    verdict = scenarios.failing()
    root = parse(verdict)
    assert [s.get("name") for s in root.iter("testsuite")] == ["checkout", "audit", "flowcheck"]
    checkout = suite(root, "checkout")
    names = [c.get("name") for c in checkout.iter("testcase")]
    assert names == [c.name for c in verdict.flows[0].checks] + ["latency billing -> pay"]
    assert {c.get("classname") for c in checkout.iter("testcase")} == {"flowcheck.checkout"}
    failed = [c.get("name") for c in checkout.iter("testcase") if c.find("failure") is not None]
    assert failed == ["chains", "retries", "dead letters", "latency", "latency billing -> pay"]
    assert checkout.get("failures") == "5"
    props = {p.get("name"): p.get("value") for p in checkout.iter("property")}
    assert props == {
        "chains": "9",
        "succeeded": "5",
        "failed": "4",
        "unknown": "0",
        "dead_lettered": "2",
    }


def test_failures_name_their_findings() -> None:
    checkout = suite(parse(scenarios.failing()), "checkout")
    chains = failure(case(checkout, "chains"))
    message = chains.get("message", "")
    assert message.startswith("5 of 9 decided chains succeeded")
    assert "lost k-lost: timed out after 'billing': no 'pay' within 1s" in message
    assert chains.get("type") == "flowcheck.lost"
    body = chains.text or ""
    assert "lost k-unroutable: unroutable at 'orders' (NO_ROUTE)" in body
    assert "seen: routed orders @1100.0ms -> routed billing @1100.1ms" in body
    retries = failure(case(checkout, "retries"))
    assert "5 attempts at 'billing'" in retries.get("message", "")
    budget = failure(case(checkout, "latency billing -> pay"))
    assert budget.get("message", "").startswith("billing -> pay: p99 ")
    assert (
        "over its budget of 50ms (5 samples, clock mono_ns; a tap may see a step up to 100ms late)"
        in budget.get("message", "")
    )


def test_passing_verdict_has_no_failures() -> None:
    root = parse(scenarios.passing())
    assert root.get("failures") == "0"
    assert root.find(".//failure") is None
    assert root.find("testsuite[@name='flowcheck']") is None  # nothing outside the flows


def test_findings_outside_flows_and_gaps() -> None:
    outside = suite(parse(scenarios.failing()), "flowcheck")
    f = failure(case(outside, "outside flows"))
    assert "schema s1: payload on 'stray' breaks its schema" in f.get("message", "")
    out = outside.findtext("system-out") or ""
    assert "tap gap on audit.log from 31000ms: consumer rebalance" in out


def test_listed_findings_are_bounded() -> None:
    verdict = scenarios.lost(f"k{i:02d}" for i in range(30))
    body = failure(case(suite(parse(verdict, max_findings=20), "checkout"), "chains")).text or ""
    assert "lost k19:" in body
    assert "lost k20:" not in body
    assert "... 10 more not listed (30 in all)" in body


def test_characters_xml_cannot_hold_are_escaped() -> None:
    verdict = scenarios.lost(["bad\x00key\x1b[31m"])
    f = failure(case(suite(parse(verdict), "checkout"), "chains"))
    assert "lost bad\\x00key\\x1b[31m:" in f.get("message", "")


def test_times_are_the_durations_the_verdict_knows() -> None:
    verdict = scenarios.recorded(end_ms=61234.5)
    root = parse(verdict)
    assert root.get("time") == "61.234"  # the recording
    for flow in verdict.flows:
        s = suite(root, flow.flow)
        (e2e,) = [lat for lat in flow.latency if lat.hop == "end-to-end"]
        assert e2e.stats.max_ms  # a chain completed: its duration is known
        slowest = f"{e2e.stats.max_ms / 1000:.3f}"
        assert s.get("time") == slowest != "0.000"
        for check in flow.checks:
            assert case(s, check.name).get("time") == slowest
        for lat in flow.latency:
            if lat.budget_ms:
                assert lat.stats.max_ms is not None
                assert case(s, f"latency {lat.hop}").get("time") == f"{lat.stats.max_ms / 1000:.3f}"
    # No end known, nothing unjudged has a duration.
    root = parse(scenarios.unjudged(allowed=False))
    assert root.get("time") == "0"
    unjudged = [c for c in root.iter("testcase") if c.get("name", "").startswith("unjudged: ")]
    assert unjudged
    assert {c.get("time") for c in unjudged} == {"0"}

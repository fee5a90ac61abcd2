"""The HTML report: what it says, that it stays small, and that a real browser renders it.

The browser tests need Chromium (tests/reporting/headless.py) and fail, not skip,
without it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import scenarios
from headless import browse, rendered
from history import History

from flowcheck.checker import Histogram, Seen, Verdict
from flowcheck.checker.verdict import PASSING_SAMPLE
from flowcheck.errors import MissingDependency
from flowcheck.observations import Kind
from flowcheck.reporting import html, write_reports
from flowcheck.topology import Topology, load


def test_failing_report_says_what_failed() -> None:
    page = html.dumps(scenarios.failing())
    assert page.startswith("<!DOCTYPE html>")
    assert "<span class='fail'>FAIL</span> flowcheck: shop" in page
    flows = re.search(r"<table id='flows'>(.*?)</table>", page, re.S)
    assert flows is not None
    rows = re.findall(r"<tr class='(\w+)'><td><a href='#flow-(\w+)'>", flows.group(1))
    assert rows == [("fail", "checkout"), ("pass", "audit")]
    # every check, judged: failed ones and passed ones
    assert "<tr><td>retries</td><td class='fail'>fail</td>" in page
    assert "<tr><td>ordering</td><td class='pass'>pass</td>" in page
    # the broken chains, each with its swimlane; the lost one says what was expected next
    for key in ("k-lost", "k-unroutable", "p-retried", "k-dead"):
        assert f"<h4>key {key}</h4>" in page
    assert "expected next: pay" in page
    assert "consumer rebalance" in page  # the tap gap
    assert "p99 50" in page  # the budget beside the percentiles
    # the flows as paths of channels: messages and p99 per hop, what ended badly
    assert "<h2>Flows through the channels</h2>" in page
    assert '"5, p99 79.9 ms"' in page
    assert '"2 dead-lettered, 4 failed"' in page
    # where the lost chains stopped: on their flow's path, and on their swimlane
    assert '"1 lost before pay"' in page
    assert "expected next: pay, never came" in page
    # what failed, at the top: the failed checks, the first broken chains and the count left
    top = re.search(r"<ul id='what-failed'>(.*?)</ul>\n", page, re.S)
    assert top is not None
    assert top.group(1).startswith("\n<li><a href='#flow-checkout'>checkout</a> failed: chains: ")
    assert "<li>key k-lost: timed out after &#x27;billing&#x27;: no &#x27;pay&#x27;" in top.group(1)
    assert "<li>and 1 more broken chain</li>" in top.group(1)
    assert "audit" not in top.group(1)  # it passed
    assert "<h2>Over the recording</h2>" in page
    # per flow, per second over the recording: completed, failed, retries, dead letters
    lines = re.findall(r'"label":\{"type":"value","value":"([a-z ]+)"\}', page)
    assert sorted(lines) == ["completed", "completed", "dead letters", "failed", "retries"]
    assert "checkout: per second, in buckets of 512.0 ms" in page
    # per flow, each hop's samples and the whole chain's as a histogram; budgets as lines
    for title in ("orders -&gt; billing (8", "billing -&gt; pay (5", "end-to-end (5"):
        assert f'"text":"{title} samples)"' in page
    assert page.count('"name":"Quad"') == 3 * (3 + 2)  # a glyph and two copies (selection)
    assert page.count('"name":"Span"') == 2  # checkout's pay and audit's log: p99 budgets
    assert page.count('"text":"budget p99"') == 2
    # nothing to fetch: every script inline, no stylesheet or image from elsewhere
    assert not re.search(r"<script[^>]*\bsrc=|<link\b|<img\b", page)


def test_gaps_are_shaded_where_they_hid_a_chain() -> None:
    verdict = scenarios.failing()
    far = html.dumps(verdict)  # its gap is 30 s after every broken chain
    lost = next(f for f in verdict.flows[0].findings if f.key == "k-lost")
    at = lost.timeline[-1].at_ms
    near = Seen(kind="gap", channel="pay", at_ms=at, until_ms=at + 5, reason="tap down")
    shaded = html.dumps(verdict.model_copy(update={"gaps": [near]}))
    # on the recording's time (both: the broken chains and each flow's rates) and on the
    # timeline of the chain it hid (the near one)
    assert far.count('"name":"BoxAnnotation"') == 1 + 2
    assert shaded.count('"name":"BoxAnnotation"') == 2 + 2


def test_a_verdict_without_series_or_bins_still_renders() -> None:
    verdict = scenarios.failing()
    flows = [
        f.model_copy(
            update={
                "over_time": None,
                "latency": [lat.model_copy(update={"histogram": Histogram()}) for lat in f.latency],
            }
        )
        for f in verdict.flows
    ]
    page = html.dumps(verdict.model_copy(update={"flows": flows}))
    assert "<h2>Over the recording</h2>" in page  # the broken chains are still there
    assert '"name":"Step"' not in page
    assert '"name":"Quad"' not in page


def test_passing_and_unjudged_reports() -> None:
    page = html.dumps(scenarios.passing())
    assert "<span class='pass'>PASS</span>" in page
    assert "class='fail'" not in page
    page = html.dumps(scenarios.unjudged(allowed=False))
    assert "<ul id='unjudged'>" in page
    assert "retry max_attempts 3 at &#x27;billing&#x27;" in page
    assert "<td class='fail'>unjudged</td>" in page


def test_text_from_the_system_is_escaped() -> None:
    page = html.dumps(scenarios.lost(["<img src=x onerror=alert(1)>"]))
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def big() -> Verdict:
    """10,000 chains, 100 of them lost: the verdict the checker would give."""
    base = scenarios.lost([f"order-{i:05d}" for i in range(100)])
    flow = base.flows[0]
    flow = flow.model_copy(update={"chains": 10_000, "succeeded": 9_900})
    return base.model_copy(update={"flows": [flow, *base.flows[1:]]})


def test_ten_thousand_chains_stay_small() -> None:
    verdict = big()
    assert len(verdict.flows[0].findings) == 100
    page = html.dumps(verdict)  # how fast: benchmarks/html_report.py, not a test
    assert len(page.encode()) < 3_000_000
    drawn = page.count("<div class='chain'>")
    assert drawn == html.MAX_SWIMLANES
    assert f"the other {100 - html.MAX_SWIMLANES} are listed below them" in page
    assert page.count("<li><b>order-") == 100 - html.MAX_SWIMLANES


def test_written_with_the_other_reports(tmp_path: Path) -> None:
    paths = write_reports(scenarios.failing(), tmp_path)
    assert paths["html"] == tmp_path / "report.html"
    assert "flowcheck: shop" in paths["html"].read_text(encoding="utf-8")


def test_report_command_renders_a_kept_trace(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from history import START, History

    from flowcheck.cli import cli
    from flowcheck.trace import Header, Writer

    topology = tmp_path / "shop.yaml"
    topology.write_text(scenarios.TOPOLOGY, encoding="utf-8")
    h = History("checkout")
    h.at(10).routed("orders", "k-lost")
    h.routed("billing", "k-lost")
    trace = tmp_path / "trace.jsonl"
    with Writer(str(trace), Header(started=0.0, started_mono_ns=START, topology="shop")) as w:
        for obs in h.items:
            w.write(obs)
        w.end("stopped", START + 60_000 * 1_000_000, 0.0)
    out = tmp_path / "out" / "shop.html"
    result = CliRunner().invoke(cli, ["report", str(topology), str(trace), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"report: {out} (FAIL)\n"
    page = out.read_text(encoding="utf-8")
    assert "<h4>key k-lost</h4>" in page
    assert "expected next: pay" in page
    assert "<h2 id='topology'>The topology</h2>" in page  # the topology it was checked against
    missing = CliRunner().invoke(cli, ["report", str(topology), str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2


def test_renders_in_a_browser_without_errors(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(html.dumps(scenarios.failing()), encoding="utf-8")
    dom = browse(page, tmp_path, "--dump-dom")
    # the flows' paths, the rates and the broken chains over the recording, the latency
    # percentiles and histograms of both flows, and one swimlane per broken chain (4)
    assert rendered(dom) == (11, 11, "")
    assert '<h1 id="headline">' in dom
    shot = tmp_path / "report.png"
    browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1000,2400")
    assert shot.stat().st_size > 10_000


def test_the_browser_check_sees_script_errors(tmp_path: Path) -> None:
    broken = html.dumps(scenarios.failing()).replace(
        "</body>", "<script>undefinedFunction();</script></body>"
    )
    page = tmp_path / "broken.html"
    page.write_text(broken, encoding="utf-8")
    _, _, errors = rendered(browse(page, tmp_path, "--dump-dom"))
    assert "undefinedFunction" in errors


def test_big_report_renders_in_a_browser(tmp_path: Path) -> None:
    page = tmp_path / "big.html"
    page.write_text(html.dumps(big()), encoding="utf-8")
    dom = browse(page, tmp_path, "--dump-dom")  # how fast: benchmarks/html_report.py
    # the flows' paths, the rates and the chains over the recording, checkout's latency
    # and its histogram (the lost chains' first hop), its first swimlanes, audit's latency
    plots = html.MAX_SWIMLANES + 6
    assert rendered(dom) == (plots, plots, "")


def test_without_bokeh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flowcheck.reporting

    monkeypatch.setitem(sys.modules, "bokeh", None)  # what an import finds uninstalled
    with pytest.raises(MissingDependency, match=r"flowcheck\[html\]"):
        html.dumps(scenarios.passing())
    monkeypatch.setattr(flowcheck.reporting, "_has_bokeh", lambda: False)
    paths = write_reports(scenarios.passing(), tmp_path)
    assert sorted(paths) == ["json", "junit", "markdown"]


def test_the_shop_topology_as_a_picture() -> None:
    from flowcheck.reporting import _picture

    top, verdict = scenarios.shop()
    page = html.dumps(verdict, topology=top)
    assert "<h2 id='topology'>The topology</h2>" in page
    assert "<h2 id='topology'>" not in html.dumps(verdict)  # no topology given, none drawn
    places = _picture.layout(top)
    for name in ("checkout", "billing", "payments-worker", "shipping"):
        assert ("service", name) in places
        assert f'"{name}"' in page
    for name in top.channels:
        assert ("channel", name) in places
    # channels in the order the flows pass them, each service after what it consumes
    column = {node[1]: x for node, (x, _) in places.items()}
    assert column["shop.orders"] < column["billing.orders"] < column["billing"]
    assert column["billing"] < column["payments"] < column["payments-worker"]
    assert column["payments-worker"] < column["shipments"] < column["shipping"]
    assert column["billing.orders.dlq"] == column["billing.orders"]  # under it
    assert column["payments-retry"] == column["payments"]
    links = _picture.edges(top, verdict)
    hand_off = links[(("service", "billing"), ("channel", "payments"))]
    assert hand_off.labels == ["order-to-shipment: 5, p99 29.9 ms"]
    routed = links[(("channel", "shop.orders"), ("channel", "billing.orders"))]
    assert routed.kind == "route"
    assert routed.labels == ["order-to-shipment: 7, p99 0.10 ms"]
    # the verdict's route counts, on the routes the messages took
    retry = links[(("channel", "payments"), ("channel", "payments-retry"))]
    assert retry.labels == ["retries 0"]  # counted, and none came
    dead = links[(("channel", "billing.orders"), ("channel", "shop.dlx"))]
    assert dead.labels == ["order-to-shipment: 1"]  # the poison order, seen at the queue
    assert "'?'" not in page  # nothing unknown: no note about it
    assert "on retry and dead-letter edges, the messages each flow" in page


def shop_retried() -> tuple[Topology, Verdict]:
    """topologies/shop.yaml: two declined payments retried through payments-retry, one
    of them dead-lettered from there; a poison order dead-lettered from billing after
    three redeliveries (the firehose on)."""
    top = load(str(scenarios.SHOP))
    pay = History("declined-payment")
    for n, key in enumerate(("o-d", "o-r")):
        body = {"order_id": key, "status": "declined"}
        pay.at(n * 100).routed("payments", key, body, partition=0, offset=n)
        pay.at(n * 100 + 10).routed("payments-retry", key, body, partition=0, offset=n)
    dead = {"order_id": "o-d", "status": "declined"}
    pay.at(30).add(
        Kind.DEAD_LETTERED,
        "payments-dlt",
        "o-d",
        dead,
        partition=0,
        offset=0,
        origin="payments-retry",
        delivery_count=2,
    )
    poison = History("poison-order")
    bad = {"order_id": "o-p", "amount": 1, "poison": True}
    poison.at(0).routed("shop.orders", "o-p", bad, routing_key="order.placed")
    poison.routed("billing.orders", "o-p", bad)
    for n in range(1, 5):
        kind = Kind.DELIVERED if n == 1 else Kind.REDELIVERED
        poison.add(kind, "billing.orders", "o-p", bad, delivery_count=n)
    poison.add(
        Kind.DEAD_LETTERED,
        "billing.orders.dlq",
        "o-p",
        bad,
        reason="delivery_limit",
        origin="billing.orders",
        delivery_count=3,
    )
    return top, scenarios.run(top, pay.items + poison.items)


def test_the_shop_picture_counts_retries_and_dead_letters() -> None:
    from flowcheck.reporting import _picture

    top, verdict = shop_retried()
    links = _picture.edges(top, verdict)
    retry = links[(("channel", "payments"), ("channel", "payments-retry"))]
    assert retry.labels == ["declined-payment: 2"]
    assert "declined-payment: 2 retries on payments-retry" in retry.about
    dlt = links[(("channel", "payments"), ("channel", "payments-dlt"))]
    assert dlt.labels == ["declined-payment: 1"]  # died on the retry topic: of payments
    dlx = links[(("channel", "billing.orders"), ("channel", "shop.dlx"))]
    assert dlx.labels == ["poison-order: 1"]
    billing = links[(("channel", "billing.orders"), ("service", "billing"))]
    assert billing.labels == ["poison-order: 3 redelivered"]
    assert "poison-order at billing.orders: 1 messages, 3 redelivered" in billing.about
    quiet = links[(("channel", "shipments"), ("channel", "shipments-dead"))]
    assert quiet.labels == ["dead letters 0"]
    page = html.dumps(verdict, topology=top)
    assert "declined-payment: 2" in page
    assert "dead letters ?" not in page
    assert "retries ?" not in page


def test_a_verdict_without_route_counts_says_what_it_does_not_know() -> None:
    from flowcheck.reporting import _picture

    top, verdict = scenarios.shop()
    older = verdict.model_copy(
        update={"flows": [f.model_copy(update={"routes": None}) for f in verdict.flows]}
    )
    links = _picture.edges(top, older)
    retry = links[(("channel", "payments"), ("channel", "payments-retry"))]
    assert retry.labels == ["retries ?"]
    dead = links[(("channel", "billing.orders"), ("channel", "shop.dlx"))]
    assert dead.labels == ["dead letters ?"]
    assert "order-to-shipment: 1 dead-lettered over 3 routes" in " ".join(dead.about)
    assert "An edge says '?' where the verdict holds no count" in _picture.note(top, older)
    # one dead-letter route: the flow's count is on it
    flows = [
        f.model_copy(update={"dead_lettered": 3}) if f.flow == "poison-order" else f
        for f in older.flows
    ]
    links = _picture.edges(top, older.model_copy(update={"flows": flows}))
    dead = links[(("channel", "billing.orders"), ("channel", "shop.dlx"))]
    assert dead.labels == ["poison-order: 3"]  # its steps have no other route


@pytest.mark.parametrize("name", sorted(p.stem for p in scenarios.SHOP.parent.glob("*.yaml")))
def test_every_example_topology_is_drawn(name: str) -> None:
    from flowcheck.checker import check
    from flowcheck.reporting import _picture
    from flowcheck.topology import load

    top = load(str(scenarios.SHOP.parent / f"{name}.yaml"))
    verdict = check(top, [])
    places = _picture.layout(top)
    assert set(places) == {("channel", c) for c in top.channels} | {
        ("service", s) for s in top.services
    }
    assert len(set(places.values())) == len(places), "two nodes in one place"
    assert "<h2 id='topology'>" in html.dumps(verdict, topology=top)


def test_a_lone_channel_is_drawn() -> None:
    from flowcheck.checker import check
    from flowcheck.topology import loads

    top = loads(
        "name: one\nbrokers: {r: {kind: redis}}\nchannels: {s: {broker: r, kind: stream}}\n"
        "flows: {f: {correlate: $.id, steps: [s]}}\n"
    )
    page = html.dumps(check(top, []), topology=top)
    assert "<h2 id='topology'>The topology</h2>" in page


def test_passing_chains_are_sampled_and_say_so() -> None:
    top, verdict = scenarios.shop()
    page = html.dumps(verdict, topology=top)
    assert "6 of 6 passing chains shown (all)." in page
    assert "<tr><td>o0</td><td class='n'>60.0</td></tr>" in page
    assert "<tr><td>o-poison</td><td class='n'>-</td></tr>" in page  # dead-lettered: untimed
    flow = scenarios.many().flows[0]
    assert flow.succeeded == 9_900
    assert len(flow.passing) == PASSING_SAMPLE
    keys = [p.key for p in flow.passing]
    assert keys == sorted(keys), "in the order they were decided"
    assert all(k >= "order-00100" for k in keys), "passing chains only"
    assert keys[-1] > "order-05000", "drawn from all of them, not the first"
    assert all(p.took_ms == 20.0 for p in flow.passing)
    page = html.dumps(scenarios.many())
    assert f"{PASSING_SAMPLE} of 9900 passing chains shown (sampled)." in page
    assert page.count("<tr><td>order-") == PASSING_SAMPLE


def test_the_sample_is_the_same_on_every_check() -> None:
    scenarios.many.cache_clear()
    first = scenarios.many().flows[0].passing
    scenarios.many.cache_clear()
    assert scenarios.many().flows[0].passing == first


def test_ten_thousand_checked_chains_stay_under_five_mb() -> None:
    verdict = scenarios.many()
    assert verdict.flows[0].chains == 10_000
    assert verdict.flows[0].failed == 100
    page = html.dumps(verdict, topology=scenarios.topology())
    assert len(page.encode()) < 5_000_000
    assert page.count("<div class='chain'>") == html.MAX_SWIMLANES


def test_shop_picture_renders_in_a_browser(tmp_path: Path) -> None:
    top, verdict = scenarios.shop()
    page = tmp_path / "shop.html"
    page.write_text(html.dumps(verdict, topology=top), encoding="utf-8")
    drawn, expected, errors = rendered(browse(page, tmp_path, "--dump-dom"))
    assert (drawn, errors) == (expected, "")

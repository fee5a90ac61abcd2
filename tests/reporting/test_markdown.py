"""The Markdown summary: headline, flow table, failed checks, latency; cells stay cells."""

from __future__ import annotations

import re

import scenarios

from flowcheck.reporting import markdown


def rows(md: str, header_start: str) -> list[list[str]]:
    """The body cells of the table whose header row starts with ``header_start``."""
    lines = md.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    out = []
    for line in lines[first + 2 :]:
        if not line.startswith("|"):
            break
        out.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return out


def test_headline_says_pass_or_fail() -> None:
    failing = markdown.dumps(scenarios.failing())
    assert failing.splitlines()[0] == "## ❌ FAIL flowcheck: shop"
    # 43 records read, one of them a tap gap: no observation.
    assert failing.splitlines()[2].startswith("1 of 2 flows failed, 42 observations")
    assert "1 tap gap" in failing.splitlines()[2]
    assert markdown.dumps(scenarios.passing()).splitlines()[0] == "## ✅ PASS flowcheck: shop"


def test_flow_table() -> None:
    table = rows(markdown.dumps(scenarios.failing()), "| flow | chains |")
    assert table == [
        ["checkout", "9", "5", "4", "0", "2", "0", "❌ **fail**"],
        ["audit", "3", "3", "0", "0", "0", "0", "✅ pass"],
    ]


def test_unjudged_expectations_are_listed_and_fail() -> None:
    md = markdown.dumps(scenarios.unjudged(allowed=False))
    lines = md.splitlines()
    assert lines[0] == "## ❌ FAIL flowcheck: shop"
    assert lines[2] == (
        "2 of 2 flows failed, 28 observations, 3 unjudged (verdict format version 1)."
    )
    assert lines[4] == (
        "Recording ended: unknown (no end record: the recorder crashed or was killed)."
    )
    assert rows(md, "| flow | chains |") == [
        ["checkout", "5", "5", "0", "0", "1", "1", "❌ **fail**"],
        ["audit", "3", "3", "0", "0", "0", "1", "❌ **fail**"],
    ]
    section = md.split("### Unjudged expectations", 1)[1].split("###", 1)[0]
    assert "Declared, but not judged; not allowed: the verdict cannot pass with them." in section
    assert [line for line in section.splitlines() if line.startswith("- ")] == [
        "- **recording**: the recording's end: the trace has no end record: chains open at "
        "the last observation are undecided",
        "- **checkout**: retry max\\_attempts 3 at 'billing': deliveries on RabbitMQ are seen "
        "only with the firehose on (rabbitmqctl trace\\_on) (4 chains)",
        "- **audit**: ordering per-key: no two chains of one key were decided",
    ]
    failed = md.split("### Failed checks", 1)[1].split("### Latency", 1)[0]
    assert failed.count("- **unjudged**: 1 expectation, listed above") == 2


def test_allowed_unjudged_expectations_are_listed_as_allowed() -> None:
    md = markdown.dumps(scenarios.unjudged(allowed=True))
    assert md.splitlines()[0] == "## ✅ PASS flowcheck: shop"
    assert "3 unjudged (allowed)" in md.splitlines()[2]
    assert "Declared, but not judged; allowed (allow\\_unjudged): they do not fail" in md
    assert "### Failed checks" not in md
    assert [r[-2:] for r in rows(md, "| flow | chains |")] == [["1", "✅ pass"], ["1", "✅ pass"]]
    assert "njudged expectations" not in markdown.dumps(scenarios.passing())


def test_how_the_recording_ended() -> None:
    assert markdown.dumps(scenarios.recorded()).splitlines()[4] == (
        "Recording ended: stopped at 61234ms."
    )
    assert "Recording ended" not in markdown.dumps(scenarios.passing())


def test_failed_checks_with_their_first_findings() -> None:
    verdict = scenarios.failing()
    lost = next(f for f in verdict.flows[0].findings if f.key == "k-lost")
    md = markdown.dumps(verdict)
    section = md.split("### Failed checks", 1)[1].split("### Latency", 1)[0]
    assert "#### checkout" in section
    assert "- **chains**: 5 of 9 decided chains succeeded" in section
    assert (
        "  - `lost` key k-lost: timed out after 'billing': no 'pay' within 1s "
        f"(cause `timed_out`; expected next: pay; trace `{lost.trace_id}`)"
    ) in section
    assert "- **retries**: 1 finding(s)" in section
    assert "**ordering**" not in section


def test_findings_per_check_are_bounded() -> None:
    md = markdown.dumps(scenarios.lost(f"k{i:02d}" for i in range(8)), max_findings=5)
    assert "key k04" in md
    assert "key k05" not in md
    assert "  - … 3 more (8 in all)" in md


def test_latency_table() -> None:
    table = rows(markdown.dumps(scenarios.failing()), "| flow | hop |")
    assert [r[:3] for r in table] == [
        ["checkout", "orders -> billing", "8"],
        ["checkout", "billing -> pay", "5"],
        ["checkout", "end-to-end", "5"],
        ["audit", "audit.in -> audit.log", "3"],
        ["audit", "end-to-end", "3"],
    ]
    hop = table[1]
    assert hop[6].startswith("**")  # p99, over its budget, in bold
    assert hop[8:] == ["p99 50", "mono\\_ns", "❌ **fail**"]
    assert table[3][-1] == "✅ pass"
    assert table[2][-1] == "—"  # no budget


def test_gaps_and_findings_outside_flows() -> None:
    md = markdown.dumps(scenarios.failing())
    assert "- audit.log from 31000 ms: consumer rebalance" in md
    assert "### Findings outside any flow" in md
    assert "- `schema` key s1: payload on 'stray' breaks its schema" in md


def test_non_positive_samples_are_noted() -> None:
    md = markdown.dumps(scenarios.same_instant())
    assert "checkout, orders -> billing: 3 samples ≤ 0 ms left out" in md


def test_a_budget_on_a_late_tap_is_noted() -> None:
    md = markdown.dumps(scenarios.failing())
    assert (
        "- checkout, billing -> pay: samples may be off by up to 100ms, as a tap may see "
        "a step that late (broker 'k': tap\\_fetch\\_wait)"
    ) in md
    assert "orders -> billing: samples may be off" not in md  # RabbitMQ pushes: exact


def test_untrusted_text_cannot_break_a_table_or_become_markup() -> None:
    assert markdown.escape("a|b") == "a\\|b"
    assert markdown.escape("<script>x</script>") == "&lt;script>x&lt;/script>"
    assert markdown.escape("*not bold* [no](link)\nnext") == ("\\*not bold\\* \\[no\\](link) next")
    verdict = scenarios.failing()
    flow = verdict.flows[0].model_copy(update={"flow": "check|out\nnow"})
    odd = verdict.model_copy(update={"flows": [flow, *verdict.flows[1:]]})
    md = markdown.dumps(odd)
    table = rows(md, "| flow | chains |")
    assert table[0][0] == "check\\|out now"
    assert all(len(r) == 8 for r in table)
    assert all(len(r) == 11 for r in rows(md, "| flow | hop |"))
    lost = markdown.dumps(scenarios.lost(["a|b*c*<img src=x>"]))
    assert "key a\\|b\\*c\\*&lt;img src=x>:" in lost

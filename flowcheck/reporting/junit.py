"""The verdict as JUnit XML, for CI test-report views (GitHub, GitLab, Jenkins, Azure).

Layout::

    <testsuites name="flowcheck" tests failures errors skipped time>
      <testsuite name=FLOW ...>               one per flow
        <properties/>                         chains, succeeded, failed, unknown, dead_lettered
        <testcase name=CHECK classname="flowcheck.FLOW">   one per check
          <failure message type>findings</failure>        when the check failed
        <testcase name="latency HOP" ...>     one per hop with a budget
        <testcase name="unjudged: EXPECTATION" ...>       one per unjudged expectation:
          <failure type="unjudged" message=WHY/>          a failure, or when allowed
          <skipped message=WHY/>                          skipped
        <system-out>                          the flow's counts, in words
      <testsuite name="flowcheck">            only with findings outside flows, tap gaps,
        <properties/>                         unjudged expectations of no flow, or a
        <testcase name="outside flows">       recording's end (recording_ended,
        <testcase name="unjudged: ...">       recording_end_ms)

Times, in seconds, are the durations the verdict knows: a flow's suite and each of its
check cases take the flow's slowest chain (its end-to-end ``max_ms``: what the checks
judged took that long), a latency case its hop's slowest sample, ``<testsuites>`` the
recording (``recording.end_ms``). What has no duration (an unjudged expectation, the
``flowcheck`` suite's cases, a flow with no completed chain) is 0.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from flowcheck.checker.verdict import Check, Finding, FlowVerdict, Latency, Unjudged, Verdict
from flowcheck.reporting._common import (
    WHOLE,
    finding_line,
    findings_of,
    flow_counts,
    latency_problem,
    ms,
    plural,
    recording_text,
    timeline_line,
    unjudged_status,
    unjudged_text,
)

MAX_FINDINGS = 20  # listed per failed check; the rest are counted
MAX_MESSAGE = 500  # characters of a failure's message attribute: CI views show it on one line

# XML 1.0 cannot carry these at all, even escaped; keys and broker reasons may hold them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def clean(text: str) -> str:
    """``text`` with the characters XML 1.0 forbids shown as ``\\xNN``."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def to_element(verdict: Verdict, *, max_findings: int = MAX_FINDINGS) -> ET.Element:
    """The ``<testsuites>`` element."""
    root = ET.Element("testsuites", name="flowcheck")
    if verdict.topology:
        root.set("name", clean(f"flowcheck {verdict.topology}"))
    allowed = verdict.allow_unjudged
    for flow in verdict.flows:
        root.append(_flow_suite(flow, max_findings, allowed))
    if verdict.findings or verdict.gaps or verdict.unjudged or verdict.recording is not None:
        root.append(_outside_suite(verdict, max_findings))
    suites = root.findall("testsuite")
    for total in ("tests", "failures", "skipped"):
        root.set(total, str(sum(int(s.get(total, "0")) for s in suites)))
    root.set("errors", "0")
    rec = verdict.recording
    root.set("time", _seconds(None if rec is None else rec.end_ms))
    return root


def dumps(verdict: Verdict, *, max_findings: int = MAX_FINDINGS) -> str:
    """The JUnit XML document, UTF-8 declared, indented, ending in a newline."""
    root = to_element(verdict, max_findings=max_findings)
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"


# ---------------------------------------------------------------- suites


def _seconds(duration_ms: float | None) -> str:
    return "0" if not duration_ms or duration_ms < 0 else f"{duration_ms / 1000:.3f}"


def _slowest(lat: Latency | None) -> float | None:
    return None if lat is None else lat.stats.max_ms


def _suite(
    name: str,
    cases: list[ET.Element],
    out: str,
    props: dict[str, int | str],
    time: str = "0",
) -> ET.Element:
    suite = ET.Element(
        "testsuite",
        name=clean(name),
        tests=str(len(cases)),
        failures=str(sum(1 for c in cases if c.find("failure") is not None)),
        errors="0",
        skipped=str(sum(1 for c in cases if c.find("skipped") is not None)),
        time=time,
    )
    if props:  # before the test cases: the JUnit schema fixes the order
        properties = ET.SubElement(suite, "properties")
        for key, value in props.items():
            ET.SubElement(properties, "property", name=key, value=clean(str(value)))
    suite.extend(cases)
    if out:
        ET.SubElement(suite, "system-out").text = clean(out)
    return suite


def _flow_suite(flow: FlowVerdict, max_findings: int, allowed: bool) -> ET.Element:
    classname = f"flowcheck.{flow.flow}"
    # The checks judged the flow's chains: the slowest one is how long what they judged took.
    took = _seconds(_slowest(next((lat for lat in flow.latency if lat.hop == "end-to-end"), None)))
    cases = [_check_case(flow, c, classname, max_findings, took) for c in flow.checks]
    cases += [_latency_case(lat, classname) for lat in flow.latency if lat.budget_ms]
    cases += [_unjudged_case(u, classname, flow.flow, allowed) for u in flow.unjudged]
    props: dict[str, int | str] = {
        "chains": flow.chains,
        "succeeded": flow.succeeded,
        "failed": flow.failed,
        "unknown": flow.unknown,
        "dead_lettered": flow.dead_lettered,
    }
    return _suite(flow.flow, cases, f"{flow.flow}: {flow_counts(flow)}\n", props, took)


def _outside_suite(verdict: Verdict, max_findings: int) -> ET.Element:
    """Findings of no single flow (they fail the verdict), tap gaps (they do not), the
    unjudged expectations of the recording as a whole, and how the recording ended."""
    cases: list[ET.Element] = []
    if verdict.findings or verdict.gaps:
        case = _case("outside flows", "flowcheck")
        cases.append(case)
        if verdict.findings:
            first = verdict.findings[0]
            _fail(
                case,
                _message(plural(len(verdict.findings), "finding") + " outside any flow", first),
                "flowcheck." + first.kind.value,
                _listing(verdict.findings, len(verdict.findings), max_findings),
            )
    allowed = verdict.allow_unjudged
    cases += [_unjudged_case(u, "flowcheck", u.flow or WHOLE, allowed) for u in verdict.unjudged]
    out = "".join(
        f"tap gap on {g.channel} from {ms(g.at_ms)}ms: {g.reason or 'no reason given'}\n"
        for g in verdict.gaps
    )
    props: dict[str, int | str] = {}
    rec = verdict.recording
    if rec is not None:
        props["recording_ended"] = rec.ended
        if rec.end_ms is not None:
            props["recording_end_ms"] = f"{rec.end_ms:g}"
        if rec.stop_ms is not None:
            props["recording_stop_ms"] = f"{rec.stop_ms:g}"
        if rec.after_stop:
            props["recording_after_stop"] = rec.after_stop
        out = recording_text(rec) + "\n" + out
    if verdict.unjudged or any(f.unjudged for f in verdict.flows):
        out += f"unjudged expectations: {unjudged_status(verdict)}\n"
    return _suite("flowcheck", cases, out, props)


# ---------------------------------------------------------------- cases


def _case(name: str, classname: str, time: str = "0") -> ET.Element:
    return ET.Element("testcase", name=clean(name), classname=clean(classname), time=time)


def _fail(case: ET.Element, message: str, kind: str, text: str) -> None:
    failure = ET.SubElement(case, "failure", message=clean(message), type=clean(kind))
    failure.text = clean(text)


def _check_case(
    flow: FlowVerdict, check: Check, classname: str, limit: int, time: str
) -> ET.Element:
    case = _case(check.name, classname, time)
    if check.passed:
        return case
    found = findings_of(flow, check)
    kinds = sorted({f.kind.value for f in found})
    _fail(
        case,
        _message(check.message, found[0] if found else None),
        "flowcheck." + ("+".join(kinds) or check.name.replace(" ", "_")),
        check.message + "\n" + _listing(found, max(check.findings, len(found)), limit),
    )
    return case


def _latency_case(lat: Latency, classname: str) -> ET.Element:
    case = _case(f"latency {lat.hop}", classname, _seconds(_slowest(lat)))
    if not lat.passed:
        problem = latency_problem(lat)
        _fail(case, problem, "flowcheck.latency", problem + "\n")
    return case


def _unjudged_case(u: Unjudged, classname: str, about: str, allowed: bool) -> ET.Element:
    """An expectation that could not be judged: failed, or skipped when the user allowed it.
    ``about``: its flow, or the recording as a whole."""
    case = _case(f"unjudged: {u.expectation}", classname)
    text = unjudged_text(u)
    if allowed:
        ET.SubElement(case, "skipped", message=clean(_cut(f"allowed unjudged: {text}")))
    else:
        _fail(case, _cut(f"not judged: {text}"), "unjudged", f"{about}: {text}\n")
    return case


def _cut(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _message(head: str, first: Finding | None) -> str:
    """The one-line message: the check's own, then the first finding, so it names one."""
    return _cut(head if first is None else f"{head}; first: {finding_line(first)}")


def _listing(found: list[Finding], total: int, limit: int) -> str:
    lines: list[str] = []
    for f in found[:limit]:
        lines.append(finding_line(f))
        if f.timeline:
            lines.append("  seen: " + timeline_line(f.timeline))
        if f.trace_id:
            lines.append(f"  trace: {f.trace_id}")
    if total > min(len(found), limit):
        lines.append(f"... {total - min(len(found), limit)} more not listed ({total} in all)")
    return "".join(line + "\n" for line in lines)

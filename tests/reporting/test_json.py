"""The JSON verdict: a lossless round trip, a schema, and docs/verdict.md that match the model."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import scenarios
from pydantic import BaseModel

from flowcheck.checker import Cause, FindingKind, Verdict
from flowcheck.checker import verdict as model
from flowcheck.checker._engine import MAX_FINDINGS, MAX_TIMELINE
from flowcheck.observations import Kind
from flowcheck.reporting import json as report
from flowcheck.reporting._common import CHECK_KINDS

DOC = Path(__file__).resolve().parents[2] / "docs" / "verdict.md"
REGENERATE = "regenerate it with: .venv/bin/python tests/reporting/scenarios.py"

VERDICTS: dict[str, Callable[[], Verdict]] = {
    "failing": scenarios.failing,
    "passing": scenarios.passing,
    "doc": scenarios.doc_example,
    "same-instant": scenarios.same_instant,
    "unjudged": lambda: scenarios.unjudged(allowed=False),
    "unjudged-allowed": lambda: scenarios.unjudged(allowed=True),
    "recorded": scenarios.recorded,
}


@pytest.mark.parametrize("name", VERDICTS)
def test_round_trip_is_lossless(name: str) -> None:
    verdict = VERDICTS[name]()
    text = report.dumps(verdict)
    assert text.endswith("}\n")
    assert Verdict.model_validate_json(text) == verdict
    assert report.loads(text) == verdict
    assert json.loads(text) == verdict.model_dump(mode="json")


@pytest.mark.parametrize("name", VERDICTS)
def test_output_follows_the_schema(name: str) -> None:
    jsonschema.validate(json.loads(report.dumps(VERDICTS[name]())), report.schema())


def test_every_field_is_written() -> None:
    """Consumers never guess a default: unset fields are null, not missing."""
    data = json.loads(report.dumps(scenarios.failing()))
    lost = next(f for f in data["flows"][0]["findings"] if f["key"] == "k-lost")
    assert set(lost) == set(model.Finding.model_fields)
    assert set(lost["timeline"][0]) == set(model.Seen.model_fields)
    assert lost["timeline"][0]["fc_id"] is None
    assert lost["cause"] == "timed_out"


def test_non_ascii_stays_readable() -> None:
    text = report.dumps(scenarios.lost(["bestellung-ü"]))
    assert "bestellung-ü" in text
    assert Verdict.model_validate_json(text).flows[0].findings[0].key == "bestellung-ü"


# ---------------------------------------------------------------- docs/verdict.md

_MARKER = re.compile(r"^<!--\s*(fields|values):\s*(\w+)\s*-->$|^<!--\s*(checks)\s*-->$")


def tables() -> dict[str, list[list[str]]]:
    """``{"fields Verdict": rows, "values Cause": rows, "checks": rows}``, header row removed."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    out: dict[str, list[list[str]]] = {}
    for n, line in enumerate(lines):
        m = _MARKER.match(line)
        if m is None:
            continue
        name = m.group(3) or f"{m.group(1)} {m.group(2)}"
        rows = []
        for row in lines[n + 1 :]:
            if not row.startswith("|"):
                break
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]])
        assert len(rows) >= 3, f"verdict.md:{n + 1}: a table must follow the marker"
        assert name not in out, f"verdict.md documents {name} twice"
        out[name] = rows[2:]
    return out


TABLES = tables()
MODELS: dict[str, type[BaseModel]] = {
    name: obj
    for name, obj in vars(model).items()
    if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == model.__name__
}


def code(cell: str) -> str:
    m = re.fullmatch(r"`([^`]+)`", cell)
    assert m is not None, f"{cell!r} is not a `name`"
    return m.group(1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_docs_list_every_field(name: str) -> None:
    rows = TABLES.get(f"fields {name}")
    assert rows is not None, f"docs/verdict.md has no table for {name} (<!-- fields: {name} -->)"
    documented = [code(r[0]) for r in rows]
    fields = list(MODELS[name].model_fields)
    missing = [f for f in fields if f not in documented]
    extra = [f for f in documented if f not in fields]
    assert not missing, f"docs/verdict.md does not document {name}.{missing}"
    assert not extra, f"docs/verdict.md documents {extra} that {name} does not have"
    assert documented == fields, f"document {name}'s fields in the model's order"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_docs_say_which_fields_may_be_null(name: str) -> None:
    props = MODELS[name].model_json_schema()["properties"]
    for row in TABLES[f"fields {name}"]:
        field, kind = code(row[0]), row[1]
        nullable = any(t.get("type") == "null" for t in props[field].get("anyOf", []))
        assert nullable == kind.endswith("or null"), f"{name}.{field}: type says {kind!r}"


def test_docs_list_every_kind_cause_and_check() -> None:
    assert [code(r[0]) for r in TABLES["values FindingKind"]] == [k.value for k in FindingKind]
    assert [code(r[0]) for r in TABLES["values Cause"]] == [c.value for c in Cause]
    checks = {code(r[0]): {code(k.strip()) for k in r[1].split(",")} for r in TABLES["checks"]}
    assert checks == {name: {k.value for k in kinds} for name, kinds in CHECK_KINDS.items()}
    assert [code(r[0]) for r in TABLES["checks"]] == list(CHECK_KINDS), "in the engine's order"
    seen_kinds = next(r[2] for r in TABLES["fields Seen"] if r[0] == "`kind`")
    assert re.findall(r"`(\w+)`", seen_kinds) == [k.value for k in Kind]


def test_docs_state_the_engine_limits() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert f"beyond the first {MAX_FINDINGS}" in text
    assert f"at most its first {MAX_TIMELINE} observations" in text


def test_docs_example_is_a_real_verdict() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert f"```yaml\n{scenarios.DOC_TOPOLOGY}```\n" in text, (
        "the topology of the example in docs/verdict.md is not scenarios.DOC_TOPOLOGY"
    )
    m = re.search(r"^```json verdict\n(.*?)^```$", text, re.M | re.S)
    assert m is not None, "docs/verdict.md has no ```json verdict block"
    example = m.group(1)
    assert Verdict.model_validate_json(example).model_dump(mode="json") == json.loads(example)
    assert example == report.dumps(scenarios.doc_example()), (
        f"the example in docs/verdict.md is not what the checker says now; {REGENERATE}"
    )

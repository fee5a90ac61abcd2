"""The examples of docs/pytest.md, written out as test projects and run against the real brokers.

Conventions for fenced blocks in docs/pytest.md (the words after the language):

- ``example=NAME[,NAME...] path=FILE``: the block is FILE of each named example
  project. The projects are run with pytest, in-process, with this session's
  brokers given as flags (and its Kafka, for a project with ``brokers=kafka``
  on one of its blocks).
- ``outcomes=passed:N,failed:N``: what the run of the project must report.
- ``requires=mod[,mod]``: the project is skipped where a module is missing.
- ``text example=NAME output``: lines the run must print. Numbers, paths,
  random hex parts of names and runs of spaces may differ, and timeline rows (they start with a time) are
  illustrative only: taps see copies of one publish in either order.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "pytest.md"
_FENCE = re.compile(r"^(`{3,})(.*)$")


@dataclass
class Example:
    name: str
    files: dict[str, str] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)
    requires: list[str] = field(default_factory=list)
    kafka: bool = False


def read_examples(doc: Path = GUIDE) -> dict[str, Example]:
    examples: dict[str, Example] = {}
    lines = doc.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        i += 1
        if m is None:
            continue
        fence, words = m.group(1), m.group(2).split()
        body: list[str] = []
        while i < len(lines) and not re.fullmatch(rf"`{{{len(fence)},}}\s*", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1
        attrs = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        if "example" not in attrs:
            continue
        text = "".join(line + "\n" for line in body)
        for name in attrs["example"].split(","):
            ex = examples.setdefault(name, Example(name))
            if "output" in words[1:]:
                ex.output += body
            elif "path" in attrs:
                assert attrs["path"] not in ex.files, f"{name}: {attrs['path']} given twice"
                ex.files[attrs["path"]] = text
            else:
                raise AssertionError(f"{name}: a block needs path= or the word output")
            if "outcomes" in attrs:
                pairs = (p.split(":") for p in attrs["outcomes"].split(","))
                ex.outcomes.update({k: int(v) for k, v in pairs})
            ex.requires += [r for r in attrs.get("requires", "").split(",") if r]
            ex.kafka = ex.kafka or attrs.get("brokers") == "kafka"
    return examples


EXAMPLES = read_examples()


def normalize(line: str) -> str:
    line = re.sub(r"\S*/\S*", "PATH", line)
    # Random parts of keys and names (hex with a digit in it), then any other number.
    line = re.sub(r"(?<![0-9a-zA-Z])(?=[0-9a-f]*\d)[0-9a-f]{6,}(?![0-9a-zA-Z])", "HEX", line)
    line = re.sub(r"\d+", "N", line)
    return " ".join(line.split())


_TIMELINE_ROW = re.compile(r"^E? ?>? ?N\.N\b")


def test_the_guide_has_examples() -> None:
    assert {"orders", "failures", "anyio", "shop", "fastapi"} <= set(EXAMPLES)
    for ex in EXAMPLES.values():
        assert ex.outcomes, f"example {ex.name} does not say what its run must report"
        assert any(p.startswith("test_") for p in ex.files), f"example {ex.name} has no tests"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_as_documented(
    name: str, pytester: pytest.Pytester, broker_flags: list[str], request: pytest.FixtureRequest
) -> None:
    ex = EXAMPLES[name]
    for module in ex.requires:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"example {name} needs {module}, which is not installed")
    flags = list(broker_flags)
    if ex.kafka:
        flags.append(f"--flowcheck-kafka-bootstrap={request.getfixturevalue('kafka_bootstrap')}")
    for path, text in ex.files.items():
        target = pytester.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    shutil.copytree(ROOT / "topologies", pytester.path / "topologies")
    # pytest-asyncio (a dev dependency) asks every project to set its fixture loop scope.
    flags += ["-p", "no:cacheprovider", "-o", "asyncio_default_fixture_loop_scope=function"]
    result = pytester.runpytest(*flags)
    output = result.outlines
    result.assert_outcomes(**ex.outcomes)
    have = {normalize(line) for line in output}
    missing = [
        line
        for line in ex.output
        if (n := normalize(line)) and not _TIMELINE_ROW.match(n) and n not in have
    ]
    assert not missing, "documented output not printed:\n" + "\n".join(missing)

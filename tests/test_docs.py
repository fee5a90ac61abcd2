"""The documentation in docs/ must agree with flowcheck.

Conventions for fenced code blocks in docs/*.md (fences start at column 0):

- ```` ```yaml ```` whose first line is ``# topology``: a complete topology. It
  must load with :func:`flowcheck.loads` and give no warnings, except those its
  ``# warning: TEXT`` lines announce.
- ```` ```yaml invalid ````: a topology that must fail to load. Each line
  ``# error: TEXT`` or ``# warning: TEXT`` in it names a problem that must be
  reported (TEXT is part of the message).
- ```` ```yaml file=PATH ````: an excerpt of PATH (relative to the repository),
  which must appear there verbatim, whole lines. docs/shop.md must quote every
  line of topologies/shop.yaml this way.
- ```` ```yaml partial ````: an example left incomplete on purpose (``...`` for
  what is not shown). It must still be YAML, and must not be a valid fragment
  (below): then it is not partial, and the mark goes.
- Any other ```` ```yaml ```` block is a fragment of a topology (or scenario):
  each of its top-level keys, read on its own, must be YAML and a valid value
  for that key wherever the language has it (``steps`` of a flow, ``match`` of a
  step...). A key may come several times, as alternatives. A fragment that
  holds both ``brokers`` and ``channels`` is a topology that forgot its
  ``# topology`` line: an error.

docs/topology.md documents the keys of every model in flowcheck.topology.model
in tables that follow a ``<!-- keys: Model [Model...] -->`` comment. The rows of
these tables must be exactly the model's keys (aliases where set), and their
``default`` column must state the model's default.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, SecretStr, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

import flowcheck
from flowcheck.errors import Problem
from flowcheck.scenario import Scenario
from flowcheck.topology import _yaml, model

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "topology.md"
ENV: dict[str, str] = {}  # ${VAR} in examples: only defaults apply, whatever the environment

_FENCE = re.compile(r"^(`{3,})(.*)$")
_MARKER = re.compile(r"^<!--\s*keys:\s*(.+?)\s*-->\s*$")
_EXPECT = re.compile(r"^#\s*(error|warning):\s*(.+?)\s*$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    info: list[str]  # the words after the opening backticks
    text: str  # the content, each line ending in a newline

    @property
    def id(self) -> str:
        return f"{self.doc.name}:{self.line}"

    @property
    def lang(self) -> str:
        return self.info[0] if self.info else ""

    def attr(self, name: str) -> str | None:
        for word in self.info[1:]:
            key, eq, value = word.partition("=")
            if eq and key == name:
                return value
        return None

    @property
    def is_topology(self) -> bool:
        return self.lang == "yaml" and self.text.startswith("# topology\n")

    @property
    def is_invalid(self) -> bool:
        return self.lang == "yaml" and "invalid" in self.info[1:]

    @property
    def is_partial(self) -> bool:
        return self.lang == "yaml" and "partial" in self.info[1:]

    def expected(self) -> list[tuple[str, str]]:
        """``(severity, text)`` for each ``# error:`` / ``# warning:`` line."""
        found = (_EXPECT.match(line.strip()) for line in self.text.splitlines())
        return [(m.group(1), m.group(2)) for m in found if m]

    def source(self) -> str:
        """The content, shifted so that problems carry the line numbers of the .md file."""
        return "\n" * self.line + self.text

    def name(self) -> str:
        return str(self.doc.relative_to(ROOT))


def read_blocks(doc: Path) -> list[Block]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, info, start = m.group(1), m.group(2).split(), i
        i += 1
        body: list[str] = []
        while i < len(lines) and not re.fullmatch(rf"`{{{len(fence)},}}\s*", lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            pytest.fail(f"{doc.name}:{start + 1}: code block is never closed", pytrace=False)
        blocks.append(Block(doc, start + 1, info, "".join(line + "\n" for line in body)))
        i += 1
    return blocks


BLOCKS = [b for doc in sorted(DOCS.glob("*.md")) for b in read_blocks(doc)]
TOPOLOGIES = [b for b in BLOCKS if b.is_topology]
INVALID = [b for b in BLOCKS if b.is_invalid]
EXCERPTS = [b for b in BLOCKS if b.lang == "yaml" and b.attr("file") is not None]
PARTIAL = [b for b in BLOCKS if b.is_partial]
PLAIN = [
    b
    for b in BLOCKS
    if b.lang == "yaml"
    and not (b.is_topology or b.is_invalid or b.is_partial or b.attr("file") is not None)
]


def _ids(blocks: list[Block]) -> list[str]:
    return [b.id for b in blocks]


def _listing(problems: list[Problem]) -> str:
    return "\n".join(str(p) for p in problems) or "(no problems)"


def test_conventions_are_in_use() -> None:
    assert TOPOLOGIES, "no ```yaml block starting with '# topology' in docs/"
    assert INVALID, "no ```yaml invalid block in docs/"
    assert EXCERPTS, "no ```yaml file=... block in docs/"


@pytest.mark.parametrize("block", TOPOLOGIES, ids=_ids(TOPOLOGIES))
def test_topology_example_is_valid(block: Block, tmp_path: Path) -> None:
    assert not block.is_invalid, "a block is either '# topology' or 'invalid', not both"
    try:
        flowcheck.loads(block.source(), file=block.name(), env=ENV)
    except flowcheck.TopologyError as exc:
        pytest.fail(f"example is not valid:\n{_listing(list(exc.problems))}", pytrace=False)
    # Examples carry no surprise warnings: the ones they show, they announce.
    copy = tmp_path / "example.yaml"
    copy.write_text(block.source(), encoding="utf-8")
    _, problems = flowcheck.check_file(str(copy), env=ENV)
    expected = [text for severity, text in block.expected() if severity == "warning"]
    assert not [s for s, _ in block.expected() if s == "error"], "a valid example has no errors"
    for p in problems:
        assert any(text in p.message for text in expected), f"unannounced warning: {p}"
    for text in expected:
        assert any(text in p.message for p in problems), f"no warning says {text!r}"


@pytest.mark.parametrize("block", INVALID, ids=_ids(INVALID))
def test_invalid_example_is_refused(block: Block) -> None:
    with pytest.raises(flowcheck.TopologyError) as info:
        flowcheck.loads(block.source(), file=block.name(), env=ENV)
    problems = list(info.value.problems)
    for severity, text in block.expected():
        assert any(p.severity == severity and text in p.message for p in problems), (
            f"no {severity} says {text!r}; reported:\n{_listing(problems)}"
        )


@pytest.mark.parametrize("block", EXCERPTS, ids=_ids(EXCERPTS))
def test_excerpt_is_verbatim(block: Block) -> None:
    target = ROOT / str(block.attr("file"))
    assert target.is_file(), f"{block.id}: no such file {block.attr('file')}"
    assert _locate(block, target) is not None, (
        f"{block.id} is not a verbatim excerpt of {block.attr('file')}: quote it again"
    )


def _locate(block: Block, target: Path) -> range | None:
    """The 0-based lines of ``target`` that ``block`` quotes, if it does."""
    text = "\n" + target.read_text(encoding="utf-8")
    at = text.find("\n" + block.text)
    if at < 0:
        return None
    first = text.count("\n", 0, at)  # lines before the excerpt
    return range(first, first + block.text.count("\n"))


def test_shop_walkthrough_quotes_every_line() -> None:
    shop = ROOT / "topologies" / "shop.yaml"
    quoted: set[int] = set()
    for block in EXCERPTS:
        if block.doc.name == "shop.md" and block.attr("file") == "topologies/shop.yaml":
            lines = _locate(block, shop)
            quoted.update(lines or ())
    missing = [
        f"{n + 1}: {line}"
        for n, line in enumerate(shop.read_text(encoding="utf-8").splitlines())
        if line.strip() and n not in quoted
    ]
    assert not missing, "docs/shop.md does not quote these lines of shop.yaml:\n" + "\n".join(
        missing
    )


def test_every_yaml_block_is_checked() -> None:
    yaml_blocks = [b for b in BLOCKS if b.lang in ("yaml", "yml")]
    checked = {b.id for b in [*TOPOLOGIES, *INVALID, *EXCERPTS, *PARTIAL, *PLAIN]}
    assert [b.id for b in yaml_blocks if b.id not in checked] == []
    assert all(b.lang == "yaml" for b in yaml_blocks), "write ```yaml, not ```yml"


def _entries(block: Block) -> list[tuple[str, Any]]:
    """The block's top-level keys and values, each read on its own (a key may repeat)."""
    text = textwrap.dedent(block.text)
    chunks: list[list[str]] = [[]]
    keyed = False  # whether the last chunk has its key yet (comments may come first)
    for line in text.splitlines(keepends=True):
        if line[:1] not in (" ", "#", "\n"):
            if keyed:
                chunks.append([])
            keyed = True
        chunks[-1].append(line)
    out: list[tuple[str, Any]] = []
    for chunk in chunks:
        doc = _yaml.parse("".join(chunk), block.id, ENV)
        assert not doc.problems, f"{block.id}: not YAML:\n{_listing(doc.problems)}"
        if doc.data is None:
            continue  # comments only
        assert isinstance(doc.data, dict), f"{block.id}: not a mapping of keys"
        out.extend(doc.data.items())
    return out


def _fragment_problems(block: Block) -> list[str]:
    """Why the block's keys are not valid where the language has them; [] if they are."""
    problems = []
    for key, value in _entries(block):
        places = _places(key)
        if not places:
            problems.append(f"{key!r} is no key of a topology or scenario")
            continue
        errors = []
        for where, adapter in places:
            try:
                adapter.validate_python(value)
            except ValidationError as exc:
                errors.append(f"as {where}.{key}: {exc.errors()[0]['msg']}")
            else:
                break
        else:
            problems.append(f"{key!r} is not valid " + "; ".join(errors))
    return problems


def _places(key: str) -> list[tuple[str, TypeAdapter[Any]]]:
    """Every model that has ``key``, with a validator for its value there."""
    models: dict[str, type[BaseModel]] = {
        **_models(),
        "Topology": model.Topology,
        "Scenario": Scenario,
    }
    places = []
    for name, cls in models.items():
        field = _keys(cls).get(key)
        if field is not None:
            tp: Any = field.annotation
            if field.metadata:
                tp = Annotated[tp, *field.metadata]
            places.append((name, TypeAdapter(tp)))
    return places


@pytest.mark.parametrize("block", PLAIN, ids=_ids(PLAIN))
def test_yaml_fragment_is_valid(block: Block) -> None:
    problems = _fragment_problems(block)
    assert not problems, f"{block.id}: " + "\n".join(problems)
    keys = {key for key, _ in _entries(block)}
    assert not {"brokers", "channels"} <= keys, (
        f"{block.id} looks like a whole topology: start it with '# topology' "
        "(or mark it 'invalid') so that it is checked"
    )


@pytest.mark.parametrize("block", PARTIAL, ids=_ids(PARTIAL))
def test_partial_yaml_block_is_yaml_and_really_partial(block: Block) -> None:
    assert _fragment_problems(block), f"{block.id} is a valid fragment: remove 'partial'"


# ---------------------------------------------------------------- the key reference


def _models() -> dict[str, type[BaseModel]]:
    """The public models of the topology language, by class name."""
    return {
        name: obj
        for name, obj in vars(model).items()
        if isinstance(obj, type)
        and issubclass(obj, BaseModel)
        and obj.__module__ == model.__name__
        and not name.startswith("_")
        and obj.model_fields
    }


def _keys(cls: type[BaseModel]) -> dict[str, FieldInfo]:
    return {(f.alias or name): f for name, f in cls.model_fields.items()}


def _documented() -> dict[str, dict[str, dict[str, str]]]:
    """``{model: {key: {column: cell}}}`` from the key tables of docs/topology.md."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    lines = REFERENCE.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        m = _MARKER.match(line)
        if m is None:
            continue
        table = list(_table(lines, n + 1))
        assert len(table) >= 3, f"topology.md:{n + 1}: a key table must follow the marker"
        header = table[0]
        assert header[:1] == ["key"], f"topology.md:{n + 2}: the first column is 'key'"
        assert "default" in header, f"topology.md:{n + 2}: the table has no 'default' column"
        for row in table[2:]:
            key = re.fullmatch(r"`([^`]+)`", row[0])
            assert key is not None, f"topology.md: {row[0]!r} is not a `key`"
            cells = dict(zip(header, row, strict=True))
            for cls in m.group(1).split():
                keys = out.setdefault(cls, {})
                assert key.group(1) not in keys, f"{cls}.{key.group(1)} is documented twice"
                keys[key.group(1)] = cells
    return out


def _table(lines: list[str], start: int) -> Iterator[list[str]]:
    for line in lines[start:]:
        if not line.startswith("|"):
            return
        yield [c.strip() for c in _CELL_SPLIT.split(line.strip())[1:-1]]


DOCUMENTED = _documented()


def test_every_documented_model_exists() -> None:
    assert set(DOCUMENTED) <= set(_models()), "topology.md documents models that do not exist"


@pytest.mark.parametrize("name", sorted(_models()))
def test_reference_lists_every_key(name: str) -> None:
    keys = set(_keys(_models()[name]))
    documented = set(DOCUMENTED.get(name, {}))
    missing, extra = sorted(keys - documented), sorted(documented - keys)
    assert not missing, f"docs/topology.md does not document {name}'s keys {missing}"
    assert not extra, f"docs/topology.md documents keys {extra} that {name} does not have"


def _default_cell(field: FieldInfo) -> str | None:
    """What the ``default`` column must say for ``field``; None: free text."""
    if field.is_required():
        return "*required*"
    value: Any = field.get_default(call_default_factory=True)
    if value is None:
        return "—"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        return f"`{value:g}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, list | dict):
        return f"`{json.dumps(value, separators=(', ', ': '))}`"
    return None  # a nested model's defaults: described in words


@pytest.mark.parametrize("name", sorted(_models()))
def test_reference_states_defaults(name: str) -> None:
    for key, field in _keys(_models()[name]).items():
        row = DOCUMENTED.get(name, {}).get(key)
        want = _default_cell(field)
        if row is None or want is None:
            continue  # a missing row is reported by test_reference_lists_every_key
        assert row["default"] == want, (
            f"{name}.{key}: docs/topology.md says default {row['default']}, the model {want}"
        )

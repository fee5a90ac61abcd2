"""Read a YAML file into plain data, remembering where every value came from.

PyYAML's composer gives a node tree with marks; we build the data ourselves so
that we can (a) keep a line and column for every key and value, (b) reject
duplicate keys, (c) survive alias loops and alias bombs, and (d) expand
``${VAR}`` from the environment while remembering which values did, so they
are never echoed back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from flowcheck.errors import Problem

MAX_BYTES = 4 * 1024 * 1024  # a topology larger than this is a mistake, not a topology
MAX_VALUES = 100_000  # values after alias expansion: stops "billion laughs" files
NEEDS = {"topology": "'brokers' and 'channels'", "scenario": "'send'"}  # for empty files
MAX_DEPTH = 100  # nested mappings and lists; libyaml's composer overflows the C stack on deep ones

Path = tuple[str | int, ...]

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_ENV = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\})")
_MERGE = "tag:yaml.org,2002:merge"


@dataclass(frozen=True, slots=True)
class Pos:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class Document:
    """Plain data from one YAML file, with a position for every path in it."""

    file: str
    data: Any
    values: dict[Path, Pos] = field(default_factory=dict)  # where each value starts
    keys: dict[Path, Pos] = field(default_factory=dict)  # where each mapping key starts
    secret: set[Path] = field(default_factory=set)  # values filled from the environment
    unset: set[Path] = field(default_factory=set)  # values naming an unset variable: reported
    problems: list[Problem] = field(default_factory=list)
    # Misspelt keys read as meant, so that what they hold is checked too:
    # {path of the key as meant: the key as written}.
    respelt: dict[Path, str] = field(default_factory=dict)

    def written(self, path: Path) -> Path:
        """``path`` with each key read as meant spelt as in the file."""
        for meant, bad in self.respelt.items():
            if path[: len(meant)] == meant:
                return self.written((*meant[:-1], bad, *path[len(meant) :]))
        return path

    def pos(self, path: Path, *, key: bool = False) -> Pos:
        """Best position for ``path``: the deepest prefix of it that we know."""
        for n in range(len(path), -1, -1):
            p = path[:n]
            if key and p in self.keys:
                return self.keys[p]
            if p in self.values:
                return self.values[p]
        return Pos(1, 1)

    def problem(self, path: Path, message: str, *, key: bool = False, warn: bool = False) -> None:
        at = self.pos(self.written(path), key=key)
        severity = "warning" if warn else "error"
        self.problems.append(Problem(self.file, at.line, at.column, one_line(message), severity))

    def is_secret(self, path: Path) -> bool:
        return any(path[:n] in self.secret for n in range(len(path) + 1))


def one_line(message: str) -> str:
    """``message`` with line breaks and other unprintable characters (which names and values
    quoted from the file may hold) escaped: one problem, one line."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in message)


def dotted(path: Path) -> str:
    """``("flows", "paid", "steps", 1)`` -> ``flows.paid.steps[1]``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class _Fatal(Exception):
    def __init__(self, line: int, column: int, message: str) -> None:
        self.line, self.column, self.message = line, column, message


def _mark(node: yaml.Node) -> Pos:
    return Pos(node.start_mark.line + 1, node.start_mark.column + 1)


class _Builder:
    def __init__(self, doc: Document, env: Mapping[str, str]) -> None:
        self.doc = doc
        self.env = env
        self.count = 0
        self.active: set[int] = set()  # ids of nodes being built: an alias loop revisits one
        self.scalars = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            at = self.doc.pos(path[:1], key=True)
            raise _Fatal(
                at.line,
                at.column,
                f"the file expands to more than {MAX_VALUES} values through aliases "
                "(an alias bomb?); write the values out or use fewer nested aliases",
            )
        self.doc.values.setdefault(path, _mark(node))
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        if id(node) in self.active:
            anchor = _mark(node)
            at = self.doc.keys.get(path, anchor)  # the alias's key; aliases keep no position
            raise _Fatal(
                at.line,
                at.column,
                f"this alias refers to the anchor on line {anchor.line} that contains it, "
                "an endless loop; write the value out instead of the alias",
            )
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            assert isinstance(node, yaml.MappingNode)
            return self.mapping(node, path)
        finally:
            self.active.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        seen: dict[str, Pos] = {}
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                nodes = (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                merged.extend(nodes)
                continue
            at = _mark(key_node)
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Fatal(
                    at.line, at.column, "a key must be a plain name, not a list or mapping"
                )
            key = str(key_node.value)
            if key in seen:
                first = seen[key]
                self.doc.problems.append(
                    Problem(
                        self.doc.file,
                        at.line,
                        at.column,
                        f"duplicate key {key!r}: already set on line {first.line}; "
                        "a YAML mapping keeps only one, so remove or rename one of them",
                    )
                )
                continue
            seen[key] = at
            self.doc.keys[(*path, key)] = at
            out[key] = self.build(value_node, (*path, key))
        # Explicit keys win over merged ones ("<<: *defaults"), as YAML says.
        for merge_node in merged:
            if not isinstance(merge_node, yaml.MappingNode):
                at = _mark(merge_node)
                raise _Fatal(at.line, at.column, "'<<' merges mappings only")
            for key, value in self.mapping(merge_node, path).items():
                out.setdefault(key, value)
        return out

    def scalar(self, node: yaml.ScalarNode, path: Path) -> Any:
        if node.tag == "tag:yaml.org,2002:str":
            return self.interpolate(node, path)
        if node.tag == "tag:yaml.org,2002:timestamp":
            return str(node.value)  # dates have no meaning in a topology; keep the text
        try:
            return self.scalars.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError):
            # An explicit tag the value does not fit (!!int abc) or that safe YAML
            # does not know (!!python/object): PyYAML raises either kind.
            at = _mark(node)
            tag = "!!" + node.tag[18:] if node.tag.startswith("tag:yaml.org,2002:") else node.tag
            text = str(node.value)
            shown = repr(text if len(text) <= 40 else text[:40] + "...")
            raise _Fatal(
                at.line, at.column, f"cannot read {shown} as {tag}; remove the tag or fix the value"
            ) from None

    def interpolate(self, node: yaml.ScalarNode, path: Path) -> str:
        text = str(node.value)
        if "$" not in text:
            return text
        used = False

        def sub(m: re.Match[str]) -> str:
            nonlocal used
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            used = True
            value = self.env.get(name)
            if value is None or (value == "" and default is not None and ":-" in m.group(0)):
                if default is not None:
                    return default
                self.doc.problem(
                    path,
                    f"{dotted(path)}: environment variable {name} is not set; set it, or give a default "
                    f"with ${{{name}:-default}}",
                )
                self.doc.unset.add(path)
                return ""
            return value

        result = _ENV.sub(sub, text)
        if used:
            self.doc.secret.add(path)
        return result


def _too_deep() -> str:
    return (
        f"the YAML is nested more than {MAX_DEPTH} levels deep here; "
        "a topology needs far fewer (is it the right file?)"
    )


def _check_depth(text: str) -> None:
    """Refuse deep nesting before composing: the C composer recurses and can crash on it."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):  # events come one at a time: no recursion
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                at = event.start_mark
                line, column = (at.line + 1, at.column + 1) if at is not None else (1, 1)
                raise _Fatal(line, column, _too_deep())
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _decode(raw: bytes, file: str) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise _Fatal(1, 1, "this file is UTF-16 text; save it as UTF-8")
    if b"\x00" in raw:
        raise _Fatal(1, 1, "this is a binary file, not YAML text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise _Fatal(
            line, column, f"this file is not UTF-8 text (byte 0x{raw[exc.start]:02x} here)"
        ) from None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> _Fatal:
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        before = text[: exc.position]
        line, column = before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        return _Fatal(
            line, column, f"the character U+{ord(char):04X} is not allowed in YAML ({exc.reason})"
        )
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    problem = str(getattr(exc, "problem", None) or exc)
    context = getattr(exc, "context", None)
    offending = text[mark.index] if mark is not None and 0 <= mark.index < len(text) else ""
    if offending == "\t" or "'\\t'" in problem:
        message = "a tab character here; YAML indents with spaces only"
    elif "found undefined alias" in problem:
        alias = re.match(r"\*([^\s,\[\]{}]+)", text[mark.index :]) if mark is not None else None
        name = alias.group(1) if alias else "name"
        message = f"undefined alias *{name}: define the anchor &{name} before using it"
    elif "expected a single document" in str(context or ""):
        message = "this file holds more than one YAML document ('---'); a topology is one document"
    elif "maximum nesting depth" in problem:
        # Newer libyaml scans ahead and stops deep flow nesting before _check_depth sees it.
        message = _too_deep()
    elif "mapping values are not allowed" in problem:
        message = "YAML syntax error: unexpected ':' here; check this line's indentation"
    else:
        message = f"YAML syntax error: {problem}" + (f" ({context})" if context else "")
        started = getattr(exc, "context_mark", None)
        if started is not None and mark is not None and started.line != mark.line:
            message += f"; it started on line {started.line + 1}"
    return _Fatal(line, column, message)


def parse(
    text: str | bytes,
    file: str,
    env: Mapping[str, str] | None = None,
    what: str = "topology",
) -> Document:
    """Parse YAML into a :class:`Document`. Never raises on bad input: see ``problems``.

    ``what`` names the kind of file in messages: "topology" or "scenario".
    """
    doc = Document(file=file, data=None)
    needs = NEEDS[what]
    try:
        if isinstance(text, bytes):
            if len(text) > MAX_BYTES:
                raise _Fatal(1, 1, _too_big(len(text), what))
            text = _decode(text, file)
        if not text.strip():
            raise _Fatal(1, 1, f"this file is empty; a {what} needs at least {needs}")
        try:
            _check_depth(text)
            node = yaml.compose(text, Loader=_Loader)
        except yaml.YAMLError as exc:
            raise _yaml_problem(exc, text) from None
        except RecursionError:
            raise _Fatal(1, 1, "the YAML is nested too deeply to read") from None
        if node is None:
            raise _Fatal(1, 1, f"this file holds only comments; a {what} needs {needs}")
        try:
            doc.data = _Builder(doc, os.environ if env is None else env).build(node, ())
        except RecursionError:
            raise _Fatal(1, 1, "the YAML is nested too deeply to read") from None
        if doc.data is None:  # '---' alone, 'null', '~'
            at = _mark(node)
            raise _Fatal(
                at.line,
                at.column,
                f"this file holds an empty document; a {what} needs {needs}",
            )
    except _Fatal as fatal:
        doc.data = None
        doc.problems.append(Problem(file, fatal.line, fatal.column, one_line(fatal.message)))
    return doc


def _too_big(size: int, what: str) -> str:
    mib = size / 1024 / 1024
    return (
        f"this file is {mib:.{1 if mib >= 10 else 2}f} MiB; {what} files are at most "
        f"{MAX_BYTES // 1024 // 1024} MiB (is it the right file?)"
    )


def read(path: str, env: Mapping[str, str] | None = None, what: str = "topology") -> Document:
    """Read and parse a ``what`` file; a missing or unreadable file is a UsageError."""
    from flowcheck.errors import UsageError

    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a {what} file") from None
    except PermissionError:
        raise UsageError(f"{path}: permission denied") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_BYTES:
        doc = Document(file=path, data=None)
        size = os.path.getsize(path) if os.path.isfile(path) else len(raw)
        doc.problems.append(Problem(path, 1, 1, _too_big(size, what)))
        return doc
    return parse(raw, path, env, what)

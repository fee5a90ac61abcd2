"""Load and validate topology files, collecting every problem with its location."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from flowcheck.errors import Problem, TopologyError
from flowcheck.topology import _yaml
from flowcheck.topology._check import Validator
from flowcheck.topology._errors import (
    closest,
    data_path,
    listing,
    meant,
    report,
    shown,
    suggest,
)
from flowcheck.topology._yaml import Path
from flowcheck.topology.model import Broker, Channel, Flow, Name, Service, Topology
from flowcheck.topology.transform import branched

SECTIONS: dict[str, Any] = {
    "brokers": Broker,
    "channels": Channel,
    "services": Service,
    "flows": Flow,
}
REQUIRED = ("brokers", "channels")
_TOP = ("version", "name", *SECTIONS, "gate", "redact")
_ADAPTERS = {section: TypeAdapter(tp) for section, tp in SECTIONS.items()}
_NAME: TypeAdapter[str] = TypeAdapter(Name)


def validate(doc: _yaml.Document) -> Topology | None:
    """Validate parsed data; adds problems to ``doc`` and returns the topology if it is valid."""
    data = doc.data
    if data is None:
        return None
    if not isinstance(data, dict):
        doc.problem(
            (), "a topology is a mapping with the keys brokers, channels, services and flows"
        )
        return None
    # Keys starting with x- hold YAML anchors to share (the Compose convention).
    data = {key: value for key, value in data.items() if not _extension(key)}
    misspelt: set[str | None] = set()
    raws: dict[str, Any] = {section: data.get(section) for section in SECTIONS}
    for key in data:
        if key not in _TOP:
            hint = suggest(key, _TOP) or (
                f"; the top-level keys are {listing(_TOP)}, and x-… keys, which are ignored"
            )
            doc.problem((key,), f"unknown top-level key {key!r}{hint}", key=True)
            close = closest(key, _TOP)
            misspelt.add(close)
            if close in raws and close not in data:
                # Read as meant, so that its entries are checked too: reported once.
                raws[close] = data[key]
                doc.respelt[(close,)] = key
    for key in REQUIRED:
        if key not in data and key not in misspelt:  # a misspelt key is reported once
            doc.problem((), f"missing required top-level key {key!r}")
    if not isinstance(data.get("name"), (str, type(None))):
        doc.problem(("name",), f"name: expected a string, got {shown(data['name'])}")
    version = data.get("version", 1)
    if type(version) is not int or version != 1:  # not True or 1.0 either
        doc.problem(
            ("version",),
            f"version: {data['version']!r} is not supported; write version: 1",
        )

    # Paths in the topology (TLS files) are relative to its directory.
    context = {"base": os.path.dirname(os.path.abspath(doc.file))}
    valid: dict[str, dict[str, Any]] = {}
    names: dict[str, set[str]] = {}
    for section, adapter in _ADAPTERS.items():
        raw = raws[section]
        valid[section] = {}
        names[section] = set()
        if raw is None:
            if section in data and section in REQUIRED:
                doc.problem((section,), f"{section}: is empty", key=True)
            continue
        if not isinstance(raw, dict):
            doc.problem((section,), f"{section}: expected a mapping of name: definition")
            continue
        names[section] = set(raw)
        for name, entry in raw.items():
            try:
                _NAME.validate_python(name)
            except ValidationError:
                doc.problem(
                    (section, name),
                    f"{section}.{name}: a name starts with a letter, digit or '_' and holds "
                    "letters, digits and . _ : / @ -",
                    key=True,
                )
            try:
                valid[section][name] = adapter.validate_python(entry, context=context)
            except ValidationError as exc:
                report(doc, SECTIONS[section], (section, name), exc.errors())
                partial = _salvage(
                    doc, adapter, SECTIONS[section], (section, name), entry, exc, context
                )
                if partial is not None:
                    valid[section][name] = partial
    Validator(
        doc, valid["brokers"], valid["channels"], valid["services"], valid["flows"], names
    ).run()
    if any(p.severity == "error" for p in doc.problems):
        return None
    try:
        # A flow's branches become flows of their own (flow/branch), judged each.
        topology = branched(Topology.model_validate(data, context=context))
    except ValidationError as exc:  # the keys no section covers, like 'name'
        report(doc, Topology, (), exc.errors())
        return None
    _check_redact(doc, topology)
    return topology


def _check_redact(doc: _yaml.Document, topology: Topology) -> None:
    """Warn of a ``match`` that reads a payload path ``redact`` masks: it never sees it."""
    masked = set(topology.redact.payload)
    if not masked:
        return
    for fname, flow in topology.flows.items():
        rules: list[tuple[Path, Any]] = [
            (("flows", fname, "steps", i, "match"), step.match) for i, step in enumerate(flow.steps)
        ]
        rules += [
            (("flows", fname, "dead_letters", i, "when"), rule.when)
            for i, rule in enumerate(flow.dead_letters)
        ]
        for at, match in rules:
            for path in masked & set(match.payload if match is not None else ()):
                doc.problem(
                    (*at, "payload", path),
                    f"{_yaml.dotted((*at, 'payload'))}: {path} is masked (redact.payload), "
                    "so this rule never sees its value",
                    key=True,
                    warn=True,
                )


def _extension(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("x-")


def _salvage(
    doc: _yaml.Document,
    adapter: TypeAdapter[Any],
    root: Any,
    prefix: Path,
    entry: Any,
    exc: ValidationError,
    context: dict[str, str],
) -> Any:
    """The entry without its broken keys, if that validates: so the rest of it still
    gets its cross-reference checks. A misspelt key is first read as meant (its
    misspelling is already reported), and what is wrong inside it is reported now:
    pydantic did not look inside an unknown key. Keys are removed as deep as
    possible (a bad step deadline costs the deadline, not the flow); list items
    are never removed, so the positions of the others stay right."""
    if not isinstance(entry, dict):
        return None
    data = copy.deepcopy(entry)
    for _ in range(5):  # a misspelt key may hold another
        respelt = _respell(data, root, exc.errors())
        if not respelt:
            break
        doc.respelt.update({(*prefix, *loc): bad for loc, bad in respelt.items()})
        try:
            return adapter.validate_python(data, context=context)
        except ValidationError as again:
            exc = again
        report(doc, root, prefix, [e for e in exc.errors() if _within(tuple(e["loc"]), respelt)])
    for _ in range(10):
        for err in exc.errors():
            if not _drop(data, err["loc"]):
                return None
        try:
            return adapter.validate_python(data, context=context)
        except ValidationError as again:
            exc = again
    return None


def _respell(data: dict[str, Any], root: Any, errors: list[ErrorDetails]) -> dict[Path, str]:
    """Rename each unknown key of ``data`` that misspells a key its mapping lacks to that
    key; returns {pydantic location of the key as meant: the key as written}."""
    done: dict[Path, str] = {}
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] != "extra_forbidden" or (good := meant(root, loc)) is None:
            continue
        node = _node(data, loc[:-1])
        bad = loc[-1]
        if isinstance(node, dict) and bad in node and good not in node:
            node[good] = node.pop(bad)
            done[(*loc[:-1], good)] = str(bad)
    return done


def _node(data: Any, loc: Path) -> Any:
    """The value at pydantic's location ``loc`` (union tags in it skipped)."""
    node = data
    for step in data_path(data, loc, named=False):
        node = node[step]
    return node


def _within(loc: Path, respelt: dict[Path, str]) -> bool:
    return any(loc[: len(key)] == key for key in respelt)


def _drop(data: dict[str, Any], loc: tuple[str | int, ...]) -> bool:
    """Remove the deepest mapping key on ``loc`` that the data has; False if there is none."""
    node: Any = data
    holder: tuple[dict[str, Any], str] | None = None
    for step in loc:
        if isinstance(node, dict) and step in node:
            holder = (node, str(step))
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        # else: a union tag or type name in pydantic's location; not part of the data
    if holder is None:
        return False
    mapping, key = holder
    mapping.pop(key, None)
    return True


def check_file(
    path: str, env: Mapping[str, str] | None = None
) -> tuple[Topology | None, list[Problem]]:
    """Read and validate ``path``: the topology (None if invalid) and every problem, in file order.

    Raises :class:`~flowcheck.errors.UsageError` if the file cannot be read.
    """
    doc = _yaml.read(path, env)
    topology = validate(doc)
    problems = sorted(doc.problems, key=lambda p: (p.line, p.column))
    return topology, problems


def loads(
    text: str | bytes, file: str = "<string>", env: Mapping[str, str] | None = None
) -> Topology:
    """Validate topology text; raise :class:`TopologyError` with every problem if invalid."""
    doc = _yaml.parse(text, file, env)
    topology = validate(doc)
    if topology is None:
        raise TopologyError(sorted(doc.problems, key=lambda p: (p.line, p.column)))
    return topology


def load(path: str, env: Mapping[str, str] | None = None) -> Topology:
    """Read and validate a topology file; raise :class:`TopologyError` if it is invalid."""
    topology, problems = check_file(path, env)
    if topology is None:
        raise TopologyError(problems)
    return topology

"""Turn pydantic's validation errors into messages a topology author can act on."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from flowcheck.topology._yaml import Document, Path


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when one choice is close to ``word``, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def listing(choices: Iterable[str]) -> str:
    return ", ".join(sorted(choices))


def _members(tp: Any) -> list[Any]:
    """Unwrap Annotated and Optional; a union gives each of its types."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _members(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    return [tp]


def _keys(model: type[BaseModel]) -> dict[str, Any]:
    """Field annotations of a model by the key users write (the alias, if any)."""
    return {(f.alias or name): f.annotation for name, f in model.model_fields.items()}


def model_at(root: Any, loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model whose keys are valid at the end of ``loc`` (pydantic's error location)."""
    candidates = _members(root)
    for step in loc:
        nxt: list[Any] = []
        for tp in candidates:
            origin = typing.get_origin(tp)
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                kind = tp.model_fields.get("kind")
                tags = typing.get_args(kind.annotation) if kind else ()
                if step in tags or step == tp.__name__:
                    nxt.append(tp)  # pydantic put the union member's tag in the location
                elif step in _keys(tp):
                    nxt.extend(_members(_keys(tp)[str(step)]))
            elif origin is list and isinstance(step, int):
                nxt.extend(_members(typing.get_args(tp)[0]))
            elif origin is dict and isinstance(step, str):
                nxt.extend(_members(typing.get_args(tp)[1]))
        candidates = nxt or candidates
    models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    return models[0] if len(models) == 1 else None


def data_path(data: Any, loc: Sequence[str | int]) -> Path:
    """Drop the parts of ``loc`` that are not in the data (union tags, type names)."""
    path: list[str | int] = []
    node = data
    for step in loc:
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        elif isinstance(node, dict) and step == loc[-1]:
            pass  # a missing or unknown key: keep it so the message can name it
        else:
            continue
        path.append(step)
    return tuple(path)


_TYPES = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping (key: value)",
    "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
    "list_type": "a list",
}


def dotted(path: Path) -> str:
    """``("flows", "paid", "steps", 1)`` -> ``flows.paid.steps[1]``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    return repr(value)


def report(doc: Document, root: Any, prefix: Path, errors: Sequence[ErrorDetails]) -> None:
    """Add one problem to ``doc`` per pydantic error, located in the file."""
    for err in errors:
        loc = (*prefix, *err["loc"])
        path = data_path(doc.data, loc)
        kind = err["type"]
        secret = doc.is_secret(path) or any(
            isinstance(p, str) and p in ("url", "password") for p in path
        )
        value = "" if secret else f", got {_shown(err.get('input'))}"
        last = dotted(path) or "topology"
        if kind == "extra_forbidden":
            model = model_at(root, err["loc"][:-1])
            keys = _keys(model) if model else {}
            bad = str(loc[-1])
            hint = suggest(bad, keys) or (f"; valid keys here: {listing(keys)}" if keys else "")
            where = dotted(path[:-1]) or "topology"
            doc.problem(path, f"{where}: unknown key {bad!r}{hint}", key=True)
        elif kind == "missing":
            where = dotted(path[:-1]) or "topology"
            doc.problem(path[:-1], f"{where}: missing required key {loc[-1]!r}", key=True)
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            ctx = err.get("ctx", {})
            tags = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
            if kind == "union_tag_not_found":
                doc.problem(
                    path, f"{last}: missing required key 'kind': one of {', '.join(tags)}", key=True
                )
            else:
                tag = str(ctx.get("tag"))
                hint = suggest(tag, tags)
                doc.problem(
                    (*path, "kind"),
                    f"{last}.kind: {tag!r} is unknown{hint}; use one of {', '.join(tags)}",
                )
        elif kind == "literal_error":
            expected = str(err.get("ctx", {}).get("expected", ""))
            got = err.get("input")
            choices = [c.strip(" '") for c in expected.replace(" or ", ",").split(",")]
            hint = suggest(str(got), choices) if isinstance(got, str) else ""
            doc.problem(path, f"{last}: {_shown(got)} is not allowed{hint}; use one of {expected}")
        elif kind in _TYPES:
            doc.problem(path, f"{last}: expected {_TYPES[kind]}{value}")
        elif kind in ("value_error", "assertion_error"):
            doc.problem(path, f"{last}: {err['msg'].removeprefix('Value error, ')}")
        elif kind == "string_pattern_mismatch":
            doc.problem(
                path,
                f"{last}: {_shown(err.get('input')) if not secret else 'value'} "
                f"does not have the expected form ({err.get('ctx', {}).get('pattern')})",
            )
        else:
            doc.problem(path, f"{last}: {err['msg'][0].lower()}{err['msg'][1:]}{value}")

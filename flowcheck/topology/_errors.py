"""Turn pydantic's validation errors into messages a topology author can act on."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from flowcheck.redact import MASK
from flowcheck.topology._yaml import Document, Path, dotted


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``word``, if one is close enough to be a misspelling of it."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when one choice is close to ``word``, else ``""``."""
    close = closest(word, choices)
    return f" (did you mean {close!r}?)" if close is not None else ""


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
    models = _models_at(root, loc)
    return models[0] if len(models) == 1 else None


def kinds_at(root: Any, loc: Sequence[str | int]) -> list[str]:
    """The ``kind`` tags of the discriminated union at the end of ``loc``, in declared order."""
    tags: list[str] = []
    for model in _models_at(root, loc):
        kind = model.model_fields.get("kind")
        tags.extend(str(t) for t in (typing.get_args(kind.annotation) if kind else ()))
    return tags


def _models_at(root: Any, loc: Sequence[str | int]) -> list[type[BaseModel]]:
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
    return [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]


def data_path(data: Any, loc: Sequence[str | int], *, named: bool = True) -> Path:
    """Drop the parts of ``loc`` that are not in the data (union tags, type names).

    ``named``: keep a last part that is not in the data (a missing or unknown key)."""
    path: list[str | int] = []
    node = data
    for step in loc:
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        elif named and isinstance(node, dict) and step == loc[-1]:
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


def shown(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    return repr(value)


def meant(root: Any, loc: Sequence[str | int]) -> str | None:
    """The key an unknown key at ``loc`` (pydantic's location) is a misspelling of, if any."""
    model = model_at(root, loc[:-1])
    return closest(str(loc[-1]), _keys(model)) if model else None


def report(doc: Document, root: Any, prefix: Path, errors: Sequence[ErrorDetails]) -> None:
    """Add one problem to ``doc`` per pydantic error, located in the file."""
    # A misspelt required key fails twice, as unknown 'chanel' and as missing
    # 'channel': remember the misspellings so the mistake is reported once.
    misspelt: set[tuple[str | int, ...]] = set()
    for err in errors:
        if err["type"] == "extra_forbidden" and (close := meant(root, err["loc"])) is not None:
            misspelt.add((*err["loc"][:-1], close))
    for err in errors:
        loc = (*prefix, *err["loc"])
        # A model's own check (value_error) is about the model, not a key of it.
        named = err["type"] in ("extra_forbidden", "missing")
        path = data_path(doc.data, doc.written(loc), named=named)
        if any(path[:n] in doc.unset for n in range(len(path) + 1)):
            continue  # an unset environment variable, reported where it is read
        kind = err["type"]
        got = err.get("input")
        secret = doc.is_secret(path) or any(
            isinstance(p, str) and p in ("url", "password") for p in path
        )
        value = "" if secret else f", got {shown(got)}"
        last = dotted(path) or "topology"
        at, key = path, False
        if kind == "extra_forbidden":
            model = model_at(root, err["loc"][:-1])
            keys = _keys(model) if model else {}
            bad = str(loc[-1])
            hint = suggest(bad, keys) or (f"; valid keys here: {listing(keys)}" if keys else "")
            if model is not None and model.__name__ == "Condition" and not suggest(bad, keys):
                hint += "; to compare with a mapping, write {eq: {...}}"
            where = dotted(path[:-1]) or "topology"
            message, key = f"{where}: unknown key {bad!r}{hint}", True
        elif kind == "missing":
            if tuple(err["loc"]) in misspelt:
                continue
            where = dotted(path[:-1]) or "topology"
            at, key = path[:-1], True
            message = f"{where}: missing required key {loc[-1]!r}"
        elif kind == "union_tag_not_found":
            tags = kinds_at(root, err["loc"])
            near = [k for k in got if closest(str(k), ["kind"])] if isinstance(got, dict) else []
            hint = f"; is {near[0]!r} meant to be 'kind'?" if near else ""
            message, key = (
                f"{last}: missing required key 'kind': one of {', '.join(tags)}{hint}",
                True,
            )
        elif kind == "union_tag_invalid":
            ctx = err.get("ctx", {})
            tags = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
            tag = str(ctx.get("tag"))
            at = (*path, "kind")
            message = (
                f"{last}.kind: {tag!r} is unknown{suggest(tag, tags)}; use one of {', '.join(tags)}"
            )
        elif kind == "literal_error":
            expected = str(err.get("ctx", {}).get("expected", ""))
            choices = [c.strip(" '") for c in expected.replace(" or ", ",").split(",")]
            hint = suggest(got, choices) if isinstance(got, str) and not secret else ""
            what = "the value (not shown: it may be secret)" if secret else shown(got)
            message = f"{last}: {what} is not allowed{hint}; use one of {expected}"
        elif kind in _TYPES:
            message = f"{last}: expected {_TYPES[kind]}{value}"
        elif kind in ("value_error", "assertion_error"):
            message = f"{last}: {err['msg'].removeprefix('Value error, ')}"
        elif kind == "string_pattern_mismatch":
            message = (
                f"{last}: {shown(got) if not secret else 'value'} "
                f"does not have the expected form ({err.get('ctx', {}).get('pattern')})"
            )
        elif kind == "too_short":
            least = err.get("ctx", {}).get("min_length", 1)
            items = f"{least} item{'' if least == 1 else 's'}"
            message = f"{last}: is empty; give at least {items}"
            if got:
                message = f"{last}: has {len(got)}; give at least {items}"
        elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
            bound = next(iter(err.get("ctx", {}).values()), "")
            rel = {"greater_than_equal": "at least", "less_than_equal": "at most"}
            message = f"{last}: must be {rel.get(kind, kind.replace('_', ' '))} {bound}{value}"
        else:
            message = f"{last}: {err['msg'][0].lower()}{err['msg'][1:]}{value}"
        if secret and isinstance(got, str) and got:
            # Validators quote what they reject; a secret must not be among it.
            message = message.replace(repr(got), repr(MASK))
            if len(got) >= 4:
                message = message.replace(got, MASK)
        doc.problem(at, message, key=key)

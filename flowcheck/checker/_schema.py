"""Schema: payloads against their channel's schema (inline JSON Schema or a pydantic model),
each message once per channel."""

from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import Any

import fastjsonschema
from jsonschema.validators import validator_for
from pydantic import TypeAdapter, ValidationError

from flowcheck.checker._chain import identity
from flowcheck.observations import Observation, parse_json
from flowcheck.topology.model import Topology


def _fast(schema: dict[str, Any]) -> Any:
    """A compiled validator for the common case (valid payloads), if the schema allows.

    fastjsonschema validates a payload some ten times faster than jsonschema,
    which still explains each invalid one; schemas it cannot compile (newer
    drafts' keywords) are left to jsonschema alone.
    """
    try:
        return fastjsonschema.compile(schema)
    except Exception:
        return None


SCHEMA_MEMORY = 65_536  # messages remembered so that one message's copies are checked once


class SchemaCheck:
    """Validators are built once per channel, on first use."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.validators: dict[str, Any] = {}
        self.channels = {k for k, ch in topology.channels.items() if ch.payload_schema is not None}
        self.seen: OrderedDict[tuple[Any, ...], None] = OrderedDict()

    def first_copy(self, obs: Observation) -> bool:
        """Is this the first copy of its message on its channel (flowcheck's publish and a
        tap's arrival are two)? Remembers the last SCHEMA_MEMORY messages only."""
        # By flowcheck id first: flowcheck's publish may lack the position the tap's copy has.
        who = ("fc", obs.fc_id) if obs.fc_id is not None else identity(obs)
        if who[0] == "obs":
            return True  # nothing tells two copies apart: check each
        ident = (obs.channel, *who)
        seen = self.seen
        if ident in seen:
            return False
        seen[ident] = None
        if len(seen) > SCHEMA_MEMORY:
            seen.popitem(last=False)  # O(1), unlike deleting a plain dict's first key
        return True

    def _validator(self, channel: str) -> Any:
        if channel in self.validators:
            return self.validators[channel]
        ch = self.topology.channels.get(channel)
        schema = ch.payload_schema if ch is not None else None
        v: Any = None
        if schema is not None and schema.json_schema is not None:
            cls = validator_for(schema.json_schema)
            v = ("json", (_fast(schema.json_schema), cls(schema.json_schema)))
        elif schema is not None and schema.model is not None:
            module, _, attr = schema.model.replace(":", ".").rpartition(".")
            try:
                v = ("model", TypeAdapter(getattr(importlib.import_module(module), attr)))
            except (ImportError, AttributeError):
                v = ("missing", schema.model)
        self.validators[channel] = v
        return v

    def check(self, obs: Observation) -> str | None:
        """A problem with the payload of ``obs``, or None (also when it cannot be judged)."""
        v = self._validator(obs.channel)
        if v is None or obs.sha256 is not None or obs.payload is None:
            return None  # no schema, or only a cut payload was kept
        kind, impl = v
        if kind == "missing":
            return f"schema model {impl!r} cannot be imported here"
        try:
            doc = parse_json(obs.payload)
        except ValueError:
            return f"payload on {obs.channel!r} is not JSON"
        if kind == "json":
            fast, full = impl
            if fast is not None:
                try:
                    fast(doc)
                    return None
                except fastjsonschema.JsonSchemaException:
                    pass  # invalid: let jsonschema say where and why
            error = next(iter(sorted(full.iter_errors(doc), key=lambda e: list(e.path))), None)
            if error is None:
                return None
            where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path)
            return f"payload on {obs.channel!r} breaks its schema at {where}: {error.message}"
        try:
            impl.validate_python(doc)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            return f"payload on {obs.channel!r} breaks its schema at {where}: {err['msg']}"
        return None

"""The verdict as JSON: ``Verdict.model_dump(mode="json")``, documented in docs/verdict.md.

The format is versioned by the top-level ``version`` field (VERDICT_VERSION):
fields are only added within a version; renaming or removing one, or changing
its meaning, bumps it. Every field is always present, null when not set, so a
consumer never has to guess a default.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flowcheck.checker.verdict import Verdict


def as_dict(verdict: Verdict) -> dict[str, Any]:
    """The verdict as plain JSON types."""
    return verdict.model_dump(mode="json")


# A list of numbers only, indented one a line (a string's newlines are escaped: never here).
_NUMBERS = re.compile(r"\[\n\s*(-?[\d.eE+-]+(?:,\n\s*-?[\d.eE+-]+)*)\n\s*\]")


def dumps(verdict: Verdict, *, indent: int | None = 2) -> str:
    """The verdict as a JSON document, ending in a newline. Indented, lists of numbers
    (the series over time, the histograms) stay on one line."""
    # allow_nan=False: NaN and Infinity are not JSON; better to fail here than in a consumer.
    text = json.dumps(as_dict(verdict), indent=indent, ensure_ascii=False, allow_nan=False)
    if indent is not None:
        text = _NUMBERS.sub(lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)
    return text + "\n"


def loads(text: str | bytes) -> Verdict:
    """Read a verdict written by :func:`dumps` back (pydantic validates it)."""
    return Verdict.model_validate_json(text)


def schema() -> dict[str, Any]:
    """The JSON Schema of the verdict document."""
    return Verdict.model_json_schema()

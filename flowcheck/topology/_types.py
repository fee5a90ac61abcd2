"""Small value types of the topology language: durations, percentages, paths."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h)\s*$")
_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> timedelta:
    """``250ms``, ``2s``, ``1.5m``, ``1h`` -> timedelta. Bare numbers are refused: no unit."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("a duration is written like 250ms, 2s or 1m")
    if not isinstance(value, str):
        raise ValueError(f"a duration needs a unit: write {value}s or {value}ms, not {value}")
    m = _DURATION.match(value)
    if m is None and re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", value):
        raise ValueError(f"a duration needs a unit: write {value.strip()}s or {value.strip()}ms")
    if m is None:
        raise ValueError(f"{value!r} is not a duration; write it like 250ms, 2s, 1.5m or 1h")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be longer than zero")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    s = value.total_seconds()
    if s >= 3600 and s % 3600 == 0:
        return f"{s / 3600:g}h"
    if s >= 60 and s % 60 == 0:
        return f"{s / 60:g}m"
    if s >= 1:
        return f"{s:g}s"
    return f"{s * 1000:g}ms"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {"type": "string", "pattern": _DURATION.pattern, "examples": ["250ms", "2s", "1m"]}
    ),
]

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_ratio(value: Any) -> float:
    """``99%`` or ``0.99`` -> 0.99, within 0..1."""
    if isinstance(value, bool):
        raise ValueError("write a percentage like 99% or a fraction like 0.99")
    if isinstance(value, str):
        m = _PERCENT.match(value)
        if m is None:
            raise ValueError(f"{value!r} is not a percentage; write it like 99% or 0.5%")
        ratio = float(m.group(1)) / 100
    elif isinstance(value, (int, float)):
        ratio = float(value)
    else:
        raise ValueError("write a percentage like 99% or a fraction like 0.99")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError("a percentage must lie between 0% and 100%")
    return ratio


Ratio = Annotated[
    float,
    BeforeValidator(parse_ratio),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _PERCENT.pattern},
                {"type": "number", "minimum": 0, "maximum": 1},
            ],
            "examples": ["99%", 0.99],
        }
    ),
]

# A payload path: $.order.id, $.items[0].sku, $["odd key"].
_SEGMENT = r"(?:\.[A-Za-z_][A-Za-z0-9_-]*|\[\d+\]|\[\"[^\"]+\"\])"
_PATH = re.compile(rf"^\$(?:{_SEGMENT})+$")
_SEGMENTS = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]|\[\"([^\"]+)\"\]")


def check_path(value: Any) -> str:
    if not isinstance(value, str) or not _PATH.match(value):
        raise ValueError(
            f"{value!r} is not a payload path; write it like $.order_id or $.items[0].sku"
        )
    return value


def path_segments(path: str) -> list[str | int]:
    """``$.items[0].sku`` -> ``["items", 0, "sku"]``."""
    out: list[str | int] = []
    for name, index, quoted in _SEGMENTS.findall(path):
        out.append(int(index) if index else (name or quoted))
    return out


JsonPath = Annotated[
    str,
    BeforeValidator(check_path),
    WithJsonSchema({"type": "string", "pattern": _PATH.pattern, "examples": ["$.order_id"]}),
]

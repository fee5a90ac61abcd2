"""Small value types of the topology language: durations, percentages, paths."""

from __future__ import annotations

import functools
import math
import re
from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h)\s*$")
_MICROS = {"us": 1, "µs": 1, "ms": 10**3, "s": 10**6, "m": 60 * 10**6, "h": 3600 * 10**6}
_MAX_MICROS = 10**15  # about 31 years: longer is a typo, and timedelta overflows soon after


def parse_duration(value: Any) -> timedelta:
    """``250ms``, ``2s``, ``1.5m``, ``1h`` -> timedelta. Bare numbers are refused: no unit."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("a duration is written like 250ms, 2s or 1m")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("a duration is written like 250ms, 2s or 1m")
    if not isinstance(value, str):
        raise ValueError(f"a duration needs a unit: write {value}s or {value}ms, not {value}")
    m = _DURATION.match(value)
    if m is None and re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", value):
        raise ValueError(f"a duration needs a unit: write {value.strip()}s or {value.strip()}ms")
    if m is None:
        raise ValueError(f"{value!r} is not a duration; write it like 250ms, 2s, 1.5m or 1h")
    # Decimal, not float: 1234567.000001s must be exactly that many microseconds.
    micros = Decimal(m.group(1)) * _MICROS[m.group(2)]
    if micros <= 0:
        raise ValueError("a duration must be longer than zero")
    if micros > _MAX_MICROS:
        raise ValueError(f"{value.strip()} is too long to be a deadline or a budget")
    duration = timedelta(microseconds=int(micros.to_integral_value()))
    if not duration:
        raise ValueError(f"{value.strip()} rounds to zero; the shortest duration is 1us")
    return duration


def format_duration(value: timedelta) -> str:
    """The shortest exact spelling: ``2h``, ``90s``, ``1.5s``, ``250ms``, ``0.01ms``."""
    us = value // timedelta(microseconds=1)
    for unit in ("h", "m"):
        if us >= _MICROS[unit] and us % _MICROS[unit] == 0:
            return f"{us // _MICROS[unit]}{unit}"
    unit = "s" if abs(us) >= _MICROS["s"] else "ms"
    whole, fraction = divmod(abs(us), _MICROS[unit])
    digits = 6 if unit == "s" else 3
    text = f"{whole}.{fraction:0{digits}d}".rstrip("0").rstrip(".")
    return f"{'-' if us < 0 else ''}{text}{unit}"


DURATION_SCHEMA = {
    "type": "string",
    "pattern": _DURATION.pattern,
    "examples": ["250ms", "2s", "1m"],
}
Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(DURATION_SCHEMA),
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
        if 1 < ratio <= 100:
            raise ValueError(f"{value} is more than 1: write {value}% for a percentage")
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


@functools.lru_cache(maxsize=1024)  # a topology has few paths; taps look them up per message
def path_segments(path: str) -> tuple[str | int, ...]:
    """``$.items[0].sku`` -> ``("items", 0, "sku")``."""
    return tuple(
        int(index) if index else (name or quoted) for name, index, quoted in _SEGMENTS.findall(path)
    )


def path_value(obj: Any, segments: tuple[str | int, ...], missing: Any = None) -> Any:
    """The value at ``segments`` (of :func:`path_segments`) in a decoded payload, or ``missing``."""
    for seg in segments:
        if isinstance(seg, int):
            if not isinstance(obj, list) or not -len(obj) <= seg < len(obj):
                return missing
        elif not isinstance(obj, dict) or seg not in obj:
            return missing
        obj = obj[seg]
    return obj


JSON_PATH_SCHEMA = {"type": "string", "pattern": _PATH.pattern, "examples": ["$.order_id"]}
JsonPath = Annotated[str, BeforeValidator(check_path), WithJsonSchema(JSON_PATH_SCHEMA)]

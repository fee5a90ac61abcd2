"""Trace files: append-only JSON Lines, one header line then one observation a line,
and, when the recording was ended on purpose, an end record as the last line.

The writer flushes (and fsyncs) at least once a second, so a crash loses at
most the last second. The reader keeps every intact line of a damaged file and
says exactly which lines it could not read.

The end record (``{"ended": "stopped", "mono_ns": ..., "wall": ...}``) says until
when the taps were watching, and why they stopped; a crash leaves none. A recording
that kept watching after it was asked to stop (draining the chains in flight) also
says when that was (``stop_mono_ns``); chains first seen after it are not judged. It needs
no new format version: a trace without one reads as before (its end is unknown),
and a reader that predates it skips the line as damaged and reads the rest.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, ValidationError

from flowcheck.errors import FlowcheckError, UsageError
from flowcheck.observations import Observation, TooDeep, decode, encode, now, parse_json

FORMAT = "flowcheck-trace"
VERSION = 1
FLUSH_EVERY = 1.0  # seconds
MAX_HEADER = 1024 * 1024  # bytes; a real header is under 1 KiB

CLOCKS = {
    "mono_ns": "time.monotonic_ns() of the recording process; use for latency",
    "wall": "time.time() of the recording host; for display only",
    "broker_ms": "the broker's own clock in ms (Kafka CreateTime, Redis entry id); other hosts",
}


# How a recording ended: ``stopped`` (a stop request or SIGTERM), ``duration`` (its
# --duration ran out), ``interrupted`` (SIGINT, Ctrl-C), ``run`` (flowcheck run ended it).
Ended = Literal["stopped", "duration", "interrupted", "run"]


class End(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The end of a recording: the last line of a trace that was ended on purpose.
    ``mono_ns`` and ``wall`` are read as the taps stop watching; ``stop_mono_ns`` when
    the stop was asked, if the taps watched on after it (optional: older traces lack it)."""

    ended: Ended
    mono_ns: int
    wall: float
    stop_mono_ns: int | None = None


_encode_end = msgspec.json.Encoder().encode
_decode_end = msgspec.json.Decoder(End).decode


class TraceError(FlowcheckError):
    """A trace file is missing, not a trace, or damaged."""


class Header(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    format: Literal["flowcheck-trace"] = "flowcheck-trace"
    version: int = VERSION
    topology: str | None = None
    topology_sha256: str | None = None
    started: float  # wall clock
    started_mono_ns: int
    clocks: dict[str, str] = CLOCKS


def topology_hash(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def new_header(topology: str | None, topology_path: str | None = None, **extra: Any) -> Header:
    """The header of a trace that starts now: its clocks are the recording's start.
    ``extra``: what else the header says about the recording (``run``: the id of the
    ``flowcheck run`` that records it)."""
    mono, wall = now()
    return Header(
        topology=topology,
        topology_sha256=topology_hash(topology_path) if topology_path else None,
        started=wall,
        started_mono_ns=mono,
        **extra,
    )


def run_trace(out_dir: str, run: str) -> str:
    """Where ``flowcheck run`` writes the trace of run ``run``."""
    return os.path.join(out_dir, f"trace-{run}.jsonl")


class Writer:
    """Append observations to a trace file; use as a context manager."""

    def __init__(self, path: str, header: Header) -> None:
        self.path = path
        self.count = 0
        try:
            self._fh: IO[bytes] = open(path, "xb")  # noqa: SIM115 - closed in close()
        except FileExistsError:  # a dangling symlink too: never written through
            raise UsageError(f"{path} already exists; trace files are never overwritten") from None
        except OSError as exc:
            raise UsageError(f"cannot create the trace file {path}: {exc.strerror}") from None
        self._fh.write(header.model_dump_json().encode() + b"\n")
        self._last_flush = time.monotonic()
        self.flush()

    def write(self, obs: Observation) -> None:
        self._fh.write(encode(obs) + b"\n")
        self.count += 1
        if time.monotonic() - self._last_flush >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Make everything written so far survive a crash of this process or host."""
        if self._fh.closed:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._last_flush = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._last_flush >= FLUSH_EVERY

    def end(self, ended: Ended, mono_ns: int, wall: float, stop_mono_ns: int | None = None) -> None:
        """Write the recording's end as the last line, then close the file."""
        end = End(ended=ended, mono_ns=mono_ns, wall=wall, stop_mono_ns=stop_mono_ns)
        self._fh.write(_encode_end(end) + b"\n")
        self.close()

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass
class Reader:
    """Read a trace: ``header`` at once, observations by iterating, and ``end`` (the
    end record, None when there is none: a crash) once iterated.

    Damaged lines are skipped and listed in ``problems`` (line number, why);
    with ``strict=True`` iteration raises :class:`TraceError` after the last
    intact observation has been yielded.
    """

    path: str
    strict: bool = False
    header: Header = field(init=False)
    problems: list[tuple[int, str]] = field(default_factory=list, init=False)
    count: int = field(default=0, init=False)
    end: End | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                first = fh.readline(MAX_HEADER)  # a big file without newlines is not read whole
        except FileNotFoundError:
            raise TraceError(f"{self.path}: no such trace file") from None
        except OSError as exc:
            raise TraceError(f"{self.path}: cannot read ({exc.strerror})") from None
        try:
            raw: Any = parse_json(first)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise ValueError
            self.header = Header.model_validate(raw)
        except (TooDeep, RecursionError):  # pydantic too may recurse through a deep extra
            raise TraceError(
                f"{self.path}: not a flowcheck trace (its first line is JSON nested too deeply)"
            ) from None
        except (ValueError, ValidationError):
            raise TraceError(
                f"{self.path}: not a flowcheck trace (its first line is not a trace header)"
            ) from None
        if self.header.version > VERSION:
            raise TraceError(
                f"{self.path}: trace format version {self.header.version} is newer than this "
                f"flowcheck reads ({VERSION}); upgrade flowcheck"
            )

    def peek_end(self) -> End | None:
        """The end record, read from the file's last line before iterating (a checker
        must know when the stop was asked before it reads the chains); None if the last
        line is not one. Iterating reads it again, and is what counts."""
        try:
            with open(self.path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - 4096))
                tail = fh.read()
        except OSError:
            return None
        last = tail.rstrip(b"\n").rpartition(b"\n")[2]
        if not tail.endswith(b"\n") or not last.startswith(b'{"ended"'):
            return None
        try:
            return _decode_end(last)
        except msgspec.DecodeError:
            return None

    def __iter__(self) -> Iterator[Observation]:
        self.end = None
        with open(self.path, "rb") as fh:
            fh.readline()
            number = 1
            for line in fh:
                number += 1
                if not line.endswith(b"\n"):
                    self.problems.append(
                        (number, "the last line is cut off (recording interrupted?)")
                    )
                    break
                try:
                    obs = decode(line)
                except msgspec.DecodeError as exc:
                    why = _why(exc)
                    if line.startswith(b'{"ended"'):  # not an observation: the end record
                        try:
                            self.end = _decode_end(line)
                            continue
                        except msgspec.DecodeError as bad:
                            why = _why(bad)
                    self.problems.append((number, why))
                    continue
                if self.end is not None:  # the end record was not the end
                    self.problems.append((number, "an observation after the end record"))
                    self.end = None
                self.count += 1
                yield obs
        if self.strict and self.problems:
            raise TraceError(self.describe())

    def describe(self) -> str:
        lines = ", ".join(f"line {n}: {why}" for n, why in self.problems[:5])
        more = f" and {len(self.problems) - 5} more" if len(self.problems) > 5 else ""
        return (
            f"{self.path}: {len(self.problems)} damaged line(s) skipped ({lines}{more}); "
            f"{self.count} intact observations read"
        )


def _why(exc: msgspec.DecodeError) -> str:
    if not isinstance(exc, msgspec.ValidationError):
        return "not valid JSON"
    # "Expected `int`, got `str` - at `$.mono_ns`" -> "mono_ns: expected `int`, got `str`"
    text = str(exc)
    what, _, where = text.partition(" - at `$")
    what = what[:1].lower() + what[1:]
    where = where.rstrip("`").lstrip(".")
    return _printable(f"{where}: {what}" if where else what)


def _printable(text: str, limit: int = 200) -> str:
    """``text`` (it may quote the file's own keys) as one short line: control characters
    escaped, cut at ``limit`` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"

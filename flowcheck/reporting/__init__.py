"""Reporters: a :class:`~flowcheck.checker.Verdict` in, text out. No network, no broker.

- :mod:`flowcheck.reporting.terminal`: ``render(verdict, console)`` with rich;
- :mod:`flowcheck.reporting.json`: the verdict as JSON, and its schema (docs/verdict.md);
- :mod:`flowcheck.reporting.junit`: JUnit XML for CI test views;
- :mod:`flowcheck.reporting.markdown`: a summary for CI job pages;
- :mod:`flowcheck.reporting.html`: one self-contained page with plots (the ``html`` extra).

:func:`write_reports` writes the file formats at once. ``ms``, ``plural``,
``outcomes`` and ``unjudged_text`` are the reporters' wording, shared with the gate
and the assertions' messages. The terminal reporter is not imported here: a CI job that only writes files does not need rich's console.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from flowcheck.checker.verdict import Verdict
from flowcheck.errors import UsageError
from flowcheck.reporting import html, json, junit, markdown
from flowcheck.reporting._common import ms, outcomes, plural, unjudged_text
from flowcheck.topology import Topology

# format -> (file name in a report directory, writer)
FORMATS: Mapping[str, tuple[str, Callable[[Verdict], str]]] = {
    "json": ("verdict.json", json.dumps),
    "junit": ("junit.xml", junit.dumps),
    "markdown": ("summary.md", markdown.dumps),
    "html": ("report.html", html.dumps),
}

StrPath = str | os.PathLike[str]


def write_reports(
    verdict: Verdict,
    target: StrPath | Mapping[str, StrPath],
    formats: Iterable[str] | None = None,
    *,
    topology: Topology | None = None,
) -> dict[str, Path]:
    """Write ``verdict`` in each of ``formats``; returns the path written per format.

    ``target`` is either a directory (created if missing), which receives
    verdict.json, junit.xml, summary.md and report.html, or a mapping from format
    to file path. ``formats`` defaults to all of :data:`FORMATS` for a directory
    (without html when bokeh, the ``html`` extra, is not installed), and to the
    mapping's keys for a mapping. Files are replaced, not appended to.

    ``topology``, the one the verdict judged, is drawn in the HTML report.

    Raises :class:`~flowcheck.errors.UsageError` for an unknown format, a format
    with no path in the mapping, or a file that cannot be written.
    """
    if isinstance(target, Mapping):
        wanted = list(target if formats is None else formats)
        missing = [f for f in wanted if f in FORMATS and f not in target]
        if missing:
            raise UsageError(f"no path given for report format(s) {', '.join(missing)}")
        paths = {f: Path(target[f]) for f in wanted if f in FORMATS}
    else:
        if formats is None:
            formats = [f for f in FORMATS if f != "html" or _has_bokeh()]
        wanted = list(formats)
        paths = {f: Path(target) / FORMATS[f][0] for f in wanted if f in FORMATS}
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        raise UsageError(
            f"unknown report format(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(FORMATS)}"
        )
    written: dict[str, Path] = {}
    for fmt, path in paths.items():
        # Render before touching the file: no half reports.
        if fmt == "html" and topology is not None:
            text = html.dumps(verdict, topology=topology)
        else:
            text = FORMATS[fmt][1](verdict)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise UsageError(
                f"cannot write the {fmt} report to {path}: {exc.strerror or exc}"
            ) from None
        written[fmt] = path
    return written


def _has_bokeh() -> bool:
    return importlib.util.find_spec("bokeh") is not None


__all__ = [
    "FORMATS",
    "html",
    "json",
    "junit",
    "markdown",
    "ms",
    "outcomes",
    "plural",
    "unjudged_text",
    "write_reports",
]

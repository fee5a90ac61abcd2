"""TLS for broker connections: one SSL context from a broker's ``tls`` settings, and one
clear line for each way a TLS connection fails.

Used by the topology checker (files that cannot be loaded are reported there, with
their line) and by the broker adapters (which hand the context to their client and
translate its TLS errors at the broker boundary).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:  # the settings' type only: the validator uses this module too
    from flowcheck.topology.model import TLS

__all__ = ["TLSFileError", "context", "explain"]

FileKey = Literal["ca_file", "cert_file", "key_file"]


class TLSFileError(ValueError):
    """A file of the ``tls`` settings cannot be used; ``key`` names the setting."""

    def __init__(self, key: FileKey, message: str) -> None:
        self.key = key
        super().__init__(message)


class _Context(ssl.SSLContext):
    """An SSL context that checks the server's certificate against ``server_name``
    rather than the host connected to, whichever client library opens the socket."""

    server_name: str | None = None

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        if self.server_name is not None:
            kwargs["server_hostname"] = self.server_name
            if len(args) > 3:  # incoming, outgoing, server_side, server_hostname
                args = args[:3]
        return super().wrap_bio(*args, **kwargs)


def context(tls: TLS | None) -> ssl.SSLContext:
    """The client SSL context ``tls`` describes (the system's CAs when it names none).

    Raises :class:`TLSFileError` if a file is missing or does not hold what it should.
    """
    ctx = _Context(ssl.PROTOCOL_TLS_CLIENT)
    if tls is None:
        ctx.load_default_certs()
        return ctx
    ctx.server_name = tls.server_name
    ca = tls.path("ca_file")
    if ca is None:
        ctx.load_default_certs()
    else:
        try:
            ctx.load_verify_locations(cafile=ca)
        except FileNotFoundError:
            raise TLSFileError("ca_file", f"no such file: {tls.ca_file}") from None
        except PermissionError:
            raise TLSFileError("ca_file", f"cannot read {tls.ca_file}") from None
        except (ssl.SSLError, OSError, ValueError):
            raise TLSFileError(
                "ca_file", f"{tls.ca_file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
            ) from None
    cert, key = tls.path("cert_file"), tls.path("key_file")
    if cert is not None:
        _load_chain(ctx, tls, cert, key)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _load_chain(ctx: ssl.SSLContext, tls: TLS, cert: str, key: str | None) -> None:
    secret = tls.key_password.get_secret_value() if tls.key_password is not None else ""
    # A callable, never None: without one OpenSSL would ask for a password on the terminal.
    encrypted = False
    for where, name in ((cert, "cert_file"), (key, "key_file")):
        if where is None:
            continue
        try:
            with open(where, "rb") as file:
                # "BEGIN ENCRYPTED PRIVATE KEY" (PKCS#8) or "Proc-Type: 4,ENCRYPTED" (legacy)
                encrypted |= b"ENCRYPTED" in file.read(1 << 20)
        except FileNotFoundError:
            raise TLSFileError(name, f"no such file: {getattr(tls, name)}") from None  # type: ignore[arg-type]
        except OSError:
            raise TLSFileError(name, f"cannot read {getattr(tls, name)}") from None  # type: ignore[arg-type]
    try:
        ctx.load_cert_chain(cert, key, password=lambda: secret)
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).upper()
        keyname: FileKey = "key_file" if key is not None else "cert_file"
        shown = tls.key_file if key is not None else tls.cert_file
        if "KEY_VALUES_MISMATCH" in reason:
            raise TLSFileError(
                keyname, f"{shown} is not the private key of cert_file {tls.cert_file}"
            ) from None
        if encrypted or "BAD_DECRYPT" in reason:
            what = "the key_password is wrong" if tls.key_password else "set key_password"
            raise TLSFileError(keyname, f"{shown} is an encrypted key and {what}") from None
        if "CERT" in reason and "PEM" in reason and key is not None:
            raise TLSFileError("cert_file", f"{tls.cert_file} holds no PEM certificate") from None
        raise TLSFileError(
            keyname,
            f"cannot load the client certificate {tls.cert_file} with key {shown} "
            f"({exc.reason or exc})",
        ) from None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or any(err is s for s in seen):
            continue
        seen.append(err)
        todo += [err.__cause__, err.__context__]
        todo += [a for a in getattr(err, "args", ()) if isinstance(a, BaseException)]
        if isinstance(err, BaseExceptionGroup):
            todo += list(err.exceptions)
    return seen


# OpenSSL reasons (and the texts clients build from them) and what they mean here.
_NOT_TLS = (
    "WRONG_VERSION_NUMBER",
    "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST",
    "RECORD_LAYER_FAILURE",
)
_NO_CLIENT_CERT = ("CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE")
# How clients say the server closed the connection: sockets, Redis, aiormq, aiokafka.
_CLOSED_AT_ONCE = (
    "CONNECTION_RESET",
    "UNEXPECTED_EOF",
    "CLOSED_BY_SERVER",
    "UNEXPECTEDLY_CLOSED",
    "KAFKACONNECTIONERROR:_CONNECTION_AT_",
)
_CLIENT_CERT_REFUSED = ("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "ALERT_DECRYPT_ERROR")


class _Given(NamedTuple):
    """What a failure's explanation needs of the ``tls`` settings (none given: all None)."""

    cert_file: str | None
    ca_file: str | None
    server_name: str | None


def explain(
    exc: BaseException | None,
    tls: TLS | None,
    host: str | None = None,
    logged: str = "",
    *,
    opening: bool = False,
) -> str | None:
    """One line saying why a TLS connection failed, or None if ``exc`` is not a TLS failure.

    ``logged`` is what the client logged about the failure, for clients that log the
    cause and raise a vaguer error. ``opening``: the connection failed while being
    opened, where a server that wants a client certificate may just close it (TLS 1.3
    checks the certificate after the client's side of the handshake is done).
    """
    settings = (
        _Given(tls.cert_file, tls.ca_file, tls.server_name) if tls else _Given(None, None, None)
    )
    errors = _chain(exc) if exc is not None else []
    for err in errors:
        if isinstance(err, ssl.SSLCertVerificationError):
            return _untrusted(err.verify_code, err.verify_message, settings, host)
    text = " ".join(
        f"{getattr(err, 'reason', None) or ''} {err}".upper().replace(" ", "_") for err in errors
    )
    text += " " + logged.upper().replace(" ", "_")
    if "CERTIFICATE_VERIFY_FAILED" in text:
        code = 62 if "HOSTNAME_MISMATCH" in text or "IP_ADDRESS_MISMATCH" in text else 0
        return _untrusted(code, "", settings, host)
    if any(r in text for r in _NO_CLIENT_CERT) or (
        settings.cert_file is None and "ALERT_HANDSHAKE_FAILURE" in text
    ):
        if settings.cert_file is None:
            return "TLS: the server wants a client certificate, set tls.cert_file and tls.key_file"
        return f"TLS: the server did not accept the client certificate {settings.cert_file}"
    if any(r in text for r in _CLIENT_CERT_REFUSED):
        if settings.cert_file is None:
            return "TLS: the server wants a client certificate, set tls.cert_file and tls.key_file"
        return (
            f"TLS: the server did not accept the client certificate {settings.cert_file} "
            "(not signed by a CA it trusts)"
        )
    if opening and settings.cert_file is None and any(r in text for r in _CLOSED_AT_ONCE):
        return (
            "TLS: the server closed the connection after the handshake; if it wants a "
            "client certificate, set tls.cert_file and tls.key_file"
        )
    if any(r in text for r in _NOT_TLS):
        return "TLS: the server does not speak TLS on this port (a plain port?)"
    if any(isinstance(err, ssl.SSLError) for err in errors):
        err = next(e for e in errors if isinstance(e, ssl.SSLError))
        return f"TLS: the handshake failed ({err.reason or err})"
    return None


def _untrusted(code: int, message: str, tls: _Given, host: str | None) -> str:
    if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        name = tls.server_name or host or "the host connected to"
        return (
            f"TLS: the server's certificate is not for {name}; "
            "set tls.server_name to a name the certificate carries"
        )
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return "TLS: the server's certificate has expired"
    if tls.ca_file is not None:
        return f"TLS: the server's certificate is not trusted by ca_file {tls.ca_file}"
    return (
        "TLS: the server's certificate is not trusted by the system's CA certificates; "
        "set tls.ca_file to the CA that signed it"
        + (f" ({message})" if message and "local issuer" not in message else "")
    )

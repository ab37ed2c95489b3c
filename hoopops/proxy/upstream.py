"""Connect to a target's PostgreSQL with the service credential only the gateway holds.

The client never sees this exchange: TLS negotiation by ``sslmode``, then trust,
cleartext, md5 or SCRAM-SHA-256 authentication, then the server's ParameterStatus and
BackendKeyData, which the session relays (with its own key) to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

from hoopops.config import Upstream
from hoopops.proxy import protocol as p
from hoopops.proxy.scram import ScramClient, ScramError, md5_password


class UpstreamError(Exception):
    """The target could not be reached or refused the gateway; message names the target."""

    def __init__(self, message: str, sqlstate: str = "08006") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@dataclass
class UpstreamConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parameters: dict[str, str] = field(default_factory=dict)
    backend_pid: int = 0
    backend_key: bytes = b""
    tls: bool = False

    def close(self) -> None:
        if not self.writer.is_closing():
            with contextlib.suppress(ConnectionError, RuntimeError):
                self.writer.write(p.TERMINATE_MESSAGE)
            self.writer.close()


def _ssl_context(upstream: Upstream) -> ssl.SSLContext:
    if upstream.sslmode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(cafile=upstream.sslrootcert)
        ctx.check_hostname = upstream.sslmode == "verify-full"
    else:
        # require/prefer encrypt without verifying, exactly as libpq does for these modes.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _server_hostname(upstream: Upstream) -> str | None:
    """The name the certificate must carry (verify-full only; an IP literal works too)."""
    return upstream.host if upstream.sslmode == "verify-full" else None


async def _open(upstream: Upstream) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if upstream.is_unix_socket:
        path = f"{upstream.host.rstrip('/')}/.s.PGSQL.{upstream.port}"
        return await asyncio.open_unix_connection(path, limit=1 << 20)
    return await asyncio.open_connection(upstream.host, upstream.port, limit=1 << 20)


async def _read_message(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = await reader.readexactly(5)
    mtype, length = p.HEADER.unpack(header)
    if length < 4 or length > 1 << 26:
        raise p.ProtocolError(f"upstream sent an invalid message length {length}")
    return mtype[0], await reader.readexactly(length - 4)


async def connect(upstream: Upstream, target: str, params: dict[str, str],
                  budget: float | None = None) -> UpstreamConnection:
    """Open, secure and authenticate; raises UpstreamError naming the target.

    ``budget`` is what is left of the caller's own deadline (the client's startup
    timeout): the wait is the shorter of it and the target's ``connect_timeout``, so the
    client hears which target was slow instead of a generic startup timeout.
    """
    limit = upstream.connect_timeout if budget is None else max(
        0.0, min(budget, upstream.connect_timeout))
    try:
        return await asyncio.wait_for(_connect(upstream, target, params), limit)
    except TimeoutError:
        waited = f"{limit:.1f}".rstrip("0").rstrip(".")
        why = "" if limit >= upstream.connect_timeout else (
            " (the rest of the gateway's limits.startup_timeout)")
        raise UpstreamError(f"target '{target}' ({upstream.host}:{upstream.port}) did not "
                            f"answer within {waited}s{why}") from None
    except ssl.SSLError as exc:
        # Before OSError, which it subclasses: a TLS failure is not "unreachable".
        reason = getattr(exc, "verify_message", None) or exc.reason or str(exc)
        what = ("certificate verify failed" if isinstance(exc, ssl.SSLCertVerificationError)
                else "TLS handshake failed")
        raise UpstreamError(f"target '{target}' ({upstream.host}:{upstream.port}): {what}: "
                            f"{reason} (sslmode={upstream.sslmode})") from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
            "connection closed during startup")
        raise UpstreamError(f"target '{target}' ({upstream.host}:{upstream.port}) is "
                            f"unreachable: {reason}") from None
    except (ScramError, p.ProtocolError) as exc:
        raise UpstreamError(f"target '{target}': {exc}") from None


async def _connect(upstream: Upstream, target: str, params: dict[str, str]) -> UpstreamConnection:
    reader, writer = await _open(upstream)
    tls = False
    if upstream.sslmode != "disable" and not upstream.is_unix_socket:
        writer.write(p.ssl_request())
        await writer.drain()
        answer = await reader.readexactly(1)
        if answer == b"S":
            await writer.start_tls(_ssl_context(upstream),
                                   server_hostname=_server_hostname(upstream))
            tls = True
        elif answer == b"N":
            if upstream.sslmode not in ("prefer", "allow"):
                writer.close()
                raise UpstreamError(f"target '{target}' does not offer TLS but sslmode is "
                                    f"{upstream.sslmode}")
        else:
            writer.close()
            raise UpstreamError(f"target '{target}' answered the TLS request with an "
                                "unexpected byte")
    startup = {"user": upstream.user, "database": upstream.database, **params}
    writer.write(p.startup_message(startup))
    await writer.drain()
    conn = UpstreamConnection(reader, writer, tls=tls)
    scram: ScramClient | None = None
    while True:
        mtype, payload = await _read_message(reader)
        if mtype == p.AUTHENTICATION:
            code, data = p.decode_auth(payload)
            if code == 0:
                continue
            if upstream.password is None:
                raise UpstreamError(f"target '{target}' asks for a password but the "
                                    "configured upstream URL has none", "28P01")
            if code == 3:
                writer.write(p.password_message(p.cstr(upstream.password)))
            elif code == 5:
                writer.write(p.password_message(
                    md5_password(upstream.user, upstream.password, data[:4]) + b"\0"))
            elif code == 10:
                mechanisms = data.split(b"\0")
                if b"SCRAM-SHA-256" not in mechanisms:
                    raise UpstreamError(f"target '{target}' offers no supported SASL "
                                        "mechanism (need SCRAM-SHA-256)")
                scram = ScramClient(upstream.password)
                writer.write(p.sasl_initial_response(ScramClient.MECHANISM,
                                                     scram.first_message()))
            elif code == 11 and scram is not None:
                writer.write(p.password_message(scram.final_message(data)))
            elif code == 12 and scram is not None:
                scram.verify_final(data)
                continue
            else:
                raise UpstreamError(f"target '{target}' requires an authentication method "
                                    f"the gateway does not support (code {code})")
            await writer.drain()
        elif mtype == p.ERROR_RESPONSE:
            fields = p.parse_error_fields(payload)
            writer.close()
            raise UpstreamError(f"target '{target}' refused the gateway's login: "
                                f"{fields.get('M', 'unknown error')}",
                                fields.get("C", "08006"))
        elif mtype == p.PARAMETER_STATUS:
            name, value = p.decode_parameter_status(payload)
            conn.parameters[name] = value
        elif mtype == p.BACKEND_KEY_DATA:
            conn.backend_pid, conn.backend_key = p.decode_backend_key(payload)
        elif mtype == p.NEGOTIATE_PROTOCOL_VERSION or mtype == p.NOTICE_RESPONSE:
            continue
        elif mtype == p.READY_FOR_QUERY:
            return conn
        else:
            raise p.ProtocolError(f"unexpected message {chr(mtype)!r} during upstream startup")


async def send_cancel(upstream: Upstream, pid: int, key: bytes) -> None:
    """Ask the server to cancel what backend ``pid`` is running (best effort)."""
    try:
        reader, writer = await asyncio.wait_for(_open(upstream), upstream.connect_timeout)
    except (OSError, TimeoutError):
        return
    try:
        if upstream.sslmode in ("require", "verify-ca", "verify-full") and not (
                upstream.is_unix_socket):
            writer.write(p.ssl_request())
            await writer.drain()
            if await reader.readexactly(1) == b"S":
                # The same checks as the login: the cancel key must not go to an impostor.
                await writer.start_tls(_ssl_context(upstream),
                                       server_hostname=_server_hostname(upstream))
        writer.write(p.cancel_request(pid, key))
        await writer.drain()
        await asyncio.wait_for(reader.read(1), 5)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        pass  # ssl.SSLError is an OSError
    finally:
        writer.close()

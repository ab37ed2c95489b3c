"""Accept agent connections: TLS negotiation, startup, token authentication, then relay.

Everything before authentication runs under a deadline and a global connection cap, so
idle or half-open sockets cannot lock legitimate agents out. Failures answer with the
FATAL a PostgreSQL server would send (clients show its message) and close only that
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hoopops import events
from hoopops.config import Config, is_loopback
from hoopops.identity import AuthError, Identity
from hoopops.proxy import protocol as p
from hoopops.proxy import upstream as up
from hoopops.proxy.session import Session, SessionInfo, new_session_id

if TYPE_CHECKING:
    from hoopops.identity import TokenVerifier
    from hoopops.proxy.gate import StatementGate

log = logging.getLogger("hoopops.server")

_LENGTH = struct.Struct("!I")
MAX_STARTUP_PACKET = 10_000  # the server's own limit for startup packets
MAX_PASSWORD_MESSAGE = 64 * 1024
# Direct TLS (libpq 17+ ``sslnegotiation=direct``): the client opens with a TLS record (a
# handshake, 0x16) instead of an SSLRequest, and must name this ALPN protocol.
_TLS_HANDSHAKE_RECORD = 0x16
ALPN_PROTOCOL = "postgresql"

# Startup parameters a client may pass through. Anything else is refused: the startup
# packet can set any server setting, including ones that change who the session acts as
# (role, session_authorization), what it may do (options carries -c flags) or how the
# server reads statement text (standard_conforming_strings, client_encoding).
PASSTHROUGH_PARAMETERS = frozenset({
    "application_name", "datestyle", "timezone", "extra_float_digits", "intervalstyle",
    "bytea_output", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
    "idle_session_timeout", "default_transaction_isolation", "default_transaction_read_only",
    "default_transaction_deferrable", "geqo", "jit", "lc_monetary", "lc_numeric", "lc_time",
    "work_mem", "search_path", "client_min_messages", "row_security",
})
_CHECKED_PARAMETERS = {"client_encoding", "standard_conforming_strings"}
_SAFE_ENCODINGS = {"utf8", "unicode", "sqlascii"}
_GATEWAY_PARAMETERS = {"user", "database"}


class StartupRefused(Exception):
    # The cancel message of a connection closed to make room for a newer one.
    EVICTED = "evicted: still unauthenticated when the connection cap was reached"

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@dataclass
class _Admission:
    """How far a connection that has not authenticated yet has come (see _make_room)."""

    peer: str
    since: float
    stage: int = 0  # _CONNECTED ... _TOKEN_SENT


# Startup progress, in order. A real client goes through them in milliseconds; a socket
# that connects and stalls stays at the first.
_CONNECTED, _NEGOTIATING, _STARTUP_READ, _TOKEN_SENT = range(4)


@dataclass
class Registry:
    """Live sessions, by id and by the cancel key the gateway handed out."""

    sessions: dict[str, Session] = field(default_factory=dict)
    by_key: dict[tuple[int, bytes], Session] = field(default_factory=dict)
    per_subject: Counter[str] = field(default_factory=Counter)

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.by_key[(session.gateway_pid, session.gateway_key)] = session

    def remove(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.by_key.pop((session.gateway_pid, session.gateway_key), None)


def check_startup_parameters(params: dict[str, str]) -> dict[str, str]:
    """The parameters to pass upstream; raises StartupRefused naming the first bad one."""
    forward: dict[str, str] = {}
    for name, value in params.items():
        lname = name.lower()
        if lname in _GATEWAY_PARAMETERS:
            continue
        if lname == "client_encoding":
            normal = value.strip("'\" ").replace("-", "").replace("_", "").lower()
            if normal not in _SAFE_ENCODINGS:
                raise StartupRefused("0A000", f"client_encoding '{value}' is not allowed "
                                     "through hoopops: use UTF8 (the gateway must read "
                                     "statement text exactly as the server does)")
            forward["client_encoding"] = "UTF8" if normal != "sqlascii" else "SQL_ASCII"
        elif lname == "standard_conforming_strings":
            if value.lower() not in ("on", "true", "1"):
                raise StartupRefused("0A000", "standard_conforming_strings must stay on "
                                     "through hoopops")
        elif lname in PASSTHROUGH_PARAMETERS:
            forward[name] = value
        elif lname.startswith("_pq_."):
            continue  # protocol options: answered by NegotiateProtocolVersion
        else:
            raise StartupRefused("42501", f"startup parameter '{name}' is not allowed through "
                                 "hoopops: it could change the session's security context "
                                 "or protocol (refused; fail closed)")
    return forward


class GatewayServer:
    def __init__(self, config: Config, verifier: TokenVerifier, gate: StatementGate,
                 bus: events.EventBus) -> None:
        self.config = config
        self.verifier = verifier
        self.gate = gate
        self.bus = bus
        self.registry = Registry()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # Connections that have not yet presented a valid token: when the cap is reached,
        # one of these makes room (see _make_room).
        self._unauthenticated: dict[asyncio.Task[None], _Admission] = {}
        self._ssl = self._server_ssl_context()
        self.accepting = True
        # Last outcome of connecting to each target ("ok" / "down"), for the console.
        self.target_health: dict[str, str] = {}

    def _server_ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        ctx.set_alpn_protocols([ALPN_PROTOCOL])
        return ctx

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.config.listen_host, self.config.listen_port, limit=1 << 20,
            reuse_address=True)

    async def stop_accepting(self) -> None:
        self.accepting = False
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def close(self, grace: float) -> None:
        """Stop accepting, let sessions finish for up to ``grace`` seconds, then close."""
        await self.stop_accepting()
        if not self._connections:
            return
        _, still = await asyncio.wait(set(self._connections), timeout=grace)
        if still:
            for session in list(self.registry.sessions.values()):
                session.kill("closed because the gateway is shutting down")
            # A killed session ends by itself (FATAL sent, upstream closed, SESSION_ENDED
            # published); only what is still stuck after that is cancelled.
            _, still = await asyncio.wait(still, timeout=2)
        for task in still:
            task.cancel()
        if still:
            with contextlib.suppress(BaseException):
                await asyncio.gather(*still, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
            peer = writer.get_extra_info("peername") or ("?", 0)
            self._unauthenticated[task] = _Admission(str(peer[0]),
                                                     asyncio.get_running_loop().time())
            task.add_done_callback(self._forget)
        try:
            await self._serve_connection(reader, writer)
        except asyncio.CancelledError as exc:
            # Shutdown cancels connections that outlived the grace period, _make_room an
            # unauthenticated one. Ending quietly keeps asyncio from logging each
            # as an "exception in callback".
            if exc.args == (StartupRefused.EVICTED,):
                with contextlib.suppress(Exception):
                    writer.write(p.error_response(
                        "53300", "too many connections to the gateway: this connection had "
                        "not authenticated yet and was closed to admit a newer one "
                        f"(limits.max_connections = {self.config.limits.max_connections})",
                        "FATAL"))
            await self._close_writer(writer)
        except Exception:
            log.exception("unexpected error while serving a connection")
            with contextlib.suppress(Exception):
                writer.write(p.error_response("XX000", "hoopops: internal error; the "
                                              "connection was closed", "FATAL"))
            await self._close_writer(writer)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        self._unauthenticated.pop(task, None)

    def _authenticated(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._unauthenticated.pop(task, None)

    def _progress(self, stage: int) -> None:
        admission = self._unauthenticated.get(asyncio.current_task())  # type: ignore[arg-type]
        if admission is not None and admission.stage < stage:
            admission.stage = stage

    def _make_room(self) -> bool:
        """At the cap, close a connection still in startup to admit a new one.

        Sockets that connect and then say nothing (or dribble a startup packet) would
        otherwise hold every slot until their startup deadline, over and over, locking
        legitimate agents out. The one closed is the one that has come least far (a real
        client goes through startup in milliseconds; what stalls stays behind), from the
        address holding the most such connections (a flood makes room from its own
        sockets), and the oldest of those. Age alone would pick exactly the real agent
        under a flood: its connection soon becomes the oldest as new flood sockets
        displace each other. A connection whose token is being verified is never closed.
        """
        current = asyncio.current_task()
        candidates = [(task, admission) for task, admission in self._unauthenticated.items()
                      if task is not current and not task.done()
                      and admission.stage < _TOKEN_SENT]
        if not candidates:
            return False
        per_peer = Counter(admission.peer for _, admission in candidates)
        task, _ = min(candidates, key=lambda c: (c[1].stage, -per_peer[c[1].peer], c[1].since))
        del self._unauthenticated[task]
        task.cancel(StartupRefused.EVICTED)
        return True

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        try:
            if not self.accepting:
                raise StartupRefused("57P03", "the gateway is shutting down")
            if len(self._connections) > self.config.limits.max_connections and not (
                    self._make_room()):
                raise StartupRefused("53300", "too many connections to the gateway "
                                     f"(limits.max_connections = "
                                     f"{self.config.limits.max_connections})")
            deadline = asyncio.get_running_loop().time() + self.config.limits.startup_timeout
            try:
                async with asyncio.timeout_at(deadline):
                    session = await self._startup(reader, writer, peer, deadline)
            except TimeoutError:
                raise StartupRefused("08006", "startup and authentication did not complete "
                                     f"within {self.config.limits.startup_timeout:g}s "
                                     "(limits.startup_timeout)") from None
            if session is None:
                return
        except StartupRefused as exc:
            with contextlib.suppress(Exception):
                writer.write(p.error_response(exc.sqlstate, str(exc), "FATAL"))
                await asyncio.wait_for(writer.drain(), 2)
            await self._close_writer(writer)
            return
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            await self._close_writer(writer)
            return
        except p.ProtocolError as exc:
            with contextlib.suppress(Exception):
                writer.write(p.error_response(exc.sqlstate, f"hoopops: {exc}", "FATAL"))
                await asyncio.wait_for(writer.drain(), 2)
            await self._close_writer(writer)
            return
        self.registry.add(session)
        subject = session.info.identity.subject
        self.bus.publish(events.SESSION_STARTED, **_session_event(session))
        try:
            await self.gate.session_opened(session)
            await session.run()
        finally:
            self.registry.remove(session)
            self.registry.per_subject[subject] -= 1
            if self.registry.per_subject[subject] <= 0:
                del self.registry.per_subject[subject]
            stats = session.info.stats
            self.bus.publish(events.SESSION_ENDED, session_id=session.id,
                             reason=session.end_reason, bytes_in=stats.bytes_in,
                             bytes_out=stats.bytes_out, statements=stats.statements,
                             ended_at=time.time())

    @staticmethod
    async def _close_writer(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 2)

    async def _read_startup_packet(self, reader: asyncio.StreamReader, direct_tls: bool = False
                                   ) -> p.StartupPacket | bytes:
        """The next startup packet; with ``direct_tls``, the first bytes of a TLS
        ClientHello instead when the client starts with one."""
        header = await reader.readexactly(4)
        if direct_tls and header[0] == _TLS_HANDSHAKE_RECORD:
            return header
        (length,) = _LENGTH.unpack(header)
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise p.ProtocolError(f"invalid startup packet length {length}")
        return p.parse_startup(await reader.readexactly(length - 4))

    async def _startup(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       peer: tuple[str, int], deadline: float) -> Session | None:
        tls_active = False
        first = await self._read_startup_packet(reader, direct_tls=self._ssl is not None)
        if isinstance(first, bytes):
            self._progress(_NEGOTIATING)
            await self._direct_tls(reader, writer, first)
            tls_active = True
            first = await self._read_startup_packet(reader)
        packet = first
        negotiations = 0
        while packet.code in (p.SSL_REQUEST, p.GSSENC_REQUEST):
            negotiations += 1
            if negotiations > 2:
                raise p.ProtocolError("too many encryption requests")
            self._progress(_NEGOTIATING)
            if packet.code == p.SSL_REQUEST and self._ssl is not None and not tls_active:
                writer.write(b"S")
                await writer.drain()
                # Bytes that arrived before the handshake were sent in plaintext and could
                # have been injected by anyone on the path (CVE-2021-23214): refuse them.
                if reader._buffer:
                    raise p.ProtocolError("received unencrypted data after the TLS request")
                await writer.start_tls(self._ssl)
                tls_active = True
            else:
                writer.write(b"N")
                await writer.drain()
            packet = await self._read_startup_packet(reader)  # type: ignore[assignment]
        self._progress(_STARTUP_READ)
        if packet.code == p.CANCEL_REQUEST:
            await self._on_cancel(int(packet.params["pid"]), bytes.fromhex(packet.params["key"]))
            await self._close_writer(writer)
            return None
        tls_config = self.config.tls
        if not tls_active and tls_config is not None and tls_config.required and not (
                is_loopback(peer[0])):
            raise StartupRefused("28000", "hoopops requires TLS for clients that are not on "
                                 "loopback; connect with sslmode=require")
        unsupported = [name for name in packet.params if name.startswith("_pq_.")]
        if packet.minor > 0 or unsupported:
            # Newer clients (libpq 18 may ask for 3.2) fall back to 3.0 when told so.
            writer.write(p.negotiate_protocol_version(0, unsupported))
        claimed_user = packet.params.get("user", "")
        if not claimed_user:
            raise StartupRefused("28000", "no user name in the startup packet")
        target_name = packet.params.get("database") or claimed_user
        target = self.config.targets.get(target_name)
        if target is None:
            known = ", ".join(sorted(self.config.targets))
            raise StartupRefused("3D000", f"hoopops has no target named '{target_name}' "
                                 f"(the database name picks the target; known: {known})")
        forward = check_startup_parameters(packet.params)
        identity = await self._authenticate(reader, writer)
        self._authenticated()
        limit = self.config.limits.max_connections_per_identity
        if self.registry.per_subject[identity.subject] >= limit:
            raise StartupRefused("53300", f"too many connections for '{identity.subject}' "
                                 f"(limits.max_connections_per_identity = {limit})")
        self.registry.per_subject[identity.subject] += 1
        upstream: up.UpstreamConnection | None = None
        try:
            try:
                # Leave a moment of the startup deadline to tell the client which
                # target did not answer.
                budget = deadline - asyncio.get_running_loop().time() - 0.2
                upstream = await up.connect(target.upstream, target.name, forward, budget)
                self.target_health[target.name] = "ok"
            except up.UpstreamError as exc:
                if not exc.sqlstate.startswith("53"):
                    self.target_health[target.name] = "down"
                # The target's own verdict (53300 too many clients, 57P03 starting up...)
                # tells the client whether to retry; a refused *service* login (28xxx) is
                # not about the agent's token, so it is reported as a connection failure.
                sqlstate = "08006" if exc.sqlstate.startswith("28") else exc.sqlstate
                raise StartupRefused(sqlstate, f"hoopops: {exc}") from None
            info = SessionInfo(
                id=new_session_id(), identity=identity, target=target.name,
                client_addr=str(peer[0]), client_port=int(peer[1]),
                application_name=packet.params.get("application_name", ""),
                claimed_user=claimed_user, tls=tls_active)
            session = Session(info, target, self.gate, reader, writer, upstream, self.bus,
                              self.config.limits.max_message_size)
            writer.write(session.startup_messages())
            await writer.drain()
        except BaseException:
            self.registry.per_subject[identity.subject] -= 1
            if upstream is not None:
                upstream.close()  # e.g. the startup deadline hit while greeting the client
            raise
        return session

    async def _direct_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          early: bytes) -> None:
        """Serve TLS from the connection's first byte. What was read already (``early``
        and whatever the stream buffered behind it) is the start of the ClientHello: it
        is handed to the TLS protocol that ``start_tls`` puts on the socket, through that
        protocol's own buffer interface, before anything else the socket delivers."""
        assert self._ssl is not None
        early += bytes(reader._buffer)
        reader._buffer.clear()
        raw = writer.transport
        loop = asyncio.get_running_loop()
        starting = asyncio.ensure_future(writer.start_tls(self._ssl))

        def feed(tries: int = 0) -> None:
            tls = raw.get_protocol()
            if not hasattr(tls, "buffer_updated"):  # start_tls has not swapped it in yet
                if tries < 100 and not starting.done():
                    loop.call_soon(feed, tries + 1)
                return
            view = memoryview(early)
            while view:
                buffer = tls.get_buffer(len(view))
                size = min(len(buffer), len(view))
                buffer[:size] = view[:size]
                tls.buffer_updated(size)
                view = view[size:]

        loop.call_soon(feed)
        await starting
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_PROTOCOL:
            # As PostgreSQL itself: a direct TLS client must say it speaks PostgreSQL.
            raise p.ProtocolError("received a direct TLS connection without the ALPN "
                                  f"protocol '{ALPN_PROTOCOL}'")

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                            ) -> Identity:
        writer.write(p.AUTH_CLEARTEXT)
        await writer.drain()
        header = await reader.readexactly(5)
        mtype, length = p.HEADER.unpack(header)
        if mtype != b"p":
            raise p.ProtocolError("expected a password message (the token)")
        if length < 5 or length > MAX_PASSWORD_MESSAGE:
            raise StartupRefused("28P01", "token rejected: the password message is empty or "
                                 "larger than 64 KiB")
        body = await reader.readexactly(length - 4)
        self._progress(_TOKEN_SENT)
        token = body.rstrip(b"\x00")
        try:
            return await self.verifier.verify_async(token)
        except AuthError as exc:
            raise StartupRefused("28P01", f"token rejected: {exc.reason}") from None

    async def _on_cancel(self, pid: int, key: bytes) -> None:
        session = self.registry.by_key.get((pid, key))
        if session is None:
            return  # a forged or stale key cancels nothing, and says nothing
        await session.cancel()


def _session_event(session: Session) -> dict[str, object]:
    info = session.info
    return {
        "session_id": info.id, "subject": info.identity.subject,
        "groups": list(info.identity.groups), "client": f"{info.client_addr}:{info.client_port}",
        "application": info.application_name, "target": info.target, "tls": info.tls,
        "started_at": info.started_at,
    }

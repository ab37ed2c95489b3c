"""The relay for one authenticated client: statements in, results out.

Both sockets are driven by ``asyncio.Protocol`` callbacks. Bytes from the client are framed
and each statement decided (policy, approvals), recorded (audit) and forwarded when it may
run; bytes from the server are relayed to the client, each backend message attributed to
the request it answers through a FIFO of expectations (``Pending``), which is what lets
the gateway know which statement a row belongs to, mask it, hash it and drop the replies
to anything the gateway injected. Each direction is a ``Lane`` (``proxy/lane.py``): it
runs inline in ``data_received`` and moves to a task only while something really has to
be awaited, with that side's reading paused once its backlog grows, so order and
backpressure hold. Write backpressure pauses the opposite side's reading.

A blocked statement is answered by making the *server* raise the error (a ``DO`` block
that raises 42501 with the gateway's message), except for a simple query while idle,
which the gateway answers itself. Either way the client sees exactly what a server error
would produce: the extended protocol skips to Sync, and a transaction block is aborted on
the server too, so client and server never disagree about the transaction state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from hoopops import events
from hoopops.audit.store import AuditError
from hoopops.proxy import protocol as p
from hoopops.proxy.gate import Verdict
from hoopops.proxy.lane import Lane
from hoopops.proxy.upstream import UpstreamConnection, send_cancel

if TYPE_CHECKING:
    from hoopops.config import Target
    from hoopops.identity import Identity
    from hoopops.proxy.gate import StatementGate

log = logging.getLogger("hoopops.session")

_HDR = struct.Struct("!BI").unpack_from
_INT32 = struct.Struct("!i").unpack_from

# What a forwarded request expects back (see protocol docs, "Extended Query"). K_GROUP
# stands for a whole run of requests up to and including a Sync whose replies nothing
# inspects (see Session._client_fast): only its ReadyForQuery moves the queue on.
K_QUERY, K_PARSE, K_BIND, K_DESCRIBE, K_EXECUTE, K_CLOSE, K_SYNC, K_GROUP = range(8)
_EXTENDED = frozenset((K_PARSE, K_BIND, K_DESCRIBE, K_EXECUTE, K_CLOSE))
# Heads the queue after an extended-protocol error that emptied it: the server skips
# every request up to the next Sync ("Extended Query": whatever the message type, a Query
# or FunctionCall too), including those the client sends after the error has arrived,
# so their expectations are dropped when that Sync's ReadyForQuery comes.
K_SKIPPING = 8
_SYNC_KINDS = (K_SYNC, K_GROUP)

# Client messages that carry nothing (Sync, Flush, CopyDone; Terminate ends the session).
_BARE = frozenset((p.SYNC, p.FLUSH, p.COPY_DONE))

_TX_STATES = {b"I": "idle", b"T": "in transaction", b"E": "failed transaction"}
_BYTE = tuple(bytes((i,)) for i in range(256))

# Fields of a server error that only describe the gateway's injected DO block.
_INJECTION_NOISE = frozenset("WFLRsqP")

# Bytes from the server buffered while its lane waits before that socket is paused.
_SERVER_BACKLOG = 1 << 20


@dataclass(slots=True)
class Run:
    """One statement's execution as seen in the response stream."""

    sql: str
    decision: Any = None
    params: tuple[bytes | None, ...] | None = None
    audit_id: Any = None
    received_at: float = 0.0
    started_at: float = 0.0
    rows: int = 0
    tag: str | None = None
    sqlstate: str | None = None
    error: str | None = None
    hasher: Any = None
    sample: list[bytes] | None = None
    sample_bytes: int = 0
    fields: list[p.Field] | None = None
    plan: Any = None
    result_formats: tuple[int, ...] = ()
    finished: bool = False
    statement_index: int = 0  # which statement of a simple Query is answering

    def sample_fits(self, size: int, limits: tuple[int, int]) -> bool:
        """Whether a row of ``size`` bytes still fits the audit sample's row/byte caps."""
        sample = self.sample
        return sample is not None and len(sample) < limits[0] and \
            self.sample_bytes + size <= limits[1]

    def keep_sample(self, row: bytes, size: int) -> None:
        assert self.sample is not None
        self.sample.append(row)
        self.sample_bytes += size


class BoundParams(tuple):  # type: ignore[type-arg]
    """A Bind's parameter values (bytes or None) that remember which were sent in binary
    format, so the audit trail can keep those exactly instead of reading them as text."""

    binary: frozenset[int]

    @classmethod
    def of(cls, msg: p.BindMsg) -> BoundParams:
        params = cls(msg.params)
        formats = msg.param_formats
        if len(formats) == 1:
            formats = formats * len(params)
        params.binary = frozenset(i for i, f in enumerate(formats) if f == 1)
        return params


@dataclass(slots=True)
class Pending:
    kind: int
    run: Run | None = None
    name: str = ""
    swallow: bool = False  # drop every reply (gateway-injected request)
    injected_error: bool = False  # pass the error but strip the DO block's context
    copy_in: bool = False  # an Execute that put the server in COPY FROM STDIN mode
    # ``kind << 8`` when the replies need nothing but moving the queue on (no run, not
    # injected), else -1: with a reply's type it keys _RELAYED / _ANSWERED. The fields
    # above are never changed after construction (copy_in makes a new expectation).
    quick: int = field(init=False, default=-1)

    def __post_init__(self) -> None:
        if self.run is None and not (self.swallow or self.injected_error or self.copy_in):
            self.quick = self.kind << 8

    @property
    def plain(self) -> bool:
        """No gateway-injected request and no run: its replies need no inspection."""
        return not (self.swallow or self.injected_error or self.copy_in)


# Replies relayed without moving the queue on, and replies that answer the request at
# its head, for a quick expectation: ``kind << 8 | reply type``.
# A group's replies: ParseComplete, BindComplete, CloseComplete, NoData,
# ParameterDescription, RowDescription, DataRow, CommandComplete, EmptyQueryResponse.
_GROUP_REPLIES = b"123ntTDCI"
_RELAYED = frozenset([k << 8 | t for k, t in (
    (K_QUERY, 84), (K_QUERY, 68), (K_QUERY, 67), (K_QUERY, 73),  # T D C I
    (K_EXECUTE, 68), (K_DESCRIBE, 116))] + [K_GROUP << 8 | t for t in _GROUP_REPLIES])
_ANSWERED = frozenset(k << 8 | t for k, t in (
    (K_SYNC, 90), (K_QUERY, 90), (K_GROUP, 90), (K_EXECUTE, 67), (K_EXECUTE, 73),
    (K_BIND, 50), (K_PARSE, 49), (K_CLOSE, 51), (K_DESCRIBE, 84), (K_DESCRIBE, 110)))
# A group's replies that _server_run passes over: ParseComplete, BindComplete,
# CloseComplete, NoData, ParameterDescription.
_GROUP_ACKS = frozenset(b"123nt")
# CommandComplete tags of a result _server_run may note itself; others (DDL, say) go to
# the general path, which tells the gate (on_statement_complete).
_PLAIN_TAGS = frozenset(("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "FETCH", "MOVE",
                         "BEGIN", "COMMIT", "ROLLBACK", "SET", "SHOW"))
_DESCRIBE_QUICK = K_DESCRIBE << 8
_GROUP_QUICK = K_GROUP << 8
_QUERY_QUICK = K_QUERY << 8
# Replies up to this size are remembered for the next one shaped alike (_server_fast):
# small results, where framing each message is most of the relay's work.
_REPLY_MEMO_MAX = 1024


# Expectations that carry nothing but their kind, shared (never modified: only an
# Execute's expectation is, when the server enters COPY FROM STDIN).
_SYNC_PENDING = Pending(K_SYNC)
_PARSE_PENDING = Pending(K_PARSE)  # of the unnamed statement
_BIND_PENDING = Pending(K_BIND)
_CLOSE_PENDING = Pending(K_CLOSE)
# Only while nothing inspects results (see Session._client_fast): no run, no name.
_QUERY_PENDING = Pending(K_QUERY)
_EXECUTE_PENDING = Pending(K_EXECUTE)  # of the unnamed portal, with no row limit
_DESCRIBE_PENDING = Pending(K_DESCRIBE)
_GROUP_PENDING = Pending(K_GROUP)
_SKIPPING_PENDING = Pending(K_SKIPPING)


def _parse_pending(name: str) -> Pending:
    # The name tells the gate which statement an error at Parse is about (masking).
    return _PARSE_PENDING if not name else Pending(K_PARSE, name=name)


@dataclass
class PreparedInfo:
    """What the gateway knows about a named (or unnamed) prepared statement."""

    sql: str
    decision: Any
    fields: list[p.Field] | None = None


@dataclass
class PortalInfo:
    statement: PreparedInfo
    params: tuple[bytes | None, ...] | None
    result_formats: tuple[int, ...]
    fields: list[p.Field] | None = None
    suspended: Run | None = None  # the run an Execute with a row limit left unfinished


@dataclass
class SessionStats:
    bytes_in: int = 0
    bytes_out: int = 0
    statements: int = 0
    blocked: int = 0


@dataclass
class SessionInfo:
    """Facts about a session that the console and the audit trail show."""

    id: str
    identity: Identity
    target: str
    client_addr: str
    client_port: int
    application_name: str
    claimed_user: str
    tls: bool
    started_at: float = field(default_factory=time.time)
    state: str = "idle"
    last_sql: str = ""
    stats: SessionStats = field(default_factory=SessionStats)


def _refusal_do_block(sqlstate: str, message: str, hint: str | None) -> str:
    """SQL that makes the server raise exactly our error (so its state matches)."""
    def lit(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    options = f"ERRCODE = {lit(sqlstate)}, MESSAGE = {lit(message)}"
    if hint:
        options += f", HINT = {lit(hint)}"
    body = f"BEGIN RAISE EXCEPTION USING {options}; END"
    # The message can carry client text (the parser's "at or near" echoes the statement):
    # the body is quoted with a tag it does not contain, so it cannot end early.
    tag = "$hoopops$"
    while tag in body:
        tag = tag[:-1] + "_$"
    return f"DO {tag}{body}{tag}"


class ClientGone(Exception):
    pass


# Why a socket's reading is paused (bits): the other socket cannot take more bytes, or
# this side's lane is waiting and has buffered enough.
_PEER_FULL = 1
_BACKLOG = 2


class _Side(asyncio.Protocol):
    """One of the session's two sockets, once startup handed it over to the relay."""

    def __init__(self, on_data: Any, on_end: Any) -> None:
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.data_received = on_data  # type: ignore[method-assign]
        self._on_end = on_end
        self.peer: _Side | None = None
        self.paused = 0
        self.ended = False

    def eof_received(self) -> None:
        self._end()  # returning None lets the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self._on_end()

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    # The transport's write buffer is full: stop reading from the other socket until it
    # drains, so a large result (or COPY) streams through with flat memory.
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause(_PEER_FULL)

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume(_PEER_FULL)

    def pause(self, why: int) -> None:
        if not self.paused and not self.ended and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused |= why

    def resume(self, why: int) -> None:
        if self.paused & why:
            self.paused &= ~why
            if not self.paused and not self.ended and not self.transport.is_closing():
                self.transport.resume_reading()


def _take_over(side: _Side, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
               ) -> tuple[bytes, bool]:
    """Move a socket from the streams startup used to ``side``; returns what the stream
    had already buffered and whether it had seen the end."""
    transport = writer.transport
    side.transport = transport  # type: ignore[assignment]
    leftover = bytes(reader._buffer)  # type: ignore[attr-defined]
    reader._buffer.clear()  # type: ignore[attr-defined]
    ended = bool(reader._eof or reader._exception is not None  # type: ignore[attr-defined]
                 or transport.is_closing())
    transport.set_protocol(side)
    if reader._paused and not ended:  # type: ignore[attr-defined]
        transport.resume_reading()  # the stream paused it for its own buffer limit
    return leftover, ended

class Session:
    def __init__(self, info: SessionInfo, target: Target, gate: StatementGate,
                 client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                 upstream: UpstreamConnection, bus: events.EventBus,
                 max_message_size: int) -> None:
        self.info = info
        self.target = target
        self.gate = gate
        self.client_reader = client_reader
        self.client_writer = client_writer
        self.upstream = upstream
        self.bus = bus
        self.max_message_size = max_message_size
        self.gateway_pid = secrets.randbits(31)
        self.gateway_key = secrets.token_bytes(4)
        self.pending: deque[Pending] = deque()
        self.tx_status = b"I"
        self.statements: dict[str, PreparedInfo] = {}
        self.portals: dict[str, PortalInfo] = {}
        self.skip_until_sync = False
        self.end_reason = "client closed the connection"
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._stopped = False
        self._waiting: asyncio.Future[Any] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._current_simple: Run | None = None
        self.sql_state: Any = gate.new_session_state(upstream.parameters)
        self._cancel_task: asyncio.Future[None] | None = None
        # Bytes received and not yet handled, per direction (whole messages are taken
        # off the front; a partial one waits for the rest).
        self._cbuf = bytearray()
        self._sbuf = bytearray()
        self._server_head = 0
        self._client = _Side(self._on_client_data, self._on_client_end)
        self._server = _Side(self._on_server_data, self._on_server_end)
        self._client.peer = self._server
        self._server.peer = self._client
        self._client_lane: Lane | None = None
        self._server_lane: Lane | None = None
        # Whether the columns kept for statements and portals are current (see
        # _track_fields).
        self._fields_exact = True
        # The last Bind and Parse _client_fast read, and the Describe/Execute/Sync that
        # followed that Bind: a client repeats them byte for byte but for the parameter
        # values, so matching bytes stand for reading the fields again (see _client_fast).
        # (Compared as slices: ``startswith`` with an offset parses its arguments the slow
        # way and costs more than the copy.) Bind: its bytes before the values and their
        # length, portal, statement, parameter count, the bytes after the values and their
        # length, result formats; tail: bytes, length, portal; Parse: bytes, length,
        # statement, text.
        self._bind_memo: tuple[bytes, int, str, str, int, bytes, int, tuple[int, ...]] | None \
            = None
        self._bind_tail: tuple[bytes, int, str] | None = None
        # Which parameters of a Bind shaped as _bind_memo are binary (that memo, the set).
        self._bind_binary: tuple[Any, frozenset[int]] | None = None
        self._parse_memo: tuple[bytes, int, str, str] | None = None
        # The messages before and after the rows of the last whole reply _server_fast
        # read, the expectation it answered and its transaction status.
        # (head, its length, tail, its length, quick, status)
        self._reply_memo: tuple[bytes, int, bytes, int, int, bytes] | None = None
        self._reply_misses = 0  # whole replies in a row that were not shaped like it
        # The rest of a gate's after_result that _server_run began and that has to wait:
        # the server lane finishes it before relaying anything more.
        self._server_wait: Any = None
        # The error that made the server skip to a Sync not yet sent (K_SKIPPING).
        self._skipped_by: dict[str, str] = {}
        # Statements recorded by the general path whose records may not be on disk yet:
        # nothing more goes to the server before _durable() (see _flush).
        self._unflushed = False

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def _inspects(self) -> bool:
        # Read every time: a policy reload can turn masking on mid-session.
        gate = self.gate
        return gate.audits or gate.masks or gate.observes_results

    @property
    def _runs(self) -> bool:
        """Whether each statement needs its Run (audit, or someone hears of results)."""
        gate = self.gate
        return gate.audits or gate.observes_results

    def startup_messages(self) -> bytes:
        """ParameterStatus from the server, then our own cancel key, then ReadyForQuery."""
        parts = [p.AUTH_OK]
        parts += [p.parameter_status(k, v) for k, v in self.upstream.parameters.items()]
        parts.append(p.backend_key_data(self.gateway_pid, self.gateway_key))
        parts.append(p.ready_for_query(b"I"))
        return b"".join(parts)

    async def run(self) -> None:
        if self._stopped:
            # Killed before it ran (the gate could not record its start, say): nothing
            # would ever end the lanes, so end here.
            await self._teardown()
            return
        loop = asyncio.get_running_loop()
        expires = self.info.identity.expires_at
        if expires is not None:
            self._expiry = loop.call_later(max(0.0, expires - time.time()), self._token_expired)
        client_lane = self._client_lane = Lane(loop, self._client_step, f"client-{self.id}")
        server_lane = self._server_lane = Lane(loop, self._server_step, f"server-{self.id}")
        self._tasks = [client_lane.task, server_lane.task]
        for side, reader, writer in (
                (self._client, self.client_reader, self.client_writer),
                (self._server, self.upstream.reader, self.upstream.writer)):
            leftover, ended = _take_over(side, reader, writer)
            if side is self._client:
                self.info.stats.bytes_in += len(leftover)
                self._cbuf += leftover
            else:
                self._sbuf += leftover
            if ended:
                side._end()
        client_lane.kick()  # (from inside this task: on the lanes' own tasks)
        server_lane.kick()
        try:
            done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled():  # _stop(): token expiry or kill, already reported
                    continue
                exc = task.exception()
                if exc is not None and not isinstance(exc, ClientGone | ConnectionError):
                    log.exception("session %s failed", self.id, exc_info=exc)
                    self.end_reason = f"gateway error: {type(exc).__name__}"
                    self._fatal("XX000", "the gateway hit an internal error and closed this "
                                "session; nothing after the last completed statement ran")
                    self._cancel_in_flight()
        finally:
            await self._teardown()

    async def _teardown(self) -> None:
        self._closing = self._stopped = True
        if self._expiry:
            self._expiry.cancel()
        if self._waiting and not self._waiting.done():
            self._waiting.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self.upstream.close()
        with contextlib.suppress(Exception):
            self.client_writer.close()
        for writer in (self.client_writer, self.upstream.writer):
            _cut_if_stuck(writer.transport)
        await self.gate.session_closed(self)

    def _fatal(self, sqlstate: str, message: str) -> None:
        data = p.error_response(sqlstate, message, "FATAL")
        with contextlib.suppress(Exception):
            if self._client.transport is None:  # before run(): still startup's stream
                self.client_writer.write(data)
            else:
                self._client.write(data)

    def _cancel_in_flight(self) -> None:
        """The gateway closes the session while the server may be running something for
        it: cancel that (a backend reads its socket only between statements, so closing
        the connection would let it run on, unseen)."""
        if self.pending and self._cancel_task is None:
            self._cancel_task = asyncio.ensure_future(self.cancel_upstream())

    def _token_expired(self) -> None:
        self.end_reason = "token expired"
        self._fatal("28000", "your token expired; the gateway closed the session. Reconnect "
                    "with a fresh token")
        # A backend reads its socket only between statements: closing it would leave a
        # running statement running, on behalf of a token no longer valid.
        self._cancel_task = asyncio.ensure_future(self.cancel_upstream())
        self._stop()

    def kill(self, reason: str = "terminated by an analyst") -> None:
        """End the session now: the client gets a FATAL, the upstream backend is cancelled."""
        self.end_reason = reason
        self._fatal("57P01", f"hoopops: session {reason}")
        self._cancel_task = asyncio.ensure_future(self.cancel_upstream())
        self._stop()

    def _stop(self) -> None:
        # Nothing is relayed after this, in either direction, even before the tasks end.
        self._stopped = True
        for task in self._tasks:
            task.cancel()

    async def cancel(self) -> None:
        """A CancelRequest with this session's key arrived."""
        if self._waiting is not None and not self._waiting.done():
            self._waiting.cancel()
            return
        await self.cancel_upstream()

    async def cancel_upstream(self) -> None:
        await send_cancel(self.target.upstream, self.upstream.backend_pid,
                          self.upstream.backend_key)

    def _set_state(self, state: str) -> None:
        if state != self.info.state:
            self.info.state = state
            self.bus.publish(events.SESSION_STATE, session_id=self.id, state=state)

    # -- client -> server -----------------------------------------------------------------

    def _on_client_data(self, data: bytes) -> None:
        if self._stopped:
            return
        self.info.stats.bytes_in += len(data)
        lane = self._client_lane
        assert lane is not None
        buf = self._cbuf
        if self.gate.masks:  # (read every chunk: a policy reload can turn masking on)
            if not self._fields_exact:
                self._track_fields()
            buf += data
        elif not lane.busy and not self.skip_until_sync:
            self._fields_exact = False
            if buf:
                buf += data
                data = buf  # type: ignore[assignment]
            try:
                done = self._client_fast(data)
            except Exception as exc:
                lane.fail(exc)
                return
            if done == len(data) and data is not buf:  # the whole read, as it came
                transport = self._server.transport
                if not transport.is_closing():
                    transport.write(data)
                return
            if done < 0:  # up to a message the lane finishes: forwarded up to it already
                done = -done
            elif done:
                _write_head(self._server.transport, data, buf, done)
            _keep_tail(data, buf, done)
            if not buf or lane.busy:
                return
        else:
            buf += data
        if lane.busy and len(buf) > self.max_message_size:
            # Waiting (a hold, a catalog lookup): keep reading, so a client that goes
            # away is noticed, but only this much.
            self._client.pause(_BACKLOG)
        lane.kick()

    def _on_client_end(self) -> None:
        if self._stopped:
            return
        waiting = self._waiting
        if waiting is not None and not waiting.done():
            waiting.cancel()  # the agent went away: withdraw what it waits for
        assert self._client_lane is not None
        self._client_lane.kick()

    def _track_fields(self) -> None:
        """Results are inspected again: forget the columns learned before, since the
        fast path stops recording Describe answers while nothing inspects (masking
        needs exact columns; unknown ones make it describe the portal itself)."""
        for stmt in self.statements.values():
            stmt.fields = None
        for portal in self.portals.values():
            portal.fields = portal.statement.fields = None
        self._fields_exact = True

    async def _client_step(self) -> None:
        """Handle every whole message buffered from the client, in order."""
        if self._stopped:
            return
        if not self._fields_exact and self.gate.masks:
            self._track_fields()
        buf = self._cbuf
        limit = self.max_message_size
        upstream = self._server
        pos = 0
        out: list[bytes] = []
        try:
            while len(buf) - pos >= 5:
                mtype, length = _HDR(buf, pos)
                if length < 4 or length > limit:
                    raise p.bad_length(length, limit)
                nxt = pos + 1 + length
                if len(buf) < nxt:
                    break
                raw = bytes(buf[pos:nxt])
                pos = nxt
                if (mtype in _BARE and length != 4) or mtype == p.COPY_FAIL:
                    p.check_bare(mtype, raw)
                if mtype == p.TERMINATE:
                    if out:
                        await self._durable()
                        upstream.write(b"".join(out))
                    self.end_reason = "client terminated the session"
                    raise ClientGone
                # The extended protocol's steady state (Bind/Execute/Sync of an allowed
                # statement) is handled without creating coroutines.
                if not self.skip_until_sync:
                    if mtype == p.SYNC:
                        self.pending.append(_SYNC_PENDING)
                        out.append(raw)
                        continue
                    if mtype == p.BIND and self._bind_fast(raw, out):
                        continue
                    if mtype == p.EXECUTE and self._execute_fast(raw, out):
                        continue
                await self._on_client_message(mtype, raw, out)
                if self._stopped:
                    return
        except p.ProtocolError as exc:
            if out:
                await self._durable()
                upstream.write(b"".join(out))
            self.end_reason = f"protocol error: {exc}"
            self._fatal(exc.sqlstate, f"hoopops: {exc}")
            self._cancel_in_flight()
            raise ClientGone from None
        finally:
            del buf[:pos]
        if out:
            await self._durable()
            upstream.write(b"".join(out))
        if self._client.ended:
            self.end_reason = "client closed the connection"
            raise ClientGone
        if self._client.paused & _BACKLOG:
            self._client.resume(_BACKLOG)

    async def _on_client_message(self, mtype: int, raw: bytes, out: list[bytes]) -> None:
        """Handle one whole client message; ``raw`` is forwarded unchanged when allowed."""
        if self.skip_until_sync and mtype != p.SYNC:
            # The server would discard these after an error; so does the gateway.
            return
        if mtype == p.BIND:
            await self._on_bind(raw, out)
        elif mtype == p.EXECUTE:
            await self._on_execute(raw, out)
        elif mtype == p.SYNC:
            self.skip_until_sync = False
            self.pending.append(_SYNC_PENDING)
            out.append(raw)
        elif mtype == p.QUERY:
            await self._on_query(raw, out)
        elif mtype == p.PARSE:
            await self._on_parse(raw, out)
        elif mtype == p.DESCRIBE:
            kind, name = p.decode_describe_or_close(raw[5:])
            self.pending.append(Pending(K_DESCRIBE, name=kind + name))
            out.append(raw)
        elif mtype == p.CLOSE:
            payload = raw[5:]
            kind, name = p.decode_describe_or_close(payload)
            if kind == "S":
                self.statements.pop(name, None)
                if self.sql_state is not None:
                    self.sql_state.on_close(name)
            else:
                self.portals.pop(name, None)
            self.pending.append(_CLOSE_PENDING)
            out.append(raw)
        elif mtype == p.FLUSH:
            out.append(raw)
        elif mtype in (p.COPY_DATA, p.COPY_DONE, p.COPY_FAIL):
            if mtype != p.COPY_DATA:
                self._drop_syncs_ignored_in_copy()
            out.append(raw)
        elif mtype == p.FUNCTION_CALL:
            await self._flush(out)
            self._refuse_simple("0A000", "the fastpath function-call protocol is not allowed "
                                "through hoopops; call the function with SELECT instead")
        else:
            raise p.ProtocolError(f"unexpected message type {chr(mtype)!r} from the client")

    def _drop_syncs_ignored_in_copy(self) -> None:
        """The server ignores Sync during an extended-protocol COPY FROM STDIN, so a Sync
        the client pipelined after that Execute gets no ReadyForQuery (libpq sends another
        after CopyDone/CopyFail): forget the expectation, or every later reply is
        attributed one request too early."""
        pending = self.pending
        if pending and pending[0].kind == K_EXECUTE and pending[0].copy_in:
            head = pending.popleft()
            kept = [x for x in pending if x.kind != K_SYNC]
            pending.clear()
            pending.append(head)
            pending.extend(kept)

    async def _flush(self, out: list[bytes]) -> None:
        if out:
            await self._durable()
            self._server.write(b"".join(out))
            out.clear()

    async def _durable(self) -> None:
        """Wait until the records of the statements about to be forwarded are durable.

        The general path records a pipeline's statements without waiting for the disk
        each time, and waits here once, before the first byte of them goes on: under
        ``synchronous=FULL`` a batch of a thousand inserts shares one flush instead of
        waiting for a thousand in turn. If the records cannot be made durable, nothing
        is forwarded and the session ends (fail closed): the statements cannot be
        refused one by one any more."""
        if not self._unflushed:
            return
        self._unflushed = False
        try:
            await self.gate.records_flushed(self)
        except AuditError as exc:
            self.end_reason = "audit trail unavailable"
            self._fatal("58030", "hoopops: the audit trail could not be written, so the "
                        f"statements just sent were not run (fail closed): {exc}")
            raise ClientGone from None

    async def _on_query(self, raw: bytes, out: list[bytes]) -> None:
        received = time.time()
        try:
            sql = p.decode_query(raw[5:])
        except p.SqlTextError as exc:
            await self._flush(out)
            self._refuse_simple(exc.sqlstate, f"hoopops refused the statement: {exc} "
                                "(the gateway cannot read it exactly as the server would)")
            return
        self.info.stats.statements += 1
        self.info.last_sql = sql
        verdict = await self.gate.decide(self, sql, None)
        await self._query_decided(raw, sql, verdict, received, out)

    async def _query_decided(self, raw: bytes, sql: str, verdict: Any, received: float,
                             out: list[bytes]) -> None:
        if verdict.action == "review":
            await self._flush(out)
            verdict = await self._hold(verdict, sql, None)
        if verdict.action != "allow":
            await self._flush(out)
            await self.gate.record_refusal(self, sql, None, verdict, received)
            self.info.stats.blocked += 1
            self._refuse_simple(verdict.sqlstate, verdict.message, verdict.hint)
            return
        if not self._inspects:
            # Nobody looks at the result: the replies are relayed untouched.
            self.pending.append(_QUERY_PENDING)
            out.append(raw)
            return
        run = Run(sql, verdict, None, received_at=received, started_at=received)
        if self.gate.audits:
            refusal = await self.gate.before_forward(self, run, flushed=False)
            if refusal is not None:
                await self._flush(out)
                self._refuse_simple(refusal.sqlstate, refusal.message, refusal.hint)
                return
            self._unflushed = True
        self.pending.append(Pending(K_QUERY, run))
        out.append(raw)

    async def _on_parse(self, raw: bytes, out: list[bytes]) -> None:
        received = time.time()
        try:
            msg = p.decode_parse(raw[5:])
        except p.SqlTextError as exc:
            await self._flush(out)
            self._refuse_extended(exc.sqlstate, f"hoopops refused the statement: {exc}",
                                  None, out)
            return
        verdict = await self.gate.decide(self, msg.sql, msg.name)
        await self._parse_decided(raw, msg, verdict, received, out)

    async def _parse_decided(self, raw: bytes, msg: p.ParseMsg, verdict: Any,
                             received: float, out: list[bytes]) -> None:
        if verdict.action == "block":
            self.info.stats.statements += 1
            self.info.stats.blocked += 1
            self.info.last_sql = msg.sql
            await self.gate.record_refusal(self, msg.sql, None, verdict, received)
            self._refuse_extended(verdict.sqlstate, verdict.message, verdict.hint, out,
                                  drop_unnamed=msg.name == "")
            if msg.name:
                # Pipelining clients (pg's pipeline mode, batches) bind the name before they
                # hear of the refusal: those Binds are refused too, where the server, which
                # never saw the Parse, would answer 26000 (no such statement).
                self.statements[msg.name] = PreparedInfo(msg.sql, verdict)
            return
        # "review" is held at Bind, when the parameters it would run with are known.
        self._prepared(msg.name, msg.sql, verdict)
        self.pending.append(_parse_pending(msg.name))
        out.append(raw)

    async def _record_failed_parse(self, head: Pending, fields: dict[str, str]) -> None:
        """A statement the server refused at Parse (a missing table, a syntax the gateway's
        parser accepts) never reaches Execute, where statements are recorded: record it
        here, with the server's SQLSTATE, unless an Execute queued behind it in the same
        pipeline carries it (that run is recorded and ends with this error)."""
        for later in self.pending:
            if later is not head and (later.kind in _SYNC_KINDS or later.run is not None):
                if later.run is not None:
                    return
                break
        prepared = self.statements.get(head.name)
        if prepared is None:
            return
        decided = prepared.decision
        failed = (replace(decided, sqlstate=fields.get("C") or "XX000",
                          message=fields.get("M") or "")
                  if isinstance(decided, Verdict)
                  else Verdict("allow", fields.get("C") or "XX000", fields.get("M") or ""))
        await self.gate.record_refusal(self, prepared.sql, None, failed, time.time())

    def _prepared(self, name: str, sql: str, verdict: Any) -> None:
        statements = self.statements
        known = statements.get(name)
        if known is not None and known.sql == sql and known.decision is verdict:
            # The same statement parsed again (the unnamed one, every time): the columns
            # are described anew, as after any Parse.
            known.fields = None
        else:
            statements[name] = PreparedInfo(sql, verdict)

    async def _later(self, decided: Any, then: Any, *args: Any) -> None:
        """Finish a message whose verdict had to be awaited (see ``_client_fast``), then
        handle whatever the client sent behind it."""
        verdict = await decided
        out: list[bytes] = []
        await then(*args[:2], verdict, *args[2:], out)
        await self._flush(out)
        await self._client_step()

    def _bind_fast(self, raw: bytes, out: list[bytes]) -> bool:
        """Bind of a statement already allowed, with nothing to record or hold."""
        if self.gate.audits:
            return False
        portal_name, statement_name, result_formats = p.scan_bind(raw[5:])
        stmt = self.statements.get(statement_name)
        if stmt is None:
            return False
        verdict = stmt.decision
        if verdict is not None and (verdict.action != "allow"
                                    or self.gate.outdated(self, verdict)):
            return False
        self._bound(portal_name, stmt, result_formats)
        # (named when masking: a Bind the server refuses leaves the portal it had under it)
        self.pending.append(Pending(K_BIND, name=portal_name) if portal_name and self.gate.masks
                            else _BIND_PENDING)
        out.append(raw)
        return True

    def _bound_params(self, buf: bytes | bytearray, pos: int, nxt: int, hit: bool
                      ) -> BoundParams:
        """The values of the Bind at ``buf[pos:nxt]`` that ``_client_fast`` just read;
        ``hit``: its bytes before the values are those of ``_bind_memo``, so the values
        are where that says, and which are binary is known already."""
        memo = self._bind_memo
        binary = self._bind_binary
        if hit and binary is not None and binary[0] is memo:
            assert memo is not None
            at = pos + 5 + memo[1]
            values: list[bytes | None] = []
            for _ in range(memo[4]):
                size = _INT32(buf, at)[0]
                at += 4
                if size < 0:
                    values.append(None)
                else:
                    values.append(bytes(buf[at:at + size]))
                    at += size
            params = BoundParams(values)
            params.binary = binary[1]
            return params
        params = BoundParams.of(p.decode_bind(bytes(buf[pos + 5:nxt])))
        self._bind_binary = (memo, params.binary)
        return params

    def _bound(self, portal_name: str, stmt: PreparedInfo, result_formats: tuple[int, ...]
               ) -> None:
        """Remember a portal bound by a fast path."""
        portal = self.portals.get(portal_name)
        if portal is None or portal.statement is not stmt or portal.params is not None \
                or portal.suspended is not None or portal.result_formats != result_formats:
            self.portals[portal_name] = PortalInfo(stmt, None, result_formats)
        # else: the same statement bound again the same way (the steady state of a
        # prepared statement): the portal the gateway knows is still exact.

    def _execute_fast(self, raw: bytes, out: list[bytes]) -> bool:
        """Execute of a known portal when results need no recording or masking."""
        gate = self.gate
        if gate.audits or gate.masks:
            return False
        name, _ = p.decode_execute(raw[5:])
        portal = self.portals.get(name)
        if portal is None or portal.suspended is not None:
            return False
        self.info.stats.statements += 1
        statement = portal.statement
        self.info.last_sql = statement.sql
        now = time.time()
        run = Run(statement.sql, statement.decision, None, received_at=now, started_at=now,
                  fields=portal.fields or statement.fields,
                  result_formats=portal.result_formats)
        self.pending.append(Pending(K_EXECUTE, run, name=name))
        out.append(raw)
        return True

    async def _on_bind(self, raw: bytes, out: list[bytes]) -> None:
        payload = raw[5:]
        # Walked once: with the values when the audit trail will record them.
        bind = p.decode_bind(payload) if self.gate.audits else None
        portal_name, statement_name, result_formats = (
            (bind.portal, bind.statement, bind.result_formats) if bind is not None
            else p.scan_bind(payload))
        stmt = self.statements.get(statement_name)
        if stmt is None:
            if self.gate.masks:
                # SQL PREPARE names statements in the same namespace as Parse: bound here,
                # its rows would come back with nothing known about where they come from.
                self._refuse_extended("42501", f'hoopops: prepared statement '
                                      f'"{statement_name}" is not one the gateway saw '
                                      "prepared by Parse (PREPARE made it, or its last Parse "
                                      "failed), so masking cannot trace its results",
                                      "run a statement prepared with PREPARE by EXECUTE; "
                                      "after a failed Parse, Close the name first", out)
                return
            # Unknown to the gateway means unknown to the server: let it say so.
            self.pending.append(Pending(K_BIND))
            out.append(raw)
            return
        verdict = stmt.decision
        if verdict is not None and self.gate.outdated(self, verdict):
            # The policy was reloaded since Parse: judge the statement again under it.
            verdict = stmt.decision = await self.gate.decide(self, stmt.sql, statement_name)
        if verdict is not None and verdict.action == "block":
            self.info.stats.statements += 1
            self.info.stats.blocked += 1
            await self.gate.record_refusal(self, stmt.sql, None, verdict, time.time())
            self._refuse_extended(verdict.sqlstate, verdict.message, verdict.hint, out)
            return
        params: BoundParams | None = None
        if verdict is not None and verdict.action == "review" and not (
                self.gate.session_allows(self, verdict)):
            params = BoundParams.of(bind or p.decode_bind(payload))
            await self._flush(out)
            verdict = await self._hold(verdict, stmt.sql, params)
            if verdict.action != "allow":
                self.info.stats.statements += 1
                self.info.stats.blocked += 1
                await self.gate.record_refusal(self, stmt.sql, params, verdict, time.time())
                self._refuse_extended(verdict.sqlstate, verdict.message, verdict.hint, out)
                return
            stmt = PreparedInfo(stmt.sql, verdict, stmt.fields)
        elif bind is not None:
            # Parameter values are decoded only when the audit trail records them.
            params = BoundParams.of(bind)
        self.portals[portal_name] = PortalInfo(stmt, params, result_formats)
        self.pending.append(Pending(K_BIND, name=portal_name))
        out.append(raw)

    async def _on_execute(self, raw: bytes, out: list[bytes]) -> None:
        name, _ = p.decode_execute(raw[5:])
        portal = self.portals.get(name)
        if portal is None:
            if self.gate.masks:
                # A cursor opened with DECLARE is a portal of the same namespace: executed
                # here, its rows would come back with nothing known about their sources.
                self._refuse_extended("42501", f'hoopops: portal "{name}" is not one the '
                                      "gateway saw bound (DECLARE opened it, or its last "
                                      "Bind failed), so masking cannot trace its results",
                                      "read a cursor with FETCH", out)
                return
            self.pending.append(Pending(K_EXECUTE))
            out.append(raw)
            return
        if portal.suspended is not None:
            # More rows of a portal the server suspended: the same statement, recorded and
            # counted once; its result (rows, hash, sample) goes on accumulating.
            run, portal.suspended = portal.suspended, None
            run.finished = False
            self.pending.append(Pending(K_EXECUTE, run, name=name))
            out.append(raw)
            return
        self.info.stats.statements += 1
        statement = portal.statement
        self.info.last_sql = statement.sql
        now = time.time()
        run = Run(statement.sql, statement.decision, portal.params, received_at=now,
                  started_at=now, fields=portal.fields or statement.fields,
                  result_formats=portal.result_formats)
        gate = self.gate
        if gate.audits:
            refusal = await gate.before_forward(self, run, flushed=False)
            if refusal is not None:
                self._refuse_extended(refusal.sqlstate, refusal.message, refusal.hint, out)
                return
            self._unflushed = True
        if gate.masks:
            if run.fields is None:
                # The client executes without describing; masking needs to know the
                # columns, so ask the server ourselves and keep the reply from the client.
                out.append(p.frame(p.DESCRIBE, b"P" + p.cstr(name)))
                self.pending.append(Pending(K_DESCRIBE, run, name="P" + name, swallow=True))
            else:
                await gate.on_row_description(self, run)
        self.pending.append(Pending(K_EXECUTE, run, name=name))
        out.append(raw)

    async def _hold(self, verdict: Any, sql: str, params: tuple[bytes | None, ...] | None
                    ) -> Any:
        """Wait for an analyst's decision while watching for the client going away."""
        self._set_state("waiting")
        waiting = asyncio.ensure_future(self.gate.request_approval(self, verdict, sql, params))
        self._waiting = waiting
        try:
            if self._client.ended:
                waiting.cancel()
            # The client's socket is still read meanwhile (into the backlog, up to
            # max_message_size), so its end cancels ``waiting`` (see _on_client_end).
            await asyncio.wait({waiting})
            if self._client.ended:
                # The agent went away: withdrawn, so nobody approves a dead statement.
                with contextlib.suppress(BaseException):
                    await waiting
                self.end_reason = "client closed the connection while awaiting approval"
                raise ClientGone
            try:
                return waiting.result()
            except asyncio.CancelledError:
                return self.gate.withdrawn_verdict(self)
        finally:
            self._waiting = None
            self._set_state("active")

    def notify_client(self, message: str) -> None:
        """Send an out-of-band NoticeResponse (allowed at any point between messages)."""
        self._client.write(p.notice_response(message))

    def _refuse_simple(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        if not self.pending and self.tx_status == b"I":
            self._client.write(p.error_response(sqlstate, message, hint=hint)
                               + p.ready_for_query(b"I"))
            return
        # Something is in flight or a transaction is open: let the server raise it, so the
        # reply lands in order and the transaction is aborted on the server as well.
        self.pending.append(Pending(K_QUERY, injected_error=True))
        self._server.write(p.query(_refusal_do_block(sqlstate, message, hint)))

    def _refuse_extended(self, sqlstate: str, message: str, hint: str | None,
                         out: list[bytes], drop_unnamed: bool = False) -> None:
        """Make the server fail this pipeline with our error; skip the client to Sync."""
        do_block = _refusal_do_block(sqlstate, message, hint)
        if drop_unnamed:
            out.append(p.frame(p.CLOSE, b"S\0"))
            self.pending.append(Pending(K_CLOSE, swallow=True))
            self.statements.pop("", None)
        out.append(p.frame(p.CLOSE, b"Shoopops_refusal\0"))
        self.pending.append(Pending(K_CLOSE, swallow=True))
        out.append(p.parse_message("hoopops_refusal", do_block))
        self.pending.append(Pending(K_PARSE, swallow=True))
        out.append(p.bind_message("hoopops_refusal", "hoopops_refusal"))
        self.pending.append(Pending(K_BIND, swallow=True))
        out.append(p.execute_message("hoopops_refusal"))
        self.pending.append(Pending(K_EXECUTE, injected_error=True))
        self.skip_until_sync = True

    def _client_fast(self, buf: bytes | bytearray) -> int:
        """Handle the messages at the front of ``buf`` that need nothing awaited and
        nothing rewritten (the steady state of a session nothing masks); returns how many
        bytes were handled, which the caller forwards as they came.

        When results are recorded (``_runs``: audit, or results reported), each Query
        and each group whose one Execute is last gets its run, and its audit record is
        written before the call returns (``_query_run``, ``_group_run``); a group that
        cannot be taken whole from this read is left to the general path from its first
        request, so nothing of it is forwarded before its Execute is recorded.

        Stops at the first message the general path must see (``_client_step``). A
        message whose verdict is not a plain allow, or must be awaited, is finished on
        the lane's task (``Lane.adopt``), before anything that follows it: then what came
        before it is forwarded here, and the result is minus the bytes consumed (that
        message included, which only the lane may forward).

        The requests up to a Sync get one expectation between them (K_GROUP) when at most
        one of them is an Execute and it is the last: whatever the server answers, one
        ReadyForQuery ends it, and a COPY FROM STDIN can only have come from that
        Execute. Their expectations are queued one by one (``_queue_each``) only when a
        group cannot be formed, so the common pipeline costs one queue entry, not five.
        """
        pending = self.pending
        end = len(buf)
        limit = self.max_message_size
        # Results are recorded (audit) or reported: every Execute gets its run, and a
        # group may hold only one, last (see _group_run).
        runs = self._runs
        if buf[0] == 81 and end > 6:
            # The read is one Query (the simple protocol's steady state) that may run
            # as it is: settled here; anything else about it, by the loop below.
            length = _HDR(buf, 0)[1]
            if length + 1 == end and length <= limit and buf[end - 1] == 0:
                text = buf[5:end - 1]
                if 0 not in text:
                    try:
                        sql = text.decode()
                    except UnicodeDecodeError:
                        sql = None
                    if sql is not None:
                        verdict = self.gate.decided(self, sql, None)
                        if verdict is not None and verdict.action == "allow":
                            info = self.info
                            info.stats.statements += 1
                            info.last_sql = sql
                            if runs:
                                return self._query_run(buf, 0, end, sql, verdict)
                            pending.append(_QUERY_PENDING)
                            return end
        pos = 0
        start = 0  # buf[start:pos]: handled since the last Sync, expectations not queued
        shape = 0  # of buf[start:pos]: 0 no Execute, 1 an Execute last, 2 anything else
        bound_end = -1  # where the group's last Bind ended, if no Parse came after it
        bound_name = executed = ""  # the portal that Bind bound, the one Executed
        try:
            while end - pos >= 5:
                mtype, length = _HDR(buf, pos)
                nxt = pos + 1 + length
                if nxt > end or length < 4 or length > limit:
                    break  # incomplete (or invalid: the general path says so)
                if (mtype == 83 or mtype == 72) and length != 4:
                    break  # (a Sync or Flush with a payload: the general path refuses it)
                if mtype == 83:  # Sync
                    if shape == 2:
                        self._queue_each(buf, start, pos)
                        pending.append(_SYNC_PENDING)
                    else:
                        if shape and runs:
                            done = self._group_run(buf, start, nxt, executed)
                            if done < 0:
                                return done
                        else:
                            pending.append(_GROUP_PENDING if start < pos else _SYNC_PENDING)
                        if shape and bound_end >= 0 and executed == bound_name:
                            self._bind_tail = (bytes(buf[bound_end:nxt]), nxt - bound_end,
                                               bound_name)
                    start = nxt
                    shape = 0
                    bound_end = -1
                elif mtype == 66:  # Bind
                    if shape and runs:
                        break
                    memo = self._bind_memo
                    hit = False
                    if memo is not None and buf[pos + 5:pos + 5 + memo[1]] == memo[0]:
                        at = pos + 5 + memo[1]
                        if memo[4] == 1 and at + 4 <= nxt:  # (inline: one value is usual)
                            size = _INT32(buf, at)[0]
                            at = at + 4 + size if size >= 0 else at + 4 if size == -1 else -1
                        else:
                            at = p.params_end_at(buf, at, memo[4], nxt)
                        hit = at >= 0 and at + memo[6] == nxt and buf[at:nxt] == memo[5]
                    if hit:
                        assert memo is not None
                        portal_name = memo[2]
                        statement_name = memo[3]
                        result_formats = memo[7]
                    else:
                        portal_name, statement_name, result_formats, at, count, results_at = \
                            p.bind_layout_at(buf, pos + 5, nxt)
                        self._bind_memo = (bytes(buf[pos + 5:at]), at - pos - 5, portal_name,
                                           statement_name, count, bytes(buf[results_at:nxt]),
                                           nxt - results_at, result_formats)
                    stmt = self.statements.get(statement_name)
                    if stmt is None:
                        break
                    verdict = stmt.decision
                    if verdict is not None and (verdict.action != "allow"
                                                or self.gate.outdated(self, verdict)):
                        break
                    portal = self.portals.get(portal_name)
                    if runs:
                        # The trail records the values each Execute ran with.
                        params = self._bound_params(buf, pos, nxt, hit)
                        if portal is None or portal.statement is not stmt or \
                                portal.suspended is not None or \
                                portal.result_formats != result_formats:
                            self.portals[portal_name] = PortalInfo(stmt, params,
                                                                   result_formats)
                        else:  # (bound the same way again: only the values are new)
                            portal.params = params
                    elif portal is None or portal.statement is not stmt or \
                            portal.params is not None or portal.suspended is not None or \
                            portal.result_formats != result_formats:
                        self._bound(portal_name, stmt, result_formats)
                    tail = self._bind_tail
                    if tail is not None and not shape and tail[2] == portal_name and \
                            end - nxt == tail[1] and buf[nxt:end] == tail[0]:
                        # The rest of the read is the Describe/Execute/Sync seen after this
                        # Bind before, which executes the portal just bound: its effects,
                        # without reading it again.
                        if runs:
                            return self._group_run(buf, start, end, portal_name)
                        info = self.info
                        info.stats.statements += 1
                        info.last_sql = stmt.sql
                        pending.append(_GROUP_PENDING)
                        return end
                    if shape:
                        shape = 2
                    bound_end = nxt
                    bound_name = portal_name
                elif mtype == 69:  # Execute
                    if shape and runs:
                        break
                    if length == 9 and buf[pos + 5] == 0:  # the unnamed portal
                        name = ""
                        max_rows = _INT32(buf, pos + 6)[0]
                    else:
                        name, max_rows = p.execute_at(buf, pos + 5, nxt)
                    portal = self.portals.get(name)
                    if portal is None or portal.suspended is not None or max_rows:
                        break  # (a row limit may suspend the portal: the general path)
                    if not runs:  # (else counted when its group is complete: _group_run)
                        info = self.info
                        info.stats.statements += 1
                        info.last_sql = portal.statement.sql
                    shape = 2 if shape else 1
                    executed = name
                elif mtype == 68:  # Describe
                    if runs and (shape or length < 6 or buf[pos + 5] == 83):
                        # (a statement's columns, which the trail's samples name, are kept
                        # by the general path; a portal's arrive with its run's rows)
                        break
                    # Nothing masks, so what it answers is not kept (see _track_fields).
                    if length < 6 or buf[pos + 5] not in (83, 80) or buf[nxt - 1] != 0 or (
                            length != 6 and buf.find(0, pos + 6, nxt) != nxt - 1):
                        break  # (malformed: the general path refuses it)
                    if shape:
                        shape = 2
                elif mtype == 81:  # Query
                    if runs and start < pos:
                        break
                    text = buf[pos + 5:nxt - 1]
                    if buf[nxt - 1] != 0 or 0 in text:
                        break  # (the general path refuses it)
                    try:
                        sql = text.decode()
                    except UnicodeDecodeError:
                        break
                    info = self.info
                    info.stats.statements += 1
                    info.last_sql = sql
                    if start < pos:
                        self._queue_each(buf, start, pos)
                    start = pos
                    shape = 0
                    verdict = self.gate.decided(self, sql, None)  # a cache hit: no coroutine
                    ready = verdict is not None
                    if not ready:
                        ready, verdict = self._client_lane.attempt(
                            self.gate.decide(self, sql, None))
                    if not ready or verdict.action != "allow":
                        self._forward_then_wait(buf, pos, self._later(
                            verdict if not ready else _ready(verdict), self._query_decided,
                            bytes(buf[pos:nxt]), sql, time.time()))
                        return -nxt
                    if runs:
                        done = self._query_run(buf, pos, nxt, sql, verdict)
                        if done < 0:
                            return done
                    else:
                        pending.append(_QUERY_PENDING)
                    start = nxt
                elif mtype == 80:  # Parse
                    if runs and start < pos:
                        break
                    parsed = self._parse_memo
                    if parsed is not None and nxt - pos == parsed[1] and \
                            buf[pos:nxt] == parsed[0]:
                        name = parsed[2]
                        sql = parsed[3]
                    else:
                        try:
                            name, sql = p.parse_at(buf, pos + 5, nxt)
                        except p.SqlTextError:
                            break
                        self._parse_memo = (bytes(buf[pos:nxt]), nxt - pos, name, sql)
                    bound_end = -1
                    verdict = self.gate.decided(self, sql, name)  # a cache hit: no coroutine
                    ready = verdict is not None
                    if not ready:
                        ready, verdict = self._client_lane.attempt(
                            self.gate.decide(self, sql, name))
                    if not ready or verdict.action == "block":
                        if start < pos:
                            self._queue_each(buf, start, pos)
                        start = pos
                        self._forward_then_wait(buf, pos, self._later(
                            verdict if not ready else _ready(verdict), self._parse_decided,
                            bytes(buf[pos:nxt]), p.decode_parse(buf[pos + 5:nxt]),
                            time.time()))
                        return -nxt
                    known = self.statements.get(name)
                    if known is not None and known.decision is verdict and known.sql is sql:
                        known.fields = None  # (_prepared, inline: the memo's very text)
                    else:
                        self._prepared(name, sql, verdict)
                    if shape:
                        shape = 2
                elif mtype == 72:  # Flush
                    pass
                elif mtype == 100:  # CopyData
                    if runs:
                        break
                    shape = 2
                    bound_end = -1
                else:
                    break
                pos = nxt
                if self._stopped:
                    break
        except p.ProtocolError:
            pass  # malformed: the general path answers it
        if runs and start < pos:
            # A group not complete here goes to the general path from its first request
            # (what the loop did for it, it does again; an Execute is counted and recorded
            # only at its Sync): forwarding part of it ahead of a step that may wait for
            # the record would let the server answer, or fail, requests not yet queued.
            pos = start
        if start < pos:
            self._queue_each(buf, start, pos)
        return pos

    def _query_run(self, buf: bytes | bytearray, pos: int, nxt: int, sql: str, verdict: Any
                   ) -> int:
        """The Query in ``buf[pos:nxt]``, allowed and counted, gets its run and, when the
        gate audits, its record, before anything is forwarded; returns ``nxt`` when that
        took no waiting, else ``-nxt``: the lane finishes it (``_query_recorded``)."""
        now = time.time()
        run = Run(sql, verdict, None, received_at=now, started_at=now)
        return self._recorded_run(buf, pos, nxt, run, K_QUERY, self._query_recorded)

    def _recorded_run(self, buf: bytes | bytearray, start: int, nxt: int, run: Run,
                      kind: int, finish: Callable[[bytes, Run, Any], Awaitable[None]]
                      ) -> int:
        """Queue ``run`` under a ``kind`` expectation for the requests ``buf[start:nxt]``
        once the gate has recorded it, if it audits; returns ``nxt``, or ``-nxt`` when
        recording must be waited for or refused the statement: ``finish`` then does the
        rest on the lane."""
        gate = self.gate
        if gate.audits:
            # Under synchronous=NORMAL the record is one journal write that never waits;
            # under FULL the lane awaits the shared fdatasync before forwarding.
            outcome = gate.record_forward(self, run)
            if outcome is not None:
                self._forward_then_wait(buf, start, finish(
                    bytes(buf[start:nxt]), run, _outcome(outcome)))
                return -nxt
        self.pending.append(Pending(kind, run))
        return nxt

    async def _query_recorded(self, raw: bytes, run: Run, recorded: Any) -> None:
        refusal = await recorded
        if refusal is not None:
            self._refuse_simple(refusal.sqlstate, refusal.message, refusal.hint)
        else:
            self.pending.append(Pending(K_QUERY, run))
            self._server.write(raw)
        await self._client_step()

    def _group_run(self, buf: bytes | bytearray, start: int, nxt: int, name: str) -> int:
        """The requests in ``buf[start:nxt]`` up to a Sync, whose last is the one Execute,
        of portal ``name``: that statement's run and record, as ``_query_run`` (the group's
        one expectation carries the run). Returns ``nxt``, or ``-nxt`` when the lane
        finishes it (``_group_recorded``)."""
        portal = self.portals[name]
        statement = portal.statement
        info = self.info
        info.stats.statements += 1
        info.last_sql = statement.sql
        now = time.time()
        run = Run(statement.sql, statement.decision, portal.params, received_at=now,
                  started_at=now, fields=portal.fields or statement.fields,
                  result_formats=portal.result_formats)
        return self._recorded_run(buf, start, nxt, run, K_GROUP, self._group_recorded)

    async def _group_recorded(self, group: bytes, run: Run, recorded: Any) -> None:
        refusal = await recorded
        out: list[bytes] = []
        if refusal is None:
            self.pending.append(Pending(K_GROUP, run))
            out.append(group)
        else:
            # What the general path does: the requests before the Execute go as they
            # are, the Execute is refused, and the server skips to the group's Sync.
            at = 0
            while group[at] != 69:  # Execute
                at += 1 + _HDR(group, at)[1]
            self._queue_each(group, 0, at)
            out.append(group[:at])
            self._refuse_extended(refusal.sqlstate, refusal.message, refusal.hint, out)
            self.skip_until_sync = False
            self.pending.append(_SYNC_PENDING)
            out.append(group[-5:])  # the Sync (a Flush between is dropped, as it would be)
        await self._flush(out)
        await self._client_step()

    def _queue_each(self, buf: bytes | bytearray, pos: int, end: int) -> None:
        """Queue one expectation per request in ``buf[pos:end]``, which ``_client_fast``
        has handled (so it is well formed) without forming a group of it."""
        pending = self.pending
        while pos < end:
            mtype, length = _HDR(buf, pos)
            nxt = pos + 1 + length
            if mtype == 80:  # Parse
                pending.append(_parse_pending(p.name_at(buf, pos + 5, nxt)))
            elif mtype == 66:  # Bind
                pending.append(_BIND_PENDING)
            elif mtype == 68:  # Describe
                pending.append(_DESCRIBE_PENDING)
            elif mtype == 69:  # Execute
                name = p.name_at(buf, pos + 5, nxt)
                pending.append(_EXECUTE_PENDING if not name else Pending(K_EXECUTE, name=name))
            pos = nxt

    def _server_fast(self, buf: bytes | bytearray) -> int:
        """Relay bookkeeping for the messages at the front of ``buf`` that answer quick
        expectations (no run to record, nothing injected) or a run's Query or group whose
        result is relayed unchanged (``_server_run``); returns how many bytes were
        handled, which the caller relays as they came. Stops at the first message the
        general path must see (``_server_step``)."""
        pending = self.pending
        pos = 0
        while pending:
            head = pending[0]
            if head.quick >= 0:
                return self._server_quick(buf, pos)
            run = head.run
            if run is None or run.plan is not None or run.finished or head.swallow or \
                    head.injected_error or (head.kind != K_GROUP and head.kind != K_QUERY) \
                    or self.gate.masks:
                return pos
            done = self._server_run(buf, pos, head, run)
            if done == pos or not run.finished or self._server_wait is not None:
                return done
            pos = done
        return pos

    def _server_run(self, buf: bytes | bytearray, pos: int, head: Pending, run: Run) -> int:
        """``_server_fast`` for the reply to a Query or a group (K_GROUP) with a run, which
        nothing rewrites: its rows are counted, sampled and hashed (whole spans of
        DataRows as relayed), its columns, tag and end noted, and the gate told of its
        result. Stops at anything else (an error, a notice, COPY) for the general path,
        with the hash settled up to there."""
        end = len(buf)
        hasher = run.hasher
        seg = pos  # buf[seg:pos]: DataRows relayed and not yet hashed
        group = head.kind == K_GROUP
        while end - pos >= 5:
            mtype, length = _HDR(buf, pos)
            nxt = pos + 1 + length
            if nxt > end:
                break
            if mtype == 68:  # DataRow
                run.rows += 1
                if run.sample is not None:
                    self._sample(run, buf, pos, nxt)
                pos = nxt
                continue
            if mtype == 67:  # CommandComplete
                tag = p.decode_command_tag(bytes(buf[pos + 5:nxt]))
                if tag.split(" ", 1)[0] not in _PLAIN_TAGS:
                    break  # (the gate may want to hear of it: DDL changes the catalog)
                run.tag = tag
                if not group:
                    run.statement_index += 1
            elif mtype == 84:  # RowDescription
                run.fields = _row_description(bytes(buf[pos + 5:nxt]))
            elif mtype == 73:  # EmptyQueryResponse
                if not group:
                    run.statement_index += 1
            elif mtype == 90:  # ReadyForQuery
                if hasher is not None and seg < pos:
                    hasher.update(memoryview(buf)[seg:pos])
                seg = nxt
                pending = self.pending
                pending.popleft()
                status = self.tx_status = _BYTE[buf[pos + 5]]
                if not pending:
                    state = _TX_STATES.get(status, "idle")
                    if state != self.info.state:
                        self._set_state(state)
                run.finished = True
                if self.gate.observes_results:
                    # This queues the result record (it never waits for SQLite); should
                    # it wait after all, the lane finishes it before going on.
                    self._server_wait = self.gate.record_result(self, run)
                return nxt
            elif not (group and mtype in _GROUP_ACKS):
                break
            if hasher is not None and seg < pos:
                hasher.update(memoryview(buf)[seg:pos])
            pos = seg = nxt
        if hasher is not None and seg < pos:
            hasher.update(memoryview(buf)[seg:pos])
        return pos

    def _server_quick(self, buf: bytes | bytearray, pos: int) -> int:
        """``_server_fast`` from ``pos``, where a quick expectation is at the head."""
        pending = self.pending
        head = pending[0]
        quick = head.quick
        end = len(buf)
        first = pos
        reply = self._reply_memo
        if not pos and reply is not None and reply[4] == quick and \
                buf[end - reply[3]:] == reply[2] and buf[:reply[1]] == reply[0]:
            # Shaped as the last reply read whole: the same messages before and after
            # its rows, so only the rows between are framed.
            pos = reply[1]
            stop = end - reply[3]
            while stop - pos >= 5 and buf[pos] == 68:  # DataRow
                pos += 1 + _HDR(buf, pos)[1]
            if pos == stop:
                self._reply_misses = 0
                pending.popleft()
                status = self.tx_status = reply[5]
                if not pending:
                    state = _TX_STATES.get(status, "idle")
                    if state != self.info.state:
                        self._set_state(state)
                return end
        queued = len(pending)
        while end - pos >= 5:
            mtype, length = _HDR(buf, pos)
            nxt = pos + 1 + length
            if nxt > end:
                break
            key = quick | mtype
            if key in _RELAYED:
                pos = nxt
                continue
            if key not in _ANSWERED:
                break
            pending.popleft()
            if mtype == 90:  # ReadyForQuery
                status = self.tx_status = _BYTE[buf[pos + 5]]
                if nxt == end and end <= _REPLY_MEMO_MAX and len(pending) + 1 == queued \
                        and quick in (_GROUP_QUICK, _QUERY_QUICK) and not first:
                    # (the only expectation this read answered: it is one whole reply)
                    misses = self._reply_misses = self._reply_misses + 1
                    if misses <= 2 or not misses & 15:
                        # (replies that keep changing shape are framed twice only now
                        # and then)
                        self._remember_reply(buf, end, quick, status)
                if not pending:
                    state = _TX_STATES.get(status, "idle")
                    if state != self.info.state:
                        self._set_state(state)
            elif quick == _DESCRIBE_QUICK and head.name:
                self._described(head.name, _row_description(bytes(buf[pos + 5:nxt]))
                                if mtype == 84 else [])
            pos = nxt
            if not pending:
                break
            head = pending[0]
            quick = head.quick
            if quick < 0:
                break
        return pos

    def _remember_reply(self, buf: bytes | bytearray, end: int, quick: int, status: bytes
                        ) -> None:
        """Keep what precedes and follows the rows of ``buf``, one whole reply that
        ``_server_fast`` has just relayed, for the next one shaped alike; not if its rows
        are interleaved with other messages."""
        pos = 0
        first = after = -1
        while pos < end:
            mtype, length = _HDR(buf, pos)
            nxt = pos + 1 + length
            if mtype == 68:  # DataRow
                if first < 0:
                    first = pos
                elif after != pos:
                    return
                after = nxt
            pos = nxt
        if first < 0:
            first = after = 0
        self._reply_memo = (bytes(buf[:first]), first, bytes(buf[after:end]), end - after,
                            quick, status)

    def _forward_then_wait(self, buf: bytes | bytearray, pos: int, finish: Any) -> None:
        if pos:
            transport = self._server.transport
            if not transport.is_closing():
                transport.write(bytes(buf[:pos]))
        assert self._client_lane is not None
        self._client_lane.adopt(finish)

    def _described(self, name: str, fields: list[p.Field]) -> None:
        """Remember a Describe's answer: Executes that follow are masked by it."""
        if name.startswith("S"):
            stmt = self.statements.get(name[1:])
            if stmt is not None:
                stmt.fields = fields
        else:
            portal = self.portals.get(name[1:])
            if portal is not None:
                portal.fields = fields

    # -- server -> client -----------------------------------------------------------------

    def _on_server_data(self, data: bytes) -> None:
        if self._stopped:
            return
        lane = self._server_lane
        assert lane is not None
        buf = self._sbuf
        if not lane.busy:
            if buf:
                buf += data
                data = buf  # type: ignore[assignment]
            done = self._server_fast(data)
            waiting = self._server_wait
            if waiting is not None:
                self._server_wait = None
                self.info.stats.bytes_out += done
                _write_head(self._client.transport, data, buf, done)
                _keep_tail(data, buf, done)
                lane.adopt(self._after_wait(waiting))
                return
            if done == len(data):  # the whole read (or backlog), as it came
                self.info.stats.bytes_out += done
                if data is buf:
                    _write_head(self._client.transport, data, buf, done)
                    _keep_tail(data, buf, done)
                    return
                transport = self._client.transport
                if not transport.is_closing():
                    transport.write(data)
                return
            end = len(data)
            if end - done < 5 or done + 1 + _HDR(data, done)[1] > end:
                # Only part of a message follows: it waits for the rest of it here.
                if done:
                    self.info.stats.bytes_out += done
                    _write_head(self._client.transport, data, buf, done)
                _keep_tail(data, buf, done)
                return
            # The step relays the head the fast path took along with what follows it, so
            # a reply split between the two paths still reaches the client in one write
            # (two would wake the client twice per statement).
            _keep_tail(data, buf, 0)
            self._server_head = done
        else:
            buf += data
            if len(buf) > _SERVER_BACKLOG:
                self._server.pause(_BACKLOG)
        lane.kick()

    async def _after_wait(self, waiting: Any) -> None:
        await waiting
        await self._server_step()

    def _on_server_end(self) -> None:
        if not self._stopped:
            assert self._server_lane is not None
            self._server_lane.kick()

    async def _server_step(self) -> None:
        """Relay every whole message buffered from the server, in order."""
        if self._stopped:
            return
        buf = self._sbuf
        pending = self.pending
        end = len(buf)
        pos = self._server_head  # relayed by the fast path already, to be written with the rest
        self._server_head = 0
        out: list[bytes] = []
        flushed = 0  # buf[flushed:pos] is relayed unchanged when the chunk ends
        run: Run | None = None
        head = pending[0] if pending else None
        if head is not None:
            run = head.run
        seg = pos  # rows in buf[seg:pos] are relayed unchanged and not yet hashed
        frozen: bytes | None = None  # buf[:end] as bytes, made once if rows are masked
        while end - pos >= 5:
            mtype, length = _HDR(buf, pos)
            nxt = pos + 1 + length
            if nxt > end:
                break
            if run is not None and run.plan is None and (mtype == 68 or mtype == 100):
                # DataRow / CopyData needing no rewrite: relayed as bytes (fast path).
                if mtype == 68:
                    run.rows += 1
                    if run.sample is not None:
                        self._sample(run, buf, pos, nxt)
                pos = nxt
                continue
            if (mtype == 68 or mtype == 100) and run is not None and head is not None and (
                    head.kind == K_EXECUTE or head.kind == K_QUERY):
                # DataRows / COPY TO STDOUT data to mask: every whole message buffered goes
                # to the plan in one call (which hashes what it returns).
                if run.hasher is not None and seg < pos:
                    run.hasher.update(memoryview(buf)[seg:pos])
                if frozen is None:
                    frozen = bytes(buf[:end])
                rewrite = self.gate.rewrite_rows if mtype == 68 else self.gate.rewrite_copy_rows
                masked, stop = rewrite(self, run, frozen, pos)
                out.append(bytes(buf[flushed:pos]))
                out.append(masked)
                pos = seg = flushed = stop
                continue
            if mtype == 67 and run is not None and head is not None and head.kind == K_EXECUTE \
                    and head.plain and not self._inspects:
                # CommandComplete of an Execute nobody records or masks.
                run.tag = None
                run.finished = True
                pending.popleft()
                pos = seg = nxt
                head = pending[0] if pending else None
                run = head.run if head is not None else None
                continue
            if run is None and (mtype == 68 or mtype == 100) and head is not None and (
                    head.kind == K_QUERY or head.kind == K_EXECUTE or head.kind == K_GROUP
                    ) and not head.swallow:
                # Rows and COPY data of a statement nobody records or masks: relayed as
                # bytes, not one coroutine per message (a 1M-row COPY is 1M messages).
                pos = seg = nxt
                continue
            if head is not None and head.run is None and head.plain:
                # Replies that only move the expectation queue on, handled inline.
                kind = head.kind
                if (mtype == 49 and kind == K_PARSE) or (mtype == 50 and kind == K_BIND) \
                        or (mtype == 51 and kind == K_CLOSE) or (
                        mtype == 67 and kind == K_EXECUTE):
                    pending.popleft()
                    pos = seg = nxt
                    head = pending[0] if pending else None
                    run = head.run if head is not None else None
                    continue
                if kind == K_GROUP and mtype != 90 and mtype in _GROUP_REPLIES:
                    pos = seg = nxt
                    continue
                if mtype == 90 and kind in (K_SYNC, K_GROUP):  # ReadyForQuery
                    self.tx_status = bytes(buf[pos + 5:pos + 6])
                    pending.popleft()
                    if not pending:
                        self._set_state(_TX_STATES.get(self.tx_status, "idle"))
                    pos = seg = nxt
                    head = pending[0] if pending else None
                    run = head.run if head is not None else None
                    continue
            # Any other message: settle the hash of the rows relayed unchanged so far.
            if run is not None and run.hasher is not None and seg < pos:
                run.hasher.update(memoryview(buf)[seg:pos])
            replacement = await self._on_server_message(mtype, buf, pos, nxt)
            if self._stopped:
                return
            if replacement is not None:
                out.append(bytes(buf[flushed:pos]))
                out.append(replacement)
                flushed = nxt
            pos = seg = nxt
            head = pending[0] if pending else None
            run = head.run if head is not None else None
            if run is not None and run.finished:
                run = None
        if run is not None and run.hasher is not None and seg < pos:
            run.hasher.update(memoryview(buf)[seg:pos])
        if flushed < pos:
            out.append(bytes(buf[flushed:pos]))
        del buf[:pos]
        if out:
            data_out = b"".join(out)
            self.info.stats.bytes_out += len(data_out)
            self._client.write(data_out)
        if self._server.ended:
            self.end_reason = f"target '{self.target.name}' closed the connection"
            self._fatal("08006", f"hoopops: the target '{self.target.name}' closed the "
                        "connection")
            raise ClientGone
        if self._server.paused & _BACKLOG:
            self._server.resume(_BACKLOG)
    def _sample(self, run: Run, buf: bytearray, pos: int, nxt: int) -> None:
        if run.sample_fits(nxt - pos, self.gate.sample_limits):
            run.keep_sample(bytes(buf[pos + 5:nxt]), nxt - pos)

    async def _on_server_message(self, mtype: int, buf: bytearray, pos: int, nxt: int
                                 ) -> bytes | None:
        """Attribute one backend message; return replacement bytes (b"" drops it)."""
        pending = self.pending
        head = pending[0] if pending else None
        if mtype in (p.NOTICE_RESPONSE, p.NOTIFICATION_RESPONSE, p.PARAMETER_STATUS):
            return await self.gate.on_async_message(self, mtype, bytes(buf[pos + 5:nxt]))
        if head is None:
            if mtype == p.ERROR_RESPONSE:
                return None  # a FATAL from the server (shutdown, terminate): pass it on
            raise p.ProtocolError(f"server sent {chr(mtype)!r} with nothing outstanding")
        if head.kind == K_SKIPPING and mtype == p.READY_FOR_QUERY:
            pending.popleft()
            await self._skip_to_sync(self._skipped_by)
            if not pending:
                raise p.ProtocolError("server sent 'Z' with nothing outstanding")
            head = pending[0]
        kind = head.kind
        if mtype == p.READY_FOR_QUERY:
            self.tx_status = bytes(buf[pos + 5:pos + 6])
            pending.popleft()
            self._set_state(_TX_STATES.get(self.tx_status, "idle") if not pending
                            else "active")
            if head.run is not None and not head.run.finished:
                await self._finish(head.run)
            return None
        if mtype == p.ERROR_RESPONSE:
            payload = bytes(buf[pos + 5:nxt])
            fields = p.parse_error_fields(payload)
            run = head.run
            if run is not None and not run.finished:
                run.sqlstate = fields.get("C")
                run.error = fields.get("M")
            replacement: bytes | None = None
            # A request the gateway injected is answered to the client only by its error
            # (swallowed otherwise): after it the server skips to Sync, so this error is
            # the only answer the client's pipeline gets, and hiding it would pass off a
            # refused or failed request as a success.
            if head.injected_error or (head.swallow and head.kind != K_DESCRIBE):
                kept = {k: v for k, v in fields.items() if k not in _INJECTION_NOISE}
                replacement = p.frame(p.ERROR_RESPONSE, p.error_fields(kept))
            else:
                replacement = await self.gate.on_error(self, fields, payload)
                if replacement:  # masked: only the masked text may reach the audit trail
                    fields = p.parse_error_fields(replacement[5:])
                    if run is not None and not run.finished:
                        run.error = fields.get("M")
            if kind == K_PARSE and self.gate.audits and not head.swallow:
                await self._record_failed_parse(head, fields)
            if self.gate.masks and kind in (K_PARSE, K_BIND):
                # The server kept what the name held before (a duplicate name), or nothing:
                # masking by the text the gateway saw could leak, so the name is forgotten
                # and a Bind (Execute) of it refused. (With masking on, requests are queued
                # one by one, each with its name; skipped ones: _skip_to_sync.)
                (self.statements if kind == K_PARSE else self.portals).pop(head.name, None)
            if kind in _EXTENDED:
                if run is not None and not run.finished:
                    await self._finish(run)
                # The server discards everything up to Sync after an error.
                await self._skip_to_sync(fields)
                if not pending:
                    # The Sync is still to come from the client: skip to it when it does.
                    self._skipped_by = fields
                    pending.append(_SKIPPING_PENDING)
            elif fields.get("S") in ("FATAL", "PANIC"):
                return replacement
            return replacement
        if kind == K_QUERY:
            return await self._on_simple_reply(head, mtype, buf, pos, nxt)
        if kind == K_GROUP:
            await self._on_group_reply(head, mtype, buf, pos, nxt)
            return None
        replacement = b"" if head.swallow else None
        if mtype == p.PARSE_COMPLETE or mtype == p.BIND_COMPLETE or mtype == p.CLOSE_COMPLETE:
            pending.popleft()
            return replacement
        if mtype == p.PARAMETER_DESCRIPTION:
            return replacement
        if mtype == p.ROW_DESCRIPTION or mtype == p.NO_DATA:
            fields_ = _row_description(bytes(buf[pos + 5:nxt])) if (
                mtype == p.ROW_DESCRIPTION) else []
            name = head.name
            if name.startswith("S") and name[1:] in self.statements:
                self.statements[name[1:]].fields = fields_
            elif name.startswith("P") and name[1:] in self.portals:
                portal = self.portals[name[1:]]
                portal.fields = fields_
            pending.popleft()
            if head.run is not None:
                head.run.fields = fields_
                await self.gate.on_row_description(self, head.run)
            return replacement
        if kind == K_EXECUTE:
            run = head.run
            if mtype == p.DATA_ROW:
                if run is not None:
                    run.rows += 1
                    return await self.gate.rewrite_row(self, run, bytes(buf[pos:nxt]))
                return replacement
            if mtype in (p.COMMAND_COMPLETE, p.EMPTY_QUERY_RESPONSE, p.PORTAL_SUSPENDED):
                pending.popleft()
                if run is not None:
                    if mtype == p.COMMAND_COMPLETE:
                        run.tag = p.decode_command_tag(bytes(buf[pos + 5:nxt]))
                    elif mtype == p.PORTAL_SUSPENDED:
                        portal = self.portals.get(head.name)
                        # (unless the client has bound that name anew meanwhile)
                        if portal is not None and portal.params is run.params \
                                and portal.statement.sql == run.sql:
                            portal.suspended = run
                    await self.gate.on_statement_complete(self, run)
                    await self._finish(run)
                return replacement
            if mtype == p.COPY_OUT_RESPONSE and run is not None:
                await self.gate.on_copy_out(self, run, bytes(buf[pos + 5:nxt]))
                return replacement
            if mtype in (p.COPY_OUT_RESPONSE, p.COPY_IN_RESPONSE, p.COPY_DONE):
                if mtype == p.COPY_IN_RESPONSE:
                    # (a copy: the expectation may be one of the shared ones)
                    pending[0] = Pending(K_EXECUTE, head.run, head.name, head.swallow,
                                         head.injected_error, copy_in=True)
                return replacement
            if mtype == p.COPY_DATA:
                if run is not None:
                    return await self.gate.rewrite_copy(self, run, bytes(buf[pos:nxt]))
                return replacement
        raise p.ProtocolError(f"server sent {chr(mtype)!r} where the gateway expected a "
                              f"reply to request kind {kind}")

    async def _skip_to_sync(self, error: dict[str, str]) -> None:
        """Drop the expectations the server skips after ``error`` (an extended-protocol
        request failed): all up to the next Sync, or the group that ends with it."""
        pending = self.pending
        while pending and pending[0].kind not in _SYNC_KINDS:
            dropped = pending.popleft()
            if dropped.kind == K_PARSE and self.gate.masks:
                self.statements.pop(dropped.name, None)  # (skipped: see the error branch)
            elif dropped.kind == K_BIND and self.gate.masks:
                self.portals.pop(dropped.name, None)
            if dropped.run is not None and not dropped.run.finished:
                # It never ran (an error at Bind, say, or earlier in the pipeline):
                # the trail must not record it as a success.
                if dropped.run.sqlstate is None:
                    dropped.run.sqlstate = error.get("C")
                    dropped.run.error = error.get("M")
                await self._finish(dropped.run)
        run = pending[0].run if pending and pending[0].kind == K_GROUP else None
        if run is not None and run.sqlstate is None and not run.finished:
            run.sqlstate, run.error = error.get("C"), error.get("M")  # (finished at its Z)

    async def _on_group_reply(self, head: Pending, mtype: int, buf: bytearray, pos: int,
                              nxt: int) -> None:
        """A reply inside a group (K_GROUP) that the fast paths did not take; an error
        needs nothing here: the server skips to the group's Sync, and so does its
        expectation (which finishes its run, if it has one)."""
        run = head.run
        if mtype == p.COPY_IN_RESPONSE:
            # The group's one Execute (its last request: see _client_fast) started COPY FROM
            # STDIN: from here on its Sync is the one the server ignores in copy mode.
            pending = self.pending
            pending.popleft()
            pending.appendleft(_SYNC_PENDING)
            pending.appendleft(Pending(K_EXECUTE, run, copy_in=True))
            return
        if run is not None and not run.finished:
            # (its rows are counted and hashed by _server_step)
            if mtype == p.ROW_DESCRIPTION:
                run.fields = _row_description(bytes(buf[pos + 5:nxt]))
            elif mtype == p.COMMAND_COMPLETE:
                run.tag = p.decode_command_tag(bytes(buf[pos + 5:nxt]))
                await self.gate.on_statement_complete(self, run)
            elif mtype == p.COPY_OUT_RESPONSE:
                await self.gate.on_copy_out(self, run, bytes(buf[pos + 5:nxt]))
        if mtype in _GROUP_REPLIES or mtype in (p.COPY_OUT_RESPONSE, p.COPY_DATA, p.COPY_DONE):
            return
        raise p.ProtocolError(f"server sent {chr(mtype)!r} where the gateway expected a "
                              "reply to an extended-query pipeline")

    async def _on_simple_reply(self, head: Pending, mtype: int, buf: bytearray, pos: int,
                               nxt: int) -> bytes | None:
        if mtype == p.COPY_BOTH_RESPONSE:
            raise p.ProtocolError("replication (CopyBoth) is not relayed by the gateway")
        run = head.run
        if run is None:
            return None
        if mtype == p.ROW_DESCRIPTION:
            run.fields = _row_description(bytes(buf[pos + 5:nxt]))
            await self.gate.on_row_description(self, run)
            return None
        if mtype == p.DATA_ROW:
            run.rows += 1
            return await self.gate.rewrite_row(self, run, bytes(buf[pos:nxt]))
        if mtype == p.COPY_DATA:
            return await self.gate.rewrite_copy(self, run, bytes(buf[pos:nxt]))
        if mtype == p.COPY_OUT_RESPONSE:
            await self.gate.on_copy_out(self, run, bytes(buf[pos + 5:nxt]))
            return None
        if mtype == p.COMMAND_COMPLETE or mtype == p.EMPTY_QUERY_RESPONSE:
            if mtype == p.COMMAND_COMPLETE:
                run.tag = p.decode_command_tag(bytes(buf[pos + 5:nxt]))
            await self.gate.on_statement_complete(self, run)
            run.statement_index += 1
            run.plan = None
            return None
        return None

    async def _finish(self, run: Run) -> None:
        run.finished = True
        if self.gate.observes_results:
            await self.gate.after_result(self, run)


async def _ready(value: Any) -> Any:
    return value


def _outcome(outcome: Any) -> Any:
    """What ``StatementGate.record_forward`` answered, as something to await."""
    return _ready(outcome) if isinstance(outcome, Verdict) else outcome


# How long a closed session's socket may take to hand over what is still buffered for it.
CLOSE_GRACE = 2.0


def _cut_if_stuck(transport: asyncio.BaseTransport) -> None:
    """A transport closed with output still buffered stays open until its peer reads it:
    a client that stops reading would keep the socket (and the buffer) as long as it
    likes, after its session ended and so outside limits.max_connections. It gets a
    moment to read, then the socket is cut."""
    with contextlib.suppress(Exception):
        if transport.get_write_buffer_size():  # type: ignore[attr-defined]
            asyncio.get_running_loop().call_later(CLOSE_GRACE, _abort, transport)


def _abort(transport: asyncio.BaseTransport) -> None:
    with contextlib.suppress(Exception):
        transport.abort()  # type: ignore[attr-defined]


def _write_head(transport: asyncio.Transport, data: bytes | bytearray, buf: bytearray,
                done: int) -> None:
    """Send the first ``done`` bytes of a read (``data`` is the read, or ``buf`` holding it
    behind earlier bytes); the read itself when it is all of it, so no copy is made."""
    if not transport.is_closing():
        transport.write(bytes(data[:done]) if done < len(data) or data is buf else data)


def _keep_tail(data: bytes | bytearray, buf: bytearray, done: int) -> None:
    """Keep what follows the first ``done`` bytes in ``buf`` for the next step."""
    if data is buf:
        del buf[:done]
    elif done < len(data):
        buf += memoryview(data)[done:]


def new_session_id() -> str:
    return uuid.uuid4().hex


_ROW_DESCRIPTIONS: dict[bytes, list[p.Field]] = {}
# Only descriptions up to this size are kept: the cache is shared by every session, and a
# result of 1,600 columns with long names decodes to ~0.4 MB that one agent could have it
# keep 4,096 times over (results of ordinary width are far below this).
_ROW_DESCRIPTION_CACHE_MAX = 2048


def _row_description(payload: bytes) -> list[p.Field]:
    """Decoded RowDescription, cached by its bytes: clients describe the same statements
    over and over, and the decoded fields are never modified."""
    fields = _ROW_DESCRIPTIONS.get(payload)
    if fields is None:
        fields = p.decode_row_description(payload)
        if len(payload) <= _ROW_DESCRIPTION_CACHE_MAX:
            if len(_ROW_DESCRIPTIONS) >= 4096:
                _ROW_DESCRIPTIONS.clear()
            _ROW_DESCRIPTIONS[payload] = fields
    return fields

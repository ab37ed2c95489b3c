"""The SQLite schema: the chain, its head, and the query tables derived from it.

``chain`` is the evidence: one row per record, append-only, hash-linked. The other tables
(``sessions``, ``statements``, ``approvals``, ``masking_actions``, ``gateway_events``) are
projections that exist so the console's questions are answered by an index instead of a
scan. The triggers below define them, from the chain row being inserted, so:

- ``verify`` can rebuild them from the chain into a scratch database with the very same
  triggers and compare row for row, so editing a projection is caught like editing the
  chain;
- rare records (sessions, approvals, masking, events) need no projection code anywhere
  else, whichever process writes them.

Since version 2 the live ``chain`` carries only the guard triggers, because every
trigger on it ran for every record (about 5 µs each, WHEN clause or not), and the
statement triggers ran ``json_extract`` once per column, re-parsing the whole payload
each time. The records of statements (``statement``, or ``statement.received`` and
``statement.finished``) have their rows filled by the writer itself, in the same
transaction, from the values it serialised (``STATEMENT_COMPLETE`` / ``STATEMENT_INSERT``
/ ``STATEMENT_FINISH``); the rare ones are also inserted into the writer connection's
in-memory ``INBOX`` table, which carries TEMP copies of their projection triggers
(``inbox_statements``), and records recovered from a journal go through ``REPLAY``, which
carries them all. Verify still rebuilds every projection with the triggers on a scratch
``chain``, so a writer that disagrees with the definition is caught like an edit.

Migrations: ``MIGRATIONS[n]`` upgrades a store from version n-1 to n and is applied inside
one transaction that also sets ``PRAGMA user_version``. ``schema_statements`` is the
version-1 layout and, with its triggers, the definition of every projection: ``verify``
rebuilds the projections with it whatever the live layout became.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from hoopops.audit.chain import GENESIS

SCHEMA_VERSION = 3

CHAIN_COLUMNS = ("seq", "kind", "at", "session_id", "payload", "prev_hash", "hash")

# Closing an approval, whoever does it, is one of these record kinds.
APPROVAL_CLOSE_KINDS = ("approval.decided", "approval.withdrawn", "approval.expired")


def _x(path: str) -> str:
    return f"json_extract(NEW.payload, '$.{path}')"


def schema_statements(s: str, *, guards: bool = True) -> list[str]:
    """DDL for the newest schema in database ``s`` (``main``, or ``rebuilt`` for verify).

    ``guards`` adds the triggers that refuse edits and out-of-order appends; the scratch
    copy verify builds does without them because it starts mid-chain after a prune.
    """
    close_kinds = ", ".join(f"'{k}'" for k in APPROVAL_CLOSE_KINDS)
    statements = [
        f"""CREATE TABLE {s}.chain (
            seq INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            at TEXT NOT NULL,
            session_id TEXT,
            payload TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL)""",
        # Prune asks "does this session have records after k?"; show asks "all of one".
        f"CREATE INDEX {s}.chain_session ON chain(session_id, seq)",
        f"CREATE INDEX {s}.chain_anchor ON chain(seq) WHERE kind = 'audit.pruned'",
        f"""CREATE TABLE {s}.chain_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL,
            hash TEXT NOT NULL,
            pruning INTEGER NOT NULL DEFAULT 0)""",
        f"INSERT INTO {s}.chain_head (id, seq, hash, pruning) VALUES (1, 0, '{GENESIS}', 0)",
        # The head follows every append, so a cut-off tail no longer matches it.
        f"""CREATE TRIGGER {s}.chain_head_follows AFTER INSERT ON chain BEGIN
            UPDATE chain_head SET seq = NEW.seq, hash = NEW.hash WHERE id = 1;
        END""",
        f"""CREATE TABLE {s}.sessions (
            id TEXT PRIMARY KEY,
            started_seq INTEGER NOT NULL,
            subject TEXT NOT NULL,
            groups TEXT NOT NULL,
            issuer TEXT,
            token_id TEXT,
            claimed_user TEXT,
            client_addr TEXT,
            client_port INTEGER,
            application_name TEXT,
            target TEXT NOT NULL,
            tls INTEGER NOT NULL,
            started_at TEXT NOT NULL,
            ended_seq INTEGER,
            ended_at TEXT,
            end_reason TEXT,
            bytes_in INTEGER,
            bytes_out INTEGER,
            statements INTEGER)""",
        f"CREATE INDEX {s}.sessions_started ON sessions(started_at)",
        f"CREATE INDEX {s}.sessions_subject ON sessions(subject, started_at)",
        f"CREATE INDEX {s}.sessions_target ON sessions(target, started_at)",
        f"CREATE INDEX {s}.sessions_open ON sessions(started_at) WHERE ended_seq IS NULL",
        f"""CREATE TRIGGER {s}.project_session_started AFTER INSERT ON chain
        WHEN NEW.kind = 'session.started' BEGIN
            INSERT INTO sessions (id, started_seq, subject, groups, issuer, token_id,
                claimed_user, client_addr, client_port, application_name, target, tls,
                started_at)
            VALUES (NEW.session_id, NEW.seq, {_x('subject')}, {_x('groups')}, {_x('issuer')},
                {_x('token_id')}, {_x('claimed_user')}, {_x('client_addr')},
                {_x('client_port')}, {_x('application_name')}, {_x('target')}, {_x('tls')},
                {_x('started_at')});
        END""",
        f"""CREATE TRIGGER {s}.project_session_ended AFTER INSERT ON chain
        WHEN NEW.kind = 'session.ended' BEGIN
            UPDATE sessions SET ended_seq = NEW.seq, ended_at = {_x('ended_at')},
                end_reason = {_x('reason')}, bytes_in = {_x('bytes_in')},
                bytes_out = {_x('bytes_out')}, statements = {_x('statements')}
            WHERE id = NEW.session_id;
        END""",
        f"""CREATE TABLE {s}.statements (
            id INTEGER PRIMARY KEY,
            session_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            received_at TEXT NOT NULL,
            sql TEXT NOT NULL,
            params TEXT,
            facts TEXT NOT NULL,
            decision TEXT NOT NULL,
            rule_id TEXT,
            approval_id INTEGER,
            finished_seq INTEGER,
            started_at TEXT,
            finished_at TEXT,
            duration_us INTEGER,
            rows INTEGER,
            command_tag TEXT,
            sqlstate TEXT,
            error_message TEXT,
            result_sha256 TEXT,
            result_sample TEXT,
            received_seq INTEGER)""",
        f"CREATE INDEX {s}.statements_session ON statements(session_id, seq)",
        f"CREATE INDEX {s}.statements_received ON statements(received_at)",
        f"CREATE INDEX {s}.statements_decision ON statements(decision, session_id)",
        f"""CREATE TRIGGER {s}.project_statement_received AFTER INSERT ON chain
        WHEN NEW.kind = 'statement.received' BEGIN
            INSERT INTO statements (id, session_id, seq, received_at, sql, params, facts,
                decision, rule_id, approval_id, received_seq)
            VALUES (coalesce({_x('id')}, NEW.seq), NEW.session_id, {_x('seq')},
                {_x('received_at')}, {_x('sql')}, {_x('params')}, {_x('facts')},
                {_x('decision')}, {_x('rule_id')}, {_x('approval_id')}, NEW.seq);
        END""",
        f"""CREATE TRIGGER {s}.project_statement_finished AFTER INSERT ON chain
        WHEN NEW.kind = 'statement.finished' BEGIN
            UPDATE statements SET finished_seq = NEW.seq, started_at = {_x('started_at')},
                finished_at = {_x('finished_at')}, duration_us = {_x('duration_us')},
                rows = {_x('rows')}, command_tag = {_x('command_tag')},
                sqlstate = {_x('sqlstate')}, error_message = {_x('error_message')},
                result_sha256 = {_x('result_sha256')},
                result_sample = {_x('result_sample')}
            WHERE id = {_x('statement_id')};
        END""",
        # A statement whose result was known by the time its record was chained: one
        # record, ``result`` holding what its statement.finished record would.
        f"""CREATE TRIGGER {s}.project_statement AFTER INSERT ON chain
        WHEN NEW.kind = 'statement' BEGIN
            INSERT INTO statements (id, session_id, seq, received_at, sql, params, facts,
                decision, rule_id, approval_id, received_seq, finished_seq, started_at,
                finished_at, duration_us, rows, command_tag, sqlstate, error_message,
                result_sha256, result_sample)
            VALUES (coalesce({_x('id')}, NEW.seq), NEW.session_id, {_x('seq')},
                {_x('received_at')}, {_x('sql')}, {_x('params')}, {_x('facts')},
                {_x('decision')}, {_x('rule_id')}, {_x('approval_id')}, NEW.seq, NEW.seq,
                {_x('result.started_at')}, {_x('result.finished_at')},
                {_x('result.duration_us')}, {_x('result.rows')}, {_x('result.command_tag')},
                {_x('result.sqlstate')}, {_x('result.error_message')},
                {_x('result.result_sha256')}, {_x('result.result_sample')});
        END""",
        f"""CREATE TABLE {s}.approvals (
            id INTEGER PRIMARY KEY,
            session_id TEXT NOT NULL,
            statement_id INTEGER,
            subject TEXT NOT NULL,
            groups TEXT NOT NULL,
            issuer TEXT,
            token_id TEXT,
            sql TEXT NOT NULL,
            params TEXT,
            fingerprint TEXT NOT NULL,
            rule_id TEXT,
            reason TEXT,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            binding_sha256 TEXT NOT NULL,
            status TEXT NOT NULL,
            scope TEXT,
            decided_seq INTEGER,
            decided_by TEXT,
            decided_at TEXT,
            comment TEXT)""",
        f"CREATE INDEX {s}.approvals_pending ON approvals(id) WHERE status = 'pending'",
        f"CREATE INDEX {s}.approvals_session ON approvals(session_id)",
        f"""CREATE TRIGGER {s}.project_approval_requested AFTER INSERT ON chain
        WHEN NEW.kind = 'approval.requested' BEGIN
            INSERT INTO approvals (id, session_id, statement_id, subject, groups, issuer,
                token_id, sql, params, fingerprint, rule_id, reason, created_at, expires_at,
                binding_sha256, status)
            VALUES (NEW.seq, NEW.session_id, {_x('statement_id')}, {_x('subject')},
                {_x('groups')}, {_x('issuer')}, {_x('token_id')}, {_x('sql')},
                {_x('params')}, {_x('fingerprint')}, {_x('rule_id')}, {_x('reason')},
                {_x('created_at')}, {_x('expires_at')}, {_x('binding_sha256')}, 'pending');
            UPDATE statements SET approval_id = NEW.seq
            WHERE id = {_x('statement_id')} AND approval_id IS NULL;
        END""",
        f"""CREATE TRIGGER {s}.project_approval_closed AFTER INSERT ON chain
        WHEN NEW.kind IN ({close_kinds}) BEGIN
            UPDATE approvals SET status = {_x('status')}, scope = {_x('scope')},
                decided_seq = NEW.seq, decided_by = {_x('decided_by')},
                decided_at = {_x('decided_at')}, comment = {_x('comment')}
            WHERE id = {_x('approval_id')} AND status = 'pending';
        END""",
        f"""CREATE TABLE {s}.masking_actions (
            seq INTEGER NOT NULL,
            idx INTEGER NOT NULL,
            statement_id INTEGER NOT NULL,
            session_id TEXT NOT NULL,
            at TEXT NOT NULL,
            column_or_detector TEXT NOT NULL,
            strategy TEXT NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (seq, idx)) WITHOUT ROWID""",
        f"CREATE INDEX {s}.masking_statement ON masking_actions(statement_id)",
        f"""CREATE TRIGGER {s}.project_masking AFTER INSERT ON chain
        WHEN NEW.kind = 'masking.applied' BEGIN
            INSERT INTO masking_actions (seq, idx, statement_id, session_id, at,
                column_or_detector, strategy, count)
            SELECT NEW.seq, j.key, {_x('statement_id')}, NEW.session_id, NEW.at,
                json_extract(j.value, '$.column'), json_extract(j.value, '$.strategy'),
                json_extract(j.value, '$.count')
            FROM json_each(NEW.payload, '$.actions') AS j;
        END""",
        f"""CREATE TABLE {s}.gateway_events (
            seq INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            kind TEXT NOT NULL,
            data TEXT NOT NULL)""",
        f"""CREATE TRIGGER {s}.project_gateway_event AFTER INSERT ON chain
        WHEN NEW.session_id IS NULL BEGIN
            INSERT INTO gateway_events (seq, at, kind, data)
            VALUES (NEW.seq, NEW.at, NEW.kind, NEW.payload);
        END""",
    ]
    if guards:
        statements += [
            # Guard rails against accidents (a hand-typed UPDATE), not against an attacker:
            # anyone who can write the file can drop a trigger. The hash chain is what
            # makes tampering evident.
            f"""CREATE TRIGGER {s}.chain_no_update BEFORE UPDATE ON chain BEGIN
                SELECT RAISE(ABORT, 'the audit chain is append-only');
            END""",
            f"""CREATE TRIGGER {s}.chain_no_delete BEFORE DELETE ON chain
            WHEN (SELECT pruning FROM chain_head WHERE id = 1) = 0 BEGIN
                SELECT RAISE(ABORT, 'audit records are removed only by hoopops audit prune');
            END""",
            f"""CREATE TRIGGER {s}.chain_in_order BEFORE INSERT ON chain
            WHEN NEW.seq <> (SELECT seq FROM chain_head WHERE id = 1) + 1
              OR NEW.prev_hash <> (SELECT hash FROM chain_head WHERE id = 1) BEGIN
                SELECT RAISE(ABORT, 'audit record out of order: it must extend the head');
            END""",
        ]
    return statements


GUARD_TRIGGERS = ("chain_no_update", "chain_no_delete", "chain_in_order", "chain_head_follows")

# Statement records are projected by the writer (see the module docstring); these are
# the triggers that define what it must write, used only by verify's rebuild.
WRITER_PROJECTED = ("project_statement_received", "project_statement_finished",
                    "project_statement")

STATEMENT_INSERT = ("INSERT INTO statements (id, session_id, seq, received_at, sql, params, "
                    "facts, decision, rule_id, approval_id, received_seq) VALUES (?, ?, ?, ?, "
                    "?, ?, ?, ?, ?, ?, ?)")
STATEMENT_COMPLETE = ("INSERT INTO statements (id, session_id, seq, received_at, sql, params, "
                      "facts, decision, rule_id, approval_id, received_seq, started_at, "
                      "finished_at, duration_us, rows, command_tag, sqlstate, error_message, "
                      "result_sha256, result_sample, finished_seq) VALUES (?, ?, ?, ?, ?, ?, "
                      "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
STATEMENT_FINISH = ("UPDATE statements SET finished_seq = ?, started_at = ?, finished_at = ?, "
                    "duration_us = ?, rows = ?, command_tag = ?, sqlstate = ?, "
                    "error_message = ?, result_sha256 = ?, result_sample = ? WHERE id = ?")


def _projection_triggers(s: str) -> list[tuple[str, str]]:
    """(name, DDL) of every projection trigger the newest schema defines."""
    found = []
    for statement in schema_statements(s, guards=False):
        match = re.match(rf"\s*CREATE TRIGGER {s}\.(project_\w+) ", statement)
        if match:
            found.append((match.group(1), statement))
    return found


INBOX = "audit_inbox"


def inbox_statements() -> list[str]:
    """The writer connection's TEMP inbox and the projection triggers of the records the
    writer does not project itself, moved from ``chain`` onto it."""
    out = [f"CREATE TEMP TABLE IF NOT EXISTS {INBOX} (seq INTEGER, kind TEXT, at TEXT, "
           "session_id TEXT, payload TEXT)"]
    for name, ddl in _projection_triggers("main"):
        if name not in WRITER_PROJECTED:
            head = f"CREATE TRIGGER main.{name} AFTER INSERT ON chain"
            assert head in ddl, f"unexpected trigger shape: {name}"
            out.append(ddl.replace(head, f"CREATE TEMP TRIGGER IF NOT EXISTS {name} "
                                         f"AFTER INSERT ON {INBOX}", 1))
    return out


REPLAY = "audit_replay"


def replay_statements() -> list[str]:
    """A TEMP table carrying every projection trigger, statements included: records
    recovered from a journal are projected by the definition itself, not by the writer."""
    out = [f"CREATE TEMP TABLE IF NOT EXISTS {REPLAY} (seq INTEGER, kind TEXT, at TEXT, "
           "session_id TEXT, payload TEXT)"]
    for name, ddl in _projection_triggers("main"):
        head = f"CREATE TRIGGER main.{name} AFTER INSERT ON chain"
        assert head in ddl, f"unexpected trigger shape: {name}"
        out.append(ddl.replace(head, f"CREATE TEMP TRIGGER IF NOT EXISTS replay_{name} "
                                     f"AFTER INSERT ON {REPLAY}", 1))
    return out


def _v2(s: str) -> list[str]:
    # An index keyed by session dirties one more page per session in every commit, and
    # 8 sessions commit together. chain_session served prune (which now asks the sessions
    # table where each session starts and ends) and raw-record exports of one session
    # (which start at the session's first record); statements_decision served decision
    # filters, which run inside one session's statements or are exports that scan anyway.
    return [*(f"DROP TRIGGER {s}.{name}" for name, _ in _projection_triggers(s)),
            f"DROP INDEX {s}.statements_decision", f"DROP INDEX {s}.chain_session"]


def _v3(s: str) -> list[str]:
    # Statement ids are handed out by the gateway from reserved blocks, so a statement is
    # named before its record is chained (see journal.py); ``received_seq`` keeps the link
    # to the chain record the row comes from. New ids start past every old one, which were
    # the records' seqs. (A store created at version 3 has the column already; the
    # migration runner skips adding a column that exists.)
    return [f"ALTER TABLE {s}.statements ADD COLUMN received_seq INTEGER",
            f"UPDATE {s}.statements SET received_seq = id WHERE received_seq IS NULL",
            f"""CREATE TABLE {s}.statement_ids (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                next INTEGER NOT NULL)""",
            f"INSERT INTO {s}.statement_ids (id, next) "
            f"SELECT 1, COALESCE(MAX(seq), 0) + 1 FROM {s}.chain",
            # How far each gateway run's journal is in the chain: (file, offset past the
            # last ingested line).
            f"""CREATE TABLE {s}.journal_marks (
                run TEXT PRIMARY KEY,
                file_no INTEGER NOT NULL,
                offset INTEGER NOT NULL)"""]


MIGRATIONS: dict[int, Callable[[str], list[str]]] = {
    1: lambda s: schema_statements(s, guards=True),
    2: _v2,
    3: _v3,
}

_ADD_COLUMN = re.compile(r"ALTER TABLE (\w+)\.(\w+) ADD COLUMN (\w+) ", re.IGNORECASE)


def added_column(statement: str) -> tuple[str, str, str] | None:
    """(schema, table, column) when ``statement`` adds a column, else None."""
    match = _ADD_COLUMN.match(statement)
    return None if match is None else (match.group(1), match.group(2), match.group(3))


@dataclass(frozen=True)
class Projection:
    """How verify names the chain record behind a projection row that does not match."""

    table: str
    key: tuple[str, ...]
    # column -> the column holding the seq of the record that column comes from
    origins: dict[str, str]
    default_origin: str


PROJECTIONS: tuple[Projection, ...] = (
    Projection("sessions", ("id",), {c: "ended_seq" for c in (
        "ended_seq", "ended_at", "end_reason", "bytes_in", "bytes_out", "statements")},
        "started_seq"),
    Projection("statements", ("id",), {
        **{c: "finished_seq" for c in (
            "finished_seq", "started_at", "finished_at", "duration_us", "rows",
            "command_tag", "sqlstate", "error_message", "result_sha256", "result_sample")},
        "approval_id": "approval_id"}, "received_seq"),
    Projection("approvals", ("id",), {c: "decided_seq" for c in (
        "status", "scope", "decided_seq", "decided_by", "decided_at", "comment")}, "id"),
    Projection("masking_actions", ("seq", "idx"), {}, "seq"),
    Projection("gateway_events", ("seq",), {}, "seq"),
)

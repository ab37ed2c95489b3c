"""The export formats an auditor loads: one row per statement, or the raw chain.

Both schemas are stable: fields are only ever added at the end, never renamed, re-typed or
removed, and every row names its schema version (``schema``). ``docs/audit.md`` documents
each field. In JSON Lines, nested values (groups, params, facts, the result sample, the
masking actions) are JSON; in CSV they are the same JSON as text, empty cells are null,
and booleans are ``true``/``false``.

CSV and spreadsheets: a cell starting with ``=``, ``+``, ``-`` or ``@`` (or a tab or
carriage return) is a formula to Excel, LibreOffice and Google Sheets, and agents choose
the SQL, names and error texts that land in cells (``=HYPERLINK(...)``, ``=cmd|...``).
So a text cell starting with one of those characters, or with ``'``, is written with one
``'`` in front, which spreadsheets show as text and do not evaluate. The data stays exact:
to read a text cell back, drop one leading ``'`` if there is one. Numbers, booleans and
JSON cells are never prefixed; JSON Lines is never changed.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Sequence
from typing import Any, TextIO

STATEMENT_SCHEMA = "hoopops.audit.statement/1"
RECORD_SCHEMA = "hoopops.audit.record/1"

STATEMENT_FIELDS: tuple[str, ...] = (
    "schema", "statement_id", "session_id", "statement_seq", "received_at",
    "subject", "groups", "issuer", "token_id", "claimed_user", "client_addr", "client_port",
    "application_name", "target", "tls", "session_started_at",
    "sql", "params", "facts", "decision", "rule_id",
    "approval_id", "approval_status", "approval_scope", "approval_requested_at",
    "approval_decided_by", "approval_decided_at", "approval_comment",
    "started_at", "finished_at", "duration_ms", "rows", "command_tag", "sqlstate",
    "error_message", "result_sha256", "result_sample", "masking",
    "received_record", "received_hash", "finished_record", "finished_hash",
)

RECORD_FIELDS: tuple[str, ...] = (
    "schema", "seq", "kind", "at", "session_id", "payload", "prev_hash", "hash",
)

STATEMENT_EXPORT_SELECT = """
SELECT t.*, s.subject, s.groups, s.issuer, s.token_id, s.claimed_user, s.client_addr,
  s.client_port, s.application_name, s.target, s.tls, s.started_at AS session_started_at,
  a.status AS approval_status, a.scope AS approval_scope,
  a.created_at AS approval_requested_at, a.decided_by AS approval_decided_by,
  a.decided_at AS approval_decided_at, a.comment AS approval_comment,
  rc.hash AS received_hash, fc.hash AS finished_hash,
  (SELECT json_group_array(json_object('column', m.column_or_detector,
                                       'strategy', m.strategy, 'count', m.count))
   FROM masking_actions m WHERE m.statement_id = t.id) AS masking
FROM statements t
JOIN sessions s ON s.id = t.session_id
LEFT JOIN approvals a ON a.id = t.approval_id
LEFT JOIN chain rc ON rc.seq = t.id
LEFT JOIN chain fc ON fc.seq = t.finished_seq"""


def _json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def statement_row(r: sqlite3.Row) -> dict[str, Any]:
    duration = r["duration_us"]
    return {
        "schema": STATEMENT_SCHEMA, "statement_id": r["id"], "session_id": r["session_id"],
        "statement_seq": r["seq"], "received_at": r["received_at"], "subject": r["subject"],
        "groups": _json(r["groups"]), "issuer": r["issuer"], "token_id": r["token_id"],
        "claimed_user": r["claimed_user"], "client_addr": r["client_addr"],
        "client_port": r["client_port"], "application_name": r["application_name"],
        "target": r["target"], "tls": bool(r["tls"]),
        "session_started_at": r["session_started_at"], "sql": r["sql"],
        "params": _json(r["params"]), "facts": _json(r["facts"]), "decision": r["decision"],
        "rule_id": r["rule_id"], "approval_id": r["approval_id"],
        "approval_status": r["approval_status"], "approval_scope": r["approval_scope"],
        "approval_requested_at": r["approval_requested_at"],
        "approval_decided_by": r["approval_decided_by"],
        "approval_decided_at": r["approval_decided_at"],
        "approval_comment": r["approval_comment"], "started_at": r["started_at"],
        "finished_at": r["finished_at"],
        "duration_ms": None if duration is None else duration / 1000.0, "rows": r["rows"],
        "command_tag": r["command_tag"], "sqlstate": r["sqlstate"],
        "error_message": r["error_message"], "result_sha256": r["result_sha256"],
        "result_sample": _json(r["result_sample"]), "masking": _json(r["masking"]) or [],
        "received_record": r["id"], "received_hash": r["received_hash"],
        "finished_record": r["finished_seq"], "finished_hash": r["finished_hash"],
    }


def record_row(r: sqlite3.Row) -> dict[str, Any]:
    return {"schema": RECORD_SCHEMA, "seq": r["seq"], "kind": r["kind"], "at": r["at"],
            "session_id": r["session_id"], "payload": json.loads(r["payload"]),
            "prev_hash": r["prev_hash"], "hash": r["hash"]}


# Leading characters that make a spreadsheet read a cell as a formula (OWASP's list), and
# the quote itself, so that one leading quote can always be dropped to get the value back.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value  # see the module docstring
    return str(value)


class RowWriter:
    """Buffers formatted rows so the caller can flush them to a file off the event loop."""

    def __init__(self, out: TextIO, format: str, fields: Sequence[str]) -> None:
        self.out = out
        self.format = format
        self.fields = tuple(fields)
        self._buffer = io.StringIO()
        self._csv = csv.writer(self._buffer, lineterminator="\n")
        self.pending = 0
        if format == "csv":
            self._csv.writerow(self.fields)

    def add(self, row: dict[str, Any]) -> None:
        if self.format == "csv":
            self._csv.writerow([_cell(row[f]) for f in self.fields])
        else:
            # ASCII with \u escapes: the same values, and a line printed to a terminal
            # cannot carry the agent's control or bidi characters to it raw.
            self._buffer.write(json.dumps({f: row[f] for f in self.fields},
                                          ensure_ascii=True, separators=(",", ":")))
            self._buffer.write("\n")
        self.pending += 1

    def flush(self) -> None:
        text = self._buffer.getvalue()
        if text:
            self.out.write(text)
            self.out.flush()
        self._buffer.seek(0)
        self._buffer.truncate()
        self.pending = 0

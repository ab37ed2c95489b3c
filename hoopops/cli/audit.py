"""``hoopops audit``: list and show sessions, export, verify and prune the audit trail."""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hoopops.audit import (
    AuditError,
    Filters,
    SessionView,
    SQLiteAuditStore,
    StatementView,
)
from hoopops.audit.records import iso
from hoopops.cli.common import add_config_argument, fail, load_config_or_exit, print_json
from hoopops.config import Config, parse_duration
from hoopops.display import folded, terminal


def when(text: str) -> float:
    """``--since``/``--until``: an ISO date or time (UTC unless it says otherwise), or a
    duration meaning that long ago (``90m``, ``2h``, ``7d``)."""
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a time (2026-05-01, 2026-05-01T09:30) nor a duration "
            "ago (2h, 7d)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=when, metavar="WHEN",
                        help="from this time (ISO, UTC by default) or this long ago (2h, 7d)")
    parser.add_argument("--until", type=when, metavar="WHEN", help="up to this time")
    parser.add_argument("--identity", metavar="SUBJECT", help="only this token subject")
    parser.add_argument("--target", metavar="NAME", help="only this target")
    parser.add_argument("--decision", choices=("allow", "block", "review"),
                        help="only sessions/statements with this policy decision")
    parser.add_argument("--text", metavar="TEXT", help="only where the SQL contains TEXT")


def filters_of(args: argparse.Namespace) -> Filters:
    return Filters(since=args.since, until=args.until, identity=args.identity,
                   target=args.target, decision=args.decision, text=args.text,
                   session_id=getattr(args, "session", None))


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "audit", help="list, show, export, verify and prune the audit trail",
        description="Read the tamper-evident audit trail the gateway writes (audit.path in "
        "hoopops.yaml). See docs/audit.md for the record and export schemas.")
    parser.set_defaults(func=lambda args: _usage(parser))
    sub = parser.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")

    p = sub.add_parser("sessions", help="recent sessions, newest first")
    add_config_argument(p)
    add_filters(p)
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run(_sessions))

    p = sub.add_parser("show", help="one session, statement by statement")
    add_config_argument(p)
    p.add_argument("session", metavar="SESSION", help="the session id (from audit sessions)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run(_show))

    p = sub.add_parser("export", help="export statements (or raw records) as JSON Lines or CSV")
    add_config_argument(p)
    add_filters(p)
    p.add_argument("--session", metavar="SESSION", help="only this session")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                   help="jsonl (default) or csv; in CSV a text cell starting with = + - @ "
                   "or ' gets one leading ' so spreadsheets never run it as a formula")
    p.add_argument("--records", action="store_true",
                   help="export the raw hash-chained records instead of one row per statement")
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=_run(_export))

    p = sub.add_parser("verify", help="check the hash chain; exit 1 naming the first "
                       "changed, deleted or re-ordered record")
    add_config_argument(p)
    p.add_argument("--expect", action="append", default=[], metavar="SEQ:HASH",
                   help="a head printed by an earlier verify and kept elsewhere; fails if "
                   "the chain no longer contains it (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run(_verify))

    p = sub.add_parser("prune", help="remove sessions older than a retention period, "
                       "keeping the rest verifiable")
    add_config_argument(p)
    p.add_argument("--older-than", required=True, metavar="DURATION",
                   help="retention, e.g. 400d")
    p.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run(_prune))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


Handler = Callable[[SQLiteAuditStore, argparse.Namespace], Awaitable[int]]


def _run(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        config = load_config_or_exit(args.config)
        return asyncio.run(_with_store(config, args, handler))
    return run


async def _with_store(config: Config, args: argparse.Namespace, handler: Handler) -> int:
    """Opens the SQLite store at audit.path even when the gateway's audit is disabled:
    reading, verifying and pruning an existing trail stays possible."""
    try:
        store = await SQLiteAuditStore.open(config.audit.path, create=False,
                                            result_rows=config.audit.result_rows,
                                            result_bytes=config.audit.result_bytes)
    except AuditError as exc:
        return fail(str(exc))
    try:
        return await handler(store, args)
    except AuditError as exc:
        return fail(str(exc))
    except sqlite3.DatabaseError as exc:
        return fail(f"the audit store {store.path} is damaged (SQLite: {exc}); run hoopops "
                    "audit verify, and restore the file from a backup")
    finally:
        await store.close()


def _short(text: str | None, width: int) -> str:
    return folded(text, width)


def _stamp(epoch: float | None) -> str:
    return "-" if epoch is None else iso(epoch)[:19].replace("T", " ")


def _table(headers: list[str], rows: list[list[str]]) -> None:
    # Every cell may be agent text (subject, application name): one line, escapes shown.
    rows = [[terminal(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())


async def _sessions(store: SQLiteAuditStore, args: argparse.Namespace) -> int:
    f = filters_of(args)
    sessions = await store.list_sessions(since=f.since, until=f.until, identity=f.identity,
                                         target=f.target, decision=f.decision, text=f.text,
                                         limit=args.limit)
    if args.json:
        print_json([s.to_json() for s in sessions])
        return 0
    if not sessions:
        print("no sessions match")
        return 0
    _table(["STARTED (UTC)", "ENDED", "IDENTITY", "TARGET", "CLIENT", "APP", "STMTS",
            "BLOCKED", "REVIEWED", "SESSION"],
           [[_stamp(s.started_at), "open" if s.open else _stamp(s.ended_at)[11:],
             s.subject, s.target, f"{s.client_addr or '-'}:{s.client_port or '-'}",
             _short(s.application_name, 16) or "-", str(s.statements), str(s.blocked),
             str(s.reviewed), s.id] for s in sessions])
    return 0


async def _show(store: SQLiteAuditStore, args: argparse.Namespace) -> int:
    session = await store.get_session(args.session)
    if session is None:
        return fail(f"no session {args.session} in {store.path} (list them with hoopops audit "
                    "sessions)")
    statements = await store.session_statements(session.id)
    if args.json:
        print_json({"session": session.to_json(),
                    "statements": [s.to_json() for s in statements]})
        return 0
    _print_session(session)
    for statement in statements:
        _print_statement(statement)
    return 0


def _print_session(s: SessionView) -> None:
    t = terminal  # agent text (identity fields, startup parameters) shown, never obeyed
    print(f"session {t(s.id)}")
    print(f"  identity   {t(s.subject)}  groups: {t(', '.join(s.groups)) or '-'}  issuer: "
          f"{t(s.issuer or '-')}  token: {t(s.token_id or '-')}")
    print(f"  client     {t(s.client_addr or '-')}:{s.client_port or '-'}  user: "
          f"{t(s.claimed_user or '-')}  application: {t(s.application_name or '-')}  "
          f"tls: {'yes' if s.tls else 'no'}")
    print(f"  target     {t(s.target)}")
    ended = "still open" if s.open else f"{_stamp(s.ended_at)} ({t(s.end_reason)})"
    print(f"  started    {_stamp(s.started_at)}   ended: {ended}")
    if not s.open:
        print(f"  traffic    {s.bytes_in} bytes in, {s.bytes_out} bytes out")
    print(f"  statements {s.statements} ({s.blocked} blocked, {s.reviewed} reviewed)")


def _print_statement(t: StatementView) -> None:
    print()
    rule = f" rule {terminal(t.rule_id)}" if t.rule_id else ""
    print(f"#{t.seq}  {_stamp(t.received_at)}  {t.decision}{rule}  (record #{t.id})")
    # Line feeds and tabs keep their layout; everything a terminal would obey (or that
    # shows as nothing) is spelled out, and floods of blank lines are counted.
    for line in terminal(t.sql.strip(), layout=True).split("\n"):
        print(f"    {line}")
    if t.params is not None:
        print(f"    params: {terminal(json.dumps(t.params, ensure_ascii=False))}")
    if t.approval is not None:
        a = t.approval
        decided = f" by {terminal(a.decided_by)}" if a.decided_by else ""
        scope = f" ({a.scope})" if a.scope else ""
        comment = f": {terminal(a.comment)}" if a.comment else ""
        print(f"    approval #{a.id} {a.status}{scope}{decided} at {_stamp(a.decided_at)}"
              f"{comment}")
    if t.finished:
        # Error texts quote the agent's input.
        outcome = (f"error {t.sqlstate}: {terminal(t.error_message)}" if t.sqlstate
                   else f"{terminal(t.command_tag or 'done')}, "
                   f"{t.rows if t.rows is not None else '-'} row(s)")
        duration = f"{t.duration_ms:.1f} ms" if t.duration_ms is not None else "not run"
        print(f"    result: {outcome}  ({duration})")
        if t.result_sha256:
            kept = len((t.result_sample or {}).get("rows", []))
            cut = " (truncated)" if (t.result_sample or {}).get("truncated") else ""
            print(f"    result sha256 {t.result_sha256}; {kept} row(s) kept{cut}")
    else:
        print("    result: none recorded")
    for m in t.masking:
        print(f"    masked {terminal(m.column_or_detector)} with {terminal(m.strategy)} "
              f"x{m.count}")


async def _export(store: SQLiteAuditStore, args: argparse.Namespace) -> int:
    what = "records" if args.records else "statements"
    if args.output:
        newline = "" if args.format == "csv" else None
        # Opened off the event loop, like every write the export makes.
        out = await asyncio.to_thread(Path(args.output).open, "w", encoding="utf-8",
                                      newline=newline)
        try:
            count = await store.export(out, format=args.format, what=what,
                                       filters=filters_of(args))
        finally:
            await asyncio.to_thread(out.close)
        print(f"exported {count} {what} to {args.output}", file=sys.stderr)
        return 0
    await store.export(sys.stdout, format=args.format, what=what, filters=filters_of(args))
    return 0


def _parse_expect(text: str) -> tuple[int, str]:
    seq, _, digest = text.partition(":")
    if not seq.strip().lstrip("#").isdigit() or len(digest.strip()) != 64:
        raise ValueError(f"--expect {text!r}: expected SEQ:HASH as printed by audit verify")
    return int(seq.strip().lstrip("#")), digest.strip()


async def _verify(store: SQLiteAuditStore, args: argparse.Namespace) -> int:
    try:
        expect = [_parse_expect(e) for e in args.expect]
    except ValueError as exc:
        return fail(str(exc), 2)
    report = await store.verify(expect)
    if args.json:
        print_json(report.to_json())
        return 0 if report.ok else 1
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if report.ok:
        span = f"#{report.first_seq}..#{report.last_seq}" if report.records else "empty"
        pruned = (f"; records up to #{report.pruned_through} were pruned (anchored)"
                  if report.pruned_through else "")
        print(f"audit trail OK: {report.records} records ({span}){pruned}; query tables match")
        print(f"head {report.last_seq or 0}:{report.head_hash}")
        print("keep the head somewhere else; `hoopops audit verify --expect HEAD` later "
              "proves the chain up to it was not rewritten")
        return 0
    first = report.first_problem
    assert first is not None
    where = f"record #{first.seq}" if first.seq is not None else "the store"
    print(f"audit trail BROKEN at {where}: {first.message}")
    others = [p for p in report.problems if p is not first]
    if others:
        print(f"{len(others)} more problem(s):")
        for problem in sorted(others, key=lambda p: (p.seq is None, p.seq or 0)):
            print(f"  - {problem.message}")
    return 1


async def _prune(store: SQLiteAuditStore, args: argparse.Namespace) -> int:
    try:
        older_than = parse_duration(args.older_than)
    except ValueError as exc:
        return fail(f"--older-than {args.older_than!r}: {exc}", 2)
    report = await store.prune(older_than, dry_run=args.dry_run)
    if args.json:
        print_json(report.to_json())
        return 0
    if not report.records:
        print(f"nothing to prune: no whole session ended before {report.cutoff}")
    elif report.dry_run:
        print(f"would prune {report.records} records ({report.sessions} sessions) up to record "
              f"#{report.through_seq}, older than {report.cutoff}")
    else:
        print(f"pruned {report.records} records ({report.sessions} sessions) up to record "
              f"#{report.through_seq}, older than {report.cutoff}; anchor record "
              f"#{report.anchor_seq} links what remains")
    return 0

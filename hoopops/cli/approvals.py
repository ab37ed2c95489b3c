"""``hoopops approvals``: list held statements and decide them from any terminal.

A decision is written to the audit store; the gateway holding the statement notices it
within its poll interval (``approvals.poll_interval``, half a second by default).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import time
from typing import Any

from hoopops.approvals import ApprovalBroker, ApprovalError, Decision
from hoopops.audit import ApprovalView, AuditError, SQLiteAuditStore
from hoopops.cli.common import add_config_argument, fail, load_config_or_exit, print_json
from hoopops.config import Config
from hoopops.display import folded, terminal
from hoopops.events import EventBus


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "approvals", help="list held statements; approve or deny them",
        description="Statements a policy sent for review wait on their connection until "
        "someone decides. Decide here or in the console.")
    parser.set_defaults(func=lambda args: _usage(parser))
    sub = parser.add_subparsers(dest="approvals_command", metavar="SUBCOMMAND")

    p = sub.add_parser("list", help="pending approvals, oldest first")
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_list)

    p = sub.add_parser("approve", help="let a held statement run")
    add_config_argument(p)
    p.add_argument("id", metavar="ID", help="approval id, as in 'awaiting approval #ID'")
    p.add_argument("--scope", choices=("once", "session"), default="once",
                   help="once: this statement only; session: this statement's fingerprint "
                   "for the rest of the session")
    p.add_argument("--by", metavar="NAME", help="who decides (default: your login name)")
    p.add_argument("--reason", metavar="TEXT", help="a comment for the audit trail")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_approve)

    p = sub.add_parser("deny", help="refuse a held statement (the client gets SQLSTATE 42501)")
    add_config_argument(p)
    p.add_argument("id", metavar="ID", help="approval id, as in 'awaiting approval #ID'")
    p.add_argument("--reason", metavar="TEXT", help="told to the client and kept in the trail")
    p.add_argument("--by", metavar="NAME", help="who decides (default: your login name)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_deny)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


async def _open(config: Config) -> SQLiteAuditStore:
    return await SQLiteAuditStore.open(config.audit.path, create=False,
                                       result_rows=config.audit.result_rows,
                                       result_bytes=config.audit.result_bytes)


def _list(args: argparse.Namespace) -> int:
    config = load_config_or_exit(args.config)

    async def run() -> int:
        try:
            store = await _open(config)
        except AuditError as exc:
            return fail(str(exc))
        try:
            pending = await store.pending_approvals()
        finally:
            await store.close()
        if args.json:
            print_json([a.to_json() for a in pending])
            return 0
        if not pending:
            print("no statements are waiting for approval")
            return 0
        now = time.time()
        rows = [[f"#{a.id}", f"{max(0, int(a.expires_at - now))}s", terminal(a.subject),
                 terminal(a.rule_id or "-"), terminal(a.session_id),
                 folded(a.sql, 70)]
                for a in pending]
        headers = ["ID", "EXPIRES IN", "IDENTITY", "RULE", "SESSION", "SQL"]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
        for line in [headers, *rows]:
            print("  ".join(c.ljust(widths[i]) for i, c in enumerate(line)).rstrip())
        return 0

    return asyncio.run(run())


def _approval_id(text: str) -> int:
    cleaned = text.strip().lstrip("#")
    if not cleaned.isdigit():
        raise ValueError(f"{text!r} is not an approval id (a number, as in 'approval #12')")
    return int(cleaned)


def _decider(args: argparse.Namespace) -> str:
    if args.by:
        return str(args.by)
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER", "")


def _decide(args: argparse.Namespace, decision: Decision) -> int:
    config = load_config_or_exit(args.config)
    try:
        approval_id = _approval_id(args.id)
    except ValueError as exc:
        return fail(str(exc), 2)
    decided_by = _decider(args)
    if not decided_by:
        return fail("cannot tell who you are; say --by NAME", 2)

    async def run() -> int:
        try:
            store = await _open(config)
        except AuditError as exc:
            return fail(str(exc))
        # A broker of our own: it writes the decision through the same checks the console
        # uses; the gateway's broker picks it up from the store.
        broker = ApprovalBroker(store, EventBus(), timeout=config.approvals.timeout,
                                poll_interval=config.approvals.poll_interval)
        try:
            view = await broker.decide(approval_id, decision, decided_by, args.reason)
        except (ApprovalError, AuditError) as exc:
            return fail(str(exc))
        finally:
            await broker.close()
            await store.close()
        _report(view, args.json)
        return 0

    return asyncio.run(run())


def _report(view: ApprovalView, as_json: bool) -> None:
    if as_json:
        print_json(view.to_json())
        return
    if view.status == "approved":
        scope = "for the rest of the session" if view.scope == "session" else "once"
        print(f"approved #{view.id} {scope} (by {terminal(view.decided_by)}); the gateway "
              "releases the statement within a second")
    else:
        why = f": {terminal(view.comment)}" if view.comment else ""
        print(f"denied #{view.id} (by {terminal(view.decided_by)}){why}")


def _approve(args: argparse.Namespace) -> int:
    decision = Decision.APPROVED_SESSION if args.scope == "session" else Decision.APPROVED_ONCE
    return _decide(args, decision)


def _deny(args: argparse.Namespace) -> int:
    return _decide(args, Decision.DENIED)

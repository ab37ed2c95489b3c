"""``hoopops replay`` and ``hoopops policy diff``: check recordings against policy.

The logic lives in :mod:`hoopops.replay`; this module parses arguments, prints the
reports and maps them to exit statuses: 0 nothing drifted or changed, 1 something did,
2 the check could not be done.
"""

from __future__ import annotations

import argparse
from typing import Any

from hoopops.cli.audit import when
from hoopops.cli.common import add_config_argument, fail, load_config_or_exit, print_json
from hoopops.display import terminal
from hoopops.replay import (
    PolicyDiffReport,
    ReplayError,
    ReplayReport,
    diff_policies_blocking,
    replay_session_blocking,
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "replay", help="re-run a recorded session in a sandbox and report drift",
        description="Re-run a recorded session against a sandbox database (never a "
        "configured target) inside one transaction that is rolled back, re-deciding every "
        "statement under the policy, and report per statement the recorded decision, "
        "result hash and masking against today's. Exit status: 0 no drift, 1 drift, "
        "2 error.")
    parser.add_argument("session", help="session id from the audit trail (a unique prefix "
                        "of at least 6 characters will do)")
    parser.add_argument("--sandbox", default=None, metavar="DSN",
                        help="postgresql:// URL of the sandbox database: a copy with the "
                        "same schema and data, never a configured target (default: "
                        "replay.sandbox of the config)")
    parser.add_argument("--policies", "-p", default=None, metavar="DIR",
                        help="policy folder to judge by now (default: replay.policies, "
                        "else policies: of the config)")
    add_config_argument(parser)
    parser.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                        help="give up when one statement takes longer (default 300)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run_replay)


def register_policy_diff(commands: Any) -> None:
    """Add ``diff`` to the ``hoopops policy`` subcommands (called from cli/policy.py)."""
    diff = commands.add_parser(
        "diff", help="which recorded decisions a candidate policy would change",
        description="Decide recorded statements again under a candidate policy folder, "
        "without running anything, and list every decision that would change. Exit "
        "status: 0 none, 1 some would change, 2 error.")
    diff.add_argument("--policies", "-p", required=True, metavar="NEW_DIR",
                      help="the candidate policy folder")
    add_config_argument(diff)
    diff.add_argument("--since", type=when, metavar="WHEN",
                      help="statements received from this time (ISO, UTC by default) or "
                      "this long ago (2h, 7d); default: the whole trail")
    diff.add_argument("--until", type=when, metavar="WHEN", help="up to this time")
    diff.add_argument("--identity", metavar="SUBJECT", help="only this token subject")
    diff.add_argument("--target", metavar="NAME", help="only this target")
    diff.add_argument("--json", action="store_true", help="print JSON")
    diff.set_defaults(func=run_policy_diff)


def run_replay(args: argparse.Namespace) -> int:
    config = load_config_or_exit(args.config)
    sandbox = args.sandbox or config.replay.sandbox
    if sandbox is None:
        return fail("replay: no sandbox: give --sandbox DSN or set replay.sandbox in "
                    f"{config.file}", 2)
    policies = args.policies or config.replay.policies
    try:
        report = replay_session_blocking(config, args.session, sandbox, policies,
                                         statement_timeout=args.timeout)
    except ReplayError as exc:
        return fail(f"replay: {exc}", 2)
    return _show(report, args.json)


def run_policy_diff(args: argparse.Namespace) -> int:
    config = load_config_or_exit(args.config)
    try:
        report = diff_policies_blocking(config, args.policies, since=args.since,
                                        until=args.until, identity=args.identity,
                                        target=args.target)
    except ReplayError as exc:
        return fail(f"policy diff: {exc}", 2)
    return _show(report, args.json)


def _show(report: ReplayReport | PolicyDiffReport, as_json: bool) -> int:
    """Print a report for people or machines; its exit status says whether it drifted."""
    if as_json:
        print_json(report.to_json())
    else:
        # The report quotes recorded SQL, values and errors: shown, never obeyed.
        print(terminal(report.render(), layout=True))
    return report.exit_status


__all__ = ["register", "register_policy_diff", "run_policy_diff", "run_replay"]

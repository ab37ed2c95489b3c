"""``hoopops policy check`` and ``hoopops policy lint``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from hoopops.cli.common import fail, print_json
from hoopops.identity import Identity
from hoopops.policy import Decision, PolicyEngine, PolicyError, load_policies
from hoopops.sql import Analysis, StatementFacts, analyze
from hoopops.yamlfile import YamlFileError, load_located


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("policy", help="check statements against policies, lint "
                                   "policy files",
                                   description="Try statements against a policy folder and "
                                   "lint policy files.")
    commands = parser.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: _usage(parser))

    check = commands.add_parser("check", help="show the facts of SQL and the decision",
                                description="Analyse SQL and show the facts and the "
                                "decision the policies make, with the rule that made it.")
    check.add_argument("sql", help="the SQL text (use - to read it from standard input)")
    _add_folder_options(check)
    check.add_argument("--sub", default=None, help="identity subject (token 'sub')")
    check.add_argument("--groups", default="", help="identity groups, comma separated")
    check.add_argument("--target", default=None, help="target name from hoopops.yaml")
    check.add_argument("--dsn", default=None,
                       help="also consult this database's catalog (functions, views, "
                       "triggers), as the gateway does")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(func=run_check)

    lint = commands.add_parser("lint", help="report problems in policy files",
                               description="Report unknown keys, bad globs and regexes, "
                               "and rules that can never match or are shadowed, with file "
                               "and line. Exits non-zero when there is any problem.")
    lint.add_argument("folder", nargs="?", default=None, help="policy folder")
    _add_folder_options(lint, positional=True)
    lint.add_argument("--json", action="store_true", help="print JSON")
    lint.set_defaults(func=run_lint)

    from hoopops.cli.replay import register_policy_diff  # `policy diff` lives with replay

    register_policy_diff(commands)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _add_folder_options(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    if not positional:
        parser.add_argument("--policies", "-p", default=None,
                            help="policy folder (default: policies: of --config, else "
                            "./policies)")
    else:
        parser.add_argument("--policies", "-p", dest="policies", default=None,
                            help=argparse.SUPPRESS)
    parser.add_argument("--config", "-c", default=None,
                        help="hoopops.yaml whose 'policies:' names the folder "
                        "(default: ./hoopops.yaml if present)")


def resolve_folder(explicit: str | None, config: str | None) -> Path:
    """--policies, else the ``policies:`` of the config file, else ./policies."""
    if explicit:
        return Path(explicit)
    config_path = Path(config) if config else Path("hoopops.yaml")
    if config_path.is_file():
        doc = load_located(config_path)
        if isinstance(doc.data, dict) and doc.data.get("policies"):
            folder = Path(str(doc.data["policies"])).expanduser()
            if not folder.is_absolute():
                folder = config_path.resolve().parent / folder
            return folder
    elif config:
        raise YamlFileError(config, None, None, "file not found")
    return Path("policies")


def run_check(args: argparse.Namespace) -> int:
    try:
        folder = resolve_folder(args.policies, args.config)
        engine = PolicyEngine.from_policies(load_policies(folder))
    except YamlFileError as exc:
        return fail(f"policy error: {exc}", 2)
    sql = sys.stdin.read() if args.sql == "-" else args.sql
    identity = None
    if args.sub or args.groups:
        groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
        identity = Identity(args.sub or "", groups, None, None, None)
    analysis = analyze(sql)
    if args.dsn:
        try:
            analysis = asyncio.run(_enrich(analysis, args.dsn))
        except Exception as exc:
            return fail(f"could not consult the catalog: {exc}", 2)
    decision = engine.decide(identity, args.target, analysis)
    if args.json:
        out = decision.to_dict()
        out["policies"] = str(folder)
        print_json(out)
    else:
        _print_decision(decision, folder)
    return 0


async def _enrich(analysis: Analysis, dsn: str) -> Analysis:
    import asyncpg

    from hoopops.sql_catalog import SqlCatalog

    conn = await asyncpg.connect(dsn)
    try:
        async def connect() -> Any:
            return conn

        return await SqlCatalog(connect).enrich(analysis)
    finally:
        await conn.close()


def _print_decision(decision: Decision, folder: Path) -> None:
    print(f"decision: {decision.action}  (rule {decision.rule_id}"
          + (f": {decision.rule_description}" if decision.rule_description else "") + ")")
    if decision.message:
        print(f"message:  {decision.message}")
    print(f"policies: {folder} (version {(decision.policy_version or '')[:12]})")
    print(f"timing:   analysis {decision.analysis.elapsed_us:.0f} us, decision "
          f"{decision.elapsed_us:.0f} us")
    for index, facts in enumerate(decision.analysis.statements):
        verdict = decision.statements[index] if index < len(decision.statements) else None
        print()
        print(f"statement {index + 1}: {facts.text}")
        if verdict is not None:
            print(f"  decision: {verdict.action} by {verdict.rule_id}")
        for label, value in _fact_lines(facts):
            print(f"  {label}: {value}")


def _fact_lines(facts: StatementFacts) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []

    def add(label: str, value: Any) -> None:
        if value:
            if isinstance(value, frozenset | set | tuple | list):
                value = ", ".join(sorted(str(v) for v in value))
            lines.append((label, str(value)))

    add("parse error", facts.parse_error)
    add("unanalysable", facts.unanalysable)
    add("type", facts.statement_type + (f" (wraps {', '.join(facts.wrapped)})"
                                        if facts.wrapped else ""))
    add("kinds", facts.kinds)
    add("changes", [name for name, flag in (("data", facts.changes_data),
                                            ("schema", facts.changes_schema),
                                            ("server", facts.changes_server)) if flag])
    add("tables read", facts.tables_read)
    add("tables written", facts.tables_written)
    add("columns", facts.columns)
    add("columns written", facts.columns_written)
    add("filter columns", facts.filter_columns)
    add("functions", facts.functions)
    add("unbounded", "yes" if facts.unbounded else "")
    add("row locks", "yes" if facts.row_locks else "")
    for reason in facts.dangerous_reasons:
        add("dangerous", reason)
    for reason in facts.lexing_risk:
        add("lexing risk", reason)
    for note in facts.notes:
        add("note", note)
    if facts.fingerprint:
        add("fingerprint", facts.fingerprint)
    return lines


def run_lint(args: argparse.Namespace) -> int:
    from hoopops.policy_lint import lint_folder

    try:
        folder = resolve_folder(args.folder or args.policies, args.config)
    except YamlFileError as exc:
        return fail(f"configuration error: {exc}", 2)
    problems = lint_folder(folder)
    if args.json:
        print_json({"folder": str(folder), "problems": [
            {"file": p.file, "line": p.line, "key": p.key, "severity": p.severity,
             "message": p.message} for p in problems]})
    else:
        for problem in problems:
            print(problem)
        errors = sum(p.severity == "error" for p in problems)
        warnings = len(problems) - errors
        if problems:
            print(f"{folder}: {errors} error(s), {warnings} warning(s)", file=sys.stderr)
        else:
            print(f"{folder}: no problems")
    return 1 if problems else 0


__all__ = ["PolicyError", "register", "resolve_folder", "run_check", "run_lint"]

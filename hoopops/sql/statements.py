"""What each statement type is, and how the walk looks into the ones that wrap others.

``BASE_KINDS`` gives every statement type its kinds; ``STATEMENTS`` holds the handlers for
statements that need more than a generic walk: wrappers (EXPLAIN, COPY, PREPARE, EXECUTE,
DECLARE, CREATE TABLE AS), settings (SET and its lexing risks), bodies of functions, and
the objects DDL changes.
"""

from __future__ import annotations

from typing import Any

from hoopops.sql.facts import StatementFacts, join_name, quote_part
from hoopops.sql.walker import (
    _DDL,
    _FILTER,
    _NOEXEC,
    RESET_REASON,
    Ctx,
    _Builder,
    _constant,
    _def_elems,
    _explain_analyzes,
    _names_of,
    _Outputs,
    _Scope,
    _string_list,
)

_BASE_KINDS: dict[str, tuple[str, ...]] = {}
for _names, _kinds in (
    ("AlterCollationStmt AlterDomainStmt AlterEnumStmt AlterExtensionContentsStmt "
     "AlterFunctionStmt AlterObjectDependsStmt AlterObjectSchemaStmt AlterOpFamilyStmt "
     "AlterOperatorStmt AlterSeqStmt AlterStatsStmt AlterTSConfigurationStmt "
     "AlterTSDictionaryStmt AlterTableStmt AlterTypeStmt CommentStmt CompositeTypeStmt "
     "CreateAmStmt CreateCastStmt CreateConversionStmt CreateDomainStmt CreateEnumStmt "
     "CreateForeignTableStmt CreateFunctionStmt CreateOpClassStmt CreateOpFamilyStmt "
     "CreateRangeStmt CreateSchemaStmt CreateSeqStmt CreateStatsStmt CreateStmt "
     "CreateTransformStmt CreateTrigStmt DefineStmt DropStmt IndexStmt RenameStmt "
     "ReplicaIdentityStmt RuleStmt SecLabelStmt ViewStmt CreateExtensionStmt "
     "AlterExtensionStmt CreateFdwStmt AlterFdwStmt CreateForeignServerStmt "
     "AlterForeignServerStmt ImportForeignSchemaStmt CreatePLangStmt CreateEventTrigStmt "
     "AlterEventTrigStmt CreatePublicationStmt AlterPublicationStmt", ("ddl",)),
    ("CreatePolicyStmt AlterPolicyStmt AlterOwnerStmt DropOwnedStmt", ("ddl", "dcl")),
    ("GrantStmt GrantRoleStmt CreateRoleStmt AlterRoleStmt AlterRoleSetStmt DropRoleStmt "
     "AlterDefaultPrivilegesStmt ReassignOwnedStmt CreateUserMappingStmt "
     "AlterUserMappingStmt DropUserMappingStmt", ("dcl",)),
    ("CreateSubscriptionStmt AlterSubscriptionStmt DropSubscriptionStmt "
     "CreateTableSpaceStmt DropTableSpaceStmt AlterTableSpaceOptionsStmt CreatedbStmt "
     "DropdbStmt AlterDatabaseStmt AlterDatabaseSetStmt AlterDatabaseRefreshCollStmt "
     "AlterTableMoveAllStmt", ("ddl", "admin")),
    ("AlterSystemStmt CheckPointStmt VacuumStmt ClusterStmt ReindexStmt LockStmt LoadStmt "
     "DoStmt", ("admin",)),
    ("TransactionStmt ConstraintsSetStmt", ("tcl",)),
    ("SelectStmt VariableShowStmt FetchStmt ExplainStmt", ("read",)),
    ("InsertStmt UpdateStmt DeleteStmt MergeStmt TruncateStmt RefreshMatViewStmt CallStmt "
     "NotifyStmt", ("write",)),
    ("CreateTableAsStmt", ("ddl", "write")),
    ("VariableSetStmt DiscardStmt ListenStmt UnlistenStmt DeallocateStmt ClosePortalStmt "
     "PLAssignStmt ReturnStmt", ("utility",)),
    ("PrepareStmt ExecuteStmt DeclareCursorStmt CopyStmt", ()),
):
    for _name in _names.split():
        _BASE_KINDS[_name] = _kinds

STATEMENT_TYPES = frozenset(_BASE_KINDS)

_CHANGES_SERVER = frozenset({
    "AlterSystemStmt", "CheckPointStmt", "CreatedbStmt", "DropdbStmt", "AlterDatabaseStmt",
    "AlterDatabaseSetStmt", "AlterDatabaseRefreshCollStmt", "CreateTableSpaceStmt",
    "DropTableSpaceStmt", "AlterTableSpaceOptionsStmt", "AlterTableMoveAllStmt",
    "CreateRoleStmt", "AlterRoleStmt", "AlterRoleSetStmt", "DropRoleStmt", "GrantRoleStmt",
    "CreateSubscriptionStmt", "AlterSubscriptionStmt", "DropSubscriptionStmt",
    "CreateEventTrigStmt", "AlterEventTrigStmt", "LoadStmt"})

_DANGEROUS: dict[str, str] = {
    "CreateExtensionStmt": "creates an extension (installs server code)",
    "AlterExtensionStmt": "changes an extension (installs server code)",
    "CreateFdwStmt": "creates a foreign-data wrapper (reaches other servers)",
    "AlterFdwStmt": "changes a foreign-data wrapper (reaches other servers)",
    "CreateForeignServerStmt": "defines a foreign server (reaches other servers)",
    "AlterForeignServerStmt": "changes a foreign server (reaches other servers)",
    "CreateUserMappingStmt": "stores credentials for another server",
    "AlterUserMappingStmt": "changes credentials for another server",
    "DropUserMappingStmt": "drops credentials for another server",
    "ImportForeignSchemaStmt": "imports tables from another server",
    "CreatePLangStmt": "creates a procedural language",
    "CreateEventTrigStmt": "creates an event trigger (runs code on every DDL statement)",
    "AlterEventTrigStmt": "changes an event trigger",
    "CreateSubscriptionStmt": "subscribes to another server",
    "AlterSubscriptionStmt": "changes a subscription to another server",
    "DropSubscriptionStmt": "drops a subscription to another server",
    "CreatePublicationStmt": "publishes table changes to other servers",
    "AlterPublicationStmt": "changes what is published to other servers",
    "CreateTableSpaceStmt": "creates a tablespace (a server directory)",
    "DropTableSpaceStmt": "drops a tablespace",
    "AlterTableSpaceOptionsStmt": "changes a tablespace",
    "AlterTableMoveAllStmt": "moves every table of a tablespace",
    "AlterSystemStmt": "changes the server configuration (ALTER SYSTEM)",
    "LoadStmt": "loads a shared library into the server",
    "DoStmt": "runs an anonymous code block (DO) that the gateway cannot inspect",
    "CreatedbStmt": "creates a database",
    "DropdbStmt": "drops a database",
    "AlterDatabaseStmt": "changes a database",
    "AlterDatabaseRefreshCollStmt": "changes a database",
    "CreateRoleStmt": "creates a role",
    "AlterRoleStmt": "changes a role",
    "AlterRoleSetStmt": "changes a role's settings",
    "DropRoleStmt": "drops a role",
    "GrantRoleStmt": "changes role membership",
    "ReassignOwnedStmt": "reassigns every object a role owns",
    "DropOwnedStmt": "drops every object a role owns",
}

# DDL whose expressions are stored for later, not evaluated now (no existing rows).
_DEFINES_ONLY = frozenset({"CreateStmt", "CreateDomainStmt", "CompositeTypeStmt",
                           "CreateSeqStmt", "DefineStmt", "CreateForeignTableStmt",
                           "CreatePolicyStmt", "AlterPolicyStmt", "CreateSchemaStmt"})
_TABLE_OBJECTS = frozenset({"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW",
                            "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE", "OBJECT_INDEX"})


# -- statement-specific handling -------------------------------------------------------


def _s_select(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    b.outputs = _Outputs()
    b.select(s, (ctx[0], ctx[1], ctx[2], b.outputs))


def _s_dml(b: _Builder, s: dict[str, Any], ctx: Ctx, kind: str) -> None:
    b.outputs = _Outputs()
    ctx = (ctx[0], ctx[1], ctx[2], b.outputs)
    getattr(b, kind)(s, ctx)


def _s_explain(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    query = s.get("query") or {}
    analyze = _explain_analyzes(s.get("options"))
    b.wrapped.extend(query.keys())
    flags = 0 if analyze else _NOEXEC
    if not analyze:
        b.notes.append("EXPLAIN without ANALYZE: the statement is planned, not run")
    b.push(query, ((), {}, flags, None))


def _s_copy(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    is_from = bool(s.get("is_from"))
    if s.get("is_program"):
        b.danger("COPY ... PROGRAM runs a program on the database server")
        b.kinds.add("admin")
        b.changes_server = True
    elif "filename" in s:
        b.danger("COPY with a file name reads or writes files on the database server")
    scope = _Scope()
    rel = s.get("relation")
    if rel:
        name = join_name(rel.get("schemaname"), rel.get("relname", ""))
        scope.aliases[rel.get("relname", "")] = name
        scope.tables.append(name)
        cols = _string_list(s.get("attlist")) or ["*"]
        if is_from:
            b.tables_written.add(name)
            b.kinds.add("write")
            b.changes_data = True
            b.columns_written.update(f"{name}.{quote_part(c)}" for c in cols)
        else:
            b.tables_read.add(name)
            b.kinds.add("read")
            b.outputs = _Outputs()
            for index, col in enumerate(cols):
                column = f"{name}.{quote_part(col)}"
                b.columns.add(column)
                b.outputs.sink(index, col, True).append(column)
    query = s.get("query")
    if query:
        b.wrapped.extend(query.keys())
        b.outputs = _Outputs()
        b.push(query, ((), {}, 0, b.outputs))
    b.push(s.get("whereClause"), ((scope,), {}, _FILTER, None))


def _s_prepare(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    b.prepares = s.get("name", "")
    query = s.get("query") or {}
    b.wrapped.extend(query.keys())
    b.outputs = _Outputs()
    b.push(query, ((), {}, 0, b.outputs))


def _s_execute(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    b.executes = s.get("name", "")
    b.push(s.get("params"), ctx)


def _s_declare(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    query = s.get("query") or {}
    b.wrapped.extend(query.keys())
    b.push(query, ctx)


def _s_ctas(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    into = s.get("into") or {}
    b.into(into, ctx)
    query = s.get("query") or {}
    b.wrapped.extend(query.keys())
    flags = _NOEXEC if into.get("skipData") else 0
    b.push(query, ((), {}, flags, None))


def _s_view(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    view = s.get("view") or {}
    b.tables_written.add(join_name(view.get("schemaname"), view.get("relname", "")))
    b.push(s.get("query"), ((), {}, _NOEXEC, None))


def _s_rule(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    rel = s.get("relation") or {}
    b.tables_written.add(join_name(rel.get("schemaname"), rel.get("relname", "")))
    scope = _Scope()
    scope.aliases["new"] = scope.aliases["old"] = join_name(rel.get("schemaname"),
                                                            rel.get("relname", ""))
    b.push(s.get("whereClause"), ((scope,), {}, _NOEXEC, None))
    b.push(s.get("actions"), ((scope,), {}, _NOEXEC, None))


def _s_trigger(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    rel = s.get("relation") or {}
    name = join_name(rel.get("schemaname"), rel.get("relname", ""))
    b.tables_written.add(name)
    b.functions.add(join_name(*_string_list(s.get("funcname"))))
    scope = _Scope()
    scope.aliases["new"] = scope.aliases["old"] = name
    b.push(s.get("whenClause"), ((scope,), {}, _NOEXEC, None))


def _s_function(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    options = _def_elems(s.get("options"))
    language_node = options.get("language")
    language = (language_node.get("String", {}).get("sval", "sql")
                if type(language_node) is dict else "sql").lower()
    if language not in b.analyzer.effects.trusted_languages:
        b.danger(f"creates a function in the untrusted language {language}")
    security = options.get("security")
    if type(security) is dict and security.get("Boolean", {}).get("boolval"):
        b.notes.append("SECURITY DEFINER: the function runs with its owner's rights")
    if "sql_body" in s:
        b.push(s["sql_body"], ((), {}, _NOEXEC, None))
    body_node = options.get("as")
    body = ""
    if type(body_node) is dict and "List" in body_node:
        items = _string_list(body_node["List"].get("items"))
        body = items[0] if items else ""
    elif type(body_node) is dict and "String" in body_node:
        body = body_node["String"].get("sval", "")
    inner: list[StatementFacts] = []
    if body and language == "sql":
        inner = b.analyzer.body_facts(body, b.depth)
    elif body and language == "plpgsql":
        parsed = b.analyzer.plpgsql_facts(b.text, b.depth)
        if parsed is None:
            b.notes.append("the PL/pgSQL body does not parse; the server will check it")
        dynamic, inner = parsed if parsed is not None else (False, [])
        if dynamic:
            b.danger("the function body runs dynamic SQL (EXECUTE) that the gateway cannot "
                     "inspect")
    _absorb_body(b, inner)


def _absorb_body(b: _Builder, inner: list[StatementFacts]) -> None:
    for facts in inner:
        for reason in facts.dangerous_reasons:
            # Calls found in the body are re-judged with the statement's own functions.
            if reason.partition("(): ")[0] not in facts.functions:
                b.danger(f"function body: {reason}")
        b.functions.update(facts.functions)
        if facts.unanalysable:
            b.notes.append(f"part of the function body could not be analysed: "
                           f"{facts.unanalysable}")


def _s_do(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    options = _def_elems(s.get("args"))
    language_node = options.get("language")
    language = (language_node.get("String", {}).get("sval", "plpgsql")
                if type(language_node) is dict else "plpgsql").lower()
    if language not in b.analyzer.effects.trusted_languages:
        b.danger(f"runs code in the untrusted language {language}")
    b.kinds.update(("write", "ddl"))


def _s_set(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    kind = s.get("kind", "")
    name = s.get("name", "")
    if kind == "VAR_RESET_ALL":
        b.resets = True
        b.lexing_risk(f"RESET ALL {RESET_REASON}")
        return
    if kind == "VAR_SET_MULTI":
        if name.upper().startswith("TRANSACTION") or name.upper() == "SESSION CHARACTERISTICS":
            b.kinds.discard("utility")
            b.kinds.add("tcl")
        return
    reset = kind in ("VAR_RESET", "VAR_SET_DEFAULT")
    args = s.get("args") or ()
    value = _constant(args[0]) if len(args) == 1 else None
    if len(args) > 1:
        value = ",".join(_constant(a) or "" for a in args)
    if kind == "VAR_SET_CURRENT":
        value = None
    b.setting_change(name, value, reset)
    if name.lower() == "search_path":
        b.notes.append("search_path changes how unqualified names resolve")


def _s_alter_db_set(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    _s_set(b, s.get("setstmt") or {}, ctx)
    b.kinds.discard("utility")
    b.resets = False


def _s_discard(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    if s.get("target") == "DISCARD_ALL":
        b.resets = True
        b.deallocates = "*"
        b.lexing_risk(f"DISCARD ALL {RESET_REASON}")


def _s_deallocate(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    b.deallocates = "*" if s.get("isall") or not s.get("name") else s["name"]


def _s_transaction(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    if s.get("kind") in ("TRANS_STMT_PREPARE", "TRANS_STMT_COMMIT_PREPARED",
                         "TRANS_STMT_ROLLBACK_PREPARED"):
        b.kinds.add("admin")
        b.notes.append("two-phase commit outlives the session")


def _s_truncate(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    for item in s.get("relations", ()):
        rv = item.get("RangeVar", {})
        name = join_name(rv.get("schemaname"), rv.get("relname", ""))
        b.tables_written.add(name)
        b.columns_written.add(f"{name}.*")
    b.unbounded = True
    b.changes_data = True


def _s_refresh(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    rv = s.get("relation") or {}
    b.tables_written.add(join_name(rv.get("schemaname"), rv.get("relname", "")))


def _s_drop(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    remove = s.get("removeType", "")
    if s.get("behavior") == "DROP_CASCADE":
        b.notes.append("CASCADE also drops everything that depends on these objects")
    for obj in s.get("objects", ()):
        if remove in _TABLE_OBJECTS:
            names = _names_of(obj)
            if names:
                b.tables_written.add(join_name(*names[-2:]))
        elif remove in ("OBJECT_FUNCTION", "OBJECT_PROCEDURE", "OBJECT_ROUTINE"):
            owa = obj.get("ObjectWithArgs", {}) if type(obj) is dict else {}
            names = _string_list(owa.get("objname"))
            if names:
                b.functions.add(join_name(*names))
        elif remove == "OBJECT_SCHEMA":
            names = _names_of(obj)
            if names:
                b.tables_written.add(join_name(names[-1], "*"))
    if remove == "OBJECT_EXTENSION":
        b.notes.append("drops an extension")


_ACCESS_CONTROL_CMDS = frozenset({"AT_ChangeOwner", "AT_EnableRowSecurity",
                                  "AT_DisableRowSecurity", "AT_ForceRowSecurity",
                                  "AT_NoForceRowSecurity"})


def _s_alter_table(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    for item in s.get("cmds", ()):
        if item.get("AlterTableCmd", {}).get("subtype") in _ACCESS_CONTROL_CMDS:
            b.kinds.add("dcl")
    b.push(s, ((), {}, _DDL, None))


def _s_call(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    b.notes.append("procedures can read, write and commit; CALL is treated as a write")
    call = s.get("funccall")
    if call:
        b.func_call(call, ctx)


def _s_notify(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    b.changes_data = False


STATEMENTS = {
    "SelectStmt": _s_select,
    "InsertStmt": lambda b, s, ctx: _s_dml(b, s, ctx, "insert"),
    "UpdateStmt": lambda b, s, ctx: _s_dml(b, s, ctx, "update"),
    "DeleteStmt": lambda b, s, ctx: _s_dml(b, s, ctx, "delete"),
    "MergeStmt": lambda b, s, ctx: _s_dml(b, s, ctx, "merge"),
    "ExplainStmt": _s_explain,
    "CopyStmt": _s_copy,
    "PrepareStmt": _s_prepare,
    "ExecuteStmt": _s_execute,
    "DeclareCursorStmt": _s_declare,
    "CreateTableAsStmt": _s_ctas,
    "ViewStmt": _s_view,
    "RuleStmt": _s_rule,
    "CreateTrigStmt": _s_trigger,
    "CreateFunctionStmt": _s_function,
    "DoStmt": _s_do,
    "VariableSetStmt": _s_set,
    "AlterDatabaseSetStmt": _s_alter_db_set,
    "AlterRoleSetStmt": _s_alter_db_set,
    "DiscardStmt": _s_discard,
    "DeallocateStmt": _s_deallocate,
    "TransactionStmt": _s_transaction,
    "TruncateStmt": _s_truncate,
    "RefreshMatViewStmt": _s_refresh,
    "DropStmt": _s_drop,
    "CallStmt": _s_call,
    "AlterTableStmt": _s_alter_table,
    "NotifyStmt": _s_notify,
}

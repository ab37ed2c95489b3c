"""Turn SQL text into :class:`StatementFacts` with PostgreSQL's own parser.

The hot path is ``parse_sql_json`` (libpg_query, in C) plus ``json.loads`` plus one
iterative walk over plain dicts and lists: no pglast node objects and no Python recursion,
so a deep tree cannot exhaust the interpreter stack. libpg_query bounds its own C stack
(it reports "stack depth limit exceeded" / "memory exhausted" instead of crashing), the
input size is bounded before parsing, and ``json.loads`` turns excessive depth into a
RecursionError; each of those is reported as an ``unanalysable`` fact, never raised.

The walk itself is in :mod:`hoopops.sql.walker`, what each statement type is in
:mod:`hoopops.sql.statements`; this module bounds the input, parses, slices the text into
statements (libpg_query locations are UTF-8 byte offsets), caches, and never raises.
"""

from __future__ import annotations

import gc
import json
import re
import time
from typing import Any

from pglast.parser import ParseError, normalize, parse_plpgsql_json, parse_sql_json

from hoopops.sql.effects import EffectTable, builtin_effects
from hoopops.sql.facts import (
    Analysis,
    OutputColumn,
    StatementFacts,
    located,
    normalise_kinds,
)
from hoopops.sql.statements import (
    _BASE_KINDS,
    _CHANGES_SERVER,
    _DANGEROUS,
    _DEFINES_ONLY,
    STATEMENT_TYPES,
    STATEMENTS,
)
from hoopops.sql.walker import (
    _DDL,
    _EMPTY,
    _NOEXEC,
    RESET_REASON,
    Ctx,
    _Builder,
    _flatten,
)

__all__ = ["DEFAULT_MAX_BYTES", "RESET_REASON", "STATEMENT_TYPES", "TOO_DEEP", "Analyzer",
           "Shape"]

DEFAULT_MAX_BYTES = 1024 * 1024
CACHE_SIZE = 4096
# Longer texts are analysed every time: caching them would pin megabytes per entry.
CACHE_MAX_CHARS = 16 * 1024
GC_PAUSE_CHARS = 64 * 1024
SHAPE_CACHE_SIZE = 4096
SHAPE_MAX_CHARS = 4096
_SHAPE_TYPES = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt",
                          "MergeStmt"})
# Bodies of functions (and SQL inside them) are analysed for dangerous calls this deep.
MAX_BODY_DEPTH = 3

# The C scanner behind json.loads, called directly: libpg_query's output is well formed.
_scan_json = json.JSONDecoder().scan_once
TOO_DEEP = "the statement is nested too deeply to analyse safely"


class Shape:
    """One shape of statement (text up to its literals) the analyser has facts for.

    Compared by identity: caches of what follows from the facts alone (the catalog's
    judgement, the policy's decision) are keyed by it, so a new literal costs a lookup.
    """

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"Shape({self.key!r})"


class Analyzer:
    """Analyses SQL text with one side-effect table; cached by exact text and by shape."""

    def __init__(self, effects: EffectTable | None = None, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, cache_size: int = CACHE_SIZE) -> None:
        self.effects = effects or builtin_effects()
        self.max_bytes = max_bytes
        self.cache_size = cache_size
        self._exact: dict[str, Analysis] = {}
        self._shapes: dict[str, StatementFacts] = {}
        self._skeletons: dict[str, StatementFacts] = {}
        self._digit_keys: dict[bytes, StatementFacts] = {}
        # The last text skeletonised and its skeleton: the enforcer asks for a text's
        # source just before analysing it, and the two must not pay for it twice.
        self._last_skeleton: tuple[str | None, str | None] = (None, None)

    def analyze(self, text: str) -> Analysis:
        """Facts for every statement in ``text``; never raises."""
        found = self._exact.get(text)
        if found is not None:
            return found
        analysis, keep = self._analyze_top(text)
        # A text its shape served is kept only when it has no literal (a parameterised
        # statement, re-Parsed by every Execute): one that inlines its literals rarely
        # comes back, and keeping thousands of them would wake the cyclic collector.
        if keep and len(text) <= CACHE_MAX_CHARS:
            exact = self._exact
            if len(exact) >= self.cache_size:
                _drop_oldest(exact)
            exact[text] = analysis
        return analysis

    def analyze_uncached(self, text: str, *, shapes: bool = True) -> Analysis:
        """Analyse without the exact-text cache (``shapes=False``: without any cache)."""
        return self._analyze_top(text)[0] if shapes else self._timed(text)

    def cache_clear(self) -> None:
        self._exact.clear()
        self._shapes.clear()
        self._skeletons.clear()
        self._digit_keys.clear()

    # -- the shape cache -----------------------------------------------------------------
    #
    # Clients that inline literals (pgbench's simple mode, most ORMs' logging paths) send
    # a new text every time, so the exact-text cache never hits. For plain SELECT / DML
    # statements no fact depends on the value of a literal, so facts are cached by the
    # normalised text (literals replaced by $n, which only a successful parse produces).
    # Statements whose facts do read literals (SET, set_config(), EXPLAIN options, COPY,
    # utility statements) and texts with comments or several statements are never cached
    # this way. Two texts with one key differ only inside literals, so their facts are
    # equal and so is the normalised text of their statement (what ``sql:`` rules read).

    def shape_key(self, text: str) -> str | None:
        """The normalised text (literals as $n) when facts cannot depend on literals."""
        return self._shape_key(text)

    def _shape_key(self, text: str) -> str | None:
        if len(text) > SHAPE_MAX_CHARS or "--" in text or "/*" in text or "\x00" in text:
            return None
        if len(text) * 4 > self.max_bytes and \
                len(text.encode("utf-8", "surrogatepass")) > self.max_bytes:
            return None
        semicolons = text.count(";")
        if semicolons > 1 or (semicolons == 1 and not text.rstrip().endswith(";")):
            return None
        try:
            return normalize(text)
        except Exception:
            return None

    def _remember_shape(self, key: str, analysis: Analysis) -> StatementFacts | None:
        if len(analysis.statements) != 1:
            return None
        facts = analysis.statements[0]
        if facts.statement_type not in _SHAPE_TYPES or facts.parse_error or \
                facts.unanalysable or facts.lexing_risk or facts.wrapped or \
                any(name.rpartition(".")[2].lower() == "set_config" for name in facts.functions):
            return None
        shapes = self._shapes
        if len(shapes) >= SHAPE_CACHE_SIZE:
            _drop_oldest(shapes)
        facts._shape = Shape(key)
        shapes[key] = facts
        return facts

    # -- skeletons: a key without parsing -------------------------------------------------
    #
    # normalize() parses the text, a third of what serving a new literal costs. A text
    # made only of keywords, names, operators and integers (ASCII, no quote, dollar,
    # backslash or comment) is lexed by PostgreSQL the same way whatever its integers'
    # values: a run of at most 9 digits (always an integer constant, never a numeric one)
    # that touches no name character or dot is one constant token. Its skeleton, those
    # runs replaced by "$" (which such a text cannot otherwise hold), is linked to a shape
    # only when normalize() replaced exactly those runs in the text that made the link;
    # every text with that skeleton then has that shape's normalised text, and its facts.

    def _skeleton(self, text: str) -> str | None:
        last = self._last_skeleton
        if last[0] is text:
            return last[1]
        skeleton = self._skeleton_of(text)
        self._last_skeleton = (text, skeleton)
        return skeleton

    def _skeleton_of(self, text: str) -> str | None:
        if len(text) > SHAPE_MAX_CHARS or len(text) > self.max_bytes or \
                not text.isascii() or "'" in text or '"' in text or "$" in text or \
                "\\" in text or "--" in text or "/*" in text or "\x00" in text:
            return None
        semicolons = text.count(";")
        if semicolons > 1 or (semicolons == 1 and not text.rstrip().endswith(";")):
            return None
        return _LONE_INTEGER.sub("$", text)

    # Digit keys: the skeleton's regex is most of what a new literal costs once the
    # skeleton is linked. A text whose every digit sits in a lone integer (none in a name,
    # none in a run the skeleton kept) is keyed, when linked, by its bytes with each digit
    # turned into "$" and each "$" into NUL (one C pass). A linked text has neither "$"
    # nor NUL, so an equal key means the same text up to the values of its digits, run for
    # run: the same lone integers, the same skeleton, the same shape.

    def _digit_key_of(self, text: str) -> bytes | None:
        try:
            return text.encode().translate(_DIGIT_KEY)
        except UnicodeEncodeError:  # lone surrogates: never linked
            return None

    def source(self, text: str) -> Analysis | StatementFacts | None:
        """What :meth:`analyze` would serve ``text`` from without parsing: its exact-text
        Analysis, or the shape facts its digit key or skeleton is linked to; None when it
        would parse.

        Every text that has the same source (by identity) has the same facts, so a caller
        may key what follows from the facts alone on it (the enforcer's verdict cache).
        """
        found = self._exact.get(text)
        if found is not None:
            return found
        try:
            facts = self._digit_keys.get(text.encode().translate(_DIGIT_KEY))
        except UnicodeEncodeError:
            return None
        if facts is not None:
            return facts
        return self._by_skeleton(text, self._skeleton(text))

    def _by_skeleton(self, text: str, skeleton: str | None) -> StatementFacts | None:
        """The shape facts ``skeleton`` is linked to; the text's digit key joins them."""
        if skeleton is None:
            return None
        facts = self._skeletons.get(skeleton)
        if facts is not None:
            self._link_digits(text, skeleton, facts)
        return facts

    def _link(self, text: str, skeleton: str, key: str, facts: StatementFacts) -> None:
        pieces = skeleton.split("$")
        filled = pieces[0] + "".join(f"${n}{piece}" for n, piece in enumerate(pieces[1:], 1))
        if filled != key:
            return  # normalize() kept one of the runs (ORDER BY 1, varchar(10)), or more
        skeletons = self._skeletons
        if len(skeletons) >= SHAPE_CACHE_SIZE:
            _drop_oldest(skeletons)
        skeletons[skeleton] = facts
        self._link_digits(text, skeleton, facts)

    def _link_digits(self, text: str, skeleton: str, facts: StatementFacts) -> None:
        """Key ``text``'s digit key to the facts its linked skeleton has."""
        if _DIGIT.search(skeleton) is not None:
            return  # a digit outside the lone integers (t1, 1.5, 1234567890): no key
        digit_key = self._digit_key_of(text)
        if digit_key is not None:
            digit_keys = self._digit_keys
            if len(digit_keys) >= SHAPE_CACHE_SIZE:
                _drop_oldest(digit_keys)
            digit_keys[digit_key] = facts

    # -- top level -----------------------------------------------------------------------

    def _analyze_top(self, text: str) -> tuple[Analysis, bool]:
        """(the analysis, whether it is worth keeping by its exact text)."""
        started = time.perf_counter()
        digit_key = self._digit_key_of(text)
        if digit_key is not None:
            linked = self._digit_keys.get(digit_key)
            if linked is not None:
                return _located(text, linked, started), b"$" not in digit_key
        skeleton = self._skeleton(text)
        shape = self._by_skeleton(text, skeleton)
        if shape is not None:
            return _located(text, shape, started), skeleton == text
        key = self._shape_key(text)
        if key is None:
            return self._timed(text), True
        shape = self._shapes.get(key)
        if shape is not None:
            result = _located(text, shape, started), key == text
        else:
            analysis = self._timed(text)
            shape = self._remember_shape(key, analysis)
            result = analysis, True
        if shape is not None and skeleton is not None:
            self._link(text, skeleton, key, shape)
        return result

    def _timed(self, text: str) -> Analysis:
        started = time.perf_counter()
        # A big statement becomes millions of short-lived dicts; the cyclic collector would
        # rescan them over and over (5x slower) though none of them can form a cycle.
        pause_gc = len(text) > GC_PAUSE_CHARS and gc.isenabled()
        if pause_gc:
            gc.disable()
        try:
            analysis = self._analyze(text, 0)
        except RecursionError:
            analysis = _failed(text, None, TOO_DEEP)
        except Exception as exc:  # the analyser must never take a session down
            analysis = _failed(text, None, f"the statement could not be analysed "
                                           f"({type(exc).__name__}: {exc})")
        finally:
            if pause_gc:
                gc.enable()
        # The object is new and not shared yet: stamping it saves building a second one.
        object.__setattr__(analysis, "elapsed_us", (time.perf_counter() - started) * 1e6)
        return analysis

    def _analyze(self, text: str, depth: int) -> Analysis:
        if "\x00" in text:
            return _failed(text, None, "the text contains a NUL byte, which ends the text "
                           "early for PostgreSQL; send the statement without it")
        if not text.strip():
            return Analysis(text, ())
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            return _failed(text, None, "the text is not valid UTF-8")
        if len(data) > self.max_bytes:
            return _failed(text, None, f"the statement is {len(data)} bytes long; hoopops "
                           f"analyses at most {self.max_bytes} bytes")
        try:
            raw = parse_sql_json(text)
        except ParseError as exc:
            message = str(exc.args[0]) if exc.args else str(exc)
            if "stack depth" in message or "memory exhausted" in message:
                return _failed(text, None, TOO_DEEP)
            return _failed(text, message, None)
        try:
            tree = _scan_json(raw, 0)[0]
        except RecursionError:
            return _failed(text, None, TOO_DEEP)
        stmts = tree.get("stmts") or ()
        if not stmts:
            return Analysis(text, ())
        ascii_only = len(data) == len(text)
        facts = []
        for raw_stmt in stmts:
            start = raw_stmt.get("stmt_location", 0)
            length = raw_stmt.get("stmt_len", 0)
            end = start + length if length else len(data)
            if ascii_only:
                piece = text[start:end]
                char_start = start
            else:
                piece = data[start:end].decode("utf-8", "replace")
                char_start = len(data[:start].decode("utf-8", "replace"))
            stripped = piece.strip()
            char_start += len(piece) - len(piece.lstrip())
            ((stmt_type, fields),) = raw_stmt["stmt"].items()
            facts.append(self._statement(stmt_type, fields, stripped, char_start, depth))
        return Analysis(text, tuple(facts))

    # -- one statement -------------------------------------------------------------------

    def _statement(self, stmt_type: str, fields: dict[str, Any], text: str, location: int,
                   depth: int) -> StatementFacts:
        b = _Builder(self, text, depth)
        base = _BASE_KINDS.get(stmt_type)
        if base is None:
            b.kinds.add("admin")
            b.danger(f"{stmt_type} is a statement type hoopops does not know")
        else:
            b.kinds.update(base)
        reason = _DANGEROUS.get(stmt_type)
        if reason:
            b.danger(reason)
        if stmt_type in _CHANGES_SERVER:
            b.changes_server = True
        ctx: Ctx = ((), {}, 0, None)
        special = STATEMENTS.get(stmt_type)
        if special is not None:
            special(b, fields, ctx)
        elif base is not None and ("ddl" in base or "dcl" in base):
            flags = _DDL | _NOEXEC if stmt_type in _DEFINES_ONLY else _DDL
            b.push(fields, ((), {}, flags, None))
        else:
            b.push(fields, ctx)
        b.run()
        return self._finish(b, stmt_type, text, location)

    def _finish(self, b: _Builder, stmt_type: str, text: str, location: int
                ) -> StatementFacts:
        effects = self.effects
        if b.set_config_calls and not b.set_config_unsafe:
            # Only harmless session knobs were set: judged like SET, and not "called" as a
            # side effect (the catalog would otherwise flag the volatile function).
            b.called = {n for n in b.called if n.rpartition(".")[2].lower() != "set_config"}
        for name in b.functions:
            effect = effects.lookup(name)
            if effect is None:
                continue
            if effect.dangerous:
                b.danger(f"{name}(): {effect.dangerous}")
            if name not in b.called:
                continue
            if effect.effect == "write":
                b.kinds.add("write")
                b.changes_data = True
            elif effect.effect == "admin":
                b.kinds.add("admin")
                b.changes_server = True
        kinds = normalise_kinds(b.kinds)
        if "write" in kinds:
            b.changes_data = True
        if "ddl" in kinds or "dcl" in _BASE_KINDS.get(stmt_type, ()):
            b.changes_schema = True
        outputs: tuple[OutputColumn, ...] = ()
        if b.outputs is not None and b.outputs.columns:
            outputs = tuple(OutputColumn(name, frozenset(_flatten(sink)), direct)
                            for name, sink, direct in b.outputs.columns)
        if b.filter_refs:
            b.filter_columns.update(_flatten(b.filter_refs))
        unanalysable = b.unanalysable
        if b.executes is not None and unanalysable is None:
            unanalysable = (f"EXECUTE {b.executes}: the prepared statement is not known to "
                            "the gateway")
        # Positional, in field order: 30 keyword arguments cost microseconds per statement
        # (tests/test_sql_limits.py::test_facts_are_built_in_field_order guards the order).
        empty = _EMPTY
        return StatementFacts(
            text, stmt_type, kinds, b.changes_data, b.changes_schema, b.changes_server,
            frozenset(b.tables_read) if b.tables_read else empty,
            frozenset(b.tables_written) if b.tables_written else empty,
            frozenset(b.columns) if b.columns else empty,
            frozenset(b.columns_written) if b.columns_written else empty,
            frozenset(b.filter_columns) if b.filter_columns else empty,
            outputs,
            frozenset(b.functions) if b.functions else empty,
            frozenset(b.called) if b.called else empty,
            frozenset(b.operators) if b.operators else empty,
            frozenset(b.types) if b.types else empty,
            b.unbounded, bool(b.reasons), tuple(b.reasons), tuple(b.lexing), b.resets,
            b.row_locks, None, unanalysable,
            tuple(dict.fromkeys(w for w in b.wrapped if w != stmt_type)) if b.wrapped else (),
            b.prepares, b.executes, b.deallocates, tuple(b.notes), location)

    # -- bodies of functions -------------------------------------------------------------

    def body_facts(self, sql: str, depth: int) -> list[StatementFacts]:
        """Facts of SQL found inside a function body (for dangerous calls it makes)."""
        if depth >= MAX_BODY_DEPTH:
            return []
        try:
            return list(self._analyze(sql, depth + 1).statements)
        except RecursionError:
            return []

    def rule_actions(self, create_rule: str) -> list[StatementFacts] | None:
        """Facts of a rule's actions judged as run (a view's SELECT, DO ALSO DELETE ...).

        ``create_rule`` is ``pg_get_ruledef`` output; None when it does not parse.
        """
        try:
            tree = _scan_json(parse_sql_json(create_rule), 0)[0]
        except (Exception, RecursionError):
            return None
        out: list[StatementFacts] = []
        for raw in tree.get("stmts") or ():
            rule = raw.get("stmt", {}).get("RuleStmt")
            if rule is None:
                return None
            for action in rule.get("actions") or ():
                ((stmt_type, fields),) = action.items()
                out.append(self._statement(stmt_type, fields, create_rule, 0, 1))
        return out

    def plpgsql_facts(self, create_text: str, depth: int
                      ) -> tuple[bool, list[StatementFacts]] | None:
        """(runs dynamic SQL, facts of each embedded statement) of a PL/pgSQL function.

        ``create_text`` is the whole CREATE FUNCTION statement; None when it does not parse.
        """
        try:
            raw = parse_plpgsql_json(create_text)
        except Exception:
            return None
        dynamic = any(marker in raw for marker in (
            '"PLpgSQL_stmt_dynexecute"', '"PLpgSQL_stmt_dynfors"', '"dynquery"'))
        try:
            tree = json.loads(raw)
        except RecursionError:
            return True, []
        queries: list[tuple[str, int]] = []
        work: list[Any] = [tree]
        while work:
            item = work.pop()
            if type(item) is list:
                work.extend(item)
            elif type(item) is dict:
                expr = item.get("PLpgSQL_expr")
                if expr is not None and "query" in expr:
                    queries.append((expr["query"], expr.get("parseMode", 0)))
                    continue
                work.extend(v for v in item.values() if type(v) in (dict, list))
        facts: list[StatementFacts] = []
        for query, mode in queries:
            if mode != 0:
                rhs = query.split(":=", 1)[1] if mode >= 3 and ":=" in query else query
                query = "SELECT " + rhs
            facts.extend(self.body_facts(query, depth))
        return dynamic, facts


# A run of 1-9 digits touching no name character or dot. Spelled to start with the digit
# (the look-behind follows it) so that the regex engine can skip to digits quickly.
_LONE_INTEGER = re.compile(r"[0-9](?<![A-Za-z0-9_.][0-9])[0-9]{0,8}(?![A-Za-z0-9_.])")
_DIGIT = re.compile(r"[0-9]")
_DIGIT_KEY = bytes.maketrans(b"0123456789$", b"$$$$$$$$$$\x00")


def _located(text: str, shape: StatementFacts, started: float) -> Analysis:
    """The shape's facts for ``text``: its one statement, located in it."""
    body = text.strip()
    if body.endswith(";"):
        body = body[:-1].rstrip()
    found = Analysis(text, (located(shape, body, len(text) - len(text.lstrip())),))
    found.elapsed_us = (time.perf_counter() - started) * 1e6
    return found


def _drop_oldest(cache: dict[str, Any]) -> None:
    try:
        del cache[next(iter(cache))]
    except (KeyError, StopIteration, RuntimeError):  # emptied meanwhile
        cache.clear()


def _failed(text: str, parse_error: str | None, unanalysable: str | None) -> Analysis:
    facts = StatementFacts(text=text.strip() or text, parse_error=parse_error,
                           unanalysable=unanalysable)
    return Analysis(text, (facts,), parse_error, unanalysable)

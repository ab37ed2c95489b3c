"""The console's text helpers: agent text stays literal, filters parse, times read well."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from rich.text import Text

from hoopops.audit.records import Filters
from hoopops.tui.format import (
    FilterError,
    ago,
    countdown,
    highlighted_sql,
    one_line,
    parse_filter,
    plain,
    pretty_sql,
)
from hoopops.tui.widgets.approval_detail import touched

NOW = 1778312125.0  # 2026-05-09T07:35:25Z


def test_agent_text_is_literal_and_control_characters_are_visible() -> None:
    text = plain("[bold]x[/bold] [/foo]\x1b[2J\x07")
    assert isinstance(text, Text)
    assert text.plain == "[bold]x[/bold] [/foo]\\x1b[2J\\x07"
    # No markup styling: the only spans mark the escapes (hoopops.display).
    assert [(s.start, s.end) for s in text.spans] == [(21, 25), (28, 32)]
    assert one_line("SELECT\n  '[/foo]'\t,  1").plain == "SELECT '[/foo]' , 1"
    assert one_line("x" * 50, limit=10).plain == "x" * 9 + "…"
    assert plain(None).plain == "∅"


def test_highlighted_sql_is_text_and_keeps_brackets() -> None:
    text = highlighted_sql("select '[/foo]' as [b]")  # not valid SQL: shown as sent
    assert "[/foo]" in text.plain and "[b]" in text.plain
    assert highlighted_sql("select 1 from t where a = 1").plain.startswith("SELECT 1")
    assert pretty_sql("selec 1") == "selec 1"
    huge = "SELECT '" + "x" * 200_000 + "'"
    assert "more characters" in highlighted_sql(huge).plain


@pytest.mark.parametrize(("query", "expected"), [
    ("identity:alice", Filters(identity="alice")),
    ("target:appdb decision:block", Filters(target="appdb", decision="block")),
    ("drop table", Filters(text="drop table")),
    ('text:"a:b" identity:bob', Filters(text="a:b", identity="bob")),
    ("since:2h until:30m", Filters(since=NOW - 7200, until=NOW - 1800)),
    ("since:2026-05-09T07:00", Filters(
        since=datetime(2026, 5, 9, 7, 0, tzinfo=UTC).timestamp())),
    ("now()::date", Filters(text="now()::date")),
    ("", Filters()),
])
def test_filter_syntax(query: str, expected: Filters) -> None:
    assert parse_filter(query, NOW) == expected


@pytest.mark.parametrize(("query", "message"), [
    ("decision:maybe", "allow, block, review"),
    ("who:alice", "unknown filter"),
    ("since:yesterday", "duration"),
    ('text:"unclosed', "cannot read"),
    ("identity:", "needs a value"),
])
def test_filter_errors_say_what_to_do(query: str, message: str) -> None:
    with pytest.raises(FilterError, match=message):
        parse_filter(query, NOW)


def test_times() -> None:
    assert ago(NOW - 5, NOW) == "5s"
    assert ago(NOW - 754, NOW) == "12m34"
    assert ago(NOW - 3 * 3600 - 300, NOW) == "3h05"
    assert ago(NOW - 2 * 86400 - 3600, NOW) == "2d01h"
    assert countdown(NOW + 95, NOW).plain == "1:35"
    assert countdown(NOW + 10, NOW).style == "bold red"
    assert countdown(NOW - 1, NOW).plain == "expired"


def test_touched_reads_both_fact_shapes() -> None:
    one = {"tables_read": ["public.a"], "tables_written": ["public.b"],
           "columns": ["public.a.x"], "columns_written": ["public.b.y"]}
    assert touched(one) == (["public.b", "public.a"], ["public.b.y", "public.a.x"])
    assert touched({"statements": [one, {"tables_read": ["public.c"]}]})[0] == [
        "public.b", "public.a", "public.c"]
    assert touched(None) == ([], [])

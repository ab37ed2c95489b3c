"""Drive exfiltration attempts through real clients and search what they got for secrets.

Each client (psql, asyncpg, psycopg text, psycopg binary) runs a case's statements on a
fresh connection and returns an :class:`Outcome`: every byte of data, notice, notification
and error text it received, rendered as lines, plus the errors (SQLSTATE, message).
:class:`Secrets` then looks for every seeded sensitive value in it, in the forms an
agent could turn it into (digits only, reversed, hex, base64, hashes, any case).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg

REFUSED = "42501"
_GRAM = 9  # the shortest secret form (an SSN's nine digits)


@dataclass(frozen=True)
class Case:
    """One exfiltration attempt: statements run in order on one connection.

    ``expect``: ``rows`` (every client must get data back, masked), ``error`` (the server
    fails it; the error text must not quote a value), ``refused`` (policy refuses it),
    ``any`` (rows or a refusal). ``copy`` = (source, psql/psycopg options, asyncpg kwargs)
    makes it a ``COPY (source) TO STDOUT``. ``listen`` names a channel to LISTEN on first.
    ``no_long_digits``: no run of 12+ digits may appear (card numbers after arithmetic).
    ``prefixes``: the first characters of SSNs and cards may not appear either.
    ``clients``: only these clients run it (a psql meta-command, several statements in
    one simple Query); empty: all of them.
    """

    id: str
    steps: tuple[str, ...]
    expect: str = "rows"
    copy: tuple[str, str, dict[str, Any]] | None = None
    listen: str | None = None
    no_long_digits: bool = False
    prefixes: bool = False
    clients: tuple[str, ...] = ()


def case(id: str, *steps: str, **kw: Any) -> Case:
    return Case(id, tuple(steps), **kw)


@dataclass
class Outcome:
    client: str
    lines: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    rows: int = 0

    def text(self) -> str:
        return "\n".join(self.lines)

    def refused(self) -> bool:
        """Refused by policy with a clear error: SQLSTATE 42501 naming the rule."""
        return any(code == REFUSED and ("rule " in msg or "hoopops" in msg)
                   for code, msg in self.errors)


# -- what counts as a leak ----------------------------------------------------------------


def _reverse(text: str) -> str:
    return text[::-1]


class Secrets:
    """Every seeded sensitive value in every form that would reveal it."""

    def __init__(self, ssns: Iterable[str], cards: Iterable[str], emails: Iterable[str],
                 phones: Iterable[str], ibans: Iterable[str]) -> None:
        self.ssns = list(ssns)
        self.cards = list(cards)
        plain: dict[str, str] = {}  # form (lower case) -> what it reveals
        alnum: dict[str, str] = {}  # form with only [0-9a-z], matched on the alnum view

        def add(kind: str, raw: str) -> None:
            low = raw.lower()
            what = f"{kind} {raw}"
            for form in (low, _reverse(low)):
                plain[form] = what
            raw_bytes = raw.encode()
            plain[raw_bytes.hex()] = f"{what} (hex)"
            plain[base64.b64encode(raw_bytes).decode().lower()] = f"{what} (base64)"
            plain[hashlib.md5(raw_bytes).hexdigest()] = f"{what} (md5)"
            plain[hashlib.sha256(raw_bytes).hexdigest()] = f"{what} (sha256)"
            squeezed = re.sub(r"[^0-9a-z]", "", low)
            if len(squeezed) >= _GRAM:
                alnum[squeezed] = f"{what} (squeezed)"
                alnum[_reverse(squeezed)] = f"{what} (squeezed, reversed)"

        for value in self.ssns:
            add("ssn", value)
        for value in self.cards:
            add("card", value)
        for value in emails:
            add("email", value)
            local = value.split("@")[0]
            if len(local) >= _GRAM:
                plain[local.lower()] = f"email {value} (local part)"
        for value in phones:
            add("phone", value)
            alnum[re.sub(r"\D", "", value)[1:]] = f"phone {value} (national digits)"
        for value in ibans:
            add("iban", value)
        self._plain = _index(plain)
        self._alnum = _index(alnum)

    def find(self, text: str, no_long_digits: bool = False, prefixes: bool = False
             ) -> list[str]:
        """What ``text`` reveals (empty when nothing)."""
        low = text.lower()
        hits = _scan(low, self._plain)
        for line in low.splitlines():
            hits += _scan(re.sub(r"[^0-9a-z]", "", line), self._alnum)
        if no_long_digits:  # (hex dumps of received bytes aside)
            numbers = re.sub(r"[.,e+\s]", "", re.sub(r"hex:[0-9a-f]*", " ", low))
            hits += [f"a {len(m)}-digit number ({m[:4]}...)" for m in re.findall(
                r"\d{12,}", numbers)]
        if prefixes:
            hits += [f"ssn prefix of {s}" for s in self.ssns if s[:7] in low]
            hits += [f"card prefix of {c}" for c in self.cards if c[:8] in low]
        return sorted(set(hits))


def _index(forms: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    index: dict[str, list[tuple[str, str]]] = {}
    for form, what in forms.items():
        index.setdefault(form[:_GRAM], []).append((form, what))
    return index


def _scan(text: str, index: dict[str, list[tuple[str, str]]]) -> list[str]:
    hits = []
    for i in range(len(text) - _GRAM + 1):
        found = index.get(text[i:i + _GRAM])
        if found:
            hits += [what for form, what in found if text.startswith(form, i)]
    return hits


# -- rendering values ----------------------------------------------------------------------


def render(value: Any) -> str:
    """A received value as text, in every form a leak could hide in."""
    if value is None:
        return "NULL"
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return f"hex:{data.hex()} {data.decode('latin-1')}"
    if isinstance(value, str):
        return value
    return f"{value!s} {value!r}"


def render_row(row: Sequence[Any]) -> str:
    return "|".join(render(v) for v in row)


# -- clients -------------------------------------------------------------------------------


def copy_statement(source: str, options: str) -> str:
    inner = source if source.lower().startswith(("select", "with", "values", "table")) \
        else f"SELECT * FROM {source}"
    return f"COPY ({inner}) TO STDOUT {options}".rstrip()


async def run_psql(psql: str, port: int, env: dict[str, str], item: Case) -> Outcome:
    out = Outcome("psql")
    steps = list(item.steps)
    if item.listen:
        steps.insert(0, f"LISTEN {item.listen}")
    if item.copy is not None:
        source, options, _ = item.copy
        steps.append(copy_statement(source, options))
    args = [psql, "-X", "-A", "-h", "127.0.0.1", "-p", str(port), "-U", "agent", "-d",
            "appdb", "-v", "ON_ERROR_STOP=0", "-v", "VERBOSITY=verbose", "-v",
            "SHOW_CONTEXT=always"]
    for step in steps:
        args += ["-c", step]
    stdout, stderr = await _run_bytes(args, env)
    # Binary COPY output is not text: keep every byte (latin-1 maps each to a character).
    text, errors = stdout.decode("latin-1"), stderr.decode("latin-1")
    out.lines += [*text.splitlines(), *errors.splitlines(), f"hex:{stdout.hex()}"]
    for match in re.finditer(r"(?m)^(?:psql:.*?)?ERROR:\s+([0-9A-Z]{5}): (.*)$", errors):
        out.errors.append((match.group(1), match.group(2)))
    out.rows += sum(int(n) for n in re.findall(r"(?m)^\((\d+) rows?\)$", text))
    if item.copy is not None or any(step.startswith("\\copy") for step in steps):
        out.rows += len([line for line in text.splitlines() if line.strip()])
    return out


async def _run_bytes(args: list[str], env: dict[str, str], within: float = 30
                     ) -> tuple[bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        return await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"psql did not finish within {within}s") from None


def _asyncpg_error(exc: asyncpg.PostgresError) -> tuple[str, str]:
    return exc.sqlstate or "", str(getattr(exc, "message", None) or exc)


async def run_asyncpg(dsn: str, item: Case) -> Outcome:
    """asyncpg: binary format for every type it has a codec for; a single-statement case
    is fetched twice, so the second run binds the cached statement and executes the
    portal without describing it."""
    out = Outcome("asyncpg")
    conn = await asyncpg.connect(dsn, statement_cache_size=100)

    def on_log(_conn: Any, message: Any) -> None:
        out.lines.append(f"NOTICE {message.as_dict()!r}")

    def on_notify(_conn: Any, pid: int, channel: str, payload: str) -> None:
        out.lines.append(f"NOTIFY {channel} {payload}")

    conn.add_log_listener(on_log)
    try:
        if item.listen:
            await conn.add_listener(item.listen, on_notify)
        runs = list(item.steps)
        if len(runs) == 1:
            runs.append(runs[0])
        for step in runs:
            try:
                records = await conn.fetch(step)
            except asyncpg.PostgresError as exc:
                out.errors.append(_asyncpg_error(exc))
                out.lines.append(f"ERROR {exc.as_dict()!r}")
                continue
            out.rows += len(records)
            out.lines += [render_row(tuple(r.values())) for r in records]
        if item.copy is not None:
            source, _, kwargs = item.copy
            buf = io.BytesIO()
            try:
                if source.lower().startswith(("select", "with", "values", "table")):
                    await conn.copy_from_query(source, output=buf, **kwargs)
                else:
                    await conn.copy_from_table(source, output=buf, **kwargs)
            except asyncpg.PostgresError as exc:
                out.errors.append(_asyncpg_error(exc))
                out.lines.append(f"ERROR {exc.as_dict()!r}")
            data = buf.getvalue()
            out.rows += data.count(b"\n") if kwargs.get("format") != "binary" else len(data)
            out.lines += [*data.decode("latin-1").splitlines(), f"hex:{data.hex()}"]
        await _settle(conn)
    finally:
        await conn.close()
    return out


async def _settle(conn: asyncpg.Connection) -> None:
    """Let notifications that arrived with the last reply be dispatched."""
    await conn.fetchval("SELECT 1")


def _diag(diag: Any) -> str:
    parts = [getattr(diag, name, None) for name in (
        "sqlstate", "message_primary", "message_detail", "message_hint", "context",
        "internal_query", "statement_position", "schema_name", "table_name", "column_name",
        "constraint_name")]
    return " | ".join(str(p) for p in parts if p)


async def run_psycopg(dsn: str, item: Case, binary: bool) -> Outcome:
    """psycopg 3: text or binary results; the binary run prepares single statements
    (named protocol-level prepared statements)."""
    out = Outcome("psycopg-binary" if binary else "psycopg-text")
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    conn.add_notice_handler(lambda diag: out.lines.append(f"NOTICE {_diag(diag)}"))
    conn.add_notify_handler(lambda n: out.lines.append(f"NOTIFY {n.channel} {n.payload}"))
    try:
        steps = list(item.steps)
        if item.listen:
            steps.insert(0, f"LISTEN {item.listen}")
        prepare = binary and len(item.steps) == 1
        for step in steps:
            try:
                cur = conn.cursor(binary=binary)
                await cur.execute(step, prepare=prepare if step in item.steps else None)
                while True:
                    if cur.description is not None:
                        rows = await cur.fetchall()
                        out.rows += len(rows)
                        out.lines += [render_row(r) for r in rows]
                    if not cur.nextset():
                        break
            except psycopg.Error as exc:
                diag = exc.diag
                out.errors.append((diag.sqlstate or "", diag.message_primary or str(exc)))
                out.lines.append(f"ERROR {_diag(diag)} {exc}")
        if item.copy is not None:
            source, options, _ = item.copy
            data = bytearray()
            try:
                cur = conn.cursor()
                async with cur.copy(copy_statement(source, options)) as copy:
                    async for chunk in copy:
                        data += chunk
            except psycopg.Error as exc:
                out.errors.append((exc.diag.sqlstate or "", exc.diag.message_primary or ""))
                out.lines.append(f"ERROR {_diag(exc.diag)} {exc}")
            out.rows += len(data)
            out.lines += [*bytes(data).decode("latin-1").splitlines(), f"hex:{bytes(data).hex()}"]
        await conn.execute("SELECT 1")
    finally:
        await conn.close()
    return out

"""Drivers' own housekeeping passes the shipped policy without waiting for an analyst."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent


async def test_asyncpg_type_introspection_is_not_held(gateway_factory, pg, tmp_path) -> None:
    # asyncpg introspects non-built-in types and wraps that in set_config('jit', ...);
    # the shipped policy must treat that like SET, not as a write waiting for review.
    type_name = f"pair_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE TYPE public.{type_name} AS (a int, b text)", database="app")
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    gateway = await gateway_factory("approvals:\n  timeout: 2s\n", policies=policies)
    conn = await asyncpg.connect(gateway.dsn())
    try:
        value = await conn.fetchval(f"SELECT (7, 'x')::public.{type_name}", timeout=10)
        assert tuple(value) == (7, "x")
    finally:
        await conn.close()
        pg.psql(f"DROP TYPE public.{type_name}", database="app")

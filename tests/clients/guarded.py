"""What the JDBC and node-postgres tests share: a table with one sensitive column, a
policy folder that refuses DROP TABLE and masks that column, and an expired token."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import jwt

from hoopops.devdb import LocalPostgres
from tests.conftest import AUDIENCE, ISSUER, JWT_SECRET

# Everything runs except DROP TABLE, and one column of the test's own table is masked.
POLICY = """\
default: allow
rules:
  - id: no-drop-table
    description: dropping tables is not allowed here
    when: {{statement_types: [DropStmt]}}
    action: block
masking:
  columns:
    "*.{table}.ssn": last4
"""

REFUSAL = ("hoopops blocked this statement (rule no-drop-table: dropping tables is not "
           "allowed here)")


def people_table(pg: LocalPostgres, prefix: str) -> str:
    """A new table in the target database with one person whose ssn the policy masks."""
    table = f"{prefix}_people_{secrets.token_hex(4)}"
    pg.psql(f"CREATE TABLE public.{table} (id int PRIMARY KEY, name text, ssn text);"
            f"INSERT INTO public.{table} VALUES (1, 'Ann', '123-45-6789');"
            f"GRANT ALL ON public.{table} TO hoopops_svc;", database="app")
    return table


def policy_folder(tmp_path: Path, table: str) -> Path:
    """A policies folder holding POLICY for ``table``."""
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "policy.yaml").write_text(POLICY.format(table=table))
    return folder


def expired_token() -> str:
    """A correctly signed token that expired an hour ago (well past the leeway)."""
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "agent-1", "groups": ["agents"],
                       "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600},
                      JWT_SECRET, algorithm="HS256")

"""A hoopops.yaml for CLI tests that only read or write the audit store: its target is
never dialled, so any address will do."""

from __future__ import annotations


def store_config(audit_path: str = "audit.db", extra: str = "") -> str:
    """Config text whose audit store is ``audit_path`` (relative to the file), plus
    ``extra`` YAML (an ``approvals:`` section, say)."""
    return f"""\
targets:
  main:
    upstream: postgresql://gateway@127.0.0.1:5432/app
identity:
  hs256_secret: "0123456789abcdef0123456789abcdef"
audit:
  path: {audit_path}
{extra}"""

"""Verify agent JWTs and turn their claims into an Identity."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Identity:
    """Who is connected, as proven by a verified token."""

    subject: str
    groups: tuple[str, ...]
    issuer: str | None
    token_id: str | None
    expires_at: float | None
    claims: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

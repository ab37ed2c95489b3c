"""Shared fixtures: one real PostgreSQL per test run, gateways configured per test."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hoopops.config import Config, load_config
from hoopops.devdb import LocalPostgres

JWT_SECRET = "test-secret-0123456789-abcdefghijklmnop"
ISSUER = "https://idp.example.test"
AUDIENCE = "hoopops"


@pytest.fixture(scope="session")
def pg() -> Iterator[LocalPostgres]:
    """A real PostgreSQL (SCRAM auth on) shared by the whole test run.

    Its folder is outside pytest's temp root, which pytest keeps private (mode 700) and
    the server's own unprivileged user could then not reach.
    """
    server = LocalPostgres().start()
    try:
        yield server
    finally:
        server.stop(remove=True)


def psql_path(pg: LocalPostgres) -> str:
    """The psql to drive tests with: the system one if present, else the bundled one."""
    return shutil.which("psql") or pg.tool("psql")


def write_config(folder: Path, pg: LocalPostgres, extra: str = "", policies: Path | None = None,
                 audit: bool = False, listen: str = "127.0.0.1:0",
                 synchronous: str | None = None) -> Path:
    lines = [
        f"listen: {listen}",
        "targets:",
        "  appdb:",
        f"    upstream: {pg.dsn()}",
        "identity:",
        f"  issuer: {ISSUER}",
        f"  audience: {AUDIENCE}",
        f"  hs256_secret: {JWT_SECRET}",
    ]
    if policies is not None:
        lines.append(f"policies: {policies}")
    if audit:
        lines += ["audit:", f"  path: {folder / 'audit.db'}"]
        if synchronous is not None:
            lines.append(f"  synchronous: {synchronous}")
    else:
        lines += ["audit:", "  enabled: false", f"  path: {folder / 'audit.db'}"]
    path = folder / "hoopops.yaml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@dataclass
class RunningGateway:
    gateway: object
    config: Config
    port: int

    def token(self, sub: str = "agent-1", groups: tuple[str, ...] = ("agents",),
              ttl: float = 600) -> str:
        from hoopops.identity import mint_token

        return mint_token(self.config.identity, sub, list(groups), ttl)

    def env(self, token: str | None = None) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": token or self.token(), "PGCONNECT_TIMEOUT": "10"}

    def dsn(self, token: str | None = None, user: str = "agent") -> str:
        return (f"postgresql://{user}:{token or self.token()}@127.0.0.1:{self.port}/appdb"
                "?sslmode=disable")


@pytest.fixture
async def gateway_factory(tmp_path: Path, pg: LocalPostgres) -> AsyncIterator[object]:
    """Start gateways from config text; all are stopped at the end of the test."""
    from hoopops.gateway import build_gateway

    started: list[object] = []

    async def start(extra: str = "", policies: Path | None = None,
                    audit: bool = False) -> RunningGateway:
        path = write_config(tmp_path, pg, extra, policies, audit)
        config = load_config(path)
        gateway = await build_gateway(config)
        await gateway.start()
        started.append(gateway)
        return RunningGateway(gateway, config, gateway.port)

    yield start
    for gateway in started:
        await gateway.stop(grace=1)  # type: ignore[attr-defined]


@pytest.fixture
async def gateway(gateway_factory: object) -> RunningGateway:
    """A gateway with no policy folder: a plain authenticated relay."""
    return await gateway_factory()  # type: ignore[operator]

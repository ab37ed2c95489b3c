"""Start a gateway from a complete hoopops.yaml (for tests that need their own targets)."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg

from hoopops.config import load_config
from hoopops.devdb import LocalPostgres
from tests.clients.rawpg import RawClient
from tests.conftest import AUDIENCE, ISSUER, JWT_SECRET, RunningGateway


async def serves(gw: RunningGateway) -> None:
    """A normal client still gets answers."""
    conn = await asyncpg.connect(gw.dsn())
    try:
        assert await conn.fetchval("select 'still serving'") == "still serving"
    finally:
        await conn.close()


async def logged_in(gw: RunningGateway) -> RawClient:
    """A raw-protocol client, logged in and ready for a query."""
    raw = await RawClient.open(gw.port)
    reply = await raw.login(gw.token())
    assert reply.types().endswith(b"Z"), reply.errors()
    return raw


def config_text(targets: dict[str, str], extra: str = "", listen: str = "127.0.0.1:0") -> str:
    lines = [f"listen: {listen}", "targets:"]
    for name, dsn in targets.items():
        lines += [f"  {name}:", f"    upstream: {dsn}"]
    lines += ["identity:", f"  issuer: {ISSUER}", f"  audience: {AUDIENCE}",
              f"  hs256_secret: {JWT_SECRET}", "audit:", "  enabled: false"]
    return "\n".join(lines) + "\n" + extra


class GatewayPool:
    """Gateways started by one test; ``close()`` stops them all."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[object] = []

    async def start(self, targets: dict[str, str], extra: str = "",
                    listen: str = "127.0.0.1:0") -> RunningGateway:
        from hoopops.gateway import build_gateway

        path = self.folder / f"hoopops-{len(self.started)}.yaml"
        path.write_text(config_text(targets, extra, listen))
        config = load_config(path)
        gateway = await build_gateway(config)
        await gateway.start()
        self.started.append(gateway)
        return RunningGateway(gateway, config, gateway.port)

    async def close(self) -> None:
        for gateway in self.started:
            await gateway.stop(grace=1)  # type: ignore[attr-defined]


def default_targets(pg: LocalPostgres) -> dict[str, str]:
    return {"appdb": pg.dsn()}


def env_with(token: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "PGPASSWORD": token, "PGCONNECT_TIMEOUT": "10", **extra}

"""Everything the demo needs on a fresh machine: a database, data, config, tokens, agents."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from hoopops.config import Config, load_config
from hoopops.demo.seed import seed
from hoopops.devdb import LocalPostgres
from hoopops.identity import mint_token

log = logging.getLogger("hoopops.demo")

DEMO_SECRET = "hoopops-demo-only-secret-do-not-use-in-production"
DEMO_POLICY = """# Demo-only additions to the shipped policy (tried first: file-name order).
rules:
  - id: no-destructive-ddl
    description: Agents never drop or truncate tables
    when: {statement_types: [DropStmt, TruncateStmt]}
    action: block
"""

AGENTS = {
    "claude-code": ("agents",),
    "cursor-agent": ("agents",),
    "etl-bot": ("agents", "etl"),
}


def shipped_policies() -> Path:
    """The policy set shipped with hoopops (``policies/`` beside the package)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "policies", here / "data" / "policies"):
        if (candidate / "default.yaml").exists():
            return candidate
    raise FileNotFoundError("cannot find the shipped policies folder (policies/default.yaml)")


@dataclass
class DemoEnvironment:
    """An embedded PostgreSQL with fake PII and a ready hoopops.yaml in a temp folder."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hoopops-demo-")))
    pg: LocalPostgres | None = None
    config_path: Path | None = None
    listen_port: int = 0
    approval_timeout: str = "120s"

    async def start(self) -> Config:
        self.pg = await asyncio.to_thread(lambda: LocalPostgres(self.root / "pg").start())
        conn = await asyncpg.connect(self.pg.dsn())
        try:
            await seed(conn)
        finally:
            await conn.close()
        policies = self.root / "policies"
        shutil.copytree(shipped_policies(), policies)
        # Sorted before default.yaml, so it is tried first: the demo shows a block for
        # destructive DDL where the shipped policy would only ask for review.
        (policies / "00-demo.yaml").write_text(DEMO_POLICY, encoding="utf-8")
        self.config_path = self.root / "hoopops.yaml"
        self.config_path.write_text(
            f"""# hoopops demo configuration (temporary; removed on exit)
listen: 127.0.0.1:{self.listen_port}
targets:
  appdb:
    upstream: {self.pg.dsn()}
identity:
  issuer: https://idp.demo.hoopops
  audience: hoopops
  hs256_secret: {DEMO_SECRET}
  groups_claim: groups
policies: {policies}
audit:
  path: {self.root / 'audit.db'}
approvals:
  timeout: {self.approval_timeout}
masking:
  hmac_secret: {DEMO_SECRET}-masking
""", encoding="utf-8")
        return load_config(self.config_path)

    def token(self, config: Config, subject: str, groups: tuple[str, ...] = ("agents",),
              ttl: float = 3600) -> str:
        return mint_token(config.identity, subject, list(groups), ttl)

    @staticmethod
    def psql_line(config: Config, port: int, token: str, user: str = "you") -> str:
        conninfo = (f"host=127.0.0.1 port={port} dbname=appdb user={user} sslmode=disable "
                    "application_name=psql-demo")
        return f"PGPASSWORD={shlex.quote(token)} psql {shlex.quote(conninfo)}"

    def stop(self) -> None:
        if self.pg is not None:
            self.pg.stop(remove=False)
        shutil.rmtree(self.root, ignore_errors=True)


# What simulated agents run: (agent, sql, pause seconds after). A realistic mix of
# routine reads, PII reads that get masked, risky writes held for approval, and DDL and
# dangerous calls that policy blocks.
SCRIPT: list[tuple[str, str]] = [
    ("claude-code", "SELECT count(*) FROM orders WHERE status = 'paid'"),
    ("claude-code", "SELECT id, full_name, city FROM customers ORDER BY id LIMIT 5"),
    ("cursor-agent", "SELECT id, full_name, email, ssn FROM customers ORDER BY id LIMIT 3"),
    ("etl-bot", "SELECT c.full_name, a.iban, a.balance_cents FROM customers c "
                "JOIN accounts a ON a.customer_id = c.id ORDER BY a.balance_cents DESC LIMIT 3"),
    ("claude-code", "SELECT note FROM customers WHERE note LIKE 'Called%' LIMIT 2"),
    ("cursor-agent", "UPDATE orders SET status = 'shipped' WHERE id = 7"),
    ("claude-code", "DROP TABLE orders"),
    ("etl-bot", "SELECT pg_read_file('/etc/passwd')"),
    ("cursor-agent", "SELECT p.name, sum(o.quantity) FROM orders o JOIN products p "
                     "ON p.id = o.product_id GROUP BY p.name ORDER BY 2 DESC"),
    ("claude-code", "DELETE FROM orders"),
    ("etl-bot", "SELECT card_number AS x FROM customers LIMIT 2"),
    ("cursor-agent", "WITH gone AS (DELETE FROM orders WHERE id = 3 RETURNING *) "
                     "SELECT count(*) FROM gone"),
]


async def run_agents(config: Config, port: int, env: DemoEnvironment,
                     stop: asyncio.Event, rounds: int | None = None,
                     pace: float = 1.5) -> None:
    """Connect each agent with asyncpg and replay the script until ``stop`` is set."""
    conns: dict[str, Any] = {}
    try:
        for agent, groups in AGENTS.items():
            conns[agent] = await asyncpg.connect(
                host="127.0.0.1", port=port, user=agent, database="appdb", ssl=False,
                password=env.token(config, agent, groups),
                server_settings={"application_name": f"{agent}/demo"})
        done = 0
        while not stop.is_set() and (rounds is None or done < rounds):
            for agent, sql in SCRIPT:
                if stop.is_set():
                    break
                task = asyncio.ensure_future(_run_one(conns[agent], sql))
                _inflight.add(task)
                task.add_done_callback(_inflight.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pace)
            done += 1
    finally:
        for conn in conns.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)


_busy: set[int] = set()
_inflight: set[asyncio.Future[None]] = set()


async def _run_one(conn: Any, sql: str) -> None:
    # One statement at a time per connection; a held statement makes its agent skip turns.
    if id(conn) in _busy:
        return
    _busy.add(id(conn))
    try:
        await conn.fetch(sql)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        log.debug("demo agent statement ended with %s", exc)
    finally:
        _busy.discard(id(conn))

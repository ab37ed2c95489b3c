"""Wire the configuration into a running gateway: identity, policy, audit, masking, proxy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

import asyncpg

from hoopops import events
from hoopops.approvals import ApprovalBroker
from hoopops.audit import open_store
from hoopops.audit.store import AuditError, AuditStore
from hoopops.config import Config
from hoopops.identity import KeySourceError, TokenVerifier
from hoopops.policy import PolicyEngine
from hoopops.proxy.catalog import Catalog
from hoopops.proxy.enforcer import Enforcer
from hoopops.proxy.gate import StatementGate
from hoopops.proxy.server import GatewayServer
from hoopops.sql_catalog import SqlCatalog
from hoopops.yamlfile import YamlFileError

log = logging.getLogger("hoopops.gateway")


class GatewayConfigError(Exception):
    """A component could not start; the message says which and why (one line)."""


class Gateway:
    """Everything ``hoopops serve`` and ``hoopops console`` run, started and stopped as one."""

    def __init__(self, config: Config, bus: events.EventBus | None = None,
                 gate: StatementGate | None = None) -> None:
        self.config = config
        self.bus = bus or events.EventBus()
        self.verifier = TokenVerifier(config.identity)
        self.gate = gate or StatementGate()
        self.server = GatewayServer(config, self.verifier, self.gate, self.bus)
        self.started_at: float | None = None
        self._stopped = asyncio.Event()
        self.store: AuditStore | None = None
        self.broker: ApprovalBroker | None = None
        self.engine: PolicyEngine | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def sessions(self) -> dict[str, Any]:
        return self.server.registry.sessions

    async def start(self) -> None:
        await self.server.start()
        self.started_at = time.time()
        if self.engine is not None:
            self._watch = asyncio.create_task(self.engine.watch(
                on_reload=lambda result: self._on_reload(result)))
        if self.store is not None:
            with contextlib.suppress(AuditError):
                await self.store.close_orphaned_sessions("gateway restarted")
                await self.store.gateway_event(events.GATEWAY_STARTED, {
                    "listen": f"{self.config.listen_host}:{self.port}",
                    "policy_version": self.engine.version if self.engine else None})
        self.bus.publish(events.GATEWAY_STARTED, listen=f"{self.config.listen_host}:{self.port}",
                         targets=sorted(self.config.targets))
        log.info("hoopops listening on %s:%s", self.config.listen_host, self.port)

    async def stop(self, grace: float | None = None) -> None:
        await self.server.close(self.config.limits.shutdown_grace if grace is None else grace)
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(BaseException):
                await self._watch
        if self.broker is not None:
            await self.broker.close()
        drain = getattr(self.gate, "drain", None)
        if drain is not None:
            await drain()
        if self.store is not None:
            with contextlib.suppress(AuditError):
                await self.store.gateway_event(events.GATEWAY_STOPPED, {})
            await self.store.close()
        self.bus.publish(events.GATEWAY_STOPPED)
        self._stopped.set()

    def target_health(self) -> dict[str, str]:
        """Each target's state as last seen by a session's connect ("unknown" before)."""
        seen = self.server.target_health
        return {name: seen.get(name, "unknown") for name in self.config.targets}

    def kill_session(self, session_id: str, reason: str = "terminated by an analyst") -> bool:
        session = self.server.registry.sessions.get(session_id)
        if session is None:
            return False
        session.kill(reason)
        return True

    async def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM, then shut down cleanly (SIGHUP reloads policy)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.stop()

    def reload(self) -> None:
        """SIGHUP: reload the policies; an invalid new version leaves the old in force."""
        if self.engine is None:
            return
        self._on_reload(self.engine.reload())

    def _on_reload(self, result: Any) -> None:
        if result.error is not None:
            log.error("policy reload refused, the previous policy stays in force: %s",
                      result.error)
        elif result.changed:
            log.info("policy reloaded: version %s", result.version)
            changed = getattr(self.gate, "policies_changed", None)
            if changed is not None:
                changed()
        if self.store is not None and (result.changed or result.error is not None):
            task = asyncio.ensure_future(self.store.gateway_event(events.POLICY_RELOADED, {
                "version": result.version,
                "error": str(result.error) if result.error else None}))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        for catalog in getattr(self.gate, "catalogs", {}).values():
            catalog.invalidate()


async def build_gateway(config: Config, bus: events.EventBus | None = None) -> Gateway:
    """The gateway with every component the configuration asks for.

    Raises GatewayConfigError with a one-line reason when a component cannot start.
    """
    bus = bus or events.EventBus()
    engine = None
    if config.policies is not None:
        try:
            engine = PolicyEngine(config.policies, bus=bus)
        except YamlFileError as exc:
            raise GatewayConfigError(f"policy error: {exc}") from None
    else:
        log.warning("no 'policies:' folder configured: every statement is allowed "
                    "(a plain authenticated relay)")
    try:
        store = await open_store(config.audit, synchronous=config.audit.synchronous)
    except AuditError as exc:
        raise GatewayConfigError(f"audit store: {exc}") from None
    broker = ApprovalBroker.from_config(store, bus, config.approvals)
    catalogs: dict[str, SqlCatalog] = {}
    column_catalogs: dict[str, Catalog] = {}
    if engine is not None:
        for name, target in config.targets.items():
            catalogs[name] = SqlCatalog(_connector(target.upstream))
            column_catalogs[name] = Catalog(_LazyFetcher(target.upstream))
    try:
        gate = Enforcer(config, bus, engine, store, broker, catalogs, column_catalogs)
    except YamlFileError as exc:
        await store.close()
        raise GatewayConfigError(f"masking policy error: {exc}") from None
    try:
        gateway = Gateway(config, bus, gate)
    except KeySourceError as exc:
        await store.close()
        raise GatewayConfigError(f"identity: {exc}") from None
    gateway.store = store
    gateway.broker = broker
    gateway.engine = engine
    return gateway


class _LazyFetcher:
    """An asyncpg connection on the service credential, opened on first use and reopened
    after a failure (the catalog's lookups then fail closed until it is back)."""

    def __init__(self, upstream: Any) -> None:
        self.upstream = upstream
        self._conn: Any = None

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(**self.upstream.asyncpg_kwargs())
        try:
            return list(await self._conn.fetch(query, *args))
        except (OSError, asyncpg.InterfaceError):
            self._conn = None
            raise


def _connector(upstream: Any) -> Any:
    async def connect() -> Any:
        return await asyncpg.connect(**upstream.asyncpg_kwargs())
    return connect

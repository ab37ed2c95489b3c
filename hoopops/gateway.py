"""Wire the configuration into a running gateway: identity, policy, audit, masking, proxy."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from hoopops import events
from hoopops.config import Config
from hoopops.identity import TokenVerifier
from hoopops.proxy.gate import StatementGate
from hoopops.proxy.server import GatewayServer

log = logging.getLogger("hoopops.gateway")


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

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def sessions(self) -> dict[str, Any]:
        return self.server.registry.sessions

    async def start(self) -> None:
        await self.server.start()
        self.started_at = time.time()
        self.bus.publish(events.GATEWAY_STARTED, listen=f"{self.config.listen_host}:{self.port}",
                         targets=sorted(self.config.targets))
        log.info("hoopops listening on %s:%s", self.config.listen_host, self.port)

    async def stop(self, grace: float | None = None) -> None:
        await self.server.close(self.config.limits.shutdown_grace if grace is None else grace)
        self.bus.publish(events.GATEWAY_STOPPED)
        self._stopped.set()

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
        reload = getattr(self.gate, "reload", None)
        if reload is not None:
            reload()


async def build_gateway(config: Config, bus: events.EventBus | None = None) -> Gateway:
    """The gateway with every component the configuration asks for."""
    return Gateway(config, bus)

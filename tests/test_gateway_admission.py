"""Who makes room at the connection cap (``limits.max_connections``).

A newcomer at the cap displaces a connection that has not authenticated yet, so sockets
that connect and stall cannot lock agents out. The one displaced is the one that has come
least far through startup (then from the busiest address, then the oldest): a flood of
silent sockets displaces its own, never an agent that is already presenting its token,
even when that agent's connection is the oldest.
"""

from __future__ import annotations

import asyncpg

from tests.clients.rawpg import RawClient, startup_packet
from tests.conftest import RunningGateway


async def test_flood_displaces_silent_sockets_not_an_agent_mid_startup(
        gateway_factory: object) -> None:
    gw: RunningGateway = await gateway_factory("limits:\n  max_connections: 10\n")  # type: ignore
    agent = await RawClient.open(gw.port)  # the oldest connection of all
    flood: list[RawClient] = []
    try:
        await agent.send(startup_packet({"user": "agent", "database": "appdb"}))
        assert (await agent.read_message())[0] == b"R"  # asked for its token
        for _ in range(30):  # far more than the cap; each displaces a silent one
            raw = await RawClient.open(gw.port)
            await raw.send(b"\x00\x00")
            flood.append(raw)
        # The agent was never displaced: its token is still welcome.
        token = gw.token().encode() + b"\0"
        await agent.send(b"p" + (len(token) + 4).to_bytes(4, "big") + token)
        reply = await agent.read_until(b"ZE")
        assert reply.types().endswith(b"Z"), reply.errors()
        # And an agent connecting now gets in too, displacing a silent socket.
        conn = await asyncpg.connect(gw.dsn(gw.token("late-agent")))
        assert await conn.fetchval("select 1") == 1
        await conn.close()
    finally:
        await agent.close()
        for raw in flood:
            await raw.close()

"""``hoopops demo``: see hoopops work in one command, with nothing to set up."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from hoopops import eventloop, events


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo", help="run a self-contained demo (embedded PostgreSQL, fake PII, agents)",
        description="Start an embedded PostgreSQL seeded with fake PII, a gateway with the "
        "shipped policies, simulated agents, and the console. Prints a psql line with a "
        "fresh token so you can act as an agent yourself. Everything is removed on exit.")
    parser.add_argument("--headless", action="store_true",
                        help="no console: run the gateway and agents, print the psql line")
    parser.add_argument("--no-agents", action="store_true", help="do not run simulated agents")
    parser.add_argument("--port", type=int, default=0, help="gateway port (default: any free)")
    parser.add_argument("--approval-timeout", default="120s",
                        help="how long held statements wait for a decision (default 120s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from hoopops.demo.environment import DemoEnvironment
    except ImportError as exc:
        print(f"hoopops: the demo needs the demo extra: pip install -e '.[demo]' ({exc})",
              file=sys.stderr)
        return 2
    env = DemoEnvironment(listen_port=args.port, approval_timeout=args.approval_timeout)
    try:
        if args.headless:
            return eventloop.run(_headless(env, args))
        return _console(env, args)
    except KeyboardInterrupt:
        return 130
    finally:
        env.stop()


async def _start(env: object, args: argparse.Namespace, bus: events.EventBus) -> tuple:
    from hoopops.gateway import build_gateway

    config = await env.start()  # type: ignore[attr-defined]
    gateway = await build_gateway(config, bus)
    await gateway.start()
    token = env.token(config, "you", ("humans",))  # type: ignore[attr-defined]
    line = env.psql_line(config, gateway.port, token)  # type: ignore[attr-defined]
    return config, gateway, line


async def _headless(env: object, args: argparse.Namespace) -> int:
    from hoopops.demo.environment import run_agents

    logging.basicConfig(level=logging.WARNING)
    bus = events.EventBus()
    config, gateway, line = await _start(env, args, bus)
    print(f"hoopops demo gateway listening on 127.0.0.1:{gateway.port} (target: appdb)")
    print(f"config: {env.config_path}")  # type: ignore[attr-defined]
    print("connect as an agent with:")
    print(f"  {line}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    agents = None
    if not args.no_agents:
        agents = asyncio.create_task(run_agents(config, gateway.port, env, stop))
    await stop.wait()
    if agents is not None:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(agents, 5)
    await gateway.stop(grace=1)
    print("hoopops demo stopped; temporary files removed")
    return 0


def _console(env: object, args: argparse.Namespace) -> int:
    from hoopops.tui.runner import run_console_demo

    return run_console_demo(env, args, _start)

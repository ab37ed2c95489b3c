"""``hoopops serve``: run the gateway alone (no console)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from hoopops.cli.common import add_config_argument, load_config_or_exit


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the gateway (no console)",
        description="Run the hoopops gateway: agents connect with their usual PostgreSQL "
        "client and a token as the password. SIGINT/SIGTERM stop accepting, let sessions "
        "finish for limits.shutdown_grace, then close; SIGHUP reloads the policies.")
    add_config_argument(parser)
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config_or_exit(args.config)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    from hoopops.gateway import build_gateway

    async def main() -> None:
        gateway = await build_gateway(config)
        await gateway.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0

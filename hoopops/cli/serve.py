"""``hoopops serve``: run the gateway alone (no console)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from hoopops import eventloop
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
    from hoopops.gateway import GatewayConfigError, build_gateway

    async def main() -> int:
        try:
            gateway = await build_gateway(config)
        except GatewayConfigError as exc:
            print(f"hoopops: {exc}", file=sys.stderr)
            return 2
        try:
            await gateway.serve_forever()
        except OSError as exc:
            print(f"hoopops: cannot listen on {config.listen}: {exc.strerror}", file=sys.stderr)
            return 1
        return 0

    with contextlib.suppress(KeyboardInterrupt):
        return eventloop.run(main())
    return 130

"""The ``hoopops`` command: each subcommand lives in its own module with ``register()``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from hoopops import __version__

# Each module exposes ``register(subparsers)``, which adds its parser(s) and sets
# ``func(args) -> int`` as the handler.
_COMMAND_MODULES = (
    "hoopops.cli.serve",
    "hoopops.cli.console",
    "hoopops.cli.demo",
    "hoopops.cli.token",
    "hoopops.cli.policy",
    "hoopops.cli.audit",
    "hoopops.cli.approvals",
    "hoopops.cli.replay",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hoopops",
        description="PostgreSQL gateway for AI agents: verified identity, parse-tree policy, "
        "masking, tamper-evident audit, and a console for the on-call analyst.",
    )
    parser.add_argument("--version", action="version", version=f"hoopops {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`hoopops audit export | head`): stop quietly, and keep
        # Python from complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())

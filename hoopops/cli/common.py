"""Helpers shared by subcommands: loading the config with a clean error, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hoopops.config import Config, ConfigError, load_config
from hoopops.display import terminal


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default="hoopops.yaml",
                        help="path to hoopops.yaml (default: ./hoopops.yaml)")


def load_config_or_exit(path: str) -> Config:
    """The config, or a one-line error on stderr and exit status 2 (never a traceback)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"hoopops: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str, sort_keys=False)
    sys.stdout.write("\n")


def fail(message: str, status: int = 1) -> int:
    # Messages quote what they failed on (session ids, store errors): never raw.
    print(f"hoopops: {terminal(message, layout=True)}", file=sys.stderr)
    return status

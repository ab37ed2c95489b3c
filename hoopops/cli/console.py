"""``hoopops console``: the gateway and the analyst's dashboard in one process."""

from __future__ import annotations

import argparse
from pathlib import Path

from hoopops.cli.common import add_config_argument, load_config_or_exit


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "console", help="run the gateway with the analyst's console (or attach to a store)",
        description="Start the gateway and a terminal dashboard in one process: live "
        "sessions, pending approvals (a approve, s approve for the session, d deny), masking "
        "hits, history and replay from the audit store (r in the replay viewer re-runs a "
        "session in the sandbox database). SIGHUP reloads the policies, as for hoopops "
        "serve; SIGTERM quits. With --attach, no gateway is "
        "started: the console opens the audit store named in the config, and approvals "
        "decided there reach the gateway that holds the statement. Press ? in any view for "
        "its keys; remap them under console.keymap in hoopops.yaml.")
    add_config_argument(parser)
    parser.add_argument("--attach", action="store_true",
                        help="open on the audit store only; do not run a gateway")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="write the gateway's log here (the terminal belongs to the "
                        "console; warnings also appear as notifications)")
    parser.add_argument("--export-dir", type=Path, default=None,
                        help="where e writes evidence files (default: current directory)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config_or_exit(args.config)
    from hoopops.tui.runner import run_console

    return run_console(config, attach=args.attach, log_file=args.log_file,
                       export_dir=args.export_dir)

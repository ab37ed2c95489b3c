"""Run ``hoopops serve`` in this process, optionally on uvloop (an experiment knob).

    python benchmarks/_gateway_runner.py [--uvloop] serve --config hoopops.yaml

The benchmark starts the gateway through this file only when asked for ``--uvloop``, to
measure what the event loop alone is worth without touching the package: hoopops uses
``asyncio.run``, which picks the loop from the policy set here.
"""

from __future__ import annotations

import asyncio
import sys


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--uvloop":
        argv = argv[1:]
        import uvloop  # not a hoopops dependency: install it to run this experiment

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from hoopops.cli import main as hoopops_main

    return hoopops_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Run the gateway's event loop: uvloop when installed (``pip install 'hoopops[fast]'``).

uvloop's libuv-based loop cuts a Python relay's CPU per statement by roughly a quarter
to a third (benchmarks/README.md, calibration: a bare Protocol relay 31 → 22 µs/tx; the
gateway measured with benchmarks/bench_gateway.py --compare-uvloop); the standard loop
works the same, only slower. ``HOOPOPS_EVENT_LOOP=asyncio`` forces the standard loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_name() -> str:
    if os.environ.get("HOOPOPS_EVENT_LOOP", "").lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    if loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)

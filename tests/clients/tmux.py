"""Drive a program in a tmux pane the way a person at a terminal would: type, then read
the screen."""

from __future__ import annotations

import asyncio
import subprocess
import time


def tmux(*args: str) -> str:
    """Run one tmux command; its standard output."""
    done = subprocess.run(["tmux", *args], capture_output=True, text=True, check=False,
                          timeout=10)
    return done.stdout


async def wait_pane(name: str, needle: str, within: float = 30) -> str:
    """The screen of pane ``name`` once it shows ``needle``; fails after ``within`` s."""
    deadline = time.monotonic() + within
    screen = ""
    while time.monotonic() < deadline:
        screen = await asyncio.to_thread(tmux, "capture-pane", "-p", "-t", name)
        if needle in screen:
            return screen
        await asyncio.sleep(0.2)
    raise AssertionError(f"{needle!r} never appeared in the console; last screen:\n{screen}")

"""Run the console: with the gateway in this process, attached to a store, or in the demo.

The gateway and the Textual app share one asyncio loop. While the app owns the terminal,
nothing may print to it: log records go to a file (if asked) and warnings become toasts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import termios
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hoopops import events
from hoopops.config import Config
from hoopops.tui.app import ConsoleApp
from hoopops.tui.source import AttachedSource, ConsoleSource, GatewaySource


class _ToastHandler(logging.Handler):
    """Warnings and errors from the gateway, shown in the console instead of stderr."""

    def __init__(self, app: ConsoleApp) -> None:
        super().__init__(logging.WARNING)
        self.app = app

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
            severity = "error" if record.levelno >= logging.ERROR else "warning"
            self.app.notify(message, title=record.name, severity=severity, markup=False)
        except Exception:  # a log handler must never raise into the gateway
            self.handleError(record)


@contextlib.contextmanager
def _console_logging(app: ConsoleApp, log_file: Path | None, level: int = logging.INFO):
    """Route all logging away from the terminal for as long as the app runs."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    root.handlers = []
    # INFO only when it goes somewhere; otherwise WARNING, so the hot path builds no
    # records that nobody reads.
    root.setLevel(level if log_file is not None else logging.WARNING)
    toast = _ToastHandler(app)
    root.addHandler(toast)
    file_handler: logging.Handler | None = None
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
    else:
        # Without a file, nothing below WARNING is wanted; a NullHandler keeps Python's
        # last-resort handler from writing to the terminal the app owns.
        root.addHandler(logging.NullHandler())
    try:
        yield
    finally:
        root.handlers, level_before = saved
        root.setLevel(level_before)
        if file_handler is not None:
            file_handler.close()


def terminal_alive() -> bool:
    """Whether the console's terminal is still there (a hung-up tty fails every ioctl)."""
    stream = sys.__stdin__ if sys.__stdin__ is not None else sys.__stdout__
    if stream is None:
        return False
    try:
        termios.tcgetattr(stream.fileno())
    except (OSError, ValueError, termios.error):
        return False
    return True


def on_sighup(app: ConsoleApp) -> None:
    """SIGHUP means two things: ``kill -HUP`` from an operator (reload the policies, as
    ``hoopops serve`` does) or the terminal hanging up. Behind a dead terminal the console
    quits cleanly instead (the gateway drains its sessions, as on SIGTERM)."""
    if not terminal_alive():
        app.exit()
        return
    reload_policy = getattr(app.source, "reload_policy", None)
    if reload_policy is None:
        app.notify("SIGHUP ignored: no gateway runs in this console (--attach); send it "
                   "to hoopops serve", severity="warning", markup=False)
        return
    # A refused new version is reported by the gateway (log, toast, status bar).
    reload_policy()
    app.actions.append("SIGHUP: policies re-read")
    app.notify("SIGHUP: policy folder re-read", markup=False)


def _install_signals(app: ConsoleApp) -> list[signal.Signals]:
    """SIGTERM quits cleanly (the gateway drains its sessions); SIGHUP: see on_sighup."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig, handler in ((signal.SIGTERM, app.exit),
                         (signal.SIGHUP, lambda: on_sighup(app))):
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
            loop.add_signal_handler(sig, handler)
            installed.append(sig)
    return installed


def _remove_signals(installed: list[signal.Signals]) -> None:
    loop = asyncio.get_running_loop()
    for sig in installed:
        loop.remove_signal_handler(sig)


async def _run_app(app: ConsoleApp, log_file: Path | None) -> None:
    installed = _install_signals(app)
    try:
        with _console_logging(app, log_file):
            await app.run_async()
    finally:
        _remove_signals(installed)


async def run_gateway_console(config: Config, *, log_file: Path | None = None,
                              export_dir: Path | None = None) -> int:
    """``hoopops console``: start the gateway, run the dashboard, stop the gateway."""
    from hoopops.gateway import GatewayConfigError, build_gateway

    bus = events.EventBus()
    try:
        gateway = await build_gateway(config, bus)
    except GatewayConfigError as exc:
        print(f"hoopops: {exc}", file=sys.stderr)
        return 2
    try:
        await gateway.start()
    except OSError as exc:
        print(f"hoopops: cannot listen on {config.listen}: {exc.strerror}", file=sys.stderr)
        await gateway.stop(grace=0)
        return 1
    source = GatewaySource(gateway)
    app = ConsoleApp(source, keymap=config.keymap, export_dir=export_dir)
    try:
        await _run_app(app, log_file)
    finally:
        await gateway.stop()
        await source.close()
    return 0


async def run_attached_console(config: Config, *, log_file: Path | None = None,
                               export_dir: Path | None = None) -> int:
    """``hoopops console --attach``: the audit store only, no gateway in this process."""
    from hoopops.audit import AuditError, open_store

    if not config.audit.enabled:
        print("hoopops: --attach reads the audit store, and audit is disabled in "
              f"{config.file} (audit.enabled: false)", file=sys.stderr)
        return 2
    try:
        store = await open_store(config.audit, create=False)
    except AuditError as exc:
        print(f"hoopops: {exc}", file=sys.stderr)
        return 2
    source: ConsoleSource = AttachedSource(config, store)
    # Polls the store (no bus): a little slower than in-process, still well under a second.
    app = ConsoleApp(source, keymap=config.keymap, export_dir=export_dir,
                     refresh_interval=min(1.0, max(0.25, config.approvals.poll_interval)))
    try:
        await _run_app(app, log_file)
    finally:
        await source.close()
    return 0


def run_console(config: Config, *, attach: bool = False, log_file: Path | None = None,
                export_dir: Path | None = None) -> int:
    from hoopops import eventloop

    runner = run_attached_console if attach else run_gateway_console
    try:
        # The same loop as ``hoopops serve`` (uvloop when installed): the console must not
        # make the gateway slower than running it alone.
        return eventloop.run(runner(config, log_file=log_file, export_dir=export_dir))
    except KeyboardInterrupt:
        return 130


StartFn = Callable[[Any, argparse.Namespace, events.EventBus],
                   Awaitable[tuple[Config, Any, str]]]


def run_console_demo(env: Any, args: argparse.Namespace, start: StartFn) -> int:
    """``hoopops demo``: the demo's gateway and agents with the console in front."""
    from hoopops.demo.environment import run_agents

    async def main() -> int:
        bus = events.EventBus()
        config, gateway, line = await start(env, args, bus)
        stop = asyncio.Event()
        agents: asyncio.Task[None] | None = None
        if not getattr(args, "no_agents", False):
            agents = asyncio.create_task(run_agents(config, gateway.port, env, stop),
                                         name="demo-agents")
        source = GatewaySource(gateway)
        note = (f"Gateway on 127.0.0.1:{gateway.port}, target appdb. The token is valid "
                "for an hour. Everything is removed when you quit.")
        app = ConsoleApp(source, keymap=config.keymap, connect_line=line, connect_note=note,
                         export_dir=Path.cwd())
        try:
            await _run_app(app, None)
        finally:
            stop.set()
            if agents is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(agents, 5)
            await gateway.stop(grace=1)
            await source.close()
        return 0

    from hoopops import eventloop

    try:
        return eventloop.run(main())
    except KeyboardInterrupt:
        return 130

"""Gateway throughput with the console open, against ``hoopops serve`` (opt-in, slow).

    HOOPOPS_BENCH_CONSOLE=1 .venv/bin/python -m pytest -s tests/test_tui_throughput.py

Alternates rounds of ``hoopops serve`` and ``hoopops console`` (in tmux: a real terminal,
a real screen to paint) on the same config, drives each with pgbench (4 clients, a
20-row read that the shipped policy allows), and compares median throughput and the
gateway process's CPU per transaction. Skipped by default: it takes about two minutes and
on a shared machine its numbers are only as steady as the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from hoopops.config import load_config
from hoopops.devdb import free_port
from hoopops.identity import mint_token
from tests.conftest import write_config

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
SECONDS = int(os.environ.get("HOOPOPS_BENCH_SECONDS", "8"))
ROUNDS = int(os.environ.get("HOOPOPS_BENCH_ROUNDS", "5"))
CLIENTS = 4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("HOOPOPS_BENCH_CONSOLE") != "1",
                       reason="benchmark: set HOOPOPS_BENCH_CONSOLE=1 to run"),
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux"),
]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_port(port: int, within: float = 30) -> None:
    import socket

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listened on {port}")


def _pgbench(pg: Any, port: int, token: str, script: Path) -> tuple[float, int]:
    out = subprocess.run(
        [pg.tool("pgbench"), "-n", "-M", "extended", "-c", str(CLIENTS), "-j", "2",
         "-T", str(SECONDS), "-f", str(script), "-h", "127.0.0.1", "-p", str(port),
         "-U", "agent", "appdb"],
        env={**os.environ, "PGPASSWORD": token, "PGAPPNAME": "pgbench"},
        capture_output=True, text=True, check=True, timeout=SECONDS + 60).stdout
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"actually processed: (\d+)", out).group(1))  # type: ignore[union-attr]
    return tps, done


def test_console_costs_the_gateway_under_15_percent(tmp_path: Path, pg: Any) -> None:
    port = free_port()
    path = write_config(tmp_path, pg, policies=POLICIES, audit=True)
    path.write_text(path.read_text().replace("listen: 127.0.0.1:0",
                                             f"listen: 127.0.0.1:{port}"))
    config = load_config(path)
    token = mint_token(config.identity, "bench", ["agents"], 3600)
    script = tmp_path / "read.sql"
    script.write_text("SELECT g, md5(g::text) FROM generate_series(1, 20) g;\n")
    pidfile = tmp_path / "console.pid"
    tps: dict[str, list[float]] = {"serve": [], "console": []}
    cpu: dict[str, list[float]] = {"serve": [], "console": []}
    for _ in range(ROUNDS):
        for mode in ("serve", "console"):
            name = f"bench-{uuid.uuid4().hex[:6]}"
            proc = None
            if mode == "serve":
                proc = subprocess.Popen([sys.executable, "-m", "hoopops", "serve", "--config",
                                         str(path), "--log-level", "WARNING"], cwd=ROOT)
            else:
                subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "160", "-y",
                                "45", f"cd {ROOT} && echo $$ > {pidfile} && exec "
                                f"{sys.executable} -m hoopops console --config {path}"],
                               check=True)
            try:
                _wait_port(port)
                time.sleep(1)
                pid = proc.pid if proc is not None else int(pidfile.read_text())
                before = _cpu_seconds(pid)
                rate, done = _pgbench(pg, port, token, script)
                used = _cpu_seconds(pid) - before
                tps[mode].append(rate)
                cpu[mode].append(used / done * 1e6)
                print(f"{mode:8s} {rate:8.1f} tps {used / done * 1e6:8.1f} us CPU/tx")
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)
                else:
                    subprocess.run(["tmux", "send-keys", "-t", name, "q"], check=False)
                    time.sleep(0.5)
                    subprocess.run(["tmux", "send-keys", "-t", name, "y"], check=False)
                    time.sleep(3)
                    subprocess.run(["tmux", "kill-session", "-t", name], check=False,
                                   capture_output=True)
                time.sleep(1)
    ratio = statistics.median(tps["console"]) / statistics.median(tps["serve"])
    cpu_ratio = statistics.median(cpu["console"]) / statistics.median(cpu["serve"])
    print(f"console/serve throughput {ratio:.1%}, CPU per transaction {cpu_ratio:.1%}")
    assert ratio >= 0.85, f"the console costs the gateway {1 - ratio:.0%} of its throughput"

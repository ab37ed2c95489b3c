"""``hoopops demo --headless``: one command, then a person acts as an agent with psql."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hoopops.demo.seed import customers

pytestmark = pytest.mark.skipif(shutil.which("psql") is None, reason="needs psql on PATH")


def _start_demo() -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hoopops", "demo", "--headless", "--no-agents",
         "--approval-timeout", "2s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip().startswith("PGPASSWORD="):
            config = next(x for x in lines if x.startswith("config: ")).split(": ", 1)[1]
            return proc, line.strip(), config.strip()
    proc.kill()
    raise AssertionError("the demo did not print a psql line: " + "".join(lines)
                         + (proc.stderr.read() if proc.stderr else ""))


def _psql(line: str, sql: str) -> subprocess.CompletedProcess[str]:
    # Run the printed line exactly as a person would paste it into a shell.
    return subprocess.run(["bash", "-c", f"{line} -X -v ON_ERROR_STOP=1 -c {sql!r}"],
                          capture_output=True, text=True, timeout=30)


def test_headless_demo_masks_blocks_and_holds() -> None:
    proc, line, config = _start_demo()
    try:
        assert re.match(r"PGPASSWORD=\S+ psql '.*port=\d+.*'", line)

        rows = _psql(line, "SELECT id, full_name, ssn, card_number, email FROM customers "
                           "ORDER BY id LIMIT 5")
        assert rows.returncode == 0, rows.stderr
        first = customers()[:5]
        for person in first:
            assert person.full_name in rows.stdout  # the rows really came back
            assert person.ssn not in rows.stdout
            assert person.card_number not in rows.stdout
            assert person.email not in rows.stdout
        assert f"***-**-{first[0].ssn[-4:]}" in rows.stdout

        drop = _psql(line, "DROP TABLE orders")
        assert drop.returncode != 0
        assert "no-destructive-ddl" in drop.stderr

        held = _psql(line, "UPDATE orders SET status = 'shipped' WHERE id = 1")
        assert "awaiting approval #" in held.stderr
        assert held.returncode != 0 and "timed out" in held.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130), err
    assert "temporary files removed" in out
    assert not Path(config).exists()

"""The relay's own cost per transaction, measured inside the process that relays.

    .venv/bin/python benchmarks/bench_relay_cpu.py                  # CPU µs/tx, ~1 minute
    .venv/bin/python benchmarks/bench_relay_cpu.py --modes prepared -T 10
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.%p \\
        .venv/bin/python benchmarks/bench_relay_cpu.py --callgrind   # instructions/tx

The gateway (no policy, no audit, no masking: the pass-through relay of issue 2; with
``--audit NORMAL`` or ``FULL``, the audit trail on, as issue 4 measures it) runs in
this process on uvloop, next to the bare ``asyncio.Protocol`` relay of ``_relay.py`` as
the calibration floor; ``pgbench -S -c 8 -j 2`` drives each in every protocol mode. CPU is
``getrusage(RUSAGE_SELF)`` around each pgbench run divided by its transactions: the proxy
work alone, without pgbench's or PostgreSQL's. On a shared two-core machine that figure
still moves from run to run (cache and scheduler noise); ``--callgrind`` counts user-space
instructions instead, which repeat to within a few percent: after a warm-up, each path
runs twice (``-t 100`` and ``-t 400`` per client) with collection switched on only around
pgbench, and the difference divided by the extra transactions leaves out logins (JWT,
SCRAM). After each warm-up the heap is frozen (``gc.freeze``): otherwise the objects
logins leave behind set off a full collection of the whole process (imports included)
in one of the counted runs and not the other, ~5,000 instructions per transaction that
belong to neither relay's steady state. With ``--audit`` the CPU figure is also split by
thread (the event loop; the audit writer and the store's other threads), since the
writer's SQLite work runs beside the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import resource
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from _common import log, pgbench_postgres
from _relay import _ClientSide

from hoopops.config import load_config
from hoopops.devdb import SERVICE_USER, LocalPostgres, free_port
from hoopops.gateway import build_gateway
from hoopops.identity import mint_token

_TXN = re.compile(r"number of transactions actually processed: (\d+)")
_TOTALS = re.compile(r"^totals:\s*(\d+)", re.MULTILINE)


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(os.getpid())], capture_output=True,
                   check=False)


def _instructions(label: str) -> int:
    """Dump what callgrind collected since the last dump; its instruction total."""
    _callgrind("-d", label)
    dumps = [Path(p) for p in _dump_files()]  # in dump order
    if not dumps:
        raise SystemExit("--callgrind: no dump found (run under valgrind --tool=callgrind "
                         "--callgrind-out-file=/tmp/cg.%p)")
    text = dumps[-1].read_text(errors="replace")
    match = _TOTALS.search(text)
    return int(match.group(1)) if match else 0


def _dump_files() -> list[str]:
    pattern = re.compile(rf"\.{os.getpid()}\.(\d+)$")
    found = []
    for folder in {Path.cwd(), Path("/tmp")}:
        for path in folder.iterdir():
            if pattern.search(path.name):
                found.append(str(path))
    return sorted(found, key=lambda p: int(pattern.search(p).group(1)))  # type: ignore


async def _pgbench(pgbench: str, port: int, user: str, database: str, env: dict[str, str],
                   mode: str, duration: float, per_client: int) -> int:
    run_for = ["-t", str(per_client)] if per_client else ["-T", f"{duration:g}"]
    proc = await asyncio.create_subprocess_exec(
        pgbench, "-n", "-S", "-c", "8", "-j", "2", *run_for, "-M", mode, "-h", "127.0.0.1",
        "-p", str(port), "-U", user, database, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    match = _TXN.search(out.decode())
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench -M {mode} failed: {err.decode().strip()[:300]}")
    return int(match.group(1))


_Route = tuple[str, int, str, str, dict[str, str]]  # name, port, user, database, env


async def _measure(args: argparse.Namespace, pg: LocalPostgres, folder: Path) -> None:
    config_path = folder / "hoopops.yaml"
    config_path.write_text("\n".join([
        "listen: 127.0.0.1:0", "targets:", "  appdb:",
        f"    upstream: {pg.dsn()}?sslmode=disable",
        "identity:", "  issuer: https://idp.bench.test", "  audience: hoopops",
        "  hs256_secret: bench-relay-cpu-0123456789-abcdefghijklmnop",
        "limits:", "  max_connections_per_identity: 500",
        "audit:", f"  enabled: {'false' if args.audit == 'off' else 'true'}",
        f"  synchronous: {'FULL' if args.audit == 'off' else args.audit}",
        f"  path: {folder / 'audit.db'}"]) + "\n")
    config = load_config(config_path)
    gateway = await build_gateway(config)
    await gateway.start()
    token = mint_token(config.identity, "bench-relay", ["agents"], 3600)
    relay_port = free_port()
    loop = asyncio.get_running_loop()
    relay = await loop.create_server(lambda: _ClientSide(pg.port), "127.0.0.1", relay_port)
    base_env = {**os.environ, "PGSSLMODE": "disable"}
    paths: list[_Route] = [("gateway", gateway.port, "agent", "appdb",
                           {**base_env, "PGPASSWORD": token})]
    if not args.no_relay:
        paths.append(("relay:protocol", relay_port, SERVICE_USER, "app",
                      {**base_env, "PGPASSWORD": pg.service_password}))
    pgbench = pg.tool("pgbench")
    unit = "instructions/tx" if args.callgrind else "CPU µs/tx (user + kernel)"
    audit = "" if args.audit == "off" else f", audit on (synchronous {args.audit})"
    print(f"{unit}, pgbench -S -c 8 -j 2, proxy in this process on {args.loop}{audit}:\n")
    print(f"| mode | {' | '.join(name for name, *_ in paths)} |")
    print(f"| --- |{' ---: |' * len(paths)}")
    try:
        for mode in args.modes.split(","):
            cells = []
            for name, port, user, database, env in paths:
                async def run(per_client: int, mode: str = mode, port: int = port,
                              user: str = user, database: str = database,
                              env: dict[str, str] = env) -> int:
                    return await _pgbench(pgbench, port, user, database, env, mode,
                                          args.duration, per_client)
                cells.append(await (_count(run, name, mode) if args.callgrind
                                    else _time(run, by_thread=args.audit != "off")))
            print(f"| {mode} | {' | '.join(cells)} |", flush=True)
    finally:
        relay.close()
        await gateway.stop(grace=1)


def _settle() -> None:
    """Collect, then keep what survived out of later collections (see the docstring)."""
    gc.collect()
    gc.freeze()


def _thread_cpu() -> dict[str, float]:
    """CPU seconds so far of each thread of this process, by ``name:tid``."""
    found: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
        found[f"{name}:{task.name}"] = (int(stat[11]) + int(stat[12])) / tick
    return found


async def _time(run: Callable[[int], Awaitable[int]], by_thread: bool = False) -> str:
    await run(50)  # warm-up: first logins import and compile what the relay then reuses
    _settle()
    threads0 = _thread_cpu()
    user0, sys0 = _cpu()
    transactions = await run(0)
    user1, sys1 = _cpu()
    threads1 = _thread_cpu()
    per = 1e6 / transactions
    cell = f"{(user1 - user0 + sys1 - sys0) * per:.1f} ({(sys1 - sys0) * per:.1f} kernel)"
    if by_thread:
        # The event loop is this process's first thread; the rest are the audit writer,
        # the store's reader and checkpoint connections, and the journal's flusher.
        main = f"{os.getpid()}"
        loop_s = sum(v - threads0.get(k, 0.0) for k, v in threads1.items()
                     if k.endswith(f":{main}"))
        others = sum(v - threads0.get(k, 0.0) for k, v in threads1.items()
                     if not k.endswith(f":{main}"))
        cell += f"; loop {loop_s * per:.1f}, other threads {others * per:.1f}"
    return cell


async def _count(run: Callable[[int], Awaitable[int]], name: str, mode: str) -> str:
    await run(50)  # warm-up (uncounted): one-time costs would otherwise fall on -t 100
    _settle()
    totals = []
    for per_client in (100, 400):
        _callgrind("-i", "on")
        await run(per_client)
        _callgrind("-i", "off")
        totals.append(_instructions(f"{name}-{mode}-{per_client}"))
    return f"{(totals[1] - totals[0]) / (8 * 300):,.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="simple,extended,prepared")
    parser.add_argument("-T", "--duration", type=float, default=5.0)
    parser.add_argument("--no-relay", action="store_true", help="leave out _relay.py")
    parser.add_argument("--callgrind", action="store_true",
                        help="count instructions (run under valgrind, see above)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--audit", choices=("off", "NORMAL", "FULL"), default="off",
                        help="run the gateway with the audit trail on (issue 4's cost)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hoopops-relay-cpu-"))
    log("starting PostgreSQL and pgbench -i -s 1")
    with pgbench_postgres() as pg:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(_measure(args, pg, folder))
        else:
            asyncio.run(_measure(args, pg, folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())

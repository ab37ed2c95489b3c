"""Pipelined inserts (a batch, as JDBC ``executeBatch`` or asyncpg ``executemany`` send
them) through the gateway with the audit trail off and on, against the same inserts
direct, in one run.

    .venv/bin/python benchmarks/bench_audit_batch.py                 # 5,000 rows, 3 rounds
    .venv/bin/python benchmarks/bench_audit_batch.py --rows 20000 --rounds 5

A batch is hundreds of Bind/Execute pairs before one Sync: every one is a statement with
a record of its own, made durable before it is forwarded. Under ``synchronous: FULL`` the
statements the gateway reads together share one flush of the journal, so a batch costs
a few ``fdatasync`` calls rather than one per row (``tests/test_audit_pipeline_flush.py``
checks the count). Reported: rows per second per path (mean of the rounds), each as a
ratio to the gateway with audit off, and the gateway's CPU per row (user + kernel of its
process, which includes the audit writer's thread).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from _common import Endpoint, GatewaySpec, Stack, log, proc_cpu_seconds

_TABLE = "bench_batch"


async def _batch(endpoint: Endpoint, rows: int, round_: int) -> float:
    """Seconds for one executemany of ``rows`` inserts (the login is not timed)."""
    import asyncpg

    conn = await asyncpg.connect(**endpoint.asyncpg_kwargs())
    try:
        table = f"{_TABLE}_{round_}"
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"CREATE TABLE {table} (n int PRIMARY KEY, label text)")
        values = [(n, f"row {n} of the batch") for n in range(rows)]
        started = time.perf_counter()
        await conn.executemany(f"INSERT INTO {table} (n, label) VALUES ($1, $2)", values)
        elapsed = time.perf_counter() - started
        if await conn.fetchval(f"SELECT count(*) FROM {table}") != rows:
            raise SystemExit(f"{endpoint.name}: the batch did not insert {rows} rows")
        await conn.execute(f"DROP TABLE {table}")
        return elapsed
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    specs = [GatewaySpec("gateway"),
             GatewaySpec("+audit FULL", audit=True, audit_synchronous="FULL"),
             GatewaySpec("+audit NORMAL", audit=True, audit_synchronous="NORMAL")]
    seconds: dict[str, list[float]] = {}
    cpu: dict[str, float] = {}
    with Stack(scale=1, gateways=specs, with_pgbouncer=False) as stack:
        paths = [stack.direct, *stack.gateway_endpoints()]
        for round_ in range(args.rounds):
            for endpoint in paths:
                before = proc_cpu_seconds(endpoint.pid)
                elapsed = asyncio.run(_batch(endpoint, args.rows, round_))
                after = proc_cpu_seconds(endpoint.pid)
                seconds.setdefault(endpoint.name, []).append(elapsed)
                if before is not None and after is not None:
                    cpu[endpoint.name] = cpu.get(endpoint.name, 0.0) + after - before
                log(f"round {round_ + 1}: {endpoint.name}: {args.rows / elapsed:,.0f} rows/s")
    rate = {name: args.rows / statistics.mean(runs) for name, runs in seconds.items()}
    base = rate["gateway"]
    print(f"asyncpg executemany of {args.rows:,} inserts, {args.rounds} round(s), "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| path | rows/s | / gateway | gateway CPU µs per row |")
    print("| --- | ---: | ---: | ---: |")
    for name, value in rate.items():
        per_row = cpu.get(name)
        cell = "-" if per_row is None else f"{per_row / (args.rows * args.rounds) * 1e6:.0f}"
        print(f"| {name} | {value:,.0f} | {value / base:.2f}x | {cell} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())

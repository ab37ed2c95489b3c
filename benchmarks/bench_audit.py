"""Micro-benchmark of the audit store's group commit: records/s and per-write latency.

Each simulated session writes what the gateway writes per statement: a
``statement.received`` record, awaited (it must be durable before the statement may be
forwarded), then a ``statement.finished`` record with a small result sample, queued with
``wait=False`` as the gateway does once the client has its answer (``--await-finished``
awaits it too). The latency is that of each awaited write; the rates count committed
records only, so they are durable records per second, not queued ones.

    .venv/bin/python benchmarks/bench_audit.py                  # 1, 8, 50 writers; FULL, NORMAL
    .venv/bin/python benchmarks/bench_audit.py --writers 8 --seconds 5 --json

The database goes to a temporary folder unless ``--dir`` says otherwise; put it on the
disk you mean to deploy on, because the fsync per batch is most of the cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from hoopops.audit import (
    ResultSampler,
    SessionRecord,
    SQLiteAuditStore,
    StatementRecord,
)


async def run_case(directory: Path, writers: int, seconds: float, synchronous: str,
                   await_finished: bool) -> dict[str, Any]:
    path = directory / f"bench-{synchronous.lower()}-{writers}-{uuid.uuid4().hex[:6]}.db"
    store = await SQLiteAuditStore.open(path, synchronous=synchronous)
    latencies: list[float] = []
    statements = 0
    stop_at = 0.0

    async def session(n: int) -> None:
        nonlocal statements
        sid = str(uuid.uuid4())
        await store.session_started(SessionRecord(sid, f"agent-{n}", ("agents",), "iss", "tok",
                                                  "app", "127.0.0.1", 40000 + n, "bench",
                                                  "main", True, time.time()))
        seq = 0
        while time.perf_counter() < stop_at:
            seq += 1
            began = time.perf_counter()
            stmt = await store.statement_received(StatementRecord(
                sid, seq, time.time(), "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
                [str(seq)], {"kind": "select", "tables": ["public.pgbench_accounts"]},
                "allow", "read-only"))
            latencies.append(time.perf_counter() - began)
            sampler = ResultSampler(100, 64 * 1024)
            sampler.set_columns(["abalance"])
            sampler.add_row(["0"])
            sampler.update(b"T...D...C...")
            result = sampler.result(started_at=time.time(), finished_at=time.time(), rows=1,
                                    command_tag="SELECT 1")
            if await_finished:
                began = time.perf_counter()
                await store.statement_finished(stmt, result)
                latencies.append(time.perf_counter() - began)
            else:
                await store.statement_finished(stmt, result, wait=False)
            statements += 1

    stop_at = time.perf_counter() + seconds
    before = store.stats.records, store.stats.batches
    started = time.perf_counter()
    cpu = time.process_time()
    await asyncio.gather(*(session(n) for n in range(writers)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    await store.gateway_event("bench.done", {})  # flushes any queued finished records
    records = store.stats.records - before[0]
    batches = store.stats.batches - before[1]
    report = await store.verify()
    await store.close()
    latencies.sort()
    return {
        "synchronous": synchronous, "writers": writers, "seconds": round(elapsed, 2),
        "records": records, "records_per_s": round(records / elapsed),
        "statements_per_s": round(statements / elapsed),
        "avg_batch": round(records / max(batches, 1), 1),
        # CPU of the whole process (sessions, event loop, writer thread) per committed
        # record: steadier than the rates on a busy machine.
        "cpu_us_per_record": round(cpu / max(records, 1) * 1_000_000, 1),
        "latency_ms_p50": round(statistics.median(latencies) * 1000, 3),
        "latency_ms_p95": round(latencies[int(len(latencies) * 0.95)] * 1000, 3),
        "latency_ms_p99": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        "verified": report.ok,
    }


async def main(args: argparse.Namespace) -> int:
    writer_counts = [args.writers] if args.writers else [1, 8, 50]
    modes = [args.synchronous.upper()] if args.synchronous else ["FULL", "NORMAL"]
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for mode in modes:
            for writers in writer_counts:
                results.append(await run_case(Path(folder), writers, args.seconds, mode,
                                              args.await_finished))
                if not args.json:
                    _print_row(results[-1], header=len(results) == 1)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0 if all(r["verified"] for r in results) else 1


COLUMNS = ("synchronous", "writers", "records_per_s", "statements_per_s", "avg_batch",
           "cpu_us_per_record",
           "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "verified")


def _print_row(result: dict[str, Any], header: bool) -> None:
    if header:
        print("  ".join(f"{c:>16}" for c in COLUMNS))
    print("  ".join(f"{result[c]!s:>16}" for c in COLUMNS), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, help="concurrent sessions (default: 1, 8, 50)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per case (default 3)")
    parser.add_argument("--synchronous", choices=("full", "normal"),
                        help="SQLite synchronous setting (default: both)")
    parser.add_argument("--dir", help="folder for the temporary database")
    parser.add_argument("--await-finished", action="store_true",
                        help="await the statement.finished record too")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sys.exit(asyncio.run(main(parser.parse_args())))

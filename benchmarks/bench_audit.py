"""Micro-benchmark of the audit store's group commit: records/s and per-write latency.

Each simulated session writes what the gateway writes per statement: a
``statement.received`` record, awaited (it must be durable before the statement may be
forwarded), then a ``statement.finished`` record with a small result sample, queued with
``wait=False`` as the gateway does once the client has its answer (``--await-finished``
awaits it too). The latency is that of each awaited write; the rates count committed
records only, so they are durable records per second, not queued ones.

    .venv/bin/python benchmarks/bench_audit.py                  # 1, 8, 50 writers; FULL, NORMAL
    .venv/bin/python benchmarks/bench_audit.py --writers 8 --seconds 5 --json

The statements carry the facts the shipped ``policies/`` give pgbench's select (about
1 KB), as a dict to serialise (simple protocol: a new decision per statement) or, with
``--facts-text``, as the text the gateway keeps per decision (prepared statements).
``cpu_us_per_statement`` is the process's CPU per statement (both records), split into
the writer thread's share (SQLite, hashing) and the rest (building records, the event
loop); it is steadier than the rates on a busy machine.

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
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from hoopops.audit import (
    ResultSampler,
    SessionRecord,
    SQLiteAuditStore,
    StatementRecord,
    json_text,
)

REPO = Path(__file__).resolve().parent.parent
SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"


def pgbench_facts() -> dict[str, Any]:
    """What the gateway records as facts for pgbench's select under the shipped policy."""
    from hoopops.identity import Identity
    from hoopops.policy import PolicyEngine
    from hoopops.sql import analyze

    engine = PolicyEngine(REPO / "policies")
    identity = Identity("bench-agent", ("agents",), "https://idp.bench.test", None, None)
    return engine.decide(identity, "appdb", analyze(SQL)).to_dict()


def writer_cpu() -> float:
    """CPU seconds of the store's writer thread so far (0 before it exists)."""
    for thread in threading.enumerate():
        if thread.name.startswith("audit-writer") and thread.ident is not None:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return 0.0


async def run_case(directory: Path, writers: int, seconds: float, synchronous: str,
                   await_finished: bool, facts: dict[str, Any] | str) -> dict[str, Any]:
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
                sid, seq, time.time(), SQL, [str(seq)], facts, "allow", "reads"))
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
    cpu, writer = time.process_time(), writer_cpu()
    await asyncio.gather(*(session(n) for n in range(writers)))
    await store.gateway_event("bench.done", {})  # flushes any queued finished records
    elapsed = time.perf_counter() - started
    cpu, writer = time.process_time() - cpu, writer_cpu() - writer
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
        # record and per statement: steadier than the rates on a busy machine.
        "cpu_us_per_record": round(cpu / max(records, 1) * 1_000_000, 1),
        "cpu_us_per_statement": round(cpu / max(statements, 1) * 1_000_000, 1),
        "writer_us_per_statement": round(writer / max(statements, 1) * 1_000_000, 1),
        "latency_ms_p50": round(statistics.median(latencies) * 1000, 3),
        "latency_ms_p95": round(latencies[int(len(latencies) * 0.95)] * 1000, 3),
        "latency_ms_p99": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        "verified": report.ok,
    }


async def main(args: argparse.Namespace) -> int:
    writer_counts = [args.writers] if args.writers else [1, 8, 50]
    modes = [args.synchronous.upper()] if args.synchronous else ["FULL", "NORMAL"]
    results = []
    facts: dict[str, Any] | str = pgbench_facts()
    if args.facts_text:
        facts = json_text(facts)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for mode in modes:
            for writers in writer_counts:
                results.append(await run_case(Path(folder), writers, args.seconds, mode,
                                              args.await_finished, facts))
                if not args.json:
                    _print_row(results[-1], header=len(results) == 1)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0 if all(r["verified"] for r in results) else 1


COLUMNS = ("synchronous", "writers", "records_per_s", "statements_per_s", "avg_batch",
           "cpu_us_per_record", "cpu_us_per_statement", "writer_us_per_statement",
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
    parser.add_argument("--facts-text", action="store_true",
                        help="pass the facts as the gateway's cached canonical text")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sys.exit(asyncio.run(main(parser.parse_args())))

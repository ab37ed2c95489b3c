"""Analysis plus decision per statement, in microseconds, under policies/default.yaml.

    .venv/bin/python benchmarks/bench_policy.py [--rounds 7] [--number 2000] [--json]
    .venv/bin/python benchmarks/bench_policy.py --gateway [--modes ...] [-T 4] [--rounds 3]
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.%p \\
        .venv/bin/python benchmarks/bench_policy.py --gateway --callgrind

Three ways a statement reaches the policy engine, and the parser alone for scale:

* cached      — the exact text was seen before (prepared statements, the unnamed statement
                pgbench -M extended re-Parses, ORMs with bind parameters): a dict lookup,
                and the decision cached for the statement's shape and the identity;
* new literal — the text differs only in its literals each time (pgbench -M simple): the
                shape is found by the text's skeleton (lone integers) or its normalised
                text, its facts are copied onto the new text, the decision is a lookup;
* new shape   — a text the caches have not seen: parse, walk, build the facts, and the
                decision tried rule by rule (what every statement cost without caches);
* (parser)    — ``parse_sql_json`` + ``json.loads`` of the text, nothing else.

Each figure is CPU time of this process (so other load on the machine does not inflate
it), the best of several rounds, per statement, analysis and decision together. What the
whole gateway pays per statement, relay included, is bench_gateway.py --compare-policy.

``--gateway`` measures that in this process instead: two gateways on uvloop, one without
a policy and one with the policy folder (``--policies``, default ``policies/``), audit
off, each driven by ``pgbench -S -c 8 -j 2`` in every protocol mode, alternately, for
``--rounds`` rounds. The figure is the CPU this process used (``getrusage``: user +
kernel) per transaction, which is one statement: the policy's cost per statement is the
difference, with the relay's own work and none of pgbench's or PostgreSQL's. The median
over rounds is reported. ``--callgrind`` counts user-space instructions per transaction
instead (the slope between ``-t 100`` and ``-t 400`` per client, so logins cancel out).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import pgbench_postgres  # noqa: E402
from pglast.parser import parse_sql_json  # noqa: E402

from hoopops.config import load_config  # noqa: E402
from hoopops.devdb import LocalPostgres  # noqa: E402
from hoopops.gateway import build_gateway  # noqa: E402
from hoopops.identity import Identity, mint_token  # noqa: E402
from hoopops.policy import PolicyEngine  # noqa: E402
from hoopops.sql import Analyzer  # noqa: E402

STATEMENTS = {
    "pgbench select": "SELECT abalance FROM pgbench_accounts WHERE aid = {n};",
    "pgbench update": "UPDATE pgbench_accounts SET abalance = abalance + {n} WHERE aid = 7;",
    "insert": "INSERT INTO orders (customer_id, total, status) VALUES ({n}, 19.99, 'paid')",
    "join + aggregate": (
        "SELECT c.id, c.name, sum(o.total) FROM public.customers c JOIN orders o "
        "ON o.customer_id = c.id WHERE c.created_at > now() - interval '30 days' "
        "AND o.status IN ('paid', 'shipped') AND o.total > {n} GROUP BY c.id, c.name "
        "ORDER BY 3 DESC LIMIT 20"),
    "writable CTE": ("WITH d AS (DELETE FROM sessions WHERE expires < {n} RETURNING id) "
                     "SELECT count(*) FROM d"),
    "dangerous": "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = {n}",
}


def best(func: Callable[[], object], number: int, rounds: int) -> float:
    result = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(number):
            func()
        result = min(result, (time.process_time() - started) / number * 1e6)
    return result


# -- --gateway: the whole gateway's CPU per statement, with and without the policy ---------

_TXN = re.compile(r"number of transactions actually processed: (\d+)")
_TOTALS = re.compile(r"^totals:\s*(\d+)", re.MULTILINE)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _pgbench(pg: LocalPostgres, port: int, token: str, mode: str,
                   run_for: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        pg.tool("pgbench"), "-n", "-S", "-c", "8", "-j", "2", *run_for, "-M", mode,
        "-h", "127.0.0.1", "-p", str(port), "-U", "agent", "appdb",
        env={**os.environ, "PGPASSWORD": token, "PGSSLMODE": "disable"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    match = _TXN.search(out.decode())
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench -M {mode} failed: {err.decode().strip()[:300]}")
    return int(match.group(1))


def _callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(os.getpid())], capture_output=True,
                   check=False)


def _instructions(label: str) -> int:
    """Dump what callgrind counted since the last dump; its instruction total."""
    pid = os.getpid()
    _callgrind("-d", label)
    pattern = re.compile(rf"\.{pid}\.(\d+)$")
    dumps = sorted((p for folder in {Path.cwd(), Path("/tmp")} for p in folder.iterdir()
                    if pattern.search(p.name)),
                   key=lambda p: int(pattern.search(p.name).group(1)))  # type: ignore
    if not dumps:
        raise SystemExit("--callgrind: no dump found (run under valgrind, see --help)")
    match = _TOTALS.search(dumps[-1].read_text(errors="replace"))
    return int(match.group(1)) if match else 0


async def _per_statement(pg: LocalPostgres, port: int, token: str, mode: str,
                         args: argparse.Namespace, label: str) -> float:
    if not args.callgrind:
        before = _cpu_seconds()
        done = await _pgbench(pg, port, token, mode, ["-T", f"{args.duration:g}"])
        return (_cpu_seconds() - before) / done * 1e6
    totals = []
    for per_client in (100, 400):
        _callgrind("-i", "on")
        await _pgbench(pg, port, token, mode, ["-t", str(per_client)])
        _callgrind("-i", "off")
        totals.append(_instructions(f"{label}-{mode}-{per_client}"))
    return (totals[1] - totals[0]) / (8 * 300)


async def _gateways(args: argparse.Namespace, pg: LocalPostgres, folder: Path) -> None:
    gateways = {}
    for name, policies in (("no policy", None), ("policy", args.policies)):
        path = folder / f"{name.replace(' ', '-')}.yaml"
        path.write_text("\n".join([
            "listen: 127.0.0.1:0", "targets:", "  appdb:",
            f"    upstream: {pg.dsn()}?sslmode=disable", "identity:",
            "  issuer: https://idp.bench.test", "  audience: hoopops",
            "  hs256_secret: bench-policy-0123456789-abcdefghijklmnopq",
            "limits:", "  max_connections_per_identity: 500",
            *([f"policies: {policies}"] if policies else []),
            "audit:", "  enabled: false", f"  path: {folder / 'audit.db'}"]) + "\n")
        config = load_config(path)
        gateway = await build_gateway(config)
        await gateway.start()
        gateways[name] = (gateway, mint_token(config.identity, "bench-agent", ["agents"],
                                               3600))
    modes = args.modes.split(",")
    figures: dict[tuple[str, str], list[float]] = {}
    try:
        for gateway, token in gateways.values():
            for mode in modes:  # warm-up: logins, imports, the caches' first entries
                await _pgbench(pg, gateway.port, token, mode, ["-t", "50"])
        # What warming up left behind stays out of later collections: a full collection
        # of it would land in one counted run and not another.
        gc.collect()
        gc.freeze()
        for round_ in range(1 if args.callgrind else args.rounds):
            for mode in modes:
                for name, (gateway, token) in gateways.items():
                    figure = await _per_statement(pg, gateway.port, token, mode, args, name)
                    figures.setdefault((mode, name), []).append(figure)
                    print(f"round {round_ + 1} {mode} {name}: {figure:,.1f}", file=sys.stderr,
                          flush=True)
    finally:
        for gateway, _ in gateways.values():
            await gateway.stop(grace=1)
    unit = "instructions" if args.callgrind else "CPU µs (user + kernel)"
    print(f"Gateway {unit} per statement, pgbench -S -c 8 -j 2, gateways in this process; "
          f"policy: {args.policies}\n")
    print("| mode | no policy | policy | policy's cost | policy / no policy |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode in modes:
        bare = statistics.median(figures[(mode, "no policy")])
        ruled = statistics.median(figures[(mode, "policy")])
        print(f"| {mode} | {bare:,.1f} | {ruled:,.1f} | {ruled - bare:+,.1f} | "
              f"{ruled / bare:.2f}x |")
    if not args.callgrind:
        print(f"\nmedian of {args.rounds} rounds of -T {args.duration:g}")


def gateway_main(args: argparse.Namespace) -> int:
    folder = Path(tempfile.mkdtemp(prefix="hoopops-bench-policy-"))
    with pgbench_postgres() as pg:
        import uvloop

        uvloop.run(_gateways(args, pg, folder))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="7 (--gateway: 3)")
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--gateway", action="store_true",
                        help="the in-process gateway comparison (see above)")
    parser.add_argument("--modes", default="simple,extended,prepared")
    parser.add_argument("-T", "--duration", type=float, default=4.0)
    parser.add_argument("--policies", type=Path, default=ROOT / "policies")
    parser.add_argument("--callgrind", action="store_true",
                        help="--gateway: count instructions (run under valgrind)")
    args = parser.parse_args()
    if args.gateway:
        args.rounds = args.rounds or 3
        return gateway_main(args)
    args.rounds = args.rounds or 7

    engine = PolicyEngine(ROOT / "policies")
    identity = Identity("agent-1", ("agents",), None, None, None)
    results = []
    for label, template in STATEMENTS.items():
        text = template.format(n=42)
        analyzer = Analyzer()
        counter = itertools.count(1)

        def cached(a: Analyzer = analyzer, t: str = text) -> object:
            return engine.decide(identity, "appdb", a.analyze(t))

        def new_literal(a: Analyzer = analyzer, tpl: str = template,
                        c: itertools.count[int] = counter) -> object:
            return engine.decide(identity, "appdb", a.analyze(tpl.format(n=next(c))))

        def uncached(a: Analyzer = analyzer, t: str = text) -> object:
            # Facts straight from the parser carry no shape, so no cached decision either.
            return engine.decide(identity, "appdb", a.analyze_uncached(t, shapes=False))

        def parser_only(t: str = text) -> object:
            return json.loads(parse_sql_json(t))

        for func in (cached, new_literal, uncached):  # warm caches and memos
            for _ in range(200):
                func()
        decision = cached()
        row = {
            "statement": label,
            "decision": f"{decision.action} ({decision.rule_id})",  # type: ignore[attr-defined]
            "cached_us": best(cached, args.number, args.rounds),
            "new_literal_us": best(new_literal, args.number, args.rounds),
            "uncached_us": best(uncached, args.number, args.rounds),
            "parser_only_us": best(parser_only, args.number, args.rounds),
        }
        results.append(row)

    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'statement':18} {'cached':>8} {'new literal':>12} {'new shape':>10} "
          f"{'(parser)':>9}  decision")
    for row in results:
        print(f"{row['statement']:18} {row['cached_us']:8.1f} {row['new_literal_us']:12.1f} "
              f"{row['uncached_us']:10.1f} {row['parser_only_us']:9.1f}  {row['decision']}")
    print("\nCPU microseconds per statement (analysis + decision), best of "
          f"{args.rounds} rounds of {args.number}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Analysis plus decision per statement, in microseconds, under policies/default.yaml.

    .venv/bin/python benchmarks/bench_policy.py [--rounds 7] [--number 2000] [--json]

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
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pglast.parser import parse_sql_json  # noqa: E402

from hoopops.identity import Identity  # noqa: E402
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

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

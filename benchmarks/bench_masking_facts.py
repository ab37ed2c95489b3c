"""What masking facts cost the gateway's decision, per statement, in CPU microseconds.

    .venv/bin/python benchmarks/bench_masking_facts.py [--rounds 30] [--number 500]

The gateway's whole decision step (``Enforcer.decide``: analysis, policy decision,
masking hints from their shape cache, masking facts) for a few statements, with masking
on, in one run two ways:

* baseline — the shipped policy without its ``sensitive_*`` rules, and the step that
             computes masking facts switched off: the gateway as it was before them;
* facts    — the shipped policy as it is.

A statement that involves no sensitive column must cost the same both ways (its facts
are None, answered from a cache per hints object). One that involves a masked column
gets facts, so its statement facts are copied and its decision is not served from the
policy's shape cache. Each statement runs two ways: ``new literal`` (every text new, the
shape caches answer, as for pgbench ``-M simple``) and ``same text`` (prepared statements
and drivers' statement caches). The catalog is an in-process stand-in (no database):
this measures the gateway's CPU, not lookups. CPU time
of this process (``time.process_time``), the best of many short rounds, the two ways
measured alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hoopops.audit.store import NullAuditStore  # noqa: E402
from hoopops.events import EventBus  # noqa: E402
from hoopops.identity import Identity  # noqa: E402
from hoopops.masking.sources import RelationInfo, RelationName  # noqa: E402
from hoopops.policy import MASKING_KEYS, PolicyEngine  # noqa: E402
from hoopops.proxy import enforcer as enforcer_module  # noqa: E402
from hoopops.proxy.enforcer import Enforcer  # noqa: E402
from hoopops.sql.session import SessionSqlState  # noqa: E402

T, I4 = "pg_catalog.text", "pg_catalog.int4"
RELATIONS = [
    RelationInfo(1, "public", "customers", "r", (
        ("id", I4), ("full_name", T), ("ssn", T), ("email", T), ("card_number", T),
        ("city", T))),
    RelationInfo(2, "public", "orders", "r", (
        ("id", I4), ("customer_id", I4), ("quantity", I4), ("status", T))),
]
STATEMENTS = {
    "no sensitive table": "SELECT id, quantity FROM orders WHERE customer_id = {n}",
    "sensitive table, plain filter": "SELECT id, full_name FROM customers WHERE id = {n}",
    "masked column returned": "SELECT id, ssn FROM customers WHERE city = 'c{n}'",
    "masked column in WHERE": "SELECT id FROM customers WHERE ssn LIKE '{n}-45-%'",
}


class Catalog:
    async def relations(self, names: Collection[RelationName]
                        ) -> Mapping[RelationName, Sequence[RelationInfo]]:
        return {(s, n): [r for r in RELATIONS if r.name == n and s in (None, r.schema)]
                for s, n in names}

    async def functions(self, names: Collection[str]) -> Mapping[str, frozenset[str]]:
        return {n: frozenset({"pg_catalog"}) for n in names}


def _baseline_policies(folder: Path) -> Path:
    """The shipped folder without the rules that match on masking facts."""
    for path in sorted((ROOT / "policies").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("rules"), list):
            data["rules"] = [r for r in data["rules"] if not set(r.get("when") or {})
                             & set(MASKING_KEYS)]
        (folder / path.name).write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


def _enforcer(policies: Path) -> Enforcer:
    config = SimpleNamespace(masking=SimpleNamespace(hmac_secret="bench"),
                             audit=SimpleNamespace(result_rows=0, result_bytes=0))
    return Enforcer(config, EventBus(), PolicyEngine(policies), NullAuditStore(),  # type: ignore[arg-type]
                    None, {}, {"appdb": Catalog()})  # type: ignore[dict-item]


def _session() -> Any:
    return SimpleNamespace(
        id="bench", sql_state=SessionSqlState(lexing_defaults_verified=True),
        target=SimpleNamespace(name="appdb", upstream=SimpleNamespace(user="svc")),
        info=SimpleNamespace(identity=Identity("agent-1", ("agents",), None, None, None)),
        upstream=SimpleNamespace(parameters={"search_path": '"$user", public'}))


_literal = itertools.count(1000)


async def _round(enforcer: Enforcer, session: Any, template: str, number: int,
                 same_text: bool) -> tuple[float, str]:
    texts = [template.format(n=7 if same_text else next(_literal)) for _ in range(number)]
    started = time.process_time()
    verdict = None
    for text in texts:
        verdict = await enforcer.decide(session, text, None)
    assert verdict is not None
    return (time.process_time() - started) / number * 1e6, verdict.rule_id or ""


async def _compare(baseline: Enforcer, facts: Enforcer, template: str, number: int,
                   rounds: int, same_text: bool) -> tuple[float, float, str]:
    """Best round of each, the two measured alternately so that load on a shared
    machine falls on both alike."""
    original = enforcer_module.with_masking_facts
    sessions = (_session(), _session())
    best = [float("inf"), float("inf")]
    rule = ""
    for _ in range(rounds):
        enforcer_module.with_masking_facts = lambda analysis, *_: analysis  # type: ignore
        try:
            took, _ = await _round(baseline, sessions[0], template, number, same_text)
        finally:
            enforcer_module.with_masking_facts = original
        best[0] = min(best[0], took)
        took, rule = await _round(facts, sessions[1], template, number, same_text)
        best[1] = min(best[1], took)
    return best[0], best[1], rule


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--number", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = _enforcer(_baseline_policies(Path(tmp)))
        facts = _enforcer(ROOT / "policies")
        print("| statement | texts | baseline µs | facts µs | ratio | decided by (facts) |")
        print("| --- | --- | ---: | ---: | ---: | --- |")
        for label, template in STATEMENTS.items():
            for same_text in (False, True):
                before, after, rule = await _compare(baseline, facts, template, args.number,
                                                     args.rounds, same_text)
                texts = "same text" if same_text else "new literal"
                print(f"| {label} | {texts} | {before:.1f} | {after:.1f} | "
                      f"{after / before:.2f}x | {rule} |")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

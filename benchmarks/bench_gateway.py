"""pgbench and a 1,000,000-row stream: direct vs pgbouncer vs the hoopops gateway.

One run starts everything it compares (a private PostgreSQL 18 with pgbench data,
pgbouncer in session mode, and each gateway as its own ``python -m hoopops serve``
process), interleaves the measurements so drift hits every path alike, and prints a
Markdown report: TPS and ratios, proxy CPU per transaction, rows/s of a large result,
peak RSS, and the issue's targets checked. See ``benchmarks/README.md``.

    .venv/bin/python benchmarks/bench_gateway.py            # default, ~9 minutes
    .venv/bin/python benchmarks/bench_gateway.py --quick    # ~1 minute smoke run
    .venv/bin/python benchmarks/bench_gateway.py --profile  # + py-spy of the gateway
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    RELAY_KINDS,
    REPO,
    STREAM_METHODS,
    STREAM_SQL,
    CallProfile,
    GatewayProcess,
    GatewaySpec,
    PgbenchResult,
    Profile,
    Stack,
    StreamResult,
    combine,
    fmt_num,
    fmt_ratio,
    is_syscall_leaf,
    log,
    md_table,
    parse_collapsed,
    proc_memory_mb,
    py_spy_recording,
    ratio,
    run_pgbench,
    stream_rows,
    summarise_cprofile,
)

WORKLOADS: dict[str, tuple[str, bool]] = {
    "select": ("select-only", True),
    "tpcb": ("TPC-B-like", False),
}
MODES = ("simple", "extended", "prepared")
DIRECT, PGBOUNCER = "direct", "pgbouncer"

# Targets from issue 2 ("How we will know").
TARGET_SELECT_VS_PGBOUNCER = 0.9  # select-only TPS at 8 clients, every mode
TARGET_STREAM_VS_DIRECT = 0.8  # 1M-row stream rows/s
TARGET_RSS_MB = 150.0


@dataclass
class Results:
    paths: list[str]
    gateways: list[str]
    # Every round of each (workload, mode, clients, path) cell, in the order run.
    rounds: dict[tuple[str, str, int, str], list[PgbenchResult]] = field(default_factory=dict)
    streams: dict[tuple[str, str], StreamResult] = field(default_factory=dict)
    memory_start: dict[str, dict[str, float]] = field(default_factory=dict)
    memory_end: dict[str, dict[str, float]] = field(default_factory=dict)
    profile: Profile | None = None
    profile_run: PgbenchResult | None = None
    profile_gateway: str = ""
    cprofile: CallProfile | None = None
    load_before: float = field(default_factory=lambda: os.getloadavg()[0])
    notes: list[str] = field(default_factory=list)

    def cell(self, workload: str, mode: str, clients: int, path: str) -> PgbenchResult | None:
        runs = self.rounds.get((workload, mode, clients, path))
        return combine(runs) if runs else None


# -- measurements (each returns numbers; the report is built from them afterwards) -----------


def measure_pgbench(stack: Stack, results: Results, workloads: Sequence[str],
                    modes: Sequence[str], clients: Sequence[int], duration: float,
                    threads: int | None, rounds: int) -> None:
    """Every (workload, mode, clients) cell on every path, ``rounds`` times.

    Paths run back to back inside each cell, and the whole matrix is repeated per round
    rather than each cell N times in a row: slow drift (autovacuum, page cache, TPC-B
    bloat, a noisy neighbour on a shared VM) then lands on every path alike.
    """
    total = rounds * len(workloads) * len(modes) * len(clients) * len(results.paths)
    done = 0
    for round_no in range(rounds):
        for workload in workloads:
            label, select_only = WORKLOADS[workload]
            for mode in modes:
                for n in clients:
                    for path in results.paths:
                        done += 1
                        result = run_pgbench(stack.pgbench, stack.endpoints[path],
                                             select_only=select_only, mode=mode, clients=n,
                                             duration=duration, threads=threads)
                        results.rounds.setdefault((workload, mode, n, path), []).append(result)
                        shown = result.error or f"{fmt_num(result.tps)} tps"
                        log(f"[{done}/{total}] round {round_no + 1}: {label} -M {mode} "
                            f"-c {n} {path}: {shown}")


def measure_streams(stack: Stack, results: Results, methods: Sequence[str], rows: int,
                    repeat: int) -> None:
    """Best of ``repeat`` per path and method (the least disturbed run shows the path)."""
    for method in methods:
        for attempt in range(repeat):
            for path in results.paths:
                result = stream_rows(stack.endpoints[path], method, rows)
                best = results.streams.get((method, path))
                if best is None or (result.rows_per_s or 0) > (best.rows_per_s or 0):
                    results.streams[(method, path)] = result
                shown = result.error or f"{fmt_num(result.rows_per_s)} rows/s"
                log(f"stream {method} #{attempt + 1} {path}: {shown}")


def measure_profile(stack: Stack, results: Results, gateway: str, duration: float,
                    out: Path, threads: int | None) -> None:
    """py-spy on the gateway process under pgbench -S -M prepared -c 8."""
    endpoint = stack.endpoints[gateway]
    assert endpoint.pid is not None
    log(f"profiling {gateway} (pid {endpoint.pid}) with py-spy for {duration:g}s")
    rate = 250
    with py_spy_recording(endpoint.pid, out, duration, rate=rate):
        run = run_pgbench(stack.pgbench, endpoint, select_only=True, mode="prepared",
                          clients=8, duration=duration, threads=threads)
    results.profile_run = run
    results.profile_gateway = gateway
    if out.exists():
        results.profile = parse_collapsed(out, rate, duration)
    else:
        log_text = out.with_suffix(".log").read_text(errors="replace")[-500:]
        results.notes.append(f"py-spy produced no profile: {log_text.strip()}")


def measure_cprofile(stack: Stack, results: Results, spec: GatewaySpec, out: Path,
                     per_client: int, threads: int | None) -> None:
    """A separate gateway under cProfile serves exactly ``8 x per_client`` statements.

    cProfile inflates time several-fold, so its µs are for ranking only; what it adds over
    py-spy is exact call counts per statement.
    """
    profiled = GatewaySpec(f"{spec.name}-cprofile", policies=spec.policies, audit=spec.audit,
                           extra_yaml=spec.extra_yaml, uvloop=spec.uvloop,
                           python_args=("-m", "cProfile", "-o", str(out)))
    gateway = GatewayProcess(profiled, stack.pg, stack.root)
    endpoint = gateway.start()
    log(f"cProfile: {8 * per_client:,} statements through {profiled.name}")
    try:
        run = run_pgbench(stack.pgbench, endpoint, select_only=True, mode="prepared",
                          clients=8, duration=0, threads=threads,
                          extra_args=["-t", str(per_client)])
    finally:
        gateway.stop()
    if run.error or not out.exists():
        results.notes.append(f"cProfile run failed: {run.error or 'no profile written'}")
        return
    results.cprofile = summarise_cprofile(out, 8 * per_client)


# -- report ---------------------------------------------------------------------------------


def _tps(results: Results, workload: str, mode: str, n: int, path: str) -> float | None:
    result = results.cell(workload, mode, n, path)
    return result.tps if result is not None else None


def render_pgbench(results: Results, workloads: Sequence[str], modes: Sequence[str],
                   clients: Sequence[int]) -> str:
    main = results.gateways[0] if results.gateways else None
    has_pgb = PGBOUNCER in results.paths
    header = ["workload", "mode", "clients", *results.paths]
    if main:
        header.append(f"{main}/direct")
        if has_pgb:
            header.append(f"{main}/pgbouncer")
    if has_pgb:
        header.append("pgbouncer/direct")
    for other in results.gateways[1:]:
        header.append(f"{other}/{main}")
    rows: list[list[str]] = []
    errors: list[str] = []
    for workload in workloads:
        for mode in modes:
            for n in clients:
                row = [WORKLOADS[workload][0], mode, str(n)]
                for path in results.paths:
                    result = results.cell(workload, mode, n, path)
                    if result is not None and result.error:
                        row.append("error")
                        errors.append(f"{WORKLOADS[workload][0]} -M {mode} -c {n} via "
                                      f"{path}: {result.error}")
                    else:
                        row.append(fmt_num(result.tps if result else None))
                direct = _tps(results, workload, mode, n, DIRECT)
                pgb = _tps(results, workload, mode, n, PGBOUNCER)
                if main:
                    gw = _tps(results, workload, mode, n, main)
                    row.append(fmt_ratio(gw, direct))
                    if has_pgb:
                        row.append(fmt_ratio(gw, pgb))
                if has_pgb:
                    row.append(fmt_ratio(pgb, direct))
                for other in results.gateways[1:]:
                    row.append(fmt_ratio(_tps(results, workload, mode, n, other),
                                         _tps(results, workload, mode, n, main or "")))
                rows.append(row)
    text = md_table(header, rows, ["l", "l", *["r"] * (len(header) - 2)])
    if errors:
        text += "\n\nErrors:\n" + "\n".join(f"- {e}" for e in errors)
    return text


def render_cpu(results: Results, workloads: Sequence[str], modes: Sequence[str],
               clients: Sequence[int]) -> str:
    """CPU the proxy process burnt per transaction: the cost of the hop itself."""
    proxies = [p for p in results.paths if p != DIRECT]
    if not proxies:
        return ""
    header = ["workload", "mode", "clients", *[f"{p} µs/tx (kernel)" for p in proxies]]
    rows = []
    for workload in workloads:
        for mode in modes:
            for n in clients:
                row = [WORKLOADS[workload][0], mode, str(n)]
                for path in proxies:
                    result = results.cell(workload, mode, n, path)
                    if result is None or result.proxy_cpu_us_per_tx is None:
                        row.append("-")
                    else:
                        row.append(f"{fmt_num(result.proxy_cpu_us_per_tx)} "
                                   f"({fmt_num(result.proxy_sys_us_per_tx)})")
                rows.append(row)
    return md_table(header, rows, ["l", "l", *["r"] * (len(header) - 2)])


def render_streams(results: Results, methods: Sequence[str]) -> str:
    header = ["method", *[f"{p} rows/s" for p in results.paths]]
    header += [f"{p}/direct" for p in results.paths if p != DIRECT]
    rows = []
    errors = []
    for method in methods:
        row = [STREAM_METHODS[method][0]]
        direct = results.streams.get((method, DIRECT))
        for path in results.paths:
            result = results.streams.get((method, path))
            if result is not None and result.error:
                errors.append(f"{method} via {path}: {result.error}")
            row.append(fmt_num(result.rows_per_s if result else None))
        for path in results.paths:
            if path == DIRECT:
                continue
            result = results.streams.get((method, path))
            row.append(fmt_ratio(result.rows_per_s if result else None,
                                 direct.rows_per_s if direct else None))
        rows.append(row)
    text = md_table(header, rows)
    if errors:
        text += "\n\nErrors:\n" + "\n".join(f"- {e}" for e in errors)
    return text


def render_memory(results: Results) -> str:
    rows = []
    for path in results.paths:
        if path == DIRECT:
            continue
        start = results.memory_start.get(path, {})
        end = results.memory_end.get(path, {})
        rows.append([path, fmt_num(start.get("rss"), 1), fmt_num(end.get("rss"), 1),
                     fmt_num(end.get("peak"), 1)])
    return md_table(["process", "RSS at start (MB)", "RSS at end (MB)",
                     "peak RSS, VmHWM (MB)"], rows)


def _mark(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[ok]


def render_targets(results: Results, modes: Sequence[str], clients: Sequence[int],
                   methods: Sequence[str]) -> str:
    """The issue's targets for the first gateway (the one without comparisons)."""
    if not results.gateways:
        return ""
    main = results.gateways[0]
    lines = []
    if PGBOUNCER in results.paths and 8 in clients and "select" in {
            key[0] for key in results.rounds}:
        for mode in modes:
            gw, pgb = (_tps(results, "select", mode, 8, main),
                       _tps(results, "select", mode, 8, PGBOUNCER))
            value = ratio(gw, pgb)
            ok = None if value is None else value >= TARGET_SELECT_VS_PGBOUNCER
            lines.append(f"- {_mark(ok)} select-only -M {mode} -c 8: {main}/pgbouncer = "
                         f"{fmt_ratio(gw, pgb)} (target ≥ {TARGET_SELECT_VS_PGBOUNCER})")
    for method in methods:
        gw_stream, direct_stream = (results.streams.get((method, main)),
                                    results.streams.get((method, DIRECT)))
        gw_rate = gw_stream.rows_per_s if gw_stream else None
        direct_rate = direct_stream.rows_per_s if direct_stream else None
        value = ratio(gw_rate, direct_rate)
        ok = None if value is None else value >= TARGET_STREAM_VS_DIRECT
        lines.append(f"- {_mark(ok)} 1M-row stream, {STREAM_METHODS[method][0]}: "
                     f"{main}/direct = {fmt_ratio(gw_rate, direct_rate)} "
                     f"(target ≥ {TARGET_STREAM_VS_DIRECT})")
    for gateway in results.gateways:
        peak = results.memory_end.get(gateway, {}).get("peak")
        ok = None if peak is None else peak < TARGET_RSS_MB
        lines.append(f"- {_mark(ok)} {gateway} peak RSS = {fmt_num(peak, 1)} MB "
                     f"(target < {TARGET_RSS_MB:g} MB)")
    return "\n".join(lines)


def render_profile(results: Results, top: int = 20) -> str:
    profile = results.profile
    if profile is None or profile.samples == 0:
        return "No profile samples (see notes)."
    run = results.profile_run
    per_tx = run.proxy_cpu_us_per_tx if run else None
    sys_us = run.proxy_sys_us_per_tx if run else None
    user_us = per_tx - sys_us if per_tx is not None and sys_us is not None else None
    total = profile.samples

    def share(count: int) -> str:
        return f"{count / total:.1%}"

    def us(count: int, syscall: bool) -> str:
        return fmt_num(profile.estimate_us(count, syscall, user_us, sys_us), 1)

    util = profile.utilisation
    lines = [
        f"`pgbench -S -M prepared -c 8` through **{results.profile_gateway}** under py-spy: "
        f"{fmt_num(run.tps if run else None)} tps; the gateway used "
        f"**{fmt_num(per_tx, 1)} µs of CPU per statement** ({fmt_num(user_us, 1)} user + "
        f"{fmt_num(sys_us, 1)} kernel, from /proc) and its thread was on CPU "
        f"{f'{util:.0%}' if util is not None else '?'} of the time ({total:,} samples).",
        "",
        "py-spy pauses the process for each sample, which over-weights time inside system "
        "calls, so the sample shares of `kernel:` rows read high; the µs column spreads the "
        "measured kernel time over those rows and the user time over the rest.",
        "",
        "Where the time goes (leaf frame, by area):",
        "",
        md_table(["area", "samples", "≈ µs/stmt"],
                 [[area, share(count), us(count, area.startswith("kernel:"))]
                  for area, count in profile.self_by_area.most_common()]),
        "",
        f"Top {top} functions by self time:",
        "",
        md_table(["function", "samples", "≈ µs/stmt"],
                 [[f"`{frame}`", share(count), us(count, is_syscall_leaf(frame))]
                  for frame, count in profile.self_by_function.most_common(top)]),
        "",
        "hoopops call sites by inclusive time (the line and everything it calls; shares "
        "include the calls' kernel time):",
        "",
        md_table(["call site", "samples"],
                 [[f"`{frame}`", share(count)]
                  for frame, count in profile.inclusive_by_line.most_common()
                  if not frame.startswith(("<module>", "main ", "run "))][:top]),
    ]
    if profile.raw_path is not None:
        lines += ["", f"Raw collapsed stacks: `{profile.raw_path}` (flamegraph.pl or "
                  "speedscope.app read them)."]
    return "\n".join(lines)


def render_cprofile(profile: CallProfile, top: int = 20) -> str:
    lines = [
        f"A separate gateway under cProfile served {profile.statements:,} statements "
        "(`pgbench -S -M prepared -c 8 -t N`): about "
        f"**{profile.calls_per_statement:.0f} function calls (Python and builtin) per "
        "statement** in functions that run at least every other statement. cProfile "
        "inflates time several times over; use its µs to rank, and the py-spy figures "
        "above for magnitude.",
        "",
        md_table(["function", "calls/stmt", "own µs/stmt (cProfile)"],
                 [[f"`{name}`", f"{calls:.2f}", f"{own:.1f}"]
                  for name, calls, own in profile.rows[:top]]),
    ]
    return "\n".join(lines)


def render(results: Results, args: argparse.Namespace, stack: Stack) -> str:
    pg_version = stack.pg.psql("show server_version").strip()
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gateways = ", ".join(
        f"{s.name} (policies: {s.policies or 'none'}, audit: {'on' if s.audit else 'off'}"
        f"{', uvloop' if s.uvloop else ''})" for s in stack.specs)
    parts = [
        "## hoopops gateway benchmark",
        "",
        f"- when: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; machine: "
        f"{os.cpu_count()} CPUs ({cpu_model or platform.machine()}), Python "
        f"{platform.python_version()}, PostgreSQL {pg_version} (embedded, fsync off), "
        f"{stack.pgbouncer_version or 'no pgbouncer'} (session pool)",
        f"- pgbench scale {args.scale}, {args.rounds} round(s) of -T {args.duration:g}s per "
        f"cell (TPS is the mean of rounds), -j {args.threads or 'min(clients, CPUs)'}; "
        "client, proxies and PostgreSQL share the machine; every path in the same run",
        f"- gateways: {gateways}",
        f"- load average (1 min) before/after: {results.load_before:.2f} / "
        f"{os.getloadavg()[0]:.2f} (anything else running on the machine skews the numbers)",
    ]
    if stack.relays:
        parts.append("- relay:* are bare Python relays (`benchmarks/_relay.py`) for "
                     "calibration: `streams` = two StreamReader/Writer pump tasks per "
                     "connection; `protocol` = asyncio.Protocol callbacks that frame every "
                     "message and forward chunks unchanged")
    parts += [
        f"- command: `{' '.join(['python', *sys.argv])}`",
        "",
        "### pgbench TPS (higher is better)",
        "",
        render_pgbench(results, args.workloads, args.modes, args.clients),
        "",
        "### Proxy CPU per transaction (µs; lower is better)",
        "",
        "CPU time of the proxy process during the runs divided by the transactions they "
        "served (a TPC-B-like transaction is 7 statements). On a machine where client, "
        "proxy and server share two cores, a proxy's TPS is roughly the CPU share the "
        "scheduler gives it divided by this figure.",
        "",
        render_cpu(results, args.workloads, args.modes, args.clients),
    ]
    if args.stream_methods:
        parts += ["", f"### {args.stream_rows:,}-row result streamed through each path",
                  "", f"`{STREAM_SQL.format(rows=args.stream_rows)}`, best of "
                  f"{args.stream_repeat}; the clock excludes the login.", "",
                  render_streams(results, args.stream_methods)]
    parts += ["", "### Memory", "", render_memory(results)]
    targets = render_targets(results, args.modes, args.clients, args.stream_methods)
    if targets:
        parts += ["", "### Targets (issue 2)", "", targets]
    if results.profile is not None or args.profile:
        parts += ["", "### Profile (py-spy)", "", render_profile(results)]
    if results.cprofile is not None:
        parts += ["", "### Calls per statement (cProfile)", "",
                  render_cprofile(results.cprofile)]
    notes = stack.notes + results.notes
    if notes:
        parts += ["", "### Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(parts) + "\n"


# -- command line ---------------------------------------------------------------------------


def _csv(kind: Callable[[str], Any], allowed: Sequence[str] | None = None
         ) -> Callable[[str], list[Any]]:
    """An argparse type for comma-separated lists, checked against ``allowed``."""
    def parse(text: str) -> list[Any]:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        if allowed is not None:
            bad = [x for x in items if x not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"unknown {bad}; choose from {', '.join(allowed)}")
        return items
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="pgbench (select-only and TPC-B-like; simple/extended/prepared) and a "
        "large streamed result, directly, through pgbouncer (session mode) and through the "
        "hoopops gateway, all in one run. Markdown on stdout; progress on stderr.")
    parser.add_argument("--quick", action="store_true",
                        help="~1 minute smoke run: one round of -T 2, 8 clients, scale 1, "
                        "one stream try")
    parser.add_argument("--duration", "-T", type=float, default=None,
                        help="seconds per pgbench run (default 4; 2 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="times the whole pgbench matrix is run; TPS is the mean "
                        "(default 2; 1 with --quick)")
    parser.add_argument("--clients", type=_csv(int), default=None,
                        help="comma-separated client counts (default 1,8,32)")
    parser.add_argument("--modes", type=_csv(str, MODES), default=list(MODES),
                        help="pgbench -M modes (default simple,extended,prepared)")
    parser.add_argument("--workloads", type=_csv(str, list(WORKLOADS)),
                        default=list(WORKLOADS), help="select,tpcb (default both)")
    parser.add_argument("--scale", type=int, default=None,
                        help="pgbench scale factor (default 10; 1 with --quick)")
    parser.add_argument("--threads", "-j", type=int, default=None,
                        help="pgbench -j (default min(clients, CPUs))")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of direct select-only load before measuring")
    parser.add_argument("--stream-rows", type=int, default=1_000_000)
    parser.add_argument("--stream-methods", type=_csv(str, list(STREAM_METHODS)),
                        default=list(STREAM_METHODS),
                        help="copy,select,cursor (default all; '' for none)")
    parser.add_argument("--stream-repeat", type=int, default=None,
                        help="tries per stream and path, best kept (default 2; 1 --quick)")
    parser.add_argument("--no-pgbouncer", action="store_true", help="leave pgbouncer out")
    parser.add_argument("--policies", type=Path, default=None, metavar="DIR",
                        help="run the gateway with this policy folder")
    parser.add_argument("--compare-policy", action="store_true",
                        help="also run a gateway with the policy folder (--policies, default "
                        "the repo's policies/) beside one without, in the same run")
    parser.add_argument("--audit", action="store_true", help="run the gateway with audit on")
    parser.add_argument("--compare-audit", action="store_true",
                        help="also run a gateway with audit on beside one with audit off")
    parser.add_argument("--audit-synchronous", choices=("FULL", "NORMAL"), default="FULL",
                        help="audit.synchronous of the gateways with audit on (default FULL)")
    parser.add_argument("--gateway-yaml", type=Path, default=None, metavar="FILE",
                        help="YAML appended to every gateway's hoopops.yaml (e.g. masking)")
    parser.add_argument("--compare-uvloop", action="store_true",
                        help="also run the gateway on uvloop (needs uvloop importable; an "
                        "experiment, not a hoopops dependency)")
    parser.add_argument("--relays", type=_csv(str, RELAY_KINDS), default=[],
                        metavar="KINDS", help="bare Python relays to calibrate against: "
                        f"{','.join(RELAY_KINDS)}")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the gateway under pgbench -S -M prepared -c 8")
    parser.add_argument("--profile-duration", type=float, default=10.0)
    parser.add_argument("--profile-out", type=Path, default=None, metavar="FILE",
                        help="where to keep py-spy's collapsed stacks")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also run a cProfile'd gateway for 8 x N prepared select-only "
                        "statements and report calls per statement (try 2000)")
    parser.add_argument("--output", "-o", type=Path, default=None, metavar="FILE",
                        help="also write the Markdown report here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder (configs, logs, database)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (2.0 if args.quick else 4.0)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.clients = args.clients or ([8] if args.quick else [1, 8, 32])
    args.scale = args.scale or (1 if args.quick else 10)
    args.stream_repeat = args.stream_repeat or (1 if args.quick else 2)
    if args.quick:
        args.warmup = min(args.warmup, 1.0)
    return args


def gateway_specs(args: argparse.Namespace) -> list[GatewaySpec]:
    """The gateways to start: the one measured, plus one per comparison asked for."""
    extra = args.gateway_yaml.read_text() if args.gateway_yaml else ""
    policies = args.policies.resolve() if args.policies else None
    base = GatewaySpec("gateway", policies=None if args.compare_policy else policies,
                       audit=args.audit and not args.compare_audit, extra_yaml=extra,
                       audit_synchronous=args.audit_synchronous)
    specs = [base]
    if args.compare_policy:
        specs.append(GatewaySpec("gateway+policy", policies=policies or REPO / "policies",
                                 audit=base.audit, extra_yaml=extra,
                                 audit_synchronous=args.audit_synchronous))
    if args.compare_audit:
        specs.append(GatewaySpec("gateway+audit", policies=base.policies, audit=True,
                                 extra_yaml=extra,
                                 audit_synchronous=args.audit_synchronous))
    if args.compare_uvloop:
        specs.append(GatewaySpec("gateway+uvloop", policies=base.policies, audit=base.audit,
                                 extra_yaml=extra, uvloop=True))
    return specs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with Stack(args.scale, gateway_specs(args), with_pgbouncer=not args.no_pgbouncer,
               keep=args.keep, relays=args.relays) as stack:
        paths = [DIRECT, *([PGBOUNCER] if PGBOUNCER in stack.endpoints else []),
                 *[s.name for s in stack.specs], *[r.name for r in stack.relays]]
        results = Results(paths=paths, gateways=[s.name for s in stack.specs])
        for path in paths:
            results.memory_start[path] = proc_memory_mb(stack.endpoints[path].pid)
        if args.warmup > 0:
            run_pgbench(stack.pgbench, stack.direct, select_only=True, mode="prepared",
                        clients=8, duration=args.warmup, threads=args.threads)
        measure_pgbench(stack, results, args.workloads, args.modes, args.clients,
                        args.duration, args.threads, args.rounds)
        if args.stream_methods:
            measure_streams(stack, results, args.stream_methods, args.stream_rows,
                            args.stream_repeat)
        if args.profile:
            out = args.profile_out or stack.root / "gateway.pyspy.txt"
            measure_profile(stack, results, results.gateways[0], args.profile_duration,
                            out.resolve(), args.threads)
            if results.profile is not None and not (args.profile_out or args.keep):
                results.profile.raw_path = None  # it goes with the temporary folder
        # Read the peaks before anything is stopped (VmHWM dies with the process).
        for path in paths:
            results.memory_end[path] = proc_memory_mb(stack.endpoints[path].pid)
        if args.cprofile > 0:
            measure_cprofile(stack, results, stack.specs[0], stack.root / "gateway.cprofile",
                             args.cprofile, args.threads)
        report = render(results, args, stack)
    sys.stdout.write(report)
    if args.output:
        args.output.write_text(report)
        log(f"report written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

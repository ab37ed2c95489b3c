"""Shared machinery for the hoopops benchmarks: one stack, many measurements.

Everything a benchmark needs lives here so that ``bench_gateway.py`` and the policy,
audit and masking benchmarks compare like with like in the same run:

* :class:`Stack` starts a private PostgreSQL 18 (``hoopops.devdb.LocalPostgres``, SCRAM
  on), fills it with pgbench data, and starts each proxy to compare: pgbouncer (Debian's
  package, session pool) and one gateway process per :class:`GatewaySpec` (policy folder,
  audit on or off, extra YAML such as a masking section).
* Each proxy runs **in its own process** (``python -m hoopops serve``), so the benchmark
  client never shares an event loop or a GIL with the gateway it measures.
* Measurements are plain functions returning numbers (:func:`run_pgbench`,
  :func:`stream_rows`, :func:`proc_cpu_seconds`, :func:`proc_memory_mb`,
  :func:`profile_with_py_spy`), so a new comparison is a new loop, not a new harness.

Import from a script in this folder with ``from _common import ...`` (the script's folder
is on ``sys.path`` when run as ``python benchmarks/NAME.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hoopops.devdb import SERVICE_USER, LocalPostgres, free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Identity settings for the gateways this harness starts; the secret only ever signs
# throwaway benchmark tokens for a loopback gateway.
JWT_SECRET = "bench-secret-0123456789-abcdefghijklmnopqrstuv"
ISSUER = "https://idp.bench.test"
AUDIENCE = "hoopops"
TARGET = "appdb"
BENCH_SUBJECT = "bench-agent"
BENCH_GROUPS = ("agents",)
# A token outlives any run: a session whose token expires is closed by the gateway, which
# would show up as a failed pgbench run rather than a number.
TOKEN_TTL = 12 * 3600.0

STREAM_SQL = "select g, md5(g::text) from generate_series(1, {rows}) g"


@contextlib.contextmanager
def pgbench_postgres(scale: int = 1) -> Iterator[LocalPostgres]:
    """An embedded PostgreSQL holding pgbench's tables at ``scale``, removed afterwards."""
    pg = LocalPostgres()
    pg.start()
    try:
        init = subprocess.run(
            [pg.tool("pgbench"), "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p",
             str(pg.port), "-U", SERVICE_USER, "app"],
            env={**os.environ, "PGPASSWORD": pg.service_password, "PGSSLMODE": "disable"},
            capture_output=True, text=True, check=False)
        if init.returncode != 0:
            raise SystemExit(f"pgbench -i failed: {init.stderr.strip()}")
        yield pg
    finally:
        pg.stop(remove=True)


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays a clean Markdown report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- endpoints and process statistics -------------------------------------------------------


@dataclass
class Endpoint:
    """One way to reach the database: directly, through pgbouncer, or through a gateway."""

    name: str
    port: int
    user: str
    password: str = field(repr=False)
    database: str
    host: str = "127.0.0.1"
    pid: int | None = None  # the proxy's process (RSS and CPU); None for direct

    def env(self) -> dict[str, str]:
        """Environment for libpq tools (pgbench, psql): the password never hits argv."""
        return {**os.environ, "PGPASSWORD": self.password, "PGSSLMODE": "disable",
                "PGCONNECT_TIMEOUT": "15", "PGAPPNAME": "hoopops-bench"}

    def psycopg_kwargs(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user,
                "password": self.password, "dbname": self.database, "sslmode": "disable",
                "connect_timeout": 15}

    def asyncpg_kwargs(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user,
                "password": self.password, "database": self.database, "ssl": False,
                "timeout": 15}


def proc_cpu_times(pid: int | None) -> tuple[float, float] | None:
    """(user, system) CPU seconds a process (all its threads) has used so far.

    The split matters: system time is the kernel's share (socket syscalls, wake-ups),
    which a proxy pays per message whatever language it is written in.
    """
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after its ')' are fixed.
    fields = text[text.rindex(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def proc_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU a process has used so far."""
    times = proc_cpu_times(pid)
    return None if times is None else times[0] + times[1]


def proc_memory_mb(pid: int | None) -> dict[str, float]:
    """``{"rss": MB, "peak": MB}`` from /proc/PID/status (VmRSS and VmHWM, the RSS peak)."""
    if pid is None:
        return {}
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                out["peak"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None,
                  timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on {host}:{port} within {timeout:g}s")


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 timeout: float = 15.0) -> None:
    """Ask nicely, then insist: only ever the process this harness started."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _tail(path: Path, limit: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


# -- the gateway under test -----------------------------------------------------------------


@dataclass(frozen=True)
class GatewaySpec:
    """One gateway configuration to measure (each runs as its own process)."""

    name: str = "gateway"
    policies: Path | None = None  # a policy folder (``policies:`` in hoopops.yaml)
    audit: bool = False  # full audit trail on (SQLite), else ``audit.enabled: false``
    audit_synchronous: str = "FULL"  # audit.synchronous when audit is on
    extra_yaml: str = ""  # appended to hoopops.yaml verbatim (for example ``masking:``)
    python_args: tuple[str, ...] = ()  # before the program, e.g. ("-m", "cProfile", ...)
    uvloop: bool = False  # run on uvloop through _gateway_runner.py (an experiment)


def gateway_config_text(spec: GatewaySpec, pg: LocalPostgres, port: int, folder: Path) -> str:
    lines = [
        f"listen: 127.0.0.1:{port}",
        "targets:",
        f"  {TARGET}:",
        # sslmode=disable: the direct and pgbouncer paths are plaintext too, so the
        # comparison measures the relay, not TLS.
        f"    upstream: {pg.dsn()}?sslmode=disable",
        "identity:",
        f"  issuer: {ISSUER}",
        f"  audience: {AUDIENCE}",
        f"  hs256_secret: {JWT_SECRET}",
        "limits:",
        "  max_connections_per_identity: 500",
        "  shutdown_grace: 2s",
    ]
    if spec.policies is not None:
        lines.append(f"policies: {spec.policies.resolve()}")
    if "approvals:" not in spec.extra_yaml:
        # Nobody approves anything during a benchmark: a statement the policy sends to
        # review is denied after 2s (pgbench reports the error) instead of hanging a run.
        lines += ["approvals:", "  timeout: 2s"]
    lines += ["audit:", f"  path: {folder / f'audit-{_slug(spec.name)}.db'}"]
    if not spec.audit:
        lines.append("  enabled: false")
    else:
        lines.append(f"  synchronous: {spec.audit_synchronous}")
    return "\n".join(lines) + "\n" + spec.extra_yaml


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


class GatewayProcess:
    """``python -m hoopops serve`` in a child process, with a minted token to reach it."""

    def __init__(self, spec: GatewaySpec, pg: LocalPostgres, folder: Path) -> None:
        self.spec = spec
        self.pg = pg
        self.folder = folder / f"gw-{_slug(spec.name)}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log_path = self.folder / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint: Endpoint | None = None

    def start(self) -> Endpoint:
        from hoopops.config import load_config
        from hoopops.identity import mint_token

        port = free_port()
        config_path = self.folder / "hoopops.yaml"
        config_path.write_text(gateway_config_text(self.spec, self.pg, port, self.folder))
        config = load_config(config_path)  # a bad spec fails here, with a clear message
        token = mint_token(config.identity, BENCH_SUBJECT, list(BENCH_GROUPS), TOKEN_TTL)
        program = [str(HERE / "_gateway_runner.py"), "--uvloop"] if self.spec.uvloop else [
            "-m", "hoopops"]
        cmd = [sys.executable, *self.spec.python_args, *program, "serve",
               "--config", str(config_path), "--log-level", "WARNING"]
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.folder)
        try:
            wait_for_port(port, self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"gateway '{self.spec.name}' did not start: {exc}\n"
                               f"{_tail(self.log_path)}") from None
        self.endpoint = Endpoint(self.spec.name, port, "agent", token, TARGET,
                                 pid=self.proc.pid)
        return self.endpoint

    def stop(self) -> None:
        if self.proc is not None:
            # SIGTERM is `hoopops serve`'s clean shutdown (a profiler wrapping it gets to
            # write its output).
            stop_process(self.proc, signal.SIGTERM, timeout=30)


# -- calibration relays ---------------------------------------------------------------------


RELAY_KINDS = ("streams", "protocol", "protocol+uvloop")


class RelayProcess:
    """A bare Python relay (``_relay.py``) in front of PostgreSQL, to calibrate against."""

    def __init__(self, kind: str, pg: LocalPostgres, folder: Path) -> None:
        self.kind = kind
        self.pg = pg
        self.log_path = folder / f"relay-{_slug(kind)}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"relay:{self.kind}"

    def start(self) -> Endpoint:
        port = free_port()
        kind, _, loop = self.kind.partition("+")
        cmd = [sys.executable, str(HERE / "_relay.py"), kind, str(port), str(self.pg.port),
               *(["--uvloop"] if loop == "uvloop" else [])]
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        try:
            wait_for_port(port, self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{self.name} did not start: {exc}\n{_tail(self.log_path)}"
                               ) from None
        # Through a transparent relay the client logs in to PostgreSQL itself.
        return Endpoint(self.name, port, SERVICE_USER, self.pg.service_password, "app",
                        pid=self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout=5)


# -- pgbouncer ------------------------------------------------------------------------------


def find_or_install_pgbouncer() -> tuple[str | None, str]:
    """The pgbouncer binary, installing Debian's package when we can; else a reason."""
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None)
    if found:
        return found, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, ("pgbouncer is not installed and this user cannot install it "
                      "(run as root on Debian/Ubuntu, or `apt-get install pgbouncer`)")
    log("installing pgbouncer with apt-get (Debian's package)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in (["apt-get", "install", "-y", "-q", "pgbouncer"],
                    ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "pgbouncer"]):
        subprocess.run(attempt, env=env, capture_output=True, check=False, timeout=600)
        found = shutil.which("pgbouncer") or (
            "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
        if found:
            return found, ""
    return None, "`apt-get install pgbouncer` failed; pgbouncer columns are left out"


def pgbouncer_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip() if first else "pgbouncer"


class PgBouncer:
    """pgbouncer in session pool mode in front of the same PostgreSQL.

    The client logs in to pgbouncer as the service user with its password
    (``auth_type = scram-sha-256`` against a userlist holding the plain password), and
    pgbouncer uses that same password for its own SCRAM login upstream: the same
    credential path the gateway uses, minus the token.
    """

    def __init__(self, binary: str, pg: LocalPostgres, folder: Path) -> None:
        self.binary = binary
        self.pg = pg
        self.folder = folder / "pgbouncer"
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint: Endpoint | None = None

    def start(self, pool_size: int = 100) -> Endpoint:
        self.folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        password = self.pg.service_password
        (self.folder / "userlist.txt").write_text(f'"{SERVICE_USER}" "{password}"\n')
        (self.folder / "pgbouncer.ini").write_text("\n".join([
            "[databases]",
            f"app = host=127.0.0.1 port={self.pg.port} dbname=app",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {port}",
            "unix_socket_dir =",
            "auth_type = scram-sha-256",
            f"auth_file = {self.folder / 'userlist.txt'}",
            "pool_mode = session",
            "max_client_conn = 1000",
            # Session mode holds one server connection per client: size the pool so the
            # 32-client runs never queue in pgbouncer.
            f"default_pool_size = {pool_size}",
            "ignore_startup_parameters = extra_float_digits",
            f"logfile = {self.folder / 'pgbouncer.log'}",
            f"pidfile = {self.folder / 'pgbouncer.pid'}",
            "log_connections = 0",
            "log_disconnections = 0",
            "",
        ]))
        # pgbouncer refuses to run as root; run it as an unprivileged user that owns its
        # folder (the same user the embedded PostgreSQL runs as, when there is one).
        user = None
        if os.geteuid() == 0:
            user = _unprivileged_user()
            for path in (self.folder, *self.folder.iterdir()):
                shutil.chown(path, user, user)
        log_path = self.folder / "stdout.log"
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen([self.binary, str(self.folder / "pgbouncer.ini")],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, user=user)
        try:
            wait_for_port(port, self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"pgbouncer did not start: {exc}\n{_tail(log_path)}"
                               f"{_tail(self.folder / 'pgbouncer.log')}") from None
        self.endpoint = Endpoint("pgbouncer", port, SERVICE_USER, password, "app",
                                 pid=self.proc.pid)
        return self.endpoint

    def stop(self) -> None:
        if self.proc is not None:
            # SIGINT is pgbouncer's "safe shutdown"; SIGTERM would do too at the end.
            stop_process(self.proc, signal.SIGINT, timeout=5)


def _unprivileged_user() -> str:
    for name in ("embedded_postgres", "postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("no unprivileged user to run pgbouncer as")


# -- the stack ------------------------------------------------------------------------------


class Stack:
    """PostgreSQL + pgbench data + pgbouncer + gateways, all started in one run."""

    def __init__(self, scale: int, gateways: Sequence[GatewaySpec],
                 with_pgbouncer: bool = True, keep: bool = False,
                 pg_settings: dict[str, str] | None = None,
                 relays: Sequence[str] = ()) -> None:
        self.scale = scale
        self.specs = list(gateways)
        self.relay_kinds = list(relays)
        self.relays: list[RelayProcess] = []
        self.with_pgbouncer = with_pgbouncer
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="hoopops-bench-"))
        # A few more connections than the default: direct, pgbouncer's pool and each
        # gateway may all hold 32 at once.
        settings = {"max_connections": "300", **(pg_settings or {})}
        self.pg = LocalPostgres(self.root / "pg", settings=settings)
        self.pgbouncer: PgBouncer | None = None
        self.pgbouncer_note = ""
        self.pgbouncer_version = ""
        self.gateways: dict[str, GatewayProcess] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.notes: list[str] = []

    @property
    def pgbench(self) -> str:
        return self.pg.tool("pgbench")

    @property
    def direct(self) -> Endpoint:
        return self.endpoints["direct"]

    def gateway_endpoints(self) -> list[Endpoint]:
        return [self.endpoints[s.name] for s in self.specs if s.name in self.endpoints]

    def start(self) -> Stack:
        log(f"starting PostgreSQL under {self.root}")
        self.pg.start()
        self.endpoints["direct"] = Endpoint("direct", self.pg.port, SERVICE_USER,
                                            self.pg.service_password, "app")
        log(f"pgbench -i -s {self.scale}")
        init = subprocess.run(
            [self.pgbench, "-i", "-q", "-s", str(self.scale), "-h", "127.0.0.1", "-p",
             str(self.pg.port), "-U", SERVICE_USER, "app"],
            env=self.direct.env(), capture_output=True, text=True, check=False)
        if init.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {init.stderr.strip()}")
        if self.with_pgbouncer:
            binary, note = find_or_install_pgbouncer()
            if binary is None:
                self.pgbouncer_note = note
                self.notes.append(f"pgbouncer skipped: {note}")
                log(f"pgbouncer skipped: {note}")
            else:
                self.pgbouncer_version = pgbouncer_version(binary)
                self.pgbouncer = PgBouncer(binary, self.pg, self.root)
                self.endpoints["pgbouncer"] = self.pgbouncer.start()
                log(f"{self.pgbouncer_version} on port {self.endpoints['pgbouncer'].port}")
        for spec in self.specs:
            gateway = GatewayProcess(spec, self.pg, self.root)
            self.gateways[spec.name] = gateway
            self.endpoints[spec.name] = gateway.start()
            log(f"{spec.name} (pid {gateway.proc.pid if gateway.proc else '?'}) on port "
                f"{self.endpoints[spec.name].port}")
        for kind in self.relay_kinds:
            relay = RelayProcess(kind, self.pg, self.root)
            self.relays.append(relay)
            self.endpoints[relay.name] = relay.start()
        for endpoint in self.endpoints.values():
            check_endpoint(endpoint)
        return self

    def stop(self) -> None:
        for proxy in (*self.gateways.values(), *self.relays):
            with contextlib.suppress(Exception):
                proxy.stop()
        if self.pgbouncer is not None:
            with contextlib.suppress(Exception):
                self.pgbouncer.stop()
        with contextlib.suppress(Exception):
            self.pg.stop(remove=False)
        if self.keep:
            log(f"kept {self.root} (logs, configs)")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def check_endpoint(endpoint: Endpoint) -> None:
    """One round trip through the path, so a broken proxy fails before the numbers start."""
    import psycopg

    try:
        with psycopg.connect(**endpoint.psycopg_kwargs()) as conn:
            value = conn.execute("select count(*) from pgbench_branches").fetchone()
    except psycopg.Error as exc:
        raise RuntimeError(f"{endpoint.name} does not answer queries: {exc}") from None
    if not value or value[0] < 1:
        raise RuntimeError(f"{endpoint.name}: pgbench tables are empty")


# -- pgbench --------------------------------------------------------------------------------


@dataclass
class PgbenchResult:
    tps: float | None = None
    latency_ms: float | None = None
    transactions: int = 0
    failed: int = 0
    proxy_cpu_s: float | None = None  # CPU the proxy process used during the run
    proxy_sys_s: float | None = None  # ... of which in the kernel
    error: str | None = None

    @property
    def proxy_cpu_us_per_tx(self) -> float | None:
        if self.proxy_cpu_s is None or not self.transactions:
            return None
        return self.proxy_cpu_s / self.transactions * 1e6

    @property
    def proxy_sys_us_per_tx(self) -> float | None:
        if self.proxy_sys_s is None or not self.transactions:
            return None
        return self.proxy_sys_s / self.transactions * 1e6


def combine(results: Sequence[PgbenchResult]) -> PgbenchResult:
    """Rounds of one cell as one result: mean TPS, summed transactions and proxy CPU.

    Any failed round marks the cell as failed: a path that breaks sometimes is broken.
    """
    if not results:
        return PgbenchResult(error="not run")
    ok = [r for r in results if r.tps is not None]
    errors = [r.error for r in results if r.error]
    if not ok:
        return PgbenchResult(error=errors[0] if errors else "no result")
    cpu = [r.proxy_cpu_s for r in ok]
    sys_cpu = [r.proxy_sys_s for r in ok]
    latencies = [r.latency_ms for r in ok if r.latency_ms is not None]
    return PgbenchResult(
        tps=statistics.fmean(r.tps for r in ok if r.tps is not None),
        latency_ms=statistics.fmean(latencies) if latencies else None,
        transactions=sum(r.transactions for r in ok),
        failed=sum(r.failed for r in results),
        proxy_cpu_s=None if any(c is None for c in cpu) else sum(c or 0.0 for c in cpu),
        proxy_sys_s=None if any(c is None for c in sys_cpu) else sum(
            c or 0.0 for c in sys_cpu),
        error=errors[0] if errors else None)


_TPS = re.compile(r"^tps = ([\d.]+) \(without initial connection time\)", re.M)
_LAT = re.compile(r"^latency average = ([\d.]+) ms", re.M)
_TXN = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)


def run_pgbench(pgbench: str, endpoint: Endpoint, *, select_only: bool, mode: str,
                clients: int, duration: float, threads: int | None = None,
                extra_args: Sequence[str] = ()) -> PgbenchResult:
    """One pgbench run against ``endpoint``; TPS excludes connection time.

    ``duration`` 0 leaves ``-T`` out, for callers that pass ``-t N`` in ``extra_args``.
    """
    jobs = threads or min(clients, os.cpu_count() or 1)
    args = [pgbench, "-n", "-h", endpoint.host, "-p", str(endpoint.port), "-U", endpoint.user,
            "-M", mode, "-c", str(clients), "-j", str(jobs),
            *(["-T", f"{duration:g}"] if duration > 0 else []),
            *(["-S"] if select_only else []), *extra_args, endpoint.database]
    cpu_before = proc_cpu_times(endpoint.pid)
    try:
        done = subprocess.run(args, env=endpoint.env(), capture_output=True, text=True,
                              timeout=(duration or 480) + 60, check=False)
    except subprocess.TimeoutExpired:
        return PgbenchResult(error="pgbench timed out (a statement held by the gateway?)")
    cpu_after = proc_cpu_times(endpoint.pid)
    result = PgbenchResult()
    if cpu_before is not None and cpu_after is not None:
        result.proxy_cpu_s = sum(cpu_after) - sum(cpu_before)
        result.proxy_sys_s = cpu_after[1] - cpu_before[1]
    if (match := _TXN.search(done.stdout)) is not None:
        result.transactions = int(match.group(1))
    if (match := _FAILED.search(done.stdout)) is not None:
        result.failed = int(match.group(1))
    tps = _TPS.search(done.stdout)
    if done.returncode != 0 or tps is None:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        # The server's (or gateway's) own words say more than pgbench's closing line.
        told = [line for line in lines if "ERROR:" in line or "FATAL:" in line]
        line = (told or lines or [f"pgbench exited {done.returncode}"])[0]
        result.error = " ".join(line.split())[:240]
        return result
    result.tps = float(tps.group(1))
    if (match := _LAT.search(done.stdout)) is not None:
        result.latency_ms = float(match.group(1))
    return result


# -- streaming a large result ---------------------------------------------------------------


@dataclass
class StreamResult:
    rows: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def rows_per_s(self) -> float | None:
        return self.rows / self.seconds if self.seconds > 0 and self.error is None else None


def _stream_copy(endpoint: Endpoint, rows: int) -> tuple[int, float]:
    """COPY (query) TO STDOUT: CopyData messages, read as raw blocks by psycopg."""
    import psycopg

    with psycopg.connect(**endpoint.psycopg_kwargs()) as conn, conn.cursor() as cur:
        count = 0
        started = time.perf_counter()
        with cur.copy(f"COPY ({STREAM_SQL.format(rows=rows)}) TO STDOUT") as copy:
            for block in copy:
                count += bytes(block).count(b"\n")
        return count, time.perf_counter() - started


def _stream_select(endpoint: Endpoint, rows: int) -> tuple[int, float]:
    """A plain simple-protocol SELECT: DataRow messages, collected by libpq (no Python rows),
    so the client costs as little as possible and the path shows."""
    import psycopg

    with psycopg.connect(**endpoint.psycopg_kwargs()) as conn:
        started = time.perf_counter()
        cur = conn.execute(STREAM_SQL.format(rows=rows), prepare=False)
        elapsed = time.perf_counter() - started
        result = cur.pgresult
        return (result.ntuples if result is not None else 0), elapsed


def _stream_cursor(endpoint: Endpoint, rows: int) -> tuple[int, float]:
    """asyncpg cursor: extended protocol, binary rows, Execute with a row limit (a portal
    suspended every 10,000 rows), decoded into Python records as an application would."""
    import asyncpg

    async def go() -> tuple[int, float]:
        conn = await asyncpg.connect(**endpoint.asyncpg_kwargs())
        try:
            count = 0
            started = time.perf_counter()
            async with conn.transaction():
                async for _ in conn.cursor(STREAM_SQL.format(rows=rows), prefetch=10_000):
                    count += 1
            return count, time.perf_counter() - started
        finally:
            await conn.close()

    return asyncio.run(go())


STREAM_METHODS: dict[str, tuple[str, Callable[[Endpoint, int], tuple[int, float]]]] = {
    "copy": ("COPY (…) TO STDOUT, psycopg", _stream_copy),
    "select": ("SELECT, simple protocol, libpq", _stream_select),
    "cursor": ("cursor, extended binary, asyncpg", _stream_cursor),
}


def stream_rows(endpoint: Endpoint, method: str, rows: int) -> StreamResult:
    """Stream ``rows`` rows through ``endpoint``; the clock covers the query, not the login
    (a login is per connection, and the question here is relay throughput)."""
    _, func = STREAM_METHODS[method]
    try:
        count, elapsed = func(endpoint, rows)
    except Exception as exc:  # report it and keep benchmarking the other paths
        return StreamResult(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    if count != rows:
        return StreamResult(count, elapsed, f"got {count} rows, expected {rows}")
    return StreamResult(count, max(elapsed, 1e-9))


# -- profiling ------------------------------------------------------------------------------


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass
class Profile:
    """Aggregated py-spy samples of one process (on-CPU samples only)."""

    samples: int = 0
    syscall_samples: int = 0  # leaf in a socket or epoll call (see SYSCALL_LEAVES)
    expected: int = 0  # samples a fully busy thread would have given (rate x duration)
    self_by_function: Counter[str] = field(default_factory=Counter)
    inclusive_by_function: Counter[str] = field(default_factory=Counter)
    inclusive_by_line: Counter[str] = field(default_factory=Counter)
    self_by_area: Counter[str] = field(default_factory=Counter)
    raw_path: Path | None = None

    @property
    def utilisation(self) -> float | None:
        return self.samples / self.expected if self.expected else None

    def estimate_us(self, count: int, syscall: bool, user_us: float | None,
                    sys_us: float | None) -> float | None:
        """µs per statement for ``count`` samples: syscall samples share the measured kernel
        time, the others the user time. py-spy pauses the process to sample it, which
        over-weights time spent inside system calls; /proc's user/system split does not."""
        if user_us is None or sys_us is None:
            return None
        if syscall:
            return sys_us * count / self.syscall_samples if self.syscall_samples else None
        python = self.samples - self.syscall_samples
        return user_us * count / python if python else None


# Leaf frames whose time is (almost all) a system call: py-spy reports the Python frame
# that made the call. Their µs are estimated from the kernel CPU, the rest from user CPU.
SYSCALL_LEAVES = ("_SelectorSocketTransport.write ", "EpollSelector.select ",
                  "_SelectorSocketTransport._read_ready__data_received ")


def is_syscall_leaf(frame: str) -> bool:
    return frame.startswith(SYSCALL_LEAVES)


def _area(frame: str) -> str:
    """A coarse bucket for a leaf frame, so the profile reads as 'where the time goes'."""
    location = frame[frame.rfind("(") + 1:]
    if "hoopops/proxy/session.py" in location:
        return "hoopops relay (proxy/session.py)"
    if "hoopops/proxy/protocol.py" in location:
        return "hoopops codecs (proxy/protocol.py)"
    if "hoopops/" in location:
        return "hoopops other: " + location.split("hoopops/", 1)[1].split(":")[0]
    if frame.startswith("_SelectorSocketTransport.write "):
        return "kernel: socket send() (transport.write)"
    if frame.startswith("_SelectorSocketTransport._read_ready__data_received "):
        return "kernel: socket recv() (transport read callback)"
    if frame.startswith("EpollSelector.select "):
        return "kernel: epoll_wait() (selector)"
    if "selector_events.py" in location:
        return "asyncio socket transport"
    if "asyncio/streams.py" in location:
        return "asyncio streams (StreamReader/Writer)"
    if "asyncio/" in location:
        return "asyncio loop, futures and tasks"
    if "selectors.py" in location:
        return "selectors"
    if location.startswith("<string>"):
        return "dataclass __init__ (generated code)"
    return "other: " + location.split("/")[-1].split(":")[0]


def _short(frame: str, keep_line: bool) -> str:
    """``Cls.func (/long/path/file.py:12)`` -> ``Cls.func (file.py:12)``; hoopops paths kept
    from the package root so they can be looked up."""
    name, _, location = frame.partition(" (")
    location = location.rstrip(")")
    if not keep_line:
        location = location.rsplit(":", 1)[0]
    if "hoopops/" in location:
        location = "hoopops/" + location.split("hoopops/", 1)[1]
    else:
        location = "/".join(location.split("/")[-2:])
    return f"{name} ({location})"


def parse_collapsed(path: Path, rate: int = 0, duration: float = 0.0) -> Profile:
    """Read py-spy ``--format raw`` output (``frame;frame;leaf count`` per line)."""
    profile = Profile(raw_path=path, expected=int(rate * duration))
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if " (" in f and not f.startswith(
            ("process ", "thread "))]
        if not frames:
            continue
        profile.samples += count
        leaf = frames[-1]
        if is_syscall_leaf(leaf):
            profile.syscall_samples += count
        profile.self_by_function[_short(leaf, False)] += count
        profile.self_by_area[_area(leaf)] += count
        for name in {_short(f, False) for f in frames}:
            profile.inclusive_by_function[name] += count
        for name in {_short(f, True) for f in frames if "hoopops/" in f}:
            profile.inclusive_by_line[name] += count
    return profile


@contextlib.contextmanager
def py_spy_recording(pid: int, out: Path, duration: float, rate: int = 250
                     ) -> Iterator[subprocess.Popen[bytes]]:
    """Sample ``pid`` with py-spy for ``duration`` seconds while the body runs.

    py-spy pauses the process for each sample (the default): the sampled stacks are then
    consistent; ``--nonblocking`` was tried and gives torn stacks on a process this busy.
    Idle samples (the loop asleep in epoll) are left out, so every sample is on-CPU time.
    """
    binary = find_py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed: `.venv/bin/pip install py-spy`")
    cmd = [binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
           "--output", str(out), "--duration", str(max(1, round(duration)))]
    with open(out.with_suffix(".log"), "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.3)  # let py-spy attach before the load starts
        yield proc
    finally:
        try:
            proc.wait(duration + 30)
        except subprocess.TimeoutExpired:
            stop_process(proc, signal.SIGINT)


@dataclass
class CallProfile:
    """cProfile of a gateway that served a known number of statements."""

    statements: int
    calls_per_statement: float = 0.0  # function calls (Python and builtin) per statement
    rows: list[tuple[str, float, float]] = field(default_factory=list)  # name, calls, µs


def summarise_cprofile(path: Path, statements: int, top: int = 25) -> CallProfile:
    """Calls and own time per statement of the functions that run for (nearly) every one.

    Only functions called at least once per two statements count, which leaves start-up
    (imports, configuration) out without needing a second, idle profile to subtract.
    """
    import pstats

    table = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    hot = []
    for (filename, line, func), (_cc, calls, own, _cum, _callers) in table.items():
        if calls * 2 < statements:
            continue
        if filename == "~":
            name = func
        else:
            short = ("hoopops/" + filename.split("hoopops/", 1)[1]) if (
                "/hoopops/" in filename) else "/".join(filename.split("/")[-2:])
            name = f"{func} ({short}:{line})"
        hot.append((name, calls / statements, own / statements * 1e6))
    profile = CallProfile(statements, sum(calls for _, calls, _ in hot))
    profile.rows = sorted(hot, key=lambda row: row[2], reverse=True)[:top]
    return profile


# -- Markdown -------------------------------------------------------------------------------


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]],
             align: Sequence[str] | None = None) -> str:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def fmt_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}x"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator

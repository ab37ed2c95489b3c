"""Load and validate ``hoopops.yaml``.

Every problem is reported as a :class:`ConfigError` naming the file, the line, the key and
what is expected; callers print it and exit, never a traceback. Secrets may be written as
``env:NAME`` (or via ``*_env`` keys) so the file itself holds none; DSN passwords are
never part of any message this module produces.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from hoopops.sandbox import target_refusal
from hoopops.yamlfile import LocatedYaml, YamlFileError, load_located

ConfigError = YamlFileError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
               "gb": 1000**3, "gib": 1024**3}
SSLMODES = ("disable", "prefer", "require", "verify-ca", "verify-full")


def parse_duration(value: Any) -> float:
    """Seconds from ``300``, ``"300s"``, ``"5m"``, ``"1.5h"``, ``"400d"``; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m, 1h or 400d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError("expected a duration like 30s, 5m, 1h or 400d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_size(value: Any) -> int:
    """Bytes from ``1048576``, ``"64kb"``, ``"16MiB"``; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 16MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError("expected a size like 65536, 64KiB or 16MiB")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _SIZE_UNITS[unit]


def redact_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***`` (for logs and errors)."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable DSN>"
    if parts.password is None:
        return re.sub(r"(password=)\S+", r"\1***", dsn)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True)
class Upstream:
    """Where and how the gateway reaches one target's PostgreSQL, with its own credential."""

    host: str
    port: int
    user: str
    password: str | None = field(repr=False)
    database: str
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    connect_timeout: float = 10.0

    @property
    def is_unix_socket(self) -> bool:
        return self.host.startswith("/")

    @property
    def display(self) -> str:
        """A password-free description for messages."""
        return f"{self.user}@{self.host}:{self.port}/{self.database}"

    def asyncpg_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``asyncpg.connect`` / ``create_pool`` (catalog lookups)."""
        ssl: Any = self.sslmode if self.sslmode != "disable" else False
        if self.is_unix_socket:
            ssl = False
        return {"host": self.host, "port": self.port, "user": self.user,
                "password": self.password, "database": self.database, "ssl": ssl,
                "timeout": self.connect_timeout}


@dataclass(frozen=True)
class Target:
    name: str
    upstream: Upstream


@dataclass(frozen=True)
class IdentityConfig:
    issuer: str | None
    audience: str | None
    hs256_secret: str | None = field(default=None, repr=False)
    public_key_file: Path | None = None
    jwks_file: Path | None = None
    jwks_url: str | None = None
    groups_claim: str = "groups"
    subject_claim: str = "sub"
    algorithms: tuple[str, ...] = ()
    leeway: float = 30.0
    require_exp: bool = True


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    # Plaintext from anywhere but loopback is refused unless this is turned off.
    required: bool = True


@dataclass(frozen=True)
class Limits:
    max_message_size: int = 16 * 1024 * 1024
    startup_timeout: float = 10.0
    max_connections: int = 500
    max_connections_per_identity: int = 50
    shutdown_grace: float = 10.0


@dataclass(frozen=True)
class AuditConfig:
    path: Path
    result_rows: int = 100
    result_bytes: int = 64 * 1024
    enabled: bool = True
    # FULL survives power loss; NORMAL (WAL) survives a crash or SIGKILL of the gateway
    # and costs far less per statement.
    synchronous: str = "FULL"


@dataclass(frozen=True)
class ApprovalsConfig:
    timeout: float = 300.0
    poll_interval: float = 0.5


@dataclass(frozen=True)
class MaskingConfig:
    hmac_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ReplayConfig:
    """Where ``hoopops replay`` and the console's sandbox replay run recorded sessions."""

    # A postgresql:// URL (with its password): never shown, use redact_dsn().
    sandbox: str | None = field(default=None, repr=False)
    # The policy folder to judge by; None means the top-level ``policies:``.
    policies: Path | None = None


@dataclass(frozen=True)
class Config:
    file: Path
    listen_host: str
    listen_port: int
    targets: dict[str, Target]
    identity: IdentityConfig
    tls: TlsConfig | None
    limits: Limits
    policies: Path | None
    audit: AuditConfig
    approvals: ApprovalsConfig
    masking: MaskingConfig
    keymap: dict[str, str] = field(default_factory=dict)
    replay: ReplayConfig = field(default_factory=ReplayConfig)

    @property
    def listen(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"


_TOP_KEYS = {"listen", "targets", "identity", "tls", "limits", "policies", "audit",
             "approvals", "masking", "console", "replay"}


class _Reader:
    """Typed access to one located YAML document, raising ConfigError with its line."""

    def __init__(self, doc: LocatedYaml) -> None:
        self.doc = doc
        self.base = Path(doc.file).resolve().parent

    def fail(self, key: str, reason: str) -> ConfigError:
        return self.doc.error(key, reason)

    def mapping(self, value: Any, key: str, allowed: set[str] | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "expected a mapping of keys to values")
        if allowed is not None:
            for name in value:
                if name not in allowed:
                    prefix = f"{key}." if key else ""
                    raise self.fail(f"{prefix}{name}", "unknown key; expected one of: "
                                    + ", ".join(sorted(allowed)))
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "expected a non-empty text value")
        return value

    def secret(self, section: dict[str, Any], name: str, key: str) -> str | None:
        """``name`` as literal or ``env:VAR``, or ``name_env: VAR``; missing env is an error."""
        env_key = f"{name}_env"
        if name in section and env_key in section:
            raise self.fail(f"{key}.{env_key}", f"give either {name} or {env_key}, not both")
        if env_key in section:
            var = self.string(section[env_key], f"{key}.{env_key}")
            return self._env(var, f"{key}.{env_key}")
        if name in section:
            raw = self.string(section[name], f"{key}.{name}")
            if raw.startswith("env:"):
                return self._env(raw[4:], f"{key}.{name}")
            return raw
        return None

    def _env(self, var: str, key: str) -> str:
        value = os.environ.get(var)
        if not value:
            raise self.fail(key, f"environment variable {var} is not set (or empty)")
        return value

    def path(self, value: Any, key: str, must_exist: bool = True) -> Path:
        path = Path(os.path.expanduser(self.string(value, key)))
        if not path.is_absolute():
            path = self.base / path
        if must_exist and not path.exists():
            raise self.fail(key, f"file not found: {path}")
        return path

    def duration(self, value: Any, key: str) -> float:
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def size(self, value: Any, key: str) -> int:
        try:
            return parse_size(value)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def integer(self, value: Any, key: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"expected a whole number >= {minimum}")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, "expected true or false")
        return value


def _listen(reader: _Reader, value: Any) -> tuple[str, int]:
    text = reader.string(value if not isinstance(value, int) else f"127.0.0.1:{value}", "listen")
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise reader.fail("listen", "expected HOST:PORT, for example 127.0.0.1:6432")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def parse_upstream(dsn: str, fail: Any = None) -> Upstream:
    """Parse a ``postgresql://`` URL (host may be a socket folder via ``?host=/path``)."""
    def bad(reason: str) -> Exception:
        return fail(reason) if fail else ValueError(reason)

    try:
        parts = urlsplit(dsn)
        port_value = parts.port
    except ValueError:
        raise bad("not a valid postgresql:// URL") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise bad("expected a postgresql://user:password@host:port/database URL")
    query: dict[str, str] = {}
    for item in filter(None, parts.query.split("&")):
        name, _, val = item.partition("=")
        query[name] = unquote(val)
    host = query.pop("host", None) or (unquote(parts.hostname) if parts.hostname else None)
    if not host:
        raise bad("the URL names no host")
    user = unquote(parts.username) if parts.username else None
    if not user:
        raise bad("the URL names no user (the service account the gateway logs in as)")
    database = unquote(parts.path.lstrip("/")) or user
    password = unquote(parts.password) if parts.password is not None else query.pop(
        "password", None)
    sslmode = query.pop("sslmode", "prefer")
    if sslmode not in SSLMODES:
        raise bad(f"sslmode must be one of {', '.join(SSLMODES)}")
    sslrootcert = query.pop("sslrootcert", None)
    port = int(query.pop("port", port_value or 5432))
    timeout = float(query.pop("connect_timeout", 10))
    if query:
        raise bad(f"unsupported URL parameter(s): {', '.join(sorted(query))}")
    return Upstream(host=host, port=port, user=user, password=password, database=database,
                    sslmode=sslmode, sslrootcert=sslrootcert, connect_timeout=timeout)


def _targets(reader: _Reader, value: Any) -> dict[str, Target]:
    section = reader.mapping(value, "targets")
    if not section:
        raise reader.fail("targets", "at least one target is required (name: {upstream: URL})")
    targets: dict[str, Target] = {}
    for name, body in section.items():
        key = f"targets.{name}"
        body = reader.mapping(body, key, {"upstream", "upstream_env"})
        dsn = reader.secret(body, "upstream", key)
        if dsn is None:
            raise reader.fail(key, "missing 'upstream' (a postgresql:// URL or env:NAME)")
        shown = redact_dsn(dsn)
        upstream = parse_upstream(dsn, lambda reason, k=key, shown=shown: reader.fail(
            f"{k}.upstream", f"{reason} (got {shown})"))
        targets[str(name)] = Target(str(name), upstream)
    return targets


def _identity(reader: _Reader, value: Any) -> IdentityConfig:
    allowed = {"issuer", "audience", "hs256_secret", "hs256_secret_env", "public_key_file",
               "jwks_file", "jwks_url", "groups_claim", "subject_claim", "algorithms",
               "leeway", "require_exp"}
    section = reader.mapping(value, "identity", allowed)
    secret = reader.secret(section, "hs256_secret", "identity")
    public_key = reader.path(section["public_key_file"], "identity.public_key_file") if (
        "public_key_file" in section) else None
    jwks_file = reader.path(section["jwks_file"], "identity.jwks_file") if (
        "jwks_file" in section) else None
    jwks_url = reader.string(section["jwks_url"], "identity.jwks_url") if (
        "jwks_url" in section) else None
    if jwks_url and not jwks_url.startswith("https://"):
        raise reader.fail("identity.jwks_url", "must be an https:// URL")
    sources = [s for s in (secret, public_key, jwks_file, jwks_url) if s]
    if not sources:
        raise reader.fail("identity", "no key to verify tokens: set one of hs256_secret_env, "
                          "public_key_file, jwks_file or jwks_url")
    if len(sources) > 1:
        raise reader.fail("identity", "set only one of hs256_secret(_env), public_key_file, "
                          "jwks_file, jwks_url; mixing symmetric and public keys invites "
                          "algorithm confusion")
    if secret is not None and len(secret.encode()) < 32:
        raise reader.fail("identity.hs256_secret", "an HS256 secret must be at least 32 bytes")
    algorithms: tuple[str, ...] = ()
    if "algorithms" in section:
        algs = section["algorithms"]
        if not isinstance(algs, list) or not all(isinstance(a, str) for a in algs) or not algs:
            raise reader.fail("identity.algorithms", "expected a list like [RS256, ES256]")
        if any(a.lower() == "none" for a in algs):
            raise reader.fail("identity.algorithms", "'none' is never accepted")
        algorithms = tuple(algs)
    return IdentityConfig(
        issuer=reader.string(section["issuer"], "identity.issuer") if "issuer" in section
        else None,
        audience=reader.string(section["audience"], "identity.audience") if "audience" in section
        else None,
        hs256_secret=secret, public_key_file=public_key, jwks_file=jwks_file, jwks_url=jwks_url,
        groups_claim=reader.string(section.get("groups_claim", "groups"), "identity.groups_claim"),
        subject_claim=reader.string(section.get("subject_claim", "sub"),
                                    "identity.subject_claim"),
        algorithms=algorithms,
        leeway=reader.duration(section.get("leeway", 30), "identity.leeway"),
        require_exp=reader.boolean(section.get("require_exp", True), "identity.require_exp"),
    )


def _tls(reader: _Reader, value: Any) -> TlsConfig | None:
    if value is None:
        return None
    section = reader.mapping(value, "tls", {"cert", "key", "required"})
    if "cert" not in section or "key" not in section:
        raise reader.fail("tls", "both 'cert' and 'key' are required to serve TLS")
    return TlsConfig(cert=reader.path(section["cert"], "tls.cert"),
                     key=reader.path(section["key"], "tls.key"),
                     required=reader.boolean(section.get("required", True), "tls.required"))


def _limits(reader: _Reader, value: Any) -> Limits:
    allowed = {"max_message_size", "startup_timeout", "max_connections",
               "max_connections_per_identity", "shutdown_grace"}
    section = reader.mapping(value, "limits", allowed)
    d = Limits()
    size = reader.size(section.get("max_message_size", d.max_message_size),
                       "limits.max_message_size")
    if size < 8192:
        raise reader.fail("limits.max_message_size", "must be at least 8KiB")
    return Limits(
        max_message_size=size,
        startup_timeout=reader.duration(section.get("startup_timeout", d.startup_timeout),
                                        "limits.startup_timeout"),
        max_connections=reader.integer(section.get("max_connections", d.max_connections),
                                       "limits.max_connections", 1),
        max_connections_per_identity=reader.integer(
            section.get("max_connections_per_identity", d.max_connections_per_identity),
            "limits.max_connections_per_identity", 1),
        shutdown_grace=reader.duration(section.get("shutdown_grace", d.shutdown_grace),
                                       "limits.shutdown_grace"),
    )


def _audit(reader: _Reader, value: Any) -> AuditConfig:
    section = reader.mapping(value, "audit", {"path", "result_rows", "result_bytes", "enabled",
                                              "synchronous"})
    synchronous = str(section.get("synchronous", "FULL")).upper()
    if synchronous not in ("FULL", "NORMAL"):
        raise reader.fail("audit.synchronous", "expected FULL (survives power loss) or NORMAL "
                          "(survives a gateway crash; faster)")
    path = reader.path(section.get("path", "hoopops-audit.db"), "audit.path", must_exist=False)
    d = AuditConfig(path)
    return AuditConfig(
        path=path,
        result_rows=reader.integer(section.get("result_rows", d.result_rows),
                                   "audit.result_rows"),
        result_bytes=reader.size(section.get("result_bytes", d.result_bytes),
                                 "audit.result_bytes"),
        enabled=reader.boolean(section.get("enabled", True), "audit.enabled"),
        synchronous=synchronous,
    )


def _replay(reader: _Reader, value: Any, targets: dict[str, Target]) -> ReplayConfig:
    section = reader.mapping(value, "replay", {"sandbox", "sandbox_env", "policies"})
    dsn = reader.secret(section, "sandbox", "replay")
    if dsn is not None:
        key = "replay.sandbox_env" if "sandbox_env" in section else "replay.sandbox"
        shown = redact_dsn(dsn)
        sandbox = parse_upstream(dsn, lambda reason: reader.fail(key, f"{reason} (got {shown})"))
        # The same refusal as `hoopops replay`: replaying into a target changes production.
        refusal = target_refusal(targets.values(), sandbox)
        if refusal is not None:
            raise reader.fail(key, refusal)
    policies = reader.path(section["policies"], "replay.policies") if (
        "policies" in section) else None
    if policies is not None and not policies.is_dir():
        raise reader.fail("replay.policies", f"expected a folder of policy files: {policies}")
    return ReplayConfig(sandbox=dsn, policies=policies)


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raises ConfigError naming file, line and key."""
    doc = load_located(path)
    reader = _Reader(doc)
    data = reader.mapping(doc.data, "", _TOP_KEYS)
    if not data:
        raise ConfigError(str(path), None, None, "the file is empty; see the README for an "
                          "example hoopops.yaml")
    for required in ("targets", "identity"):
        if required not in data:
            raise ConfigError(str(path), None, required, "is required")
    host, port = _listen(reader, data.get("listen", "127.0.0.1:6432"))
    approvals = reader.mapping(data.get("approvals"), "approvals", {"timeout", "poll_interval"})
    masking = reader.mapping(data.get("masking"), "masking", {"hmac_secret", "hmac_secret_env"})
    console = reader.mapping(data.get("console"), "console", {"keymap"})
    keymap = reader.mapping(console.get("keymap"), "console.keymap")
    policies = reader.path(data["policies"], "policies") if "policies" in data else None
    if policies is not None and not policies.is_dir():
        raise reader.fail("policies", f"expected a folder of policy files: {policies}")
    targets = _targets(reader, data["targets"])
    return Config(
        file=Path(path).resolve(),
        listen_host=host,
        listen_port=port,
        targets=targets,
        identity=_identity(reader, data["identity"]),
        tls=_tls(reader, data.get("tls")),
        limits=_limits(reader, data.get("limits")),
        policies=policies,
        audit=_audit(reader, data.get("audit")),
        approvals=ApprovalsConfig(
            timeout=reader.duration(approvals.get("timeout", 300), "approvals.timeout"),
            poll_interval=reader.duration(approvals.get("poll_interval", 0.5),
                                          "approvals.poll_interval"),
        ),
        masking=MaskingConfig(hmac_secret=reader.secret(masking, "hmac_secret", "masking")),
        keymap={str(k): str(v) for k, v in keymap.items()},
        replay=_replay(reader, data.get("replay"), targets),
    )


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False

"""Which database is a replay sandbox? Never one of the configured targets.

Kept apart from :mod:`hoopops.replay` (which pulls in the whole gateway) so that loading
``hoopops.yaml`` can apply the same refusal as ``hoopops replay`` to ``replay.sandbox``
without that import; and so the CLI, the config and the console word it the same way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hoopops.config import Target, Upstream


def _host_keys(host: str) -> set[str]:
    """Names under which ``host`` may reach a server, for comparing two DSNs.

    Deliberately generous: a Unix socket folder and every loopback spelling count as "this
    machine", so ``localhost``, ``127.0.0.1``, ``::1`` and the socket of a local server all
    compare equal. Refusing a sandbox that is really elsewhere costs a retry; accepting the
    production database as a sandbox would not be recoverable.
    """
    keys: set[str] = set()
    if host.startswith("/"):
        keys.add("unix:" + os.path.realpath(host))
        keys.add("loopback")
        return keys
    name = host.strip("[]").rstrip(".").lower()
    keys.add(name)
    if name == "localhost":
        keys.add("loopback")
    addresses = {name}
    try:
        ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        with contextlib.suppress(OSError, UnicodeError):
            addresses |= {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            continue
        keys.add("loopback" if ip.is_loopback else ip.compressed)
    return keys


def same_database(a: Upstream, b: Upstream) -> bool:
    """Whether two upstreams name the same database on the same server (normalised)."""
    return a.port == b.port and a.database == b.database \
        and bool(_host_keys(a.host) & _host_keys(b.host))


def target_refusal(targets: Iterable[Target], sandbox: Upstream) -> str | None:
    """Why ``sandbox`` must not be used (it is a configured target's database), or None.

    The message names hosts, ports and databases only, never a password."""
    for target in targets:
        up = target.upstream
        if same_database(sandbox, up):
            return (f"refusing to replay into {sandbox.host}:{sandbox.port}/{sandbox.database}: "
                    f"that is the database of the configured target '{target.name}' "
                    f"({up.host}:{up.port}/{up.database}). Replay only into a sandbox copy "
                    "(another database or server).")
    return None

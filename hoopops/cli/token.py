"""``hoopops token``: mint a development token, or check one the way the gateway would.

``mint`` prints only the token on stdout so ``PGPASSWORD=$(hoopops token mint ...)`` works;
every problem is one ``hoopops: ...`` line on stderr with a non-zero exit, never a
traceback, and never the token itself.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from hoopops.cli.common import add_config_argument, fail, load_config_or_exit, print_json
from hoopops.config import parse_duration
from hoopops.identity import (
    AuthError,
    KeySourceError,
    MintError,
    TokenVerifier,
    format_utc,
    mint_token,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "token", help="mint a development token or check a token",
        description="Agent tokens are JWTs sent as the Postgres password. 'mint' signs one "
        "with the key configured under identity (for trying the gateway); 'verify' checks a "
        "token exactly as the gateway would and shows the identity it proves.")
    actions = parser.add_subparsers(dest="token_action", metavar="ACTION")

    mint = actions.add_parser(
        "mint", help="sign a token with the configured development key and print it",
        description="Sign a token with identity.hs256_secret (or, for public-key setups, "
        "the matching --private-key) and print only the token, so that "
        "PGPASSWORD=$(hoopops token mint --sub alice) psql ... works.")
    add_config_argument(mint)
    mint.add_argument("--sub", required=True, metavar="NAME",
                      help="the subject: who the agent is (goes into the audit trail)")
    mint.add_argument("--groups", action="append", default=[], metavar="A,B",
                      help="comma-separated groups policies match on (may be repeated)")
    mint.add_argument("--ttl", default="15m", metavar="DURATION",
                      help="how long the token is valid, like 90s, 15m or 8h (default: 15m)")
    mint.add_argument("--private-key", metavar="FILE",
                      help="PEM private key to sign with when identity uses public_key_file, "
                      "jwks_file or jwks_url")
    mint.add_argument("--kid", metavar="ID",
                      help="key id for the token header (only needed with jwks_url; with "
                      "jwks_file it is found from the private key)")
    mint.set_defaults(func=_mint)

    verify = actions.add_parser(
        "verify", help="check a token as the gateway would and show its identity",
        description="Read a token from --token-file (or stdin), verify signature, expiry, "
        "issuer and audience with the configured keys, and print the identity as JSON, or "
        "the reason the gateway would refuse it.")
    add_config_argument(verify)
    verify.add_argument("--token-file", default="-", metavar="FILE",
                        help="file holding the token; '-' (the default) reads stdin, which "
                        "keeps the token out of the process list")
    verify.set_defaults(func=_verify)

    def usage(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)


def _groups(values: list[str]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _mint(args: argparse.Namespace) -> int:
    config = load_config_or_exit(args.config)
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        return fail(f"--ttl: {exc}", 2)
    if ttl <= 0:
        return fail("--ttl: the token must live longer than 0s", 2)
    private_key = Path(args.private_key).expanduser() if args.private_key else None
    try:
        token = mint_token(config.identity, args.sub, _groups(args.groups), ttl,
                           private_key=private_key, kid=args.kid)
        if config.identity.jwks_url is None:
            # Catch surprises (algorithm limits, a key that does not match) here, not at
            # login. With a JWKS URL that would need the network, so it is skipped.
            TokenVerifier(config.identity).verify(token)
    except (MintError, KeySourceError) as exc:
        return fail(str(exc))
    except AuthError as exc:
        return fail(f"the gateway would refuse the minted token: {exc.reason}")
    print(token)
    return 0


def _verify(args: argparse.Namespace) -> int:
    config = load_config_or_exit(args.config)
    try:
        if args.token_file == "-":
            token = sys.stdin.read()
        else:
            token = Path(args.token_file).expanduser().read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        return fail(f"cannot read the token: {getattr(exc, 'strerror', None) or exc}", 2)
    try:
        verifier = TokenVerifier(config.identity)
        identity = asyncio.run(verifier.verify_async(token))
    except KeySourceError as exc:
        return fail(str(exc))
    except AuthError as exc:
        return fail(f"token refused: {exc.reason}")
    expires = identity.expires_at
    print_json({
        "subject": identity.subject,
        "groups": list(identity.groups),
        "issuer": identity.issuer,
        "token_id": identity.token_id,
        "expires_at": format_utc(expires) if expires is not None else None,
        "expires_in_seconds": round(expires - time.time()) if expires is not None else None,
        "key_source": verifier.key_source,
    })
    return 0

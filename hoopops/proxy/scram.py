"""SCRAM-SHA-256 client (RFC 5802 / RFC 7677) for logging in to the upstream server.

The salted password is cached per (password, salt, iterations): PBKDF2 with thousands of
iterations costs milliseconds, and every new agent session would otherwise pay it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from functools import lru_cache


class ScramError(Exception):
    pass


_PROHIBITED = (stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
               stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
               stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9,
               stringprep.in_table_a1)


def saslprep(password: str) -> str:
    """The password as PostgreSQL hashes it for SCRAM (RFC 4013 SASLprep, pg_saslprep).

    The server prepares the password before deriving the stored key; a client that does
    not would fail to log in with passwords such as ``"ﬁ"`` (NFKC: ``"fi"``) or ones
    holding a soft hyphen. Like the server, a password SASLprep refuses (prohibited
    characters, bad bidirectional text) is used exactly as given.
    """
    if password.isascii():
        return password
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch for ch in password
                     if not stringprep.in_table_b1(ch))
    prepared = unicodedata.normalize("NFKC", mapped)
    if not prepared or any(check(ch) for ch in prepared for check in _PROHIBITED):
        return password
    # Bidirectional text (RFC 3454 section 6): right-to-left characters may not mix with
    # left-to-right ones, and must open and close the string.
    rtl = any(stringprep.in_table_d1(ch) for ch in prepared)
    if rtl and (any(stringprep.in_table_d2(ch) for ch in prepared) or not (
            stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1]))):
        return password
    return prepared


@lru_cache(maxsize=64)
def _salted(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt,
                               iterations)


class ScramClient:
    MECHANISM = "SCRAM-SHA-256"

    def __init__(self, password: str) -> None:
        self._password = password
        self._nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self._first_bare = f"n=,r={self._nonce}"
        self._server_signature = b""

    def first_message(self) -> bytes:
        # "n,," : no channel binding; the user name is taken from the startup packet.
        return f"n,,{self._first_bare}".encode()

    def final_message(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attrs = dict(part.split("=", 1) for part in text.split(","))
        nonce, salt, iterations = attrs.get("r", ""), attrs.get("s", ""), attrs.get("i", "")
        if not nonce.startswith(self._nonce) or not salt or not iterations.isdigit():
            raise ScramError("malformed SCRAM server-first message")
        salted = _salted(self._password, base64.b64decode(salt), int(iterations))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        final_bare = f"c=biws,r={nonce}"
        auth_message = f"{self._first_bare},{text},{final_bare}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{final_bare},p={base64.b64encode(proof).decode()}".encode()

    def verify_final(self, server_final: bytes) -> None:
        text = server_final.decode()
        if not text.startswith("v="):
            raise ScramError("SCRAM authentication failed at the server")
        if not hmac.compare_digest(base64.b64decode(text[2:]), self._server_signature):
            raise ScramError("the server's SCRAM signature is wrong (possible impostor)")


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()

"""The central API tokens, found the same way by ``edgeline central serve`` and by its clients,
and the signed download links central puts in its rollout commands.

The write token allows every call; the read token only reads (fleet, registry, rollouts,
downloads, docs). For each, the file given by ``--token-file`` / ``--read-token-file`` (or named by
``$EDGELINE_CENTRAL_TOKEN_FILE`` / ``$EDGELINE_CENTRAL_READ_TOKEN_FILE``) wins; without one, the
token itself is read from ``$EDGELINE_CENTRAL_TOKEN`` / ``$EDGELINE_CENTRAL_READ_TOKEN``
(containers, ``.env`` files).

A machine token (:class:`MachineTokens`) lets one edge agent deliver its evidence
(``PUT /evidence/...``) and nothing else: an HMAC-SHA256 of the machine id under another key
derived from the write token, printed by ``edgeline central machine-token --machine <id>``. Central
checks it against the machine the record names, as the broker's ACL ties topics to logins.

A download link is ``/models/{id}/download?expires=<epoch s>&signature=<hex>``: an HMAC-SHA256 of
the package id and the expiry under a key derived from the write token, so the edge agents fetch
packages during a rollout with no credential of their own, and only until the link expires.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

TOKEN_ENV = "EDGELINE_CENTRAL_TOKEN"
TOKEN_FILE_ENV = "EDGELINE_CENTRAL_TOKEN_FILE"
TOKEN_HELP = (f"file holding the API token (16+ characters), also ${TOKEN_FILE_ENV}; without a file the token "
              f"itself is read from ${TOKEN_ENV}")
READ_TOKEN_ENV = "EDGELINE_CENTRAL_READ_TOKEN"
READ_TOKEN_FILE_ENV = "EDGELINE_CENTRAL_READ_TOKEN_FILE"
READ_TOKEN_HELP = (f"file holding the read-only API token, also ${READ_TOKEN_FILE_ENV}; without a file the token "
                   f"itself is read from ${READ_TOKEN_ENV}")
MIN_LENGTH = 16
DOWNLOAD_LINK_TTL_S = 900.0
_LINK_KEY_LABEL = b"edgeline central download links"
_MACHINE_KEY_LABEL = b"edgeline central machine tokens"


def find_token(token_file: Path | None, environ: Mapping[str, str] = os.environ,
               value_env: str = TOKEN_ENV) -> str | None:
    """The token from ``token_file``, else from ``$<value_env>`` (the write token's by default), else None.

    Raises ValueError for a file that cannot be read or a token shorter than 16 characters."""
    if token_file is not None:
        try:
            text = token_file.read_text()
        except OSError as exc:
            raise ValueError(f"{token_file}: cannot read the API token ({exc.strerror})") from None
        return _checked(text.strip(), str(token_file))
    value = environ.get(value_env, "").strip()
    return _checked(value, f"${value_env}") if value else None


def find_read_token(read_token_file: Path | None, token_file: Path | None,
                    environ: Mapping[str, str] = os.environ) -> str | None:
    """What a client sends to read: the read token, else the write token (which also allows reads)."""
    return find_token(read_token_file, environ, READ_TOKEN_ENV) or find_token(token_file, environ)


class DownloadLinks:
    """Signs and checks the query of short-lived package download links."""

    def __init__(self, write_token: str, ttl_s: float = DOWNLOAD_LINK_TTL_S) -> None:
        self._key = hmac.new(write_token.encode(), _LINK_KEY_LABEL, hashlib.sha256).digest()
        self.ttl_s = ttl_s

    def query(self, package_id: str, now: float) -> str:
        """``expires=...&signature=...`` for a link to ``package_id`` valid ``ttl_s`` from ``now``."""
        expires = int(now + self.ttl_s)
        return f"expires={expires}&signature={self._signature(package_id, expires)}"

    def valid(self, package_id: str, expires: int, signature: str, now: float) -> bool:
        return now <= expires and hmac.compare_digest(signature, self._signature(package_id, expires))

    def _signature(self, package_id: str, expires: int) -> str:
        return hmac.new(self._key, f"{package_id}\n{expires}".encode(), hashlib.sha256).hexdigest()


class MachineTokens:
    """Derives the per-machine evidence tokens (checked by the API like any other token)."""

    def __init__(self, write_token: str) -> None:
        self._key = hmac.new(write_token.encode(), _MACHINE_KEY_LABEL, hashlib.sha256).digest()

    def token(self, machine: str) -> str:
        return hmac.new(self._key, machine.encode(), hashlib.sha256).hexdigest()


def _checked(token: str, where: str) -> str:
    if len(token) < MIN_LENGTH:
        raise ValueError(f"{where}: the API token must be at least {MIN_LENGTH} characters")
    return token

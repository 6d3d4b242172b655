"""The central API token, found the same way by ``edgeline central serve`` and by its clients.

The file given by ``--token-file`` (or named by ``$EDGELINE_CENTRAL_TOKEN_FILE``) wins; without
one, the token itself is read from ``$EDGELINE_CENTRAL_TOKEN`` (containers, ``.env`` files).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

TOKEN_ENV = "EDGELINE_CENTRAL_TOKEN"
TOKEN_FILE_ENV = "EDGELINE_CENTRAL_TOKEN_FILE"
TOKEN_HELP = (f"file holding the API token (16+ characters), also ${TOKEN_FILE_ENV}; without a file the token "
              f"itself is read from ${TOKEN_ENV}")
MIN_LENGTH = 16


def find_token(token_file: Path | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token from ``token_file``, else from ``$EDGELINE_CENTRAL_TOKEN``, else None.

    Raises ValueError for a file that cannot be read or a token shorter than 16 characters."""
    if token_file is not None:
        try:
            text = token_file.read_text()
        except OSError as exc:
            raise ValueError(f"{token_file}: cannot read the API token ({exc.strerror})") from None
        return _checked(text.strip(), str(token_file))
    value = environ.get(TOKEN_ENV, "").strip()
    return _checked(value, f"${TOKEN_ENV}") if value else None


def _checked(token: str, where: str) -> str:
    if len(token) < MIN_LENGTH:
        raise ValueError(f"{where}: the API token must be at least {MIN_LENGTH} characters")
    return token

"""Bearer tokens for /api/v1: from TELEMETRY_API_TOKENS (comma-separated) or TELEMETRY_API_TOKENS_FILE
(one a line, re-read when the file changes, so a rotated Kubernetes Secret applies without a restart).

Tokens are compared in constant time (`hmac.compare_digest`) and never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

log = logging.getLogger(__name__)
TOKENS_ENV = "TELEMETRY_API_TOKENS"
TOKENS_FILE_ENV = "TELEMETRY_API_TOKENS_FILE"


def _parse(text: str, sep: str | None) -> tuple[bytes, ...]:
    parts = text.split(sep) if sep else text.splitlines()
    return tuple(p.strip().encode() for p in parts if p.strip() and not p.strip().startswith("#"))


class Tokens:
    """The accepted tokens: a fixed list, or a file's lines, re-read when its (mtime, size, inode) changes.

    A missing or empty file accepts no token (fails closed) and says so in the log once.
    """

    def __init__(self, tokens: Iterable[str] = (), *, path: str | Path | None = None,
                 stat: Callable[[str], os.stat_result] = os.stat):
        self.path = str(path) if path else None
        self._stat = stat
        self._tokens = tuple(t.strip().encode() for t in tokens if t.strip())
        self._seen: object = None
        self._lock = threading.Lock()
        if self.path:
            self._reload()
        elif not self._tokens:
            log.warning("$%s holds no token: every /api/v1 request is refused", TOKENS_ENV)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Tokens | None:
        """The tokens the environment configures; None when neither variable is set (the API is open)."""
        env = os.environ if env is None else env
        if env.get(TOKENS_FILE_ENV):
            return cls(path=env[TOKENS_FILE_ENV])
        if env.get(TOKENS_ENV, "").strip():
            return cls(t.decode() for t in _parse(env[TOKENS_ENV], ","))
        return None

    def describe(self) -> str:
        """What a log line may say about the tokens: how many and where from, never a token."""
        source = f"file {self.path}" if self.path else f"${TOKENS_ENV}"
        return f"{len(self.current())} API token(s) from {source}"

    def _reload(self) -> None:
        try:
            st = self._stat(self.path)
            key: object = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as err:
            key = ("missing", err.errno)
        if key == self._seen:
            return
        with self._lock:
            if key == self._seen:
                return
            try:
                tokens = _parse(Path(self.path).read_text(), None)
            except OSError as err:
                tokens = ()
                log.warning("API tokens file %s unreadable (%s): every /api/v1 request is refused",
                            self.path, err.strerror)
            else:
                if not tokens:
                    log.warning("API tokens file %s holds no token: every /api/v1 request is refused", self.path)
                elif self._seen is not None:
                    log.info("API tokens file %s changed: %d token(s) now", self.path, len(tokens))
            self._tokens, self._seen = tokens, key

    def current(self) -> tuple[bytes, ...]:
        if self.path:
            self._reload()
        elif not self._tokens:
            log.warning("$%s holds no token: every /api/v1 request is refused", TOKENS_ENV)
        return self._tokens

    def accepts(self, presented: str) -> bool:
        """Constant-time comparison against every token (no early exit that would time which one matched)."""
        given = presented.encode("utf-8", "surrogateescape")
        ok = False
        for token in self.current():
            ok |= hmac.compare_digest(given, token)
        return ok


# module level, so that the (postponed) annotation below resolves
_SCHEME = HTTPBearer(auto_error=False, description="a token of TELEMETRY_API_TOKENS(_FILE)")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_SCHEME)]


def bearer_auth(tokens: Tokens | None) -> Callable:
    """A FastAPI dependency that admits only requests carrying one of `tokens` (any request when None)."""
    if tokens is None:
        async def open_access() -> None:
            return None
        return open_access

    async def require_token(request: Request, credentials: Credentials) -> None:
        if credentials is None:
            reason, header = "missing bearer token: send 'Authorization: Bearer <token>'", "Bearer"
        elif not tokens.accepts(credentials.credentials):
            reason, header = "invalid bearer token", 'Bearer error="invalid_token"'
        else:
            return
        log.info("401 %s %s from %s: %s", request.method, request.url.path,
                 request.client.host if request.client else "?", reason)
        raise HTTPException(401, reason, headers={"WWW-Authenticate": header})

    return require_token

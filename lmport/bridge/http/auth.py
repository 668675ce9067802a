"""Bearer API keys and the client identity that rate limits are counted against."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from lmport.bridge.http.errors import APIError


class KeyChecker:
    """Accepts any of the configured keys; with none configured every request passes."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identity(self, headers: Mapping[str, str], client_host: str | None, query_key: str | None = None) -> str:
        """The rate-limit identity of an authenticated request: its key's index, or its address without keys.

        `query_key` is the `api_key` query parameter, accepted on the WebSocket only (browsers cannot set headers
        there)."""
        if not self._keys:
            return f"addr:{client_host or 'unknown'}"
        scheme, _, token = headers.get("authorization", "").partition(" ")
        presented = token.strip() if scheme.lower() == "bearer" else (query_key or "")
        if not presented:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
        candidate = presented.encode()
        # compare against every key, so timing does not reveal which (or whether an early one) matched
        matches = [hmac.compare_digest(candidate, key) for key in self._keys]
        if not any(matches):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return f"key:{matches.index(True)}"

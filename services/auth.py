"""Bearer keys at a door: which callers are let in.

One check for every door that asks for a key (the OpenAI HTTP door reads it from
`Authorization: Bearer KEY`; a gRPC door would read the same from its metadata), so keys mean
the same everywhere. Keys are compared in constant time, and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable


class ApiKeys:
    """The keys a door accepts; none configured: every caller is accepted."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def accepts(self, presented: str | None) -> bool:
        if not self._keys:
            return True
        if not presented:
            return False
        given = presented.encode()
        # Every key is compared, so the time taken says nothing about which one nearly matched.
        return sum(hmac.compare_digest(given, key) for key in self._keys) > 0

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} keys)"

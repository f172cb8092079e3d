"""An in-memory ``ResultCache`` for gateway tests that records what the invoker asked."""

from __future__ import annotations

from collections.abc import Sequence


class FakeCache:
    """Keeps values in a dict; ``gets`` and ``sets`` list the keys asked and written."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.gets: list[str] = []
        self.sets: list[tuple[str, float, list[str]]] = []

    async def get(self, key: str) -> bytes | None:
        self.gets.append(key)
        return self.data.get(key)

    async def set(self, key: str, value: bytes, ttl: float, tags: Sequence[str] = ()) -> None:
        self.sets.append((key, ttl, list(tags)))
        self.data[key] = value

"""One registry mechanism for named, pluggable parts (TTA methods, optimizers).

Contract: a :class:`Registry` maps a lower-case name to an entry, keeps registration order (the order tables,
CLI choices and bench lists show), rejects a second entry under the same name, and answers an unknown name with a
``ValueError`` that lists the known ones. Capabilities live in the entries (data), so callers never compare names.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry, in registration order; duplicate names rejected."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name`` (lower-cased); a taken name raises ``ValueError``."""
        key = name.lower()
        if not key:
            raise ValueError(f"a {self.kind} needs a name")
        if key in self._entries:
            raise ValueError(f"duplicate {self.kind} name {key!r}")
        self._entries[key] = entry
        return entry

    def sort(self, key: Callable[[T], Any]) -> None:
        """Reorder the entries (stable) by ``key`` of each entry."""
        self._entries = dict(sorted(self._entries.items(), key=lambda kv: key(kv[1])))

    def get(self, name: str) -> T:
        try:
            return self._entries[name.lower()]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose from {sorted(self._entries)}") from None

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def values(self) -> list[T]:
        return list(self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

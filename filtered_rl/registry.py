"""Named registries for the project's extension points (divergences, verifiers, tasks, algorithms).

A variant is one registered entry: its module calls `REGISTRY.register(name)(obj)` (or uses it as a
decorator), and everything that offers a choice (config help, CLI choices, recipe YAML sections) reads
the registry instead of a hand-kept list. An unknown name fails listing the known ones, as verl's do.

`discover` names a package whose submodules are imported on first lookup, so that adding a variant is
adding one file to that package: nobody has to import it by hand first.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name; a ValueError for config validation, a KeyError for mapping lookups."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry(Mapping[str, T], Generic[T]):
    """An ordered name → entry mapping with a helpful error for unknown names."""

    def __init__(self, kind: str, discover: str | None = None):
        self.kind = kind
        self._discover = discover
        self._discovered = discover is None
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T] | T:
        """Register `entry` under `name` (or return a decorator that does); a name is registered once."""

        def add(value: T) -> T:
            if name in self._entries and self._entries[name] is not value:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = value
            return value

        return add if entry is None else add(entry)

    def _ensure_discovered(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self._discover)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self._discover}.{module.name}")

    def __getitem__(self, name: str) -> T:
        self._ensure_discovered()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._entries) or '(none)'}"
            ) from None

    def __contains__(self, name: object) -> bool:
        self._ensure_discovered()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._ensure_discovered()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._ensure_discovered()
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

"""Scorer registry: `register`, `create`, `list_scorers`, `scorer_info`."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from scoring.base import Scorer, ScorerInfo

_REGISTRY: dict[str, type[Scorer]] = {}

S = TypeVar("S", bound=type[Scorer])


def register(name: str, *, needs_data: bool, description: str) -> Callable[[S], S]:
    """Class decorator adding a scorer under `name`; a duplicate name raises ValueError."""

    def wrap(cls: S) -> S:
        if name in _REGISTRY:
            raise ValueError(f"scorer {name!r} is already registered")
        cls.info = ScorerInfo(name=name, needs_data=needs_data, description=description)
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_scorers(pattern: str = "*") -> list[str]:
    """Registered scorer names matching an fnmatch `pattern`, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def _lookup(name: str) -> type[Scorer]:
    if name not in _REGISTRY:
        known = ", ".join(list_scorers())
        near = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown scorer {name!r}; known scorers: {known}.{hint}")
    return _REGISTRY[name]


def scorer_info(name: str) -> ScorerInfo:
    """The `ScorerInfo` of a registered scorer (ValueError if unknown)."""
    return _lookup(name).info


def create(name: str, **options: Any) -> Scorer:
    """A new scorer instance; `options` go to its constructor (None values are dropped)."""
    return _lookup(name)(**{k: v for k, v in options.items() if v is not None})

"""Scorer registry: `register`, `create`, `list_scorers`, `scorer_info`, `scorer_options`, `parse_options`."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Sequence
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
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown scorer {name!r}; known scorers: {known}{hint}, or one a module of yours "
                         "registers (scoring.register; the CLI imports it with --import MODULE)")
    return _REGISTRY[name]


def scorer_info(name: str) -> ScorerInfo:
    """The `ScorerInfo` of a registered scorer (ValueError if unknown)."""
    return _lookup(name).info


def create(name: str, **options: Any) -> Scorer:
    """A new scorer instance; `options` go to its constructor (None values are dropped)."""
    return _lookup(name)(**{k: v for k, v in options.items() if v is not None})


def scorer_options(name: str) -> dict[str, Any]:
    """The options a scorer's constructor takes, with their defaults: {option: default}."""
    params = inspect.signature(_lookup(name).__init__).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self" and p.default is not p.empty
    }


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(name: str, key: str, text: str, default: Any) -> Any:
    """`text` as the type of the option's default (bool, int, float or str); ValueError if it is not one."""
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if kind in (int, float):
            return kind(text)
    except ValueError:
        raise ValueError(f"scorer {name!r} option {key}={text!r} is not a {kind.__name__}") from None
    return text


def parse_options(name: str, pairs: Sequence[str]) -> dict[str, Any]:
    """`["KEY=VALUE", ...]` → {option: typed value} for scorer `name`.

    Raises ValueError for a malformed pair, an unknown option (listing the known ones) or a
    value that is not of the option's type. Values are checked further by the scorer itself.
    """
    known = scorer_options(name)
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"scorer option {pair!r} is not KEY=VALUE; pass e.g. p=0.1")
        if key not in known:
            listed = ", ".join(known) or "none"
            raise ValueError(f"scorer {name!r} has no option {key!r}; its options: {listed}")
        parsed[key] = _coerce(name, key, text.strip(), known[key])
    return parsed

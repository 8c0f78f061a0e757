"""Registry of press classes by short name: ``register_press``, ``make_press``, ``list_presses``.

Classes register themselves with a decorator in their own file; the registry stores classes (never instances),
so every ``make_press`` call returns a fresh, independent press.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, TypeVar

from kvsqueeze.presses.base import Press

P = TypeVar("P", bound=type[Press])



class UnknownNameError(KeyError, ValueError):
    """An unknown registry name (a press, a benchmark). A ``KeyError`` for lookups, and a ``ValueError`` like every
    other bad input; its message is shown as written (a plain ``KeyError`` would print it quoted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_REGISTRY: dict[str, type[Press]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_press(name: str):
    """Class decorator registering a press under ``name`` (lowercase, digits and underscores)."""
    if not isinstance(name, str):
        raise TypeError(f"a press name must be a string, got {name!r}")
    if not _NAME.match(name):
        raise ValueError(f"press names are lowercase identifiers, got {name!r}")

    def decorator(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, Press)):
            raise TypeError(f"only Press subclasses can be registered, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"press name {name!r} is already registered by {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def list_presses() -> list[str]:
    """Names of every registered press, sorted."""
    return sorted(_REGISTRY)


def press_class(name: str) -> type[Press]:
    """The class registered under ``name``; an unknown name raises :class:`UnknownNameError` (a ``KeyError`` and
    a ``ValueError``) with close matches."""
    if not isinstance(name, str):
        raise TypeError(f"press name must be a string, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown press {name!r}.{hint} Known presses: {', '.join(list_presses())}")
    return _REGISTRY[key]


def make_press(name: str, **kwargs: Any) -> Press:
    """Build a press by registry name, e.g. ``make_press("knorm", compression_ratio=0.5)``."""
    cls = press_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{name!r} ({cls.__name__}) has no field(s) {unknown}; its fields are {sorted(known)}")
    return cls(**kwargs)


def press_fields(name: str) -> list[dataclasses.Field]:
    """The dataclass fields of a registered press (for ``kvsqueeze ls``)."""
    return list(dataclasses.fields(press_class(name)))

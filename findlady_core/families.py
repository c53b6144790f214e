"""Architecture families: how to recognise a state dict and build its permutation spec.

A family is one decorated function (``findlady_core/catalog.py`` holds the built-in ones)::

    @family("bert", detect=is_bert)
    def bert_spec(state_dict, **options) -> Spec: ...

``infer.infer_spec`` asks every detector in registration order and falls back to the plain
chain (registered without a detector); the CLI's ``spec infer --family`` choices are the
registered names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from findlady_core.errors import SpecError

Detector = Callable[[Mapping[str, Any]], bool]
Builder = Callable[..., Any]  # (state_dict, **options) -> Spec

# Modules whose import registers the built-in families (imported on first use).
BUILTIN = ("findlady_core.catalog", "findlady_core.infer")


@dataclass(frozen=True)
class Family:
    name: str
    build: Builder
    detect: Detector | None = None  # None: never detected, only asked for by name (the chain)


_REGISTRY: dict[str, Family] = {}


def family(name: str, *, detect: Detector | None = None) -> Callable[[Builder], Builder]:
    """Register the decorated spec builder as family ``name``; ``detect(state_dict)`` says
    whether a state dict belongs to it."""

    def register(build: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name].build is not build:
            raise ValueError(f"architecture family {name!r} is registered twice")
        _REGISTRY[name] = Family(name, build, detect)
        return build

    return register


def registry() -> dict[str, Family]:
    """Every registered family by name, the built-in ones included."""
    for module in BUILTIN:
        importlib.import_module(module)
    return dict(_REGISTRY)


def names() -> list[str]:
    return list(registry())


def detect(state_dict: Mapping[str, Any]) -> str | None:
    """The first family whose detector accepts ``state_dict``, else None."""
    for f in registry().values():
        if f.detect is not None and f.detect(state_dict):
            return f.name
    return None


def build(name: str, state_dict: Mapping[str, Any], **options: Any) -> Any:
    """The spec of family ``name`` for ``state_dict``."""
    families = registry()
    if name not in families:
        raise SpecError(f"no built-in spec for family {name!r}; known: {', '.join(families)} (or trace the module)")
    return families[name].build(state_dict, **options)

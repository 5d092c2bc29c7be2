"""The verifier registry: name -> factory, so that tasks, recipes and CLIs name a verifier ("math").

An entry is a factory that imports its class only when called, so that naming one verifier never loads
another's dependencies. Adding a verifier is one module with a `BinaryVerifier` subclass plus one
`VERIFIERS.register` line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from filtered_rl.registry import Registry

from .base import BinaryVerifier

Factory = Callable[..., BinaryVerifier]

VERIFIERS: Registry[Factory] = Registry("verifier")


def lazy(module: str, name: str) -> Factory:
    """A factory for class `name` of `module` (relative to this package), imported on the first call."""

    def make(**options: Any) -> BinaryVerifier:
        return getattr(importlib.import_module(module, __package__), name)(**options)

    make.__qualname__ = make.__name__ = f"make_{name}"
    return make


VERIFIERS.register("math", lazy(".math", "MathVerifier"))
VERIFIERS.register("code", lazy(".code", "CodeVerifier"))


def make_verifier(name: str, **options: Any) -> BinaryVerifier:
    """The verifier registered as `name`, built with `options` (its constructor's keyword arguments).
    An unknown name raises `UnknownNameError` (a ValueError and a KeyError) listing the known ones."""
    return VERIFIERS[name](**options)

"""The verifier registry: name -> verifier class, so that tasks, recipes and CLIs name a verifier ("math").

A verifier module registers its class where it is defined (`@register_verifier("math")`), and the
registry imports every public module of this package on its first lookup, so adding a verifier is one
module and nothing else. The modules are light to import: heavy dependencies (math-verify, sympy) load
only in the helper processes that do the work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from filtered_rl.registry import Registry

from .base import BinaryVerifier

VERIFIERS: Registry[Callable[..., BinaryVerifier]] = Registry("verifier", discover="filtered_rl.verifiers")


def register_verifier(name: str) -> Callable[[type[BinaryVerifier]], type[BinaryVerifier]]:
    """Class decorator: make `name` build this verifier (`make_verifier`, `--verifier`, task YAMLs)."""
    return VERIFIERS.register(name)


def make_verifier(name: str, **options: Any) -> BinaryVerifier:
    """The verifier registered as `name`, built with `options` (its constructor's keyword arguments).
    An unknown name raises `UnknownNameError` (a ValueError and a KeyError) listing the known ones."""
    return VERIFIERS[name](**options)

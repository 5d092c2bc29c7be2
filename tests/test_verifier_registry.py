"""The verifier registry: names, construction with options, and the error for an unknown name."""

from __future__ import annotations

import pytest

from filtered_rl.registry import UnknownNameError
from filtered_rl.verifiers import VERIFIERS, CodeVerifier, MathVerifier, make_verifier


def test_builtin_verifiers_are_registered_and_built_with_options():
    assert VERIFIERS.names() == ("math", "code")
    math = make_verifier("math", gold_column="solution", timeout=3.0)
    assert isinstance(math, MathVerifier) and (math.gold_column, math.timeout) == ("solution", 3.0)
    code = make_verifier("code", tests_column="checks")
    assert isinstance(code, CodeVerifier) and code.gold_column == "checks"


def test_an_unknown_name_fails_listing_the_known_ones():
    with pytest.raises(UnknownNameError, match=r"unknown verifier 'regex'; choose one of: math, code"):
        make_verifier("regex")
    with pytest.raises(ValueError):  # what config validation catches
        make_verifier("regex")


def test_a_registered_verifier_is_reachable_by_name_from_tasks_and_the_cli(monkeypatch):
    """Registering is the one step: `data.make_verifier` (tasks, recipes, `--verifier`) and
    `data.verifier_names` (the CLI's choices) read the registry, not a list of their own."""
    from filtered_rl import data

    class ShoutVerifier(MathVerifier):
        pass

    monkeypatch.setitem(VERIFIERS._entries, "shout", lambda **options: ShoutVerifier(**options))
    assert "shout" in data.verifier_names()
    built = data.make_verifier("shout", gold_column="answer_text", timeout=2.0)
    assert isinstance(built, ShoutVerifier) and (built.gold_column, built.timeout) == ("answer_text", 2.0)
    with pytest.raises(ValueError, match="shout"):  # the error lists the new name among the known ones
        data.make_verifier("unheard-of")

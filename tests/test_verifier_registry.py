"""The verifier registry: names, construction with options, and the error for an unknown name."""

from __future__ import annotations

import pytest

from filtered_rl.registry import UnknownNameError
from filtered_rl.verifiers import VERIFIERS, CodeVerifier, MathVerifier, make_verifier


def test_builtin_verifiers_are_registered_and_built_with_options():
    assert set(VERIFIERS.names()) == {"math", "code"}
    math = make_verifier("math", gold_column="solution", timeout=3.0)
    assert isinstance(math, MathVerifier) and (math.gold_column, math.timeout) == ("solution", 3.0)
    code = make_verifier("code", tests_column="checks")
    assert isinstance(code, CodeVerifier) and code.gold_column == "checks"


def test_an_unknown_name_fails_listing_the_known_ones():
    with pytest.raises(
        UnknownNameError, match=r"unknown verifier 'regex'; choose one of: (code, math|math, code)$"
    ):
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


ONE_FILE_VERIFIER = """
from filtered_rl.verifiers import BinaryVerifier, register_verifier


@register_verifier("palindrome")
class PalindromeVerifier(BinaryVerifier):
    __name__ = "palindrome"
    gold_column = "answer"

    def score(self, text, gold, row):
        return float(text.strip() == text.strip()[::-1] != "")
"""

ONE_FILE_CHECK = """
import sys
import filtered_rl.verifiers as verifiers

verifiers.__path__.append(sys.argv[1])  # as if palindrome.py had been added to the package
from filtered_rl import data

assert "palindrome" in data.verifier_names(), data.verifier_names()
reward = data.make_verifier("palindrome")
assert reward(prompts=["p", "q"], completions=["abba", "abc"], answer=["", ""]) == [1.0, 0.0]
assert type(verifiers.make_verifier("palindrome")).__name__ == "PalindromeVerifier"
print("one file is enough")
"""


def test_a_new_verifier_is_one_file(tmp_path):
    """Dropping one module into the verifiers package registers it for `make_verifier`, tasks and the
    CLIs' `--verifier` choices: the registry discovers the package's modules on first lookup."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "palindrome.py").write_text(ONE_FILE_VERIFIER)
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", ONE_FILE_CHECK, str(tmp_path / "extra")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "one file is enough" in result.stdout

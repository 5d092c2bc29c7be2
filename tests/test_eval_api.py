"""The public names of `filtered_rl.evaluation`: importable from the package, loaded lazily.

pass@k is pure math; code that only computes it (a notebook, a report script) must not pay for torch,
so the package's names are resolved on first use (PEP 562) and checked here in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import filtered_rl.evaluation as evaluation

LIGHT_NAMES = ["pass_at_k", "mean_pass_at_k", "bootstrap_ci", "coverage", "EvalConfig", "run_eval"]


def test_pass_at_k_and_the_entry_point_import_without_torch():
    code = (
        "import json, sys\n"
        "import filtered_rl.evaluation\n"
        f"from filtered_rl.evaluation import {', '.join(LIGHT_NAMES)}\n"
        "config = EvalConfig(model='m', output_dir='o', num_samples=4, ks=[1, 4])\n"
        "print(json.dumps({'pass@2': pass_at_k(4, 1, 2), 'ks': config.ks,\n"
        "                  'heavy': sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules)}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["pass@2"] == pytest.approx(0.5)  # 1 − C(3,2)/C(4,2)
    assert out["ks"] == [1, 4]
    assert out["heavy"] == []


def test_every_public_name_resolves_to_its_module_object():
    from filtered_rl.evaluation import passk, runner

    assert evaluation.pass_at_k is passk.pass_at_k and evaluation.run_eval is runner.run_eval
    assert evaluation.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert sorted(evaluation.__all__) == sorted(evaluation._EXPORTS)
    for name in evaluation.__all__:
        assert callable(getattr(evaluation, name)), name
        assert name in dir(evaluation)
    with pytest.raises(AttributeError, match="has no attribute 'pass_at_kk'"):
        evaluation.pass_at_kk  # noqa: B018
    with pytest.raises(ImportError):
        exec("from filtered_rl.evaluation import not_a_name", {})

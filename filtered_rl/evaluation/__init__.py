"""pass@1 / pass@k evaluation with coverage and diversity metrics.

    from filtered_rl.evaluation import pass_at_k, EvalConfig, run_eval

    pass_at_k(n=64, c=3, k=8)  # unbiased pass@k of one prompt
    summary = run_eval(EvalConfig(model="path/to/model", dataset="gsm8k", output_dir="runs/eval/x"))

The names are loaded on first use (PEP 562 `__getattr__`): importing this package, or taking the pure
math from it (`pass_at_k`, `bootstrap_ci`, the metrics: numpy only), never imports torch; only
`HFSampler`, and running `run_eval`, do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "EvalConfig",
    "EvalConfigError",
    "EvalOutputError",
    "HFSampler",
    "answer_entropy",
    "bootstrap_ci",
    "coverage",
    "default_ks",
    "distinct_answers",
    "filtered_kl",
    "mean_pass_at_k",
    "pass_at_k",
    "pass_at_k_matrix",
    "plot_passk",
    "run_eval",
    "sampled_pstar_mass",
    "summarize",
]

# public name → the submodule that defines it (only the runner and the sampler reach torch, when run)
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ("pass_at_k", "pass_at_k_matrix", "mean_pass_at_k", "default_ks", "bootstrap_ci"), "passk"
    ),
    **dict.fromkeys(
        ("distinct_answers", "answer_entropy", "coverage", "filtered_kl", "sampled_pstar_mass"), "metrics"
    ),
    **dict.fromkeys(("EvalConfig", "EvalConfigError", "run_eval", "summarize"), "runner"),
    "EvalOutputError": "outputs",
    "HFSampler": "generate",
    "plot_passk": "plots",
}

if TYPE_CHECKING:
    from filtered_rl.evaluation.generate import HFSampler
    from filtered_rl.evaluation.metrics import (
        answer_entropy,
        coverage,
        distinct_answers,
        filtered_kl,
        sampled_pstar_mass,
    )
    from filtered_rl.evaluation.outputs import EvalOutputError
    from filtered_rl.evaluation.passk import (
        bootstrap_ci,
        default_ks,
        mean_pass_at_k,
        pass_at_k,
        pass_at_k_matrix,
    )
    from filtered_rl.evaluation.plots import plot_passk
    from filtered_rl.evaluation.runner import EvalConfig, EvalConfigError, run_eval, summarize


def __getattr__(name: str) -> Any:
    """Import the submodule holding `name` on first access, and cache the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

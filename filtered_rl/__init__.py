"""filtered-rl: fine-tune language models toward the *filtered model* p*(y|x) ∝ a(y|x)·v(x, y).

    from filtered_rl import FilteredGRPOConfig, FilteredGRPOTrainer, MathVerifier, load_task, end_run

Public names are imported on first use (PEP 562), so `import filtered_rl` loads neither torch nor TRL;
the pure math (`filtered_rl.divergences`, `filtered_rl.control`, `pass_at_k`) stays cheap to import.
The synthetic demo (countdown and its base model) lives apart, in `filtered_rl.synthetic`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from filtered_rl._lazy import lazy_exports

__version__ = "0.2.0"

_EXPORTS: dict[str, str] = {
    # trainers and the controller
    "FilteredGRPOConfig": "filtered_rl.trainers.filtered",
    "FilteredGRPOTrainer": "filtered_rl.trainers.filtered",
    "GRPOKLRewardConfig": "filtered_rl.trainers.grpo_kl_reward",
    "GRPOKLRewardTrainer": "filtered_rl.trainers.grpo_kl_reward",
    "PostScoringConfig": "filtered_rl.trainers._base",
    "PostScoringTrainer": "filtered_rl.trainers._base",
    "ScoredBatch": "filtered_rl.trainers._base",
    "end_run": "filtered_rl.trainers._base",
    "ALGORITHMS": "filtered_rl.trainers._registry",
    "register_algorithm": "filtered_rl.trainers._registry",
    "BetaFromValidityCallback": "filtered_rl.callbacks",
    "beta_from_validity": "filtered_rl.control",
    "validity_from_beta": "filtered_rl.control",
    "DIVERGENCES": "filtered_rl.divergences",
    # verifiers (TRL reward functions)
    "BinaryVerifier": "filtered_rl.verifiers",
    "MathVerifier": "filtered_rl.verifiers",
    "CodeVerifier": "filtered_rl.verifiers",
    # data and evaluation
    "load_task": "filtered_rl.data",
    "pass_at_k": "filtered_rl.evaluation.passk",
    "EvalConfig": "filtered_rl.evaluation.runner",
    "run_eval": "filtered_rl.evaluation.runner",
}
__all__ = [
    "__version__",
    "FilteredGRPOConfig",
    "FilteredGRPOTrainer",
    "GRPOKLRewardConfig",
    "GRPOKLRewardTrainer",
    "PostScoringConfig",
    "PostScoringTrainer",
    "ScoredBatch",
    "end_run",
    "ALGORITHMS",
    "register_algorithm",
    "BetaFromValidityCallback",
    "beta_from_validity",
    "validity_from_beta",
    "DIVERGENCES",
    "BinaryVerifier",
    "MathVerifier",
    "CodeVerifier",
    "load_task",
    "pass_at_k",
    "EvalConfig",
    "run_eval",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from filtered_rl.callbacks import BetaFromValidityCallback
    from filtered_rl.control import beta_from_validity, validity_from_beta
    from filtered_rl.data import load_task
    from filtered_rl.divergences import DIVERGENCES
    from filtered_rl.evaluation.passk import pass_at_k
    from filtered_rl.evaluation.runner import EvalConfig, run_eval
    from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch, end_run
    from filtered_rl.trainers._registry import ALGORITHMS, register_algorithm
    from filtered_rl.trainers.filtered import FilteredGRPOConfig, FilteredGRPOTrainer
    from filtered_rl.trainers.grpo_kl_reward import GRPOKLRewardConfig, GRPOKLRewardTrainer
    from filtered_rl.verifiers import BinaryVerifier, CodeVerifier, MathVerifier

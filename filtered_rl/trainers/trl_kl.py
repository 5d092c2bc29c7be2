"""TRL's own KL-regularised trainers, registered as algorithms: `grpo` (KL in the loss) and `rloo`
(KL in the reward). Only `rloo` accepts the β-from-μ controller (`filtered_rl.callbacks`): the k3 term in
GRPO's loss does not have p_β as its optimum (docs/controller.md), so `grpo` with `target_validity` is refused
in favour of `grpo_klr`, `rloo` or `tilted`."""

from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from filtered_rl.trainers._registry import ALGORITHMS, Algorithm

ALGORITHMS.register(
    "grpo",
    Algorithm(
        "grpo",
        "TRL GRPOTrainer: group-normalised rewards, k3 KL estimate added to the loss (fixed beta; "
        "for β-from-μ use grpo_klr)",
        GRPOTrainer,
        GRPOConfig,
        accepts_controller=False,
    ),
)
ALGORITHMS.register(
    "rloo",
    Algorithm(
        "rloo",
        "TRL RLOOTrainer: leave-one-out REINFORCE, KL folded into the reward (beta); optimum p_β exactly",
        RLOOTrainer,
        RLOOConfig,
        accepts_controller=True,
    ),
)

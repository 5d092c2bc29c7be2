"""TRL's own KL-regularised trainers, registered as algorithms: `grpo` (KL in the loss) and `rloo`
(KL in the reward). Both accept the β-from-μ controller (`filtered_rl.callbacks`)."""

from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from filtered_rl.trainers._registry import ALGORITHMS, Algorithm

ALGORITHMS.register(
    "grpo",
    Algorithm(
        "grpo",
        "TRL GRPOTrainer: group-normalised rewards, k3 KL estimate added to the loss (beta)",
        GRPOTrainer,
        GRPOConfig,
        accepts_controller=True,
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

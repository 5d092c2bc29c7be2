"""KL-control done exactly: the tilted target p_β ∝ a·exp(v/β) as an algorithm of its own, `tilted`.

Why a separate name: KL-regularised RL with coefficient β has the tilted model p_β as its optimum, but
GRPO's k3 term in the loss does not descend KL(π‖a) and `scale_rewards` changes its effective β (see the
TRL notes). `filtered` with `target="tilted"` and `divergence="reverse_kl"` minimises KL(π‖p_β) directly,
which *is* the KL-regularised objective with its exact optimum; registering it as `tilted` gives it a
recipe section and a frontier arm of its own (a YAML has one section per algorithm). `rloo` (TRL's
RLOOTrainer, k1 KL in the reward) is the other exact arm. Everything else is `FilteredGRPOTrainer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from filtered_rl.trainers._registry import register_algorithm
from filtered_rl.trainers.filtered import FilteredGRPOConfig, FilteredGRPOTrainer


@dataclass
class TiltedConfig(FilteredGRPOConfig):
    """[`FilteredGRPOConfig`] toward the tilted target: `target="tilted"`, reverse KL by default.

    Set exactly one of `target_beta` (β > 0) or `target_validity` (μ: β chosen per step so that p_β has
    validity μ).
    """

    target: str = field(
        default="tilted",
        metadata={"help": "Always 'tilted' for this algorithm (use algorithm `filtered` for p*)."},
    )
    divergence: str = field(
        default="reverse_kl",
        metadata={
            "help": "f-divergence D_f(π‖p_β): 'reverse_kl' (default) is KL-regularised RL exactly; forward_kl, js, "
            "tv and alpha are the mass-covering alternatives toward the same p_β."
        },
    )

    def __post_init__(self):
        if self.target != "tilted":
            raise ValueError(
                f"target={self.target!r}: algorithm `tilted` trains toward p_β; for the filtered model p* use "
                "algorithm: filtered"
            )
        super().__post_init__()


@register_algorithm(
    "tilted",
    TiltedConfig,
    "KL-control exactly: D_f(π‖p_β), p_β ∝ a·exp(v/β), reverse KL by default; target_beta or target_validity",
)
class TiltedGRPOTrainer(FilteredGRPOTrainer):
    """`FilteredGRPOTrainer` with a `TiltedConfig` (see the module doc)."""

    _name = "TiltedGRPO"
    config_class = TiltedConfig

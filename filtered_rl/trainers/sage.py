r"""SAGE, "Shaping Anchors for Guided Exploration in RLVR of LLMs" (Lee, Kang & Hwang, arXiv 2605.18864), as in
the authors' code (tally0818/SAGE: a TRL `GRPOTrainer` subclass; read, not copied).

Why: reverse-KL regularisation keeps RLVR stable but anchors the policy to the reference π_ref = a, so modes the
reference makes unlikely never grow; dropping the KL invites reward hacking, and forward KL (the paper argues) puts
mass off-target. SAGE keeps reverse KL and *reshapes the anchor*: π_ref is replaced by q(x, y)·π_ref, q > 0 a
"guide function" held fixed during each update. In the code the guide is per token: q_t multiplies the reference's
token probability at position t, so the loss's KL term is TRL's k3 estimator against the shaped log-probability

    log ã_t = log a(y_t | x, y_<t) + log q_t,       k3_t = e^{log ã_t − log π_t} − (log ã_t − log π_t) − 1,

added as β·k3_t per token (β = TRL's `beta`, 0.05 in the authors' config; SAGE needs β > 0), with GRPO's
advantages and clipped surrogate unchanged. q_t is computed at loss time, without gradient, clamped to
[`sage_q_min`, `sage_q_max`] = [0.6, 1.4], and 1 on padding. Three guides (`sage_guide`):

- **branch** (the paper's main variant, the default): q_t = 1 + ratio·max(0, H_t − threshold), H_t the current
  policy's entropy at position t (ratio 0.3, threshold 1.2 nats): the anchor gives more room at high-entropy
  "branching" tokens;
- **token**: q_t = 1 + α·w_t + σ·w_t·ε_t, ε_t ~ N(0, 1), w_t the policy's surprisal −log π(y_t) min-max normalised
  within the completion after clipping to its 5 % and 95 % quantiles; α (0.3 → 0.1) and σ (0.25 → 0.1) follow a
  cosine schedule with `sage_cycles` = 8 warm restarts, each restart's upper value × 0.9;
- **random**: with probability ε (0.1 → 0) per token q_t = 1 + σ·ε_t (σ 0.15 → 0.05), else 1; the same schedule.

How it hooks TRL without copying its loss: TRL's `_compute_loss` first calls `_get_per_token_logps_and_entropies`
(with `compute_entropy=True`), then reads `inputs["ref_per_token_logps"]` to build its k3 term. This trainer hands
TRL's `_compute_loss` a shallow copy of the inputs dict and overrides that one method: once the policy's log-probs
and entropies are computed (with gradients, inside the loss), it computes q from them and puts
`ref_per_token_logps + log q` into the copy, which TRL then reads. The surrogate, the KL estimator, its
`use_bias_correction_kl` option, the normaliser and TRL's `kl` log are TRL's; nothing of the loss is
re-implemented. TRL's fused Liger loss bypasses `_compute_loss` and is refused.

What it optimises (derived here, checked by training in tests/test_sage.py). TRL 1.16 multiplies the k3 term by
the token's importance ratio (`use_bias_correction_kl`, default True), so on-policy its expected gradient is
Σ_y π(y)·log(π(y)/(q(y)·a(y)))·∇log π(y) = ∇KL(π ‖ q·a) with q held fixed: exactly the paper's objective
E_π[r] − β·KL(π ‖ q·π_ref), whose optimum for a fixed q is the tilted target π ∝ q·a·e^{r/β} (q·a need not be
normalised: that only shifts the KL by a constant). With GRPO's group-mean baseline and `scale_rewards="none"` the
reward enters as c·r, c = (G − 1)/G, so the one-token optimum is π ∝ q·a·e^{c·v/β}. The authors' code computes k3
*without* the ratio (their TRL predates it; `use_bias_correction_kl: false` here reproduces their loss); its expected
gradient is β·Σ_y (π(y) − q(y)·a(y))·∇log π(y), a forward-KL pull toward q·a/Z scaled by Z = Σ q·a, whose one-token
stationary point is π(y) = β·q(y)·a(y) / (β·Z − c·(v(y) − V)), V the positive root of c·V² + (β·Z − c)·V −
β·Σ_valid q·a = 0 (GRPO-k3's fixed point, docs/controller.md, with the anchor reshaped). A guide that does not depend
on y within a prompt (the branch guide on one token: one entropy per prompt) multiplies the anchor by a constant,
which exact reverse KL ignores and the ratio-free k3 turns into a larger β. With several tokens q_t depends on the
prefix (branch) or on the token itself (token guide): q(x, y) = Π_t q_t, and the anchor favours sequences through
high-entropy (or surprising) tokens by up to q_max per token.

Readings chosen (docs/baselines.md): (1) the guide's schedule advances with the optimizer step (`global_step`);
the authors' scheduler advances once per loss call, which is the same in their configuration (one micro-batch per
optimizer step). (2) The branch guide uses the policy's entropy (the authors' `use_source: new`; their `ref` path
raises); the token guide the policy's surprisal with min-max normalisation (their default; `rank` and `zscore` are
not implemented). (3) Advantages are GRPO's (TRL's group z-score, `scale_rewards`), as in the authors' GRPO runs.
(4) The random draws use this trainer's own generator (seeded from `seed` and the process), so they do not shift
TRL's sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._grpo import check_sum_aggregation, group_zscore, scored_reward
from filtered_rl.trainers._registry import register_algorithm

SAGE_GUIDES = ("branch", "token", "random")

# A guide: (policy log-probs (B, T), entropies (B, T), loss mask (B, T), TRL's inputs dict) -> q (B, T), > 0.
Guide = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def masked_guide(q: torch.Tensor, mask: torch.Tensor, q_min: float, q_max: float) -> torch.Tensor:
    """q clamped to [q_min, q_max] on the masked tokens and exactly 1 elsewhere (padding: no reshaping)."""
    return torch.where(mask.bool(), q.clamp(q_min, q_max), torch.ones_like(q))


def branch_guide(
    entropies: torch.Tensor, mask: torch.Tensor, *, ratio: float, threshold: float, q_min: float, q_max: float
) -> torch.Tensor:
    """(B, T) q_t = 1 + ratio·max(0, H_t − threshold), clamped, 1 off the mask (the branch guide, module doc)."""
    entropies = entropies.detach().float()
    return masked_guide(1.0 + ratio * torch.relu(entropies - threshold), mask, q_min, q_max)


def minmax_surprisal(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) w in [0, 1]: −log π per completion clipped to its 5 %/95 % quantiles, then min-max scaled; 0 off the mask."""
    surprisal = -logps.detach().float()
    weights = torch.zeros_like(surprisal)
    mask = mask.bool()
    for row in range(surprisal.size(0)):
        keep = mask[row]
        if not keep.any():
            continue
        values = surprisal[row, keep]
        low, high = torch.quantile(values, 0.05), torch.quantile(values, 0.95)
        values = values.clamp(low, high)
        weights[row, keep] = (values - low) / (high - low).clamp_min(1e-6)
    return weights.clamp(0.0, 1.0)


def token_guide(
    logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: float,
    sigma: float,
    q_min: float,
    q_max: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, T) q_t = 1 + α·w_t + σ·w_t·ε_t (w the normalised surprisal, ε ~ N(0, 1)), clamped, 1 off the mask."""
    weights = minmax_surprisal(logps, mask)
    noise = torch.randn(weights.shape, generator=generator).to(weights.device)
    return masked_guide(1.0 + alpha * weights + sigma * weights * noise, mask, q_min, q_max)


def random_guide(
    mask: torch.Tensor,
    *,
    prob: float,
    sigma: float,
    q_min: float,
    q_max: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, T) with probability `prob` per token q_t = 1 + σ·ε_t, else 1; clamped, 1 off the mask."""
    chosen = (torch.rand(mask.shape, generator=generator) < prob).to(mask.device)
    noise = torch.randn(mask.shape, generator=generator).to(mask.device)
    q = torch.where(chosen, 1.0 + sigma * noise, torch.ones_like(noise))
    return masked_guide(q, mask, q_min, q_max)


def cosine_restarts(
    step: int, max_steps: int, upper: float, lower: float, cycles: int, decay: float
) -> float:
    """The guides' schedule at `step`: cosine from the cycle's upper value down to `lower` over max_steps // cycles
    steps, then a restart whose upper value is × `decay` (at most `cycles` − 1 times), as the authors' scheduler."""
    length = max(1, max_steps // cycles)
    cycle = min(step // length, cycles - 1)
    top = upper * decay**cycle
    phase = (step % length) / length
    return lower + (top - lower) * 0.5 * (1.0 + math.cos(math.pi * phase))


def shaped_reference(ref_logps: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """log(q·π_ref) per token: the anchor TRL's k3 term is computed against."""
    return ref_logps + torch.log(q.to(ref_logps.dtype).clamp_min(1e-8))


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value} must be a finite number > 0")


def _in_unit(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"{name}={value} must lie in [0, 1]")


@dataclass
class SAGEConfig(PostScoringConfig):
    """Configuration of [`SAGETrainer`]: [`~trl.GRPOConfig`] plus the guide function that reshapes the KL anchor."""

    beta: float = field(
        default=0.05,
        metadata={
            "help": "TRL's KL coefficient (k3 in the loss), against the reshaped anchor q·π_ref; > 0 (SAGE reshapes "
            "the KL term, so it needs one). The authors' 0.05."
        },
    )
    sage_guide: str = field(
        default="branch",
        metadata={
            "help": "The guide q: 'branch' (1 + ratio·relu(entropy − threshold), the paper's main variant), "
            "'token' (scheduled, surprisal-weighted noise) or 'random' (scheduled per-token noise)."
        },
    )
    sage_q_min: float = field(default=0.6, metadata={"help": "Lower clamp of q (> 0); the authors' 0.6."})
    sage_q_max: float = field(
        default=1.4, metadata={"help": "Upper clamp of q (≥ sage_q_min); the authors' 1.4."}
    )
    sage_branch_ratio: float = field(
        default=0.3, metadata={"help": "Branch guide: slope of q in the entropy above the threshold; 0.3."}
    )
    sage_branch_threshold: float = field(
        default=1.2, metadata={"help": "Branch guide: entropy (nats) above which q exceeds 1; 1.2."}
    )
    sage_token_alpha: float = field(
        default=0.3,
        metadata={
            "help": "Token guide: α, mean lift of q at the most surprising token, start of each cycle; 0.3."
        },
    )
    sage_token_alpha_min: float = field(
        default=0.1, metadata={"help": "Token guide: α at the end of each cosine cycle; 0.1."}
    )
    sage_token_sigma: float = field(
        default=0.25,
        metadata={
            "help": "Token guide: σ, noise scale at the most surprising token, start of each cycle; 0.25."
        },
    )
    sage_token_sigma_min: float = field(
        default=0.1, metadata={"help": "Token guide: σ at the end of each cosine cycle; 0.1."}
    )
    sage_random_prob: float = field(
        default=0.1,
        metadata={"help": "Random guide: probability a token's q is perturbed, start of each cycle; 0.1."},
    )
    sage_random_prob_min: float = field(
        default=0.0, metadata={"help": "Random guide: that probability at the end of each cosine cycle; 0.0."}
    )
    sage_random_sigma: float = field(
        default=0.15,
        metadata={"help": "Random guide: noise scale of a perturbed q, start of each cycle; 0.15."},
    )
    sage_random_sigma_min: float = field(
        default=0.05, metadata={"help": "Random guide: noise scale at the end of each cosine cycle; 0.05."}
    )
    sage_cycles: int = field(
        default=8,
        metadata={"help": "Token and random guides: cosine cycles (warm restarts) over max_steps; 8."},
    )
    sage_cycle_decay: float = field(
        default=0.9,
        metadata={"help": "Token and random guides: factor on the upper values at each restart; 0.9."},
    )

    def __post_init__(self):
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(
                f"beta={self.beta}: SAGE reshapes the KL anchor, so it needs a KL term: beta > 0 (the authors' 0.05)"
            )
        if self.sage_guide not in SAGE_GUIDES:
            raise ValueError(f"sage_guide={self.sage_guide!r}: choose one of {SAGE_GUIDES}")
        _positive("sage_q_min", self.sage_q_min)
        _positive("sage_q_max", self.sage_q_max)
        if self.sage_q_max < self.sage_q_min:
            raise ValueError(
                f"sage_q_max={self.sage_q_max} must be ≥ sage_q_min={self.sage_q_min} (0.6 and 1.4)"
            )
        for name in ("sage_branch_ratio", "sage_token_alpha", "sage_token_alpha_min", "sage_token_sigma",
                     "sage_token_sigma_min", "sage_random_sigma", "sage_random_sigma_min"):  # fmt: skip
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value} must be a finite number ≥ 0")
        if not math.isfinite(self.sage_branch_threshold):
            raise ValueError(f"sage_branch_threshold={self.sage_branch_threshold} must be finite (1.2 nats)")
        _in_unit("sage_random_prob", self.sage_random_prob)
        _in_unit("sage_random_prob_min", self.sage_random_prob_min)
        if self.sage_cycles < 1:
            raise ValueError(f"sage_cycles={self.sage_cycles} must be ≥ 1 (the authors' 8)")
        _positive("sage_cycle_decay", self.sage_cycle_decay)
        if self.use_liger_kernel:
            raise ValueError(
                "use_liger_kernel=True: TRL's fused Liger loss bypasses _compute_loss, where SAGE reshapes the "
                "reference log-probs; set use_liger_kernel: false"
            )
        check_sum_aggregation(self)
        super().__post_init__()


@register_algorithm(
    "sage",
    SAGEConfig,
    "SAGE (Lee et al. 2026): GRPO whose k3 KL anchor is q·π_ref, q a per-token guide (branch: policy entropy); "
    "beta, sage_guide",
)
class SAGETrainer(PostScoringTrainer):
    """GRPO with TRL's KL term against the reshaped anchor q·π_ref (module doc). Logs `sage/q_mean`, `sage/q_max`,
    `sage/q_min`, `sage/frac_shaped`.

    `guide`: the function computing q (built from the config); assign another `Guide` to experiment.
    """

    _name = "SAGE"
    config_class = SAGEConfig
    metric_prefix = "sage"
    needs_reference_model = False  # beta > 0 is required, so TRL builds and runs the reference model itself

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._sage_inputs: dict[str, Any] | None = None
        self._sage_generator = torch.Generator().manual_seed(
            int(self.args.seed) * 1013 + self.accelerator.process_index
        )
        self.guide: Guide = self._configured_guide

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        return group_zscore(scored_reward(batch), batch.group_size, self.args.scale_rewards)

    def _schedule(self, upper: float, lower: float) -> float:
        args = self.args
        horizon = max(int(self.state.max_steps or args.max_steps or 1), 1)
        return cosine_restarts(
            int(self.state.global_step), horizon, upper, lower, args.sage_cycles, args.sage_cycle_decay
        )

    def _configured_guide(
        self, logps: torch.Tensor, entropies: torch.Tensor, mask: torch.Tensor, inputs: dict
    ):
        args = self.args
        bounds = dict(q_min=args.sage_q_min, q_max=args.sage_q_max)
        if args.sage_guide == "branch":
            return branch_guide(
                entropies, mask, ratio=args.sage_branch_ratio, threshold=args.sage_branch_threshold, **bounds
            )
        if args.sage_guide == "token":
            return token_guide(
                logps,
                mask,
                alpha=self._schedule(args.sage_token_alpha, args.sage_token_alpha_min),
                sigma=self._schedule(args.sage_token_sigma, args.sage_token_sigma_min),
                generator=self._sage_generator,
                **bounds,
            )
        return random_guide(
            mask,
            prob=self._schedule(args.sage_random_prob, args.sage_random_prob_min),
            sigma=self._schedule(args.sage_random_sigma, args.sage_random_sigma_min),
            generator=self._sage_generator,
            **bounds,
        )

    def _compute_loss(self, model, inputs):
        # TRL reads ref_per_token_logps from the dict it is given: hand it a copy that the hook below reshapes.
        inputs = dict(inputs)
        self._sage_inputs = inputs
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._sage_inputs = None

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        inputs = self._sage_inputs
        if inputs is not None and entropies is not None and "ref_per_token_logps" in inputs:
            self._sage_inputs = None  # once per loss call: TRL reads the policy's log-probs once
            mask = inputs["completion_mask"]
            mask = mask * inputs["tool_mask"] if "tool_mask" in inputs else mask
            with torch.no_grad():
                q = self.guide(logps.detach(), entropies.detach(), mask, inputs).to(logps.device)
            inputs["ref_per_token_logps"] = shaped_reference(inputs["ref_per_token_logps"], q)
            self._log_guide(q, mask)
        return logps, entropies, aux

    def _log_guide(self, q: torch.Tensor, mask: torch.Tensor) -> None:
        keep = mask.bool()
        values = q[keep].float() if keep.any() else torch.ones(1, device=q.device)
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        metrics["sage/q_mean"].append(values.mean().item())
        metrics["sage/q_min"].append(values.min().item())
        metrics["sage/q_max"].append(values.max().item())
        metrics["sage/frac_shaped"].append((values != 1).float().mean().item())


__all__ = [
    "SAGE_GUIDES",
    "SAGEConfig",
    "SAGETrainer",
    "branch_guide",
    "cosine_restarts",
    "minmax_surprisal",
    "random_guide",
    "shaped_reference",
    "token_guide",
]

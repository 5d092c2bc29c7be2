"""β from μ: choose the KL coefficient by the validity it buys, for binary rewards.

Pure math, no trainer imports. With a verifier v(y) ∈ {0, 1}, the optimum of KL-control
E_π[v] − β·KL(π‖a) is the tilted model p_β(y) ∝ a(y)·e^{v(y)/β}. On a prompt whose base validity is
A = Σ_y a(y) v(y), its validity is

    μ(β) = A·e^{1/β} / (A·e^{1/β} + 1 − A),    i.e.  logit μ = logit A + 1/β,          (1)

so the β that reaches a target validity μ is β = 1/(logit μ − logit A)                  (2)

(positive only when μ > A: no KL penalty makes the optimum *less* valid than the base model). Two
divergences follow in closed form: KL(p_β‖a) = kl_Bernoulli(μ‖A) (3), the price paid in distance from
the base model, and KL(p*‖p_β) = −log μ (4), the distance left to the filtered model p* = a·v/A.

Users name μ (a validity they can read off a dashboard) instead of β (whose meaning depends on A).
A(x) differs across prompts, so one β for a batch solves mean_x μ_x(β) = μ (`batch_beta_from_validity`);
A(x) itself is estimated from samples (`estimate_base_validity`) and smoothed per prompt across steps
(`ValidityTracker`); `BetaController` turns those into a bounded β each step, optionally with a
proportional–integral correction on the observed validity.

Numbers: inputs are floats, numpy arrays or torch tensors; computations run in float64 torch and
results come back as a float for scalar inputs, else a tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from filtered_rl.divergences import group_log_partition

Number = float | int | torch.Tensor | Any  # Any: numpy arrays and scalars


def _to_tensor(value: Number, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if torch.isnan(tensor).any():
        raise ValueError(f"{name} contains NaN; pass a number in the valid range (see the docstring)")
    return tensor


def _is_scalar_input(*values: Number) -> bool:
    return all(isinstance(v, int | float) or getattr(v, "ndim", 1) == 0 for v in values)


def _out(result: torch.Tensor, *inputs: Number) -> float | torch.Tensor:
    return float(result) if _is_scalar_input(*inputs) else result


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def _check_base_validity(base_validity: torch.Tensor, name: str = "base_validity") -> None:
    if ((base_validity <= 0) | (base_validity >= 1)).any():
        bad = base_validity[(base_validity <= 0) | (base_validity >= 1)].flatten()[:5].tolist()
        raise ValueError(
            f"{name} must lie strictly in (0, 1), got {bad}: with A = 0 no β makes a valid sample and with "
            "A = 1 every β gives validity 1. Estimate A from more samples, smooth it across steps "
            "(ValidityTracker), or pass strict=False to map such prompts to β = inf (no tilt)"
        )


def _check_target_validity(mu: torch.Tensor, name: str = "target_validity") -> None:
    if ((mu <= 0) | (mu >= 1)).any():
        bad = mu[(mu <= 0) | (mu >= 1)].flatten()[:5].tolist()
        raise ValueError(
            f"{name} (μ) must lie strictly in (0, 1), got {bad}: μ → 1 is the filtered model itself "
            "(β → 0; use target='filtered'), μ ≤ 0 is no target. Pick e.g. target_validity=0.9"
        )


def validity_from_beta(beta: Number, base_validity: Number) -> float | torch.Tensor:
    """Validity μ of the tilted model p_β on a prompt of base validity A, eq. (1): σ(logit A + 1/β).

    β = inf gives A (the base model); A ∈ {0, 1} gives A for every β.
    """
    b, a = _to_tensor(beta, "beta"), _to_tensor(base_validity, "base_validity")
    if (b <= 0).any():
        raise ValueError(f"beta must be > 0, got {b[b <= 0].flatten()[:5].tolist()}")
    if ((a < 0) | (a > 1)).any():
        raise ValueError("base_validity must lie in [0, 1]")
    inner = torch.where((a > 0) & (a < 1), a, torch.full_like(a, 0.5))
    mu = torch.sigmoid(_logit(inner) + 1.0 / b)
    mu = torch.where((a > 0) & (a < 1), mu, a)
    return _out(mu, beta, base_validity)


def beta_from_validity(mu: Number, base_validity: Number, *, strict: bool = True) -> float | torch.Tensor:
    """KL coefficient β at which the tilted model reaches validity μ on a prompt of base validity A, eq. (2).

    Broadcasts over tensors/arrays. With `strict` (default) a target the tilt cannot reach raises a
    ValueError: μ ≤ A (the base model already meets the target), A ∈ {0, 1}. With `strict=False` those
    elements get β = inf, i.e. p_β = a (no tilt) on that prompt — what a per-prompt trainer wants for a
    group that is all-valid, all-invalid or already above target. μ ∉ (0, 1) and NaN always raise.
    """
    m, a = _to_tensor(mu, "target_validity"), _to_tensor(base_validity, "base_validity")
    _check_target_validity(m)
    if ((a < 0) | (a > 1)).any():
        raise ValueError("base_validity must lie in [0, 1]")
    m, a = torch.broadcast_tensors(m, a)
    solvable = (a > 0) & (a < 1) & (m > a)
    if strict and not solvable.all():
        _check_base_validity(a)
        bad = torch.stack([m[~solvable], a[~solvable]], dim=-1)[:5].tolist()
        raise ValueError(
            f"target_validity μ must exceed the base validity A for a positive β, got (μ, A) = {bad}: the base "
            "model already meets this target. Raise target_validity, or pass strict=False to get β = inf (no "
            "KL pull needed)"
        )
    safe_a = torch.where(solvable, a, torch.full_like(a, 0.5))
    safe_m = torch.where(solvable, m, torch.full_like(m, 0.75))
    beta = 1.0 / (_logit(safe_m) - _logit(safe_a))
    beta = torch.where(solvable, beta, torch.full_like(beta, math.inf))
    return _out(beta, mu, base_validity)


def batch_beta_from_validity(mu: float, base_validities: Number, *, strict: bool = True) -> float:
    """One β for a batch of prompts: the root of mean_x μ_x(β) = μ, μ_x from eq. (1).

    Prompts with A(x) = 0 or 1 are left out of the mean: the tilt leaves their validity at 0 or 1 for
    every β, so they say nothing about β, and keeping the A = 0 ones would make high targets
    unreachable (μ ≤ fraction of prompts with A > 0). The target is therefore the mean validity over
    prompts the base model sometimes, but not always, solves. If no such prompt remains, or μ ≤ the mean
    A of the rest, a ValueError is raised (`strict=False`: β = inf).

    mean_x σ(logit A_x + s) is increasing in s = 1/β, so the root is bracketed and found by Newton's
    method on t = log s (uniform relative precision in β), falling back to bisection whenever a Newton
    step leaves the bracket:
    s ≥ max(4(μ − Ā), min_x(logit μ − logit A_x)) since σ' ≤ 1/4 and no prompt can exceed μ there,
    s ≤ max_x(logit μ − logit A_x) since every prompt reaches μ there.
    """
    m = _to_tensor(mu, "target_validity")
    if m.numel() != 1:
        raise ValueError("target_validity must be a single number for batch_beta_from_validity")
    _check_target_validity(m)
    a = _to_tensor(base_validities, "base_validities").flatten()
    if ((a < 0) | (a > 1)).any():
        raise ValueError("base_validities must lie in [0, 1]")
    a = a[(a > 0) & (a < 1)].numpy()
    target = float(m)
    if a.size == 0 or target <= a.mean():
        if not strict:
            return math.inf
        if a.size == 0:
            raise ValueError(
                "base_validities has no prompt with 0 < A < 1, so β is undetermined; estimate A from more "
                "samples or smooth it across steps (ValidityTracker), or pass strict=False (β = inf)"
            )
        raise ValueError(
            f"target_validity μ={target:.4g} must exceed the batch's mean base validity "
            f"{a.mean():.4g} for a positive β; raise target_validity or pass strict=False (β = inf)"
        )
    logit_a = np.log(a) - np.log1p(-a)
    gaps = math.log(target) - math.log1p(-target) - logit_a
    lo = math.log(max(4.0 * (target - a.mean()), gaps.min(), 1e-300))
    hi = math.log(gaps.max())

    def excess(t: float) -> tuple[float, float]:
        # mean validity at s = e^t minus μ (via 1 − σ when μ > ½, to keep precision near 1), and d/dt.
        z = logit_a + math.exp(t)
        valid, invalid = np.exp(-np.logaddexp(0.0, -z)), np.exp(-np.logaddexp(0.0, z))
        value = (1.0 - target) - invalid.mean() if target > 0.5 else valid.mean() - target
        return value, math.exp(t) * float((valid * invalid).mean())

    t = 0.5 * (lo + hi)
    for _ in range(200):
        value, slope = excess(t)
        if value == 0.0:
            break
        lo, hi = (t, hi) if value < 0 else (lo, t)
        newton = t - value / slope if slope > 0 else math.nan
        t_next = newton if lo < newton < hi else 0.5 * (lo + hi)
        if abs(t_next - t) < 1e-14 * max(1.0, abs(t)) or hi - lo < 1e-14 * max(1.0, abs(t)):
            t = t_next
            break
        t = t_next
    return math.exp(-t)


def kl_tilted_to_base(mu: Number, base_validity: Number) -> float | torch.Tensor:
    """KL(p_β‖a) = kl_Bernoulli(μ‖A), eq. (3): the cost, in nats, of raising validity from A to μ."""
    m, a = _to_tensor(mu, "mu"), _to_tensor(base_validity, "base_validity")
    if ((m < 0) | (m > 1)).any():
        raise ValueError("mu must lie in [0, 1]")
    _check_base_validity(a)
    kl = torch.xlogy(m, m) - m * torch.log(a) + torch.xlogy(1 - m, 1 - m) - (1 - m) * torch.log1p(-a)
    return _out(kl, mu, base_validity)


def kl_filtered_to_tilted(mu: Number) -> float | torch.Tensor:
    """KL(p*‖p_β) = −log μ, eq. (4): p_β is p* rescaled by 1/μ on valid samples, independent of A."""
    m = _to_tensor(mu, "mu")
    if ((m <= 0) | (m > 1)).any():
        raise ValueError("mu must lie in (0, 1]; at μ = 0 the tilted model has no valid sample (KL = inf)")
    return _out(-torch.log(m), mu)


# ----------------------------------------------------------------------------------------------------
# Estimating A(x)


def estimate_base_validity(
    valid: torch.Tensor,
    group_size: int,
    log_ref: torch.Tensor | None = None,
    log_pi_old: torch.Tensor | None = None,
    *,
    self_normalised: bool = False,
) -> torch.Tensor:
    """Per-group estimate of A(x) from K = `group_size` consecutive samples per prompt.

    Without log-probs the samples are taken to come from the base model: Â = mean v.

    With the sequence log-probs of the reference (`log_ref`) and of the sampling policy
    (`log_pi_old`), the samples come from π_old and are importance-weighted by w = a/π_old:
    Â = (1/K) Σ w_i v_i, i.e. exp of `divergences.group_log_partition(log a + log v, log π_old)`,
    unbiased because a and π_old are both normalised over completions. It is clipped to [0, 1].
    Near the tilted model (π ≈ p_β, so w ≈ Z·e^{−v/β}) the weights are almost constant within each
    class and the estimate is accurate even for a group whose K samples are all valid — which is why it
    is the default: the self-normalised Σ w_i v_i / Σ w_i (`self_normalised=True`, lower variance far
    from p_β) is exactly 1 on such a group and 0 on an all-invalid one, whatever the weights.
    TRL's log-probs are temperature-scaled, so "a" is the base model at the sampling temperature.
    """
    valid = valid.detach().double().flatten()
    if valid.numel() % group_size:
        raise ValueError(f"{valid.numel()} verdicts do not split into groups of group_size={group_size}")
    if log_ref is None and log_pi_old is None:
        return valid.view(-1, group_size).mean(dim=1)
    if log_ref is None or log_pi_old is None:
        raise ValueError(
            "importance-weighted estimation needs both log_ref and log_pi_old (sequence log-probs)"
        )
    log_ref, log_pi_old = log_ref.detach().double().flatten(), log_pi_old.detach().double().flatten()
    log_valid_ref = torch.where(valid > 0, log_ref, torch.full_like(log_ref, -math.inf))
    log_estimate = group_log_partition(log_valid_ref, log_pi_old, group_size)
    if self_normalised:
        log_estimate = log_estimate - group_log_partition(log_ref, log_pi_old, group_size)
    return log_estimate.exp().clamp(max=1.0)


def prompt_key(prompt: Any) -> str:
    """A stable id for a prompt (text or chat messages): same across processes, restarts and epochs."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class ValidityTracker:
    """Exponential moving average of A(x) per prompt key, across the epochs in which a prompt recurs.

    The first observations are averaged with weight 1/n, then with weight 1 − decay, so a prompt seen
    once gets its raw estimate and a prompt seen often gets a memory of ≈ 1/(1 − decay) visits.
    Estimates of exactly 0 or 1 are kept: they mean "no valid / no invalid sample seen yet" and
    averaging with later visits moves them inside (0, 1). `max_prompts` bounds memory (oldest dropped).
    """

    def __init__(self, decay: float = 0.9, max_prompts: int = 1_000_000):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.decay, self.max_prompts = decay, max_prompts
        self.values: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def update(self, keys: list[str], estimates: Number) -> torch.Tensor:
        """Fold one estimate per key in; return the smoothed A for these keys (same order)."""
        estimates = _to_tensor(estimates, "estimates").flatten().tolist()
        if len(estimates) != len(keys):
            raise ValueError(f"got {len(keys)} keys and {len(estimates)} estimates")
        out = []
        for key, estimate in zip(keys, estimates):
            value, count = self.values.pop(key, (0.0, 0))
            weight = max(1.0 / (count + 1), 1.0 - self.decay)
            value = value + weight * (estimate - value)
            self.values[key] = (value, count + 1)
            out.append(value)
        while len(self.values) > self.max_prompts:
            self.values.popitem(last=False)
        return torch.tensor(out, dtype=torch.float64)

    def get(self, key: str) -> float | None:
        entry = self.values.get(key)
        return None if entry is None else entry[0]

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "values": {k: list(v) for k, v in self.values.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state.get("decay", self.decay)
        self.values = OrderedDict((k, (float(v[0]), int(v[1]))) for k, v in state["values"].items())


# ----------------------------------------------------------------------------------------------------
# The controller

CONTROLLER_STATE_FORMAT = 2  # 1: filtered-rl 0.1 (PI on log β); its integral has other units and is reset


@dataclass
class BetaControllerConfig:
    """How β follows the target validity.

    The open loop is eq. (2) on the smoothed A(x) of the batch (`batch_beta_from_validity`): exact when the
    policy reaches p_β, which it does with the KL in the reward (RLOO, `grpo_klr`). The closed loop corrects
    what the open loop cannot know (a biased A estimate, a policy that cannot reach p_β) from the observed
    validity. It acts on the *tilt* s = 1/β, because at the optimum logit V = logit A + s (eq. 1): a change
    c of the tilt moves the equilibrium's logit validity by exactly c, whatever A, μ and β, so one set of
    gains is stable everywhere. (On log β the same loop would have gain −1/β, 10× larger at β = 0.1 than
    at β = 1.) β = 1/(1/β_open + c).

    target_validity: μ, the validity of p_β averaged over the batch's prompts with 0 < A < 1.
    closed_loop: add the correction c, a proportional–integral term on the validity error.
    kp: proportional gain, tilt per unit of error. The error is e = (μ − V)/(μ(1 − μ)), the logit error
      to first order (finite and unbiased for a sampled V of 0 or 1).
    ki: integral gain per generation. With a policy that follows its equilibrium with a lag of τ
      generations, the loop τ·x'' + (1 + kp)·x' + ki·x = 0 is damped for ki < (1 + kp)²/(4τ); the defaults
      are damped up to τ ≈ 15 generations, and for slower policies `integral_band` and the rate limit keep
      the overshoot small. kp is small on purpose: the observed validity is noisy, and a proportional
      term passes that noise straight into β (kp = 0.5 doubled the jitter of the validity in simulation).
    max_error: clip of e per generation (a validity of 0 or 1 says little about how far off it is).
    observation_decay: exponential average of the observed validity over generations (16 samples a prompt
      give a standard error of ~0.12), used by the proportional term and the gates.
    integral_band, settle_tolerance: the integral accumulates only while the averaged |e| ≤ integral_band,
      or once the validity has settled (its average over the last ~1/(1 − observation_decay) generations
      and over 4× as many differ by ≤ settle_tolerance in e), so not during the approach from A to μ: there
      the error is large and transient (the policy lags), and integrating it would overshoot later. A
      steady error outside the band (the open loop far off) is integrated once it is steady.
    max_correction: |c| ≤ this (tilt units: logit of validity); the integral is held inside too.
    max_step: |c_t − c_{t−1}| ≤ this per generation (a rate limit: the policy needs time to respond, and a
      correction that jumps faster than that only adds overshoot).
    beta_min, beta_max: β is clamped into this range; beta_max is used when the target is already met.

    Anti-windup: the integral does not move while the correction is held by a bound or by the rate limit in
    the error's direction, and is never negative (weakening the pull) while the observed validity is below
    the base validity: a policy under its base model needs more tilt, never less.
    """

    target_validity: float
    closed_loop: bool = False
    kp: float = 0.1
    ki: float = 0.02
    max_error: float = 2.0
    observation_decay: float = 0.9
    integral_band: float = 0.5
    settle_tolerance: float = 0.25
    max_correction: float = 1.5
    max_step: float = 0.05
    beta_min: float = 1e-3
    beta_max: float = 10.0

    def __post_init__(self) -> None:
        _check_target_validity(torch.tensor(float(self.target_validity)))
        if not 0 < self.beta_min < self.beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {self.beta_min}, {self.beta_max}")
        for name in ("kp", "ki", "max_correction"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 0")
        for name in ("max_error", "integral_band", "settle_tolerance", "max_step"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0 <= self.observation_decay < 1:
            raise ValueError(f"observation_decay={self.observation_decay} must lie in [0, 1)")


class BetaController:
    """β each generation: open loop from eq. (2) on the smoothed A of the batch, then an optional bounded,
    rate-limited PI correction of the tilt 1/β (see `BetaControllerConfig`)."""

    def __init__(self, config: BetaControllerConfig):
        self.config = config
        self.integral = 0.0
        self.open_loop_beta = config.beta_max  # until a batch with an informative prompt arrives
        self.correction = 0.0
        self.observed = math.nan  # averaged observed validity (memory ~1/(1 − observation_decay))
        self.observed_slow = math.nan  # the same over 4× as many generations
        self.updates = 0  # closed-loop updates so far
        self.beta = config.beta_max

    def error(self, validity: float) -> float:
        """e = (μ − V)/(μ(1 − μ)): the logit error logit μ − logit V to first order, clipped to ±max_error."""
        cfg = self.config
        mu = cfg.target_validity
        return min(max((mu - validity) / (mu * (1.0 - mu)), -cfg.max_error), cfg.max_error)

    def step(self, base_validities: Number, observed_validity: float | None = None) -> float:
        """Update and return β from this batch's per-prompt A estimates and the policy's observed validity.

        A batch with no prompt of 0 < A < 1 carries no information on β: the open-loop β is kept. A batch
        whose mean A already meets the target gets beta_max (the weakest pull allowed).
        """
        cfg = self.config
        a = _to_tensor(base_validities, "base_validities").flatten()
        informative = a[(a > 0) & (a < 1)]
        if informative.numel():
            beta = batch_beta_from_validity(cfg.target_validity, informative, strict=False)
            self.open_loop_beta = min(max(beta, cfg.beta_min), cfg.beta_max)
        tilt = 1.0 / self.open_loop_beta
        if cfg.closed_loop and observed_validity is not None and math.isfinite(observed_validity):
            self._update_correction(
                float(observed_validity), float(informative.mean()) if informative.numel() else None
            )
            tilt += self.correction
        self.beta = cfg.beta_max if tilt <= 0 else min(max(1.0 / tilt, cfg.beta_min), cfg.beta_max)
        return self.beta

    def _update_correction(self, observed: float, base_validity: float | None) -> None:
        cfg = self.config
        fast = cfg.observation_decay
        slow = 1.0 - (1.0 - fast) / 4.0
        first = math.isnan(self.observed)
        self.observed = observed if first else fast * self.observed + (1 - fast) * observed
        self.observed_slow = observed if first else slow * self.observed_slow + (1 - slow) * observed
        self.updates += 1
        smooth_error = self.error(self.observed)
        warmed_up = self.updates >= 1.0 / (1.0 - slow)
        settled = warmed_up and abs(smooth_error - self.error(self.observed_slow)) <= cfg.settle_tolerance
        below_base = base_validity is not None and self.observed < base_validity
        previous = self.correction
        # Integral of the raw (unbiased) error, near the target or once settled (not during the approach).
        integral = self.integral
        if cfg.ki > 0 and (abs(smooth_error) <= cfg.integral_band or settled):
            integral = min(
                max(integral + cfg.ki * self.error(observed), -cfg.max_correction), cfg.max_correction
            )
        if below_base:
            integral = max(integral, 0.0)
        wanted = cfg.kp * smooth_error + integral
        low, high = (
            max(previous - cfg.max_step, -cfg.max_correction),
            min(previous + cfg.max_step, cfg.max_correction),
        )
        if below_base:  # never a weaker pull than the open loop while under the base validity (no rate limit)
            low, high = max(low, 0.0), max(high, 0.0)
        correction = min(max(wanted, low), high)
        held = correction != wanted and (wanted > correction) == (integral > self.integral)
        # Conditional integration (anti-windup): an integral step the bounds or the rate limit swallowed
        # is not kept, so the integral never grows beyond what is applied.
        self.integral = self.integral if held and not below_base else integral
        self.correction = correction

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CONTROLLER_STATE_FORMAT,
            "integral": self.integral,
            "open_loop_beta": self.open_loop_beta,
            "correction": self.correction,
            "observed": self.observed,
            "observed_slow": self.observed_slow,
            "updates": self.updates,
            "beta": self.beta,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.open_loop_beta = float(state["open_loop_beta"])
        self.beta = float(state["beta"])
        if state.get("format", 1) < CONTROLLER_STATE_FORMAT:
            # The 0.1 controller's integral and correction were in log β: start the correction afresh.
            self.integral, self.correction = 0.0, 0.0
            self.observed = self.observed_slow = math.nan
            self.updates = 0
            return
        self.integral = float(state["integral"])
        self.correction = float(state["correction"])
        self.observed = float(state["observed"])
        self.observed_slow = float(state["observed_slow"])
        self.updates = int(state["updates"])


def beta_table(
    base_validities: tuple[float, ...] = (0.01, 0.1, 0.3, 0.5),
    targets: tuple[float, ...] = (0.5, 0.8, 0.9, 0.99),
) -> str:
    """Markdown table of β = 1/(logit μ − logit A) with KL(p_β‖a) in nats ("—" where μ ≤ A)."""
    lines = [
        "| A ↓  μ → | " + " | ".join(f"{m:g}" for m in targets) + " |",
        "|---" * (len(targets) + 1) + "|",
    ]
    for a in base_validities:
        cells = []
        for m in targets:
            cells.append("—" if m <= a else f"{beta_from_validity(m, a):.3g} ({kl_tilted_to_base(m, a):.2f})")
        lines.append(f"| {a:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(beta_table())

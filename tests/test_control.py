"""β-from-μ math against exact enumeration, brute force, and an exactly solvable KL-control problem."""

import math

import numpy as np
import pytest
import torch

from filtered_rl.control import (
    BetaController,
    BetaControllerConfig,
    ValidityTracker,
    batch_beta_from_validity,
    beta_from_validity,
    beta_table,
    estimate_base_validity,
    kl_filtered_to_tilted,
    kl_tilted_to_base,
    prompt_key,
    validity_from_beta,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: a second thread only adds contention on a shared 2-core machine (60x slower here).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def toy(seed: int, size: int = 16):
    """A base distribution a over `size` outcomes and a binary verifier v with 0 < A < 1."""
    g = torch.Generator().manual_seed(seed)
    log_a = torch.log_softmax(2.0 * torch.randn(size, generator=g, dtype=torch.float64), 0)
    v = (torch.rand(size, generator=g, dtype=torch.float64) < 0.4).double()
    v[0], v[1] = 1.0, 0.0
    return log_a, v


def tilted(log_a, v, beta):
    return torch.log_softmax(log_a + v / beta, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.05, 0.3, 1.0, 7.0])
def test_formulas_match_enumeration(seed, beta):
    log_a, v = toy(seed)
    base = float((log_a.exp() * v).sum())
    log_p = tilted(log_a, v, beta)
    mu = float((log_p.exp() * v).sum())
    assert validity_from_beta(beta, base) == pytest.approx(mu, rel=1e-10)
    assert beta_from_validity(mu, base) == pytest.approx(beta, rel=1e-8)
    kl_tilted_base = float((log_p.exp() * (log_p - log_a)).sum())
    assert kl_tilted_to_base(mu, base) == pytest.approx(kl_tilted_base, rel=1e-8, abs=1e-12)
    log_filtered = torch.where(v > 0, log_a - math.log(base), torch.full_like(log_a, -math.inf))
    filtered = log_filtered.exp()
    kl_filtered_tilted = float((filtered * torch.where(v > 0, log_filtered - log_p, 0.0)).sum())
    assert kl_filtered_to_tilted(mu) == pytest.approx(kl_filtered_tilted, rel=1e-8)


def test_inputs_as_floats_arrays_and_tensors():
    mu, base = [0.6, 0.9, 0.99], [0.5, 0.2, 0.01]
    as_float = [beta_from_validity(m, a) for m, a in zip(mu, base)]
    assert all(isinstance(b, float) and b > 0 for b in as_float)
    as_tensor = beta_from_validity(torch.tensor(mu), torch.tensor(base))
    as_array = beta_from_validity(np.array(mu), np.array(base))
    assert torch.allclose(as_tensor, torch.tensor(as_float, dtype=torch.float64))
    assert torch.allclose(as_array, as_tensor)
    broadcast = beta_from_validity(0.9, torch.tensor(base))
    assert broadcast.shape == (3,) and float(broadcast[1]) == pytest.approx(as_float[1])
    back = validity_from_beta(as_tensor, torch.tensor(base))
    assert torch.allclose(back, torch.tensor(mu, dtype=torch.float64))


def test_extreme_values_are_stable():
    # logit space keeps tiny A and μ near 1 finite (no 1 − μ cancellation to 0).
    mu, base = 1 - 1e-12, 1e-12  # 1 − mu is exact in floating point (Sterbenz)
    beta = beta_from_validity(mu, base)
    assert beta == pytest.approx(1 / (math.log(mu / (1 - mu)) - math.log(base / (1 - base))), rel=1e-12)
    assert validity_from_beta(beta, base) == pytest.approx(mu, abs=1e-15)
    assert batch_beta_from_validity(mu, [base]) == pytest.approx(beta, rel=1e-10)
    assert kl_tilted_to_base(1.0, 0.25) == pytest.approx(math.log(4))  # μ = 1: KL(p*‖a) = −log A
    assert validity_from_beta(math.inf, 0.3) == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("mu", "base", "match"),
    [
        (0.2, 0.3, "must exceed the base validity"),
        (0.3, 0.3, "must exceed the base validity"),
        (1.0, 0.3, "target_validity .* strictly in \\(0, 1\\).*target='filtered'"),
        (1.5, 0.3, "target_validity"),
        (0.0, 0.3, "target_validity"),
        (0.9, 0.0, "base_validity must lie strictly in \\(0, 1\\)"),
        (0.9, 1.0, "base_validity must lie strictly in \\(0, 1\\)"),
        (math.nan, 0.3, "target_validity contains NaN"),
        (0.9, math.nan, "base_validity contains NaN"),
    ],
)
def test_beta_from_validity_errors(mu, base, match):
    with pytest.raises(ValueError, match=match):
        beta_from_validity(mu, base)


def test_non_strict_maps_unreachable_prompts_to_no_tilt():
    beta = beta_from_validity(0.8, torch.tensor([0.5, 0.0, 1.0, 0.9]), strict=False)
    assert beta[0] == pytest.approx(beta_from_validity(0.8, 0.5))
    assert torch.isinf(beta[1:]).all()
    with pytest.raises(ValueError, match="target_validity"):
        beta_from_validity(1.0, 0.5, strict=False)  # a bad target is always an error


def test_other_errors():
    with pytest.raises(ValueError, match="beta must be > 0"):
        validity_from_beta(0.0, 0.5)
    with pytest.raises(ValueError, match="base_validity"):
        kl_tilted_to_base(0.5, 0.0)
    with pytest.raises(ValueError, match="mu must lie in \\(0, 1\\]"):
        kl_filtered_to_tilted(0.0)
    with pytest.raises(ValueError, match="no prompt with 0 < A < 1"):
        batch_beta_from_validity(0.8, [0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="mean base validity"):
        batch_beta_from_validity(0.3, [0.2, 0.6])
    with pytest.raises(ValueError, match="target_validity contains NaN"):
        batch_beta_from_validity(math.nan, [0.2, 0.6])
    assert batch_beta_from_validity(0.3, [0.2, 0.6], strict=False) == math.inf


@pytest.mark.parametrize("seed", range(4))
def test_batch_beta_against_dense_grid(seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(int(torch.randint(1, 30, (1,), generator=g)), generator=g, dtype=torch.float64) ** 2
    base = base.clamp(1e-4, 1 - 1e-4)
    mu = float(
        base.mean() + (1 - base.mean()) * torch.rand(1, generator=g, dtype=torch.float64).clamp(0.05, 0.98)
    )
    beta = batch_beta_from_validity(mu, base)
    grid = torch.logspace(-3, 3, 200_001, dtype=torch.float64)
    validity = torch.sigmoid(torch.log(base / (1 - base))[None, :] + 1 / grid[:, None]).mean(dim=1)
    brute = float(grid[(validity - mu).abs().argmin()])
    assert beta == pytest.approx(brute, rel=2e-4)  # grid spacing is 6.9e-5 in relative terms
    assert float(validity_from_beta(beta, base).mean()) == pytest.approx(mu, abs=1e-9)


def test_batch_beta_single_prompt_and_degenerate_prompts():
    assert batch_beta_from_validity(0.9, [0.3]) == pytest.approx(beta_from_validity(0.9, 0.3), rel=1e-9)
    # A = 0 or 1 prompts are left out of the mean: same β as without them.
    with_degenerate = batch_beta_from_validity(0.7, [0.1, 0.0, 0.4, 1.0, 0.0])
    assert with_degenerate == pytest.approx(batch_beta_from_validity(0.7, [0.1, 0.4]), rel=1e-12)


def test_estimate_base_validity_plain_and_importance_weighted():
    valid = torch.tensor([1, 0, 0, 1, 1, 1, 0, 0], dtype=torch.float64)
    assert estimate_base_validity(valid, 4).tolist() == [0.5, 0.5]

    # The whole support once, "sampled" from a uniform π_old: (1/K) Σ a_i v_i / (1/K) = A exactly.
    log_a, v = toy(3)
    uniform = torch.full_like(log_a, -math.log(len(log_a)))
    exact = float((log_a.exp() * v).sum())
    assert float(estimate_base_validity(v, len(v), log_a, uniform)) == pytest.approx(exact, rel=1e-12)
    self_normalised = estimate_base_validity(v, len(v), log_a, uniform, self_normalised=True)
    assert float(self_normalised) == pytest.approx(exact, rel=1e-12)

    # Monte Carlo from a policy far from a (the tilted model): unbiased, close with many samples.
    log_pi = tilted(log_a, v, 0.3)
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(log_pi.exp(), 40_000, replacement=True, generator=g)
    estimate = estimate_base_validity(v[draws], 40_000, log_a[draws], log_pi[draws])
    assert float(estimate) == pytest.approx(exact, abs=0.01)
    # An all-valid group still yields A/μ-scaled information, not 1.
    valid_only = draws[v[draws] > 0][:8]
    assert float(estimate_base_validity(v[valid_only], 8, log_a[valid_only], log_pi[valid_only])) < 0.99
    assert (
        float(
            estimate_base_validity(
                v[valid_only], 8, log_a[valid_only], log_pi[valid_only], self_normalised=True
            )
        )
        == 1.0
    )

    with pytest.raises(ValueError, match="group_size=3"):
        estimate_base_validity(valid, 3)
    with pytest.raises(ValueError, match="both log_ref and log_pi_old"):
        estimate_base_validity(valid, 4, log_ref=torch.zeros(8))


def test_validity_tracker_smooths_per_prompt_and_round_trips():
    tracker = ValidityTracker(decay=0.5, max_prompts=3)
    assert tracker.update(["a", "b"], [0.0, 1.0]).tolist() == [0.0, 1.0]  # first visit: raw
    assert tracker.update(["a"], [1.0]).tolist() == [0.5]  # second visit: running mean (1/n = 1/2)
    assert tracker.update(["a"], [1.0]).tolist() == [0.75]  # then weight 1 − decay = 1/2
    restored = ValidityTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.get("a") == 0.75 and restored.get("b") == 1.0 and restored.decay == 0.5
    assert restored.update(["a"], [0.0]).tolist() == [0.375]
    tracker.update(["c", "d"], [0.2, 0.2])  # over max_prompts: the least recently seen ("b") goes
    assert tracker.get("b") is None and tracker.get("a") == 0.75
    with pytest.raises(ValueError, match="decay"):
        ValidityTracker(decay=1.0)


def test_prompt_key_is_stable_and_distinguishes():
    chat = [{"role": "user", "content": "make 24 with 3 5 7 9:"}]
    assert prompt_key(chat) == prompt_key([dict(reversed(list(chat[0].items())))])
    assert prompt_key("make 24 with 3 5 7 9:") != prompt_key(chat)
    assert prompt_key("x") == prompt_key("x") and prompt_key("x") != prompt_key("y")
    assert len(prompt_key("x")) == 16


def test_controller_open_loop_bounds_and_state():
    controller = BetaController(BetaControllerConfig(target_validity=0.8, beta_min=0.05, beta_max=5.0))
    base = torch.tensor([0.1, 0.4, 0.6])
    assert controller.step(base) == pytest.approx(batch_beta_from_validity(0.8, base))
    assert controller.step([0.0, 1.0]) == pytest.approx(batch_beta_from_validity(0.8, base))  # no info: kept
    assert controller.step([0.85, 0.9]) == pytest.approx(5.0)  # target already met: weakest pull allowed
    assert controller.step([1e-12]) == pytest.approx(0.05)  # needs β ≈ 0.035: clamped to beta_min
    with pytest.raises(ValueError, match="target_validity"):
        BetaControllerConfig(target_validity=1.0)
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        BetaControllerConfig(target_validity=0.5, beta_min=1.0, beta_max=0.5)


def test_controller_closed_loop_direction_rate_limit_and_bounds():
    config = BetaControllerConfig(target_validity=0.8, closed_loop=True)
    controller = BetaController(config)
    base = [0.3, 0.5]
    open_loop = batch_beta_from_validity(0.8, base)
    low = controller.step(base, observed_validity=0.7)  # below target: smaller β (stronger tilt)
    assert low < open_loop
    # The correction acts on the tilt 1/β and moves at most max_step per generation.
    assert 1 / low - 1 / open_loop == pytest.approx(config.max_step)
    tilts = [1 / controller.step(base, observed_validity=0.0) - 1 / open_loop for _ in range(30)]
    assert all(b - a <= config.max_step + 1e-12 for a, b in zip(tilts, tilts[1:]))
    # Far from the target (outside integral_band) and not yet settled, the integral stays 0:
    # proportional only, kp·max_error.
    assert controller.integral == 0.0
    assert tilts[-1] == pytest.approx(config.kp * config.max_error)
    # A steady error, however large, is integrated once it is steady, up to the bound.
    for _ in range(200):
        controller.step(base, observed_validity=0.0)
    assert controller.correction == pytest.approx(config.max_correction)
    assert 0 < controller.integral <= config.max_correction
    # Above target the correction comes back down (at the same rate) and past zero: β above open loop.
    for _ in range(300):
        controller.step(base, observed_validity=0.99)
    assert controller.beta > open_loop and controller.correction < 0
    with pytest.raises(ValueError, match="max_step"):
        BetaControllerConfig(target_validity=0.8, max_step=0.0)
    with pytest.raises(ValueError, match="observation_decay"):
        BetaControllerConfig(target_validity=0.8, observation_decay=1.0)


def test_controller_integral_near_target_anti_windup_and_state():
    config = BetaControllerConfig(target_validity=0.6, closed_loop=True, ki=0.1, max_correction=0.3)
    controller = BetaController(config)
    base = [0.2]
    # Slightly below target (inside integral_band) for long: the integral grows until the correction
    # reaches its bound, then stops (it never holds more than the bound allows).
    for _ in range(200):
        controller.step(base, observed_validity=0.55)
    assert controller.correction == pytest.approx(0.3)
    held = controller.integral
    assert 0 < held <= 0.3 + 1e-12
    for _ in range(50):
        controller.step(base, observed_validity=0.55)
    assert controller.integral == pytest.approx(held)
    # Round trip through a checkpoint.
    twin = BetaController(config)
    twin.load_state_dict(controller.state_dict())
    assert twin.step(base, 0.62) == pytest.approx(controller.step(base, 0.62))
    # A 0.1 checkpoint (integral in log β) keeps its β but restarts the correction.
    legacy = {"integral": 5.0, "open_loop_beta": 0.4, "correction": -1.0, "beta": 0.3}
    twin.load_state_dict(legacy)
    assert (twin.integral, twin.correction, twin.beta) == (0.0, 0.0, 0.3)


def test_controller_does_not_integrate_the_approach():
    """While the policy climbs from A to μ the error is transient: integrating it would overshoot later."""
    controller = BetaController(BetaControllerConfig(target_validity=0.6, closed_loop=True))
    ramp = [0.2 + 0.4 * min(t / 40, 1.0) for t in range(40)]  # the policy approaching the target
    for validity in ramp:
        controller.step([0.2], observed_validity=validity)
        if abs(controller.error(controller.observed)) > controller.config.integral_band:
            assert controller.integral == 0.0
    assert controller.integral < 0.1


def test_controller_never_weakens_the_pull_below_the_base_validity():
    """A policy under its base validity needs more tilt: a negative integral (wound up while above μ) is
    dropped at once and the correction is never negative there."""
    controller = BetaController(BetaControllerConfig(target_validity=0.6, closed_loop=True, ki=0.2))
    base = [0.2]
    for _ in range(100):  # long above target, inside the band: the integral goes negative
        controller.step(base, observed_validity=0.68)
    assert controller.integral < 0 and controller.correction < 0
    for _ in range(20):  # then the policy collapses below A
        beta = controller.step(base, observed_validity=0.05)
        if controller.observed < 0.2:
            assert controller.integral >= 0 and controller.correction >= 0
            assert beta <= batch_beta_from_validity(0.6, base) + 1e-12
    assert controller.observed < 0.2


def _exact_kl_control(log_a, v, betas_for, steps, lr=0.1):
    """Gradient ascent on Σ_x E_π[v] − β KL(π‖a) for a tabular softmax policy; β from `betas_for(π)`."""
    theta = log_a.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    for step in range(steps):
        log_pi = torch.log_softmax(theta, dim=1)
        beta = betas_for(log_pi.detach(), step)
        pi = log_pi.exp()
        objective = (pi * v).sum(1) - beta * (pi * (log_pi - log_a)).sum(1)
        optimizer.zero_grad()
        (-objective.sum()).backward()
        optimizer.step()
    log_pi = torch.log_softmax(theta.detach(), dim=1)
    return (log_pi.exp() * v).sum(1)


def _toy_prompts(num_prompts=5, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_a = torch.log_softmax(1.5 * torch.randn(num_prompts, size, generator=g, dtype=torch.float64), 1)
    v = (torch.rand(num_prompts, size, generator=g, dtype=torch.float64) < 0.25).double()
    v[:, 0], v[:, 1] = 1.0, 0.0
    base = (log_a.exp() * v).sum(1)
    return log_a, v, base


@pytest.mark.parametrize("mu", [0.5, 0.75, 0.9])
def test_exact_kl_control_reaches_target_with_exact_base_validity(mu):
    log_a, v, base = _toy_prompts()
    assert float(base.mean()) < mu
    controller = BetaController(BetaControllerConfig(target_validity=mu))
    beta = controller.step(base)
    validity = _exact_kl_control(log_a, v, lambda log_pi, step: beta, steps=600)
    assert float(validity.mean()) == pytest.approx(mu, abs=0.03)
    assert torch.allclose(validity, validity_from_beta(beta, base), atol=0.01)  # reached p_β per prompt


@pytest.mark.parametrize(("mu", "closed_loop"), [(0.6, False), (0.85, False), (0.85, True)])
def test_kl_control_with_estimated_base_validity_from_policy_samples(mu, closed_loop):
    """The full loop: sample K per prompt from π, importance-weight to estimate A, smooth, set β, step."""
    log_a, v, base = _toy_prompts(seed=1)
    num_prompts, group_size = len(base), 16
    keys = [prompt_key(f"prompt {i}") for i in range(num_prompts)]
    tracker = ValidityTracker(decay=0.95)
    controller = BetaController(
        BetaControllerConfig(target_validity=mu, closed_loop=closed_loop, kp=0.5, ki=0.02)
    )
    g = torch.Generator().manual_seed(0)

    def betas_for(log_pi, step):
        draws = torch.multinomial(log_pi.exp(), group_size, replacement=True, generator=g)
        verdicts = v.gather(1, draws).flatten()
        estimate = estimate_base_validity(
            verdicts, group_size, log_a.gather(1, draws).flatten(), log_pi.gather(1, draws).flatten()
        )
        smoothed = tracker.update(keys, estimate)
        observed = float(verdicts.mean())
        return controller.step(smoothed, observed)

    validity = _exact_kl_control(log_a, v, betas_for, steps=800)
    assert float(validity.mean()) == pytest.approx(mu, abs=0.03)


def test_beta_table_is_generated_from_the_formulas():
    table = beta_table(base_validities=(0.1, 0.5), targets=(0.5, 0.9)).splitlines()
    assert len(table) == 4 and table[-1].split("|")[2].strip() == "—"  # μ ≤ A has no β
    assert f"{beta_from_validity(0.9, 0.1):.3g} ({kl_tilted_to_base(0.9, 0.1):.2f})" in table[2]


@pytest.mark.parametrize("closed_loop", [False, True])
def test_closed_loop_corrects_a_biased_base_validity_and_never_drops_below_base(closed_loop):
    """A over-estimated by 60 %: the open loop's β is too large and validity falls short of μ; the closed
    loop, on sampled verdicts only, reaches μ, and the validity never drops below the base validity."""
    log_a, v, base = _toy_prompts(seed=2)
    mu, group_size = 0.7, 16
    biased = (base * 1.6).clamp(max=0.95)
    controller = BetaController(BetaControllerConfig(target_validity=mu, closed_loop=closed_loop))
    g = torch.Generator().manual_seed(0)
    trajectory = []

    def betas_for(log_pi, step):
        trajectory.append(float((log_pi.exp() * v).sum(1).mean()))
        draws = torch.multinomial(log_pi.exp(), group_size, replacement=True, generator=g)
        return controller.step(biased, float(v.gather(1, draws).mean()))

    validity = float(_exact_kl_control(log_a, v, betas_for, steps=600, lr=0.05).mean())
    if closed_loop:
        assert validity == pytest.approx(mu, abs=0.03)
        assert min(trajectory) >= float(base.mean()) - 1e-9
        assert max(trajectory[300:]) < mu + 0.06  # settled, not oscillating
    else:
        assert validity < mu - 0.05

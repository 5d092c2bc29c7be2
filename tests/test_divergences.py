"""The f-DPG estimator in `filtered_rl.divergences` is the gradient of the divergence it names.

Exact tests enumerate a small outcome space (a tabular softmax over 15 items, and every sequence of a
tiny autoregressive policy over {EOS, 1, 2} up to length 3), so expectations are sums and the check
is equality with the autograd gradient of `f_divergence`, up to float64 rounding.
"""

import itertools
import math

import pytest
import torch

from filtered_rl.divergences import (
    check_divergence,
    f_divergence,
    f_generator,
    f_prime,
    filtered_advantages,
    group_log_partition,
    leave_one_out,
    pseudo_reward,
)


@pytest.fixture(autouse=True, scope="module")
def float64():
    """Exact checks in float64, restored afterwards (other test modules build float32 models)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# (divergence, alpha, target) combinations that are finite objectives.
FILTERED_CASES = [
    ("forward_kl", None),
    ("js", None),
    ("tv", None),
    ("alpha", 0.5),
    ("alpha", 0.0),
    ("alpha", -1.0),
]
TILTED_CASES = FILTERED_CASES + [("reverse_kl", None), ("alpha", 1.0), ("alpha", 1.5)]
CASES = [(d, a, "filtered") for d, a in FILTERED_CASES] + [(d, a, "tilted") for d, a in TILTED_CASES]
BETA = 0.7
NO_CLIP = 1e12


def _case_id(case):
    divergence, alpha, target = case
    return f"{divergence}{'' if alpha is None else alpha}-{target}"


def target_log_probs(
    log_a: torch.Tensor, valid: torch.Tensor, target: str, beta: float = BETA
) -> torch.Tensor:
    """log p* = log a + log v − log A, or log p_β = log a + v/β − log Z_β, by enumeration."""
    log_unnormalised = (
        torch.where(valid > 0, log_a, -math.inf) if target == "filtered" else log_a + valid / beta
    )
    return log_unnormalised - torch.logsumexp(log_unnormalised, 0)


# ------------------------------------------------------------------------------------------------
# f, f', and the exact divergence


@pytest.mark.parametrize("divergence,alpha", TILTED_CASES + [("alpha", 2.0), ("alpha", 0.3)])
def test_f_prime_is_the_derivative_of_f(divergence, alpha):
    log_t = torch.linspace(-3, 3, 13).requires_grad_()
    t = log_t.exp()
    (grad_log_t,) = torch.autograd.grad(f_generator(log_t, divergence, alpha).sum(), log_t)
    # df/dt = (df/dlog t) / t
    torch.testing.assert_close(grad_log_t / t.detach(), f_prime(log_t.detach(), divergence, alpha))
    assert f_generator(torch.zeros(1), divergence, alpha).abs().item() < 1e-12  # f(1) = 0


def test_limits_at_t_infinity_are_the_documented_pseudo_rewards():
    inf = torch.tensor([math.inf])
    expected = {"forward_kl": 0.0, "js": -math.log(2), "tv": -0.5}
    for divergence, value in expected.items():
        assert pseudo_reward(inf, divergence).item() == pytest.approx(value)
    assert pseudo_reward(inf, "alpha", 0.5).item() == pytest.approx(-1 / (1 - 0.5))
    assert pseudo_reward(inf, "reverse_kl").item() == -math.inf


def test_amari_alpha_is_continuous_at_its_kl_limits():
    log_t = torch.linspace(-2, 2, 9)
    for alpha in (0.0, 1.0):
        for eps in (1e-7, -1e-7):
            torch.testing.assert_close(
                f_generator(log_t, "alpha", alpha + eps),
                f_generator(log_t, "alpha", alpha),
                atol=1e-5,
                rtol=0,
            )
            torch.testing.assert_close(
                f_prime(log_t, "alpha", alpha + eps), f_prime(log_t, "alpha", alpha), atol=1e-5, rtol=0
            )


def test_f_divergence_matches_closed_forms():
    gen = torch.Generator().manual_seed(0)
    log_pi = torch.log_softmax(torch.randn(10, generator=gen), 0)
    log_a = torch.log_softmax(torch.randn(10, generator=gen), 0)
    valid = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1.0])
    log_p = target_log_probs(log_a, valid, "filtered")
    pi, p = log_pi.exp(), log_p.exp()
    support = p > 0
    kl_p_pi = (p[support] * (log_p[support] - log_pi[support])).sum()
    assert f_divergence(log_pi, log_p, "forward_kl").item() == pytest.approx(kl_p_pi.item(), rel=1e-12)
    tv = 0.5 * (pi - p).abs().sum()
    assert f_divergence(log_pi, log_p, "tv").item() == pytest.approx(tv.item(), rel=1e-12)
    m = 0.5 * (pi + p)
    js = (pi * (pi / m).log()).sum() + (p[support] * (p[support] / m[support]).log()).sum()
    assert f_divergence(log_pi, log_p, "js").item() == pytest.approx(js.item(), rel=1e-12)
    log_q = target_log_probs(log_a, valid, "tilted")
    kl_pi_q = (pi * (log_pi - log_q)).sum()
    assert f_divergence(log_pi, log_q, "reverse_kl").item() == pytest.approx(kl_pi_q.item(), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Exact expected gradient of the surrogate = gradient of D_f (tabular softmax)


@pytest.fixture(scope="module")
def tabular():
    gen = torch.Generator().manual_seed(1)
    n = 15
    theta = torch.randn(n, generator=gen)
    log_a = torch.log_softmax(torch.randn(n, generator=gen), 0)
    valid = (torch.rand(n, generator=gen) < 0.5).double()
    valid[0], valid[1] = 1.0, 0.0
    return theta, log_a, valid


def exact_divergence_gradient(theta, log_p, divergence, alpha):
    theta = theta.clone().requires_grad_()
    (grad,) = torch.autograd.grad(f_divergence(torch.log_softmax(theta, 0), log_p, divergence, alpha), theta)
    return grad


def surrogate_gradient(theta, advantages):
    """∇θ of TRL's on-policy surrogate −E_{y~π_old}[A(y) π(y)/π_old(y)], the expectation by enumeration."""
    theta = theta.clone().requires_grad_()
    log_pi = torch.log_softmax(theta, 0)
    log_pi_old = log_pi.detach()
    loss = -(log_pi_old.exp() * advantages * torch.exp(log_pi - log_pi_old)).sum()
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_exact_pseudo_reward_gradient_equals_divergence_gradient(tabular, case):
    divergence, alpha, target = case
    theta, log_a, valid = tabular
    log_p = target_log_probs(log_a, valid, target)
    log_t = torch.log_softmax(theta, 0) - log_p
    rewards = pseudo_reward(log_t, divergence, alpha)
    expected = exact_divergence_gradient(theta, log_p, divergence, alpha)
    # Any constant baseline leaves the expected gradient unchanged (Σ_y ∇π(y) = 0).
    for baseline in (0.0, 0.37):
        torch.testing.assert_close(
            surrogate_gradient(theta, rewards - baseline), expected, rtol=1e-10, atol=1e-12
        )
    assert expected.abs().max() > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_filtered_advantages_on_the_enumerated_set_give_the_exact_gradient(tabular, case):
    """One "group" holding every outcome once, with a uniform proposal π_old = 1/K, makes the Z estimate exact.

    The leave-one-out baseline b_i = (K·R̄ − R_i)/(K − 1) depends on R_i, so A_i = K/(K−1)·(R_i − R̄):
    the expected surrogate gradient is K/(K−1) times −∇D_f.
    """
    divergence, alpha, target = case
    theta, log_a, valid = tabular
    k = theta.numel()
    log_pi = torch.log_softmax(theta, 0)
    out = filtered_advantages(
        log_pi,
        log_a,
        valid,
        group_size=k,
        divergence=divergence,
        alpha=alpha,
        target=target,
        target_beta=BETA,
        log_pi_old=torch.full((k,), -math.log(k)),
        pseudo_reward_clip=NO_CLIP,
    )
    log_p = target_log_probs(log_a, valid, target)
    assert out["log_partition"].item() == pytest.approx(
        torch.logsumexp(
            torch.where(valid > 0, log_a, -math.inf) if target == "filtered" else log_a + valid / BETA, 0
        ).item(),
        rel=1e-12,
    )
    expected = exact_divergence_gradient(theta, log_p, divergence, alpha)
    got = surrogate_gradient(theta, out["advantages"]) * (k - 1) / k
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Exact test on a tiny autoregressive policy with token-level ratios (as TRL's loss computes them)

EOS, VOCAB, MAX_LEN = 0, 3, 3


def all_sequences() -> list[tuple[int, ...]]:
    """Every completion: tokens until EOS, or MAX_LEN tokens (truncated, as max_completion_length does)."""
    seqs = []
    for length in range(1, MAX_LEN + 1):
        for body in itertools.product(range(1, VOCAB), repeat=length - 1):
            seqs.append((*body, EOS))
            if length == MAX_LEN:
                seqs.extend((*body, last) for last in range(1, VOCAB))
    return seqs


def token_log_probs(params, seqs):
    """(num_seqs, MAX_LEN) per-token log-probs and mask of a bigram+position model: logits = W[prev] + P[t]."""
    w, pos = params
    logps = torch.zeros(len(seqs), MAX_LEN)
    mask = torch.zeros(len(seqs), MAX_LEN)
    rows = []
    for seq in seqs:
        prev, row = VOCAB, []  # index VOCAB is BOS
        for t, token in enumerate(seq):
            row.append(torch.log_softmax(w[prev] + pos[t], 0)[token])
            prev = token
        rows.append(row)
    for i, row in enumerate(rows):
        logps[i, : len(row)] = torch.stack(row)
        mask[i, : len(row)] = 1.0
    return logps, mask


@pytest.mark.parametrize("case", [c for c in CASES if c[1] in (None, 0.5)], ids=_case_id)
def test_autoregressive_token_level_surrogate_gradient_is_exact(case):
    divergence, alpha, target = case
    gen = torch.Generator().manual_seed(2)
    seqs = all_sequences()
    assert len(seqs) == 15
    params = [
        torch.randn(VOCAB + 1, VOCAB, generator=gen).requires_grad_(),
        torch.randn(MAX_LEN, VOCAB, generator=gen),
    ]
    params[1].requires_grad_()
    base = [torch.randn(VOCAB + 1, VOCAB, generator=gen), torch.randn(MAX_LEN, VOCAB, generator=gen)]
    valid = torch.tensor([float(sum(s) % 3 == 1) for s in seqs])  # a fixed, arbitrary validity set
    assert 0 < valid.sum() < len(seqs)

    ref_logps, mask = token_log_probs(base, seqs)
    log_a = (ref_logps * mask).sum(1)
    assert torch.logsumexp(log_a, 0).item() == pytest.approx(0.0, abs=1e-12)  # a is a distribution on `seqs`
    log_p = target_log_probs(log_a, valid, target)

    logps, _ = token_log_probs(params, seqs)
    log_pi = (logps * mask).sum(1)
    expected = torch.autograd.grad(f_divergence(log_pi, log_p, divergence, alpha), params, retain_graph=True)

    # Surrogate as TRL builds it: per-token ratios exp(log π_t − log π_old_t), advantage broadcast over tokens,
    # summed over the completion mask (dapo/dr_grpo normalise by a constant).
    old = logps.detach()
    advantages = pseudo_reward(log_pi.detach() - log_p, divergence, alpha)
    per_token = -(advantages[:, None] * torch.exp(logps - old)) * mask
    loss = (old * mask).sum(1).exp() @ per_token.sum(1)  # E_{y~π_old}[·] by enumeration
    got = torch.autograd.grad(loss, params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    assert max(e.abs().max() for e in expected) > 1e-3


# ------------------------------------------------------------------------------------------------
# The sampled estimator (groups of K samples, estimated Z, leave-one-out) is close to the exact gradient


@pytest.mark.parametrize(
    "case",
    [
        ("forward_kl", None, "filtered"),
        ("js", None, "filtered"),
        ("tv", None, "filtered"),
        ("alpha", 0.5, "filtered"),
        ("reverse_kl", None, "tilted"),
    ],
    ids=_case_id,
)
def test_sampled_groups_estimate_the_exact_gradient(tabular, case):
    divergence, alpha, target = case
    theta, log_a, valid = tabular
    # A policy part-way between the base model and the target, as during training.
    log_p = target_log_probs(log_a, valid, target)
    gen = torch.Generator().manual_seed(3)
    noise = 0.5 * torch.randn(log_a.shape, generator=gen)
    log_pi = torch.log_softmax(0.5 * (log_a + torch.where(log_p.isfinite(), log_p, log_a - 3.0)) + noise, 0)
    theta = log_pi.clone()
    groups, k = 20000, 16
    samples = torch.multinomial(log_pi.exp(), groups * k, replacement=True, generator=gen)
    out = filtered_advantages(
        log_pi[samples],
        log_a[samples],
        valid[samples],
        group_size=k,
        divergence=divergence,
        alpha=alpha,
        target=target,
        target_beta=BETA,
    )
    # ∇θ log softmax(θ)_y = e_y − π, so the surrogate gradient is −mean_i A_i (e_{y_i} − π).
    pi = log_pi.exp()
    counts = torch.zeros_like(pi).index_add_(0, samples, out["advantages"])
    sampled = -(counts - out["advantages"].sum() * pi) / samples.numel()
    exact = exact_divergence_gradient(theta, log_p, divergence, alpha)
    # Sampling noise and the O(1/K) bias of the self-normalised Z estimate: a loose, fixed-seed bound.
    rel_error = ((sampled - exact).norm() / exact.norm()).item()
    assert rel_error < 0.1, rel_error


def test_reverse_kl_toward_tilted_target_is_kl_regularised_reinforce():
    """R = −1 − log(π/p_β) = v/β − log(π/a) − (1 + log Z_β): leave-one-out removes the constant exactly."""
    gen = torch.Generator().manual_seed(4)
    k, groups = 6, 5
    log_pi = -torch.rand(groups * k, generator=gen) * 5
    log_ref = -torch.rand(groups * k, generator=gen) * 5
    valid = (torch.rand(groups * k, generator=gen) < 0.4).double()
    betas = torch.tensor([0.1, 0.5, 1.0, 3.0, 10.0])
    out = filtered_advantages(
        log_pi,
        log_ref,
        valid,
        k,
        divergence="reverse_kl",
        target="tilted",
        target_beta=betas,
        pseudo_reward_clip=NO_CLIP,
    )
    kl_regularised_reward = valid / betas.repeat_interleave(k) - (log_pi - log_ref)
    torch.testing.assert_close(
        out["advantages"], leave_one_out(kl_regularised_reward, k), rtol=1e-10, atol=1e-10
    )


# ------------------------------------------------------------------------------------------------
# Group statistics and edge cases


def test_group_log_partition_and_leave_one_out():
    log_p = torch.log(torch.tensor([0.2, 0.0, 0.1, 0.3]))
    log_q = torch.log(torch.tensor([0.5, 0.5, 0.25, 0.25]))
    z = group_log_partition(log_p, log_q, 2).exp()
    torch.testing.assert_close(z, torch.tensor([(0.2 / 0.5 + 0) / 2, (0.1 / 0.25 + 0.3 / 0.25) / 2]))
    torch.testing.assert_close(
        leave_one_out(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0]), 3),
        torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]),
    )


def test_group_without_valid_sample_gets_zero_advantage_and_clip_bounds_rewards():
    log_pi = torch.tensor([-1.0, -2.0, -3.0, -1.0, -20.0, -2.0])
    log_ref = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, -8.0])
    valid = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    out = filtered_advantages(log_pi, log_ref, valid, 3, pseudo_reward_clip=2.0)
    assert out["has_support"].tolist() == [False, True]
    assert out["advantages"][:3].abs().max().item() == 0.0
    assert out["advantages"][3:].abs().max().item() > 0
    assert out["pseudo_rewards"].max().item() == 2.0  # p/π = 3 (Ẑ is dominated by the rare sample) is clipped
    assert out["pseudo_rewards"][5].item() == 0.0  # invalid: forward-KL pseudo-reward −f'(∞) = 0
    assert out["ess"][0].item() == 0.0 and 0 < out["ess"][1].item() <= 1.0
    assert math.isnan(out["kl_target_policy"][0].item()) and math.isfinite(out["kl_target_policy"][1].item())


def test_invalid_objectives_name_the_field():
    with pytest.raises(ValueError, match="divergence='reverse_kl'.*filtered"):
        check_divergence("reverse_kl", target="filtered")
    with pytest.raises(ValueError, match="alpha=1.5"):
        check_divergence("alpha", 1.5, target="filtered")
    with pytest.raises(ValueError, match="alpha"):
        check_divergence("alpha", None)
    with pytest.raises(ValueError, match="divergence='kl'"):
        check_divergence("kl")
    with pytest.raises(ValueError, match="target='pstar'"):
        check_divergence("js", target="pstar")
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="target_beta"):
        filtered_advantages(x, x, x, 2, divergence="js", target="tilted")
    with pytest.raises(ValueError, match="target_beta must be > 0"):
        filtered_advantages(x, x, x, 2, divergence="js", target="tilted", target_beta=-1.0)
    with pytest.raises(ValueError, match="group_size"):
        filtered_advantages(x, x, x, 1)
    check_divergence("reverse_kl", target="tilted")  # finite toward p_β: no error


@pytest.mark.parametrize("target", ["filtered", "tilted"])
def test_external_base_validity_gives_the_exact_partition(tabular, target):
    """With the true A(x) passed in, Z = A (filtered) or (1 − A) + A·e^{1/β} (tilted), whatever was sampled."""
    _, log_a, valid = tabular
    true_a = (log_a.exp() * valid).sum()
    gen = torch.Generator().manual_seed(5)
    k = 8
    samples = torch.multinomial(log_a.exp(), 4 * k, replacement=True, generator=gen)
    samples[0] = 0  # the first group has a valid sample (valid[0] = 1)
    log_pi = torch.log_softmax(torch.randn(log_a.shape, generator=gen), 0)
    out = filtered_advantages(
        log_pi[samples],
        log_a[samples],
        valid[samples],
        k,
        divergence="js",
        target=target,
        target_beta=BETA,
        base_validity=true_a.expand(4),
    )
    log_unnormalised = (
        torch.where(valid > 0, log_a, -math.inf) if target == "filtered" else log_a + valid / BETA
    )
    exact = torch.logsumexp(log_unnormalised, 0)
    has_valid = valid[samples].view(4, k).sum(1) > 0
    assert has_valid[0]
    torch.testing.assert_close(out["log_partition"][has_valid], exact.expand(int(has_valid.sum())))
    log_t = log_pi[samples] - (log_unnormalised[samples] - exact)
    rewards = pseudo_reward(log_t, "js")
    rows = has_valid.repeat_interleave(k)
    torch.testing.assert_close(out["pseudo_rewards"][rows], rewards[rows])

"""The exact enumerable toy: KL-control collapses onto a few valid outputs, the filtered objectives do not.

Why a toy: on a real model every quantity below is a noisy estimate; here every sequence is enumerated,
so each objective is optimised with exact expectations and each metric is exact. It reproduces the
mechanism of Dymetman (2026, "Binary rewards and reinforcement learning: fundamental challenges"):
KL-control's optimum over a policy family that cannot represent the filtered model p* does not approach
p* as β → 0; it concentrates on a few valid outputs per prompt. docs/toy.md has the numbers, including
which filtered objectives concentrate too (JS and α ≥ 0.5 do; forward KL and α = 0.25 do not).

The task ("digit sum"). A prompt x asks for a sequence y ∈ {0, …, V−1}^L whose digits sum to a target
S_x; v(x, y) = 1 iff Σ_t y_t = S_x. The prompts are all targets from 2 to (V−1)L − 2, so some are easy
(central sums, many valid sequences) and some hard (extreme sums, a handful).

The policy family ("shared bigram + prompt bias"), a tiny autoregressive LM:
    π_θ(y | x) = Π_t softmax(W_t[y_{t−1}] + b_x)[y_t],
with position-specific bigram logits W_t shared by all prompts and one bias vector b_x per prompt. It
sees only the previous token, so it cannot count: "sum = S_x" (a constraint on the whole sequence) is
out of its reach — the family is *misspecified*: neither p* nor the tilted p_β ∝ a·e^{v/β} is in it.
The base model a is a random member of the family (so KL-control starts exactly at its β = ∞ optimum).

Objectives, all exact sums over the P × V^L table, minimised with L-BFGS in float64:
- KL-control: maximise mean_x E_π[v] − β·KL(π‖a), i.e. minimise KL(π‖p_β) (`divergences.f_divergence`
  with reverse KL toward p_β). β is chosen by a target validity μ through `control.batch_beta_from_validity`
  (the μ the tilted model p_β — the well-specified optimum — would reach). The objective is not convex in
  θ: each β is solved from the base model (what an RL run at fixed β does: "KL-control from a"), from the
  previous β's optimum (annealing) and from the filtered solutions; the best optimum found is "KL-control".
- Filtered objectives: minimise D_f(π‖p*) for forward KL, JS and Amari α < 1 (from the base model).
  Forward KL is convex in θ (a log-likelihood of locally normalised logits that are linear in θ).
- Forward KL toward the tilted p_β at the same β's (the filtered trainer's `target='tilted'` mode).

Metrics, per prompt then averaged over prompts: validity μ_x; KL(p*‖π) = −log μ + KL(p*‖π restricted to
valid); entropy of π restricted to valid outputs; the number of valid outputs holding 90 % of π's valid
mass; pass@k = mean_x [1 − (1 − μ_x)^k] (a prompt whose validity collapsed to 0 is never solved);
coverage@k = mean_x Σ_y p*(y|x)·[1 − (1 − π(y|x))^k], the expected p*-mass of the distinct valid outputs
among k samples (1 only if k samples can reach all of p*'s support).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from filtered_rl.control import batch_beta_from_validity
from filtered_rl.divergences import check_divergence, f_divergence

DTYPE = torch.float64


@dataclass
class ToyConfig:
    """One toy instance and its sweep. Defaults: the run shown in docs/toy.md."""

    vocab_size: int = 4
    length: int = 5
    targets: list[int] | None = None  # digit sums asked by the prompts; None: 2 … (V−1)L − 2
    base_scale: float = 1.0  # std of the base model's random logits
    seed: int = 0
    target_validities: list[float] = field(
        default_factory=lambda: [0.12, 0.3, 0.5, 0.6, 0.63, 0.66, 0.7, 0.8, 0.9, 0.99]
    )
    alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 0.9])
    tilted_forward_kl: bool = True
    multistart: bool = True  # also start KL-control from the filtered solutions (its objective is non-convex)
    screen_iter: int = 300  # multistart: iterations of the screening run of each extra start
    keep_starts: int = 2  # multistart: extra starts run to convergence after screening
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    max_iter: int = 4000
    tolerance: float = 1e-9  # converged: the loss moved by < tolerance·(1 + |loss|) over 100 iterations

    def __post_init__(self) -> None:
        if self.vocab_size < 2 or self.length < 1:
            raise ValueError(f"vocab_size must be ≥ 2 and length ≥ 1, got {self.vocab_size}, {self.length}")
        if self.vocab_size**self.length > 200_000:
            raise ValueError(
                f"vocab_size**length = {self.vocab_size**self.length} sequences is too many to enumerate; "
                "keep it ≤ 200000 (e.g. --vocab-size 4 --length 6)"
            )
        top = (self.vocab_size - 1) * self.length
        if self.targets is None:  # skip the two most extreme sums at each end when there is room
            lo, hi = (2, top - 2) if top >= 4 else (0, top)
            self.targets = list(range(lo, hi + 1))
        if not self.targets or any(not 0 <= s <= top for s in self.targets):
            raise ValueError(f"targets must be digit sums in [0, {top}], got {self.targets}")
        if any(not 0 < m < 1 for m in self.target_validities):
            raise ValueError(f"target_validities must lie in (0, 1), got {self.target_validities}")
        for alpha in self.alphas:
            check_divergence("alpha", alpha, "filtered")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive integers, got {self.ks}")


# ----------------------------------------------------------------------------------------------------
# The problem: enumerated sequences, validity, base model, filtered model


@dataclass
class ToyProblem:
    sequences: torch.Tensor  # (N, L) every sequence
    valid: torch.Tensor  # (P, N) bool, v(x, y)
    base_params: list[torch.Tensor]
    log_base: torch.Tensor  # (P, N) log a(y|x)
    log_filtered: torch.Tensor  # (P, N) log p*(y|x), −inf off the valid set
    base_validity: torch.Tensor  # (P,) A(x)


def init_params(
    vocab_size: int, length: int, num_prompts: int, scale: float, seed: int
) -> list[torch.Tensor]:
    """[first-token logits (V,), bigram logits (L−1, V, V), prompt biases (P, V)], i.i.d. N(0, scale²)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(vocab_size,), (max(length - 1, 0), vocab_size, vocab_size), (num_prompts, vocab_size)]
    return [scale * torch.randn(shape, generator=gen, dtype=DTYPE) for shape in shapes]


def policy_log_probs(params: list[torch.Tensor], sequences: torch.Tensor) -> torch.Tensor:
    """log π_θ(y|x) for every prompt and sequence, (P, N): Σ_t log softmax(W_t[y_{t−1}] + b_x)[y_t]."""
    first, bigrams, bias = params
    log_p = torch.log_softmax(first[None] + bias, dim=-1)[:, sequences[:, 0]]
    for t in range(1, sequences.shape[1]):
        table = torch.log_softmax(bigrams[t - 1][None] + bias[:, None, :], dim=-1)  # (P, V_prev, V)
        log_p = log_p + table[:, sequences[:, t - 1], sequences[:, t]]
    return log_p


def build_problem(config: ToyConfig) -> ToyProblem:
    sequences = torch.tensor(list(itertools.product(range(config.vocab_size), repeat=config.length)))
    targets = torch.tensor(config.targets)
    valid = sequences.sum(dim=1)[None, :] == targets[:, None]
    base_params = init_params(config.vocab_size, config.length, len(targets), config.base_scale, config.seed)
    log_base = policy_log_probs(base_params, sequences)
    log_base_validity = torch.logsumexp(log_base.masked_fill(~valid, -math.inf), dim=1)
    log_filtered = (log_base - log_base_validity[:, None]).masked_fill(~valid, -math.inf)
    return ToyProblem(sequences, valid, base_params, log_base, log_filtered, log_base_validity.exp())


def tilted_log_probs(problem: ToyProblem, beta: float) -> torch.Tensor:
    """log p_β(y|x) ∝ log a(y|x) + v(x, y)/β, normalised per prompt."""
    logits = problem.log_base + problem.valid.to(DTYPE) / beta
    return logits - torch.logsumexp(logits, dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------------------
# Exact metrics


def pass_at_k(validity: torch.Tensor, k: int) -> float:
    """mean_x [1 − (1 − μ_x)^k]: the chance that k i.i.d. samples of a random prompt contain a valid one."""
    return float((-torch.expm1(k * torch.log1p(-validity.clamp(max=1.0)))).mean())


def coverage_at_k(log_pi: torch.Tensor, log_filtered: torch.Tensor, k: int) -> float:
    """mean_x Σ_y p*(y|x)·[1 − (1 − π(y|x))^k]: expected p*-mass of the distinct valid outputs in k samples."""
    hit = -torch.expm1(k * torch.log1p(-log_pi.exp().clamp(max=1.0)))
    return float((log_filtered.exp() * hit).sum(dim=1).mean())


def outputs_for_mass(probs: torch.Tensor, mass: float = 0.9) -> int:
    """Fewest outputs whose probabilities sum to ≥ `mass` of the total (probs: 1-D, ≥ 0)."""
    cumulative = probs.sort(descending=True).values.cumsum(0)
    return int((cumulative < mass * cumulative[-1]).sum()) + 1


def policy_metrics(log_pi: torch.Tensor, problem: ToyProblem, ks: list[int]) -> dict[str, Any]:
    """Exact metrics of a policy table log π (P, N), in log space so that collapsed prompts stay finite."""
    valid, log_filtered = problem.valid, problem.log_filtered
    log_valid_mass = torch.logsumexp(log_pi.masked_fill(~valid, -math.inf), dim=1)  # log μ_x
    validity = log_valid_mass.exp()
    p_star = log_filtered.exp()
    # KL(p*‖π) = Σ_valid p* (log p* − log π); finite even where π underflows to 0 in probability.
    kl_filtered = (p_star * (log_filtered - log_pi).masked_fill(~valid, 0.0)).sum(dim=1)
    log_pi_valid = (log_pi - log_valid_mass[:, None]).masked_fill(~valid, -math.inf)
    pi_valid = log_pi_valid.exp()
    entropy_valid = -(pi_valid * log_pi_valid.masked_fill(~valid, 0.0)).sum(dim=1)
    n90 = [outputs_for_mass(pi_valid[x][valid[x]]) for x in range(valid.shape[0])]
    return {
        "validity": float(validity.mean()),
        "validity_min": float(validity.min()),
        "validity_per_prompt": validity.tolist(),
        "kl_filtered_policy": float(kl_filtered.mean()),
        "entropy_valid": float(entropy_valid.mean()),
        "outputs_90": sum(n90) / len(n90),
        "outputs_90_per_prompt": n90,
        "pass_at_k": {str(k): pass_at_k(validity, k) for k in ks},
        "coverage_at_k": {str(k): coverage_at_k(log_pi, log_filtered, k) for k in ks},
    }


# ----------------------------------------------------------------------------------------------------
# Objectives and the optimiser


def kl_control_loss(log_pi: torch.Tensor, problem: ToyProblem, beta: float) -> torch.Tensor:
    """mean_x KL(π‖p_β) = mean_x [KL(π‖a) − E_π[v]/β] + const: minimising it maximises E_π[v] − β·KL(π‖a)."""
    log_tilted = tilted_log_probs(problem, beta)
    return f_divergence(log_pi.flatten(), log_tilted.flatten(), "reverse_kl") / log_pi.shape[0]


def kl_control_objective(log_pi: torch.Tensor, problem: ToyProblem, beta: float) -> float:
    """mean_x E_π[v] − β·KL(π‖a), the quantity KL-control maximises (reported, not optimised directly)."""
    pi = log_pi.exp()
    reward = (pi * problem.valid).sum(dim=1)
    kl_base = f_divergence(log_pi.flatten(), problem.log_base.flatten(), "reverse_kl") / log_pi.shape[0]
    return float(reward.mean() - beta * kl_base)


def filtered_loss(log_pi: torch.Tensor, log_target: torch.Tensor, divergence: str, alpha: float | None):
    """mean_x D_f(π‖p) toward p* (or p_β); f_divergence sums all rows, each a distribution."""
    return f_divergence(log_pi.flatten(), log_target.flatten(), divergence, alpha) / log_pi.shape[0]


def minimise(
    loss_of_log_pi,
    init: list[torch.Tensor],
    problem: ToyProblem,
    config: ToyConfig,
    max_iter: int | None = None,
):
    """L-BFGS (strong Wolfe) in chunks of 100 iterations until the loss stops moving or max_iter is spent.

    Returns (params, info): final loss, its change over the last chunk, gradient norm, iterations, and
    `converged` (that change < tolerance·(1 + |loss|)). Collapsed optima sit at infinite logits, where
    the loss keeps creeping down by tiny amounts; `last_chunk_change` says how tiny.
    """
    params = [p.detach().clone().requires_grad_(True) for p in init]
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=100, max_eval=400, tolerance_grad=1e-12, tolerance_change=1e-15,
        history_size=50, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = loss_of_log_pi(policy_log_probs(params, problem.sequences))
        loss.backward()
        return loss

    previous, iterations, change = float(closure().detach()), 0, math.inf
    while iterations < (config.max_iter if max_iter is None else max_iter):
        opt.step(closure)
        iterations = opt.state[opt._params[0]].get("n_iter", 0)
        loss = float(closure().detach())
        change, previous = previous - loss, loss
        if abs(change) < config.tolerance * (1 + abs(loss)):
            break
    grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))
    converged = abs(change) < config.tolerance * (1 + abs(loss))
    info = {
        "loss": loss, "last_chunk_change": change, "grad_norm": grad_norm, "iterations": iterations,
        "converged": converged,
    }  # fmt: skip
    return [p.detach() for p in params], info


# ----------------------------------------------------------------------------------------------------
# The sweep


def run_toy(config: ToyConfig, log=print) -> dict[str, Any]:
    """Solve every objective exactly on one toy instance; return a JSON-ready dict of configs and metrics."""
    problem = build_problem(config)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def record(name: str, family: str, log_pi: torch.Tensor, **extra: Any) -> dict[str, Any]:
        row = {"name": name, "family": family, **extra, **policy_metrics(log_pi, problem, config.ks)}
        rows.append(row)
        log(
            f"{name:<26} μ={row['validity']:.3f} min μ_x={row['validity_min']:.1e} "
            f"KL(p*‖π)={row['kl_filtered_policy']:.3g} n90={row['outputs_90']:.1f} "
            f"pass@{config.ks[-1]}={row['pass_at_k'][str(config.ks[-1])]:.3f} "
            f"[{time.perf_counter() - started:.0f}s]"
        )
        return row

    record("base a", "reference", problem.log_base)
    record("filtered p*", "reference", problem.log_filtered)
    base = problem.base_params

    # Filtered objectives D_f(π‖p*), from the base model.
    filtered_starts: dict[str, list[torch.Tensor]] = {}
    objectives = [("forward KL", "forward_kl", None), ("JS", "js", None)]
    objectives += [(f"α={a:g}", "alpha", a) for a in config.alphas]
    for name, divergence, alpha in objectives:
        loss = lambda lp, d=divergence, a=alpha: filtered_loss(lp, problem.log_filtered, d, a)  # noqa: E731
        params, info = minimise(loss, base, problem, config)
        if config.multistart:
            filtered_starts[f"{name}→p*"] = params
        log_pi = policy_log_probs(params, problem.sequences)
        record(f"{name}→p*", "filtered", log_pi, divergence=divergence, alpha=alpha, optimiser=info)

    # KL-control along the β sweep. Its objective is non-convex: solved from the base model (what an RL run
    # at fixed β does, kept as "KL-control from a"), from the previous β's optimum (annealing) and, with
    # multistart, from every filtered solution; the best optimum found is "KL-control".
    previous = base
    mean_base_validity = float(problem.base_validity.mean())
    for mu in config.target_validities:
        if mu <= mean_base_validity:
            log(
                f"skipping target validity {mu}: the base model already has μ = {mean_base_validity:.3f} (β = ∞)"
            )
            continue
        beta = batch_beta_from_validity(mu, problem.base_validity)
        loss = lambda lp, b=beta: kl_control_loss(lp, problem, b)  # noqa: E731
        starts = {"base": base} if previous is base else {"base": base, "previous β": previous}
        fits = _kl_control_fits(loss, starts, filtered_starts, problem, config)
        best = min(fits, key=lambda label: fits[label][1]["loss"])
        tilted_validity = float((tilted_log_probs(problem, beta).exp() * problem.valid).sum(dim=1).mean())
        for family, label in (("kl_control", best), ("kl_control_from_base", "base")):
            params, info = fits[label]
            log_pi = policy_log_probs(params, problem.sequences)
            record(
                f"KL-control{' from a' if family == 'kl_control_from_base' else ''} β={beta:.3g}",
                family, log_pi, beta=beta, target_validity=mu, tilted_validity=tilted_validity,
                objective=kl_control_objective(log_pi, problem, beta), start=label, optimiser=info,
                start_losses={lab: fit[1]["loss"] for lab, fit in fits.items()},
            )  # fmt: skip
        previous = fits[best][0]
        if config.tilted_forward_kl:  # the filtered trainer's target='tilted' at the same β (convex)
            log_tilted = tilted_log_probs(problem, beta)
            loss = lambda lp, t=log_tilted: filtered_loss(lp, t, "forward_kl", None)  # noqa: E731
            params, info = minimise(loss, base, problem, config)
            log_pi = policy_log_probs(params, problem.sequences)
            record(f"forward KL→p_β β={beta:.3g}", "forward_kl_tilted", log_pi, beta=beta, target_validity=mu,
                   optimiser=info)  # fmt: skip

    return {
        "config": dataclasses.asdict(config),
        "targets": config.targets,
        "base_validity_per_prompt": problem.base_validity.tolist(),
        "valid_outputs_per_prompt": problem.valid.sum(dim=1).tolist(),
        "num_sequences": problem.sequences.shape[0],
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }


def _kl_control_fits(loss, starts, extra_starts, problem: ToyProblem, config: ToyConfig):
    """Minimise from every start; the extra starts are screened with a short run and only the
    `keep_starts` most promising are run to convergence (the base start always is)."""
    fits = {label: minimise(loss, init, problem, config) for label, init in starts.items()}
    if extra_starts:
        screen = min(config.screen_iter, config.max_iter)
        screened = {
            label: minimise(loss, init, problem, config, screen) for label, init in extra_starts.items()
        }
        ranked = sorted(screened, key=lambda label: screened[label][1]["loss"])[: config.keep_starts]
        for label in ranked:
            params, info = minimise(loss, screened[label][0], problem, config)
            info["iterations"] += screened[label][1]["iterations"]
            fits[label] = (params, info)
    return fits


# ----------------------------------------------------------------------------------------------------
# Outputs: JSON, Markdown table, figures


FAMILY_ORDER = ("reference", "kl_control", "filtered", "kl_control_from_base", "forward_kl_tilted")


def markdown_table(results: dict[str, Any], ks_shown: tuple[int, ...] = (1, 8, 64)) -> str:
    """The main table: references, KL-control's best optima, filtered objectives."""
    ks_shown = tuple(k for k in ks_shown if str(k) in results["rows"][0]["pass_at_k"])
    header = ["policy", "β", "μ of p_β", "validity μ", "min_x μ_x", "KL(p*‖π)", "H valid", "n90"]
    header += [f"pass@{k}" for k in ks_shown] + [f"cov@{k}" for k in ks_shown] + ["converged"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(results["rows"], key=lambda r: FAMILY_ORDER.index(r["family"])):
        if row["family"] not in ("reference", "kl_control", "filtered"):
            continue
        opt = row.get("optimiser")
        cells = [
            row["name"].split(" β=")[0],
            f"{row['beta']:.3g}" if "beta" in row else "",
            f"{row['target_validity']:.2f}" if "target_validity" in row else "",
            f"{row['validity']:.3f}",
            f"{row['validity_min']:.1e}",
            _kl_cell(row["kl_filtered_policy"]),
            f"{row['entropy_valid']:.2f}",
            f"{row['outputs_90']:.1f}",
        ]
        cells += [f"{row['pass_at_k'][str(k)]:.3f}" for k in ks_shown]
        cells += [f"{row['coverage_at_k'][str(k)]:.3f}" for k in ks_shown]
        if opt is None:
            cells.append("")
        else:
            cells.append("yes" if opt["converged"] else f"Δloss {opt['last_chunk_change']:.0e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_table(results: dict[str, Any]) -> str:
    """Per β: KL-control's best optimum, KL-control from the base model, forward KL toward p_β."""
    k = str(results["config"]["ks"][-1])
    by_beta: dict[float, dict[str, dict[str, Any]]] = {}
    for row in results["rows"]:
        if "beta" in row:
            by_beta.setdefault(row["beta"], {})[row["family"]] = row
    columns = (("kl_control", "KL-control"), ("kl_control_from_base", "KL-control from a"),
               ("forward_kl_tilted", "forward KL→p_β"))  # fmt: skip
    header = ["β", "μ of p_β"] + [f"{name}: μ / min μ_x / KL(p*‖π) / n90 / cov@{k}" for _, name in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for beta, fams in by_beta.items():
        cells = [f"{beta:.3g}", f"{next(iter(fams.values()))['target_validity']:.2f}"]
        for family, _ in columns:
            r = fams.get(family)
            cells.append(
                ""
                if r is None
                else f"{r['validity']:.3f} / {r['validity_min']:.0e} / "
                f"{_kl_cell(r['kl_filtered_policy'])} / {r['outputs_90']:.1f} / {r['coverage_at_k'][k]:.3f}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _kl_cell(kl: float) -> str:
    return f"{kl:.2f}" if kl < 1e3 else f"{kl:.1e}"


def _kl_rows_to_show(kl_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KL-control just before and just after its largest jump in validity, and at the smallest β."""
    if len(kl_rows) < 3:
        return kl_rows
    jumps = [b["validity"] - a["validity"] for a, b in zip(kl_rows, kl_rows[1:])]
    i = max(range(len(jumps)), key=jumps.__getitem__)
    picked = [kl_rows[i], kl_rows[i + 1], kl_rows[-1]]
    return [r for j, r in enumerate(picked) if r not in picked[:j]]


COLOURS = {"forward_kl": "tab:green", "js": "tab:red", 0.25: "tab:olive", 0.5: "tab:purple", 0.75: "tab:pink"}


def _colour(row: dict[str, Any]) -> str | None:
    if row["family"] != "filtered":
        return None
    return COLOURS.get(row["alpha"] if row["divergence"] == "alpha" else row["divergence"], "tab:brown")


def plot(results: dict[str, Any], output_dir: Path) -> list[Path]:
    """toy_frontier.png (validity vs KL(p*‖π) and vs n90) and toy_passk.png (pass@k, coverage@k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = results["rows"]
    family = {f: [r for r in rows if r["family"] == f] for f in FAMILY_ORDER}
    refs = {r["name"]: r for r in family["reference"]}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        ("kl_filtered_policy", "KL(p*‖π), nats"),
        ("outputs_90", "valid outputs holding 90 % of valid mass"),
    )
    for ax, (key, label) in zip(axes, panels):
        for fam, style, colour, name in (
            ("kl_control", "o-", "tab:blue", "KL-control, β sweep (best optimum)"),
            ("kl_control_from_base", "^:", "tab:gray", "KL-control from a (RL-like)"),
            ("forward_kl_tilted", "s--", "tab:orange", "forward KL → p_β, same β"),
        ):
            pts = family[fam]
            ax.plot([r["validity"] for r in pts], [r[key] for r in pts], style, c=colour, ms=4, label=name)
        for r in family["filtered"]:
            ax.plot(r["validity"], r[key], "*", c=_colour(r), ms=12, label=r["name"])
        ax.plot(refs["base a"]["validity"], refs["base a"][key], "kx", ms=9, label="base a")
        if key == "outputs_90":
            ax.axhline(refs["filtered p*"][key], color="gray", ls=":", label="p* (validity 1)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
        ax.set_xlabel("validity μ (mean over prompts)")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    frontier = output_dir / "toy_frontier.png"
    fig.savefig(frontier, dpi=80)
    plt.close(fig)

    ks = results["config"]["ks"]
    best_shown, from_base_shown = _kl_rows_to_show(family["kl_control"]), family["kl_control_from_base"][-1:]
    kl_colours = dict(zip((r["name"] for r in best_shown), ("tab:cyan", "tab:blue", "navy")))
    kl_colours.update({r["name"]: "tab:gray" for r in from_base_shown})
    kl_shown = best_shown + from_base_shown
    curves = [refs["base a"], refs["filtered p*"], *kl_shown, *family["filtered"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    panels = (("pass_at_k", "pass@k, mean over prompts"),
              ("coverage_at_k", "coverage@k: p*-mass of distinct valid outputs"))  # fmt: skip
    for ax, (key, label) in zip(axes, panels):
        for r in curves:
            style = {"base a": "-", "filtered p*": ":"}.get(
                r["name"], "--" if r["family"].startswith("kl_control") else "-"
            )
            colour = "k" if r["family"] == "reference" else kl_colours.get(r["name"]) or _colour(r)
            ax.plot(ks, [r[key][str(k)] for k in ks], style, c=colour, marker=".", label=r["name"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    passk = output_dir / "toy_passk.png"
    fig.savefig(passk, dpi=80)
    plt.close(fig)
    return [frontier, passk]


def write_outputs(results: dict[str, Any], output_dir: Path) -> dict[str, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, table_path = output_dir / "toy_results.json", output_dir / "toy_table.md"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, json_path)  # atomic: a killed run leaves the previous file intact
    table_path.write_text(markdown_table(results) + "\n" + sweep_table(results))
    frontier, passk = plot(results, output_dir)
    return {"json": json_path, "table": table_path, "frontier": frontier, "passk": passk}


# ----------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ToyConfig()
    parser.add_argument(
        "--output-dir", type=Path, default=Path("outputs/toy"), help="where JSON, PNG, table go"
    )
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--length", type=int, default=defaults.length)
    parser.add_argument("--targets", type=int, nargs="+", default=None, help="digit sums, one prompt each")
    parser.add_argument("--base-scale", type=float, default=defaults.base_scale)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--target-validities", type=float, nargs="+", default=defaults.target_validities,
        help="KL-control sweep: β = batch_beta_from_validity(μ, A) for each μ",
    )  # fmt: skip
    parser.add_argument("--alphas", type=float, nargs="+", default=defaults.alphas)
    parser.add_argument("--no-tilted-forward-kl", action="store_true", help="skip forward KL → p_β")
    parser.add_argument(
        "--single-start", action="store_true",
        help="start KL-control only from the base model and the previous β (faster; may miss better optima)",
    )  # fmt: skip
    parser.add_argument("--ks", type=int, nargs="+", default=defaults.ks)
    parser.add_argument("--max-iter", type=int, default=defaults.max_iter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the toy is small)")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    config = ToyConfig(
        vocab_size=args.vocab_size, length=args.length, targets=args.targets, base_scale=args.base_scale,
        seed=args.seed, target_validities=args.target_validities, alphas=args.alphas,
        tilted_forward_kl=not args.no_tilted_forward_kl, multistart=not args.single_start, ks=args.ks,
        max_iter=args.max_iter,
    )  # fmt: skip
    results = run_toy(config)
    paths = write_outputs(results, args.output_dir)
    print(f"\n{markdown_table(results)}")
    print(f"done in {results['seconds']:.0f}s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0

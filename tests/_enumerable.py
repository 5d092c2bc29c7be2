"""Enumerable RL tasks: completions so short that π(·|x) is read exactly from the logits.

Why: whether a trainer reaches its optimum (p*, p_β, validity μ) can only be checked against the exact
distribution, not against samples. Each task is a handful of prompts whose completions are exactly
`length` single-character tokens of the project's char-level tokenizer; a tiny Qwen2 is fitted (by exact
cross-entropy, "SFT") to a chosen base distribution a(y|x) with base validity A(x) spread unequally over
several valid answers. Then every sequence of `length` tokens (or fewer, ending at EOS) is enumerated:

- length 1: π(y|x) = softmax(logits at the last prompt position), one entry per vocabulary token;
- length 2: π(t1) · π(t2 | t1) for every t1 ≠ EOS and every t2, plus the one-token sequence [EOS].

These are exactly the sequences TRL samples with `max_completion_length=length` (it stops at EOS, and
counts the EOS token in the completion mask), and their log-probs are TRL's (T = 1). The verifier reads
the decoded text, as TRL passes it (special tokens skipped).

Used by tests/test_convergence*.py and benchmarks/controller_table.py (which puts tests/ on sys.path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CPU = dict(
    use_cpu=True,
    bf16=False,
    report_to=[],
    disable_tqdm=True,
    gradient_checkpointing=False,
    save_strategy="no",
    lr_scheduler_type="constant",
    warmup_steps=0,
)


@dataclass(frozen=True)
class PromptSpec:
    """One prompt: its valid and invalid completions (texts of `length` characters) with base masses."""

    prompt: str
    valid: dict[str, float]
    invalid: dict[str, float]

    @property
    def base_validity(self) -> float:
        return sum(self.valid.values()) / (sum(self.valid.values()) + sum(self.invalid.values()))


@dataclass(frozen=True)
class Task:
    """Prompts of equal length (TRL left-pads a batch and gives no position ids, so equal lengths keep
    generation and scoring identical), completions of exactly `length` tokens."""

    prompts: tuple[PromptSpec, ...]
    length: int
    name: str = "task"
    _valid_sets: dict[str, frozenset[str]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        lengths = {len(p.prompt) for p in self.prompts}
        if len(lengths) != 1:
            raise ValueError(f"prompts must have equal lengths, got {sorted(lengths)}")
        for spec in self.prompts:
            for text in (*spec.valid, *spec.invalid):
                if len(text) != self.length:
                    raise ValueError(f"completion {text!r} does not have length {self.length}")
            self._valid_sets[spec.prompt] = frozenset(spec.valid)

    def verifier(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        """Binary verifier: 1 iff the completion is one of its prompt's valid answers."""
        return [float(c in self._valid_sets[p]) for p, c in zip(prompts, completions)]

    def dataset(self, **columns: list[Any]) -> Any:
        """One row per prompt, plus `columns` (one value per prompt, e.g. base_validity=[...])."""
        from datasets import Dataset

        rows = [{"prompt": spec.prompt} for spec in self.prompts]
        for name, values in columns.items():
            for row, value in zip(rows, values, strict=True):
                row[name] = value
        return Dataset.from_list(rows)


def _unequal(names: str, total: float, ratio: float) -> dict[str, float]:
    """`total` spread over `names` geometrically (each `ratio` times the previous): unequal on purpose, so
    that keeping p*'s proportions is a real constraint."""
    weights = [ratio**i for i in range(len(names))]
    return {name: total * w / sum(weights) for name, w in zip(names, weights)}


def one_token_task(base_validities: tuple[float, ...] = (0.2,), n_valid: int = 10) -> Task:
    """Completions of one token: valid = a digit, invalid = a letter; A(x) per prompt as given.

    Prompt i shifts which digits are likely (a rotation), so prompts differ in proportions too.
    """
    digits, letters = "0123456789"[:n_valid], "abcdefghijklmnop"
    prompts = []
    for i, a in enumerate(base_validities):
        rotated = digits[i:] + digits[:i]
        prompts.append(
            PromptSpec(f"q{i}:", valid=_unequal(rotated, a, 0.75), invalid=_unequal(letters, 1 - a, 0.85))
        )
    return Task(tuple(prompts), length=1, name=f"one-token A={'/'.join(f'{a:g}' for a in base_validities)}")


def two_token_task(base_validities: tuple[float, ...] = (0.25,)) -> Task:
    """Completions of two tokens over first letters a–d and second letters w–z (16 strings). Validity depends
    on both tokens: the valid strings share their first letters with invalid ones, so the policy must learn
    the conditional π(t2 | t1), not just the first token."""
    firsts, seconds = "abcd", "wxyz"
    strings = [f + s for f in firsts for s in seconds]
    valid_names = ["aw", "bx", "cy", "dz", "az", "cx"]  # every first letter has valid and invalid seconds
    invalid_names = [s for s in strings if s not in valid_names]
    prompts = []
    for i, a in enumerate(base_validities):
        shift = 2 * i
        prompts.append(
            PromptSpec(
                f"t{i}:",
                valid=_unequal(valid_names[shift:] + valid_names[:shift], a, 0.7),
                invalid=_unequal(invalid_names, 1 - a, 0.85),
            )
        )
    return Task(tuple(prompts), length=2, name=f"two-token A={'/'.join(f'{a:g}' for a in base_validities)}")


# ---- the model ----------------------------------------------------------------------------------------


def _token_strings(tokenizer: Any) -> list[str]:
    """The text each token decodes to as TRL decodes completions (special tokens skipped)."""
    return [tokenizer.decode([i], skip_special_tokens=True) for i in range(len(tokenizer))]


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != len(text):
        raise ValueError(f"{text!r} is not one token per character: {ids}")
    return ids


def build_base_model(
    directory: Path, task: Task, *, hidden_size: int = 32, steps: int = 600, tolerance: float = 2e-3
) -> Path:
    """A tiny Qwen2 fitted so that a(y|x) ≈ the task's base masses, saved (with the tokenizer) to `directory`.

    Exact cross-entropy −Σ_y q(y) log a(y|x) over the listed completions, full batch, Adam; stops once
    KL(q‖a) < `tolerance` on every prompt. The trainers' A(x) is the *exact* validity of the saved model
    (`exact_policy`), which differs from the spec's A by the residual KL only.
    """
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _tiny_model import save_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    save_tiny_model(
        directory, hidden_size=hidden_size, intermediate_size=2 * hidden_size, max_new_tokens=task.length
    )
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    rows, weights, owners = [], [], []
    for index, spec in enumerate(task.prompts):
        total = sum(spec.valid.values()) + sum(spec.invalid.values())
        for text, mass in (*spec.valid.items(), *spec.invalid.items()):
            rows.append(_encode(tokenizer, spec.prompt) + _encode(tokenizer, text))
            weights.append(mass / total)
            owners.append(index)
    input_ids = torch.tensor(rows)
    q = torch.tensor(weights, dtype=torch.float64)
    owners_t = torch.tensor(owners)
    prompt_length = len(task.prompts[0].prompt)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=input_ids).logits[:, prompt_length - 1 : -1].float()
        logps = torch.log_softmax(logits, -1).gather(-1, input_ids[:, prompt_length:, None])
        seq = logps.squeeze(-1).sum(-1)
        loss = -(q.float() * seq).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        kl = torch.zeros(len(task.prompts), dtype=torch.float64).index_add_(
            0, owners_t, q * (q.log() - seq.detach().double())
        )
        if bool((kl < tolerance).all()):
            break
    else:
        raise RuntimeError(f"SFT did not fit the base distribution (KL per prompt {kl.tolist()})")
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---- exact distributions and what is measured on them ------------------------------------------------


@dataclass
class PromptDistribution:
    """π(·|x) over every completion sequence, with the verdicts of the sequences."""

    prompt: str
    log_probs: torch.Tensor  # (S,) float64, sums (in prob) to 1
    valid: torch.Tensor  # (S,) bool

    @property
    def validity(self) -> float:
        return float(self.log_probs.exp()[self.valid].sum())


@torch.no_grad()
def exact_policy(model: Any, tokenizer: Any, task: Task) -> list[PromptDistribution]:
    """π(y|x) for every sequence y TRL can sample with max_completion_length = task.length (T = 1)."""
    model_was_training = model.training
    model.eval()
    strings = _token_strings(tokenizer)
    eos = tokenizer.eos_token_id
    vocab = len(strings)
    device = next(model.parameters()).device
    out = []
    for spec in task.prompts:
        prompt_ids = torch.tensor([_encode(tokenizer, spec.prompt)], device=device)
        first = torch.log_softmax(model(input_ids=prompt_ids).logits[0, -1].double(), -1)[:vocab].cpu()
        if task.length == 1:
            log_probs, texts = first, strings
        elif task.length == 2:
            extended = torch.cat(
                [prompt_ids.expand(vocab, -1), torch.arange(vocab, device=device)[:, None]], 1
            )
            second = torch.log_softmax(model(input_ids=extended).logits[:, -1].double(), -1)[:, :vocab].cpu()
            joint = first[:, None] + second  # (t1, t2)
            keep = torch.ones(vocab, dtype=torch.bool)
            keep[eos] = False
            log_probs = torch.cat([first[eos : eos + 1], joint[keep].flatten()])
            texts = [""] + [
                strings[t1] + strings[t2] for t1 in range(vocab) if t1 != eos for t2 in range(vocab)
            ]
        else:
            raise ValueError(f"enumeration is implemented for length 1 and 2, not {task.length}")
        valid = torch.tensor([t in spec.valid for t in texts])
        out.append(PromptDistribution(spec.prompt, log_probs, valid))
    if model_was_training:
        model.train()
    return out


def tilted_log_probs(base: PromptDistribution, beta: float) -> torch.Tensor:
    """log p_β = log a + v/β − log Z: the KL-control optimum (∞ β → a, β → 0 → p*)."""
    return torch.log_softmax(base.log_probs + base.valid.double() / beta, 0)


def kl_filtered_to_policy_valid(base: PromptDistribution, policy: PromptDistribution) -> float:
    """KL(p* ‖ π restricted to valid, renormalised): 0 iff π keeps p*'s proportions among valid answers.

    p*'s proportions are a's among valid answers, and every p_β keeps them, so this is the measure of
    "proportions kept" whatever the validity.
    """
    v = base.valid
    log_p_star = base.log_probs[v] - torch.logsumexp(base.log_probs[v], 0)
    log_pi_valid = policy.log_probs[v] - torch.logsumexp(policy.log_probs[v], 0)
    return float((log_p_star.exp() * (log_p_star - log_pi_valid)).sum())


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """KL(p‖q) over the enumerated sequences (terms with p = 0 dropped)."""
    p = log_p.exp()
    return float(torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum())


def base_validities(base: list[PromptDistribution]) -> list[float]:
    return [d.validity for d in base]


def batch_target_validities(base: list[PromptDistribution], mu: float) -> tuple[float, list[float]]:
    """(β, per-prompt validities) of one β for the batch solving mean_x μ_x(β) = μ (the callback's rule)."""
    from filtered_rl.control import batch_beta_from_validity, validity_from_beta

    beta = batch_beta_from_validity(mu, base_validities(base))
    return beta, [validity_from_beta(beta, a) for a in base_validities(base)]


# ---- training ----------------------------------------------------------------------------------------


class ExactProbe:
    """A TrainerCallback recording the exact per-prompt validity every `every` optimizer steps (and β).

    Why: "never below the base validity" is a property of the whole trajectory, not of the end point.
    """

    def __init__(self, task: Task, tokenizer: Any, every: int = 10):
        from transformers import TrainerCallback

        self.task, self.tokenizer, self.every = task, tokenizer, every
        self.steps: list[int] = []
        self.validities: list[list[float]] = []
        self.betas: list[float] = []
        self.trainer: Any = None
        probe = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % probe.every == 0 and model is not None:
                    policy = exact_policy(model, probe.tokenizer, probe.task)
                    probe.steps.append(state.global_step)
                    probe.validities.append([d.validity for d in policy])
                    if probe.trainer is not None:
                        probe.betas.append(float(getattr(probe.trainer, "beta", math.nan)))

        self.callback = _Callback()

    def mean_validities(self) -> list[float]:
        return [sum(v) / len(v) for v in self.validities]


def make_trainer(
    kind: str,
    model_dir: Path,
    task: Task,
    output_dir: Path,
    *,
    steps: int = 300,
    learning_rate: float = 3e-3,
    num_generations: int = 16,
    seed: int = 0,
    dataset_columns: dict[str, list[Any]] | None = None,
    **config: Any,
) -> Any:
    """A trainer of `kind` ("grpo", "rloo", "filtered", "grpo_klr") on the task: every step samples
    `num_generations` completions of every prompt; Adam at a constant `learning_rate`; T = 1."""
    from filtered_rl.trainers import ALGORITHMS

    algorithm = ALGORITHMS[kind]
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=num_generations * len(task.prompts),
        num_generations=num_generations,
        max_completion_length=task.length,
        max_steps=steps,
        learning_rate=learning_rate,
        logging_steps=max(1, steps // 30),
        seed=seed,
        temperature=1.0,
        **CPU,
    )
    values.update(config)
    args = algorithm.config_class(**values)
    return algorithm.trainer_class(
        model=str(model_dir),
        reward_funcs=task.verifier,
        args=args,
        train_dataset=task.dataset(**(dataset_columns or {})),
    )


@dataclass
class Outcome:
    """Exact measurements after training, per prompt."""

    base: list[PromptDistribution]
    policy: list[PromptDistribution]
    probe: ExactProbe | None = None

    @property
    def validities(self) -> list[float]:
        return [d.validity for d in self.policy]

    @property
    def validity(self) -> float:
        return sum(self.validities) / len(self.validities)

    @property
    def kl_valid(self) -> list[float]:
        return [kl_filtered_to_policy_valid(b, p) for b, p in zip(self.base, self.policy)]

    def kl_from_tilted(self, beta: float) -> list[float]:
        """KL(p_β‖π) per prompt."""
        return [kl(tilted_log_probs(b, beta), p.log_probs) for b, p in zip(self.base, self.policy)]

    def kl_from_filtered(self) -> list[float]:
        """KL(p*‖π) per prompt."""
        out = []
        for b, p in zip(self.base, self.policy):
            log_star = torch.where(b.valid, b.log_probs, torch.full_like(b.log_probs, -math.inf))
            out.append(kl(torch.log_softmax(log_star, 0), p.log_probs))
        return out


def train_and_measure(
    trainer: Any,
    task: Task,
    *,
    probe_every: int | None = None,
    callback: Any = None,
    allow_loss_kl: bool = False,
) -> Outcome:
    """Train (attaching `callback` first if given) and measure π exactly against the base model."""
    tokenizer = trainer.processing_class
    ref = trainer.ref_model if trainer.ref_model is not None else None
    if ref is None:
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(trainer.model.config._name_or_path)
    base = exact_policy(ref, tokenizer, task)
    probe = None
    if probe_every:
        probe = ExactProbe(task, tokenizer, every=probe_every)
        probe.trainer = trainer
        trainer.add_callback(probe.callback)
    if callback is not None:
        callback.attach(trainer, allow_loss_kl=allow_loss_kl)
    trainer.train()
    return Outcome(base, exact_policy(trainer.model, tokenizer, task), probe)


# ---- expected fixed points (no sampling noise) -------------------------------------------------------

OBJECTIVES = ("k3_loss", "k3_loss_group_std", "k3_corrected", "k3_corrected_group_std", "k1_reward")


def _group_advantage_weights(validity: torch.Tensor, group_size: int, scaled: bool) -> torch.Tensor:
    """(g(0), g(1)): E[advantage of a sample | its verdict] for GRPO's group-mean baseline on binary rewards.

    The other K−1 verdicts are Binomial(K−1, V). With k valid in the group, a valid sample's advantage is
    (1 − k/K) and an invalid one's −k/K, divided (scaled=True, `scale_rewards="group"`) by TRL's unbiased
    group std s_k = sqrt(k(K−k)/(K(K−1))) + 1e-4. Without scaling g(1) = (K−1)(1−V)/K, g(0) = −(K−1)V/K.
    """
    K = group_size
    others = torch.arange(K, dtype=torch.float64)  # number of valid among the other K−1
    log_binom = (
        torch.lgamma(torch.tensor(K, dtype=torch.float64))
        - torch.lgamma(others + 1)
        - torch.lgamma(K - others)
    )
    v = validity.clamp(1e-12, 1 - 1e-12)
    pmf = (log_binom + others * torch.log(v) + (K - 1 - others) * torch.log1p(-v)).exp()
    out = []
    for own in (0, 1):
        k = others + own
        adv = own - k / K
        if scaled:
            adv = adv / ((k * (K - k) / (K * (K - 1))).clamp(min=0).sqrt() + 1e-4)
        out.append((pmf * adv).sum())
    return torch.stack(out)


def expected_fixed_point(
    spec: PromptSpec,
    objective: str,
    beta: float,
    *,
    group_size: int = 16,
    steps: int = 4000,
    learning_rate: float = 0.05,
) -> dict[str, float]:
    """Where an objective's *expected* gradient vanishes, on a tabular policy over the spec's completions.

    Why: it separates what an objective converges to from what sampling noise, Adam and clipping do to it.
    The policy is a table of per-token logits (π(t1), π(t2|t1) for two tokens), started at a, descended
    with full-batch Adam on a surrogate whose gradient is the objective's exact expected TRL gradient
    (on-policy, "dapo" loss, every completion `length` tokens):

    - "k3_loss": GRPO with `scale_rewards="none"`: −E[A·∇log π(y)] + β·Σ_t E[(1 − a_t/π_t)·∇log π_t], the
      second term the gradient of Σ_t E_{y<t~π} KL(a_t‖π_t) (TRL's per-token k3 through log π only);
    - "k3_loss_group_std": the same with advantages divided by the group std (`scale_rewards="group"`);
    - "k3_corrected" / "k3_corrected_group_std": TRL 1.16's default `use_bias_correction_kl=True`, k3 times
      the importance ratio π/π_old (with its gradient): on-policy E[∇(ratio·k3_t)] = E[log(π_t/a_t)·∇log π_t],
      reverse KL's gradient, so with `scale_rewards="none"` the optimum is p_β at β/c, c = (K − 1)/K;
    - "k1_reward": REINFORCE on v − β·log(π/a) with a leave-one-out baseline (RLOO, grpo_klr): optimum p_β.

    Returns the validity and KL(p*‖π restricted to valid) at the end, and the tilted model's validity.
    """
    from filtered_rl.control import validity_from_beta

    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: choose one of {OBJECTIVES}")
    texts = list(spec.valid) + list(spec.invalid)
    mass = torch.tensor([spec.valid.get(t, spec.invalid.get(t)) for t in texts], dtype=torch.float64)
    mass = mass / mass.sum()
    valid = torch.tensor([t in spec.valid for t in texts], dtype=torch.float64)
    length = len(texts[0])
    # Tabular per-token structure: position 0 over first characters, position 1 over (first, second).
    firsts = sorted({t[0] for t in texts})
    first_index = torch.tensor([firsts.index(t[0]) for t in texts])
    log_a1 = torch.log(torch.zeros(len(firsts), dtype=torch.float64).index_add_(0, first_index, mass))
    log_a = mass.log()
    log_a_tokens = [log_a1[first_index]] + ([log_a - log_a1[first_index]] if length == 2 else [])
    theta1 = log_a1.clone().requires_grad_(True)
    theta2 = log_a.clone().requires_grad_(True)  # one logit per full string, normalised within its first char
    optimizer = torch.optim.Adam([theta1, theta2], lr=learning_rate)
    K = group_size

    def log_tokens() -> list[torch.Tensor]:
        lp1 = torch.log_softmax(theta1, 0)[first_index]
        if length == 1:
            return [lp1]
        top = theta2.detach().max()
        norm = torch.zeros(len(firsts), dtype=torch.float64).index_add_(0, first_index, (theta2 - top).exp())
        lp2 = theta2 - top - norm.log()[first_index]
        return [lp1, lp2]

    for _ in range(steps):
        tokens = log_tokens()
        log_pi = sum(tokens)
        pi = log_pi.exp().detach()
        validity = (pi * valid).sum()
        if objective == "k1_reward":
            reward = valid - beta * (log_pi.detach() - log_a)
            # Leave-one-out baseline: E[A_i ∇log π(y_i)] = Σ π(y)(R(y) − E_π R) ∇log π(y).
            weight = pi * (reward - (pi * reward).sum())
            loss = -(weight * log_pi).sum() / length
        else:
            g = _group_advantage_weights(validity, K, scaled=objective.endswith("group_std"))
            weight = pi * torch.where(valid > 0, g[1], g[0])
            loss = -(weight * log_pi).sum() / length
            for lp, la in zip(tokens, log_a_tokens):
                if objective.startswith("k3_corrected"):
                    # E_y[log(π_t/a_t) ∇log π_t]: the ratio's gradient k3·∇log π plus ∇k3 = (1 − a_t/π_t)∇log π.
                    kl_weight = lp.detach() - la
                else:
                    # E_y[(1 − a_t/π_t) ∇log π_t]: weights π(y)·(1 − a_t/π_t), detached.
                    kl_weight = 1 - (la - lp.detach()).exp()
                loss = loss + beta * (pi * kl_weight * lp).sum() / length
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    log_pi = sum(log_tokens()).detach()
    pi = log_pi.exp()
    v = valid > 0
    log_star = log_a[v] - torch.logsumexp(log_a[v], 0)
    log_pi_valid = log_pi[v] - torch.logsumexp(log_pi[v], 0)
    base = float(mass[v].sum())
    return {
        "validity": float(pi[v].sum()),
        "kl_valid": float((log_star.exp() * (log_star - log_pi_valid)).sum()),
        "tilted_validity": validity_from_beta(beta, base),
        "base_validity": base,
    }

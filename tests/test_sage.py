"""SAGE (arXiv 2605.18864, docs/baselines.md, issue #25): TRL's KL term against the reshaped anchor q·π_ref.

- The guides on hand-computed inputs (branch: entropy above a threshold; token: normalised surprisal; random; the
  cosine schedule with restarts) and log(q·π_ref).
- Inside TRL's loss: the loss difference made by the guide is β·(k3 against log a + log q − k3 against log a), token
  mean, computed here by hand from the policy's log-probs and entropies; TRL's `kl` log is the shaped k3.
- The one-token task trained to convergence with a guide that depends on the answer (q = 3 on the five least likely
  valid digits): with TRL 1.16's default `use_bias_correction_kl` the KL gradient is reverse KL's, so the optimum is
  the tilted target π ∝ q·a·e^{c·v/β} (c = (G − 1)/G, GRPO's baseline with `scale_rewards="none"`); with the
  authors' ratio-free k3 it is the k3 fixed point β·q·a/(β·Z − c·(v − V)) derived in filtered_rl/trainers/sage.py.
- Config defaults, a help per field, errors naming the field; `filtered-rl train --algorithm sage` one step on nano.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _common import CPU, t

pytest.importorskip("trl")

from _enumerable import (  # noqa: E402
    _token_strings,
    build_base_model,
    kl,
    make_trainer,
    one_token_task,
    train_and_measure,
)

from filtered_rl.trainers._grpo import group_zscore  # noqa: E402
from filtered_rl.trainers.sage import (  # noqa: E402
    SAGEConfig,
    branch_guide,
    cosine_restarts,
    minmax_surprisal,
    random_guide,
    shaped_reference,
    token_guide,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore")  # TRL/transformers deprecation notices


# ---- the guides, by hand ---------------------------------------------------------------------------------------


def test_branch_guide_lifts_the_anchor_above_the_entropy_threshold() -> None:
    entropies = t([[0.5, 1.2, 2.2, 3.0, 9.0], [2.0, 2.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    q = branch_guide(entropies, mask, ratio=0.3, threshold=1.2, q_min=0.6, q_max=1.4)
    # 1 + 0.3·relu(H − 1.2): 1, 1, 1.3, 1.54 → 1.4 (clamp), 1.4; padding 1
    expected = [[1.0, 1.0, 1.3, 1.4, 1.4], [1.24, 1.24, 1.0, 1.0, 1.0]]
    torch.testing.assert_close(q.double(), t(expected), rtol=1e-6, atol=1e-6)
    ref = t([[-1.0, -2.0, -3.0, -4.0, -5.0], [-1.0, -1.0, -1.0, -1.0, -1.0]])
    torch.testing.assert_close(shaped_reference(ref, q), ref + torch.log(q.double()))


def test_token_guide_normalises_surprisal_within_each_completion() -> None:
    logps = t([[-0.1, -1.1, -2.1, -3.1, -4.1, -5.1, -6.1, -7.1, -8.1, -9.1, -10.1]])
    mask = torch.ones_like(logps, dtype=torch.long)
    mask[0, -1] = 0  # the last token is padding: surprisals 0.1 … 9.1, quantiles 0.55 and 8.65
    w = minmax_surprisal(logps, mask).double()
    want = ((t([0.1 + i for i in range(10)]).clamp(0.55, 8.65) - 0.55) / 8.1).tolist() + [0.0]
    torch.testing.assert_close(w, t([want]), rtol=1e-5, atol=1e-6)
    q = token_guide(logps, mask, alpha=0.3, sigma=0.0, q_min=0.6, q_max=1.4).double()
    torch.testing.assert_close(
        q, torch.where(mask.bool(), 1 + 0.3 * w, torch.ones_like(w)), rtol=1e-6, atol=1e-6
    )
    noisy = token_guide(
        logps, mask, alpha=0.3, sigma=5.0, q_min=0.6, q_max=1.4, generator=torch.Generator().manual_seed(0)
    )
    assert noisy[0, 0] == 1.0 and noisy.min() >= 0.6 and noisy.max() <= 1.4  # w = 0: no lift, no noise


def test_random_guide_and_the_cosine_schedule() -> None:
    mask = torch.tensor([[1] * 50 + [0] * 10] * 4)
    gen = torch.Generator().manual_seed(0)
    assert (random_guide(mask, prob=0.0, sigma=1.0, q_min=0.6, q_max=1.4, generator=gen) == 1).all()
    q = random_guide(mask, prob=1.0, sigma=10.0, q_min=0.6, q_max=1.4, generator=gen)
    assert (q[:, 50:] == 1).all()  # padding is never reshaped
    assert q[:, :50].min() == pytest.approx(0.6) and q[:, :50].max() == pytest.approx(1.4)
    # 800 steps, 8 cycles of 100: each starts at upper·0.9^cycle and decays to lower by the cosine
    assert cosine_restarts(0, 800, 0.3, 0.1, 8, 0.9) == pytest.approx(0.3)
    assert cosine_restarts(50, 800, 0.3, 0.1, 8, 0.9) == pytest.approx(0.2)
    assert cosine_restarts(100, 800, 0.3, 0.1, 8, 0.9) == pytest.approx(0.27)
    assert cosine_restarts(799, 800, 0.3, 0.1, 8, 0.9) == pytest.approx(0.1, abs=1e-3)
    assert cosine_restarts(900, 800, 0.3, 0.1, 8, 0.9) == pytest.approx(
        0.3 * 0.9**7
    )  # no decay past the last


# ---- configs ---------------------------------------------------------------------------------------------------


def test_config_carries_the_authors_defaults_and_a_help_for_every_field(tmp_path: Path) -> None:
    cfg = SAGEConfig(output_dir=str(tmp_path), **CPU)
    assert (cfg.beta, cfg.sage_guide, cfg.sage_q_min, cfg.sage_q_max) == (0.05, "branch", 0.6, 1.4)
    assert (cfg.sage_branch_ratio, cfg.sage_branch_threshold, cfg.sage_cycles, cfg.sage_cycle_decay) == (
        0.3,
        1.2,
        8,
        0.9,
    )
    assert (
        cfg.sage_token_alpha,
        cfg.sage_token_alpha_min,
        cfg.sage_token_sigma,
        cfg.sage_token_sigma_min,
    ) == (0.3, 0.1, 0.25, 0.1)
    assert (
        cfg.sage_random_prob,
        cfg.sage_random_prob_min,
        cfg.sage_random_sigma,
        cfg.sage_random_sigma_min,
    ) == (0.1, 0.0, 0.15, 0.05)
    for name, spec in SAGEConfig.__dataclass_fields__.items():
        if name.startswith("sage_") or name == "beta":
            assert spec.metadata.get("help"), f"SAGEConfig.{name} has no help"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(beta=0.0), "beta"),
        (dict(sage_guide="entropy"), "sage_guide"),
        (dict(sage_q_min=0.0), "sage_q_min"),
        (dict(sage_q_min=1.5, sage_q_max=1.4), "sage_q_max"),
        (dict(sage_branch_ratio=-0.1), "sage_branch_ratio"),
        (dict(sage_branch_threshold=float("nan")), "sage_branch_threshold"),
        (dict(sage_token_sigma=-1.0), "sage_token_sigma"),
        (dict(sage_random_prob=1.5), "sage_random_prob"),
        (dict(sage_cycles=0), "sage_cycles"),
        (dict(sage_cycle_decay=0.0), "sage_cycle_decay"),
        (dict(use_liger_kernel=True), "use_liger_kernel"),
        (dict(multi_objective_aggregation="normalize_then_sum"), "multi_objective_aggregation"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SAGEConfig(output_dir=str(tmp_path), **CPU, **overrides)


# ---- inside TRL ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from _tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def build(model_dir: Path, out: Path, **options):
    from _tiny_model import has_digit
    from datasets import Dataset

    from filtered_rl.trainers import ALGORITHMS

    entry = ALGORITHMS["sage"]
    rows = [{"prompt": f"q{i}:"} for i in range(4)]
    values = dict(output_dir=str(out), max_completion_length=8, num_generations=4, per_device_train_batch_size=8,
                  max_steps=1, learning_rate=1e-2, seed=0, **CPU)  # fmt: skip
    args = entry.config_class(**(values | options))
    trainer = entry.trainer_class(
        model=str(model_dir), reward_funcs=has_digit, args=args, train_dataset=Dataset.from_list(rows)
    )
    return trainer, rows


def k3(log_anchor: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    d = log_anchor - logps
    return d.exp() - d - 1


@pytest.mark.parametrize("bias_correction", [True, False])
def test_the_guide_reshapes_the_reference_inside_trls_kl_term(
    tiny_model_dir: Path, tmp_path: Path, bias_correction: bool
) -> None:
    """On-policy (the ratio is 1 in value, with or without TRL's bias correction), loss(guide) − loss(q ≡ 1) =
    β·Σ_tokens [k3(log a + log q − log π) − k3(log a − log π)] / tokens ("dapo"), q from the policy's own entropies
    by the branch formula; the advantages are GRPO's; TRL's `kl` log is the mean shaped k3."""
    from _tiny_model import has_digit

    trainer, rows = build(tiny_model_dir, tmp_path / "a", beta=0.3, sage_branch_threshold=0.5, sage_branch_ratio=0.5,
                          sage_q_max=3.0, use_bias_correction_kl=bias_correction)  # fmt: skip
    assert trainer.ref_model is not None  # beta > 0: TRL's reference model
    trainer.model.train()
    inputs = trainer._prepare_inputs([row for row in rows[:2] for _ in range(4)])
    completions = trainer.processing_class.batch_decode(inputs["completion_ids"], skip_special_tokens=True)
    valid = t(has_digit(completions))
    torch.testing.assert_close(inputs["advantages"].double(), group_zscore(valid, 4), rtol=1e-5, atol=1e-5)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    with torch.no_grad():
        shaped = trainer.compute_loss(trainer.model, inputs)
        kl_logged = trainer._metrics["train"]["kl"][-1]
        q_mean = trainer._metrics["train"]["sage/q_mean"][-1]
        trainer.guide = lambda logps, entropies, mask, batch: torch.ones_like(logps)
        plain = trainer.compute_loss(trainer.model, inputs)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, inputs["completion_ids"].size(1), compute_entropy=True
        )
    mask = inputs["completion_mask"].bool()
    assert inputs["ref_per_token_logps"].shape == logps.shape  # the caller's dict is not modified
    q = torch.where(
        mask, (1 + 0.5 * (entropies - 0.5).clamp(min=0)).clamp(0.6, 3.0), torch.ones_like(entropies)
    )
    assert (q[mask] != 1).any()  # the guide reshapes some tokens
    ref = inputs["ref_per_token_logps"]
    k3_shaped = k3(ref + q.log(), logps)
    difference = 0.3 * ((k3_shaped - k3(ref, logps)) * mask).sum() / inputs["num_items_in_batch"]
    assert float(shaped - plain) == pytest.approx(float(difference), rel=1e-4, abs=1e-7)
    assert kl_logged == pytest.approx(float(k3_shaped[mask].mean()), rel=1e-4)
    assert q_mean == pytest.approx(float(q[mask].mean()), rel=1e-5)


def test_trains_a_step_and_logs_the_guide(tiny_model_dir: Path, tmp_path: Path) -> None:
    for guide in ("branch", "token", "random"):
        trainer, _ = build(tiny_model_dir, tmp_path / guide, sage_guide=guide)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logs) == 1 and math.isfinite(logs[0]["loss"])
        assert {"sage/validity", "sage/q_mean", "sage/frac_shaped", "kl"} <= set(logs[0])
        assert 0.6 <= logs[0]["sage/q_min"] <= logs[0]["sage/q_max"] <= 1.4


# ---- the optimum on the enumerable one-token task --------------------------------------------------------------

ONE_TOKEN = one_token_task((0.2,))
BETA, GROUP = 0.3, 64
# Plain SGD without gradient clipping: Adam's normalisation and clipping bias a rare, large k3 gradient (see
# docs/controller.md); SGD's fixed point is the expected gradient's zero.
RUN = dict(
    steps=300, learning_rate=0.3, optim="sgd", max_grad_norm=0.0, scale_rewards="none", num_generations=GROUP
)
LIFTED = "56789"  # the five least likely valid digits get q = 3


@pytest.fixture(scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def one_token_base(tmp_path_factory, one_thread) -> Path:
    return build_base_model(tmp_path_factory.mktemp("one"), ONE_TOKEN)


def targets(a: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log tilted target ∝ q·a·e^{c·v/β}, log k3 fixed point β·q·a/(β·Z − c·(v − V))) on one token."""
    c = (GROUP - 1) / GROUP
    tilted = torch.log_softmax(torch.log(q * a) + c * v / BETA, 0)
    z, qv = float((q * a).sum()), float((q * a * v).sum())
    b = BETA * z - c
    validity = (-b + math.sqrt(b * b + 4 * c * BETA * qv)) / (2 * c)
    fixed = BETA * q * a / (BETA * z - c * (v - validity))
    return tilted, fixed.log()


@pytest.mark.parametrize("bias_correction", [True, False])
def test_one_token_optimum_is_the_reshaped_tilted_target(
    one_token_base: Path, tmp_path: Path, bias_correction: bool
) -> None:
    """Measured (torch 2.13 CPU, seed 0, 300 SGD steps at 0.3, G = 64, β = 0.3): with TRL's bias correction
    validity 0.902 (tilted target 0.902, k3 fixed point 0.780), KL(tilted‖π) 0.014, KL(k3 fixed point‖π) 0.078;
    without it (the authors' loss) validity 0.779, KL(k3 fixed point‖π) 0.002, KL(tilted‖π) 0.054. The two targets
    are 0.064 nats apart; q = 3 on five valid digits moves both off p*'s proportions."""
    trainer = make_trainer("sage", one_token_base, ONE_TOKEN, tmp_path / "out", beta=BETA,
                           use_bias_correction_kl=bias_correction, **RUN)  # fmt: skip
    strings = _token_strings(trainer.processing_class)
    table = torch.ones(len(strings), dtype=torch.float64)
    for s in LIFTED:
        table[strings.index(s)] = 3.0

    def guide(logps, entropies, mask, inputs):
        q = table[inputs["completion_ids"].cpu()].to(device=logps.device, dtype=logps.dtype)
        return torch.where(mask.bool(), q, torch.ones_like(q))

    trainer.guide = guide
    outcome = train_and_measure(trainer, ONE_TOKEN)
    base, policy = outcome.base[0], outcome.policy[0]
    a, v = base.log_probs.exp(), base.valid.double()
    tilted, fixed = targets(a, table[: a.numel()], v)
    to_tilted, to_fixed = kl(tilted, policy.log_probs), kl(fixed, policy.log_probs)
    print(f"bias_correction={bias_correction}: validity {outcome.validity:.4f}, KL(tilted|pi) {to_tilted:.4f}, "
          f"KL(k3 fixed point|pi) {to_fixed:.4f}, targets {float(tilted.exp()[base.valid].sum()):.4f} / "
          f"{float(fixed.exp()[base.valid].sum()):.4f}")  # fmt: skip
    assert kl(tilted, fixed) > 0.05  # the two readings are distinguishable here
    if bias_correction:
        assert to_tilted < 0.03 and to_tilted < to_fixed / 3
    else:
        assert to_fixed < 0.01 and to_fixed < to_tilted / 3


# ---- `filtered-rl train --algorithm sage` on the nano countdown model ---------------------------------------------


def test_filtered_rl_train_runs_a_step_on_the_nano_model(nano_model_dir: Path, tmp_path: Path) -> None:
    """The nano recipe's `sage:` section, one step, in process (2 processes: tests/test_baselines_launch.py, slow)."""
    from filtered_rl.train import main

    out = tmp_path / "run"
    code = main(
        ["--config", str(ROOT / "recipes" / "configs" / "countdown-nano-cpu.yaml"), "--algorithm", "sage",
         "--model_name_or_path", str(nano_model_dir), "--output_dir", str(out), "--countdown_train_prompts", "16",
         "--max_steps", "1", "--per_device_train_batch_size", "8", "--logging_steps", "1", "--disable_tqdm", "true"]
    )  # fmt: skip
    assert code in (0, None)
    assert (out / "model.safetensors").exists()
    state_file = out / "trainer_state.json"
    if state_file.exists():
        logs = [entry for entry in json.loads(state_file.read_text())["log_history"] if "loss" in entry]
        assert logs and "sage/validity" in logs[0] and "sage/q_mean" in logs[0]

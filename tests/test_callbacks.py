"""BetaFromValidityCallback on the KL-in-reward trainers (grpo_klr, TRL's RLOOTrainer): β set, used, logged
and checkpointed; TRL's GRPOTrainer (k3 KL in the loss) refused with the alternatives named."""

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from _tiny_model import has_digit, save_tiny_model  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

import filtered_rl.callbacks as callbacks_module  # noqa: E402
from filtered_rl.callbacks import BetaFromValidityCallback  # noqa: E402
from filtered_rl.control import batch_beta_from_validity  # noqa: E402
from filtered_rl.trainers.grpo_kl_reward import GRPOKLRewardConfig, GRPOKLRewardTrainer  # noqa: E402

CPU = dict(
    use_cpu=True, bf16=False, report_to=[], logging_steps=1, disable_tqdm=True, gradient_checkpointing=False
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Qwen2 with the project's character tokenizer: mechanics need no training."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def prompts(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": [f"make {t} with 1 2 3 4:" for t in range(n)]})


def make_trainer(kind, model_dir, tmp_path, reward_funcs=has_digit, dataset=None, **overrides):
    config_class, trainer_class = {
        "grpo": (GRPOConfig, GRPOTrainer),
        "grpo_klr": (GRPOKLRewardConfig, GRPOKLRewardTrainer),
        "rloo": (RLOOConfig, RLOOTrainer),
    }[kind]
    values = dict(
        output_dir=str(tmp_path / f"out_{kind}"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        learning_rate=5e-2,
        beta=0.04,
        seed=0,
        save_strategy="no",
        **CPU,
    )
    values.update(overrides)
    return trainer_class(
        model=str(model_dir),
        reward_funcs=reward_funcs,
        args=config_class(**values),
        train_dataset=dataset if dataset is not None else prompts(),
    )


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def spy_generations(trainer, callback):
    """Record trainer.beta when TRL scores a training generation (RLOO folds β·KL into the rewards right
    after `_calculate_rewards`) and right after the generation (once the controller has updated it)."""
    generate, calculate_rewards = trainer._generate_and_score_completions, trainer._calculate_rewards
    record = {"at_rewards": [], "after": []}

    def scoring(*args, **kwargs):
        record["at_rewards"].append(float(trainer.beta))
        return calculate_rewards(*args, **kwargs)

    def generate_and_score(inputs):
        output = generate(inputs)
        record["after"].append(float(trainer.beta))
        return output

    trainer._calculate_rewards, trainer._generate_and_score_completions = scoring, generate_and_score
    return record


def test_grpo_klr_nano_countdown_sets_and_logs_beta_every_step(nano_model_dir, countdown_data, tmp_path):
    from filtered_rl.synthetic.countdown_verifier import CountdownVerifier

    trainer = make_trainer(
        "grpo_klr",
        nano_model_dir,
        tmp_path,
        reward_funcs=CountdownVerifier(),
        dataset=countdown_data["train"],
        max_completion_length=16,
        learning_rate=1e-5,
    )
    callback = BetaFromValidityCallback(target_validity=0.97, closed_loop=True).attach(trainer)
    record = spy_generations(trainer, callback)
    trainer.train()

    betas = logged(trainer, "kl_control/beta")
    assert len(betas) == 3 and all(0 < b < math.inf for b in betas)
    assert logged(trainer, "kl_control/target_validity") == [0.97] * 3
    assert len(logged(trainer, "grpo_klr/kl")) == 3  # the KL in the reward that β weighs
    assert "kl" not in trainer.state.log_history[0]  # TRL's k3 loss term stays off
    assert betas == record["after"]  # every step logs the β in force after its generation
    assert record["at_rewards"][0] == 0.04 and record["at_rewards"][1:] == record["after"][:-1]
    assert float(trainer.beta) == betas[-1] == callback.controller.beta
    informative = logged(trainer, "kl_control/informative_prompts")
    assert len(informative) == 3  # A and the observed validity are logged for generations that inform β
    assert len(logged(trainer, "kl_control/base_validity")) == sum(f > 0 for f in informative)
    assert len(callback.tracker.values) == 3 * 8 // 4  # one A estimate per prompt seen


@pytest.mark.parametrize("steps_per_generation", [1, 2])
def test_grpo_klr_beta_follows_open_loop_formula_and_reaches_the_advantages(
    tiny_model_dir, tmp_path, monkeypatch, steps_per_generation
):
    trainer = make_trainer(
        "grpo_klr", tiny_model_dir, tmp_path, max_steps=4, steps_per_generation=steps_per_generation
    )
    callback = BetaFromValidityCallback(target_validity=0.9, estimator="importance").attach(trainer)
    assert trainer.reward_funcs[0].__name__ == "has_digit"  # TRL's logged name survives the wrapper

    seen_logps, advantage_betas, loss_betas = [], [], []
    original = callbacks_module._sequence_logps_for_importance
    monkeypatch.setattr(
        callbacks_module,
        "_sequence_logps_for_importance",
        lambda t, output: seen_logps.append(original(t, output)) or seen_logps[-1],
    )
    smoothed_batches = []
    original_step = callback.controller.step
    callback.controller.step = lambda base, observed=None: (
        smoothed_batches.append(base.clone()),
        original_step(base, observed),
    )[1]
    compute_advantages, compute_loss = trainer.compute_advantages, trainer._compute_loss
    trainer.compute_advantages = lambda batch: (
        advantage_betas.append(float(trainer.beta)),
        compute_advantages(batch),
    )[1]
    trainer._compute_loss = lambda model, inputs: (
        loss_betas.append(float(trainer.beta)),
        compute_loss(model, inputs),
    )[1]
    trainer.train()

    generations = 4 // steps_per_generation
    assert len(seen_logps) == len(smoothed_batches) == len(advantage_betas) == generations
    # First generation: the sampling policy is the reference (same weights): log π_old = log a.
    log_ref, log_old = seen_logps[0]
    assert torch.allclose(log_ref, log_old, atol=1e-4)
    expected, beta = [], 0.04  # open loop: β = clamp(batch solver on the informative prompts), else kept
    for smoothed in smoothed_batches:
        informative = smoothed[(smoothed > 0) & (smoothed < 1)]
        if informative.numel():
            solved = batch_beta_from_validity(0.9, informative, strict=False)
            beta = min(max(solved, 1e-3), 10.0)
        expected.append(beta)
    # Generation t's advantages fold in the β computed from generation t − 1 (the first: the configured one).
    assert advantage_betas == pytest.approx([0.04, *expected[:-1]], rel=1e-12)
    assert logged(trainer, "grpo_klr/beta") == pytest.approx(advantage_betas, rel=1e-12)
    assert logged(trainer, "kl_control/beta") == pytest.approx(
        [b for b in expected for _ in range(steps_per_generation)], rel=1e-12
    )
    assert any(0 < b < 10 and b != 0.04 for b in expected)
    assert "kl" not in trainer.state.log_history[0]  # β never reaches TRL's k3 loss term
    if steps_per_generation == 2:
        assert len(logged(trainer, "kl_control/ess")) == 2


def test_rloo_beta_is_set_before_the_next_generation_uses_it(tiny_model_dir, tmp_path):
    trainer = make_trainer("rloo", tiny_model_dir, tmp_path, max_steps=3)
    callback = BetaFromValidityCallback(target_validity=0.9).attach(trainer)
    record = spy_generations(trainer, callback)
    trainer.train()

    assert record["at_rewards"][0] == 0.04  # the first generation's rewards use RLOOConfig.beta
    assert record["after"][0] != 0.04
    assert record["at_rewards"][1:] == record["after"][:-1]  # each later generation folds in the latest β
    assert logged(trainer, "kl_control/beta") == record["after"]
    assert len(logged(trainer, "kl")) == 3
    assert logged(trainer, "kl_control/ess")[0] == pytest.approx(1.0)  # π_old = a at the first generation


@pytest.mark.parametrize("estimator", ["policy", "column"])
def test_free_estimators(tiny_model_dir, tmp_path, estimator):
    dataset = prompts().add_column("base_validity", [0.2] * 8)
    trainer = make_trainer("grpo_klr", tiny_model_dir, tmp_path, dataset=dataset, max_steps=2)
    callback = BetaFromValidityCallback(target_validity=0.6, estimator=estimator).attach(trainer)
    trainer.train()
    if estimator == "column":  # A = 0.2 everywhere: β = 1/(logit 0.6 − logit 0.2) exactly
        assert trainer.beta == pytest.approx(1 / (math.log(0.6 / 0.4) - math.log(0.2 / 0.8)))
        assert logged(trainer, "kl_control/base_validity") == [pytest.approx(0.2)] * 2
    assert "kl_control/ess" not in trainer.state.log_history[0]
    assert callback.generations == 2


def test_attach_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="beta=0.0.*RLOOConfig\\(beta=0.04\\)"):
        BetaFromValidityCallback(target_validity=0.9).attach(
            make_trainer("rloo", tiny_model_dir, tmp_path, beta=0.0)
        )
    # grpo_klr builds the reference model whatever beta is: beta=0 at construction is fine.
    BetaFromValidityCallback(target_validity=0.9).attach(
        make_trainer("grpo_klr", tiny_model_dir, tmp_path, beta=0.0)
    )
    two = make_trainer(
        "grpo_klr",
        tiny_model_dir,
        tmp_path,
        reward_funcs=[has_digit, lambda completions, **kw: [0.5] * len(completions)],
    )
    with pytest.raises(ValueError, match="validity_reward"):
        BetaFromValidityCallback(target_validity=0.9).attach(two)
    with pytest.raises(ValueError, match="validity_reward='nope'"):
        BetaFromValidityCallback(target_validity=0.9, validity_reward="nope").attach(two)
    BetaFromValidityCallback(target_validity=0.9, validity_reward="has_digit").attach(two)
    with pytest.raises(ValueError, match="already has"):
        BetaFromValidityCallback(target_validity=0.9, validity_reward="has_digit").attach(two)
    with pytest.raises(ValueError, match="estimator="):
        BetaFromValidityCallback(target_validity=0.9, estimator="oracle")
    with pytest.raises(ValueError, match="target_validity"):
        BetaFromValidityCallback(target_validity=1.0)


def test_grpo_trainer_is_refused_naming_the_working_alternatives(tiny_model_dir, tmp_path):
    """TRL's GRPOTrainer weighs k3 in the loss: β-from-μ does not reach μ there (docs/controller.md)."""
    grpo = make_trainer("grpo", tiny_model_dir, tmp_path)
    with pytest.raises(ValueError) as refused:
        BetaFromValidityCallback(target_validity=0.6).attach(grpo)
    message = str(refused.value)
    for alternative in ("GRPOKLRewardTrainer", "'grpo_klr'", "RLOOTrainer", "target_validity=μ", "'tilted'"):
        assert alternative in message
    assert "KL(a‖π)" in message and "scale_rewards" in message
    assert not any(isinstance(cb, BetaFromValidityCallback) for cb in grpo.callback_handler.callbacks)
    assert grpo.reward_funcs[0] is has_digit  # nothing was wrapped before refusing

    from filtered_rl.trainers.filtered import FilteredGRPOConfig, FilteredGRPOTrainer

    filtered = FilteredGRPOTrainer(
        model=str(tiny_model_dir),
        reward_funcs=has_digit,
        args=FilteredGRPOConfig(
            output_dir=str(tmp_path / "f"), per_device_train_batch_size=8, num_generations=4, **CPU
        ),
        train_dataset=prompts(),
    )
    with pytest.raises(ValueError, match="has its own target_validity"):
        BetaFromValidityCallback(target_validity=0.6).attach(filtered)
    # Measuring the refused combination stays possible, explicitly.
    callback = BetaFromValidityCallback(target_validity=0.6).attach(grpo, allow_loss_kl=True)
    assert callback.trainer is grpo


def test_non_binary_rewards_are_refused(tiny_model_dir, tmp_path):
    trainer = make_trainer(
        "grpo_klr", tiny_model_dir, tmp_path, reward_funcs=lambda completions, **kw: [0.5] * len(completions)
    )
    BetaFromValidityCallback(target_validity=0.9).attach(trainer)
    with pytest.raises(ValueError, match="binary"):
        trainer.train()


@pytest.mark.parametrize("trainer_restores", [False, True])
def test_controller_state_survives_checkpoint_and_resume(tiny_model_dir, tmp_path, trainer_restores):
    common = dict(
        save_strategy="steps", save_steps=2, restore_callback_states_from_checkpoint=trainer_restores
    )
    first = make_trainer("grpo_klr", tiny_model_dir, tmp_path, max_steps=2, **common)
    callback = BetaFromValidityCallback(target_validity=0.9, closed_loop=True).attach(first)
    first.train()
    checkpoint = Path(first.args.output_dir) / "checkpoint-2"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    saved = saved["BetaFromValidityCallback"]["attributes"]
    assert saved["generations"] == 2 and saved["controller_state"]["beta"] == pytest.approx(
        callback.controller.beta
    )
    assert set(saved["tracker_state"]["values"]) == set(callback.tracker.values)

    resumed = make_trainer("grpo_klr", tiny_model_dir, tmp_path, max_steps=3, **common)
    fresh = BetaFromValidityCallback(target_validity=0.9, closed_loop=True).attach(resumed)
    record = spy_generations(resumed, fresh)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    active = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, BetaFromValidityCallback)]
    assert len(active) == 1 and active[0].generations == 3  # 2 restored + 1 new
    assert set(saved["tracker_state"]["values"]) <= set(active[0].tracker.values)
    assert record["at_rewards"][0] == pytest.approx(saved["controller_state"]["beta"])  # restored β in force
    visits = sum(count for _, count in active[0].tracker.values.values())
    assert visits == 3 * 8 // 4

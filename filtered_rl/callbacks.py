"""Set the KL coefficient of a KL-in-reward trainer from a target validity μ, each generation.

    from filtered_rl.trainers.grpo_kl_reward import GRPOKLRewardConfig, GRPOKLRewardTrainer

    callback = BetaFromValidityCallback(target_validity=0.8)
    trainer = GRPOKLRewardTrainer(model=path, reward_funcs=verifier, args=GRPOKLRewardConfig(...), train_dataset=ds)
    callback.attach(trainer)
    trainer.train()

Which trainers: β = 1/(logit μ − logit A) is exact for the optimum of E_π[v] − β·KL(π‖a), the tilted model
p_β, and only trainers that descend that objective get there: TRL's RLOOTrainer (k1 KL folded into the
reward) and `GRPOKLRewardTrainer` (algorithm `grpo_klr`, the same in GRPO's trainer). TRL's GRPOTrainer puts
β·k3 in the loss (gradient of KL(a‖π)) and by default scales only the verifier's advantages by the group
std; on an enumerable task μ = 0.6 ended at 0.99 (docs/controller.md), so `attach` refuses it and names
these alternatives. `FilteredGRPOTrainer(target="tilted", target_validity=μ)` has the rule built in.

Why `attach` and not just `callbacks=[...]`: a TrainerCallback sees neither the trainer nor the
rewards nor the log-probs, and the β-from-μ rule needs all three. `attach` therefore

1. wraps the verifier reward function in a `ValidityRecorder`, which passes the rewards through and
   keeps the last batch's 0/1 verdicts (the only place raw rewards exist: TRL discards them);
2. wraps the trainer instance's `_generate_and_score_completions` (the hook TRL's maintainers advise
   subclasses to override): after TRL has generated and scored a batch, the verdicts, prompt ids and
   sequence log-probs are gathered across processes, A(x) is estimated per prompt and averaged by a
   `ValidityTracker`, and `BetaController` sets `trainer.beta`;
3. registers itself as a callback, to log β every optimizer step and to save/restore the controller.

Estimators of A(x) (`estimator=`):
- "importance" (default): the policy's samples weighted by a/π_old, Â = (1/K) Σ w_i v_i
  (`control.estimate_base_validity`, i.e. `divergences.group_log_partition`). grpo_klr: the reference
  log-probs come with the batch (β > 0); the sampling policy's cost one extra no-grad forward unless TRL
  computed them. RLOO: the policy's come with the batch, the reference's cost one extra no-grad forward
  (TRL drops them).
- "policy": the plain mean of the policy's verdicts. Free; exact while π = a, biased upward (hence β
  too large, a weaker pull) as the policy improves.
- "column": a dataset column (`base_validity_column`) holding A(x) measured offline from the base
  model's samples (plain mean of K verdicts). Free and unbiased; needs the extra pass beforehand.

When β takes effect: both accepted trainers fold β·KL into the rewards *inside* generation, before this
hook runs, so β computed from generation t shapes the rewards of generation t+1; the first generation
uses the β the trainer was built with. (With `allow_loss_kl=True` on a GRPOTrainer, the loss of the same
generation's steps uses it.)

Checkpointing: the callback is a transformers `ExportableState`; the Trainer stores `state()` (the
controller's integral and β, the per-prompt A table) in `trainer_state.json` under
`stateful_callbacks`, and `on_train_begin` restores it in place when training resumes from a
checkpoint (whatever `restore_callback_states_from_checkpoint` says).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from filtered_rl.control import (
    BetaController,
    BetaControllerConfig,
    ValidityTracker,
    estimate_base_validity,
    prompt_key,
)
from filtered_rl.divergences import group_ess
from filtered_rl.trainers._base import per_token_logps

ESTIMATORS = ("importance", "policy", "column")
METRIC_PREFIX = "kl_control/"


class ValidityRecorder:
    """A reward function that returns the wrapped verifier's rewards and remembers them as verdicts.

    None (unscorable) is kept as NaN here and counted as invalid by the estimators; any value other
    than 0, 1 or None is refused, since μ and A are probabilities of a binary verdict.
    """

    def __init__(self, reward_func: Any):
        self.reward_func = reward_func
        self.__name__ = getattr(reward_func, "__name__", type(reward_func).__name__)
        self.last_verdicts: list[float] | None = None

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        rewards = self.reward_func(prompts=prompts, completions=completions, **kwargs)
        verdicts = [math.nan if r is None else float(r) for r in rewards]
        bad = [r for r in verdicts if not (math.isnan(r) or r in (0.0, 1.0))]
        if bad:
            raise ValueError(
                f"reward function {self.__name__!r} returned {bad[:3]}: BetaFromValidityCallback needs binary "
                "verdicts (0, 1 or None); pass the verifier's name as validity_reward=... when there are several "
                "reward functions"
            )
        self.last_verdicts = verdicts
        return rewards


class BetaFromValidityCallback(TrainerCallback, ExportableState):
    """β each generation such that the KL-control optimum p_β has mean validity `target_validity`.

    Arguments after `target_validity` are those of `control.BetaControllerConfig` (closed loop, gains,
    bounds on β), then `estimator` (see the module docstring), `base_validity_column` (for
    estimator="column"), `decay` (per-prompt EMA of A across epochs), `validity_reward` (name of the
    binary reward function when the trainer has several) and `max_prompts` (size bound of the A table).
    """

    def __init__(
        self,
        target_validity: float,
        closed_loop: bool = False,
        kp: float = 0.1,
        ki: float = 0.02,
        max_error: float = 2.0,
        observation_decay: float = 0.9,
        integral_band: float = 0.5,
        settle_tolerance: float = 0.25,
        max_correction: float = 1.5,
        max_step: float = 0.05,
        beta_min: float = 1e-3,
        beta_max: float = 10.0,
        estimator: str = "importance",
        base_validity_column: str = "base_validity",
        decay: float | None = None,
        validity_reward: str | None = None,
        max_prompts: int = 1_000_000,
    ):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r} is not supported; choose one of {ESTIMATORS}")
        self.config = BetaControllerConfig(
            target_validity=target_validity,
            closed_loop=closed_loop,
            kp=kp,
            ki=ki,
            max_error=max_error,
            observation_decay=observation_decay,
            integral_band=integral_band,
            settle_tolerance=settle_tolerance,
            max_correction=max_correction,
            max_step=max_step,
            beta_min=beta_min,
            beta_max=beta_max,
        )
        if decay is None:
            # A(x) is a property of the fixed base model: the importance and column estimates of every visit
            # estimate the same number, so they are averaged (weight 1/n up to 1000 visits). The policy's own
            # validity drifts as it trains, so that estimator keeps a short memory.
            decay = 0.9 if estimator == "policy" else 0.999
        self.estimator = estimator
        self.base_validity_column = base_validity_column
        self.validity_reward = validity_reward
        self.controller = BetaController(self.config)
        self.tracker = ValidityTracker(decay=decay, max_prompts=max_prompts)
        self.trainer: Any = None
        self.generations = 0

    # ---- wiring ------------------------------------------------------------------------------------

    def attach(self, trainer: Any, *, allow_loss_kl: bool = False) -> BetaFromValidityCallback:
        """Hook this controller into a constructed trainer whose `beta` weighs KL(π‖a) in the reward; returns self.

        Accepted: TRL's RLOOTrainer, and trainers declaring `kl_in_reward = True` (`GRPOKLRewardTrainer`,
        algorithm `grpo_klr`). Refused: TRL's GRPOTrainer and its subclasses, whose `beta` weighs the k3
        estimator in the loss (see `loss_kl_refusal`); `allow_loss_kl=True` attaches anyway, for measuring
        that combination (benchmarks/controller_table.py), not for training toward μ.
        """
        if not hasattr(trainer, "beta") or not hasattr(trainer, "_generate_and_score_completions"):
            raise TypeError(f"{type(trainer).__name__} is not a TRL GRPOTrainer/RLOOTrainer (no `beta`)")
        if not allow_loss_kl and kl_placement(trainer) == "loss":
            raise ValueError(loss_kl_refusal(trainer))
        builds_reference = getattr(trainer, "needs_reference_model", False) and hasattr(
            trainer, "register_state"
        )
        if not builds_reference and not trainer.beta > 0:
            raise ValueError(
                f"{type(trainer).__name__} was built with beta={trainer.beta}: TRL creates the reference model "
                "only when beta > 0, and the controller needs it. Set e.g. RLOOConfig(beta=0.04); the controller "
                "overwrites the value from the first generation on"
            )
        if getattr(trainer.args, "sync_ref_model", False):
            raise ValueError(
                "sync_ref_model=True moves the reference model, so A(x) and β = 1/(logit μ − logit A) lose their "
                "meaning; set sync_ref_model=False"
            )
        if any(isinstance(cb, BetaFromValidityCallback) for cb in trainer.callback_handler.callbacks):
            raise ValueError("this trainer already has a BetaFromValidityCallback; attach only one")
        trainer._validity_recorder = _wrap_validity_reward(trainer, self.validity_reward)
        if not getattr(trainer, "_beta_from_validity_hooked", False):
            _hook_generation(trainer)
        self.trainer = trainer
        if self.generations == 0:  # until the first batch, keep the β the user constructed with
            self.controller.beta = self.controller.open_loop_beta = float(trainer.beta)
        trainer.beta = float(self.controller.beta)
        trainer.add_callback(self)
        return self

    # ---- the update, once per training generation ----------------------------------------------------

    def observe_generation(self, trainer: Any, inputs: list[dict], output: dict) -> None:
        """Estimate A per prompt, update the tracker and the controller, set trainer.beta, log metrics."""
        self.trainer = trainer
        group_size = trainer.num_generations
        device = trainer.accelerator.device
        verdicts_local = trainer._validity_recorder.last_verdicts
        if verdicts_local is None or len(verdicts_local) != len(inputs):
            raise RuntimeError("the validity reward function was not called on this batch; was it replaced?")
        verdicts = trainer.accelerator.gather(
            torch.tensor(verdicts_local, dtype=torch.float32, device=device)
        )
        verdicts = torch.nan_to_num(verdicts.double().cpu(), nan=0.0)  # unscorable counts as invalid
        keys = gather_object([prompt_key(row["prompt"]) for row in inputs])
        group_keys = keys[::group_size]

        metrics: dict[str, float] = {}
        if self.estimator == "policy":
            estimates = estimate_base_validity(verdicts, group_size)
        elif self.estimator == "column":
            if self.base_validity_column not in inputs[0]:
                raise KeyError(
                    f"estimator='column' needs a dataset column {self.base_validity_column!r} with A(x) per prompt; "
                    "add it or set base_validity_column=..."
                )
            column = gather_object([float(row[self.base_validity_column]) for row in inputs])
            estimates = torch.tensor(column[::group_size], dtype=torch.float64)
        else:
            log_ref, log_old = _sequence_logps_for_importance(trainer, output)
            log_ref = trainer.accelerator.gather(log_ref.float()).double().cpu()
            log_old = trainer.accelerator.gather(log_old.float()).double().cpu()
            estimates = estimate_base_validity(verdicts, group_size, log_ref, log_old)
            metrics["ess"] = float(group_ess(log_ref - log_old, group_size).mean())
            metrics["raw_base_validity"] = float(estimates.mean())

        smoothed = self.tracker.update(group_keys, estimates)
        observed = verdicts.view(-1, group_size).mean(dim=1)
        informative = (smoothed > 0) & (smoothed < 1)
        observed_validity = float(observed[informative].mean()) if informative.any() else None
        trainer.beta = self.controller.step(smoothed, observed_validity)
        self.generations += 1

        metrics["open_loop_beta"] = self.controller.open_loop_beta
        metrics["informative_prompts"] = float(informative.double().mean())
        if informative.any():
            metrics["base_validity"] = float(smoothed[informative].mean())
            metrics["observed_validity"] = observed_validity
        for name, value in metrics.items():
            trainer._metrics["train"][METRIC_PREFIX + name].append(value)

    # ---- callback events -----------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step > 0 and stored:
            stored = stored[0] if isinstance(stored, list) else stored
            self._load_attributes(stored.get("attributes", {}))
            if self.trainer is not None:
                self.trainer.beta = float(self.controller.beta)

    def on_step_end(self, args, state, control, **kwargs):
        # Once per optimizer step, so that every logged step carries the β in force (generation may be rarer).
        if self.trainer is not None:
            metrics = self.trainer._metrics["train"]
            metrics[METRIC_PREFIX + "beta"].append(float(self.trainer.beta))
            metrics[METRIC_PREFIX + "target_validity"].append(self.config.target_validity)

    # ---- checkpointing (transformers ExportableState) ------------------------------------------------

    def state(self) -> dict:
        config = asdict(self.config)
        args = {
            **config,
            "estimator": self.estimator,
            "base_validity_column": self.base_validity_column,
            "decay": self.tracker.decay,
            "validity_reward": self.validity_reward,
            "max_prompts": self.tracker.max_prompts,
        }
        attributes = {
            "controller_state": self.controller.state_dict(),
            "tracker_state": self.tracker.state_dict(),
            "generations": self.generations,
        }
        return {"args": args, "attributes": attributes}

    def _load_attributes(self, attributes: dict) -> None:
        for name, value in attributes.items():
            setattr(self, name, value)

    # Setters, so that the Trainer's own restore path (setattr of each attribute) also works.
    @property
    def controller_state(self) -> dict:
        return self.controller.state_dict()

    @controller_state.setter
    def controller_state(self, value: dict) -> None:
        self.controller.load_state_dict(value)

    @property
    def tracker_state(self) -> dict:
        return self.tracker.state_dict()

    @tracker_state.setter
    def tracker_state(self, value: dict) -> None:
        self.tracker.load_state_dict(value)


def kl_placement(trainer: Any) -> str:
    """Where `trainer.beta` puts the KL: "reward" (RLOO, trainers with `kl_in_reward = True`) or "loss"
    (TRL's GRPOTrainer and the subclasses that keep its k3 term)."""
    from trl import RLOOTrainer

    return "reward" if getattr(trainer, "kl_in_reward", False) or isinstance(trainer, RLOOTrainer) else "loss"


def loss_kl_refusal(trainer: Any) -> str:
    """Why β-from-μ cannot drive a trainer with the KL in the loss, and what to use instead."""
    own = ""
    if hasattr(trainer.args, "target_validity"):
        own = (
            f" ({type(trainer).__name__} has its own target_validity: set it in its config, with target='tilted', "
            "instead of attaching this callback)"
        )
    return (
        f"BetaFromValidityCallback cannot set the beta of {type(trainer).__name__}{own}: TRL's GRPOTrainer adds "
        "beta·k3 to the loss, whose expected gradient is that of KL(a‖π), not KL(π‖a), and scale_rewards "
        "divides only the verifier's part by the group std; training does not converge to the tilted model "
        "p_β, so β = 1/(logit μ − logit A) does not give validity μ (docs/controller.md: μ = 0.6 from A = 0.2 "
        "ended at 0.99 with the defaults, and the closed loop drove it below the base validity). Use one of: "
        "GRPOKLRewardTrainer/GRPOKLRewardConfig from filtered_rl.trainers.grpo_kl_reward (algorithm "
        "'grpo_klr': GRPO with the KL in the reward) with this callback; TRL's RLOOTrainer with this callback; "
        "or FilteredGRPOTrainer(FilteredGRPOConfig(target='tilted', target_validity=μ, "
        "divergence='reverse_kl')) (algorithm 'tilted') without it. (attach(..., allow_loss_kl=True) attaches "
        "anyway, to measure this combination.)"
    )


def _wrap_validity_reward(trainer: Any, name: str | None) -> ValidityRecorder:
    names = list(trainer.reward_func_names)
    if name is None:
        if len(names) != 1:
            raise ValueError(
                f"the trainer has reward functions {names}; name the binary verifier with validity_reward=..."
            )
        index = 0
    elif name in names:
        index = names.index(name)
    else:
        raise ValueError(f"validity_reward={name!r} is not among the trainer's reward functions {names}")
    func = trainer.reward_funcs[index]
    if isinstance(func, ValidityRecorder):
        return func
    if isinstance(func, torch.nn.Module) or not callable(func):
        raise TypeError(f"reward function {names[index]!r} must be a callable verifier, not a reward model")
    if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__):
        raise TypeError(f"reward function {names[index]!r} is async; wrap a synchronous verifier")
    recorder = ValidityRecorder(func)
    trainer.reward_funcs[index] = recorder
    return recorder


def _hook_generation(trainer: Any) -> None:
    original = trainer._generate_and_score_completions

    def generate_and_score_with_validity_control(inputs):
        # Look the callback up each time: on resume the Trainer may have replaced it by a restored copy.
        controllers = [
            cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BetaFromValidityCallback)
        ]
        training = trainer.model.training
        if training:
            for callback in controllers:
                callback.trainer = trainer
                if callback.generations > 0:  # a restored copy: put its β in force before RLOO's rewards
                    trainer.beta = float(callback.controller.beta)
        output = original(inputs)
        if training:
            for callback in controllers:
                callback.observe_generation(trainer, inputs, output)
        return output

    trainer._generate_and_score_completions = generate_and_score_with_validity_control
    trainer._beta_from_validity_hooked = True


def _sequence_logps_for_importance(trainer: Any, output: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log a(y|x), log π_old(y|x)) per local sequence, reusing what TRL computed at generation time."""
    mask = output["completion_mask"]
    if "tool_mask" in output:  # tool outputs were not sampled by the policy
        mask = mask * output["tool_mask"]
    if "ref_per_token_logps" in output:  # GRPO with beta > 0
        log_ref = (output["ref_per_token_logps"] * mask).sum(1)
    else:  # RLOO keeps only the KL-penalised rewards
        log_ref = (per_token_logps(trainer, output, reference=True) * mask).sum(1)
    if "old_logps" in output:  # RLOO: already masked sequence sums
        log_old = output["old_logps"]
    elif output.get("old_per_token_logps") is not None:
        log_old = (output["old_per_token_logps"] * mask).sum(1)
    else:  # GRPO fully on-policy: the current model is the one that sampled
        log_old = (per_token_logps(trainer, output, reference=False) * mask).sum(1)
    return log_ref, log_old


class RunDirectoryCallback(TrainerCallback):
    """Keeps `filtered-rl train`'s output_dir safe (`filtered_rl.run_dir`): claims what the run writes in
    the directory's marker, writes each checkpoint's completeness marker last, and does the
    `save_total_limit` rotation itself, deleting only complete checkpoints the project wrote.

    `foreign`: the entries that were in output_dir before the run and are not the project's; they are
    never claimed, rotated or overwritten. Pass the config's `save_total_limit` here and set the
    config's to None, so that transformers' own rotation (which deletes any checkpoint-N) is off.
    """

    def __init__(self, output_dir: str, foreign: set[str], save_total_limit: int | None):
        from pathlib import Path

        self.output_dir = Path(output_dir)
        self.foreign = set(foreign)
        self.save_total_limit = save_total_limit

    def on_step_end(self, args, state, control, **kwargs):
        # Claimed before transformers creates the folder: a kill while saving leaves a folder of ours.
        if control.should_save and args.should_save:
            from filtered_rl.run_dir import claim

            claim(self.output_dir, [f"checkpoint-{state.global_step}"])

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        from filtered_rl.run_dir import claim, new_entries, rotate_checkpoints, write_checkpoint_marker

        PartialState().wait_for_everyone()  # every process's rng_state_<rank>.pth is written
        if not args.should_save:
            return
        checkpoint = self.output_dir / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            write_checkpoint_marker(checkpoint, state.global_step)
        claim(self.output_dir, new_entries(self.output_dir, self.foreign))
        keep = {state.best_model_checkpoint} if state.best_model_checkpoint else set()
        rotate_checkpoints(self.output_dir, self.save_total_limit, keep)

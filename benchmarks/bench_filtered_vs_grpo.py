"""Step time of FilteredGRPOTrainer vs GRPOTrainer with a KL penalty (beta > 0), same model and batch, at two shapes.

Both run the reference model every generation. The filtered objective also needs log π_old, the sampling
policy's sequence log-prob, which TRL does not compute when π_old is the current policy. Two ways of
getting it are timed side by side:

- `filtered-forward`: a no-grad forward of the policy after generation (the behaviour before issue #15);
- `filtered`: the sampled tokens' log-probs recorded during `model.generate` (the default now; see
  `filtered_rl/trainers/_logprobs.py`), no extra forward.

Shapes: `nano` (today's: the pretrained 0.26 M countdown model, 32 completions of at most 24 tokens,
ending at EOS) and `small` (the `small` base-model architecture, 25 M parameters, randomly initialised,
completions forced to `--small-tokens` tokens by suppressing EOS, so every completion is long). With
`--model NAME_OR_PATH` (e.g. `filtered-rl:smollm2-135m`) a third shape, `real`, trains that model with
LoRA (r 8 on every linear layer; the reference is the model with the adapter disabled), `--real-prompts`
× `--real-generations` completions forced to `--real-tokens` tokens (EOS suppressed); `--variants` can
drop `filtered-forward` there to save time.

The learning rate is 0 so that every trainer samples exactly the same completions (same seed, same
weights): the ratios measure the objective's overhead, not a difference in completion lengths. The
trainers alternate for `--rounds` rounds; the first step of each run (warm-up) is dropped and the median
step time (TRL's `step_time`: generation, scoring, forward and backward) is compared. The CPU time of the
process per step is reported too: on a machine shared with other jobs it is less inflated by waiting than
wall time. Where the time goes is measured with timers around TRL's hooks (generation, the reference
forward, the policy's no-grad forward, the loss forward and the backward).

    python benchmarks/bench_filtered_vs_grpo.py                        # both shapes
    python benchmarks/bench_filtered_vs_grpo.py --shapes nano --steps 12 --rounds 4
    python benchmarks/bench_filtered_vs_grpo.py --nano-model DIR       # a nano model directory to use
    python benchmarks/bench_filtered_vs_grpo.py --shapes real --model filtered-rl:smollm2-135m \
        --real-prompts 1 --real-generations 16 --real-tokens 128      # SmolLM2-135M with LoRA
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

PARTS = ("generate", "ref_forward", "policy_nograd_forward", "loss_forward", "backward", "rewards")


@dataclass
class Shape:
    name: str
    model: str
    prompts: int
    generations: int
    max_tokens: int
    generation_kwargs: dict[str, Any] | None = None
    about: str = ""
    lora: bool = False


@dataclass
class Run:
    step_wall: list[float] = field(default_factory=list)
    step_cpu: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    lengths: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)  # median step wall time of each round


class StepTimer(TrainerCallback):
    """Per optimizer step: wall and process CPU time, and the time spent in each instrumented part."""

    def __init__(self):
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = defaultdict(float)
        self.current["_cpu0"] = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.current["cpu"] = time.process_time() - self.current.pop("_cpu0")
        self.steps.append(dict(self.current))


def instrument(trainer: Any, timer: StepTimer) -> None:
    """Wrap the trainer's hooks with timers (instance attributes; the classes are untouched)."""
    import torch

    def timed(name_of, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timer.current[name_of(*args, **kwargs)] += time.perf_counter() - started

        return wrapper

    # Under LoRA there is no ref_model: TRL runs the reference as the policy with its adapter disabled.
    lora = next((m for m in trainer.model.modules() if hasattr(m, "lora_A")), None)

    def forward_kind(model, *args, **kwargs):
        if trainer.ref_model is not None and model is trainer.ref_model:
            return "ref_forward"
        if lora is not None and getattr(lora, "disable_adapters", False):
            return "ref_forward"
        return "loss_forward" if torch.is_grad_enabled() else "policy_nograd_forward"

    trainer._generate_single_turn = timed(lambda *a, **k: "generate", trainer._generate_single_turn)
    trainer._calculate_rewards = timed(lambda *a, **k: "rewards", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed(
        forward_kind, trainer._get_per_token_logps_and_entropies
    )
    trainer.accelerator.backward = timed(lambda *a, **k: "backward", trainer.accelerator.backward)


def run_once(
    variant: str, shape: Shape, dataset, reward, steps: int, workdir: str, kl_beta: float, gpu: bool = False
) -> Run:
    from trl import GRPOConfig, GRPOTrainer

    from filtered_rl.trainer import FilteredGRPOConfig, FilteredGRPOTrainer

    if variant == "grpo":
        trainer_cls, config_cls, extra = GRPOTrainer, GRPOConfig, dict(beta=kl_beta)
    else:
        trainer_cls, config_cls, extra = (
            FilteredGRPOTrainer,
            FilteredGRPOConfig,
            dict(divergence="forward_kl"),
        )
    batch = shape.prompts * shape.generations
    args = config_cls(
        output_dir=workdir,
        use_cpu=not gpu,
        bf16=gpu,  # on a GPU: bf16, as the GPU recipes train
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        max_steps=steps,
        learning_rate=0.0,
        seed=0,
        num_generations=shape.generations,
        per_device_train_batch_size=batch,
        max_completion_length=shape.max_tokens,
        generation_kwargs=shape.generation_kwargs,
        **extra,
    )
    peft: dict[str, Any] = {}
    if shape.lora:
        from peft import LoraConfig

        peft["peft_config"] = LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    trainer = trainer_cls(model=shape.model, reward_funcs=reward, args=args, train_dataset=dataset, **peft)
    if variant == "filtered-forward":
        trainer.capture_sampling_logprobs = False
    trainer.remove_callback(PrinterCallback)  # keep the output to the figures below
    timer = StepTimer()
    trainer.add_callback(timer)
    instrument(trainer, timer)
    trainer.train()
    history = trainer.state.log_history
    run = Run()
    run.step_wall = [h["step_time"] for h in history if "step_time" in h][1:]
    run.lengths = [h["completions/mean_length"] for h in history if "completions/mean_length" in h]
    for step in timer.steps[1:]:
        run.step_cpu.append(step["cpu"])
        for part in PARTS:
            run.parts[part].append(step.get(part, 0.0))
    source = getattr(trainer, "sampling_logps_source", None)
    if variant != "grpo":
        expected = "forward" if variant == "filtered-forward" else "generate"
        assert source == expected, f"{variant}: log π_old came from {source!r}, expected {expected!r}"
    return run


def small_model(directory: Path) -> str:
    from filtered_rl.synthetic.base_model import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model("small", tokenizer, seed=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(shape: Shape, runs: dict[str, Run], kl_beta: float) -> None:
    grpo = runs["grpo"]
    print(f"\n== shape {shape.name}: {shape.about}")
    print(
        f"   batch {shape.prompts * shape.generations} completions ({shape.prompts} prompts x {shape.generations}),"
        f" mean completion length {median(grpo.lengths):.1f} tokens"
    )
    same = len({tuple(run.lengths) for run in runs.values()}) == 1
    print(f"   same completions in every run: {same}")
    header = f"   {'':<22}{'wall s':>8}{'cpu s':>8}" + "".join(f"{p:>23}" for p in PARTS)
    print(header)
    for name, run in runs.items():
        label = f"GRPO(beta={kl_beta})" if name == "grpo" else name
        parts = "".join(f"{median(run.parts[p]):>23.3f}" for p in PARTS)
        print(f"   {label:<22}{median(run.step_wall):>8.3f}{median(run.step_cpu):>8.3f}{parts}")
    for name in [n for n in ("filtered-forward", "filtered") if n in runs]:
        run = runs[name]
        wall = median(run.step_wall) / median(grpo.step_wall)
        cpu = median(run.step_cpu) / median(grpo.step_cpu)
        print(f"   ratio {name} / grpo: wall {wall:.3f}  cpu {cpu:.3f}   ({len(run.step_wall)} steps each)")
        rounds = [a / b for a, b in zip(run.round_medians, grpo.round_medians, strict=True)]
        print(f"      per round (wall): {', '.join(f'{r:.3f}' for r in rounds)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma-separated: nano, small, real (default nano,small; real with --model)",
    )
    parser.add_argument("--nano-model", dest="nano_model", help="nano model directory")
    parser.add_argument(
        "--model",
        default=None,
        help="a real model (path, hub name or filtered-rl:<name>) for the `real` shape",
    )
    parser.add_argument(
        "--real-steps", type=int, default=3, help="optimizer steps per real run (first dropped)"
    )
    parser.add_argument("--real-rounds", type=int, default=1, help="alternating runs, real")
    parser.add_argument("--real-tokens", type=int, default=128, help="forced completion length, real")
    parser.add_argument("--real-prompts", type=int, default=1, help="prompts per step, real")
    parser.add_argument("--real-generations", type=int, default=16, help="completions per prompt, real")
    parser.add_argument(
        "--variants",
        default="grpo,filtered-forward,filtered",
        help="trainers to compare (grpo always runs); e.g. grpo,filtered on a slow machine",
    )
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per nano run (first dropped)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each trainer, nano")
    parser.add_argument("--small-steps", type=int, default=3, help="optimizer steps per small run")
    parser.add_argument("--small-rounds", type=int, default=2, help="alternating runs, small")
    parser.add_argument("--small-tokens", type=int, default=128, help="forced completion length, small")
    parser.add_argument("--small-prompts", type=int, default=2, help="prompts per step, small")
    parser.add_argument("--small-generations", type=int, default=4, help="completions per prompt, small")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--gpu", action="store_true", help="train on the GPU in bf16 (default: CPU, fp32)")
    parser.add_argument(
        "--kl-beta", type=float, default=0.04, help="GRPO's KL coefficient (> 0: runs the reference)"
    )
    args = parser.parse_args()

    import torch
    import transformers
    import trl

    from filtered_rl.synthetic.base_model import build_tokenizer
    from filtered_rl.synthetic.countdown import make_countdown_dataset
    from filtered_rl.synthetic.countdown_verifier import CountdownVerifier

    torch.set_num_threads(args.threads)
    if args.shapes is None:
        args.shapes = "nano,small" + (",real" if args.model else "")
    variants = ["grpo", *[v for v in args.variants.split(",") if v in ("filtered-forward", "filtered")]]
    load_before = os.getloadavg()
    dataset = make_countdown_dataset(64, 0, seed=0)["train"]
    reward = CountdownVerifier()
    started = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        shapes = []
        for name in args.shapes.split(","):
            if name == "nano":
                if args.nano_model is None:
                    from filtered_rl.synthetic.base_model import load_or_pretrain

                    args.nano_model = str(load_or_pretrain(size="nano", seed=0))
                shapes.append(
                    (
                        Shape(
                            "nano", args.nano_model, 4, 8, 24, about=f"pretrained nano ({args.nano_model})"
                        ),
                        args.steps,
                        args.rounds,
                    )
                )
            elif name == "small":
                eos = build_tokenizer().eos_token_id
                shape = Shape(
                    "small",
                    small_model(Path(workdir) / "small-model"),
                    args.small_prompts,
                    args.small_generations,
                    args.small_tokens,
                    generation_kwargs={"suppress_tokens": [eos]},  # every completion runs to the limit
                    about=f"random 'small' Qwen2 (25 M), {args.small_tokens} tokens forced (EOS suppressed)",
                )
                shapes.append((shape, args.small_steps, args.small_rounds))
            elif name == "real":
                if args.model is None:
                    parser.error("the real shape needs --model (e.g. filtered-rl:smollm2-135m)")
                from transformers import AutoTokenizer

                from filtered_rl.evaluation.generate import eos_token_ids
                from filtered_rl.models import resolve_model

                path = resolve_model(args.model)
                eos = eos_token_ids(SimpleNamespace(), AutoTokenizer.from_pretrained(path))
                shape = Shape(
                    "real",
                    path,
                    args.real_prompts,
                    args.real_generations,
                    args.real_tokens,
                    generation_kwargs={"suppress_tokens": eos},  # every completion runs to the limit
                    about=f"{args.model} with LoRA (r 8, all linear), {args.real_tokens} tokens forced",
                    lora=True,
                )
                shapes.append((shape, args.real_steps, args.real_rounds))
            else:
                parser.error(f"unknown shape {name!r} (nano, small, real)")
        for shape, steps, rounds in shapes:
            runs = {name: Run() for name in variants}
            for _ in range(rounds):
                for name, total in runs.items():
                    run = run_once(
                        name, shape, dataset, reward, steps, str(Path(workdir) / name), args.kl_beta, args.gpu
                    )
                    total.step_wall += run.step_wall
                    total.round_medians.append(median(run.step_wall))
                    total.step_cpu += run.step_cpu
                    total.lengths += run.lengths
                    for part, values in run.parts.items():
                        total.parts[part] += values
            report(shape, runs, args.kl_beta)
    device = torch.cuda.get_device_name() if args.gpu else f"CPU, {args.threads} threads"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    print(f"\n{device}; {versions}; total {time.time() - started:.0f} s")
    load_after = os.getloadavg()
    print(
        f"load average (1/5/15 min) before {' '.join(f'{x:.2f}' for x in load_before)}, "
        f"after {' '.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()

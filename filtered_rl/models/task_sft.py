"""A real model fine-tuned into a synthetic task's base model: the real-model counterpart of the nano bases.

The study's exact metrics (teacher forcing over every valid answer, `filtered_rl.evaluation.exact`) need a
task whose answers can be enumerated, and a base model that writes them: with per-prompt validity spread
(most prompts solved some of the time, in several ways), as the nano bases are. An instruct model asked
``10 8 5 2 -> 4:`` does not answer in the task's format, so it is first fine-tuned on the task, the way the
nano bases are pretrained (`filtered_rl.synthetic.base_model`): on the task's own corpus, where each
completion is a valid answer with probability `valid_fraction` (uniform over the prompt's answers) and
otherwise a well-formed near-miss, here for only a few optimizer steps. The model learns the format
fully and the task partly, and how well depends on the prompt.

Prompts go through the chat template exactly as `load_task(task, conversational=True,
system_prompt=config.system_prompt)` builds them and `render_prompt` renders them, so a study or the
evaluator on that task sees what the model was tuned on. The loss covers the completion and its EOS
(`<|im_end|>` for ChatML), never the prompt. To fit a few minutes of CPU, only the last `train_layers`
decoder layers and the final norm are trained (all their parameters; `train_layers=0`: every parameter);
the rest of the network runs forward only.

`filtered-rl:smollm2-135m-countdown` (`filtered_rl.models`) is `SMOLLM2_COUNTDOWN` built with
`load_or_finetune`: once, atomically (a sibling temp directory, then a rename, the model marker last), in
the project's cache, concurrent callers waiting on a lock. `exact_base_report` measures what the study
needs to know of such a base: exact validity, its spread A(x) over prompts, pass@k and coverage@k.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SFT_FORMAT_VERSION = 1  # bump when the fine-tuning code changes what a config produces
INFO_FILE = "sft_info.json"
LOG_FILE = "sft_log.jsonl"


@dataclass(frozen=True)
class TaskSFTConfig:
    """Everything that determines a fine-tuned task base (and hence its cache key)."""

    model: str = field(default="filtered-rl:smollm2-135m", metadata={"help": "model to fine-tune"})
    task: str = field(default="countdown_hard", metadata={"help": "synthetic task (its corpus and format)"})
    task_options: dict[str, Any] | None = field(
        default=None, metadata={"help": "the task's difficulty knobs"}
    )
    seed: int = 0
    steps: int = field(default=40, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "(prompt, completion) pairs per step"})
    learning_rate: float = field(default=3e-4, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=5, metadata={"help": "linear warm-up, then cosine decay to 10 %"})
    weight_decay: float = 0.0
    valid_fraction: float = field(
        default=0.9, metadata={"help": "share of corpus completions that are valid answers, else near-misses"}
    )
    corpus_prompts: int = field(
        default=500, metadata={"help": "train-split prompts the corpus is drawn from"}
    )
    train_layers: int = field(
        default=8, metadata={"help": "train the last N decoder layers and the final norm; 0: every parameter"}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "system turn of the chat prompts (None: the chat template's default)"}
    )

    def __post_init__(self) -> None:
        from filtered_rl.synthetic.tasks import get_task

        for name in ("steps", "batch_size", "corpus_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_layers < 0:
            raise ValueError(f"train_layers must be >= 0 (0: every parameter), got {self.train_layers}")
        if not 0.0 <= self.valid_fraction <= 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1], got {self.valid_fraction}")
        object.__setattr__(self, "task_options", get_task(self.task).resolve_options(self.task_options))

    def cache_key(self) -> str:
        """``<model>-<task>-sft-seed<seed>-<hash of the config, the task's format and this code's version>``."""
        from filtered_rl.synthetic.tasks import get_task

        blob = json.dumps(
            {"config": asdict(self), "version": SFT_FORMAT_VERSION, **get_task(self.task).fingerprint()},
            sort_keys=True,
        )
        name = self.model.removeprefix("filtered-rl:").replace("/", "--")
        return f"{name}-{self.task}-sft-seed{self.seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"

    def load_task(self, split: str, limit: int | None = None, seed: int = 0) -> Any:
        """The task's prompts as this model was tuned on them: chat messages with this system turn."""
        from filtered_rl.data import load_task

        return load_task(
            self.task,
            split=split,
            limit=limit,
            seed=seed,
            conversational=True,
            system_prompt=self.system_prompt,
            task_options=self.task_options,
        )


def __getattr__(name: str) -> Any:
    """`SMOLLM2_COUNTDOWN`, SmolLM2-135M-Instruct tuned on countdown_hard (`filtered-rl:smollm2-135m-countdown`):
    40 steps of 16, the last 8 of 30 decoder layers trained; measured in docs/results.md §5. Made on first
    use: building the config resolves the synthetic task, which importing the product must not load."""
    if name == "SMOLLM2_COUNTDOWN":
        return TaskSFTConfig()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_or_finetune(
    config: TaskSFTConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """The fine-tuned model's directory in the cache, fine-tuning it first if it is not there yet
    (`config` None: `SMOLLM2_COUNTDOWN`)."""
    config = config or TaskSFTConfig()
    from filtered_rl.model_dir import MODEL_MARKER, _file_lock, default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / config.cache_key()
    if (target / MODEL_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{config.cache_key()}.lock"):
        if not (target / MODEL_MARKER).is_file():
            finetune(config, target, cache_dir=root, threads=threads, progress=progress)
    return target


def finetune(
    config: TaskSFTConfig,
    output_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Fine-tune `config.model` on `config.task`'s corpus and write it to `output_dir` (new, empty, or a model
    directory of ours, replaced atomically). `threads`: torch CPU threads while training (restored after)."""
    import torch

    from filtered_rl.synthetic.base_model import check_output_dir

    output_dir = Path(output_dir)
    check_output_dir(output_dir)  # before minutes of training, not after
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _finetune(config, output_dir, cache_dir, progress)
    finally:
        torch.set_num_threads(previous)


def trainable_parameters(model: Any, train_layers: int) -> list[Any]:
    """Unfreeze the last `train_layers` decoder layers and the final norm (0: everything); returns them."""
    if train_layers == 0:
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layer list; use train_layers=0")
    if train_layers > len(layers):
        raise ValueError(f"train_layers={train_layers} but the model has {len(layers)} decoder layers")
    for p in model.parameters():
        p.requires_grad_(False)
    modules = [
        *layers[-train_layers:],
        *([decoder.norm] if getattr(decoder, "norm", None) is not None else []),
    ]
    params = [p for module in modules for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _finetune(config: TaskSFTConfig, output_dir: Path, cache_dir: Any, progress: bool) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from filtered_rl.data import build_prompt, render_prompt
    from filtered_rl.models import resolve_model
    from filtered_rl.synthetic.base_model import MODEL_MARKER, Corpus, _batch, _install, make_config
    from filtered_rl.synthetic.console import progress_bar, quiet_libraries
    from filtered_rl.synthetic.tasks import get_task

    started = time.time()
    source = Path(resolve_model(config.model, cache_dir))
    quiet_libraries()
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    params = trainable_parameters(model, config.train_layers)
    # The nano bases' corpus (valid answers with probability valid_fraction, else near-misses), drawn the same way.
    corpus = Corpus(
        make_config(
            "nano",
            config.seed,
            task=config.task,
            valid_fraction=config.valid_fraction,
            corpus_prompts=config.corpus_prompts,
            task_options=config.task_options,
        )
    )
    render = lambda text: render_prompt(build_prompt(text, config.system_prompt, True), tokenizer)  # noqa: E731
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = lambda step: (  # noqa: E731
        min(1.0, (step + 1) / max(1, config.warmup_steps))
        * (0.1 + 0.45 * (1 + math.cos(math.pi * step / config.steps)))
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    setup_seconds = round(time.time() - started, 1)
    model.train()
    log: list[dict[str, Any]] = []
    bar = progress_bar(
        total=config.steps, desc=f"sft {config.model} on {config.task}", unit="step", disable=not progress
    )
    with bar:
        for step in range(config.steps):
            pairs = [corpus.sample() for _ in range(config.batch_size)]
            batch = _batch([(render(prompt), completion) for prompt, completion in pairs], tokenizer)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            log.append(
                {
                    "step": step + 1,
                    "loss": loss.item(),
                    "lr": scheduler.get_last_lr()[0],
                    "seconds": round(time.time() - started, 1),
                }
            )
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update(1)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)  # a plain model again: whoever loads it trains what they choose
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=eos,
        pad_token_id=pad,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=get_task(config.task).max_completion_length,
    )
    info = {
        "config": asdict(config),
        "cache_key": config.cache_key(),
        "base_model": str(source),
        "prompt_format": {"conversational": True, "system_prompt": config.system_prompt},
        "example_prompt": render(get_task(config.task).example()[0]),
        "trained_parameters": sum(p.numel() for p in params),
        "parameters": sum(p.numel() for p in model.parameters()),
        "initial_loss": log[0]["loss"],
        "final_loss": sum(r["loss"] for r in log[-10:]) / len(log[-10:]),
        "setup_seconds": setup_seconds,  # loading the model, building the corpus
        "train_seconds": round(log[-1]["seconds"] - setup_seconds, 1),
        "seconds": round(time.time() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    own = {"config.json", "generation_config.json", "model.safetensors", MODEL_MARKER}

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        for item in source.iterdir():  # the tokenizer files as they are (chat template, special tokens)
            if (
                item.is_file()
                and item.name not in own
                and item.name.startswith(("tokenizer", "chat_template"))
            ):
                shutil.copy2(item, staging / item.name)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (staging / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in log))

    return _install(
        output_dir, write, {"model": config.model, "task": config.task, "cache_key": config.cache_key()}
    )


def exact_base_report(
    model_dir: str | os.PathLike,
    config: TaskSFTConfig | None = None,
    *,
    split: str = "test",
    num_prompts: int = 48,
    ks: tuple[int, ...] = (1, 16, 256),
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9),
) -> dict[str, Any]:
    """Exact validity A(x), its quantiles over prompts, pass@k and coverage@k (the model as its own base) on
    the first `num_prompts` prompts of `split`, rendered as the model was tuned on them."""
    config = config or TaskSFTConfig()
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filtered_rl.evaluation.exact import exact_evaluation
    from filtered_rl.synthetic.console import quiet_libraries

    task = config.load_task(split, limit=num_prompts)
    rows = task.dataset.to_list()
    answers = [sorted(task.valid_answers(row)) for row in rows]
    with quiet_libraries():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    started = time.time()
    result = exact_evaluation(model, model, tokenizer, [r["prompt"] for r in rows], answers, ks)
    validity = np.array([p["validity"] for p in result["per_prompt"]])
    return {
        **result["summary"],
        "split": split,
        "validity_quantiles": dict(zip(map(str, quantiles), np.quantile(validity, quantiles).tolist())),
        "per_prompt_validity": validity.tolist(),
        "seconds": round(time.time() - started, 1),
    }


# --- CLI: `filtered-rl finetune` -----------------------------------------------------------------------------


def add_arguments(parser: Any) -> None:
    defaults = TaskSFTConfig()
    parser.add_argument(
        "--model", default=defaults.model, help=f"model to fine-tune (default: {defaults.model})"
    )
    parser.add_argument("--task", default=defaults.task, help=f"synthetic task (default: {defaults.task})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--valid-fraction", type=float, default=defaults.valid_fraction)
    parser.add_argument(
        "--train-layers",
        type=int,
        default=defaults.train_layers,
        help="train the last N decoder layers and the final norm; 0: every parameter",
    )
    parser.add_argument("--system-prompt", default=defaults.system_prompt)
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where to write the model (default: the cache, $FILTERED_RL_CACHE or .cache/filtered-rl)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument(
        "--report",
        type=int,
        default=0,
        metavar="N",
        help="then print the exact metrics on the first N held-out and N training prompts (default: none)",
    )
    parser.add_argument("--no-progress", action="store_true")


def run(args: Any) -> int:
    import sys

    from filtered_rl.synthetic.base_model import OutputDirError

    config = TaskSFTConfig(
        model=args.model,
        task=args.task,
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        valid_fraction=args.valid_fraction,
        train_layers=args.train_layers,
        system_prompt=args.system_prompt,
    )
    if args.output_dir:
        try:
            path = finetune(config, args.output_dir, threads=args.threads, progress=not args.no_progress)
        except OutputDirError as error:
            print(f"filtered-rl finetune: error: --output-dir: {error}", file=sys.stderr)
            return 2
    else:
        path = load_or_finetune(config, threads=args.threads, progress=not args.no_progress)
    info = json.loads((path / INFO_FILE).read_text())
    print(f"model: {path}")
    print(
        f"loss {info['initial_loss']:.3f} -> {info['final_loss']:.3f}  "
        f"fine-tuning {info['train_seconds']} s (+{info['setup_seconds']} s setup, {info['torch_threads']} threads)"
    )
    for split in ("test", "train") if args.report else ():
        report = exact_base_report(path, config, split=split, num_prompts=args.report)
        quantiles = " / ".join(f"{v:.3f}" for v in report["validity_quantiles"].values())
        print(
            f"{split}: {report['num_prompts']} prompts, exact validity {report['validity']:.3f}, "
            f"A(x) 10/50/90 % {quantiles}, "
            + ", ".join(f"pass@{k} {v:.3f}" for k, v in report["pass_at_k"].items())
            + ", "
            + ", ".join(f"coverage@{k} {v:.3f}" for k, v in report["coverage_at_k"].items())
            + f" ({report['seconds']} s)"
        )
    return 0

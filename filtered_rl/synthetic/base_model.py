"""The base model a(y|x) of a synthetic task: a character-level tokenizer and a small Qwen2 model.

Everything downstream (GRPO, the filtered objective, pass@k) measures on this model, so what matters
is that it has a *real validity spread*: sampled at temperature 1 on held-out prompts, most prompts
are solved some of the time (not never, not always) and in several different ways. The pretraining
corpus is built for that, by the task (`filtered_rl.synthetic.tasks`): each completion is, with
probability `valid_fraction`, a valid answer drawn as the task chooses, and otherwise a near-miss in
the answer format. The model learns the format fully and the task partly, and how well depends on
the prompt. Any registered task works: `filtered-rl pretrain --task NAME` (default: countdown).

The saved directory is a plain Hugging Face one (model, tokenizer with a ChatML chat template,
generation config): `AutoModelForCausalLM.from_pretrained(path)`, `AutoTokenizer.from_pretrained(path)`
and TRL's `GRPOTrainer(model=str(path))` load it with no project code. It also holds
`filtered_rl_model.json` (`MODEL_MARKER`), which says the directory is ours: pretraining replaces an
existing directory only when it holds that marker and nothing but the files the marker lists, and
otherwise refuses rather than delete what it did not write.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filtered_rl.model_dir import (  # noqa: F401  (re-exported: the names' old home)
    MODEL_MARKER,
    OutputDirError,
    _file_lock,
    _install,
    _our_files,
    check_output_dir,
    default_cache_dir,
)
from filtered_rl.synthetic.tasks import DEFAULT_TASK, SyntheticTask, get_task, task_names

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MAX_NEW_TOKENS = 32  # the default task's longest completion; each task sets its own (max_completion_length)

# Architectures (parameter counts with tied embeddings). nano is sized for CPU pretraining: at a fixed
# CPU budget, a narrow model taking more optimizer steps learned the task better than a wider one.
SIZES: dict[str, dict[str, int]] = {
    "nano": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),  # 0.26 M parameters
    "micro": dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),  # 1.02 M parameters: nano twice as wide, the capacity check (docs/results.md §4f); ~2x nano's step time on CPU
    "small": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),  # 25 M parameters, for a GPU (defaults not yet measured there)
}


CACHE_FORMAT_VERSION = 1  # bump when the corpus or model-building code changes what a config produces


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines a pretrained base model (and hence its cache key)."""

    size: str = field(default="nano", metadata={"help": f"model size: one of {sorted(SIZES)}"})
    seed: int = field(default=0, metadata={"help": "seed of the weights, the corpus prompts and their order"})
    steps: int = field(default=1200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "(prompt, completion) pairs per step"})
    learning_rate: float = field(default=5e-3, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int = field(
        default=50, metadata={"help": "linear warm-up steps, then cosine decay to 10 %"}
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    valid_fraction: float = field(
        default=0.9,
        metadata={
            "help": "share of corpus completions that are valid answers, the rest near-misses. Measured "
            "on countdown/nano at this budget: 0.5 left held-out validity near the format-only floor "
            "(~5 %); 0.8-0.9 spread it over 5-35 %"
        },
    )
    corpus_prompts: int = field(
        default=500, metadata={"help": "train-split prompts the corpus is drawn from"}
    )
    task: str = field(
        default=DEFAULT_TASK,
        metadata={"help": "synthetic task (a name in filtered_rl.synthetic.tasks.TASKS)"},
    )
    task_options: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "the task's difficulty knobs (None: its default_options; given ones update those)"},
    )

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size={self.size!r} is not a known model size; choose one of {sorted(SIZES)}")
        for name in ("steps", "batch_size", "corpus_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.valid_fraction <= 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1], got {self.valid_fraction}")
        if not isinstance(self.task, str):
            raise ValueError(
                f"task is a task name (one of {', '.join(task_names())}), got {self.task!r}; "
                "the task's difficulty knobs go in task_options"
            )
        # Resolved here so that the cache key records every knob, defaulted or not.
        object.__setattr__(self, "task_options", self.task_spec().resolve_options(self.task_options))

    def task_spec(self) -> SyntheticTask:
        """The registered task this model is pretrained on."""
        return get_task(self.task)

    def _key_hash(self) -> str:
        # The key covers what shapes the weights beyond this config too: the task's format
        # (`SyntheticTask.fingerprint`) and the tokenizer's alphabet, so that a cached model never
        # outlives a change of either. The task options sit under "task" and the default task's
        # fingerprint has no name: the layout of keys from before tasks had names, kept so that those
        # cached models are still found (see `legacy_cache_keys`).
        fields = asdict(self)
        fields["task"] = fields.pop("task_options")
        blob = json.dumps(
            {
                "config": fields,
                "format_version": CACHE_FORMAT_VERSION,
                "vocab_size": len(build_tokenizer()),
                **self.task_spec().fingerprint(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def cache_key(self) -> str:
        """Name of this model's cache directory: ``<task>-<size>-seed<seed>-<hash of everything>``."""
        return f"{self.task}-{self.size}-seed{self.seed}-{self._key_hash()}"

    def legacy_cache_keys(self) -> list[str]:
        """Older names of the same model's cache directory, still used when found.

        Before tasks had names, every cached model was the default task's, under ``<size>-seed<seed>-<hash>``
        with the same hash."""
        return [f"{self.size}-seed{self.seed}-{self._key_hash()}"] if self.task == DEFAULT_TASK else []


# Per-size defaults that differ from the dataclass defaults (a GPU affords a longer run).
SIZE_DEFAULTS: dict[str, dict[str, Any]] = {
    "nano": {},
    "micro": {},  # nano's pretraining recipe unchanged, so that only the capacity differs
    "small": dict(steps=4000, batch_size=128, learning_rate=1e-3, warmup_steps=200),
}


def make_config(
    size: str = "nano",
    seed: int = 0,
    steps: int | None = None,
    *,
    task: str = DEFAULT_TASK,
    **overrides: Any,
) -> PretrainConfig:
    """A `PretrainConfig` for `task` and `size`: the size's defaults, then the task's
    (`SyntheticTask.pretrain_defaults`), then `steps`/`overrides` on top."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not a known model size; choose one of {sorted(SIZES)}")
    known = set(PretrainConfig.__dataclass_fields__) - {"size", "seed", "steps", "task"}
    if set(overrides) - known:
        raise ValueError(
            f"unknown pretraining option(s) {sorted(set(overrides) - known)}; known: {sorted(known)}"
        )
    spec = get_task(task)
    values: dict[str, Any] = {
        **SIZE_DEFAULTS[size],
        **spec.pretrain_defaults,
        **overrides,
        "size": size,
        "seed": seed,
        "task": spec.name,
    }
    if steps is not None:
        values["steps"] = steps
    return PretrainConfig(**values)


# --- Tokenizer ---------------------------------------------------------------------------------------


def build_tokenizer() -> Any:
    """Character-level tokenizer: one token per byte, so one per character on (ASCII) task text.

    It is a `Qwen2Tokenizer` (a `PreTrainedTokenizerFast` over a `tokenizers` BPE model) whose vocabulary
    is the 256 byte symbols plus three special tokens and which has *no merges*: the byte-level BPE then
    never joins characters. Being a Qwen2 tokenizer matters: transformers 5 reloads the tokenizer of any
    `qwen2` model directory as `Qwen2Tokenizer`, whatever `tokenizer_class` says, rebuilding its
    pre-tokenizer; this one survives that rebuild unchanged. Any UTF-8 text round-trips exactly; pads
    on the left (generation-safe).
    """
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + [_BYTE_SYMBOLS[b] for b in range(256)])}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        padding_side="left",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tokenizer.add_tokens([AddedToken("<|im_start|>", special=True)], special_tokens=True)
    return tokenizer


def _byte_symbols() -> dict[int, str]:
    """The printable stand-in of each byte used by byte-level BPE (GPT-2's table): printable Latin-1
    bytes stand for themselves, the others are shifted past 255."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


_BYTE_SYMBOLS = _byte_symbols()


# --- Model -------------------------------------------------------------------------------------------


def build_model(size: str, tokenizer: Any, seed: int = 0) -> Any:
    """A freshly initialised Qwen2ForCausalLM of the named size (same seed -> same weights)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if size not in SIZES:
        raise ValueError(f"size={size!r} is not a known model size; choose one of {sorted(SIZES)}")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def count_parameters(model: Any) -> int:
    """Distinct parameters (tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())


# --- Corpus ------------------------------------------------------------------------------------------


class Corpus:
    """Infinite stream of (prompt, completion) pairs over the task's train split.

    Each draw takes a train prompt uniformly, then asks the task for a valid completion with
    probability `valid_fraction` and for a near-miss otherwise (`SyntheticTask.corpus_completion`).
    Deterministic under the config's seed.
    """

    def __init__(self, config: PretrainConfig):
        self.task = config.task_spec()
        data = self.task.make_dataset(
            config.corpus_prompts, 0, seed=config.seed, with_solutions=True, **config.task_options
        )["train"]
        self.rows = data.to_list()
        if not self.rows:
            raise ValueError(f"the {self.task.name} task gave no train prompts for the corpus")
        self.valid_fraction = config.valid_fraction
        self.rng = random.Random(f"corpus:{config.seed}")

    def sample(self) -> tuple[str, str]:
        row = self.rng.choice(self.rows)
        valid = self.rng.random() < self.valid_fraction
        return row["prompt"], self.task.corpus_completion(row, self.rng, valid)


def _batch(pairs: list[tuple[str, str]], tokenizer: Any) -> dict[str, Any]:
    """Right-padded batch; the loss covers the completion and its EOS only, never the prompt."""
    import torch

    sequences, labels = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
        "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
    }


# --- Pretraining ---------------------------------------------------------------------------------------


def pretrain_base_model(
    output_dir: str | os.PathLike,
    *,
    size: str = "nano",
    seed: int = 0,
    steps: int | None = None,
    task: str = DEFAULT_TASK,
    progress: bool = True,
    threads: int | None = 1,
    device: str | None = None,
    **overrides: Any,
) -> Path:
    """Pretrain a base model on `task`'s corpus and save it to `output_dir`; returns the path.

    `overrides` are `PretrainConfig` fields (batch_size, learning_rate, valid_fraction, corpus_prompts,
    task_options, ...). Deterministic on CPU: the same config gives the same weights. `threads` (torch
    CPU threads while pretraining, restored afterwards; None: leave as is) defaults to 1 because nano's
    matrices are too small to gain from more, and on a busy machine extra threads slowed it several-fold.
    `device`: default CUDA when available.

    `output_dir` must be new, empty, or a model directory written here before (it holds
    `MODEL_MARKER` and only the files that marker lists); anything else raises `OutputDirError`
    before any work, and nothing is deleted. The model is built in a temporary sibling directory and
    renamed into place, so a killed run leaves no half model and a replaced model is never half gone.
    """
    config = make_config(size, seed, steps, task=task, **overrides)
    output_dir = Path(output_dir)
    check_output_dir(output_dir)  # before minutes of pretraining, not after
    return _pretrain(config, output_dir, progress=progress, threads=threads, device=device)


def _pretrain(
    config: PretrainConfig,
    output_dir: Path,
    *,
    progress: bool = True,
    threads: int | None = 1,
    device: str | None = None,
) -> Path:
    import torch

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _pretrain_loop(config, output_dir, progress=progress, device=device)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain_loop(config: PretrainConfig, output_dir: Path, *, progress: bool, device: str | None) -> Path:
    import torch
    from transformers import GenerationConfig

    from filtered_rl.synthetic.console import progress_bar, quiet_libraries

    quiet_libraries()
    started = time.time()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tokenizer()
    model = build_model(config.size, tokenizer, seed=config.seed).to(device)
    corpus = Corpus(config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    # Linear warm-up then cosine decay to 10 % of the peak rate.
    schedule = lambda step: (
        min(1.0, (step + 1) / config.warmup_steps)
        * (0.1 + 0.45 * (1 + math.cos(math.pi * step / config.steps)))
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    model.train()
    losses: list[float] = []
    log: list[dict[str, Any]] = []
    bar = progress_bar(
        total=config.steps, desc=f"pretrain {config.task}/{config.size}", unit="step", disable=not progress
    )
    with bar:
        for step in range(config.steps):
            batch = _batch([corpus.sample() for _ in range(config.batch_size)], tokenizer)
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            recent = sum(losses[-20:]) / len(losses[-20:])
            if step % 10 == 0 or step == config.steps - 1:
                log.append(
                    {
                        "step": step + 1,
                        "loss": losses[-1],
                        "mean_loss_20": recent,
                        "lr": scheduler.get_last_lr()[0],
                    }
                )
            bar.set_postfix(loss=f"{recent:.3f}", refresh=False)
            bar.update(1)
    model.eval()

    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=config.task_spec().max_completion_length,
    )
    info = {
        "config": asdict(config),
        "cache_key": config.cache_key(),
        "parameters": count_parameters(model),
        "initial_loss": losses[0],
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "seconds": round(time.time() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "pretrain_info.json").write_text(json.dumps(info, indent=2) + "\n")
        (staging / "pretrain_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))

    return _install(output_dir, write, {"task": config.task, "cache_key": config.cache_key()})


def load_or_pretrain(
    size: str = "nano",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    *,
    task: str = DEFAULT_TASK,
    progress: bool = True,
    threads: int | None = 1,
    device: str | None = None,
    **overrides: Any,
) -> Path:
    """Directory of the pretrained model of `task` for this config, pretraining it first if not cached.

    The cache key (`PretrainConfig.cache_key`) covers the task and every `PretrainConfig` field, so
    changing any option gives a new model (`threads`/`device` are not part of it). A directory under
    an older name of the same key is used when found. Concurrent callers (parallel test sessions)
    wait on a lock instead of pretraining twice.
    """
    config = make_config(size, seed, overrides.pop("steps", None), task=task, **overrides)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / config.cache_key()
    found = _cached(root, config)
    if found is not None:
        return found
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{config.cache_key()}.lock"):
        if _cached(root, config) is None:
            _pretrain(config, target, progress=progress, threads=threads, device=device)
    return _cached(root, config) or target


def _cached(root: Path, config: PretrainConfig) -> Path | None:
    for key in (config.cache_key(), *config.legacy_cache_keys()):
        if (root / key / "config.json").exists():
            return root / key
    return None


# --- CLI: `filtered-rl pretrain` -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        default=DEFAULT_TASK,
        choices=task_names(),
        help=f"synthetic task whose base model to pretrain (default: {DEFAULT_TASK})",
    )
    parser.add_argument("--size", default="nano", choices=sorted(SIZES), help="model size (default: nano)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default: per size and task)"
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=None,
        help="share of corpus completions that are valid answers (default: the task's, else 0.9)",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where to save the model: a new or empty directory, or a model directory written by this "
        "command before, which is replaced (default: the cache, $FILTERED_RL_CACHE or .cache/filtered-rl)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads while pretraining (default: 1)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    overrides = {
        name: value
        for name, value in (
            ("batch_size", args.batch_size),
            ("learning_rate", args.learning_rate),
            ("valid_fraction", args.valid_fraction),
        )
        if value is not None
    }
    options = dict(
        size=args.size,
        seed=args.seed,
        steps=args.steps,
        task=args.task,
        progress=not getattr(args, "no_progress", False),
        threads=args.threads,
        device=args.device,
        **overrides,
    )
    if args.output_dir:
        try:
            path = pretrain_base_model(args.output_dir, **options)
        except OutputDirError as error:
            print(f"filtered-rl pretrain: error: --output-dir: {error}", file=sys.stderr)
            return 2
    else:
        path = load_or_pretrain(**options)
    info_file = path / "pretrain_info.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    print(f"model: {path}")
    if info:
        print(
            f"parameters: {info['parameters']:,}  loss: {info['initial_loss']:.3f} -> {info['final_loss']:.3f}  "
            f"time: {info['seconds']} s ({info['torch_threads']} threads)"
        )
    return 0


# The `nano_model_dir` test fixture's model: the nano size, cut short enough for the default test suite.
TEST_PRESET: dict[str, Any] = dict(size="nano", seed=0, steps=700)

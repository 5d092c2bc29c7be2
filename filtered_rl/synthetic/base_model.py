"""The base model a(y|x) for the countdown task: a character-level tokenizer and a small Qwen2 model.

Everything downstream (GRPO, the filtered objective, pass@k) measures on this model, so what matters
is that it has a *real validity spread*: sampled at temperature 1 on held-out prompts, most prompts
are solved some of the time (not never, not always) and in several different ways. The pretraining
corpus is built for that: each completion is, with probability `valid_fraction`, a valid answer drawn
uniformly from all answers of the prompt (`enumerate_solutions`), and otherwise a random well-formed
expression over the prompt's numbers. The model learns the format fully and the arithmetic partly,
and how well depends on the prompt.

The saved directory is a plain Hugging Face one (model, tokenizer with a ChatML chat template,
generation config): `AutoModelForCausalLM.from_pretrained(path)`, `AutoTokenizer.from_pretrained(path)`
and TRL's `GRPOTrainer(model=str(path))` load it with no project code.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from filtered_rl.synthetic import countdown

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MAX_NEW_TOKENS = 32  # longest 4-number answer is ~20 characters

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

    size: str = "nano"
    seed: int = 0
    steps: int = 1200
    batch_size: int = 64
    learning_rate: float = 5e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    # Share of corpus completions that are valid answers. Measured on nano at this budget: 0.5 left
    # held-out validity near the format-only floor (~5 %); 0.8-0.9 spread it over 5-35 %.
    valid_fraction: float = 0.9
    corpus_prompts: int = 500  # train-split prompts the corpus is drawn from
    task: dict[str, int] = field(
        default_factory=lambda: {
            "num_numbers": countdown.NUM_NUMBERS,
            "max_number": countdown.MAX_NUMBER,
            "max_target": countdown.MAX_TARGET,
            "min_solutions": countdown.MIN_SOLUTIONS,
        }
    )

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size={self.size!r} is not a known model size; choose one of {sorted(SIZES)}")
        for name in ("steps", "batch_size", "corpus_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.valid_fraction <= 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1], got {self.valid_fraction}")

    def cache_key(self) -> str:
        # The key covers what shapes the weights beyond this config too: the prompt format and the
        # tokenizer's alphabet, so that a cached model never outlives a change of either.
        blob = json.dumps(
            {
                "config": asdict(self),
                "format_version": CACHE_FORMAT_VERSION,
                "prompt_example": countdown.format_prompt([4, 3, 2, 1], 10),
                "vocab_size": len(build_tokenizer()),
            },
            sort_keys=True,
        )
        return f"{self.size}-seed{self.seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


# Per-size defaults that differ from the dataclass defaults (a GPU affords a longer run).
SIZE_DEFAULTS: dict[str, dict[str, Any]] = {
    "nano": {},
    "small": dict(steps=4000, batch_size=128, learning_rate=1e-3, warmup_steps=200),
}


def make_config(
    size: str = "nano", seed: int = 0, steps: int | None = None, **overrides: Any
) -> PretrainConfig:
    """A `PretrainConfig` for `size` with that size's defaults, then `steps`/`overrides` on top."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not a known model size; choose one of {sorted(SIZES)}")
    known = set(PretrainConfig.__dataclass_fields__) - {"size", "seed", "steps"}
    if set(overrides) - known:
        raise ValueError(
            f"unknown pretraining option(s) {sorted(set(overrides) - known)}; known: {sorted(known)}"
        )
    values: dict[str, Any] = {**SIZE_DEFAULTS[size], **overrides, "size": size, "seed": seed}
    if steps is not None:
        values["steps"] = steps
    return replace(PretrainConfig(), **values)


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
    """Infinite stream of (prompt, completion) pairs over the train split, as described in the module doc."""

    def __init__(self, config: PretrainConfig):
        data = countdown.make_countdown_dataset(
            config.corpus_prompts, 0, seed=config.seed, with_solutions=True, **config.task
        )["train"]
        self.rows = [(row["prompt"], row["numbers"], row["solutions"]) for row in data]
        self.valid_fraction = config.valid_fraction
        self.rng = random.Random(f"corpus:{config.seed}")

    def sample(self) -> tuple[str, str]:
        prompt, numbers, solutions = self.rng.choice(self.rows)
        if self.rng.random() < self.valid_fraction:
            return prompt, self.rng.choice(solutions)
        return prompt, countdown.random_expression(numbers, self.rng)


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
    progress: bool = True,
    threads: int | None = 1,
    device: str | None = None,
    **overrides: Any,
) -> Path:
    """Pretrain a base model on the countdown corpus and save it to `output_dir`; returns the path.

    `overrides` are `PretrainConfig` fields (batch_size, learning_rate, valid_fraction, corpus_prompts,
    task, ...). Deterministic on CPU: the same config gives the same weights. `threads` (torch CPU
    threads while pretraining, restored afterwards; None: leave as is) defaults to 1 because nano's
    matrices are too small to gain from more, and on a busy machine extra threads slowed it several-fold.
    `device`: default CUDA when available. The directory is written elsewhere first and moved into
    place, so a killed run leaves no half model.
    """
    config = make_config(size, seed, steps, **overrides)
    return _pretrain(config, Path(output_dir), progress=progress, threads=threads, device=device)


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
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

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
    bar = tqdm(range(config.steps), desc=f"pretrain {config.size}", disable=not progress, mininterval=1.0)
    for _ in bar:
        batch = _batch([corpus.sample() for _ in range(config.batch_size)], tokenizer)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()

    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    info = {
        "config": asdict(config),
        "parameters": count_parameters(model),
        "initial_loss": losses[0],
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "seconds": round(time.time() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model directory is an ordinary one
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "pretrain_info.json").write_text(json.dumps(info, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def default_cache_dir() -> Path:
    """`$FILTERED_RL_CACHE`, else `.cache/filtered-rl/` under the current directory."""
    return Path(os.environ.get("FILTERED_RL_CACHE") or Path.cwd() / ".cache" / "filtered-rl")


def load_or_pretrain(
    size: str = "nano",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    threads: int | None = 1,
    device: str | None = None,
    **overrides: Any,
) -> Path:
    """Directory of the pretrained model for this config, pretraining it first if it is not cached.

    The cache key covers every `PretrainConfig` field, so changing any option gives a new model
    (`threads`/`device` are not part of it). Concurrent callers (parallel test sessions) wait on a
    lock instead of pretraining twice.
    """
    config = make_config(size, seed, overrides.pop("steps", None), **overrides)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / config.cache_key()
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{config.cache_key()}.lock"):
        if not (target / "config.json").exists():
            _pretrain(config, target, progress=progress, threads=threads, device=device)
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still keeps the cache consistent
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- CLI: `filtered-rl pretrain` -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="nano", choices=sorted(SIZES), help="model size (default: nano)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: per size)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=None,
        help="share of corpus completions that are valid answers (default 0.9)",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where to save the model (default: the cache, $FILTERED_RL_CACHE or .cache/filtered-rl)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads while pretraining (default: 1)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


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
    if args.output_dir:
        path = pretrain_base_model(
            args.output_dir,
            size=args.size,
            seed=args.seed,
            steps=args.steps,
            threads=args.threads,
            device=args.device,
            **overrides,
        )
    else:
        path = load_or_pretrain(
            args.size, args.seed, steps=args.steps, threads=args.threads, device=args.device, **overrides
        )
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

"""`filtered-rl rehearsal-sample`: the offline step of DPH-RL (Li et al., arXiv 2509.07430).

    filtered-rl rehearsal-sample --model PATH --dataset countdown --num-prompts 2000 --output-dir runs/rehearsal/x
    accelerate launch --num_processes 2 -m filtered_rl.rehearsal --model PATH --dataset gsm8k --output-dir ...

Why offline: DPH-RL's rehearsal loss is a mass-covering f-divergence E_{y~a}[f(π_θ/a)] estimated on samples
of the *base* model a, so the samples and their per-token base log-probs can be drawn once, before
training, and training needs no online reference model.

Two phases, both resumable and sharded over `accelerate` processes:
1. Sample the base model K times per training prompt at T = 1 (`--num-samples`, 8 in the paper) and verify
   them. This is `filtered-rl eval`'s runner (`run_eval`): the same seeded per-sample sampler, the same
   round-robin sharding, the same JSONL shards merged into `samples.jsonl`, the same resume (a rerun
   samples only the missing (prompt, sample) pairs), and its `summary.json` (the base model's pass@k on the
   training prompts).
2. Split the prompts: near-perfect (at least `--min-correct` of K correct; K, i.e. all, in the paper) and
   exploration (the rest). The correct, finished samples of the near-perfect prompts are re-tokenised,
   scored per token under the base model (each process a slice) and written by the main process, atomically,
   to `rehearsal.jsonl` (one sample a line: prompt and completion token ids, per-token base log-probs) with
   `rehearsal_info.json` (the settings, the counts and the near-perfect prompt keys). Phase 2 is redone on
   every run (one forward pass over the kept samples).

Re-tokenisation: the eval records keep the completion text, not its token ids, so a kept completion is
tokenised again and EOS appended. For a character tokenizer this is the sampled sequence; for BPE it is its
canonical tokenisation, which can differ from the sampled one (counted in `rehearsal_info.json`). The
rehearsal loss then compares π_θ and a on that same token sequence, so it stays consistent.

Training (`algorithm: dph`) reads the folder (`rehearsal_path`), drops the near-perfect prompts from the
training set (matched by `filtered_rl.control.prompt_key` of the prompt), and adds the rehearsal loss.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REHEARSAL_FILE = "rehearsal.jsonl"
INFO_FILE = "rehearsal_info.json"
FORMAT = 1


@dataclass
class RehearsalSet:
    """Stored base-model samples of the near-perfect prompts, and which prompts those are."""

    samples: list[dict[str, Any]]  # prompt_key, prompt_ids, completion_ids, base_logprobs (per token), ...
    near_perfect_keys: set[str]
    info: dict[str, Any]


def completion_logprobs(
    model: Any, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int
):
    """(logps, mask), both (B, T): per-token log-probs of each completion after its prompt, at temperature 1.

    One right-padded forward pass; differentiable (wrap in `torch.no_grad()` to score). Used to store the
    base model's log-probs offline and, on the same token ids, the policy's in the rehearsal loss.
    """
    import torch

    device = next(model.parameters()).device
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    width, steps = max(lengths), max(len(c) for c in completion_ids)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(lengths), width), dtype=torch.long)
    index = torch.zeros((len(lengths), steps), dtype=torch.long)  # position predicting each completion token
    mask = torch.zeros((len(lengths), steps), dtype=torch.bool)
    for row, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[row, : len(p) + len(c)] = torch.tensor(p + c)
        attention[row, : len(p) + len(c)] = 1
        index[row, : len(c)] = torch.arange(len(p) - 1, len(p) + len(c) - 1)
        mask[row, : len(c)] = True
    ids, attention, index, mask = ids.to(device), attention.to(device), index.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=attention).logits
    logits = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.size(-1))).float()
    targets = ids.gather(1, (index + 1).clamp(max=width - 1))
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logps.masked_fill(~mask, 0.0), mask


def split_prompts(records: list[dict], num_samples: int, min_correct: int) -> tuple[set[str], list[dict]]:
    """(near-perfect prompt ids, their correct finished samples) from eval records (verdict > 0.5 = correct)."""
    by_prompt: dict[str, list[dict]] = {}
    for record in records:
        if record["sample_index"] < num_samples:
            by_prompt.setdefault(record["prompt_id"], []).append(record)
    near_perfect, kept = set(), []
    for prompt_id, samples in by_prompt.items():
        correct = [s for s in samples if (s["verdict"] or 0.0) > 0.5]
        if len(samples) == num_samples and len(correct) >= min_correct:
            near_perfect.add(prompt_id)
            kept += sorted((s for s in correct if s["finished"]), key=lambda s: s["sample_index"])
    return near_perfect, kept


def build_rehearsal_set(config: Any, min_correct: int) -> dict | None:
    """Phase 2 (module doc) after `run_eval(config)`: write rehearsal.jsonl and rehearsal_info.json.

    Run on every process (each scores a slice); returns the info dict on the main process, None elsewhere.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from transformers import AutoTokenizer

    from filtered_rl.control import prompt_key
    from filtered_rl.data import render_prompt
    from filtered_rl.evaluation.generate import eos_token_ids
    from filtered_rl.evaluation.outputs import atomic_write_text, read_jsonl
    from filtered_rl.evaluation.runner import SAMPLES_FILE, _load_model, load_config_task

    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(config.output_dir)
    task = load_config_task(config)
    rows = {row["prompt_id"]: row for row in task.dataset.to_list()}
    records = [
        r
        for r in read_jsonl(out / SAMPLES_FILE, required=("prompt_id", "sample_index"))
        if r["prompt_id"] in rows
    ]
    near_perfect, kept = split_prompts(records, config.num_samples, min_correct)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    mine = kept[state.process_index :: state.num_processes]
    scored = []
    if mine:
        model = _load_model(config.model, config.dtype, state.device)
        eos = eos_token_ids(model, tokenizer)[0]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        for start in range(0, len(mine), config.batch_size):
            batch = mine[start : start + config.batch_size]
            prompts = [rows[r["prompt_id"]]["prompt"] for r in batch]
            prompt_ids = [
                tokenizer(render_prompt(p, tokenizer), add_special_tokens=isinstance(p, str))["input_ids"]
                for p in prompts
            ]
            completion_ids = [
                tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [eos] for r in batch
            ]
            with torch.no_grad():
                logps, mask = completion_logprobs(model, prompt_ids, completion_ids, pad)
            for r, p, pi, ci, lp, m in zip(
                batch, prompts, prompt_ids, completion_ids, logps.tolist(), mask.tolist()
            ):
                scored.append(
                    {
                        "prompt_id": r["prompt_id"],
                        "prompt_key": prompt_key(p),
                        "sample_index": r["sample_index"],
                        "completion": r["completion"],
                        "prompt_ids": pi,
                        "completion_ids": ci,
                        "base_logprobs": [x for x, keep in zip(lp, m) if keep],
                        "retokenized_as_sampled": len(ci) == r["num_tokens"],
                    }
                )
    gathered = gather_object(scored)
    if not state.is_main_process:
        state.wait_for_everyone()
        return None
    order = {pid: i for i, pid in enumerate(rows)}
    gathered.sort(key=lambda s: (order[s["prompt_id"]], s["sample_index"]))
    info = {
        "format": FORMAT,
        "model": config.model,
        "dataset": config.dataset,
        "split": config.split,
        "seed": config.seed,
        "num_samples": config.num_samples,
        "min_correct": min_correct,
        "prompts": len({r["prompt_id"] for r in records}),
        "near_perfect_prompts": len(near_perfect),
        "exploration_prompts": len({r["prompt_id"] for r in records}) - len(near_perfect),
        "rehearsal_samples": len(gathered),
        "retokenized_differently": sum(not s["retokenized_as_sampled"] for s in gathered),
        "near_perfect_keys": sorted(prompt_key(rows[pid]["prompt"]) for pid in near_perfect),
    }
    atomic_write_text(out / REHEARSAL_FILE, "".join(json.dumps(s) + "\n" for s in gathered))
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=1) + "\n")
    state.wait_for_everyone()
    return info


def load_rehearsal(path: str | Path) -> RehearsalSet:
    """The rehearsal set written by `filtered-rl rehearsal-sample` into the folder `path`."""
    from filtered_rl.evaluation.outputs import read_json, read_jsonl

    folder = Path(path)
    fix = f"rerun `filtered-rl rehearsal-sample --output-dir {folder} ...` (it resumes its sampling)"
    if not (folder / INFO_FILE).exists() or not (folder / REHEARSAL_FILE).exists():
        raise FileNotFoundError(
            f"rehearsal_path={str(path)!r} holds no {INFO_FILE} and {REHEARSAL_FILE}: create it with "
            f"`filtered-rl rehearsal-sample --model <base model> --dataset <training set> --output-dir {folder}`"
        )
    info = read_json(folder / INFO_FILE, fix=fix)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{folder / INFO_FILE}: not a rehearsal set of format {FORMAT}; {fix}")
    samples = read_jsonl(folder / REHEARSAL_FILE, required=("prompt_ids", "completion_ids", "base_logprobs"))
    if len(samples) != info["rehearsal_samples"]:
        raise ValueError(
            f"{folder / REHEARSAL_FILE} holds {len(samples)} samples, {INFO_FILE} says {info['rehearsal_samples']}; {fix}"
        )
    return RehearsalSet(samples, set(info["near_perfect_keys"]), info)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from filtered_rl.data import default_dataset, verifier_names
    from filtered_rl.evaluation.cli import DTYPES, _positive_int

    parser.add_argument(
        "--model",
        required=True,
        help="the base model a: directory, hub id, or filtered-rl:nano|small|smollm2-135m",
    )
    parser.add_argument(
        "--dataset", default=default_dataset(), help="the training task (as `filtered-rl train`)"
    )
    parser.add_argument("--data-files", default=None, help="local file or directory instead of the hub")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument(
        "--num-prompts",
        type=_positive_int,
        default=None,
        help="the first N prompts (= `countdown_train_prompts` / `max_train_prompts` of the training recipe)",
    )
    parser.add_argument("--num-samples", "-k", type=_positive_int, default=8, help="K samples per prompt (8)")
    parser.add_argument(
        "--min-correct",
        type=_positive_int,
        default=None,
        help="a prompt is near-perfect with at least this many of K correct (default: K, as the paper)",
    )
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=None, help="default: the model's, else 512"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="sequences per decode batch")
    parser.add_argument(
        "--chat-template", action=argparse.BooleanOptionalAction, default=None, help="as `filtered-rl eval`"
    )
    parser.add_argument("--system-prompt", default="auto", help="'auto', 'none', or the text")
    parser.add_argument("--prompt-column", default=None, help="prompt column of a custom dataset")
    parser.add_argument("--verifier", default=None, choices=verifier_names())
    parser.add_argument("--gold-column", default=None, help="column holding the gold answer")
    parser.add_argument(
        "--seed", type=int, default=0, help="sampling seed and countdown's prompt seed (the recipe's)"
    )
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--output-dir", required=True, help="the folder `rehearsal_path` will name")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def sample_rehearsal(
    model: str,
    output_dir: str | Path,
    *,
    num_samples: int = 8,
    min_correct: int | None = None,
    **settings: Any,
) -> dict | None:
    """Both phases (module doc) for `model` on a task; returns rehearsal_info on the main process.

    `settings` are `EvalConfig` fields (dataset, split, num_prompts, max_new_tokens, seed, ...); the
    temperature is 1 and top_p 1: the rehearsal divergence is an expectation under a itself, untempered.
    Raises EvalConfigError for settings that cannot work (before any model loads).
    """
    from filtered_rl.evaluation.runner import EvalConfig, EvalConfigError, run_eval

    min_correct = min_correct or num_samples
    if not 1 <= min_correct <= num_samples:
        raise EvalConfigError(f"--min-correct {min_correct} must lie in [1, --num-samples {num_samples}]")
    config = EvalConfig(
        model=model,
        output_dir=str(output_dir),
        num_samples=num_samples,
        ks=[1, num_samples],
        temperature=1.0,
        top_p=1.0,
        **settings,
    )
    run_eval(config)
    return build_rehearsal_set(config, min_correct)


def run(args: argparse.Namespace) -> int:
    from filtered_rl.evaluation.outputs import EvalOutputError
    from filtered_rl.evaluation.runner import EvalConfigError
    from filtered_rl.train import resolve_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        info = sample_rehearsal(
            resolve_model(args.model),  # `filtered-rl:nano` as in the recipes
            args.output_dir,
            num_samples=args.num_samples,
            min_correct=args.min_correct,
            dataset=args.dataset,
            data_files=args.data_files,
            split=args.split,
            num_prompts=args.num_prompts,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            chat_template=args.chat_template,
            system_prompt=None if args.system_prompt.lower() == "none" else args.system_prompt,
            prompt_column=args.prompt_column,
            verifier=args.verifier,
            gold_column=args.gold_column,
            seed=args.seed,
            backend=args.backend,
            dtype=args.dtype,
            progress=not args.no_progress,
        )
    except EvalConfigError as error:
        print(f"filtered-rl rehearsal-sample: error: {error}", file=sys.stderr)
        return 2
    except EvalOutputError as error:
        print(f"filtered-rl rehearsal-sample: error: {error}", file=sys.stderr)
        return 1
    if info is not None:
        print(
            f"{info['near_perfect_prompts']} near-perfect prompts ({info['rehearsal_samples']} rehearsal samples), "
            f"{info['exploration_prompts']} exploration prompts; wrote {Path(args.output_dir) / REHEARSAL_FILE}"
        )
        if not info["rehearsal_samples"]:
            print("warning: no rehearsal sample: lower --min-correct or raise --num-samples", file=sys.stderr)
    return 0


if (
    __name__ == "__main__"
):  # `accelerate launch -m filtered_rl.rehearsal ...` (= `filtered-rl rehearsal-sample`)
    _parser = argparse.ArgumentParser(
        prog="filtered-rl rehearsal-sample", description=__doc__.splitlines()[0]
    )
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))

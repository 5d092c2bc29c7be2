"""How valid and how diverse a model's samples are on a synthetic task's prompts (`filtered-rl sample`).

This is the base-model check the rest of the project relies on: GRPO should raise validity and
shrink the set of distinct valid answers; the filtered objective should raise validity and keep it.
Any registered task works (`--task NAME`, default countdown): prompts, verifier and answer keys come
from `filtered_rl.synthetic.tasks`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from filtered_rl.synthetic.tasks import DEFAULT_TASK

# Bins of per-prompt validity, [low, high); the last bin is exactly 100 %.
VALIDITY_BINS: list[tuple[str, float, float]] = [
    ("0%", 0.0, 1e-12),
    ("(0,5%)", 1e-12, 0.05),
    ("[5,10%)", 0.05, 0.10),
    ("[10,20%)", 0.10, 0.20),
    ("[20,35%)", 0.20, 0.35),
    ("[35,50%)", 0.35, 0.50),
    ("[50,70%)", 0.50, 0.70),
    ("[70,100%)", 0.70, 1.0),
    ("100%", 1.0, float("inf")),
]


def validity_histogram(validities: list[float]) -> dict[str, int]:
    """Number of prompts per validity bin (`VALIDITY_BINS`)."""
    counts = {label: 0 for label, _, _ in VALIDITY_BINS}
    for v in validities:
        for label, low, high in VALIDITY_BINS:
            if low <= v < high:
                counts[label] += 1
                break
    return counts


def sample_completions(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    num_samples: int,
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> list[list[str]]:
    """`num_samples` completions per prompt (ancestral sampling at `temperature`, no top-k/top-p).

    Prompts are left-padded and batched; each prompt's samples come back as decoded text with
    special tokens removed, in order. `progress`: one bar over the prompts.
    """
    import torch

    from filtered_rl.synthetic.console import progress_bar

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    prompts_per_batch = max(1, batch_size // num_samples)
    out: list[list[str]] = []
    model.eval()
    bar = progress_bar(total=len(prompts), desc="sample", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), prompts_per_batch):
        chunk = prompts[start : start + prompts_per_batch]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            generated = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        out += [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(chunk))]
        bar.update(len(chunk))
    bar.close()
    return out


def validity_report(
    model_dir: str | Path,
    dataset: Any,
    num_samples: int = 32,
    temperature: float = 1.0,
    *,
    task: str | Any = DEFAULT_TASK,
    max_prompts: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Sample `num_samples` completions per prompt of `dataset` and score them with `task`'s verifier.

    `dataset`: a `datasets.Dataset` (or list of dicts) of the task's prompts, e.g.
    ``get_task(task).make_dataset(0, 64)["test"]``. `task`: a registered task name or instance.
    Returns ``{"overall_validity", "mean_distinct_valid", "fraction_in_5_70", "histogram",
    "per_prompt": [{prompt_id, prompt, validity, num_valid, distinct_valid, valid_answers}]}``;
    distinct answers are counted up to equivalence (the task's `answer_key`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filtered_rl.synthetic.console import quiet_libraries
    from filtered_rl.synthetic.tasks import get_task

    spec = get_task(task)
    rows = list(dataset)[:max_prompts] if max_prompts else list(dataset)
    if not rows:
        raise ValueError("validity_report: the dataset has no rows")
    verifier = spec.verifier()
    needed = {"prompt", getattr(verifier, "gold_column", "prompt")}
    missing = needed - set(rows[0])
    if missing:
        raise ValueError(
            f"validity_report: dataset lacks column(s) {sorted(missing)}; build it with "
            f"filtered_rl.synthetic.tasks.get_task({spec.name!r}).make_dataset"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with quiet_libraries():  # no "Loading weights" bar or tied-weights notice in the report
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    samples = sample_completions(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        num_samples,
        temperature=temperature,
        max_new_tokens=spec.max_completion_length,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    per_prompt = []
    for row, completions in zip(rows, samples):
        valid = [c for c in completions if spec.is_valid(c, row)]
        answers = sorted({key for key in (spec.answer_key(c, row) for c in valid) if key is not None})
        per_prompt.append(
            {
                "prompt_id": row.get("prompt_id", row["prompt"]),
                "prompt": row["prompt"],
                "validity": len(valid) / num_samples,
                "num_valid": len(valid),
                "distinct_valid": len(answers),
                "valid_answers": answers,
                "num_solutions": row.get("num_solutions"),
            }
        )
    validities = [p["validity"] for p in per_prompt]
    return {
        "model_dir": str(model_dir),
        "task": spec.name,
        "num_prompts": len(rows),
        "num_samples": num_samples,
        "temperature": temperature,
        "overall_validity": sum(validities) / len(validities),
        "mean_distinct_valid": sum(p["distinct_valid"] for p in per_prompt) / len(per_prompt),
        "fraction_in_5_70": sum(0.05 <= v <= 0.70 for v in validities) / len(validities),
        "histogram": validity_histogram(validities),
        "per_prompt": per_prompt,
    }


def exact_base_report(
    model_dir: str | Path, dataset: Any, *, task: str | Any = DEFAULT_TASK, ks: tuple[int, ...] = (1, 16, 256)
) -> dict[str, Any]:
    """The model's exact validity A(x), pass@k and coverage@k on each prompt, by teacher forcing over the
    task's enumerated valid answers (`filtered_rl.evaluation.exact`, the model as its own base).

    A task whose answers have several spellings (countdown) enumerates one per answer, so its exact
    validity is a lower bound; compare with the sampled validity (`validity_report`) to see the gap.
    """
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filtered_rl.evaluation.exact import exact_evaluation
    from filtered_rl.synthetic.console import quiet_libraries
    from filtered_rl.synthetic.tasks import get_task

    spec = get_task(task)
    rows = list(dataset)
    answers = [spec.enumerate_valid(row) for row in rows]
    if any(a is None for a in answers):
        raise ValueError(f"task {spec.name!r} cannot enumerate its valid answers: no exact report")
    with quiet_libraries():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    result = exact_evaluation(
        model, model, tokenizer, [r["prompt"] for r in rows], [sorted(a) for a in answers], ks
    )
    validities = np.array([p["validity"] for p in result["per_prompt"]])
    quantiles = (0.05, 0.25, 0.5, 0.75, 0.95)
    return {
        **result["summary"],
        "validity_quantiles": dict(zip(map(str, quantiles), np.quantile(validities, quantiles).tolist())),
        "prompts_below_1e-3": int((validities < 1e-3).sum()),
        "per_prompt_validity": validities.tolist(),
    }


def format_exact(exact: dict[str, Any]) -> str:
    """One paragraph: exact validity, its spread over prompts, pass@k and coverage@k."""
    quantiles = " / ".join(f"{v:.2g}" for v in exact["validity_quantiles"].values())
    passk = ", ".join(f"pass@{k} {v:.3f}" for k, v in exact["pass_at_k"].items())
    coverage = ", ".join(f"coverage@{k} {v:.3f}" for k, v in exact["coverage_at_k"].items())
    return (
        f"exact (teacher forcing over {exact['num_valid']:.1f} enumerated valid answers a prompt): validity "
        f"{exact['validity']:.4f}\n  A(x) quantiles 5/25/50/75/95 %: {quantiles}; "
        f"{exact['prompts_below_1e-3']} of {exact['num_prompts']} prompts below 1e-3\n  {passk}\n  {coverage}"
    )


def format_report(report: dict[str, Any], max_rows: int = 20) -> str:
    """Human-readable table: per-prompt validity and distinct valid answers, then the histogram."""
    lines = [f"{'prompt':<28} {'valid':>7} {'distinct':>8}  examples"]
    for p in report["per_prompt"][:max_rows]:
        examples = ", ".join(p["valid_answers"][:3])
        lines.append(f"{p['prompt']:<28} {p['validity']:>7.1%} {p['distinct_valid']:>8}  {examples}")
    if len(report["per_prompt"]) > max_rows:
        lines.append(f"... ({len(report['per_prompt']) - max_rows} more prompts)")
    lines += [
        "",
        f"prompts: {report['num_prompts']}  samples/prompt: {report['num_samples']}  "
        f"temperature: {report['temperature']}",
        f"overall validity: {report['overall_validity']:.1%}   "
        f"mean distinct valid answers/prompt: {report['mean_distinct_valid']:.2f}   "
        f"prompts with validity in [5%, 70%]: {report['fraction_in_5_70']:.0%}",
        "per-prompt validity histogram:",
    ]
    total = max(1, report["num_prompts"])
    for label, count in report["histogram"].items():
        lines.append(f"  {label:>10} {count:>5}  {'#' * round(40 * count / total)}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from filtered_rl.synthetic.tasks import task_names

    parser.add_argument(
        "--task", default=DEFAULT_TASK, choices=task_names(), help=f"synthetic task (default: {DEFAULT_TASK})"
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="model directory (default: the task's cached nano base model, pretrained if absent)",
    )
    parser.add_argument("--size", default="nano", help="base model size when --model-dir is not given")
    parser.add_argument("--seed", type=int, default=0, help="base-model and dataset seed")
    parser.add_argument("--num-prompts", type=int, default=64, help="held-out (test split) prompts")
    parser.add_argument("--num-samples", type=int, default=32, help="samples per prompt")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=20, help="per-prompt rows to print")
    parser.add_argument("--json", default=None, help="also write the full report to this JSON file")
    parser.add_argument(
        "--exact",
        action="store_true",
        help="also the exact validity spread, pass@k and coverage@k by teacher forcing over the task's "
        "enumerated valid answers (tasks that can enumerate them)",
    )


def run(args: argparse.Namespace) -> int:
    from filtered_rl.synthetic.base_model import load_or_pretrain
    from filtered_rl.synthetic.tasks import get_task

    task = get_task(args.task)
    model_dir = args.model_dir or load_or_pretrain(args.size, args.seed, task=task.name)
    test = task.make_dataset(0, args.num_prompts, seed=args.seed)["test"]
    report = validity_report(
        model_dir,
        test,
        num_samples=args.num_samples,
        temperature=args.temperature,
        task=task,
        seed=args.seed,
        progress=True,
    )
    print(format_report(report, max_rows=args.rows))
    if args.exact:
        report["exact"] = exact_base_report(model_dir, test, task=task, ks=(1, args.num_samples, 256))
        print(format_exact(report["exact"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0

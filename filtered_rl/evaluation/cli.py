"""`filtered-rl eval`: pass@k, coverage and diversity of a model on a task.

    filtered-rl eval --model PATH --dataset countdown --num-samples 64 --output-dir runs/eval/base
    accelerate launch --num_processes 2 -m filtered_rl.cli eval --model PATH --dataset gsm8k \
        --data-files /data/gsm8k --num-samples 16 --output-dir runs/eval/gsm8k
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from filtered_rl.evaluation.runner import EvalConfig

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


def _number(
    kind: type, low: float, high: float = math.inf, *, open_low: bool = False
) -> Callable[[str], float]:
    """An argparse `type` accepting a `kind` in [low, high] (or (low, high]): a bad value is a usage
    error naming the flag, before anything is loaded, instead of a traceback later."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}]" if high < math.inf else None

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        too_low = value <= low if open_low else value < low
        if not math.isfinite(value) or too_low or value > high:
            bound = f"in {interval}" if interval else f"{'>' if open_low else '≥'} {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


_positive_int = _number(int, 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from filtered_rl.data import default_dataset, verifier_names

    parser.add_argument(
        "--model",
        required=True,
        help="model directory, hub id (a Hugging Face causal LM) or filtered-rl:nano|small|smollm2-135m",
    )
    parser.add_argument(
        "--dataset",
        default=default_dataset(),
        help="a synthetic task (countdown, subset_sum) | gsm8k | math500 | humaneval | mbpp, or a hub name / "
        f"data file with --prompt-column and --verifier (default: {default_dataset()})",
    )
    parser.add_argument(
        "--data-files",
        default=None,
        help="local file or directory instead of the hub (e.g. /data/gsm8k holding test.jsonl)",
    )
    parser.add_argument("--split", default=None, help="dataset split (default: test)")
    parser.add_argument(
        "--num-prompts",
        type=_positive_int,
        default=None,
        help="evaluate the first N prompts only (an error if the split has fewer)",
    )
    parser.add_argument(
        "--num-samples", "-n", type=_positive_int, default=16, help="samples per prompt (default: 16)"
    )
    parser.add_argument(
        "--k",
        type=_positive_int,
        nargs="+",
        default=None,
        help="k values of pass@k (default: 1, 2, 4, ... up to n, and n)",
    )
    parser.add_argument(
        "--temperature", type=_number(float, 0), default=1.0, help="sampling temperature; 0 = greedy"
    )
    parser.add_argument(
        "--top-p", type=_number(float, 0, 1, open_low=True), default=1.0, help="nucleus mass in (0, 1]"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=None,
        help="default: the model's generation_config.max_new_tokens, else 512",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=64, help="sequences per decode batch (default: 64)"
    )
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="conversational prompts through the tokenizer's chat template (default: on for "
        "math/code tasks, off for synthetic tasks)",
    )
    parser.add_argument(
        "--system-prompt",
        default="auto",
        help="'auto' (boxed answer for math, a ```python block for code), 'none', or the text",
    )
    parser.add_argument("--prompt-column", default=None, help="prompt column of a custom dataset")
    parser.add_argument(
        "--verifier", default=None, choices=verifier_names(), help="verifier of a custom dataset"
    )
    parser.add_argument(
        "--gold-column", default=None, help="column holding the gold answer (verifier default)"
    )
    parser.add_argument(
        "--base-model", default=None, help="base/reference model a: adds KL(p*||pi) and the p*-mass covered"
    )
    parser.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0, help="in [0, 2^32 - 1]")
    parser.add_argument(
        "--max-prompt-length",
        type=_positive_int,
        default=None,
        help="refuse prompts longer than this many tokens, before the model loads (default: the model's "
        "context length minus --max-new-tokens)",
    )
    parser.add_argument(
        "--backend", default="hf", choices=["hf", "vllm"], help="hf (default) or vllm if installed"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="auto (bf16 on GPU, fp32 on CPU), or a torch dtype"
    )
    parser.add_argument(
        "--bootstrap", type=_positive_int, default=1000, help="bootstrap resamples for the intervals"
    )
    parser.add_argument("--output-dir", default=None, help="default: runs/eval/<model>-<dataset>")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def usage_error(message: str) -> NoReturn:
    """Exit as argparse does for a bad flag (usage line, message, exit code 2).

    `run` receives the parsed arguments but not the parser, so the checks that need several flags, or
    the dataset, rebuild it to report in the same form as the single-flag checks."""
    parser = argparse.ArgumentParser(prog="filtered-rl eval")
    add_arguments(parser)
    parser.error(message)


def run(args: argparse.Namespace) -> int:
    from filtered_rl.data import DataError
    from filtered_rl.evaluation.outputs import EvalOutputError
    from filtered_rl.evaluation.runner import EvalConfigError, run_eval
    from filtered_rl.synthetic.base_model import OutputDirError

    try:
        config = _config(args)  # checks the flags together, before torch is even imported
    except EvalConfigError as error:
        usage_error(str(error))
    config = _resolve_named_models(config)

    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()  # one progress bar: the evaluation's
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = run_eval(config)
    except EvalConfigError as error:
        # found once the dataset is loaded (--num-prompts) or the output dir read, before the model loads
        usage_error(str(error))
    except (EvalOutputError, DataError, OutputDirError, FileNotFoundError) as error:
        # an earlier run's file that cannot be read, bad data, a user's file in --output-dir: the message
        # names the file (line, row or column) and says what to do
        print(f"filtered-rl eval: error: {error}", file=sys.stderr)
        return 1
    if summary is not None:
        out = Path(config.output_dir)
        print(format_summary(summary))
        print(f"\nwrote {out / 'summary.json'} and {out / 'samples.jsonl'}")
    return 0


def _resolve_named_models(config: EvalConfig) -> EvalConfig:
    """`filtered-rl:<name>` (filtered_rl.models) → the cached directory, built or converted on first use."""
    from dataclasses import replace

    from filtered_rl.models import NamedModelError, resolve_model

    try:
        base = config.base_model and resolve_model(config.base_model)
        return replace(config, model=resolve_model(config.model), base_model=base)
    except NamedModelError as error:
        usage_error(str(error))


def _config(args: argparse.Namespace) -> EvalConfig:
    from filtered_rl.evaluation.runner import EvalConfig

    output_dir = args.output_dir or str(
        Path("runs")
        / "eval"
        / f"{Path(args.model.removeprefix('filtered-rl:')).name}-{Path(args.dataset).stem}"
    )
    return EvalConfig(
        model=args.model,
        output_dir=output_dir,
        dataset=args.dataset,
        data_files=args.data_files,
        split=args.split,
        num_prompts=args.num_prompts,
        num_samples=args.num_samples,
        ks=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
        system_prompt=None if args.system_prompt.lower() == "none" else args.system_prompt,
        prompt_column=args.prompt_column,
        verifier=args.verifier,
        gold_column=args.gold_column,
        seed=args.seed,
        base_model=args.base_model,
        backend=args.backend,
        dtype=args.dtype,
        bootstrap=args.bootstrap,
        max_prompt_length=args.max_prompt_length,
        progress=not args.no_progress,
    )


def format_summary(summary: dict) -> str:
    """A short plain-text report of a summary.json."""
    lines = [
        f"{summary['model']} on {summary['dataset']}: {summary['num_prompts']} prompts × "
        f"{summary['num_samples']} samples (T={summary['temperature']}, top_p={summary['top_p']})",
        "",
        "  k   pass@k   95% CI",
    ]
    for k, v in summary["pass_at_k"].items():
        lines.append(f"{int(k):>3}   {v['mean']:.3f}    [{v['ci_low']:.3f}, {v['ci_high']:.3f}]")
    d = summary["diversity"]
    entropy = "n/a" if d["answer_entropy"] is None else f"{d['answer_entropy']:.3f}"
    lines += [
        "",
        f"distinct valid answers / prompt: {d['distinct_valid_answers']:.2f}   "
        f"answer entropy: {entropy} nats   truncated: {summary['truncated_fraction']:.1%}",
    ]
    if "coverage" in summary:
        c = summary["coverage"]
        mass = "" if c["pstar_mass_hit"] is None else f"   p*-mass hit: {c['pstar_mass_hit']:.3f}"
        lines.append(
            f"valid answers hit: {c['fraction_of_valid_answers_hit']:.3f} "
            f"(of {c['valid_answers_per_prompt']:.1f} per prompt){mass}"
        )
    if "kl_pstar_to_policy" in summary and summary["kl_pstar_to_policy"]["mean"] is not None:
        kl = summary["kl_pstar_to_policy"]
        lines.append(
            f"KL(p*||pi) ≈ {kl['mean']:.3f} nats (ESS {kl['mean_ess']:.1f}, over {kl['prompts']} prompts)"
        )
    run = summary.get("run") or {}
    if run.get("tokens_per_second"):
        lines.append(
            f"throughput: {run['tokens_per_second']:.0f} generated tokens/s on {run['num_processes']} process(es)"
        )
    return "\n".join(lines)

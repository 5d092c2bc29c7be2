"""One evaluation run: sample n completions per prompt, verify them, write them, summarise pass@k.

Data parallel: the decode batches are planned once from the whole dataset (prompts sorted by length,
so a batch holds prompts of similar length) and dealt round-robin to the `accelerate` processes. Each
sample is seeded from (seed, prompt_id, sample index), so 1 or 8 processes, or a resumed run, produce
the same samples. Every process appends its finished batches to its own `samples.rank<r>.jsonl`
(flushed per batch); at the end the records are gathered on the main process, merged into
`samples.jsonl` (one line per sample, deduplicated) and summarised into `summary.json`.

Resume: rerunning with the same `--output-dir` first merges what a killed run left, then samples only
the (prompt, sample) pairs that are missing. Changing a setting that changes the samples (model,
temperature, ...) is refused; `--num-samples` and `--num-prompts` may grow. Whole files are replaced
atomically and a shard's last line torn by a kill is dropped with a warning (`outputs`), so a kill at
any moment leaves a directory that resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import numpy as np

from filtered_rl.evaluation import metrics
from filtered_rl.evaluation.outputs import EvalOutputError, atomic_write_text, read_json, read_jsonl
from filtered_rl.evaluation.passk import bootstrap_ci, default_ks, pass_at_k_matrix

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "eval_config.json"
# Settings that change what a sample is; a resumed run must match them.
SAMPLING_FIELDS = (
    "model",
    "base_model",
    "dataset",
    "data_files",
    "split",
    "temperature",
    "top_p",
    "max_new_tokens",
    "chat_template",
    "system_prompt",
    "prompt_column",
    "verifier",
    "gold_column",
    "seed",
    "backend",
)


def _default_dataset() -> str:
    from filtered_rl.data import default_dataset

    return default_dataset()


def load_config_task(config: Any) -> Any:
    """The task (prompts + verifier) an `EvalConfig`-like config names: its dataset, split, first
    `num_prompts` prompts, prompt format and verifier; synthetic prompts are generated from its seed.
    Shared by the eval runner, the rehearsal sampler and the frontier's exact evaluation."""
    from filtered_rl.data import load_task

    return load_task(
        config.dataset,
        data_files=config.data_files,
        split=config.split,
        limit=config.num_prompts,
        conversational=config.chat_template,
        system_prompt=config.system_prompt,
        prompt_column=config.prompt_column,
        verifier=config.verifier,
        gold_column=config.gold_column,
        seed=config.seed,
    )


class EvalConfigError(ValueError):
    """A setting that cannot work, found before any model is loaded; the message names the flag.

    `filtered-rl eval` turns it into a usage error (exit code 2) instead of a traceback.
    """


def _flag(field: str) -> str:
    return "--" + {"ks": "k"}.get(field, field).replace("_", "-")


@dataclass
class EvalConfig:
    model: str
    output_dir: str
    dataset: str = dataclass_field(default_factory=lambda: _default_dataset())  # the default synthetic task
    data_files: str | None = None
    split: str | None = None
    num_prompts: int | None = None
    num_samples: int = 16
    ks: list[int] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: the model's generation_config, else 512
    batch_size: int = 64  # sequences per decode batch
    chat_template: bool | None = None  # None: the task's default
    system_prompt: str | None = "auto"
    prompt_column: str | None = None
    verifier: str | None = None
    gold_column: str | None = None
    seed: int = 0
    base_model: str | None = None  # base/reference model a: enables KL(p*‖π) and p*-mass coverage
    backend: str = "hf"
    dtype: str = "auto"
    bootstrap: int = 1000
    progress: bool = True
    max_prompt_length: int | None = None  # tokens; None: the model's context length minus max_new_tokens

    def __post_init__(self) -> None:
        """Refuse settings that cannot work now, rather than after the model has loaded (or at the end)."""
        for field in (
            "num_samples",
            "batch_size",
            "bootstrap",
            "num_prompts",
            "max_new_tokens",
            "max_prompt_length",
        ):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise EvalConfigError(f"{_flag(field)} must be ≥ 1, got {value}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise EvalConfigError(f"--temperature must be ≥ 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EvalConfigError(f"--top-p must be in (0, 1] (1 = no nucleus filtering), got {self.top_p}")
        if not 0 <= self.seed < 2**32:
            raise EvalConfigError(f"--seed must be in [0, 2^32 - 1], got {self.seed}")
        if self.backend not in ("hf", "vllm"):
            raise EvalConfigError(f"--backend must be 'hf' or 'vllm', got {self.backend!r}")
        if self.ks is not None and not self.ks:
            raise EvalConfigError("--k needs at least one value")
        bad = [k for k in self.ks or [] if k > self.num_samples or k < 1]
        if bad:
            raise EvalConfigError(
                f"--k {' '.join(map(str, bad))}: pass@k needs 1 ≤ k ≤ n = --num-samples {self.num_samples}: "
                f"lower --k or raise --num-samples"
            )


def prompt_seed(prompt_id: str) -> int:
    """A per-prompt integer from its id: samples do not depend on the prompt's position or shard."""
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") >> 1


def plan_batches(lengths: list[int], num_samples: int, batch_size: int) -> list[tuple[list[int], range]]:
    """Decode batches as (prompt positions, sample range), longest prompts first.

    Up to batch_size // num_samples prompts share a batch with all their samples; when one prompt's
    samples exceed batch_size, they are split into several batches of that prompt alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if num_samples <= batch_size:
        per = batch_size // num_samples
        return [(order[j : j + per], range(num_samples)) for j in range(0, len(order), per)]
    return [
        ([i], range(s, min(num_samples, s + batch_size)))
        for i in order
        for s in range(0, num_samples, batch_size)
    ]


# --- files -----------------------------------------------------------------------------------------


def _read_records(paths: list[Path]) -> list[dict]:
    """Records from JSONL files; a last line cut short by a kill is dropped (its sample is redone)."""
    records = []
    for path in paths:
        if path.exists():
            records += read_jsonl(path, required=("prompt_id", "sample_index"))
    return records


def _dedup(records: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in records:
        key = (r["prompt_id"], r["sample_index"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _write_records(path: Path, records: list[dict], order: dict[str, int]) -> None:
    records = sorted(
        records, key=lambda r: (order.get(r["prompt_id"], math.inf), r["prompt_id"], r["sample_index"])
    )
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _shards(out: Path) -> list[Path]:
    return sorted(out.glob("samples.rank*.jsonl"))


def _check_config(out: Path, config: EvalConfig) -> bool:
    """Refuse to resume into a directory whose samples were drawn with different settings.

    Read-only, so that every process runs it and all of them raise together (a refusal on the main
    process alone would leave the others waiting at a barrier). Returns whether the file is missing.
    """
    path = out / CONFIG_FILE
    if not path.exists():
        return True
    previous = read_json(
        path,
        fix=f"if the samples in {out} were drawn with the settings you pass now, delete {path} and rerun "
        f"(it is rewritten from the flags); otherwise use a new --output-dir",
    )
    if not isinstance(previous, dict):
        raise EvalOutputError(
            f"{path} holds no settings object: delete it and rerun, or use a new --output-dir"
        )
    current = _sampling_settings(config)
    diff = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in diff.items())
        raise EvalConfigError(
            f"{out} holds samples drawn with other settings ({detail}); "
            f"use a new --output-dir or remove the old one"
        )
    return False


def _sampling_settings(config: EvalConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in SAMPLING_FIELDS}


# --- models ----------------------------------------------------------------------------------------


def _load_model(path: str, dtype: str, device: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        torch_dtype = (
            torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        )
    else:
        torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return model.to(device).eval()


def _max_new_tokens(config: EvalConfig, model_path: str) -> int:
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    try:
        from transformers import GenerationConfig

        value = GenerationConfig.from_pretrained(model_path).max_new_tokens
    except (OSError, ValueError):
        value = None
    return int(value) if value else 512


# --- the run ---------------------------------------------------------------------------------------


def run_eval(config: EvalConfig, *, sampler: Any = None) -> dict | None:
    """Evaluate `config.model`; returns the summary on the main process (None on the others).

    `sampler` replaces the sampler built from `config.model` (any object with `.sample(prompt_ids,
    prompt_seeds, sample_indices)`, e.g. an `HFSampler` around a model already in memory); the
    tokenizer is always loaded from `config.model`.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from filtered_rl.data import (
        check_prompt_lengths,
        check_verifier_columns,
        prompt_length_limit,
        render_prompt,
    )
    from filtered_rl.evaluation.generate import HFSampler, VLLMSampler, sequence_logprobs
    from filtered_rl.run_dir import check_eval_output_dir, check_model_path, claim_eval_output_dir

    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(config.output_dir)
    check_eval_output_dir(out)  # never overwrite a summary.json (or any file eval writes) that is not ours
    task = load_config_task(config)
    rows = task.dataset.to_list()
    if config.num_prompts is not None and len(rows) < config.num_prompts:
        # load_task keeps at most what exists; evaluating fewer prompts than asked must not pass silently
        raise EvalConfigError(
            f"--num-prompts {config.num_prompts}: {config.dataset} has only {len(rows)} prompts in its "
            f"{config.split or 'test'} split; pass --num-prompts {len(rows)} or less (or leave it out for all)"
        )
    prompt_ids = [r["prompt_id"] for r in rows]
    if len(set(prompt_ids)) != len(prompt_ids):
        raise ValueError(
            f"{config.dataset}: prompt_id values are not unique; resume and seeding need unique ids"
        )
    order = {pid: i for i, pid in enumerate(prompt_ids)}

    # Resume. Every process checks the settings and reads what earlier runs left, before any model or
    # tokenizer loads: a refusal or an unreadable file then stops all processes at once (raised on the
    # main one alone, the others would wait at the barrier). Then the main process writes the settings
    # and folds the shards into samples.jsonl.
    config_missing = _check_config(out, config)
    samples_path = out / SAMPLES_FILE
    with warnings.catch_warnings():
        if not state.is_main_process:
            warnings.simplefilter("ignore")  # a dropped torn line is reported once, by the main process
        previous = _dedup(_read_records([samples_path, *_shards(out)]))
    check_verifier_columns(task)  # a missing gold column fails now, not after the first decode batch
    state.wait_for_everyone()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        claim_eval_output_dir(out, state.num_processes)
        if config_missing:
            atomic_write_text(out / CONFIG_FILE, json.dumps(_sampling_settings(config), indent=2) + "\n")
        if previous or _shards(out):
            _write_records(samples_path, previous, order)
        for shard in _shards(out):
            shard.unlink()
    state.wait_for_everyone()
    done = {(r["prompt_id"], r["sample_index"]) for r in previous}

    try:  # a missing local directory: not the hub's "Repo id must be in the form ..."
        check_model_path(config.model, "--model")
        check_model_path(config.base_model, "--base-model")
    except ValueError as error:
        raise EvalConfigError(str(error)) from None
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    rendered = [render_prompt(r["prompt"], tokenizer) for r in rows]
    encoded = [
        tokenizer(text, add_special_tokens=isinstance(r["prompt"], str))["input_ids"]
        for text, r in zip(rendered, rows)
    ]
    max_new_tokens = _max_new_tokens(config, config.model)
    check_prompt_lengths(
        [len(ids) for ids in encoded],
        prompt_ids,
        prompt_length_limit(config.model, max_new_tokens, config.max_prompt_length),
        setting=f"--max-prompt-length {config.max_prompt_length}"
        if config.max_prompt_length is not None
        else f"the model's context length minus --max-new-tokens {max_new_tokens} (--max-prompt-length changes it)",
        source=str(config.dataset),
    )

    batches = plan_batches([len(ids) for ids in encoded], config.num_samples, config.batch_size)
    todo = [
        b
        for b in batches[state.process_index :: state.num_processes]
        if any((prompt_ids[i], s) not in done for i in b[0] for s in b[1])
    ]

    model = base = None
    if sampler is None and todo:
        if config.backend == "vllm":
            sampler = VLLMSampler(
                config.model,
                tokenizer,
                temperature=config.temperature,
                top_p=config.top_p,
                max_new_tokens=max_new_tokens,
                seed=config.seed,
                dtype=config.dtype,
            )
        else:
            model = _load_model(config.model, config.dtype, state.device)
            sampler = HFSampler(
                model,
                tokenizer,
                temperature=config.temperature,
                top_p=config.top_p,
                max_new_tokens=max_new_tokens,
                seed=config.seed,
            )
    if config.base_model and todo:
        base = _load_model(config.base_model, config.dtype, state.device)

    started, new_tokens, new_records = time.time(), 0, []
    shard_path = out / f"samples.rank{state.process_index}.jsonl"
    with open(shard_path, "a", encoding="utf-8") as shard:
        bar = tqdm(
            todo,
            desc=f"eval {config.dataset}",
            unit="batch",
            disable=not (config.progress and state.is_main_process),
        )
        for positions, sample_range in bar:
            groups = sampler.sample(
                [encoded[i] for i in positions], [prompt_seed(prompt_ids[i]) for i in positions], sample_range
            )
            batch_records = _verify(task, [rows[i] for i in positions], positions, groups)
            if base is not None:
                flat = [(i, s) for i, g in zip(positions, groups) for s in g]
                scores = sequence_logprobs(
                    base,
                    tokenizer,
                    [encoded[i] for i, _ in flat],
                    [s.token_ids for _, s in flat],
                    batch_size=config.batch_size,
                )
                for record, score in zip(batch_records, scores):
                    record["base_logprob"] = score
            fresh = [r for r in batch_records if (r["prompt_id"], r["sample_index"]) not in done]
            shard.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh))
            shard.flush()
            new_records += fresh
            new_tokens += sum(g.num_tokens for group in groups for g in group)
            bar.set_postfix(tok_s=f"{new_tokens / max(time.time() - started, 1e-9):.0f}")
    seconds = time.time() - started

    gathered = gather_object(new_records)
    tokens_all = gather_object([new_tokens])
    if not state.is_main_process:
        state.wait_for_everyone()
        return None
    records = _dedup(_read_records([samples_path]) + gathered)
    _write_records(samples_path, records, order)
    for shard in _shards(out):
        shard.unlink()
    summary = summarize(
        task,
        rows,
        records,
        config,
        tokenizer=tokenizer,
        encoded=encoded,
        base_model_path=config.base_model,
        device=state.device,
    )
    summary["run"] = {
        "num_processes": state.num_processes,
        "new_samples": len(gathered),
        "generated_tokens": int(sum(tokens_all)),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(sum(tokens_all) / seconds, 1) if seconds > 0 and gathered else None,
    }
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    state.wait_for_everyone()
    return summary


def _verify(task: Any, rows: list[dict], positions: list[int], groups: list[list[Any]]) -> list[dict]:
    """Verdict and answer key of every sample of a batch (one verifier call for the whole batch)."""
    flat = [(row, pos, s) for row, pos, group in zip(rows, positions, groups) for s in group]
    columns = {k: [row[k] for row, _, _ in flat] for k in rows[0] if k != "prompt"}
    verdicts = task.verifier(
        prompts=[row["prompt"] for row, _, _ in flat], completions=[s.text for _, _, s in flat], **columns
    )
    records = []
    for (row, pos, s), verdict in zip(flat, verdicts):
        records.append(
            {
                "prompt_id": row["prompt_id"],
                "prompt_index": pos,
                "sample_index": s.sample_index,
                "completion": s.text,
                "verdict": None if verdict is None else float(verdict),
                "answer_key": task.verifier.answer_key(s.text, row),
                "num_tokens": s.num_tokens,
                "finished": s.finished,
                "logprob": s.logprob,
            }
        )
    return records


# --- summary ---------------------------------------------------------------------------------------


def summarize(
    task: Any,
    rows: list[dict],
    records: list[dict],
    config: EvalConfig,
    *,
    tokenizer: Any = None,
    encoded: list[list[int]] | None = None,
    base_model_path: str | None = None,
    device: Any = None,
) -> dict:
    """pass@k with bootstrap intervals, diversity, coverage and KL(p*‖π) from the sample records.

    A verdict of None (the verifier could not judge the gold) counts as invalid; prompts where every
    verdict is None are left out and counted in `unjudged_prompts`.
    """
    n = config.num_samples
    ks = config.ks or default_ks(n)
    by_prompt: dict[str, list[dict]] = {}
    for r in records:
        if r["sample_index"] < n:
            by_prompt.setdefault(r["prompt_id"], []).append(r)
    missing = [r["prompt_id"] for r in rows if len(by_prompt.get(r["prompt_id"], [])) != n]
    if missing:
        raise RuntimeError(f"{len(missing)} prompts lack samples (e.g. {missing[:3]}); rerun to resume")

    kept, unjudged = [], 0
    for row in rows:
        samples = sorted(by_prompt[row["prompt_id"]], key=lambda r: r["sample_index"])
        if all(s["verdict"] is None for s in samples):
            unjudged += 1
        else:
            kept.append((row, samples))
    if not kept:
        raise RuntimeError("the verifier judged no prompt (every verdict is None); check the gold column")

    valid = [[(s["verdict"] or 0.0) > 0.5 for s in samples] for _, samples in kept]
    counts = [sum(v) for v in valid]
    matrix = pass_at_k_matrix([n] * len(kept), counts, ks)
    low, high = bootstrap_ci(matrix, num_resamples=config.bootstrap, seed=config.seed)
    pass_at_k = {
        str(k): {"mean": float(matrix[:, j].mean()), "ci_low": float(low[j]), "ci_high": float(high[j])}
        for j, k in enumerate(ks)
    }

    valid_keys = [
        [s["answer_key"] for s, v in zip(samples, vs) if v] for (_, samples), vs in zip(kept, valid)
    ]
    distinct = np.array([metrics.distinct_answers(keys) for keys in valid_keys], dtype=float)
    entropies = np.array([metrics.answer_entropy(keys) for keys in valid_keys])
    all_samples = [s for _, samples in kept for s in samples]
    summary: dict[str, Any] = {
        "model": config.model,
        "dataset": config.dataset,
        "split": config.split or "test",
        "num_prompts": len(kept),
        "unjudged_prompts": unjudged,
        "num_samples": n,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed,
        "ks": ks,
        "pass_at_k": pass_at_k,
        "validity": float(np.mean(counts) / n),
        "diversity": {
            "distinct_valid_answers": float(distinct.mean()),
            "answer_entropy": float(np.nanmean(entropies)) if np.isfinite(entropies).any() else None,
            "prompts_with_valid": int(np.isfinite(entropies).sum()),
        },
        "truncated_fraction": float(np.mean([not s["finished"] for s in all_samples])),
        "mean_completion_tokens": float(np.mean([s["num_tokens"] for s in all_samples])),
    }

    position = {row["prompt_id"]: i for i, row in enumerate(rows)}
    enumerable = [(row, keys, task.valid_answers(row)) for (row, _), keys in zip(kept, valid_keys)]
    if all(answers for _, _, answers in enumerable):
        valid_logprobs = None
        if base_model_path is not None:
            valid_logprobs = _score_valid_answers(
                base_model_path,
                tokenizer,
                config,
                enumerable,
                [encoded[position[row["prompt_id"]]] for row, _, _ in enumerable],
                device,
            )
        fractions, masses = [], []
        for j, (_, keys, answers) in enumerate(enumerable):
            fraction, mass = metrics.coverage(
                set(keys), answers, None if valid_logprobs is None else valid_logprobs[j]
            )
            fractions.append(fraction)
            masses.append(mass)
        summary["coverage"] = {
            "valid_answers_per_prompt": float(np.mean([len(a) for _, _, a in enumerable])),
            "fraction_of_valid_answers_hit": float(np.mean(fractions)),
            "pstar_mass_hit": float(np.mean(masses)) if valid_logprobs is not None else None,
        }

    if all("base_logprob" in s for s in all_samples):
        kls, ess, log_a_hat, seen_mass = [], [], [], []
        for (_, samples), vs in zip(kept, valid):
            if not any(vs):
                continue
            est = metrics.filtered_kl(
                [s["base_logprob"] for s in samples], [s["logprob"] for s in samples], vs
            )
            kls.append(est["kl"])
            ess.append(est["ess"])
            log_a_hat.append(est["log_A_hat"])
            seen_mass.append(
                metrics.sampled_pstar_mass(
                    [s["completion"] for s in samples],
                    [s["base_logprob"] for s in samples],
                    vs,
                    est["log_A_hat"],
                )
            )
        summary["kl_pstar_to_policy"] = {
            "estimator": "self-normalised importance sampling, y ~ pi (see filtered_rl.evaluation.metrics.filtered_kl)",
            "mean": float(np.mean(kls)) if kls else None,
            "mean_ess": float(np.mean(ess)) if ess else None,
            "mean_base_validity_estimate": float(np.mean(np.exp(log_a_hat))) if log_a_hat else None,
            "mean_sampled_pstar_mass": float(np.mean(seen_mass)) if seen_mass else None,
            "prompts": len(kls),
        }
    return summary


def _score_valid_answers(
    base_model_path: str,
    tokenizer: Any,
    config: EvalConfig,
    enumerable: list,
    prompt_token_ids: list[list[int]],
    device: Any,
) -> list[dict[str, float]]:
    """log a(y|x) of every enumerated valid answer, written as a completion ending in EOS."""
    from filtered_rl.evaluation.generate import eos_token_ids, sequence_logprobs

    base = _load_model(base_model_path, config.dtype, device)
    eos = eos_token_ids(base, tokenizer)[0]
    pairs = [(j, answer) for j, (_, _, answers) in enumerate(enumerable) for answer in sorted(answers)]
    completions = [tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos] for _, answer in pairs]
    scores = sequence_logprobs(
        base,
        tokenizer,
        [prompt_token_ids[j] for j, _ in pairs],
        completions,
        batch_size=max(config.batch_size, 64),
    )
    out: list[dict[str, float]] = [{} for _ in enumerable]
    for (j, answer), score in zip(pairs, scores):
        out[j][answer] = score
    return out

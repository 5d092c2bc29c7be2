"""Prompt datasets and their verifiers, by task name: what evaluation and the training recipes share.

`load_task("gsm8k")` (hub) or `load_task("gsm8k", data_files="/data/gsm8k")` (local copy) returns a
`Task`: a `datasets.Dataset` with a ``prompt`` column in the form TRL expects (conversational messages
``[{"role": "system", ...}, {"role": "user", ...}]`` or plain text), a stable ``prompt_id``, the gold
columns its verifier reads, and the verifier itself (a TRL reward function). Any other dataset works
with `prompt_column=` and `verifier=` ("math", "code" or a synthetic task's name).

Synthetic tasks (generated prompts, verifiers that can enumerate every valid answer) are not built in
here: a name that is not a built-in is looked up in the registry of `SYNTHETIC_TASKS_MODULE`
(imported only then), so `load_task(<synthetic task>)` generates its prompts and `Task.valid_answers`
lists its valid answers.

Prompt formatting: conversational prompts (the default for math and code tasks) are rendered with the
tokenizer's chat template at generation time (`render_prompt`); plain-text prompts are used verbatim
(the synthetic tasks' default, for a character-level base model). Math tasks ask for a boxed final
answer, code tasks for one ```python block.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MATH_SYSTEM_PROMPT = (
    "Solve the problem step by step. Write the final answer alone inside \\boxed{}, e.g. \\boxed{42}."
)
CODE_SYSTEM_PROMPT = (
    "You are an expert Python programmer. Reply with the complete solution in a single ```python code block."
)

# name -> (kind, hub id, hub config, default split, local file name inside a directory)
BUILTIN_TASKS: dict[str, tuple[str, str, str | None, str, str]] = {
    "gsm8k": ("math", "openai/gsm8k", "main", "test", "{split}.jsonl"),
    "math500": ("math", "HuggingFaceH4/MATH-500", None, "test", "test.jsonl"),
    "humaneval": ("code", "openai/openai_humaneval", None, "test", "HumanEval.jsonl"),
    "mbpp": ("code", "google-research-datasets/mbpp", "sanitized", "test", "sanitized-mbpp.json"),
}
# Where the verifier registry lives (imported on use: it is light, but keeps this module's import cheap).
VERIFIERS_MODULE = "filtered_rl.verifiers"
# Where the synthetic tasks' registry lives (a name, so that the product never imports the demo
# unless a synthetic task is asked for).
SYNTHETIC_TASKS_MODULE = "filtered_rl.synthetic.tasks"
# MBPP's published split boundaries (task_id ranges), as on the hub.
MBPP_SPLITS = {"test": (11, 510), "train": (601, 974), "validation": (511, 600), "prompt": (1, 10)}


class DataError(ValueError):
    """A data file or dataset that cannot be used as it is; the message names the file, line, row or column."""


@dataclass
class Task:
    """A prompt dataset with the verifier that scores its completions."""

    name: str
    dataset: Any  # datasets.Dataset: prompt, prompt_id, gold columns
    verifier: Any  # filtered_rl.verifiers.BinaryVerifier
    conversational: bool
    kind: str = "custom"  # math | code | custom | the synthetic task's name
    synthetic: Any = None  # the SyntheticTask that generated the prompts, if any

    def valid_answers(self, row: dict[str, Any]) -> set[str] | None:
        """Every valid answer (as `verifier.answer_key` writes it) when the task can enumerate them."""
        if self.synthetic is not None:
            return self.synthetic.enumerate_valid(row)
        return None


def synthetic_task(name: Any) -> Any:
    """The registered synthetic task called `name`, or None (imports the registry's package lazily)."""
    if not isinstance(name, str):
        return None
    tasks = importlib.import_module(SYNTHETIC_TASKS_MODULE).TASKS
    return tasks[name] if name in tasks else None


def default_dataset() -> str:
    """The dataset used when none is named: the default synthetic task (needs no hub and no data files)."""
    return importlib.import_module(SYNTHETIC_TASKS_MODULE).DEFAULT_TASK


def verifier_names() -> tuple[str, ...]:
    """Names `make_verifier` accepts: every registered verifier and every synthetic task."""
    registered = importlib.import_module(VERIFIERS_MODULE).VERIFIERS.names()
    return registered + importlib.import_module(SYNTHETIC_TASKS_MODULE).TASKS.names()


def load_task(
    name: str,
    *,
    data_files: str | Path | None = None,
    split: str | None = None,
    limit: int | None = None,
    conversational: bool | None = None,
    system_prompt: str | None = "auto",
    prompt_column: str | None = None,
    verifier: str | Any | None = None,
    gold_column: str | None = None,
    seed: int = 0,
    task_options: dict[str, Any] | None = None,
    countdown_kwargs: dict[str, Any] | None = None,
) -> Task:
    """Load a task's prompts and verifier.

    name: a built-in task (gsm8k, math500, humaneval, mbpp), a synthetic task (`synthetic_task`), or
        any hub dataset / local data file, which then needs `prompt_column` and `verifier`.
    data_files: a local file or directory (built-ins: the layout of the public releases, e.g.
        gsm8k/test.jsonl, HumanEval.jsonl); None loads built-ins from the hub.
    split: dataset split (default: "test"); limit: keep the first `limit` prompts.
    conversational: prompts as chat messages (rendered with the chat template) or plain text;
        default True for math/code tasks, False for synthetic tasks and custom datasets.
    system_prompt: "auto" (boxed answer for math, ```python block for code, none for synthetic
        tasks), a string, or None. verifier: one of `verifier_names()` or a verifier instance.
    seed, task_options: a synthetic task's prompt seed and difficulty knobs (its `default_options`),
        plus ``num_train``/``num_test``: how many prompts of that split when `limit` is not given.
        `countdown_kwargs` is the old name of `task_options`, still accepted.
    """
    task_options = {**(countdown_kwargs or {}), **(task_options or {})}
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be ≥ 1 prompts, got {limit}")
    synthetic = None if name in BUILTIN_TASKS else synthetic_task(name)
    if name in BUILTIN_TASKS:
        kind, hub_id, hub_config, default_split, local_name = BUILTIN_TASKS[name]
        split = split or default_split
        raw = _load_raw(name, hub_id, hub_config, split, data_files, local_name)
        if limit is not None:
            raw = raw.select(range(min(limit, len(raw))))
        dataset = _NORMALISERS[name](raw, split)
        verifier = verifier or kind
    elif synthetic is not None:
        kind = synthetic.name
        split = split or "test"
        dataset = _synthetic(synthetic, split, limit, seed, task_options).rename_column("prompt", "question")
        verifier = verifier or synthetic.name
    else:
        if prompt_column is None or verifier is None:
            raise ValueError(
                f"dataset {name!r} is not a built-in task ({', '.join(BUILTIN_TASKS)}) nor a synthetic one "
                f"({', '.join(importlib.import_module(SYNTHETIC_TASKS_MODULE).TASKS.names())}): pass "
                f"prompt_column= (--prompt-column) and verifier= (--verifier {'|'.join(verifier_names())})"
            )
        split = split or "test"
        raw = _load_generic(name, split, data_files)
        if prompt_column not in raw.column_names:
            raise DataError(f"dataset {name!r} has no column {prompt_column!r} (columns: {raw.column_names})")
        if limit is not None:
            raw = raw.select(range(min(limit, len(raw))))
        dataset = raw.map(
            lambda row, i: {
                "question": row[prompt_column],
                "prompt_id": row.get("prompt_id") or f"{Path(str(name)).stem}-{split}-{i}",
            },
            with_indices=True,
        )
        kind = verifier if isinstance(verifier, str) else "custom"
        if conversational is None and len(raw) and not isinstance(raw[0][prompt_column], str):
            conversational = True  # the dataset already holds chat messages

    options = {"prompt_column": "code_prompt"} if name == "humaneval" and verifier == "code" else {}
    verifier_obj = (
        make_verifier(verifier, gold_column=gold_column, **options) if isinstance(verifier, str) else verifier
    )
    if conversational is None:
        conversational = kind in ("math", "code") and name in BUILTIN_TASKS
    if system_prompt == "auto":
        system_prompt = {"math": MATH_SYSTEM_PROMPT, "code": CODE_SYSTEM_PROMPT}.get(kind)
    if name == "humaneval" and not conversational:  # a base model completes the code itself
        dataset = dataset.map(lambda row: {"question": row["code_prompt"]})
        system_prompt = None if system_prompt == CODE_SYSTEM_PROMPT else system_prompt
    if "question" in dataset.column_names:  # text → prompt in the requested form
        dataset = dataset.map(
            lambda row: {"prompt": build_prompt(row["question"], system_prompt, conversational)},
            remove_columns=["question", *(["prompt"] if "prompt" in dataset.column_names else [])],
        )
    return Task(
        name=name,
        dataset=dataset,
        verifier=verifier_obj,
        conversational=conversational,
        kind=kind,
        synthetic=synthetic,
    )


def build_prompt(
    text: str | list[dict[str, str]], system_prompt: str | None, conversational: bool
) -> list[dict[str, str]] | str:
    """A user turn (and optional system turn) as chat messages, or as plain text.

    A prompt that already is a list of messages (a conversational dataset) is kept as it is."""
    if not isinstance(text, str):
        if not conversational:
            raise ValueError(
                "the prompts are chat messages; plain-text prompting (--no-chat-template) needs text"
            )
        return text
    if conversational:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return [*system, {"role": "user", "content": text}]
    return f"{system_prompt}\n\n{text}\n" if system_prompt else text


def render_prompt(prompt: list[dict[str, str]] | str, tokenizer: Any) -> str:
    """The exact text a model is conditioned on: chat messages through the chat template, text as is."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the prompts are conversational but the tokenizer has no chat template: use plain-text prompts "
            "(--no-chat-template / conversational=False) or a tokenizer with a chat template"
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def make_verifier(name: str, gold_column: str | None = None, **options: Any) -> Any:
    """A verifier by name: one registered in `filtered_rl.verifiers.VERIFIERS` ("math": math-verify,
    "code": sandboxed tests) or a synthetic task's; `options` go to its constructor (e.g. the code
    verifier's `prompt_column`, `limits`, `workers`)."""
    registered = importlib.import_module(VERIFIERS_MODULE).VERIFIERS
    if name in registered:
        cls = registered[name]
    elif (synthetic := synthetic_task(name)) is not None:
        cls = synthetic.make_verifier
    else:
        raise ValueError(f"unknown verifier {name!r}: choose one of {', '.join(verifier_names())}")
    verifier = cls(**options)
    if gold_column is not None:
        verifier.gold_column = gold_column
    return verifier


# --- loading ---------------------------------------------------------------------------------------


def _synthetic(task: Any, split: str, limit: int | None, seed: int, options: dict[str, Any]) -> Any:
    """A synthetic task's prompts of one split: `limit` (or options' num_train/num_test) of them."""
    options = dict(options)
    size = limit or options.pop(f"num_{split}", None)
    options.pop("num_train", None), options.pop("num_test", None)
    with_solutions = bool(options.pop("with_solutions", False))
    return task.load_split(split, size, seed=seed, with_solutions=with_solutions, **options)


def _load_raw(
    name: str, hub_id: str, hub_config: str | None, split: str, data_files: str | Path | None, local_name: str
) -> Any:
    from datasets import load_dataset

    if data_files is None:
        return load_dataset(hub_id, hub_config, split=split)
    path = Path(data_files)
    if path.is_dir():
        path = path / local_name.format(split=split)
    if not path.is_file():
        raise FileNotFoundError(
            f"{name}: no data file at {path}; pass --data-files <file or directory holding {local_name.format(split=split)}>"
        )
    rows = _read_json_rows(path)
    if name == "mbpp":  # the released file holds every split; the hub's splits are task_id ranges
        if split not in MBPP_SPLITS:
            raise ValueError(f"mbpp has splits {', '.join(MBPP_SPLITS)}; got split={split!r}")
        low, high = MBPP_SPLITS[split]
        rows = rows.filter(lambda r: low <= r["task_id"] <= high)
    return rows


def _load_generic(name: str, split: str, data_files: str | Path | None) -> Any:
    from datasets import load_dataset

    path = Path(data_files or name)
    if path.is_file():
        return (
            _read_json_rows(path)
            if path.suffix in (".json", ".jsonl")
            else load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train")
        )
    if data_files is not None:
        raise FileNotFoundError(f"--data-files {data_files} is not a file")
    return load_dataset(name, split=split)


def _read_json_rows(path: Path) -> Any:
    """A JSON array or JSON-lines file as a Dataset (read directly: no cache files beside read-only data).

    Bad data raises `DataError` naming the file and the line (bad JSON), the byte offset (not UTF-8
    text), or the row and field (a lone surrogate, which no Arrow string can hold)."""
    from datasets import Dataset

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not a UTF-8 text file (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
            "expected JSON lines (one object per line) or a JSON array of objects"
        ) from None
    if "\x00" in text:
        raise DataError(
            f"{path}: holds NUL bytes (offset {text.index(chr(0))}), a binary file; expected JSON lines "
            "(one object per line) or a JSON array of objects"
        )
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}: line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})"
            ) from None
        lines = list(range(1, len(rows) + 1)) if isinstance(rows, list) else []
        where = "item"
    else:
        rows, lines, where = [], [], "line"
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}: line {number}, column {error.colno}: not valid JSON ({error.msg}); each line "
                    "must hold one JSON object"
                ) from None
            lines.append(number)
    if not isinstance(rows, list):
        raise DataError(
            f"{path}: expected JSON lines or a JSON array of objects, got a {type(rows).__name__}"
        )
    for number, row in zip(lines, rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: {where} {number}: expected a JSON object, got {type(row).__name__}")
        for field, value in row.items():
            _check_text(value, f"{path}: {where} {number}, field {field!r}")
    return Dataset.from_list(rows)


def _check_text(value: Any, where: str) -> None:
    """Raise `DataError` if a string (in lists/dicts too) holds a lone surrogate: not valid Unicode text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise DataError(
                f"{where}: character {error.start} is a lone surrogate (U+{ord(value[error.start]):04X}), "
                "not valid Unicode text; fix or drop that row"
            ) from None
    elif isinstance(value, list):
        for item in value:
            _check_text(item, where)
    elif isinstance(value, dict):
        for item in value.values():
            _check_text(item, where)


# --- per-task normalisation: question text + gold columns + prompt_id --------------------------------


def _gsm8k(raw: Any, split: str) -> Any:
    def row(r: dict, i: int) -> dict:
        final = r["answer"].split("####")[-1].strip().replace(",", "")
        return {
            "question": r["question"],
            "answer": final,
            "solution": r["answer"],
            "prompt_id": f"gsm8k-{split}-{i}",
        }

    return raw.map(row, with_indices=True, remove_columns=raw.column_names)


def _math500(raw: Any, split: str) -> Any:
    def row(r: dict, i: int) -> dict:
        return {
            "question": r["problem"],
            "answer": r["answer"],
            "prompt_id": r.get("unique_id") or f"math500-{i}",
        }

    return raw.map(row, with_indices=True, remove_columns=[c for c in raw.column_names if c != "answer"])


def _humaneval(raw: Any, split: str) -> Any:
    # The code prompt (signature + docstring) stays in `code_prompt`: the code verifier prepends it to
    # completions that only write the body (plain-text prompting of a base model).
    def row(r: dict) -> dict:
        question = f"Complete the following Python function.\n\n```python\n{r['prompt']}```"
        return {"question": question, "code_prompt": r["prompt"], "prompt_id": r["task_id"]}

    return raw.map(row, remove_columns=["prompt"])


def _mbpp(raw: Any, split: str) -> Any:
    def row(r: dict) -> dict:
        tests = "\n".join(r["test_list"])
        question = f"{r.get('prompt') or r.get('text')}\nYour code should pass these tests:\n\n{tests}"
        return {"question": question, "prompt_id": f"mbpp-{r['task_id']}"}

    return raw.map(row, remove_columns=[c for c in ("prompt", "text") if c in raw.column_names])


_NORMALISERS = {"gsm8k": _gsm8k, "math500": _math500, "humaneval": _humaneval, "mbpp": _mbpp}


# --- checks run before a model loads (train and eval) -----------------------------------------------


def check_verifier_columns(task: Task) -> None:
    """Raise `DataError` if the task's verifier reads a column its dataset lacks.

    The verifier is called once on the first row with an empty completion: a missing gold column
    raises there, naming the column, instead of at the first reward call after generation."""
    dataset = task.dataset
    if len(dataset) == 0:
        return
    row = dataset[0]
    columns = {key: [value] for key, value in row.items() if key != "prompt"}
    try:
        task.verifier(prompts=[row.get("prompt")], completions=[""], completion_ids=[[]], **columns)
    except KeyError as error:
        raise DataError(
            f"dataset {task.name!r} lacks a column its verifier reads: {error.args[0] if error.args else error} "
            f"(columns: {dataset.column_names}); set gold_column / prompt_column, or pick the matching verifier"
        ) from None


def prompt_length_limit(model_path: str, completion_tokens: int, explicit: int | None = None) -> int | None:
    """The longest prompt (tokens) a model takes: `explicit` if given, else its context length
    (config `max_position_embeddings`) minus the completion budget; None if the config says none."""
    if explicit is not None:
        return explicit
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not context:
        return None
    return max(int(context) - int(completion_tokens), 1)


def check_prompt_lengths(
    lengths: list[int], prompt_ids: list[str], limit: int | None, *, setting: str, source: str
) -> None:
    """Raise `DataError` naming the prompts longer than `limit` tokens (None: no limit)."""
    if limit is None:
        return
    long = [(n, pid) for n, pid in zip(lengths, prompt_ids) if n > limit]
    if not long:
        return
    shown = ", ".join(f"{pid!r} ({n} tokens)" for n, pid in sorted(long, reverse=True)[:3])
    raise DataError(
        f"{len(long)} prompt(s) of {source} exceed the prompt-length limit of {limit} tokens: {shown}. "
        f"The limit is {setting}; shorten or drop those rows, or raise the limit if the model takes longer inputs"
    )


def prompt_token_lengths(prompts: list[Any], tokenizer: Any) -> list[int]:
    """Token count of each prompt as the model sees it (chat template for conversational prompts)."""
    return [
        len(tokenizer(render_prompt(p, tokenizer), add_special_tokens=isinstance(p, str))["input_ids"])
        for p in prompts
    ]

"""Output directories of `filtered-rl train` and `filtered-rl eval`: never touch what the project did not write.

The mechanism is `filtered-rl pretrain`'s (`filtered_rl.model_dir`): a directory of ours
holds the marker file `MODEL_MARKER` (``filtered_rl_model.json``) listing, under ``"files"``, the entries
the project wrote there; any other entry is the user's ("foreign").

- `filtered-rl train` refuses an output_dir holding foreign entries unless it resumes
  (`resume_from_checkpoint`) or `overwrite_output_dir` is set; even then foreign entries are never
  deleted or overwritten: checkpoint rotation (`save_total_limit`, done by `RunDirectoryCallback`
  instead of transformers) removes only checkpoints it wrote and only the files it listed in them,
  the model card is not written over a foreign README.md, and a final model whose files would
  replace foreign ones goes to a subfolder of its own.
- Each `checkpoint-N/` gets its own marker, written last (after trainer_state.json), listing every
  file with its size: a checkpoint is complete when its marker is there and every listed file has
  that size. `resolve_resume` picks the newest complete checkpoint for `resume_from_checkpoint: true`
  and refuses an incomplete one given by path, naming the missing or damaged file, before any model
  loads. Checkpoints written without the marker (older versions, plain TRL) are checked file by file.
- `filtered-rl eval` refuses to overwrite a summary.json / samples.jsonl / eval_config.json it did not write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

from filtered_rl.model_dir import MODEL_MARKER, OutputDirError, _our_files

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FINAL_STAGING = ".filtered-rl-final.tmp"
EVAL_FILES = ("eval_config.json", "samples.jsonl", "summary.json")
EVAL_SHARD_RE = re.compile(r"^samples\.rank\d+\.jsonl$")


# --- the marker -------------------------------------------------------------------------------------


def foreign_entries(directory: str | os.PathLike) -> list[str]:
    """Entries of `directory` the project did not write: all of them when it has no marker."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    ours = _our_files(directory)
    return sorted(
        p.name for p in directory.iterdir() if p.name != MODEL_MARKER and (ours is None or p.name not in ours)
    )


def claim(directory: str | os.PathLike, names: list[str] | set[str], **about: Any) -> None:
    """Add `names` to the marker's list of entries the project wrote in `directory` (atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker = _read_marker(directory) or {"format": "filtered-rl output directory", "version": 1}
    marker.update(about)
    marker["files"] = sorted({*marker.get("files", []), *names} - {MODEL_MARKER})
    _write_json_atomic(directory / MODEL_MARKER, marker)


def unclaim(directory: Path, name: str) -> None:
    marker = _read_marker(directory)
    if marker is not None and name in marker.get("files", []):
        marker["files"] = [f for f in marker["files"] if f != name]
        _write_json_atomic(directory / MODEL_MARKER, marker)


def _read_marker(directory: Path) -> dict | None:
    try:
        marker = json.loads((directory / MODEL_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files", []), list):
        return None
    return marker


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _shown(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


# --- filtered-rl train ------------------------------------------------------------------------------


def check_train_output_dir(
    output_dir: str,
    *,
    resuming: bool,
    overwrite: bool,
    save_steps: float,
    max_steps: int,
    save_by_steps: bool,
    start_step: int = 0,
) -> list[str]:
    """The foreign entries of a training output_dir, or `OutputDirError` if they must stop the run.

    Refused: foreign entries unless resuming or `overwrite_output_dir`; and, even then, a foreign
    `checkpoint-N` folder that this run would save into (it would mix its files with the user's)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output_dir {output_dir!r} exists and is not a directory; choose another path")
    foreign = foreign_entries(path)
    if not foreign:
        return []
    if not (resuming or overwrite):
        raise OutputDirError(
            f"output_dir {output_dir!r} holds files filtered-rl did not write ({_shown(foreign)}); refusing to "
            "train into it, so nothing was overwritten or deleted. Choose a new or empty output_dir, resume a "
            "run with resume_from_checkpoint, or pass --overwrite_output_dir true to train there anyway "
            "(files that are not filtered-rl's are still never overwritten or deleted)"
        )
    clashes = []
    for name in foreign:
        match = CHECKPOINT_RE.match(name)
        if match and (path / name).is_dir():
            step = int(match.group(1))
            in_range = step > start_step and (max_steps <= 0 or step <= max_steps)
            on_schedule = not save_by_steps or save_steps < 1 or step % int(save_steps) == 0
            if in_range and on_schedule:
                clashes.append(name)
    if clashes:
        raise OutputDirError(
            f"output_dir {output_dir!r} holds {_shown(clashes)}, not written by filtered-rl, where this run "
            "would save a checkpoint; move it away or choose another output_dir (nothing was changed)"
        )
    return foreign


def own_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """checkpoint-N folders of `output_dir` that the project wrote (all of them in a directory without a
    marker, e.g. one written before it existed), oldest first."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    ours = _our_files(path)
    found = [
        (int(m.group(1)), p)
        for p in path.iterdir()
        if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir() and (ours is None or p.name in ours)
    ]
    return [p for _, p in sorted(found)]


# --- checkpoint completeness ------------------------------------------------------------------------

_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


def checkpoint_problems(checkpoint: str | os.PathLike) -> list[str]:
    """Why `checkpoint` cannot be resumed from (empty: it is complete), one short phrase each.

    With the marker written last by `RunDirectoryCallback`: every file it lists must exist with its size.
    Without it: trainer_state.json, optimizer.pt, scheduler.pt, rng_state*.pth and model weights must
    exist and be readable (torch files are zip archives whose directory is at the end, safetensors
    files state their length: a truncated file fails either check, without loading it)."""
    path = Path(checkpoint)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    marker = _read_marker(path)
    if marker is not None and isinstance(marker.get("sizes"), dict):
        problems = []
        for name, size in sorted(marker["sizes"].items()):
            file = path / name
            if not file.exists():
                problems.append(f"{name} is missing")
            elif file.is_file() and file.stat().st_size != size:
                problems.append(
                    f"{name} is {file.stat().st_size} bytes, {size} were written (truncated or changed)"
                )
        return problems
    names = {p.name for p in path.iterdir()}
    problems = []
    if "trainer_state.json" not in names:
        problems.append("trainer_state.json is missing")
    else:
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            problems.append("trainer_state.json is not valid JSON (truncated)")
    sharded_optimizer = any(n.startswith(("global_step", "optimizer_0", "pytorch_model_fsdp")) for n in names)
    if not sharded_optimizer:
        for name in ("optimizer.pt", "scheduler.pt"):
            problems += [f"{name} is missing"] if name not in names else _torch_file_problems(path / name)
    rng = sorted(n for n in names if re.match(r"^rng_state(_\d+)?\.pth$", n))
    if not rng:
        problems.append("rng_state.pth is missing")
    for name in rng:
        problems += _torch_file_problems(path / name)
    weights = [n for n in _WEIGHTS if n in names]
    if not weights and not sharded_optimizer:
        problems.append("the model weights (model.safetensors) are missing")
    for name in weights:
        if name.endswith(".index.json"):
            try:
                shards = set(json.loads((path / name).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                problems.append(f"{name} is not a valid weight index (truncated)")
                continue
            for shard in sorted(shards):
                if not (path / shard).is_file():
                    problems.append(f"{shard} is missing")
                else:
                    problems += _weights_file_problems(path / shard)
        else:
            problems += _weights_file_problems(path / name)
    return problems


def _torch_file_problems(file: Path) -> list[str]:
    try:
        with zipfile.ZipFile(file):
            return []
    except (OSError, zipfile.BadZipFile):
        return [f"{file.name} is truncated or not a torch file"]


def _weights_file_problems(file: Path) -> list[str]:
    if file.suffix != ".safetensors":
        return _torch_file_problems(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size:
                raise ValueError
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise ValueError
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError):
        return [f"{file.name} is truncated or not a safetensors file"]
    return []


def resolve_resume(value: Any, output_dir: str, *, log: bool = True) -> str | None:
    """The checkpoint to resume from, checked complete, or `ResumeError` naming what is wrong and the fix.

    `value`: None/false (start afresh), true (any case: the newest complete checkpoint of
    output_dir, saying which and why newer ones were skipped), or a checkpoint folder."""
    if value is None or value is False or str(value).strip().lower() in ("", "false", "none", "no"):
        return None
    if value is True or str(value).strip().lower() in ("true", "yes", "latest", "last"):
        checkpoints = own_checkpoints(output_dir)
        if not checkpoints:
            raise ResumeError(
                f"resume_from_checkpoint=true: output_dir {output_dir!r} holds no checkpoint-N folder written by "
                "filtered-rl; start without resume_from_checkpoint, or give the checkpoint folder's path"
            )
        skipped = []
        for checkpoint in reversed(checkpoints):
            problems = checkpoint_problems(checkpoint)
            if not problems:
                if log:
                    reason = "".join(
                        f"; skipped newer {p.name}: {', '.join(why[:3])} (incomplete, e.g. killed while saving)"
                        for p, why in skipped
                    )
                    print(
                        f"filtered-rl train: resuming from {checkpoint} (newest complete checkpoint){reason}",
                        file=sys.stderr,
                    )
                return str(checkpoint)
            skipped.append((checkpoint, problems))
        detail = "; ".join(f"{p.name}: {', '.join(why[:3])}" for p, why in skipped)
        raise ResumeError(
            f"resume_from_checkpoint=true: no complete checkpoint in {output_dir!r} ({detail}); start afresh "
            "in a new output_dir, or without resume_from_checkpoint"
        )
    checkpoint = Path(str(value))
    if not checkpoint.is_dir():
        raise ResumeError(
            f"resume_from_checkpoint={value!r}: no such checkpoint folder; give a checkpoint-N folder, or true "
            "for the newest complete checkpoint of output_dir"
        )
    problems = checkpoint_problems(checkpoint)
    if problems:
        complete = [p for p in reversed(own_checkpoints(checkpoint.parent)) if not checkpoint_problems(p)]
        fix = (
            f"resume from {complete[0]} (the newest complete one; resume_from_checkpoint=true picks it)"
            if complete
            else "start afresh in a new output_dir"
        )
        raise ResumeError(
            f"resume_from_checkpoint={value!r} is incomplete: {', '.join(problems)} (the run was probably killed "
            f"while saving); {fix}"
        )
    return str(checkpoint)


def checkpoint_step(checkpoint: str | None) -> int:
    """N of a checkpoint-N folder (0 for None or another name)."""
    match = CHECKPOINT_RE.match(Path(checkpoint).name) if checkpoint else None
    return int(match.group(1)) if match else 0


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and the fix."""


def write_checkpoint_marker(checkpoint: Path, step: int) -> None:
    """List every file of a just-saved checkpoint with its size: written last, it makes the checkpoint complete."""
    sizes = {}
    for file in sorted(checkpoint.rglob("*")):
        if file.is_file() and file.name != MODEL_MARKER:
            sizes[str(file.relative_to(checkpoint))] = file.stat().st_size
    files = sorted({p.name for p in checkpoint.iterdir()} - {MODEL_MARKER})
    marker = {
        "format": "filtered-rl model directory",
        "version": 1,
        "kind": "checkpoint",
        "step": step,
        "files": files,
        "sizes": sizes,
    }
    _write_json_atomic(checkpoint / MODEL_MARKER, marker)


def rotate_checkpoints(output_dir: Path, limit: int | None, keep: set[str] | None = None) -> None:
    """transformers' `save_total_limit` rotation, deleting only what the project wrote.

    Only complete checkpoints of ours count (their marker lists their files); the newest and `keep`
    (the best checkpoint) are never deleted; in a deleted checkpoint only the listed files go, and a
    folder still holding other files is kept (with a warning)."""
    if not limit or limit <= 0:
        return
    keep = keep or set()
    complete = [p for p in own_checkpoints(output_dir) if _read_marker(p) and "sizes" in _read_marker(p)]
    excess = len(complete) - limit
    for checkpoint in complete[:-1]:
        if excess <= 0:
            break
        if str(checkpoint) in keep or checkpoint.name in keep:
            continue
        listed = _read_marker(checkpoint).get("files", [])
        for name in listed:
            target = checkpoint / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists() or target.is_symlink():
                target.unlink()
        (checkpoint / MODEL_MARKER).unlink(missing_ok=True)
        left = sorted(p.name for p in checkpoint.iterdir())
        if left:
            warnings.warn(
                f"checkpoint rotation kept {checkpoint}: it holds files filtered-rl did not write ({_shown(left)})",
                stacklevel=2,
            )
        else:
            checkpoint.rmdir()
            unclaim(output_dir, checkpoint.name)
        excess -= 1


def new_entries(output_dir: Path, foreign: set[str]) -> list[str]:
    """Entries of output_dir that were not there as foreign ones: written by this run."""
    return [p.name for p in output_dir.iterdir() if p.name not in foreign and p.name != MODEL_MARKER]


def install_final_model(output_dir: Path, staging: Path, foreign: set[str]) -> Path:
    """Move a final model saved in `staging` into output_dir, or into a subfolder if a file would replace
    a foreign one; returns where it is."""
    names = sorted(p.name for p in staging.iterdir())
    clash = [n for n in names if n in foreign]
    if clash:
        target, n = output_dir / "final-model", 1
        while target.name in foreign:  # never replaced; an earlier final model of ours is
            n += 1
            target = output_dir / f"final-model-{n}"
        if target.exists():
            shutil.rmtree(target)
        claim(output_dir, [target.name])
        os.replace(staging, target)
        unclaim(output_dir, staging.name)
        print(
            f"filtered-rl train: the final model went to {target}, not to {output_dir}: {_shown(clash)} there "
            "were not written by filtered-rl and are kept",
            file=sys.stderr,
        )
        return target
    claim(output_dir, names)
    for name in names:
        destination = output_dir / name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(staging / name, destination)
    staging.rmdir()
    unclaim(output_dir, staging.name)
    return output_dir


# --- filtered-rl eval -------------------------------------------------------------------------------


def check_eval_output_dir(output_dir: str | os.PathLike) -> None:
    """`OutputDirError` if the eval output dir holds a file eval writes (summary.json, samples.jsonl,
    eval_config.json, samples.rank*.jsonl) that filtered-rl did not write there; other files are left alone.

    A directory without the marker that holds eval_config.json, samples.jsonl or a shard was written by an
    eval run of an older version (or killed before): its eval files are taken as ours (eval reads and
    checks them before it writes anything)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--output-dir {str(path)!r} exists and is not a directory; choose another path")
    if not path.is_dir():
        return
    legacy = (
        _our_files(path) is None
        and any((path / n).is_file() for n in ("eval_config.json", "samples.jsonl"))
        or any(EVAL_SHARD_RE.match(p.name) for p in path.iterdir())
    )
    marked = _our_files(path) is not None
    foreign = set(foreign_entries(path))
    clash = sorted(
        n
        for n in foreign
        if (n in EVAL_FILES or EVAL_SHARD_RE.match(n))
        and not legacy
        and not (marked and EVAL_SHARD_RE.match(n))
    )
    if clash:
        raise OutputDirError(
            f"--output-dir {str(path)!r} holds {_shown(clash)}, not written by filtered-rl eval; refusing to "
            f"overwrite it (nothing was changed). Use another --output-dir, e.g. {str(path / 'eval')!r}, or move "
            "the file away"
        )


def claim_eval_output_dir(output_dir: str | os.PathLike, num_processes: int) -> None:
    names = [*EVAL_FILES, *(f"samples.rank{r}.jsonl" for r in range(num_processes))]
    claim(output_dir, names, kind="eval")


# --- model paths ------------------------------------------------------------------------------------


def check_model_path(name: str, setting: str) -> None:
    """`ValueError` if `name` is meant as a local model directory (it starts with / . ~, has two or more
    slashes, or its first part is a directory here) and there is none: the hub's "Repo id must be in the
    form ..." would otherwise be the error. `filtered-rl:<name>` aliases and hub ids (org/name) pass."""
    if not name or name.startswith("filtered-rl:"):
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"{setting} {name!r} is a file; give a model directory (holding config.json) or a hub id"
            )
        return
    first = Path(name).parts[0] if Path(name).parts else ""
    local = (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or name.count("/") >= 2
        or os.sep != "/"
        and os.sep in name
        or (first != name and Path(first).is_dir())
    )
    if local:
        raise ValueError(
            f"{setting} {name!r}: no such model directory; give an existing model directory (holding "
            "config.json), a hub id such as Qwen/Qwen2.5-0.5B-Instruct, or filtered-rl:nano"
        )

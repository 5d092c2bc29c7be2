"""Directories the project writes (models, caches): the marker that says so, atomic installs, a lock.

Why a module of its own: `filtered-rl pretrain`, the named real models (`filtered_rl.models`), `train`
and `eval` (`filtered_rl.run_dir`) all refuse to replace or delete what they did not write, and all
tell their own directories by the same marker. It lived in the synthetic demo's `base_model`, which
the product must not import.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MODEL_MARKER = "filtered_rl_model.json"  # in every model directory the project writes (see `_install`)


class OutputDirError(ValueError):
    """The output directory holds something that is not a model of ours; nothing was deleted."""


# What a model directory written before MODEL_MARKER existed holds (save_pretrained, the tokenizer,
# pretrain_info.json): such a directory, with nothing else in it, may be replaced too.
_LEGACY_MODEL_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "pretrain_info.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "vocab.json",
        "merges.txt",
    }
)


def check_output_dir(path: str | os.PathLike) -> None:
    """Raise `OutputDirError` unless writing a model to `path` replaces nothing but a model of ours.

    Allowed: a path that does not exist, an empty directory, or a directory holding `MODEL_MARKER`
    (or, from before the marker, ``pretrain_info.json``) and no file besides the ones our model
    directories hold. Refused: anything else, and the current directory or one of its parents (a
    model directory is always a directory of its own).
    """
    path = Path(path)
    resolved = path.resolve()
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise OutputDirError(
            f"output directory {str(path)!r} is the current directory or one of its parents; "
            "a model needs a directory of its own, e.g. a new subdirectory such as models/my-model"
        )
    if not resolved.exists():
        return
    if not resolved.is_dir():
        raise OutputDirError(
            f"output directory {str(path)!r} exists and is not a directory; choose another path"
        )
    entries = sorted(p.name for p in resolved.iterdir())
    if not entries:
        return
    ours = _our_files(resolved)
    foreign = [name for name in entries if ours is None or name not in ours]
    if foreign:
        shown = ", ".join(repr(name) for name in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        what = (
            "is not a filtered-rl model directory" if ours is None else "holds files that are not the model's"
        )
        raise OutputDirError(
            f"output directory {str(path)!r} exists and {what} ({shown}); refusing to replace it, so "
            f"nothing was deleted. Choose a new or empty directory, e.g. {str(path / 'model')!r}"
        )


def _our_files(directory: Path) -> set[str] | None:
    """The names a model directory of ours may hold, or None if `directory` is not one."""
    marker = directory / MODEL_MARKER
    if marker.is_file():
        try:
            files = json.loads(marker.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            return None
        return {*files, MODEL_MARKER}
    if (directory / "pretrain_info.json").is_file():
        return set(_LEGACY_MODEL_FILES)
    return None


def _install(output_dir: Path, write: Any, about: dict[str, Any]) -> Path:
    """Write a model directory with `write(staging)` and move it to `output_dir`.

    The staging directory is a sibling (same file system: the renames are atomic). An existing
    `output_dir` is checked again now (`check_output_dir`), renamed aside, replaced by the new one and
    only then deleted: at every moment `output_dir` holds a whole model (bar the instant between the
    two renames), and a failure leaves the old one in place.
    """
    check_output_dir(output_dir)
    given, output_dir = output_dir, output_dir.resolve()  # through a symlink: replace its target
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model directory is an ordinary one
    old: Path | None = None
    try:
        write(staging)
        files = sorted(p.name for p in staging.iterdir())
        marker = {"format": "filtered-rl model directory", "version": 1, **about, "files": files}
        (staging / MODEL_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if output_dir.exists():
            if not any(output_dir.iterdir()):
                output_dir.rmdir()  # empty: nothing to keep
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
                os.replace(output_dir, old / "model")
        os.replace(staging, output_dir)
    except BaseException:
        if old is not None and (old / "model").exists() and not output_dir.exists():
            os.replace(old / "model", output_dir)  # put the previous model back
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # the previous model of ours, checked above
    return given


def default_cache_dir() -> Path:
    """`$FILTERED_RL_CACHE`, else `.cache/filtered-rl/` under the current directory."""
    return Path(os.environ.get("FILTERED_RL_CACHE") or Path.cwd() / ".cache" / "filtered-rl")


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

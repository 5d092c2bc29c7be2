"""Reading and writing the evaluation's output files so that a kill never leaves a file half-written.

An evaluation is resumable, so the files in `--output-dir` are read back by a later run: a file cut
short by a kill must not turn into a crash (or worse, into silently wrong results) on resume.

- Whole files (summary.json, eval_config.json, samples.jsonl after a merge, plot PNGs) are written
  to a temporary file in the same directory, fsynced and moved over the target with `os.replace`,
  which is atomic on POSIX: a reader sees the old file or the new one, never a prefix.
- The per-process shards `samples.rank<r>.jsonl` are appended batch by batch (rewriting them per batch
  would be quadratic), so a kill can tear their *last* line. `read_jsonl` drops such a line with a
  warning (its sample is drawn again); an unreadable line anywhere else is corruption, not a kill, and
  raises an error naming the file, the line and the fix.
- Every load error names the file and says what to do about it.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any


class EvalOutputError(ValueError):
    """An output file of an earlier run cannot be read; the message names the file and the fix."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` in one step (temp file in the same directory, fsync, os.replace)."""
    path = Path(path)
    handle = tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:  # a kill (KeyboardInterrupt) included: leave no temp file behind
        Path(handle.name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | Path, *, fix: str) -> Any:
    """The JSON value in `path`; an unreadable file raises EvalOutputError naming it and `fix`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvalOutputError(
            f"{path} is not valid JSON ({error}), e.g. cut short by a kill: {fix}"
        ) from None


def read_jsonl(path: str | Path, *, required: tuple[str, ...] = ()) -> list[dict]:
    """The records of a JSONL file, one JSON object per line.

    A torn last line (what a kill during an append leaves) is dropped with a RuntimeWarning; any other
    unreadable line, or a record lacking one of the `required` keys, raises EvalOutputError.
    """
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last record
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            if number == len(lines):
                warnings.warn(
                    f"{path}: dropped its last line, cut short by a kill ({error}); its sample is drawn again",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            raise EvalOutputError(
                f"{path}, line {number}: not a JSON record ({error}); it is not the last line, so this is "
                f"not a kill's torn write: delete that line (its sample is drawn again on resume) or "
                f"use a new --output-dir"
            ) from None
        missing = [key for key in required if not isinstance(record, dict) or key not in record]
        if missing:
            raise EvalOutputError(
                f"{path}, line {number}: a record without {', '.join(missing)}; this file was not written "
                f"by `filtered-rl eval`: delete that line or use a new --output-dir"
            )
        records.append(record)
    return records

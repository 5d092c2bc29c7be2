"""Console output of the synthetic demo: one progress bar per phase, the full logs in files.

The libraries print a lot that a user of `filtered-rl quickstart` should not have to read: TRL's
30-key metric dict at every logging step, dependency FutureWarnings, "Loading weights" bars, the
harmless ``missing keys ['lm_head.weight']`` warning of a model with tied embeddings. Here:

- `quiet_libraries(log_file)` sends transformers/TRL/datasets/accelerate logging (WARNING and
  above) and warnings raised by third-party code to `log_file` (or nowhere), and turns off their
  progress bars. It returns a handle: use it as a context manager, or call `restore()`, to undo it.
- `ConsoleProgress` is a `transformers.TrainerCallback` drawing one tqdm bar per training run with the
  few numbers that matter (validity, KL, loss) and appending every log dict, whole, as one JSON line to
  a file. `attach_console_progress(trainer, ...)` installs it in place of the Trainer's own printing.
- `progress_bar` is the bar both use (and the base model's pretraining loop).

    from filtered_rl.synthetic.console import attach_console_progress, quiet_libraries

    with quiet_libraries("runs/x/library.log"):
        trainer = GRPOTrainer(...)
        attach_console_progress(trainer, desc="grpo β=0.04", log_file="runs/x/train_log.jsonl")
        trainer.train()
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

# Loggers of the libraries whose chatter goes to the log file.
LIBRARY_LOGGERS = ("transformers", "trl", "datasets", "accelerate", "peft", "torch", "huggingface_hub")
# Warnings of these categories, or raised from a file under site-packages, go to the log file.
LIBRARY_WARNING_CATEGORIES = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)

# Display name -> log keys, the first present of which is shown on the bar. Binary rewards make the
# mean reward the validity; the filtered trainers log it under <prefix>/validity.
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "valid": ("filtered/validity", "validity", "reward"),
    "kl": ("kl", "filtered/kl"),
    "ess": ("filtered/ess",),
    "β": ("kl_control/beta",),
    "loss": ("loss",),
}


def progress_bar(*, total: int | None, desc: str, disable: bool = False, **options: Any) -> Any:
    """A tqdm bar on stderr that redraws at most once a second (cheap in a tight loop)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disable, mininterval=1.0, dynamic_ncols=True, **options)


class QuietLibraries:
    """What `quiet_libraries` changed, to undo it (`restore`, or leaving a `with` block)."""

    def __init__(self, log_file: str | os.PathLike | None = None):
        self.log_file = None if log_file is None else Path(log_file)
        self._saved_loggers: list[tuple[logging.Logger, list[logging.Handler], int, bool]] = []
        self._saved_showwarning: Any = None
        self._saved_bars: list[tuple[Any, bool]] = []
        self._handler: logging.Handler | None = None
        self._active = False

    def apply(self) -> QuietLibraries:
        if self._active:
            return self
        self._active = True
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers")  # transformers adds its console handler once, on first use: now
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._handler = logging.FileHandler(self.log_file, encoding="utf-8")
            self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        else:
            self._handler = logging.NullHandler()
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            self._saved_loggers.append((logger, list(logger.handlers), logger.level, logger.propagate))
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.addHandler(self._handler)
            logger.setLevel(logging.WARNING)
            logger.propagate = False
        self._saved_showwarning = warnings.showwarning
        warnings.showwarning = self._showwarning
        self._disable_library_bars()
        return self

    def restore(self) -> None:
        """Undo `apply`: loggers, warning display and progress bars as they were."""
        if not self._active:
            return
        self._active = False
        for logger, handlers, level, propagate in self._saved_loggers:
            logger.removeHandler(self._handler)
            for handler in handlers:
                logger.addHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        self._saved_loggers.clear()
        if warnings.showwarning == self._showwarning:
            warnings.showwarning = self._saved_showwarning
        for enable, was_enabled in self._saved_bars:
            if was_enabled:
                enable()
        self._saved_bars.clear()
        if self._handler is not None:
            self._handler.close()
            self._handler = None

    def __enter__(self) -> QuietLibraries:
        return self.apply()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def _showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, LIBRARY_WARNING_CATEGORIES) or _third_party(filename):
            if self._handler is not None and not isinstance(self._handler, logging.NullHandler):
                text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
                self._handler.emit(
                    logging.makeLogRecord({"name": "py.warnings", "levelname": "WARNING", "msg": text})
                )
            return
        self._saved_showwarning(message, category, filename, lineno, file, line)

    def _disable_library_bars(self) -> None:
        for _, enabled, enable, disable in _bar_switches():
            was_enabled = enabled()
            disable()
            self._saved_bars.append((enable, was_enabled))


def _third_party(filename: str) -> bool:
    return f"{os.sep}site-packages{os.sep}" in str(filename) or f"{os.sep}dist-packages{os.sep}" in str(
        filename
    )


def _bar_switches() -> list[tuple[str, Any, Any, Any]]:
    """(library, is_enabled, enable, disable) of each library's global progress-bar switch."""
    import datasets
    from transformers.utils import logging as hf_logging

    return [
        (
            "transformers",
            hf_logging.is_progress_bar_enabled,
            hf_logging.enable_progress_bar,
            hf_logging.disable_progress_bar,
        ),
        (
            "datasets",
            datasets.is_progress_bar_enabled,
            datasets.enable_progress_bars,
            datasets.disable_progress_bars,
        ),
    ]


def quiet_libraries(log_file: str | os.PathLike | None = None) -> QuietLibraries:
    """Send library logging and third-party warnings to `log_file` (appended; None: drop them) and
    turn off the libraries' progress bars, until the returned handle's `restore()` (or the end of its
    `with` block). Errors still reach the console: they are logged at ERROR, and exceptions are not
    touched."""
    return QuietLibraries(log_file).apply()


class ConsoleProgress(TrainerCallback):
    """A `TrainerCallback`: one tqdm bar for the run, every log dict as a JSON line in `log_file`.

    desc: the bar's label (e.g. the run's name). log_file: JSON-lines file, appended; each line is
    ``{"step": global_step, **logs}``, the whole dict the Trainer logged (None: no file). metrics:
    display name -> log keys, the first present shown on the bar (`DEFAULT_METRICS`). Only the main
    process draws and writes.
    """

    def __init__(
        self,
        desc: str = "train",
        log_file: str | os.PathLike | None = None,
        *,
        metrics: Mapping[str, Sequence[str]] | None = None,
        disable: bool = False,
        leave: bool = True,
    ):
        self.desc = desc
        self.log_file = None if log_file is None else Path(log_file)
        self.metrics = dict(DEFAULT_METRICS if metrics is None else metrics)
        self.disable = disable
        self.leave = leave
        self.bar: Any = None
        self.last: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.bar = progress_bar(
            total=state.max_steps or None,
            desc=self.desc,
            initial=state.global_step,
            unit="step",
            disable=self.disable,
            leave=self.leave,
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if self.log_file is not None:
            with open(self.log_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}, default=str) + "\n")
        for name, keys in self.metrics.items():
            value = next((logs[k] for k in keys if isinstance(logs.get(k), (int, float))), None)
            if value is not None:
                self.last[name] = float(value)
        if self.bar is not None and self.last:
            self.bar.set_postfix({name: f"{value:.3g}" for name, value in self.last.items()}, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.close()
            self.bar = None


def attach_console_progress(
    trainer: Any,
    desc: str = "train",
    log_file: str | os.PathLike | None = None,
    **options: Any,
) -> ConsoleProgress:
    """Replace `trainer`'s console output (its tqdm bar that prints each log dict, or the printer it
    uses with ``disable_tqdm``) by a `ConsoleProgress`; returns it. `options` go to `ConsoleProgress`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    callback = ConsoleProgress(desc, log_file, **options)
    trainer.add_callback(callback)
    return callback

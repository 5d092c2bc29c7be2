"""The demo's console: library chatter to a log file, one progress bar per run, full logs as JSON lines."""

from __future__ import annotations

import json
import logging
import warnings

from filtered_rl.synthetic.console import ConsoleProgress, attach_console_progress, quiet_libraries


def test_quiet_libraries_sends_library_chatter_to_the_file_and_restores(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    log = tmp_path / "library.log"
    was_enabled = hf_logging.is_progress_bar_enabled()
    with quiet_libraries(log):
        logging.getLogger("transformers.modeling_utils").warning("missing keys ['lm_head.weight']")
        logging.getLogger("trl.trainer").warning("a TRL notice")
        warnings.warn("`foo` is deprecated", FutureWarning, stacklevel=1)
        assert not hf_logging.is_progress_bar_enabled()
    out = capsys.readouterr()
    assert "lm_head" not in out.err + out.out and "deprecated" not in out.err + out.out
    text = log.read_text()
    assert "lm_head.weight" in text and "a TRL notice" in text and "FutureWarning" in text
    assert hf_logging.is_progress_bar_enabled() == was_enabled
    assert logging.getLogger("transformers").handlers  # its console handler is back


def test_our_own_warnings_still_show(tmp_path):
    with quiet_libraries(tmp_path / "library.log"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.warn("the project's own advice", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["the project's own advice"]


def test_console_progress_draws_one_bar_and_writes_every_log_dict(tmp_path, capsys):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state, control = TrainerState(max_steps=3), TrainerControl()
    progress = ConsoleProgress("grpo", tmp_path / "runs" / "train_log.jsonl")
    progress.on_train_begin(args, state, control)
    full = {f"metric_{i}": float(i) for i in range(30)}
    for step in (1, 2, 3):
        state.global_step = step
        progress.on_step_end(args, state, control)
        progress.on_log(args, state, control, logs={**full, "reward": 0.25 * step, "kl": 0.01, "loss": 0.5})
    assert progress.last == {"valid": 0.75, "kl": 0.01, "loss": 0.5}
    progress.on_train_end(args, state, control)
    lines = [json.loads(line) for line in (tmp_path / "runs" / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and len(lines[0]) == 34  # the whole dict
    err = capsys.readouterr().err
    assert "grpo" in err and "metric_17" not in err  # a bar, not the dicts


def test_attach_replaces_the_trainers_printing(tmp_path, capsys):
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, labels=None):
            return {"loss": ((self.w - x) ** 2).mean()}

    for disable_tqdm in (False, True):
        args = TrainingArguments(
            output_dir=str(tmp_path / str(disable_tqdm)),
            max_steps=3,
            logging_steps=1,
            per_device_train_batch_size=2,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=disable_tqdm,
        )
        trainer = Trainer(model=Tiny(), args=args, train_dataset=Dataset.from_dict({"x": [1.0] * 8}))
        log = tmp_path / f"log-{disable_tqdm}.jsonl"
        callback = attach_console_progress(trainer, desc="tiny run", log_file=log)
        classes = [type(c) for c in trainer.callback_handler.callbacks]
        assert (
            ProgressCallback not in classes
            and PrinterCallback not in classes
            and callback in trainer.callback_handler.callbacks
        )
        trainer.train()
        out = capsys.readouterr()
        assert "{'loss'" not in out.out + out.err and "tiny run" in out.err
        assert len(log.read_text().splitlines()) >= 3

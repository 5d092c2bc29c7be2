"""Which KL-control path reaches the target validity μ and p_β: the controller issue's table, rerun exactly.

The task is the issue's: one prompt, completions of one token, so π(·|x) is read exactly from the logits.
A tiny Qwen2 with the project's tokenizer is fitted so that the base validity is A = 0.20, spread unequally
over ten valid tokens (tests/_enumerable.py). Every row trains `--steps` steps, 16 completions a step, Adam
at a constant learning rate 3e-3, T = 1, target μ = 0.6, and reports, exactly:

- the validity at the end, and the lowest validity probed from step 10 on (every 10 steps), which shows
  an overshoot or a crash below the base validity that the final value hides;
- KL(p* ‖ π restricted to valid answers), which is 0 when p*'s proportions among valid answers are kept;
- the β the controller ended with.

TRL's GRPOTrainer rows attach the callback with `allow_loss_kl=True` (it refuses GRPOTrainer otherwise).

    python benchmarks/controller_table.py                 # all rows, 300 steps (~10 s a row on 1 CPU thread)
    python benchmarks/controller_table.py --steps 100 --rows grpo_klr rloo
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


@dataclass
class Row:
    name: str
    kind: str
    about: str
    config: dict[str, Any] = field(default_factory=dict)
    callback: dict[str, Any] | None = None  # BetaFromValidityCallback kwargs; None: no callback
    allow_loss_kl: bool = False
    beta_from_row: str | None = None  # fixed β = the β another row's controller ended with


MU = 0.6
ROWS = [
    Row(
        "tilted",
        "tilted",
        "FilteredGRPO tilted target, target_validity=μ, reverse KL",
        {"target_validity": MU},
    ),
    Row("grpo_klr", "grpo_klr", "grpo_klr (GRPO, KL in the reward) + callback", {"beta": 0.5}, {}),
    Row(
        "grpo_klr_closed",
        "grpo_klr",
        "grpo_klr + callback(closed_loop=True)",
        {"beta": 0.5},
        {"closed_loop": True},
    ),
    Row("rloo", "rloo", "RLOOTrainer + callback", {"beta": 0.5}, {}),
    Row(
        "grpo",
        "grpo",
        "TRL GRPOTrainer (defaults) + callback [refused without allow_loss_kl]",
        {"beta": 0.5},
        {},
        True,
    ),
    Row(
        "grpo_closed",
        "grpo",
        "TRL GRPOTrainer + callback(closed_loop=True) [refused without allow_loss_kl]",
        {"beta": 0.5},
        {"closed_loop": True},
        True,
    ),
    Row(
        "grpo_fixed",
        "grpo",
        "TRL GRPOTrainer(scale_rewards='none'), fixed β = grpo_klr's final β",
        {"scale_rewards": "none"},
        beta_from_row="grpo_klr",
    ),
]


def run_row(row: Row, model_dir: Path, task: Any, steps: int, betas: dict[str, float]) -> dict[str, Any]:
    from _enumerable import make_trainer, train_and_measure

    from filtered_rl.callbacks import BetaFromValidityCallback

    config = dict(row.config)
    if row.beta_from_row:
        config["beta"] = betas.get(row.beta_from_row, 0.554)  # the callback β when not run
    callback = (
        BetaFromValidityCallback(target_validity=MU, **row.callback) if row.callback is not None else None
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(
            row.kind, model_dir, task, Path(out), steps=steps, learning_rate=3e-3, lr_scheduler_type="constant",
            **config,
        )  # fmt: skip
        outcome = train_and_measure(
            trainer, task, callback=callback, probe_every=10, allow_loss_kl=row.allow_loss_kl
        )
    beta = callback.controller.beta if callback is not None else config.get("beta")
    if beta is not None:
        betas[row.name] = float(beta)
    trajectory = outcome.probe.mean_validities() if outcome.probe else []
    return {
        "row": row.name,
        "about": row.about,
        "validity": outcome.validity,
        "min_validity": min(trajectory) if trajectory else None,
        "kl_valid": outcome.kl_valid[0],
        "beta": beta,
        "base_validity": outcome.base[0].validity,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rows", nargs="+", choices=[r.name for r in ROWS], default=[r.name for r in ROWS])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    import torch
    from _enumerable import build_base_model, one_token_task

    torch.set_num_threads(1)
    task = one_token_task((0.2,))
    betas: dict[str, float] = {}
    results = []
    with tempfile.TemporaryDirectory() as base_dir:
        model_dir = build_base_model(Path(base_dir), task)
        print(
            f"| row | validity after {args.steps} steps | lowest validity, steps 10–{args.steps} | KL(p*‖π|valid) | β | s |"
        )
        print("|---|---|---|---|---|---|")
        for row in [r for r in ROWS if r.name in args.rows]:
            result = run_row(row, model_dir, task, args.steps, betas)
            results.append(result)
            beta = "—" if result["beta"] is None else f"{result['beta']:.3f}"
            print(
                f"| {result['about']} | {result['validity']:.3f} | {result['min_validity']:.3f} | "
                f"{result['kl_valid']:.4f} | {beta} | {result['seconds']:.0f} |",
                flush=True,
            )
    print(f"base validity A = {results[0]['base_validity']:.3f}, target μ = {MU}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

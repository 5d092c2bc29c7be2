"""The capacity check's tables (docs/results.md §4f) from finished `countdown-hard-capacity` runs, one output
directory per size, side by side. Reads only what the study wrote (exact.json, exact_train.json,
exact_curve.jsonl, train_minutes.json); trains and evaluates nothing.

    python benchmarks/capacity_table.py nano=runs/capacity/nano micro=runs/capacity/micro --seeds 0

SIZE=DIR1,DIR2 reads a run (arm and seed) from the first directory that has it, e.g. more seeds of the same
arms from a study run with the same settings (the nano arms are countdown-hard-cpu's, run for run).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ARMS = (
    ("base model", None),
    ("p* distilled", "pstar-distilled"),
    ("filtered forward KL + p* samples", "filtered-forward-kl---pstar-samples"),
    ("grpo β=0.2", "grpo-beta-0-2"),
    ("grpo β=0", "grpo-beta-0"),
)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _find(folders: list[Path], relative: str) -> Path:
    """The first of `folders` holding `relative` (else the first folder's path, which does not exist)."""
    return next((f / relative for f in folders if (f / relative).exists()), folders[0] / relative)


def _quantiles(values: list[float], qs=(0.05, 0.25, 0.5, 0.75, 0.95)) -> list[float]:
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] for q in qs]


def _mean(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) / len(values) ** 0.5:.3f}"


def base_table(sizes: dict[str, list[Path]], seeds: list[int]) -> list[str]:
    lines = [
        "| size | parameters | prompts | exact validity | A(x) 5 / 25 / 50 / 75 / 95 % | exact pass@64 | "
        "exact pass@256 | coverage@256 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, folder in sizes.items():
        info = _pretrain_info(folder[0])
        for label, name in (("held-out (48)", "exact.json"), ("training (200)", "exact_train.json")):
            for seed in seeds:
                d = _load(_find(folder, f"eval/base-seed{seed}/{name}"))
                if d is None:
                    continue
                q = _quantiles([row["base_validity"] for row in d["per_prompt"]])
                lines.append(
                    f"| {size} | {info} | {label}, seed {seed} | {d['validity']:.3f} | "
                    + " / ".join(f"{v:.3g}" for v in q)
                    + f" | {d['pass_at_k']['64']:.3f} | {d['pass_at_k']['256']:.4f} | "
                    f"{d['coverage_at_k']['256']:.3f} |"
                )
    return lines


def _pretrain_info(folder: Path) -> str:
    config = _load(folder / "results.json")
    if config is None:
        return "–"
    import os

    cache = Path(os.environ.get("FILTERED_RL_CACHE") or ".cache/filtered-rl")
    preset = config["preset"]
    for info_file in cache.glob(f"{preset['task']}-{preset['base_size']}-seed0-*/pretrain_info.json"):
        info = json.loads(info_file.read_text())
        if info["config"]["steps"] == preset["base_steps"]:
            return f"{info['parameters'] / 1e6:.2f} M"
    return "–"


def arm_table(sizes: dict[str, list[Path]], seeds: list[int]) -> list[str]:
    lines = [
        "| size | run | held-out validity | training validity | KL(p*‖π(·\\|valid)) held-out / training | "
        "coverage@256 held-out / training | pass@256 held-out | train min | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, folder in sizes.items():
        for run, slug in ARMS:
            held, train, minutes, found = [], [], [], []
            for seed in seeds:
                name = f"base-seed{seed}" if slug is None else f"{slug}-seed{seed}"
                h = _load(_find(folder, f"eval/{name}/exact.json"))
                t = _load(_find(folder, f"eval/{name}/exact_train.json"))
                if h is None or t is None:
                    continue
                held.append(h)
                train.append(t)
                found.append(str(seed))
                if slug is not None:
                    m = _load(_find(folder, f"train/{slug}-seed{seed}/final/train_minutes.json"))
                    minutes.append(m)
            if not held:
                lines.append(f"| {size} | {run} | not run | | | | | | |")
                continue
            lines.append(
                f"| {size} | {run} | {_mean([d['validity'] for d in held])} | "
                f"{_mean([d['validity'] for d in train])} | "
                f"{_mean([d['kl_pstar_policy_valid'] for d in held])} / "
                f"{_mean([d['kl_pstar_policy_valid'] for d in train])} | "
                f"{_mean([d['coverage_at_k']['256'] for d in held])} / "
                f"{_mean([d['coverage_at_k']['256'] for d in train])} | "
                f"{_mean([d['pass_at_k']['256'] for d in held])} | "
                + (f"{statistics.mean(minutes):.1f}" if minutes else "–")
                + f" | {', '.join(found)} |"
            )
    return lines


def curve_table(sizes: dict[str, list[Path]], seeds: list[int]) -> list[str]:
    lines = ["| size | run | seed | held-out exact validity at the curve's steps (coverage@256 at the last) |",
             "|---|---|---|---|"]  # fmt: skip
    for size, folder in sizes.items():
        for run, slug in ARMS[1:]:
            for seed in seeds:
                path = _find(folder, f"train/{slug}-seed{seed}/exact_curve.jsonl")
                if not path.exists():
                    continue
                points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                text = " / ".join(f"{p['step']}: {p['validity']:.3f}" for p in points)
                lines.append(f"| {size} | {run} | {seed} | {text} ({points[-1]['coverage@256']:.3f}) |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="+", help="SIZE=OUTPUT_DIR[,MORE_DIRS], one per size")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    sizes = {
        text.split("=", 1)[0]: [Path(d) for d in text.split("=", 1)[1].split(",")] for text in args.sizes
    }
    for table in (base_table, arm_table, curve_table):
        print("\n".join(table(sizes, args.seeds)) + "\n")


if __name__ == "__main__":
    main()

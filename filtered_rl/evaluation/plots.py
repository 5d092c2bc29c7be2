"""`filtered-rl plot`: pass@k against k (log-x) for one or more `summary.json` files, one curve each.

filtered-rl plot runs/eval/base/summary.json runs/eval/grpo/summary.json --output passk.png
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from filtered_rl.evaluation.outputs import EvalOutputError, atomic_write_bytes, read_json


def plot_passk(
    summary_paths: list[str | Path],
    output: str | Path,
    *,
    labels: list[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG of pass@k vs k with the bootstrap intervals as bands; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(summary_paths):
        raise ValueError(
            f"--labels needs one label per summary file: {len(labels)} labels, {len(summary_paths)} files"
        )
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    all_ks: set[int] = set()
    for j, path in enumerate(summary_paths):
        path = Path(path)
        if path.is_dir():
            path = path / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"no summary file at {path} (run `filtered-rl eval` first)")
        summary = read_json(
            path,
            fix="rerun `filtered-rl eval` with the same --output-dir: it rebuilds the summary from samples.jsonl",
        )
        if not isinstance(summary, dict) or "pass_at_k" not in summary:
            raise EvalOutputError(f"{path} is not a summary of `filtered-rl eval` (no pass_at_k)")
        points = sorted((int(k), v) for k, v in summary["pass_at_k"].items())
        ks = [k for k, _ in points]
        all_ks.update(ks)
        label = labels[j] if labels else f"{Path(summary['model']).name} ({path.parent.name})"
        (line,) = ax.plot(ks, [v["mean"] for _, v in points], marker="o", markersize=3, label=label)
        ax.fill_between(
            ks,
            [v["ci_low"] for _, v in points],
            [v["ci_high"] for _, v in points],
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_ks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic_write_bytes(output, png.getvalue())  # an interrupted plot leaves the previous PNG, not half of one
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("summaries", nargs="+", help="summary.json files (or eval output directories)")
    parser.add_argument("--output", "-o", default="passk.png", help="PNG to write (default: passk.png)")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per summary")
    parser.add_argument("--title", default=None)


def run(args: argparse.Namespace) -> int:
    path = plot_passk(args.summaries, args.output, labels=args.labels, title=args.title)
    print(f"wrote {path}")
    return 0

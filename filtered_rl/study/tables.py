"""The study's results table and its figures: one row per run and seed, mean ± spread over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def row_from_summary(name: str, seed: int, summary: dict, minutes: float | None = None) -> dict:
    ks = sorted(int(k) for k in summary["pass_at_k"])
    coverage = summary.get("coverage") or {}
    kl = summary.get("kl_pstar_to_policy") or {}
    return {
        "run": name,
        "seed": seed,
        "validity": summary["validity"],
        "pass@1": summary["pass_at_k"]["1"]["mean"],
        f"pass@{ks[-1]}": summary["pass_at_k"][str(ks[-1])]["mean"],
        "pass_at_k": {k: summary["pass_at_k"][str(k)]["mean"] for k in ks},
        "distinct_valid": summary["diversity"]["distinct_valid_answers"],
        "support_hit": coverage.get("fraction_of_valid_answers_hit"),
        "pstar_mass_hit": coverage.get("pstar_mass_hit"),
        "kl_pstar_policy": kl.get("mean") if isinstance(kl, dict) else kl,
        **({"distinct_m_valid": summary["distinct_m_valid"]} if "distinct_m_valid" in summary else {}),
        **_exact_columns(summary.get("exact")),
        "train_minutes": minutes,
    }


def _exact_columns(exact: dict | None) -> dict:
    """The exact metrics a row reports: validity, pass@256, coverage@256, KL(p* ‖ π(·|valid))."""
    if not exact:
        return {}
    return {
        "exact_validity": exact["validity"],
        "exact_pass@256": exact["pass_at_k"].get("256"),
        "exact_coverage@256": exact["coverage_at_k"].get("256"),
        "exact_kl_valid": exact["kl_pstar_policy_valid"],
    }


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and spread (standard deviation over seeds) of every metric, per run name, in first-seen order."""
    names = list(dict.fromkeys(r["run"] for r in rows))
    out = []
    for name in names:
        group = [r for r in rows if r["run"] == name]
        entry: dict[str, Any] = {"run": name, "seeds": len(group)}
        for key, value in group[0].items():
            if (
                key in ("run", "seed", "pass_at_k")
                or not isinstance(value, int | float)
                and value is not None
            ):
                continue
            values = [r[key] for r in group if r[key] is not None]
            entry[key] = (float(np.mean(values)), float(np.std(values))) if values else None
        out.append(entry)
    return out


def format_table(aggregated: list[dict]) -> str:
    """Markdown table; a ± spread appears when there are several seeds."""
    keys = [k for k in aggregated[0] if k not in ("run", "seeds", "train_minutes")]
    lines = ["| run | seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for entry in aggregated:
        cells = []
        for key in keys:
            value = entry.get(key)
            if value is None:
                cells.append("–")
            else:
                mean, std = value
                cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if entry["seeds"] > 1 else ""))
        lines.append(f"| {entry['run']} | {entry['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_frontier(rows: list[dict], output_dir: Path) -> tuple[Path, Path]:
    """pass@k curves (mean over seeds); the coverage–precision plane (pass@1 vs pass@n per seed) and
    pass@1 vs distinct valid answers (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["run"] for r in rows))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for name in names:
        group = [r for r in rows if r["run"] == name]
        ks = sorted(group[0]["pass_at_k"], key=int)
        means = [np.mean([r["pass_at_k"][k] for r in group]) for k in ks]
        style = dict(color="black", linestyle="--") if name == "base model" else dict(color=colors[name])
        ax.plot([int(k) for k in ks], means, marker="o", markersize=3, label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("pass@k (held-out prompts)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    passk_path = output_dir / "passk.png"
    fig.savefig(passk_path)
    plt.close(fig)

    # Left: the coverage–precision plane per seed. pass@n saturates when a task has many valid answers per
    # prompt, so the right panel puts the number of distinct valid answers (mean ± std over seeds) beside it.
    fig, (ax, ax_distinct) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    n_key = next(k for k in rows[0] if k.startswith("pass@") and k != "pass@1")
    for name in names:
        group = [r for r in rows if r["run"] == name]
        base = name == "base model"
        marker = (
            dict(marker="*", s=160, color="black") if base else dict(marker="o", s=40, color=colors[name])
        )
        precision = [r["pass@1"] for r in group]
        distinct = [r["distinct_valid"] for r in group]
        ax.scatter(precision, [r[n_key] for r in group], label=name, **marker)
        ax_distinct.errorbar(
            np.mean(precision),
            np.mean(distinct),
            xerr=np.std(precision) if len(group) > 1 else None,
            yerr=np.std(distinct) if len(group) > 1 else None,
            fmt="*" if base else "o",
            markersize=12 if base else 6,
            color="black" if base else colors[name],
            capsize=2,
            label=name,
        )
    ax.set_xlabel("pass@1 (precision)")
    ax.set_ylabel(f"{n_key} (coverage)")
    ax_distinct.set_xlabel("pass@1 (precision)")
    ax_distinct.set_ylabel(f"distinct valid answers per prompt (of {n_key[5:]} samples)")
    for axis in (ax, ax_distinct):
        axis.grid(alpha=0.3)
    ax_distinct.legend(fontsize=7)
    fig.tight_layout()
    plane_path = output_dir / "frontier.png"
    fig.savefig(plane_path)
    plt.close(fig)
    return passk_path, plane_path

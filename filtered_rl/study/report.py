"""The study's answer from its runs: each method family's frontier, and families at matched pass@1.

A family (GRPO+KL with β swept, the filtered objective with its divergence swept, MARA, ...) traces
points (pass@1, diversity) as its knob moves. What a family can reach is the upper concave envelope of
its points (`filtered_rl.evaluation.frontiers.upper_frontier`): mixing two trained models prompt by
prompt reaches every point between them. The base model is every family's point too (any user can
mix it in), so each frontier starts at the base model and families are compared where they overlap.

Differences between arms or families are what a user acts on, and most of each arm's standard error is
prompt-to-prompt spread that every arm shares, so differences get a *paired* bootstrap: one draw of seeds
and prompts applied to every arm at once (`paired_resamples`).

Two sets of metrics (`MetricSet`), each read per prompt from a file every evaluation writes, so this
runs again in seconds on finished runs:
- `EXACT` (`exact.json`, tasks that enumerate their valid answers): exact pass@1, pass@256, coverage@256
  and KL(p* ‖ π(·|valid)) by teacher forcing, on the held-out prompts and on training prompts
  (`exact_train.json`), and `exact_curve.jsonl` per run (exact validity and coverage during training);
- `SAMPLED` (`sampled.json`, any task: `filtered_rl.study.sampled`): pass@1 and pass@n of the n evaluation
  samples, distinct valid answers, answer entropy among valid samples, and the expected number of distinct
  answers among m valid samples, which does not grow with validity itself.

    filtered-rl study ... --output-dir DIR      # study.md, study_frontier*.png, study_curves.png
    filtered-rl frontier ... --output-dir DIR   # the synthetic presets: the exact sets only
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from filtered_rl.evaluation.frontiers import bootstrap_se, upper_frontier, value_at

# (column, label, higher is better): the diversity axes of the study, each against exact pass@1.
METRICS = (
    ("pass@256", "exact pass@256", True),
    ("coverage@256", "exact coverage@256 (p*-mass of distinct valid answers)", True),
    ("kl_valid", "exact KL(p* ‖ π(·|valid))", False),
)
BASE = "base model"
KEYS = ("pass@1", *(m for m, _, _ in METRICS))  # every per-arm value: exact pass@1, then the diversity axes


def per_prompt_values(exact: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-prompt exact pass@1, pass@256, coverage@256 and KL of one evaluation's `exact.json`."""
    rows = exact["per_prompt"]
    return {
        "pass@1": np.array([r["validity"] for r in rows]),
        "pass@256": np.array([r["pass_at_k"]["256"] for r in rows]),
        "coverage@256": np.array([r["coverage_at_k"]["256"] for r in rows]),
        "kl_valid": np.array([r["kl_pstar_policy_valid"] for r in rows]),
    }


@dataclass(frozen=True)
class MetricSet:
    """A set of per-prompt metrics the study compares arms in: pass@1 against each of `axes` ((column,
    label, higher is better)), read by `values` from the per-prompt file each evaluation writes. `prompt_sets`
    lists (file, heading, frontier figure) per prompt set; `prefix` starts every column's label."""

    name: str
    axes: tuple[tuple[str, str, bool], ...]
    values: Callable[[dict[str, Any]], dict[str, np.ndarray]]
    prompt_sets: tuple[tuple[str, str, str], ...]
    prefix: str

    @property
    def keys(self) -> tuple[str, ...]:
        return ("pass@1", *(m for m, _, _ in self.axes))


def arm_points(
    evaluations: dict[str, list[dict[str, Any]]], metrics: MetricSet | None = None
) -> list[dict[str, Any]]:
    """One point per arm: the mean over seeds and prompts of each metric and its bootstrap standard error
    (resampling seeds and prompts: `bootstrap_se`). `evaluations` maps an arm to its seeds' exact.json
    (or `metrics`' file). A prompt where a metric is undefined (NaN) is left out of that metric's mean."""
    metrics = metrics or EXACT
    points = []
    for arm, seeds in evaluations.items():
        values = [metrics.values(e) for e in seeds]
        width = min(len(v["pass@1"]) for v in values)
        point: dict[str, Any] = {"run": arm, "seeds": len(seeds)}
        for key in metrics.keys:
            matrix = np.stack([v[key][:width] for v in values])
            point[key] = _mean(matrix)
            point[f"{key}_se"] = (
                bootstrap_se(matrix) if not np.isnan(matrix).any() else _nan_bootstrap_se(matrix)
            )
        points.append(point)
    return points


def _mean(values: np.ndarray) -> float:
    """The mean of the defined values (NaN when none is)."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def _nan_bootstrap_se(values: np.ndarray, num_resamples: int = 1000, seed: int = 0) -> float:
    """`bootstrap_se` of a matrix with undefined (NaN) cells: each resample's mean over its defined cells."""
    seeds, prompts = values.shape
    rng = np.random.default_rng(seed)
    means = np.array([
        _mean(values[np.ix_(rng.integers(0, seeds, seeds), rng.integers(0, prompts, prompts))])
        for _ in range(num_resamples)
    ])  # fmt: skip
    means = means[~np.isnan(means)]
    return float(means.std(ddof=1)) if means.size > 1 else float("nan")


def paired_resamples(
    evaluations: dict[str, dict[int, dict[str, Any]]],
    families: dict[str, str],
    levels: list[float],
    num_resamples: int = 200,
    seed: int = 0,
    metrics: MetricSet | None = None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
    """Paired bootstrap of every arm's means and every family's matched-pass@1 values.

    `evaluations` maps an arm to {seed: exact.json}. Each resample draws seeds and prompt columns once and
    applies the draw to every arm (seed s means the same training and held-out prompts for every arm), so a
    difference's spread excludes what the arms share. An arm lacking some drawn seeds uses the drawn ones
    it has, or, with none, a resample of its own seeds (unpaired over seeds, still paired over prompts).

    Returns (means, matched): means[arm][key] is a (resamples,) array of that arm's mean of key;
    matched[family][metric] a (resamples × levels) array of the family's frontier value at each pass@1
    level, NaN where that resample's frontier does not reach the level.
    """
    metrics = metrics or EXACT
    values = {arm: {s: metrics.values(e) for s, e in by_seed.items()} for arm, by_seed in evaluations.items()}
    width = min(len(v["pass@1"]) for by_seed in values.values() for v in by_seed.values())
    all_seeds = sorted({s for by_seed in values.values() for s in by_seed})
    rng = np.random.default_rng(seed)
    means = {arm: {k: np.empty(num_resamples) for k in metrics.keys} for arm in values}
    matched: dict[str, dict[str, np.ndarray]] = {}
    for i in range(num_resamples):
        drawn = rng.choice(all_seeds, len(all_seeds))
        cols = rng.integers(0, width, width)
        points = []
        for arm, by_seed in values.items():
            rows = [s for s in drawn if s in by_seed]
            if not rows:
                rows = list(rng.choice(sorted(by_seed), len(by_seed)))
            point: dict[str, Any] = {"run": arm}
            for k in metrics.keys:
                point[k] = means[arm][k][i] = _mean(np.stack([by_seed[s][k][:width][cols] for s in rows]))
            points.append(point)
        for family, by_metric in family_frontiers(points, families, metrics).items():
            for metric, frontier in by_metric.items():
                out = matched.setdefault(family, {}).setdefault(
                    metric, np.full((num_resamples, len(levels)), np.nan)
                )
                for j, x in enumerate(levels):
                    value = value_at(frontier, x)
                    out[i, j] = np.nan if value is None else value
    return means, matched


def spread(samples: np.ndarray, min_defined: float = 0.5) -> float | None:
    """Bootstrap SE of resampled values (NaN: undefined in that resample); None when fewer than
    `min_defined` of the resamples define it (the point estimate is then at the edge of a frontier's reach)."""
    defined = samples[~np.isnan(samples)]
    if len(defined) < max(2, min_defined * len(samples)):
        return None
    return float(defined.std(ddof=1))


def family_frontiers(
    points: list[dict[str, Any]], families: dict[str, str], metrics: MetricSet | None = None
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """For each family and metric, the upper frontier of (pass@1, metric) over its arms and the base model.
    Lower-is-better metrics are negated for the envelope and returned in their own sign."""
    base = next((p for p in points if p["run"] == BASE), None)
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for family in dict.fromkeys(families[p["run"]] for p in points if p["run"] != BASE):
        members = [p for p in points if p["run"] != BASE and families[p["run"]] == family]
        if base is not None:
            members.append(base)
        out[family] = {}
        for metric, _, higher in (metrics or EXACT).axes:
            sign = 1.0 if higher else -1.0
            members_defined = [p for p in members if np.isfinite(p[metric]) and np.isfinite(p["pass@1"])]
            hull = upper_frontier([(p["pass@1"], sign * p[metric]) for p in members_defined])
            out[family][metric] = [(x, sign * y) for x, y in hull]
    return out


def matched_levels(points: list[dict[str, Any]], num: int = 4) -> list[float]:
    """pass@1 levels to compare families at: evenly spaced from the base model's to the best arm's."""
    base = next(p["pass@1"] for p in points if p["run"] == BASE)
    top = max(p["pass@1"] for p in points)
    if top <= base:
        return [base]
    return [float(x) for x in np.linspace(base, top, num + 1)[1:]]


def _cell(value: float | None, se: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    return text if se is None else f"{text} ± {se:.3f}"


def matched_table(
    frontiers: dict[str, dict[str, list[tuple[float, float]]]],
    levels: list[float],
    metric: str,
    matched: dict[str, dict[str, np.ndarray]] | None = None,
) -> str:
    """Markdown: each family's frontier value of `metric` at each pass@1 level (– where it does not reach),
    ± its bootstrap SE when `matched` (from `paired_resamples`) is given."""
    lines = [
        f"| family | {' | '.join(f'pass@1 = {x:.3f}' for x in levels)} |",
        "|---" * (len(levels) + 1) + "|",
    ]
    for family, by_metric in frontiers.items():
        cells = []
        for j, x in enumerate(levels):
            se = None if matched is None else spread(matched[family][metric][:, j])
            cells.append(_cell(value_at(by_metric[metric], x), se))
        lines.append(f"| {family} | {' | '.join(cells)} |")
    return "\n".join(lines)


def difference_table(
    frontiers: dict[str, dict[str, list[tuple[float, float]]]],
    levels: list[float],
    metric: str,
    matched: dict[str, dict[str, np.ndarray]],
    reference: str,
) -> str:
    """Markdown: each family's frontier value minus the reference family's at each pass@1 level, ± the
    paired bootstrap SE of that difference (– where either frontier does not reach the level)."""
    lines = [
        f"| family − {reference} | {' | '.join(f'pass@1 = {x:.3f}' for x in levels)} |",
        "|---" * (len(levels) + 1) + "|",
    ]
    for family, by_metric in frontiers.items():
        if family == reference:
            continue
        cells = []
        for j, x in enumerate(levels):
            mine, theirs = value_at(by_metric[metric], x), value_at(frontiers[reference][metric], x)
            if mine is None or theirs is None:
                cells.append("–")
                continue
            diff = matched[family][metric][:, j] - matched[reference][metric][:, j]
            cells.append(_cell(mine - theirs, spread(diff), signed=True))
        lines.append(f"| {family} | {' | '.join(cells)} |")
    return "\n".join(lines)


def points_table(
    points: list[dict[str, Any]],
    families: dict[str, str],
    means: dict[str, dict[str, np.ndarray]] | None = None,
    metrics: MetricSet | None = None,
) -> str:
    """Markdown: every arm's mean ± SE of each metric; with `means` (from `paired_resamples`) also its
    pass@1 gain over the base model ± the paired SE of that gain."""
    metrics = metrics or EXACT
    keys = metrics.keys
    gain = means is not None and BASE in means
    lines = [
        "| run | family | seeds | "
        + " | ".join(f"{metrics.prefix}{k}" for k in keys)
        + (" | pass@1 − base (paired SE)" if gain else "")
        + " |",
        "|---" * (len(keys) + 3 + gain) + "|",
    ]
    base = next((p for p in points if p["run"] == BASE), None)
    for p in points:
        cells = [
            "–"
            if np.isnan(p[k])
            else f"{p[k]:.3f} ± {p[f'{k}_se']:.3f}"
            if np.isfinite(p[f"{k}_se"])
            else f"{p[k]:.3f}"
            for k in keys
        ]
        if gain and base is not None:
            paired = means[p["run"]]["pass@1"] - means[BASE]["pass@1"]
            cells.append(
                "–" if p["run"] == BASE else _cell(p["pass@1"] - base["pass@1"], spread(paired), True)
            )
        family = families.get(p["run"], "–") if p["run"] != BASE else "–"
        lines.append(f"| {p['run']} | {family} | {p['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


ORACLE_MARK = "oracle"  # a family whose name says so is drawn dashed (it needs the valid set: not a method)


def family_colors(families: list[str]) -> dict[str, Any]:
    """One colour per family, distinct for up to 20 families."""
    import matplotlib.pyplot as plt

    palette = plt.cm.tab10 if len(families) <= 10 else plt.cm.tab20
    return {f: palette(i % palette.N) for i, f in enumerate(families)}


def plot_study(
    points: list[dict[str, Any]],
    frontiers: dict[str, dict[str, list[tuple[float, float]]]],
    families: dict[str, str],
    path: Path,
    prompts: str = "held-out prompts",
    metrics: MetricSet | None = None,
) -> Path:
    """pass@1 against each diversity metric: every arm (± bootstrap SE), each family's frontier, the base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metrics or EXACT
    colors = family_colors(list(frontiers))
    fig, axes = plt.subplots(1, len(metrics.axes), figsize=(5.2 * len(metrics.axes), 4.4), dpi=120)
    axes = np.atleast_1d(axes)
    for ax, (metric, label, _) in zip(axes, metrics.axes, strict=True):
        for p in points:
            base = p["run"] == BASE
            ax.errorbar(
                p["pass@1"], p[metric], xerr=p["pass@1_se"], yerr=p[f"{metric}_se"],
                fmt="*" if base else "o", markersize=13 if base else 5, capsize=2,
                color="black" if base else colors[families[p["run"]]],
            )  # fmt: skip
        for family, by_metric in frontiers.items():
            if not by_metric[metric]:
                continue
            xs, ys = zip(*by_metric[metric], strict=True)
            style = "--" if ORACLE_MARK in family else "-"  # an oracle reference, not a method
            ax.plot(xs, ys, style, color=colors[family], label=family, linewidth=1.5)
        ax.set_xlabel(f"{metrics.prefix}pass@1 ({prompts})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, list[list[dict[str, Any]]]], families: dict[str, str], path: Path) -> Path:
    """Exact validity and coverage@256 against training step, per arm (mean over its seeds)."""
    ylabels = ("exact validity (held-out)", "exact coverage@256")
    return _plot_per_arm(curves, families, path, ("validity", "coverage@256"), ylabels, missing_as_nan=False)


def _plot_per_arm(
    series: dict[str, list[list[dict[str, Any]]]],
    families: dict[str, str],
    path: Path,
    keys: tuple[str, str],
    ylabels: tuple[str, str],
    missing_as_nan: bool,
) -> Path:
    """Two panels, `keys` against training step, one line per arm (mean over its seeds at the steps every
    seed logged), coloured by family; `missing_as_nan`: a logged None (or 0) is drawn as a gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = family_colors(list(dict.fromkeys(families[a] for a in series)))
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120)
    for arm, seeds in series.items():
        family = families[arm]
        style = styles[seen.get(family, 0) % len(styles)]
        seen[family] = seen.get(family, 0) + 1
        steps = sorted(set.intersection(*({p["step"] for p in s} for s in seeds)))
        for ax, key in zip(axes, keys, strict=True):
            at = lambda s, t, key=key: next(p[key] for p in s if p["step"] == t)  # noqa: E731
            values = [
                np.mean([(at(s, t) or np.nan) if missing_as_nan else at(s, t) for s in seeds]) for t in steps
            ]
            ax.plot(steps, values, style, color=colors[family], label=arm, linewidth=1.2)
    for ax, label in zip(axes, ylabels, strict=True):
        ax.set_ylabel(label)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# (file each evaluation writes, heading, frontier figure): the prompts the runs trained on first, where the
# objectives' optima are defined, then the held-out prompts, where generalisation counts too.
PROMPT_SETS = (
    (
        "exact_train.json",
        "training prompts (where the objectives' optima are defined)",
        "study_frontier_train.png",
    ),
    ("exact.json", "held-out prompts", "study_frontier.png"),
)
EXACT = MetricSet("exact", METRICS, per_prompt_values, PROMPT_SETS, "exact ")


def sampled_values(sampled: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-prompt values of one evaluation's `sampled.json` (`filtered_rl.study.sampled`); NaN where a metric
    is undefined (entropy without a valid sample, distinct among m valid with fewer than m)."""
    rows = sampled["per_prompt"]

    def column(key: str) -> np.ndarray:
        return np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=np.float64)

    return {
        "pass@1": column("pass@1"),
        "pass@n": column("pass@n"),
        "distinct_valid": column("distinct_valid"),
        "entropy_valid": column("entropy_valid"),
        "distinct_m_valid": column("distinct_m_valid"),
    }


SAMPLED = MetricSet(
    "sampled",
    (
        ("pass@n", "pass@n (n = the evaluation samples per prompt)", True),
        ("distinct_valid", "distinct valid answers (of n samples)", True),
        ("entropy_valid", "answer entropy among valid samples (nats)", True),
        ("distinct_m_valid", "distinct answers among m valid samples (does not grow with validity)", True),
    ),
    sampled_values,
    (("sampled.json", "held-out prompts, sampled", "study_frontier_sampled.png"),),
    "",
)


def arm_difference_table(
    means: dict[str, dict[str, np.ndarray]], pairs: list[tuple[str, str]], metrics: MetricSet | None = None
) -> str:
    """Markdown: arm A minus arm B in each metric, ± the paired bootstrap SE (`means` from `paired_resamples`);
    a pair with an arm not evaluated on this prompt set says so."""
    metrics = metrics or EXACT
    keys = metrics.keys
    lines = [
        "| A − B | " + " | ".join(f"{metrics.prefix}{k}" for k in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for a, b in pairs:
        missing = [arm for arm in (a, b) if arm not in means]
        if missing:
            lines.append(f"| {a} − {b} | not evaluated: {', '.join(missing)} |" + " |" * (len(keys) - 1))
            continue
        cells = []
        for k in keys:
            diff = means[a][k] - means[b][k]
            defined = diff[~np.isnan(diff)]
            cells.append(_cell(float(defined.mean()), spread(diff), signed=True) if defined.size else "–")
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_section(
    output_dir: Path,
    runs: list[tuple[str, str, str]],
    seeds: list[int],
    file: str,
    title: str,
    figure: str,
    reference: str | None = None,
    compare: list[tuple[str, str]] = (),
    metrics: MetricSet | None = None,
) -> list[str] | None:
    """Markdown sections (points table, matched-pass@1 tables, differences from the reference family) and
    the frontier figure for one prompt set; None when the base model or every arm lacks that set's
    per-prompt file. `reference` defaults to the first family of `runs`; `compare` lists (arm A, arm B) run
    names (or BASE) whose paired differences get a table of their own."""
    metrics = metrics or EXACT
    families = {name: family for name, _, family in runs}
    evaluations: dict[str, dict[int, dict[str, Any]]] = {}
    for name, slug, _ in [(BASE, "base", BASE), *runs]:
        found = {s: output_dir / "eval" / f"{slug}-seed{s}" / file for s in seeds}
        exact = {s: json.loads(p.read_text()) for s, p in found.items() if p.exists()}
        if exact and all("per_prompt" in e for e in exact.values()):
            evaluations[name] = exact
    if BASE not in evaluations or len(evaluations) < 2:
        return None
    points = arm_points({arm: list(by_seed.values()) for arm, by_seed in evaluations.items()}, metrics)
    frontiers = family_frontiers(points, families, metrics)
    levels = matched_levels(points)
    means, matched = paired_resamples(evaluations, families, levels, metrics=metrics)
    if reference not in frontiers:
        reference = next(iter(frontiers))
    plot_study(
        points, frontiers, families, output_dir / figure, prompts=title.split(" (")[0], metrics=metrics
    )
    sections = [f"## On the {title}", f"![frontiers]({figure})"]
    if metrics is SAMPLED:
        first = next(iter(evaluations[BASE].values()))
        sections.append(
            f"n = {first.get('num_samples')} samples per prompt; pass@k is the unbiased estimator; distinct answers "
            f"among m = {first.get('m')} valid samples is the expected number of distinct answers in m valid "
            "samples drawn without replacement, over the prompts with at least m valid samples "
            "(`filtered_rl.study.sampled`)."
        )
    sections.append(points_table(points, families, means, metrics))
    for metric, label, higher in metrics.axes:
        better = "higher" if higher else "lower"
        sections += [
            f"### {label} at matched pass@1 ({better} is better; every frontier includes the base model; "
            "± bootstrap SE over seeds and prompts)",
            matched_table(frontiers, levels, metric, matched),
            f"Difference from {reference} at the same pass@1, ± its paired bootstrap SE (one draw of seeds "
            "and prompts for every arm, so the spread the arms share cancels):",
            difference_table(frontiers, levels, metric, matched, reference),
        ]
    if compare:
        sections += [
            "### Paired differences between named arms (± paired bootstrap SE over seeds and prompts)",
            arm_difference_table(means, list(compare), metrics),
        ]
    return sections


STUDY_TITLE = "# Frontier study (exact metrics, mean ± bootstrap SE over seeds and prompts)"


def write_study(
    output_dir: Path,
    runs: list[tuple[str, str, str]],
    seeds: list[int],
    reference: str | None = None,
    compare: list[tuple[str, str]] = (),
    metric_sets: tuple[MetricSet, ...] = (),
    title: str = STUDY_TITLE,
    preamble: list[str] = (),
) -> Path | None:
    """study.md and figures from a study's output directory. `runs` is (name, slug, family) per arm;
    families are compared with `reference` (default: the first family of `runs`), and the (A, B) run-name
    pairs of `compare` arm by arm. `metric_sets` (default: the exact metrics only, as `filtered-rl frontier`
    writes) are reported in order, each on its prompt sets. None when no set has a base model and an arm
    evaluated (nothing to write)."""
    from filtered_rl.evaluation.outputs import atomic_write_text
    from filtered_rl.study.curve import CURVE_FILE, read_curve

    families = {name: family for name, _, family in runs}
    sections = [title, *preamble, f"Seeds: {', '.join(map(str, seeds))}."]
    found = False
    for metrics in metric_sets or (EXACT,):
        for file, heading, figure in metrics.prompt_sets:
            part = study_section(output_dir, runs, seeds, file, heading, figure, reference, compare, metrics)
            if part is not None:
                sections += part
                found = True
    if not found:
        return None
    curves = {}
    for name, slug, _ in runs:
        seed_curves = [read_curve(output_dir / "train" / f"{slug}-seed{s}" / CURVE_FILE) for s in seeds]
        if seed_curves and all(seed_curves):
            curves[name] = seed_curves
    if curves:
        plot_curves(curves, families, output_dir / "study_curves.png")
        sections.append(
            "## Exact validity and coverage@256 (held-out) during training\n\n![curves](study_curves.png)"
        )
    if metric_sets and SAMPLED in metric_sets:
        logs = {}
        for name, slug, _ in runs:
            seed_logs = [read_train_log(output_dir / "train" / f"{slug}-seed{s}") for s in seeds]
            if seed_logs and all(seed_logs):
                logs[name] = seed_logs
        if logs:
            plot_train_logs(logs, families, output_dir / "study_train_curves.png")
            sections.append(
                "## Validity and token entropy of the training samples during training (TRL's logged `reward` "
                "mean and `entropy`, mean over seeds)\n\n![training curves](study_train_curves.png)"
            )
    path = output_dir / "study.md"
    atomic_write_text(path, "\n\n".join(sections) + "\n")
    return path


TRAIN_LOG = "train_log.jsonl"


def read_train_log(run_dir: Path) -> list[dict[str, Any]]:
    """The logged (step, reward, entropy) points of one run (a line cut by a kill is skipped; a step
    logged twice keeps its last value)."""
    path = run_dir / TRAIN_LOG
    if not path.exists():
        return []
    points: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "reward" in entry and "step" in entry:
            points[int(entry["step"])] = {
                "step": int(entry["step"]),
                "reward": entry["reward"],
                "entropy": entry.get("entropy"),
            }
    return [points[s] for s in sorted(points)]


def plot_train_logs(
    logs: dict[str, list[list[dict[str, Any]]]], families: dict[str, str], path: Path
) -> Path:
    """Training-sample validity (reward mean) and token entropy against step, per arm (mean over seeds)."""
    ylabels = ("validity of the training samples (reward mean)", "token entropy of the training samples")
    return _plot_per_arm(logs, families, path, ("reward", "entropy"), ylabels, missing_as_nan=True)

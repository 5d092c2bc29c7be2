"""A study YAML into a `StudyConfig`: the arms, the sizes, the model and the task. Checks names, loads nothing.

    model: filtered-rl:nano          # a hub id, a model directory or filtered-rl:<name> (or --model)
    task: countdown                  # anything load_task accepts (or --task), + data_files, verifier, ...
    steps: 100
    seeds: [0, 1, 2]
    train_prompts: 256               # training prompts; eval_prompts, eval_samples: the held-out evaluation
    settings: {beta: 0.0}            # any TRL/config key, for every arm (an arm's own settings win)
    arms:
      grpo: {beta: [0, 0.04, 0.2]}   # a list is a sweep: three arms
      filtered: {divergence: forward_kl}
      mara: {}

`arms` maps an algorithm (`filtered-rl train --list`, or `pstar_distill`) to its settings, or is a list of
such one-key mappings when an algorithm appears twice. An arm's settings may also hold `name`, `family`
(the frontier its points belong to: default the algorithm), `rehearsal_samples` and `rehearsal_min_correct`
(dph, filtered_pstar, rft: the base model's stored samples), `target_validity` (μ, for the algorithms with
the β-from-μ controller). Every list-valued setting is swept (the product of all lists, in order).
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

from filtered_rl.study.spec import ARM_KEYS, CONFIG_KEYS, RunSpec, StudyConfig, slug

# Sizes of a study that names none (a study YAML or flags set any of them).
DEFAULTS: dict[str, Any] = {
    "base_size": "nano",
    "steps": 100,
    "train_prompts": 256,
    "num_generations": 8,
    "batch_size": 32,
    "learning_rate": 1e-6,  # TRL's GRPO default, for real models; the project's own models: 3e-4
    "eval_prompts": 64,
    "eval_samples": 16,
}
OWN_MODEL_LEARNING_RATE = 3e-4
TOP_KEYS = (*CONFIG_KEYS, "arms", "seeds", "settings")
DISTILL = "pstar_distill"


class StudyConfigError(ValueError):
    """A study YAML or flag that names no valid choice; the message lists the choices."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise StudyConfigError(f"--config {path}: no such file") from None
    except yaml.YAMLError as error:
        raise StudyConfigError(f"--config {path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise StudyConfigError(
            f"--config {path}: expected a mapping (model, task, arms, ...) at the top level"
        )
    unknown = [key for key in data if key not in TOP_KEYS]
    if unknown:
        raise StudyConfigError(
            f"--config {path}: unknown keys {unknown}; a study YAML may set {', '.join(TOP_KEYS)}"
        )
    return data


def algorithm_names() -> list[str]:
    from filtered_rl.trainers import ALGORITHMS

    return [*ALGORITHMS.names(), DISTILL]


def _entries(arms: Any) -> list[tuple[str, dict[str, Any]]]:
    """(algorithm, settings) per arms entry: a mapping, or a list of one-key mappings."""
    if isinstance(arms, dict):
        items = list(arms.items())
    elif isinstance(arms, list) and all(isinstance(a, dict) and len(a) == 1 for a in arms):
        items = [next(iter(a.items())) for a in arms]
    else:
        raise StudyConfigError(
            "arms: expected a mapping `algorithm: {setting: value}` (e.g. grpo: {beta: [0, 0.2]}) or a list of "
            f"such one-key mappings, got {arms!r}"
        )
    out = []
    for algorithm, settings in items:
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise StudyConfigError(
                f"arms: {algorithm}: expected a mapping of settings (e.g. {{beta: 0.04}}), got {settings!r}"
            )
        out.append((str(algorithm), settings))
    return out


def _value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def expand_arms(arms: Any) -> tuple[RunSpec, ...]:
    """The arms of a study YAML's `arms`, sweeps expanded; unknown algorithms and repeated names refused."""
    from filtered_rl.trainers import ALGORITHMS

    choices = algorithm_names()
    specs: list[RunSpec] = []
    for algorithm, settings in _entries(arms):
        if algorithm not in choices:
            raise StudyConfigError(f"arms: unknown algorithm {algorithm!r}; choose from {', '.join(choices)}")
        swept = [k for k, v in settings.items() if isinstance(v, list)]
        if any(k in ("name", "family") for k in swept):
            raise StudyConfigError(f"arms: {algorithm}: name and family cannot be swept (give one each)")
        for values in itertools.product(*(settings[k] for k in swept)):
            chosen = {**settings, **dict(zip(swept, values, strict=True))}
            options = {k: v for k, v in chosen.items() if k not in (*ARM_KEYS, "target_validity")}
            target = chosen.get("target_validity")
            controller = algorithm != DISTILL and ALGORITHMS[algorithm].accepts_controller
            if target is not None and not controller:  # tilted/filtered: a config field of their own
                options["target_validity"] = target
                target = None
            label = ", ".join(f"{k}={_value_text(v)}" for k, v in chosen.items() if k not in ARM_KEYS)
            name = chosen.get("name") or (f"{algorithm} {label}" if label else algorithm)
            if "name" in chosen and swept:
                name = (
                    f"{name} {', '.join(f'{k}={_value_text(v)}' for k, v in zip(swept, values, strict=True))}"
                )
            spec = RunSpec(
                name,
                algorithm,
                options,
                target_validity=target,
                family=chosen.get("family") or algorithm,
                **{k: chosen[k] for k in ("rehearsal_samples", "rehearsal_min_correct") if k in chosen},
            )
            if algorithm in ("filtered_pstar", "rft") and "rehearsal_min_correct" not in chosen:
                spec = replace(
                    spec, rehearsal_samples=chosen.get("rehearsal_samples", 32), rehearsal_min_correct=1
                )
            specs.append(spec)
    seen: dict[str, str] = {}
    for spec in specs:
        key = slug(spec.name)
        if key in seen:
            raise StudyConfigError(
                f"arms: two arms are named {spec.name!r} / {seen[key]!r} (one directory name {key!r}); give one a "
                "`name:`"
            )
        seen[key] = spec.name
    if not specs:
        raise StudyConfigError("arms: no arm given; e.g. arms: {grpo: {beta: [0, 0.2]}, filtered: {}}")
    return tuple(specs)


def build_config(
    data: dict[str, Any], base: StudyConfig | None = None, overrides: dict[str, Any] | None = None
) -> StudyConfig:
    """A StudyConfig from a study YAML's mapping on top of `base` (a preset; None: DEFAULTS), then the
    `overrides` (flags, None values ignored). The YAML's `settings` add to the preset's."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    settings = {**(base.settings if base else {}), **(data.get("settings") or {})}
    if not isinstance(settings, dict):
        raise StudyConfigError(f"settings: expected a mapping of config keys, got {settings!r}")
    settings.update(overrides.pop("settings", {}))
    values = {k: v for k, v in data.items() if k in CONFIG_KEYS}
    values.update({k: v for k, v in overrides.items() if k in CONFIG_KEYS})
    runs = expand_arms(data["arms"]) if "arms" in data else (base.runs if base else None)
    if runs is None:
        raise StudyConfigError(
            "no arms: give --config with `arms:` (e.g. arms: {grpo: {beta: [0, 0.2]}, filtered: {}}) or --preset"
        )
    if base is not None:
        return replace(base, runs=runs, settings=settings, **values)
    defaults = dict(DEFAULTS)
    model = values.get("model")
    if model is None or str(model).startswith(("filtered-rl:nano", "filtered-rl:small")):
        defaults["learning_rate"] = OWN_MODEL_LEARNING_RATE
    return StudyConfig(runs=runs, settings=settings, **{**defaults, **values})


def to_dict(config: StudyConfig) -> dict[str, Any]:
    """A JSON-able form of the config (the runs as mappings), read back by `from_dict`."""
    from dataclasses import asdict

    return asdict(config)


def from_dict(data: dict[str, Any]) -> StudyConfig:
    runs = tuple(RunSpec(**run) for run in data["runs"])
    return StudyConfig(**{**data, "runs": runs})

"""Downstream scores against pretraining loss across checkpoints and runs (the loss
perspective, ../shared/methods/loss_perspective.md; docs/evaluation.md).

Reads the sweep's ``evals/iter_*.json`` of one or more runs, pools their checkpoints per task,
and reports Spearman/Pearson correlations of score with loss, the loss threshold η (decision 3)
and one plot per task. Runs whose tokenizer or loss-data fingerprints differ are refused
unless forced (decision 5).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError

X_AXES = {"valid_loss": "validation_data", "train_loss": "training_data"}


class IncomparableRunsError(ConfigError):
    """Runs whose losses are not on one axis (different tokenizer or loss data)."""


@dataclass
class RunEvals:
    """One run's evaluated checkpoints (the sweep's JSON records, by iteration)."""

    path: str
    evals_dir: str
    records: list[dict[str, Any]]
    label: str = ""


@dataclass
class Point:
    """One checkpoint of one run on one task's plot."""

    label: str
    iteration: int
    tokens: int | None
    loss: float
    score: float
    stderr: float | None
    random: float | None
    se_source: str | None = None


@dataclass
class TaskAnalysis:
    task: str
    metric: str
    higher_is_better: bool
    points: list[Point] = field(default_factory=list)
    correlations: dict[str, Any] = field(default_factory=dict)
    threshold: dict[str, Any] = field(default_factory=dict)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# -- reading -------------------------------------------------------------------------------------
def load_run(path: str) -> RunEvals:
    """A run directory (its ``evals/``) or an evals directory, with every ``iter_*.json``."""
    evals = path if glob.glob(os.path.join(path, "iter_*.json")) else os.path.join(path, "evals")
    files = sorted(glob.glob(os.path.join(evals, "iter_*.json")))
    if not files:
        raise ConfigError(f"{path}: no evals/iter_*.json (run tools/evaluate_checkpoints.py "
                          "first)")
    records = []
    for name in files:
        with open(name, encoding="utf-8") as handle:
            records.append(json.load(handle))
    records.sort(key=lambda r: r.get("iteration", 0))
    return RunEvals(os.path.abspath(path), os.path.abspath(evals), records)


def run_label(run: RunEvals) -> str:
    """method + shape (preset, else layers x hidden size) from the run's config."""
    info = run.records[-1].get("run") or {}
    if not info:
        return os.path.basename(run.path.rstrip("/"))
    shape = info.get("preset") or f"L{info.get('num_layers')}-H{info.get('hidden_size')}"
    return f"{info.get('method', '?')} {shape}"


def label_runs(runs: list[RunEvals]) -> None:
    labels = [run_label(run) for run in runs]
    for run, label in zip(runs, labels):
        duplicate = labels.count(label) > 1
        run.label = f"{label} ({os.path.basename(run.path.rstrip('/'))})" if duplicate else label


def _describe(run: RunEvals) -> str:
    return f"{run.label} ({run.path})"


def _definition_diff(a: Any, b: Any) -> str:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return "no fingerprint definition recorded"
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)


def fingerprint_differences(runs: list[RunEvals], x: str) -> list[str]:
    """Why the runs' losses are not comparable (empty when they are): the tokenizer and the
    loss data (validation data for valid_loss, training data for train_loss), checked for every
    checkpoint against the first run's first checkpoint."""
    reference = runs[0].records[0].get("fingerprints") or {}
    problems: list[str] = []
    for kind in ("tokenizer", X_AXES[x]):
        for run in runs:
            for record in run.records:
                fp = record.get("fingerprints") or {}
                if fp.get(kind) == reference.get(kind) and fp.get(kind):
                    continue
                detail = _definition_diff((fp.get("definitions") or {}).get(kind),
                                          (reference.get("definitions") or {}).get(kind))
                problems.append(
                    f"{kind} fingerprint of {_describe(run)} at iteration "
                    f"{record.get('iteration')} is {str(fp.get(kind))[:12]}, but "
                    f"{_describe(runs[0])} has {str(reference.get(kind))[:12]} ({detail})")
                break  # one line per run and fingerprint
    return problems


# -- points ----------------------------------------------------------------------------------------
def metric_key(values: dict[str, Any], metric: str) -> str | None:
    """``metric,filter`` in a task's results: as given, else ``metric,none``, else the first
    filter that has it."""
    if "," in metric:
        return metric if metric in values else None
    if f"{metric},none" in values:
        return f"{metric},none"
    found = sorted(k for k in values if k.startswith(f"{metric},"))
    return found[0] if found else None


def higher_is_better(record: dict[str, Any], task: str, metric: str) -> bool:
    """lm-eval's higher_is_better for the metric, else False for Brier-like metrics."""
    name = metric.split(",")[0]
    value = ((record.get("higher_is_better") or {}).get(task) or {}).get(name)
    return bool(value) if isinstance(value, bool) else "brier" not in name


def _samples_stderr(run: RunEvals, record: dict[str, Any], task: str, key: str
                    ) -> float | None:
    name = (record.get("samples_files") or {}).get(task)
    metric, filt = key.split(",", 1)
    path = os.path.join(run.evals_dir, name) if name else None
    if not path or not os.path.isfile(path):
        return None
    values = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            value = _number((doc.get("metrics") or {}).get(metric))
            if value is not None and doc.get("filter", filt) == filt:
                values.append(value)
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def task_points(runs: list[RunEvals], task: str, metric: str, x: str,
                valid_dataset: str = "validation") -> tuple[list[Point], str | None]:
    """Every checkpoint of every run that has a loss and a score for `task`; and the
    ``metric,filter`` key used."""
    points, used = [], None
    for run in runs:
        for record in run.records:
            values = (record.get("results") or {}).get(task)
            key = metric_key(values or {}, metric)
            if key is None:
                continue
            used = used or key
            if x == "valid_loss":
                loss = _number((record.get("valid_loss") or {}).get(valid_dataset))
            else:
                loss = _number(record.get("train_loss"))
            score = _number(values.get(key))
            if loss is None or score is None:
                continue
            name, filt = key.split(",", 1)
            stderr = _number(values.get(f"{name}_stderr,{filt}"))
            source = "results stderr" if stderr is not None else None
            if stderr is None:
                stderr = _samples_stderr(run, record, task, key)
                source = "sample SE of the samples file" if stderr is not None else None
            points.append(Point(run.label, int(record.get("iteration", 0)),
                                record.get("consumed_tokens"), loss, score, stderr,
                                _number(values.get(f"{name}_random,{filt}")), source))
    return points, used


# -- statistics ------------------------------------------------------------------------------------
def correlations(points: list[Point]) -> dict[str, Any]:
    """Spearman and Pearson correlation of score with loss over the pooled checkpoints."""
    from scipy import stats

    out: dict[str, Any] = {"n": len(points), "spearman": None, "spearman_p": None,
                           "pearson": None, "pearson_p": None}
    losses, scores = [p.loss for p in points], [p.score for p in points]
    if len(points) < 3 or len(set(losses)) < 2 or len(set(scores)) < 2:
        return out
    rho, rho_p = stats.spearmanr(losses, scores)
    r, r_p = stats.pearsonr(losses, scores)
    out.update(spearman=float(rho), spearman_p=float(rho_p), pearson=float(r),
               pearson_p=float(r_p))
    return out


def beats_random(point: Point, higher_is_better: bool) -> bool:
    """The score is better than random by more than one standard error."""
    margin = point.score - point.random if higher_is_better else point.random - point.score
    return margin > point.stderr


def loss_threshold(points: list[Point], higher_is_better: bool) -> dict[str, Any]:
    """η (decision 3): the highest loss L such that the score beats random by more than 1 SE
    at L and at every lower-loss checkpoint of the pool; None if the lowest-loss one does not.

    ``status``: ``threshold`` (a higher-loss checkpoint fails), ``all`` (every checkpoint beats
    random: η is the highest loss seen, a lower bound), ``none``, or ``undetermined`` (a
    checkpoint lacks its standard error or random baseline)."""
    sources = sorted({p.se_source for p in points if p.se_source})
    out: dict[str, Any] = {"eta": None, "status": "none", "n_checkpoints": len(points),
                           "n_beating_random": 0, "se_source": ", ".join(sources) or None,
                           "rule": "highest loss L with score beating random by > 1 SE at L "
                                   "and at every lower-loss checkpoint (pooled runs)"}
    if not points:
        out["status"] = "undetermined"
        return out
    missing = [p for p in points if p.stderr is None or p.random is None]
    if missing:
        out["status"] = "undetermined"
        out["reason"] = (f"{len(missing)} checkpoint(s) lack a standard error or a random "
                         f"baseline (first: {missing[0].label} iteration {missing[0].iteration})")
        return out
    ordered = sorted(points, key=lambda p: p.loss)
    passing = [beats_random(p, higher_is_better) for p in ordered]
    out["n_beating_random"] = sum(passing)
    failing = [p.loss for p, ok in zip(ordered, passing) if not ok]
    if not failing:
        out.update(eta=ordered[-1].loss, status="all")
        return out
    below = [p.loss for p in ordered if p.loss < min(failing)]
    if below:
        out.update(eta=max(below), status="threshold")
    return out


# -- outputs ---------------------------------------------------------------------------------------
def plot_task(analysis: TaskAnalysis, x_label: str, note: str | None = None):
    """The task's score against loss, a line per run (error bars = stderr), x reversed so
    training moves right, random baseline and η marked. Returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for label in dict.fromkeys(p.label for p in analysis.points):
        mine = sorted((p for p in analysis.points if p.label == label), key=lambda p: p.iteration)
        ax.errorbar([p.loss for p in mine], [p.score for p in mine],
                    yerr=[p.stderr or 0.0 for p in mine], marker="o", markersize=3,
                    capsize=2, linewidth=1, label=label)
    randoms = [p.random for p in analysis.points if p.random is not None]
    if randoms:
        ax.axhline(sum(randoms) / len(randoms), color="grey", linestyle="--", linewidth=1,
                   label="random")
    if analysis.threshold.get("eta") is not None:
        ax.axvline(analysis.threshold["eta"], color="red", linestyle=":", linewidth=1,
                   label=f"η = {analysis.threshold['eta']:.4g} ({analysis.threshold['status']})")
    ax.invert_xaxis()
    ax.set_xlabel(f"← higher    {x_label}    lower →")
    direction = "higher" if analysis.higher_is_better else "lower"
    ax.set_ylabel(f"{analysis.metric} ({direction} is better)")
    title = f"{analysis.task}: {analysis.metric} against {x_label}"
    ax.set_title(title + (f"\nforced: {note}" if note else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _fmt(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}" if isinstance(value, float) \
        else str(value)


def markdown(analyses: list[TaskAnalysis], runs: list[RunEvals], x_label: str,
             forced: list[str]) -> str:
    lines = ["# Loss perspective", "", f"x-axis: {x_label}. Runs:", ""]
    lines += [f"- {run.label}: `{run.path}` ({len(run.records)} checkpoints)" for run in runs]
    if forced:
        lines += ["", "**Forced** (not comparable):", ""] + [f"- {p}" for p in forced]
    for a in analyses:
        t, c = a.threshold, a.correlations
        lines += ["", f"## {a.task} — {a.metric} "
                      f"({'higher' if a.higher_is_better else 'lower'} is better)", "",
                  f"η = {_fmt(t.get('eta'))} ({t.get('status')}; {t.get('n_checkpoints')} "
                  f"checkpoints pooled, {t.get('n_beating_random')} beat random by > 1 SE; "
                  f"SE: {t.get('se_source') or '—'}){'; ' + t['reason'] if t.get('reason') else ''}",
                  f"Spearman ρ = {_fmt(c.get('spearman'))} (p = {_fmt(c.get('spearman_p'), 2)}), "
                  f"Pearson r = {_fmt(c.get('pearson'))} (p = {_fmt(c.get('pearson_p'), 2)}), "
                  f"n = {c.get('n')}", "",
                  f"| run | iteration | tokens | {x_label} | {a.metric} | SE | random |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for p in sorted(a.points, key=lambda p: (p.label, p.iteration)):
            lines.append(f"| {p.label} | {p.iteration} | {_fmt(p.tokens)} | {p.loss:.4f} | "
                         f"{p.score:.4f} | {_fmt(p.stderr, 3)} | {_fmt(p.random, 4)} |")
    return "\n".join(lines) + "\n"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def analyse(paths: list[str], output_dir: str, *, tasks: list[str] | None = None,
            metric: str = "acc", x: str = "valid_loss", valid_dataset: str = "validation",
            force: bool = False) -> dict[str, Any]:
    """Write loss_perspective.md, loss_perspective.json and ``<task>_<metric>.png`` for the
    runs at `paths`; returns the JSON summary. Raises IncomparableRunsError unless `force`."""
    if x not in X_AXES:
        raise ConfigError(f"--x must be one of {sorted(X_AXES)}, got {x!r}")
    runs = [load_run(path) for path in paths]
    label_runs(runs)
    problems = fingerprint_differences(runs, x)
    if problems and not force:
        raise IncomparableRunsError(
            "these runs' losses are not on one axis:\n  " + "\n  ".join(problems) +
            "\n(give --force to plot them anyway; the plots are then labelled 'forced')")
    found = sorted({t for run in runs for r in run.records for t in (r.get("results") or {})})
    unknown = [t for t in tasks or [] if t not in found]
    if unknown:
        raise ConfigError(f"no results for task(s) {unknown}; the evals have {found}")
    x_label = f"held-out loss ({valid_dataset})" if x == "valid_loss" else "training loss"
    note = "; ".join(problems) if problems else None
    os.makedirs(output_dir, exist_ok=True)
    analyses = []
    for task in tasks or found:
        points, key = task_points(runs, task, metric, x, valid_dataset)
        if key is None:
            continue
        first = next(r for run in runs for r in run.records if task in (r.get("results") or {}))
        hib = higher_is_better(first, task, key)
        a = TaskAnalysis(task, key, hib, points, correlations(points),
                         loss_threshold(points, hib))
        analyses.append(a)
        fig = plot_task(a, x_label, note)
        fig.savefig(os.path.join(output_dir, f"{_safe(task)}_{_safe(key.split(',')[0])}.png"),
                    dpi=120)
    if not analyses:
        raise ConfigError(f"no task has the metric {metric!r} (with a {x}) in these evals")
    summary = {
        "x": x, "valid_dataset": valid_dataset if x == "valid_loss" else None,
        "runs": [{"label": r.label, "path": r.path, "checkpoints": len(r.records)}
                 for r in runs],
        "forced": problems, "tasks": {
            a.task: {"metric": a.metric, "higher_is_better": a.higher_is_better,
                     "correlations": a.correlations, "eta": a.threshold,
                     "points": [vars(p) for p in a.points]} for a in analyses}}
    with open(os.path.join(output_dir, "loss_perspective.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(output_dir, "loss_perspective.md"), "w") as handle:
        handle.write(markdown(analyses, runs, x_label, problems))
    return summary

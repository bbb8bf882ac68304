"""Continuous metrics of multiple-choice tasks from the choices' log-likelihoods lm-eval computed.

No extra forward pass: everything comes from the per-choice summed log-likelihoods that
lm-eval 0.4.13 keeps in ``results["samples"][task]`` (``simple_evaluate(..., log_samples=True)``).

Per document, with ``p = softmax(summed log-likelihoods)`` (``docs/evaluation.md``, "Metrics"):

- ``acc``: ``argmax(ll)`` is gold (first index wins a tie, as ``np.argmax`` in lm-eval);
- ``acc_norm``: the same with ``ll / len(choice)`` (characters, lm-eval's length normalisation);
- ``ccp``: CorrectChoiceProb ``p[gold]``; ``ccp_norm``: the same from ``softmax(ll / len)``;
- ``brier``: ``sum_j (y_j - p_j)^2`` (normalisation "sum": uniform ``p`` scores ``1 - 1/C``).

Per task: the mean over documents, the sample standard error over documents (ddof 1), the
random baseline (the uniform predictor's score averaged over the same documents, so tasks
whose documents have different numbers of choices are handled), and the normalised score
``(mean - random) / (best - random)`` (best 1, or 0 for Brier) with its standard error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

METRICS = ("acc", "acc_norm", "ccp", "ccp_norm", "brier")
BEST = {"acc": 1.0, "acc_norm": 1.0, "ccp": 1.0, "ccp_norm": 1.0, "brier": 0.0}
BRIER_NORMALISATION = "sum"
_SUFFIXES = ("", "_stderr", "_random", "_normalized", "_normalized_stderr")
_TOLERANCE = 1e-9


class NeedsTaskError(ValueError):
    """A task whose gold index only its task object can give (``multiple_input``)."""


def softmax(values: Sequence[float]) -> np.ndarray:
    """A numerically stable softmax; uniform if every value is -inf."""
    x = np.asarray(values, dtype=np.float64)
    top = np.max(x)
    if not np.isfinite(top):
        return np.full(len(x), 1.0 / len(x))
    e = np.exp(x - top)
    return e / e.sum()


def _gold_set(gold: int | Sequence[int], num_choices: int) -> list[int]:
    golds = [gold] if isinstance(gold, (int, np.integer)) else list(gold)
    if not golds or any(not 0 <= int(g) < num_choices for g in golds):
        raise ValueError(f"gold {gold!r} is not an index into {num_choices} choices")
    return sorted({int(g) for g in golds})


def document_metrics(lls: Sequence[float], choices: Sequence[str] | Sequence[int],
                     gold: int | Sequence[int]) -> dict[str, float]:
    """One document's metrics and their uniform-random values (keys ``<m>`` and ``<m>_random``).

    ``choices`` are the choice strings (lengths in characters, as lm-eval counts them) or the
    lengths themselves; ``gold`` an index or, for multiple-target tasks, a list of indices.
    """
    num = len(lls)
    if num == 0 or len(choices) != num:
        raise ValueError(f"{num} log-likelihoods for {len(choices)} choices")
    golds = _gold_set(gold, num)
    ll = np.asarray(lls, dtype=np.float64)
    lengths = np.array([float(c) if isinstance(c, (int, float, np.number)) else float(len(c))
                        for c in choices])
    ll_norm = ll / lengths
    p = softmax(ll)
    y = np.zeros(num)
    y[golds] = 1.0
    chance = len(golds) / num
    return {
        "acc": float(int(np.argmax(ll)) in golds),
        "acc_norm": float(int(np.argmax(ll_norm)) in golds),
        "ccp": float(p[golds].sum()),
        "ccp_norm": float(softmax(ll_norm)[golds].sum()),
        "brier": float(np.sum((y - p) ** 2)),
        "acc_random": chance,
        "acc_norm_random": chance,
        "ccp_random": chance,
        "ccp_norm_random": chance,
        "brier_random": float(np.sum((y - 1.0 / num) ** 2)),
    }


def sample_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample standard deviation (ddof 1) over sqrt(n); NaN if n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return math.nan
    return float(np.std(x, ddof=1) / math.sqrt(len(x)))


def aggregate(per_document: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Task-level ``<m>``, ``<m>_stderr``, ``<m>_random``, ``<m>_normalized`` and
    ``<m>_normalized_stderr`` for every metric, plus ``num_docs``. Undefined values are NaN."""
    out: dict[str, float] = {"num_docs": len(per_document)}
    for m in METRICS:
        values = [d[m] for d in per_document]
        mean = float(np.mean(values)) if values else math.nan
        random = float(np.mean([d[f"{m}_random"] for d in per_document])) if values else math.nan
        stderr = sample_stderr(values)
        span = BEST[m] - random
        defined = values and abs(span) > _TOLERANCE
        out[m] = mean
        out[f"{m}_stderr"] = stderr
        out[f"{m}_random"] = random
        out[f"{m}_normalized"] = (mean - random) / span if defined else math.nan
        out[f"{m}_normalized_stderr"] = stderr / abs(span) if defined else math.nan
    return out


def metrics_from_choices(
    docs: Sequence[tuple[Sequence[float], Sequence[str] | Sequence[int], int | Sequence[int]]],
) -> dict[str, float]:
    """Task metrics from ``(log-likelihoods, choices or their lengths, gold)`` per document."""
    return aggregate([document_metrics(lls, choices, gold) for lls, choices, gold in docs])


# -- lm-eval's in-memory results ----------------------------------------------------------------

def _loglikelihood(resp: Any) -> float:
    """The log-likelihood of one filtered response: ``(ll, is_greedy)`` (or ``[(ll, g)]``)."""
    while isinstance(resp, (list, tuple)) and resp and isinstance(resp[0], (list, tuple)):
        resp = resp[0]
    return float(resp[0] if isinstance(resp, (list, tuple)) else resp)


def _flatten_tasks(task_dict: Mapping | None) -> dict[str, Any]:
    """``{task name: Task}`` from a (possibly nested) ``get_task_dict`` result."""
    found: dict[str, Any] = {}
    for key, value in (task_dict or {}).items():
        if isinstance(value, Mapping):
            found.update(_flatten_tasks(value))
        elif hasattr(value, "config"):
            found[getattr(value.config, "task", None) or str(key)] = value
    return found


def _resolve_gold(target: Any, choices: Sequence[str]) -> int | list[int]:
    """lm-eval's gold: an index, a choice string, or a list of indices (multiple targets)."""
    if isinstance(target, str):
        if target not in choices:
            raise ValueError(f"target {target!r} is not one of the choices")
        return list(choices).index(target)
    if isinstance(target, (list, tuple)):
        return [int(t) for t in target]
    return int(target)


def sample_choices(sample: Mapping, config: Mapping, task: Any = None
                   ) -> tuple[list[float], list[str], int | list[int]]:
    """``(log-likelihoods, choice strings, gold)`` of one logged lm-eval sample.

    Without the task object the choices are the requests' continuations less the task's
    ``target_delimiter``; tasks whose contexts differ per choice (``multiple_input``, e.g.
    WinoGrande) keep their gold in ``doc_to_text`` and need the task object.
    """
    args = [tuple(a) for a in sample["arguments"]]
    lls = [_loglikelihood(r) for r in sample["filtered_resps"]]
    names = {m.get("metric") for m in config.get("metric_list") or [] if isinstance(m, Mapping)}
    if "acc_mutual_info" in names and len(args) % 2 == 0:  # unconditional half appended
        args, lls = args[: len(args) // 2], lls[: len(lls) // 2]
    doc = sample["doc"]
    if task is not None:
        choices = list(task.doc_to_choice(doc))
        target = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        return lls, choices, _resolve_gold(target, choices)
    if len({a[0] for a in args}) > 1:
        raise NeedsTaskError("the choices have different contexts (multiple_input): the gold "
                             "index needs the task object (add_continuous_metrics(..., "
                             "task_dict))")
    delimiter = config.get("target_delimiter", " ")
    continuations = [a[1] for a in args]
    if delimiter and all(c.startswith(delimiter) for c in continuations):
        continuations = [c[len(delimiter):] for c in continuations]
    return lls, continuations, _resolve_gold(sample["target"], continuations)


def _result_value(value: float) -> float | str:
    return "N/A" if math.isnan(value) else value


def add_continuous_metrics(results: dict, task_dict: Mapping | None = None) -> dict:
    """Add the continuous metrics of every ``multiple_choice`` task to ``results["results"]``.

    ``results`` is ``lm_eval.simple_evaluate(..., log_samples=True)``'s return value (in memory,
    not the sample files: those hold responses as strings). For each filter ``f`` (usually
    ``none``) it sets ``<m>,f``, ``<m>_stderr,f``, ``<m>_random,f``, ``<m>_normalized,f`` and
    ``<m>_normalized_stderr,f`` for ``m`` in :data:`METRICS`, plus ``brier_normalisation``
    ("sum") and ``num_docs_scored``; undefined values are ``"N/A"``. Where lm-eval already
    reports ``acc``/``acc_norm`` and our recomputation disagrees (a task with its own
    ``process_results``), lm-eval's keys are kept and a warning logged. Other tasks are
    untouched. ``task_dict`` (``lm_eval.tasks.get_task_dict``) is needed only by tasks whose
    contexts differ per choice; without it they are skipped with a warning, as is everything
    when the results hold no ``samples`` (``log_samples=False``). Returns ``results`` (changed
    in place); ``None`` (non-zero ranks) passes through.
    """
    if results is None:
        return results
    configs = results.get("configs", {})
    tasks = _flatten_tasks(task_dict)
    for name, config in configs.items():
        if config.get("output_type") != "multiple_choice" or name not in results.get("results", {}):
            continue
        if "samples" not in results:
            logger.warning("no samples in the results (log_samples=False): no continuous "
                           "metrics for %s", name)
            continue
        if name not in results["samples"]:
            raise ValueError(f"no samples for task {name!r} among the results' samples")
        by_filter: dict[str, list[dict[str, float]]] = {}
        doc_ids: set = set()
        skipped = 0
        try:
            for sample in results["samples"][name]:
                try:
                    lls, choices, gold = sample_choices(sample, config, tasks.get(name))
                    scores = document_metrics(lls, choices, gold)
                except NeedsTaskError:
                    raise
                except ValueError as err:
                    skipped += 1
                    logger.warning("%s: document %s not scored: %s", name,
                                   sample.get("doc_id"), err)
                    continue
                by_filter.setdefault(sample.get("filter", "none"), []).append(scores)
                doc_ids.add(sample.get("doc_id"))
        except NeedsTaskError as err:
            logger.warning("%s: continuous metrics skipped: %s", name, err)
            continue
        entry = results["results"][name]
        for filter_key, per_doc in by_filter.items():
            _write_task(name, entry, aggregate(per_doc), filter_key)
        entry["brier_normalisation"] = BRIER_NORMALISATION
        entry["num_docs_scored"] = len(doc_ids)
        if skipped:
            logger.warning("%s: %d document(s) not scored", name, skipped)
    return results


def _write_task(name: str, entry: dict, scores: Mapping[str, float], filter_key: str) -> None:
    for m in METRICS:
        reported = entry.get(f"{m},{filter_key}")
        if isinstance(reported, (int, float)) and not abs(reported - scores[m]) <= _TOLERANCE:
            logger.warning("%s: lm-eval reports %s=%s but the log-likelihoods give %s; keeping "
                           "lm-eval's value and writing no continuous %s keys", name, m,
                           reported, scores[m], m)
            continue
        for suffix in _SUFFIXES:
            entry[f"{m}{suffix},{filter_key}"] = _result_value(scores[f"{m}{suffix}"])

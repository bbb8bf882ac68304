"""Evaluate every checkpoint of a run with lm-eval, resumably (docs/evaluation.md).

Per checkpoint ``<out>/iter_0000100.json`` holds lm-eval's results dict (``samples`` moved
to ``samples_<task>_iter_0000100.jsonl``, with mc_metrics' continuous metrics) plus
``iteration``, ``consumed_tokens``, ``train_loss``, ``valid_loss`` (per validation dataset,
computed here on the run's fixed validation slice), ``fingerprints``, ``run`` and ``sweep``
(the settings, whose hash decides whether a checkpoint is already done). Every file is
written atomically; the JSON is written last, so its presence marks a finished checkpoint.
``<out>/evals.jsonl`` gets one flat line per evaluated checkpoint (append-only).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ConfigError
from ..fileio import atomic_write_text
from ..training.checkpointing import CHECKPOINT_FILE, CONFIG_FILE, iteration_dir
from ..training.config import RunConfig

EVAL_FORMAT = "megatron-latent checkpoint eval"
EVAL_VERSION = 1
SERIES_FILE = "evals.jsonl"
_ITER_NAME = re.compile(r"iter_(\d{7,})")
_TASK_FILE_SUFFIXES = (".yaml", ".yml", ".py")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# -- small file helpers ------------------------------------------------------------------------
def _json_default(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    try:
        return value.item()  # numpy and torch scalars
    except (AttributeError, TypeError, ValueError):
        return str(value)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Records of a JSONL file; unparsable lines (a line cut by a crash) are skipped."""
    out = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return [record for record in out if isinstance(record, dict)]


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    """Append one line; a partial last line left by a crash is cut off first."""
    if os.path.isfile(path) and os.path.getsize(path):
        with open(path, "rb+") as handle:
            data = handle.read()
            if not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=_json_default, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _sha256_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(float(value))


# -- the run's checkpoints and records ---------------------------------------------------------
def list_checkpoints(run_dir: str) -> list[int]:
    """Iterations of the complete ``iter_*`` checkpoints (with config.json) under `run_dir`."""
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir} is not a directory")
    found = []
    for name in os.listdir(run_dir):
        match = _ITER_NAME.fullmatch(name)
        if match and os.path.isfile(os.path.join(run_dir, name, CONFIG_FILE)):
            found.append(int(match.group(1)))
    if not found:
        raise ConfigError(f"{run_dir} holds no iter_* checkpoints (is it a --save directory?)")
    return sorted(found)


def select_iterations(available: list[int], every: int | None = None,
                      iterations: Iterable[int] | None = None) -> list[int]:
    """The checkpoints to evaluate: all, every N-th iteration, or an explicit list."""
    chosen = list(available)
    if iterations:
        wanted = sorted(set(iterations))
        missing = [i for i in wanted if i not in available]
        if missing:
            raise ConfigError(f"no checkpoint for iteration(s) {missing}; the run has "
                              f"{available}")
        chosen = wanted
    if every:
        if every < 1:
            raise ConfigError(f"--every must be >= 1, got {every}")
        chosen = [i for i in chosen if i % every == 0]
        if not chosen:
            raise ConfigError(f"--every {every}: no checkpoint iteration is a multiple of "
                              f"{every} (the run has {available})")
    return chosen


def read_train_state(run_dir: str, iteration: int) -> dict[str, Any]:
    """The progress counters stored in a checkpoint (its first model-parallel shard)."""
    directory = iteration_dir(run_dir, iteration)
    shards = sorted(n for n in os.listdir(directory) if n.startswith("mp_rank_"))
    if not shards:
        raise ConfigError(f"{directory} holds no mp_rank_* shard directories")
    path = os.path.join(directory, shards[0], CHECKPOINT_FILE)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ConfigError(f"cannot read checkpoint file {path}: {error}") from error
    return dict(payload.get("train_state") or {"iteration": iteration})


def read_run_config(run_dir: str, iteration: int) -> RunConfig:
    with open(os.path.join(iteration_dir(run_dir, iteration), CONFIG_FILE)) as handle:
        return RunConfig.from_dict(json.load(handle))


def metrics_path(run_dir: str, run: RunConfig) -> str:
    return run.logging.metrics_file or os.path.join(run_dir, "metrics.jsonl")


def train_loss_at(records: list[dict[str, Any]], iteration: int, log_interval: int
                  ) -> tuple[float | None, str]:
    """The train record's ``lm_loss`` at `iteration` (the last one, if a resumed run logged it
    twice), which the trainer logs as the mean over the log interval ending there."""
    hits = [r for r in records if r.get("kind") == "train" and r.get("iteration") == iteration]
    if not hits or not _is_number(hits[-1].get("lm_loss")):
        return None, f"no train record at iteration {iteration} in metrics.jsonl"
    return float(hits[-1]["lm_loss"]), (
        f"metrics.jsonl train record at iteration {iteration}: mean lm_loss over the "
        f"{log_interval} iteration(s) of the log interval ending there")


def logged_valid_losses(records: list[dict[str, Any]], iteration: int) -> dict[str, float]:
    """The trainer's validation records at `iteration` (name -> lm_loss), last one wins."""
    out = {}
    for record in records:
        kind = str(record.get("kind", ""))
        if record.get("iteration") == iteration and kind.startswith("validation") and \
                _is_number(record.get("lm_loss")):
            out[kind.split("/", 1)[1] if "/" in kind else "validation"] = \
                float(record["lm_loss"])
    return out


# -- held-out loss on the run's validation slice ------------------------------------------------
def validation_sets(run: RunConfig, tokenizer) -> list[tuple[str, list[dict]]]:
    """The trainer's validation micro-batches for `run`, the same fixed slice: for GPT data
    (training.data.build_run_datasets) ``("validation", blend)`` and, for a blend of several
    datasets, ``(basename, dataset)`` per component; for a method with its own data, what its
    `validation()` gives. [] without validation data."""
    from ..arguments import method_options
    from ..methods.registry import get_method
    from ..training.data import build_run_datasets, valid_batches

    spec = get_method(run.method)
    if spec.build_data is not None:
        data = spec.build_data(run, tokenizer, method_options(run), 0, 0,
                               run.training.total_iters())
        return [(name, batches) for name, batches in data.validation() if batches]
    _, sets = build_run_datasets(run, tokenizer, run.training.total_iters())
    return [(name if name == "validation" else os.path.basename(name),
             valid_batches(run, dataset)) for name, dataset in sets]


@torch.no_grad()
def heldout_losses(model: torch.nn.Module, run: RunConfig, valid_sets: list[tuple[str, Any]],
                   device: torch.device) -> dict[str, float]:
    """Per-token mean LM loss of `model` on each validation set, over the same micro-batches
    (`validation_sets`) and loss mask as the trainer's evaluation."""
    from megatron.core import parallel_state

    from ..methods.registry import get_method
    from ..training.engines.base import model_inputs, split_model_output

    spec = get_method(run.method)
    model.eval()
    out = {}
    for name, batches in valid_sets:
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in batches:
            if spec.model_inputs is not None:
                inputs = spec.model_inputs(batch, device)
            else:
                inputs = model_inputs(batch, device, run.data.reset_attention_mask,
                                      run.data.reset_position_ids)
            per_token, _ = split_model_output(model(**inputs))
            mask = batch["loss_mask"].to(device, torch.float32)
            sums[0] += (per_token.float() * mask).sum().double()
            sums[1] += mask.sum().double()
        if torch.distributed.is_initialized() and \
                parallel_state.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        if sums[1].item() > 0:
            out[name] = sums[0].item() / sums[1].item()
    return out


# -- fingerprints --------------------------------------------------------------------------------
def _files_of(prefixes: Iterable[str]) -> list[list[Any]]:
    files = []
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            path = prefix + suffix
            files.append([os.path.basename(path),
                          os.path.getsize(path) if os.path.isfile(path) else None])
    return files


def fingerprints(run: RunConfig, tokenizer) -> dict[str, Any]:
    """SHA-256 of the tokenizer (its vocabulary, data/provenance.py) and of the validation and
    training data (file names and sizes, and the definition of the sample slice)."""
    from ..data.provenance import tokenizer_fingerprint
    from ..training.data import data_config

    fp = tokenizer_fingerprint(tokenizer)
    tokenizer_def = {"vocab_size": fp.vocab_size, "eod": fp.eod, "vocab_sha256": fp.vocab_sha256}
    config = data_config(run)
    common = {"seq_length": run.model.seq_length,
              "mock_data": config.mock_data, "eod_mask_loss": config.eod_mask_loss,
              "reset_position_ids": config.reset_position_ids,
              "reset_attention_mask": config.reset_attention_mask}
    if config.data_path:
        valid_blend = train_blend = list(config.data_path)
        common["split"] = config.split
    else:
        valid_blend, train_blend = config.valid_data_path, config.train_data_path
    valid_def = dict(common, blend=[os.path.basename(str(e)) for e in valid_blend or []],
                     files=_files_of(p for p in _prefixes(valid_blend)), seed=run.training.seed,
                     samples=run.evaluation.eval_iters * run.training.global_batch_size)
    train_def = dict(common, blend=[os.path.basename(str(e)) for e in train_blend or []],
                     files=_files_of(p for p in _prefixes(train_blend)))
    return {
        "tokenizer": fp.vocab_sha256 or _sha256_json(tokenizer_def),
        "validation_data": _sha256_json(valid_def),
        "training_data": _sha256_json(train_def),
        "definitions": {"tokenizer": tokenizer_def, "validation_data": valid_def,
                        "training_data": train_def},
    }


def _prefixes(blend: list[str] | None) -> list[str]:
    from ..data.datasets import parse_blend

    return parse_blend(blend)[0] if blend else []


# -- lm-eval results: samples files, continuous metrics of groups ------------------------------
def sample_record(sample: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """One line of a samples file: per-choice numeric log-likelihoods (with the choices and
    the gold index) for loglikelihood tasks, the responses otherwise, and per-document
    metric values."""
    from .mc_metrics import sample_choices

    record = {key: sample.get(key) for key in ("doc_id", "doc", "target", "filter",
                                               "doc_hash", "prompt_hash", "target_hash")}
    try:
        lls, choices, gold = sample_choices(sample, config)
        record.update(choices=choices, loglikelihoods=lls, gold=gold,
                      is_greedy=[bool(r[1]) if isinstance(r, (list, tuple)) and len(r) > 1
                                 else None for r in sample["filtered_resps"]])
    except (KeyError, TypeError, ValueError, IndexError):
        record["resps"] = sample.get("filtered_resps")
    record["metrics"] = {name: sample.get(name) for name in sample.get("metrics") or []
                         if _is_number(sample.get(name))}
    return record


def add_group_metrics(results: dict[str, Any]) -> None:
    """Continuous metrics (mc_metrics: value, stderr, random baseline, normalised) for groups
    whose reported score is the document-pooled mean of their multiple-choice subtasks (size-
    weighted groups such as mmlu); keys already reported with a number are kept."""
    from .mc_metrics import METRICS, aggregate, document_metrics, sample_choices

    subtasks, samples = results.get("group_subtasks") or {}, results.get("samples") or {}
    configs = results.get("configs") or {}

    def leaves(name: str, depth: int = 0) -> list[str]:
        if not subtasks.get(name) or depth > 16:
            return [name]
        return [leaf for child in subtasks[name] for leaf in leaves(child, depth + 1)]

    for group in [name for name, children in subtasks.items() if children]:
        entry = (results.get("results") or {}).get(group)
        members = leaves(group)
        if entry is None or not all(m in samples and m in configs and
                                    configs[m].get("output_type") == "multiple_choice"
                                    for m in members):
            continue
        by_filter: dict[str, list[dict[str, float]]] = {}
        try:
            for member in members:
                for sample in samples[member]:
                    scores = document_metrics(*sample_choices(sample, configs[member]))
                    by_filter.setdefault(sample.get("filter", "none"), []).append(scores)
        except (KeyError, TypeError, ValueError, IndexError):
            continue
        for filt, docs in by_filter.items():
            pooled = aggregate(docs)
            reported = [m for m in METRICS if _is_number(entry.get(f"{m},{filt}"))]
            if not reported or any(abs(entry[f"{m},{filt}"] - pooled[m]) > 1e-6
                                   for m in reported):
                continue  # not a size-weighted mean of its documents
            for key, value in pooled.items():
                name = f"{key},{filt}"
                if key != "num_docs" and not _is_number(entry.get(name)) and \
                        math.isfinite(value):
                    entry[name] = value


def flat_line(record: dict[str, Any]) -> dict[str, Any]:
    """The evals.jsonl line of one checkpoint's record."""
    line = {"iteration": record["iteration"], "consumed_tokens": record.get("consumed_tokens"),
            "train_loss": record.get("train_loss"),
            "settings_sha256": record["sweep"]["settings_sha256"],
            "time": record["sweep"].get("finished")}
    for name, loss in (record.get("valid_loss") or {}).items():
        line[f"valid_loss/{name}"] = loss
    for task, values in (record.get("results") or {}).items():
        for key, value in values.items():
            if "," in key and _is_number(value):
                line[f"{task}/{key}"] = value
    return line


# -- the sweep -----------------------------------------------------------------------------------
@dataclass
class SweepSettings:
    """What decides the scores; a checkpoint is done when its JSON has the same settings."""

    tasks: list[str]
    num_fewshot: int | None = None
    limit: float | None = None
    include_path: str | None = None
    seed: int = 1234
    dtype: str | None = None
    #: Seed of the held-out slice (the validation samples' order); None: the run's own seed,
    #: i.e. the slice its training logs scored. Runs trained with different seeds share one
    #: held-out set, and one loss axis, only when they are swept with the same value here.
    heldout_seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        include = os.path.abspath(self.include_path) if self.include_path else None
        return {"tasks": sorted(self.tasks), "num_fewshot": self.num_fewshot,
                "limit": self.limit, "include_path": include,
                "task_files_sha256": task_files_sha256(include), "seed": self.seed,
                "dtype": self.dtype, "heldout_seed": self.heldout_seed, **self.extra}


def task_files_sha256(include_path: str | None) -> str | None:
    """SHA-256 over the task YAMLs and Python files under `include_path` (names + bytes)."""
    if not include_path:
        return None
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(include_path):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(_TASK_FILE_SUFFIXES):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, include_path).encode() + b"\0")
                with open(path, "rb") as handle:
                    digest.update(handle.read() + b"\0")
    return digest.hexdigest()


def check_tasks(tasks: list[str], include_path: str | None) -> None:
    """Refuse unknown task names before any checkpoint is loaded (the runner's TaskManager)."""
    import difflib

    from .runner import task_manager

    if not tasks:
        raise ConfigError("give at least one task (--tasks)")
    if include_path and not os.path.isdir(include_path):
        raise ConfigError(f"--include-path {include_path} is not a directory")
    manager = task_manager(list(tasks), include_path)
    known = set(manager.all_tasks)
    for task in tasks:
        if task in known or os.path.isfile(task) or manager.match_tasks([task]):
            continue
        close = difflib.get_close_matches(task, sorted(known), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = f" (lm-eval's tasks and {include_path})" if include_path else \
            " (lm-eval's tasks)"
        raise ConfigError(f"unknown task {task!r}{where}{hint}")


def is_done(path: str, settings_sha: str) -> bool:
    """Whether `path` holds a finished evaluation made with the same settings."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return False
    return (record.get("sweep") or {}).get("settings_sha256") == settings_sha


EvaluateFn = Callable[..., dict[str, Any] | None]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def sweep(run_dir: str, settings: SweepSettings, *, output_dir: str | None = None,
          every: int | None = None, iterations: Iterable[int] | None = None,
          batch_size: int = 8, tensor_model_parallel_size: int = 1,
          device: torch.device | None = None, evaluate_fn: EvaluateFn | None = None,
          check_task_names: bool = True, log: Callable[[str], None] = print
          ) -> list[int]:
    """Evaluate the run's checkpoints that are not done yet; returns the iterations evaluated.

    `evaluate_fn` defaults to megatron_latent.evaluation.runner.evaluate (tests inject one).
    """
    run_dir = os.path.abspath(run_dir)
    available = list_checkpoints(run_dir)
    chosen = select_iterations(available, every, iterations)
    output_dir = os.path.abspath(output_dir or os.path.join(run_dir, "evals"))
    if check_task_names:
        check_tasks(settings.tasks, settings.include_path)
    if evaluate_fn is None:
        from .runner import evaluate as evaluate_fn
    context = _RunContext(run_dir, device, tensor_model_parallel_size, settings.dtype,
                          settings.heldout_seed)
    settings = dataclasses.replace(settings, dtype=context.dtype_name)
    settings_dict = settings.to_dict()
    settings_sha = _sha256_json(settings_dict)
    writer = _rank() == 0
    if writer:
        os.makedirs(output_dir, exist_ok=True)
    series = os.path.join(output_dir, SERIES_FILE)
    logged = {(r.get("iteration"), r.get("settings_sha256")) for r in read_jsonl(series)}
    todo = [i for i in chosen if not is_done(_json_path(output_dir, i), settings_sha)]
    log(f"> {run_dir}: {len(chosen)} checkpoint(s) selected, {len(chosen) - len(todo)} done "
        f"earlier, {len(todo)} to evaluate on {', '.join(settings.tasks)} -> {output_dir}")
    evaluated = []
    for position, iteration in enumerate(chosen, 1):
        tag = f"[{position}/{len(chosen)}] iter_{iteration:07d}"
        path = _json_path(output_dir, iteration)
        if iteration not in todo:
            if writer and (iteration, settings_sha) not in logged:  # crashed before appending
                with open(path, encoding="utf-8") as handle:
                    append_jsonl(series, flat_line(json.load(handle)))
            log(f"{tag}: done earlier ({os.path.basename(path)}), skipped")
            continue
        started = time.time()
        log(f"{tag}: evaluating")
        loaded = context.load(iteration)  # one load: the held-out loss, then the tasks
        record = context.checkpoint_record(iteration, loaded)
        results = evaluate_fn(
            load=run_dir, tasks=list(settings.tasks), iteration=iteration,
            tensor_model_parallel_size=tensor_model_parallel_size,
            num_fewshot=settings.num_fewshot, limit=settings.limit, batch_size=batch_size,
            include_path=settings.include_path, device=str(context.device),
            dtype=context.dtype_name, seed=settings.seed, log_samples=True, loaded=loaded)
        del loaded
        context.release()
        if not results or not writer:  # results live on global rank 0 only
            evaluated.append(iteration)
            continue
        record = _write_checkpoint(output_dir, iteration, results, record,
                                   dict(settings=settings_dict, settings_sha256=settings_sha,
                                        started=started, finished=time.time()))
        append_jsonl(series, flat_line(record))
        evaluated.append(iteration)
        log(f"{tag}: {_summary(record)} | {time.time() - started:.1f}s -> "
            f"{os.path.basename(path)}")
    return evaluated


def _json_path(output_dir: str, iteration: int) -> str:
    return os.path.join(output_dir, f"iter_{iteration:07d}.json")


def _write_checkpoint(output_dir: str, iteration: int, results: dict[str, Any],
                      record: dict[str, Any], sweep_info: dict[str, Any]) -> dict[str, Any]:
    from .mc_metrics import add_continuous_metrics

    if not any("_random," in key for values in (results.get("results") or {}).values()
               for key in values):
        try:
            add_continuous_metrics(results)  # the runner did not add them
        except ValueError as error:
            print(f"WARNING: no continuous metrics for iteration {iteration}: {error}")
    add_group_metrics(results)
    configs = results.get("configs") or {}
    files = {}
    for task, items in (results.get("samples") or {}).items():
        name = f"samples_{re.sub(r'[^A-Za-z0-9_.-]+', '_', task)}_iter_{iteration:07d}.jsonl"
        atomic_write_text(os.path.join(output_dir, name), "".join(
            json.dumps(sample_record(s, configs.get(task) or {}), default=_json_default) + "\n"
            for s in items))
        files[task] = name
    out = {k: v for k, v in results.items() if k != "samples"}
    if "lm_eval_version" not in out:
        from importlib.metadata import version

        out["lm_eval_version"] = version("lm_eval")
    out.update(record, samples_files=files,
               sweep=dict(sweep_info, format=EVAL_FORMAT, version=EVAL_VERSION))
    atomic_write_text(_json_path(output_dir, iteration),
                      json.dumps(out, indent=2, default=_json_default, sort_keys=True))
    return out


def _summary(record: dict[str, Any]) -> str:
    parts = [f"valid_loss {name}={loss:.4f}" for name, loss in
             (record.get("valid_loss") or {}).items() if loss is not None]
    for task, values in (record.get("results") or {}).items():
        for key in ("acc,none", "acc_norm,none"):
            if _is_number(values.get(key)):
                parts.append(f"{task} {key.split(',')[0]}={values[key]:.4f}")
    return " | ".join(parts) or "no scores"


class _RunContext:
    """What the sweep reads once per run: config, tokenizer, validation data, fingerprints."""

    def __init__(self, run_dir: str, device: torch.device | None, tp: int, dtype: str | None,
                 heldout_seed: int | None = None):
        from ..inference.loading import inference_dtype

        self.run_dir, self.tp, self.heldout_seed = run_dir, tp, heldout_seed
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = DTYPES[dtype] if dtype else inference_dtype(self.device)
        self.dtype_name = {v: k for k, v in DTYPES.items()}[self.dtype]
        self._prepared = False

    def _prepare(self, iteration: int) -> None:
        from ..distributed import ParallelConfig, initialize_parallel
        from ..training.data import build_run_tokenizer

        self.run = read_run_config(self.run_dir, iteration)
        self.tokenizer = build_run_tokenizer(self.run)
        # Process groups first: every rank then builds the datasets as in training.
        self.device = initialize_parallel(ParallelConfig(tensor_model_parallel_size=self.tp),
                                          self.device, seed=self.run.training.seed)
        heldout_run = self.run
        if self.heldout_seed is not None:
            heldout_run = dataclasses.replace(self.run, training=dataclasses.replace(
                self.run.training, seed=self.heldout_seed))
        self.fingerprints = fingerprints(heldout_run, self.tokenizer)
        self.records = read_jsonl(metrics_path(self.run_dir, self.run))
        try:
            self.valid_sets = validation_sets(heldout_run, self.tokenizer)
            self.valid_problem = None if self.valid_sets else "the run has no validation data"
        except ConfigError as error:
            self.valid_sets, self.valid_problem = [], str(error)
        self._prepared = True

    def load(self, iteration: int):
        """The checkpoint, loaded once for everything the sweep scores (held-out loss, tasks)."""
        from ..inference.loading import load_model_for_inference

        if not self._prepared:
            self._prepare(iteration)
        return load_model_for_inference(self.run_dir, iteration, self.tp, self.device,
                                        dtype=self.dtype)

    def release(self) -> None:
        """Return a dropped checkpoint's memory before the next one is loaded."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def checkpoint_record(self, iteration: int, loaded) -> dict[str, Any]:
        """iteration, tokens, train and held-out losses, fingerprints, run description."""
        if not self._prepared:
            self._prepare(iteration)
        state = read_train_state(self.run_dir, iteration)
        train_loss, train_source = train_loss_at(self.records, iteration,
                                                 self.run.logging.log_interval)
        if self.valid_sets:
            valid, valid_source = heldout_losses(
                loaded.model, self.run, self.valid_sets, self.device), (
                f"computed by the sweep on the run's validation slice "
                f"({self.run.evaluation.eval_iters} x {self.run.training.global_batch_size} "
                f"samples per dataset, {self.dtype_name})")
        else:
            valid = logged_valid_losses(self.records, iteration) or None
            valid_source = (f"{self.valid_problem}: metrics.jsonl validation records at "
                            f"iteration {iteration}" if valid else
                            f"{self.valid_problem}; no metrics.jsonl validation record at "
                            f"iteration {iteration}")
        model = self.run.model
        return {
            "iteration": iteration,
            "consumed_tokens": state.get("consumed_tokens"),
            "consumed_samples": state.get("consumed_train_samples"),
            "train_loss": train_loss, "train_loss_source": train_source,
            "valid_loss": valid, "valid_loss_source": valid_source,
            "fingerprints": self.fingerprints,
            "run": {"run_dir": self.run_dir, "method": self.run.method,
                    "method_args": self.run.method_args, "preset": self.run.preset,
                    "num_layers": model.num_layers, "hidden_size": model.hidden_size,
                    "num_attention_heads": model.num_attention_heads,
                    "seq_length": model.seq_length},
        }

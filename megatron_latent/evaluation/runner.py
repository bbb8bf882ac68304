"""One call to evaluate a checkpoint with lm-evaluation-harness, offline and reproducibly."""

from __future__ import annotations

import os
from typing import Any

from ..config import ConfigError

_OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def _go_offline() -> None:
    """HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 unless the environment says otherwise
    (also in `datasets`/`huggingface_hub` if they were imported before the variables)."""
    unset = [name for name in _OFFLINE if name not in os.environ]
    for name in unset:
        os.environ[name] = "1"
    import sys

    if "HF_DATASETS_OFFLINE" in unset and "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_DATASETS_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
    if "HF_HUB_OFFLINE" in unset and "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's TaskManager over `include_path` alone when it holds every task, else with
    lm-eval's built-in tasks as well (scanning their ~15k configs takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in manager.all_tasks for task in tasks):
            return manager
    return TaskManager(include_path=include_path)


def evaluate(
    load: str,
    tasks: list[str],
    *,
    iteration: int | None = None,
    tensor_model_parallel_size: int = 1,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 1234,
    log_samples: bool = True,
    extra_model_args: dict | None = None,
    loaded=None,
) -> dict:
    """lm-eval's results dict for checkpoint `load` on `tasks` (``samples`` included when
    `log_samples`), plus ``lm_eval_version``; continuous multiple-choice metrics are added
    when ``megatron_latent.evaluation.mc_metrics`` is available.

    Runs `lm_eval.simple_evaluate` with the ``megatron_latent`` backend, ``bootstrap_iters=0``
    and every seed set to `seed`, offline. Under torchrun every rank must call it; the
    results come back on the rank lm-eval reports on (global rank 0) and ``{}`` elsewhere.
    `extra_model_args` go to the backend (e.g. ``max_length``, ``tokenizer_model``).
    `loaded` (inference.loading.LoadedModel of `load` at `iteration`): score that model
    instead of loading the checkpoint again.
    """
    _go_offline()
    import lm_eval

    from . import lm_backend  # noqa: F401  (registers the "megatron_latent" model)

    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    model_args: dict[str, Any] = {"load": str(load),
                                  "tensor_model_parallel_size": tensor_model_parallel_size}
    if iteration is not None:
        model_args["iteration"] = iteration
    if dtype is not None:
        model_args["dtype"] = dtype
    model_args.update(extra_model_args or {})
    manager = task_manager(list(tasks), include_path)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks
               if t not in known and not os.path.isfile(t) and not manager.match_tasks([t])]
    if unknown:
        where = f" in {include_path} or" if include_path else ""
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}: not found{where} among "
                          "lm-eval's tasks")
    model: Any = "megatron_latent"
    if loaded is not None:
        extra = {k: v for k, v in model_args.items()
                 if k not in ("load", "iteration", "tensor_model_parallel_size", "dtype")}
        model = lm_backend.MegatronLatentLM(load=str(load), loaded=loaded,
                                            batch_size=batch_size, **extra)
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(tasks),
        num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device,
        task_manager=manager, bootstrap_iters=0,
        log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)
    if results is None:
        return {}
    results = dict(results)
    results["lm_eval_version"] = lm_eval.__version__
    from .mc_metrics import add_continuous_metrics

    updated = add_continuous_metrics(results)
    return results if updated is None else updated

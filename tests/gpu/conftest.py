"""Shared pieces of the single-GPU tests: the `gpu` marker and skip, TF32 off, the device
switch between a CPU and a CUDA build in one process, and `pretrain.py` run as a subprocess
(through a small launcher that can add test-only hooks) with its metrics and checkpoints.

Every test here compares the CUDA path against an independent reference: Hugging Face
GPTNeoX, the CPU engine, an uninterrupted run, or float64.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE.parent) not in sys.path:  # tests/: hf_reference, training_fixtures
    sys.path.insert(0, str(HERE.parent))

CUDA = torch.cuda.is_available()

if CUDA:
    # fp32 exactness needs true fp32 matmuls. torch leaves TF32 off for matmuls by default,
    # but the NGC containers force it on through TORCH_ALLOW_TF32_CUBLAS_OVERRIDE (read once,
    # at the first matmul); NVIDIA_TF32_OVERRIDE=0 turns it off in cuBLAS/cuDNN themselves,
    # here and in every pretrain.py subprocess (which inherit this environment).
    os.environ.pop("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", None)
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    """Mark every test of this directory `gpu`; skip them all where CUDA is not visible."""
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not CUDA:
                item.add_marker(skip)


# -- one process, two devices -------------------------------------------------------------
def _use_device(device: str | torch.device, seed: int = 1234) -> torch.device:
    """Point megatron-core at `device` before building a model there (its CUDA-device queries
    answer "cpu" only while the CPU is chosen) and seed every generator."""
    from megatron_latent.distributed import ParallelConfig, initialize_parallel

    return initialize_parallel(ParallelConfig(), torch.device(device), seed=seed)


@pytest.fixture(scope="session")
def use_device():
    """`use_device("cpu" | "cuda", seed=1234)` before each build. The process group is made
    on the CPU first (gloo, as the CPU tests make it), so CPU tests that run later in the same
    session still find a CPU-capable group; at TP=1 the CUDA models need no collectives."""
    _use_device("cpu")
    return _use_device


@pytest.fixture
def cuda(use_device) -> torch.device:
    """The CUDA device, with megatron-core routed to it (and seeded) for this test."""
    return use_device("cuda")


# -- pretrain.py as a subprocess ----------------------------------------------------------
#: Runs pretrain.py after an optional test-only hook, chosen by an environment variable:
#: GPU_TEST_NAN_CALLS=5,6    the loss of the 5th and 6th micro-batch the CUDA engine sees is
#:                           multiplied by NaN (mirrors tests/test_training.py on the CPU).
LAUNCHER = r"""
import os, runpy, sys
calls = os.environ.get("GPU_TEST_NAN_CALLS")
if calls:
    from megatron_latent.training.engines import megatron as engine
    poisoned_calls = {int(c) for c in calls.split(",")}
    original = engine.split_model_output
    seen = [0]
    def poisoned(output):
        loss, aux = original(output)
        seen[0] += 1
        if seen[0] in poisoned_calls:
            loss = loss * float("nan")
        return loss, aux
    engine.split_model_output = poisoned
script = os.path.join(os.getcwd(), "pretrain.py")
sys.argv = [script, *sys.argv[1:]]
runpy.run_path(script, run_name="__main__")
"""


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment plus the project on PYTHONPATH (works uninstalled) and `extra`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    env.setdefault("OMP_NUM_THREADS", "4")
    env.update(extra)
    return env


class PretrainRun:
    """One pretrain.py process started in the background; `wait()` checks its exit status.
    Each run gets its own --data-cache-path: runs started together would otherwise write
    megatron-core's sample-index cache next to the shared corpus at the same time."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 expect_failure: bool = False):
        if "--data-cache-path" not in argv:
            argv = [*argv, "--data-cache-path", str(log.with_suffix(".cache"))]
        self.argv, self.log, self.expect_failure = argv, log, expect_failure
        log.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, *argv], cwd=ROOT, env=subprocess_env(**(env or {})),
            stdout=self._handle, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 240.0) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        finally:
            self._handle.close()
        if code is None or (code != 0) != self.expect_failure:
            raise AssertionError(
                f"pretrain.py exited with {code} ({'timeout' if code is None else 'status'}); "
                f"flags: {' '.join(self.argv)}\n--- last lines of {self.log} ---\n"
                + self.output()[-4000:])
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def run_all(*runs: PretrainRun, timeout: float = 240.0) -> None:
    """Wait for runs started together (independent runs share the GPU and the cores); every
    one is waited for before the failures, if any, are raised together."""
    failures = []
    for run in runs:
        try:
            run.wait(timeout)
        except AssertionError as failure:
            failures.append(str(failure))
    if failures:
        raise AssertionError("\n\n".join(failures))


def train_records(metrics_file: Path) -> dict[int, dict[str, Any]]:
    """The logged training records of a metrics.jsonl, by iteration (the last one wins)."""
    records = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            records[record["iteration"]] = record
    return records


def checkpoint_weights(root: Path, iteration: int) -> dict[str, torch.Tensor]:
    """Canonical full weights of iteration `iteration` under `root` (no process group)."""
    from megatron_latent.training.checkpointing import load_full_model_state

    weights, _, _ = load_full_model_state(str(root), iteration)
    return weights


def checkpoint_at(source: Path, iteration: int, target: Path) -> Path:
    """A --load directory holding only `source`'s checkpoint of `iteration`."""
    from megatron_latent.training.checkpointing import TRACKER_FILE, iteration_dir

    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(iteration_dir(str(source), iteration), iteration_dir(str(target), iteration))
    (target / TRACKER_FILE).write_text(f"{iteration}\n")
    return target


@pytest.fixture(scope="session")
def pretrain() -> SimpleNamespace:
    """pretrain.py subprocesses and what they leave: `run(argv, log, env, expect_failure)`,
    `wait(*runs)`, `records(metrics.jsonl)`, `weights(root, iteration)`,
    `checkpoint_at(source, iteration, target)`."""
    return SimpleNamespace(run=PretrainRun, wait=run_all, records=train_records,
                           weights=checkpoint_weights, checkpoint_at=checkpoint_at)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[str, str]:
    """(dataset prefix, tokenizer.json) of a small learnable token corpus."""
    from training_fixtures import write_token_dataset, write_wordlevel_tokenizer

    base = tmp_path_factory.mktemp("gpu_corpus")
    prefix = write_token_dataset(str(base / "tokens"), num_documents=200, lengths=(40, 300))
    return prefix, write_wordlevel_tokenizer(str(base / "tokenizer"))

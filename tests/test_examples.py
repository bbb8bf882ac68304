"""The example launch scripts: environment checks, the CPU refusal, and flags that
pretrain.py resolves to the recipe each script documents."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from megatron_latent.arguments import method_options, parse_run_config

ROOT = Path(__file__).resolve().parents[1]
SIZES = ["70m", "160m", "410m", "1b", "1.4b"]
PONDERING_LR = {"70m": 1e-3, "160m": 6e-4, "410m": 3e-4, "1b": 2.5e-4, "1.4b": 2e-4}


def launch(script: str, tmp_path: Path, *flags: str,
           **env_overrides) -> subprocess.CompletedProcess:
    """Run an example (with ``flags`` after its name) with a stand-in torchrun that records
    its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "torchrun"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/torchrun_args\n')
    fake.chmod(0o755)
    # A CPU machine, also on a host with GPUs: nvidia-smi finds none (GPUS_PER_NODE overrides).
    no_gpu = bin_dir / "nvidia-smi"
    no_gpu.write_text("#!/bin/sh\necho 'No devices were found' >&2\nexit 6\n")
    no_gpu.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("GPUS_PER_NODE",)}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    env.update(env_overrides)
    return subprocess.run(["bash", str(ROOT / "examples" / script), *flags],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)


def recorded_pretrain_flags(tmp_path: Path) -> list[str]:
    args = (tmp_path / "torchrun_args").read_text().splitlines()
    return args[args.index(str(ROOT / "pretrain.py")) + 1:]


REQUIRED = {"DATA_PATH": "/data/pile_text_document", "TOKENIZER_MODEL": "/data/tok.json",
            "CHECKPOINT_PATH": "/ckpt/run"}


def test_missing_environment_is_named(tmp_path):
    result = launch("pretrain_pondering_pythia_1b.sh", tmp_path, DATA_PATH="/data/x")
    assert result.returncode == 2
    assert "missing environment variable(s): TOKENIZER_MODEL CHECKPOINT_PATH" in result.stderr


def test_cpu_machine_gets_an_explanation_not_a_hang(tmp_path):
    result = launch("pretrain_pondering_pythia_1b.sh", tmp_path, **REQUIRED)
    assert result.returncode == 3
    assert "no NVIDIA GPU is visible" in result.stderr and "make demo" in result.stderr
    assert not (tmp_path / "torchrun_args").exists()


@pytest.mark.parametrize("size", SIZES)
def test_pondering_scripts_resolve_to_the_official_recipe(tmp_path, size):
    result = launch(f"pretrain_pondering_pythia_{size}.sh", tmp_path, GPUS_PER_NODE="8",
                    NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", **REQUIRED)
    assert result.returncode == 0, result.stderr
    torchrun = (tmp_path / "torchrun_args").read_text().split()
    assert torchrun[:10] == ["--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1",
                             "--master_addr", "node0", "--master_port", "6000"]
    run, _ = parse_run_config(recorded_pretrain_flags(tmp_path))
    options = method_options(run)
    assert run.method == "pondering" and options.steps == 3 and options.top_k == 0
    assert options.scale_embeds  # every official Pythia script passes --scale_embeds true
    assert options.multiply_steps == (size in ("410m", "1b", "1.4b"))
    assert run.optimizer.lr == PONDERING_LR[size]
    assert run.optimizer.min_lr == pytest.approx(PONDERING_LR[size] / 10)
    assert run.optimizer.weight_decay == (0.1 if size == "410m" else 0.01)
    assert (run.optimizer.adam_beta1, run.optimizer.adam_beta2) == (0.9, 0.95)
    assert run.training.global_batch_size == 1024 and run.model.seq_length == 2048
    assert run.training.bf16 and run.training.use_distributed_optimizer
    assert run.data.data_path == [REQUIRED["DATA_PATH"]]
    assert run.checkpoint.save == run.checkpoint.load == REQUIRED["CHECKPOINT_PATH"]


@pytest.mark.parametrize("size", SIZES)
def test_pythia_scripts_resolve_to_the_pythia_recipe(tmp_path, size):
    result = launch(f"pretrain_pythia_{size}.sh", tmp_path, GPUS_PER_NODE="1", **REQUIRED)
    assert result.returncode == 0, result.stderr
    run, _ = parse_run_config(recorded_pretrain_flags(tmp_path))
    from megatron_latent.config import get_preset

    recipe = get_preset(size).recipe
    assert run.method == "vanilla"
    assert run.optimizer.lr == recipe.lr and run.optimizer.weight_decay == 0.1
    assert run.training.micro_batch_size == recipe.micro_batch_size
    assert run.training.train_iters == 143000


USER_FLAGS = ["--save-interval", "5", "--eval-interval", "7", "--log-interval", "3",
              "--eval-iters", "2", "--lr", "1e-4", "--train-iters", "10", "--data-path", "/x"]


@pytest.mark.parametrize("script", ["pretrain_pythia_70m.sh", "pretrain_pondering_pythia_1b.sh"])
def test_flags_after_the_script_override_the_script_and_launch(tmp_path, script):
    """What the user types after the script's name wins over the recipe and over launch()'s
    data, checkpoint, logging and evaluation defaults (and over EXTRA_ARGS)."""
    result = launch(script, tmp_path, *USER_FLAGS, GPUS_PER_NODE="1",
                    EXTRA_ARGS="--log-interval 99 --seed 5", **REQUIRED)
    assert result.returncode == 0, result.stderr
    run, _ = parse_run_config(recorded_pretrain_flags(tmp_path))
    assert run.checkpoint.save_interval == 5
    assert run.evaluation.eval_interval == 7 and run.evaluation.eval_iters == 2
    assert run.logging.log_interval == 3
    assert run.optimizer.lr == 1e-4 and run.training.train_iters == 10
    assert run.data.data_path == ["/x"]
    assert run.training.seed == 5  # EXTRA_ARGS still adds what nobody else sets
    assert run.checkpoint.save == REQUIRED["CHECKPOINT_PATH"]  # launch()'s own, not overridden


def test_blends_pass_through_and_empty_precision_means_fp32(tmp_path):
    result = launch("pretrain_pythia_70m.sh", tmp_path, GPUS_PER_NODE="1", PRECISION="",
                    **dict(REQUIRED, DATA_PATH="0.7 /data/a 0.3 /data/b"))
    assert result.returncode == 0, result.stderr
    run, _ = parse_run_config(recorded_pretrain_flags(tmp_path))
    assert run.data.data_path == ["0.7", "/data/a", "0.3", "/data/b"]
    assert not run.training.bf16 and not run.training.fp16


@pytest.mark.parametrize("sig", ["TERM", "USR1"])
def test_a_stop_signal_before_torchrun_starts_exits_zero_without_starting_it(tmp_path, sig):
    """Nothing to save yet: the launcher shell remembers the signal and does not start."""
    script = tmp_path / "stopped_early.sh"
    script.write_text(f'source {ROOT / "examples" / "common.sh"}\nkill -s {sig} $$\nlaunch --lr 1e-4\n')
    result = launch(str(script), tmp_path, GPUS_PER_NODE="1", **REQUIRED)
    assert result.returncode == 0, result.stderr
    assert f"received SIG{sig} before the start" in result.stderr
    assert not (tmp_path / "torchrun_args").exists()

"""The trainer on the CPU engine: exact resume, atomic checkpoints, preemption, schedules,
metrics and bad input."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_latent.config import ConfigError
from megatron_latent.training import checkpointing

from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    prefix = write_token_dataset(str(base / "tokens"))
    tokenizer = write_wordlevel_tokenizer(str(base / "tokenizer"))
    return prefix, tokenizer


def flags(corpus, *extra: str, micro: int = 2, global_batch: int = 8) -> list[str]:
    prefix, tokenizer = corpus
    return TINY_FLAGS + [
        "--data-path", prefix, "--split", "90,10,0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
        "--micro-batch-size", str(micro), "--global-batch-size", str(global_batch),
        "--eval-iters", "1", "--eval-interval", "100",
        *extra,
    ]


def losses(summary) -> list[float]:
    return [entry["lm_loss"] for entry in summary.history]


def test_resume_reproduces_the_uninterrupted_run_exactly(single_process_parallel, corpus,
                                                         tmp_path):
    full, _ = run_training(flags(corpus, "--train-iters", "8"))
    first, _ = run_training(flags(corpus, "--train-iters", "8", "--exit-interval", "4",
                                  "--save", str(tmp_path / "ckpt")))
    assert first.stopped_by == "exit interval" and first.iterations == 4
    assert checkpointing.read_tracker(str(tmp_path / "ckpt")) == 4
    resumed, trainer = run_training(flags(corpus, "--train-iters", "8",
                                          "--load", str(tmp_path / "ckpt")))
    assert losses(first) == losses(full)[:4]
    assert losses(resumed) == losses(full)[4:]  # bit for bit
    assert trainer.state.consumed_train_samples == 64


def test_resume_with_dropout_reproduces_the_uninterrupted_run(single_process_parallel, corpus,
                                                                tmp_path):
    """Dropout draws from the restored RNG: nothing created after the restore (data loaders,
    validation loaders) may draw from it first, or the resumed run takes other masks."""
    dropout = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--eval-interval", "2"]
    full, _ = run_training(flags(corpus, "--train-iters", "6", *dropout))
    run_training(flags(corpus, "--train-iters", "6", "--exit-interval", "3",
                       "--save", str(tmp_path / "ckpt"), *dropout))
    resumed, _ = run_training(flags(corpus, "--train-iters", "6", "--load",
                                    str(tmp_path / "ckpt"), *dropout))
    no_dropout, _ = run_training(flags(corpus, "--train-iters", "6", "--eval-interval", "2"))
    assert losses(no_dropout) != losses(full)  # dropout is really on
    assert losses(resumed) == losses(full)[3:]  # bit for bit


def test_resume_with_other_accumulation_boundaries(single_process_parallel, corpus, tmp_path):
    """Resuming with another micro-batch size re-cuts each global batch into a different
    number of accumulation steps; the global batch and its mean loss stay the same."""
    full, _ = run_training(flags(corpus, "--train-iters", "6", micro=2))
    run_training(flags(corpus, "--train-iters", "6", "--exit-interval", "3",
                       "--save", str(tmp_path / "ckpt"), micro=2))
    resumed, trainer = run_training(flags(corpus, "--train-iters", "6",
                                          "--load", str(tmp_path / "ckpt"), micro=8))
    assert trainer.num_microbatches == 1
    assert losses(resumed) == pytest.approx(losses(full)[3:], rel=1e-5, abs=1e-6)


def test_gradient_accumulation_does_not_change_the_step(single_process_parallel, corpus):
    accumulated, _ = run_training(flags(corpus, "--train-iters", "3", micro=1, global_batch=8))
    single, _ = run_training(flags(corpus, "--train-iters", "3", micro=8, global_batch=8))
    assert losses(accumulated) == pytest.approx(losses(single), rel=1e-5, abs=1e-6)


def test_learning_rate_follows_pythia_schedule(single_process_parallel, corpus):
    """Linear warmup then cosine to min_lr, in samples, checked with the closed form."""
    summary, trainer = run_training(flags(corpus, "--train-iters", "10", "--lr-warmup-iters",
                                          "2", "--lr", "1e-3", "--min-lr", "1e-4"))
    scheduler = trainer.scheduler
    expected = []
    for step in range(11):
        if step <= 2:
            expected.append(1e-3 * step / 2)
        else:
            ratio = (step - 2) / 8
            expected.append(1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * 9e-4)
    observed = []
    for step in range(11):
        scheduler.num_steps = step * 8
        observed.append(scheduler.get_lr(trainer.engine.optimizer.param_groups[0]))
    assert observed == pytest.approx(expected, rel=1e-9)
    groups = trainer.engine.optimizer.param_groups
    assert [g["wd_mult"] for g in groups] == [1.0, 0.0]
    assert all(p.ndim == 2 for p in groups[0]["params"])


def test_kill_during_save_keeps_previous_checkpoint(single_process_parallel, corpus, tmp_path,
                                                    monkeypatch):
    ckpt = str(tmp_path / "ckpt")
    _, trainer = run_training(flags(corpus, "--train-iters", "2", "--save", ckpt))
    assert checkpointing.read_tracker(ckpt) == 2
    trainer.state.iteration = 3

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpointing, "fsync_directory", die)  # after files, before the rename
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert checkpointing.read_tracker(ckpt) == 2
    assert not os.path.exists(checkpointing.iteration_dir(ckpt, 3))
    leftovers = [n for n in os.listdir(ckpt) if n.startswith(".tmp_iter_")]
    assert leftovers  # the half-written save is under a temporary name only
    resumed, again = run_training(flags(corpus, "--train-iters", "3", "--load", ckpt,
                                        "--save", ckpt))
    assert again.state.iteration == 3 and resumed.iterations == 3
    assert checkpointing.read_tracker(ckpt) == 3
    assert not [n for n in os.listdir(ckpt) if n.startswith(".tmp_iter_")]


def test_finetune_and_no_load_optim(single_process_parallel, corpus, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    _, source = run_training(flags(corpus, "--train-iters", "3", "--save", ckpt))
    weights = source.engine.model_state()

    _, tuned = run_training(flags(corpus, "--train-iters", "1", "--load", ckpt, "--finetune"))
    assert tuned.state.iteration == 1  # counters restarted at 0
    _, fresh = run_training(flags(corpus, "--train-iters", "4", "--load", ckpt,
                                  "--no-load-optim", "--exit-interval", "100"))
    assert fresh.state.iteration == 4 and fresh.state.consumed_train_samples == 32

    # --finetune with zero further steps reproduces the checkpoint's weights exactly.
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.training.trainer import Trainer

    run, _ = parse_run_config(flags(corpus, "--train-iters", "1", "--load", ckpt, "--finetune"))
    trainer = Trainer(run)
    trainer.setup()
    assert trainer.state.iteration == 0
    assert not trainer.engine.optimizer.state  # fresh optimizer
    for name, tensor in trainer.engine.model_state().items():
        assert torch.equal(tensor, weights[name]), name


def test_checkpoint_layout_and_safe_loading(single_process_parallel, corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_training(flags(corpus, "--train-iters", "2", "--save", str(ckpt)))
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    payload_path = ckpt / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt"
    config = json.loads((ckpt / "iter_0000002" / "config.json").read_text())
    assert config["model"]["num_layers"] == 2
    payload = torch.load(payload_path, weights_only=True)
    assert payload["iteration"] == 2
    assert payload["train_state"]["consumed_train_samples"] == 16
    assert {"model", "optimizer", "opt_param_scheduler", "rng_state"} <= set(payload)

    # A checkpoint carrying a pickled object is refused without running it.
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload["model"]["evil"] = Payload()
    with open(payload_path, "wb") as handle:
        pickle.dump(payload, handle)
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        run_training(flags(corpus, "--train-iters", "3", "--load", str(ckpt)))
    assert not marker.exists()


def test_metrics_jsonl_and_tensorboard(single_process_parallel, corpus, tmp_path):
    ckpt, board = tmp_path / "ckpt", tmp_path / "tb"
    summary, _ = run_training(flags(corpus, "--train-iters", "4", "--save", str(ckpt),
                                    "--tensorboard-dir", str(board), "--eval-interval", "2"))
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "validation"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    assert [r["lm_loss"] for r in train] == pytest.approx(losses(summary))
    assert {"tokens_per_second", "tflops_per_device", "grad_norm", "learning_rate"} <= set(train[0])
    assert [r["iteration"] for r in valid] == [2, 4]
    assert valid[-1]["ppl"] == pytest.approx(math.exp(valid[-1]["lm_loss"]))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(board))
    events.Reload()
    steps = [event.step for event in events.Scalars("train/lm_loss")]
    assert steps == [1, 2, 3, 4]


def test_nan_loss_is_skipped_and_counted(single_process_parallel, corpus, monkeypatch):
    from megatron_latent.training.engines import cpu

    original = cpu.split_model_output
    calls = {"n": 0}

    def poisoned(output):
        loss, aux = original(output)
        calls["n"] += 1
        if calls["n"] in (5, 6):  # both micro-batches of iteration 3 (4 micro-batches/step)
            loss = loss * float("nan")
        return loss, aux

    monkeypatch.setattr(cpu, "split_model_output", poisoned)
    summary, trainer = run_training(flags(corpus, "--train-iters", "4", micro=4))
    assert trainer.state.skipped_iterations == 1 and trainer.state.nan_iterations == 1
    assert math.isnan(losses(summary)[2]) and all(math.isfinite(x) for x in losses(summary)[3:])

    calls["n"] = 0
    with pytest.raises(Exception, match="exit-on-nan"):
        run_training(flags(corpus, "--train-iters", "4", "--exit-on-nan", micro=4))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--global-batch-size", "6"], "not divisible by --micro-batch-size 4"),
        (["--tensor-model-parallel-size", "2"], "world size 1 is not divisible"),
        (["--pipeline-model-parallel-size", "2"], "world size 1 is not divisible"),
        (["--fp16"], "--fp16 needs CUDA"),
        (["--lr", "-1"], "--lr must be positive, got -1.0"),
        (["--min-lr", "-0.001"], "--min-lr must be >= 0"),
        (["--adam-beta2", "1.0"], r"--adam-beta2 must be in \[0, 1\)"),
        (["--clip-grad", "-1"], "--clip-grad must be >= 0"),
        (["--eval-iters", "-2"], "--eval-iters must be >= 0"),
        (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
        (["--train-iters", "0"], "--train-iters must be >= 1"),
    ],
)
def test_bad_flags_fail_before_any_model(single_process_parallel, corpus, extra, message,
                                         monkeypatch):
    from megatron_latent.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "make_engine",
                        lambda *a, **k: pytest.fail("engine built for invalid flags"))
    with pytest.raises(ConfigError, match=message):
        run_training(flags(corpus, "--train-iters", "2", "--micro-batch-size", "4", *extra))


def test_dry_run_refuses_what_the_run_refuses(corpus, capsys):
    """--dry-run goes through the same checks as a real run (and builds nothing)."""
    sys.path.insert(0, str(ROOT))
    import pretrain

    for extra, message in ((["--global-batch-size", "6"], "not divisible by --micro-batch-size 4"),
                           (["--lr", "-1"], "--lr must be positive")):
        code = pretrain.main(flags(corpus, "--train-iters", "2", "--micro-batch-size", "4",
                                   "--dry-run", *extra))
        assert code == 2 and message in capsys.readouterr().err
    assert pretrain.main(flags(corpus, "--train-iters", "2", "--dry-run")) == 0
    assert "FLOPs per token" in capsys.readouterr().out


def test_min_lr_follows_an_explicit_lr_at_the_presets_ratio():
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.config import get_preset

    recipe = get_preset("tiny").recipe
    run, _ = parse_run_config(["--model", "tiny", "--mock-data", "--lr", "1e-4"])
    assert run.optimizer.min_lr == pytest.approx(1e-4 * recipe.min_lr / recipe.lr, rel=1e-9)
    run, _ = parse_run_config(["--model", "tiny", "--mock-data", "--lr", "1e-4",
                               "--min-lr", "0"])
    assert run.optimizer.min_lr == 0.0
    run, _ = parse_run_config(["--model", "tiny", "--mock-data"])
    assert (run.optimizer.lr, run.optimizer.min_lr) == (recipe.lr, recipe.min_lr)


def test_tracker_naming_a_missing_iteration_is_one_clear_error(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("7")
    result = subprocess.run([sys.executable, str(ROOT / "pretrain.py"),
                             *flags(corpus, "--train-iters", "2", "--load", str(ckpt))],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "names iteration 7, but" in result.stderr and "iter_0000007" in result.stderr


def test_pipeline_parallel_on_cpu_is_refused():
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.methods.registry import get_method
    from megatron_latent.training.trainer import validate_run

    run, _ = parse_run_config(["--model", "tiny", "--mock-data", "--train-iters", "1",
                               "--pipeline-model-parallel-size", "2"])
    with pytest.raises(ConfigError, match="needs the CUDA engine"):
        validate_run(run, get_method("vanilla"), 2, torch.device("cpu"))


def test_missing_data_and_tokenizer_files_are_named(single_process_parallel, corpus, tmp_path):
    prefix, tokenizer = corpus
    missing = str(tmp_path / "nowhere" / "data")
    with pytest.raises(ConfigError, match="nowhere"):
        run_training(flags(corpus, "--train-iters", "1") + ["--data-path", missing])
    with pytest.raises(Exception, match="no_tokenizer.json"):
        run_training(flags(corpus, "--train-iters", "1") +
                     ["--tokenizer-model", str(tmp_path / "no_tokenizer.json")])


def test_tokenizer_larger_than_checkpoint_vocab_is_refused(single_process_parallel, corpus,
                                                           tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_training(flags(corpus, "--train-iters", "1", "--save", ckpt))
    bigger = write_wordlevel_tokenizer(str(tmp_path / "big"), vocab_size=1024)
    with pytest.raises(ConfigError, match=r"tokenizer vocabulary \(1024\) is larger"):
        run_training(flags(corpus, "--train-iters", "2", "--load", ckpt) +
                     ["--tokenizer-model", bigger])


def test_sigterm_saves_and_exits_zero(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    command = [sys.executable, str(ROOT / "pretrain.py"),
               *flags(corpus, "--train-iters", "100000", "--save", str(ckpt))]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, cwd=ROOT)
    output = []
    deadline = time.time() + 120
    for line in process.stdout:
        output.append(line)
        if "iteration        3/" in line:
            process.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(output)
    rest, _ = process.communicate(timeout=120)
    output.append(rest)
    assert process.returncode == 0, "".join(output)
    saved = checkpointing.read_tracker(str(ckpt))
    assert saved is not None and 3 <= saved < 100000
    assert "done: signal" in "".join(output)


def test_resume_on_more_data_parallel_ranks(single_process_parallel, corpus, tmp_path):
    """A checkpoint written by one process continues under torchrun with DP=2: the same
    global batches, so the same losses (up to summation order)."""
    full, _ = run_training(flags(corpus, "--train-iters", "6"))
    ckpt = tmp_path / "ckpt"
    run_training(flags(corpus, "--train-iters", "6", "--exit-interval", "3", "--save", str(ckpt)))
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "pretrain.py"),
               *flags(corpus, "--train-iters", "6", "--load", str(ckpt), "--save", str(ckpt))]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DP=2" in result.stdout
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["lm_loss"] for r in records if r["kind"] == "train" and r["iteration"] > 3]
    assert resumed == pytest.approx(losses(full)[3:], rel=1e-5, abs=1e-6)


def test_load_of_an_empty_directory_starts_from_scratch(single_process_parallel, corpus,
                                                        tmp_path, capsys):
    """--load == --save on the first launch of a requeueable job (Megatron-LM behaviour)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    summary, trainer = run_training(flags(corpus, "--train-iters", "2", "--load", str(ckpt),
                                          "--save", str(ckpt)))
    assert summary.iterations == 2 and "training from scratch" in capsys.readouterr().out
    assert checkpointing.read_tracker(str(ckpt)) == 2


def test_a_second_writer_of_a_save_directory_is_refused(single_process_parallel, corpus,
                                                        tmp_path):
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.training.trainer import Trainer

    ckpt = str(tmp_path / "ckpt")
    run, _ = parse_run_config(flags(corpus, "--train-iters", "2", "--save", ckpt))
    first = Trainer(run)
    first.setup()
    with pytest.raises(ConfigError, match=rf"being written by another run \(pid {os.getpid()} "):
        run_training(flags(corpus, "--train-iters", "2", "--save", ckpt))
    first.close()
    summary, _ = run_training(flags(corpus, "--train-iters", "2", "--save", ckpt))
    assert summary.iterations == 2


def test_second_process_is_refused_and_a_killed_writer_frees_the_directory(corpus, tmp_path):
    """Across processes: the running writer is named; after it is killed (SIGKILL, no chance
    to clean up) the directory can be resumed from."""
    ckpt = tmp_path / "ckpt"
    command = [sys.executable, str(ROOT / "pretrain.py"),
               *flags(corpus, "--train-iters", "100000", "--save", str(ckpt), "--load",
                      str(ckpt), "--save-interval", "2")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    writer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, cwd=ROOT)
    try:
        for line in writer.stdout:
            if "saved checkpoint" in line:
                break
        second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                                timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"being written by another run (pid {writer.pid} " in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        writer.kill()
        writer.wait()
    saved = checkpointing.read_tracker(str(ckpt))
    resumed = subprocess.run([*command[:command.index("100000")], str(saved + 1),
                              *command[command.index("100000") + 1:]],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert checkpointing.read_tracker(str(ckpt)) == saved + 1


def test_keep_last_checkpoints(single_process_parallel, corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_training(flags(corpus, "--train-iters", "5", "--save", str(ckpt), "--save-interval", "1",
                       "--keep-last-checkpoints", "2"))
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000004", "iter_0000005"]
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".deleting")]
    resumed, _ = run_training(flags(corpus, "--train-iters", "6", "--load", str(ckpt)))
    assert resumed.iterations == 6

    # The checkpoint just saved is never deleted; later ones (from a run that was resumed
    # from an earlier checkpoint) are left alone.
    other = tmp_path / "other"
    for iteration in (1, 2, 3, 9):
        (other / f"iter_{iteration:07d}").mkdir(parents=True)
    deleted = checkpointing.prune_checkpoints(str(other), keep=2, newest=3)
    assert deleted == [str(other / "iter_0000001")]
    assert sorted(p.name for p in other.iterdir()) == ["iter_0000002", "iter_0000003",
                                                      "iter_0000009"]
    with pytest.raises(ConfigError, match="--keep-last-checkpoints must be >= 1"):
        run_training(flags(corpus, "--train-iters", "1", "--save", str(ckpt),
                           "--keep-last-checkpoints", "0"))


def test_wandb_offline_run_records_the_metrics(single_process_parallel, corpus, tmp_path,
                                               monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_training(flags(corpus, "--train-iters", "2", "--wandb-project", "tests",
                       "--wandb-save-dir", str(tmp_path)))
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # wandb's service process may still be writing the run file when finish() returns.
    deadline = time.time() + 60
    content = runs[0].read_bytes()
    while b"validation/lm_loss" not in content and time.time() < deadline:
        time.sleep(0.5)
        content = runs[0].read_bytes()
    assert b"train/lm_loss" in content and b"validation/lm_loss" in content


def test_blend_reports_validation_per_dataset(single_process_parallel, corpus, tmp_path):
    prefix, tokenizer = corpus
    other = write_token_dataset(str(tmp_path / "other"), seed=5)
    summary, _ = run_training(flags(corpus, "--train-iters", "2") +
                              ["--data-path", "0.3", prefix, "0.7", other])
    assert set(summary.validation) == {"validation", prefix, other}
    assert summary.validation[prefix] != summary.validation[other]
    # With evaluation off a weighted blend still trains.
    off, _ = run_training(flags(corpus, "--train-iters", "1", "--eval-iters", "0") +
                          ["--data-path", "0.3", prefix, "0.7", other])
    assert off.iterations == 1 and off.validation == {}


def test_activation_recompute_gives_the_same_training(single_process_parallel, corpus):
    plain, _ = run_training(flags(corpus, "--train-iters", "3"))
    recomputed, trainer = run_training(flags(corpus, "--train-iters", "3",
                                             "--recompute-granularity", "full"))
    layers = [m for m in trainer.engine.unwrapped_model().modules()
              if hasattr(m, "_plain_forward")]
    assert len(layers) == 2
    assert losses(recomputed) == losses(plain)

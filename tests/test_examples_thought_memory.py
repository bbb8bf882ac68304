"""The thought-memory example launch scripts: the flags each resolves to, parsed by the
project's own parser into the run config and the method's options."""

from __future__ import annotations

import pytest

from megatron_latent.arguments import method_options, parse_run_config
from tests.test_examples import REQUIRED, launch, recorded_pretrain_flags

SENTENCE_DATA = dict(REQUIRED, DATA_PATH="/data/pile_text_sentence")

#: script -> ((layers, hidden, heads), peak lr, micro-batch (streams), recompute)
PYTHIA = {
    "pretrain_thought_memory_pythia_160m.sh": ((12, 768, 12), 6e-4, 8, None),
    "pretrain_thought_memory_pythia_1b.sh": ((16, 2048, 8), 2.5e-4, 4, "full"),
}


def resolve(script: str, tmp_path, *flags: str, **env):
    result = launch(script, tmp_path, *flags, GPUS_PER_NODE="8", **dict(SENTENCE_DATA, **env))
    assert result.returncode == 0, result.stderr
    run, _ = parse_run_config(recorded_pretrain_flags(tmp_path))
    return run, method_options(run)


def shape(run) -> tuple[int, int, int]:
    return run.model.num_layers, run.model.hidden_size, run.model.num_attention_heads


def assert_common(run, options) -> None:
    assert run.method == "thought-memory"
    model = options.model
    assert model.memory_size == 40 and model.loss_mode == "paper"
    assert model.layer_pattern is None  # alternating S, C, S, C, ...
    assert options.max_content == 64 and options.L == 67
    assert options.stream_length == 30
    assert (options.eos_weight, options.eos_weight_after, options.eos_weight_epochs) == \
        (1.0, 0.05, 1)
    assert run.model.hidden_dropout == 0.0 and run.model.attention_dropout == 0.0
    assert run.optimizer.lr_decay_style == "cosine" and run.optimizer.clip_grad == 1.0
    assert run.optimizer.adam_eps == 1e-8
    assert run.training.bf16
    assert run.data.data_path == [SENTENCE_DATA["DATA_PATH"]]
    assert run.checkpoint.save == run.checkpoint.load == SENTENCE_DATA["CHECKPOINT_PATH"]
    # The global batch stays a valid LR-schedule unit for any data-parallel size up to 32.
    for dp in (1, 2, 4, 8, 16, 32):
        assert run.training.global_batch_size % (run.training.micro_batch_size * dp) == 0


def test_gpt2_small_script_resolves_to_the_papers_setting(tmp_path):
    run, options = resolve("pretrain_thought_memory_gpt2_small.sh", tmp_path)
    assert_common(run, options)
    assert shape(run) == (12, 768, 12)
    assert options.token_budget == 20000
    assert (options.stream_length_step, options.stream_length_every) == (12, 5)
    assert options.stream_length_cap is None
    assert options.stream_length_at(0) == 30 and options.stream_length_at(5) == 42
    assert options.stream_length_at(49) == 138
    assert options.schedule_epoch_tokens is None  # epochs: passes over the data
    assert options.eos_weight_at(0, 0) == 1.0 and options.eos_weight_at(1, 0) == 0.05
    opt = run.optimizer
    assert opt.lr == 2.5e-4 and opt.min_lr == pytest.approx(2.5e-5)
    assert opt.lr_warmup_fraction == pytest.approx(0.004)
    assert (opt.adam_beta1, opt.adam_beta2) == (0.9, 0.999) and opt.weight_decay == 0.01
    assert run.training.micro_batch_size == 8


@pytest.mark.parametrize("script", sorted(PYTHIA))
def test_pythia_scripts_resolve_to_the_pythia_optimiser(tmp_path, script):
    expected_shape, lr, micro, recompute = PYTHIA[script]
    run, options = resolve(script, tmp_path)
    assert_common(run, options)
    assert shape(run) == expected_shape
    assert options.token_budget == 1024 * 2048  # Pythia's batch, in non-pad tokens
    assert options.schedule_epoch_tokens == 300_000_000_000 // 50
    assert options.eos_weight_at(0, 5_999_999_999) == 1.0
    assert options.eos_weight_at(0, 6_000_000_000) == 0.05
    opt = run.optimizer
    assert opt.lr == lr and opt.min_lr == pytest.approx(lr / 10)
    assert opt.lr_warmup_fraction == pytest.approx(0.01)
    assert (opt.adam_beta1, opt.adam_beta2) == (0.9, 0.95) and opt.weight_decay == 0.1
    assert run.training.micro_batch_size == micro
    assert run.training.global_batch_size == 1024 and run.training.train_iters == 143000
    assert run.training.use_distributed_optimizer
    assert run.training.recompute_granularity == recompute


@pytest.mark.parametrize("script", ["pretrain_thought_memory_gpt2_small.sh",
                                    *sorted(PYTHIA)])
def test_flags_after_the_script_win(tmp_path, script):
    run, options = resolve(script, tmp_path, "--tm-token-budget", "4096",
                           "--tm-stream-length", "12", "--tm-memory-size", "8",
                           "--tm-layer-pattern", "SSCC" * 3 + ("SSCC" if "1b" in script else ""),
                           "--lr", "1e-4", "--train-iters", "10", "--data-path", "/x_sentence")
    assert options.token_budget == 4096 and options.stream_length == 12
    assert options.model.memory_size == 8 and options.model.layer_pattern.startswith("SSCC")
    assert run.optimizer.lr == 1e-4 and run.training.train_iters == 10
    assert run.data.data_path == ["/x_sentence"]


def test_scripts_refuse_without_environment_or_gpu(tmp_path):
    result = launch("pretrain_thought_memory_gpt2_small.sh", tmp_path, DATA_PATH="/d")
    assert result.returncode == 2
    assert "missing environment variable(s): TOKENIZER_MODEL CHECKPOINT_PATH" in result.stderr
    result = launch("pretrain_thought_memory_pythia_1b.sh", tmp_path, **SENTENCE_DATA)
    assert result.returncode == 3 and "no NVIDIA GPU is visible" in result.stderr

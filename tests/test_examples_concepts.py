"""The CoCoMix (--method concepts) example launch scripts: the flags each resolves to, parsed
by the project's own parser into the run config and the method's options, the parameter
counts their headers state, and the environment they refuse to start without."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_latent.arguments import method_options, parse_run_config
from megatron_latent.config import ConfigError, ModelConfig, count_parameters
from megatron_latent.methods.registry import get_method
from megatron_latent.training.trainer import validate_run
from tests.test_examples import REQUIRED, ROOT, launch, recorded_pretrain_flags

LABELS = "/labels/pile_text_document"
ENV = dict(REQUIRED, LABELS_PATH=LABELS)
C = 32768


@dataclasses.dataclass(frozen=True)
class Recipe:
    shape: tuple[int, int, int]  # layers, hidden, heads
    insert_layer: int
    lr: float
    warmup_iters: int
    global_batch: int
    train_iters: int
    micro: int
    recompute: str | None
    total_params: int  # the Pythia model + the concept head (both d x C matrices)
    baseline: tuple[int, int]  # parameter-matched vanilla: hidden, heads
    paper_width: int  # the paper's NTP baseline width (GPT-2: no rotary constraint)


#: The official configs (69M / 386M / 1.38B) on Pythia blocks.
RECIPES = {
    "pretrain_concepts_pythia_70m.sh": Recipe((8, 512, 8), 3, 6e-4, 130, 512, 40000, 16, None,
                                              110_319_616, (672, 12), 624),
    "pretrain_concepts_pythia_410m.sh": Recipe((24, 1024, 16), 5, 3e-4, 130, 512, 40000, 8,
                                               "selective", 472_477_696, (1120, 14), 1072),
    "pretrain_concepts_pythia_1.4b.sh": Recipe((24, 2048, 16), 5, 2e-4, 65, 1024, 20000, 4,
                                               "selective", 1_548_902_400, (2160, 18), 2096),
}
SCRIPTS = sorted(RECIPES)


def resolve(script: str, tmp_path, *flags: str, **env):
    result = launch(script, tmp_path, *flags, GPUS_PER_NODE="8", **dict(ENV, **env))
    assert result.returncode == 0, result.stderr
    run, _ = parse_run_config(recorded_pretrain_flags(tmp_path))
    return run, method_options(run)


def shape(run) -> tuple[int, int, int]:
    return run.model.num_layers, run.model.hidden_size, run.model.num_attention_heads


def header(script: str) -> str:
    text = (ROOT / "examples" / script).read_text()
    return text[:text.index("set -euo pipefail")]


def parameters(run, options) -> tuple[int, int]:
    """(the whole concept model, the Pythia model alone), as --dry-run counts them."""
    pythia = count_parameters(run.model)["total"]
    return pythia + get_method("concepts").extra_parameters(run.model, options), pythia


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_resolve_to_the_official_recipe(tmp_path, script):
    recipe = RECIPES[script]
    run, options = resolve(script, tmp_path)
    assert run.method == "concepts"
    assert shape(run) == recipe.shape and run.model.seq_length == 1024
    assert run.model.hidden_dropout == 0.0 and run.model.attention_dropout == 0.0
    assert options.num_concepts == C
    assert options.resolved_insert_layer(run.model.num_layers) == recipe.insert_layer
    assert (options.top_k, options.k_attr, options.loss_weight) == (32, 4, 0.1)
    assert (options.mixing, options.positions) == ("interleave", "pair")
    assert options.labels == (("", LABELS),) and not options.online
    opt = run.optimizer
    assert opt.lr == recipe.lr and opt.min_lr == pytest.approx(recipe.lr / 10)
    assert opt.lr_decay_style == "cosine" and opt.lr_decay_iters is None  # to the last step
    assert opt.lr_warmup_iters == recipe.warmup_iters and not opt.lr_warmup_fraction
    assert (opt.adam_beta1, opt.adam_beta2, opt.adam_eps) == (0.9, 0.95, 1e-8)
    assert opt.weight_decay == 0.1 and opt.clip_grad == 1.0
    training = run.training
    assert training.bf16 and training.use_distributed_optimizer
    assert training.recompute_granularity == recipe.recompute  # never "full" (refused)
    assert (training.global_batch_size, training.train_iters) == \
        (recipe.global_batch, recipe.train_iters)
    assert training.micro_batch_size == recipe.micro
    tokens = training.train_iters * training.global_batch_size * run.model.seq_length
    assert 20e9 <= tokens < 21e9  # Table 1's 20B tokens
    assert run.data.data_path == [ENV["DATA_PATH"]]
    assert run.checkpoint.save == run.checkpoint.load == ENV["CHECKPOINT_PATH"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("world_size", [8, 32])
def test_scripts_pass_the_trainers_checks(tmp_path, script, world_size):
    """Everything the trainer checks before touching data (batch split, schedule, shape,
    ZeRO-1 on CUDA) holds for 8 and 32 GPUs; the labels themselves are checked at launch."""
    run, _ = resolve(script, tmp_path)
    spec = dataclasses.replace(get_method("concepts"), check_data=lambda run: None)
    validate_run(run, spec, world_size, torch.device("cuda"))
    assert run.training.num_microbatches(world_size) >= 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_headers_state_the_parameter_counts(tmp_path, script):
    recipe = RECIPES[script]
    run, options = resolve(script, tmp_path)
    total, pythia = parameters(run, options)
    d = run.model.hidden_size
    assert total - pythia == 2 * d * C + C + 2 * d
    assert total == recipe.total_params
    text = header(script)
    assert f"this model {total:,}" in text and f"{pythia:,}" in text
    assert f"{pythia + d * C:,}" in text  # the paper's size label: one d x C matrix
    if shape(run) != (8, 512, 8):  # the backbone is a Pythia preset: its published count
        assert pythia in (405_334_016, 1_414_647_808)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_stated_ntp_baseline_is_parameter_matched(tmp_path, script):
    """The header's baseline (this script, --method vanilla, a wider model) resolves to plain
    next-token training with the same recipe and within 1% of the concept model's
    parameters; the paper's own widths have no whole rotary dimension on Pythia blocks."""
    recipe = RECIPES[script]
    hidden, heads = recipe.baseline
    flags = ("--method", "vanilla", "--hidden-size", str(hidden),
             "--num-attention-heads", str(heads))
    assert " ".join(flags) in header(script)
    run, _ = resolve(script, tmp_path, *flags)
    assert run.method == "vanilla" and run.method_args == {}
    run.model.validate(1)
    baseline = count_parameters(run.model)["total"]
    assert abs(baseline - recipe.total_params) / recipe.total_params < 0.01
    assert f"{baseline:,}" in header(script)
    assert run.optimizer.lr == recipe.lr and run.model.seq_length == 1024
    assert run.optimizer.lr_warmup_iters == recipe.warmup_iters
    assert run.training.train_iters == recipe.train_iters
    paper = ModelConfig(num_layers=recipe.shape[0], hidden_size=recipe.paper_width,
                        num_attention_heads=recipe.shape[2])
    with pytest.raises(ConfigError, match="rotary"):
        paper.validate(1)


@pytest.mark.parametrize("script", SCRIPTS)
def test_flags_after_the_script_win(tmp_path, script):
    run, options = resolve(script, tmp_path, "--num-concepts", "4096",
                           "--concept-insert-layer", "2", "--concept-top-k", "16",
                           "--concept-loss-weight", "0.5", "--concept-labels", "/other/labels",
                           "--lr", "1e-4", "--lr-warmup-iters", "10", "--train-iters", "10",
                           "--seq-length", "512", "--data-path", "/x_document")
    assert options.num_concepts == 4096 and options.resolved_insert_layer(8) == 2
    assert options.top_k == 16 and options.loss_weight == 0.5
    assert options.labels == (("", "/other/labels"),)
    assert run.optimizer.lr == 1e-4 and run.optimizer.lr_warmup_iters == 10
    assert run.training.train_iters == 10 and run.model.seq_length == 512
    assert run.data.data_path == ["/x_document"]


def test_num_concepts_and_a_labels_blend_come_from_the_environment(tmp_path):
    run, options = resolve("pretrain_concepts_pythia_410m.sh", tmp_path, NUM_CONCEPTS="16384",
                           DATA_PATH="0.7 /data/a 0.3 /data/b",
                           LABELS_PATH="/data/a=/labels/a /data/b=/labels/b")
    assert options.num_concepts == 16384
    assert options.labels == (("/data/a", "/labels/a"), ("/data/b", "/labels/b"))
    assert run.data.data_path == ["0.7", "/data/a", "0.3", "/data/b"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_labels_are_refused_with_the_way_to_make_them(tmp_path, script):
    result = launch(script, tmp_path, GPUS_PER_NODE="8", **REQUIRED)
    assert result.returncode == 2
    assert "missing environment variable(s): LABELS_PATH" in result.stderr
    assert "tools/label_concepts.py" in result.stderr and script in result.stderr
    assert not (tmp_path / "torchrun_args").exists()


def test_every_missing_variable_is_named(tmp_path):
    result = launch("pretrain_concepts_pythia_70m.sh", tmp_path, GPUS_PER_NODE="8",
                    DATA_PATH="/d")
    assert result.returncode == 2
    assert ("missing environment variable(s): TOKENIZER_MODEL CHECKPOINT_PATH LABELS_PATH"
            in result.stderr)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_cpu_machine_is_refused_after_the_environment(tmp_path, script):
    result = launch(script, tmp_path, **ENV)
    assert result.returncode == 3 and "no NVIDIA GPU is visible" in result.stderr
    assert "LABELS_PATH" not in result.stderr
    assert not (tmp_path / "torchrun_args").exists()


def test_headers_document_the_labelling_pipeline():
    for script in SCRIPTS:
        text = header(script)
        for step in ("examples/pretrain_pythia_160m.sh", "tools/train_sae.py",
                     "tools/label_concepts.py", "--seq-length 1024", "LABELS_PATH",
                     "NUM_CONCEPTS", "--hf-model"):
            assert step in text, (script, step)
        assert Path(ROOT / "examples" / "pretrain_pythia_160m.sh").exists()

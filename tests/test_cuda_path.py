"""The CUDA path's defects that can be shown on the CPU: what megatron-core's schedules and
pipeline config demand of the model, transformer-engine detection, megatron-core's device
queries on a machine with a GPU, fp32 accumulation of bf16 pondering mixing, fp16's first loss
scale, and inference loading that draws no random weights."""

from __future__ import annotations

import sys

import pytest
import torch

from megatron_latent.config import ModelConfig
from megatron_latent.models.language_model import (
    RuntimeOptions,
    build_pythia_model,
    build_transformer_config,
)

from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)

SMALL = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                    max_position_embeddings=16, vocab_size=128)


def test_megatron_schedules_can_read_the_model_type(single_process_parallel):
    from megatron.core.enums import ModelType
    from megatron.core.transformer.module import Float16Module
    from megatron.core.utils import get_model_type

    model = build_pythia_model(SMALL)
    assert get_model_type(model) == ModelType.encoder_or_decoder
    bf16 = build_pythia_model(SMALL, RuntimeOptions(params_dtype=torch.bfloat16, bf16=True))
    wrapped = Float16Module(bf16.config, bf16)  # what the CUDA engine hands the schedules
    assert get_model_type(wrapped) == ModelType.encoder_or_decoder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pipeline_parallel_config_builds_with_the_pipeline_dtype(dtype):
    config = build_transformer_config(
        SMALL, RuntimeOptions(pipeline_model_parallel_size=2, params_dtype=dtype,
                              bf16=dtype == torch.bfloat16))
    assert config.pipeline_dtype == dtype
    assert config.deallocate_pipeline_outputs


def test_a_transformer_engine_that_cannot_import_counts_as_absent(tmp_path, monkeypatch):
    """An installed transformer-engine built for another torch/CUDA fails at import; the
    model must then use the local spec, as megatron-core itself does."""
    from megatron_latent.models.specs import resolve_backends, transformer_engine_available

    package = tmp_path / "transformer_engine"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise OSError('libtransformer_engine.so: undefined symbol')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "transformer_engine", raising=False)
    assert not transformer_engine_available()
    assert resolve_backends(SMALL, torch.device("cuda", 0)) == ("local", "sdpa")


def test_document_masks_never_go_to_transformer_engine_attention(monkeypatch):
    """TE's core attention is built causal and ignores a per-document mask: with
    --reset-attention-mask the CUDA engine must not silently train another objective."""
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.config import ConfigError
    from megatron_latent.methods.registry import get_method
    from megatron_latent.models import specs
    from megatron_latent.training.trainer import validate_run

    monkeypatch.setattr(specs, "transformer_engine_available", lambda: True)
    cuda = torch.device("cuda", 0)
    assert specs.resolve_backends(SMALL, cuda) == ("transformer_engine", "te")
    assert specs.resolve_backends(SMALL, cuda, document_mask=True) == \
        ("transformer_engine", "sdpa")
    explicit = SMALL.replace(attention_backend="te")
    with pytest.raises(ConfigError, match="--reset-attention-mask with --attention-backend te"):
        specs.resolve_backends(explicit, cuda, document_mask=True)
    run, _ = parse_run_config(["--model", "tiny", "--mock-data", "--train-iters", "1",
                               "--reset-attention-mask", "--attention-backend", "te"])
    with pytest.raises(ConfigError, match="ignore the per-document one"):
        validate_run(run, get_method("vanilla"), 1, cuda)


def test_cpu_ranks_on_a_gpu_machine_allocate_megatron_buffers_on_the_cpu(monkeypatch):
    from megatron.core.utils import GlobalMemoryBuffer

    from megatron_latent.compat import route_cuda_device_queries

    def gpu_zero():
        return 0

    # A machine with a GPU: CUDA is available and megatron-core's query answers device 0.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", gpu_zero)
    assert route_cuda_device_queries(torch.device("cpu"))
    buffer = GlobalMemoryBuffer().get_tensor((4, 2), torch.float32, "sequence-parallel")
    assert buffer.device.type == "cpu"
    # A rank (or a later model in the same process) that computes on CUDA gets torch's answer.
    assert not route_cuda_device_queries(torch.device("cuda", 0))
    assert torch.cuda.current_device is gpu_zero


def test_bf16_pondering_mixing_accumulates_in_fp32():
    """Numerator Σ e·W and normaliser Σ e over a 4k vocabulary from bf16 inputs: accumulated
    in fp32 they agree with float64 to ~1e-6; rounded to bf16 they are off by ~1e-3."""
    from megatron_latent.methods.pondering.mixing import _ExpWeightedRows

    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 2, 4096, generator=generator) * 3).to(torch.bfloat16)
    table = (torch.randn(4096, 64, generator=generator) * 0.02).to(torch.bfloat16)
    shift = logits.amax(-1)  # as mix_input_embeddings computes it: in the logits' dtype
    packed = _ExpWeightedRows.apply(logits.clone(), shift, table)
    assert packed.dtype == torch.float32
    # The reference exponentiates in bf16 too, as the kernel does; only accumulation differs.
    weights = (logits - shift.unsqueeze(-1)).exp().double()
    expected = torch.cat([weights @ table.double(), weights.sum(-1, keepdim=True)], dim=-1)
    scale = torch.cat([weights @ table.double().abs(), weights.sum(-1, keepdim=True)], dim=-1)
    relative = ((packed.double() - expected).abs() / scale).max()
    assert relative < 1e-4, relative


def test_fp16_starts_at_a_loss_scale_of_2_to_the_16_per_token():
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.training.engines.megatron import initial_loss_scale

    assert initial_loss_scale(8 * 2048) == 4.0  # 2^16 / 2^14 tokens
    assert initial_loss_scale(3 * 1000) == 16.0  # rounded down to a power of two
    assert initial_loss_scale(1) == 2.0**16
    assert initial_loss_scale(2**20) == 1.0  # never below one
    run, _ = parse_run_config(["--model", "tiny", "--mock-data", "--fp16"])
    assert run.training.initial_loss_scale is None  # the engine derives it
    run, _ = parse_run_config(["--model", "tiny", "--mock-data", "--fp16",
                               "--initial-loss-scale", "1024"])
    assert run.training.initial_loss_scale == 1024


def test_inference_loading_draws_no_random_weights(single_process_parallel, tmp_path,
                                                   monkeypatch):
    from megatron_latent.inference.loading import inference_dtype, load_model_for_inference

    prefix = write_token_dataset(str(tmp_path / "data" / "tokens"))
    tokenizer = write_wordlevel_tokenizer(str(tmp_path / "tokenizer"))
    _, trainer = run_training(TINY_FLAGS + [
        "--data-path", prefix, "--split", "90,10,0", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", tokenizer, "--micro-batch-size", "2", "--global-batch-size", "2",
        "--train-iters", "1", "--eval-iters", "0", "--save", str(tmp_path / "ckpt")])
    trained = trainer.engine.unwrapped_model().eval()

    draws = []
    original = torch.nn.init.normal_

    def counting_normal(tensor, *args, **kwargs):
        draws.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", counting_normal)
    loaded = load_model_for_inference(str(tmp_path / "ckpt"), device=torch.device("cpu"))
    assert draws == []
    assert next(loaded.model.parameters()).dtype == torch.float32  # the CPU default
    tokens = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), trained(tokens), rtol=0, atol=0)
    assert inference_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert inference_dtype(torch.device("cpu")) == torch.float32


def test_the_cuda_engine_turns_on_the_exact_fusions_it_has(monkeypatch):
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.training.engines import megatron as engine

    base = ["--model", "tiny", "--mock-data", "--bf16"]
    run, _ = parse_run_config(base)
    monkeypatch.setattr(engine, "gradient_accumulation_fusion_available", lambda: False)
    monkeypatch.setattr(engine, "rope_fusion_available", lambda: False)
    plain = engine.cuda_runtime_options(run)
    assert not plain.gradient_accumulation_fusion and not plain.apply_rope_fusion
    monkeypatch.setattr(engine, "gradient_accumulation_fusion_available", lambda: True)
    monkeypatch.setattr(engine, "rope_fusion_available", lambda: True)
    fused = engine.cuda_runtime_options(run)
    assert fused.gradient_accumulation_fusion and fused.apply_rope_fusion
    config = build_transformer_config(SMALL, plain)
    assert config.activation_func is torch.nn.functional.gelu and not config.bias_activation_fusion
    # Per-sample positions (documents restart at 0) do not fit the fused kernel's one table.
    run, _ = parse_run_config(base + ["--reset-position-ids"])
    assert not engine.cuda_runtime_options(run).apply_rope_fusion


def test_transformer_engine_pins_follow_megatron_core():
    """The `te` extra and the Dockerfile's check admit exactly the transformer-engine
    releases megatron-core declares it is built for."""
    import re
    from importlib.metadata import requires
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    root = Path(__file__).resolve().parents[1]
    ours = re.search(r'"transformer-engine\[pytorch\]([^"]+)"', (root / "setup.py").read_text())
    assert ours, "setup.py has no te extra"
    ours_spec = SpecifierSet(ours.group(1), prereleases=True)
    pinned = [Requirement(r) for r in requires("megatron-core") or []
              if r.startswith("transformer-engine")]
    assert pinned, "megatron-core declares no transformer-engine pin"
    theirs = SpecifierSet(str(pinned[0].specifier), prereleases=True)
    for candidate in ["2.8.0", "2.9.0", "2.10.1", "2.11.0", "2.12.0", "1.13.0"]:
        assert (candidate in ours_spec) == (candidate in theirs), candidate
    assert f"SpecifierSet('{ours.group(1)}'" in (root / "Dockerfile").read_text()


@pytest.mark.parametrize("chunk", [2**26, 40])  # one chunk; many (a few rows each)
def test_top_k_row_mixture_and_its_gradients_match_autograd(monkeypatch, chunk):
    """The top-k mixture Σ w·W[idx] (written for bf16 on CUDA, where embedding_bag's
    per-sample-weight backward is missing) against autograd of gather-and-sum in float64."""
    from megatron_latent.models import sharded_topk
    from megatron_latent.models.sharded_topk import WeightedRowSum

    monkeypatch.setattr(sharded_topk, "ROW_SUM_CHUNK_ELEMENTS", chunk)
    generator = torch.Generator().manual_seed(3)
    index = torch.randint(0, 50, (13, 4), generator=generator)
    index[0] = torch.tensor([7, 7, 7, 2])  # a row chosen twice accumulates twice
    weights = torch.rand(13, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    table = torch.randn(50, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    out = WeightedRowSum.apply(weights, index, table)
    upstream = torch.randn(13, 6, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * upstream).sum(), (weights, table))

    expected = (weights.unsqueeze(-1) * table[index]).sum(1)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (weights, table))
    # The mixture is accumulated in fp32 (its output dtype), so fp32-level agreement.
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    bf16 = WeightedRowSum.apply(weights.detach().bfloat16().requires_grad_(), index,
                                table.detach().bfloat16().requires_grad_())
    assert bf16.dtype == torch.float32
    bf16.sum().backward()  # the bf16 backward exists (on CUDA embedding_bag's does not)


def test_switching_compute_device_drops_megatron_buffers_made_for_the_other(monkeypatch):
    """megatron-core reuses its global buffers by (name, dtype): a buffer allocated while the
    process computed on the CPU must not be handed to the CUDA model built next."""
    from megatron.core import parallel_state

    from megatron_latent.distributed import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig(), torch.device("cpu"))
    before = parallel_state.get_global_memory_buffer()
    before.get_tensor((3,), torch.float32, "mpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr("megatron_latent.distributed.set_seed", lambda seed, device: None)
    initialize_parallel(ParallelConfig(), torch.device("cuda", 0))
    after = parallel_state.get_global_memory_buffer()
    assert after is not before and not after.buffer
    monkeypatch.undo()
    initialize_parallel(ParallelConfig(), torch.device("cpu"))  # back to the CPU for the rest
    assert parallel_state.get_global_memory_buffer() is not after


def test_deterministic_mode_switches_torch_to_deterministic_kernels(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    prefix = write_token_dataset(str(tmp_path / "data" / "tokens"))
    tokenizer = write_wordlevel_tokenizer(str(tmp_path / "tokenizer"))
    argv = TINY_FLAGS + [
        "--data-path", prefix, "--split", "90,10,0", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", tokenizer, "--micro-batch-size", "2", "--global-batch-size", "2",
        "--train-iters", "2", "--eval-iters", "0"]
    try:
        first, _ = run_training(argv + ["--deterministic-mode"])
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        second, _ = run_training(argv + ["--deterministic-mode"])
        assert [h["lm_loss"] for h in first.history] == [h["lm_loss"] for h in second.history]
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
            torch.backends.cuda.enable_cudnn_sdp(True)

"""The CUDA engine through pretrain.py against independent runs: its first optimizer steps
against the CPU engine on the same weights and batches (fp32), 100 bf16 iterations that learn
and resume from iteration 50 as the uninterrupted run continues (bit for bit in fp32 with
deterministic algorithms), and a NaN micro-batch skipped and counted (or stopping the run
under --exit-on-nan).

Independent runs start together (tiny shapes; the GPU and the cores are shared), so the
module costs four rounds of process start-up.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

VOCAB = 512
#: Head dim 64 (Pythia's), 128 positions, two micro-batches of 4 per step (accumulation).
SHAPE = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "2",
         "--seq-length", "128", "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by",
         "64", "--micro-batch-size", "4", "--global-batch-size", "8", "--num-workers", "0",
         "--log-interval", "1", "--eval-iters", "0", "--seed", "7",
         "--attention-backend", "sdpa"]


def flags(corpus: tuple[str, str], *extra: str) -> list[str]:
    prefix, tokenizer = corpus
    return SHAPE + ["--data-path", prefix, "--split", "98,2,0",
                    "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
                    *extra]


def write_initial_weights(root: Path, argv: list[str]) -> str:
    """A weights-only checkpoint both engines start from (--load ... --finetune): each engine
    would otherwise draw its own initial weights (the CUDA engine initialises on the GPU).
    The weights are a random Hugging Face GPTNeoX with perturbed norms and biases."""
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.models import hf_gpt_neox as mapping
    from megatron_latent.training.checkpointing import write_weights_checkpoint

    from hf_reference import make_gpt_neox

    hf_model = make_gpt_neox(vocab_size=VOCAB, layers=2, hidden=128, heads=2, seed=11,
                             max_positions=128)
    full = mapping.hf_to_canonical(hf_model.state_dict(), VOCAB)
    run, _ = parse_run_config(argv)
    write_weights_checkpoint(str(root), full, run.to_dict())
    return str(root)


# With adam_eps = 1 >> |g| the first Adam update is lr * g / (|g| + 1) ~ lr * g: the change of
# every parameter is proportional to its gradient, so comparing the changes compares the
# gradients element by element. (With eps = 1e-8 the first update is lr * sign(g) and would
# hide a wrongly scaled gradient.) No weight decay, so the change is the gradient's alone;
# clipping at 0.3 acts on both (the first gradient norm is ~0.5).
STEP_FLAGS = ["--lr", "2.0", "--min-lr", "2.0", "--lr-decay-style", "constant",
              "--lr-warmup-fraction", "0", "--adam-eps", "1.0", "--weight-decay", "0",
              "--clip-grad", "0.3"]


def test_first_two_steps_on_cuda_equal_the_cpu_engine(pretrain, corpus, tmp_path):
    """SDPA attention on both; where transformer-engine imports, also the CUDA engine's
    default (--attention-backend auto: TE linears and TE attention)."""
    from megatron_latent.models.specs import transformer_engine_available

    base = flags(corpus, *STEP_FLAGS, "--train-iters", "2", "--save-interval", "1")
    init = write_initial_weights(tmp_path / "init", base)
    variants = {"cpu": ["--device", "cpu"], "cuda": ["--device", "cuda"]}
    if transformer_engine_available():
        variants["cuda-te"] = ["--device", "cuda", "--attention-backend", "auto"]
    runs = {name: pretrain.run(base + extra + ["--load", init, "--finetune",
                                               "--save", str(tmp_path / name)],
                               tmp_path / f"{name}.log")
            for name, extra in variants.items()}
    pretrain.wait(*runs.values())
    assert "engine: cpu on cpu" in runs["cpu"].output()
    records = {name: pretrain.records(tmp_path / name / "metrics.jsonl") for name in runs}
    start = pretrain.weights(tmp_path / "init", 0)
    for name in (n for n in runs if n != "cpu"):
        assert "engine: megatron on cuda" in runs[name].output()
        for iteration in (1, 2):
            cpu, cuda = records["cpu"][iteration], records[name][iteration]
            # The loss of iteration 2 is computed with the weights after step 1.
            assert cuda["lm_loss"] == pytest.approx(cpu["lm_loss"], abs=1e-5), (name, iteration)
            assert cuda["grad_norm"] == pytest.approx(cpu["grad_norm"], rel=1e-5), (name,
                                                                                  iteration)
            assert cpu["grad_norm"] > 0.3  # clipping acted
            cpu_weights = pretrain.weights(tmp_path / "cpu", iteration)
            cuda_weights = pretrain.weights(tmp_path / name, iteration)
            assert set(cuda_weights) == set(cpu_weights) == set(start)
            for key, before in start.items():
                cpu_change = cpu_weights[key] - before
                # fp32 gradients of the two engines agree to ~1e-6 of each tensor's largest
                # element (the CPU engine's own fp32-vs-float64 error on these shapes is
                # ~1e-6); atol 1e-6 also covers the rounding of weights |w| <= ~1 (ulp
                # 1.2e-7); the changes are 1e-4 to 1e-2.
                torch.testing.assert_close(cuda_weights[key] - before, cpu_change, rtol=1e-3,
                                           atol=1e-6, msg=f"{name}, step {iteration}: {key}")
                if iteration == 1:
                    assert cpu_change.abs().max() > 1e-5, f"{key} did not train"


def resume_flags(corpus) -> list[str]:
    return flags(corpus, "--train-iters", "100", "--lr", "1e-2", "--min-lr", "1e-3",
                 "--lr-warmup-fraction", "0.1")


def deterministic_setup(pretrain) -> tuple[list[str], dict[str, str]]:
    """Flags and environment for bit-reproducible fp32 CUDA runs: the trainer's
    --deterministic-mode (torch's deterministic algorithms, the math SDPA kernel)."""
    return ["--deterministic-mode"], {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


@pytest.fixture(scope="module")
def resumed(pretrain, corpus, tmp_path_factory):
    """bf16 and deterministic fp32: an uninterrupted 100-iteration run that saves at 50 and
    100, then a run resumed from its iteration-50 checkpoint alone. Returns, per precision,
    (uninterrupted records, resumed records, uninterrupted dir, resumed dir)."""
    base = tmp_path_factory.mktemp("resume")
    det_flags, det_env = deterministic_setup(pretrain)
    setups = {"bf16": (["--bf16"], {}), "fp32": (det_flags, det_env)}
    full = {}
    for name, (extra, env) in setups.items():
        argv = resume_flags(corpus) + ["--device", "cuda", *extra, "--save",
                                       str(base / f"{name}_full"), "--save-interval", "50"]
        full[name] = pretrain.run(argv, base / f"{name}_full.log", env)
    pretrain.wait(*full.values())
    resumes = {}
    for name, (extra, env) in setups.items():
        load = pretrain.checkpoint_at(base / f"{name}_full", 50, base / f"{name}_resume")
        argv = resume_flags(corpus) + ["--device", "cuda", *extra, "--load", str(load),
                                       "--save", str(load)]
        resumes[name] = pretrain.run(argv, base / f"{name}_resume.log", env)
    pretrain.wait(*resumes.values())
    return {name: (pretrain.records(base / f"{name}_full" / "metrics.jsonl"),
                   pretrain.records(base / f"{name}_resume" / "metrics.jsonl"),
                   base / f"{name}_full", base / f"{name}_resume")
            for name in setups}


def test_bf16_training_learns_and_resumes_within_bf16_noise(resumed):
    full, again, _, _ = resumed["bf16"]
    assert sorted(full) == list(range(1, 101)) and sorted(again) == list(range(51, 101))
    losses = [full[i]["lm_loss"] for i in range(1, 101)]
    assert all(math.isfinite(x) for x in losses)
    # The corpus is a learnable Markov chain: from ln(512) = 6.2 to ~1.2 in 100 steps of the
    # CPU engine; demand a drop of 2 nats.
    assert losses[-1] < losses[0] - 2.0, (losses[0], losses[-1])
    # A resume restores weights, fp32 main parameters, Adam moments, LR schedule and data
    # position; what remains is nondeterministic kernel accumulation (flash-attention
    # backward) amplified by bf16 rounding of the weights: per-step losses of this model
    # move by several 1e-2 from one batch to the next, and a wrong restore (fresh
    # optimizer, shifted data, initial weights) by far more.
    diffs = [abs(again[i]["lm_loss"] - full[i]["lm_loss"]) for i in range(51, 101)]
    assert max(diffs) <= 5e-2 and sum(diffs) / len(diffs) <= 1e-2, max(diffs)
    assert full[51]["lm_loss"] < losses[0] - 2.0  # the resume started from trained weights


def test_fp32_resume_is_bit_exact_with_deterministic_algorithms(pretrain, resumed):
    full, again, full_dir, resume_dir = resumed["fp32"]
    assert sorted(again) == list(range(51, 101))
    for iteration in range(51, 101):
        assert again[iteration]["lm_loss"] == full[iteration]["lm_loss"], iteration
        assert again[iteration]["grad_norm"] == full[iteration]["grad_norm"], iteration
    final = pretrain.weights(full_dir, 100)
    resumed_final = pretrain.weights(resume_dir, 100)
    for name, tensor in final.items():
        assert torch.equal(resumed_final[name], tensor), name


def test_nan_step_is_skipped_and_counted_on_cuda(pretrain, corpus, tmp_path):
    """The loss of both micro-batches of iteration 3 is made NaN (micro-batch calls 5 and 6):
    the step must leave the weights as they were, count one skipped and one NaN iteration,
    and training goes on; under --exit-on-nan the run stops with the flag's message."""
    nan_env = {"GPU_TEST_NAN_CALLS": "5,6"}
    base = flags(corpus, "--train-iters", "5", "--device", "cuda")
    runs = {precision: pretrain.run(base + extra + ["--save", str(tmp_path / precision),
                                                    "--save-interval", "1"],
                                    tmp_path / f"{precision}.log", nan_env)
            for precision, extra in (("bf16", ["--bf16"]), ("fp32", []))}
    stop = pretrain.run(base + ["--bf16", "--exit-on-nan", "--metrics-file",
                                str(tmp_path / "stop.jsonl")],
                        tmp_path / "stop.log", nan_env, expect_failure=True)
    pretrain.wait(*runs.values(), stop)

    for precision in runs:
        records = pretrain.records(tmp_path / precision / "metrics.jsonl")
        assert sorted(records) == [1, 2, 3, 4, 5], precision
        assert math.isnan(records[3]["lm_loss"]), precision
        counts = [(records[i]["skipped_iterations"], records[i]["nan_iterations"])
                  for i in range(1, 6)]
        assert counts == [(0, 0), (0, 0), (1, 1), (1, 1), (1, 1)], precision
        assert all(math.isfinite(records[i]["lm_loss"]) for i in (1, 2, 4, 5)), precision
        before, skipped, after = (pretrain.weights(tmp_path / precision, i) for i in (2, 3, 4))
        for name, tensor in before.items():
            assert torch.equal(skipped[name], tensor), f"{precision}: skipped step moved {name}"
            assert torch.isfinite(after[name]).all(), f"{precision}: {name} after the skip"
        assert any(not torch.equal(after[n], skipped[n]) for n in skipped), precision

    assert "exit-on-nan" in stop.output()
    stopped = pretrain.records(tmp_path / "stop.jsonl") if (tmp_path / "stop.jsonl").exists() else {}
    assert max(stopped, default=0) <= 2  # nothing logged from the NaN step on

"""Methods are packages reached only through their spec: no core module names a method, and a
method registered from outside the core trains and is checkpointed like a built-in one."""

from __future__ import annotations

import ast
from pathlib import Path

from megatron_latent.methods.registry import MethodSpec, available_methods, register_method

from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
CORE = ["megatron_latent/training", "megatron_latent/inference", "megatron_latent/evaluation",
        "megatron_latent/models", "megatron_latent/arguments.py", "pretrain.py"]


def string_constants(path: Path) -> tuple[set[str], set[str]]:
    """(every string constant, the string constants inside comparisons) of a module."""
    tree = ast.parse(path.read_text())
    every = {node.value for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    compared = {node.value for compare in ast.walk(tree) if isinstance(compare, ast.Compare)
                for node in ast.walk(compare)
                if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return every, compared


def test_no_core_module_branches_on_a_method_name():
    names = set(available_methods())
    assert {"vanilla", "pondering"} <= names
    offenders = []
    for entry in CORE:
        target = ROOT / entry
        for path in ([target] if target.is_file() else sorted(target.rglob("*.py"))):
            every, compared = string_constants(path)
            # "vanilla" may appear as the default of --method; no name may be compared with.
            hits = (names - {"vanilla"}) & every | names & compared
            if hits:
                offenders.append(f"{path.relative_to(ROOT)}: {sorted(hits)}")
    assert not offenders, offenders


def test_a_method_registered_outside_the_core_trains_and_resumes(tmp_path):
    """A one-file method (the plain model with its own FLOPs count): --method finds it, the
    loop logs its FLOPs, and the checkpoint records it so the next run resumes with it."""
    from megatron_latent.models.language_model import build_pythia_model

    calls = []

    def build(model_config, runtime, device, options, pre_process=True, post_process=True):
        calls.append(options)
        return build_pythia_model(model_config, runtime, device, pre_process, post_process)

    if "outside_toy" not in available_methods():
        register_method(MethodSpec(
            name="outside_toy", description="the plain model under another name",
            build_model=build, forward_flops_per_token=lambda config, options, s, tp: 1e6))
    prefix = write_token_dataset(str(tmp_path / "data" / "tokens"))
    tokenizer = write_wordlevel_tokenizer(str(tmp_path / "tokenizer"))
    flags = TINY_FLAGS + [
        "--method", "outside_toy", "--data-path", prefix, "--split", "90,10,0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
        "--micro-batch-size", "2", "--global-batch-size", "2", "--eval-iters", "0",
        "--save", str(tmp_path / "ckpt"), "--metrics-file", str(tmp_path / "m.jsonl")]
    summary, trainer = run_training(flags + ["--train-iters", "2"])
    assert len(calls) == 1 and len(summary.history) == 2
    assert trainer.run.method == "outside_toy"
    resumed, _ = run_training(flags + ["--train-iters", "3", "--load", str(tmp_path / "ckpt")])
    assert len(calls) == 2 and [h["iteration"] for h in resumed.history] == [3]

"""tools/synthesize_latents.py with a project teacher sharded over two ranks (torchrun, TP=2,
greedy) writes the same latents as the same teacher run unsharded in a separate process.
Results are gathered before anything is asserted."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_latent.config import ModelConfig  # noqa: E402
from megatron_latent.methods.registry import get_method  # noqa: E402
from megatron_latent.models import hf_gpt_neox as mapping  # noqa: E402
from megatron_latent.training.checkpointing import write_weights_checkpoint  # noqa: E402
from megatron_latent.training.config import RunConfig  # noqa: E402

from training_fixtures import write_wordlevel_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=512,
                     seq_length=512, max_position_embeddings=512)
DOCS = [" ".join(f"t{(7 * i + j) % 500}" for j in range(30)) + ".\n\n"
        + " ".join(f"t{(11 * i + j) % 500}" for j in range(25)) + "." for i in range(3)]


def _tool():
    spec = importlib.util.spec_from_file_location(
        "synthesize_latents", ROOT / "tools" / "synthesize_latents.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _flags(root: Path, output: Path, tp: int) -> list[str]:
    return ["--input", str(root / "docs.jsonl"), "--output", str(output), "--teacher",
            "project", "--load", str(root / "ckpt"), "--device", "cpu", "--temperature", "0",
            "--max-tokens", "12", "--batch-size", "3", "--tensor-model-parallel-size", str(tp),
            "--log-interval", "1000"]


def test_tp2_project_teacher_equals_tp1(use_parallel):
    box = [tempfile.mkdtemp(prefix="ml-synth-tp-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    root = Path(box[0])
    reference = None
    if dist.get_rank() == 0:
        tokenizer = write_wordlevel_tokenizer(str(root / "tokenizer"))
        spec = get_method("vanilla")
        options = spec.options_from_args(argparse.Namespace())
        model = spec.build_model(CONFIG, None, "cpu", options, True, True)
        generator = torch.Generator().manual_seed(4)
        weights = {name: 0.4 * torch.randn(t.shape, generator=generator)
                   + (1.0 if name.endswith("norm.weight") else 0.0)
                   for name, t in mapping.model_to_canonical(model).items()}
        run = RunConfig(model=CONFIG).to_dict()
        run["tokenizer"].update(tokenizer_type="HuggingFaceTokenizer",
                                tokenizer_model=tokenizer)
        write_weights_checkpoint(str(root / "ckpt"), weights, run)
        (root / "docs.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                                 for i, t in enumerate(DOCS)))
        # The unsharded teacher, in a process of its own (this world has two ranks).
        launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                    "ROLE_NAME", "ROLE_WORLD_SIZE")
        env = {k: v for k, v in os.environ.items()
               if k not in launcher and not k.startswith(("TORCHELASTIC_", "PET_"))}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "synthesize_latents.py"),
                               *_flags(root, root / "tp1.jsonl", 1)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        reference = (done.returncode, done.stderr[-2000:])
    dist.barrier()
    use_parallel(2)
    code = _tool().main(_flags(root, root / "tp2.jsonl", 2))
    dist.barrier()
    found = {"code": code, "reference": reference}
    if dist.get_rank() == 0 and reference[0] == 0 and code == 0:
        found["equal"] = (root / "tp1.jsonl").read_text() == (root / "tp2.jsonl").read_text()
        lines = [json.loads(line) for line in (root / "tp2.jsonl").read_text().splitlines()]
        found["documents"] = len(lines)
        found["latent_chars"] = sum(len(z) for doc in lines for z in doc["latent_text"])
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, found)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
    for rank, result in enumerate(seen):
        assert result["code"] == 0, (rank, result)
    assert seen[0]["reference"][0] == 0, seen[0]["reference"]
    assert seen[0]["equal"] and seen[0]["documents"] == len(DOCS), seen[0]
    assert seen[0]["latent_chars"] > 100, seen[0]  # the teacher wrote text, not only stops

"""tools/generate.py on a trained checkpoint equals the library's generation in-process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from megatron_latent.data.tokenizers import build_tokenizer
from megatron_latent.inference import GenerationConfig, generate

from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]


def test_generate_tool_matches_library(single_process_parallel, tmp_path):
    prefix = write_token_dataset(str(tmp_path / "data" / "tokens"))
    tokenizer_path = write_wordlevel_tokenizer(str(tmp_path / "tokenizer"))
    ckpt = tmp_path / "ckpt"
    _, trainer = run_training(TINY_FLAGS + [
        "--method", "pondering", "--ponder-steps", "2",
        "--data-path", prefix, "--split", "90,10,0", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", tokenizer_path, "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "3", "--eval-iters", "0",
        "--save", str(ckpt)])
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=tokenizer_path)
    prompts = ["t1 t3 t5 t7", "t10 t11"]
    encoded = [tokenizer.tokenize(p) for p in prompts]
    model = trainer.engine.unwrapped_model().eval()
    expected = generate(model, encoded, GenerationConfig(max_new_tokens=6, greedy=True,
                                                         stop_token_ids=(tokenizer.eod,)))
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), "--load", str(ckpt), "--greedy",
         "--device", "cpu",
         "--max-new-tokens", "6", "--json", *sum([["--prompt", p] for p in prompts], [])],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["tokens"] for line in lines] == expected
    assert all(line["completion"] == tokenizer.detokenize(tokens)
               for line, tokens in zip(lines, expected))


def test_generate_tool_reports_bad_input(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), "--load",
                             str(tmp_path), "--prompt", "x"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "latest_checkpointed_iteration.txt" in result.stderr

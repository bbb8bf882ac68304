"""End to end: a tiny real run with three checkpoints, swept by tools/evaluate_checkpoints.py
through the real lm-eval backend on a local multiple-choice task, then analysed by
tools/loss_perspective.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megatron_latent.evaluation.sweep import read_jsonl

from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]

TASK_YAML = """task: toy_next_token
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _tool(name: str):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep_e2e")
    prefix = write_token_dataset(str(base / "data" / "tokens"))
    tokenizer = write_wordlevel_tokenizer(str(base / "tokenizer"))
    run_training(TINY_FLAGS + [
        "--data-path", prefix, "--split", "80,20,0", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", tokenizer, "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "6", "--save", str(base / "run"), "--save-interval", "2",
        "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1"])
    tasks = base / "tasks"
    tasks.mkdir()
    docs = [{"context": f"t{i} t{i + 2} t{i + 4}", "choices": [f"t{i + 5}", f"t{i + 40}",
                                                                   f"t{i + 200}"], "gold": 0}
            for i in range(1, 7)]
    (tasks / "toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "toy.yaml").write_text(TASK_YAML.format(data=tasks / "toy.jsonl"))
    return base


def test_sweep_and_analysis_on_a_real_run(single_process_parallel, workspace, capsys):
    for module in ("lm_eval", "scipy", "matplotlib"):
        pytest.importorskip(module)
    run, evals = workspace / "run", workspace / "run" / "evals"
    argv = [str(run), "--tasks", "toy_next_token", "--include-path", str(workspace / "tasks"),
            "--limit", "4", "--batch-size", "4", "--device", "cpu"]
    evaluate_checkpoints = _tool("evaluate_checkpoints")
    assert evaluate_checkpoints.main(argv) == 0
    out = capsys.readouterr().out
    assert "[3/3] iter_0000006:" in out and "toy_next_token acc=" in out

    metrics = read_jsonl(str(run / "metrics.jsonl"))
    for iteration in (2, 4, 6):
        record = json.loads((evals / f"iter_{iteration:07d}.json").read_text())
        toy = record["results"]["toy_next_token"]
        assert 0.0 <= toy["acc,none"] <= 1.0
        assert toy["acc_random,none"] == pytest.approx(1 / 3)
        assert isinstance(toy["acc_stderr,none"], float)
        assert record["lm_eval_version"] == "0.4.13" and record["n-shot"]["toy_next_token"] == 0
        logged = [r["lm_loss"] for r in metrics
                  if r["kind"] == "validation" and r["iteration"] == iteration]
        assert record["valid_loss"]["validation"] == pytest.approx(logged[-1], rel=1e-5)
        samples = read_jsonl(str(evals / record["samples_files"]["toy_next_token"]))
        assert len(samples) == 4 and all(len(s["loglikelihoods"]) == 3 for s in samples)
        assert all(isinstance(v, float) for s in samples for v in s["loglikelihoods"])
    assert [r["iteration"] for r in read_jsonl(str(evals / "evals.jsonl"))] == [2, 4, 6]

    assert evaluate_checkpoints.main(argv) == 0  # everything done: nothing re-evaluated
    assert capsys.readouterr().out.count("skipped") == 3
    assert len((evals / "evals.jsonl").read_text().splitlines()) == 3

    unknown = argv[:2] + ["no_such_toy_task"] + argv[3:]
    assert evaluate_checkpoints.main(unknown) == 2
    assert "unknown task 'no_such_toy_task'" in capsys.readouterr().err

    loss_perspective = _tool("loss_perspective")
    assert loss_perspective.main([str(run)]) == 0
    summary = json.loads((evals / "loss_perspective.json").read_text())
    assert summary["tasks"]["toy_next_token"]["eta"]["n_checkpoints"] == 3
    assert (evals / "toy_next_token_acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

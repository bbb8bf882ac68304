"""The per-checkpoint sweep: resumable after a crash, held-out loss equal to the trainer's,
records and errors. lm-eval itself is replaced by a fake here (test_evaluation_sweep_e2e.py
runs the real backend)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from megatron_latent.config import ConfigError
from megatron_latent.evaluation import sweep as sweep_module
from megatron_latent.evaluation.sweep import SweepSettings, append_jsonl, read_jsonl, sweep

from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = [2, 4, 6]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run with checkpoints at iterations 2, 4 and 6 and validation every 2."""
    base = tmp_path_factory.mktemp("sweep_run")
    prefix = write_token_dataset(str(base / "data" / "tokens"))
    tokenizer = write_wordlevel_tokenizer(str(base / "tokenizer"))
    save = base / "run"
    run_training(TINY_FLAGS + [
        "--data-path", prefix, "--split", "80,20,0", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", tokenizer, "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "6", "--save", str(save), "--save-interval", "2",
        "--eval-interval", "2", "--eval-iters", "2", "--log-interval", "2"])
    return str(save)


def fake_results(iteration: int) -> dict:
    """lm-eval's results dict for one 3-choice task of 4 documents (gold 0)."""
    samples, correct = [], []
    for doc in range(4):
        lls = [-2.0 + 0.2 * iteration - doc, -2.0, -3.0]
        acc = float(max(range(3), key=lambda i: lls[i]) == 0)
        correct.append(acc)
        samples.append({
            "doc_id": doc, "doc": {"q": f"q{doc}"}, "target": 0,
            "arguments": [(f"q{doc}:", " a"), (f"q{doc}:", " bb"), (f"q{doc}:", " c")],
            "resps": [[(ll, False)] for ll in lls], "filtered_resps": [(ll, False) for ll in lls],
            "filter": "none", "metrics": ["acc"], "acc": acc})
    return {
        "results": {"toy": {"alias": "toy", "acc,none": sum(correct) / 4,
                            "acc_stderr,none": "N/A"}},
        "versions": {"toy": 1}, "n-shot": {"toy": 0},
        "configs": {"toy": {"task": "toy", "output_type": "multiple_choice",
                            "target_delimiter": " "}},
        "higher_is_better": {"toy": {"acc": True}}, "config": {"model": "fake"},
        "lm_eval_version": "0.4.13", "samples": {"toy": samples},
    }


class FakeEvaluate:
    def __init__(self, fail_at: int | None = None):
        self.calls: list[dict] = []
        self.fail_at = fail_at

    def __call__(self, load, tasks, **kwargs):
        self.calls.append(dict(kwargs, load=load, tasks=tasks))
        if kwargs["iteration"] == self.fail_at:
            raise RuntimeError("simulated crash")
        return fake_results(kwargs["iteration"])


def run_sweep(run_dir, out, evaluate, iterations=None, **settings):
    return sweep(run_dir, SweepSettings(tasks=["toy"], **settings), output_dir=str(out),
                 iterations=iterations, device=torch.device("cpu"), evaluate_fn=evaluate,
                 check_task_names=False, log=lambda line: None)


def test_crash_then_rerun_evaluates_only_the_missing_checkpoints(run_dir, tmp_path):
    out = tmp_path / "evals"
    crashing = FakeEvaluate(fail_at=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_sweep(run_dir, out, crashing)
    assert [c["iteration"] for c in crashing.calls] == [2, 4]
    first = (out / "iter_0000002.json").read_bytes()
    assert not (out / "iter_0000004.json").exists()
    assert [r["iteration"] for r in read_jsonl(str(out / "evals.jsonl"))] == [2]
    assert not [name for name in os.listdir(out) if ".tmp-" in name]

    resumed = FakeEvaluate()
    assert run_sweep(run_dir, out, resumed) == [4, 6]
    assert [c["iteration"] for c in resumed.calls] == [4, 6]
    assert (out / "iter_0000002.json").read_bytes() == first
    lines = (out / "evals.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == ITERATIONS

    again = FakeEvaluate()
    assert run_sweep(run_dir, out, again) == [] and again.calls == []
    assert len((out / "evals.jsonl").read_text().splitlines()) == 3


def test_record_contents_match_the_run(run_dir, tmp_path):
    out = tmp_path / "evals"
    evaluate = FakeEvaluate()
    run_sweep(run_dir, out, evaluate, limit=4)
    assert evaluate.calls[0]["limit"] == 4 and evaluate.calls[0]["log_samples"] is True
    metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    for iteration in ITERATIONS:
        record = json.loads((out / f"iter_{iteration:07d}.json").read_text())
        assert {"results", "versions", "n-shot", "config", "lm_eval_version"} <= set(record)
        assert "samples" not in record
        assert record["iteration"] == iteration
        assert record["consumed_tokens"] == iteration * 4 * 32
        train = [r for r in metrics if r["kind"] == "train" and r["iteration"] == iteration]
        valid = [r for r in metrics if r["kind"] == "validation" and r["iteration"] == iteration]
        assert record["train_loss"] == train[-1]["lm_loss"]
        assert "log interval" in record["train_loss_source"]
        # The sweep's held-out loss is the trainer's validation loss (same slice, same mask).
        assert record["valid_loss"]["validation"] == pytest.approx(valid[-1]["lm_loss"],
                                                                   rel=1e-5)
        assert record["valid_loss_source"].startswith("computed")
        assert len(record["fingerprints"]["tokenizer"]) == 64
        assert len(record["fingerprints"]["validation_data"]) == 64
        toy = record["results"]["toy"]
        assert toy["acc_random,none"] == pytest.approx(1 / 3)   # mc_metrics, via the sweep
        assert isinstance(toy["acc_stderr,none"], float)
        assert record["run"]["method"] == "vanilla" and record["run"]["num_layers"] == 2
        assert record["sweep"]["settings"]["limit"] == 4
        samples = read_jsonl(str(out / record["samples_files"]["toy"]))
        assert len(samples) == 4 and samples[0]["gold"] == 0
        assert samples[0]["choices"] == ["a", "bb", "c"]
        assert all(isinstance(v, float) for v in samples[0]["loglikelihoods"])
    line = read_jsonl(str(out / "evals.jsonl"))[0]
    assert {"iteration", "consumed_tokens", "train_loss", "valid_loss/validation",
            "toy/acc,none", "toy/acc_random,none"} <= set(line)


def test_other_settings_are_not_done_and_a_lost_line_is_restored(run_dir, tmp_path):
    out = tmp_path / "evals"
    run_sweep(run_dir, out, FakeEvaluate(), iterations=[2, 4])
    changed = FakeEvaluate()
    run_sweep(run_dir, out, changed, iterations=[4], num_fewshot=2)
    assert [c["iteration"] for c in changed.calls] == [4]
    assert json.loads((out / "iter_0000004.json").read_text())["sweep"]["settings"][
        "num_fewshot"] == 2
    # A crash between writing iter_*.json and appending its line: the rerun appends it once.
    series = out / "evals.jsonl"
    lines = series.read_text().splitlines()
    series.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])  # cut mid-line
    rerun = FakeEvaluate()
    run_sweep(run_dir, out, rerun, iterations=[4], num_fewshot=2)
    assert rerun.calls == []
    records = read_jsonl(str(series))
    assert [r["iteration"] for r in records] == [2, 4, 4]
    assert len(series.read_text().splitlines()) == 3


def test_selection_and_errors(run_dir, tmp_path):
    pytest.importorskip("lm_eval")  # a run evaluated on a host without lm-eval
    assert sweep_module.select_iterations(ITERATIONS, every=4) == [4]
    assert sweep_module.select_iterations(ITERATIONS, iterations=[6, 2]) == [2, 6]
    with pytest.raises(ConfigError, match=r"no checkpoint for iteration\(s\) \[3\]"):
        sweep_module.select_iterations(ITERATIONS, iterations=[3])
    with pytest.raises(ConfigError, match="no iter_\\* checkpoints"):
        run_sweep(str(tmp_path), tmp_path / "evals", FakeEvaluate())
    with pytest.raises(ConfigError, match="unknown task 'no_such_task_xyz'"):
        sweep_module.check_tasks(["no_such_task_xyz"], None)


def test_cli_reports_errors(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import evaluate_checkpoints
    finally:
        sys.path.pop(0)
    assert evaluate_checkpoints.main([str(tmp_path), "--tasks", "toy"]) == 2
    assert "holds no iter_* checkpoints" in capsys.readouterr().err


def test_metrics_records_and_jsonl_repair(tmp_path):
    records = [{"kind": "train", "iteration": 10, "lm_loss": 3.0},
               {"kind": "train", "iteration": 10, "lm_loss": 2.5},  # resumed run: last wins
               {"kind": "validation", "iteration": 10, "lm_loss": 2.7},
               {"kind": "validation/web", "iteration": 10, "lm_loss": 2.9}]
    assert sweep_module.train_loss_at(records, 10, 5)[0] == 2.5
    assert sweep_module.train_loss_at(records, 11, 5) == (
        None, "no train record at iteration 11 in metrics.jsonl")
    assert sweep_module.logged_valid_losses(records, 10) == {"validation": 2.7, "web": 2.9}
    path = str(tmp_path / "s.jsonl")
    append_jsonl(path, {"a": 1})
    with open(path, "a") as handle:
        handle.write('{"a": ')
    append_jsonl(path, {"a": 2})
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_size_weighted_groups_get_pooled_continuous_metrics():
    one, two = fake_results(2), fake_results(6)
    two["samples"]["toy"] = two["samples"]["toy"][:2]  # subtasks of 4 and 2 documents
    accs = [s["acc"] for s in one["samples"]["toy"] + two["samples"]["toy"]]
    results = {
        "results": {"grp": {"acc,none": sum(accs) / 6, "acc_stderr,none": "N/A"},
                    "a": {"acc,none": 0.0}, "b": {"acc,none": 0.0}},
        "group_subtasks": {"grp": ["a", "b"], "a": [], "b": []},
        "configs": {"a": one["configs"]["toy"], "b": one["configs"]["toy"]},
        "samples": {"a": one["samples"]["toy"], "b": two["samples"]["toy"]}}
    sweep_module.add_group_metrics(results)
    group = results["results"]["grp"]
    assert group["acc_random,none"] == pytest.approx(1 / 3)
    assert isinstance(group["acc_stderr,none"], float) and "ccp,none" in group
    results["results"]["grp"] = {"acc,none": 0.123}  # not the pooled mean: left alone
    sweep_module.add_group_metrics(results)
    assert results["results"]["grp"] == {"acc,none": 0.123}


def test_a_shared_heldout_seed_gives_runs_of_other_seeds_one_loss_axis(run_dir, tmp_path):
    """The run trained with seed 7; swept with --heldout-seed 3 its held-out loss is the loss
    on seed 3's slice (not the slice its training logged), and its validation fingerprint is
    the one any run swept with seed 3 gets."""
    import dataclasses

    import torch

    from megatron_latent.inference.loading import load_model_for_inference
    from megatron_latent.training.data import build_run_tokenizer

    own = tmp_path / "own"
    run_sweep(run_dir, own, FakeEvaluate(), iterations=[6])
    shared = tmp_path / "shared"
    run_sweep(run_dir, shared, FakeEvaluate(), iterations=[6], heldout_seed=3)
    own_record = json.loads((own / "iter_0000006.json").read_text())
    shared_record = json.loads((shared / "iter_0000006.json").read_text())

    run = sweep_module.read_run_config(run_dir, 6)
    assert run.training.seed == 7
    seed3 = dataclasses.replace(run, training=dataclasses.replace(run.training, seed=3))
    tokenizer = build_run_tokenizer(seed3)
    loaded = load_model_for_inference(run_dir, 6, device=torch.device("cpu"))
    expected = sweep_module.heldout_losses(
        loaded.model, seed3, sweep_module.validation_sets(seed3, tokenizer),
        torch.device("cpu"))
    assert shared_record["valid_loss"]["validation"] == pytest.approx(
        expected["validation"], rel=1e-6)
    assert shared_record["valid_loss"]["validation"] != pytest.approx(
        own_record["valid_loss"]["validation"], rel=1e-6)
    assert shared_record["fingerprints"]["validation_data"] == \
        sweep_module.fingerprints(seed3, tokenizer)["validation_data"]
    assert shared_record["fingerprints"]["validation_data"] != \
        own_record["fingerprints"]["validation_data"]

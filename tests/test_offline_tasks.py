"""Offline lm-eval tasks from the demo corpus's held-out plays: content, determinism, and a
real lm-eval run with the network switched off."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_latent.evaluation.offline_tasks import (
    TASKS,
    TaskOptions,
    classify_lines,
    validation_documents,
    write_tasks,
)

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = TaskOptions(num_docs=30, num_rolling_docs=3, rolling_max_chars=1500)


def _make(tmp_path: Path, name: str, *args: str) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    import make_eval_tasks

    out = tmp_path / name
    assert make_eval_tasks.main(["--output-dir", str(out), *args]) == 0
    return out


def _records(directory: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (directory / f"{task}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return {d.id: d.text for d in validation_documents()}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    write_tasks(str(out), OPTIONS)
    return out


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    args = ["--num-docs", "20", "--num-rolling-docs", "2"]
    a = _make(tmp_path, "a", *args, "--seed", "7")
    b = _make(tmp_path, "b", *args, "--seed", "7")
    c = _make(tmp_path, "c", *args, "--seed", "8")
    for task in TASKS:
        name = f"{task}.jsonl"
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
        # YAMLs differ only by the absolute path of their data
        assert (a / f"{task}.yaml").read_text().replace(str(a), "X") == \
            (b / f"{task}.yaml").read_text().replace(str(b), "X")
    assert (a / "README.md").read_text() == (b / "README.md").read_text()
    assert len(_records(a, "demo_next_line")) == 20


def test_the_held_out_split_is_the_demo_split(tmp_path, sources):
    """The tasks come from the validation file prepare_demo_corpus.py writes (make demo)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import prepare_demo_corpus

    assert prepare_demo_corpus.main(["--output-dir", str(tmp_path / "data")]) == 0
    valid = tmp_path / "data" / "shakespeare_valid.jsonl"
    from_file = [json.loads(line) for line in valid.read_text().splitlines()]
    assert {r["id"]: r["text"] for r in from_file} == sources
    train_ids = {json.loads(line)["play"] for line in
                 (tmp_path / "data" / "shakespeare_train.jsonl").read_text().splitlines()}
    assert not train_ids & {i.split("/")[0] for i in sources}
    a = _make(tmp_path, "default", "--num-docs", "10")
    b = _make(tmp_path, "from_file", "--num-docs", "10", "--input", str(valid))
    for task in TASKS:
        assert _records(a, task) == _records(b, task)


def test_next_line_gold_follows_its_context(tasks_dir, sources):
    records = _records(tasks_dir, "demo_next_line")
    assert len(records) == OPTIONS.num_docs
    all_lines = {line for text in sources.values() for line in text.split("\n")}
    for r in records:
        text = sources[r["source"]]
        gold = r["choices"][r["gold"]]
        assert text.split("\n")[r["line"]] == gold
        assert r["context"] + gold + "\n" in text + "\n"  # the true continuation, verbatim
        assert len(r["context"].strip().split("\n")) >= OPTIONS.context_lines
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        for k, choice in enumerate(r["choices"]):
            assert choice in all_lines  # distractors are lines of the held-out plays
            if k != r["gold"]:
                assert choice != gold and choice not in r["context"].split("\n")
                assert not choice.startswith("[") and not choice.endswith("]")
    golds = [r["gold"] for r in records]
    assert len(set(golds)) == 4  # positions are shuffled


def test_distractors_differ_from_a_repeated_gold_line():
    from megatron_latent.evaluation.offline_tasks import SourceDocument, next_line_docs

    body = "\n".join("I say the same thing." if k % 2 else f"Line number {k} is here."
                     for k in range(40))
    docs = [SourceDocument(f"p/{d}", f"Play\nSCENE {d}\n\nKING:\n{body}") for d in range(3)]
    records = next_line_docs(docs, TaskOptions(num_docs=40, seed=3))
    repeated = [r for r in records if r["choices"][r["gold"]] == "I say the same thing."]
    assert len(repeated) > 5
    for r in records:
        assert len(set(r["choices"])) == 4


def test_cloze_target_is_the_last_word(tasks_dir, sources):
    records = _records(tasks_dir, "demo_cloze")
    assert len(records) == OPTIONS.num_docs
    for r in records:
        line = sources[r["source"]].split("\n")[r["line"]]
        assert r["target"] == " " + r["word"] and r["word"]
        assert (r["context"] + r["target"]) in sources[r["source"]]
        last_line = r["context"].split("\n")[-1]
        assert line.startswith(last_line + r["target"])
        rest = line[len(last_line + r["target"]):]
        assert not re.search(r"[A-Za-z0-9]", rest), (line, r["word"])
        assert r["word"] == re.findall(r"[A-Za-z]+(?:['-][A-Za-z]+)*", line)[-1]


def test_rolling_documents_are_scene_prefixes(tasks_dir, sources):
    records = _records(tasks_dir, "demo_wikitext_style")
    assert len(records) == OPTIONS.num_rolling_docs
    for r in records:
        assert sources[r["source"]].startswith(r["text"])
        assert len(r["text"]) <= OPTIONS.rolling_max_chars
        assert r["text"] == sources[r["source"]] or \
            sources[r["source"]][len(r["text"]):].lstrip(" ").startswith("\n")


def test_classify_lines():
    text = ("Play\nACT I\nSCENE I. A room.\n\n[Enter A and\nB.]\n\nKING EDWARD:\n"
            "Well met, my lord: how now?\nAnd so it ends:\n\nFirst Lord:\nAye.")
    kinds = [k for _, k in classify_lines(text)]
    assert kinds == ["header", "header", "header", "blank", "direction", "direction", "blank",
                     "speaker", "spoken", "spoken", "blank", "speaker", "spoken"]


_EVALUATE = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
from megatron_latent.evaluation.mc_metrics import add_continuous_metrics
res = lm_eval.simple_evaluate(
    model="hf", model_args=f"pretrained={sys.argv[1]},dtype=float32", device="cpu",
    tasks=["demo_offline", "piqa_local"], limit=int(sys.argv[3]), log_samples=True,
    bootstrap_iters=0, batch_size=8,
    task_manager=TaskManager(include_path=sys.argv[2], include_defaults=False))
add_continuous_metrics(res)
requests = {t: [(s["arguments"], s["target"], s["doc"]["source"]) for s in res["samples"][t]]
            for t in ("demo_next_line", "demo_cloze")}
print("RESULTS=" + json.dumps({"results": res["results"], "n": res["n-samples"],
                               "requests": requests}))
"""


def test_lm_eval_runs_the_tasks_offline(tmp_path, sources):
    pytest.importorskip("lm_eval")
    from test_evaluation_metrics import save_tiny_hf_model

    model_dir = save_tiny_hf_model(tmp_path / "model", max_positions=1024)
    piqa = tmp_path / "piqa_valid.jsonl"  # a local copy of PIQA, in the Hub dataset's fields
    piqa.write_text("".join(json.dumps({"goal": f"How to sit {k}", "sol1": "on the mat",
                                        "sol2": "on the king", "label": k % 2}) + "\n"
                            for k in range(3)))
    out = _make(tmp_path, "tasks", "--num-docs", "6", "--num-rolling-docs", "2",
                "--rolling-max-chars", "800", "--standard-task", f"piqa={piqa}")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _EVALUATE, model_dir, str(out), "5"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS="))
    got = json.loads(line[len("RESULTS="):])
    results = got["results"]
    assert got["n"]["demo_next_line"]["effective"] == 5
    assert got["n"]["piqa_local"]["effective"] == 3
    next_line = results["demo_next_line"]
    assert 0 <= next_line["acc,none"] <= 1 and next_line["num_docs_scored"] == 5
    assert next_line["brier_random,none"] == pytest.approx(0.75)
    assert {"acc,none", "perplexity,none"} <= set(results["demo_cloze"])
    assert results["demo_cloze"]["perplexity,none"] > 1
    rolling = results["demo_wikitext_style"]
    assert {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"} <= set(rolling)
    assert rolling["bits_per_byte,none"] > 0
    assert results["piqa_local"]["ccp_random,none"] == pytest.approx(0.5)
    # what the model is asked: context + true continuation is the play's text, verbatim
    for arguments, gold, source in got["requests"]["demo_next_line"]:
        context, continuation = arguments[gold]
        assert context + continuation + "\n" in sources[source] + "\n"
    for [(context, continuation)], target, source in got["requests"]["demo_cloze"]:
        assert continuation == target and context + continuation in sources[source]

"""tools/bolt_em.py: BoLT's EM driver on tiny data, in process. One iteration runs end to end
(the vanilla base grown with the four tokens, E-step, data, M-step from the base, ELBO); a
rerun skips every finished stage; a failed M-step resumes without redoing the E-step or the
data; the summary's FLOPs are the sum of the stages' reported counts."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from training_fixtures import TINY_FLAGS, run_training, write_wordlevel_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 126
POSITIONS = 96
TEXTS = ["t1 t2 t3 t4.\n\nt5 t6 t7.\n\nt8 t9 t10 t11.\n\nt12 t13.",
         "t20 t21.\n\nt22 t23 t24 t25.",
         "t30 t31 t32 t33 t34 t35.\n\nt36.\n\nt37 t38.\n\nt39 t40.\n\nt41 t42 t43."]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _shape_flags() -> list[str]:
    """TINY_FLAGS without --vocab-size (the M-step takes the grown tokenizer's)."""
    flags = list(TINY_FLAGS)
    at = flags.index("--vocab-size")
    del flags[at:at + 2]
    return flags + ["--max-position-embeddings", str(POSITIONS)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(vanilla base checkpoint, its tokenizer, train docs, valid docs)."""
    root = tmp_path_factory.mktemp("bolt_em")
    tok = write_wordlevel_tokenizer(str(root / "tok"), VOCAB)
    flags = list(TINY_FLAGS)
    flags[flags.index("--vocab-size") + 1] = str(VOCAB)
    run_training(flags + ["--max-position-embeddings", str(POSITIONS), "--mock-data",
                          "--micro-batch-size", "2", "--global-batch-size", "2",
                          "--eval-iters", "0", "--train-iters", "2",
                          "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok,
                          "--save", str(root / "base")])
    from megatron_latent.distributed import destroy_parallel

    destroy_parallel()
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                             for i, t in enumerate(TEXTS)))
    valid = root / "valid.jsonl"
    valid.write_text("".join(json.dumps({"id": f"v{i}", "text": t}) + "\n"
                             for i, t in enumerate(TEXTS[:2])))
    return root / "base", tok, train, valid


def _argv(inputs, work: Path) -> list[str]:
    base, tok, train, valid = inputs
    mstep = _shape_flags() + ["--micro-batch-size", "2", "--global-batch-size", "2",
                              "--train-iters", "3", "--eval-iters", "1", "--eval-interval", "3"]
    return ["--base", str(base), "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", tok, "--train-docs", str(train), "--valid-docs", str(valid),
            "--iterations", "1", "--work-dir", str(work), "--num-samples", "2",
            "--max-new-tokens", "4", "--max-prompt-tokens", "40", "--max-seq-length", "60",
            "--estep-batch-size", "8", "--device", "cpu", "--in-process",
            "--mstep-args", " ".join(mstep)]


def _log(work: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()[2:4]) for line in (work / "stages.log").read_text().splitlines()]


def test_one_iteration_rerun_and_flops(inputs, tmp_path, capsys):
    em = _tool("bolt_em")
    work = tmp_path / "work"
    assert em.main(_argv(inputs, work)) == 0
    ran = [name for name, what in _log(work) if what == "run"]
    assert ran == ["base", "valid_raw", "iter_1/estep", "iter_1/data", "iter_1/mstep",
                   "iter_1/elbo"]
    for stage in ("estep", "data", "mstep", "elbo"):
        assert json.loads((work / "iter_1" / stage / "stage.json").read_text())["key"]
    assert (work / "iter_1" / "mstep" / "checkpoint" / "latest_checkpointed_iteration.txt"
            ).read_text().strip() == "3"
    summary = json.loads((work / "summary.json").read_text())
    (row,) = summary["rows"]
    assert row["iteration"] == 1 and row["training_tokens"] == 3 * 2 * 32
    assert row["elbo_1_per_token"] < 0 and row["elbo_2_per_token"] >= row["elbo_1_per_token"]
    assert math.isfinite(row["valid_loss"])
    # the FLOPs are the sum of the stages' reported counts
    stages = {s: json.loads((work / "iter_1" / s / "stage.json").read_text())["result"]
              for s in ("estep", "mstep")}
    side = [json.loads(line) for line in (work / "iter_1" / "estep" /
                                          "latents.jsonl.candidates.jsonl").read_text()
            .splitlines()]
    assert stages["estep"]["flops"] == pytest.approx(sum(r["flops"] for r in side))
    assert stages["estep"]["sampled_tokens"] == sum(r["sampled_tokens"] for r in side) > 0
    metrics = [json.loads(line) for line in (work / "iter_1" / "mstep" / "metrics.jsonl")
               .read_text().splitlines()]
    last = [m for m in metrics if m["kind"] == "train"][-1]
    executed = last.get("executed_tokens") or last["consumed_tokens"]
    assert stages["mstep"]["executed_tokens"] == executed > 0
    assert stages["mstep"]["flops"] == pytest.approx(
        stages["mstep"]["flops_per_token"] * executed)
    assert row["sampling_flops"] + row["scoring_flops"] == pytest.approx(
        stages["estep"]["flops"])
    assert row["training_flops"] == stages["mstep"]["flops"]
    assert row["flops"] == pytest.approx(stages["estep"]["flops"] + stages["mstep"]["flops"])
    assert row["cumulative_flops"] == pytest.approx(row["flops"])
    assert "| iter |" in (work / "summary.md").read_text()
    assert "BoLT EM summary" in capsys.readouterr().out
    # a rerun skips every finished stage
    (work / "stages.log").unlink()
    assert em.main(_argv(inputs, work)) == 0
    assert {what for _, what in _log(work)} == {"skip"} and len(_log(work)) == 6
    assert json.loads((work / "summary.json").read_text())["rows"] == summary["rows"]


def test_failed_mstep_resumes_without_redoing_the_estep(inputs, tmp_path, monkeypatch):
    em = _tool("bolt_em")
    work = tmp_path / "work"
    real = em.Driver.tool
    calls: list[str] = []
    loads: list[list[str]] = []
    failures = [1]

    def failing(self, script, argv, log):
        calls.append(script)
        if script == "pretrain.py":
            argv = [str(a) for a in argv]
            loads.append(argv[argv.index("--load"):])
            if failures:  # the trainer saved a checkpoint, then the stage died
                failures.pop()
                real(self, script, argv, log)
                raise em.EMError("simulated M-step failure")
        return real(self, script, argv, log)

    monkeypatch.setattr(em.Driver, "tool", failing)
    assert em.main(_argv(inputs, work)) == 1
    assert not (work / "iter_1" / "mstep" / "stage.json").exists()
    estep_result = (work / "iter_1" / "estep" / "stage.json").read_text()
    calls.clear()
    (work / "stages.log").unlink()
    assert em.main(_argv(inputs, work)) == 0
    log = dict(entry for entry in _log(work) if entry[1] != "done")
    assert log == {"base": "skip", "valid_raw": "skip", "iter_1/estep": "skip",
                   "iter_1/data": "skip", "iter_1/mstep": "run", "iter_1/elbo": "run"}
    assert calls == ["pretrain.py", "tools/bolt_estep.py"]  # the M-step and the ELBO only
    assert (work / "iter_1" / "estep" / "stage.json").read_text() == estep_result
    # the first M-step restarted from the grown base, the rerun resumed its own checkpoint
    assert loads[0] == ["--load", str(work / "base" / "checkpoint"), "--finetune"]
    assert loads[1] == ["--load", str(work / "iter_1" / "mstep" / "checkpoint")]
    assert json.loads((work / "summary.json").read_text())["rows"][0]["training_tokens"] == 192


def test_refuses_a_base_without_latent_tokens(inputs, tmp_path, capsys):
    em = _tool("bolt_em")
    argv = _argv(inputs, tmp_path / "work")
    at = argv.index("--tokenizer-type")
    del argv[at:at + 4]
    assert em.main(argv) == 1
    assert "lacks the four latent tokens" in capsys.readouterr().err

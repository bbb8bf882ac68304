"""The loss-perspective analysis on synthetic evals written here: pooled correlations equal
scipy's, η by the project's rule against hand-worked cases, refusal of incomparable runs,
and the plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

stats = pytest.importorskip("scipy.stats")

from megatron_latent.evaluation.analysis import (  # noqa: E402
    IncomparableRunsError,
    Point,
    analyse,
    loss_threshold,
    plot_task,
)

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"

# Two runs whose checkpoints interleave in loss: (iteration, valid loss, acc, acc SE, brier).
RUN_A = [(100, 3.0, 0.25, 0.05, 0.76), (200, 2.6, 0.40, 0.05, 0.74),
         (300, 2.2, 0.50, 0.05, 0.60)]
RUN_B = [(100, 2.8, 0.26, 0.05, 0.75), (200, 2.4, 0.27, 0.05, 0.72),
         (300, 2.0, 0.60, 0.05, 0.55), (400, 1.9, 0.65, 0.04, 0.50)]
FINGERPRINTS = {
    "tokenizer": "a" * 64, "validation_data": "b" * 64, "training_data": "c" * 64,
    "definitions": {"tokenizer": {"vocab_size": 512, "eod": 511},
                    "validation_data": {"blend": ["valid"], "samples": 64},
                    "training_data": {"blend": ["train"]}}}


def write_run(directory: Path, checkpoints, *, fingerprints=None, method="vanilla",
              layers=2) -> Path:
    """iter_*.json files as the sweep writes them (the fields the analysis reads)."""
    evals = directory / "evals"
    evals.mkdir(parents=True)
    for iteration, loss, acc, se, brier in checkpoints:
        record = {
            "iteration": iteration, "consumed_tokens": iteration * 1000,
            "train_loss": loss + 0.1, "valid_loss": {"validation": loss},
            "results": {"toy": {"acc,none": acc, "acc_stderr,none": se,
                                "acc_random,none": 0.25, "brier,none": brier,
                                "brier_stderr,none": 0.05, "brier_random,none": 0.75}},
            "higher_is_better": {"toy": {"acc": True}},
            "fingerprints": fingerprints or FINGERPRINTS,
            "run": {"method": method, "preset": None, "num_layers": layers, "hidden_size": 32},
        }
        (evals / f"iter_{iteration:07d}.json").write_text(json.dumps(record))
    return directory


@pytest.fixture
def runs(tmp_path):
    return [str(write_run(tmp_path / "a", RUN_A)),
            str(write_run(tmp_path / "b", RUN_B, method="pondering", layers=4))]


def test_correlations_are_scipys_on_the_pooled_pairs(runs, tmp_path):
    summary = analyse(runs, str(tmp_path / "out"))
    pooled = RUN_A + RUN_B
    losses, accs = [c[1] for c in pooled], [c[2] for c in pooled]
    corr = summary["tasks"]["toy"]["correlations"]
    assert corr["n"] == 7
    assert corr["spearman"] == pytest.approx(stats.spearmanr(losses, accs)[0])
    assert corr["spearman_p"] == pytest.approx(stats.spearmanr(losses, accs)[1])
    assert corr["pearson"] == pytest.approx(stats.pearsonr(losses, accs)[0])
    brier = analyse(runs, str(tmp_path / "brier"), metric="brier")["tasks"]["toy"]
    assert brier["correlations"]["pearson"] == pytest.approx(
        stats.pearsonr(losses, [c[4] for c in pooled])[0])
    labels = {p["label"] for p in summary["tasks"]["toy"]["points"]}
    assert labels == {"vanilla L2-H32", "pondering L4-H32"}


def test_eta_pools_runs_and_stops_at_the_first_dip_back_to_random(runs, tmp_path):
    # By loss, pooled: 1.9 (.65, beats .25 by .40 > .04), 2.0 (.60 ok), 2.2 (.50 ok),
    # 2.4 (.27: .02 < .05, back at random), 2.6 (.40 ok again), 2.8 (.26), 3.0 (.25).
    # η = 2.2: 2.6 beats random but a lower-loss checkpoint (2.4) does not.
    eta = analyse(runs, str(tmp_path / "out"))["tasks"]["toy"]["eta"]
    assert eta["eta"] == 2.2 and eta["status"] == "threshold"
    assert eta["n_checkpoints"] == 7 and eta["n_beating_random"] == 4
    assert eta["se_source"] == "results stderr"
    # On the training-loss axis every loss is 0.1 higher.
    eta = analyse(runs, str(tmp_path / "t"), x="train_loss")["tasks"]["toy"]["eta"]
    assert eta["eta"] == pytest.approx(2.3)


def test_eta_for_brier_counts_lower_as_better(runs, tmp_path):
    # random 0.75, SE 0.05: 1.9 (.50 ok), 2.0 (.55 ok), 2.2 (.60 ok), 2.4 (.72: .03, fails).
    summary = analyse(runs, str(tmp_path / "out"), metric="brier")
    toy = summary["tasks"]["toy"]
    assert toy["higher_is_better"] is False
    assert toy["eta"]["eta"] == 2.2 and toy["eta"]["status"] == "threshold"


def _points(rows, random=0.25):
    return [Point("r", i, None, loss, score, se, random) for i, (loss, score, se) in
            enumerate(rows)]


def test_eta_cases_by_hand():
    # The lowest-loss checkpoint is at random: none, even though a higher-loss one beats it.
    none = loss_threshold(_points([(2.0, 0.26, 0.05), (2.5, 0.50, 0.05), (3.0, 0.25, 0.05)]),
                          True)
    assert none["eta"] is None and none["status"] == "none"
    # Beating random by exactly one SE is not "more than 1 SE" (0.75 - 0.5 == 0.25).
    exact = loss_threshold(_points([(2.0, 0.9, 0.1), (2.5, 0.75, 0.25)], random=0.5), True)
    assert exact["eta"] == 2.0
    # Every checkpoint beats random: η is the highest loss seen (a lower bound).
    every = loss_threshold(_points([(2.0, 0.9, 0.1), (2.5, 0.8, 0.1)], random=0.5), True)
    assert every["eta"] == 2.5 and every["status"] == "all"
    # Two checkpoints at the same loss, one at random: that loss is not below η.
    tie = loss_threshold(_points([(2.0, 0.9, 0.1), (2.2, 0.9, 0.1), (2.2, 0.5, 0.1)],
                                 random=0.5), True)
    assert tie["eta"] == 2.0
    missing = loss_threshold(_points([(2.0, 0.9, None)], random=0.5), True)
    assert missing["status"] == "undetermined" and missing["eta"] is None


def test_refuses_runs_with_other_fingerprints_unless_forced(tmp_path):
    a = write_run(tmp_path / "a", RUN_A)
    other_tok = dict(FINGERPRINTS, tokenizer="d" * 64, definitions=dict(
        FINGERPRINTS["definitions"], tokenizer={"vocab_size": 1024, "eod": 1023}))
    b = write_run(tmp_path / "b", RUN_B, fingerprints=other_tok, method="pondering")
    with pytest.raises(IncomparableRunsError) as error:
        analyse([str(a), str(b)], str(tmp_path / "out"))
    message = str(error.value)
    assert "tokenizer fingerprint of pondering L2-H32" in message and str(b) in message
    assert "vocab_size: 1024 vs 512" in message and "--force" in message
    assert not (tmp_path / "out" / "loss_perspective.json").exists()

    summary = analyse([str(a), str(b)], str(tmp_path / "out"), force=True)
    assert summary["forced"] and "tokenizer" in summary["forced"][0]
    assert "**Forced**" in (tmp_path / "out" / "loss_perspective.md").read_text()

    # Another validation slice: refused on the held-out axis, fine on the training-loss axis.
    other_valid = dict(FINGERPRINTS, validation_data="e" * 64)
    c = write_run(tmp_path / "c", RUN_B, fingerprints=other_valid)
    with pytest.raises(IncomparableRunsError, match="validation_data fingerprint"):
        analyse([str(a), str(c)], str(tmp_path / "v"))
    assert analyse([str(a), str(c)], str(tmp_path / "t"), x="train_loss")["forced"] == []


def test_plots_are_pngs_with_reversed_loss_axis_and_random_line(runs, tmp_path):
    out = tmp_path / "out"
    analyse(runs, str(out))
    analyse(runs, str(out), metric="brier")
    for name in ("toy_acc.png", "toy_brier.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG
        import matplotlib.image

        assert matplotlib.image.imread(str(out / name)).ndim == 3
    table = (out / "loss_perspective.md").read_text()
    assert "| pondering L4-H32 | 400 | 400000 | 1.9000 | 0.5000 |" in table

    from megatron_latent.evaluation.analysis import TaskAnalysis

    points = _points([(2.0, 0.6, 0.05), (3.0, 0.3, 0.05)])
    fig = plot_task(TaskAnalysis("toy", "acc,none", True, points, {}, {"eta": 2.0,
                                                                       "status": "all"}),
                    "held-out loss", note="tokenizer differs")
    ax = fig.axes[0]
    assert ax.xaxis_inverted()
    assert any(list(line.get_ydata()) == [0.25, 0.25] for line in ax.lines)  # random
    assert ax.get_title().endswith("forced: tokenizer differs")


def test_cli(runs, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import loss_perspective
    finally:
        sys.path.pop(0)
    assert loss_perspective.main(runs) == 2
    assert "--output-dir" in capsys.readouterr().err
    assert loss_perspective.main(runs + ["--output-dir", str(tmp_path / "o")]) == 0
    assert "toy acc,none: eta 2.2000 (threshold, 7 checkpoints)" in capsys.readouterr().out
    assert loss_perspective.main([runs[0], "--tasks", "nope"]) == 2
    assert "no results for task(s) ['nope']" in capsys.readouterr().err

"""The lm-eval backend on two gloo processes: TP=2 scores equal TP=1 (vocab-parallel
log-softmax and argmax, plain and pondering), and DP=2 splits lm-eval's requests between the
ranks and gathers the same results on rank 0."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from megatron_latent.config import ModelConfig  # noqa: E402
from megatron_latent.evaluation.lm_backend import MegatronLatentLM  # noqa: E402
from megatron_latent.methods.registry import get_method  # noqa: E402
from megatron_latent.models import hf_gpt_neox as mapping  # noqa: E402
from megatron_latent.training.checkpointing import write_weights_checkpoint  # noqa: E402
from megatron_latent.training.config import RunConfig  # noqa: E402

from training_fixtures import write_wordlevel_tokenizer  # noqa: E402

CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=512,
                     seq_length=32)
METHODS = {"vanilla": {}, "pondering": {"ponder_steps": 2}}
PAIRS = [("t1 t2 t3", " t4"), ("t1 t2 t3", " t9"), ("", " t5 t6"),
         (" ".join(f"t{i}" for i in range(40)), " t40 t41"), ("t7", " t8 t9 t10 t11")]


@pytest.fixture(scope="module")
def checkpoints(world):
    """A random-weight checkpoint per method with a word-level tokenizer, in a directory
    both ranks see."""
    box = [tempfile.mkdtemp(prefix="ml-eval-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    root = Path(box[0])
    if dist.get_rank() == 0:
        tokenizer = write_wordlevel_tokenizer(str(root / "tokenizer"))
        generator = torch.Generator().manual_seed(3)
        for method, method_args in METHODS.items():
            spec = get_method(method)
            options = spec.options_from_args(argparse.Namespace(**method_args))
            model = spec.build_model(spec.prepare_model_config(CONFIG, options), None, "cpu",
                                     options, True, True)
            weights = {name: 0.3 * torch.randn(t.shape, generator=generator)
                       + (1.0 if name.endswith("norm.weight") else 0.0)
                       for name, t in mapping.model_to_canonical(model).items()}
            run = RunConfig(model=CONFIG, method=method, method_args=method_args).to_dict()
            run["tokenizer"].update(tokenizer_type="HuggingFaceTokenizer",
                                    tokenizer_model=tokenizer)
            write_weights_checkpoint(str(root / method), weights, run)
        _write_task(root)
    dist.barrier()
    yield root
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)


def _write_task(root: Path) -> None:
    docs = [{"context": " ".join(f"t{i + j}" for j in range(n)), "label": i % 3,
             "choices": [f"t{i + n}", f"t{i + n + 5} t{i + 2}", f"t{i + 1}"]}
            for i, n in enumerate([0, 2, 5, 9, 14, 20, 27, 33, 3])]
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "mc.yaml").write_text(
        f"task: dist_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def _requests(kind, arguments):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i)
            for i, a in enumerate(arguments)]


def _greedy_pairs(lm: MegatronLatentLM) -> list[tuple[str, str]]:
    """Contexts continued by their greedy token (TP=1 forward), for is_greedy = True."""
    pairs = []
    for start in range(0, 60, 6):
        context = [start, start + 1, start + 3]
        with torch.no_grad():
            greedy = int(lm.model(torch.tensor([context]))[0, -1].argmax())
        pairs.append((" ".join(f"t{i}" for i in context), f" t{greedy}"))
    return pairs


def _scores(lm: MegatronLatentLM, pairs):
    documents = [(" ".join(f"t{i}" for i in range(n)),) for n in (4, 45, 70)]
    return (lm.loglikelihood(_requests("loglikelihood", pairs)),
            lm.loglikelihood_rolling(_requests("loglikelihood_rolling", documents)))


@pytest.mark.parametrize("method", list(METHODS))
def test_tp2_scores_equal_tp1(use_parallel, checkpoints, method):
    single = MegatronLatentLM(load=str(checkpoints / method), device="cpu", max_length=16)
    assert (single.rank, single.world_size) == (dist.get_rank(), 2)  # DP=2
    pairs = PAIRS + _greedy_pairs(single)
    # is_greedy is compared on greedy tokens from both vocabulary shards (ids < and >= 256)
    assert {int(c.split("t")[-1]) >= 256 for _, c in pairs[len(PAIRS):]} == {True, False}
    reference = _scores(single, pairs)
    assert {g for _, g in reference[0]} == {True, False}
    split = MegatronLatentLM(load=str(checkpoints / method), tp=2, device="cpu",
                             max_length=16)
    assert (split.rank, split.world_size) == (0, 1)  # one replica over both ranks
    scores, rolling = _scores(split, pairs)
    assert [g for _, g in scores] == [g for _, g in reference[0]]
    assert [lp for lp, _ in scores] == pytest.approx([lp for lp, _ in reference[0]],
                                                      abs=1e-5)
    assert rolling == pytest.approx(reference[1], rel=1e-6, abs=1e-5)
    seen = [None, None]
    dist.all_gather_object(seen, (scores, rolling))
    assert seen[0] == seen[1]  # both TP ranks hold the same results


def test_dp2_splits_requests_and_gathers_results(use_parallel, checkpoints):
    manager = TaskManager(include_path=str(checkpoints), include_defaults=False)

    def run(lm):
        scored = []
        score = lm._loglikelihood_tokens
        lm._loglikelihood_tokens = lambda requests, **kw: (
            scored.extend(r[0] for r in requests), score(requests, **kw))[1]
        results = lm_eval.simple_evaluate(model=lm, tasks=["dist_mc"], task_manager=manager,
                                          bootstrap_iters=0, log_samples=True)
        return results, scored

    data_parallel, dp_scored = run(MegatronLatentLM(load=str(checkpoints / "vanilla"),
                                                    device="cpu", batch_size=4))
    per_rank = [None, None]
    dist.all_gather_object(per_rank, dp_scored)
    # 9 documents x 3 choices: documents 0, 2, .. on rank 0 (15 requests), 1, 3, .. on rank 1
    # (12, padded by lm-eval to 15 with copies of its last one).
    assert [len(r) for r in per_rank] == [15, 15]
    assert len(set(per_rank[0])) == 15 and len(set(per_rank[1])) == 12
    assert not set(per_rank[0]) & set(per_rank[1])
    tensor_parallel, tp_scored = run(MegatronLatentLM(load=str(checkpoints / "vanilla"),
                                                      tp=2, device="cpu", batch_size=4))
    assert set(tp_scored) == set(per_rank[0]) | set(per_rank[1])
    if dist.get_rank() != 0:
        assert data_parallel is None
        return
    assert data_parallel["results"]["dist_mc"]["acc,none"] == \
        tensor_parallel["results"]["dist_mc"]["acc,none"]
    by_doc = [{s["doc_id"]: s["resps"] for s in r["samples"]["dist_mc"]}
              for r in (data_parallel, tensor_parallel)]
    assert sorted(by_doc[0]) == list(range(9))
    for doc_id, responses in by_doc[0].items():
        # (lm-eval pads a short rank with its last request again: that one holds two)
        for ours, theirs in zip(responses, by_doc[1][doc_id], strict=True):
            assert ours[0][0] == pytest.approx(theirs[0][0], abs=1e-5)
            assert ours[0][1] == theirs[0][1]

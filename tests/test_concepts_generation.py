"""A trained concept checkpoint through tools/generate.py (KV-cached = uncached, with and
without --steer; steering changes the text; refused where it cannot apply) and through the
lm-eval backend (log-likelihoods equal the model's own log-softmax computed here)."""

from __future__ import annotations

import json

import pytest
import torch
from test_concept_labels import tool
from test_concepts_training import flags
from test_concepts_training import setup as setup  # noqa: F401 - the module's fixture

from training_fixtures import run_training


@pytest.fixture(scope="module")
def checkpoint(setup, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("concept_ckpt") / "ckpt"
    run_training(flags(setup, "--train-iters", "3", "--eval-iters", "0", "--save", str(path),
                       "--concept-top-k", "4"))
    return str(path)


def generate(capsys, *argv) -> tuple[int, list[dict], str]:
    code = tool("generate").main(list(argv))
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]
    return code, rows, out.err


PROMPTS = ["--prompt", "t5 t7 t9 t12", "--prompt", "t100 t101"]


def test_cached_generation_equals_uncached_with_and_without_steering(checkpoint, capsys):
    base = ["--load", checkpoint, *PROMPTS, "--greedy", "--max-new-tokens", "8",
            "--device", "cpu", "--json"]
    code, plain, _ = generate(capsys, *base)
    assert code == 0 and len(plain) == 2
    _, plain_uncached, _ = generate(capsys, *base, "--no-cache")
    assert plain == plain_uncached
    changed = None
    for concept in range(0, 48, 4):  # a concept whose boost changes some greedy token
        steer = ["--steer", f"{concept}=40", "--steer", f"{concept + 1}=40"]
        code, steered, err = generate(capsys, *base, *steer)
        assert code == 0, err
        _, steered_uncached, _ = generate(capsys, *base, *steer, "--no-cache")
        assert steered == steered_uncached
        if [r["tokens"] for r in steered] != [r["tokens"] for r in plain]:
            changed = concept
            break
    assert changed is not None, "no steering changed the greedy text"


def test_steering_is_refused_where_it_cannot_apply(setup, checkpoint, capsys):  # noqa: F811
    code, _, err = generate(capsys, "--load", checkpoint, *PROMPTS, "--steer", "7",
                            "--device", "cpu")
    assert code == 2 and "--steer '7': expected CONCEPT_ID=SCALE" in err
    code, _, err = generate(capsys, "--load", checkpoint, *PROMPTS, "--steer", "48=2",
                            "--device", "cpu")
    assert code == 2 and "concept 48 is not one of this model's 48 concepts" in err
    code, _, err = generate(capsys, "--load", str(setup["teacher"]), *PROMPTS, "--steer", "1=2",
                            "--device", "cpu")
    assert code == 2 and "has no concept head to steer" in err


def test_lm_eval_backend_scores_the_concept_model(checkpoint):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from megatron_latent.evaluation.lm_backend import MegatronLatentLM

    lm = MegatronLatentLM(load=checkpoint, device="cpu", batch_size=2)
    pairs = [("t5 t7 t9", " t12 t14"), ("t100", " t101 t102 t103")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
                for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        context_ids = [int(w[1:]) for w in context.split()]
        target = [int(w[1:]) for w in continuation.split()]
        ids = torch.tensor([context_ids + target])
        with torch.no_grad():
            logits = lm.model(ids)[0, :, :512].double()
        positions = range(len(context_ids) - 1, ids.shape[1] - 1)
        log_probs = torch.log_softmax(logits, -1)
        want = sum(float(log_probs[p, t]) for p, t in zip(positions, target))
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(log_probs[p].argmax()) == t for p, t in zip(positions, target))

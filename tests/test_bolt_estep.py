"""megatron_latent/latent/estep.py and tools/bolt_estep.py: BoLT's E-step on a tiny trained
checkpoint grown with the four latent tokens. log q from KV-cached sampling equals an
independent full-forward log-softmax of the same ids, log p equals an independent score of the
prior form, resampling and ELBO_n equal references computed here, seeds make reruns exact at
any batch size, the output feeds tools/make_latent_data.py, and reruns resume."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_latent.latent import estep
from megatron_latent.latent.chunking import estep_prefix_ids
from megatron_latent.latent.tokens import (
    add_latent_tokens_to_tokenizer,
    grow_checkpoint,
    latent_token_ids,
)

from training_fixtures import TINY_FLAGS, run_training, write_wordlevel_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 126
POSITIONS = 96
SETTINGS = dict(num_samples=4, max_prompt=40, max_new=12, max_seq=56, seed=5, iteration=2)


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(single_process_parallel, tmp_path_factory):
    """(grown checkpoint dir, loaded model, tokenizer path, latent ids, start id)."""
    from megatron_latent.inference.loading import load_model_for_inference
    from megatron_latent.latent.formats import document_start_id

    root = tmp_path_factory.mktemp("estep")
    tok = write_wordlevel_tokenizer(str(root / "tok"), VOCAB)
    flags = list(TINY_FLAGS)
    flags[flags.index("--vocab-size") + 1] = str(VOCAB)
    run_training(flags + ["--max-position-embeddings", str(POSITIONS), "--mock-data",
                          "--micro-batch-size", "2", "--global-batch-size", "2",
                          "--eval-iters", "0", "--train-iters", "2",
                          "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok,
                          "--save", str(root / "ckpt")])
    new_tok = add_latent_tokens_to_tokenizer(tok, "HuggingFaceTokenizer",
                                             str(root / "tok_latent"))
    grow_checkpoint(str(root / "ckpt"), str(root / "grown"), VOCAB + 4,
                    "HuggingFaceTokenizer", new_tok.output_path)
    loaded = load_model_for_inference(str(root / "grown"), device=torch.device("cpu"))
    tokenizer = loaded.tokenizer
    return (root / "grown", loaded.model, new_tok.output_path, latent_token_ids(tokenizer),
            document_start_id(tokenizer))


def _docs(n: int = 3) -> list[estep.EStepDocument]:
    rng = np.random.default_rng(0)
    docs = []
    for d in range(n):
        chunks = [[int(v) for v in rng.integers(0, VOCAB - 1, size=int(rng.integers(3, 9)))]
                  for _ in range(3 + d % 2)]
        docs.append(estep.EStepDocument(1000 + d, chunks))
    return docs


def _full_logprobs(model, ids: list[int], vocab: int) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1 from one full forward (fp32, true vocab)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :, :vocab].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].double()


@pytest.fixture(scope="module")
def results(setup):
    _, model, _, t, start = setup
    settings = estep.EStepSettings(batch_size=7, **SETTINGS)
    return estep.estep_documents(model, _docs(), t, start, settings)


def test_prompts_and_sequences(setup):
    _, _, _, t, start = setup
    assert estep.posterior_prompt(start, [], [7, 8], t) == [start, 7, 8, t.sol, t.pos]
    assert estep.posterior_prompt(start, [1, 2], [7], t) == [
        start, 1, 2, t.sol, t.eol, 7, t.sol, t.pos]
    assert estep.posterior_prompt(start, list(range(10)), [7], t, max_prompt=5) == [
        9, t.sol, t.eol, 7, t.sol, t.pos][-5:]
    seq, first = estep.prior_sequence(start, [1, 2], [5, 6, t.eol], [7], t)
    assert seq == [start, 1, 2, t.sol, t.pri, 5, 6, t.eol, 7] and seq[first] == t.sol
    # overflow: prefix from the left first, then x from the end
    assert estep.overflow_cut(10, 5, 6, 30) == (0, 0)
    assert estep.overflow_cut(10, 5, 6, 20) == (5, 0)
    assert estep.overflow_cut(10, 5, 6, 12) == (10, 3)


def test_log_q_equals_full_forward_log_softmax(setup, results):
    _, model, _, t, start = setup
    vocab = VOCAB + 4
    docs = _docs()
    checked = finished = 0
    for doc, result in zip(docs, results):
        for c, chunk in enumerate(result.chunks):
            prompt = estep.posterior_prompt(start, estep_prefix_ids(doc.chunks_ids, c),
                                            doc.chunks_ids[c], t, SETTINGS["max_prompt"])
            for z, lq, fin in zip(chunk.candidates, chunk.log_q, chunk.finished):
                assert fin == (z[-1] == t.eol) and (fin or len(z) == SETTINGS["max_new"])
                assert t.eol not in z[:-1] and max(z) < vocab
                reference = _full_logprobs(model, prompt + z, vocab)[len(prompt) - 1:].sum()
                assert abs(lq - float(reference)) <= 1e-5
                scorer = estep.score_tokens(model, [prompt + z], [len(prompt)])[0]
                assert abs(lq - scorer) <= 1e-5
                checked += 1
                finished += fin
    assert checked == sum(len(d.chunks_ids) for d in docs) * 4


def test_log_p_equals_independent_prior_form_score(setup, results):
    _, model, _, t, start = setup
    for doc, result in zip(_docs(), results):
        for c, chunk in enumerate(result.chunks):
            prefix = estep_prefix_ids(doc.chunks_ids, c)[chunk.cut_prefix:]
            x = doc.chunks_ids[c][:len(doc.chunks_ids[c]) - chunk.cut_x]
            for z, lp, lq, lw in zip(chunk.candidates, chunk.log_p, chunk.log_q, chunk.log_w):
                body = [t.sol, t.pri, *(z[:-1] if z[-1] == t.eol else z), t.eol, *x]
                ids = [start, *prefix, *body]
                assert len(ids) <= SETTINGS["max_seq"]
                # positions of SoL .. end of x: the last len(body) tokens
                reference = _full_logprobs(model, ids, VOCAB + 4)[-len(body):].sum()
                assert abs(lp - float(reference)) <= 1e-5
                assert lw == pytest.approx(lp - lq, abs=1e-12)


def test_overflow_cuts_are_counted(setup):
    _, model, _, t, start = setup
    doc = estep.EStepDocument(7, [[3] * 30, [4] * 30, [5] * 30])
    settings = estep.EStepSettings(**dict(SETTINGS, max_seq=40))
    result = estep.estep_documents(model, [doc], t, start, settings)[0]
    longest = [max(len(estep.strip_eol(z, t)) for z in c.candidates) for c in result.chunks]
    for i, (chunk, zl) in enumerate(zip(result.chunks, longest)):
        prefix_len = 30 * min(i, 3)
        assert (chunk.cut_prefix, chunk.cut_x) == estep.overflow_cut(prefix_len, 30, zl, 40)
        assert chunk.cut_prefix == prefix_len and chunk.cut_x == max(0, zl - 6)
        assert 4 + prefix_len - chunk.cut_prefix + zl + 30 - chunk.cut_x <= 40
    assert result.cut_tokens == sum(c.cut_x for c in result.chunks) > 0
    assert result.text_tokens == 90 - result.cut_tokens


def _reference_choice(log_w, finished, seed):
    keep = [i for i, f in enumerate(finished) if f]
    if not keep:
        return int(np.argmax(log_w)), True
    if len(keep) == 1:
        return keep[0], False
    w = np.asarray(log_w, dtype=np.float64)[keep]
    probs = np.exp(w - w.max())
    probs /= probs.sum()
    g = torch.Generator().manual_seed(seed)
    return keep[int(torch.multinomial(torch.tensor(probs), 1, generator=g))], False


def test_resampling_and_elbo_against_reference(setup, results):
    cases = [([-3.0, -1.0, -2.0, -0.5], [True] * 4), ([-3.0, -1.0, -2.0, -0.5],
             [True, False, True, False]), ([-3.0, -1.0, -2.0], [False] * 3),
             ([-1.0, 5.0, 0.0, 0.0], [False, False, True, False])]
    for log_w, finished in cases:
        for seed in range(20):
            assert estep.resample(log_w, finished, seed) == _reference_choice(
                log_w, finished, seed)
    # decision 7: unfinished candidates never chosen while another finished
    picks = [estep.resample([9.0, 0.0, 9.0, 0.0], [False, True, False, True], s)[0]
             for s in range(50)]
    assert set(picks) <= {1, 3} and len(set(picks)) == 2
    # the draw follows softmax(log w)
    log_w = [0.0, math.log(3.0)]
    picks = [estep.resample(log_w, [True, True], s)[0] for s in range(2000)]
    assert abs(np.mean(picks) - 0.75) < 0.04
    # ELBO_n
    log_w = [-10.0, -12.5, -9.0, -30.0]
    for n in (1, 2, 4):
        w = np.asarray(log_w[:n])
        reference = w.max() + np.log(np.exp(w - w.max()).sum()) - np.log(n)
        assert estep.elbo_estimates(log_w)[n] == pytest.approx(reference, abs=1e-12)
    # in the pipeline: choices and per-document sums follow the same rules
    for result in results:
        for c, chunk in enumerate(result.chunks):
            seed = estep.resample_seed(SETTINGS["seed"], SETTINGS["iteration"], result.doc_key, c)
            assert (chunk.choice, chunk.no_finished) == _reference_choice(
                chunk.log_w, chunk.finished, seed)
        for n in (1, 2, 4):
            total = sum(float(torch.logsumexp(torch.tensor(ch.log_w[:n], dtype=torch.float64),
                                              0)) - math.log(n) for ch in result.chunks)
            assert result.elbo[n] == pytest.approx(total, abs=1e-9)
        assert result.flops == pytest.approx(
            2 * estep.parameter_count(setup[1]) *
            (result.sampled_tokens + result.scored_tokens))


def test_reruns_are_exact_at_any_batch_size(setup, results):
    _, model, _, t, start = setup
    docs = _docs()
    for batch_size, order in ((3, False), (64, True)):
        settings = estep.EStepSettings(batch_size=batch_size, **SETTINGS)
        chosen = docs[::-1] if order else docs
        again = estep.estep_documents(model, chosen, t, start, settings)
        if order:
            again = again[::-1]
        for a, b in zip(again, results):
            assert [c.candidates for c in a.chunks] == [c.candidates for c in b.chunks]
            assert a.latents == b.latents
            for ca, cb in zip(a.chunks, b.chunks):
                assert np.allclose(ca.log_q, cb.log_q, atol=1e-5)
    other = estep.estep_documents(model, docs, t, start,
                                  estep.EStepSettings(batch_size=7, **dict(SETTINGS, seed=6)))
    assert [c.candidates for c in other[0].chunks] != [c.candidates for c in results[0].chunks]


TEXTS = ["t1 t2 t3 t4.\n\nt5 t6 t7.\n\nt8 t9 t10 t11.\n\nt12 t13.",
         "t20 t21.\n\nt22 t23 t24 t25.",
         "t30 t31 t32 t33 t34 t35.\n\nt36.\n\nt37 t38.\n\nt39 t40.\n\nt41 t42 t43."]


def test_tool_output_feeds_make_latent_data_and_resumes(setup, tmp_path, monkeypatch):
    grown, _, tokenizer_path, _, _ = setup
    tool = _tool("bolt_estep")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": x}) + "\n"
                            for i, x in enumerate(TEXTS[:2])))
    out = tmp_path / "latents.jsonl"
    args = ["--load", str(grown), "--input", str(docs), "--output", str(out), "--device", "cpu",
            "--num-samples", "3", "--max-new-tokens", "8", "--max-prompt-tokens", "40",
            "--max-seq-length", "56", "--batch-size", "6", "--iteration", "1",
            "--elbo-input", str(docs)]
    calls: list[int] = []
    real = tool.estep_lib.estep_documents

    def counting(model, documents, *a, **k):
        calls.append(len(documents))
        return real(model, documents, *a, **k)

    monkeypatch.setattr(tool.estep_lib, "estep_documents", counting)
    assert tool.main(args) == 0
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in first] == ["d0", "d1"]
    side = [json.loads(line) for line in (tmp_path / "latents.jsonl.candidates.jsonl")
            .read_text().splitlines()]
    for record, extra in zip(first, side):
        assert "".join(record["chunks"]) == record["text"]
        assert len(record["latent_ids"]) == len(record["chunks"]) == len(extra["chunks"])
        for z, chunk in zip(record["latent_ids"], extra["chunks"]):
            assert z == chunk["candidates"][chunk["choice"]]
            assert len(chunk["log_q"]) == len(chunk["log_p"]) == len(chunk["finished"]) == 3
    elbo = json.loads((tmp_path / "latents.jsonl.elbo.json").read_text())
    assert elbo["documents"] == 2 and elbo["elbo_2_per_token"] < 0 and "elbo_4" not in elbo
    # resume: a third document appended; the first two are never recomputed
    docs.write_text(docs.read_text() + json.dumps({"id": "d2", "text": TEXTS[2]}) + "\n")
    calls.clear()
    assert tool.main(args[:-2]) == 0
    assert sum(calls) == 1
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert again[:2] == first and again[2]["id"] == "d2"
    # a resumed run with other settings is refused
    assert tool.main(args[:-2] + ["--seed", "9"]) == 2
    # the output is make_latent_data's input
    maker = _tool("make_latent_data")
    assert maker.main(["--input", str(out), "--output-prefix", str(tmp_path / "bolt"),
                       "--tokenizer-type", "HuggingFaceTokenizer",
                       "--tokenizer-model", tokenizer_path, "--log-interval", "0"]) == 0
    assert (tmp_path / "bolt.bin").exists() and (tmp_path / "bolt.idx").exists()

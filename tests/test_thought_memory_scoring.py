"""Thought-memory log-likelihoods (the method's score_continuations hook) against a reference
computed here from the model's own forward on rows laid out with streams.row_arrays, and
through lm-eval with the `megatron_latent` backend on a checkpoint trained in the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_sentence_dataset,
    write_wordlevel_tokenizer,
)

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from megatron_latent.evaluation.lm_backend import MegatronLatentLM  # noqa: E402
from megatron_latent.methods.thought_memory.scoring import (  # noqa: E402
    layout_request,
    score_continuations,
)
from megatron_latent.methods.thought_memory.streams import row_arrays  # noqa: E402

MAX_CONTENT = 16


@pytest.fixture(scope="module")
def checkpoint(single_process_parallel, tmp_path_factory):
    """A tiny thought-memory checkpoint (2 iterations) and the backend loaded from it."""
    root = tmp_path_factory.mktemp("tm_scoring")
    prefix = write_sentence_dataset(str(root / "data" / "sentences"))
    tokenizer = write_wordlevel_tokenizer(str(root / "tokenizer"))
    run_training(TINY_FLAGS + [
        "--method", "thought-memory", "--data-path", prefix, "--split", "80,20,0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
        "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "2",
        "--eval-iters", "0", "--tm-token-budget", "600", "--tm-max-content", str(MAX_CONTENT),
        "--tm-stream-length", "4", "--save", str(root / "ckpt")])
    lm = MegatronLatentLM(load=str(root / "ckpt"), device="cpu", batch_size=4)
    assert lm.model.layout.max_content == MAX_CONTENT
    return lm


def _id(word: str) -> int:
    """The word-level tokenizer's id: "t12" -> 12; a word with punctuation is unknown (t0)."""
    return int(word[1:]) if word[1:].isdigit() else 0


def _words(start: int, n: int) -> list[str]:
    return [f"t{i}" for i in range(start, start + n)]


#: (sentences of context + continuation as words, continuation words); the text is the words
#: joined by spaces, the continuation being its last words with a leading space.
CASES = [
    ([_words(5, 5)], 2),  # continuation inside the one (open) sentence
    ([["t5", "t6."], ["t7", "t8."], ["t9", "t10", "t11"]], 3),  # opens a sentence (seeded BOS)
    ([["t5", "t6."], ["t7", "t8."], ["t9", "t10"]], 3),  # ends a sentence and opens another
    ([["t3", "t4."], ["t5"]], 3),  # empty context: the first row's BOS is not seeded
    ([_words(20, 23)], 3),  # a 23-token sentence: fragments of 16 and 7
    ([["t1", "t2."], _words(30, 18)], 4),  # the continuation crosses a fragment boundary
    ([["t40", "t41."], ["t42", "t43."], ["t44", "t45."], _words(50, 3)], 7),
]


def _pair(sentences: list[list[str]], n_continuation: int) -> tuple[str, str]:
    words = [w for sentence in sentences for w in sentence]
    context = " ".join(words[:-n_continuation])
    return context, (" " if context else "") + " ".join(words[-n_continuation:])


def _reference(model, sentences: list[list[str]], n_continuation: int) -> tuple[float, bool]:
    """Σ log_softmax of the model's logits at the positions predicting the continuation, on
    one stream of rows `BOS + content + EOS` (fragments of MAX_CONTENT), every row closed."""
    layout = model.layout
    rows, owner = [], []  # content ids per row; (row, position) of every token
    for sentence in sentences:
        ids = [_id(w) for w in sentence]
        for start in range(0, len(ids), MAX_CONTENT):
            rows.append(ids[start:start + MAX_CONTENT])
            owner += [(len(rows) - 1, k) for k in range(len(rows[-1]))]
    arrays = [row_arrays(torch.tensor(r).numpy(), layout, eod=False, w_eos=1.0) for r in rows]
    inputs = torch.stack([torch.from_numpy(a[0]) for a in arrays])[None]
    targets = torch.stack([torch.from_numpy(a[1]) for a in arrays])[None]
    with torch.no_grad():
        _, aux = model(inputs, targets, return_logits=True)
    logprobs = torch.log_softmax(aux["logits"][0].double(), dim=-1)  # [T, L, V]
    total, greedy = 0.0, True
    for row, k in owner[-n_continuation:]:
        token = int(targets[0, row, k])
        assert token == rows[row][k]  # the logits at position k predict content token k
        total += float(logprobs[row, k, token])
        greedy &= int(logprobs[row, k].argmax()) == token
    return total, greedy


def _greedy_case(model) -> tuple[list[list[str]], int]:
    """A case whose one-token continuation (opening a sentence) is the model's argmax."""
    for first in range(60, 400, 7):
        sentences = [[f"t{first}", f"t{first + 2}."], [f"t{first + 3}", "t0"]]
        layout = model.layout
        arrays = [row_arrays(torch.tensor([_id(w) for w in s]).numpy(), layout, False, 1.0)
                  for s in sentences]
        inputs = torch.stack([torch.from_numpy(a[0]) for a in arrays])[None]
        with torch.no_grad():
            _, aux = model(inputs, inputs, return_logits=True)
        best = int(aux["logits"][0, 1, 0].argmax())  # predicted from row 2's seeded BOS
        if best < layout.pad - 1:
            return [sentences[0], [f"t{best}"]], 1
    raise AssertionError("no context whose greedy next token is a word")


def test_hook_equals_reference_from_the_models_forward(checkpoint):
    lm, model = checkpoint, checkpoint.model
    cases = CASES + [_greedy_case(model)]
    pairs = [_pair(*case) for case in cases]
    for (sentences, n), (context, continuation) in zip(cases, pairs):
        stream = layout_request(lm.tokenizer, context, continuation, model.layout)
        assert stream.sentence_lengths == [len(s) for s in sentences]  # the splitter agrees
        # The continuation's tokens are exactly those lm-eval's causal split gives.
        expected = lm._encode_pair(context, continuation)[1] if context else [
            _id(w) for w in continuation.split()]
        assert stream.continuation_tokens == expected and len(expected) == n
    scores = score_continuations(model, lm.tokenizer, pairs, batch_size=3)
    for case, pair, (logprob, greedy) in zip(cases, pairs, scores):
        ref_logprob, ref_greedy = _reference(model, *case)
        assert logprob == pytest.approx(ref_logprob, abs=1e-4), pair
        assert greedy == ref_greedy, pair
    assert scores[-1][1] and not scores[0][1]  # is_greedy seen both ways
    one = score_continuations(model, lm.tokenizer, pairs, batch_size=1)
    assert [s[1] for s in one] == [s[1] for s in scores]
    assert [s[0] for s in one] == pytest.approx([s[0] for s in scores], abs=1e-5)
    assert score_continuations(model, lm.tokenizer, [("t1 t2", "")]) == [(0.0, True)]


def _write_tasks(directory: Path) -> tuple[list[dict], list[str]]:
    """tm_mc: choices inside a sentence, opening and spanning sentences, fragments;
    tm_ppl: whole documents of several sentences (one over 16 tokens)."""
    docs = [
        {"context": "t5 t6. t7 t8.", "choices": ["t9 t10.", "t11", "t300 t301 t302."]},
        {"context": "t40 t41 t42", "choices": ["t43", "t44 t45. t46 t47", "t3."]},
        {"context": " ".join(_words(100, 20)), "choices": ["t120 t121", "t7"]},
        {"context": "t1 t2. t3 t4. t5 t6. t7", "choices": ["t8.", "t9. t10 t11."]},
    ]
    for index, doc in enumerate(docs):
        doc["label"] = index % 2
    texts = ["t10 t11 t12. t13 t14.", " ".join(_words(200, 40)) + ". t5 t6."]
    (directory / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (directory / "mc.yaml").write_text(
        "task: tm_mc\n" + common.format(directory / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (directory / "ppl.yaml").write_text(
        "task: tm_ppl\n" + common.format(directory / "ppl.jsonl")
        + "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n")
    return docs, texts


def test_lm_eval_scores_are_the_hooks(checkpoint, tmp_path):
    lm = checkpoint
    docs, texts = _write_tasks(tmp_path)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["tm_mc", "tm_ppl"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        bootstrap_iters=0, log_samples=True)
    mc = sorted(results["samples"]["tm_mc"], key=lambda s: s["doc_id"])
    assert len(mc) == len(docs)
    for sample, doc in zip(mc, docs):
        pairs = [(doc["context"], " " + choice) for choice in doc["choices"]]
        expected = score_continuations(lm.model, lm.tokenizer, pairs, batch_size=2)
        got = [tuple(r[0]) for r in sample["resps"]]
        assert [g[1] for g in got] == [e[1] for e in expected]
        assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-5)
    rolling = sorted(results["samples"]["tm_ppl"], key=lambda s: s["doc_id"])
    expected = score_continuations(lm.model, lm.tokenizer, [("", t) for t in texts])
    assert [s["resps"][0][0] for s in rolling] == pytest.approx([e[0] for e in expected],
                                                                abs=1e-5)
    assert lm.get_model_info()["method_scoring"] is True


def _generation_module_present() -> bool:
    import importlib.util

    return importlib.util.find_spec("megatron_latent.methods.thought_memory.generation") is not None


def test_generate_until_hands_contexts_to_the_methods_generate_text(checkpoint, monkeypatch):
    from megatron_latent.inference.generation import Generation

    seen = {}

    def fake(model, tokenizer, prompts, config, use_cache=True):
        seen.update(prompts=prompts, config=config)
        return [Generation(tokens=[], finish_reason="length", text=f"{p} t1 STOP t2")
                for p in prompts]

    monkeypatch.setattr(checkpoint, "_generate_hook", fake)
    requests = [Instance(request_type="generate_until", doc={}, idx=i,
                         arguments=(p, {"until": [" STOP"], "max_gen_toks": 40}))
                for i, p in enumerate(["t1 t2.", "t3"])]
    assert checkpoint.generate_until(requests) == ["t1 t2. t1", "t3 t1"]
    assert sorted(seen["prompts"]) == ["t1 t2.", "t3"]
    assert seen["config"].max_new_tokens == 40 and seen["config"].greedy


@pytest.mark.skipif(not _generation_module_present(),
                    reason="thought-memory generation (methods/thought_memory/generation.py) "
                           "is not written yet")
def test_generate_until_runs_thought_memory_generation(checkpoint):
    from megatron_latent.inference.sampling import GenerationConfig
    from megatron_latent.methods.thought_memory.generation import generate_text

    prompts = ["t5 t6. t7", "t40 t41 t42."]
    requests = [Instance(request_type="generate_until", doc={}, idx=i,
                         arguments=(p, {"until": [], "max_gen_toks": 6, "do_sample": False}))
                for i, p in enumerate(prompts)]
    texts = checkpoint.generate_until(requests)
    config = GenerationConfig(max_new_tokens=6, greedy=True,
                              stop_token_ids=(checkpoint.eot_token_id,))
    own = generate_text(checkpoint.model, checkpoint.tokenizer, prompts, config)
    assert texts == [g.text for g in own]

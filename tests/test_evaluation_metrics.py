"""Continuous multiple-choice metrics: hand computations and lm-eval's real in-memory output."""

from __future__ import annotations

import copy
import json
import math
import statistics

import pytest

from megatron_latent.evaluation.mc_metrics import (
    METRICS,
    add_continuous_metrics,
    document_metrics,
    metrics_from_choices,
)

# -- by hand ------------------------------------------------------------------------------------

# (log-likelihoods, choices, gold): 2, 3, 4 and 2 choices; the last is a tie (first index wins).
DOCS = [
    ([-1.0, -2.0], ["yes", "no"], 0),
    ([-3.0, -4.0, -2.5], ["a", "bbbb", "cc"], 1),
    ([-6.0, -2.0, -3.0, -5.0], ["xxxxxx", "x", "xx", "xxxxxxxxxx"], 3),
    ([-2.0, -2.0], ["ab", "cd"], 1),
]


def _hand_document(lls, choices, gold):
    """Written out without numpy: softmax, argmax (first maximum), Brier summed over classes."""
    z = sum(math.exp(v) for v in lls)
    p = [math.exp(v) / z for v in lls]
    normed = [v / len(c) for v, c in zip(lls, choices)]
    zn = sum(math.exp(v) for v in normed)
    first_max = max(range(len(lls)), key=lambda j: (lls[j], -j))
    first_max_norm = max(range(len(lls)), key=lambda j: (normed[j], -j))
    c = len(lls)
    return {
        "acc": 1.0 if first_max == gold else 0.0,
        "acc_norm": 1.0 if first_max_norm == gold else 0.0,
        "ccp": p[gold],
        "ccp_norm": math.exp(normed[gold]) / zn,
        "brier": sum(((1.0 if j == gold else 0.0) - p[j]) ** 2 for j in range(c)),
        "random": 1.0 / c,
        "brier_random": (1 - 1 / c) ** 2 + (c - 1) * (1 / c) ** 2,
    }


def test_document_values_by_hand():
    # doc 2: raw argmax is choice 1 (-2.0); per character choice 3 (-0.5) beats 1 (-2.0)
    hand = [_hand_document(*d) for d in DOCS]
    assert [h["acc"] for h in hand] == [1.0, 0.0, 0.0, 0.0]
    assert [h["acc_norm"] for h in hand] == [1.0, 1.0, 1.0, 0.0]
    assert hand[0]["ccp"] == pytest.approx(1 / (1 + math.exp(-1)))
    assert hand[3]["brier"] == pytest.approx(0.5)
    for doc, h in zip(DOCS, hand):
        got = document_metrics(*doc)
        for m in METRICS:
            assert got[m] == pytest.approx(h[m], abs=1e-12), m
        assert got["acc_random"] == got["ccp_random"] == pytest.approx(h["random"])
        assert got["brier_random"] == pytest.approx(h["brier_random"])
    # choices given as their character lengths score the same
    assert document_metrics(DOCS[2][0], [6, 1, 2, 10], 3) == document_metrics(*DOCS[2])


def test_task_aggregates_by_hand():
    hand = [_hand_document(*d) for d in DOCS]
    got = metrics_from_choices(DOCS)
    n = len(DOCS)
    assert got["num_docs"] == n
    random_acc = (1 / 2 + 1 / 3 + 1 / 4 + 1 / 2) / 4
    random_brier = (1 / 2 + 2 / 3 + 3 / 4 + 1 / 2) / 4  # 1 - 1/C per document, averaged
    for m in METRICS:
        values = [h[m] for h in hand]
        mean = sum(values) / n
        se = statistics.stdev(values) / math.sqrt(n)  # sample SD (n - 1)
        random = random_brier if m == "brier" else random_acc
        best = 0.0 if m == "brier" else 1.0
        assert got[m] == pytest.approx(mean), m
        assert got[f"{m}_stderr"] == pytest.approx(se), m
        assert got[f"{m}_random"] == pytest.approx(random), m
        assert got[f"{m}_normalized"] == pytest.approx((mean - random) / (best - random)), m
        assert got[f"{m}_normalized_stderr"] == pytest.approx(se / abs(best - random)), m
    assert got["acc"] == 0.25 and got["acc_norm"] == 0.75
    assert got["brier_normalized"] == pytest.approx(1 - got["brier"] / random_brier)


@pytest.mark.parametrize("c", [2, 3, 4, 5, 10])
def test_brier_random_baseline_is_one_minus_one_over_c(c):
    uniform = document_metrics([-1.5] * c, ["x"] * c, c - 1)
    assert uniform["brier_random"] == pytest.approx(1 - 1 / c)
    assert uniform["brier"] == pytest.approx(1 - 1 / c)  # the uniform predictor itself
    assert uniform["ccp"] == pytest.approx(1 / c)
    task = metrics_from_choices([([-1.5] * c, ["x"] * c, g) for g in range(c)])
    assert task["brier_normalized"] == pytest.approx(0.0, abs=1e-12)
    assert task["ccp_normalized"] == pytest.approx(0.0, abs=1e-12)
    assert task["brier_random"] == pytest.approx(1 - 1 / c)


def test_perfect_and_worst_predictions():
    perfect = metrics_from_choices([([0.0, -1e4, -1e4], ["a", "b", "c"], 0)] * 3)
    assert perfect["ccp_normalized"] == pytest.approx(1.0)
    assert perfect["brier"] == pytest.approx(0.0) and perfect["brier_normalized"] == 1.0
    assert perfect["acc_stderr"] == 0.0
    worst = document_metrics([0.0, -1e4], ["a", "b"], 1)
    assert worst["brier"] == pytest.approx(2.0) and worst["ccp"] == pytest.approx(0.0)
    single = metrics_from_choices([DOCS[0]])
    assert math.isnan(single["acc_stderr"])  # one document: no sample SE


def test_multiple_targets_and_bad_gold():
    got = document_metrics([-1.0, -2.0, -3.0], ["a", "b", "c"], [1, 2])
    p = [math.exp(-1), math.exp(-2), math.exp(-3)]
    p = [v / sum(p) for v in p]
    assert got["acc"] == 0.0 and got["ccp"] == pytest.approx(p[1] + p[2])
    assert got["brier"] == pytest.approx(p[0] ** 2 + (1 - p[1]) ** 2 + (1 - p[2]) ** 2)
    assert got["acc_random"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        document_metrics([-1.0, -2.0], ["a", "b"], 2)


# -- lm-eval's own output -----------------------------------------------------------------------

def save_tiny_hf_model(directory, max_positions: int = 512) -> str:
    """A random tiny GPTNeoX and a byte-level BPE tokenizer, saved for lm-eval's ``hf`` backend."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from hf_reference import make_gpt_neox

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the cat sat on the mat, and the king is dead"] * 4,
                            trainers.BpeTrainer(vocab_size=300,
                                                special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    model = make_gpt_neox(vocab_size=320, max_positions=max_positions)
    model.config.eos_token_id = fast.eos_token_id
    model.save_pretrained(str(directory))
    fast.save_pretrained(str(directory))
    return str(directory)


MC_DOCS = [  # 5 documents with 4, 2, 3, 2 and 3 choices
    {"q": "The cat", "choices": ["sat", "ran far away", "is", "x"], "gold": 0},
    {"q": "Hello", "choices": ["world", "there"], "gold": 1},
    {"q": "On the", "choices": ["mat", "old hat", "bat"], "gold": 2},
    {"q": "A", "choices": ["b", "cc"], "gold": 0},
    {"q": "The king", "choices": ["is dead", "lives", "sat on the mat"], "gold": 1},
]
FOUR_DOCS = [  # fixed C = 4, where lm-eval's own brier_score works
    {"q": f"Line {k}", "choices": ["sat", "the mat", "cat", "dead king"], "gold": k % 4}
    for k in range(4)
]
WINO_DOCS = [  # contexts differ per choice; gold in doc_to_text (like WinoGrande)
    {"options": ["The cat sat on the", "The king sat on the"], "answer": k % 2, "cont": "mat"}
    for k in range(3)
]
LL_DOCS = [{"q": "The cat sat on the", "a": " mat"}, {"q": "The king", "a": " is dead"}]

TASKS = {
    "tiny_mc": (MC_DOCS, "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: choices\n"
                "doc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
    "tiny_mc4": (FOUR_DOCS, "output_type: multiple_choice\ndoc_to_text: q\n"
                 "doc_to_choice: choices\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n"
                 "  - metric: brier_score\n"),
    "tiny_wino": (WINO_DOCS, "output_type: multiple_choice\ndoc_to_text: answer\n"
                  "doc_to_choice: options\ndoc_to_target: cont\nmetric_list:\n"
                  "  - metric: acc\n  - metric: acc_norm\n"),
    "tiny_ll": (LL_DOCS, "output_type: loglikelihood\ndoc_to_text: q\ndoc_to_target: a\n"
                "metric_list:\n  - metric: acc\n"),
}


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory):
    """One ``simple_evaluate`` of the four local tasks (hf backend, CPU, log_samples=True)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = save_tiny_hf_model(root / "model")
    for name, (docs, body) in TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n{body}")
    manager = TaskManager(include_path=str(root), include_defaults=False)
    task_dict = get_task_dict(list(TASKS), manager)
    # bootstrap_iters > 0 makes lm-eval compute its closed-form SE of the mean (for acc)
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", device="cpu",
        tasks=list(task_dict.values()), log_samples=True, bootstrap_iters=10, batch_size=8)
    return results, task_dict


def _keys(m: str) -> list[str]:
    return [f"{m}{s},none" for s in ("", "_stderr", "_random", "_normalized",
                                     "_normalized_stderr")]


def test_in_memory_samples_look_as_expected(lm_eval_run):
    results, _ = lm_eval_run
    sample = results["samples"]["tiny_mc"][0]
    assert sample["filter"] == "none" and sample["target"] == 0
    assert [a[1] for a in sample["arguments"]] == [" sat", " ran far away", " is", " x"]
    ll, greedy = sample["filtered_resps"][0]
    assert isinstance(ll, float) and isinstance(greedy, bool)
    assert results["configs"]["tiny_mc"]["output_type"] == "multiple_choice"


def test_add_continuous_metrics_on_real_results(lm_eval_run):
    results, _ = lm_eval_run
    before = copy.deepcopy(results["results"])
    out = add_continuous_metrics(copy.deepcopy(results))
    entry = out["results"]["tiny_mc"]
    for m in METRICS:
        for key in _keys(m):
            assert isinstance(entry[key], float), key
    assert entry["brier_normalisation"] == "sum" and entry["num_docs_scored"] == 5
    # acc and acc_norm are lm-eval's own, and so is its closed-form SE of the mean
    for m in ("acc", "acc_norm"):
        assert entry[f"{m},none"] == pytest.approx(before["tiny_mc"][f"{m},none"], abs=1e-12)
    assert entry["acc_stderr,none"] == pytest.approx(before["tiny_mc"]["acc_stderr,none"])
    # the baselines follow each document's number of choices (4, 2, 3, 2, 3)
    assert entry["acc_random,none"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 3 + 1 / 2 + 1 / 3) / 5)
    assert entry["brier_random,none"] == pytest.approx((3 / 4 + 1 / 2 + 2 / 3 + 1 / 2 + 2 / 3) / 5)
    # CCP and Brier from the logged log-likelihoods, by hand
    hand = []
    for sample, doc in zip(results["samples"]["tiny_mc"], MC_DOCS):
        lls = [r[0] for r in sample["filtered_resps"]]
        hand.append(_hand_document(lls, doc["choices"], doc["gold"]))
    assert entry["ccp,none"] == pytest.approx(sum(h["ccp"] for h in hand) / 5)
    assert entry["brier,none"] == pytest.approx(sum(h["brier"] for h in hand) / 5)
    # with a fixed number of choices, our Brier is lm-eval's brier_score
    four = out["results"]["tiny_mc4"]
    assert four["brier,none"] == pytest.approx(before["tiny_mc4"]["brier_score,none"])
    assert four["acc,none"] == before["tiny_mc4"]["acc,none"]
    # non-multiple-choice tasks are untouched; WinoGrande-like tasks need the task objects
    assert out["results"]["tiny_ll"] == before["tiny_ll"]
    assert out["results"]["tiny_wino"] == before["tiny_wino"]


def test_multiple_input_tasks_with_the_task_objects(lm_eval_run):
    results, task_dict = lm_eval_run
    before = results["results"]["tiny_wino"]
    entry = add_continuous_metrics(copy.deepcopy(results), task_dict)["results"]["tiny_wino"]
    assert entry["num_docs_scored"] == 3
    assert entry["acc,none"] == pytest.approx(before["acc,none"])
    assert entry["acc_norm,none"] == pytest.approx(before["acc_norm,none"])
    assert entry["brier_random,none"] == pytest.approx(0.5)


def test_needs_samples_and_passes_none_through(lm_eval_run):
    results, _ = lm_eval_run
    assert add_continuous_metrics(None) is None
    bare = {k: v for k, v in copy.deepcopy(results).items() if k != "samples"}
    assert add_continuous_metrics(copy.deepcopy(bare)) == bare  # log_samples=False: unchanged
    partial = copy.deepcopy(results)
    del partial["samples"]["tiny_mc"]
    with pytest.raises(ValueError, match="tiny_mc"):
        add_continuous_metrics(partial)

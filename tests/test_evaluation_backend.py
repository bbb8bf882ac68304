"""The lm-eval backend against independent references: lm-eval's own Hugging Face backend on
the converted checkpoint (multiple choice and rolling perplexity, windowed), the pondering
model's own training loss, tools/generate.py, and batching/padding invariance."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from megatron_latent.evaluation.lm_backend import MegatronLatentLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 24  # below the run's 32 so that windows and left-truncation are exercised
EOD = 511


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _words(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


def _corpus_like(rng: random.Random, length: int) -> list[int]:
    """Token runs like the training corpus' (steps of 1-3), so the model predicts some."""
    ids = [rng.randrange(500)]
    while len(ids) < length:
        ids.append((ids[-1] + rng.randint(1, 3)) % (EOD - 1))
    return ids


@pytest.fixture(scope="module")
def trained(single_process_parallel, tmp_path_factory):
    """A vanilla and a pondering checkpoint of a tiny model, and the vanilla one converted
    to a Hugging Face folder."""
    root = tmp_path_factory.mktemp("evaluation")
    prefix = write_token_dataset(str(root / "data" / "tokens"))
    tokenizer = write_wordlevel_tokenizer(str(root / "tokenizer"))
    models = {}
    for method, flags in (("vanilla", []), ("pondering", ["--ponder-steps", "2"])):
        _, trainer = run_training(TINY_FLAGS + [
            "--method", method, *flags, "--data-path", prefix, "--split", "90,10,0",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
            "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "12",
            "--eval-iters", "0", "--save", str(root / method)])
        models[method] = trainer.engine.unwrapped_model().eval()
    assert _tool("convert_checkpoint").main(
        ["to-hf", "--load", str(root / "vanilla"), "--output", str(root / "hf")]) == 0
    return SimpleNamespace(root=root, models=models, vanilla=str(root / "vanilla"),
                           pondering=str(root / "pondering"), hf=str(root / "hf"))


def _write_tasks(directory: Path, model) -> None:
    """tiny_mc: multiple choice with an empty context, contexts longer than MAX_LENGTH,
    multi-token choices, and one choice per document that is the model's greedy token.
    tiny_ppl: rolling log-likelihood of documents up to 2.5 windows long."""
    rng = random.Random(5)
    docs = []
    for index, length in enumerate([0, 3, 9, 23, 24, 30, 41]):
        context = _corpus_like(rng, length)
        window = (context or [EOD])[-MAX_LENGTH:]
        with torch.no_grad():
            greedy = int(model(torch.tensor([window]))[0, -1].argmax())
        choices = [_words([greedy]), _words(_corpus_like(rng, 3)), _words(_corpus_like(rng, 1)),
                   _words([greedy, (greedy + 2) % EOD])]
        docs.append({"context": _words(context), "choices": choices, "label": index % 3})
    (directory / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    texts = [_words(_corpus_like(rng, n)) for n in (5, 24, 25, 60)]
    (directory / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (directory / "mc.yaml").write_text(
        "task: tiny_mc\n" + common.format(directory / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (directory / "ppl.yaml").write_text(
        "task: tiny_ppl\n" + common.format(directory / "ppl.jsonl")
        + "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")


def _evaluate(model: str, model_args: dict, tasks_dir: Path) -> dict:
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["tiny_mc", "tiny_ppl"], batch_size=8,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        bootstrap_iters=0, log_samples=True)


def _responses(results: dict, task: str) -> list:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[tuple(r[0]) if isinstance(r[0], tuple) else (r[0],) for r in s["resps"]]
            for s in samples]


def test_matches_lm_evals_hugging_face_backend(trained, tmp_path):
    _write_tasks(tmp_path, trained.models["vanilla"])
    ours = _evaluate("megatron_latent", {"load": trained.vanilla, "max_length": MAX_LENGTH,
                                         "device": "cpu"}, tmp_path)
    theirs = _evaluate("hf", {"pretrained": trained.hf, "max_length": MAX_LENGTH,
                              "device": "cpu", "dtype": "float32"}, tmp_path)
    greedy_seen = set()
    for task in ("tiny_mc", "tiny_ppl"):
        for doc_ours, doc_theirs in zip(_responses(ours, task), _responses(theirs, task),
                                        strict=True):
            for a, b in zip(doc_ours, doc_theirs, strict=True):
                assert a[0] == pytest.approx(b[0], abs=1e-4), (task, a, b)
                assert a[1:] == b[1:], (task, a, b)
                greedy_seen.update(a[1:])
    assert greedy_seen == {True, False}  # is_greedy compared on both outcomes
    for task, metrics in (("tiny_mc", ("acc,none", "acc_norm,none")),
                          ("tiny_ppl", ("word_perplexity,none", "byte_perplexity,none",
                                        "bits_per_byte,none"))):
        for metric in metrics:
            assert ours["results"][task][metric] == pytest.approx(
                theirs["results"][task][metric], rel=1e-5), (task, metric)
    info = ours["config"]
    assert (info["method"], info["iteration"], info["max_length"]) == ("vanilla", 12, MAX_LENGTH)


def _requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i)
            for i, args in enumerate(arguments)]


def _pairs(seed: int = 1) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for length in (1, 2, 5, 11, 17, 23, 24, 29, 40):
        tokens = _corpus_like(rng, length + 3)
        cut = rng.randint(1, 3)
        pairs.append((_words(tokens[:-cut]), " " + _words(tokens[-cut:])))
    pairs.append(("", " t7 t8"))
    pairs.append((pairs[3][0], " t5"))  # shares its model input with the next request
    pairs.append((pairs[3][0], " t9"))
    return pairs


def test_batching_and_padding_do_not_change_scores(trained, monkeypatch):
    one = MegatronLatentLM.create_from_arg_string(
        f"load={trained.vanilla},max_length={MAX_LENGTH},device=cpu,dtype=float32",
        {"batch_size": 1, "max_batch_size": None})
    assert (one.batch_size, one.max_length, one.rank, one.world_size) == (1, MAX_LENGTH, 0, 1)
    eight = MegatronLatentLM(loaded=one.loaded, max_length=MAX_LENGTH, batch_size=8)
    requests = _requests("loglikelihood", _pairs())
    scores = one.loglikelihood(requests)
    batched = eight.loglikelihood(requests)
    assert [s[1] for s in scores] == [s[1] for s in batched]
    assert [s[0] for s in scores] == pytest.approx([s[0] for s in batched], abs=1e-5)
    # The padding value never reaches a scored position: any value gives the same bits.
    eight.pad_token_id = 3
    assert eight.loglikelihood(requests) == batched
    # Nor does reducing the vocabulary rows of the scored positions a few at a time.
    from megatron_latent.evaluation import lm_backend

    monkeypatch.setattr(lm_backend, "_SCORED_PER_CHUNK", 2)
    assert eight.loglikelihood(requests) == batched
    documents = _requests("loglikelihood_rolling", [(_words(range(n)),) for n in (3, 30, 70)])
    assert one.loglikelihood_rolling(documents) == pytest.approx(
        eight.loglikelihood_rolling(documents), abs=1e-5)


def _own_loss(model, tokens: list[int], scored: int) -> float:
    """−Σ of the model's per-token training loss over the last `scored` tokens."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        loss = model(ids[:, :-1], labels=ids[:, 1:])
    return -float(loss[0, -scored:].double().sum())


def test_pondering_scores_are_its_own_loss(trained):
    lm = MegatronLatentLM(load=trained.pondering, device="cpu", batch_size=4)
    model = trained.models["pondering"]
    pairs = _pairs(seed=3)[:8]
    scores = lm.loglikelihood(_requests("loglikelihood", pairs))
    for (context, continuation), (logprob, _) in zip(pairs, scores):
        context_ids = lm.tok_encode(context) or [EOD]
        continuation_ids = lm.tok_encode(continuation)
        expected = _own_loss(model, context_ids + continuation_ids, len(continuation_ids))
        assert logprob == pytest.approx(expected, abs=1e-4)
    text = _words(range(40, 60))
    (rolling,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert rolling == pytest.approx(_own_loss(model, [EOD] + lm.tok_encode(text), 20), abs=1e-4)


def test_generate_until_matches_generate_tool(trained, monkeypatch, capsys):
    import megatron_latent.distributed

    monkeypatch.setattr(megatron_latent.distributed, "destroy_parallel", lambda: None)
    lm = MegatronLatentLM(load=trained.pondering, device="cpu")
    prompts = ["t1 t3 t5 t7", "t10 t11", "t100 t102 t103 t105 t106 t108"]
    free = lm.generate_until(_requests("generate_until", [
        (p, {"until": [], "max_gen_toks": 8, "do_sample": False}) for p in prompts]))
    stop = " " + free[0].split()[2]  # the third generated word stops the first prompt
    cut = lm.generate_until(_requests("generate_until", [
        (p, {"until": [stop], "max_gen_toks": 8, "do_sample": False}) for p in prompts]))
    assert cut[0] == free[0][:free[0].index(stop)]
    capsys.readouterr()
    assert _tool("generate").main(
        ["--load", trained.pondering, "--greedy", "--device", "cpu", "--max-new-tokens", "8",
         "--json", "--stop", stop, *sum([["--prompt", p] for p in prompts], [])]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    assert [line["completion"] for line in lines] == cut


def test_evaluate_tool_writes_results_and_reports_bad_input(trained, tmp_path, monkeypatch,
                                                            capsys):
    import megatron_latent.distributed

    monkeypatch.setattr(megatron_latent.distributed, "destroy_parallel", lambda: None)
    _write_tasks(tmp_path, trained.models["vanilla"])
    tool = _tool("evaluate")
    output = tmp_path / "out" / "results.json"
    assert tool.main(["--load", trained.pondering, "--tasks", "tiny_mc,tiny_ppl",
                      "--include-path", str(tmp_path), "--device", "cpu", "--limit", "3",
                      "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "word_perplexity" in printed
    written = json.loads(output.read_text())
    assert written["lm_eval_version"] == lm_eval.__version__ and "samples" not in written
    assert written["config"]["method"] == "pondering"
    assert written["results"]["tiny_mc"]["sample_len"] == 3

    assert tool.main(["--load", str(tmp_path / "nowhere"), "--tasks", "tiny_mc",
                      "--include-path", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("evaluate.py: error: ")
    assert "latest_checkpointed_iteration.txt" in error[0]
    from megatron_latent.evaluation import runner

    monkeypatch.setattr(runner, "task_manager", lambda tasks, path: TaskManager(
        include_path=path, include_defaults=False))  # lm-eval's 15k built-ins take seconds
    assert tool.main(["--load", trained.pondering, "--tasks", "no_such_task",
                      "--include-path", str(tmp_path)]) == 2
    assert "unknown task(s) no_such_task" in capsys.readouterr().err

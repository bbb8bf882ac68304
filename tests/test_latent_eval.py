"""Evaluation of latent-thought models: the backend's latent prompt and banned latent tokens
on a tiny grown checkpoint, GSM8K/MATH answer extraction, and the generated GSM8K/MATH task
YAMLs run end to end through lm-eval."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from training_fixtures import (
    TINY_FLAGS,
    TINY_VOCAB,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from megatron_latent.config import ConfigError  # noqa: E402
from megatron_latent.evaluation import lm_backend, math_answers  # noqa: E402
from megatron_latent.evaluation.lm_backend import MegatronLatentLM  # noqa: E402
from megatron_latent.inference.sampling import GenerationConfig, select_next_tokens  # noqa: E402
from megatron_latent.latent import LATENT_TOKENS, LatentTokenIds  # noqa: E402
from megatron_latent.latent.tokens import add_latent_tokens_to_tokenizer, grow_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IDS = LatentTokenIds.after(TINY_VOCAB)
FOUR = IDS.as_tuple()
EOD = TINY_VOCAB - 1
MAX_LENGTH = 32


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(single_process_parallel, tmp_path_factory):
    """A tiny trained vanilla checkpoint and its grown copy (tokenizer with the four tokens)."""
    root = tmp_path_factory.mktemp("latent_eval")
    prefix = write_token_dataset(str(root / "data" / "tokens"))
    tokenizer = write_wordlevel_tokenizer(str(root / "tokenizer"))
    run_training(TINY_FLAGS + [
        "--method", "vanilla", "--data-path", prefix, "--split", "90,10,0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "4",
        "--eval-iters", "0", "--save", str(root / "vanilla")])
    grown_tok = add_latent_tokens_to_tokenizer(tokenizer, "HuggingFaceTokenizer",
                                               str(root / "tok_latent"))
    assert grown_tok.ids == IDS
    grow_checkpoint(str(root / "vanilla"), str(root / "grown"), TINY_VOCAB + 4,
                    "HuggingFaceTokenizer", grown_tok.output_path)
    grown = MegatronLatentLM(load=str(root / "grown"), device="cpu", dtype="float32",
                             max_length=MAX_LENGTH, batch_size=4)
    return SimpleNamespace(root=root, vanilla=str(root / "vanilla"), grown=grown)


def _output_layer(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for name, m in model.named_modules() if name.endswith("output_layer"))


class HeadBias:
    """A forward hook on the output head adding +1000 to chosen ids: the same ids at every
    call, or (script) the k-th id at the k-th forward (prefill = forward 0), then EOD."""

    def __init__(self, model, ids=(), script=None):
        self.ids, self.script, self.calls = list(ids), script, 0
        self.handle = _output_layer(model).register_forward_hook(self)

    def __call__(self, module, inputs, output):
        logits = output[0] if isinstance(output, tuple) else output
        if self.script is None:
            boost = self.ids
        else:
            boost = [self.script[self.calls] if self.calls < len(self.script) else EOD]
        self.calls += 1
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        bias[boost] = 1000.0
        logits = logits + bias
        return (logits, *output[1:]) if isinstance(output, tuple) else logits

    def remove(self):
        self.handle.remove()


@pytest.fixture
def recorded(monkeypatch):
    """Every generate_with_details call of the backend: (prompts, config, outputs)."""
    calls = []
    real = lm_backend.generate_with_details

    def wrapper(model, prompts, config, detokenize=None, **kwargs):
        outputs = real(model, prompts, config, detokenize=detokenize, **kwargs)
        calls.append((prompts, config, outputs))
        return outputs

    monkeypatch.setattr(lm_backend, "generate_with_details", wrapper)
    return calls


def _requests(contexts, **gen_kwargs):
    kwargs = {"until": [], "max_gen_toks": 6, "do_sample": False, **gen_kwargs}
    return [Instance(request_type="generate_until", doc={}, arguments=(c, dict(kwargs)), idx=i)
            for i, c in enumerate(contexts)]


def test_banned_token_ids_in_selection():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    config = GenerationConfig(greedy=True, banned_token_ids=(1, 9))
    assert select_next_tokens(logits, config).tolist() == [3, 0]
    sampled = GenerationConfig(temperature=1.0, banned_token_ids=(0, 1, 3), seed=1)
    generator = torch.Generator().manual_seed(0)
    assert set(select_next_tokens(logits.repeat(20, 1), sampled, generator).tolist()) == {2}
    assert logits[0, 1] == 5.0  # the caller's logits are untouched
    with pytest.raises(ValueError, match="banned"):
        GenerationConfig(banned_token_ids=(-1,)).validate()


def test_baseline_generation_never_produces_the_latent_tokens(setup, recorded):
    lm = setup.grown
    contexts = ["t1 t3 t5 t7", "t10 t11", "t100 t102 t103"]
    bias = HeadBias(lm.model, ids=FOUR)
    try:
        free = MegatronLatentLM(loaded=lm.loaded, max_length=MAX_LENGTH,
                                ban_latent_tokens=False)
        free.generate_until(_requests(contexts))
        unbanned = [t for out in recorded[-1][2] for t in out.tokens]
        assert set(unbanned) <= set(FOUR) and unbanned  # the bias makes them the argmax
        lm.generate_until(_requests(contexts))  # default: banned (tokenizer has them)
        _, config, outputs = recorded[-1]
        assert config.banned_token_ids == FOUR
        produced = [t for out in outputs for t in out.tokens]
        assert produced and not set(produced) & set(FOUR)
        # sampling too, and the per-task switch
        lm.generate_until(_requests(contexts, do_sample=True, temperature=1.0))
        assert not {t for out in recorded[-1][2] for t in out.tokens} & set(FOUR)
        free.generate_until(_requests(contexts, ban_latent_tokens=True))
        assert not {t for out in recorded[-1][2] for t in out.tokens} & set(FOUR)
    finally:
        bias.remove()
    assert lm.get_model_info()["ban_latent_tokens"] is True


def test_latent_prompt_returns_the_text_after_eol(setup, recorded):
    lm = setup.grown
    latent_lm = MegatronLatentLM(loaded=lm.loaded, max_length=MAX_LENGTH, latent_prompt=True)
    context = "t1 t2 " + LATENT_TOKENS[0] + LATENT_TOKENS[2] + "t3" + LATENT_TOKENS[1] + " t4"
    a, b, c = 40, 41, 42
    bias = HeadBias(lm.model, script=[a, a, a, IDS.eol, b, c])
    try:
        (text,) = latent_lm.generate_until(_requests([context], max_gen_toks=10,
                                                     until=[f"t{a}", f" t{c}"]))
    finally:
        bias.remove()
    prompts, config, outputs = recorded[-1]
    assert prompts[0] == [EOD, 1, 2, IDS.sol, IDS.pri, 3, IDS.eol, 4, IDS.sol, IDS.pri]
    assert config.banned_token_ids == ()
    # "ta" inside the latent does not stop it; " tc" in the answer does
    assert outputs[0].tokens == [a, a, a, IDS.eol, b, c]
    assert text == f"t{b}"
    entry = latent_lm.latent_log[-1]
    assert entry["latent_ids"] == [a, a, a] and entry["latent"] == f"t{a} t{a} t{a}"
    assert entry["closed"] and entry["answer"] == f"t{b}"
    # later latents in the answer are removed; no EoL: no answer
    assert latent_lm.split_latent([a, IDS.eol, b, IDS.sol, IDS.pri, c, IDS.eol, a]) == (
        [a], [b, a])
    assert latent_lm.latent_answer_text([a, b]) == ""
    # the same through a task's generation_kwargs on the default backend
    bias = HeadBias(lm.model, script=[a, IDS.eol, b])
    try:
        assert lm.generate_until(_requests(["t5"], latent_prompt=True)) == [f"t{b}"]
    finally:
        bias.remove()
    assert recorded[-1][0][0][-2:] == [IDS.sol, IDS.pri]
    with pytest.raises(ConfigError, match="exclude each other"):
        MegatronLatentLM(loaded=lm.loaded, latent_prompt=True, ban_latent_tokens=True)


def test_tokenizer_without_the_tokens(setup, recorded):
    plain = MegatronLatentLM(load=setup.vanilla, device="cpu", max_length=MAX_LENGTH)
    plain.generate_until(_requests(["t1 t2"], ban_latent_tokens=True))
    assert recorded[-1][1].banned_token_ids == ()
    with pytest.raises(ConfigError, match="latent_prompt needs a tokenizer"):
        MegatronLatentLM(loaded=plain.loaded, latent_prompt=True)


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("So she has 1,000 left. The answer is $1,250.", "1250"),
    ("The answer is 18.00.\n\nQuestion: 5 more", "18"),
    ("He pays 3.5 dollars, then 2 more: 5.50", "5.5"),
    ("Temperatures drop to -4 degrees.", "-4"),
    ("no number here", None),
])
def test_gsm8k_extraction(text, expected):
    assert math_answers.extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("So $x = \\boxed{\\frac{3}{4}}$.", "\\frac{3}{4}"),
    ("First \\boxed{1}, then \\boxed{\\{1, 2\\}} wait \\boxed{x^{2}+1}", "x^{2}+1"),
    ("The final answer is $[2,5)$. I hope it is correct.", "[2,5)"),
    ("\\fbox{7}", "7"),
    ("no boxed answer", None),
])
def test_math_extraction(text, expected):
    assert math_answers.extract_math_answer(text) == expected


def test_math_scoring():
    assert math_answers.math_is_correct("thus $\\boxed{\\dfrac{3}{4}}$.", "\\frac{3}{4}")
    assert math_answers.math_is_correct("\\boxed{180^\\circ}", "180")
    assert math_answers.math_is_correct("\\boxed{10\\%}", "10")
    assert math_answers.math_is_correct("\\boxed{\\text{(B)}}", "(B)")
    assert not math_answers.math_is_correct("\\boxed{3/4}", "\\frac{3}{4}")
    assert math_answers.process_math({"solution": "so \\boxed{-2}."}, ["\\boxed{ -2 }"]) == {
        "exact_match": 1}
    assert math_answers.process_gsm8k({"answer": "x\n#### 1,000"}, ["The answer is 1000."]) \
        == {"exact_match": 1}
    assert math_answers.process_gsm8k({"gold": "7"}, ["3 + 4 = 8"]) == {"exact_match": 0}


def test_task_yamls_run_end_to_end(setup, tmp_path, recorded):
    import yaml

    out = tmp_path / "tasks"
    assert _tool("make_eval_tasks").main([
        "--math-only", "--output-dir", str(out), "--math-data", "gsm8k=sample",
        "--math-data", "math=sample", "--max-gen-toks", "6"]) == 0
    names = ["gsm8k_cot_local", "gsm8k_cot_latent", "hendrycks_math_cot_local",
             "hendrycks_math_cot_latent"]
    for name in names:
        text = (out / f"{name}.yaml").read_text()
        assert "process_results: !function math_answers.process_" in text
        config = yaml.safe_load(text.split("process_results:")[0])
        assert config["generation_kwargs"].get("latent_prompt", False) == name.endswith("latent")
        exemplar_target = config["doc_to_target"]
        assert (LATENT_TOKENS[0] + LATENT_TOKENS[2] in exemplar_target) == name.endswith(
            "latent")
    assert (out / "math_answers.py").is_file()
    lm = setup.grown
    lm.latent_log.clear()
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, limit=2, bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=str(out), include_defaults=False))
    for name in names:
        score = results["results"][name]["exact_match,none"]
        assert 0.0 <= score <= 1.0
        assert len(results["samples"][name]) == 2
    latent_sample = results["samples"]["gsm8k_cot_latent"][0]
    # the exemplars carry their solution inside a latent (names turned into ids)
    assert LATENT_TOKENS[0] + LATENT_TOKENS[2] in str(latent_sample["arguments"])
    assert "latent_prompt" in str(latent_sample["arguments"])
    baseline_calls = [c for c in recorded if c[1].banned_token_ids == FOUR]
    latent_calls = [c for c in recorded if c[1].banned_token_ids == ()]
    assert len(baseline_calls) == 2 and len(latent_calls) == 2  # one batch per task
    assert all(p[-2:] == [IDS.sol, IDS.pri] for c in latent_calls for p in c[0])
    assert len(lm.latent_log) == 4

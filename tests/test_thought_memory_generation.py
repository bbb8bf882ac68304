"""Thought-memory generation: the KV-cached path equals full-row recomputation, every step's
logits and every pushed sentence vector equal teacher forcing through ThoughtMemoryModel.forward,
and tools/generate.py decodes a trained checkpoint through the method's hook."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_latent.config import ModelConfig
from megatron_latent.data.tokenizers import build_tokenizer
from megatron_latent.inference import GenerationConfig
from megatron_latent.methods.thought_memory import build_thought_memory_model
from megatron_latent.methods.thought_memory.generation import (
    GenerationTrace,
    generate_sentences,
    generate_text,
    prompt_sentences,
    sentence_fragments,
)
from megatron_latent.methods.thought_memory.model import ThoughtMemoryOptions
from megatron_latent.methods.thought_memory.options import (
    ThoughtMemoryRunOptions,
    prepare_thought_memory_config,
)
from megatron_latent.models.language_model import RuntimeOptions

from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_sentence_dataset,
    write_wordlevel_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 60
#: Sentences are cut at " . " (a "." is its own, unknown, word: id 0).
PROMPTS = ["t5 t6 t7 . t9 t10 . t11", "t1 t2 t3 t4 t5 t6 t7 t8 . t20", "t30"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = write_wordlevel_tokenizer(str(tmp_path_factory.mktemp("tok")), VOCAB)
    return build_tokenizer("HuggingFaceTokenizer", tokenizer_model=path)


@pytest.fixture(scope="module")
def model(single_process_parallel):
    """A 4-layer SCSC model with perturbed weights, rows of <= 5 content tokens, 3 memory slots
    (so the FIFO overflows), and a larger EOS output row so greedy decoding samples EOS."""
    options = ThoughtMemoryRunOptions(ThoughtMemoryOptions(eos_id=-1, memory_size=3),
                                      max_content=5)
    config = prepare_thought_memory_config(
        ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=2, vocab_size=VOCAB,
                    seq_length=8), options)
    torch.manual_seed(0)  # the same initial weights whichever tests ran before
    model = build_thought_memory_model(config, RuntimeOptions(), "cpu", options)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.8)
            elif "norm.weight" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        model.output_layer.weight[model.layout.eos] *= 3
    return model.eval()


def run(model, tokenizer, use_cache, prompts=PROMPTS, **kwargs):
    trace = GenerationTrace()
    config = GenerationConfig(max_new_tokens=kwargs.pop("max_new_tokens", 12), greedy=True,
                              **kwargs)
    return generate_text(model, tokenizer, prompts, config, use_cache, trace), trace


def test_prompt_sentences_and_fragments(tokenizer):
    assert prompt_sentences(tokenizer, PROMPTS[0]) == [[5, 6, 7, 0], [9, 10, 0], [11]]
    assert prompt_sentences(tokenizer, "  ") == []
    closed, open_row = sentence_fragments([[1] * 7, [2, 3], [4] * 10], 5)
    assert closed == [[1] * 5, [1, 1], [2, 3], [4] * 5] and open_row == [4] * 5
    assert sentence_fragments([], 5) == ([], [])


def test_cached_equals_recomputed(model, tokenizer):
    cached, with_cache = run(model, tokenizer, True)
    full, without = run(model, tokenizer, False)
    assert [g.tokens for g in cached] == [g.tokens for g in full]
    assert [g.text for g in cached] == [g.text for g in full]
    assert all(len(g.tokens) == 12 and g.finish_reason == "length" for g in cached)
    assert with_cache.rows == without.rows and with_cache.closes == without.closes
    closes = sum(with_cache.closes, [])
    assert "eos" in closes and "full" in closes  # sampled and forced closes during decoding
    for a, b in zip(with_cache.logits, without.logits):
        assert len(a) == len(b)
        torch.testing.assert_close(torch.stack(a), torch.stack(b), atol=1e-5, rtol=1e-5)
    for a, b in zip(with_cache.s_reps, without.s_reps):
        torch.testing.assert_close(torch.stack(a), torch.stack(b), atol=1e-5, rtol=1e-5)


def test_steps_equal_teacher_forcing_through_forward(model, tokenizer):
    _, trace = run(model, tokenizer, True)
    layout = model.layout
    vectors = []
    hook = model.s_rep.register_forward_hook(lambda module, args, out: vectors.append(out[0]))
    try:
        for p, rows in enumerate(trace.rows):
            ids = torch.full((1, len(rows), layout.L), layout.pad, dtype=torch.long)
            for t, row in enumerate(rows):
                ids[0, t, :len(row)] = torch.tensor(row)
            vectors.clear()
            with torch.no_grad():
                _, aux = model(ids, ids, return_logits=True)
            logits = aux["logits"][0, ..., :layout.eod + 1]
            assert trace.positions[p][0][0] == len([c for c in trace.closes[p] if c == "prompt"])
            for step, (row, position) in enumerate(trace.positions[p]):
                torch.testing.assert_close(trace.logits[p][step], logits[row, position],
                                           atol=1e-5, rtol=1e-5)
            pushed = torch.stack(trace.s_reps[p])
            assert len(pushed) == len(rows) - 1  # every row but the open one was pushed
            torch.testing.assert_close(pushed, torch.cat(vectors[:len(pushed)]),
                                       atol=1e-5, rtol=1e-5)
    finally:
        hook.remove()


def test_eod_and_stop_conditions(model, tokenizer):
    eod = model.layout.eod
    plain_logits = model.output_logits

    def eod_first(hidden):  # EOD far ahead of every other id once the row has content
        logits = plain_logits(hidden).clone()
        logits[..., eod] += 1e3
        return logits

    model.output_logits = eod_first
    try:
        for use_cache in (True, False):
            results, trace = run(model, tokenizer, use_cache, prompts=["t30"])
            assert results[0].finish_reason == "stop_token"
            assert trace.closes[0][-1] == "eod"
            assert trace.rows[0][-1][-2:] == [eod, model.layout.eos]
            assert all(t < VOCAB for t in results[0].tokens)
    finally:
        del model.output_logits  # back to the class's method
    first, _ = run(model, tokenizer, True, max_new_tokens=3)
    assert all(len(g.tokens) == 3 for g in first)
    free, _ = run(model, tokenizer, True, prompts=PROMPTS[:1])
    word = tokenizer.detokenize([free[0].tokens[2]]).strip()  # a word it goes on to write
    stopped, _ = run(model, tokenizer, True, prompts=PROMPTS[:1], stop_strings=(word,))
    assert stopped[0].finish_reason == "stop_string" and word not in stopped[0].text
    assert free[0].text.startswith(stopped[0].text)
    sentences = [[list(range(1, 9))], []]  # a fragment closes the prompt; an empty prompt
    out = generate_sentences(model, sentences, GenerationConfig(max_new_tokens=4, greedy=True))
    assert [len(g.tokens) for g in out] == [4, 4]


def test_generate_tool_runs_a_trained_checkpoint(single_process_parallel, tmp_path, capsys):
    from megatron_latent.distributed import ParallelConfig, initialize_parallel

    prefix = write_sentence_dataset(str(tmp_path / "data" / "sentences"))
    tokenizer_path = write_wordlevel_tokenizer(str(tmp_path / "tokenizer"))
    ckpt = tmp_path / "ckpt"
    run_training(TINY_FLAGS + [
        "--method", "thought-memory", "--data-path", prefix, "--split", "80,20,0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_path,
        "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "2",
        "--eval-iters", "0", "--tm-token-budget", "600", "--tm-max-content", "16",
        "--tm-stream-length", "4", "--save", str(ckpt)])
    spec = importlib.util.spec_from_file_location("generate_tool", ROOT / "tools" / "generate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    try:
        code = tool.main(["--load", str(ckpt), "--device", "cpu", "--greedy",
                          "--max-new-tokens", "5", "--prompt", "t5 t6 t7 . t9 t10",
                          "--prompt", "t3"])
    finally:  # the tool tears the process group down; later tests need it back
        initialize_parallel(ParallelConfig(), torch.device("cpu"), seed=1234)
    out = capsys.readouterr().out
    assert code == 0
    assert "### t5 t6 t7 . t9 t10\n" in out and "### t3\n" in out
    assert out.count("thought-memory, iteration 2]") == 2
    shown = out.split("### t3\n")[1].splitlines()[0]
    assert shown.startswith("t3") and len(shown.split()) > 1

"""Thought-memory generation and lm-eval scoring at TP=2 (also with sequence parallelism for
generation) equal TP=1 on the same full weights: the same greedy tokens on every rank, the
same log-likelihoods and greedy flags. Results are gathered before anything is asserted."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_thought_memory_model_tp import all_ranks, load_full_weights  # noqa: E402

from megatron_latent.config import ModelConfig  # noqa: E402
from megatron_latent.data.tokenizers import build_tokenizer  # noqa: E402
from megatron_latent.inference.sampling import GenerationConfig  # noqa: E402
from megatron_latent.methods.thought_memory import (  # noqa: E402
    ThoughtMemoryOptions,
    ThoughtMemoryRunOptions,
    build_thought_memory_model,
)
from megatron_latent.methods.thought_memory.generation import generate_text  # noqa: E402
from megatron_latent.methods.thought_memory.options import (  # noqa: E402
    prepare_thought_memory_config,
)
from megatron_latent.methods.thought_memory.scoring import score_continuations  # noqa: E402
from megatron_latent.models.language_model import RuntimeOptions  # noqa: E402

from training_fixtures import write_wordlevel_tokenizer  # noqa: E402

VOCAB = 60  # + PAD, BOS, EOS, EOD = 64 rows at both TP sizes
OPTIONS = ThoughtMemoryRunOptions(ThoughtMemoryOptions(eos_id=-1, memory_size=2),
                                  max_content=5, row_length=8)
PROMPTS = ["t5 t6 t7 . t9 t10 . t11", "t1 t2 t3 t4 t5 t6 t7 t8 . t20", "t30"]
PAIRS = [("t5 t6 t7 .", " t9 t10"), ("t1 t2 . t3 t4 t5 t6 t7 t8 t9 .", " t11 t12 ."),
         ("", "t4 t5 t6")]


def shared_tokenizer():
    box = [tempfile.mkdtemp(prefix="ml-tm-inf-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if dist.get_rank() == 0:
        write_wordlevel_tokenizer(box[0], VOCAB)
    dist.barrier()
    return build_tokenizer("HuggingFaceTokenizer",
                           tokenizer_model=str(Path(box[0]) / "tokenizer.json"))


def model_at(use_parallel, tp: int, sequence_parallel: bool = False):
    use_parallel(tp)
    config = prepare_thought_memory_config(
        ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                    make_vocab_size_divisible_by=64 // tp), OPTIONS)
    model = build_thought_memory_model(
        config, RuntimeOptions(tensor_model_parallel_size=tp,
                               sequence_parallel=sequence_parallel), "cpu", OPTIONS)
    load_full_weights(model)
    return model.eval()


def outcome(model, tokenizer):
    config = GenerationConfig(max_new_tokens=10, greedy=True)
    with torch.no_grad():
        tokens = [g.tokens for g in generate_text(model, tokenizer, PROMPTS, config)]
        scores = score_continuations(model, tokenizer, PAIRS, batch_size=2)
    return tokens, scores


def test_generation_and_scoring_tp2_equal_tp1(use_parallel):
    tokenizer = shared_tokenizer()
    one = outcome(model_at(use_parallel, 1), tokenizer)
    two = outcome(model_at(use_parallel, 2), tokenizer)
    sp_tokens, _ = outcome(model_at(use_parallel, 2, sequence_parallel=True), tokenizer)
    seen = all_ranks({"one": one, "two": two, "sp": sp_tokens})
    for rank, result in enumerate(seen):
        tokens1, scores1 = result["one"]
        tokens2, scores2 = result["two"]
        assert any(len(t) == 10 for t in tokens1), rank  # generation ran
        assert tokens2 == tokens1 and result["sp"] == tokens1, rank
        assert [greedy for _, greedy in scores2] == [greedy for _, greedy in scores1], rank
        for (value2, _), (value1, _) in zip(scores2, scores1):
            assert abs(value2 - value1) < 1e-4 * max(1.0, abs(value1)), (rank, value1, value2)
    assert seen[0] == seen[1]  # every rank returns the same

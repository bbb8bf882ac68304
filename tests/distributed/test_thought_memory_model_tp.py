"""The whole ThoughtMemoryModel (S and C layers, S_REP head, FIFO memory with eviction, BOS
seeding, per-index loss) at TP=2 equals TP=1 on the same full-size weights and the same stream
batch: total loss (LM part + S_REP hinge), the hinge, and every parameter's gradient (sharded
ones gathered along megatron's partition dim; replicated ones equal on both TP ranks). Planted
TP bugs (one rank's shard on both ranks; the memory gradient's all-reduce skipped) must fail.
With sequence parallelism too (rows split along the sequence), rows of L divisible by TP.

Results are gathered over the world before anything is asserted, so a rank that fails cannot
leave the other waiting in a collective."""

from __future__ import annotations

import numpy
import pytest
import torch
import torch.distributed as dist

from megatron_latent.config import ConfigError, ModelConfig
from megatron_latent.distributed import (
    allreduce_sequence_parallel_grads,
    tp_group,
    tp_rank,
    tp_size,
)
from megatron_latent.methods.thought_memory.model import ThoughtMemoryModel, ThoughtMemoryOptions
from megatron_latent.methods.thought_memory.streams import StreamLayout, row_arrays
from megatron_latent.models.language_model import RuntimeOptions, build_pythia_model

LAYOUT = StreamLayout.for_vocab(60, max_content=5, max_sentences=4)  # PAD 60 .. EOD 63
VOCAB = 64  # padded to 64 at both TP sizes (make_vocab_size_divisible_by = 64 / TP)
MODEL = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                    seq_length=LAYOUT.L)
STREAM_ROWS = (4, 2, 3)  # sentences per stream; stream 1 ends its document (EOD)
MEMORY_SIZE = 2  # < 4 sentences: stream 0 evicts
ATOL, RTOL = 1e-5, 1e-4


def make_batch(seed: int = 0, w_eos: float = 0.05):
    """[B, T, L] ids/targets/weights and valid [B, T] in streams.py's layout."""
    rng = numpy.random.RandomState(seed)
    B, T, L = len(STREAM_ROWS), max(STREAM_ROWS), LAYOUT.L
    ids = torch.full((B, T, L), LAYOUT.pad, dtype=torch.long)
    targets = torch.full((B, T, L), LAYOUT.pad, dtype=torch.long)
    weights = torch.zeros(B, T, L)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(STREAM_ROWS):
        for t in range(n):
            content = rng.randint(0, 60, size=rng.randint(1, LAYOUT.max_content + 1))
            row = row_arrays(content, LAYOUT, eod=(b == 1 and t == n - 1), w_eos=w_eos)
            ids[b, t], targets[b, t], weights[b, t] = (torch.from_numpy(a) for a in row)
        valid[b, :n] = True
    return ids, targets, weights, valid


def partition_dim(param: torch.nn.Parameter) -> int | None:
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def full_weight(index: int, name: str, shape: list[int]) -> torch.Tensor:
    """The unsharded tensor of parameter `name`, the same at every TP size."""
    generator = torch.Generator().manual_seed(100 + index)
    if name.endswith("gate"):
        return torch.full(shape, 0.8)
    tensor = 0.1 * torch.randn(shape, generator=generator)
    if name.endswith("norm.weight") or "layernorm.weight" in name:
        tensor += 1.0
    return tensor


def load_full_weights(model: torch.nn.Module, frozen_shard: str | None = None) -> None:
    """This rank's shard of each full weight along megatron's partition dim. Plant: the
    parameter named `frozen_shard` gets rank 0's shard on every rank."""
    for index, (name, param) in enumerate(sorted(model.named_parameters())):
        dim = partition_dim(param)
        shape = list(param.shape)
        if dim is not None:
            shape[dim] *= tp_size()
        full = full_weight(index, name, shape)
        if dim is not None:
            rank = 0 if name == frozen_shard else tp_rank()
            full = full.chunk(tp_size(), dim=dim)[rank]
        with torch.no_grad():
            param.copy_(full)


def skip_memory_grad_allreduce(model: torch.nn.Module) -> None:
    """Plant: the C layers' linear_kv (the memory's, hence S_REP's, way back) no longer
    all-reduces its input gradient over TP: each rank keeps its heads' part only."""
    for layer in model.decoder.layers:
        if hasattr(layer, "cross_attention"):
            layer.cross_attention.linear_kv.allreduce_dgrad = False
            layer.cross_attention.linear_kv.disable_grad_reduce = True


def run(use_parallel, tp: int, frozen_shard: str | None = None, skip_allreduce: bool = False,
        sequence_parallel: bool = False):
    """(loss, hinge, {name: full gradient}, {name: [grad on each TP rank]} of replicated
    parameters) of one forward/backward over the stream batch."""
    use_parallel(tp)
    options = ThoughtMemoryOptions(eos_id=LAYOUT.eos, memory_size=MEMORY_SIZE)
    model = build_pythia_model(
        MODEL.replace(make_vocab_size_divisible_by=VOCAB // tp),
        RuntimeOptions(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel),
        model_class=ThoughtMemoryModel, options=options)
    load_full_weights(model, frozen_shard)
    if skip_allreduce:
        skip_memory_grad_allreduce(model)
    out, aux = model(*make_batch())
    hinge = aux["s_rep_hinge_loss"]
    loss = out.sum() + hinge
    loss.backward()
    allreduce_sequence_parallel_grads(model)  # what the engines do (LayerNorms, gates)
    grads, replicated = gathered_grads(model, tp)
    return loss.detach(), hinge.detach(), grads, replicated


def gathered_grads(model: torch.nn.Module, tp: int) -> tuple[dict, dict]:
    """({name: full gradient}, {name: [its gradient on each TP rank]} of the replicated
    parameters): sharded gradients gathered along megatron's partition dim."""
    local = {name: (p.grad.detach().clone(), partition_dim(p))
             for name, p in model.named_parameters()}
    per_rank = [local]
    if tp > 1:
        per_rank = [None] * tp
        dist.all_gather_object(per_rank, local, group=tp_group())
    grads, replicated = {}, {}
    for name, (grad, dim) in local.items():
        if dim is None:
            grads[name] = grad
            replicated[name] = [shards[name][0] for shards in per_rank]
        else:
            grads[name] = torch.cat([shards[name][0] for shards in per_rank], dim=dim)
    return grads, replicated


def mismatches(actual, expected, what: str) -> list[str]:
    try:
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)
    except AssertionError as error:
        return [f"{what}: {str(error).splitlines()[0:4]}"]
    return []


def compare(one, two) -> list[str]:
    """Every difference between the TP=1 run `one` and the TP=2 run `two`, as messages."""
    loss1, hinge1, grads1, _ = one
    loss2, hinge2, grads2, replicated2 = two
    problems = mismatches(loss2, loss1, "loss") + mismatches(hinge2, hinge1, "hinge")
    if set(grads1) != set(grads2):
        problems.append(f"parameter names differ: {set(grads1) ^ set(grads2)}")
    for name in sorted(set(grads1) & set(grads2)):
        problems += mismatches(grads2[name], grads1[name], f"grad {name}")
    for name, copies in replicated2.items():
        for rank, copy in enumerate(copies[1:], start=1):
            problems += mismatches(copy, copies[0], f"replicated grad {name} rank {rank} vs 0")
    return problems


def all_ranks(value):
    """`value` from every rank of the world (gathered before any assertion)."""
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, value)
    return seen


def test_model_tp2_equals_tp1(use_parallel):
    one = run(use_parallel, 1)
    two = run(use_parallel, 2)
    loss1, hinge1, grads1, _ = one
    summary = {
        "problems": compare(one, two),
        "hinge": float(hinge1),
        "zero_grads": [n for n, g in grads1.items() if not g.abs().sum() > 0],
        "replicated": sorted(two[3]),
        "max_diff": max(float((two[2][n] - g).abs().max()) for n, g in grads1.items()),
        "loss_diff": float((two[0] - loss1).abs()),
    }
    seen = all_ranks(summary)
    for rank, result in enumerate(seen):
        assert not result["problems"], (rank, result["problems"])
        assert result["hinge"] > 0, rank  # the hinge is active, so its path is tested
        assert not result["zero_grads"], (rank, result["zero_grads"])  # every path reached
        # LayerNorms (incl. S_REP's), the S_REP linear and the gates are the replicated ones.
        replicated = result["replicated"]
        assert "s_rep.linear.weight" in replicated and "s_rep.norm.weight" in replicated
        assert any(n.endswith("gate") for n in replicated)
        assert any(n.endswith("input_layernorm.weight") for n in replicated)
    assert seen[0]["max_diff"] == seen[1]["max_diff"]


@pytest.mark.parametrize("plant", ["rank-0-shard", "no-memory-grad-allreduce"])
def test_planted_tp_bugs_fail(use_parallel, plant):
    one = run(use_parallel, 1)
    if plant == "rank-0-shard":
        two = run(use_parallel, 2, frozen_shard="decoder.layers.1.cross_attention.linear_kv.weight")
    else:
        two = run(use_parallel, 2, skip_allreduce=True)
    seen = all_ranks(compare(one, two))
    for rank, problems in enumerate(seen):
        assert problems, rank
        if plant == "rank-0-shard":  # a wrong forward: the loss itself differs
            assert any(p.startswith("loss") for p in problems), problems
        else:  # forward unchanged; S_REP's gradients differ (and between the two ranks)
            assert not any(p.startswith(("loss", "hinge")) for p in problems), problems
            assert any("s_rep.linear.weight" in p for p in problems), problems
            assert any(p.startswith("replicated grad s_rep") for p in problems), problems


def test_sequence_parallel_equals_tp1(use_parallel):
    """Rows split along the sequence over TP (S_REP read from the gathered source layer, the
    seeded BOS on TP rank 0, the memory whole on every rank): the same loss, hinge and
    gradients as TP=1, replicated gradients equal on both ranks."""
    one = run(use_parallel, 1)
    two = run(use_parallel, 2, sequence_parallel=True)
    seen = all_ranks(compare(one, two))
    for rank, problems in enumerate(seen):
        assert not problems, (rank, problems)


def test_sequence_parallel_needs_rows_divisible_by_tp(use_parallel):
    use_parallel(2)
    options = ThoughtMemoryOptions(eos_id=LAYOUT.eos, memory_size=MEMORY_SIZE)
    refused = []
    try:
        build_pythia_model(MODEL.replace(make_vocab_size_divisible_by=VOCAB // 2,
                                         seq_length=LAYOUT.L + 1,
                                         max_position_embeddings=LAYOUT.L + 1),
                           RuntimeOptions(tensor_model_parallel_size=2, sequence_parallel=True),
                           model_class=ThoughtMemoryModel, options=options)
    except ConfigError as error:
        refused.append(str(error))
    seen = all_ranks(refused)
    for rank, messages in enumerate(seen):
        assert messages and "--tm-row-length" in messages[0], (rank, messages)

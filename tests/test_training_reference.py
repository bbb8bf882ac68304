"""The trainer against independent computations: optimizer steps against Hugging Face GPTNeoX
with torch's AdamW and clip_grad_norm_, gradients under any accumulation, validation loss by
hand, and the logged TFLOP/s against the FLOP formulas."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from megatron_latent.models import hf_gpt_neox as mapping

from training_fixtures import TINY_VOCAB, write_token_dataset, write_wordlevel_tokenizer

transformers = pytest.importorskip("transformers")

EOD = TINY_VOCAB - 1
SHAPE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "32", "--vocab-size", str(TINY_VOCAB),
         "--make-vocab-size-divisible-by", "64", "--num-workers", "0", "--log-interval", "1",
         "--seed", "7", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("reference_corpus")
    # Short documents: packed rows hold several, micro-batches unequal numbers of them.
    prefix = write_token_dataset(str(base / "tokens"), num_documents=200, lengths=(3, 40))
    other = write_token_dataset(str(base / "other"), num_documents=200, seed=5, lengths=(3, 40))
    tokenizer = write_wordlevel_tokenizer(str(base / "tokenizer"))
    return prefix, other, tokenizer


def flags(corpus, *extra: str, micro: int = 2, global_batch: int = 8) -> list[str]:
    prefix, _, tokenizer = corpus
    return SHAPE + [
        "--data-path", prefix, "--split", "90,10,0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
        "--micro-batch-size", str(micro), "--global-batch-size", str(global_batch),
        "--eval-iters", "0", "--train-iters", "10", *extra,
    ]


def set_up(argv: list[str]):
    """A trainer ready to step (model, optimizer, scheduler and data built)."""
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.training.trainer import Trainer

    run, _ = parse_run_config(argv)
    trainer = Trainer(run)
    trainer.setup()
    return trainer


def global_batches(trainer, count: int) -> list[list[dict[str, torch.Tensor]]]:
    from megatron_latent.training.data import microbatch_groups

    groups = microbatch_groups(trainer.data.train_loader, trainer.num_microbatches)
    return [next(groups) for _ in range(count)]


def step(trainer, microbatches):
    """One optimizer step as the training loop takes it."""
    result = trainer.engine.train_step(microbatches)
    trainer.scheduler.step(increment=trainer.run.training.global_batch_size)
    return result


def hf_copy(trainer):
    """A Hugging Face GPTNeoX holding the trainer's current weights."""
    model_config = trainer.engine.unwrapped_model().model_config
    padded = model_config.padded_vocab_size()
    config = transformers.GPTNeoXConfig(**mapping.model_config_to_hf_config(model_config, padded))
    model = transformers.GPTNeoXForCausalLM(config).float()
    head = "embed_out.weight" if "embed_out.weight" in model.state_dict() else "lm_head.weight"
    weights = mapping.canonical_to_hf(trainer.engine.model_state(), padded, head_name=head)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all("rotary" in name or "attention.bias" in name
                                  for name in missing), (missing, unexpected)
    return model, head


def segments(row: torch.Tensor, reset: bool) -> list[tuple[int, int]]:
    """[start, end) of each document of a packed row: a document ends after an EOD token."""
    if not reset:
        return [(0, row.numel())]
    bounds, start = [], 0
    for index in (row == EOD).nonzero().flatten().tolist():
        bounds.append((start, index + 1))
        start = index + 1
    if start < row.numel():
        bounds.append((start, row.numel()))
    return bounds


def reference_token_losses(model, tokens, labels, reset_attention: bool,
                           reset_positions: bool) -> torch.Tensor:
    """Per-token cross-entropy [b, s]: with attention reset each document of a packed row runs
    on its own; with positions reset they restart at 0 after every EOD."""
    rows = []
    for row_tokens, row_labels in zip(tokens, labels):
        positions = torch.arange(row_tokens.numel())
        if reset_positions:
            for start, end in segments(row_tokens, True):
                positions[start:end] -= start
        parts = []
        for start, end in segments(row_tokens, reset_attention):
            logits = model(row_tokens[None, start:end],
                           position_ids=positions[None, start:end]).logits[0]
            parts.append(F.cross_entropy(logits, row_labels[start:end], reduction="none"))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Megatron's rule: biases and LayerNorm parameters take no weight decay."""
    return name.endswith(".bias") or "norm" in name


OPTIMIZER_FLAGS = ["--lr", "1e-2", "--min-lr", "1e-2", "--lr-decay-style", "constant",
                   "--lr-warmup-fraction", "0", "--weight-decay", "0.1", "--adam-beta1", "0.8",
                   "--adam-beta2", "0.9", "--adam-eps", "1e-4", "--clip-grad", "0.05",
                   "--eod-mask-loss"]


@pytest.mark.parametrize("packing", [[], ["--reset-attention-mask"], ["--reset-position-ids"]],
                         ids=["plain", "reset-attention", "reset-positions"])
def test_optimizer_steps_match_hugging_face_adamw_and_clipping(single_process_parallel, corpus,
                                                              packing):
    trainer = set_up(flags(corpus, *OPTIMIZER_FLAGS, *packing))
    reference, head = hf_copy(trainer)
    ours = dict(trainer.engine.unwrapped_model().named_parameters())
    decay = [p for n, p in reference.named_parameters() if not no_decay(n, p)]
    plain = [p for n, p in reference.named_parameters() if no_decay(n, p)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": plain, "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.8, 0.9), eps=1e-4)
    reset_attention = "--reset-attention-mask" in packing
    reset_positions = "--reset-position-ids" in packing
    for number, microbatches in enumerate(global_batches(trainer, 2)):
        tokens = torch.cat([b["tokens"] for b in microbatches])
        labels = torch.cat([b["labels"] for b in microbatches])
        counts = [int((b["tokens"] != EOD).sum()) for b in microbatches]
        assert len(set(counts)) > 1  # micro-batches carry different numbers of loss tokens
        assert (tokens[:, :-1] == EOD).any()  # some row packs several documents

        per_token = reference_token_losses(reference, tokens, labels, reset_attention,
                                           reset_positions)
        mask = (tokens != EOD).float()  # --eod-mask-loss: no loss after an EOD input
        loss = (per_token * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05).item()

        result = step(trainer, microbatches)
        assert result.lm_loss == pytest.approx(loss.item(), rel=1e-6, abs=1e-6), number
        assert result.grad_norm == pytest.approx(norm, rel=1e-5), number
        assert norm > 0.05  # clipping acted
        grads = mapping.canonical_to_hf({n: p.grad for n, p in ours.items()}, head_name=head)
        for name, param in reference.named_parameters():
            torch.testing.assert_close(grads[name], param.grad, atol=1e-7, rtol=1e-4,
                                       msg=f"step {number}: gradient of {name}")
        optimizer.step()
        weights = mapping.canonical_to_hf(trainer.engine.model_state(), head_name=head)
        for name, param in reference.named_parameters():
            torch.testing.assert_close(weights[name], param.detach(), atol=2e-6, rtol=1e-5,
                                       msg=f"step {number}: {name} after the update")


def test_gradients_do_not_depend_on_accumulation(single_process_parallel, corpus):
    """One micro-batch of 8 and eight micro-batches of 1 make the same gradient: the per-token
    mean over the global batch, with --eod-mask-loss leaving unequal token counts."""
    grads = {}
    for micro in (8, 1):
        trainer = set_up(flags(corpus, "--eod-mask-loss", "--clip-grad", "0", micro=micro))
        assert trainer.num_microbatches == 8 // micro
        (microbatches,) = global_batches(trainer, 1)
        if micro == 1:
            counts = {int(batch["loss_mask"].sum()) for batch in microbatches}
            assert len(counts) > 1
        step(trainer, microbatches)
        grads[micro] = {n: p.grad.clone()
                        for n, p in trainer.engine.unwrapped_model().named_parameters()}
    for name, grad in grads[8].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-8, rtol=1e-5, msg=name)


def test_validation_loss_is_the_masked_mean_over_the_whole_slice(single_process_parallel,
                                                                 corpus):
    """--eval-iters global batches of the validation split, every micro-batch of them, and
    per dataset of a blend: each a masked mean computed here with Hugging Face."""
    prefix, other, _ = corpus
    argv = flags(corpus, "--eod-mask-loss", "--eval-iters", "2", micro=2) + [
        "--data-path", "0.4", prefix, "0.6", other]
    trainer = set_up(argv)
    reference, _ = hf_copy(trainer)
    results = trainer.evaluate()
    datasets = dict(trainer.data.valid_sets)
    assert set(results) == {"validation", prefix, other}
    for name, dataset in datasets.items():
        samples = [dataset[index] for index in range(16)]  # 2 x global batch 8
        tokens = torch.stack([s["tokens"] for s in samples])
        labels = torch.stack([s["labels"] for s in samples])
        with torch.no_grad():
            per_token = reference_token_losses(reference, tokens, labels, False, False)
        mask = (tokens != EOD).float()
        expected = ((per_token * mask).sum() / mask.sum()).item()
        assert results[name] == pytest.approx(expected, rel=1e-6), name
    assert results[prefix] != pytest.approx(results[other], rel=1e-3)


def training_flops_per_token(layers: int, hidden: int, seq: int, vocab: int,
                             ponder_steps: int = 0, recompute: bool = False) -> float:
    """Megatron's accounting: matmuls at 2 FLOPs per multiply-add; per token and layer QKV,
    dense and a 4h MLP (24 h^2) plus attention scores and values (4 s h); the output head
    (2 h V); pondering runs k + 1 passes plus k mixings (2 V h each); backward = 2x forward,
    full recompute one forward more."""
    one_pass = layers * (24 * hidden * hidden + 4 * seq * hidden) + 2 * hidden * vocab
    forward = (ponder_steps + 1) * one_pass + ponder_steps * 2 * vocab * hidden
    return (4 if recompute else 3) * forward


@pytest.mark.parametrize("extra, ponder_steps, recompute", [
    ([], 0, False),
    (["--recompute-granularity", "full"], 0, True),
    (["--method", "pondering", "--ponder-steps", "2"], 2, False),
])
def test_logged_tflops_follow_the_flop_formulas(single_process_parallel, corpus, tmp_path,
                                                extra, ponder_steps, recompute):
    from training_fixtures import run_training

    metrics = tmp_path / "metrics.jsonl"
    run_training(flags(corpus, "--train-iters", "3", "--metrics-file", str(metrics), *extra))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 3
    per_token = training_flops_per_token(2, 32, 32, 512, ponder_steps, recompute)
    for record in train:
        expected = per_token * record["tokens_per_second"] / 1e12
        assert record["tflops_per_device"] == pytest.approx(expected, rel=1e-9)

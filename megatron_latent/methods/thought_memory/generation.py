"""Sentence-by-sentence generation for thought memory, with a KV cache within the sentence.

A prompt is cut into sentences by the `--split-sentences` splitter (the prompt's own tokens,
cut where sentences start). Its complete sentences are encoded as rows ``BOS + content +
EOS``, each writing its sentence vector (S_REP at the first EOS, from the source layer) into
the FIFO memory and seeding the next row's BOS, as in training; the last sentence is the open
row that decoding continues. Content over ``layout.max_content`` tokens becomes fragments, as in
streams.py.

Decoding samples from the open row's last position among the real vocabulary, EOS and EOD (PAD
and BOS are never sampled; EOS and EOD only once the row has content, as every training row
has). EOS (or a row reaching ``max_content`` content tokens) closes the sentence: its S_REP is
pushed into the memory and seeds a new row. EOD ends the document (``finish_reason``
"stop_token"). Only text tokens are returned and counted against ``max_new_tokens``.

With the cache, the open row is fed one token per step through megatron-core's static KV cache
of the S layers (one context of L positions, reset at each new row); the C layers only attend
to the memory, which is fixed within a sentence, so they run on the new token alone. Without
the cache the whole open row is recomputed every step (the reference path). Prompts are
decoded one after the other (batch size 1 each), so rows never need aligning; every TP rank
returns the same result (sampled ids are broadcast from the TP source rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from torch import Tensor

from ...data.sentences import SentenceSplitter, sentence_lengths
from ...distributed import gather_tensor_parallel
from ...inference.generation import Detokenize, Generation, PromptProgress
from ...inference.sampling import GenerationConfig, select_next_tokens
from ...inference.stepping import (
    broadcast_from_tensor_parallel_source,
    sequence_parallel_disabled,
    unwrap_model,
)


@dataclass
class GenerationTrace:
    """What decoding computed, one list per prompt (for checks and inspection)."""

    #: Logits over ids [0, EOD] (unmasked, fp32) of every sampled position.
    logits: list[list[Tensor]] = field(default_factory=list)
    #: (row index, position in the row) each of those logits was read at.
    positions: list[list[tuple[int, int]]] = field(default_factory=list)
    #: Every row fed, with its specials (the last one may be open, without EOS).
    rows: list[list[list[int]]] = field(default_factory=list)
    #: Sentence vectors pushed into the memory, [h] each, in order.
    s_reps: list[list[Tensor]] = field(default_factory=list)
    #: How each closed row was closed: "prompt", "eos" (sampled), "full" or "eod".
    closes: list[list[str]] = field(default_factory=list)

    def start_prompt(self) -> None:
        for item in (self.logits, self.positions, self.rows, self.s_reps, self.closes):
            item.append([])


def prompt_sentences(tokenizer, text: str,
                     splitter: SentenceSplitter | None = None) -> list[list[int]]:
    """The tokens of each sentence of `text`, cut from the text's own tokens exactly as
    `--split-sentences` preprocessing cuts a document (empty text: no sentence)."""
    if not text.strip():
        return []
    splitter = splitter or SentenceSplitter()
    ids, spans = tokenizer.tokenize_with_offsets(text)
    lengths = sentence_lengths(text, spans, splitter.sentence_starts(text))
    sentences, start = [], 0
    for length in lengths:
        sentences.append(list(ids[start:start + length]))
        start += length
    return sentences


def sentence_fragments(sentences: Sequence[Sequence[int]],
                       max_content: int) -> tuple[list[list[int]], list[int]]:
    """(closed row contents, open row content): every sentence cut into consecutive pieces of
    at most `max_content` tokens; the last piece of the last sentence stays open."""
    pieces = [list(s[i:i + max_content]) for s in sentences if len(s)
              for i in range(0, len(s), max_content)]
    if not pieces:
        return [], []
    return pieces[:-1], pieces[-1]


class _PromptDecoder:
    """One prompt's memory, seed vector and open row, run with or without the KV cache."""

    def __init__(self, model, use_cache: bool):
        self.model, self.layout = model, model.layout
        self.device = next(model.parameters()).device
        self.memory = None
        self.seed: Tensor | None = None  # S_REP of the previous row, [1, h]
        self.row: list[int] = []
        self.fed = 0  # open-row positions already in the KV cache
        self.context = StaticInferenceContext(1, self.layout.L) if use_cache else None
        self.rotary = model.rotary_pos_emb(self.layout.L, device=self.device)
        self.s_reps: list[Tensor] = []

    # -- rows ------------------------------------------------------------------------
    def open_row(self, content: Sequence[int] = ()) -> None:
        """Start a row (BOS + content); its position 0 is seeded with the last S_REP."""
        self.row = [self.layout.bos, *content]
        self.fed = 0
        if self.context is not None:
            self.context.reset()

    @property
    def content_length(self) -> int:
        return len(self.row) - 1

    def _embeds(self, start: int, stop: int) -> Tensor:
        """Input embeddings [n, 1, h] of row positions start..stop-1 (position 0 seeded)."""
        ids = torch.tensor([self.row[start:stop]], dtype=torch.long, device=self.device)
        embeds = self.model.embed(ids)
        if self.memory is None:
            self.memory = self.model.memory_class(self.model.thought.memory_size, 1,
                                                  embeds.shape[-1], embeds.device, embeds.dtype)
        if start == 0 and self.seed is not None:
            embeds = torch.cat([self.seed.to(embeds.dtype)[None], embeds[1:]])
        return embeds

    def _run(self, through: int | None = None) -> tuple[Tensor, Tensor | None]:
        """The row's positions not yet cached (all of it without the cache) through the layers
        (up to `through`): (hidden, source) of those positions. Once the cache holds positions,
        they go in one at a time (megatron-core then drops the causal mask)."""
        start, stop = (self.fed, len(self.row)) if self.context is not None else (0, len(self.row))
        if start > 0:
            for position in range(start, stop - 1):
                self._layers(self._embeds(position, position + 1), through)
            start = stop - 1
        return self._layers(self._embeds(start, stop), through)

    def _layers(self, embeds: Tensor, through: int | None) -> tuple[Tensor, Tensor | None]:
        memory, counts = self.memory.read()
        rotary = self.rotary if self.context is not None else self.rotary[:embeds.shape[0]]
        hidden, source = embeds, None
        for index, layer in enumerate(self.model.decoder.layers):
            hidden, _ = layer(hidden_states=hidden, attention_mask=None, context=memory,
                              context_mask=counts, rotary_pos_emb=rotary,
                              inference_context=self.context)
            if index == self.model.source_layer:
                source = hidden
            if through is not None and index == through:
                break
        if self.context is not None:
            self.context.increment_sequence_len_offset(embeds.shape[0])
            self.fed += embeds.shape[0]
        return hidden, source

    def next_logits(self) -> Tensor:
        """Logits [EOD + 1] (fp32, identical on every TP rank) after the open row's last token."""
        hidden, _ = self._run()
        logits = self.model.output_logits(self.model.decoder.final_layernorm(hidden[-1:]))
        logits = gather_tensor_parallel(logits[0].contiguous(), dim=-1)  # [1, V]
        return logits[0, :self.layout.eod + 1].float()

    def close(self) -> Tensor:
        """Append EOS, push the row's S_REP (source layer at EOS) and make it the next seed."""
        self.row.append(self.layout.eos)
        _, source = self._run(through=self.model.source_layer)
        at_eos = source[-1]  # [1, h]: the EOS just fed is the row's last (and first) EOS
        write = torch.ones(1, dtype=torch.bool, device=self.device)
        vector, _ = self.model.s_rep(at_eos, write)
        self.memory.write(vector, write)
        self.seed = vector
        self.s_reps.append(vector[0])
        return vector[0]


def _allowed(layout, logits: Tensor, content_length: int) -> Tensor:
    """Mask PAD and BOS (always) and EOS, EOD (while the row has no content)."""
    masked = logits.clone()
    banned = [layout.pad, layout.bos] + ([] if content_length else [layout.eos, layout.eod])
    masked[banned] = float("-inf")
    return masked


@torch.no_grad()
def generate_sentences(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[Sequence[int]]],
    config: GenerationConfig | None = None,
    detokenize: Detokenize | None = None,
    use_cache: bool = True,
    trace: GenerationTrace | None = None,
) -> list[Generation]:
    """Continue prompts given as sentences of token ids (see the module docstring).

    Runs on every rank of the TP group with the same prompts; every rank returns the same
    result. Cached and uncached decoding give the same tokens (up to float rounding)."""
    config = config or GenerationConfig()
    config.validate()
    if not prompts:
        raise ValueError("no prompts given")
    if config.stop_strings and detokenize is None:
        raise ValueError("stop_strings need a detokenize callable")
    inner = unwrap_model(model)
    layout = inner.layout
    for sentences in prompts:
        for sentence in sentences:
            if sentence and (min(sentence) < 0 or max(sentence) >= layout.pad):
                raise ValueError(f"prompt token ids must be in [0, {layout.pad}), "
                                 f"got {list(sentence)}")
    was_training = model.training
    model.eval()
    device = next(inner.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    results = []
    try:
        with sequence_parallel_disabled(model):
            for sentences in prompts:
                results.append(_decode(inner, sentences, config, detokenize, use_cache,
                                       generator, trace))
    finally:
        model.train(was_training)
    return results


def _decode(model, sentences, config: GenerationConfig, detokenize: Detokenize | None,
            use_cache: bool, generator: torch.Generator,
            trace: GenerationTrace | None) -> Generation:
    layout = model.layout
    decoder = _PromptDecoder(model, use_cache)
    closed, open_content = sentence_fragments(sentences, layout.max_content)
    state = PromptProgress(0)
    if trace is not None:
        trace.start_prompt()

    def record_close(how: str) -> None:
        if trace is not None:
            trace.rows[-1].append(list(decoder.row))
            trace.closes[-1].append(how)

    for content in closed:
        decoder.open_row(content)
        decoder.close()
        record_close("prompt")
    decoder.open_row(open_content)
    row_index = len(closed)
    while not state.done:
        if decoder.content_length >= layout.max_content:
            decoder.close()
            record_close("full")
            decoder.open_row()
            row_index += 1
            continue
        logits = decoder.next_logits()
        if trace is not None:
            trace.logits[-1].append(logits.clone())
            trace.positions[-1].append((row_index, len(decoder.row) - 1))
        masked = _allowed(layout, logits, decoder.content_length)[None]
        token = int(broadcast_from_tensor_parallel_source(
            select_next_tokens(masked, config, generator))[0])
        if token == layout.eod:
            decoder.row += [layout.eod, layout.eos]
            record_close("eod")
            state.finish_reason = "stop_token"
            break
        if token == layout.eos:
            decoder.close()
            record_close("eos")
            decoder.open_row()
            row_index += 1
            continue
        decoder.row.append(token)
        state.add(token, config, detokenize)
    if trace is not None:
        if not trace.closes[-1] or trace.closes[-1][-1] != "eod":
            trace.rows[-1].append(list(decoder.row))
        trace.s_reps[-1].extend(decoder.s_reps)
    return state.result(detokenize)


def generate_text(model: torch.nn.Module, tokenizer, prompts: list[str],
                  config: GenerationConfig, use_cache: bool = True,
                  trace: GenerationTrace | None = None) -> list[Generation]:
    """Continue text prompts sentence by sentence (the method's `generate_text` hook)."""
    splitter = SentenceSplitter()
    sentences = [prompt_sentences(tokenizer, prompt, splitter) for prompt in prompts]
    return generate_sentences(model, sentences, config, tokenizer.detokenize, use_cache, trace)


__all__ = [
    "GenerationTrace",
    "generate_sentences",
    "generate_text",
    "prompt_sentences",
    "sentence_fragments",
]

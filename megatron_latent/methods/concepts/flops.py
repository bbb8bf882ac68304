"""FLOPs of everything the concept model executes, per input token (decision 8).

Matmuls only, 2 FLOPs per multiply-add, as megatron_latent/flops.py. With L layers of which
the first `insert` run on the T tokens, h hidden, f ffn, C concepts, k the top-k and V the
padded vocabulary, per token:

- lower blocks: insert · 2(4h² + 2hf) + insert · 2·2·s·h (attention over s positions);
- upper blocks, interleaved: two slots per token, each over a 2s-long sequence:
  (L − insert) · 2 · 2(4h² + 2hf) + (L − insert) · 2 · 2·2·(2s)·h (4× the quadratic term);
  with `add` they cost what the lower blocks cost;
- concept head: 2hC; continuous concept: the k chosen rows of the compression, 2kh;
- output head on the ĉ slots only: 2hV.

Online labels add the teacher's work, which is not back-propagated into the student: its
forward, the backward of the blocks above its hook (input gradients only: 1× their forward)
and the SAE encode and attribution (2·h·C each). `forward_flops_per_token` reports training
as 3 × forward, so this teacher share enters it divided by 3 (`teacher_flops_per_token` is
the undivided figure).
"""

from __future__ import annotations

from ...config import ModelConfig
from ...flops import FlopsBreakdown, forward_flops_per_token
from .options import ConceptOptions


def concept_flops_breakdown(config: ModelConfig, options: ConceptOptions, seq_length: int,
                            tp: int = 1) -> FlopsBreakdown:
    """Forward FLOPs per token of the student, by part (`extra`: head and compression)."""
    h, f, layers = config.hidden_size, config.ffn_hidden_size, config.num_layers
    insert = options.resolved_insert_layer(layers)
    upper = layers - insert
    per_layer = 2.0 * (4 * h * h + 2 * h * f)
    attention = 2.0 * 2.0 * seq_length * h
    if options.mixing == "interleave":
        layer_flops = insert * per_layer + upper * 2 * per_layer
        attention_flops = insert * attention + upper * 4 * attention
    else:
        layer_flops = layers * per_layer
        attention_flops = layers * attention
    return FlopsBreakdown(
        layers=layer_flops,
        attention_scores=attention_flops,
        head=2.0 * h * config.padded_vocab_size(tp),
        extra=2.0 * h * options.num_concepts + 2.0 * options.top_k * h,
    )


def teacher_flops_per_token(teacher: ModelConfig, teacher_layer: int, num_concepts: int,
                            seq_length: int, tp: int = 1) -> float:
    """Online labels, per token: teacher forward + input-gradient backward of the blocks above
    the hook (and its head) + SAE encode + attribution."""
    full = forward_flops_per_token(teacher, seq_length, tp)
    per_block = (full.layers + full.attention_scores) / teacher.num_layers
    above = (teacher.num_layers - teacher_layer - 1) * per_block + full.head
    return full.forward + above + 2 * 2.0 * teacher.hidden_size * num_concepts


def concept_forward_flops(config: ModelConfig, options: ConceptOptions, seq_length: int,
                          tp: int = 1, teacher: ModelConfig | None = None) -> float:
    """Forward FLOPs per token as the trainer counts them (training = 3 ×): the student's, plus
    a third of the teacher's online work when `teacher` is given."""
    student = concept_flops_breakdown(config, options, seq_length, tp).forward
    if teacher is None or not options.online:
        return student
    return student + teacher_flops_per_token(teacher, options.teacher_layer, options.num_concepts,
                                             seq_length, tp) / 3.0


__all__ = ["concept_flops_breakdown", "concept_forward_flops", "teacher_flops_per_token"]

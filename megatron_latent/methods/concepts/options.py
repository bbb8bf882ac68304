"""`--method concepts` flags and options (docs/concepts.md; ../shared/methods/cocomix.md)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ...config import ConfigError

MIXING_MODES = ("interleave", "add")
POSITION_MODES = ("pair", "sequential")

PIPELINE_REFUSAL = (
    "--method concepts does not support pipeline parallelism "
    "(--pipeline-model-parallel-size must be 1): the concept head and the interleaved upper "
    "layers run on one stage. Use tensor parallelism to split the model."
)


def default_insert_layer(num_layers: int) -> int:
    """The block whose residual input feeds the concept head: min(5, 3L // 8) (the official
    recipe's 3 of 8 layers for its 69M model and 5 of 24 for the larger ones)."""
    return max(0, min(5, (3 * num_layers) // 8))


@dataclass(frozen=True)
class ConceptOptions:
    """What `--method concepts` reads from the command line.

    Offline labels: `labels` maps data prefixes to label prefixes (one entry `{"": prefix}`
    stands for the only data prefix). Online labels: a teacher (`teacher_load` project
    checkpoint or `teacher_hf` GPTNeoX folder), its `teacher_layer` and an SAE folder.
    """

    num_concepts: int = 0
    insert_layer: int | None = None
    top_k: int = 32
    k_attr: int = 4
    loss_weight: float = 0.1
    mixing: str = "interleave"
    positions: str = "pair"
    labels: tuple[tuple[str, str], ...] = ()
    teacher_load: str | None = None
    teacher_hf: str | None = None
    teacher_layer: int | None = None
    sae: str | None = None

    @property
    def online(self) -> bool:
        return self.sae is not None

    def resolved_insert_layer(self, num_layers: int) -> int:
        layer = default_insert_layer(num_layers) if self.insert_layer is None \
            else self.insert_layer
        if not 0 <= layer < num_layers:
            raise ConfigError(f"--concept-insert-layer {layer} must be in [0, {num_layers})")
        return layer

    def validate(self) -> None:
        if self.num_concepts < 1:
            raise ConfigError("--method concepts needs --num-concepts (the SAE's latents, C)")
        if not 1 <= self.top_k <= self.num_concepts:
            raise ConfigError(f"--concept-top-k {self.top_k} must be in [1, --num-concepts "
                              f"{self.num_concepts}]")
        if self.k_attr < 1:
            raise ConfigError(f"--concept-k-attr must be >= 1, got {self.k_attr}")
        if self.loss_weight < 0:
            raise ConfigError(f"--concept-loss-weight must be >= 0, got {self.loss_weight}")
        if self.mixing not in MIXING_MODES:
            raise ConfigError(f"--concept-mixing must be one of {MIXING_MODES}")
        if self.positions not in POSITION_MODES:
            raise ConfigError(f"--concept-positions must be one of {POSITION_MODES}")
        if self.online:
            if (self.teacher_load is None) == (self.teacher_hf is None):
                raise ConfigError("--concept-sae (online labels) needs exactly one of "
                                  "--concept-teacher-load and --concept-teacher-hf")
            if self.teacher_layer is None:
                raise ConfigError("--concept-sae (online labels) needs --concept-teacher-layer")
            if self.labels:
                raise ConfigError("give --concept-labels (offline) or --concept-sae (online), "
                                  "not both")
        elif self.teacher_load or self.teacher_hf:
            raise ConfigError("--concept-teacher-load/--concept-teacher-hf need --concept-sae")


def _parse_labels(values: list[str] | None) -> tuple[tuple[str, str], ...]:
    if not values:
        return ()
    pairs = []
    for value in values:
        data, sep, labels = value.rpartition("=")
        if not sep:
            if len(values) > 1:
                raise ConfigError(f"--concept-labels {value!r}: with several values each must "
                                  "be DATA_PREFIX=LABELS_PREFIX")
            data, labels = "", value
        if not labels:
            raise ConfigError(f"--concept-labels {value!r}: empty labels prefix")
        pairs.append((data, labels))
    return tuple(pairs)


def add_concept_arguments(group: argparse._ArgumentGroup) -> None:
    """The concepts flags (only read when --method concepts)."""
    d = ConceptOptions()
    add = group.add_argument
    add("--num-concepts", type=int, default=0,
        help="C, the SAE's latent count: classes of the concept head (required)")
    add("--concept-insert-layer", type=int, default=None,
        help="0-based block whose residual input feeds the concept head; the blocks from it "
             "on run on the interleaved sequence (default min(5, 3 x layers // 8))")
    add("--concept-top-k", type=int, default=d.top_k,
        help="predicted concept logits kept for the continuous concept")
    add("--concept-k-attr", type=int, default=d.k_attr,
        help="teacher concept labels per token (the labels' K)")
    add("--concept-loss-weight", type=float, default=d.loss_weight,
        help="lambda: total loss = NTP + lambda x concept loss")
    add("--concept-mixing", choices=MIXING_MODES, default=d.mixing,
        help="interleave: h_1, c_1, h_2, c_2, ... through the upper blocks (the method); "
             "add: h_t + c_t in place (an ablation)")
    add("--concept-positions", choices=POSITION_MODES, default=d.positions,
        help="rotary positions of the interleaved slots: pair = 0,0,1,1,... (h_t and c_t at "
             "t); sequential = 0..2T-1")
    add("--concept-labels", nargs="+", default=None, metavar="[DATA_PREFIX=]LABELS_PREFIX",
        help="offline labels made by tools/label_concepts.py: one prefix for the run's only "
             "data prefix, or DATA_PREFIX=LABELS_PREFIX for each data prefix of a blend or of "
             "--train/valid-data-path")
    add("--concept-sae", default=None,
        help="online labels: the SAE folder; the teacher runs inside every step")
    add("--concept-teacher-load", default=None,
        help="online labels: the teacher, a checkpoint of this project (TP=1 runs)")
    add("--concept-teacher-hf", default=None,
        help="online labels: the teacher, a Hugging Face GPTNeoX folder")
    add("--concept-teacher-layer", type=int, default=None,
        help="online labels: 0-based teacher layer whose residual output the SAE reads")


def concept_options_from_args(args: argparse.Namespace) -> ConceptOptions:
    options = ConceptOptions(
        num_concepts=args.num_concepts, insert_layer=args.concept_insert_layer,
        top_k=args.concept_top_k, k_attr=args.concept_k_attr,
        loss_weight=args.concept_loss_weight, mixing=args.concept_mixing,
        positions=args.concept_positions, labels=_parse_labels(args.concept_labels),
        teacher_load=args.concept_teacher_load, teacher_hf=args.concept_teacher_hf,
        teacher_layer=args.concept_teacher_layer, sae=args.concept_sae)
    options.validate()
    return options


__all__ = [
    "ConceptOptions",
    "MIXING_MODES",
    "PIPELINE_REFUSAL",
    "POSITION_MODES",
    "add_concept_arguments",
    "concept_options_from_args",
    "default_insert_layer",
]

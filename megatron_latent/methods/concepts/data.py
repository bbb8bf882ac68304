"""`--method concepts` data: Megatron GPT samples with the offline concept labels of exactly
their tokens (megatron_latent.sae.sample_labels.LabeledGPTDataset), or plain GPT samples when
the labels come from a teacher inside the step (online)."""

from __future__ import annotations

from typing import Any

import torch

from ...config import ConfigError
from ...sae.labels import LabelsError
from ...training.config import RunConfig
from .options import ConceptOptions


def run_data_prefixes(run: RunConfig) -> list[str]:
    """Every data prefix the run reads (blend weights dropped)."""
    from ...data.datasets import parse_blend

    data = run.data
    prefixes: list[str] = []
    for paths in (data.data_path, data.train_data_path, data.valid_data_path,
                  data.test_data_path):
        if paths:
            for prefix in parse_blend(paths)[0]:
                if prefix not in prefixes:
                    prefixes.append(prefix)
    return prefixes


def labels_by_prefix(run: RunConfig, options: ConceptOptions) -> dict[str, str]:
    """{data prefix: labels prefix} for every data prefix of the run; refuses a missing one."""
    prefixes = run_data_prefixes(run)
    given = dict(options.labels)
    if "" in given:
        if len(prefixes) != 1:
            raise ConfigError(f"--concept-labels {given['']!r}: the run reads {len(prefixes)} "
                              "data prefixes; give DATA_PREFIX=LABELS_PREFIX for each")
        return {prefixes[0]: given[""]}
    import os

    by_abs = {os.path.abspath(k): v for k, v in given.items()}
    missing = [p for p in prefixes if os.path.abspath(p) not in by_abs]
    if missing:
        raise ConfigError(f"--concept-labels names no labels for data prefix {missing[0]!r}")
    return {p: by_abs[os.path.abspath(p)] for p in prefixes}


def check_concept_data(run: RunConfig) -> None:
    """The GPT data checks, then the labels: present, finished, made for each data prefix,
    with --concept-k-attr labels per token from an SAE of --num-concepts latents."""
    from ...arguments import method_options
    from ...sae.sample_labels import open_labels
    from ...training.data import check_data

    check_data(run)
    options: ConceptOptions = method_options(run)
    if run.data.reset_attention_mask:
        raise ConfigError("--method concepts does not support --reset-attention-mask (the "
                          "interleaved sequence has no per-document mask)")
    if options.online:
        return
    if run.data.mock_data:
        raise ConfigError("--method concepts with --mock-data has no concept labels: give "
                          "--concept-sae and a teacher (online labels) or real data")
    if not options.labels:
        raise ConfigError("--method concepts needs --concept-labels (offline, from "
                          "tools/label_concepts.py) or --concept-sae with a teacher (online)")
    for data_prefix, labels_prefix in labels_by_prefix(run, options).items():
        try:
            labels = open_labels(labels_prefix, data_prefix, options.k_attr)
        except LabelsError as error:
            raise ConfigError(f"--concept-labels: {error}") from None
        d_sae = labels.meta.get("sae_d_sae")
        if d_sae is not None and int(d_sae) != options.num_concepts:
            raise ConfigError(f"--concept-labels {labels_prefix!r} come from an SAE with "
                              f"{d_sae} latents, but --num-concepts is {options.num_concepts}")


def build_concept_data(run: RunConfig, tokenizer, options: ConceptOptions,
                       consumed_samples: int, consumed_tokens: int, total_iters: int):
    """The run's GPT data with every dataset (train and each validation set) labelled."""
    from ...sae.sample_labels import LabeledGPTDataset
    from ...training.data import build_run_data

    if options.online:
        return build_run_data(run, tokenizer, consumed_samples, total_iters)
    mapping = labels_by_prefix(run, options)

    def label(dataset: Any) -> Any:
        try:
            return LabeledGPTDataset(dataset, mapping, options.k_attr)
        except (LabelsError, ValueError) as error:
            raise ConfigError(f"--concept-labels: {error}") from None

    return build_run_data(run, tokenizer, consumed_samples, total_iters, wrap=label)


def concept_model_inputs(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """Model keyword arguments of a (labelled) GPT micro-batch: tokens, labels, positions and,
    when present, the concept labels and their weights."""
    inputs = {
        "input_ids": batch["tokens"].to(device, non_blocking=True),
        "labels": batch["labels"].to(device, non_blocking=True),
        "position_ids": batch["position_ids"].to(device, non_blocking=True),
    }
    if "concept_ids" in batch:
        inputs["concept_ids"] = batch["concept_ids"].to(device, non_blocking=True)
        inputs["concept_weights"] = batch["concept_weights"].to(device, non_blocking=True)
    return inputs


__all__ = ["build_concept_data", "check_concept_data", "concept_model_inputs",
           "labels_by_prefix", "run_data_prefixes"]

"""Online concept labels (decision 4, as the official code trains): the frozen fp32 teacher
and the SAE run inside every training step on the step's own token windows, so the labels are
exact for those windows. Offline labels (tools/label_concepts.py) are read like tokens instead
and cost nothing per step; this mode exists for comparison."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from torch import Tensor

from ...config import ConfigError, ModelConfig
from ...sae.attribution import WindowLabels, label_windows
from .options import ConceptOptions


def teacher_model_config(options: ConceptOptions) -> ModelConfig:
    """The online teacher's architecture, from its stored config only."""
    if options.teacher_load:
        from ...training.checkpointing import read_checkpoint_config
        from ...training.config import RunConfig

        stored = read_checkpoint_config(options.teacher_load)
        if stored is None:
            raise ConfigError(f"--concept-teacher-load {options.teacher_load}: no checkpoint "
                              "config found")
        return RunConfig.from_dict(stored).model
    from ...models.hf_gpt_neox import hf_config_to_model_config

    path = os.path.join(options.teacher_hf or "", "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--concept-teacher-hf {options.teacher_hf}: no config.json")
    with open(path, encoding="utf-8") as handle:
        return hf_config_to_model_config(json.load(handle))


def build_online_labeler(options: ConceptOptions, device: torch.device, hidden_size: int,
                         tp: int) -> Callable[[Tensor], WindowLabels]:
    """ids [b, s] -> the teacher's attribution labels of those windows (fp32, frozen)."""
    from ...sae.attribution import split_hf_teacher, split_project_teacher
    from ...sae.files import SAEFormatError, read_sae

    try:
        sae = read_sae(options.sae).to(device=device, dtype=torch.float32)
    except SAEFormatError as error:
        raise ConfigError(f"--concept-sae: {error}") from None
    if sae.d_sae != options.num_concepts:
        raise ConfigError(f"--concept-sae {options.sae} has {sae.d_sae} latents, but "
                          f"--num-concepts is {options.num_concepts}")
    if options.teacher_load:
        if tp != 1:
            raise ConfigError("--concept-teacher-load runs the teacher unsharded: use TP=1, or "
                              "a Hugging Face teacher (--concept-teacher-hf) at any TP")
        from ...inference.loading import load_model_for_inference

        model = load_model_for_inference(options.teacher_load, device=device,
                                         dtype=torch.float32).model
        teacher = split_project_teacher(model.eval().requires_grad_(False),
                                        options.teacher_layer)
    else:
        import transformers

        model = transformers.GPTNeoXForCausalLM.from_pretrained(options.teacher_hf)
        model = model.float().to(device).eval().requires_grad_(False)
        teacher = split_hf_teacher(model, options.teacher_layer)
    if sae.d_in != teacher_model_config(options).hidden_size:
        raise ConfigError(f"--concept-sae {options.sae} reads d_in={sae.d_in}, not the "
                          "teacher's hidden size")

    def label(ids: Tensor) -> WindowLabels:
        with torch.autocast(device_type=ids.device.type, enabled=False):
            return label_windows(teacher, sae, ids, options.k_attr)

    label.teacher = model  # kept alive with the labeler; not a student parameter
    return label


__all__ = ["build_online_labeler", "teacher_model_config"]

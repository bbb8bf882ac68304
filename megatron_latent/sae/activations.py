"""Residual-stream activations of a teacher at one layer, streamed from an indexed dataset.

"The residual after block i" (0-based) is the hidden state that block i hands to block i+1,
before any final LayerNorm. A project checkpoint (any method whose model is a PythiaModel) is
run through its own ``embed`` and its first i+1 decoder layers; a Hugging Face GPTNeoX folder
through a forward hook on ``gpt_neox.layers[i]`` (equal to ``output_hidden_states[i+1]`` for
every layer but the last, whose ``hidden_states`` entry is taken after the final LayerNorm).
Token windows are consecutive ``seq_length``-token slices of the dataset's tokens in file
order (documents concatenated with their end-of-document tokens, as pretraining reads them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


class TeacherError(ValueError):
    """A teacher that cannot give the asked-for activations (names the path or value)."""


@dataclass(frozen=True)
class TeacherShape:
    """What must be checked before a teacher is loaded."""

    num_layers: int
    hidden_size: int
    max_sequence_length: int
    vocab_size: int
    source: str


def project_teacher_shape(checkpoint: str) -> TeacherShape:
    """The shape of a project checkpoint's model, read from its stored config only."""
    from ..training.checkpointing import read_checkpoint_config, read_tracker
    from ..training.config import RunConfig

    if not os.path.isdir(checkpoint) or read_tracker(checkpoint) is None:
        raise TeacherError(f"--load {checkpoint}: not a checkpoint directory "
                           "(no latest_checkpointed_iteration.txt)")
    stored = read_checkpoint_config(checkpoint)
    if stored is None:
        raise TeacherError(f"--load {checkpoint}: the checkpoint stores no config.json")
    model = RunConfig.from_dict(stored).model
    return TeacherShape(model.num_layers, model.hidden_size, model.max_position_embeddings,
                        model.vocab_size, checkpoint)


def hf_teacher_shape(directory: str) -> TeacherShape:
    """The shape of a Hugging Face GPTNeoX folder, read from its ``config.json``."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise TeacherError(f"--hf-model {directory}: no config.json")
    with open(path, encoding="utf-8") as handle:
        cfg = json.load(handle)
    if cfg.get("model_type") != "gpt_neox":
        raise TeacherError(f"--hf-model {directory}: model_type={cfg.get('model_type')!r}, "
                           "expected 'gpt_neox'")
    return TeacherShape(cfg["num_hidden_layers"], cfg["hidden_size"],
                        cfg.get("max_position_embeddings", 2048), cfg["vocab_size"], directory)


def residual_after_layer(model: torch.nn.Module, input_ids: Tensor, layer: int) -> Tensor:
    """[b, s, h] residual stream of a PythiaModel after decoder layer ``layer`` (0-based),
    computed with the model's own ``embed`` and layers (layers above ``layer`` never run)."""
    layers = model.decoder.layers
    if not 0 <= layer < len(layers):
        raise TeacherError(f"layer {layer} is out of range: the model has {len(layers)} layers")
    hidden = model.embed(input_ids)
    rotary = model.rotary_pos_emb(input_ids.shape[1], device=hidden.device)
    for block in layers[: layer + 1]:
        hidden, _ = block(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary)
    return hidden.transpose(0, 1)


def load_project_teacher(checkpoint: str, layer: int, device: torch.device
                         ) -> Callable[[Tensor], Tensor]:
    """ids [b, s] -> fp32 residual after ``layer`` of a project checkpoint's model (eval mode,
    frozen, no gradients)."""
    from ..inference.loading import load_model_for_inference
    from ..models.language_model import PythiaModel

    loaded = load_model_for_inference(checkpoint, device=device, dtype=torch.float32)
    model = loaded.model
    if not isinstance(model, PythiaModel):
        raise TeacherError(f"--load {checkpoint}: method {loaded.run.method!r} builds a "
                           f"{type(model).__name__}, not a PythiaModel")
    model.requires_grad_(False)

    @torch.no_grad()
    def forward(ids: Tensor) -> Tensor:
        return residual_after_layer(model, ids.to(device), layer).float()

    return forward


def load_hf_teacher(directory: str, layer: int, device: torch.device
                    ) -> Callable[[Tensor], Tensor]:
    """ids [b, s] -> fp32 residual after ``layer`` of a Hugging Face GPTNeoX model."""
    import transformers

    model = transformers.GPTNeoXForCausalLM.from_pretrained(directory)
    model = model.float().to(device).eval().requires_grad_(False)
    base = model.gpt_neox
    captured: list[Tensor] = []

    class _Stop(Exception):
        pass

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop  # the layers above are not needed

    @torch.no_grad()
    def forward(ids: Tensor) -> Tensor:
        captured.clear()
        handle = base.layers[layer].register_forward_hook(hook)
        try:
            base(input_ids=ids.to(device), use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0].float()

    return forward


class TokenWindows:
    """Consecutive ``seq_length``-token windows of an indexed dataset, read on demand."""

    def __init__(self, prefix: str, seq_length: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.dataset = IndexedDataset(prefix)
        self.seq_length = seq_length
        lengths = np.asarray(self.dataset.sequence_lengths, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        self.num_tokens = int(self.starts[-1])
        self.num_windows = self.num_tokens // seq_length

    def __len__(self) -> int:
        return self.num_windows

    def window(self, index: int) -> np.ndarray:
        """Tokens [seq_length] of window ``index`` (may span several sequences)."""
        return self.tokens(index * self.seq_length, (index + 1) * self.seq_length)

    def tokens(self, begin: int, end: int) -> np.ndarray:
        """Tokens ``begin .. end - 1`` of the concatenated stream (int64)."""
        pieces = []
        seq = int(np.searchsorted(self.starts, begin, side="right")) - 1
        while begin < end:
            offset = begin - int(self.starts[seq])
            take = min(end - begin, int(self.starts[seq + 1]) - begin)
            if take > 0:
                pieces.append(self.dataset.get(seq, offset=offset, length=take))
            begin += take
            seq += 1
        return np.concatenate(pieces).astype(np.int64)

    def batch(self, indices: list[int] | np.ndarray) -> Tensor:
        """Token ids [len(indices), seq_length]."""
        return torch.from_numpy(np.stack([self.window(int(i)) for i in indices]))


def window_order(num_windows: int, seed: int) -> np.ndarray:
    """A seeded permutation of the window ids (the same for a given seed everywhere)."""
    return np.random.default_rng(seed).permutation(num_windows)

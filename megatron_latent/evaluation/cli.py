"""lm-eval's own command line with the ``megatron_latent`` model registered.

lm-eval 0.4.13's CLI discovers no plugins: ``lm_eval --model NAME`` finds only the models
lm-eval imports itself. This entry imports the backend first, then hands every flag to
lm-eval's CLI unchanged::

    python -m megatron_latent.evaluation.cli --model megatron_latent \\
        --model_args load=ckpt/,tp=1,max_length=2048 --tasks hellaswag \\
        --include_path my_tasks/ --batch_size 8 --output_path results/ --log_samples
    torchrun --nproc_per_node 4 -m megatron_latent.evaluation.cli --model megatron_latent \\
        --model_args load=ckpt/,tensor_model_parallel_size=2 --tasks lambada_openai

``tools/evaluate.py --model megatron_latent --model_args ...`` does the same.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI on `argv` (default: this process's arguments)."""
    from lm_eval.__main__ import cli_evaluate

    from . import lm_backend  # noqa: F401  (registers "megatron_latent")

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()

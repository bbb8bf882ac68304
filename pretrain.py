#!/usr/bin/env python
"""Pretrain a Pythia-architecture language model on megatron-core.

    torchrun --nproc_per_node N pretrain.py --model pythia-160m --method vanilla \
        --data-path <prefix> --tokenizer-type ... --tokenizer-model ... --save ckpt/

Flags follow Megatron-LM (see --help). A single process without torchrun also works.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # megatron-core's overlap needs it


def main(argv: list[str] | None = None) -> int:
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.config import ConfigError
    from megatron_latent.distributed import destroy_parallel
    from megatron_latent.training.engines import NonFiniteLossError
    from megatron_latent.training.trainer import Trainer

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run, args = parse_run_config(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        trainer = Trainer(run)
        if args.dry_run:
            if rank == 0:
                print(trainer.dry_run())
            return 0
        trainer.setup()
        summary = trainer.train()
        if rank == 0:
            print(f"> done: {summary.stopped_by} at iteration {summary.iterations} | "
                  f"consumed tokens {summary.consumed_tokens:,}")
        return 0
    except ConfigError as error:
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"pretrain.py: stopped: {error}", file=sys.stderr)
        return 1
    finally:
        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())

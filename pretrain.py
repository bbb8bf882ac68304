#!/usr/bin/env python
"""Pretrain a Pythia-architecture language model on megatron-core.

    torchrun --nproc_per_node N pretrain.py --model pythia-160m --method vanilla \
        --data-path <prefix> --tokenizer-type ... --tokenizer-model ... --save ckpt/

Flags follow Megatron-LM (see --help). A single process without torchrun also works.
SIGTERM and SIGUSR1 save a checkpoint and exit 0, from the first moment of the process: a
signal that arrives while it imports or sets up stops the run at its first iteration.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # megatron-core's overlap needs it

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StartupSignals:
    """The save-and-exit signals' handler until the training loop's own takes over.

    Installed before anything heavy is imported (a trainer started by examples/common.sh
    inherits these signals ignored, so nothing else would catch them). It only records the
    signal in ``received``; the loop's StopSignal picks that up when it replaces this handler.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.released = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum

    def install(self) -> StartupSignals:
        """Handle SIGTERM and SIGUSR1 from now on; returns self."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self)
        return self

    def release(self) -> None:
        """--no-exit-signal-handler: SIGTERM/SIGUSR1 terminate the process as their default
        action does, a signal that already arrived included. (A handler that re-raises, not the
        default itself: examples/common.sh forwards a signal to a trainer once it catches it.)"""
        self.released = True
        for sig in STOP_SIGNALS:
            signal.signal(sig, _terminate)
        if self.received is not None:
            _terminate(self.received, None)

    def settle(self) -> None:
        """The run is over: ignore further SIGTERM/SIGUSR1. Python resets its handlers to the
        default (terminate) while it shuts down, and a second copy of the signal (Slurm's and
        the launcher's) must not turn a clean exit into a death by signal."""
        if not self.released:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)


def _terminate(signum: int, frame: object) -> None:
    """Take the signal's default action (for SIGTERM and SIGUSR1: terminate)."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def main(argv: list[str] | None = None, startup: StartupSignals | None = None) -> int:
    """Parse flags, set up and train; returns the process exit status. ``startup`` is the
    handler installed at process start (released when --no-exit-signal-handler is given)."""
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.config import ConfigError
    from megatron_latent.distributed import destroy_parallel
    from megatron_latent.training.engines import NonFiniteLossError
    from megatron_latent.training.trainer import Trainer

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run, args = parse_run_config(argv)
    if startup is not None and not run.checkpoint.exit_signal_handler:
        startup.release()
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
        if startup is not None:
            startup.settle()
        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main(startup=StartupSignals().install()))

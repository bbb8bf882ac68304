#!/usr/bin/env python
r"""Serve a checkpoint of any method over an OpenAI-compatible HTTP API.

    python tools/serve.py --load ckpt/ [--host 127.0.0.1] [--port 8000] [--device auto]
                          [--model-name NAME] [--max-batch 16]

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health.
Examples, with the server on the default address:

    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"prompt": "ROMEO:", "max_tokens": 32, "temperature": 0}'
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"prompt": ["ROMEO:", "JULIET:"], "max_tokens": 32, "temperature": 0.8,
             "top_p": 0.9, "n": 2, "seed": 1, "stop": ["\n\n"]}'
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'
    curl http://127.0.0.1:8000/v1/models
    curl http://127.0.0.1:8000/health

OpenAI clients work with base_url="http://127.0.0.1:8000/v1" (any api_key; it is not checked).
temperature 0 is greedy decoding; without "seed" every request draws a random one. Requests
are generated one at a time (the model is not thread-safe); the prompts x n choices of one
request are decoded as one batch of at most --max-batch rows. Per-token logprobs are not
available and are refused with a 400. Base models have no chat template: chat messages are
rendered as "<Role>: <content>" lines followed by "Assistant:" (see
megatron_latent/inference/server.py for the full contract). The server binds the loopback
address unless --host says otherwise; it has no authentication, so expose it with care.
Ctrl-C (SIGINT) or SIGTERM stops it after the requests in flight.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint directory")
    parser.add_argument("--iteration", type=int, default=None, help="default: latest")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port to bind (0: any free port; default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true",
                           help="run the model in bfloat16 (the default on CUDA)")
    precision.add_argument("--fp32", action="store_true",
                           help="run the model in float32 (the default on the CPU)")
    parser.add_argument("--model-name", default=None,
                        help="the model id clients send and /v1/models lists "
                             "(default: the checkpoint directory's name)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="most rows (prompts x n) decoded together (default: %(default)s)")
    parser.add_argument("--default-max-tokens", type=int, default=16,
                        help="max_tokens of a request that gives none (default: %(default)s, "
                             "as OpenAI's completions)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the full prefix for every token (reference path)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--tokenizer-type", default=None)
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--vocab-file", default=None)
    parser.add_argument("--merge-file", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_batch < 1:
        print("serve.py: error: --max-batch must be >= 1", file=sys.stderr)
        return 2
    if args.default_max_tokens < 1:
        print("serve.py: error: --default-max-tokens must be >= 1", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"serve.py: error: --port {args.port} is not a port number", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")

    import torch

    from megatron_latent.config import ConfigError
    from megatron_latent.distributed import destroy_parallel
    from megatron_latent.inference.loading import tool_device
    from megatron_latent.inference.server import CompletionService, OpenAIServer

    device = tool_device(args.device)
    try:
        service = CompletionService.from_checkpoint(
            args.load, iteration=args.iteration, device=device,
            dtype=torch.bfloat16 if args.bf16 else torch.float32 if args.fp32 else None,
            tokenizer_overrides={"tokenizer_type": args.tokenizer_type,
                                 "tokenizer_model": args.tokenizer_model,
                                 "vocab_file": args.vocab_file, "merge_file": args.merge_file},
            model_name=args.model_name, max_batch=args.max_batch,
            default_max_tokens=args.default_max_tokens, use_cache=not args.no_cache)
        server = OpenAIServer(service, args.host, args.port)
    except (ConfigError, ValueError, OSError) as error:
        print(f"serve.py: error: {error}", file=sys.stderr)
        destroy_parallel()
        return 2

    def stop(signum, frame) -> None:
        logging.info("%s: shutting down after the requests in flight",
                     signal.Signals(signum).name)
        # shutdown() waits for serve_forever to return, so it cannot run on this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(f"serving {service.model_name!r} ({service.method}, iteration {service.iteration}, "
          f"{device}) at {server.url}/v1", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()  # waits for the requests in flight
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        destroy_parallel()
    print("serve.py: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

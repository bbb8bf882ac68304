#!/usr/bin/env python
r"""Generate text from a checkpoint of any method (KV-cached; one cache per pondering pass).

    python tools/generate.py --load ckpt/ --prompt "ROMEO:" --max-new-tokens 64 --top-p 0.9
    torchrun --nproc_per_node 2 tools/generate.py --load ckpt/ --tensor-model-parallel-size 2 \
        --prompt-file prompts.txt --greedy

Prompts come from --prompt (repeatable) or --prompt-file (one per line); all are decoded as
one batch. The tokenizer is the one recorded in the checkpoint unless --tokenizer-* is given.
A method with its own text generation (its MethodSpec.generate_text, e.g. thought memory's
sentence-by-sentence decoding) is handed the text prompts instead.

--steer CONCEPT_ID=SCALE (repeatable) multiplies chosen predicted-concept logits before the
continuous concept is formed, at every decoded position, for models with a concept head
(`--method concepts`; the paper steers with scales of -10..10). Other models refuse it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint directory")
    parser.add_argument("--iteration", type=int, default=None, help="default: latest")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompt-file", default=None, help="one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[],
                        help="stop string (repeatable); the end-of-document token always stops")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the full prefix for every token (reference path)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true",
                           help="run the model in bfloat16 (the default on CUDA)")
    precision.add_argument("--fp32", action="store_true",
                           help="run the model in float32 (the default on the CPU)")
    parser.add_argument("--steer", action="append", default=[], metavar="CONCEPT_ID=SCALE",
                        help="scale a predicted concept's logit during generation (models "
                             "with a concept head; repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.add_argument("--tokenizer-type", default=None)
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--vocab-file", default=None)
    parser.add_argument("--merge-file", default=None)
    return parser.parse_args(argv)


def parse_steering(values: list[str]) -> dict[int, float]:
    """{concept id: scale} from --steer ID=SCALE values; malformed ones raise ValueError."""
    scales: dict[int, float] = {}
    for value in values:
        concept, sep, scale = value.partition("=")
        try:
            if not sep:
                raise ValueError
            scales[int(concept)] = float(scale)
        except ValueError:
            raise ValueError(f"--steer {value!r}: expected CONCEPT_ID=SCALE, e.g. 123=5") from None
    return scales


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            print(f"generate.py: error: --prompt-file {args.prompt_file} not found", file=sys.stderr)
            return 2
        prompts += [line.rstrip("\n") for line in open(args.prompt_file) if line.strip()]
    if not prompts:
        print("generate.py: error: give --prompt or --prompt-file", file=sys.stderr)
        return 2
    try:
        steering = parse_steering(args.steer)
    except ValueError as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 2

    import torch

    from megatron_latent.config import ConfigError
    from megatron_latent.data.tokenizers import TokenizerError
    from megatron_latent.distributed import destroy_parallel
    from megatron_latent.inference import GenerationConfig, generate_with_details
    from megatron_latent.inference.loading import load_model_for_inference, tool_device
    from megatron_latent.methods.registry import get_method

    device = tool_device(args.device)
    try:
        loaded = load_model_for_inference(
            args.load, args.iteration, args.tensor_model_parallel_size, device,
            {"tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model,
             "vocab_file": args.vocab_file, "merge_file": args.merge_file},
            dtype=torch.bfloat16 if args.bf16 else torch.float32 if args.fp32 else None)
        tokenizer = loaded.tokenizer
        if tokenizer is None:
            raise ConfigError("the checkpoint records no tokenizer; give --tokenizer-type and "
                              "--tokenizer-model")
        config = GenerationConfig(
            max_new_tokens=args.max_new_tokens, greedy=args.greedy,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            stop_token_ids=(int(tokenizer.eod),), stop_strings=tuple(args.stop))
        spec = get_method(loaded.run.method)
        if steering:
            steer = getattr(loaded.model, "set_steering", None)
            if steer is None:
                raise ConfigError(f"--steer: the {loaded.run.method!r} model of {args.load} "
                                  "has no concept head to steer")
            steer(steering)
        encoded = [tokenizer.tokenize(prompt) for prompt in prompts]
        if spec.generate_text is not None:  # the method decodes text its own way
            results = spec.generate_text(loaded.model, tokenizer, prompts, config,
                                         use_cache=not args.no_cache)
        else:
            results = generate_with_details(loaded.model, encoded, config,
                                            detokenize=tokenizer.detokenize,
                                            use_cache=not args.no_cache)
    except (ConfigError, ValueError) as error:
        if isinstance(error, TokenizerError) and not any(
                (args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file)):
            error = (f"{error} (the tokenizer {args.load} records; give another with "
                     "--tokenizer-type and --tokenizer-model or --vocab-file/--merge-file)")
        print(f"generate.py: error: {error}", file=sys.stderr)
        destroy_parallel()
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        for prompt, ids, result in zip(prompts, encoded, results):
            text = result.text if result.text is not None else tokenizer.detokenize(result.tokens)
            if args.json:
                print(json.dumps({"prompt": prompt, "completion": text, "tokens": result.tokens,
                                  "finish_reason": result.finish_reason}))
                continue
            # Decoding prompt and continuation together keeps the spacing between them.
            shown = (prompt + text if result.finish_reason == "stop_string"
                     else tokenizer.detokenize(list(ids) + result.tokens))
            print(f"### {prompt}\n{shown}\n[{result.finish_reason}, "
                      f"{len(result.tokens)} tokens, {loaded.run.method}, iteration "
                      f"{loaded.iteration}]\n")
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())

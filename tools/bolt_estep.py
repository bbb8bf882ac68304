#!/usr/bin/env python
r"""BoLT's E-step on a project checkpoint: K latent candidates per chunk, importance weights,
one resampled latent per chunk (megatron_latent/latent/estep.py;
../shared/methods/latent_thoughts.md, "E-step" and decisions 2, 3, 6-8, 10).

    python tools/bolt_estep.py --load ckpt/ --input docs.jsonl --output latents.jsonl \
        --num-samples 4 --iteration 1 --seed 0 --elbo-input val.jsonl
    torchrun --nproc_per_node 2 tools/bolt_estep.py --tensor-model-parallel-size 2 ...

input: JSONL, one {"id"?: ..., "text": "..."} per line; chunked with
  megatron_latent/latent/chunking.py's rule (chunk_document), the prefix of chunk i being the
  raw previous 3 chunks. Each chunk's text is tokenised once; from then on everything is ids.
output: JSONL in tools/make_latent_data.py's input format, one line per document:
  {"id", "text", "chunks", "latent_ids", "doc_key"}; latent_ids holds the resampled z of each
  chunk as sampled (ids, with its stopping EoL when it finished; make_latent_data accepts
  both and wraps every z in SoL ... EoL).
side file (--side-output, default OUTPUT.candidates.jsonl; decision 8): per document and
  chunk the K candidates (ids), log q, log p, log w, the choice, the finish flags, whether no
  candidate finished, the cut prefix / x tokens; plus per document the sampled and scored
  token counts and FLOPs (≈ 2·N per token, decision 10).
resuming: documents already in --output (matched by id and text hash) are skipped and never
  recomputed; the run's settings are kept in OUTPUT.estep.json and must match on resume.
--elbo-input: held-out documents (first --elbo-documents of them), uniform chunks and the whole
  preceding document as prefix; writes ELBO_1/2/4 summed and per raw-text token and per
  character to --elbo-output (default OUTPUT.elbo.json).
Only rank 0 writes; every rank reads the inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_latent.latent import estep as estep_lib  # noqa: E402


class ToolError(ValueError):
    """A bad input or setting, reported as `bolt_estep.py: error: ...`."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint directory (its tokenizer "
                        "must hold the four latent-thought tokens)")
    parser.add_argument("--load-iteration", type=int, default=None,
                        help="checkpoint iteration (default: latest)")
    parser.add_argument("--input", default=None, help="JSONL documents for the E-step")
    parser.add_argument("--output", default=None, help="JSONL latents (make_latent_data input)")
    parser.add_argument("--side-output", default=None,
                        help="per-chunk candidates (default OUTPUT.candidates.jsonl)")
    parser.add_argument("--num-samples", type=int, default=estep_lib.NUM_SAMPLES, help="K (4)")
    parser.add_argument("--iteration", type=int, default=0,
                        help="EM iteration (enters the seeds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16,
                        help="rows (chunks x K candidates) per forward")
    parser.add_argument("--max-new-tokens", type=int, default=estep_lib.MAX_NEW)
    parser.add_argument("--max-prompt-tokens", type=int, default=estep_lib.MAX_PROMPT)
    parser.add_argument("--max-seq-length", type=int, default=estep_lib.MAX_SEQ)
    parser.add_argument("--elbo-input", default=None, help="held-out JSONL documents")
    parser.add_argument("--elbo-output", default=None,
                        help="ELBO JSON report (default OUTPUT.elbo.json)")
    parser.add_argument("--elbo-documents", type=int, default=1000,
                        help="use the first this many held-out documents (0: all)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 (default on CUDA)")
    precision.add_argument("--fp32", action="store_true", help="float32 (default on the CPU)")
    parser.add_argument("--log-interval", type=int, default=10,
                        help="report progress every this many documents (0: never)")
    parser.add_argument("--tokenizer-type", default=None)
    parser.add_argument("--tokenizer-model", default=None)
    return parser.parse_args(argv)


def _log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)


def read_documents(path: str, limit: int = 0) -> list[dict[str, Any]]:
    """[{"id", "text"}] from a JSONL file; ids default to the line number."""
    if not os.path.isfile(path):
        raise ToolError(f"{path!r} does not exist")
    docs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise ToolError(f"{path}:{number}: malformed JSON ({err.msg})") from None
            if not isinstance(data, dict) or not isinstance(data.get("text"), str):
                raise ToolError(f"{path}:{number}: expected an object with a string 'text'")
            if not data["text"].strip():
                raise ToolError(f"{path}:{number}: empty document")
            doc_id = data.get("id", f"line-{number}")
            docs.append({"id": doc_id, "text": data["text"], "where": f"{path}:{number}"})
            if limit and len(docs) >= limit:
                break
    if not docs:
        raise ToolError(f"{path!r} holds no documents")
    return docs


def prepare(docs, tokenizer, t, validation: bool):
    from megatron_latent.latent.chunking import chunk_document, tokenize_chunks, uniform_chunks
    from megatron_latent.latent.formats import document_hash

    out = []
    for doc in docs:
        chunks = uniform_chunks(doc["text"]) if validation else chunk_document(doc["text"])
        try:
            ids = tokenize_chunks(tokenizer, chunks, t.as_tuple())
        except ValueError as err:
            raise ToolError(f"{doc['where']}: {err}") from None
        out.append((doc, chunks, estep_lib.EStepDocument(document_hash(doc["text"]), ids)))
    return out


def _valid_lines(path: str) -> list[dict[str, Any]]:
    """The complete JSON lines of a file (a torn last line is dropped)."""
    records = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return records


def _rewrite(path: str, records: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def _groups(items, rows_per_group: int, k: int):
    group, rows = [], 0
    for item in items:
        group.append(item)
        rows += len(item[2].chunks_ids) * k
        if rows >= rows_per_group:
            yield group
            group, rows = [], 0
    if group:
        yield group


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from megatron_latent.config import ConfigError
    from megatron_latent.data.tokenizers import TokenizerError
    from megatron_latent.inference.loading import load_model_for_inference
    from megatron_latent.latent.formats import document_start_id
    from megatron_latent.latent.tokens import latent_token_ids

    if not args.input and not args.elbo_input:
        raise ToolError("give --input (E-step) and/or --elbo-input (validation ELBO)")
    if args.input and not args.output:
        raise ToolError("--input needs --output")
    if args.elbo_input and not (args.elbo_output or args.output):
        raise ToolError("--elbo-input needs --elbo-output (or --output)")
    settings = estep_lib.EStepSettings(
        num_samples=args.num_samples, max_prompt=args.max_prompt_tokens,
        max_new=args.max_new_tokens, max_seq=args.max_seq_length, batch_size=args.batch_size,
        seed=args.seed, iteration=args.iteration)
    settings.validate()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    from megatron_latent.inference.loading import tool_device

    device = tool_device(args.device)
    try:
        loaded = load_model_for_inference(
            args.load, args.load_iteration, args.tensor_model_parallel_size, device,
            {"tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model},
            dtype=torch.bfloat16 if args.bf16 else torch.float32 if args.fp32 else None)
    except ConfigError as err:
        raise ToolError(f"--load {args.load}: {err}") from None
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise ToolError("the checkpoint records no tokenizer; give --tokenizer-type and "
                        "--tokenizer-model")
    try:
        t = latent_token_ids(tokenizer)
    except TokenizerError as err:
        raise ToolError(f"--load {args.load}: {err}") from None
    model = loaded.model
    settings.validate(model)
    start_id = document_start_id(tokenizer)
    n_params = estep_lib.parameter_count(model)
    summary: dict[str, Any] = {"computed": 0, "skipped": 0}

    if args.input:
        side_path = args.side_output or args.output + ".candidates.jsonl"
        meta_path = args.output + ".estep.json"
        meta = {"load": os.path.abspath(args.load), "checkpoint_iteration": loaded.iteration,
                "num_samples": settings.num_samples, "iteration": settings.iteration,
                "seed": settings.seed, "max_new_tokens": settings.max_new,
                "max_prompt_tokens": settings.max_prompt, "max_seq_length": settings.max_seq,
                "latent_ids": list(t.as_tuple()), "start_id": start_id}
        docs = prepare(read_documents(args.input), tokenizer, t, validation=False)
        done_records = _valid_lines(args.output)
        if done_records or os.path.isfile(meta_path):
            if os.path.isfile(meta_path):
                with open(meta_path) as handle:
                    old = json.load(handle)
                if old != meta:
                    diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                    raise ToolError(f"--output {args.output} was written with other settings "
                                    f"({', '.join(diff)} differ); use a new --output")
        done = {(str(r.get("id")), r.get("doc_key")) for r in done_records}
        if rank0:
            with open(meta_path, "w") as handle:
                json.dump(meta, handle, indent=1)
            _rewrite(args.output, done_records)
            side = [r for r in _valid_lines(side_path)
                    if (str(r.get("id")), r.get("doc_key")) in done]
            _rewrite(side_path, side)
        todo = [d for d in docs if (str(d[0]["id"]), d[2].doc_key) not in done]
        summary["skipped"] = len(docs) - len(todo)
        _log(f"E-step on {len(docs)} documents ({summary['skipped']} already done) with K = "
             f"{settings.num_samples}, iteration {settings.iteration}, seed {settings.seed}, "
             f"SoL/EoL/PRI/POS = {list(t.as_tuple())}, start {start_id}, N = {n_params:,}")
        began, totals = time.time(), {"sampled": 0, "scored": 0, "flops": 0.0, "no_fin": 0}
        out_handle = open(args.output, "a", encoding="utf-8") if rank0 else None
        side_handle = open(side_path, "a", encoding="utf-8") if rank0 else None
        try:
            for group in _groups(todo, settings.batch_size, settings.num_samples):
                results = estep_lib.estep_documents(model, [g[2] for g in group], t, start_id,
                                                    settings, num_params=n_params)
                for (doc, chunks, edoc), result in zip(group, results):
                    summary["computed"] += 1
                    totals["sampled"] += result.sampled_tokens
                    totals["scored"] += result.scored_tokens
                    totals["flops"] += result.flops
                    totals["no_fin"] += sum(c.no_finished for c in result.chunks)
                    if rank0:
                        side_handle.write(json.dumps({
                            "id": doc["id"], "doc_key": edoc.doc_key,
                            "chunks": [c.to_dict() for c in result.chunks],
                            "sampled_tokens": result.sampled_tokens,
                            "scored_tokens": result.scored_tokens, "flops": result.flops}) + "\n")
                        side_handle.flush()
                        out_handle.write(json.dumps({
                            "id": doc["id"], "text": doc["text"], "chunks": chunks,
                            "latent_ids": result.latents, "doc_key": edoc.doc_key}) + "\n")
                        out_handle.flush()
                if args.log_interval and (summary["computed"] // args.log_interval
                                          != (summary["computed"] - len(group))
                                          // args.log_interval):
                    rate = summary["computed"] / max(time.time() - began, 1e-9)
                    _log(f"{summary['computed']}/{len(todo)} documents ({rate:.2f} docs/s, "
                         f"{totals['flops']:.3g} FLOPs)")
        finally:
            for handle in (out_handle, side_handle):
                if handle is not None:
                    handle.close()
        summary.update(sampled_tokens=totals["sampled"], scored_tokens=totals["scored"],
                       flops=totals["flops"], chunks_without_finished=totals["no_fin"])
        _log(f"E-step done: {summary['computed']} computed, {summary['skipped']} skipped, "
             f"{totals['sampled']} sampled + {totals['scored']} scored tokens, "
             f"{totals['flops']:.3g} FLOPs, {totals['no_fin']} chunks without a finished "
             "candidate")

    if args.elbo_input:
        elbo_path = args.elbo_output or args.output + ".elbo.json"
        docs = prepare(read_documents(args.elbo_input, args.elbo_documents), tokenizer, t,
                       validation=True)
        results = []
        for group in _groups(docs, settings.batch_size, settings.num_samples):
            results += estep_lib.estep_documents(model, [g[2] for g in group], t, start_id,
                                                 settings, validation=True, num_params=n_params)
        report = estep_lib.elbo_report(results, [len(d[0]["text"]) for d in docs])
        report.update(num_samples=settings.num_samples, iteration=settings.iteration,
                      seed=settings.seed, load=os.path.abspath(args.load))
        if rank0:
            tmp = elbo_path + ".tmp"
            with open(tmp, "w") as handle:
                json.dump(report, handle, indent=1)
            os.replace(tmp, elbo_path)
        summary["elbo"] = report
        _log("ELBO: " + ", ".join(f"{k} {v:.4f}" for k, v in report.items()
                                  if k.startswith("elbo_") and k.endswith("per_token")))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ToolError, ValueError, OSError) as err:
        print(f"bolt_estep.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    from megatron_latent.distributed import destroy_parallel

    destroy_parallel()
    sys.exit(code)

#!/usr/bin/env python
r"""BoLT's EM loop (../shared/methods/latent_thoughts.md, "EM recipe", decisions 9 and 10):
iterations of E-step -> latent dataset -> M-step -> ELBO and downstream evaluation, every
stage resumable, one directory per iteration and a summary table that counts the compute of
sampling and scoring next to training.

    python tools/bolt_em.py --base ckpt/base_latent --train-docs train.jsonl \
        --valid-docs valid.jsonl --iterations 3 --work-dir runs/bolt_em \
        --mstep-args "--model pythia-160m --train-iters 2000 --lr 1e-4 ..." \
        --num-samples 4 --max-new-tokens 1024 [--warmstart teacher_latents.jsonl] \
        [--eval-tasks demo_next_line --eval-include-path tasks/]
    python tools/bolt_em.py --base ckpt/vanilla --tokenizer-type SentencePieceTokenizer \
        --tokenizer-model tok.model ...          # grows the base with the four tokens first

base model:
  --base is a checkpoint whose tokenizer already holds the four latent tokens
  (tools/add_latent_tokens.py --load/--save), or, with --tokenizer-type/--tokenizer-model, a
  vanilla checkpoint and its tokenizer: the driver then adds the tokens and grows the
  checkpoint into WORK/base (megatron_latent.latent.tokens, seed --grow-seed), once.

per iteration (WORK/iter_K/, each stage a folder with stage.json):
  estep/   tools/bolt_estep.py on --train-docs with the previous iteration's final model
           (iteration 1: the warm-start model when --warmstart is given, else the base);
           --iteration K enters the seeds. Latents are regenerated, never accumulated.
  data/    tools/make_latent_data.py (--copies, ≈ the notes' 2 epochs; --latent-type random)
  mstep/   pretrain.py --load BASE --finetune (weights only: fresh optimizer and iteration,
           decision 9), --save mstep/checkpoint, --mstep-args passed through (the model shape
           and the recipe: iterations, batch, LR...), validation on the raw held-out docs
           (WORK/valid_raw: --valid-docs without latents, BOS + text + EOD, as training
           documents open and close); an interrupted M-step resumes from its own checkpoint
  elbo/    tools/bolt_estep.py --elbo-input --valid-docs with the new model (K samples)
  eval/    tools/evaluate.py --tasks --eval-tasks (skipped when none is given or lm-eval is
           not installed)
  --warmstart JSONL (tools/synthesize_latents.py output: teacher latents) adds iteration 0:
  data -> mstep -> elbo -> eval on the teacher latents; the teacher's compute is not counted
  (it is not known for an HTTP teacher).

resuming:
  each stage's key is a hash of its command and its inputs' keys; a stage whose stage.json
  holds the same key is skipped, a stage with another key starts over (its folder is
  emptied), a half-finished stage with the same key is rerun and its tool resumes (the
  E-step keeps finished documents, the M-step continues from its last checkpoint). Every
  execution and skip is appended to WORK/stages.log.

summary (printed, WORK/summary.json, WORK/summary.md), one row per iteration:
  ELBO_1/2/4 per raw-text token on --valid-docs, the trainer's validation loss, task scores,
  training tokens, FLOPs of E-step sampling and scoring (≈ 2·N per sampled or scored token,
  K-fold, as tools/bolt_estep.py reports them), training FLOPs (the trainer's training
  FLOPs per token x its executed tokens), their total and the cumulative total over
  iterations (iteration K's model depends on all earlier ones). The ELBO evaluation's own
  FLOPs are listed apart and not added (evaluation, not training compute).

--in-process runs every tool's main() in this process (fast for small runs and tests);
otherwise each tool is a subprocess, prefixed by --launcher (e.g. "torchrun
--nproc_per_node 8") when given, its output in the stage folder's log.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_latent.stages import key_of, stage_begin, stage_done, stage_store  # noqa: E402

STAGES = ("estep", "data", "mstep", "elbo", "eval")


class EMError(RuntimeError):
    """A stage failed or an input is wrong; reported as `bolt_em.py: error: ...`."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--base", required=True, help="base checkpoint (with the four tokens, or see "
        "--tokenizer-type/--tokenizer-model)")
    add("--tokenizer-type", default=None, help="with --tokenizer-model: --base is vanilla; "
        "grow it with the four latent tokens first")
    add("--tokenizer-model", default=None, help="the vanilla base's tokenizer")
    add("--grow-seed", type=int, default=42, help="seed of the new embedding rows")
    add("--train-docs", required=True, help="JSONL documents for the E-step")
    add("--valid-docs", required=True, help="held-out JSONL documents (ELBO, validation)")
    add("--iterations", type=int, default=1, help="EM iterations after the warm start")
    add("--warmstart", default=None, help="iteration-0 data: teacher latents "
        "(tools/synthesize_latents.py output)")
    add("--work-dir", required=True)
    add("--mstep-args", default="", help="pretrain.py flags of every M-step (shape, recipe)")
    add("--copies", type=int, default=2, help="make_latent_data copies (epochs; default 2)")
    add("--latent-type", default="random", help="make_latent_data --latent-type")
    add("--data-seed", type=int, default=42, help="make_latent_data --seed (coins)")
    estep = parser.add_argument_group("E-step and ELBO (tools/bolt_estep.py)")
    estep.add_argument("--num-samples", type=int, default=4, help="K (default 4)")
    estep.add_argument("--max-new-tokens", type=int, default=None)
    estep.add_argument("--max-prompt-tokens", type=int, default=None)
    estep.add_argument("--max-seq-length", type=int, default=None)
    estep.add_argument("--estep-batch-size", type=int, default=None)
    estep.add_argument("--seed", type=int, default=0, help="E-step seed (with the iteration)")
    estep.add_argument("--elbo-documents", type=int, default=1000,
                       help="first this many --valid-docs for the ELBO (0: all)")
    estep.add_argument("--estep-args", default="", help="more bolt_estep.py flags")
    ev = parser.add_argument_group("evaluation (tools/evaluate.py)")
    ev.add_argument("--eval-tasks", default=None, help="comma-separated lm-eval tasks")
    ev.add_argument("--eval-include-path", default=None)
    ev.add_argument("--eval-limit", default=None, help="documents per task")
    ev.add_argument("--eval-args", default="", help="more evaluate.py flags")
    run = parser.add_argument_group("running")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    run.add_argument("--in-process", action="store_true",
                     help="call each tool's main() in this process")
    run.add_argument("--launcher", default="",
                     help="command prefix of the tools' subprocesses (e.g. torchrun ...)")
    return parser


# --------------------------------------------------------------------------- stages


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work_dir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / "stages.log"

    # ---- bookkeeping

    def note(self, name: str, what: str) -> None:
        with open(self.log_path, "a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {name} {what}\n")

    def stage(self, name: str, folder: Path, key: str, inputs: dict, body) -> dict:
        """Run `body(folder)` unless the stage is finished with this key; its result."""
        result = stage_done(folder, key)
        if result is not None:
            self.note(name, "skip")
            print(f"[bolt_em] {name}: done (key {key})", flush=True)
            return result
        print(f"[bolt_em] {name}: running", flush=True)
        self.note(name, "run")
        began = time.time()
        stage_begin(folder, key)
        result = body(folder)
        result["seconds"] = time.time() - began
        stage_store(folder, key, result, inputs=inputs)
        self.note(name, "done")
        return result

    def tool(self, script: str, argv: list[str], log: Path) -> None:
        """Run a tool (tools/X.py or pretrain.py); raise EMError on a non-zero exit."""
        argv = [str(a) for a in argv]
        path = ROOT / script
        if self.args.in_process:
            name = "bolt_em_" + path.stem
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            try:
                code = module.main(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            finally:
                from megatron_latent.distributed import destroy_parallel

                destroy_parallel()
            if code:
                raise EMError(f"{script} exited with {code}")
            return
        command = [*shlex.split(self.args.launcher), *([] if self.args.launcher
                                                        else [sys.executable]), str(path), *argv]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "a") as handle:
            handle.write(f"$ {shlex.join(command)}\n")
            handle.flush()
            result = subprocess.run(command, cwd=ROOT, env=env, stdout=handle,
                                    stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise EMError(f"{script} failed (exit {result.returncode}); {log}:\n{tail}")

    # ---- inputs

    def base_stage(self) -> tuple[Path, str]:
        """(grown base checkpoint, key)."""
        args = self.args
        base = Path(args.base).resolve()
        tracker = base / "latest_checkpointed_iteration.txt"
        if not tracker.exists():
            raise EMError(f"--base {base}: not a checkpoint directory (no {tracker.name})")
        source_key = key_of("base", str(base), tracker.read_text().strip())
        if not args.tokenizer_model:
            kind, model = _checkpoint_tokenizer(base)
            _check_latent_tokenizer(kind, model, f"--base {base}")
            return base, source_key
        folder = self.work / "base"
        tok = Path(args.tokenizer_model).resolve()
        inputs = {"base": str(base), "tokenizer_type": args.tokenizer_type,
                  "tokenizer_model": str(tok), "seed": args.grow_seed}
        key = key_of("grow", source_key, inputs)

        def grow(folder: Path) -> dict:
            out_tok = folder / ("tokenizer.model" if tok.suffix == ".model" else "tokenizer")
            self.tool("tools/add_latent_tokens.py", [
                "--tokenizer-type", args.tokenizer_type, "--tokenizer-model", tok,
                "--output-tokenizer", out_tok, "--load", base, "--save", folder / "checkpoint",
                "--seed", args.grow_seed], folder / "grow.log")
            return {"checkpoint": str(folder / "checkpoint")}

        self.stage("base", folder, key, inputs, grow)
        return folder / "checkpoint", key

    def valid_raw_stage(self, base: Path, base_key: str) -> tuple[Path, str]:
        """--valid-docs as a raw indexed dataset in the grown tokenizer (validation loss)."""
        kind, model = _checkpoint_tokenizer(base)
        valid = Path(self.args.valid_docs).resolve()
        inputs = {"valid_docs": str(valid), "digest": _digest(valid)}
        key = key_of("valid_raw", base_key, inputs)
        folder = self.work / "valid_raw"

        def body(folder: Path) -> dict:
            from megatron_latent.latent.chunking import chunk_document

            records = folder / "valid_raw.jsonl"
            with open(records, "w", encoding="utf-8") as out:
                for doc in _read_jsonl(valid):
                    chunks = chunk_document(doc["text"])
                    out.write(json.dumps({"id": doc.get("id"), "text": doc["text"],
                                          "chunks": chunks,
                                          "latent_ids": [[] for _ in chunks]}) + "\n")
            self.tool("tools/make_latent_data.py", [
                "--input", records, "--output-prefix", folder / "valid", "--mix-raw-ratio", "1",
                "--tokenizer-type", kind, "--tokenizer-model", model, "--log-interval", "0"],
                folder / "data.log")
            return {"prefix": str(folder / "valid")}

        self.stage("valid_raw", folder, key, inputs, body)
        return folder / "valid", key

    # ---- one iteration

    def iteration(self, k: int, base: Path, base_key: str, valid_prefix: Path, valid_key: str,
                  model: Path | None, model_key: str | None) -> tuple[dict, Path, str]:
        """Stages of iteration k; (row, final checkpoint, its key). k = 0 is the warm start
        (no E-step); otherwise `model` is the E-step's model."""
        args = self.args
        it = self.work / f"iter_{k}"
        it.mkdir(parents=True, exist_ok=True)
        kind, tok_model = _checkpoint_tokenizer(base)
        tokenizer = ["--tokenizer-type", kind, "--tokenizer-model", tok_model]
        row: dict[str, Any] = {"iteration": k}

        if k == 0:
            warm = Path(args.warmstart).resolve()
            latents, upstream = warm, key_of("warmstart", str(warm), _digest(warm))
            row["estep"] = {"source": "teacher latents (not counted)", "flops": 0.0,
                            "sampling_flops": 0.0, "scoring_flops": 0.0, "sampled_tokens": 0,
                            "scored_tokens": 0}
        else:
            folder = it / "estep"
            output = folder / "latents.jsonl"
            train = Path(args.train_docs).resolve()
            flags = ["--load", model, "--input", train, "--output", output,
                     "--num-samples", args.num_samples, "--iteration", k, "--seed", args.seed,
                     "--device", args.device, *_optional(args, [
                         ("max_new_tokens", "--max-new-tokens"),
                         ("max_prompt_tokens", "--max-prompt-tokens"),
                         ("max_seq_length", "--max-seq-length"),
                         ("estep_batch_size", "--batch-size")]),
                     *shlex.split(args.estep_args)]
            inputs = {"command": [str(f) for f in flags], "train_digest": _digest(train)}
            key = key_of("estep", model_key, inputs)

            def estep(folder: Path) -> dict:
                self.tool("tools/bolt_estep.py", flags, folder / "estep.log")
                return _estep_totals(output.with_name(output.name + ".candidates.jsonl"))

            row["estep"] = self.stage(f"iter_{k}/estep", folder, key, inputs, estep)
            latents, upstream = output, key

        # data
        folder = it / "data"
        prefix = folder / "latent"
        flags = ["--input", latents, "--output-prefix", prefix, "--copies", args.copies,
                 "--seed", args.data_seed, "--latent-type", args.latent_type, *tokenizer,
                 "--log-interval", "0"]
        inputs = {"command": [str(f) for f in flags]}
        data_key = key_of("data", upstream, base_key, inputs)

        def data(folder: Path) -> dict:
            self.tool("tools/make_latent_data.py", flags, folder / "data.log")
            return {"prefix": str(prefix), **_dataset_stats(prefix)}

        row["data"] = self.stage(f"iter_{k}/data", folder, data_key, inputs, data)

        # M-step
        folder = it / "mstep"
        checkpoint = folder / "checkpoint"
        metrics = folder / "metrics.jsonl"
        flags = [*shlex.split(args.mstep_args), "--train-data-path", prefix,
                 "--valid-data-path", valid_prefix, *tokenizer, "--save", checkpoint,
                 "--metrics-file", metrics]
        if "--device" not in flags and args.device != "auto":
            flags += ["--device", args.device]
        inputs = {"command": [str(f) for f in flags], "base": str(base)}
        mstep_key = key_of("mstep", data_key, base_key, valid_key, inputs)

        def mstep(folder: Path) -> dict:
            if (checkpoint / "latest_checkpointed_iteration.txt").exists():
                load = ["--load", checkpoint]  # resume the interrupted M-step
            else:
                load = ["--load", base, "--finetune"]  # restart from the base (decision 9)
            self.tool("pretrain.py", [*flags, *load], folder / "train.log")
            return _mstep_result(metrics, [str(f) for f in flags])

        row["mstep"] = self.stage(f"iter_{k}/mstep", folder, mstep_key, inputs, mstep)

        # ELBO on the held-out documents
        folder = it / "elbo"
        report = folder / "elbo.json"
        valid = Path(args.valid_docs).resolve()
        flags = ["--load", checkpoint, "--elbo-input", valid, "--elbo-output", report,
                 "--elbo-documents", args.elbo_documents, "--num-samples", args.num_samples,
                 "--iteration", k, "--seed", args.seed, "--device", args.device,
                 *_optional(args, [("max_new_tokens", "--max-new-tokens"),
                                   ("max_prompt_tokens", "--max-prompt-tokens"),
                                   ("max_seq_length", "--max-seq-length"),
                                   ("estep_batch_size", "--batch-size")]),
                 *shlex.split(args.estep_args)]
        inputs = {"command": [str(f) for f in flags], "valid_digest": _digest(valid)}
        key = key_of("elbo", mstep_key, inputs)

        def elbo(folder: Path) -> dict:
            self.tool("tools/bolt_estep.py", flags, folder / "elbo.log")
            return json.loads(report.read_text())

        row["elbo"] = self.stage(f"iter_{k}/elbo", folder, key, inputs, elbo)

        # downstream tasks
        folder = it / "eval"
        if args.eval_tasks:
            output = folder / "results.json"
            flags = ["--load", checkpoint, "--tasks", args.eval_tasks, "--output", output,
                     "--device", args.device,
                     *(["--include-path", Path(args.eval_include_path).resolve()]
                       if args.eval_include_path else []),
                     *(["--limit", args.eval_limit] if args.eval_limit else []),
                     *shlex.split(args.eval_args)]
            inputs = {"command": [str(f) for f in flags]}
            key = key_of("eval", mstep_key, inputs)

            def evaluate(folder: Path) -> dict:
                if importlib.util.find_spec("lm_eval") is None:
                    return {"skipped": "lm-eval is not installed", "scores": {}}
                self.tool("tools/evaluate.py", flags, folder / "eval.log")
                return {"scores": _scores(json.loads(output.read_text()))}

            row["eval"] = self.stage(f"iter_{k}/eval", folder, key, inputs, evaluate)
        else:
            row["eval"] = {"skipped": "no --eval-tasks", "scores": {}}
        return row, checkpoint, mstep_key

    def run(self) -> list[dict]:
        args = self.args
        base, base_key = self.base_stage()
        valid_prefix, valid_key = self.valid_raw_stage(base, base_key)
        rows = []
        model, model_key = base, base_key
        first = 0 if args.warmstart else 1
        for k in range(first, args.iterations + 1):
            row, model, model_key = self.iteration(k, base, base_key, valid_prefix, valid_key,
                                                   model, model_key)
            rows.append(row)
            write_summary(self.work, rows)
        return rows


# --------------------------------------------------------------------------- helpers


def _optional(args, pairs) -> list:
    out = []
    for attr, flag in pairs:
        value = getattr(args, attr)
        if value is not None:
            out += [flag, value]
    return out


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _checkpoint_tokenizer(checkpoint: Path) -> tuple[str, str]:
    """(tokenizer type, model) recorded in a checkpoint's config.json."""
    tracker = checkpoint / "latest_checkpointed_iteration.txt"
    if not tracker.exists():
        raise EMError(f"{checkpoint}: not a checkpoint directory (no {tracker.name})")
    iteration = int(tracker.read_text().strip())
    config = checkpoint / f"iter_{iteration:07d}" / "config.json"
    if not config.exists():
        raise EMError(f"{checkpoint}: no {config.relative_to(checkpoint)}")
    tok = json.loads(config.read_text()).get("tokenizer", {})
    if not tok.get("tokenizer_type") or not tok.get("tokenizer_model"):
        raise EMError(f"{checkpoint}: the checkpoint records no tokenizer")
    return tok["tokenizer_type"], tok["tokenizer_model"]


def _check_latent_tokenizer(kind: str, model: str, what: str) -> None:
    from megatron_latent.config import ConfigError
    from megatron_latent.data.tokenizers import build_tokenizer
    from megatron_latent.latent.tokens import latent_token_ids

    try:
        latent_token_ids(build_tokenizer(kind, tokenizer_model=model))
    except ConfigError as err:
        raise EMError(f"{what}: its tokenizer lacks the four latent tokens ({err}); give "
                      "--tokenizer-type and --tokenizer-model to grow a vanilla base") from None


def _estep_totals(side: Path) -> dict:
    """Token and FLOP totals of a finished E-step from its side file (every document, the
    ones finished by an interrupted earlier run included). The per-document FLOPs are
    2·N·(sampled + scored); they are split between sampling and scoring by token count."""
    sampled = scored = 0
    flops = 0.0
    documents = 0
    for record in _read_jsonl(side):
        documents += 1
        sampled += int(record["sampled_tokens"])
        scored += int(record["scored_tokens"])
        flops += float(record["flops"])
    share = sampled / (sampled + scored) if sampled + scored else 0.0
    return {"documents": documents, "sampled_tokens": sampled, "scored_tokens": scored,
            "sampling_flops": flops * share, "scoring_flops": flops - flops * share,
            "flops": flops}


def _dataset_stats(prefix: Path) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return {"documents": len(dataset), "tokens": int(dataset.sequence_lengths.sum())}


def training_flops_per_token(flags: list[str]) -> float:
    """The trainer's training FLOPs per token for these pretrain.py flags (its own count)."""
    from megatron_latent.arguments import method_options, parse_run_config
    from megatron_latent.methods.registry import get_method
    from megatron_latent.training import trainer

    run, _ = parse_run_config(list(flags))
    run.model.vocab_size = trainer.build_run_tokenizer(run).vocab_size
    return trainer.training_flops_per_token(run, get_method(run.method), method_options(run))


def _mstep_result(metrics: Path, flags: list[str]) -> dict:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    valid = [r for r in records if r.get("kind") == "validation"]
    if not train:
        raise EMError(f"{metrics}: the M-step logged no training record")
    per_token = training_flops_per_token(flags)
    executed = int(train[-1].get("executed_tokens") or train[-1]["consumed_tokens"])
    return {"iterations": train[-1]["iteration"], "tokens": int(train[-1]["consumed_tokens"]),
            "executed_tokens": executed, "flops_per_token": per_token,
            "flops": per_token * executed, "train_loss": train[-1]["lm_loss"],
            "valid_loss": valid[-1]["lm_loss"] if valid else None}


def _scores(results: dict) -> dict:
    """{task/metric: value} of an lm-eval results JSON (numbers only, stderr left out)."""
    scores = {}
    for task, metrics in results.get("results", {}).items():
        for name, value in metrics.items():
            if "stderr" in name or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            scores[f"{task}/{name.split(',')[0]}"] = value
    return scores


# --------------------------------------------------------------------------- summary


def summary_rows(rows: list[dict]) -> list[dict]:
    """Flat rows of the summary table; FLOPs are the stages' reported counts."""
    out, cumulative = [], 0.0
    for row in rows:
        estep, mstep, elbo = row["estep"], row["mstep"], row["elbo"]
        total = estep["sampling_flops"] + estep["scoring_flops"] + mstep["flops"]
        cumulative += total
        out.append({
            "iteration": row["iteration"],
            **{f"elbo_{n}_per_token": elbo.get(f"elbo_{n}_per_token") for n in (1, 2, 4)},
            "valid_loss": mstep.get("valid_loss"),
            "scores": row["eval"].get("scores", {}),
            "sampled_tokens": estep["sampled_tokens"], "scored_tokens": estep["scored_tokens"],
            "training_tokens": mstep["tokens"],
            "sampling_flops": estep["sampling_flops"], "scoring_flops": estep["scoring_flops"],
            "training_flops": mstep["flops"], "flops": total, "cumulative_flops": cumulative,
            "elbo_eval_flops": elbo.get("flops", 0.0),
        })
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


#: Task metrics the table shows (summary.json keeps them all).
SHOWN_METRICS = ("acc", "acc_norm", "brier", "exact_match", "perplexity", "word_perplexity")


def format_table(table: list[dict]) -> str:
    tasks = sorted({name for r in table for name in r["scores"]
                    if name.rsplit("/", 1)[-1] in SHOWN_METRICS})
    header = ["iter", "ELBO_1/tok", "ELBO_2/tok", "ELBO_4/tok", "valid loss", *tasks,
              "train tokens", "sampled tok", "scored tok", "sampling FLOPs", "scoring FLOPs",
              "training FLOPs", "total FLOPs", "cumulative FLOPs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        cells = [str(r["iteration"]), *(_fmt(r[f"elbo_{n}_per_token"], ".4f") for n in (1, 2, 4)),
                 _fmt(r["valid_loss"], ".4f"), *(_fmt(r["scores"].get(t), ".4f") for t in tasks),
                 f"{r['training_tokens']:,}", f"{r['sampled_tokens']:,}",
                 f"{r['scored_tokens']:,}", *(_fmt(r[k], ".3e") for k in (
                     "sampling_flops", "scoring_flops", "training_flops", "flops",
                     "cumulative_flops"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(work: Path, rows: list[dict]) -> list[dict]:
    table = summary_rows(rows)
    (work / "summary.json").write_text(json.dumps({"rows": table, "stages": rows}, indent=1))
    note = ("ELBO_n per raw-text token on the held-out documents (higher is better); valid "
            "loss: the trainer's, raw held-out documents; FLOPs: E-step sampling and scoring "
            "(≈ 2·N per token) and training (trainer FLOPs/token x executed tokens); "
            "cumulative over iterations. Iteration 0 (if any): warm start on teacher latents, "
            "teacher compute not counted. ELBO evaluation FLOPs are not counted.")
    (work / "summary.md").write_text(f"# BoLT EM summary\n\n{format_table(table)}\n\n{note}\n")
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.tokenizer_type is None) != (args.tokenizer_model is None):
        print("bolt_em.py: error: --tokenizer-type and --tokenizer-model go together",
              file=sys.stderr)
        return 2
    if args.iterations < 0 or (args.iterations == 0 and not args.warmstart):
        print("bolt_em.py: error: nothing to do (--iterations 0 without --warmstart)",
              file=sys.stderr)
        return 2
    for name in ("train_docs", "valid_docs", "warmstart"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            print(f"bolt_em.py: error: --{name.replace('_', '-')} {path} does not exist",
                  file=sys.stderr)
            return 2
    driver = Driver(args)
    try:
        rows = driver.run()
    except EMError as err:
        print(f"bolt_em.py: error: {err}", file=sys.stderr)
        return 1
    table = format_table(summary_rows(rows))
    print("\nBoLT EM summary (" + str(driver.work / "summary.md") + ")\n" + table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

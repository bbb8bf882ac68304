#!/usr/bin/env python
"""BoLT (latent thoughts), tiny, on CPU: what `make demo-latent` runs.

1. the demo corpus (data/demo, prepared as `make demo` and the fidelity benchmarks do, if
   missing); documents = groups of --paragraphs consecutive paragraphs (speeches and stage
   directions) of the scenes of the plays: the first --documents of the training plays for
   synthesis and the E-step, the first --valid-documents of the held-out plays for the ELBO
   and the validation loss
2. teacher = a small vanilla model: `--model tiny` with a 1024-position context, trained here
   (make demo's demo_output/checkpoints/vanilla has a 128-token context, too short for a
   teacher prompt of two chunks), or --teacher-load
3. the teacher served by tools/serve.py on 127.0.0.1 (a free port; stopped at the end), teacher
   latents for every chunk of the training documents from tools/synthesize_latents.py
   --teacher http (a short prompt: a tiny model follows no instructions)
4. tools/bolt_em.py: the four latent tokens added to the tokenizer and the teacher's
   checkpoint grown (the EM base), the warm-start M-step on the teacher latents (iteration 0),
   then ONE EM iteration (E-step with the warm-start model, data, M-step from the base, ELBO,
   the demo's lm-eval tasks when demo_output/eval_tasks exists), and its summary table.
Every stage is resumable: a rerun reuses what is finished (--fresh starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = "{prefix}\n\n{suffix}\n\n"


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(command: list, log: Path | None = None, allowed: tuple[int, ...] = (0,)) -> int:
    command = [str(c) for c in command]
    print("$ " + " ".join(c.replace(str(ROOT) + "/", "") for c in command), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if log is None:
        result = subprocess.run(command, cwd=ROOT, env=env)
    else:
        with open(log, "a") as handle:
            result = subprocess.run(command, cwd=ROOT, env=env, stdout=handle,
                                    stderr=subprocess.STDOUT)
    if result.returncode not in allowed:
        tail = "" if log is None else "".join(log.read_text().splitlines(True)[-20:])
        sys.exit(f"demo-latent: step failed (exit {result.returncode}){tail and ':'}\n{tail}")
    return result.returncode


def make_documents(source: Path, output: Path, count: int, paragraphs: int,
                   max_chars: int) -> int:
    """Groups of `paragraphs` consecutive paragraphs of each scene, the first `count` of at
    most `max_chars` characters (so that a teacher prompt of two chunks fits the context)."""
    docs = []
    for line in source.read_text().splitlines():
        scene = json.loads(line)
        parts = [p for p in scene["text"].split("\n\n") if p.strip()]
        for start in range(0, len(parts) - paragraphs + 1, paragraphs):
            text = "\n\n".join(parts[start:start + paragraphs])
            if len(text) > max_chars:
                continue
            docs.append({"id": f"{scene['id']}/{start // paragraphs:03d}", "text": text})
            if len(docs) == count:
                break
        if len(docs) == count:
            break
    output.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return len(docs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_health(url: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            sys.exit(f"demo-latent: tools/serve.py exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"demo-latent: {url} did not answer within {timeout:.0f} s")


def synthesize(teacher: Path, docs: Path, output: Path, work: Path, max_tokens: int) -> None:
    """Teacher latents through tools/serve.py on a free loopback port."""
    def ids(path: Path) -> list:
        return [json.loads(line)["id"] for line in path.read_text().splitlines()]

    if output.exists() and ids(output) == ids(docs):
        print(f"  reusing {output.relative_to(ROOT)}", flush=True)
        return
    port = free_port()
    log = work / "serve.log"
    server = subprocess.Popen(
        [sys.executable, ROOT / "tools" / "serve.py", "--load", teacher, "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--max-batch", "16"],
        cwd=ROOT, stdout=open(log, "a"), stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        wait_health(f"http://127.0.0.1:{port}/health", server)
        print(f"  teacher served on 127.0.0.1:{port} (pid {server.pid}, log "
              f"{log.relative_to(ROOT)})", flush=True)
        template = work / "prompt.txt"
        template.write_text(PROMPT)
        # exit 1: some chunks failed (reported); the complete documents are written
        run([sys.executable, ROOT / "tools" / "synthesize_latents.py", "--input", docs,
             "--output", output, "--teacher", "http", "--base-url",
             f"http://127.0.0.1:{port}/v1", "--model", teacher.name, "--api-key", "none",
             "--prompt-template", template, "--max-tokens", max_tokens, "--temperature", "0.7",
             "--seed", "1", "--concurrency", "1", "--batch-size", "8", "--retries", "2",
             "--log-interval", "30",
             "--allow-changed-settings"],  # a resumed run serves on another free port
            allowed=(0, 1))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        print(f"  teacher server stopped (exit {server.returncode})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="demo_output/latent")
    parser.add_argument("--data-dir", default="data/demo")
    parser.add_argument("--documents", type=int, default=30)
    parser.add_argument("--valid-documents", type=int, default=10)
    parser.add_argument("--paragraphs", type=int, default=8,
                        help="paragraphs per document")
    parser.add_argument("--max-chars", type=int, default=1500,
                        help="longest document in characters")
    parser.add_argument("--teacher-load", default=None,
                        help="a vanilla checkpoint with a context of >= 512 tokens")
    parser.add_argument("--teacher-iterations", type=int, default=200)
    parser.add_argument("--teacher-max-tokens", type=int, default=48)
    parser.add_argument("--mstep-iterations", type=int, default=60)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="remove --output-dir first")
    args = parser.parse_args()
    started = time.time()
    out = (ROOT / args.output_dir).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    data = (ROOT / args.data_dir).resolve()
    python, tools = sys.executable, ROOT / "tools"

    step("1/4 demo corpus and documents (groups of paragraphs of the scenes)")
    from concepts_fidelity import prepare_data

    prepare_data(data)
    train_docs, valid_docs = out / "train_docs.jsonl", out / "valid_docs.jsonl"
    n_train = make_documents(data / "shakespeare_train.jsonl", train_docs, args.documents,
                             args.paragraphs, args.max_chars)
    n_valid = make_documents(data / "shakespeare_valid.jsonl", valid_docs,
                             args.valid_documents, args.paragraphs, args.max_chars)
    print(f"  {n_train} training and {n_valid} held-out documents of {args.paragraphs} "
          "paragraphs", flush=True)

    step("2/4 teacher: a small vanilla model")
    if args.teacher_load:
        teacher = Path(args.teacher_load).resolve()
    else:
        teacher = out / "teacher"
        if not (teacher / "latest_checkpointed_iteration.txt").exists():
            shutil.rmtree(teacher, ignore_errors=True)
            teacher.mkdir(parents=True)
            run([python, ROOT / "pretrain.py", "--model", "tiny", "--method", "vanilla",
                 "--seq-length", "256", "--max-position-embeddings", "1024",
                 "--micro-batch-size", "8", "--global-batch-size", "8",
                 "--train-data-path", data / "train_text_document",
                 "--valid-data-path", data / "valid_text_document",
                 "--tokenizer-type", "SentencePieceTokenizer",
                 "--tokenizer-model", data / "tokenizer.model",
                 "--train-iters", args.teacher_iterations, "--lr-warmup-iters", "20",
                 "--log-interval", "50", "--eval-interval", args.teacher_iterations,
                 "--eval-iters", "4", "--num-workers", "0", "--seed", "1234",
                 "--device", "cpu", "--save", teacher,
                 "--metrics-file", teacher / "metrics.jsonl"], out / "teacher.log")
        else:
            print(f"  reusing {teacher.relative_to(ROOT)}", flush=True)
    config = json.loads(next(iter(sorted(teacher.glob("iter_*/config.json")))).read_text())
    tokenizer = config["tokenizer"]

    step("3/4 teacher latents over HTTP (tools/serve.py + tools/synthesize_latents.py)")
    teacher_latents = out / "teacher_latents.jsonl"
    synthesize(teacher, train_docs, teacher_latents, out, args.teacher_max_tokens)

    step("4/4 EM (tools/bolt_em.py): grow the base with the four tokens, warm start on the "
         "teacher latents, one EM iteration")
    mstep = ["--model", "tiny", "--method", "vanilla", "--seq-length", "256",
             "--max-position-embeddings", "1024", "--micro-batch-size", "8",
             "--global-batch-size", "8", "--train-iters", str(args.mstep_iterations),
             "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
             "--lr-warmup-iters", "10", "--weight-decay", "0.01", "--clip-grad", "1.0",
             "--log-interval", "20", "--eval-interval", str(args.mstep_iterations),
             "--eval-iters", "4", "--num-workers", "0", "--seed", "42"]
    command = [python, tools / "bolt_em.py", "--base", teacher,
               "--tokenizer-type", tokenizer["tokenizer_type"],
               "--tokenizer-model", tokenizer["tokenizer_model"],
               "--train-docs", train_docs, "--valid-docs", valid_docs,
               "--warmstart", teacher_latents, "--iterations", "1",
               "--work-dir", out / "em", "--num-samples", args.num_samples,
               "--max-new-tokens", args.max_new_tokens, "--max-prompt-tokens", "384",
               "--max-seq-length", "768", "--estep-batch-size", "32", "--device", "cpu",
               "--mstep-args", " ".join(mstep)]
    tasks = ROOT / "demo_output" / "eval_tasks"
    if not args.skip_eval and (tasks / "demo_next_line.yaml").exists():
        command += ["--eval-tasks", "demo_next_line,demo_cloze", "--eval-include-path", tasks,
                    "--eval-limit", "40"]
    else:
        print("  (no downstream tasks: run `make demo` for demo_output/eval_tasks, or drop "
              "--skip-eval)", flush=True)
    run(command)
    print(f"\nwork directory {out.relative_to(ROOT)}; finished in "
          f"{(time.time() - started) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

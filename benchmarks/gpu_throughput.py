#!/usr/bin/env python
"""Training throughput on one GPU: this project against Hugging Face, vanilla and pondering.

For each shape (default pythia-160m and pythia-1b, seq 2048, bf16) it measures four runners,
each with the largest micro-batch that fits in memory (tried from the preset's published size
down; a CUDA out-of-memory moves to the next size; pondering starts at its vanilla run's size,
and project pondering skips, without a launch, sizes that a lower bound drawn from the vanilla
run's memory puts over the device's):

    project vanilla          pretrain.py --mock-data --bf16 (the real training path)
    project pondering k=3    the same with --method pondering --ponder-steps 3 --ponder-scale-embeds
    HF vanilla               transformers GPTNeoXForCausalLM of the same shape (sdpa attention),
                             fp32 weights + torch.autocast(bf16) + AdamW(fused=True)
    HF pondering loop k=3    a plain PyTorch pondering loop around that model, as the official
                             PonderingLM code runs it: E_s = E_{s-1} + sqrt(h)·softmax(logits_s)·W_in

Every runner is a subprocess (an OOM never kills the benchmark). Project runs are read from the
metrics JSONL that pretrain.py writes; HF runs are timed by a worker in this file. Warm-up
iterations are dropped and the median of the rest is reported: tokens/s, TFLOP/s (executed
FLOPs: the project's formula for the method, every pondering pass and mixing matmul counted,
also for the HF rows, which execute the same math), MFU (TFLOP/s over the device's dense bf16
peak), peak memory and step time. Then, per shape, the pondering/vanilla time per token beside
the FLOPs ratio, and project/HF pondering tokens/s; then the goals (reported, not asserted):

    vanilla pythia-1b MFU >= 45% on an H100
    pondering k=3 time ratio <= 1.02 x its FLOPs ratio
    project pondering tokens/s >= 1.5 x the HF pondering loop at the same shape

One table is printed and everything is written as JSON (--output), logs and metrics beside it.
About 4 minutes on one H100 (223 s measured), most of it the ~18 s start-up of each process:

    python benchmarks/gpu_throughput.py
    python benchmarks/gpu_throughput.py --shapes pythia-1b --micro-batch-size 8
    python benchmarks/gpu_throughput.py --device cpu --shapes tiny      # CPU smoke test, fp32
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PONDER_STEPS = 3
PONDER_FLAGS = ["--method", "pondering", "--ponder-steps", str(PONDER_STEPS),
                "--ponder-scale-embeds"]
#: runner key -> (label, implementation, method)
RUNNERS: dict[str, tuple[str, str, str]] = {
    "project_vanilla": ("project vanilla", "project", "vanilla"),
    "project_pondering": (f"project pondering k={PONDER_STEPS}", "project", "pondering"),
    "hf_vanilla": ("HF vanilla", "hf", "vanilla"),
    "hf_pondering": (f"HF pondering loop k={PONDER_STEPS}", "hf", "pondering"),
}
#: A shape small enough for the CPU smoke test.
TINY_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
              "--vocab-size", "512"]
#: Micro-batches the memory search tries, from the preset's published one down.
CANDIDATES = (32, 16, 8, 4, 2, 1)
#: Batch-independent bytes per parameter of a project bf16 run: bf16 weights, fp32 main
#: weights and main grads, Adam's two fp32 moments.
STATE_BYTES_PER_PARAM = 18
#: Pondering k=3 holds at least this many times vanilla's memory per sample (k + 1 passes of
#: activations; measured 3.0x at pythia-160m and 3.6x at pythia-1b on an H200).
PONDER_MEMORY_FLOOR = 2.0
OOM_MARKERS = ("out of memory", "outofmemoryerror", "cublas_status_alloc_failed")
FOOTNOTE = {
    "cuda": "Project rows: pretrain.py --bf16 --mock-data (megatron-core: bf16 weights, fp32 "
            "main weights and grads, its Adam; grad clipping 1.0). HF rows: transformers "
            "GPTNeoXForCausalLM, attn_implementation='sdpa', fp32 master weights under "
            "torch.autocast(bfloat16) and torch.optim.AdamW(fused=True), grad clipping 1.0 (the "
            "usual HF-Trainer-style bf16 mixed precision). Peak memory: "
            "torch.cuda.max_memory_allocated.",
    "cpu": "CPU smoke test, fp32 everywhere: pretrain.py --mock-data (CPU engine, AdamW); HF "
           "GPTNeoXForCausalLM (sdpa) with torch.optim.AdamW; grad clipping 1.0. Peak memory: "
           "the process's peak resident set.",
}
NOTES = (
    "TFLOP/s and MFU count executed FLOPs with the "
    "project's formula (matmuls, 3x forward, every pondering pass and mixing matmul); the HF "
    "rows use the formula of the project run of the same shape and method, since they execute "
    "the same math. Time ratios are per token (micro-batches may differ). Median over the "
    "measured iterations, warm-up dropped.")


# -- shapes and FLOPs ----------------------------------------------------------------------
def shape_flags(shape: str, seq_length: int) -> list[str]:
    """pretrain.py flags of a shape: a preset name, or 'tiny' for the smoke test."""
    flags = list(TINY_FLAGS) if shape == "tiny" else ["--model", shape]
    return flags + ["--seq-length", str(seq_length)]


def method_flags(method: str) -> list[str]:
    return list(PONDER_FLAGS) if method == "pondering" else ["--method", "vanilla"]


def run_config(shape: str, seq_length: int, method: str):
    """The project's resolved RunConfig for a shape and method (nothing is built)."""
    from megatron_latent.arguments import parse_run_config

    run, _ = parse_run_config([*shape_flags(shape, seq_length), *method_flags(method),
                               "--mock-data", "--train-iters", "1"])
    return run


def flops_per_token(shape: str, seq_length: int, method: str) -> float:
    """Training FLOPs per token by the project's own formulas (what its TFLOP/s logs use)."""
    from megatron_latent.arguments import method_options
    from megatron_latent.methods.registry import get_method
    from megatron_latent.training.trainer import training_flops_per_token

    run = run_config(shape, seq_length, method)
    return training_flops_per_token(run, get_method(run.method), method_options(run))


def is_oom(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in OOM_MARKERS)


def child_env() -> dict[str, str]:
    """The environment of a child: this checkout importable, no torchrun world inherited."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def launch(command: list[str], log: Path, timeout: float) -> tuple[int, str]:
    """Run a child with stdout+stderr to `log`; returns (exit status, the log's last 8 kB)."""
    with open(log, "w") as handle:
        try:
            code = subprocess.run(command, cwd=ROOT, env=child_env(), stdout=handle,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    text = log.read_text(errors="replace")
    return code, text[-8000:]


def median_stats(step_seconds: list[float], tokens_per_step: int) -> dict[str, Any]:
    step = statistics.median(step_seconds)
    return {"step_ms": 1e3 * step, "step_ms_all": [1e3 * s for s in step_seconds],
            "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step / step}


# -- project runs: pretrain.py ---------------------------------------------------------------
def read_metrics(path: Path, warmup: int) -> dict[str, Any]:
    """Per-iteration step time, tokens, TFLOP/s and peak memory from pretrain.py's JSONL
    (--log-interval 1); warm-up iterations dropped, medians of the rest."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = sorted((r for r in records if r.get("kind") == "train"), key=lambda r: r["iteration"])
    steps, tflops, previous = [], [], 0
    tokens_per_step = 0
    for record in train:
        tokens = record["consumed_tokens"] - previous
        previous = record["consumed_tokens"]
        if record["iteration"] <= warmup:
            continue
        tokens_per_step = tokens
        steps.append(tokens / record["tokens_per_second"])
        tflops.append(record["tflops_per_device"])
    if not steps:
        raise ValueError(f"{path}: no train records after {warmup} warm-up iterations")
    memory = [r.get("peak_mem_gib", r.get("peak_rss_gib")) for r in train]
    memory = [m for m in memory if m is not None]
    return {**median_stats(steps, tokens_per_step), "logged_tflops": statistics.median(tflops),
            "peak_mem_gib": max(memory) if memory else None}


def project_attempt(args, shape: str, method: str, micro_batch: int) -> dict[str, Any]:
    """One pretrain.py run; {'outcome': 'ok' | 'oom' | 'failed', ...}."""
    stem = f"{shape}_project_{method}_mb{micro_batch}"
    metrics = args.work_dir / f"{stem}.jsonl"
    metrics.unlink(missing_ok=True)  # MetricsWriter appends
    command = [sys.executable, str(ROOT / "pretrain.py"), *shape_flags(shape, args.seq_for(shape)),
               *method_flags(method), "--mock-data", "--device", args.device,
               "--micro-batch-size", str(micro_batch), "--global-batch-size", str(micro_batch),
               "--train-iters", str(args.warmup + args.iterations), "--log-interval", "1",
               "--eval-iters", "0", "--metrics-file", str(metrics), "--seed", "1234"]
    if args.device == "cuda":
        command.append("--bf16")
    code, tail = launch(command, args.work_dir / f"{stem}.log", args.run_timeout)
    if code == 0 and metrics.exists():
        return {"outcome": "ok", "micro_batch": micro_batch, **read_metrics(metrics, args.warmup)}
    outcome = "oom" if is_oom(tail) else "failed"
    return {"outcome": outcome, "micro_batch": micro_batch, "exit_code": code,
            "log_tail": tail[-2000:]}


def pondering_floor_gib(vanilla: dict[str, Any], params: int, micro_batch: int) -> float:
    """A lower bound on project pondering's memory at `micro_batch`, from the vanilla run:
    the batch-independent state (at most STATE_BYTES_PER_PARAM per parameter) plus
    PONDER_MEMORY_FLOOR times vanilla's memory per sample."""
    fixed = STATE_BYTES_PER_PARAM * params / 2**30
    per_sample = max(vanilla["peak_mem_gib"] - fixed, 0.0) / vanilla["micro_batch"]
    return fixed + PONDER_MEMORY_FLOOR * per_sample * micro_batch


def project_runner(args, shape: str, method: str, candidates: list[int],
                   vanilla: dict[str, Any] | None = None) -> dict[str, Any]:
    """Largest micro-batch of `candidates` that trains without OOM (one process each).
    For pondering, sizes whose memory floor (from the `vanilla` run) exceeds the device's
    memory are skipped without a launch: a pretrain.py start costs ~20 s."""
    from megatron_latent.config import count_parameters

    params = count_parameters(run_config(shape, args.seq_for(shape), method).model)["total"]
    capacity = args.info.get("memory_gib")
    tried: list[dict[str, Any]] = []
    result: dict[str, Any] = {"outcome": "oom"}
    for micro_batch in candidates:
        if method == "pondering" and vanilla and capacity and vanilla.get("peak_mem_gib") \
                and len(candidates) > 1 and micro_batch != candidates[-1]:
            floor = pondering_floor_gib(vanilla, params, micro_batch)
            if floor > capacity:
                tried.append({"micro_batch": micro_batch, "outcome": "skipped",
                              "floor_gib": round(floor, 1)})
                print(f"    project {method:<9} mb {micro_batch:>3}: skipped (needs >= "
                      f"{floor:.0f} of {capacity:.0f} GiB)", flush=True)
                continue
        started = time.perf_counter()
        result = project_attempt(args, shape, method, micro_batch)
        tried.append({"micro_batch": micro_batch, "outcome": result["outcome"],
                      "seconds": round(time.perf_counter() - started, 1)})
        print(f"    project {method:<9} mb {micro_batch:>3}: {result['outcome']} "
              f"({tried[-1]['seconds']:.0f}s)", flush=True)
        if result["outcome"] != "oom":
            break
    return {**result, "tried": tried}


# -- HF peers: a worker process ------------------------------------------------------------
def hf_forward_logits(model, ids, method: str, scale_embeds: bool = True):
    """Logits of the HF model; for pondering, the loop of the official PonderingLM code:
    E_0 = c·W_in[ids]; E_s = E_{s-1} + softmax(Model(E_{s-1})) · (c·W_in), k times; the last
    pass's logits (c = sqrt(hidden) with scale_embeds). Mirrors tests/test_pondering.py."""
    if method == "vanilla":
        return model(input_ids=ids).logits
    table = model.get_input_embeddings().weight
    embeds = table[ids]
    if scale_embeds:
        scale = math.sqrt(table.shape[1])
        embeds, table = embeds * scale, table * scale
    for _ in range(PONDER_STEPS):
        logits = model(inputs_embeds=embeds).logits
        embeds = embeds + logits.softmax(dim=-1) @ table
    return model(inputs_embeds=embeds).logits


def hf_measure(model, optimizer, method: str, micro_batch: int, seq_length: int, vocab: int,
               device, steps: int) -> list[float]:
    """Seconds of each of `steps` training steps (forward, loss, backward, clip, AdamW)."""
    import torch
    import torch.nn.functional as F

    cuda = device.type == "cuda"
    generator = torch.Generator(device=device).manual_seed(1234)
    tokens = torch.randint(0, vocab, (micro_batch, seq_length + 1), device=device,
                           generator=generator)
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = hf_forward_logits(model, ids, method)
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                   labels.reshape(-1))
        loss.backward()
        del logits, loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def peak_memory_gib(device) -> float:
    """Peak allocated CUDA memory, or on the CPU the process's peak resident set."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def hf_search(model, optimizer, method: str, candidates: list[int], args, vocab: int,
              device) -> dict[str, Any]:
    """Try micro-batches large to small in this process (an OOM frees and moves on); time the
    first that fits."""
    import torch

    cuda = device.type == "cuda"
    result: dict[str, Any] = {"outcome": "oom", "tried": []}
    for micro_batch in candidates:
        started = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        try:
            times = hf_measure(model, optimizer, method, micro_batch, args.seq_length, vocab,
                               device, args.warmup + args.iterations)
            outcome = "ok"
        except torch.cuda.OutOfMemoryError:
            outcome = "oom"
        except RuntimeError as error:  # some kernels report OOM as a plain RuntimeError
            if not is_oom(str(error)):
                raise
            outcome = "oom"
        seconds = round(time.perf_counter() - started, 1)
        result["tried"].append({"micro_batch": micro_batch, "outcome": outcome,
                                "seconds": seconds})
        print(f"hf {method} mb {micro_batch}: {outcome} ({seconds}s)", flush=True)
        if outcome == "ok":
            result.update(outcome="ok", micro_batch=micro_batch,
                          peak_mem_gib=peak_memory_gib(device),
                          **median_stats(times[args.warmup:], micro_batch * args.seq_length))
        # Outside the except block, so the failed step's frames and tensors are gone.
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if outcome == "ok":
            break
    return result


def hf_worker(args) -> int:
    """Subprocess entry: build the HF model once, then for each of --hf-methods (vanilla
    first) search the micro-batch and time it; pondering's search starts at vanilla's fit.
    Writes --json-out {method: result} after each method."""
    import torch
    import transformers

    device = torch.device(args.device)
    config = transformers.GPTNeoXConfig.from_dict(json.loads(args.hf_config))
    config.use_cache = False
    torch.manual_seed(1234)
    with device:  # initialise on the device: a 1B model's CPU init would take seconds
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = model.to(device=device, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  weight_decay=0.01, fused=device.type == "cuda")
    extra = {"attention": getattr(model.config, "_attn_implementation", None),
             "transformers": transformers.__version__}
    results: dict[str, Any] = {}
    candidates = list(args.candidates)
    for method in args.hf_methods.split(","):
        result = hf_search(model, optimizer, method, candidates, args, args.vocab_size, device)
        results[method] = {**result, **extra}
        if result["outcome"] == "ok" and method == "vanilla":
            candidates = [c for c in candidates if c <= result["micro_batch"]]
        Path(args.json_out).write_text(json.dumps(results))
    return 0


def hf_runner(args, shape: str, methods: list[str],
              candidates: list[int]) -> dict[str, dict[str, Any]]:
    """Parent side: one HF worker subprocess for a shape; {method: result}."""
    from megatron_latent.models.hf_gpt_neox import model_config_to_hf_config

    model_config = run_config(shape, args.seq_for(shape), "vanilla").model
    stem = f"{shape}_hf"
    out = args.work_dir / f"{stem}.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "hf",
               "--hf-config", json.dumps(model_config_to_hf_config(model_config)),
               "--vocab-size", str(model_config.vocab_size),
               "--seq-length", str(args.seq_for(shape)), "--device", args.device,
               "--hf-methods", ",".join(methods),
               "--candidates", ",".join(map(str, candidates)),
               "--warmup", str(args.warmup), "--iterations", str(args.iterations),
               "--json-out", str(out)]
    started = time.perf_counter()
    code, tail = launch(command, args.work_dir / f"{stem}.log", args.run_timeout)
    results = json.loads(out.read_text()) if out.exists() else {}
    for method in methods:
        if method not in results:  # the worker died (an OOM outside a step, a crash)
            results[method] = {"outcome": "oom" if is_oom(tail) else "failed",
                               "exit_code": code, "log_tail": tail[-2000:], "tried": []}
        tried = ", ".join(f"mb {t['micro_batch']}: {t['outcome']}"
                          for t in results[method]["tried"])
        print(f"    HF      {method:<9} {tried or results[method]['outcome']}", flush=True)
    print(f"    (HF worker {time.perf_counter() - started:.0f}s)", flush=True)
    return results


def info_worker(args) -> int:
    """Subprocess entry: device name, peak, software versions (the parent never touches CUDA,
    so it holds no GPU memory while the runs fill it)."""
    import importlib.metadata
    import importlib.util

    import torch

    from megatron_latent.training.metrics import device_peak_tflops

    device = torch.device(args.device)
    info: dict[str, Any] = {
        "torch": torch.__version__, "python": sys.version.split()[0], "cuda": torch.version.cuda,
        "transformers": importlib.metadata.version("transformers"),
        "transformer_engine": importlib.util.find_spec("transformer_engine") is not None}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(device=properties.name, memory_gib=properties.total_memory / 2**30,
                    peak_bf16_tflops=device_peak_tflops(device, "bf16"))
    else:
        info.update(device=f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
                    memory_gib=None, peak_bf16_tflops=None)
    Path(args.json_out).write_text(json.dumps(info))
    return 0


def device_info(args) -> dict[str, Any]:
    out = args.work_dir / "device_info.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "info",
               "--device", args.device, "--json-out", str(out)]
    code, tail = launch(command, args.work_dir / "device_info.log", 300)
    if code != 0:
        raise SystemExit(f"device query failed (exit {code}):\n{tail}")
    return json.loads(out.read_text())


# -- the benchmark -------------------------------------------------------------------------
def candidate_sizes(args, shape: str, cap: int | None = None) -> list[int]:
    """Micro-batches to try, large to small; --micro-batch-size forces one."""
    if args.micro_batch_size:
        return [args.micro_batch_size]
    if args.device != "cuda":
        return [4]  # the CPU smoke test: no memory search
    from megatron_latent.config import get_preset

    top = args.max_micro_batch or get_preset(shape).recipe.micro_batch_size
    top = min(top, cap or top)
    return [c for c in CANDIDATES if c <= top] or [1]


def bench_shape(args, shape: str, peak: float | None) -> list[dict[str, Any]]:
    """The runners of one shape, vanilla first: pondering needs more memory per sample, so
    its search starts at the vanilla run's micro-batch. The HF runners share one worker."""
    seq = args.seq_for(shape)
    flops = {m: flops_per_token(shape, seq, m) for m in ("vanilla", "pondering")}
    results: dict[str, dict[str, Any]] = {}
    for method in ("vanilla", "pondering"):
        if f"project_{method}" not in args.runners:
            continue
        vanilla = results.get("project_vanilla", {})
        fitted = vanilla.get("micro_batch") if vanilla.get("outcome") == "ok" else None
        results[f"project_{method}"] = project_runner(
            args, shape, method, candidate_sizes(args, shape, fitted),
            vanilla if fitted else None)
    hf_methods = [m for m in ("vanilla", "pondering") if f"hf_{m}" in args.runners]
    if hf_methods:
        for method, result in hf_runner(args, shape, hf_methods,
                                        candidate_sizes(args, shape)).items():
            results[f"hf_{method}"] = result
    rows = []
    for key in (k for k in RUNNERS if k in args.runners):
        label, _, method = RUNNERS[key]
        result = results[key]
        row = {"shape": shape, "runner": key, "label": label, "method": method,
               "seq_length": seq, "flops_per_token": flops[method], **result}
        if result["outcome"] == "ok":
            row["tflops"] = flops[method] * row["tokens_per_s"] / 1e12
            row["mfu"] = row["tflops"] / peak if peak else None
        rows.append(row)
    return rows


def shape_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per shape: pondering/vanilla time per token beside the FLOPs ratio, per
    implementation, and project/HF pondering tokens/s."""
    by_key = {r["runner"]: r for r in rows if r.get("outcome") == "ok"}
    ratios: dict[str, Any] = {}
    for impl in ("project", "hf"):
        vanilla, ponder = by_key.get(f"{impl}_vanilla"), by_key.get(f"{impl}_pondering")
        if vanilla and ponder:
            time_ratio = vanilla["tokens_per_s"] / ponder["tokens_per_s"]
            flops_ratio = ponder["flops_per_token"] / vanilla["flops_per_token"]
            ratios[impl] = {"time_ratio": time_ratio, "flops_ratio": flops_ratio,
                            "time_over_flops": time_ratio / flops_ratio}
    if "project_pondering" in by_key and "hf_pondering" in by_key:
        ratios["project_over_hf_pondering_tokens_per_s"] = (
            by_key["project_pondering"]["tokens_per_s"] / by_key["hf_pondering"]["tokens_per_s"])
    if "project_vanilla" in by_key and "hf_vanilla" in by_key:
        ratios["project_over_hf_vanilla_tokens_per_s"] = (
            by_key["project_vanilla"]["tokens_per_s"] / by_key["hf_vanilla"]["tokens_per_s"])
    return ratios


def evaluate_goals(rows: list[dict[str, Any]], ratios: dict[str, dict[str, Any]],
                   info: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals with measured values; reported, not asserted."""
    goals = []
    vanilla_1b = next((r for r in rows if r["shape"] == "pythia-1b"
                       and r["runner"] == "project_vanilla" and r.get("outcome") == "ok"), None)
    mfu = vanilla_1b.get("mfu") if vanilla_1b else None
    where = "" if "H100" in str(info.get("device")) else f" (measured on {info.get('device')})"
    goals.append({"goal": "project vanilla pythia-1b MFU >= 45% on an H100" + where,
                  "value": mfu, "shown": f"{100 * mfu:.1f}%" if mfu is not None else "n/a",
                  "met": None if mfu is None else mfu >= 0.45})
    for shape, ratio in ratios.items():
        project = ratio.get("project")
        value = project["time_over_flops"] if project else None
        goals.append({"goal": f"{shape}: project pondering k={PONDER_STEPS} time ratio <= 1.02 x "
                              "FLOPs ratio", "value": value,
                      "shown": (f"{project['time_ratio']:.3f} / {project['flops_ratio']:.3f} = "
                                f"{value:.3f}") if project else "n/a",
                      "met": None if value is None else value <= 1.02})
        speedup = ratio.get("project_over_hf_pondering_tokens_per_s")
        goals.append({"goal": f"{shape}: project pondering tokens/s >= 1.5 x HF pondering loop",
                      "value": speedup,
                      "shown": f"{speedup:.2f}x" if speedup is not None else "n/a",
                      "met": None if speedup is None else speedup >= 1.5})
    return goals


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + suffix


def print_report(rows, ratios, goals, info, args) -> None:
    print()
    print(f"device: {info['device']} | torch {info['torch']} (CUDA {info['cuda']}) | "
          f"transformers {info['transformers']} | transformer-engine "
          f"{'present' if info['transformer_engine'] else 'absent'} | dtype "
          f"{'bf16' if args.device == 'cuda' else 'fp32'} | peak "
          f"{_fmt(args.peak, '.0f')} TFLOP/s | {args.warmup} warm-up + {args.iterations} "
          "measured iterations")
    print(f"logs and metrics: {args.work_dir}")
    header = (f"{'shape':<12} {'runner':<24} {'mb':>3} {'tokens/s':>10} {'TFLOP/s':>8} "
              f"{'MFU':>6} {'peak GiB':>9} {'step ms':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.get("outcome") != "ok":
            last = (row.get("log_tail") or "").strip().splitlines()[-1:] or [""]
            print(f"{row['shape']:<12} {row['label']:<24} {'-':>3} {row['outcome']:>10} "
                  f"{last[0][:80]}")
            continue
        mfu = "n/a" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"
        print(f"{row['shape']:<12} {row['label']:<24} {row['micro_batch']:>3} "
              f"{row['tokens_per_s']:>10.0f} {row['tflops']:>8.2f} {mfu:>6} "
              f"{_fmt(row.get('peak_mem_gib'), '.2f'):>9} {row['step_ms']:>9.1f}")
    print()
    for shape, ratio in ratios.items():
        parts = [f"{impl} {r['time_ratio']:.2f} (FLOPs {r['flops_ratio']:.2f}, time/FLOPs "
                 f"{r['time_over_flops']:.3f})"
                 for impl, r in ((k, ratio.get(k)) for k in ("project", "hf")) if r]
        line = f"{shape}: pondering/vanilla time per token: " + ("; ".join(parts) or "n/a")
        speedup = ratio.get("project_over_hf_pondering_tokens_per_s")
        line += f" | project/HF pondering tokens/s {_fmt(speedup, '.2f', 'x')}"
        vanilla = ratio.get("project_over_hf_vanilla_tokens_per_s")
        line += f" | project/HF vanilla {_fmt(vanilla, '.2f', 'x')}"
        print(line)
    print()
    for goal in goals:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[goal["met"]]
        print(f"goal: {goal['goal']}: {goal['shown']} -> {verdict}")
    print()
    print(f"Notes: {FOOTNOTE[args.device]} {NOTES}")
    if args.device == "cuda" and args.peak is None:
        print(f"MFU n/a: the dense bf16 peak of '{info['device']}' is unknown; pass "
              "--peak-tflops.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["pythia-160m", "pythia-1b"],
                        help="Pythia presets, or 'tiny' (2 layers, hidden 64, vocab 512, seq 64)")
    parser.add_argument("--runners", nargs="+", choices=list(RUNNERS), default=list(RUNNERS))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: bf16 and the memory search; cpu: fp32 smoke test")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="sequence length (default 2048; 64 for tiny)")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="force this micro-batch for every runner (no memory search)")
    parser.add_argument("--max-micro-batch", type=int, default=None,
                        help="largest micro-batch the search tries (default: the preset's, "
                             "32 for pythia-160m, 16 for pythia-1b)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="measured iterations (default 8; 3 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up iterations dropped (default 3; 2 on the CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak TFLOP/s of the device (default: the project's "
                             "table, e.g. 989 for an H100 SXM / H200)")
    parser.add_argument("--output", type=Path, default=ROOT / "runs/gpu_throughput/results.json",
                        help="JSON written at the end (directories are created)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="run logs and metrics (default: the --output directory)")
    parser.add_argument("--run-timeout", type=float, default=600.0,
                        help="seconds one child process may run")
    # Worker entry points (the subprocesses this script starts).
    parser.add_argument("--worker", choices=["hf", "info"], help=argparse.SUPPRESS)
    parser.add_argument("--hf-config", help=argparse.SUPPRESS)
    parser.add_argument("--hf-methods", help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--candidates", type=lambda s: [int(c) for c in s.split(",")],
                        help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.warmup = args.warmup if args.warmup is not None else (2 if cpu else 3)
    args.iterations = args.iterations if args.iterations is not None else (3 if cpu else 8)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "hf":
        return hf_worker(args)
    if args.worker == "info":
        return info_worker(args)
    args.seq_for = lambda shape: args.seq_length or (64 if shape == "tiny" else 2048)
    args.output = args.output.resolve()
    args.work_dir = (args.work_dir or args.output.parent).resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = args.info = device_info(args)
    args.peak = args.peak_tflops or info.get("peak_bf16_tflops")
    if args.device == "cuda" and args.peak is None:
        print(f"unknown dense bf16 peak for '{info['device']}': pass --peak-tflops (MFU n/a)")
    print(f"{info['device']}: {len(args.shapes)} shape(s) x {len(args.runners)} runners", flush=True)
    rows: list[dict[str, Any]] = []
    ratios: dict[str, dict[str, Any]] = {}
    for shape in args.shapes:
        print(f"  {shape} (seq {args.seq_for(shape)})", flush=True)
        shape_rows = bench_shape(args, shape, args.peak)
        rows += shape_rows
        ratios[shape] = shape_ratios(shape_rows)
    goals = evaluate_goals(rows, ratios, info)
    print_report(rows, ratios, goals, info, args)
    elapsed = time.perf_counter() - started
    report = {"device": info, "peak_bf16_tflops": args.peak,
              "dtype": "bf16" if args.device == "cuda" else "fp32",
              "warmup": args.warmup, "iterations": args.iterations,
              "command": [sys.executable, *sys.argv], "seconds": elapsed,
              "results": rows, "ratios": ratios, "goals": goals,
              "notes": f"{FOOTNOTE[args.device]} {NOTES}"}
    args.output.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.output} ({elapsed:.0f}s)")
    return 0


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    sys.exit(main())

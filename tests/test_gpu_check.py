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

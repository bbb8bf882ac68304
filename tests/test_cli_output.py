"""What a user sees: no notices about optional GPU libraries, the project's own warnings kept,
and the README's demo commands pointing at what `make demo` writes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTICES = ("Transformer Engine and Apex are not installed", "Apex is not installed",
           "full scope is deprecated", "Unable to save MockGPTDataset indexes")


def test_a_run_prints_no_optional_library_notices_but_keeps_its_own_warnings(tmp_path):
    empty = tmp_path / "empty_checkpoint_dir"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "pretrain.py"), "--model", "tiny", "--mock-data",
         "--device", "cpu", "--train-iters", "1", "--eval-iters", "1", "--eval-interval", "1",
         "--num-workers", "0", "--micro-batch-size", "2", "--global-batch-size", "2",
         "--load", str(empty)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for notice in NOTICES:
        assert notice not in output
    assert "holds no checkpoint yet" in output  # the project's own warning
    other = subprocess.run(
        [sys.executable, "-c", "import warnings, megatron_latent, megatron.core.optimizer; "
         "warnings.warn('a warning nobody expected')"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "a warning nobody expected" in other.stderr
    assert not any(notice in other.stderr for notice in NOTICES)


def test_readme_demo_commands_use_the_paths_make_demo_writes():
    """The README's step-by-step data commands write where examples/demo.py writes, so its
    inspect command works on a finished demo's data."""
    readme = (ROOT / "README.md").read_text()
    demo = (ROOT / "examples" / "demo.py").read_text()
    output_dir = re.search(r'"--output-dir", default="([^"]+)"', demo).group(1)
    data = f"{output_dir}/data"
    # What demo.py writes under <output-dir>/data.
    assert '"--output-prefix", data / split' in demo
    assert '"--output-prefix", data / "tokenizer"' in demo
    block = readme[readme.index("tools/prepare_demo_corpus.py --output-dir"):]
    block = block[:block.index("```")]
    assert f"prepare_demo_corpus.py --output-dir {data}" in block
    assert f"--output-prefix {data}/tokenizer" in block
    assert f"--output-prefix {data}/$split" in block
    assert f"inspect_dataset.py {data}/valid_text_document" in block
    assert f"--tokenizer-model {data}/tokenizer.model" in block


def test_demo_summary_shows_flops_spent_and_seed_spread(capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    import demo

    def result(name, valid, flops_per_token):
        return {"run": name, "iterations": 300, "tokens": 1000, "first_loss": 7.0,
                "last_loss": 4.5, "valid_loss": valid, "valid_ppl": 2.0, "tokens_per_s": 1.0,
                "flops_per_token": flops_per_token, "flops": 1000 * flops_per_token}

    demo.print_summary([result("vanilla", 4.80, 2e6), result("vanilla seed 2", 4.83, 2e6),
                        result("pondering k=3", 4.79, 1.2e7)])
    out = capsys.readouterr().out
    assert "2.00e+09 ( 1.0x)" in out and "1.20e+10 ( 6.0x)" in out
    assert "differ by 0.0300" in out
    assert "-0.0100 in validation loss, for 6.0x the training FLOPs" in out

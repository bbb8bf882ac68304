"""Stop signals on the launch path: examples/common.sh's launch() under the real torchrun (two
CPU processes, gloo) saves a checkpoint and exits 0 on SIGTERM, whether the signal reaches the
launcher shell only or every process at once (as Slurm delivers it), also when it arrives
during set-up; the run resumes from that checkpoint. examples/slurm/pretrain.sbatch, under
stand-in srun/scontrol, turns Slurm's USR1 warning into a save and a requeue. pretrain.py keeps
a signal that arrives before the training loop."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_latent.training import checkpointing
from megatron_latent.training.trainer import StopSignal

from training_fixtures import write_token_dataset, write_wordlevel_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="reads the process tree from /proc (Linux)")

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "32", "--vocab-size", "512", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--train-iters", "100000", "--log-interval", "1",
        "--eval-iters", "0", "--num-workers", "0", "--split", "90,10,0", "--device", "cpu"]
# What torchrun's agent prints when it handles a death signal itself.
TORCHRUN_SHUTDOWN = ("death signal", "closing signal", "SignalException", "got signal",
                     "ChildFailedError")
ITERATION = re.compile(r"iteration\s+(\d+)/")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    return (write_token_dataset(str(base / "tokens")),
            write_wordlevel_tokenizer(str(base / "tokenizer")))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(corpus, checkpoint: Path, **extra: str) -> dict[str, str]:
    """The environment examples/common.sh reads, for a 2-process CPU launch."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "EXTRA_ARGS")}
    env.update(PATH=f"{VENV_BIN}:/usr/bin:/bin", DATA_PATH=corpus[0], TOKENIZER_MODEL=corpus[1],
               CHECKPOINT_PATH=str(checkpoint), GPUS_PER_NODE="2", PRECISION="",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def catches(pid: int, sig: int) -> bool:
    """Whether ``pid`` has a handler installed for ``sig`` (SigCgt in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(mask >> (sig - 1) & 1)


def torch_loaded(pid: int) -> bool:
    """Whether torch's library is mapped into ``pid`` (its import has begun)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


class Running:
    """A process started in its own session whose output is collected by a thread."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path):
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                                        start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, condition, what: str, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert self.process.poll() is None, f"exited before {what}:\n{self.output}"
            assert time.time() < deadline, f"no {what} after {timeout}s:\n{self.output}"
            time.sleep(0.1)

    def logged_iterations(self) -> list[int]:
        return [int(m.group(1)) for m in ITERATION.finditer(self.output)]

    def finish(self, timeout: float = 180) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {timeout}s after the signal:\n{self.output}")
        self.reader.join(timeout=10)
        return code

    def kill(self) -> None:
        for pid in process_tree(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_launch(corpus, checkpoint: Path, tmp_path: Path, *flags: str) -> Running:
    """`launch` from examples/common.sh, called as an example script calls it, with the tiny
    model's flags (and ``flags`` after them)."""
    command = ["bash", "-c", 'source "$0"; launch "$@"', str(ROOT / "examples" / "common.sh"),
               *TINY, *flags]
    return Running(command, launch_env(corpus, checkpoint), tmp_path)


def assert_clean_stop(run: Running, code: int, checkpoint: Path) -> int:
    """Exit 0, a checkpoint, and neither a traceback nor torchrun's shutdown messages."""
    output = run.output
    assert code == 0, output
    assert "Traceback" not in output, output
    for message in TORCHRUN_SHUTDOWN:
        assert message not in output, output
    saved = checkpointing.read_tracker(str(checkpoint))
    assert saved is not None and saved >= 1, output
    assert f"done: signal at iteration {saved}" in output, output
    return saved


def assert_resumes(corpus, checkpoint: Path, tmp_path: Path, saved: int) -> None:
    """A rerun with the same --load continues at the saved iteration."""
    run = start_launch(corpus, checkpoint, tmp_path, "--train-iters", str(saved + 2))
    try:
        code = run.finish(timeout=240)
    finally:
        run.kill()
    assert code == 0, run.output
    assert run.logged_iterations() == [saved + 1, saved + 2], run.output
    assert checkpointing.read_tracker(str(checkpoint)) == saved + 2


def workers_of(run: Running) -> list[int]:
    return process_tree(run.process.pid)[2:]


def test_sigterm_to_the_launcher_saves_exits_zero_and_resumes(corpus, tmp_path):
    checkpoint = tmp_path / "ckpt"
    run = start_launch(corpus, checkpoint, tmp_path)
    try:
        run.wait_until(lambda: len(run.logged_iterations()) >= 3, "three training iterations")
        run.process.send_signal(signal.SIGTERM)
        saved = assert_clean_stop(run, run.finish(), checkpoint)
    finally:
        run.kill()
    assert saved >= 3
    assert_resumes(corpus, checkpoint, tmp_path, saved)


def test_sigterm_to_every_process_at_once_saves_exits_zero_and_resumes(corpus, tmp_path):
    """Slurm (scancel --signal=TERM, preemption) signals the launcher shell, torchrun and the
    trainers together."""
    checkpoint = tmp_path / "ckpt"
    run = start_launch(corpus, checkpoint, tmp_path)
    try:
        run.wait_until(lambda: len(run.logged_iterations()) >= 3, "three training iterations")
        tree = process_tree(run.process.pid)
        assert len(tree) == 4, tree  # launcher shell, torchrun, two trainers
        for pid in tree:
            os.kill(pid, signal.SIGTERM)
        saved = assert_clean_stop(run, run.finish(), checkpoint)
    finally:
        run.kill()
    assert saved >= 3
    assert_resumes(corpus, checkpoint, tmp_path, saved)


def test_sigterm_during_set_up_stops_at_the_first_iteration(corpus, tmp_path):
    """The trainers start with TERM ignored (inherited from torchrun's subshell); a signal that
    reaches them while they import and set up is kept and honoured after one iteration."""
    checkpoint = tmp_path / "ckpt"
    run = start_launch(corpus, checkpoint, tmp_path)
    try:
        run.wait_until(lambda: len(workers_of(run)) == 2
                       and all(catches(pid, signal.SIGTERM) for pid in workers_of(run)),
                       "two trainers with their handler", timeout=180)
        assert "> engine:" not in run.output  # set-up not finished
        run.process.send_signal(signal.SIGTERM)
        saved = assert_clean_stop(run, run.finish(), checkpoint)
    finally:
        run.kill()
    assert saved == 1 and run.logged_iterations() == [1], run.output


def test_slurm_usr1_warning_saves_and_requeues(corpus, tmp_path):
    """The sbatch script with a stand-in srun (runs the task here and forwards signals to every
    process of it, as slurmstepd does) and scontrol (records the requeue): USR1 to the batch
    shell, as --signal=B:USR1@300 sends it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeued = tmp_path / "requeued"
    checkpoint = tmp_path / "ckpt"
    tracker = checkpoint / checkpointing.TRACKER_FILE
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        'while [[ "$1" == --* ]]; do shift; done\n'
        "export SLURM_NODEID=0\n"
        'tree() { local child; echo "$1"; for child in $(pgrep -P "$1"); do tree "$child"; done; }\n'
        '"$@" &\n'
        "task=$!\n"
        """trap 'kill -s USR1 $(tree "$task") 2>/dev/null' USR1\n"""
        """trap 'kill -s KILL $(tree "$task") 2>/dev/null' TERM\n"""  # what srun does on TERM
        'while kill -0 "$task" 2>/dev/null; do wait "$task"; done\n'
        'wait "$task"\n')
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  show) echo localhost ;;\n"
        f'  requeue) echo "$2 $(cat {tracker} 2>/dev/null)" >> {requeued} ;;\n'
        "  *) exit 1 ;;\n"
        "esac\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    # An example script like examples/pretrain_*.sh, whose recipe is the tiny CPU model (theirs
    # name the distributed optimizer, which needs the CUDA engine).
    script = tmp_path / "pretrain_tiny.sh"
    script.write_text("set -euo pipefail\n"
                      f"source {ROOT / 'examples' / 'common.sh'}\n"
                      "require_env DATA_PATH TOKENIZER_MODEL CHECKPOINT_PATH\n"
                      f"launch {' '.join(TINY)} \"$@\"\n")
    env = launch_env(corpus, checkpoint, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[1]",
                     SLURM_NNODES="1")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    command = ["bash", str(ROOT / "examples" / "slurm" / "pretrain.sbatch"), str(script),
               "--log-interval", "1"]
    run = Running(command, env, tmp_path)
    try:
        run.wait_until(lambda: len(run.logged_iterations()) >= 3, "three training iterations")
        assert not requeued.exists()
        run.process.send_signal(signal.SIGUSR1)
        saved = assert_clean_stop(run, run.finish(), checkpoint)
    finally:
        run.kill()
    assert saved >= 3
    # Requeued once, for this job, after the checkpoint was written.
    assert requeued.read_text().split() == ["4242", str(saved)], run.output


def load_pretrain_module():
    spec = importlib.util.spec_from_file_location("pretrain_entry", ROOT / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_signal_before_the_loop_is_handed_to_stop_signal():
    pretrain = load_pretrain_module()
    original = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        startup = pretrain.StartupSignals().install()
        assert StopSignal(enabled=True).received is None  # nothing arrived yet
        startup.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert startup.received == signal.SIGUSR1
        stop = StopSignal(enabled=True)
        assert stop.received == signal.SIGUSR1
        stop.restore()
        assert signal.getsignal(signal.SIGTERM) is startup
        assert StopSignal(enabled=False).received is None
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("disabled", [False, True])
def test_plain_pretrain_keeps_a_signal_from_its_first_moment(corpus, tmp_path, disabled):
    """`python pretrain.py` signalled while it sets up (torch loaded, no engine yet): it saves
    after one iteration and exits 0, whatever more copies of the signal arrive while it exits;
    with --no-exit-signal-handler it dies of the signal."""
    checkpoint = tmp_path / "ckpt"
    command = [sys.executable, str(ROOT / "pretrain.py"), *TINY, "--data-path", corpus[0],
               "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", corpus[1],
               "--save", str(checkpoint)] + (["--no-exit-signal-handler"] if disabled else [])
    env = launch_env(corpus, checkpoint)
    run = Running(command, env, tmp_path)
    try:
        run.wait_until(lambda: torch_loaded(run.process.pid), "torch loaded", timeout=120)
        assert "> engine:" not in run.output  # set-up not finished
        run.process.send_signal(signal.SIGTERM)
        if not disabled:
            # More copies while it exits (Slurm's and the launcher's): still a clean exit.
            run.wait_until(lambda: "done: signal" in run.output, "the end of the run")
            while run.process.poll() is None:
                run.process.send_signal(signal.SIGTERM)
                time.sleep(0.005)
        code = run.finish()
    finally:
        run.kill()
    if disabled:
        assert code == -signal.SIGTERM, run.output
        assert checkpointing.read_tracker(str(checkpoint)) is None
    else:
        assert code == 0, run.output
        assert "done: signal at iteration 1" in run.output
        assert checkpointing.read_tracker(str(checkpoint)) == 1

"""One writer per checkpoint directory.

Two runs saving into one `--save` directory overwrite each other's checkpoints, delete each
other's in-progress saves and interleave their `metrics.jsonl`. The first run takes an
exclusive lock on `<save>/.writer.lock` (fcntl.flock: released by the kernel when the process
dies, so a run killed with SIGKILL never leaves a stale lock) and writes who holds it there;
a second run is refused with that description before it builds anything.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

from ..config import ConfigError

LOCK_FILE = ".writer.lock"


def _holder() -> dict[str, Any]:
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv),
    }
    if os.environ.get("SLURM_JOB_ID"):
        holder["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return holder


def describe_holder(text: str) -> str:
    """One line naming the run that holds a lock, from the lock file's contents."""
    try:
        holder = json.loads(text)
    except ValueError:
        return "a run that left no description"
    parts = [f"pid {holder.get('pid')} on {holder.get('host')}",
             f"started {holder.get('started')}"]
    if holder.get("slurm_job_id"):
        parts.append(f"Slurm job {holder['slurm_job_id']}")
    if holder.get("command"):
        parts.append(f"command: {holder['command']}")
    return ", ".join(parts)


class SaveDirectoryLock:
    """The exclusive writer lock of a checkpoint directory (held by global rank 0)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self._handle = None

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the run that holds it. Filesystems without
        lock support are let through with a warning (nothing can be checked there)."""
        import fcntl

        os.makedirs(self.directory, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = describe_holder(handle.read())
            handle.close()
            raise ConfigError(
                f"--save {self.directory} is being written by another run ({holder}); two "
                "runs in one checkpoint directory overwrite each other's checkpoints and mix "
                "their metrics. Stop that run, wait for it, or choose another --save.") from None
        except OSError as error:  # e.g. a network filesystem mounted without lock support
            print(f"WARNING: cannot lock {self.path} ({error}); a second run writing to "
                  f"{self.directory} would not be detected", file=sys.stderr)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_holder()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Give the lock up (also happens when the process exits)."""
        if self._handle is None:
            return
        import fcntl

        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        finally:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> SaveDirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_save_directory(directory: str | None) -> SaveDirectoryLock | None:
    """Every rank calls this: global rank 0 takes `directory`'s writer lock and all ranks
    raise the same ConfigError when another run holds it (None without a directory)."""
    import torch.distributed as dist

    if not directory:
        return None
    lock, refusal = None, None
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        lock = SaveDirectoryLock(directory)
        try:
            lock.acquire()
        except ConfigError as error:
            lock, refusal = None, str(error)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        raise ConfigError(refusal)
    return lock

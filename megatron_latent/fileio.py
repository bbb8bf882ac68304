"""Files that are either complete or absent: written beside their final name, then renamed."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable


def fsync_directory(path: str) -> None:
    """Make a rename or removal inside `path` durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """Call `write(temporary path)`, fsync that file and os.replace it onto `path`: a crash
    leaves the old file or none, never a half-written one (and no temporary file behind).
    `suffix` ends the temporary name (for writers that append an extension otherwise)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    """`atomic_write` of a UTF-8 text file."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)

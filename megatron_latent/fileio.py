"""Files that are either complete or absent: written beside their final name, then renamed."""

from __future__ import annotations

import os
import uuid


def atomic_write_text(path: str, text: str) -> None:
    """Write `path` through a temporary file, fsync and os.replace: a crash leaves the old
    file or none, never a half-written one (and no temporary file behind)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

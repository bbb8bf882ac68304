"""Resumable pipeline stages (the EM driver, the fidelity benchmarks): a stage is a folder whose
`stage.json` holds the key of what produced it (a hash of its command and of the keys of the
stages it reads) and its result. A finished stage with the same key is reused; a stage begun
with the same key keeps its work (the tool it runs resumes); another key starts it over."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any


def key_of(*parts: Any) -> str:
    """A short fingerprint of a stage's command and the keys of the stages it reads."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def stage_done(folder: Path, key: str) -> dict | None:
    """The stored result of a finished stage with this key, else None."""
    saved = folder / "stage.json"
    if saved.exists():
        previous = json.loads(saved.read_text())
        if previous.get("key") == key:
            return previous.get("result", {})
    return None


def stage_store(folder: Path, key: str, result: dict, **details: Any) -> None:
    """Mark the stage finished: `stage.json` with the key, `details` (e.g. its command or
    inputs) and the result, written whole (temporary file + rename)."""
    partial = folder / "stage.json.partial"
    partial.write_text(json.dumps({"key": key, **details, "result": result}, indent=1))
    partial.replace(folder / "stage.json")


def stage_begin(folder: Path, key: str) -> None:
    """Start (or continue) a stage in `folder`: work left under the same key is kept (the tool
    resumes it); work of another key is removed first."""
    marker = folder / "stage.key"
    if folder.exists() and not (marker.exists() and marker.read_text() == key):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(key)


__all__ = ["key_of", "stage_begin", "stage_done", "stage_store"]

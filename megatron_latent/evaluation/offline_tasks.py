"""Offline lm-eval tasks made from the demo corpus's held-out plays (no Hub access).

Three tasks, each a JSONL file plus an lm-eval task YAML that reads it through ``dataset_path:
json`` with an absolute ``data_files`` path, so the output directory works as lm-eval's
``--include_path`` / ``TaskManager(include_path=...)`` with ``HF_DATASETS_OFFLINE=1``:

- ``demo_next_line`` (multiple choice): a few lines of a scene; the true next line among 3
  distractor lines from elsewhere in the held-out plays; gold at a seeded position.
- ``demo_cloze`` (loglikelihood, like ``lambada_openai``): a passage ending in a line without
  its last word; the target is ``" " + word``; metrics ``acc`` (greedy) and ``perplexity``.
- ``demo_wikitext_style`` (loglikelihood_rolling, like ``wikitext``): whole scenes (cut at a
  line boundary), metrics ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte``.

The held-out text is the validation split of ``tools/prepare_demo_corpus.py`` (and so of
``make demo``): :func:`megatron_latent.data.demo_corpus.split_plays` with the same defaults,
or any JSONL of documents with a ``"text"`` field. Everything is determined by the seed.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..data.demo_corpus import find_plays, play_documents, split_plays
from ..fileio import atomic_write_text

DEFAULT_VALID_PLAYS = 2  # tools/prepare_demo_corpus.py's defaults, which make demo uses
DEFAULT_SPLIT_SEED = 1234
TAG = "demo_offline"
TASKS = ("demo_next_line", "demo_cloze", "demo_wikitext_style")

_LAST_WORD = re.compile(r"(?<= )([A-Za-z]+(?:['-][A-Za-z]+)*)[^A-Za-z0-9]*$")


@dataclass(frozen=True)
class SourceDocument:
    """One held-out document (a scene) and where it comes from."""

    id: str
    text: str


@dataclass(frozen=True)
class TaskOptions:
    """Sizes and seeds of the generated tasks."""

    num_docs: int = 100
    seed: int = 1234
    context_lines: int = 4
    num_distractors: int = 3
    cloze_context_lines: int = 3
    num_rolling_docs: int = 4
    rolling_max_chars: int = 4000


def validation_documents(valid_plays: int = DEFAULT_VALID_PLAYS,
                         split_seed: int = DEFAULT_SPLIT_SEED) -> list[SourceDocument]:
    """The scenes of the demo corpus's validation plays, split exactly as the demo splits."""
    _, valid = split_plays(find_plays(), valid_plays, split_seed)
    return [SourceDocument(d.id, d.text) for play in valid for d in play_documents(play)]


def read_documents(path: str, text_key: str = "text") -> list[SourceDocument]:
    """Documents from a JSONL file (e.g. ``demo_output/data/shakespeare_valid.jsonl``)."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                docs.append(SourceDocument(str(record.get("id", f"{path}:{number}")),
                                           record[text_key]))
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def classify_lines(text: str) -> list[tuple[str, str]]:
    """``(line, kind)`` for each line of a rendered scene; kind is ``header`` (the title and
    act/scene headings before the first blank line), ``blank``, ``speaker`` (a ``NAME:`` line
    opening a paragraph), ``direction`` (``[...]``, possibly over several lines) or ``spoken``."""
    out: list[tuple[str, str]] = []
    in_header, in_direction, previous_blank = True, False, True
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped:
            kind, in_header = "blank", False
        elif in_header:
            kind = "header"
        elif in_direction or stripped.startswith("["):
            kind = "direction"
            in_direction = "]" not in stripped
        elif previous_blank and stripped.endswith(":") and len(stripped.split()) <= 5:
            kind = "speaker"
        else:
            kind = "spoken"
        previous_blank = kind == "blank"
        out.append((line, kind))
    return out


def _good_line(line: str) -> bool:
    return len(line.split()) >= 3 and any(c.isalpha() for c in line)


def _context_start(kinds: Sequence[str], index: int, lines_wanted: int) -> int | None:
    """First line index of a context holding ``lines_wanted`` non-blank body lines before
    ``index``; ``None`` if the scene body has too few."""
    count, start = 0, index
    while start > 0 and count < lines_wanted:
        start -= 1
        if kinds[start] == "header":
            return None
        if kinds[start] != "blank":
            count += 1
    while start < index and kinds[start] == "blank":
        start += 1
    return start if count == lines_wanted else None


def _rng(seed: int, task: str) -> random.Random:
    return random.Random(f"{seed}/{task}")


def next_line_docs(docs: Sequence[SourceDocument], options: TaskOptions) -> list[dict]:
    """``demo_next_line`` records: ``context``, ``choices``, ``gold`` (and where they come from)."""
    rng = _rng(options.seed, "demo_next_line")
    candidates: list[tuple[int, int, int]] = []  # (document, context start, line)
    pool: list[tuple[int, int, str]] = []  # distractor lines: (document, line, text)
    parsed = [classify_lines(d.text) for d in docs]
    for k, lines in enumerate(parsed):
        kinds = [kind for _, kind in lines]
        for i, (line, kind) in enumerate(lines):
            if kind != "spoken" or not _good_line(line):
                continue
            pool.append((k, i, line))
            start = _context_start(kinds, i, options.context_lines)
            if start is not None:
                candidates.append((k, start, i))
    chosen = rng.sample(candidates, min(options.num_docs, len(candidates)))
    records = []
    for k, start, i in chosen:
        lines = [line for line, _ in parsed[k]]
        gold_line = lines[i]
        distractors: list[str] = []
        for _ in range(1000 * options.num_distractors):
            if len(distractors) == options.num_distractors:
                break
            dk, di, text = pool[rng.randrange(len(pool))]
            nearby = dk == k and start <= di <= i + 1
            if nearby or text == gold_line or text in distractors:
                continue
            distractors.append(text)
        if len(distractors) < options.num_distractors:
            raise ValueError(f"too few distinct lines for {options.num_distractors} distractors")
        gold = rng.randrange(options.num_distractors + 1)
        choices = distractors[:gold] + [gold_line] + distractors[gold:]
        records.append({"id": f"{docs[k].id}#L{i}", "source": docs[k].id, "line": i,
                        "context": "\n".join(lines[start:i]) + "\n", "choices": choices,
                        "gold": gold})
    return records


def cloze_docs(docs: Sequence[SourceDocument], options: TaskOptions) -> list[dict]:
    """``demo_cloze`` records: ``context`` (a passage ending in a line less its last word),
    ``target`` (``" " + word``) and ``word``."""
    rng = _rng(options.seed, "demo_cloze")
    candidates = []
    parsed = [classify_lines(d.text) for d in docs]
    for k, lines in enumerate(parsed):
        kinds = [kind for _, kind in lines]
        for i, (line, kind) in enumerate(lines):
            match = _LAST_WORD.search(line) if kind == "spoken" and _good_line(line) else None
            start = _context_start(kinds, i, options.cloze_context_lines) if match else None
            if start is not None:
                candidates.append((k, start, i, match.start(1)))
    chosen = rng.sample(candidates, min(options.num_docs, len(candidates)))
    records = []
    for k, start, i, cut in chosen:
        lines = [line for line, _ in parsed[k]]
        word = _LAST_WORD.search(lines[i]).group(1)
        passage = "\n".join(lines[start:i] + [lines[i][: cut - 1]])
        records.append({"id": f"{docs[k].id}#L{i}", "source": docs[k].id, "line": i,
                        "context": passage, "target": " " + word, "word": word})
    return records


def rolling_docs(docs: Sequence[SourceDocument], options: TaskOptions) -> list[dict]:
    """``demo_wikitext_style`` records: whole scenes, cut at a line boundary to at most
    ``rolling_max_chars`` characters (0: uncut)."""
    rng = _rng(options.seed, "demo_wikitext_style")
    chosen = sorted(rng.sample(range(len(docs)), min(options.num_rolling_docs, len(docs))))
    records = []
    for k in chosen:
        text = docs[k].text
        if options.rolling_max_chars and len(text) > options.rolling_max_chars:
            cut = text.rfind("\n", 0, options.rolling_max_chars + 1)
            text = text[: cut if cut > 0 else options.rolling_max_chars].rstrip()
        records.append({"id": docs[k].id, "source": docs[k].id, "text": text})
    return records


def task_configs(paths: dict[str, str]) -> dict[str, dict]:
    """lm-eval task configurations reading the JSONL files at ``paths`` (absolute)."""
    def base(name: str) -> dict:
        return {"task": name, "tag": [TAG], "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": os.path.abspath(paths[name])}},
                "test_split": "test"}

    return {
        "demo_next_line": {
            **base("demo_next_line"), "output_type": "multiple_choice",
            "doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "gold",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean",
                             "higher_is_better": True}],
            "metadata": {"version": 1.0}},
        "demo_cloze": {
            **base("demo_cloze"), "output_type": "loglikelihood",
            "doc_to_text": "context", "doc_to_target": "target",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity",
                             "higher_is_better": False},
                            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}},
        "demo_wikitext_style": {
            **base("demo_wikitext_style"), "output_type": "loglikelihood_rolling",
            "doc_to_text": "", "doc_to_target": "text",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                            {"metric": "bits_per_byte"}],
            "metadata": {"version": 1.0}},
    }


def _readme(options: TaskOptions, source: str, docs: Sequence[SourceDocument],
            counts: dict[str, int]) -> str:
    plays = sorted({d.id.split("/")[0] for d in docs})
    return f"""# Offline evaluation tasks

Made by `tools/make_eval_tasks.py` (megatron_latent/evaluation/offline_tasks.py) from
{source}: {len(docs)} documents ({", ".join(plays)}). Seed {options.seed}; the same
arguments always give the same files. Every YAML reads its JSONL by absolute path
(`dataset_path: json`), so no network is needed; move the directory by re-running the tool.

| task | output type | documents | how |
|---|---|---|---|
| demo_next_line | multiple_choice | {counts["demo_next_line"]} | context: {options.context_lines} non-blank lines of a scene (speaker names and stage directions included); choices: the true next spoken line and {options.num_distractors} spoken lines from elsewhere in these plays (other text, not from the same passage), gold at a seeded position; metrics acc, acc_norm |
| demo_cloze | loglikelihood | {counts["demo_cloze"]} | a passage of {options.cloze_context_lines} lines plus a spoken line cut before its last word (punctuation after the word dropped); target " " + word, as lambada_openai; metrics acc (greedy), perplexity |
| demo_wikitext_style | loglikelihood_rolling | {counts["demo_wikitext_style"]} | whole scenes cut at a line boundary to at most {options.rolling_max_chars or "any number of"} characters, as wikitext; metrics word_perplexity, byte_perplexity, bits_per_byte |

All three carry the tag `{TAG}`. Run them with

```bash
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf --model_args pretrained=MODEL_DIR \\
    --include_path THIS_DIR --tasks {TAG}
```

or in Python with `lm_eval.tasks.TaskManager(include_path=THIS_DIR)`.
"""


def write_tasks(output_dir: str, options: TaskOptions | None = None,
                docs: Sequence[SourceDocument] | None = None,
                source: str | None = None) -> dict[str, str]:
    """Write the three tasks (JSONL + YAML) and a README.md into ``output_dir``; returns
    ``{task: yaml path}``. ``docs`` defaults to the demo corpus's validation scenes."""
    import yaml

    options = options or TaskOptions()
    if options.num_docs < 1 or options.num_distractors < 1:
        raise ValueError("num_docs and num_distractors must be at least 1")
    if docs is None:
        docs = validation_documents()
        source = source or (f"the demo corpus's validation plays (split_plays with "
                            f"{DEFAULT_VALID_PLAYS} plays, seed {DEFAULT_SPLIT_SEED}, as "
                            f"`make demo`)")
    records = {"demo_next_line": next_line_docs(docs, options),
               "demo_cloze": cloze_docs(docs, options),
               "demo_wikitext_style": rolling_docs(docs, options)}
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    data_paths = {name: os.path.join(output_dir, f"{name}.jsonl") for name in TASKS}
    for name, rows in records.items():
        if not rows:
            raise ValueError(f"{name}: the documents give no examples")
        atomic_write_text(data_paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                for r in rows))
    yaml_paths = {}
    for name, config in task_configs(data_paths).items():
        yaml_paths[name] = os.path.join(output_dir, f"{name}.yaml")
        atomic_write_text(yaml_paths[name], yaml.safe_dump(config, sort_keys=False,
                                                       allow_unicode=True))
    counts = {name: len(rows) for name, rows in records.items()}
    atomic_write_text(os.path.join(output_dir, "README.md"),
                  _readme(options, source or "the given documents", docs, counts))
    return yaml_paths


# -- local copies of lm-eval's standard tasks ---------------------------------------------------

def find_standard_task_yaml(name: str) -> str:
    """The YAML of one of lm-eval's bundled tasks (a file whose ``task:`` is ``name``)."""
    import glob

    import lm_eval

    pattern = re.compile(rf"^task:\s*['\"]?{re.escape(name)}['\"]?\s*$", re.MULTILINE)
    root = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    for path in sorted(glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            if pattern.search(f.read()):
                return path
    raise ValueError(f"lm-eval {lm_eval.__version__} bundles no task named {name!r}")


def standard_task_config(name: str, data_path: str, suffix: str = "_local") -> dict:
    """A task YAML that includes lm-eval's own ``name`` task (prompt, choices, metrics,
    ``process_docs``) and reads its documents from ``data_path``, a local JSONL in the Hub
    dataset's own fields (e.g. HellaSwag's ``ctx_a``, ``endings``, ``label``)."""
    return {"include": find_standard_task_yaml(name), "task": name + suffix, "tag": ["local"],
            "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": os.path.abspath(data_path)}},
            "training_split": None, "validation_split": None, "fewshot_split": None,
            "test_split": "test"}


def write_standard_tasks(output_dir: str, tasks: dict[str, str], suffix: str = "_local"
                         ) -> dict[str, str]:
    """Write :func:`standard_task_config` YAMLs for ``{task name: JSONL path}``; returns
    ``{new task name: yaml path}``."""
    import yaml

    os.makedirs(output_dir, exist_ok=True)
    written = {}
    for name, data_path in tasks.items():
        if not os.path.isfile(data_path):
            raise ValueError(f"{name}: no file {data_path}")
        config = standard_task_config(name, data_path, suffix)
        path = os.path.join(os.path.abspath(output_dir), f"{config['task']}.yaml")
        atomic_write_text(path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        written[config["task"]] = path
    return written

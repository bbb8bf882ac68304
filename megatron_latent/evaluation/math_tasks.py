"""GSM8K / MATH chain-of-thought generation tasks from local JSONL files, as a baseline and as a
latent-thought variant (BoLT's evaluation; docs/evaluation.md, "Latent-thought models").

Input: a local copy of a test split in its standard JSONL layout: GSM8K
(``{"question", "answer"}``, the answer ending in ``#### N``) or MATH / MATH-500
(``{"problem", "solution"}``, the answer in the solution's last ``\\boxed{}``; an ``answer``
field, as MATH-500 has, is used when present). For each style two tasks are written:

=========================== ==================== ===========================================
task                        variant              prompt
=========================== ==================== ===========================================
``gsm8k_cot_local``         baseline, 8-shot     ``Question: q\\nAnswer: <reasoning> The
                                                 answer is N.``
``gsm8k_cot_latent``        latent, 8-shot       ``Question: q\\nAnswer:<SoL><PRI><reasoning>
                                                 <EoL> The answer is N.``
``hendrycks_math_cot_local`` baseline, 4-shot    ``Problem: p\\nSolution: <solution> The final
                                                 answer is $\\boxed{A}$.``
``hendrycks_math_cot_latent`` latent, 4-shot     ``Problem: p\\nSolution:<SoL><PRI><solution>
                                                 <EoL> The final answer is $\\boxed{A}$.``
=========================== ==================== ===========================================

The exemplars are lm-eval's own (``gsm8k_cot``'s 8 chain-of-thought exemplars; the Minerva
4-shot MATH exemplars of ``minerva_math``), or the first records of a local file. In a latent
variant each exemplar carries its solution inside a latent, written with the four tokens'
literal names, and its ``generation_kwargs`` hold ``latent_prompt: true``: the
``megatron_latent`` backend turns the names into ids, ends the prompt with the ids
``[SoL, PRI]`` and returns the text after the latent's EoL (lm_backend.py). The baseline
variants are ordinary tasks; with a tokenizer that has the four tokens the backend bans them
in generation by default. Scoring: ``exact_match`` by ``math_answers.process_gsm8k`` /
``process_math`` (GSM8K: the "#### N" / "The answer is N" / last number; MATH: the last
``\\boxed{}``), the module copied next to the YAMLs.

Every JSONL record keeps its original fields and gains ``reasoning`` (the solution without
its final answer line; GSM8K's ``<<...>>`` calculator notes removed), ``gold`` (the
normalised reference answer) and ``final`` (the sentence that states it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence

from ..fileio import atomic_write_text
from ..latent import LATENT_TOKENS
from . import math_answers

STYLES = ("gsm8k", "math")
TAG_LATENT = "latent_math"
TAG_BASELINE = "math_cot_local"
SOL, EOL, PRI = LATENT_TOKENS[0], LATENT_TOKENS[1], LATENT_TOKENS[2]

_PROMPTS = {
    "gsm8k": {"name": "gsm8k_cot", "text": "Question: {{question}}\nAnswer:",
              "until": ["Question:", "\n\n"], "fewshot": 8,
              "process": "math_answers.process_gsm8k"},
    "math": {"name": "hendrycks_math_cot", "text": "Problem: {{problem}}\nSolution:",
             "until": ["Problem:", "\n\n\n"], "fewshot": 4,
             "process": "math_answers.process_math"},
}

#: A tiny built-in sample in each standard layout (hand-written), for tests and the demo.
SAMPLE = {
    "gsm8k": [
        {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
         "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
        {"question": "A box holds 6 pens. How many pens are in 5 boxes?",
         "answer": "5 boxes hold 5 * 6 = <<5*6=30>>30 pens.\n#### 30"},
        {"question": "Sara had $20 and spent $8 on a book. How much money is left?",
         "answer": "She has 20 - 8 = <<20-8=12>>12 dollars left.\n#### 12"},
        {"question": "A farm has 1,200 hens and sells 200. How many hens remain?",
         "answer": "1,200 - 200 = <<1200-200=1000>>1,000 hens remain.\n#### 1000"},
    ],
    "math": [
        {"problem": "What is $2^5$?",
         "solution": "We have $2^5 = 32$, so the answer is $\\boxed{32}$."},
        {"problem": "Simplify $\\frac{6}{8}$.",
         "solution": "Dividing by 2 gives $\\frac{6}{8} = \\boxed{\\frac{3}{4}}$."},
        {"problem": "Solve $x + 3 = 1$ for $x$.",
         "solution": "Subtracting 3 gives $x = \\boxed{-2}$."},
        {"problem": "What is the sum of the interior angles of a triangle, in degrees?",
         "solution": "The angles of a triangle sum to $\\boxed{180}$ degrees."},
    ],
}


def normalize_record(record: dict, style: str) -> dict:
    """The record plus ``reasoning``, ``gold`` and ``final`` (see the module docstring)."""
    if style == "gsm8k":
        if "question" not in record or "answer" not in record:
            raise ValueError('a GSM8K record needs "question" and "answer" (with "#### N")')
        if "####" not in record["answer"]:
            raise ValueError(f'a GSM8K answer ends with "#### N": {record["answer"][-80:]!r}')
        body = record["answer"].split("####")[0]
        reasoning = " ".join(re.sub(r"<<[^>]*>>", "", body).split())
        gold = math_answers.gsm8k_gold(record["answer"])
        final = f"The answer is {gold}."
    elif style == "math":
        if "problem" not in record or "solution" not in record:
            raise ValueError('a MATH record needs "problem" and "solution" (with \\boxed{})')
        reasoning = record["solution"].strip()
        given = record.get("answer")
        gold = (math_answers.normalize_math_answer(str(given)) if given not in (None, "")
                else math_answers.math_gold(reasoning))
        if gold is None:
            raise ValueError(f"a MATH solution without \\boxed{{}}: {reasoning[-80:]!r}")
        stated = str(given) if given not in (None, "") else \
            math_answers.extract_math_answer(reasoning)
        final = f"The final answer is $\\boxed{{{stated}}}$."
    else:
        raise ValueError(f"style {style!r}: use one of {', '.join(STYLES)}")
    return {**record, "reasoning": reasoning, "gold": gold, "final": final}


def read_records(path: str, style: str, limit: int | None = None) -> list[dict]:
    """Normalised records of a local JSONL file in the style's standard layout."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(normalize_record(json.loads(line), style))
            except (ValueError, KeyError) as err:
                raise ValueError(f"{path}:{number}: {err}") from None
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def default_exemplars(style: str) -> list[dict]:
    """lm-eval 0.4's own exemplars: gsm8k_cot's 8 (Wei et al.), minerva_math's 4."""
    if style == "gsm8k":
        import yaml

        from .offline_tasks import find_standard_task_yaml

        with open(find_standard_task_yaml("gsm8k_cot"), encoding="utf-8") as handle:
            text = re.sub(r"!function \S+", "null", handle.read())
        samples = yaml.safe_load(text)["fewshot_config"]["samples"]
        out = []
        for sample in samples:
            reasoning, _, tail = sample["target"].rpartition("The answer is")
            gold = math_answers.normalize_number(tail)
            out.append(normalize_record({"question": sample["question"], "answer":
                                         f"{reasoning.strip()}\n#### {gold}"}, style))
        return out
    out = []
    for sample in _minerva_exemplars():
        solution = sample["solution"].split("\nFinal Answer:")[0]
        out.append(normalize_record({"problem": sample["problem"], "solution": solution},
                                    style))
    return out


def _minerva_exemplars() -> list[dict]:
    """``list_fewshot_samples()`` of lm-eval's minerva_math/utils.py, read as a literal (the
    module itself imports sympy, math_verify and antlr4 on import)."""
    import ast

    import lm_eval

    path = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "minerva_math", "utils.py")
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "list_fewshot_samples":
            returns = [n for n in node.body if isinstance(n, ast.Return)]
            if returns:
                return ast.literal_eval(returns[0].value)
    raise ValueError(f"{path}: no list_fewshot_samples() literal; give --math-exemplars")


def task_config(style: str, data_path: str, exemplars: Sequence[dict], latent: bool,
                num_fewshot: int | None = None, max_gen_toks: int | None = None) -> dict:
    """The lm-eval config of one task (without its ``process_results``, which needs a YAML
    tag: :func:`write_math_tasks` appends it)."""
    prompt = _PROMPTS[style]
    if latent:
        target = SOL + PRI + "{{reasoning}}" + EOL + " {{final}}"
    else:
        target = " {{reasoning}} {{final}}"
    fewshot = prompt["fewshot"] if num_fewshot is None else num_fewshot
    keys = ("question", "answer") if style == "gsm8k" else ("problem", "solution")
    samples = [{k: e[k] for k in (*keys, "reasoning", "gold", "final")}
               for e in exemplars[:fewshot]]
    generation = {"until": list(prompt["until"]), "do_sample": False}
    if max_gen_toks:
        generation["max_gen_toks"] = int(max_gen_toks)
    if latent:
        generation["latent_prompt"] = True
    config = {
        "task": f"{prompt['name']}_{'latent' if latent else 'local'}",
        "tag": [TAG_LATENT if latent else TAG_BASELINE],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.abspath(data_path)}},
        "test_split": "test", "output_type": "generate_until",
        "doc_to_text": prompt["text"], "doc_to_target": target,
        "target_delimiter": "", "fewshot_delimiter": "\n\n",
        "num_fewshot": min(fewshot, len(samples)),
        "generation_kwargs": generation,
        "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                         "higher_is_better": True}],
        "metadata": {"version": 1.0, "style": style,
                     "variant": "latent" if latent else "baseline"},
    }
    if samples:
        config["fewshot_config"] = {"sampler": "first_n", "samples": samples}
    else:
        config["num_fewshot"] = 0
    return config


def write_math_tasks(output_dir: str, data: dict[str, str | None],
                     exemplar_files: dict[str, str] | None = None,
                     num_fewshot: int | None = None, max_gen_toks: int | None = None,
                     latent_max_gen_toks: int | None = None) -> dict[str, str]:
    """Write the baseline and latent tasks of each ``{style: JSONL path}`` (``None``: the
    built-in sample) into ``output_dir``: ``{task}.yaml``, ``{style}_test.jsonl`` (normalised
    records) and ``math_answers.py``. Returns ``{task name: yaml path}``."""
    import yaml

    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    shutil.copyfile(math_answers.__file__, os.path.join(output_dir, "math_answers.py"))
    written = {}
    for style, path in data.items():
        if style not in STYLES:
            raise ValueError(f"--math-data {style}=...: use one of {', '.join(STYLES)}")
        if path is None or path == "sample":
            records = [normalize_record(r, style) for r in SAMPLE[style]]
        else:
            if not os.path.isfile(path):
                raise ValueError(f"--math-data {style}: no file {path}")
            records = read_records(path, style)
        exemplar_path = (exemplar_files or {}).get(style)
        exemplars = (read_records(exemplar_path, style) if exemplar_path
                     else default_exemplars(style))
        data_path = os.path.join(output_dir, f"{style}_test.jsonl")
        atomic_write_text(data_path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                             for r in records))
        for latent in (False, True):
            config = task_config(style, data_path, exemplars, latent, num_fewshot,
                                 latent_max_gen_toks if latent and latent_max_gen_toks
                                 else max_gen_toks)
            text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
            text += f"process_results: !function {_PROMPTS[style]['process']}\n"
            yaml_path = os.path.join(output_dir, f"{config['task']}.yaml")
            atomic_write_text(yaml_path, text)
            written[config["task"]] = yaml_path
    return written


__all__ = ["SAMPLE", "STYLES", "default_exemplars", "normalize_record", "read_records",
           "task_config", "write_math_tasks"]

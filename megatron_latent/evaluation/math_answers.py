"""Answer extraction and exact-match scoring of GSM8K- and MATH-style generations.

Standard library only: ``tools/make_eval_tasks.py --math-data`` copies this file next to the
task YAMLs it writes, which name ``process_gsm8k`` / ``process_math`` as their
``process_results`` (``!function math_answers.process_gsm8k``), so the task directory works
with any lm-eval backend.

- GSM8K: the number after ``#### ``, else after the last "The answer is", else the last
  number in the text; commas, ``$`` and a trailing period are dropped and ``18.00`` reads
  ``18``.
- MATH: the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, balanced braces), else
  what follows the last "final answer is"; compared after a light LaTeX normalisation
  (spaces, ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac``, ``\\!``, surrounding ``$``, a
  trailing period, ``^\\circ``, ``\\%``, ``\\text{...}`` wrappers) and, when both are numbers,
  as numbers.

Each ``process_*`` returns ``{"exact_match": 0 or 1}`` against the document's ``gold`` (the
normalised reference answer the generator stored), or the reference derived from the
document's standard fields (GSM8K ``answer`` with ``#### N``, MATH ``solution`` with
``\\boxed{}``).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")
_ANSWER_IS = re.compile(r"[Tt]he (?:final )?answer is[:\s]*", re.IGNORECASE)


def normalize_number(text: str) -> str:
    """``"$1,234.50."`` -> ``"1234.5"``; text that is no number comes back stripped."""
    value = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    try:
        number = float(value)
    except ValueError:
        return text.strip()
    if number == int(number) and abs(number) < 1e15:
        return str(int(number))
    return repr(number).rstrip("0").rstrip(".")


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def extract_gsm8k_answer(text: str) -> str | None:
    """The answer of a GSM8K-style solution or generation (see the module docstring)."""
    if "####" in text:
        number = _last_number(text.split("####")[-1].split("\n")[0]) or _last_number(
            text.split("####")[-1])
        if number is not None:
            return number
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        tail = text[matches[-1].end():]
        first = _NUMBER.match(tail.strip())
        if first:
            return normalize_number(first.group(0))
    return _last_number(text)


def gsm8k_gold(answer: str) -> str:
    """The reference answer of a GSM8K record's ``answer`` field (after ``#### ``)."""
    return normalize_number(answer.split("####")[-1].strip())


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (``\\boxed 5`` too)."""
    index = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if index < 0:
        return None
    rest = text[index:]
    rest = rest[len("\\boxed"):] if rest.startswith("\\boxed") else rest[len("\\fbox"):]
    if rest.startswith(" ") or (rest and rest[0] not in "{"):
        match = re.match(r"\s*([^\s$]+)", rest)
        return match.group(1) if match else None
    depth = 0
    for position, char in enumerate(rest):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:position]
    return None  # unbalanced


def extract_math_answer(text: str) -> str | None:
    """The answer of a MATH-style solution or generation (see the module docstring)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    tail = text[matches[-1].end():].split("\n")[0].strip()
    if tail.startswith("$") and "$" in tail[1:]:
        return tail[1:tail.index("$", 1)]
    tail = re.split(r"\.(?:\s|$)| I hope", tail)[0]
    return tail.strip() or None


def _unwrap_text(value: str) -> str:
    return re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", value)


def normalize_math_answer(answer: str | None) -> str | None:
    """A light normalisation of a MATH answer for exact match (see the module docstring)."""
    if answer is None:
        return None
    value = answer.strip()
    boxed = last_boxed(value)
    if boxed is not None and value.startswith(("\\boxed", "\\fbox")):
        value = boxed
    value = value.strip().strip("$").strip()
    value = _unwrap_text(value)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
                     ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^\\circ", ""),
                     ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("\\$", "")):
        value = value.replace(old, new)
    value = re.sub(r"\s+", "", value).rstrip(".")
    value = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", value)
    if re.fullmatch(r"-?[\d,]*\.?\d+", value):
        return normalize_number(value)
    return value


def math_gold(solution: str) -> str | None:
    """The reference answer of a MATH record's ``solution`` (its last ``\\boxed{}``)."""
    return normalize_math_answer(extract_math_answer(solution))


def gsm8k_is_correct(generation: str, gold: str) -> bool:
    answer = extract_gsm8k_answer(generation)
    return answer is not None and answer == normalize_number(gold)


def math_is_correct(generation: str, gold: str) -> bool:
    answer = normalize_math_answer(extract_math_answer(generation))
    return answer is not None and answer == normalize_math_answer(gold)


def process_gsm8k(doc: dict, results: list[str]) -> dict[str, int]:
    """lm-eval ``process_results`` of a GSM8K-style task."""
    gold = doc.get("gold") or gsm8k_gold(doc["answer"])
    return {"exact_match": int(gsm8k_is_correct(results[0], str(gold)))}


def process_math(doc: dict, results: list[str]) -> dict[str, int]:
    """lm-eval ``process_results`` of a MATH-style task."""
    gold = doc.get("gold") or math_gold(doc["solution"]) or ""
    return {"exact_match": int(math_is_correct(results[0], str(gold)))}

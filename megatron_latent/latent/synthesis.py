"""Teacher synthesis of latent thoughts (BoLT's warm start; ../shared/methods/latent_thoughts.md,
"Teacher synthesis" and "Chunking").

For every chunk x of a document a teacher is asked for the thoughts behind x, given the prefix
(the previous chunk's text, the literal ``"N/A"`` for the first chunk:
``chunking.teacher_prefix``). The prompt follows the structure of the notes' prompt (our own
wording): given a prefix and a suffix of a document, write the thoughts behind the suffix --
missing background, the reasoning behind each claim, step-by-step derivations -- concise and
declarative, without markdown, filler or repetition of the prefix. The teacher's output is used
verbatim as the chunk's ``latent_text``.

A teacher is anything with ``generate(prompts) -> list[TeacherResult | TeacherFailure]`` (one
entry per prompt, in order; see `Teacher`). Three are provided:

- `ProjectTeacher`: a checkpoint of this project, batched KV-cached
  ``generate_with_details`` at any TP size (under torchrun every rank runs the same batches;
  only rank 0 writes: ``is_writer``);
- `HFTeacher`: a Hugging Face causal-LM folder (``AutoModelForCausalLM`` +
  ``AutoTokenizer``), batched ``generate`` with left padding;
- `HTTPTeacher`: any OpenAI-compatible endpoint (``/completions`` or ``/chat/completions``)
  over ``urllib`` with a thread pool, retries with exponential backoff and jitter, and
  per-request timeouts. A request that still fails is returned as a `TeacherFailure`.

Temperature 0 means greedy decoding for every teacher. Sampled generation is seeded per batch
from the seed and the batch's prompts (project and HF teachers), so a rerun of the same batch
draws the same tokens; HTTP requests carry ``seed`` only when one is given.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .chunking import teacher_prefix

#: The teacher prompt (the notes' structure, our wording). ``{prefix}`` and ``{suffix}`` are
#: replaced literally (no str.format: document text and custom templates may hold braces).
PROMPT_TEMPLATE = (
    "You are given a prefix and a suffix of a document. Write the thoughts behind the suffix: "
    "the background knowledge it assumes but does not state, the reasoning behind each of its "
    "claims, and step-by-step derivations of any results it states. Be concise and "
    "declarative. Do not use markdown, do not add filler, and do not repeat the prefix.\n"
    "\n"
    "Prefix:\n"
    "{prefix}\n"
    "\n"
    "Suffix:\n"
    "{suffix}\n"
    "\n"
    "Thoughts:\n"
)


def check_template(template: str) -> None:
    """A template must hold ``{prefix}`` and ``{suffix}`` once each (ValueError otherwise)."""
    for field in ("{prefix}", "{suffix}"):
        count = template.count(field)
        if count != 1:
            raise ValueError(f"the prompt template must contain {field} exactly once "
                             f"(found {count} times)")


def build_prompt(prefix: str, suffix: str, template: str = PROMPT_TEMPLATE) -> str:
    """The teacher prompt for one chunk (``suffix``) after ``prefix``."""
    head, tail = template.split("{suffix}", 1)
    # Replace in two pieces so a literal "{suffix}" inside the prefix text stays as it is.
    return head.replace("{prefix}", prefix) + suffix + tail.replace("{prefix}", prefix)


def chunk_prompt(chunks: Sequence[str], i: int, template: str = PROMPT_TEMPLATE) -> str:
    """The prompt of chunk ``i``: prefix = the previous chunk (``"N/A"`` for chunk 0)."""
    return build_prompt(teacher_prefix(chunks, i), chunks[i], template)


def template_fingerprint(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TeacherResult:
    """A finished request: the latent text (verbatim) and how many tokens it took."""

    text: str
    #: Generated tokens (the teacher's count; HTTP: the reply's usage.completion_tokens, 0
    #: when the server reports none).
    tokens: int
    #: "stop", "length", ... as the teacher reports it.
    finish_reason: str | None = None


@dataclass(frozen=True)
class TeacherFailure:
    """A request that failed for good (after retries); its chunk stays unfinished."""

    error: str
    attempts: int = 1


Outcome = TeacherResult | TeacherFailure


@runtime_checkable
class Teacher(Protocol):
    """What the synthesis driver needs from a teacher.

    ``generate(prompts)`` returns one `TeacherResult` or `TeacherFailure` per prompt, in order.
    ``batch_size`` is how many prompts the driver hands over at once; ``is_writer`` is False on
    the ranks of a multi-rank teacher that must not write files; ``describe()`` names the
    teacher and its settings (recorded in the work directory)."""

    batch_size: int
    is_writer: bool

    def generate(self, prompts: Sequence[str]) -> list[Outcome]: ...

    def describe(self) -> dict: ...


def iter_outcomes(teacher: Any, prompts: Sequence[str]) -> Iterator[tuple[int, Outcome]]:
    """``(index, outcome)`` per prompt, as soon as each is known: a teacher's own
    ``iter_generate`` (the HTTP teacher yields in completion order), else ``generate``."""
    streaming = getattr(teacher, "iter_generate", None)
    if streaming is not None:
        yield from streaming(prompts)
        return
    outcomes = teacher.generate(prompts)
    if len(outcomes) != len(prompts):
        raise RuntimeError(f"the teacher returned {len(outcomes)} results for {len(prompts)} "
                           "prompts")
    yield from enumerate(outcomes)


def batch_seed(seed: int, prompts: Sequence[str]) -> int:
    """A sampling seed from ``seed`` and the batch's prompts (same batch -> same seed, on
    every rank and in every rerun)."""
    digest = hashlib.sha256(str(seed).encode())
    for prompt in prompts:
        digest.update(b"\0" + prompt.encode("utf-8"))
    return int.from_bytes(digest.digest()[:8], "big") % (2 ** 63)


# --------------------------------------------------------------------------- project teacher


class ProjectTeacher:
    """A checkpoint of this project: ``load_model_for_inference`` (weights re-cut for
    ``tensor_parallel_size``) and batched, KV-cached ``generate_with_details``.

    Under torchrun with TP > 1 every rank must call `generate` with the same prompts in the
    same order (the driver does: it reads the same input and takes the finished chunks from
    rank 0 via `sync`); every rank gets the same results, and only rank 0 (``is_writer``)
    writes. Generation stops at the tokenizer's end-of-document token or after
    ``max_new_tokens``. A prompt whose tokens + ``max_new_tokens`` exceed the model's context is
    a `TeacherFailure` (counted, never truncated silently)."""

    def __init__(self, checkpoint: str, *, tensor_parallel_size: int = 1, device=None,
                 dtype=None, iteration: int | None = None,
                 tokenizer_overrides: dict[str, str | None] | None = None,
                 max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, batch_size: int = 8,
                 stop: Sequence[str] = (), use_cache: bool = True, loaded=None):
        from ..config import ConfigError
        from ..inference.stepping import max_positions

        if loaded is None:
            from ..inference.loading import load_model_for_inference

            loaded = load_model_for_inference(checkpoint, iteration, tensor_parallel_size,
                                              device, tokenizer_overrides, dtype=dtype)
        if loaded.tokenizer is None:
            raise ConfigError(f"{checkpoint} records no tokenizer; give --tokenizer-type and "
                              "--tokenizer-model")
        self.checkpoint = checkpoint
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.limit = max_positions(self.model)
        if self.limit is not None and max_new_tokens >= self.limit:
            raise ConfigError(f"--max-tokens {max_new_tokens} leaves no room for a prompt in "
                              f"the checkpoint's context of {self.limit} positions")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seed = seed
        self.batch_size = batch_size
        self.stop = tuple(stop)
        self.use_cache = use_cache
        import torch.distributed as dist

        self.is_writer = not dist.is_initialized() or dist.get_rank() == 0

    def describe(self) -> dict:
        return {"teacher": "project", "checkpoint": os.path.abspath(self.checkpoint),
                "iteration": self.loaded.iteration, "max_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed, "stop": list(self.stop)}

    def config(self, prompts: Sequence[str]):
        from ..inference import GenerationConfig

        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, greedy=self.temperature == 0.0,
            temperature=self.temperature if self.temperature > 0 else 1.0, top_k=self.top_k,
            top_p=self.top_p, seed=batch_seed(self.seed, prompts),
            stop_token_ids=(int(self.tokenizer.eod),), stop_strings=self.stop)

    def generate(self, prompts: Sequence[str]) -> list[Outcome]:
        from ..inference import generate_with_details

        encoded = [list(self.tokenizer.tokenize(p)) for p in prompts]
        outcomes: list[Outcome | None] = [None] * len(prompts)
        runnable = []
        for index, ids in enumerate(encoded):
            if not ids:
                outcomes[index] = TeacherFailure("the prompt has no tokens")
            elif self.limit is not None and len(ids) + self.max_new_tokens > self.limit:
                outcomes[index] = TeacherFailure(
                    f"the prompt's {len(ids)} tokens + --max-tokens {self.max_new_tokens} "
                    f"exceed the checkpoint's context of {self.limit} positions")
            else:
                runnable.append(index)
        if runnable:
            # The seed depends on the prompts run together: the same on every TP rank.
            config = self.config([prompts[i] for i in runnable])
            results = generate_with_details(self.model, [encoded[i] for i in runnable], config,
                                            detokenize=self.tokenizer.detokenize,
                                            use_cache=self.use_cache)
            for index, result in zip(runnable, results):
                text = (result.text if result.text is not None
                        else self.tokenizer.detokenize(result.tokens))
                outcomes[index] = TeacherResult(text, len(result.tokens), result.finish_reason)
        return outcomes  # type: ignore[return-value]

    def sync(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (the finished chunks, so all ranks run the same
        batches)."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# --------------------------------------------------------------------------- HF teacher


class HFTeacher:
    """A Hugging Face causal LM from a local folder: ``AutoTokenizer`` (left padding; the EOS
    token pads when there is no pad token) and ``AutoModelForCausalLM.generate`` on batches.
    Generation stops at EOS or after ``max_new_tokens``; the latent is the decoded new tokens
    up to EOS (special tokens skipped)."""

    is_writer = True

    def __init__(self, path: str, *, device: str = "cpu", dtype: str | None = None,
                 max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = path
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"the tokenizer in {path} has neither a pad nor an EOS token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = getattr(torch, dtype) if dtype else None
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seed = seed
        self.batch_size = batch_size

    def describe(self) -> dict:
        return {"teacher": "hf", "path": os.path.abspath(self.path),
                "max_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed}

    def generate(self, prompts: Sequence[str]) -> list[Outcome]:
        torch = self.torch
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        eos = self.tokenizer.eos_token_id
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if eos is not None:
            kwargs["eos_token_id"] = eos
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p,
                          top_k=self.top_k or None)
            torch.manual_seed(batch_seed(self.seed, prompts))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        outcomes: list[Outcome] = []
        for ids in new:
            finish = "length"
            if eos is not None and eos in ids:
                ids = ids[:ids.index(eos)]
                finish = "stop"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            outcomes.append(TeacherResult(text, len(ids), finish))
        return outcomes


# --------------------------------------------------------------------------- HTTP teacher

#: HTTP statuses worth retrying: timeouts, rate limits and server errors.
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    pass


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class HTTPTeacher:
    """An OpenAI-compatible endpoint: POST ``{base_url}/completions`` (or
    ``{base_url}/chat/completions`` with ``chat=True``; the prompt is then the one user
    message) through ``urllib``, ``concurrency`` requests at a time.

    ``base_url`` is what OpenAI clients take, e.g. ``http://127.0.0.1:8000/v1``. Connection
    errors, timeouts, malformed replies, 429 and 5xx (`RETRY_STATUSES`) are retried up to
    ``retries`` times after ``backoff * 2**attempt`` seconds (at most ``max_backoff``) times
    a random jitter factor in [0.5, 1.5) (or the server's ``Retry-After``, capped the same);
    other 4xx fail at once. A request that still fails is a `TeacherFailure`. Counters:
    ``requests`` (HTTP attempts made), ``retries``."""

    is_writer = True

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 chat: bool = False, temperature: float = 0.7, max_tokens: int = 6000,
                 top_p: float | None = None, seed: int | None = None,
                 stop: Sequence[str] = (), concurrency: int = 8, retries: int = 5,
                 backoff: float = 1.0, max_backoff: float = 60.0, timeout: float = 600.0,
                 batch_size: int | None = None, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url {base_url!r} must start with http:// or https://")
        if concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
        if retries < 0:
            raise ValueError(f"--retries must be >= 0, got {retries}")
        if timeout <= 0:
            raise ValueError(f"--timeout must be > 0, got {timeout}")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + ("/chat/completions" if chat else "/completions")
        self.model = model
        self.api_key = api_key
        self.chat = chat
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.top_p = top_p
        self.seed = seed
        self.stop = list(stop)
        self.concurrency = concurrency
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.batch_size = batch_size or concurrency * 4
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.lock = threading.Lock()
        self.requests = 0
        self.retried = 0

    def describe(self) -> dict:
        return {"teacher": "http", "url": self.url, "model": self.model, "chat": self.chat,
                "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "stop": self.stop}

    def body(self, prompt: str) -> dict:
        body: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.model is not None:
            body["model"] = self.model
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = self.stop
        return body

    def _attempt(self, data: bytes) -> TeacherResult:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        with self.lock:
            self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:500].decode("utf-8", "replace")
            message = f"HTTP {error.code} from {self.url}: {detail}"
            if error.code in RETRY_STATUSES:
                raise _Retryable(message, _retry_after(error.headers)) from None
            raise _Fatal(message) from None
        except (http.client.HTTPException, OSError) as error:  # URLError, timeouts, resets
            reason = getattr(error, "reason", error)
            raise _Retryable(f"{type(error).__name__} from {self.url}: {reason}") from None
        try:
            reply = json.loads(payload)
            choice = reply["choices"][0]
            text = choice["message"]["content"] if self.chat else choice["text"]
            if not isinstance(text, str):
                raise TypeError(f"the completion is {type(text).__name__}, not a string")
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise _Retryable(f"malformed reply from {self.url} ({type(error).__name__}: "
                             f"{error}): {payload[:200]!r}") from None
        usage = reply.get("usage") or {}
        tokens = usage.get("completion_tokens")
        return TeacherResult(text, int(tokens) if isinstance(tokens, int) else 0,
                             choice.get("finish_reason"))

    def request(self, prompt: str) -> Outcome:
        """One prompt with retries; never raises for a failed request."""
        data = json.dumps(self.body(prompt)).encode("utf-8")
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._attempt(data)
            except _Fatal as error:
                return TeacherFailure(str(error), attempt)
            except _Retryable as error:
                if attempt > self.retries:
                    return TeacherFailure(f"{error} (gave up after {attempt} attempts)", attempt)
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                with self.lock:
                    self.retried += 1
                    jitter = 0.5 + self.rng.random()
                delay = min(self.max_backoff, error.retry_after) \
                    if error.retry_after is not None else delay * jitter
                self.sleep(delay)

    def iter_generate(self, prompts: Sequence[str]) -> Iterator[tuple[int, Outcome]]:
        """``(index, outcome)`` in completion order, ``concurrency`` requests in flight."""
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency,
                                                     thread_name_prefix="teacher-http")
        try:
            futures = {pool.submit(self.request, p): i for i, p in enumerate(prompts)}
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
        finally:
            # On an interrupt, queued requests are dropped; those in flight finish unread.
            pool.shutdown(wait=False, cancel_futures=True)

    def generate(self, prompts: Sequence[str]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(prompts)
        for index, outcome in self.iter_generate(prompts):
            outcomes[index] = outcome
        return outcomes  # type: ignore[return-value]


__all__ = [
    "HFTeacher",
    "HTTPTeacher",
    "Outcome",
    "PROMPT_TEMPLATE",
    "ProjectTeacher",
    "RETRY_STATUSES",
    "Teacher",
    "TeacherFailure",
    "TeacherResult",
    "batch_seed",
    "build_prompt",
    "check_template",
    "chunk_prompt",
    "iter_outcomes",
    "template_fingerprint",
]

"""An OpenAI-compatible HTTP endpoint for the checkpoints of every method that can generate.

Served paths (JSON in, JSON out)::

    POST /v1/completions        prompt: string | [string] | [int] | [[int]]
    POST /v1/chat/completions   messages: [{"role", "content"}]
    GET  /v1/models             the one served model (also GET /v1/models/<name>)
    GET  /health                {"status": "ok", ...}

Generation is the project's own: `generate_with_details` (KV-cached token-by-token driver) or
the method's `MethodSpec.generate_text` hook (e.g. thought memory's sentence decoding).

Concurrency: the HTTP server answers connections in threads, but the model is not
thread-safe, so generation runs one request at a time behind a lock. Within one request all
prompts x n choices are decoded together as one batch (at most `max_batch` rows per forward;
a larger request is decoded in several batches, batch k seeded with seed + k).

Sampling fields: ``temperature`` 0 means greedy (argmax); ``top_p``, ``seed`` and ``stop``
(a string or a list) are honoured, and ``top_k`` is accepted as an extension (0 = off). Without
``seed`` a random one is drawn per request. The tokenizer's end-of-document token always stops
a choice (finish_reason "stop"), as does a stop string (the text is cut before it);
running out of ``max_tokens`` gives "length". ``n`` repeats every prompt n times; choice
``i * n + j`` is the j-th sample of prompt i.

Per-token log-probabilities: the generation driver does not return them, so a request that
asks for them (``logprobs`` on either endpoint, ``top_logprobs``) is refused with a 400 naming
the field, and every choice has ``"logprobs": null``. Streaming, ``echo``, ``suffix``,
``best_of`` != n, non-zero presence/frequency penalties, ``logit_bias`` and tool calls are
refused the same way; other unknown fields (``user``, ...) are ignored.

Chat template (these base models have none): every message becomes one line
``"<Role>: <content>\\n"`` with the role capitalized (System, Developer, User, Assistant,
Tool), and ``"Assistant:"`` is appended for the reply, e.g.::

    System: You are terse.
    User: Hello
    Assistant:

The reply is the completion of that text with ``"\\nUser:"`` added to the stop strings (a base
model otherwise goes on to write the user's next turn), leading whitespace removed. A content
given as a list of parts uses its ``{"type": "text"}`` parts, joined.

Usage: ``prompt_tokens`` counts each prompt once (the tokenizer's tokens of the prompt, or of
the rendered chat), ``completion_tokens`` the generated tokens of every choice (a stop token
is not counted; the tokens that completed a stop string are).

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
field (``param`` names it), 404 for an unknown path or model, 405 for a wrong HTTP method,
500 when generation fails (logged; the server keeps serving).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .generation import Generation, generate_with_details
from .sampling import GenerationConfig
from .stepping import max_positions

logger = logging.getLogger("megatron_latent.inference.server")

#: Added to a chat request's stop strings (see the module docstring).
CHAT_STOP = "\nUser:"
#: Largest request body read (bytes); a larger one is refused with 413.
MAX_BODY_BYTES = 16 * 1024 * 1024
#: Largest `n` accepted.
MAX_N = 128
_ROLES = ("system", "developer", "user", "assistant", "tool")
_FINISH = {"stop_token": "stop", "stop_string": "stop", "length": "length"}


class APIError(Exception):
    """A request the server refuses; turned into an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.type = type_ or ("invalid_request_error" if self.status < 500 else "server_error")
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


# --------------------------------------------------------------------------- field parsing


def _get_int(body: dict, name: str, default: int | None, minimum: int | None = None,
             maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise _bad(name, f"must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise _bad(name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise _bad(name, f"must be <= {maximum}, got {value}")
    return value


def _get_float(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"must be a number, got {value!r}")
    return float(value)


def _get_bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"must be a boolean, got {value!r}")
    return value


def _parse_stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop", f"must be a string or a list of strings, got {stop!r}")
    if any(not s for s in stop):
        raise _bad("stop", "stop strings must be non-empty")
    return tuple(stop)


def _refuse_unsupported(body: dict, chat: bool) -> None:
    if _get_bool(body, "stream"):
        raise _bad("stream", "streaming is not supported; send stream=false")
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs is not False:
        raise _bad("logprobs", "per-token log-probabilities are not available from this "
                               "server's generation driver; omit logprobs")
    if body.get("top_logprobs") is not None:
        raise _bad("top_logprobs", "per-token log-probabilities are not available from this "
                                   "server's generation driver; omit top_logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get_float(body, name, 0.0) != 0.0:
            raise _bad(name, "penalties are not supported; omit it or send 0")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "logit_bias is not supported")
    if chat:
        for name in ("tools", "functions", "tool_choice", "function_call"):
            if body.get(name):
                raise _bad(name, "tool and function calls are not supported")
        response_format = body.get("response_format")
        if response_format is not None and (not isinstance(response_format, dict)
                                            or response_format.get("type", "text") != "text"):
            raise _bad("response_format", "only {\"type\": \"text\"} is supported")
    else:
        if _get_bool(body, "echo"):
            raise _bad("echo", "echo is not supported")
        if body.get("suffix"):
            raise _bad("suffix", "suffix (insertion) is not supported")


def _message_text(content: Any, index: int) -> str:
    param = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise _bad(param, "only text parts ({\"type\": \"text\", \"text\": ...}) are "
                                  "supported")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(param, f"must be a string or a list of text parts, got {content!r}")


def render_chat(messages: Any) -> str:
    """The completion prompt of a chat request (the documented template; see module doc)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    lines = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{index}]", "must be an object with role and content")
        role = message.get("role")
        if role not in _ROLES:
            raise _bad(f"messages[{index}].role", f"must be one of {', '.join(_ROLES)}, "
                                                  f"got {role!r}")
        lines.append(f"{role.capitalize()}: {_message_text(message.get('content'), index)}\n")
    return "".join(lines) + "Assistant:"


# --------------------------------------------------------------------------- the service


class CompletionService:
    """Turns OpenAI request bodies into generation calls on one loaded model.

    `route(method, path, body)` -> (HTTP status, JSON-able payload) is everything the HTTP
    layer needs; it is usable without a server (tests, other front ends)."""

    def __init__(self, model, tokenizer, model_name: str, *,
                 generate_text: Callable[..., list[Generation]] | None = None,
                 method: str | None = None, iteration: int | None = None,
                 max_batch: int = 16, default_max_tokens: int = 16, use_cache: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {default_max_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.generate_text = generate_text
        self.method = method
        self.iteration = iteration
        self.max_batch = max_batch
        self.default_max_tokens = default_max_tokens
        self.use_cache = use_cache
        self.created = int(time.time())
        self.lock = threading.Lock()
        self.requests_served = 0

    @classmethod
    def from_checkpoint(cls, checkpoint: str, *, iteration: int | None = None, device=None,
                        dtype=None, tokenizer_overrides: dict[str, str | None] | None = None,
                        model_name: str | None = None, **kwargs) -> CompletionService:
        """Load `checkpoint` (TP=1) with `load_model_for_inference` and serve it."""
        from ..config import ConfigError
        from ..methods.registry import get_method
        from .loading import load_model_for_inference

        loaded = load_model_for_inference(checkpoint, iteration, 1, device, tokenizer_overrides,
                                          dtype=dtype)
        if loaded.tokenizer is None:
            raise ConfigError(f"{checkpoint} records no tokenizer; give one explicitly")
        name = model_name or os.path.basename(os.path.normpath(os.path.abspath(checkpoint)))
        return cls(loaded.model, loaded.tokenizer, name,
                   generate_text=get_method(loaded.run.method).generate_text,
                   method=loaded.run.method, iteration=loaded.iteration, **kwargs)

    # ----------------------------------------------------------------- routing

    def route(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        path = path.split("?", 1)[0].rstrip("/") or "/"
        if path.startswith("/v1/models/"):
            if method != "GET":
                raise APIError(405, f"{method} is not allowed on {path}; use GET")
            wanted = path[len("/v1/models/"):]
            if wanted != self.model_name:
                raise APIError(404, f"the model {wanted!r} does not exist; this server "
                                    f"serves {self.model_name!r}", param="model",
                               code="model_not_found")
            return 200, self.model_card()
        handlers = {
            "/v1/completions": ("POST", self.completions),
            "/v1/chat/completions": ("POST", self.chat_completions),
            "/v1/models": ("GET", lambda: self.models()),
            "/health": ("GET", lambda: self.health()),
        }
        if path not in handlers:
            raise APIError(404, f"Invalid URL ({method} {path})")
        expected, handler = handlers[path]
        if method != expected:
            raise APIError(405, f"{method} is not allowed on {path}; use {expected}")
        if expected == "GET":
            return 200, handler()
        return 200, handler(self._parse_body(body))

    @staticmethod
    def _parse_body(body: bytes | None) -> dict:
        try:
            parsed = json.loads(body or b"")
        except (ValueError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}") from None
        if not isinstance(parsed, dict):
            raise APIError(400, "the request body must be a JSON object")
        return parsed

    def model_card(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "megatron-latent"}
        if self.method is not None:
            card["method"] = self.method
        if self.iteration is not None:
            card["iteration"] = self.iteration
        limit = max_positions(self.model)
        if limit is not None:
            card["max_model_len"] = limit
        return card

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, "requests_served": self.requests_served}

    # ----------------------------------------------------------------- endpoints

    def completions(self, body: dict) -> dict:
        self._check_model(body)
        _refuse_unsupported(body, chat=False)
        texts, token_prompts = self._parse_prompts(body.get("prompt"))
        n = _get_int(body, "n", 1, minimum=1, maximum=MAX_N)
        best_of = _get_int(body, "best_of", None)
        if best_of is not None and best_of != n:
            raise _bad("best_of", f"best_of must equal n ({n}); best-of ranking is not supported")
        config = self._config(body, extra_stops=())
        results = self._run(texts, token_prompts, n, config)
        choices = [{"text": text, "index": index, "logprobs": None,
                    "finish_reason": _FINISH.get(result.finish_reason, result.finish_reason)}
                   for index, (result, text) in enumerate(results)]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": choices,
                "usage": self._usage(token_prompts, results)}

    def chat_completions(self, body: dict) -> dict:
        self._check_model(body)
        _refuse_unsupported(body, chat=True)
        prompt = render_chat(body.get("messages"))
        n = _get_int(body, "n", 1, minimum=1, maximum=MAX_N)
        if body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
            body = dict(body, max_tokens=body["max_completion_tokens"])
        config = self._config(body, extra_stops=(CHAT_STOP,))
        token_prompts = [self.tokenizer.tokenize(prompt)]
        results = self._run([prompt], token_prompts, n, config)
        choices = [{"index": index,
                    "message": {"role": "assistant", "content": text.lstrip()},
                    "logprobs": None,
                    "finish_reason": _FINISH.get(result.finish_reason, result.finish_reason)}
                   for index, (result, text) in enumerate(results)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": self.model_name, "choices": choices,
                "usage": self._usage(token_prompts, results)}

    # ----------------------------------------------------------------- helpers

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")

    def _parse_prompts(self, prompt: Any) -> tuple[list[str] | None, list[list[int]]]:
        """(text prompts or None for token prompts, token prompts)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise _bad("prompt", "must be a string, a non-empty list of strings, a list of "
                                 "token ids or a list of token-id lists")
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if all(isinstance(p, str) for p in prompt):
            token_prompts = [self.tokenizer.tokenize(p) for p in prompt]
            texts: list[str] | None = list(prompt)
        else:
            if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
                prompt = [prompt]
            if not all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                   for t in p) for p in prompt):
                raise _bad("prompt", "mixes strings and token ids, or holds something else")
            if self.generate_text is not None:
                raise _bad("prompt", f"the {self.method!r} model generates from text; send "
                                     "text prompts")
            for p in prompt:
                if vocab is not None and any(t < 0 or t >= vocab for t in p):
                    raise _bad("prompt", f"token ids must be in [0, {vocab})")
            token_prompts, texts = [list(p) for p in prompt], None
        for index, ids in enumerate(token_prompts):
            if not ids:
                raise _bad("prompt", f"prompt {index} has no tokens")
        return texts, token_prompts

    def _config(self, body: dict, extra_stops: tuple[str, ...]) -> GenerationConfig:
        max_tokens = _get_int(body, "max_tokens", self.default_max_tokens, minimum=1)
        temperature = _get_float(body, "temperature", 1.0)
        if temperature < 0:
            raise _bad("temperature", f"must be >= 0, got {temperature}")
        top_p = _get_float(body, "top_p", 1.0)
        if not 0.0 < top_p <= 1.0:
            raise _bad("top_p", f"must be in (0, 1], got {top_p}")
        top_k = _get_int(body, "top_k", 0, minimum=0)
        seed = _get_int(body, "seed", None)
        if seed is None:
            seed = random.SystemRandom().randrange(2 ** 31)
        elif seed < 0:  # torch generators take seeds in [0, 2**64)
            seed %= 2 ** 64
        stops = _parse_stop(body)
        stops += tuple(s for s in extra_stops if s not in stops)
        config = GenerationConfig(
            max_new_tokens=max_tokens, greedy=temperature == 0.0,
            temperature=temperature if temperature > 0 else 1.0, top_k=top_k, top_p=top_p,
            seed=seed, stop_token_ids=(int(self.tokenizer.eod),), stop_strings=stops)
        config.validate()
        return config

    def _run(self, texts: list[str] | None, token_prompts: list[list[int]], n: int,
             config: GenerationConfig) -> list[tuple[Generation, str]]:
        """Every prompt n times, in order; (generation, its text) per choice."""
        limit = max_positions(self.model)
        if self.generate_text is None and limit is not None:
            longest = max(len(p) for p in token_prompts)
            if longest + config.max_new_tokens > limit:
                raise _bad("max_tokens", f"the longest prompt ({longest} tokens) + max_tokens "
                                         f"({config.max_new_tokens}) exceeds the model's "
                                         f"context of {limit} tokens")
        rows = [i for i in range(len(token_prompts)) for _ in range(n)]
        results: list[Generation] = []
        with self.lock:
            for k, start in enumerate(range(0, len(rows), self.max_batch)):
                chunk = rows[start:start + self.max_batch]
                chunk_config = dataclasses.replace(config, seed=(config.seed + k) % 2 ** 64)
                results += self._generate(chunk, texts, token_prompts, chunk_config)
            self.requests_served += 1
        return [(r, r.text if r.text is not None else self.tokenizer.detokenize(r.tokens))
                for r in results]

    def _generate(self, rows: list[int], texts: list[str] | None,
                  token_prompts: list[list[int]], config: GenerationConfig) -> list[Generation]:
        if self.generate_text is not None:
            assert texts is not None
            try:
                return self.generate_text(self.model, self.tokenizer, [texts[i] for i in rows],
                                          config, use_cache=self.use_cache)
            except ValueError as error:  # the method's own checks of the request
                raise APIError(400, f"the request was refused: {error}") from None
        return generate_with_details(self.model, [token_prompts[i] for i in rows], config,
                                     detokenize=self.tokenizer.detokenize,
                                     use_cache=self.use_cache)

    @staticmethod
    def _usage(token_prompts: Sequence[Sequence[int]],
               results: list[tuple[Generation, str]]) -> dict:
        prompt_tokens = sum(len(p) for p in token_prompts)
        completion_tokens = sum(len(r.tokens) for r, _ in results)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


# --------------------------------------------------------------------------- HTTP layer


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer
    server_version = "megatron-latent-serve/0.1"
    timeout = 300  # seconds a connection may stall while sending its request

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        started = time.perf_counter()
        try:
            body = self._read_body() if method in ("POST", "PUT") else None
            status, payload = self.server.service.route(method, self.path, body)
        except APIError as error:
            status, payload = error.status, error.body()
        except Exception as error:  # a generation failure: log it and keep serving
            logger.exception("%s %s failed", method, self.path)
            status = 500
            payload = APIError(500, f"generation failed: {type(error).__name__}: {error}").body()
        self._send(status, payload)
        logger.info("%s %s -> %d (%.3fs)", method, self.path, status,
                    time.perf_counter() - started)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError(411, "a Content-Length header is required")
        try:
            size = int(length)
        except ValueError:
            raise APIError(400, f"bad Content-Length {length!r}") from None
        if size < 0 or size > MAX_BODY_BYTES:
            raise APIError(413, f"the request body must be at most {MAX_BODY_BYTES} bytes")
        return self.rfile.read(size)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            logger.warning("the client of %s went away before the reply", self.path)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base's signature)
        logger.debug("%s - " + format, self.address_string(), *args)


class OpenAIServer(ThreadingHTTPServer):
    """A threading HTTP server around one `CompletionService`; generation itself is
    serialized by the service's lock. `port` is the bound port (useful with port 0)."""

    daemon_threads = False  # server_close() waits for requests in flight
    block_on_close = True

    def __init__(self, service: CompletionService, host: str = "127.0.0.1", port: int = 8000):
        self.service = service
        if ":" in host:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"


def start_in_thread(service: CompletionService, host: str = "127.0.0.1",
                    port: int = 0) -> tuple[OpenAIServer, threading.Thread]:
    """Bind (port 0: an ephemeral port, see `server.port`) and serve from a daemon thread;
    stop with `server.shutdown(); server.server_close()`."""
    server = OpenAIServer(service, host, port)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"openai-server-{server.port}", daemon=True)
    thread.start()
    return server, thread


__all__ = [
    "APIError",
    "CHAT_STOP",
    "CompletionService",
    "OpenAIServer",
    "render_chat",
    "start_in_thread",
]

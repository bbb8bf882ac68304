"""lm-evaluation-harness (0.4.13) backend for checkpoints of every method, at any TP size.

Registered as ``megatron_latent``::

    import megatron_latent.evaluation.lm_backend  # registers the model name
    lm_eval.simple_evaluate(model="megatron_latent", model_args={"load": "ckpt/"}, tasks=[...])

Model args: ``load`` (checkpoint directory), ``iteration``, ``tensor_model_parallel_size`` (or
``tp``), ``batch_size``, ``max_length`` (default: the run's seq length), ``max_gen_toks``,
``device`` (auto/cpu/cuda/cuda:N), ``dtype`` (auto: bf16 on CUDA, fp32 on the CPU),
``tokenizer_type``/``tokenizer_model``/``vocab_file``/``merge_file``, ``prefix_token_id``,
``seed`` (sampling in generate_until), ``sentence_language``/``split_on_newlines`` (the
sentence splitter of a method that scores sentence by sentence: preprocessing's ``--lang`` and
``--split-on-newlines``).

Latent-thought models (BoLT; docs/evaluation.md, "Latent-thought models"): ``latent_prompt``
(default False) makes ``generate_until`` open a latent: every prompt starts with the token
training documents start with and ends with the ids ``[SoL, PRI]`` (appended as ids, never by
tokenising text); the literal names of the four tokens inside a context (exemplars carrying
their solution in a latent) become their ids. The model writes its latent up to ``EoL`` and
then the answer; the returned text is the answer (text after the first ``EoL``, later latents
``SoL … EoL`` removed) and stop strings apply to it only. The latents are kept in
``latent_log`` (and appended as JSON lines to ``latent_log_path`` when given).
``ban_latent_tokens`` (default: True exactly when the tokenizer has the four tokens and
``latent_prompt`` is off) sets the four tokens' logits to -inf in generation, so a baseline
evaluation never produces them; a tokenizer without them has nothing to ban. A task can set
either per task through its ``generation_kwargs`` (the ``*_latent`` tasks of
``tools/make_eval_tasks.py --math-data`` set ``latent_prompt: true``). Scoring
(``loglikelihood*``) is never changed.

Scores come from the method model's own forward (pondering passes included): logits sharded
over the vocabulary ([b, s, V/tp]) are reduced TP-aware (max, log-sum-exp, argmax, target
logit), never gathered whole. The softmax runs over the model's whole (padded) vocabulary, as
training's loss and an exported Hugging Face model do. lm-eval's ``rank``/``world_size`` are
the data-parallel rank/size: the TP ranks of one replica receive the same requests, run the
same forwards and return the same results.

A method whose spec has ``score_continuations`` (thought memory: sentence rows, not one token
sequence) scores itself: ``loglikelihood`` hands it the (context, continuation) strings,
``loglikelihood_rolling`` the whole document as the continuation of an empty context (one
stream, no windows), and ``max_length`` does not apply to them. ``generate_until`` uses the
spec's ``generate_text`` when it has one. The backend branches on these hooks only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from megatron.core import parallel_state
from tqdm import tqdm

from ..config import ConfigError
from ..distributed import tp_size
from ..inference.generation import generate_with_details
from ..inference.loading import LoadedModel, load_model_for_inference
from ..inference.sampling import GenerationConfig
from ..inference.stepping import max_positions, sequence_parallel_disabled
from ..latent import LATENT_TOKENS, LatentTokenIds
from ..methods.registry import get_method
from .vocab_scores import vocab_parallel_scores

logger = logging.getLogger(__name__)

#: Scored positions whose vocabulary rows are reduced at once (each row V/tp floats).
_SCORED_PER_CHUNK = 4096

#: One scoring request as TemplateLM builds it: ((context, continuation) or None, ids, ids).
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """auto/None: a GPU when present, else the CPU. A GPU is cuda:LOCAL_RANK under torchrun
    (lm-eval's CLI passes "cuda:0" to every rank); CUDA asked for where there is none falls
    back to the CPU with a warning, as lm-eval's HF backend does."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            logger.warning("device %s asked for but CUDA is not available: using the CPU", name)
            return torch.device("cpu")
        if name == "cuda" or "LOCAL_RANK" in os.environ:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None for auto (bf16 on CUDA, fp32 on the CPU: the loader's choice)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def _as_bool(value: bool | str) -> bool:
    """A model arg that lm-eval may pass as a string ("True", "false", "1")."""
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no", ""):
            raise ConfigError(f"expected a boolean, got {value!r}")
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


_LATENT_NAMES = re.compile("(" + "|".join(re.escape(t) for t in LATENT_TOKENS) + ")")


def _tokenizer_latent_ids(tokenizer: Any) -> LatentTokenIds | None:
    """The four latent-token ids of the tokenizer, or None when it has none of them."""
    from ..latent.tokens import latent_token_ids

    lookup = getattr(tokenizer, "token_to_id", None)
    try:
        if lookup is None or all(lookup(t) is None for t in LATENT_TOKENS):
            return None
    except (NotImplementedError, KeyError):  # a tokenizer without token lookup
        return None
    return latent_token_ids(tokenizer)  # refuses some-but-not-all or out-of-order ids


# lm_eval.models (imported above for its utils) has registered lm-eval's own model names
# first: its registry fills itself only while empty.
@register_model("megatron_latent")
class MegatronLatentLM(TemplateLM):
    """lm-eval's LM for this project's checkpoints (every registered method, any TP)."""

    def __init__(
        self,
        load: str | None = None,
        iteration: int | None = None,
        tensor_model_parallel_size: int | None = None,
        tp: int | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        tokenizer_type: str | None = None,
        tokenizer_model: str | None = None,
        vocab_file: str | None = None,
        merge_file: str | None = None,
        prefix_token_id: int | None = None,
        seed: int = 0,
        sentence_language: str = "en",
        split_on_newlines: bool | str = False,
        max_batch_size: int | None = None,  # lm-eval passes it; batches are fixed-size here
        loaded: LoadedModel | None = None,
        latent_prompt: bool | str = False,
        ban_latent_tokens: bool | str | None = None,
        latent_log_path: str | None = None,
    ) -> None:
        super().__init__()
        if tp is not None and tensor_model_parallel_size not in (None, tp):
            raise ConfigError(f"tp={tp} and tensor_model_parallel_size="
                              f"{tensor_model_parallel_size} disagree")
        tp_size_arg = int(tensor_model_parallel_size or tp or 1)
        if str(batch_size).startswith("auto"):
            raise ConfigError("batch_size=auto is not supported; give a number")
        self._batch_size = int(batch_size)
        if self._batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if loaded is None:
            if not load:
                raise ConfigError("model_args need load=<checkpoint directory>")
            loaded = load_model_for_inference(
                str(load), None if iteration is None else int(iteration), tp_size_arg,
                resolve_device(device),
                {"tokenizer_type": tokenizer_type, "tokenizer_model": tokenizer_model,
                 "vocab_file": vocab_file, "merge_file": merge_file},
                dtype=resolve_dtype(dtype))
        if loaded.tokenizer is None:
            raise ConfigError(f"{load or 'the model'} records no tokenizer; give tokenizer_type "
                              "and tokenizer_model")
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.load = load
        param = next(self.model.parameters())
        self._device = param.device
        self._dtype = param.dtype
        spec = get_method(loaded.run.method)
        #: The method's own scoring and generation (None: token-sequence scoring, the
        #: project's KV-cached generation).
        self._score_hook = spec.score_continuations
        self._generate_hook = spec.generate_text
        self._sentence_options = {"language": str(sentence_language),
                                  "split_on_newlines": _as_bool(split_on_newlines)}
        limit = max_positions(self.model)
        self._max_length = int(max_length or loaded.run.model.seq_length)
        if self._score_hook is None and limit is not None and self._max_length > limit:
            raise ConfigError(f"max_length {self._max_length} exceeds the model's "
                              f"max_position_embeddings {limit}")
        self._max_gen_toks = int(max_gen_toks)
        self._prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.seed = int(seed)
        #: Right-padding value; any id gives the same scores (causal model, padding after them).
        self.pad_token_id = self.eot_token_id
        self._rank = parallel_state.get_data_parallel_rank()
        self._world_size = parallel_state.get_data_parallel_world_size()
        self._show_progress = not dist.is_initialized() or dist.get_rank() == 0
        self._latent_ids = _tokenizer_latent_ids(self.tokenizer)
        self._latent_prompt = _as_bool(latent_prompt)
        self._ban_latent_tokens = None if ban_latent_tokens in (None, "", "auto") else \
            _as_bool(ban_latent_tokens)
        self._check_latent_options(self._latent_prompt, self._ban_latent_tokens)
        self._latent_log_path = latent_log_path
        #: One entry per latent-prompt generation: context, latent text and ids, answer.
        self.latent_log: list[dict[str, Any]] = []

    # -- what lm-eval asks of a model ------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eod)

    @property
    def prefix_token_id(self) -> int:
        """Context of an empty context and of the first rolling window: the end-of-document
        token, which is what precedes every document in this project's training data
        (preprocessing appends it; no BOS is inserted, so a SentencePiece `<s>` was never
        seen). lm-eval's HF backend prefers BOS when the tokenizer has one: compare with it
        by passing the same `prefix_token_id` to both."""
        if self._prefix_token_id is not None:
            return self._prefix_token_id
        return self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return f"{type(self.tokenizer).__name__}:{self.tokenizer.path}".replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        return list(self.tokenizer.tokenize(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.detokenize(list(tokens))

    def get_model_info(self) -> dict[str, Any]:
        """Recorded by lm-eval in ``results["config"]``."""
        run = self.loaded.run
        return {"checkpoint": None if self.load is None else str(self.load),
                "iteration": self.loaded.iteration, "method": run.method,
                "method_args": dict(run.method_args),
                "tensor_model_parallel_size": tp_size(),
                "model_dtype": str(self._dtype), "max_length": self.max_length,
                "prefix_token_id": self.prefix_token_id,
                "method_scoring": self._score_hook is not None,
                "latent_token_ids": None if self._latent_ids is None
                else list(self._latent_ids.as_tuple()),
                "latent_prompt": self._latent_prompt,
                "ban_latent_tokens": self._bans(self._latent_prompt, self._ban_latent_tokens)}

    # -- data-parallel hooks (lm-eval's rank = the DP rank) --------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every DP rank's tensor (0-d tensors become one entry each)."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(),
                        group=parallel_state.get_data_parallel_group())
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every DP rank's object, on DP rank ``dst`` (None elsewhere)."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=parallel_state.get_data_parallel_group())
        return gathered if self.rank == dst else None

    def barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    # -- scoring ---------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if self._score_hook is not None:
            pairs = [tuple(request.args) for request in requests]
            scores = self._method_scores(pairs, "loglikelihood requests", disable_tqdm)
            for pair, score in zip(pairs, scores):
                self.cache_hook.add_partial("loglikelihood", pair, score)
            return scores
        return super().loglikelihood(requests, disable_tqdm or not self._show_progress)

    def _method_scores(self, pairs: list[tuple[str, str]], desc: str,
                       disable_tqdm: bool) -> list[tuple[float, bool]]:
        """The method's own scores of (context, continuation) strings, a few batches per
        call so that the progress bar moves."""
        scores: list[tuple[float, bool]] = []
        step = self.batch_size * 8
        with tqdm(total=len(pairs), desc=desc,
                  disable=disable_tqdm or not self._show_progress) as progress:
            for start in range(0, len(pairs), step):
                part = pairs[start:start + step]
                with sequence_parallel_disabled(self.model):  # rows need not split over TP
                    scores += self._score_hook(self.model, self.tokenizer, part,
                                               batch_size=self.batch_size,
                                               **self._sentence_options)
                progress.update(len(part))
        return scores

    @torch.no_grad()
    def _score_batch(self, inputs: list[list[int]], asks: list[list[tuple[int, list[int]]]]
                     ) -> list[list[tuple[float, bool]]]:
        """One forward over right-padded `inputs`; for each row, each (start, tokens) ask:
        (Σ log p(tokens[j] | row[:start + j + 1]), whether every token is the argmax)."""
        width = max(len(row) for row in inputs)
        batch = torch.full((len(inputs), width), self.pad_token_id, dtype=torch.long)
        rows, positions, targets = [], [], []
        for index, (row, row_asks) in enumerate(zip(inputs, asks)):
            batch[index, :len(row)] = torch.tensor(row, dtype=torch.long)
            for start, tokens in row_asks:
                # Causal attention: position p sees tokens 0..p only, so the padding placed
                # after len(row) cannot reach a scored position (all < len(row)).
                assert 0 <= start and start + len(tokens) <= len(row)
                rows += [index] * len(tokens)
                positions += range(start, start + len(tokens))
                targets += tokens
        with sequence_parallel_disabled(self.model):
            logits = self.model(batch.to(self._device))  # [b, s, V/tp]
        rows_t, positions_t, targets_t = (torch.tensor(x, dtype=torch.long, device=self._device)
                                          for x in (rows, positions, targets))
        logprobs, greedy = [], []
        for part in range(0, len(targets), _SCORED_PER_CHUNK):  # bounds the fp32 copies
            span = slice(part, part + _SCORED_PER_CHUNK)
            chunk_logprobs, argmax = vocab_parallel_scores(
                logits[rows_t[span], positions_t[span]], targets_t[span])
            logprobs += chunk_logprobs.double().tolist()
            greedy += (argmax == targets_t[span]).tolist()
        results, offset = [], 0
        for row_asks in asks:
            out = []
            for _, tokens in row_asks:
                span = slice(offset, offset + len(tokens))
                out.append((sum(logprobs[span]), all(greedy[span])))
                offset += len(tokens)
            results.append(out)
        return results

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              desc: str = "loglikelihood requests",
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """Σ log p(continuation | context) and is_greedy per request.

        Like lm-eval's HF backend, context + continuation is cut from the left to its last
        max_length + 1 tokens and the model reads all but the last. Requests whose model
        input is identical (choices of one question sharing all but their last token) share
        one forward; inputs are sorted longest first and batched with lm-eval's Collator.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        by_input: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            if not continuation:
                results[index] = (0.0, True)
                continue
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds "
                                 f"max_length {self.max_length}")
            if not context:
                raise ValueError("a request needs at least one context token")
            model_input = tuple((list(context) + list(continuation))[-(self.max_length + 1):][:-1])
            start = len(model_input) - len(continuation)
            by_input.setdefault(model_input, []).append((index, start, list(continuation)))
        collator = Collator(list(by_input), sort_fn=lambda key: (-len(key), key))
        progress = tqdm(total=len(requests), desc=desc,
                        disable=disable_tqdm or not self._show_progress)
        progress.update(sum(r is not None for r in results))
        for chunk in collator.get_batched(n=self.batch_size):
            asks = [[(start, tokens) for _, start, tokens in by_input[key]] for key in chunk]
            scores = self._score_batch([list(key) for key in chunk], asks)
            for key, row_scores in zip(chunk, scores):
                for (index, _, _), score in zip(by_input[key], row_scores):
                    results[index] = score
                    if requests[index][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], score)
                progress.update(len(row_scores))
        progress.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in windows of max_length tokens, exactly as
        lm-eval's HF backend: the first window is the prefix token and max_length - 1
        tokens, the next ones disjoint with the longest context; every token scored once.
        A method that scores itself gets the whole document as the continuation of an empty
        context (every token scored once, the first from the method's own start)."""
        if self._score_hook is not None:
            strings = [request.args[0] for request in requests]
            scores = self._method_scores([("", string) for string in strings],
                                         "loglikelihood_rolling requests", disable_tqdm)
            for string, (total, _) in zip(strings, scores):
                self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            return [total for total, _ in scores]
        windows: list[TokenRequest] = []
        owners: list[int] = []
        strings = [request.args[0] for request in requests]
        for index, string in enumerate(strings):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm,
                                            desc="loglikelihood_rolling windows")
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for string, total in zip(strings, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    # -- generation ------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """KV-cached generation (one cache per pondering pass) until a stop string, the
        end-of-document token or max_gen_toks; the text is cut at the first stop string.
        A method with its own `generate_text` gets the context strings and the same config."""
        args = [request.args for request in requests]
        encoded = {context: self.tok_encode(context) for context, _ in args}
        collator = Collator(args, sort_fn=lambda item: (-len(encoded[item[0]]), item[0]),
                            group_by="gen_kwargs", group_fn=lambda item: item[1])
        eos_text = self.tok_decode([self.eot_token_id])
        progress = tqdm(total=len(args), desc="generate_until requests",
                        disable=disable_tqdm or not self._show_progress)
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            config, until, latent = self._generation_config(all_kwargs[0])
            if latent:
                outputs = self._generate_latent(list(contexts), config)
            elif self._generate_hook is not None:
                outputs = self._generate_hook(self.model, self.tokenizer, list(contexts), config)
            else:
                room = self.max_length - config.max_new_tokens
                prompts = [(encoded[c] or [self.prefix_token_id])[-room:] for c in contexts]
                outputs = generate_with_details(self.model, prompts, config,
                                                detokenize=self.tok_decode)
            for context, output in zip(contexts, outputs):
                text = output.text if output.text is not None else self.tok_decode(output.tokens)
                for stop in until + [eos_text]:
                    if stop:
                        text = text.split(stop)[0]
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                progress.update(1)
        progress.close()
        return collator.get_original(results)

    # -- latent thoughts -------------------------------------------------------------------
    def _check_latent_options(self, latent_prompt: bool, ban: bool | None) -> None:
        if latent_prompt and self._latent_ids is None:
            raise ConfigError(
                "latent_prompt needs a tokenizer with the four latent tokens "
                f"({', '.join(LATENT_TOKENS)}); add them with tools/add_latent_tokens.py")
        if latent_prompt and ban:
            raise ConfigError("latent_prompt and ban_latent_tokens exclude each other (a "
                              "latent needs SoL/EoL); leave ban_latent_tokens unset")
        if latent_prompt and self._generate_hook is not None:
            raise ConfigError(f"latent_prompt is not supported for method "
                              f"{self.loaded.run.method!r}, which generates by itself")
        if ban and self._latent_ids is None:
            logger.info("ban_latent_tokens: the tokenizer has no latent tokens; nothing banned")

    def _bans(self, latent_prompt: bool, ban: bool | None) -> bool:
        """Whether the four ids are banned: as asked, else exactly for a tokenizer that has
        them in a generation without a latent prompt."""
        if self._latent_ids is None:
            return False
        return (not latent_prompt) if ban is None else ban

    def encode_latent_prompt(self, context: str) -> list[int]:
        """The ids of a latent prompt: the start token, the context (the literal names of the
        four tokens in it become their ids; the text between them is tokenised) and
        ``[SoL, PRI]`` unless the context already ends with them."""
        from ..latent.formats import document_start_id

        ids = self._latent_ids
        by_name = dict(zip(LATENT_TOKENS, ids.as_tuple()))
        out: list[int] = [document_start_id(self.tokenizer)]
        for piece in _LATENT_NAMES.split(context):
            if piece in by_name:
                out.append(by_name[piece])
            elif piece:
                out += self.tok_encode(piece)
        if out[-2:] != [ids.sol, ids.pri]:
            out += [ids.sol, ids.pri]
        return out

    def split_latent(self, tokens: Sequence[int]) -> tuple[list[int], list[int] | None]:
        """(latent ids, answer ids) of a generation after ``SoL PRI``: the latent is every id
        before the first EoL; the answer is what follows it, with later latents
        (``SoL … EoL``) and stray PRI/POS ids removed. None: no EoL, no answer yet."""
        ids = self._latent_ids
        tokens = [int(t) for t in tokens]
        if ids.eol not in tokens:
            return tokens, None
        first = tokens.index(ids.eol)
        answer, inside = [], False
        for token in tokens[first + 1:]:
            if token == ids.sol:
                inside = True
            elif token == ids.eol:
                inside = False
            elif not inside and token not in (ids.pri, ids.pos):
                answer.append(token)
        return tokens[:first], answer

    def latent_answer_text(self, tokens: Sequence[int]) -> str:
        """The text of the answer of a latent-prompt generation ("" before the first EoL)."""
        _, answer = self.split_latent(tokens)
        return "" if answer is None else self.tok_decode(answer)

    def _generate_latent(self, contexts: list[str], config: GenerationConfig) -> list:
        """Generation after ``SoL PRI``; stop strings apply to the answer after EoL only."""
        room = self.max_length - config.max_new_tokens
        prompts = []
        for context in contexts:
            prompt = self.encode_latent_prompt(context)
            if len(prompt) > room:  # keep the start token, cut from the left after it
                prompt = prompt[:1] + prompt[len(prompt) - room + 1:]
            prompts.append(prompt)
        outputs = generate_with_details(self.model, prompts, config,
                                        detokenize=self.latent_answer_text)
        for context, output in zip(contexts, outputs):
            latent, answer = self.split_latent(output.tokens)
            entry = {"context_tail": context[-200:], "latent": self.tok_decode(
                [t for t in latent if t not in self._latent_ids.as_tuple()]),
                "latent_ids": latent, "closed": answer is not None,
                "answer": output.text, "finish_reason": output.finish_reason}
            self.latent_log.append(entry)
            if self._latent_log_path:
                with open(self._latent_log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        return outputs

    def _generation_config(self, gen_kwargs: dict) -> tuple[GenerationConfig, list[str], bool]:
        gen_kwargs = dict(gen_kwargs)
        latent = _as_bool(gen_kwargs.pop("latent_prompt", self._latent_prompt))
        ban = gen_kwargs.pop("ban_latent_tokens", self._ban_latent_tokens)
        ban = None if ban in (None, "", "auto") else _as_bool(ban)
        self._check_latent_options(latent, ban)
        banned = self._latent_ids.as_tuple() if self._bans(latent, ban) else ()
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = [s for s in kwargs.pop("until") if s]
        max_new = int(kwargs.pop("max_gen_toks"))
        if self._generate_hook is None and max_new >= self.max_length:
            raise ValueError(f"max_gen_toks {max_new} leaves no room for a context in "
                             f"max_length {self.max_length}")
        temperature = float(kwargs.get("temperature") or 0.0)
        greedy = not kwargs.get("do_sample") or temperature <= 0.0
        config = GenerationConfig(
            max_new_tokens=max_new, greedy=greedy, temperature=temperature if not greedy else 1.0,
            top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
            seed=int(self.seed if kwargs.get("seed") is None else kwargs["seed"]),
            stop_token_ids=(self.eot_token_id,),
            stop_strings=tuple(until), banned_token_ids=banned)
        return config, until, latent

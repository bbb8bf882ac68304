"""tools/synthesize_latents.py and megatron_latent/latent/synthesis.py: teacher synthesis of
latent thoughts against a real tools/serve.py server on loopback, a project checkpoint, and
small in-test HTTP servers that fail on purpose (retries, resumption)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from megatron_latent.latent import synthesis
from megatron_latent.latent.chunking import chunk_document

from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 4
AUTO_TEXT = ("t1 t2 t3. t4 t5 t6. t7 t8.\n\nt9 t10 t11. t12 t13. t14 t15 t16. t17 t18. "
             "t19 t20. t21 t22. t23 t24. t25 t26. t27 t28 t29. t30 t31.")
DOCUMENTS = [
    {"id": "a", "text": "t1 t3 t5. t7 t9.", "chunks": ["t1 t3 t5.", " t7 t9."]},
    {"id": "b", "text": "t10 t11 t12. t13 t14. t15 t16.",
     "chunks": ["t10 t11 t12.", " t13 t14.", " t15 t16."], "source": "kept"},
    {"text": "t20 t21. t22 t23 t24.", "chunks": ["t20 t21.", " t22 t23 t24."]},
    {"id": "auto", "text": AUTO_TEXT},
]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


TOOL = _load_tool("synthesize_latents")


def _chunks(doc: dict) -> list[str]:
    return doc.get("chunks") or chunk_document(doc["text"])


TOTAL_CHUNKS = sum(len(_chunks(d)) for d in DOCUMENTS)


@pytest.fixture(scope="module")
def served(single_process_parallel, tmp_path_factory):
    """(base URL, service, checkpoint, tokenizer path) of a tiny 2-iteration checkpoint with
    room for the prompt (seq 256), served on an ephemeral loopback port."""
    import torch

    from megatron_latent.inference.server import CompletionService, start_in_thread

    tmp = tmp_path_factory.mktemp("synth")
    prefix = write_token_dataset(str(tmp / "data" / "tokens"))
    tokenizer_path = write_wordlevel_tokenizer(str(tmp / "tokenizer"))
    ckpt = tmp / "ckpt"
    run_training(TINY_FLAGS + [
        "--seq-length", "256", "--data-path", prefix, "--split", "90,10,0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_path,
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
        "--eval-iters", "0", "--save", str(ckpt)])
    service = CompletionService.from_checkpoint(str(ckpt), device=torch.device("cpu"),
                                                model_name="tiny", max_batch=4)
    server, thread = start_in_thread(service, "127.0.0.1", 0)
    try:
        yield server.url, service, ckpt, tokenizer_path
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _write_input(path: Path, documents=DOCUMENTS) -> str:
    path.write_text("".join(json.dumps(d) + "\n" for d in documents))
    return str(path)


def _args(*argv: str):
    return TOOL.build_parser().parse_args(list(argv))


def _http_flags(url: str, *extra: str) -> list[str]:
    return ["--teacher", "http", "--base-url", url + "/v1", "--model", "tiny",
            "--temperature", "0", "--max-tokens", str(MAX_TOKENS), "--concurrency", "3",
            "--log-interval", "0", *extra]


def _post(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# --------------------------------------------------------------------------- the prompt


def test_prompt_structure():
    chunks = ["First {suffix} part.", " Second {prefix} part."]
    first, second = (synthesis.chunk_prompt(chunks, i) for i in range(2))
    assert "Prefix:\nN/A\n" in first and "Suffix:\nFirst {suffix} part.\n" in first
    assert first.index("N/A") < first.index("First {suffix} part.")
    assert f"Prefix:\n{chunks[0]}\n" in second and f"Suffix:\n{chunks[1]}\n" in second
    assert second.index(chunks[0]) < second.index(chunks[1])
    assert second.endswith("Thoughts:\n")
    for words in ("background", "reasoning", "step-by-step", "concise", "declarative",
                  "markdown", "filler", "do not repeat the prefix"):
        assert words in synthesis.PROMPT_TEMPLATE
    assert synthesis.build_prompt("P", "S", "<{suffix}|{prefix}>") == "<S|P>"
    with pytest.raises(ValueError, match="prefix"):
        synthesis.check_template("only {suffix}")


# --------------------------------------------------------------------------- HTTP, real server


def test_http_teacher_equals_server_and_feeds_make_latent_data(served, tmp_path):
    url, service, _, tokenizer_path = served
    source = _write_input(tmp_path / "docs.jsonl")
    out = tmp_path / "latents.jsonl"
    before = service.requests_served
    assert TOOL.main(["--input", source, "--output", str(out), *_http_flags(url)]) == 0
    assert service.requests_served - before == TOTAL_CHUNKS
    lines = _read_jsonl(out)
    assert [line.get("id") for line in lines] == ["a", "b", None, "auto"]
    assert lines[1]["source"] == "kept"
    for doc, line in zip(DOCUMENTS, lines):
        chunks = _chunks(doc)
        assert line["text"] == doc["text"] and line["chunks"] == chunks
        assert len(line["latent_text"]) == len(chunks)
        for i, latent in enumerate(line["latent_text"]):
            reply = _post(url + "/v1/completions", {
                "model": "tiny", "prompt": synthesis.chunk_prompt(chunks, i),
                "max_tokens": MAX_TOKENS, "temperature": 0})
            assert latent == reply["choices"][0]["text"]
    assert any(z.strip() for line in lines for z in line["latent_text"])

    # The output is make_latent_data's input, with a tokenizer holding the four tokens.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_latent.latent.tokens import add_latent_tokens_to_tokenizer

    latent_tokenizer = tmp_path / "latent_tokenizer"
    add_latent_tokens_to_tokenizer(tokenizer_path, "HuggingFaceTokenizer", str(latent_tokenizer))
    make = _load_tool("make_latent_data")
    data_prefix = str(tmp_path / "bolt")
    with contextlib.redirect_stdout(io.StringIO()):
        assert make.main(["--input", str(out), "--output-prefix", data_prefix,
                          "--tokenizer-type", "HuggingFaceTokenizer",
                          "--tokenizer-model", str(latent_tokenizer)]) == 0
    assert len(IndexedDataset(data_prefix)) == len(DOCUMENTS)


class _CrashAfter:
    """Wraps a teacher; the `crash_at`-th generate call raises (a crash mid-run)."""

    def __init__(self, inner, crash_at: int, batch_size: int):
        self.inner, self.crash_at, self.batch_size = inner, crash_at, batch_size
        self.is_writer, self.calls = True, 0

    def describe(self):
        return self.inner.describe()

    def generate(self, prompts):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        return self.inner.generate(prompts)


def test_resume_requests_only_unfinished_chunks(served, tmp_path):
    url, service, _, _ = served
    source = _write_input(tmp_path / "docs.jsonl")
    reference = tmp_path / "reference.jsonl"
    assert TOOL.main(["--input", source, "--output", str(reference), *_http_flags(url)]) == 0

    out, flags = tmp_path / "out.jsonl", _http_flags(url)
    args = _args("--input", source, "--output", str(out), *flags)
    crashing = _CrashAfter(TOOL.build_teacher(args), crash_at=3, batch_size=2)
    before = service.requests_served
    with pytest.raises(RuntimeError, match="simulated crash"):
        TOOL.synthesize(args, teacher=crashing, log=lambda message: None)
    assert service.requests_served - before == 4  # two batches of two, then the crash
    assert not out.exists()  # no output until a run ends; the journal has the 4 chunks
    journal = tmp_path / "out.jsonl.work" / "journal.jsonl"
    assert len(journal.read_text().splitlines()) == 4
    with open(journal, "a") as handle:  # a write torn by the crash
        handle.write('{"doc": "0123", "chunk": 0, "latent')

    before = service.requests_served
    stats = TOOL.synthesize(args, log=lambda message: None)
    assert service.requests_served - before == TOTAL_CHUNKS - 4
    assert (stats.earlier, stats.done, stats.failed) == (4, TOTAL_CHUNKS - 4, 0)
    assert out.read_text() == reference.read_text()
    # A third run asks for nothing and writes the same output.
    before = service.requests_served
    assert TOOL.main(["--input", source, "--output", str(out), *flags]) == 0
    assert service.requests_served == before and out.read_text() == reference.read_text()
    # Other sampling settings on the same work directory are refused (exit 2).
    changed = [f if f != "0" else "0.5" for f in flags]
    assert TOOL.main(["--input", source, "--output", str(out), *changed]) == 2


# --------------------------------------------------------------------------- retries


class _FlakyServer(ThreadingHTTPServer):
    """Answers /v1/completions; `plan(prompt, attempt)` gives a status (200: a completion
    derived from the prompt). Counts attempts per prompt."""

    def __init__(self, plan):
        self.plan, self.attempts, self.lock = plan, {}, threading.Lock()
        super().__init__(("127.0.0.1", 0), _FlakyHandler)


class _FlakyHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["prompt"]
        with self.server.lock:
            attempt = self.server.attempts[prompt] = self.server.attempts.get(prompt, 0) + 1
        status = self.server.plan(prompt, attempt)
        if status == 200:
            reply = {"choices": [{"index": 0, "text": f"z{len(prompt)}", "finish_reason":
                                  "stop"}], "usage": {"completion_tokens": 3}}
        else:
            reply = {"error": {"message": f"status {status}"}}
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _flaky(plan):
    server = _FlakyServer(plan)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_retries_then_success_and_failures_counted(tmp_path):
    docs = DOCUMENTS[:3]
    source = _write_input(tmp_path / "docs.jsonl", docs)
    prompts = [synthesis.chunk_prompt(_chunks(d), i) for d in docs
               for i in range(len(_chunks(d)))]
    retry = ["--retries", "3", "--retry-backoff", "0.001", "--max-backoff", "0.01"]

    # 500 then 429, then a reply: every chunk succeeds on its third attempt.
    with _flaky(lambda prompt, attempt: {1: 500, 2: 429}.get(attempt, 200)) as (server, url):
        out = tmp_path / "ok.jsonl"
        args = _args("--input", source, "--output", str(out), *_http_flags(url[:-3]), *retry)
        stats = TOOL.synthesize(args, log=lambda message: None)
        assert (stats.done, stats.failed, stats.incomplete) == (len(prompts), 0, 0)
        assert stats.requests == 3 * len(prompts) and stats.retries == 2 * len(prompts)
        assert stats.tokens == 3 * len(prompts)
        assert sorted(server.attempts.values()) == [3] * len(prompts)
        assert [z for line in _read_jsonl(out) for z in line["latent_text"]] == [
            f"z{len(p)}" for p in prompts]

    # Document "b"'s second chunk always fails: it is counted, "b" is left out, the rest
    # is written, and the rerun asks for that chunk only.
    bad = synthesis.chunk_prompt(_chunks(docs[1]), 1)
    with _flaky(lambda prompt, attempt: 503 if prompt == bad else 200) as (server, url):
        out = tmp_path / "partial.jsonl"
        argv = ["--input", source, "--output", str(out), *_http_flags(url[:-3]), *retry]
        stats = TOOL.synthesize(_args(*argv), log=lambda message: None)
        assert (stats.done, stats.failed, stats.written, stats.incomplete) == (
            len(prompts) - 1, 1, 2, 1)
        assert server.attempts[bad] == 4  # the first try and 3 retries
        assert "503" in stats.errors[0] and "chunk 1 of document 'b'" in stats.errors[0]
        assert [line["id"] for line in _read_jsonl(out) if "id" in line] == ["a"]
        assert len(_read_jsonl(out)) == 2
        server.attempts.clear()
        assert TOOL.main(argv) == 1  # still incomplete: exit 1
        assert server.attempts == {bad: 4}

    # A 400 is not retried.
    with _flaky(lambda prompt, attempt: 400) as (server, url):
        teacher = synthesis.HTTPTeacher(url, retries=5, backoff=0.001)
        [failure] = teacher.generate(["p"])
        assert isinstance(failure, synthesis.TeacherFailure) and failure.attempts == 1
        assert server.attempts == {"p": 1}
    # A refused connection is retried, then fails.
    teacher = synthesis.HTTPTeacher(url, retries=2, backoff=0.001, timeout=2)
    [failure] = teacher.generate(["p"])
    assert isinstance(failure, synthesis.TeacherFailure) and failure.attempts == 3


# --------------------------------------------------------------------------- project teacher


def test_project_teacher_equals_generate_with_details(served, tmp_path):
    import torch

    from megatron_latent.inference import GenerationConfig, generate_with_details

    url, _, ckpt, _ = served
    teacher = synthesis.ProjectTeacher(str(ckpt), device=torch.device("cpu"),
                                       max_new_tokens=MAX_TOKENS, temperature=0.0,
                                       batch_size=3)
    prompts = [synthesis.chunk_prompt(_chunks(d), i) for d in DOCUMENTS
               for i in range(len(_chunks(d)))]
    outcomes = teacher.generate(prompts)
    tokenizer = teacher.tokenizer
    reference = generate_with_details(
        teacher.model, [tokenizer.tokenize(p) for p in prompts],
        GenerationConfig(max_new_tokens=MAX_TOKENS, greedy=True,
                         stop_token_ids=(int(tokenizer.eod),)),
        detokenize=tokenizer.detokenize)
    assert [o.text for o in outcomes] == [r.text for r in reference]
    assert [o.tokens for o in outcomes] == [len(r.tokens) for r in reference]
    # A prompt too long for the context is a counted failure, not a crash.
    [too_long] = teacher.generate(["t1 " * 300])
    assert isinstance(too_long, synthesis.TeacherFailure) and "context" in too_long.error

    # The tool with --teacher project writes the same latents as the HTTP path (same model).
    source = _write_input(tmp_path / "docs.jsonl")
    out_project, out_http = tmp_path / "project.jsonl", tmp_path / "http.jsonl"
    assert TOOL.main(["--input", source, "--output", str(out_project), "--teacher", "project",
                      "--load", str(ckpt), "--device", "cpu", "--temperature", "0",
                      "--max-tokens", str(MAX_TOKENS), "--batch-size", "4",
                      "--limit-documents", "3"]) == 0
    assert TOOL.main(["--input", source, "--output", str(out_http), *_http_flags(url),
                      "--limit-documents", "3"]) == 0
    assert out_project.read_text() == out_http.read_text()
    assert len(_read_jsonl(out_project)) == 3


def test_bad_flags_exit_2(tmp_path, capsys):
    source = _write_input(tmp_path / "docs.jsonl")
    out = str(tmp_path / "o.jsonl")
    assert TOOL.main(["--input", source, "--output", out, "--teacher", "http"]) == 2
    assert "--base-url" in capsys.readouterr().err
    assert TOOL.main(["--input", str(tmp_path / "missing.jsonl"), "--output", out,
                      "--teacher", "http", "--base-url", "http://127.0.0.1:1/v1"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert TOOL.main(["--input", source, "--output", out, "--teacher", "project",
                      "--load", str(tmp_path / "nope")]) == 2
    assert "--load" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "t1 t2.", "chunks": ["t1"]}\n')
    assert TOOL.main(["--input", str(bad), "--output", out, "--teacher", "http",
                      "--base-url", "http://127.0.0.1:1/v1"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    template = tmp_path / "template.txt"
    template.write_text("no fields")
    assert TOOL.main(["--input", source, "--output", out, "--teacher", "http",
                      "--base-url", "http://127.0.0.1:1/v1",
                      "--prompt-template", str(template)]) == 2
    assert "--prompt-template" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_hf_teacher_batched_equals_one_at_a_time(tmp_path):
    """Left padding: a batch of prompts of different lengths decodes as each prompt alone."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokenizer_file = write_wordlevel_tokenizer(str(tmp_path / "tok"))
    folder = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_file=tokenizer_file,
                            eos_token="<|endoftext|>").save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                               eos_token_id=511, bos_token_id=511)).save_pretrained(folder)
    teacher = synthesis.HFTeacher(str(folder), max_new_tokens=5, temperature=0.0, batch_size=4)
    prompts = ["t1 t2 t3", "t7", "t9 t8 t7 t6 t5 t4"]
    batched = teacher.generate(prompts)
    alone = [teacher.generate([p])[0] for p in prompts]
    assert batched == alone
    assert all(isinstance(o, synthesis.TeacherResult) and o.tokens > 0 for o in batched)

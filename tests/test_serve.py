"""tools/serve.py's OpenAI-compatible server on a trained checkpoint, over real loopback HTTP:
completions equal tools/generate.py's, and errors are OpenAI-shaped."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from megatron_latent.inference import GenerationConfig, generate_with_details
from megatron_latent.inference.server import (
    CHAT_STOP,
    CompletionService,
    render_chat,
    start_in_thread,
)

from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["t1 t3 t5 t7", "t10 t11"]
MAX_TOKENS = 6


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served(single_process_parallel, tmp_path_factory):
    """(base URL, service, tools/generate.py --json lines for PROMPTS, checkpoint) on a
    2-iteration checkpoint; the server runs on an ephemeral loopback port for the module."""
    import megatron_latent.distributed

    tmp_path = tmp_path_factory.mktemp("serve")
    prefix = write_token_dataset(str(tmp_path / "data" / "tokens"))
    tokenizer_path = write_wordlevel_tokenizer(str(tmp_path / "tokenizer"))
    ckpt = tmp_path / "ckpt"
    run_training(TINY_FLAGS + [
        "--data-path", prefix, "--split", "90,10,0", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", tokenizer_path, "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "2", "--eval-iters", "0",
        "--save", str(ckpt)])
    generate_tool = _load_tool("generate")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        # generate.py tears the process group down at its end; the server needs it.
        patch.setattr(megatron_latent.distributed, "destroy_parallel", lambda: None)
        assert generate_tool.main(["--load", str(ckpt), "--greedy", "--device", "cpu",
                                   "--max-new-tokens", str(MAX_TOKENS), "--json",
                                   *sum([["--prompt", p] for p in PROMPTS], [])]) == 0
    expected = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    assert [line["prompt"] for line in expected] == PROMPTS

    import torch

    service = CompletionService.from_checkpoint(str(ckpt), device=torch.device("cpu"),
                                                model_name="tiny", max_batch=3)
    server, thread = start_in_thread(service, "127.0.0.1", 0)
    assert server.port != 0 and server.server_address[0] == "127.0.0.1"
    try:
        yield server.url, service, expected, ckpt
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def _request(url: str, path: str, body=None, method: str | None = None,
             raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method,
                                      headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_greedy_completions_equal_generate_tool(served):
    url, service, expected, _ = served
    status, reply = _request(url, "/v1/completions", {
        "model": "tiny", "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert status == 200, reply
    assert reply["object"] == "text_completion" and reply["model"] == "tiny"
    assert reply["id"].startswith("cmpl-") and isinstance(reply["created"], int)
    choices = reply["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["text"] for c in choices] == [line["completion"] for line in expected]
    finish = {"stop_token": "stop", "stop_string": "stop", "length": "length"}
    assert [c["finish_reason"] for c in choices] == [finish[line["finish_reason"]]
                                                     for line in expected]
    assert all(c["logprobs"] is None for c in choices)
    prompt_tokens = sum(len(service.tokenizer.tokenize(p)) for p in PROMPTS)
    completion_tokens = sum(len(line["tokens"]) for line in expected)
    assert reply["usage"] == {"prompt_tokens": prompt_tokens,
                              "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
    # One prompt alone (a string, no model field) decodes the same as within the batch.
    status, single = _request(url, "/v1/completions", {
        "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0.0})
    assert status == 200 and single["choices"][0]["text"] == expected[0]["completion"]
    assert single["usage"]["prompt_tokens"] == len(service.tokenizer.tokenize(PROMPTS[0]))


def test_n_samples_with_seed(served):
    url, service, _, _ = served
    body = {"prompt": PROMPTS[1], "max_tokens": 5, "temperature": 1.5, "top_p": 0.95,
            "n": 2, "seed": 3}
    status, first = _request(url, "/v1/completions", body)
    assert status == 200, first
    _, again = _request(url, "/v1/completions", body)
    assert [c["index"] for c in first["choices"]] == [0, 1]
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    ids = service.tokenizer.tokenize(PROMPTS[1])
    reference = generate_with_details(
        service.model, [ids, ids],
        GenerationConfig(max_new_tokens=5, temperature=1.5, top_p=0.95, seed=3,
                         stop_token_ids=(service.tokenizer.eod,)),
        detokenize=service.tokenizer.detokenize)
    assert [c["text"] for c in first["choices"]] == [r.text for r in reference]
    assert first["usage"]["prompt_tokens"] == len(ids)  # the prompt counts once
    assert first["usage"]["completion_tokens"] == sum(len(r.tokens) for r in reference)
    # Two prompts x n=2 = 4 rows over --max-batch 3: two batches, choice order kept.
    status, many = _request(url, "/v1/completions", dict(body, prompt=PROMPTS))
    assert status == 200 and [c["index"] for c in many["choices"]] == [0, 1, 2, 3]


def test_stop_strings(served):
    url, _, expected, _ = served
    text = expected[0]["completion"]
    words = text.split()
    assert len(words) >= 2, text
    stop = words[1]
    status, reply = _request(url, "/v1/completions", {
        "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stop": [stop]})
    assert status == 200, reply
    choice = reply["choices"][0]
    assert choice["text"] == text[:text.find(stop)]
    assert choice["finish_reason"] == "stop"
    status, as_string = _request(url, "/v1/completions", {
        "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stop": stop})
    assert status == 200 and as_string["choices"][0]["text"] == choice["text"]


def test_chat_completions(served):
    url, service, _, _ = served
    messages = [{"role": "system", "content": "t2 t4"},
                {"role": "user", "content": [{"type": "text", "text": "t10 t11"}]}]
    prompt = render_chat(messages)
    assert prompt == "System: t2 t4\nUser: t10 t11\nAssistant:"
    status, reply = _request(url, "/v1/chat/completions", {
        "model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0})
    assert status == 200, reply
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    choice = reply["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    status, completion = _request(url, "/v1/completions", {
        "prompt": prompt, "max_tokens": 4, "temperature": 0, "stop": CHAT_STOP})
    assert status == 200
    assert choice["message"]["content"] == completion["choices"][0]["text"].lstrip()
    assert choice["finish_reason"] == completion["choices"][0]["finish_reason"]
    assert reply["usage"] == completion["usage"]
    assert reply["usage"]["prompt_tokens"] == len(service.tokenizer.tokenize(prompt))


def test_models_and_health(served):
    url, service, _, _ = served
    status, models = _request(url, "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["object"] == "model" and models["data"][0]["method"] == "vanilla"
    assert _request(url, "/v1/models/tiny")[1]["id"] == "tiny"
    status, health = _request(url, "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": ["t1", 3]}, "prompt"),
    ("/v1/completions", {"prompt": "t1", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "t1", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "t1", "max_tokens": 10_000}, "max_tokens"),
    ("/v1/completions", {"prompt": "t1", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "t1", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "t1", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "t1", "seed": 1.5}, "seed"),
    ("/v1/completions", {"prompt": "t1", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "t1", "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": "t1", "logprobs": 1}, "logprobs"),
    ("/v1/completions", {"prompt": "t1", "stream": True}, "stream"),
    ("/v1/completions", {"prompt": "t1", "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "t1"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "t1"}],
                              "logprobs": True}, "logprobs"),
])
def test_bad_fields_are_400_naming_the_field(served, path, body, param):
    url, _, _, _ = served
    status, reply = _request(url, path, body)
    assert status == 400, reply
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param in error["message"]


def test_other_errors(served, monkeypatch):
    url, service, _, _ = served
    status, reply = _request(url, "/v1/completions", raw=b"{not json")
    assert status == 400 and "JSON" in reply["error"]["message"]
    status, reply = _request(url, "/v1/completions", {"model": "other", "prompt": "t1"})
    assert status == 404 and reply["error"]["param"] == "model"
    status, reply = _request(url, "/v1/nothing-here", {"prompt": "t1"})
    assert status == 404 and "/v1/nothing-here" in reply["error"]["message"]
    assert _request(url, "/nothing")[0] == 404
    assert _request(url, "/v1/completions")[0] == 405

    def broken(*args, **kwargs):
        raise RuntimeError("the model exploded")

    monkeypatch.setattr(service, "_generate", broken)
    status, reply = _request(url, "/v1/completions", {"prompt": "t1", "max_tokens": 2})
    assert status == 500 and reply["error"]["type"] == "server_error"
    assert "the model exploded" in reply["error"]["message"]
    monkeypatch.undo()
    assert not service.lock.locked()
    status, reply = _request(url, "/v1/completions", {"prompt": "t1", "max_tokens": 2})
    assert status == 200 and len(reply["choices"]) == 1  # still serving


def test_serve_tool_help_and_bad_checkpoint(tmp_path, capsys):
    serve_tool = _load_tool("serve")
    with pytest.raises(SystemExit) as exit_info:
        serve_tool.main(["--help"])
    assert exit_info.value.code == 0
    assert "curl" in capsys.readouterr().out
    assert serve_tool.main(["--load", str(tmp_path), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


def test_serve_tool_process_serves_and_stops_on_sigterm(served):
    """The command line end to end: it prints the URL when ready, answers, and exits 0 on
    SIGTERM."""
    _, _, expected, ckpt = served
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "serve.py"), "--load", str(ckpt), "--port", "0",
         "--device", "cpu", "--model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = process.stdout.readline()
        assert " at http://127.0.0.1:" in line, (line, process.stderr.read()[-2000:]
                                                  if process.poll() is not None else "")
        url = line.rsplit(" at ", 1)[1].strip().removesuffix("/v1")
        status, reply = _request(url, "/v1/completions", {
            "model": "tiny", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0})
        assert status == 200 and reply["choices"][0]["text"] == expected[0]["completion"]
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err[-2000:]
    assert "stopped" in out and "SIGTERM" in err

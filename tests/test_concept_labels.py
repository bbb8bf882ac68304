"""tools/label_concepts.py: attribution labels against a plain autograd reference, the output
layout, weights, ties, tokenizer checks and resumption."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_latent.sae import TopKSAE, write_sae
from megatron_latent.sae.attribution import labels_from_scores
from megatron_latent.sae.labels import LabelsError, read_labels, window_bounds

from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
K = 4


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_sae(d_in: int, d_sae: int, k: int, seed: int = 0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    return TopKSAE(W_enc=torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5,
                   b_enc=torch.randn(d_sae, generator=g) * 0.1,
                   W_dec=torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5,
                   b_dec=torch.randn(d_in, generator=g) * 0.1, k=k,
                   normalize_activations="layer_norm")


@pytest.fixture(scope="module")
def setup(single_process_parallel, tmp_path_factory):
    base = tmp_path_factory.mktemp("labels")
    prefix = write_token_dataset(str(base / "tokens"), num_documents=24)
    tokenizer = write_wordlevel_tokenizer(str(base / "tokenizer"))
    ckpt = base / "ckpt"
    run_training(TINY_FLAGS + ["--data-path", prefix, "--split", "90,10,0",
                               "--tokenizer-type", "HuggingFaceTokenizer",
                               "--tokenizer-model", tokenizer,
                               "--micro-batch-size", "2", "--global-batch-size", "4",
                               "--train-iters", "3", "--eval-iters", "0", "--save", str(ckpt)])
    sae_dir = write_sae(random_sae(32, 48, 6), str(base / "sae"))
    return {"base": base, "prefix": prefix, "ckpt": ckpt, "sae": sae_dir,
            "tokenizer": tokenizer}


def flags(s, out, *extra):
    return ["--load", str(s["ckpt"]), "--layer", "0", "--sae", s["sae"], "--data-path",
            s["prefix"], "--seq-length", "32", "--output-prefix", str(out), "--batch-size", "8",
            "--chunk-windows", "10", "--device", "cpu", "--no-progress", *extra]


def reference_labels(hf, sae: TopKSAE, ids: torch.Tensor, layer: int):
    """Plain autograd: HF forward, per-window mean shifted CE, grad at hidden_states[layer+1],
    the encode written out, top-K by a stable sort (lowest id first on ties)."""
    out = hf(ids, output_hidden_states=True)
    h = out.hidden_states[layer + 1]
    h.retain_grad()
    logits = out.logits
    losses = [torch.nn.functional.cross_entropy(logits[b, :-1], ids[b, 1:])
              for b in range(ids.shape[0])]
    torch.stack(losses).sum().backward()
    g = h.grad
    with torch.no_grad():
        mu = h.mean(-1, keepdim=True)
        sigma = h.std(-1, keepdim=True, unbiased=True) + 1e-5
        pre = ((h - mu) / sigma - sae.b_dec) @ sae.W_enc + sae.b_enc
        order = torch.sort(-pre, dim=-1, stable=True).indices[..., :sae.k]
        z = torch.zeros_like(pre).scatter(-1, order, pre.gather(-1, order).clamp_min(0))
        score = (g @ sae.W_dec.T) * z
        top = torch.sort(-score, dim=-1, stable=True).indices[..., :K]
    return top, score


def test_labels_equal_plain_autograd_and_keep_the_layout(setup, tmp_path):
    transformers = pytest.importorskip("transformers")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    s = setup
    out = tmp_path / "lab"
    assert tool("label_concepts").main(flags(s, out)) == 0
    labels = read_labels(str(out), s["prefix"])
    data = IndexedDataset(s["prefix"])
    # Same documents and sequences; K values per token.
    for part in ("ids", "scores", "weights"):
        ds = labels.parts[part]
        np.testing.assert_array_equal(ds.document_indices, data.document_indices)
        np.testing.assert_array_equal(ds.sequence_lengths, data.sequence_lengths * K)
    ids = np.concatenate([labels.sequence(i)[0] for i in range(len(labels))])
    scores = np.concatenate([labels.sequence(i)[1] for i in range(len(labels))])
    weights = np.concatenate([labels.sequence(i)[2] for i in range(len(labels))])
    tokens = np.concatenate([data.get(i) for i in range(len(data))]).astype(np.int64)
    bounds = window_bounds(len(tokens), 32)
    assert bounds[-1][1] - bounds[-1][0] < 32  # a shorter tail window exists

    # The last token of every window has weight 0, every other token weight 1.
    expected = np.ones(len(tokens), np.uint8)
    expected[[e - 1 for _, e in bounds]] = 0
    np.testing.assert_array_equal(weights, np.repeat(expected[:, None], K, axis=1))

    hf_dir = tmp_path / "hf"
    assert tool("convert_checkpoint").main(["to-hf", "--load", str(s["ckpt"]),
                                            "--output", str(hf_dir)]) == 0
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(str(hf_dir)).float().eval()
    sae = read_sae_checked(s["sae"])
    checked = 0
    for start, end in bounds[:6] + bounds[-1:]:
        window = torch.from_numpy(tokens[start:end])[None]
        top, score = reference_labels(hf, sae, window, 0)
        for t in range(end - start - 1):  # the last position is arbitrary (weight 0)
            ranked = torch.sort(-score[0, t], stable=True).values
            if 0 < (ranked[K] - ranked[K - 1]).abs() < 1e-5:
                continue  # a near-tie: ids may legitimately differ (exact ties are checked)
            want = np.sort(top[0, t].numpy())
            np.testing.assert_array_equal(ids[start + t], want)
            np.testing.assert_allclose(scores[start + t], score[0, t, want].numpy(),
                                       rtol=1e-3, atol=1e-7)
            checked += 1
    assert checked > 100
    meta = labels.meta
    assert meta["layer"] == 0 and meta["k_attr"] == K and meta["seq_length"] == 32
    assert not Path(str(out) + ".partial").exists()
    # Labels made for these tokens are refused for other data.
    other = write_token_dataset(str(tmp_path / "other"), num_documents=5, seed=9)
    with pytest.raises(LabelsError, match="made for"):
        read_labels(str(out), other)


def read_sae_checked(path: str) -> TopKSAE:
    from megatron_latent.sae import read_sae

    return read_sae(path)


def test_ties_go_to_the_lowest_id_and_min_score_zero_weights():
    scores = torch.tensor([[[0.0, 2.0, 1.0, 1.0, 1.0, 0.0, 1.0],
                            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                            [3.0, -1.0, 0.0, 0.0, 2.0, 0.0, 0.0]]])
    out = labels_from_scores(scores, 4, min_score=0.5)
    assert out.ids.tolist() == [[[1, 2, 3, 4], [0, 1, 2, 3], [0, 2, 3, 4]]]
    assert out.scores.tolist() == [[[2, 1, 1, 1], [0, 0, 0, 0], [3, 0, 0, 2]]]
    assert out.weights.tolist() == [[[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]]
    plain = labels_from_scores(scores, 4)
    assert plain.weights.tolist() == [[[1] * 4, [1] * 4, [0] * 4]]


def test_bad_input_is_refused_naming_the_flag(setup, tmp_path, capsys):
    s = setup
    wrong_sae = write_sae(random_sae(16, 48, 6), str(tmp_path / "wrong"))
    cases = [(["--layer", "2"], "--layer 2"),
             (["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size 2"),
             (["--sae", wrong_sae], "d_in=16"),
             (["--k-attr", "49"], "--k-attr 49"),
             (["--seq-length", "64"], "--seq-length 64"),
             (["--data-path", str(tmp_path / "none")], "--data-path")]
    label_concepts = tool("label_concepts")
    for extra, expected in cases:
        assert label_concepts.main(flags(s, tmp_path / "o") + extra) == 2
        assert expected in capsys.readouterr().err
    assert not list(tmp_path.glob("o*"))


def test_tokenizer_mismatch_is_refused_naming_both(setup, tmp_path, capsys):
    from megatron_latent.data.provenance import tokenizer_fingerprint
    from megatron_latent.data.tokenizers import build_tokenizer

    s = setup
    prefix = write_token_dataset(str(tmp_path / "data"), num_documents=4)
    fp = tokenizer_fingerprint(build_tokenizer("HuggingFaceTokenizer",
                                               tokenizer_model=s["tokenizer"])).to_json()
    sidecar = Path(prefix + ".tokenizer.json")
    sidecar.write_text(json.dumps(fp))
    args = flags(s, tmp_path / "ok", "--data-path", prefix)
    assert tool("label_concepts").main(args) == 0  # the same tokenizer passes
    sidecar.write_text(json.dumps(dict(fp, tokenizer_type="SentencePieceTokenizer",
                                       vocab_sha256="0" * 64)))
    assert tool("label_concepts").main(flags(s, tmp_path / "bad", "--data-path", prefix)) == 2
    err = capsys.readouterr().err
    assert "SentencePieceTokenizer" in err and "HuggingFaceTokenizer" in err
    assert "vocabularies differ" in err


def test_an_interrupted_run_leaves_nothing_valid_and_resumes(setup, tmp_path, monkeypatch):
    from megatron_latent.sae import attribution, labels

    s = setup
    label_concepts = tool("label_concepts")
    forwards = {"n": 0}
    real = attribution.label_windows

    def counting(*a, **kw):
        forwards["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(attribution, "label_windows", counting)
    assert label_concepts.main(flags(s, tmp_path / "straight")) == 0
    straight = read_labels(str(tmp_path / "straight"))
    assert forwards["n"] == 10  # 48 windows in chunks of 10: 8 + 2 per chunk, tail alone

    calls = {"n": 0}
    original = labels.save_chunk

    def crashing(path, chunk):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(path, chunk)

    monkeypatch.setattr(labels, "save_chunk", crashing)
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        label_concepts.main(flags(s, out))
    with pytest.raises(LabelsError):
        read_labels(str(out))
    assert len(list(Path(str(out) + ".partial").glob("chunk_*.npz"))) == 2
    assert label_concepts.main(flags(s, out, "--k-attr", "3")) == 2  # other flags: refused

    monkeypatch.setattr(labels, "save_chunk", original)
    forwards["n"] = 0
    assert label_concepts.main(flags(s, out)) == 0
    assert forwards["n"] == 6  # the two finished chunks were not redone
    resumed = read_labels(str(out))
    for i in range(len(straight)):
        for a, b in zip(resumed.sequence(i), straight.sequence(i)):
            np.testing.assert_array_equal(a, b)

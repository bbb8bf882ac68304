"""SAE folders, converters and the exact encode/decode against plain-PyTorch references."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from megatron_latent.sae import (
    SAEFormatError,
    TopKSAE,
    convert_openai,
    convert_sparsify,
    is_sae_folder,
    read_sae,
    write_sae,
)


def random_sae(d_in=16, d_sae=40, k=5, norm="layer_norm", apply_b_dec=True, seed=0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    return TopKSAE(W_enc=torch.randn(d_in, d_sae, generator=g),
                   b_enc=torch.randn(d_sae, generator=g) * 0.1,
                   W_dec=torch.randn(d_sae, d_in, generator=g),
                   b_dec=torch.randn(d_in, generator=g) * 0.1, k=k,
                   apply_b_dec_to_input=apply_b_dec, normalize_activations=norm,
                   metadata={"teacher": {"checkpoint": "/x"}, "layer": 3})


# -- a reference written from the notes, one token at a time -------------------------------------

def reference_encode_decode(h, W_enc, b_enc, W_dec, b_dec, k, layer_norm, apply_b_dec):
    zs, outs = [], []
    for row in h.double():
        n = row.numel()
        if layer_norm:
            mu = sum(row.tolist()) / n
            var = sum((v - mu) ** 2 for v in row.tolist()) / (n - 1)  # Bessel
            sigma = var ** 0.5 + 1e-5
        else:
            mu, sigma = 0.0, 1.0
        x = (row - mu) / sigma
        if apply_b_dec:
            x = x - b_dec.double()
        pre = x @ W_enc.double() + b_enc.double()
        order = sorted(range(pre.numel()), key=lambda j: (-pre[j].item(), j))  # lowest id first
        z = torch.zeros_like(pre)
        for j in order[:k]:
            z[j] = max(pre[j].item(), 0.0)
        zs.append(z)
        outs.append((z @ W_dec.double() + b_dec.double()) * sigma + mu)
    return torch.stack(zs), torch.stack(outs)


@pytest.mark.parametrize("norm,apply_b_dec", [("layer_norm", True), ("none", True),
                                              ("layer_norm", False)])
def test_encode_decode_match_the_reference(norm, apply_b_dec):
    sae = random_sae(norm=norm, apply_b_dec=apply_b_dec).to(dtype=torch.float64)
    h = torch.randn(12, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3 + 1
    z_ref, out_ref = reference_encode_decode(h, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec,
                                             sae.k, norm == "layer_norm", apply_b_dec)
    z = sae.encode(h)
    assert torch.equal(z != 0, z_ref != 0)
    torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sae.reconstruct(h), out_ref, rtol=1e-10, atol=1e-10)
    assert int((z != 0).sum(dim=-1).max()) <= sae.k


def test_ties_keep_the_lowest_ids():
    sae = random_sae(d_in=8, d_sae=12, k=2, norm="none", seed=2).to(dtype=torch.float64)
    tied = [3, 6, 8, 10]  # identical columns, far above the others: four-way tie for 2 places
    for j in tied:
        sae.W_enc[:, j] = sae.W_enc[:, 1]
        sae.b_enc[j] = 100.0
    sae.b_enc[1] = -100.0
    h = torch.randn(5, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z_ref, out_ref = reference_encode_decode(h, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec,
                                             2, False, True)
    z = sae.encode(h)
    assert (z_ref[:, [3, 6]] > 0).all() and (z_ref[:, [8, 10]] == 0).all()
    assert torch.equal(z != 0, z_ref != 0)
    torch.testing.assert_close(sae.reconstruct(h), out_ref)
    # Fewer positive entries than k: the lowest ids among equal (zero) values are picked.
    sae.b_enc.fill_(0.0)
    sae.W_enc.zero_()
    from megatron_latent.sae import topk_indices
    assert topk_indices(sae.pre_activations(h), 2).tolist() == [[0, 1]] * 5


# -- the folder layout -----------------------------------------------------------------------------

def test_round_trip_keeps_tensors_and_config(tmp_path):
    sae = random_sae()
    write_sae(sae, str(tmp_path / "sae"))
    assert sorted(os.listdir(tmp_path / "sae")) == ["cfg.json", "sae_weights.safetensors"]
    back = read_sae(str(tmp_path / "sae"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    assert (back.k, back.apply_b_dec_to_input, back.normalize_activations, back.metadata) == (
        sae.k, sae.apply_b_dec_to_input, sae.normalize_activations, sae.metadata)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 16 and cfg["d_sae"] == 40
    assert cfg["rescale_acts_by_decoder_norm"] is False


@pytest.mark.parametrize("key,value", [
    ("architecture", "standard"), ("architecture", "jumprelu"),
    ("normalize_activations", "expected_average_only_in"),
    ("normalize_activations", "constant_norm_rescale"),
    ("rescale_acts_by_decoder_norm", True), ("k", None), ("d_sae", 41),
])
def test_unsupported_config_is_refused_naming_file_and_key(tmp_path, key, value):
    folder = tmp_path / "sae"
    write_sae(random_sae(), str(folder))
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError) as info:
        read_sae(str(folder))
    assert key in str(info.value) and "cfg.json" in str(info.value)


def test_failed_writes_never_leave_a_valid_looking_folder(tmp_path, monkeypatch):
    import safetensors.torch

    from megatron_latent.sae import files

    folder = tmp_path / "sae"

    def broken_save(tensors, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError):
        write_sae(random_sae(), str(folder))
    assert not is_sae_folder(str(folder)) and not (folder / "cfg.json").exists()
    assert os.listdir(folder) == []  # no temporary file left behind
    monkeypatch.undo()

    # Overwriting: new weights written, then the cfg write fails -> the folder is not valid.
    write_sae(random_sae(seed=0), str(folder))
    monkeypatch.setattr(files, "atomic_write_text",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        write_sae(random_sae(seed=1), str(folder))
    with pytest.raises(SAEFormatError, match="cfg.json not found"):
        read_sae(str(folder))


# -- converters against tiny fixtures of the public layouts -----------------------------------------

def test_openai_checkpoint_converts_to_the_same_encoder(tmp_path):
    d, n, k = 16, 48, 4
    g = torch.Generator().manual_seed(4)
    state = {"pre_bias": torch.randn(d, generator=g) * 0.1,
             "latent_bias": torch.randn(n, generator=g) * 0.1,
             "stats_last_nonzero": torch.zeros(n, dtype=torch.long),
             "encoder.weight": torch.randn(n, d, generator=g),
             "decoder.weight": torch.randn(d, n, generator=g),
             "activation": "TopK", "activation_state_dict": {"k": k}, "normalize": True}
    torch.save(state, tmp_path / "ae.pt")
    sae = convert_openai(str(tmp_path / "ae.pt"))
    assert (sae.k, sae.normalize_activations, sae.apply_b_dec_to_input) == (k, "layer_norm", True)
    h = torch.randn(6, d, generator=g) * 2 + 0.5
    # OpenAI's forward: LN (unbiased std + eps), encoder(x - pre_bias) + latent_bias, TopK,
    # decoder(latents) + pre_bias, then un-normalise.
    mu = h.mean(-1, keepdim=True)
    std = (h - mu).std(-1, keepdim=True) + 1e-5
    x = (h - mu) / std
    pre = torch.nn.functional.linear(x - state["pre_bias"], state["encoder.weight"],
                                     state["latent_bias"])
    top = torch.topk(pre, k, dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    out = (torch.nn.functional.linear(latents, state["decoder.weight"]) + state["pre_bias"]) * std + mu
    torch.testing.assert_close(sae.encode(h), latents)
    torch.testing.assert_close(sae.reconstruct(h), out)
    write_sae(sae, str(tmp_path / "out"))
    assert read_sae(str(tmp_path / "out")).metadata["converted_from"] == "openai"

    state["activation"] = "ReLU"
    torch.save(state, tmp_path / "relu.pt")
    with pytest.raises(SAEFormatError, match="activation"):
        convert_openai(str(tmp_path / "relu.pt"))


def test_sparsify_folder_converts_to_the_same_encoder(tmp_path):
    d, n, k = 16, 32, 3
    g = torch.Generator().manual_seed(5)
    folder = tmp_path / "layers.3"
    folder.mkdir()
    tensors = {"encoder.weight": torch.randn(n, d, generator=g),
               "encoder.bias": torch.randn(n, generator=g) * 0.1,
               "W_dec": torch.randn(n, d, generator=g), "b_dec": torch.randn(d, generator=g)}
    save_file(tensors, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(
        {"expansion_factor": 2, "normalize_decoder": True, "num_latents": 0, "k": k,
         "multi_topk": False, "skip_connection": False, "d_in": d}))
    sae = convert_sparsify(str(folder))
    assert (sae.k, sae.normalize_activations) == (k, "none")
    h = torch.randn(7, d, generator=g)
    # sparsify: relu(encoder(x - b_dec)), top-k, sum of chosen W_dec rows + b_dec.
    pre = torch.nn.functional.linear(h - tensors["b_dec"], tensors["encoder.weight"],
                                     tensors["encoder.bias"]).relu()
    top = torch.topk(pre, k, dim=-1)
    out = (top.values[..., None] * tensors["W_dec"][top.indices]).sum(-2) + tensors["b_dec"]
    torch.testing.assert_close(sae.reconstruct(h), out)
    torch.testing.assert_close(sae.encode(h).gather(-1, top.indices), top.values)

    (folder / "cfg.json").write_text(json.dumps({"k": k, "skip_connection": True}))
    with pytest.raises(SAEFormatError, match="skip_connection"):
        convert_sparsify(str(folder))


def test_negative_pre_activations_in_the_top_k_are_zeroed():
    sae = random_sae(norm="layer_norm", seed=6).to(dtype=torch.float64)
    sae.b_enc -= 4.0  # most rows have fewer than k positive pre-activations
    h = torch.randn(10, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    z_ref, out_ref = reference_encode_decode(h, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec,
                                             sae.k, True, True)
    assert int((z_ref != 0).sum(dim=-1).min()) < sae.k
    torch.testing.assert_close(sae.encode(h), z_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sae.reconstruct(h), out_ref, rtol=1e-10, atol=1e-10)

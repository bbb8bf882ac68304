"""BoLT's E-step (megatron_latent/latent/estep.py) at TP=2 on two gloo processes: the same
candidates z, log q and log p as TP=1 (the grown vocabulary's padded rows differ between the
two layouts and are masked), hence the same choices."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_latent_tokens import WORD_VOCAB  # noqa: E402
from test_latent_tokens_tp import grown  # noqa: E402, F401 - the grown checkpoint fixture

from megatron_latent.latent import estep  # noqa: E402
from megatron_latent.latent.tokens import latent_token_ids  # noqa: E402

SETTINGS = dict(num_samples=4, max_prompt=16, max_new=8, max_seq=24, seed=3, iteration=1,
                batch_size=5)


def _run(checkpoint: Path, tp: int):
    from megatron_latent.inference.loading import load_model_for_inference
    from megatron_latent.latent.formats import document_start_id

    loaded = load_model_for_inference(str(checkpoint), tensor_parallel_size=tp,
                                      device=torch.device("cpu"))
    t = latent_token_ids(loaded.tokenizer)
    rng = np.random.default_rng(1)
    docs = [estep.EStepDocument(50 + d, [[int(v) for v in rng.integers(0, WORD_VOCAB - 1, 5)]
                                         for _ in range(3)]) for d in range(2)]
    return estep.estep_documents(loaded.model, docs, t, document_start_id(loaded.tokenizer),
                                 estep.EStepSettings(**SETTINGS))


def test_tp2_equals_tp1(use_parallel, grown):  # noqa: F811
    use_parallel(1)
    reference = _run(grown, 1)
    use_parallel(2)
    sharded = _run(grown, 2)
    for a, b in zip(sharded, reference):
        assert [c.candidates for c in a.chunks] == [c.candidates for c in b.chunks]
        assert [c.choice for c in a.chunks] == [c.choice for c in b.chunks]
        for ca, cb in zip(a.chunks, b.chunks):
            assert np.allclose(ca.log_q, cb.log_q, atol=1e-5, rtol=0)
            assert np.allclose(ca.log_p, cb.log_p, atol=1e-5, rtol=0)
        assert a.flops == b.flops

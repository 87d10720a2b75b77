"""Prepacked bfloat16 Linear layers (pvl_search/model/packed_linear.py) give bit for bit what the
plain layers give, for any number of rows, and a runner that packs answers exactly as one that
does not: same embeddings, same rerank states, same latents."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pvl_search.model.packed_linear import PackedLinear, can_pack, pack_linears


def test_packing_applies_to_bfloat16_on_the_cpu_only() -> None:
    # The project pins a torch with oneDNN's linear operators: if one loses them, this says so.
    assert can_pack(torch.device("cpu"), torch.bfloat16)
    assert not can_pack(torch.device("cpu"), torch.float32)
    assert not can_pack(torch.device("cuda"), torch.bfloat16)


def test_a_packed_layer_equals_the_plain_one_for_any_rows() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 160).bfloat16()
    packed = PackedLinear(linear, rows=32)
    with torch.inference_mode():
        for shape in ((1, 96), (7, 96), (32, 96), (3, 40, 96)):
            x = torch.randn(shape).bfloat16()
            assert torch.equal(packed(x), linear(x)), shape
    no_bias = nn.Linear(96, 8, bias=False).bfloat16()
    with torch.inference_mode():
        x = torch.randn(5, 96).bfloat16()
        assert torch.equal(PackedLinear(no_bias, rows=5)(x), no_bias(x))


def test_pack_linears_replaces_bf16_layers_only() -> None:
    model = nn.Sequential(nn.Linear(8, 8).bfloat16(), nn.Sequential(nn.Linear(8, 8).bfloat16()), nn.Linear(8, 8))
    with torch.inference_mode():
        assert pack_linears(model, rows=4) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    assert isinstance(model[2], nn.Linear)  # float32: left as it is


def test_a_packing_runner_answers_as_a_plain_one() -> None:
    from indexer.encoding import ModelRunner
    from pvl_search.model.config import preset
    from pvl_search.model.perceiver import PerceiverVL

    torch.manual_seed(0)
    model = PerceiverVL(preset("tiny").replace(latent_reranker=True))
    plain_model = PerceiverVL(model.config)
    plain_model.load_state_dict(model.state_dict())
    packed = ModelRunner(model, "f" * 64, device="cpu", dtype="bfloat16")
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    assert not any(isinstance(m, PackedLinear) for m in model.modules())  # the caller's model is untouched
    plain = ModelRunner(plain_model, "f" * 64, device="cpu", dtype="bfloat16", pack_weights=False)
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    texts = ["a red circle moves left", "two squares, then a blue ring grows"]
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, model.config.frames, 64, 64, 3), dtype=np.uint8)
    masks = np.ones((3, model.config.frames), dtype=bool)
    with torch.inference_mode():
        a, b = packed.encode_queries(texts), plain.encode_queries(texts)
        assert np.array_equal(a.embeddings, b.embeddings) and np.array_equal(a.latents, b.latents)
        va = packed.encode_clips(frames, masks, keep_latents=True)
        vb = plain.encode_clips(frames, masks, keep_latents=True)
        assert np.array_equal(va.embeddings, vb.embeddings) and np.array_equal(va.latents, vb.latents)
        assert np.array_equal(va.rerank_states, vb.rerank_states)

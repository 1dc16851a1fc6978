"""Fused attention: the low-precision encoder's CUDA formulation (one `scaled_dot_product_attention` call with
the decomposed relative-position bias as its additive mask), run here on the CPU against the golden fp32
embeddings; and that the choice follows the device and `.to()` moves every weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
from SAMMed2DSegmentLib.model.lowp_encoder import LowPrecisionEncoder


def _agreement(embedding: torch.Tensor, reference: np.ndarray) -> tuple[float, float]:
    """(max |difference|, cosine) in float64."""
    a = embedding.double().flatten()
    b = torch.from_numpy(np.asarray(reference, dtype=np.float64)).flatten()
    return float((a - b).abs().max()), float(F.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("build, images", [("small", ("img1", "img2")), ("vit_b", ("img2",))])
def test_fused_formulation_in_fp32_matches_the_golden_embeddings(build, images, golden, request):
    """In fp32 the formulation is checked to the golden tolerance, not only to bf16's rounding."""
    model = request.getfixturevalue(f"{build}_model")
    encoder = LowPrecisionEncoder(model.image_encoder, torch.float32, fused_attention=True)
    prefix = "" if build == "vit_b" else "small_"
    for image in images:
        x = SamMed2DPredictor(model).preprocess(golden[f"{image}_image"])
        diff, cosine = _agreement(encoder(x), golden[f"{prefix}{image}_embedding"])
        assert diff <= 5e-5 and cosine >= 0.9999, (image, diff, cosine)


def test_fused_bf16_calls_sdpa_with_the_bias_as_an_aligned_mask(small_model, golden, monkeypatch):
    """Small build: one windowed block (16×16 grid in 14-windows: 14×14, 14×2, 2×14 and 2×2 queries, 196
    keys each) and one global block (256 × 256)."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        calls.append((query.shape[2], key.shape[2], attn_mask.dtype, attn_mask.stride(-2) % 16))
        assert attn_mask.shape == (*query.shape[:3], key.shape[2])
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    fused = LowPrecisionEncoder(small_model.image_encoder, torch.bfloat16, fused_attention=True)
    for image in ("img1", "img2"):
        x = SamMed2DPredictor(small_model).preprocess(golden[f"{image}_image"])
        _, cosine = _agreement(fused(x), golden[f"small_{image}_embedding"])
        assert cosine >= 0.9999, (image, cosine)
    shapes = [(196, 196), (28, 196), (28, 196), (4, 196), (256, 256)]
    assert calls == [(q, k, torch.bfloat16, 0) for q, k in shapes] * 2
    folded = LowPrecisionEncoder(small_model.image_encoder, torch.bfloat16, fused_attention=False)
    folded(x)
    assert len(calls) == 10  # the folded products never call it


def test_the_formulation_follows_the_device_unless_forced(small_model):
    chosen = LowPrecisionEncoder(small_model.image_encoder, torch.bfloat16)
    assert chosen.uses_fused_attention(torch.device("cuda"))
    assert not chosen.uses_fused_attention(torch.device("cpu"))
    forced = LowPrecisionEncoder(small_model.image_encoder, torch.bfloat16, fused_attention=True)
    assert forced.uses_fused_attention(torch.device("cpu"))
    off = LowPrecisionEncoder(small_model.image_encoder, torch.bfloat16, fused_attention=False)
    assert not off.uses_fused_attention(torch.device("cuda"))


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if hasattr(value, "__dict__"):
        return [t for v in vars(value).values() for t in _tensors(v)]
    return []


def test_to_moves_every_weight_and_the_forward_stays_on_that_device(small_model, golden):
    """On the meta device (no GPU needed): every weight moves, and neither formulation makes a tensor on
    the CPU on the way (mixing devices would raise)."""
    encoder = LowPrecisionEncoder(small_model.image_encoder, torch.bfloat16).to("meta")
    tensors = _tensors(encoder)
    assert len(tensors) > 20 and {t.device.type for t in tensors} == {"meta"}
    x = SamMed2DPredictor(small_model).preprocess(golden["img1_image"]).to("meta")
    for fused in (True, False):
        encoder.fused_attention = fused
        out = encoder(x)
        assert out.device.type == "meta" and tuple(out.shape) == (1, 256, 16, 16)

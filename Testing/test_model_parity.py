"""Golden parity: every array of the official implementation's outputs reproduced through our public API.

Tolerances from the reference README §5: preprocessed input and transformed prompts exact; embeddings,
prompt embeddings and logits ≤ 5e-5; IoU ≤ 1e-5; same selected token; masks equal where |logit| > 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
from SAMMed2DSegmentLib.engine.preprocessing import opencv_nearest_indices

CASES = {
    "c1": "img1",
    "c2": "img1",
    "c3": "img2",
    "c4": "img1",
    "c5": "img1",
}
TOL = 5e-5
IOU_TOL = 1e-5


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


@pytest.fixture(scope="module", params=["vit_b", "small"])
def build(request):
    return request.param


@pytest.fixture(scope="module")
def predictors(build, request):
    """One predictor per image, with the embedding computed once per build."""
    model = request.getfixturevalue(f"{build}_model")
    golden = request.getfixturevalue("golden")
    out = {}
    for image in ("img1", "img2"):
        p = SamMed2DPredictor(model)
        p.set_image(golden[f"{image}_image"])
        out[image] = p
    return out


def _key(build: str, name: str) -> str:
    return name if build == "vit_b" else f"small_{name}"


def _prompts(golden, case):
    kwargs = {}
    if f"{case}_point_coords" in golden:
        kwargs["point_coords"] = golden[f"{case}_point_coords"]
        kwargs["point_labels"] = golden[f"{case}_point_labels"]
    if f"{case}_box" in golden:
        kwargs["box"] = golden[f"{case}_box"]
    return kwargs


def test_nearest_rule_matches_opencv_on_odd_sizes():
    # OpenCV's reciprocal form differs from floor(i*S/256) for S = 186 (a size the spec names).
    idx = opencv_nearest_indices(186, 256)
    naive = np.floor(np.arange(256) * 186 / 256).astype(int)
    assert (idx != naive).any()
    assert idx.max() == 185 and idx.min() == 0


@pytest.mark.parametrize("image", ["img1", "img2"])
def test_model_input_exact(golden, image):
    from SAMMed2DSegmentLib.engine.preprocessing import as_rgb_uint8, model_input

    got = model_input(as_rgb_uint8(golden[f"{image}_image"]))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, golden[f"{image}_model_input"])
    # A gray H×W image and its three-channel copy give the same input.
    rgb = np.repeat(golden[f"{image}_image"][:, :, None], 3, axis=2)
    np.testing.assert_array_equal(model_input(as_rgb_uint8(rgb)), got)


def test_embeddings_and_dense_pe(golden, predictors, build):
    for image, p in predictors.items():
        emb = p.get_image_embedding().numpy()
        assert _max_abs(emb, golden[_key(build, f"{image}_embedding")]) <= TOL
        np.testing.assert_array_equal(p.input_image.numpy(), golden[f"{image}_model_input"])
    pe = predictors["img1"].model.prompt_encoder.get_dense_pe()
    assert _max_abs(pe, golden[_key(build, "dense_pe")]) <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_case_parity(golden, predictors, build, case):
    p = predictors[CASES[case]]
    prompts = _prompts(golden, case)
    mask_input = golden[_key(build, "c5_mask_input")] if case == "c5" else None
    k = lambda name: _key(build, f"{case}_{name}")  # noqa: E731

    # Prompt transforms: exact.
    if "point_coords" in prompts:
        pe_coords = p.transform_coords(prompts["point_coords"]).astype(np.float32)[None]
        np.testing.assert_array_equal(pe_coords, golden[k("pe_point_coords")])
        np.testing.assert_array_equal(
            prompts["point_labels"].astype(np.int32)[None], golden[k("pe_point_labels")]
        )
    if "box" in prompts:
        pe_box = p.transform_boxes(prompts["box"]).astype(np.float32)[None]
        np.testing.assert_array_equal(pe_box, golden[k("pe_boxes")])

    # Prompt encoder and decoder, all four tokens.
    out = p.decode(mask_input=mask_input, **prompts)
    assert _max_abs(out.sparse, golden[k("sparse_embeddings")]) <= TOL
    if case == "c5":
        assert _max_abs(out.dense, golden[k("dense_embeddings")]) <= TOL
    assert _max_abs(out.low_res_all, golden[k("lowres_all")]) <= TOL
    assert _max_abs(out.iou_all, golden[k("iou_all")]) <= IOU_TOL
    assert _max_abs(out.low_res_all[:, 1:], golden[k("mm3_lowres")]) <= TOL
    assert _max_abs(out.iou_all[:, 1:], golden[k("mm3_iou")]) <= IOU_TOL

    # Multimask (official default): selected token, logits, mask.
    masks, iou, low_res = p.predict(mask_input=mask_input, multimask_output=True, **prompts)
    best = 1 + int(torch.argmax(out.iou_all[0, 1:]))
    assert best == int(golden[k("mm_best_index")])
    assert _max_abs(iou, golden[k("mm_iou")]) <= IOU_TOL
    assert _max_abs(low_res, golden[k("mm_lowres")]) <= TOL
    logits, _, _ = p.predict(mask_input=mask_input, multimask_output=True, return_logits=True, **prompts)
    ref_logits = golden[k("mm_logits_full")]
    assert logits.shape == ref_logits.shape
    assert _max_abs(logits, ref_logits) <= TOL
    ref_mask = golden[k("mm_mask")]
    assert masks.dtype == bool and masks.shape == ref_mask.shape
    sure = np.abs(ref_logits) > 1e-4
    np.testing.assert_array_equal(masks[sure], ref_mask[sure])

    # Single-mask output (token 0).
    masks1, iou1, low_res1 = p.predict(mask_input=mask_input, multimask_output=False, **prompts)
    assert _max_abs(iou1, golden[k("single_iou")]) <= IOU_TOL
    assert _max_abs(low_res1, golden[k("single_lowres")]) <= TOL
    ref1 = golden[k("single_mask")]
    assert masks1.shape == ref1.shape
    full1 = p.postprocess_masks(torch.as_tensor(low_res1)[None])[0].numpy()
    sure1 = np.abs(full1) > 1e-4
    np.testing.assert_array_equal(masks1[sure1], ref1[sure1])

"""Bad input to the predictor raises a clear ValueError instead of producing a silently wrong mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor


@pytest.fixture(scope="module")
def predictor(small_model):
    p = SamMed2DPredictor(small_model)
    image = (np.arange(60 * 80, dtype=np.int64).reshape(60, 80) % 251).astype(np.uint8)
    p.set_image(image)
    return p


def test_valid_prompts_work(predictor):
    masks, iou, low_res = predictor.predict(np.array([[10.0, 20.0]]), np.array([1]))
    assert masks.shape == (1, 60, 80) and masks.dtype == bool
    assert iou.shape == (1,) and low_res.shape == (1, 64, 64)
    # Edges of the pixel grid are inside the image; a mask prompt alone is a valid prompt.
    predictor.predict(np.array([[-0.5, 59.5], [79.0, 0.0]]), np.array([1, 0]))
    predictor.predict(box=np.array([0, 0, 79, 59]))
    predictor.predict(mask_input=1 / (1 + np.exp(-low_res)))


def test_predict_before_set_image(small_model):
    with pytest.raises(RuntimeError, match="set_image"):
        SamMed2DPredictor(small_model).predict(np.array([[1.0, 1.0]]), np.array([1]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "no prompt"),
        ({"point_coords": np.zeros((0, 2)), "point_labels": np.zeros(0)}, "empty"),
        ({"point_coords": np.array([[10.0, 10.0]])}, "together"),
        ({"point_coords": np.array([[80.0, 10.0]]), "point_labels": np.array([1])}, "outside"),
        ({"point_coords": np.array([[10.0, -3.0]]), "point_labels": np.array([1])}, "outside"),
        ({"point_coords": np.array([[np.nan, 3.0]]), "point_labels": np.array([1])}, "NaN"),
        ({"point_coords": np.array([10.0, 3.0]), "point_labels": np.array([1])}, "N×2"),
        ({"point_coords": np.array([[10.0, 3.0]]), "point_labels": np.array([2])}, "include"),
        ({"point_coords": np.array([[10.0, 3.0]]), "point_labels": np.array([1, 0])}, "point_labels"),
        ({"box": np.array([50, 10, 20, 30])}, "degenerate"),
        ({"box": np.array([10, 40, 20, 30])}, "degenerate"),
        ({"box": np.array([10, 10, 20])}, "x0, y0, x1, y1"),
        ({"box": np.array([100, 100, 120, 130])}, "overlap"),
        ({"box": np.array([10, np.inf, 20, 30])}, "NaN or infinite"),
        ({"mask_input": np.zeros((1, 32, 32), np.float32)}, "1×64×64"),
        ({"mask_input": np.zeros((1, 64, 64), np.uint8)}, "floating"),
        ({"mask_input": np.full((1, 64, 64), np.nan, np.float32)}, "NaN"),
    ],
)
def test_bad_prompts(predictor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(**kwargs)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((20, 30), np.float32), "uint8"),
        (np.zeros((20, 30), np.uint16), "uint8"),
        (np.full((20, 30), np.nan), "NaN"),
        (np.zeros((20, 30, 4), np.uint8), "H×W×3"),
        (np.zeros((2, 20, 30, 3), np.uint8), "H×W×3"),
        (np.zeros((0, 30), np.uint8), "empty"),
        ([[1, 2], [3, 4]], "numpy array"),
    ],
)
def test_bad_images(small_model, image, message):
    p = SamMed2DPredictor(small_model)
    with pytest.raises(ValueError, match=message):
        p.set_image(image)
    assert p.features is None  # nothing half-set


def test_set_embedding_checks_shape(small_model):
    p = SamMed2DPredictor(small_model)
    with pytest.raises(ValueError, match="shape"):
        p.set_embedding(torch.zeros(1, 256, 8, 8), (10, 10))
    with pytest.raises(ValueError, match="positive"):
        p.set_embedding(torch.zeros(1, 256, 16, 16), (0, 10))


def test_cached_embedding_gives_same_mask(small_model, predictor):
    """An embedding stored and handed back (what the volume engine's cache does) predicts identically."""
    point, label = np.array([[40.0, 30.0]]), np.array([1])
    expected = predictor.predict(point, label, return_logits=True)
    other = SamMed2DPredictor(small_model)
    other.set_embedding(predictor.get_image_embedding().clone(), (60, 80))
    got = other.predict(point, label, return_logits=True)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)

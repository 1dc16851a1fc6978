"""Propagation engine: stopping logic with an oracle on the real CT's reference labels (allowed only for
testing the stopping rules in isolation), caching, cancellation; the real network end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMMed2DSegmentLib.engine.embedding_cache import EmbeddingCache
from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
from SAMMed2DSegmentLib.engine.masks import components_touching, interior_point
from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
from SAMMed2DSegmentLib.engine.prompts import SlicePrompt
from SAMMed2DSegmentLib.engine.propagation import PropagationEngine, PropagationSettings
from SAMMed2DSegmentLib.formats.volumes import ijk_to_ras_from_itk

DATA = Path(__file__).parent / "Data" / "totalseg-example-ct"
LIVER, PANCREAS, T11, SPLEEN = 5, 7, 33, 1


@pytest.fixture(scope="module")
def labels():
    image = sitk.ReadImage(str(DATA / "labels" / "labels_on_ct_grid.nrrd"))
    return sitk.GetArrayFromImage(image), ijk_to_ras_from_itk(image)


class OraclePredictor:
    """Answers with the reference label itself: the 'image' it is shown is the organ's label slice.

    Stands in for the network only to test the stopping rules in isolation.
    """

    def __init__(self, iou: dict[int, float] | None = None, extra: dict[int, np.ndarray] | None = None):
        self.iou = iou or {}
        self.extra = extra or {}
        self.features: torch.Tensor | None = None
        self.encodes = 0

    def set_image(self, image: np.ndarray) -> None:
        self.features = torch.from_numpy(image.copy())
        self.encodes += 1

    def get_image_embedding(self) -> torch.Tensor:
        return self.features

    def set_embedding(self, features, original_size) -> None:
        self.features = features

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, **_):
        image = self.features.numpy()
        index = int(image[0, 0]) - 2  # slice id hidden in pixel (0, 0), see oracle_engine
        organ = image > 1
        organ[0, 0] = False
        if index in self.extra:
            organ = organ | self.extra[index]
        if box is not None:
            x0, y0, x1, y1 = box
            ys, xs = np.mgrid[: organ.shape[0], : organ.shape[1]]
            organ &= (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
        if point_coords is not None:
            include = point_coords[point_labels == 1]
            organ = components_touching(organ, include)
        iou = self.iou.get(index, 0.95 if organ.any() else 0.05)
        return organ[None], np.array([iou], np.float32), np.zeros((1, 64, 64), np.float32)


def oracle_engine(labels, organ, predictor, **settings):
    arr, m = labels
    g = SliceGeometry.create(arr.shape, m, "axial")

    def slice_image(index: int) -> np.ndarray:
        img = np.where(g.extract(arr, index) == organ, 255, 0).astype(np.uint8)
        img[0, 0] = 2 + index  # lets the oracle know which slice it is looking at
        return img

    engine = PropagationEngine(
        predictor,
        slice_image,
        g.num_slices,
        g.slice_shape,
        g.pixel_spacing,
        cache=EmbeddingCache(),
        settings=PropagationSettings(**settings),
    )
    return engine, g


def seed_prompt(g, arr, organ, index) -> SlicePrompt:
    x, y = interior_point(g.extract(arr, index) == organ)
    return SlicePrompt(points=np.array([[x, y]], float), labels=np.array([1]))


def truth(g, arr, organ, index):
    return g.extract(arr, index) == organ


def test_liver_follows_the_whole_volume(labels):
    arr, _ = labels
    engine, g = oracle_engine(labels, LIVER, OraclePredictor())
    result = engine.run({10: seed_prompt(g, arr, LIVER, 10)})
    masks = result.masks()
    assert sorted(masks) == list(range(g.num_slices))
    assert {w.reason for w in result.walks} == {"reached the volume edge"}
    inter = sum((masks[i] & truth(g, arr, LIVER, i)).sum() for i in masks)
    total = sum(masks[i].sum() + truth(g, arr, LIVER, i).sum() for i in masks)
    assert 2 * inter / total > 0.98
    assert result.slices[10].status == "prompted"
    assert all(result.slices[i].status == "propagated" for i in masks if i != 10)
    # Lazy: each visited slice encoded exactly once.
    assert result.encoded_slices == len(result.slices) == engine.predictor.encodes


@pytest.mark.parametrize("organ, seed", [(PANCREAS, 1), (T11, 10)])
def test_walk_stops_where_the_structure_ends(labels, organ, seed):
    arr, _ = labels
    present = [i for i in range(arr.shape[0]) if (arr[i] == organ).any()]
    engine, g = oracle_engine(labels, organ, OraclePredictor())
    result = engine.run({seed: seed_prompt(g, arr, organ, seed)})
    accepted = sorted(result.masks())
    # Never written where the structure is absent; most of where it is present is reached (the reference
    # labels are resampled from 3 mm slices, so the ends jump between neighbouring slices).
    assert set(accepted) <= set(present)
    assert accepted == list(range(accepted[0], accepted[-1] + 1))
    assert len(accepted) >= 0.75 * len(present)
    for walk in result.walks:
        assert walk.reason, walk
    for index, outcome in result.slices.items():
        if index not in present:
            assert outcome.status == "rejected" and outcome.mask is None
            assert outcome.reason.startswith(("structure ended", "area collapsed"))


def test_low_predicted_iou_stops_and_is_reported(labels):
    arr, _ = labels
    engine, g = oracle_engine(labels, LIVER, OraclePredictor(iou={14: 0.2}))
    result = engine.run({10: seed_prompt(g, arr, LIVER, 10)}, direction="both")
    up = [w for w in result.walks if w.step == g.normal_sign][0]
    assert up.last_accepted == 13 and "low predicted IoU" in up.reason
    assert result.slices[14].status == "rejected"
    assert 14 not in result.masks() and 15 not in result.slices


class ScriptedPredictor(OraclePredictor):
    """Returns a fixed mask per slice whatever the prompt, to trigger each stopping rule on purpose."""

    def __init__(self, masks: dict[int, np.ndarray]):
        super().__init__()
        self.masks = masks

    def predict(self, **_):
        index = int(self.features.numpy()[0, 0]) - 2
        return self.masks[index][None], np.array([0.9], np.float32), np.zeros((1, 64, 64), np.float32)


def disk(cx: float, cy: float, r: float, shape=(64, 64)) -> np.ndarray:
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r


@pytest.mark.parametrize(
    "bad, reason",
    [
        (disk(30, 30, 20), "area jumped"),
        (disk(30, 30, 3), "area collapsed"),
        (disk(52, 52, 8), "centroid jumped"),
        (np.zeros((64, 64), bool), "structure ended"),
    ],
)
def test_each_stopping_rule(bad, reason):
    masks = {i: disk(30 + i * 0.5, 30, 8) for i in range(6)}
    masks[4] = bad

    def slice_image(index: int) -> np.ndarray:
        img = np.zeros((64, 64), np.uint8)
        img[0, 0] = 2 + index
        return img

    engine = PropagationEngine(ScriptedPredictor(masks), slice_image, 6, (64, 64), (1.0, 1.0))
    result = engine.run(
        {1: SlicePrompt(points=np.array([[30.0, 30.0]]), labels=np.array([1]))}, direction="up"
    )
    (walk,) = result.walks
    assert walk.last_accepted == 3 and walk.reason.startswith(reason)
    assert result.slices[4].status == "rejected" and result.slices[4].reason == walk.reason
    assert sorted(result.masks()) == [1, 2, 3] and 5 not in result.slices


def test_direction_none_and_one_sided(labels):
    arr, _ = labels
    engine, g = oracle_engine(labels, LIVER, OraclePredictor())
    assert sorted(engine.run({10: seed_prompt(g, arr, LIVER, 10)}, direction="none").masks()) == [10]
    up = engine.run({10: seed_prompt(g, arr, LIVER, 10)}, direction="up", up_step=1).masks()
    assert sorted(up) == list(range(10, g.num_slices))


def test_two_seeds_split_the_gap(labels):
    arr, _ = labels
    engine, g = oracle_engine(labels, LIVER, OraclePredictor())
    seeds = {4: seed_prompt(g, arr, LIVER, 4), 12: seed_prompt(g, arr, LIVER, 12)}
    result = engine.run(seeds)
    assert sorted(result.masks()) == list(range(g.num_slices))
    walks = {(w.seed, w.step): w for w in result.walks}
    assert walks[(4, 1)].last_accepted == 8 and walks[(12, -1)].last_accepted == 9
    assert result.slices[12].status == "prompted"


def test_roi_bounds_the_walk(labels):
    arr, _ = labels
    engine, g = oracle_engine(labels, LIVER, OraclePredictor())
    rows, cols = g.slice_shape
    roi = {i: np.array([0, 0, cols - 1, rows - 1.0]) for i in range(6, 15)}
    result = engine.run({10: seed_prompt(g, arr, LIVER, 10)}, roi_boxes=roi)
    assert sorted(result.masks()) == list(range(6, 15))
    assert {w.reason for w in result.walks} == {"left the ROI"}


def test_cancel_keeps_finished_slices_consistent(labels):
    arr, _ = labels
    engine, g = oracle_engine(labels, LIVER, OraclePredictor())
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 5

    result = engine.run({10: seed_prompt(g, arr, LIVER, 10)}, should_cancel=cancel)
    assert result.cancelled
    masks = result.masks()
    assert 1 < len(masks) < g.num_slices
    assert all(result.slices[i].status in ("prompted", "propagated") for i in masks)
    # Written slices form one contiguous run around the seed: nothing half-done.
    assert sorted(masks) == list(range(min(masks), max(masks) + 1))


def test_progress_callback_sees_every_slice(labels):
    arr, _ = labels
    engine, g = oracle_engine(labels, PANCREAS, OraclePredictor())
    seen = []
    result = engine.run({1: seed_prompt(g, arr, PANCREAS, 1)}, progress=lambda n, o: seen.append(o.index))
    assert sorted(seen) == sorted(result.slices)


def test_exclude_only_seed_is_refused(labels):
    engine, _ = oracle_engine(labels, LIVER, OraclePredictor())
    with pytest.raises(ValueError, match="only exclude points and no segment there to correct"):
        engine.run({3: SlicePrompt(points=np.array([[10.0, 10.0]]), labels=np.array([0]))})
    with pytest.raises(ValueError, match="direction"):
        engine.run({3: SlicePrompt(box=np.array([1.0, 1, 5, 5]))}, direction="sideways")


def test_exclude_only_seed_refines_the_current_mask(labels):
    """An exclude-only slice with a current mask is prompted as a propagated slice would be from that mask
    (box with margin, interior include point) plus the exclude points; one without a mask stays refused.
    (The oracle ignores exclude points: what the network makes of them is tested in test_service and
    test_view_workflows.)"""
    arr, _ = labels
    engine, g = oracle_engine(labels, LIVER, OraclePredictor())
    liver = truth(g, arr, LIVER, 10)
    current = liver.copy()
    ys, xs = np.nonzero(liver)
    current[ys.max() + 1 : ys.max() + 21, xs.min() : xs.min() + 20] = True  # a spill below the liver
    click = np.array([[xs.min() + 10.0, ys.max() + 10.0]])
    exclude = SlicePrompt(points=click, labels=np.array([0]))
    seeds = engine.with_current_masks({10: exclude, 12: exclude}, {10: current, 12: np.zeros_like(current)})
    assert seeds[12] is exclude  # nothing to refine there
    prompt = seeds[10]
    assert prompt.labels.tolist() == [0, 1] and np.array_equal(prompt.points[0], click[0])
    x, y = prompt.points[1].astype(int)
    assert current[y, x]  # the include point lies inside the current mask
    x0, y0, x1, y1 = prompt.box
    assert x0 < xs.min() and y1 > ys.max() + 20 and y1 - y0 < 1.5 * (ys.max() + 21 - ys.min())
    result = engine.run({10: prompt}, direction="none")
    assert np.array_equal(result.slices[10].mask, liver)  # the oracle's organ, bounded by the box
    with pytest.raises(ValueError, match="empty or of another shape"):
        engine.refine_prompt(current[:-1], exclude, None)


def test_embedding_cache_is_bounded_lru():
    cache = EmbeddingCache(max_bytes=3 * 400)
    for i in range(5):
        cache.put(i, torch.zeros(100))  # 400 bytes each
    assert len(cache) == 3 and cache.nbytes == 1200 and 0 not in cache and 4 in cache
    cache.get(2)  # most recently used now
    cache.put(5, torch.zeros(100))
    assert 3 not in cache and 2 in cache
    cache.put(6, torch.zeros(1000))  # bigger than the budget: not kept, nothing evicted
    assert 6 not in cache and len(cache) == 3
    with pytest.raises(ValueError):
        EmbeddingCache(-1)


def test_real_network_end_to_end(small_model, labels):
    """The real (small, synthetic-weight) network through the engine on the real CT grid: runs, caches,
    and a second run with the same cache encodes nothing."""
    arr, m = labels
    g = SliceGeometry.create(arr.shape, m, "axial")
    images = {i: np.where(g.extract(arr, i) > 0, 200, 30).astype(np.uint8) for i in range(g.num_slices)}
    cache = EmbeddingCache()
    engine = PropagationEngine(
        SamMed2DPredictor(small_model),
        images.__getitem__,
        g.num_slices,
        g.slice_shape,
        g.pixel_spacing,
        cache=cache,
        settings=PropagationSettings(iou_threshold=0.0),
    )
    seeds = {10: seed_prompt(g, arr, LIVER, 10)}
    first = engine.run(seeds)
    assert first.slices[10].status == "prompted" and first.slices[10].mask.shape == g.slice_shape
    assert first.encoded_slices == len(first.slices) >= 1
    second = engine.run(seeds)
    assert second.encoded_slices == 0
    assert sorted(second.masks()) == sorted(first.masks())
    for i, mask in first.masks().items():
        np.testing.assert_array_equal(second.masks()[i], mask)

"""`evaluate --protocol cvpr25`: the CVPR 2025 interactive challenge's box, clicks and scores against the
challenge's own definitions (`cvpr25_reference.py`), the protocol loop on oracles, and end to end on the
bundled CT with the demo model through the real session."""

from __future__ import annotations

import numpy as np
import pytest

from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
from SAMMed2DSegmentLib.evaluation.clicks import dice
from SAMMed2DSegmentLib.evaluation.cvpr25 import run_protocol
from SAMMed2DSegmentLib.evaluation.cvpr25_user import (
    challenge_box,
    largest_component_3d,
    next_click_3d,
    slice_position,
)
from SAMMed2DSegmentLib.evaluation.metrics.interactive import click_auc, step_scores
from SAMMed2DSegmentLib.evaluation.metrics.surface import surface_dice

from . import cvpr25_reference as theirs

#: A geometry whose axial slices are the array's first axis unflipped (DICOM-like LPS directions): the
#: challenge's (z, y, x) arrays.
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ball(shape, centre, radii) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def blobs(rng, shape, count) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for _ in range(count):
        centre = [rng.uniform(0, s) for s in shape]
        mask |= ball(shape, centre, [rng.uniform(1.5, s / 3) for s in shape])
    return mask


def test_dsc_nsd_and_auc_equal_the_challenge_functions():
    rng = np.random.default_rng(7)
    spacings = [(1.0, 1.0, 1.0), (2.5, 0.78125, 0.78125), (5.0, 0.7, 0.9), (0.5, 0.5, 1.5)]
    for case in range(12):
        shape = tuple(int(v) for v in rng.integers(6, 24, 3))
        truth = blobs(rng, shape, 2)
        prediction = truth ^ blobs(rng, shape, 1) if case % 3 else blobs(rng, shape, 2)
        if not truth.any():
            continue
        spacing = spacings[case % len(spacings)]
        ours = surface_dice(truth, prediction, spacing)
        reference = theirs.compute_surface_dice_at_tolerance(
            theirs.compute_surface_distances(truth, prediction, spacing), 2.0
        )
        assert ours == pytest.approx(reference, abs=1e-12), (case, spacing)
        assert dice(prediction, truth) == pytest.approx(theirs.compute_dice_coefficient(truth, prediction))
    truth = ball((20, 30, 30), (10, 15, 15), (6, 9, 9))
    assert surface_dice(truth, np.zeros_like(truth), (1, 1, 1)) == 0.0
    assert surface_dice(truth, truth, (3, 1, 1)) == 1.0
    # NSD only where DSC > 0.2; below it the step's NSD is 0 (as they score it).
    far = np.roll(truth, 12, axis=2)
    assert dice(far, truth) < 0.2 and step_scores(truth, far, (1, 1, 1)) == (dice(far, truth), 0.0)
    for curve in ([0.1, 0.5, 0.6, 0.6, 0.9, 1.0], [0.3, 0.2, 0.25, 0.8, 0.8, 0.81]):
        assert click_auc(curve, 5) == pytest.approx(theirs.auc(curve))
    assert click_auc([0.5, 0.7], 1) == 0.0


def test_the_click_is_theirs_inside_the_largest_error_component_with_the_right_label():
    rng = np.random.default_rng(3)
    labels = set()
    for case in range(25):
        shape = tuple(int(v) for v in rng.integers(5, 20, 3))
        truth = blobs(rng, shape, 2)
        prediction = blobs(rng, shape, 2) if case % 2 else truth & ~blobs(rng, shape, 1)
        click = next_click_3d(prediction, truth)
        reference = theirs.click(prediction.astype(np.uint8), truth.astype(np.uint8))
        if reference is None:
            assert click is None and (prediction == truth).all()
            continue
        assert (click.kji, click.label) == (tuple(int(v) for v in reference[0]), reference[1])
        error = prediction ^ truth
        assert largest_component_3d(error)[click.kji]
        assert click.label == ("fg" if truth[click.kji] else "bg")
        assert prediction[click.kji] != truth[click.kji]
        labels.add(click.label)
    assert labels == {"fg", "bg"}


def test_the_box_is_theirs_and_clicks_map_to_the_slice_that_shows_them():
    truth = ball((9, 300, 200), (5, 150, 90), (3, 60, 40))  # 7 slices (2..8): the middle is 5
    box = challenge_box(truth, SliceGeometry.create(truth.shape, LPS))
    assert box.as_json() == theirs.mask3D_to_bbox(truth)
    assert (box.z_min, box.z_max, box.z_mid) == (2, 8, 5)
    assert box.box == (50 - 1, 90 - 2, 130 + 1, 210 + 2)  # jitter 2 (seed 2025): 2 × 200/256, 2 × 300/256
    # Any storage order: the voxel shows at (x, y) of its slice in display orientation.
    permuted = np.array([[0, 0, 2.0, 0], [0, -1, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    for matrix in (LPS, np.diag([1.0, 1.0, -1.0, 1.0]), permuted):
        for axis in ("axial", "coronal", "sagittal"):
            geometry = SliceGeometry.create((7, 8, 9), matrix, axis)
            marker = np.zeros((7, 8, 9), bool)
            for kji in [(0, 0, 0), (6, 7, 8), (3, 1, 5)]:
                marker[...] = False
                marker[kji] = True
                index, x, y = slice_position(geometry, kji)
                assert geometry.view(marker, index)[y, x]


class Oracle:
    """A test double standing in for the session: the truth on every slice it is asked to segment, and
    on the slices a walk reaches, `reach` slices each way (all of the allowed range when None)."""

    def __init__(self, truth, geometry, reach=None):
        self.truth, self.geometry, self.reach = truth, geometry, reach
        self.segmented, self.walks = [], []

    def segment(self, index, prompt, mask_input):
        self.segmented.append((index, prompt, mask_input))
        return self.geometry.extract(self.truth, index), np.zeros((4, 4))

    def propagate(self, seed, mask, first, last):
        self.walks.append((seed, first, last))
        reach = self.reach if self.reach is not None else self.geometry.num_slices
        for index in range(max(first, seed - reach), min(last, seed + reach) + 1):
            if index != seed:
                yield index, self.geometry.extract(self.truth, index), np.zeros((4, 4))


def test_an_oracle_reaches_dsc_1_and_stops_clicking():
    truth = np.zeros((30, 40, 40), bool)
    truth[6:19] = ball((13, 40, 40), (6, 20, 20), (20, 14, 10))  # 13 slices: z-range 6..18, middle 12
    geometry = SliceGeometry.create(truth.shape, LPS)
    oracle = Oracle(truth, geometry)
    result = run_protocol(oracle, geometry, truth, (2.0, 1.0, 1.0))
    assert result.dsc_per_step == [1.0] * 6 and result.nsd_per_step == [1.0] * 6
    assert result.clicks == [] and [s[0] for s in oracle.segmented] == [12]
    assert oracle.walks == [(12, 6, 18)]  # bounded to the z-range
    assert result.as_json()["dsc_auc"] == 4.0 and (result.mask == truth).all()

    # A walk that reaches one slice each way: clicks on the missed slices until the mask is exact.
    short = Oracle(truth, geometry, reach=1)
    result = run_protocol(short, geometry, truth, (2.0, 1.0, 1.0), max_clicks=8)
    steps = result.dsc_per_step
    assert len(steps) == 9 and steps[0] < 1.0 and steps[-1] == 1.0
    assert all(b >= a for a, b in zip(steps, steps[1:], strict=False))
    done = steps.index(1.0)
    assert 0 < len(result.clicks) == done < 8  # no click once the mask is exact
    assert all(c["label"] == "fg" for c in result.clicks)
    corrected = {12}
    for click, (seed, first, last) in zip(result.clicks, short.walks[1:], strict=True):
        assert seed == click["slice"] and 6 <= first <= seed <= last <= 18
        assert not any(first <= c <= last for c in corrected)  # never into a corrected slice
        corrected.add(seed)
    # The clicked slice is re-segmented with its click, and its previous logits as sigmoid probabilities
    # when it had a mask before.
    index, prompt, _ = short.segmented[1]
    assert prompt.points.tolist() == [[result.clicks[0]["x"], result.clicks[0]["y"]]] and prompt.box is None

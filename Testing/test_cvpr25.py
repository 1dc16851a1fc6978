"""`evaluate --protocol cvpr25`: the CVPR 2025 interactive challenge's box, clicks and scores against the
challenge's own definitions (`cvpr25_reference.py`), the protocol loop on oracles, and end to end on the
bundled CT with the demo model through the real session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from SAMMed2DSegmentLib import commands
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
from SAMMed2DSegmentLib.evaluation.saved_mask import write_mask_segmentation
from SAMMed2DSegmentLib.formats.volumes import read_labels_on_grid
from SAMMed2DSegmentLib.mrml.segmentations import read_segments_on_grid

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


REPO = Path(__file__).resolve().parents[1]
CT_DIR = REPO / "Testing" / "Data" / "totalseg-example-ct"
LABELS = CT_DIR / "labels" / "labels_on_ct_grid.nrrd"
RIB = 103  # rib_left_12: on 3 slices of the bundled CT, so the whole protocol stays cheap


def test_cvpr25_end_to_end_on_the_bundled_ct_with_the_demo_model(tmp_path, ct, capsys):
    out, masks = tmp_path / "rib.json", tmp_path / "masks"
    argv = ["evaluate", "--volume", str(CT_DIR / "ct"), "--labels", str(LABELS), "--label-value", str(RIB),
            "--protocol", "cvpr25", "--precision", "fp32", "--json", str(out), "--save-masks", str(masks),
            "--quiet"]  # fmt: skip
    assert commands.main(argv) == 0
    result = json.loads(out.read_text())
    for key in ("dsc_per_step", "nsd_per_step", "dsc_auc", "nsd_auc", "final_dsc", "final_nsd", "seconds",
                "clicks"):  # fmt: skip
        assert key in result, key
    assert result["protocol"] == "cvpr25" and result["model"]["precision"] == "fp32"
    dsc, nsd = result["dsc_per_step"], result["nsd_per_step"]
    assert len(dsc) == len(nsd) == 6 and all(0 <= v <= 1 for v in dsc + nsd)
    assert (result["final_dsc"], result["final_nsd"]) == (dsc[-1], nsd[-1])
    assert result["dsc_auc"] == pytest.approx(theirs.auc(dsc), abs=1e-3)
    assert result["nsd_auc"] == pytest.approx(theirs.auc(nsd), abs=1e-3)
    assert dsc[0] > 0  # the box finds some of the rib
    labels = read_labels_on_grid(LABELS, ct.array_kji.shape, ct.ijk_to_ras)
    truth = labels == RIB
    assert (result["box"]["z_min"], result["box"]["z_max"], result["box"]["z_mid"]) == (0, 2, 1)
    assert 0 < len(result["clicks"]) <= 5
    for click in result["clicks"]:
        kji = tuple(click["voxel_kji"])
        assert len(kji) == 3 and all(0 <= v < s for v, s in zip(kji, truth.shape, strict=True))
        assert click["label"] in ("fg", "bg") and 0 <= click["slice"] <= 2
    # The first click answers the box step's 3-D error: a fg click on the rib or a bg click off it.
    first = result["clicks"][0]
    assert truth[tuple(first["voxel_kji"])] == (first["label"] == "fg")
    # The final mask, saved as a segment on the CT's grid, scores the final DSC.
    saved = dict(read_segments_on_grid(masks / "rib.seg.nrrd", ct.array_kji, ct.ijk_to_ras))
    assert list(saved) == [f"label {RIB}"]
    assert dice(saved[f"label {RIB}"], truth) == pytest.approx(result["final_dsc"], abs=1e-4)
    # --save-masks belongs to cvpr25: refused in one line, before any work.
    capsys.readouterr()
    refused = ["clicks" if a == "cvpr25" else a for a in argv]
    assert commands.main(refused) == 2
    err = capsys.readouterr().err
    assert "--save-masks needs --protocol cvpr25" in err and "Traceback" not in err


def test_a_saved_mask_updates_an_existing_file_and_keeps_its_other_segments(tmp_path):
    first = ball((5, 20, 30), (2, 8, 12), (2, 5, 7))
    second = ball((5, 20, 30), (2, 12, 18), (1.5, 4, 6))
    matrix = np.array([[-0.7, 0, 0, 10], [0, -0.7, 0, 5], [0, 0, 2.5, -3], [0, 0, 0, 1]])
    path = tmp_path / "case.seg.nrrd"
    write_mask_segmentation(path, second, matrix, "label 6")
    write_mask_segmentation(path, first, matrix, "label 5", existing=path)
    write_mask_segmentation(path, first & ~second, matrix, "label 5", existing=path)  # replaced whole
    segments = dict(read_segments_on_grid(path, np.zeros(first.shape), matrix))
    assert set(segments) == {"label 5", "label 6"}
    assert (segments["label 6"] == second).all() and (segments["label 5"] == (first & ~second)).all()

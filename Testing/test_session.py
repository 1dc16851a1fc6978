"""The module's background session without Slicer: windows, prefetch sharing the cache with clicks,
confidence ordering, the slice view a point was placed in (tier A)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from SAMMed2DSegmentLib.engine.geometry import VIEW_ORIENTATIONS
from SAMMed2DSegmentLib.engine.intensity import SA_MED2D_20M, IntensityWindow, compute_window
from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
from SAMMed2DSegmentLib.engine.prompts import PointPrompt
from SAMMed2DSegmentLib.engine.propagation import PropagationResult, SliceOutcome
from SAMMed2DSegmentLib.engine.session import (
    SegmentationSession,
    VolumeSnapshot,
    axis_from_views,
    confidence_table,
    nearest_first,
    slice_center_ras,
    window_for,
)

IJK_TO_RAS = np.array([[-0.8, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1.0]])


@pytest.fixture
def snapshot():
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 20, (6, 40, 48)).astype(np.int16) - 1000
    volume[:, 10:30, 12:36] += 1060  # a soft-tissue block in air: looks like CT
    return VolumeSnapshot("vtkMRMLScalarVolumeNode1:42", volume, IJK_TO_RAS, None)


def _session(model, snapshot) -> SegmentationSession:
    session = SegmentationSession(SamMed2DPredictor(model))
    session.set_volume(snapshot.array_kji, snapshot.ijk_to_ras, key=snapshot.key)
    return session


def test_window_choices(snapshot):
    volume = snapshot.array_kji
    # "auto" is the model's own rule (SA-Med2D-20M's unless the model names another); presets and a custom
    # level/width override it whatever the rule.
    assert window_for(volume, None, "auto") == compute_window(volume, SA_MED2D_20M)
    assert window_for(volume, None, "auto", rule="auto") == compute_window(volume, "auto")
    assert window_for(volume, None, "ct-soft-tissue", rule="auto").low == -160
    lung = window_for(volume, None, "ct-lung")
    assert (lung.level, lung.width) == (-600, 1500)
    custom = window_for(volume, None, "custom", level=10, width=100)
    assert (custom.low, custom.high) == (-40, 60)
    with pytest.raises(ValueError, match="level and a width"):
        window_for(volume, None, "custom")
    with pytest.raises(ValueError, match="unknown intensity window"):
        window_for(volume, None, "bright")


def test_the_session_sees_a_volume_through_its_models_rule_unless_told_otherwise(small_model, snapshot):
    session = SegmentationSession(SamMed2DPredictor(small_model), intensity_rule="auto")
    session.set_volume(snapshot.array_kji, snapshot.ijk_to_ras, key=snapshot.key)
    assert session.window == compute_window(snapshot.array_kji, "auto")
    explicit = IntensityWindow.from_level_width(40, 400)
    session.set_volume(snapshot.array_kji, snapshot.ijk_to_ras, window=explicit, key=snapshot.key)
    assert session.window == explicit
    default = SegmentationSession(SamMed2DPredictor(small_model))
    default.set_volume(snapshot.array_kji, snapshot.ijk_to_ras, key=snapshot.key)
    assert default.window.method.startswith("SA-Med2D-20M rule")


def test_prefetch_encodes_neighbours_once_and_clicks_reuse_them(small_model, snapshot):
    session = _session(small_model, snapshot)
    assert session.prefetch("axial", nearest_first(2, 6, radius=1)) == [2, 3, 1]
    assert session.prefetch("axial", nearest_first(2, 6, radius=2)) == [4, 0]
    assert nearest_first(5, 6, radius=1) == [5, 4]  # 6 is off the volume
    geometry = snapshot.geometry("axial")
    point = geometry.continuous_to_ras([[2, 24, 20]])[0]
    outcomes = list(session.propagate([PointPrompt(tuple(point), 1)], [], "axial", "none"))
    assert [o.index for o in outcomes] == [2]
    assert session.last.result.encoded_slices == 0  # the prompted slice was already encoded


def test_propagation_is_a_generator_the_caller_stops(small_model, snapshot):
    session = _session(small_model, snapshot)
    geometry = snapshot.geometry("axial")
    point = geometry.continuous_to_ras([[2, 24, 20]])[0]
    walk = session.propagate([PointPrompt(tuple(point), 1)], [], "axial", "both")
    first = next(walk)
    assert first.index == 2 and first.status == "prompted"
    walk.close()  # leaving the loop: nothing more is computed, the finished slice is kept
    assert set(session.last.result.slices) == {2}
    assert session.last.result.encoded_slices == 1


def test_propagation_from_a_given_mask_never_resegments_it(small_model, snapshot):
    session = _session(small_model, snapshot)
    given = np.zeros(snapshot.geometry("axial").slice_shape, bool)
    given[12:28, 14:34] = True
    outcomes = list(session.propagate(axis="axial", direction="up", seed_masks={2: given}))
    assert outcomes[0].status == "given" and outcomes[0].index == 2
    assert np.array_equal(outcomes[0].mask, given)
    assert all(o.index != 2 for o in outcomes[1:])
    assert session.last.result.encoded_slices == len(outcomes) - 1  # the seed slice was not encoded


def test_prefetch_stops_when_cancelled(small_model, snapshot):
    session = _session(small_model, snapshot)
    calls = []
    encoded = session.prefetch(
        "axial", nearest_first(2, 6, radius=2), should_cancel=lambda: calls.append(1) or len(calls) > 1
    )
    assert encoded == [2]


def test_another_volume_state_does_not_reuse_embeddings(small_model, snapshot):
    session = _session(small_model, snapshot)
    session.prefetch("axial", [2])
    session.set_volume(snapshot.array_kji + 1, IJK_TO_RAS, key="vtkMRMLScalarVolumeNode1:43")
    assert session.prefetch("axial", [2]) == [2]


def test_confidence_table_puts_the_least_certain_first():
    result = PropagationResult()
    for index, status, conf in [(3, "prompted", 0.9), (4, "propagated", 0.5), (5, "rejected", 0.0),
                                (2, "propagated", 0.7)]:  # fmt: skip
        result.slices[index] = SliceOutcome(index, status, conf, conf, 10)
    assert [r.index for r in confidence_table(result.slices.values())] == [5, 4, 2, 3]


def test_slice_center_is_on_the_slice(snapshot):
    geometry = snapshot.geometry("axial")
    center = slice_center_ras(geometry, 4)
    s, x, y = geometry.ras_to_continuous(center)[0]
    assert s == pytest.approx(4) and x == pytest.approx(23.5) and y == pytest.approx(19.5)


def _slice_to_ras(axis: str, offset: float) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = VIEW_ORIENTATIONS[axis]
    m[:3, 3] = VIEW_ORIENTATIONS[axis][:, 2] * offset
    return m


def test_axis_follows_the_view_the_point_was_placed_in():
    views = [("Axial", _slice_to_ras("axial", -12.0)), ("Coronal", _slice_to_ras("coronal", 5.0)),
             ("Sagittal", _slice_to_ras("sagittal", 30.0))]  # fmt: skip
    assert axis_from_views((1.0, 2.0, -12.0), views) == "axial"
    assert axis_from_views((1.0, 5.0, 7.0), views) == "coronal"
    assert axis_from_views((-30.0, 2.0, 7.0), views) == "sagittal"  # its normal is -x
    assert axis_from_views((1.0, 2.0, 3.0), views) is None  # on no view
    assert axis_from_views((-30.0, 5.0, 7.0), views) is None  # on two views: ambiguous
    tilted = _slice_to_ras("axial", 0.0)
    angle = np.radians(10)
    tilted[:3, :3] = tilted[:3, :3] @ np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                                                [0, np.sin(angle), np.cos(angle)]])  # fmt: skip
    assert axis_from_views((0.0, 0.0, 0.0), [("Reformat", tilted)]) == "axial"


def test_session_imports_without_torch():
    """The Slicer module calls axis_from_views (and snapshots volumes) when a point is placed, possibly
    before torch is installed: importing the session must not import torch."""
    code = (
        "import sys; import SAMMed2DSegmentLib.engine.session; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

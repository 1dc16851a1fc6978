"""The module panel's decisions (mrml/panel.py), headless: Slicer's real MRML classes, a real engine process,
the bundled demo model and the real 20-slice CT. What the Widget shows is `PanelModel.view()`; these tests
read it the way a user reads the panel."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from SAMMed2DSegmentLib.mrml import (
    add_volume_from_array,
    create_headless_scene,
    placement,
    provenance_tags,
    segment_array,
    self_test,
)
from SAMMed2DSegmentLib.mrml.controller import InteractiveSegmentation
from SAMMed2DSegmentLib.mrml.offscreen_views import SliceViews
from SAMMed2DSegmentLib.mrml.panel import LOCAL_MODEL, PanelModel, PanelParameters, end_message
from SAMMed2DSegmentLib.mrml.views import displayed_volume, viewed_slice_index
from SAMMed2DSegmentLib.service.client import EngineClient

from .panel_driver import LIVER_RAS
from .panel_driver import make_panel as _panel
from .panel_driver import wait as _wait

CT = Path(__file__).parent / "Data" / "totalseg-example-ct" / "ct"


@pytest.fixture
def case(ct, client):
    hs = create_headless_scene()
    volume = add_volume_from_array(hs, ct.array_kji, ct.ijk_to_ras, "CT")
    views = SliceViews(hs)
    views.show_volume(volume)
    p = PanelParameters(inputVolume=volume)
    nodes = {name: views[name].slice_node for name in ("Red", "Green", "Yellow")}
    yield hs, volume, nodes, p, _panel(hs, client)
    views.close()


# -- include / exclude toggle -------------------------------------------------------------------------------


@pytest.mark.parametrize("persistent", [False, True])
def test_red_view_clicks_alternate_include_and_exclude_whatever_the_persistence(ct, client, persistent):
    """The README's walkthrough with real clicks in Slicer's Red view: Shift+T, click, Shift+T, click, ...
    With persistence 0 Slicer leaves place mode after each click (the review's C3: the second click went to
    the include list). Then the engine segments the slice from exactly those prompts."""
    hs = create_headless_scene()
    volume = add_volume_from_array(hs, ct.array_kji, ct.ijk_to_ras, "CT")
    p = PanelParameters(inputVolume=volume, device="cpu")
    panel = _panel(hs, client)
    interaction = hs.app_logic.GetInteractionNode()
    interaction.SetPlaceModePersistence(int(persistent))
    clicks = [(LIVER_RAS, "include"), ((40.0, 120.0, LIVER_RAS[2]), "exclude"), ((80.0, 100.0, LIVER_RAS[2]),
                                                                                "include")]  # fmt: skip
    with SliceViews(hs) as views:
        views.show_volume(volume)
        views.jump_to("Red", LIVER_RAS)
        for ras, which in clicks:
            assert panel.toggle_placement(p) == which
            views.click("Red", ras)
            still_placing = interaction.GetCurrentInteractionMode() == interaction.Place
            assert still_placing == persistent
    assert p.includePoints.GetNumberOfDefinedControlPoints() == 2
    assert p.excludePoints.GetNumberOfDefinedControlPoints() == 1
    position = [0.0, 0.0, 0.0]
    p.excludePoints.GetNthControlPointPositionWorld(0, position)
    assert np.allclose(position, clicks[1][0], atol=1.0)
    assert interaction.GetPlaceModePersistence() == int(persistent)  # left as the user set it
    assert panel.segment(p, "none")
    _wait(panel)
    job = panel.activity.rows_job
    assert job.state == "done" and job.written == [10]
    assert len(job.points) == 3  # what the model was given: two include points and the exclude point
    for ras, which in clicks:
        assert any(q.label == int(which == "include") and np.allclose(q.position, ras, atol=1.0)
                   for q in job.points), (ras, which)  # fmt: skip


def test_toggle_after_another_list_was_armed_starts_with_include():
    hs = create_headless_scene()
    p = PanelParameters()
    panel = _panel(hs)
    placement.ensure_point_lists(hs.scene, p)
    other = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "landmarks")
    placement.arm(hs.app_logic, p.excludePoints)
    placement.arm(hs.app_logic, other)
    assert placement.armed_list(hs.app_logic, p) is None
    assert panel.toggle_placement(p) == "include"


# -- what is enabled -------------------------------------------------------------------------------------


def test_buttons_for_an_unplaced_roi_a_label_map_and_exclude_points_only(case):
    hs, volume, _, p, panel = case
    assert not panel.view(p).segment_enabled
    roi = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")  # the selector's "Create new"
    p.promptROI = roi
    view = panel.view(p)
    assert not view.segment_enabled and "include point" in view.segment_tooltip
    roi.SetCenter(*LIVER_RAS)
    roi.SetSize(80.0, 60.0, 4.0)
    assert panel.view(p).segment_enabled
    p.promptROI = None
    exclude = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "exclude")
    exclude.AddControlPoint(*LIVER_RAS)
    p.excludePoints = exclude
    assert not panel.view(p).segment_enabled  # exclude points alone, with no segment to correct
    p.outputSegmentation = hs.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "output")
    assert panel.view(p).segment_enabled  # they refine the segment (the engine refuses where it is empty)
    p.outputSegmentation = None
    assert not panel.view(p).segment_enabled
    include = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
    include.AddControlPoint(*LIVER_RAS)
    p.includePoints = include
    assert panel.view(p).segment_enabled

    labels = hs.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    labels.SetAndObserveImageData(volume.GetImageData())
    p.inputVolume = labels
    view = panel.view(p)
    assert not view.segment_enabled and "scalar volume" in view.segment_tooltip
    assert panel.segment(p, "none", interactive=False) is None and "scalar volume" in panel.view(p).status
    assert panel.take_dialogs() == []  # not interactive: the status line only
    vector = hs.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    p.inputVolume = vector
    assert not panel.view(p).segment_enabled


def test_the_volume_preselected_is_a_plain_scalar_volume(ct):
    hs = create_headless_scene()
    hs.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert displayed_volume(hs.scene) is None
    volume = add_volume_from_array(hs, ct.array_kji[:2], ct.ijk_to_ras, "CT")
    assert displayed_volume(hs.scene) is volume


def test_model_status_and_export_state_without_an_engine(case, tmp_path):
    hs, volume, _, p, panel = case
    assert panel.view(p).model_status.startswith("Ready: sammed2d_demo_small")
    p.model = LOCAL_MODEL
    assert "Choose the checkpoint file" in panel.view(p).model_status
    panel.local_checkpoint = str(tmp_path / "missing.pth")
    assert "not found" in panel.view(p).model_status
    assert panel.view(p).local_model and not panel.view(p).custom_window
    view = panel.view(p)
    assert not view.export_enabled and "Select the input volume and the segmentation" in view.export_tooltip


# -- how actions end, with the engine -----------------------------------------------------------------------


def _prompted(hs, p):
    include = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
    include.AddControlPoint(*LIVER_RAS)
    p.includePoints = include
    p.device = "cpu"


def test_status_after_done_then_table_location(case):
    hs, volume, views, p, panel = case
    _prompted(hs, p)
    undo = []
    segment_id = panel.segment(p, "none", save_undo=lambda: undo.append(1))
    assert segment_id and panel.view(p).status == "Segmenting…" and panel.view(p).stop_enabled
    _wait(panel)
    view = panel.view(p)
    assert view.status == "1 slice(s) written; the least certain are listed first."
    assert view.progress is None and not view.stop_enabled and undo == [1]
    assert [r.index for r in view.rows] == [10]
    assert segment_array(p.outputSegmentation, segment_id, volume)[10].any()
    x, y, z = panel.row_location(view.rows[0])
    assert z == pytest.approx(LIVER_RAS[2])
    assert panel.view(p).model_status.startswith("Loaded: sammed2d_demo_small")


def test_status_after_stop_in_mid_propagation(case):
    hs, volume, views, p, panel = case
    _prompted(hs, p)
    segment_id = panel.segment(p, "both")
    assert panel.view(p).status == "Propagating…"
    while not panel.activity.status.startswith("Slice"):
        panel.poll()
    panel.cancel()
    assert panel.view(p).status.startswith("Stopping…")
    _wait(panel)
    status = panel.view(p).status
    assert status.startswith("Stopped: ") and status.endswith("slice(s) written.")
    written = int(status.split()[1])
    assert written == int(segment_array(p.outputSegmentation, segment_id, volume).any(axis=(1, 2)).sum())


def test_status_after_a_failure_and_a_stale_drop(case):
    hs, volume, views, p, panel = case
    _prompted(hs, p)
    p.model = LOCAL_MODEL
    not_a_model = Path(hs.scene.GetRootDirectory() or ".") / "not-a-model.pth"
    panel.local_checkpoint = str(not_a_model)
    assert panel.segment(p, "none") is None  # no such file: refused before the engine sees it
    [dialog] = panel.take_dialogs()
    assert "checkpoint file not found" in dialog.message and dialog.message == panel.view(p).status

    p.model = "demo"
    segment_id = panel.segment(p, "both")
    seg = p.outputSegmentation
    while not panel.activity.status.startswith("Slice"):
        panel.poll()
    seg.GetSegmentation().RemoveSegment(segment_id)  # the user deletes the segment while it propagates
    _wait(panel)
    status = panel.view(p).status
    assert status.startswith("Stopped: the segment was removed while the model was running"), status
    assert panel.take_dialogs() == []


def test_a_bad_checkpoint_gives_one_dialog(case, tmp_path):
    hs, volume, views, p, panel = case
    _prompted(hs, p)
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    p.model, panel.local_checkpoint = LOCAL_MODEL, str(bad)
    panel.segment(p, "none")
    _wait(panel)
    dialogs = panel.take_dialogs()
    assert len(dialogs) == 1 and "could not be loaded" in dialogs[0].message
    assert panel.view(p).status.startswith("Not run: the model did not load")
    assert segment_array(p.outputSegmentation, p.outputSegmentation.GetSegmentation().GetNthSegmentID(0),
                         volume).sum() == 0  # fmt: skip


def test_propagate_from_here_seeds_from_the_slice_on_screen(case):
    hs, volume, views, p, panel = case
    _prompted(hs, p)
    segment_id = panel.segment(p, "none")
    _wait(panel)
    red = views["Red"]
    red.JumpSlice(*LIVER_RAS)
    geometry = panel.controller.snapshot(volume).geometry("axial")
    assert viewed_slice_index(hs.scene, geometry) == 10
    assert panel.propagate_from_here(p, segment_id) == segment_id
    assert panel.view(p).status == "Propagating from slice 10…"
    _wait(panel)
    assert panel.activity.rows_job.protected >= {10}
    assert int(segment_array(p.outputSegmentation, segment_id, volume).any(axis=(1, 2)).sum()) > 1
    red.JumpSlice(0.0, 0.0, 5000.0)  # off the volume
    assert panel.propagate_from_here(p, segment_id) is None
    assert "show a slice of the input volume in the axial view" in panel.take_dialogs()[0].message


def test_scene_close_clears_the_status_and_drops_results(case):
    hs, volume, views, p, panel = case
    _prompted(hs, p)
    segment_id = panel.segment(p, "both")
    panel.scene_closing()
    assert panel.view(p).status == "" and panel.view(p).rows == ()
    panel.controller.wait(panel.controller.jobs[-1])
    assert segment_array(p.outputSegmentation, segment_id, volume).sum() == 0


def test_export_needs_dicom_and_a_model_hash_which_the_segment_keeps(case, tmp_path):
    hs, volume, views, p, panel = case
    _prompted(hs, p)
    panel.segment(p, "none")
    _wait(panel)
    assert "not loaded from DICOM" in panel.view(p).export_tooltip
    volume.SetAttribute("DICOM.instanceUIDs", "1.2.3")
    assert panel.view(p).export_enabled
    # A reopened scene: a new panel (no engine yet) still finds the model hash on the segment.
    fresh = _panel(hs)
    assert fresh.view(p).export_enabled
    sha = provenance_tags.model_sha256_of(p.outputSegmentation)
    assert sha == panel.controller.model["sha256"]


def test_end_messages_say_how_the_job_ended():
    class Job:
        def __init__(self, state, written, message="", kept=()):
            self.state, self.written, self.message, self.kept = state, list(written), message, list(kept)

    assert end_message(Job("done", [])) == "The model found nothing at the prompts; nothing was written."
    assert end_message(Job("done", [1, 2], kept=[3])).startswith("2 slice(s) written")
    assert end_message(Job("done", [1, 2], kept=[3])).endswith("1 slice(s) edited by hand were kept.")
    assert end_message(Job("cancelled", [4])) == "Stopped: 1 slice(s) written."
    assert end_message(Job("cancelled", [], "not run: the model did not load (bad)")) == (
        "Not run: the model did not load (bad)."
    )
    assert end_message(Job("stale", [4], "the volume changed")) == (
        "Stopped: the volume changed. 1 slice(s) had been written."
    )
    assert end_message(Job("failed", [], "engine died")) == "Failed: engine died"


def test_live_update_waits_for_a_running_job_and_only_runs_when_shown(case):
    hs, volume, views, p, panel = case
    assert panel.live_update(p) == "skip"
    _prompted(hs, p)
    assert panel.live_update(p) == "run"
    assert panel.wants_live_update(p, shown=True) and not panel.wants_live_update(p, shown=False)
    p.liveUpdate = False
    assert not panel.wants_live_update(p, shown=True)
    panel.segment(p, "both")
    assert panel.live_update(p) == "later"
    _wait(panel)
    assert panel.live_update(p) == "run"


def test_point_placed_in_a_view_takes_that_views_axis(case):
    hs, volume, views, p, panel = case
    views["Green"].JumpSlice(*LIVER_RAS)  # coronal, through the liver point; Red and Yellow elsewhere
    views["Red"].JumpSlice(0.0, 0.0, LIVER_RAS[2] + 10.0)
    views["Yellow"].JumpSlice(0.0, 0.0, 0.0)
    include = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
    include.AddControlPoint(*LIVER_RAS)
    panel.point_placed(p, include)
    assert p.axis == "coronal"
    views["Red"].JumpSlice(*LIVER_RAS)
    include.AddControlPoint(10.0, 10.0, LIVER_RAS[2])  # on the Red (axial) plane only
    p.followView = False
    panel.point_placed(p, include)
    assert p.axis == "coronal"
    p.followView = True
    panel.point_placed(p, include)
    assert p.axis == "axial"
    include.AddControlPoint(*LIVER_RAS)  # on two views: ambiguous, the axis stays
    p.axis = "sagittal"
    panel.point_placed(p, include)
    assert p.axis == "sagittal"


# -- entering the module ---------------------------------------------------------------------------------


def test_entering_the_module_loads_the_chosen_model_in_the_background(client):
    """Issue 27, item 4: `warm_up` (the Widget's enter()) returns at once and the engine loads the chosen
    model meanwhile; the first action then finds it loaded and asks for nothing more."""
    from SAMMed2DSegmentLib.weights import registry

    hs = create_headless_scene()
    p = PanelParameters(device="cpu", precision="fp32")
    panel = _panel(hs, client)
    assert panel.warm_up(p)
    _wait(panel)
    demo = str(registry.resolve_model("demo"))
    assert panel.controller.model.get("path") == demo
    assert panel.view(p).model_status.startswith("Loaded: ")
    assert panel.take_dialogs() == []
    assert not panel.warm_up(p)  # entered again: loaded already, nothing to wait for
    assert panel.controller.request_model(demo, "cpu", precision="fp32") is None  # the first click's request


def test_entering_the_module_starts_nothing_when_the_model_cannot_run_yet():
    """Nothing installed, or a local model without a file: no engine, no dialog, no status (the first action
    says what is missing)."""
    hs = create_headless_scene()
    editor = hs.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    made = []

    def make() -> InteractiveSegmentation:
        made.append(1)
        return InteractiveSegmentation(hs.scene, EngineClient(), editor, hs.app_logic)

    not_installed = dataclasses.replace(self_test.READY, torch_problem="torch is not installed")
    assert not not_installed.ready
    for state, model in ((not_installed, "demo"), (self_test.READY, LOCAL_MODEL)):
        panel = PanelModel(hs, make, lambda download, state=state: state)
        assert not panel.warm_up(PanelParameters(model=model))
        assert panel.take_dialogs() == [] and panel.activity.status == ""
    assert not PanelModel(hs, make, lambda d: self_test.READY).warm_up(None)  # no parameter node yet
    assert made == []

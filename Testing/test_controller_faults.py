"""Faults at every phase of the controller's work, with a real engine process (started the way the module
starts it), the bundled demo model, the real 20-slice CT and Slicer's real MRML classes (tier B).

Phases: model loading, volume queued, slice encoding, mid-propagation, DICOM-SEG export, idle pre-encoding.
Events: Stop (`controller.cancel()`), SIGKILL of the engine, scene close (`controller.scene_closing()`).
After each: (a) the next action works and writes the liver slice; (b) nothing half-done stays written; (c) the
callbacks said what happened exactly once. A phase is reached through real work only: jobs queued behind a
model load or a running propagation, an event fired from a propagation's own slice callback, an export of
the CT's 31 reference labels (seconds of the engine's time), the engine's idle loop after `prefetch`. The
review's C2 and L1 sequences are two of the cases (model loading × Stop, idle pre-encoding × kill).

Before the matrix: the faults it does not reach (a volume request that fails on its own, jobs made stale by
the user's edits, a checkpoint that cannot be loaded).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
import slicer
import vtk

from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
from SAMMed2DSegmentLib.formats.volumes import Volume
from SAMMed2DSegmentLib.mrml import (
    add_volume_from_array,
    create_headless_scene,
    ensure_segment,
    ensure_segmentation,
    volume_ijk_to_world,
    write_segment_slices,
)
from SAMMed2DSegmentLib.mrml.controller import (
    InteractiveSegmentation,
    SegmentationJob,
    SegmentOptions,
    SliceRow,
)
from SAMMed2DSegmentLib.mrml.scene import HeadlessScene
from SAMMed2DSegmentLib.mrml.segmentations import load_segmentation, segment_array
from SAMMed2DSegmentLib.service.client import EngineClient
from SAMMed2DSegmentLib.weights.registry import resolve_model

CT = Path(__file__).parent / "Data" / "totalseg-example-ct" / "ct"
LIVER_RAS = (93.26171875, 129.89453125, -784.5)  # demo/liver-point.mrk.json (LPS there): slice 10 of 20
LIVER_SLICE = 10
LABELS = Path(__file__).parent / "Data" / "totalseg-example-ct" / "labels" / "labels_on_ct_grid.nrrd"
DEMO = str(resolve_model("demo"))


@dataclass
class Recorder:
    """Every callback of one job, with the job's state and message at the moment it fired."""

    done: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    slices: list[int] = field(default_factory=list)

    def on_done(self, job: SegmentationJob) -> None:
        self.done.append((job.state, job.message))

    def on_error(self, message: str, details: str) -> None:
        self.errors.append(message)

    def on_slice(self, row: SliceRow) -> None:
        self.slices.append(row.index)

    @property
    def calls(self) -> int:
        return len(self.done) + len(self.errors)


@dataclass
class Case:
    """A scene with the CT, a segmentation with an empty "liver" segment, an include point on the liver, and
    a controller of its own (nothing requested yet) on the module's engine."""

    hs: HeadlessScene
    volume: vtk.vtkObject
    seg: vtk.vtkObject
    liver: str
    include: vtk.vtkObject
    controller: InteractiveSegmentation

    @property
    def client(self) -> EngineClient:
        return self.controller.client

    def start(
        self, options: SegmentOptions | None = None, on_slice: Callable[[SliceRow], None] | None = None
    ) -> tuple[SegmentationJob, Recorder]:
        """Start segmenting the liver (the model must have been requested); every callback is recorded."""
        calls = Recorder()

        def slice_callback(row: SliceRow) -> None:
            calls.on_slice(row)
            if on_slice is not None:
                on_slice(row)

        job = self.controller.start_segmentation(
            self.volume, self.include, None, None, self.seg, self.liver, options or SegmentOptions(),
            on_slice=slice_callback,
            on_done=calls.on_done, on_error=calls.on_error,
        )  # fmt: skip
        return job, calls

    def liver_voxels(self) -> np.ndarray:
        return segment_array(self.seg, self.liver, self.volume)

    def next_action_works(self) -> None:
        """(a) The user's next action (choose the model, segment the slice) works the first time."""
        load_errors: list[str] = []
        self.controller.request_model(DEMO, "cpu", lambda message, details: load_errors.append(message))
        job, calls = self.start()
        self.controller.wait(job, timeout=300)
        assert load_errors == [] and calls.errors == [], (load_errors, calls.errors)
        assert job.state == "done" and calls.done == [("done", "")] and job.written == [LIVER_SLICE]
        assert self.liver_voxels()[LIVER_SLICE].sum() > 5000


def new_case(ct: Volume, client: EngineClient, offset: int = 0) -> Case:
    """A new scene and a new controller (nothing requested yet) on `client`'s engine."""
    hs = create_headless_scene()
    editor = hs.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetSingletonTag("SAMMed2DSegment")  # as the module's own node: it stays when the scene is cleared
    controller = InteractiveSegmentation(hs.scene, client, editor, hs.app_logic)
    return populate(hs, controller, ct, offset)


def populate(hs: HeadlessScene, controller: InteractiveSegmentation, ct: Volume, offset: int = 0) -> Case:
    """The CT (its voxels + `offset`: another content, so nothing of it is in the engine's caches), an empty
    "liver" segment and an include point on the liver, in `hs`'s scene."""
    volume = add_volume_from_array(hs, ct.array_kji + np.int16(offset), ct.ijk_to_ras, "CT")
    seg = ensure_segmentation(hs, volume)
    liver = ensure_segment(seg, "liver")
    include = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
    include.AddControlPoint(*LIVER_RAS)
    return Case(hs, volume, seg, liver, include, controller)


def reopen(case: Case, ct: Volume) -> Case:
    """The scene closed (the controller told first, as the module does on StartCloseEvent) and the CT
    loaded again: what a user does next."""
    case.controller.scene_closing()
    case.hs.scene.Clear(0)
    return populate(case.hs, case.controller, ct)


@pytest.fixture
def case(ct: Volume, client: EngineClient) -> Case:
    return new_case(ct, client)


def settle(client: EngineClient, timeout: float = 300.0) -> None:
    """Deliver every pending reply: the engine has answered everything sent so far."""
    deadline = time.monotonic() + timeout
    while client.jobs:
        if client.poll() == 0:
            assert time.monotonic() < deadline, f"the engine did not answer {list(client.jobs.values())}"
            time.sleep(0.005)


def kill_engine(client: EngineClient) -> int:
    """SIGKILL the engine and wait until it has exited, without polling the client and without reaping it
    (the client does that). Returns its pid."""
    pid = client.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return pid


def engine_cpu_seconds(pid: int) -> float:
    """CPU time the engine process has used so far (user + system), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_goes_idle(pid: int, timeout: float = 60.0) -> bool:
    """Whether the engine stops using the CPU (under 2 % over half a second) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        used = engine_cpu_seconds(pid)
        time.sleep(0.5)
        if engine_cpu_seconds(pid) - used < 0.01:
            return True
    return False


def encoded_slices(client: EngineClient) -> int:
    """Slice embeddings the engine has stored so far (its disk cache keeps one file per encoded slice)."""
    folder = Path(client.extra_env["SAMMED2D_CACHE_DIR"]) / "embeddings"
    return sum(1 for path in folder.rglob("*.safetensors") if not path.name.startswith("."))


def written_slices(case: Case) -> set[int]:
    """The axial slices of the liver segment holding voxels."""
    return {int(k) for k in np.flatnonzero(case.liver_voxels().any(axis=(1, 2)))}


def wait_until(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    """Wait (sleeping, not polling the client) until `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- what the matrix does not cover ----------------------------------------------------------------------


def test_a_job_remakes_the_3d_surface_of_what_it_wrote_at_its_end(case):
    """With the segmentation shown in 3-D, the liver's surface is made from its voxels once the job ends
    (the writer leaves it while slices are written), and another segment's surface stays the same object."""
    surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    other = ensure_segment(case.seg, "other")
    corner = np.zeros(case.volume.GetImageData().GetDimensions()[::-1], bool)
    corner[2:5, 2:12, 2:12] = True  # far from the liver
    write_volume_mask(case, other, corner)
    case.seg.CreateClosedSurfaceRepresentation()
    segmentation = case.seg.GetSegmentation()
    kept = segmentation.GetSegment(other).GetRepresentation(surface)
    assert kept.GetNumberOfPoints() > 0
    case.controller.request_model(DEMO, "cpu", None)
    job, calls = case.start()
    case.controller.wait(job, timeout=300)
    assert job.state == "done" and job.written == [LIVER_SLICE], (job.state, job.message)
    fresh = slicer.vtkSegmentation()
    fresh.DeepCopy(segmentation)
    assert fresh.CreateRepresentation(surface, True)
    liver = segmentation.GetSegment(case.liver).GetRepresentation(surface)
    expected = fresh.GetSegment(case.liver).GetRepresentation(surface)
    assert liver.GetNumberOfPoints() > 0
    assert liver.GetNumberOfPoints() == expected.GetNumberOfPoints()
    assert segmentation.GetSegment(other).GetRepresentation(surface) is kept


def write_volume_mask(case: Case, segment_id: str, voxels: np.ndarray) -> None:
    """Put `voxels` (k, j, i) into a segment, all axial slices at once."""
    geometry = SliceGeometry.create(voxels.shape, volume_ijk_to_world(case.volume), "axial")
    masks = {k: geometry.extract(voxels, k) for k in range(voxels.shape[0]) if voxels[k].any()}
    write_segment_slices(case.seg, segment_id, case.volume, geometry, masks)


@pytest.mark.parametrize("how", ["segment", "propagate from here"])
def test_a_segmentation_stored_as_surfaces_is_refused_before_any_work(case, how):
    """Its source representation is the closed surface (segments imported from models): one line saying what
    to change, before the engine is asked anything (it used to fail at the first written slice)."""
    other = ensure_segment(case.seg, "other")
    box = np.zeros(case.volume.GetImageData().GetDimensions()[::-1], bool)
    box[2:8, 5:40, 5:40] = True
    write_volume_mask(case, other, box)
    case.seg.CreateClosedSurfaceRepresentation()
    surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    case.seg.GetSegmentation().SetSourceRepresentationName(surface)
    with pytest.raises(ValueError, match="make Binary labelmap its source representation") as error:
        if how == "segment":
            case.start()
        else:
            case.controller.start_propagation_from_slice(
                case.volume, case.seg, other, 4, SegmentOptions(direction="both")
            )
    assert "\n" not in str(error.value) and case.controller.jobs == []


def test_a_volume_the_engine_did_not_take_is_sent_again(case):
    """C2, the controller's own defence: when the volume request ends without the engine holding the volume
    (here a cancel naming that request), the controller forgets it was sent."""
    case.controller.request_model(DEMO, "cpu")
    job, calls = case.start()
    transfer = next(j for j in case.client.jobs.values() if j.op == "set_volume")
    case.client.cancel(transfer)
    settle(case.client)
    assert transfer.state == "cancelled" and job.state == "failed"
    assert calls.errors == ["the volume was not sent to the engine; run the action again"]
    case.next_action_works()


STALE = {
    "segment": "the segment was removed while the model was running",
    "segmentation": "the volume or the segmentation was removed while the model was running",
    "volume": "the volume changed while the model was running; run it again",
}


@pytest.mark.parametrize("change", sorted(STALE))
def test_a_job_that_became_stale_says_so_once(case, change):
    """C5: a propagation whose segment, segmentation or volume changes under it ends "stale" with the reason,
    through `on_done`, exactly once, and writes nothing after the change (the panel used to keep showing
    "Propagating…")."""

    def change_on_first_slice(row: SliceRow) -> None:
        if len(calls.slices) > 1:
            return
        if change == "segment":
            case.seg.GetSegmentation().RemoveSegment(case.liver)
        elif change == "segmentation":
            case.hs.scene.RemoveNode(case.seg)
        else:
            voxels = slicer.util.arrayFromVolume(case.volume)
            voxels[0, 0, 0] += 1
            slicer.util.arrayFromVolumeModified(case.volume)

    case.controller.request_model(DEMO, "cpu")
    job, calls = case.start(SegmentOptions(direction="both"), on_slice=change_on_first_slice)
    case.controller.wait(job, timeout=300)
    settle(case.client)
    assert job.state == "stale" and calls.done == [("stale", STALE[change])] and calls.errors == []
    assert job.written == [LIVER_SLICE] and calls.slices == [LIVER_SLICE]  # nothing after the change
    if change == "volume":
        assert written_slices(case) == {LIVER_SLICE}


def test_the_jobs_of_a_closed_scene_end_stale_without_callbacks(case):
    """The scene-closing case of C5: the caller resets itself, so no callback fires; the job says "stale"."""

    def close_on_first_slice(row: SliceRow) -> None:
        case.controller.scene_closing()

    case.controller.request_model(DEMO, "cpu")
    job, calls = case.start(SegmentOptions(direction="both"), on_slice=close_on_first_slice)
    settle(case.client)
    assert job.state == "stale" and job.message == "the scene was closed while the model was running"
    assert calls.calls == 0 and job.written == [LIVER_SLICE] and calls.slices == [LIVER_SLICE]


@pytest.mark.parametrize("first", [True, False], ids=["first model", "after a model"])
def test_a_failed_model_load_is_one_error(ct, client, tmp_path, first):
    """R12: a checkpoint that cannot be loaded gives one error; the segmentation queued right behind it ends
    "cancelled" with the reason instead of raising a second error ("no model is loaded", on a new engine),
    and it never runs on the model loaded before (on an engine that had one)."""
    if first:  # an engine that never had a model
        client = EngineClient(extra_env={"SAMMED2D_CACHE_DIR": str(tmp_path / "cache")})
    case = new_case(ct, client)
    if not first:
        case.controller.request_model(DEMO, "cpu")
    bad = tmp_path / "x.pth"
    bad.write_text("not a checkpoint\n")
    errors: list[str] = []
    case.controller.request_model(str(bad), "cpu", lambda message, details: errors.append(message))
    job, calls = case.start()
    settle(case.client)
    assert len(errors) == 1 and calls.errors == [] and "\n" not in errors[0]
    assert calls.done == [("cancelled", f"not run: the model did not load ({errors[0]})")]
    assert job.written == [] and case.liver_voxels().sum() == 0
    assert case.controller.model == {}
    case.next_action_works()  # the module's engine has the demo model again, as the other tests expect
    if first:
        client.close()


# -- the fault matrix: six phases × three events -----------------------------------------------------------

EVENTS = ("stop", "kill", "close")
ENGINE_STOPPED = "The segmentation engine stopped unexpectedly"
SCENE_CLOSED = "the scene was closed while the model was running"


@pytest.fixture(scope="module")
def workspace(ct: Volume, client: EngineClient) -> Case:
    """One scene and one controller for the matrix, as in Slicer: each test closes the last scene (telling
    the controller) and loads the CT again, so the model stays loaded from one test to the next."""
    case = new_case(ct, client)
    case.controller.request_model(DEMO, "cpu")
    return case


@pytest.fixture
def scene(workspace: Case, ct: Volume) -> Case:
    settle(workspace.client)
    return reopen(workspace, ct)


def fire(case: Case, event: str) -> None:
    if event == "stop":
        case.controller.cancel()
    elif event == "kill":
        kill_engine(case.client)
    else:
        case.controller.scene_closing()


def assert_said_once(job: SegmentationJob, calls: Recorder, event: str) -> None:
    """(c) One callback (none for a closed scene) saying how the job ended, and the job says the same."""
    if event == "stop":
        assert calls.errors == [] and calls.done == [("cancelled", "")] and job.state == "cancelled"
    elif event == "kill":
        assert calls.done == [] and len(calls.errors) == 1 and calls.errors[0].startswith(ENGINE_STOPPED)
        assert job.state == "failed" and job.message == calls.errors[0] and "\n" not in job.message
    else:
        assert calls.calls == 0 and job.state == "stale" and job.message == SCENE_CLOSED


def assert_nothing_half_done(case: Case, job: SegmentationJob, event: str, at_event: list[int]) -> None:
    """(b) Stop keeps the slices written before it, a kill leaves none (rolled back), a closed scene's job
    wrote nothing after the close."""
    if event == "kill":
        assert job.written == [] and written_slices(case) == set()
    else:
        assert written_slices(case) == set(job.written)
        if event == "close":
            assert job.written == at_event


def next_action(case: Case, ct: Volume, event: str) -> None:
    """(a) The next action works the first time (in a scene opened again after a close)."""
    (reopen(case, ct) if event == "close" else case).next_action_works()


@pytest.mark.parametrize("event", EVENTS)
def test_while_the_model_loads(ct, client, event):
    """The model is loading (a new controller asks for it), the volume and a segmentation wait behind it: the
    first run on a volume. Stop and a scene close spare the load and the volume (set-up; with Stop this is the
    review's C2 sequence, which used to fail every later run on the volume); after a kill the load's error is
    the only error and the segmentation ends "cancelled" saying why (R12)."""
    case = new_case(ct, client)
    load_errors: list[str] = []
    load = case.controller.request_model(DEMO, "cpu", lambda message, details: load_errors.append(message))
    job, calls = case.start()
    transfer = next(j for j in case.client.jobs.values() if j.op == "set_volume")
    fire(case, event)
    settle(case.client)
    if event == "kill":
        assert len(load_errors) == 1 and load_errors[0].startswith(ENGINE_STOPPED) and calls.errors == []
        assert calls.done == [("cancelled", f"not run: the model did not load ({load_errors[0]})")]
    else:
        assert load.state == transfer.state == "done" and load_errors == []
        assert case.controller.model.get("sha256")  # recorded also when the scene closed meanwhile
        assert_said_once(job, calls, event)
    assert job.written == [] and written_slices(case) == set()
    next_action(case, ct, event)


@pytest.mark.parametrize("event", EVENTS)
def test_while_the_volume_is_queued(scene, ct, event):
    """A propagation runs on another volume; the user segments this one: its volume transfer and its job wait
    behind the propagation when the event comes (from the propagation's first slice). Stop ends both jobs but
    not the transfer (C2): the next action on this volume works."""
    other = populate(scene.hs, scene.controller, ct)
    queued: dict[str, object] = {}

    def segment_this_volume_then_fire(row: SliceRow) -> None:
        if not queued:
            queued["job"], queued["calls"] = scene.start()
            queued["transfer"] = next(j for j in scene.client.jobs.values() if j.op == "set_volume")
            queued["at_event"] = list(running.written)
            fire(scene, event)

    both = SegmentOptions(direction="both")
    running, running_calls = other.start(both, on_slice=segment_this_volume_then_fire)
    settle(scene.client)
    job, calls = queued["job"], queued["calls"]
    assert_said_once(running, running_calls, event)
    assert_nothing_half_done(other, running, event, queued["at_event"])
    assert_said_once(job, calls, event)
    assert job.written == [] and written_slices(scene) == set()
    if event == "stop":
        assert queued["transfer"].state == "done"  # set-up is not cancelled by Stop
    next_action(scene, ct, event)


@pytest.mark.parametrize("event", EVENTS)
def test_while_a_slice_is_encoded(scene, ct, event):
    """A one-slice segmentation of a volume new to the engine (its slice must be encoded) is under way."""
    case = populate(scene.hs, scene.controller, ct, offset=1 + EVENTS.index(event))
    job, calls = case.start()
    fire(case, event)
    settle(case.client)
    assert_said_once(job, calls, event)
    assert job.written in ([], [LIVER_SLICE]) and (event != "close" or job.written == [])
    assert_nothing_half_done(case, job, event, [])
    next_action(case, ct, event)


@pytest.mark.parametrize("event", EVENTS)
def test_in_mid_propagation(scene, ct, event):
    """A propagation through the whole CT, the event on its third slice."""
    at_event: list[int] = []

    def fire_on_third_slice(row: SliceRow) -> None:
        if len(calls.slices) == 3:
            at_event.extend(job.written)
            fire(scene, event)

    job, calls = scene.start(SegmentOptions(direction="both"), on_slice=fire_on_third_slice)
    settle(scene.client)
    assert_said_once(job, calls, event)
    assert_nothing_half_done(scene, job, event, at_event)
    assert len(at_event) == 3 and len(calls.slices) < 20
    if event == "stop":
        assert job.result["slices_after_cancel"] <= 1 and len(job.written) >= 3
    next_action(scene, ct, event)


@pytest.mark.parametrize("how", ["segment", "segment again", "propagate from here"])
def test_a_slice_painted_while_the_job_runs_is_kept(scene, how):
    """The user paints two slices ahead of a propagation while it runs: both keep exactly the painted voxels
    (the model's masks used to replace them on arrival), and the job lists them as kept. "segment again":
    the segment already holds voxels (the liver's slice) when the propagation starts."""
    seg = scene.seg
    shape = scene.volume.GetImageData().GetDimensions()[::-1]
    if how != "segment":
        job, _ = scene.start()  # the liver's slice, to propagate from (or to segment again)
        scene.controller.wait(job, timeout=300)
        assert job.state == "done"
    painted = {index: np.zeros(shape[1:], bool) for index in (LIVER_SLICE - 4, LIVER_SLICE + 4)}
    for plane in painted.values():
        plane[100:110, 100:110] = True  # display orientation: a small square inside the liver's area

    def paint_ahead(row: SliceRow) -> None:
        if len(calls.slices) == 1:
            geometry = SliceGeometry.create(shape, volume_ijk_to_world(scene.volume), "axial")
            write_segment_slices(seg, scene.liver, scene.volume, geometry, painted)

    calls = Recorder()
    options = SegmentOptions(direction="both")
    if how != "propagate from here":
        job = scene.controller.start_segmentation(
            scene.volume, scene.include, None, None, seg, scene.liver, options,
            on_slice=lambda row: (calls.on_slice(row), paint_ahead(row)), on_done=calls.on_done,
            on_error=calls.on_error,
        )  # fmt: skip
    else:
        job = scene.controller.start_propagation_from_slice(
            scene.volume, seg, scene.liver, LIVER_SLICE, options,
            on_slice=lambda row: (calls.on_slice(row), paint_ahead(row)), on_done=calls.on_done,
            on_error=calls.on_error,
        )  # fmt: skip
    scene.controller.wait(job, timeout=300)
    assert job.state == "done", (job.state, job.message)
    assert sorted(set(job.kept) & set(painted)) == sorted(painted)
    geometry = SliceGeometry.create(shape, volume_ijk_to_world(scene.volume), "axial")
    voxels = scene.liver_voxels()
    for index, plane in painted.items():
        np.testing.assert_array_equal(geometry.extract(voxels, index), plane, err_msg=f"slice {index}")
    assert len(job.written) > 4  # the propagation wrote the slices around them


def test_a_failure_while_taking_back_still_ends_the_job_in_one_message(scene, ct, monkeypatch):
    """Taking back a failed job's slices raises (say, the segmentation changed beyond reading): the job still
    ends "failed", once, saying its slices stay and Undo is the way back; the 3-D surfaces are made; the next
    action works. (It used to escape from the event handler and leave the job running.)"""
    from SAMMed2DSegmentLib.mrml.job_changes import SliceChanges

    def refuse(self) -> None:
        raise RuntimeError("cannot read segment 'liver'")

    monkeypatch.setattr(SliceChanges, "take_back", refuse)

    def kill_on_third_slice(row: SliceRow) -> None:
        if len(calls.slices) == 3:
            fire(scene, "kill")

    job, calls = scene.start(SegmentOptions(direction="both"), on_slice=kill_on_third_slice)
    settle(scene.client)
    assert job.state == "failed" and job.writer is None and job.rollback is None
    assert len(calls.errors) == 1 and calls.done == [] and "\n" not in calls.errors[0]
    assert "could not all be taken back (cannot read segment 'liver'): use Undo" in calls.errors[0]
    monkeypatch.undo()
    next_action(scene, ct, "kill")


def test_a_failed_job_takes_back_its_writes_only(scene, ct):
    """The engine killed on a propagation's third slice, after the user had added and painted a segment,
    painted another, renamed a third and removed a fourth while it ran: the job's slices are taken back, and
    everything the user did stays (the whole segmentation used to be restored to its state before the job's
    first write)."""
    seg = scene.seg.GetSegmentation()
    shape = scene.volume.GetImageData().GetDimensions()[::-1]
    square = np.zeros(shape, bool)
    square[:, 5:15, 5:15] = True  # a corner far from the liver
    kept, renamed, removed = (ensure_segment(scene.seg, name) for name in ("kept", "renamed", "removed"))
    for segment_id in (kept, removed):
        write_volume_mask(scene, segment_id, square & (np.arange(shape[0]) < 3)[:, None, None])
    painted: dict[str, np.ndarray] = {}

    def user_works_on_third_slice(row: SliceRow) -> None:
        if len(calls.slices) != 3:
            return
        added = ensure_segment(scene.seg, "added during the job")
        painted[added] = square & (np.arange(shape[0]) == 12)[:, None, None]
        painted[kept] = square & (np.arange(shape[0]) < 3)[:, None, None] | painted[added]
        write_volume_mask(scene, added, painted[added])
        write_volume_mask(scene, kept, painted[kept])
        seg.GetSegment(renamed).SetName("renamed by the user")
        seg.RemoveSegment(removed)
        fire(scene, "kill")

    job, calls = scene.start(SegmentOptions(direction="both"), on_slice=user_works_on_third_slice)
    settle(scene.client)
    assert job.state == "failed" and len(calls.slices) >= 3, (job.state, calls.slices)
    assert scene.liver_voxels().sum() == 0  # its slices are taken back
    (added,) = (i for i in painted if i != kept)
    assert seg.GetSegment(removed) is None and seg.GetSegment(renamed).GetName() == "renamed by the user"
    for segment_id, voxels in painted.items():
        np.testing.assert_array_equal(segment_array(scene.seg, segment_id, scene.volume), voxels)
    next_action(scene, ct, "kill")


@pytest.mark.parametrize("event", EVENTS)
def test_during_a_dicom_seg_export(scene, ct, event, tmp_path):
    """The CT's 31 reference labels exported as DICOM-SEG referencing the real DICOM files (a few seconds of
    the engine's time), the event half a second in. An export is not interrupted once begun: after Stop it
    completes; a kill leaves no output file (written atomically); a closed scene's export says nothing."""
    scene.next_action_works()  # a model has been used: its hash goes into the file
    labels = load_segmentation(scene.hs, LABELS)
    out = tmp_path / "labels.dcm"
    said: list[tuple[str, str]] = []
    export = scene.controller.start_export(
        labels, scene.volume, [str(f) for f in sorted(CT.glob("*.dcm"))], str(out),
        scene.controller.model["sha256"], on_done=lambda path: said.append(("done", path)),
        on_error=lambda message, details: said.append(("error", message)),
        on_cancelled=lambda: said.append(("cancelled", "")),
    )  # fmt: skip
    begun = time.monotonic()
    while time.monotonic() - begun < 0.5:
        scene.client.poll() or time.sleep(0.005)
    assert export.state == "pending"  # still under way when the event comes
    fire(scene, event)
    settle(scene.client)
    if event == "kill":
        assert len(said) == 1 and said[0][0] == "error" and said[0][1].startswith(ENGINE_STOPPED)
        assert not out.exists()
    else:
        assert said == ([("done", str(out))] if event == "stop" else [])
        assert export.state == "done" and len(pydicom.dcmread(out).PerFrameFunctionalGroupsSequence) > 0
    next_action(scene, ct, event)


@pytest.mark.parametrize("event", EVENTS)
def test_while_the_engine_pre_encodes(scene, ct, event):
    """Idle pre-encoding (prefetch) of a volume new to the engine, nothing pending. Stop and a scene close
    end the pre-encoding (it is work). A kill is noticed by nobody until the next action, which must work the
    first time: the review's L1 sequence (the dead engine's connection used to kill the new engine)."""
    case = populate(scene.hs, scene.controller, ct, offset=4 + EVENTS.index(event))
    before = encoded_slices(case.client)
    assert case.controller.prefetch(case.volume, "axial", LIVER_SLICE, SegmentOptions()) is not None
    settle(case.client)
    wait_until(lambda: encoded_slices(case.client) > before)  # pre-encoding, slice after slice
    at_event, pid = encoded_slices(case.client), case.client.pid
    fire(case, event)
    if event != "kill":
        assert engine_goes_idle(pid)
        assert encoded_slices(case.client) - at_event <= 2  # the slice under way, not the other 18
    assert not case.client.jobs
    next_action(case, ct, event)

"""Faults at every phase of the controller's work, with a real engine process (started the way the module
starts it), the bundled demo model, the real 20-slice CT and Slicer's real MRML classes (tier B).

Phases: model loading, volume queued, slice encoding, mid-propagation, DICOM-SEG export, idle pre-encoding.
Events: Stop (`controller.cancel()`), SIGKILL of the engine, scene close (`controller.scene_closing()`).
After each: the next action works and writes the liver slice; nothing half-done stays written; the callbacks
said what happened exactly once. A phase is reached through real work only: a job queued behind a model load,
a propagation cancelled or killed from its own slice callback, the engine's idle loop after `prefetch`.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import slicer

from SAMMed2DSegmentLib.formats.volumes import read_volume
from SAMMed2DSegmentLib.mrml import (
    add_volume_from_array,
    create_headless_scene,
    ensure_segment,
    ensure_segmentation,
)
from SAMMed2DSegmentLib.mrml.controller import InteractiveSegmentation, SegmentationJob, SegmentOptions
from SAMMed2DSegmentLib.mrml.segmentations import segment_array
from SAMMed2DSegmentLib.service.client import EngineClient
from SAMMed2DSegmentLib.weights.registry import resolve_model

CT = Path(__file__).parent / "Data" / "totalseg-example-ct" / "ct"
LIVER_RAS = (93.26171875, 129.89453125, -784.5)  # demo/liver-point.mrk.json (LPS there): slice 10 of 20
LIVER_SLICE = 10
DEMO = str(resolve_model("demo"))


@pytest.fixture(scope="module")
def ct():
    return read_volume(CT)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One engine for the module (a kill starts the next one); its cache folder is this run's own."""
    client = EngineClient(extra_env={"SAMMED2D_CACHE_DIR": str(tmp_path_factory.mktemp("engine-cache"))})
    yield client
    client.close()


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

    def on_slice(self, row) -> None:
        self.slices.append(row.index)

    @property
    def calls(self) -> int:
        return len(self.done) + len(self.errors)


@dataclass
class Case:
    """A scene with the CT, a segmentation with an empty "liver" segment, an include point on the liver, and
    a controller of its own (nothing requested yet) on the module's engine."""

    hs: object
    volume: object
    seg: object
    liver: str
    include: object
    controller: InteractiveSegmentation

    @property
    def client(self) -> EngineClient:
        return self.controller.client

    def start(self, options: SegmentOptions | None = None, on_slice=None) -> tuple[SegmentationJob, Recorder]:
        """Start segmenting the liver (the model must have been requested); every callback is recorded."""
        calls = Recorder()

        def slice_callback(row) -> None:
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


def new_case(ct, client: EngineClient) -> Case:
    hs = create_headless_scene()
    volume = add_volume_from_array(hs, ct.array_kji, ct.ijk_to_ras, "CT")
    seg = ensure_segmentation(hs, volume)
    liver = ensure_segment(seg, "liver")
    editor = hs.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetSingletonTag("SAMMed2DSegment")  # as the module's own node: it stays when the scene is cleared
    include = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
    include.AddControlPoint(*LIVER_RAS)
    controller = InteractiveSegmentation(hs.scene, client, editor, hs.app_logic)
    return Case(hs, volume, seg, liver, include, controller)


@pytest.fixture
def case(ct, client) -> Case:
    return new_case(ct, client)


def settle(client: EngineClient, timeout: float = 300.0) -> None:
    """Deliver every pending reply: the engine has answered everything sent so far."""
    deadline = time.monotonic() + timeout
    while client.jobs:
        if client.poll() == 0:
            assert time.monotonic() < deadline, f"the engine did not answer {list(client.jobs.values())}"
            time.sleep(0.005)


# -- the sequences the review reproduced ------------------------------------------------------------------


def test_stop_while_the_volume_is_queued_behind_the_model_keeps_the_volume(case):
    """C2: Stop pressed during the first run on a volume (the model still loading, the volume queued behind
    it) stops the segmentation only; the model and the volume still reach the engine, so the next run works
    (it used to fail with "the volume was not sent to the engine" until the scene was closed)."""
    load_errors: list[str] = []
    load = case.controller.request_model(DEMO, "cpu", lambda message, details: load_errors.append(message))
    job, calls = case.start()
    transfer = next(j for j in case.client.jobs.values() if j.op == "set_volume")
    case.controller.cancel()
    settle(case.client)
    assert load.state == "done" and transfer.state == "done"  # set-up is not cancelled by Stop
    assert job.state == "cancelled" and job.written == [] and calls.errors == [] and load_errors == []
    assert case.liver_voxels().sum() == 0
    case.next_action_works()


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


def test_an_engine_killed_while_idle_is_replaced_cleanly(case):
    """L1: the engine dies while nothing is pending (SIGKILL during the idle pre-encoding; nobody polls): the
    next action starts a new engine that works the first time (the dead engine's connection used to be read
    as the new one's, and the new engine was killed)."""
    case.next_action_works()
    assert case.controller.prefetch(case.volume, "axial", LIVER_SLICE, SegmentOptions()) is not None
    settle(case.client)  # the prefetch request is answered at once; the encoding goes on while idle
    killed = kill_engine(case.client)
    case.next_action_works()
    assert case.client.pid != killed


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

    def change_on_first_slice(row) -> None:
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
        assert set(np.flatnonzero(case.liver_voxels().any(axis=(1, 2)))) == {LIVER_SLICE}


def test_the_jobs_of_a_closed_scene_end_stale_without_callbacks(case):
    """The scene-closing case of C5: the caller resets itself, so no callback fires; the job says "stale"."""

    def close_on_first_slice(row) -> None:
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
    if first:
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
    case.next_action_works()
    if first:
        client.close()

"""The engine process and the Slicer side's controller, headless: a real engine process (started the way the
module starts it), the bundled demo model, the real 20-slice CT, and Slicer's real MRML classes (tier B)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import slicer

from SAMMed2DSegmentLib.evaluation.clicks import deepest_point, dice
from SAMMed2DSegmentLib.formats.volumes import read_volume
from SAMMed2DSegmentLib.mrml import (
    add_volume_from_array,
    create_headless_scene,
    ensure_segment,
    ensure_segmentation,
    provenance_tags,
)
from SAMMed2DSegmentLib.mrml.controller import InteractiveSegmentation, SegmentOptions
from SAMMed2DSegmentLib.mrml.segmentations import segment_array, write_segment_slices
from SAMMed2DSegmentLib.service.client import EngineClient
from SAMMed2DSegmentLib.service.protocol import decode, encode, pack_mask, unpack_mask
from SAMMed2DSegmentLib.weights.registry import resolve_model

REPO = Path(__file__).resolve().parents[1]
CT = Path(__file__).parent / "Data" / "totalseg-example-ct" / "ct"
LABELS = CT.parent / "labels" / "labels_on_ct_grid.nrrd"
LIVER_LPS = (-93.26171875, -129.89453125, -784.5)  # demo/liver-point.mrk.json: slice 10 of 20


@pytest.fixture
def case(ct, client):
    return _case(ct, client)


def _case(ct, client):
    """A scene with the CT, an empty "liver" segment, a controller with the demo model loaded and an include
    point in the liver."""
    hs = create_headless_scene()
    volume = add_volume_from_array(hs, ct.array_kji, ct.ijk_to_ras, "CT")
    seg = ensure_segmentation(hs, volume)
    liver = ensure_segment(seg, "liver")
    editor = hs.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    controller = InteractiveSegmentation(hs.scene, client, editor, hs.app_logic)
    job = controller.request_model(str(resolve_model("demo")), "cpu")
    if job is not None:
        client.wait(job, timeout=120)
    include = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
    include.AddControlPoint(-LIVER_LPS[0], -LIVER_LPS[1], LIVER_LPS[2])  # RAS
    return hs, volume, seg, liver, controller, include


def _run(controller, *args, **kwargs):
    done, errors, slices = [], [], []
    job = controller.start_segmentation(*args, on_slice=slices.append, on_done=done.append,
                                        on_error=lambda m, d: errors.append(m), **kwargs)  # fmt: skip
    controller.wait(job, timeout=300)
    return job, done, errors, slices


def test_messages_carry_arrays_without_pickle():
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    header, arrays = decode(encode({"op": "x", "n": 1}, {"mask": pack_mask(mask), "v": np.arange(6.0)}))
    assert header == {"op": "x", "n": 1}
    assert np.array_equal(unpack_mask(arrays["mask"], (5, 7)), mask)
    assert arrays["v"].tolist() == list(range(6))
    with pytest.raises(TypeError):
        encode({}, {"o": np.array([object()])})
    with pytest.raises(ValueError):
        encode({"x": float("nan")})  # strict JSON


def test_segment_one_slice_then_propagate_with_streamed_slices(case):
    hs, volume, seg, liver, controller, include = case
    undo_saved = []
    save = lambda: undo_saved.append(1)  # noqa: E731
    job, done, errors, slices = _run(controller, volume, include, None, None, seg, liver,
                                     SegmentOptions(direction="none"), save_undo=save)  # fmt: skip
    assert errors == [] and done == [job] and job.state == "done"
    assert [r.index for r in slices] == [10] and job.written == [10]
    assert job.rollback is None and job.writer is None  # R13: a finished job keeps no segmentation copy
    labelmap = segment_array(seg, liver, volume)
    assert labelmap[10].sum() > 5000 and labelmap.sum() == labelmap[10].sum()
    assert undo_saved == [1]

    job, done, errors, slices = _run(controller, volume, include, None, None, seg, liver,
                                     SegmentOptions(direction="both"), save_undo=save)  # fmt: skip
    assert errors == [] and job.state == "done"
    assert len(slices) >= 10 and slices[0].index == 10  # streamed as they were made, the seed first
    labelmap = segment_array(seg, liver, volume)
    written = sorted(int(k) for k in np.flatnonzero(labelmap.any(axis=(1, 2))))
    assert written == sorted(job.written) and len(written) >= 10
    assert undo_saved == [1, 1]  # one undo step per action
    assert provenance_tags.stored(seg, liver).propagate == "both"  # kept on the segment, saved with it


def test_the_slicer_side_keeps_no_copy_of_the_voxels(case):
    """R14: a geometry lookup reads no voxels, and once a volume is in the engine the controller holds no
    copy of it (it used to keep one for good: the node, the engine and the controller each had the CT)."""
    hs, volume, seg, liver, controller, include = case
    size = slicer.util.arrayFromVolume(volume).nbytes  # 10 MiB: 20 slices of 512 × 512 int16
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        kept_before = tracemalloc.get_traced_memory()[0]
        assert controller.snapshot(volume).geometry("axial").num_slices == 20
        assert tracemalloc.get_traced_memory()[1] - kept_before < size / 10  # peak of the lookup
        job, done, errors, _ = _run(controller, volume, include, None, None, seg, liver, SegmentOptions())
        assert errors == [] and job.written == [10]  # the voxels went to the engine
        del job, done
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - kept_before
    finally:
        tracemalloc.stop()
    assert kept < size / 10, f"{kept} bytes kept after sending {size} bytes of voxels"


def test_cancel_in_mid_propagation_keeps_finished_slices(case):
    hs, volume, seg, liver, controller, include = case
    seen = []

    def on_slice(row):
        seen.append(row.index)
        if len(seen) == 3:
            controller.cancel()

    both = SegmentOptions(direction="both")
    job = controller.start_segmentation(volume, include, None, None, seg, liver, both, on_slice=on_slice)
    controller.wait(job, timeout=300)
    assert job.state == "cancelled"
    assert job.result["slices_after_cancel"] <= 1  # the engine stops within one slice of the cancel
    assert 3 <= len(seen) < 20
    labelmap = segment_array(seg, liver, volume)
    assert set(np.flatnonzero(labelmap.any(axis=(1, 2)))) == set(job.written)


def test_killed_engine_gives_one_line_writes_nothing_and_restarts(case, client):
    hs, volume, seg, liver, controller, include = case
    errors, killed = [], []

    def on_slice(row):
        if not killed:
            killed.append(client.pid)
            os.kill(client.pid, signal.SIGKILL)

    both = SegmentOptions(direction="both")
    job = controller.start_segmentation(volume, include, None, None, seg, liver, both, on_slice=on_slice,
                                        on_error=lambda m, d: errors.append(m))  # fmt: skip
    controller.wait(job, timeout=300)
    assert job.state == "failed" and len(errors) == 1
    assert "engine stopped unexpectedly" in errors[0] and "\n" not in errors[0]
    assert segment_array(seg, liver, volume).sum() == 0  # the slice that arrived was rolled back
    # The next action starts a new engine, with the model and the volume sent again.
    controller.request_model(str(resolve_model("demo")), "cpu")
    job, done, errors, _ = _run(controller, volume, include, None, None, seg, liver, SegmentOptions())
    assert errors == [] and job.state == "done" and client.pid != killed[0]
    assert segment_array(seg, liver, volume)[10].any()


def test_results_of_a_closed_scene_are_dropped(case):
    hs, volume, seg, liver, controller, include = case
    both = SegmentOptions(direction="both")
    job = controller.start_segmentation(volume, include, None, None, seg, liver, both)
    controller.scene_closing()  # what the module does on StartCloseEvent
    controller.wait(job, timeout=300)
    assert job.written == [] and segment_array(seg, liver, volume).sum() == 0


def test_results_for_a_removed_segment_or_an_edited_volume_are_dropped(case):
    hs, volume, seg, liver, controller, include = case
    both = SegmentOptions(direction="both")

    def edit_volume_on_first_slice(row):
        voxels = slicer.util.arrayFromVolume(volume)
        voxels[0, 0, 0] += 1
        slicer.util.arrayFromVolumeModified(volume)

    job = controller.start_segmentation(volume, include, None, None, seg, liver, both,
                                        on_slice=edit_volume_on_first_slice)  # fmt: skip
    controller.wait(job, timeout=300)
    assert job.state == "stale" and "volume changed" in job.message
    assert len(job.written) == 1  # the slice that arrived before the edit; nothing after it

    other = ensure_segment(seg, "other")
    remove = lambda row: seg.GetSegmentation().RemoveSegment(other)  # noqa: E731
    job = controller.start_segmentation(volume, include, None, None, seg, other, both, on_slice=remove)
    controller.wait(job, timeout=300)
    assert job.state == "stale" and "segment was removed" in job.message


def test_overwrite_none_keeps_the_other_segment_and_the_editable_area_holds(case):
    hs, volume, seg, liver, controller, include = case
    other = ensure_segment(seg, "other")
    block = np.zeros(volume.GetImageData().GetDimensions()[::-1], bool)
    block[10, 200:300, 100:300] = True  # across the liver's slice
    geometry = controller.snapshot(volume).geometry("axial")
    write_segment_slices(seg, other, volume, geometry, {10: geometry.extract(block, 10)})
    before_other = segment_array(seg, other, volume)
    editor = controller.editor_node
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    _run(controller, volume, include, None, None, seg, liver, SegmentOptions())
    liver_mask = segment_array(seg, liver, volume)
    assert np.array_equal(segment_array(seg, other, volume), before_other)  # A keeps every voxel
    assert (liver_mask & before_other).any()  # overlap allowed, as the setting says

    # The editable area: outside all (other) segments, with Overwrite all: the new segment gets none of
    # the other segment's voxels, and takes none from it.
    seg.GetSegmentation().RemoveSegment(liver)
    second = ensure_segment(seg, "second")
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    _run(controller, volume, include, None, None, seg, second, SegmentOptions())
    result = segment_array(seg, second, volume)
    assert result.sum() > 1000 and not (result & before_other).any()
    assert np.array_equal(segment_array(seg, other, volume), before_other)
    # The source volume's intensity range limits it too (a new segment: "Set" keeps what a segment already
    # has outside the editable area, as a paint stroke does).
    third = ensure_segment(seg, "third")
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(80.0, 200.0)
    _run(controller, volume, include, None, None, seg, third, SegmentOptions())
    result = segment_array(seg, third, volume)
    voxels = slicer.util.arrayFromVolume(volume)
    assert result.sum() > 100 and ((voxels[result] >= 80) & (voxels[result] <= 200)).all()


def test_a_write_the_editor_logic_refuses_fails_the_job_and_changes_nothing(case):
    """L3: a write through Slicer's editor logic that the logic refuses (here the editable intensity range on
    a segmentation whose reference geometry is not the volume's lattice: "Modifier labelmap should have the
    same geometry as the source volume") fails the job with one line, counts nothing as written and leaves
    the segment as it was (it used to pass for written, with nothing changed)."""
    hs, volume, seg, liver, controller, include = case
    geometry = controller.snapshot(volume).geometry("axial")
    square = np.zeros(geometry.slice_shape, bool)
    square[100:140, 100:140] = True
    write_segment_slices(seg, liver, volume, geometry, {10: square, 11: square})
    before = segment_array(seg, liver, volume)
    shifted = slicer.util.arrayFromVolume(volume).copy()
    matrix = controller.snapshot(volume).ijk_to_ras.copy()
    matrix[:3, 3] += matrix[:3, :3] @ [0.5, 0.5, 0.0]  # half a voxel off the volume's lattice
    reference = add_volume_from_array(hs, shifted, matrix, "shifted")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    controller.editor_node.SetSourceVolumeIntensityMask(True)
    controller.editor_node.SetSourceVolumeIntensityMaskRange(-100.0, 300.0)
    job, done, errors, slices = _run(controller, volume, include, None, None, seg, liver, SegmentOptions())
    assert job.state == "failed" and errors == [job.message] and done == [] and "\n" not in job.message
    assert "same geometry as the source volume" in job.message
    assert job.written == [] and [r.index for r in slices] == []
    assert np.array_equal(segment_array(seg, liver, volume), before)


def test_an_empty_mask_from_the_engine_never_clears_a_slice(case):
    """The model finding nothing on a slice is no reason to erase what the segment has there. The demo model
    returns no empty mask on this CT, so the engine's reply for that slice is handed to the job as the engine
    would send it (the one stand-in here); the job itself is real and runs to its end."""
    hs, volume, seg, liver, controller, include = case
    geometry = controller.snapshot(volume).geometry("axial")
    square = np.zeros(geometry.slice_shape, bool)
    square[100:140, 100:140] = True
    from SAMMed2DSegmentLib.mrml.segmentations import write_segment_slices

    write_segment_slices(seg, liver, volume, geometry, {12: square})
    before = segment_array(seg, liver, volume)[12].copy()
    job = controller.start_segmentation(volume, include, None, None, seg, liver, SegmentOptions())
    empty = {"mask": pack_mask(np.zeros(geometry.slice_shape, bool))}
    reply = {"index": 12, "status": "prompted", "confidence": 0.1, "iou": 0.1}
    job.engine_job.on_event("slice", reply, empty)
    controller.wait(job, timeout=300)
    assert job.state == "done" and 12 not in job.written and 12 in job.rows
    assert np.array_equal(segment_array(seg, liver, volume)[12], before)
    assert job.written == [10]


def test_propagate_from_here_never_replaces_slices_edited_by_hand(case):
    hs, volume, seg, liver, controller, include = case
    job, *_ = _run(controller, volume, include, None, None, seg, liver, SegmentOptions(direction="both"))
    assert len(job.written) >= 4
    geometry = controller.snapshot(volume).geometry("axial")
    current = segment_array(seg, liver, volume)
    corrected = current[10].copy()
    rows = np.flatnonzero(corrected.any(axis=1))
    corrected[: rows[len(rows) // 2]] = False  # the user erased half of the seed slice
    painted = np.zeros_like(corrected)
    painted[100:140, 100:140] = True  # and painted a square on slice 12
    write_segment_slices(
        seg,
        liver,
        volume,
        geometry,
        {10: _display(geometry, corrected, 10), 12: _display(geometry, painted, 12)},
    )
    before = segment_array(seg, liver, volume)
    done = []
    job = controller.start_propagation_from_slice(volume, seg, liver, 10, SegmentOptions(direction="up"),
                                                  on_done=done.append)  # fmt: skip
    controller.wait(job, timeout=300)
    assert job.state == "done" and 10 in job.protected and 12 in job.protected
    after = segment_array(seg, liver, volume)
    assert np.array_equal(after[10], before[10]) and np.array_equal(after[12], before[12])
    # Reached and kept, reached and rejected (the walk stops there), or the walk stopped before it.
    assert 12 in job.kept or 12 not in job.rows or job.rows[12].status == "rejected"
    assert 10 not in job.written and 12 not in job.written


def test_one_exclude_point_refines_a_slice_the_segment_covers(case, ct):
    """A negative click on a propagated slice that spills out of the liver re-segments that slice without
    the spill, through "Segment" and through "Propagate from here": the prompt comes from the segment's mask
    there (sent with the job) and the exclude point."""
    hs, volume, seg, liver, controller, include = case
    job, *_ = _run(controller, volume, include, None, None, seg, liver, SegmentOptions(direction="both"))
    first = segment_array(seg, liver, volume)
    truth = read_volume(LABELS).array_kji == 5  # the liver
    spill = (first & ~truth).sum(axis=(1, 2))
    k = 12 + int(np.argmax(spill[12:16]))  # the worst of the slices a few above the prompt
    geometry = controller.snapshot(volume).geometry("axial")
    region = geometry.extract(first & ~truth, k)
    x, y = deepest_point(region, geometry.pixel_spacing)
    exclude = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "exclude")
    exclude.AddControlPoint(*geometry.continuous_to_ras(np.array([[k, x, y]], float))[0])
    job, done, errors, slices = _run(controller, volume, None, exclude, None, seg, liver,
                                     SegmentOptions(direction="none"))  # fmt: skip
    assert errors == [] and job.state == "done" and job.written == [k] and slices[0].status == "prompted"
    after = segment_array(seg, liver, volume)
    assert not geometry.extract(after, k)[y, x] and geometry.extract(first, k)[y, x]  # the clicked voxel
    assert (after[k] & ~truth[k]).sum() < 0.6 * spill[k]  # most of the spill gone
    assert (after[k] & first[k] & truth[k]).sum() > 0.85 * (first[k] & truth[k]).sum()  # the liver kept
    assert dice(after[k], truth[k]) >= dice(first[k], truth[k]) - 0.01
    assert np.array_equal(np.delete(after, k, axis=0), np.delete(first, k, axis=0))  # no other slice
    assert job.refined == [k] and provenance_tags.stored(seg, liver).refined == (k,)  # named as corrected

    # "Propagate from here" on another spilled slice with one exclude click there (no "Segment" first): the
    # slice is refined by the click, written, and the walk starts from it.
    n = 12 + int(np.argmax([spill[i] if i != k else -1 for i in range(12, 16)]))
    x, y = deepest_point(geometry.extract(first & ~truth, n), geometry.pixel_spacing)
    exclude.AddControlPoint(*geometry.continuous_to_ras(np.array([[n, x, y]], float))[0])
    done = []
    job = controller.start_propagation_from_slice(volume, seg, liver, n, SegmentOptions(direction="up"),
                                                  on_done=done.append, exclude_node=exclude)  # fmt: skip
    controller.wait(job, timeout=300)
    assert done == [job] and job.state == "done" and job.rows[n].status == "prompted"
    assert n not in job.protected and job.written[0] == n and len(job.written) > 1
    assert job.refined == [n] and provenance_tags.stored(seg, liver).refined == (n,)
    again = segment_array(seg, liver, volume)
    assert not geometry.extract(again, n)[y, x] and (again[n] & ~truth[n]).sum() < spill[n]
    # Once applied (off the segment now), the click leaves the slice as it is: it seeds the walk, unchanged.
    job = controller.start_propagation_from_slice(volume, seg, liver, n, SegmentOptions(direction="up"),
                                                  exclude_node=exclude)  # fmt: skip
    controller.wait(job, timeout=300)
    assert job.state == "done" and job.rows[n].status == "given" and n in job.protected
    assert np.array_equal(segment_array(seg, liver, volume)[n], again[n])
    assert job.refined == [] and provenance_tags.stored(seg, liver).refined == ()

    # With a box across slice k the engine prompts it from the box and the exclude point, not from the
    # segment's mask: it is not named as corrected.
    roi = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(*geometry.continuous_to_ras(np.array([[k, 256.0, 256.0]]))[0])
    roi.SetSize(300.0, 300.0, 1.0)
    job, done, errors, slices = _run(controller, volume, None, exclude, roi, seg, liver,
                                     SegmentOptions(direction="none"))  # fmt: skip
    assert errors == [] and job.state == "done" and k in job.rows and k not in job.refined


def test_exclude_points_on_a_slice_the_segment_lacks_are_refused_in_one_line(case):
    hs, volume, seg, liver, controller, include = case
    exclude = hs.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "exclude")
    exclude.AddControlPoint(-LIVER_LPS[0], -LIVER_LPS[1], LIVER_LPS[2])
    assert not segment_array(seg, liver, volume).any()
    job, done, errors, slices = _run(controller, volume, None, exclude, None, seg, liver,
                                     SegmentOptions(direction="both"))  # fmt: skip
    message = (
        "slice 10 has only exclude points and no segment there to correct: add an include point or a box"
    )
    assert errors == [message] and job.state == "failed" and done == [] and slices == []
    assert not segment_array(seg, liver, volume).any() and job.written == []


def test_a_mask_of_the_wrong_size_is_refused_at_the_boundary():
    with pytest.raises(ValueError, match="not one of shape"):
        unpack_mask(pack_mask(np.ones((5, 7), bool))[:-1], (5, 7))
    with pytest.raises(ValueError, match="not one of shape"):
        unpack_mask(np.zeros(5, np.int32), (5, 7))


def _display(geometry, kji_plane: np.ndarray, index: int) -> np.ndarray:
    """A [j, i] plane of axial slice `index` in the display orientation the writers take."""
    volume = np.zeros((geometry.num_slices, *kji_plane.shape), bool)
    volume[index] = kji_plane
    return geometry.extract(volume, index)


def test_no_engine_outlives_its_client():
    client = EngineClient()
    job = client.submit("ping")
    client.wait(job, timeout=60)
    pid = client.pid
    client.close()
    assert not _alive(pid)

    client = EngineClient()
    client.wait(client.submit("ping"), timeout=60)
    pid = client.pid
    del client
    gc.collect()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_closing_during_a_propagation_is_quick_and_leaves_no_engine(ct, tmp_path):
    """R5: Slicer quitting while the engine propagates does not wait for the whole walk: the engine is told
    to cancel and to exit, and does so itself (status 0) within the 2 s `close` gives it before a kill: at
    the next slice, or after its 1 s grace if a slice takes longer. The volume is new to this engine's empty
    cache, so every slice is encoded (up to about 1.5 s each here)."""
    client = EngineClient(extra_env={"SAMMED2D_CACHE_DIR": str(tmp_path)})
    hs, volume, seg, liver, controller, include = _case(ct, client)
    slices = []
    both = SegmentOptions(direction="both")
    job = controller.start_segmentation(volume, include, None, None, seg, liver, both, on_slice=slices.append)
    deadline = time.monotonic() + 120
    while not slices and time.monotonic() < deadline:
        client.poll() or time.sleep(0.005)
    assert slices and job.state == "running" and len(slices) < 5  # well inside the 20-slice walk
    pid, started = client.pid, time.monotonic()
    code = client.close()
    assert time.monotonic() - started < 2.5 and code == 0  # it exited as asked, it was not killed
    assert not _alive(pid) and client.pid is None and not client.jobs


def test_engine_exits_when_the_slicer_side_dies():
    """A process that starts an engine and is then killed (Slicer crashing) leaves no engine behind."""
    code = (
        "import sys, time; sys.path.insert(0, 'SAMMed2DSegment')\n"
        "from SAMMed2DSegmentLib.service.client import EngineClient\n"
        "c = EngineClient(); c.wait(c.submit('ping'), 60); print(c.pid, flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_the_package_exports_lazily_without_torch():
    code = (
        "import sys, SAMMed2DSegmentLib as lib\n"
        "assert 'torch' not in sys.modules\n"
        "assert lib.EngineClient.__name__ == 'EngineClient' and 'torch' not in sys.modules\n"
        "assert lib.SegmentationSession.__name__ == 'SegmentationSession'\n"
        "assert callable(lib.load_model) and 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO / "SAMMed2DSegment")


def test_the_direct_slice_write_gives_the_editors_voxels(ct):
    """Where nothing masks the slice and nothing would be overwritten, the in-place write is taken; it must
    leave exactly what Slicer's editor logic leaves (other slices, other segments, overlap)."""
    from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
    from SAMMed2DSegmentLib.mrml.editing import SliceWriter, write_slice_as_editor

    results = []
    for use_editor in (False, True):
        hs = create_headless_scene()
        volume = add_volume_from_array(hs, ct.array_kji[:6], ct.ijk_to_ras, "CT")
        seg = ensure_segmentation(hs, volume)
        target, other = ensure_segment(seg, "target"), ensure_segment(seg, "other")
        geometry = SliceGeometry.create(volume.GetImageData().GetDimensions()[::-1], ct.ijk_to_ras, "axial")
        old, new, far = (np.zeros(geometry.slice_shape, bool) for _ in range(3))
        old[100:200, 100:200], new[150:300, 150:300], far[400:450, 400:450] = True, True, True
        write_segment_slices(seg, target, volume, geometry, {2: old, 3: old})
        write_segment_slices(seg, other, volume, geometry, {3: far})
        editor = hs.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        writer = SliceWriter(hs.scene, hs.app_logic, editor, seg, target, volume, geometry)
        assert writer.direct and writer.overwritten == [other]  # default settings: overwrite all
        if use_editor:
            write_slice_as_editor(hs.scene, hs.app_logic, editor, seg, target, volume, geometry, 3, new)
        else:
            writer.write(3, new)
        results.append((segment_array(seg, target, volume), segment_array(seg, other, volume)))
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])
    assert results[0][0][2].sum() == 10000 and results[0][1][3].sum() == 2500

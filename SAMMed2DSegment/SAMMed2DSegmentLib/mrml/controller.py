"""The Slicer module's work without Qt: nodes in, engine requests out, streamed slices written back into the
segment on the caller's (main) thread. The module's Logic is a thin shell around `InteractiveSegmentation`,
so everything here is tested headless with Slicer's real MRML classes and a real engine process.

Rules every job follows:
* What a job needs is copied out of the nodes when it starts (matrices, prompts, and the voxels once per
  volume state, straight to the engine, which keeps them); the engine never sees a node, and this side
  keeps no copy of the voxels.
* Slices are written as they arrive, each the way a Segment Editor effect writes (`editing.py`), after
  checking that the nodes still exist and the volume is unchanged; the undo state is saved once, before the
  first slice, so a whole propagation is one undo step.
* A job whose engine dies is rolled back to the state before its first slice: nothing half-done stays. A
  cancelled job keeps the slices already written (the user pressed Stop). A stale job (scene closed, node
  deleted, volume edited) writes nothing more.

How a segmentation job ends reaches its caller exactly once (the panel shows a status line for each):
* `on_done(job)` for every end that is not a failure: `job.state` is "done", "cancelled" (`job.message`
  empty after a Stop, else the reason) or "stale" (`job.message` the one-line reason: segment or node
  removed, volume edited);
* `on_error(message, details)` for a failure: `job.state` is "failed", `job.message == message` (one line),
  `details` the engine's or the write's traceback; the slices it wrote are rolled back;
* a failed model load is one error, reported to `request_model`'s `on_error`; a job that was queued behind
  that load ends "cancelled" through `on_done`, its `job.message` saying the model did not load (it never
  ran: the engine drops the old model before loading, so nothing runs on a model the user moved away from);
* nothing after that, and nothing at all for the jobs of a closed scene (`scene_closing()`): the caller is
  resetting itself; those jobs are marked "stale" at once.
`on_slice(row)` comes before, once per visited slice.
"""

from __future__ import annotations

import itertools
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import vtk

from ..engine.geometry import SliceGeometry
from ..engine.masks import extent
from ..engine.prompts import INCLUDE, PromptError, masks_to_correct, prompts_by_slice
from ..service.client import EngineClient, Job
from ..service.protocol import one_line, pack_mask, unpack_mask
from . import provenance_tags
from .editing import SliceWriter, WrittenSlices, slice_digest
from .interaction import (
    VolumeInfo,
    nodes_present,
    prompts_from_nodes,
    volume_info,
    volume_state_key,
    volume_voxels,
)
from .job_changes import SliceChanges
from .labelmaps import segment_is_empty
from .segment_planes import segment_slice
from .segmentations import segment_array

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentOptions:
    axis: str = "axial"
    direction: str = "none"  # "none" (the prompted slices only), "up", "down", "both"
    window: str = "auto"
    window_level: float = 40.0
    window_width: float = 400.0
    iou_threshold: float = 0.5

    def window_header(self) -> dict:
        return {"choice": self.window, "level": self.window_level, "width": self.window_width}


@dataclass(frozen=True)
class SliceRow:
    """One visited slice for the panel's table (and the provenance)."""

    index: int
    status: str
    confidence: float
    predicted_iou: float
    reason: str


@dataclass(eq=False)
class SegmentationJob:
    """One segmentation or propagation the controller is following."""

    volume_node: Any
    seg_node: Any
    segment_id: str
    geometry: SliceGeometry
    snapshot_key: str
    epoch: int
    points: list
    rois: list
    options: SegmentOptions
    protected: set[int] = field(default_factory=set)
    at_start: dict[int, str] | None = None  # the target's non-empty slices' digests when it began, if known
    start_copy: Any = None  # else a copy of the target as it began (a segmentation node in no scene), if made
    rows: dict[int, SliceRow] = field(default_factory=dict)
    written: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # slices not replaced: edited by hand
    rollback: SliceChanges | None = None  # to take its writes back, while it runs
    writer: SliceWriter | None = None  # while it runs
    engine_job: Job | None = None
    model_load: Job | None = None  # the model request it was queued behind, while that was pending
    state: str = "running"  # running → done | cancelled | failed | stale
    message: str = ""
    result: dict = field(default_factory=dict)
    refined: list[int] = field(default_factory=list)  # slices corrected from the segment's mask there

    def table(self) -> list[SliceRow]:
        """The visited slices, least certain first (the panel's table)."""
        from ..engine.session import confidence_table

        return confidence_table(self.rows.values())


class InteractiveSegmentation:
    def __init__(
        self,
        scene: vtk.vtkObject,
        client: EngineClient,
        editor_node: vtk.vtkObject,
        app_logic: vtk.vtkObject | None = None,
    ) -> None:
        self.scene = scene
        self.client = client
        self.editor_node = editor_node
        self.app_logic = app_logic
        self.written = WrittenSlices()
        self.model: dict = {}  # what the engine reported for the loaded model
        self._epoch = itertools.count(1)
        self.epoch = next(self._epoch)
        self._model_request: tuple | None = None  # (path, device, engine generation, precision) requested
        self._model_job: Job | None = None  # that request
        self._volume_sent: tuple | None = None  # (snapshot key, engine generation) sent
        self._volume: VolumeInfo | None = None  # key and geometry of the last volume used, no voxels
        self.jobs: list[SegmentationJob] = []

    # -- state -----------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.client.busy

    def poll(self) -> int:
        return self.client.poll()

    def wait(self, job: SegmentationJob | Job, timeout: float = 600.0) -> None:
        self.client.wait(job.engine_job if isinstance(job, SegmentationJob) else job, timeout)

    def cancel(self) -> None:
        """Stop: the running job and every queued one. Loading the model and sending the volume are set-up,
        not work, so the engine still does them (they are recorded as sent here)."""
        self.client.cancel(None)

    def scene_closing(self) -> None:
        """Everything computed for the old scene is dropped, never written into the new one. Its jobs end
        "stale" here, without callbacks (see the module docstring)."""
        for job in self.jobs:
            if job.state == "running":
                job.state, job.message = "stale", "the scene was closed while the model was running"
        self.epoch = next(self._epoch)
        self.client.forget()
        self._volume = None
        self._volume_sent = None
        self.written.clear()

    def shutdown(self) -> None:
        self.client.close()

    # -- model and volume ----------------------------------------------------------------------------------
    def request_model(
        self, path: str, device: str = "auto", on_error: Callable | None = None, precision: str = "auto"
    ) -> Job | None:
        """Load the model in the engine unless this one is loaded there already (or on its way). A failure
        goes to `on_error` (once: the jobs queued behind it end "cancelled", see the module docstring)."""
        self._ensure_engine()
        wanted = (str(path), device, self.client.generation, precision)
        if self._model_request == wanted:
            return None
        self._model_request = wanted

        def on_event(event: str, header: dict, arrays: dict) -> None:
            if event == "done":
                self.model = header
            elif event in ("error", "cancelled"):
                if self._model_request == wanted:  # not loaded: the next action asks for it again
                    self._model_request = None
                if event == "error":
                    self.model = {}  # the engine dropped the old one before loading
                if event == "error" and on_error is not None:
                    on_error(header.get("message", ""), header.get("details", ""))

        request = {"path": str(path), "device": device, "precision": precision}
        self._model_job = self.client.submit("load_model", request, on_event=on_event)
        return self._model_job

    def _ensure_engine(self) -> None:
        """A dead engine (also one that died unnoticed, while idle) is replaced before anything is sent: the
        new one has no model and no volume."""
        if not self.client.running:
            self.client.start()  # a new engine: nothing loaded, nothing sent
            self._model_request = self._model_job = None
            self._volume_sent = None

    def _model_requested(self) -> bool:
        """Whether this engine has a model loaded or on its way (jobs may be queued behind it)."""
        return self._model_request is not None and self._model_request[2] == self.client.generation

    def snapshot(self, volume_node: vtk.vtkObject, modality: str | None = None) -> VolumeInfo:
        """The volume's state key and geometry (`.key`, `.geometry(axis)`), read again only when the volume
        changed; never a copy of its voxels."""
        if self._volume is None or self._volume.key != volume_state_key(volume_node):
            self._volume = volume_info(volume_node, modality)
        return self._volume

    def _ensure_volume(self, volume_node: vtk.vtkObject, modality: str | None) -> VolumeInfo:
        """Send the voxels unless the engine has this state of the volume already (or it is on its way)."""
        snapshot = self.snapshot(volume_node, modality)
        sent = (snapshot.key, self.client.generation)
        if self._volume_sent != sent:
            header = {"ijk_to_ras": snapshot.ijk_to_ras.tolist(), "modality": modality, "key": snapshot.key}

            def on_event(event: str, reply: dict, arrays: dict) -> None:
                if event in ("error", "cancelled") and self._volume_sent == sent:
                    self._volume_sent = None  # not in the engine: the next action sends it again

            self.client.submit_volume(volume_voxels(volume_node), header, on_event=on_event)
            self._volume_sent = sent
        return snapshot

    # -- segmentation ------------------------------------------------------------------------------------
    def start_segmentation(
        self,
        volume_node: vtk.vtkObject,
        include_node: vtk.vtkObject | None,
        exclude_node: vtk.vtkObject | None,
        roi_node: vtk.vtkObject | None,
        seg_node: vtk.vtkObject,
        segment_id: str,
        options: SegmentOptions = SegmentOptions(),
        modality: str | None = None,
        save_undo: Callable[[], None] | None = None,
        on_slice: Callable[[SliceRow], None] | None = None,
        on_done: Callable[[SegmentationJob], None] | None = None,
        on_error: Callable[[str, str], None] | None = None,
    ) -> SegmentationJob:
        """Segment the slices holding the prompts, then propagate `options.direction`, in the engine."""
        points, rois = prompts_from_nodes(include_node, exclude_node, roi_node)
        if not points and not rois:
            raise ValueError("place at least one include point (or a box) first")
        current = self._masks_to_refine(
            volume_node, seg_node, segment_id, options.axis, modality, points, rois
        )
        job = self._start(volume_node, seg_node, segment_id, options, modality, points, rois, {}, set(),
                          save_undo, on_slice, on_done, on_error, current)  # fmt: skip
        if segment_is_empty(seg_node, segment_id):
            job.at_start = {}  # a slice holding voxels before the job writes it was painted meanwhile
        elif seg_node.GetParentTransformNode() is None:  # the copy has none, so it must not need one
            job.start_copy = slicer.vtkMRMLSegmentationNode()  # its labelmap layer copied: ~70 ms at most
            job.start_copy.GetSegmentation().CopySegmentFromSegmentation(
                seg_node.GetSegmentation(), segment_id
            )
        return job

    def _masks_to_refine(self, volume_node, seg_node, segment_id, axis, modality, points, rois) -> dict:
        """The segment's masks on the slices whose prompts are exclude points only, as the engine groups
        them (a box counts as an include): a negative click refines the mask there, in the engine. Slices the
        segment does not cover are not sent: the engine refuses them in one line. Points off the volume are
        the engine's to report."""
        segment = seg_node.GetSegmentation().GetSegment(segment_id) if seg_node is not None else None
        if volume_node is None or segment is None or all(p.label == INCLUDE for p in points):
            return {}
        geometry = self.snapshot(volume_node, modality).geometry(axis)
        try:
            by_slice = prompts_by_slice(geometry, points, rois)
        except PromptError:
            return {}
        if all(prompt.has_include for prompt in by_slice.values()):
            return {}
        return masks_to_correct(
            by_slice, lambda index: segment_slice(seg_node, segment_id, volume_node, geometry, index)
        )

    def start_propagation_from_slice(
        self,
        volume_node: vtk.vtkObject,
        seg_node: vtk.vtkObject,
        segment_id: str,
        index: int,
        options: SegmentOptions,
        modality: str | None = None,
        roi_node: vtk.vtkObject | None = None,
        save_undo: Callable[[], None] | None = None,
        on_slice: Callable[[SliceRow], None] | None = None,
        on_done: Callable[[SegmentationJob], None] | None = None,
        on_error: Callable[[str, str], None] | None = None,
        exclude_node: vtk.vtkObject | None = None,
    ) -> SegmentationJob:
        """ "Propagate from here": the segment's slice `index` as it is now (a correction) seeds the walk, and
        only slices the model wrote (or empty ones) are replaced; slices edited by hand are kept. Exclude
        points of `exclude_node` on that slice that still lie on the segment are applied first: the slice is
        refined by them (as "Segment" does) and the walk starts from the result."""
        _require_labelmap_source(seg_node)
        geometry = self.snapshot(volume_node, modality).geometry(options.axis)
        current = segment_array(seg_node, segment_id, volume_node)
        seed = geometry.extract(current, index).astype(bool)
        if not seed.any():
            raise ValueError(f"slice {index} of the segment is empty: correct or segment it first")
        protected = self.written.hand_edited(seg_node, segment_id, volume_node, geometry)
        rois = prompts_from_nodes(None, None, roi_node)[1]
        excludes = _unapplied_excludes(prompts_from_nodes(None, exclude_node, None)[0], geometry, index, seed)
        if excludes:
            to_correct = _corrected_by_engine(geometry, excludes, rois, {index: seed})
            job = self._start(volume_node, seg_node, segment_id, options, modality, excludes, rois, {},
                              protected - {index}, save_undo, on_slice, on_done, on_error,
                              to_correct)  # fmt: skip
        else:
            job = self._start(volume_node, seg_node, segment_id, options, modality, [], rois, {index: seed},
                              protected | {index}, save_undo, on_slice, on_done, on_error)  # fmt: skip
        job.at_start = {}
        for slice_index in range(geometry.num_slices):
            plane = geometry.view(current, slice_index)
            if plane.any():
                job.at_start[slice_index] = slice_digest(plane)
        return job

    def _start(self, volume_node, seg_node, segment_id, options, modality, points, rois, seeds, protected,
               save_undo, on_slice, on_done, on_error, current=None) -> SegmentationJob:  # fmt: skip
        if volume_node is None or seg_node is None:
            raise ValueError("select the input volume and the segmentation first")
        if seg_node.GetSegmentation().GetSegment(segment_id) is None:
            raise ValueError(f"no segment {segment_id!r} in {seg_node.GetName()!r}")
        _require_labelmap_source(seg_node)
        self._ensure_engine()
        if not self._model_requested():
            raise RuntimeError("no model is loaded (choose one under Model)")
        snapshot = self._ensure_volume(volume_node, modality)
        geometry = snapshot.geometry(options.axis)
        job = SegmentationJob(volume_node, seg_node, segment_id, geometry, snapshot.key, self.epoch, points,
                              rois, options, protected, refined=sorted(current or {}))  # fmt: skip
        if self._model_job is not None and self._model_job.state == "pending":
            job.model_load = self._model_job
        header = {
            "key": snapshot.key,
            "axis": options.axis,
            "direction": options.direction,
            "window": options.window_header(),
            "settings": {"iou_threshold": float(options.iou_threshold)},
            "points": [{"position": list(p.position), "label": p.label} for p in points],
            "rois": [
                {"center": list(r.center), "axes": np.asarray(r.axes).tolist(), "size": list(r.size)}
                for r in rois
            ],  # fmt: skip
        }
        arrays = {f"seed_{i}": pack_mask(m) for i, m in seeds.items()}
        arrays.update({f"current_{i}": pack_mask(m) for i, m in (current or {}).items()})

        def on_event(event: str, reply: dict, reply_arrays: dict) -> None:
            if job.state != "running":
                return  # it ended already (stale, failed while writing, its scene closed): said once
            details = reply.get("details", "")
            try:
                self._on_event(job, event, reply, reply_arrays, save_undo, on_slice)
            except Exception as error:  # a write failed: stop the job, undo its slices, report
                details = traceback.format_exc()
                self.client.cancel(job.engine_job)
                job.state, job.message = "failed", one_line(error) + self._roll_back(job)
            if job.state == "running":
                return
            if job.writer is not None:
                job.writer.finish()  # the 3-D surfaces of what it changed
            job.rollback = job.writer = job.start_copy = None  # needed while it writes only
            if job.epoch != self.epoch:
                return  # its scene was closed (in `on_slice`, say): no callbacks
            if job.state == "failed":
                if on_error is not None:
                    on_error(job.message, details)
            elif on_done is not None:
                on_done(job)

        job.engine_job = self.client.submit("segment", header, arrays, on_event=on_event)
        self.jobs = [j for j in self.jobs if j.state == "running"] + [job]
        return job

    def _stale_reason(self, job: SegmentationJob) -> str:
        if job.epoch != self.epoch:
            return "the scene was closed while the model was running"
        if not nodes_present(self.scene, job.seg_node, job.volume_node):
            return "the volume or the segmentation was removed while the model was running"
        if job.seg_node.GetSegmentation().GetSegment(job.segment_id) is None:
            return "the segment was removed while the model was running"
        if volume_state_key(job.volume_node) != job.snapshot_key:
            return "the volume changed while the model was running; run it again"
        return ""

    def _on_event(self, job, event, reply, arrays, save_undo, on_slice) -> None:
        """Advance the job by one engine event; `job.state` says whether it ended."""
        if event == "error":
            problem = self._roll_back(job)
            load = job.model_load
            if load is not None and load.state == "error":  # said once already, by the load
                job.state, job.message = "cancelled", f"not run: the model did not load ({load.message})"
            else:
                job.state, job.message = "failed", reply.get("message", "the engine failed") + problem
            return
        stale = self._stale_reason(job)
        if stale:
            job.state, job.message = "stale", stale
            self.client.cancel(job.engine_job)
            log.info("SAMMed2D: result dropped: %s", stale)
            return
        if event == "slice":
            row = SliceRow(int(reply["index"]), reply["status"], reply["confidence"] or 0.0,
                           reply["iou"] or 0.0, reply.get("reason", ""))  # fmt: skip
            job.rows[row.index] = row
            if "mask" in arrays and row.status in ("prompted", "propagated"):
                if row.index in job.protected or self._edited_meanwhile(job, row.index):
                    job.kept.append(row.index)
                else:
                    mask = unpack_mask(arrays["mask"], job.geometry.slice_shape)
                    if mask.any():  # an empty mask says the model found nothing: it never clears voxels
                        self._write(job, row.index, mask, save_undo)
            if on_slice is not None:
                on_slice(row)
            return
        job.result = reply
        job.state = "cancelled" if event == "cancelled" or reply.get("cancelled") else "done"
        self._finish(job)

    def _edited_meanwhile(self, job: SegmentationJob, index: int) -> bool:
        """Whether the target's slice `index` changed since the job began, by another hand than the job's
        (the user painting it while the job runs): such a slice is kept, as one edited before is."""
        if index in job.written or (job.at_start is None and job.start_copy is None):
            return False
        now = segment_slice(job.seg_node, job.segment_id, job.volume_node, job.geometry, index)
        if job.at_start is not None:
            return (slice_digest(now) if now.any() else None) != job.at_start.get(index)
        was = segment_slice(job.start_copy, job.segment_id, job.volume_node, job.geometry, index)
        return not np.array_equal(now, was)

    def _write(self, job: SegmentationJob, index: int, mask: np.ndarray, save_undo) -> None:
        if job.writer is None:
            if save_undo is not None:
                save_undo()
            job.rollback = SliceChanges(job.seg_node, job.volume_node, job.geometry)
            job.writer = SliceWriter(self.scene, self.app_logic, self.editor_node, job.seg_node,
                                     job.segment_id, job.volume_node, job.geometry)  # fmt: skip
        before = job.rollback.read(index)
        try:
            job.writer.write(index, mask)
        finally:
            job.rollback.record(index, before)  # also what a write that failed half-way changed
        job.written.append(index)

    def _roll_back(self, job: SegmentationJob) -> str:
        """Take back what the job's writes changed, also a write that failed half-way (nothing counted as
        written yet, but the segment may have changed); what the user did meanwhile stays (`SliceChanges`).
        Returns what could not be taken back ("" when all was), for the job's message: a failure here must
        not keep the job from ending."""
        problem = ""
        if job.rollback is not None and nodes_present(self.scene, job.seg_node):
            try:
                job.rollback.take_back()
            except Exception as error:
                log.exception("SAMMed2D: taking back a failed job's slices")
                problem = f"; its slices could not all be taken back ({one_line(error)}): use Undo"
        job.rollback = None
        job.written.clear()
        return problem

    def _finish(self, job: SegmentationJob) -> None:
        """Remember what the model wrote (for "propagate from here") and the run's provenance."""
        if not job.written:
            return
        for index in job.written:
            self.written.record(job.seg_node, job.segment_id, job.geometry.axis, index,
                                segment_slice(job.seg_node, job.segment_id, job.volume_node, job.geometry,
                                              index))  # fmt: skip
        if self.model.get("sha256"):
            from ..formats.provenance import build_provenance

            name = job.seg_node.GetSegmentation().GetSegment(job.segment_id).GetName()
            window = job.result.get("window")
            provenance_tags.record(job.seg_node, job.segment_id, build_provenance(
                job.points, job.rois, job.rows.values(), model=f"SAM-Med2D {self.model.get('build', '')}",
                model_sha256=self.model["sha256"], axis=job.geometry.axis, propagate=job.options.direction,
                segment=name, window=tuple(window) if window else None,
                window_method=job.result.get("window_method", ""),
                refined=[i for i in job.refined if i in job.written],
            ))  # fmt: skip

    # -- pre-encoding and export -----------------------------------------------------------------------
    def prefetch(self, volume_node: vtk.vtkObject, axis: str, center: int, options: SegmentOptions,
                 modality: str | None = None) -> Job | None:  # fmt: skip
        """While idle, the engine encodes the volume's `axis` slices from `center` outwards (never starts an
        engine: a courtesy is not worth one)."""
        if not self.client.running or not self._model_requested():
            return None
        snapshot = self._ensure_volume(volume_node, modality)
        header = {"key": snapshot.key, "axis": axis, "center": int(center), "window": options.window_header()}
        return self.client.submit("prefetch", header, background=True)

    def start_export(
        self,
        seg_node: vtk.vtkObject,
        volume_node: vtk.vtkObject,
        source_files: list[str],
        out_path: str,
        model_sha256: str,
        on_done: Callable[[str], None] | None = None,
        on_error: Callable[[str, str], None] | None = None,
        on_cancelled: Callable[[], None] | None = None,
    ) -> Job:
        """Every segment as a DICOM-SEG referencing `source_files` (written by the engine, where highdicom
        lives, atomically: a file is there complete or not at all), with the provenance of the runs that made
        them. Exactly one callback: `on_done(path)`, `on_error(message, details)`, or `on_cancelled()` when a
        Stop came before the engine began it (once begun it is not interrupted); none after a scene close."""
        segmentation = seg_node.GetSegmentation()
        segments, arrays = [], {}
        shape = None
        for number, segment_id in enumerate(segmentation.GetSegmentIDs()):
            segment = segmentation.GetSegment(segment_id)
            mask = segment_array(seg_node, segment_id, volume_node)
            shape = mask.shape
            tag = vtk.reference("")
            segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
            provenance = provenance_tags.stored(seg_node, segment_id)
            # Sent cropped to its extent: what is held and sent follows the segments' size, not their number
            # times the volume's.
            box = extent(mask) or (slice(0, 0),) * mask.ndim
            segments.append({"label": segment.GetName(), "color": list(segment.GetColor()),
                             "terminology": str(tag), "offset": [part.start for part in box],
                             "shape": [part.stop - part.start for part in box],
                             "provenance": provenance.to_metadata() if provenance else None})  # fmt: skip
            arrays[f"segment_{number}"] = pack_mask(mask[box])
            del mask
        if not segments:
            raise ValueError(f"{seg_node.GetName()!r} has no segments to export")
        from .volumes import volume_ijk_to_world

        header = {"files": list(source_files), "out": str(out_path), "segments": segments,
                  "shape": list(shape), "ijk_to_ras": volume_ijk_to_world(volume_node).tolist(),
                  "model_sha256": model_sha256}  # fmt: skip

        def on_event(event: str, reply: dict, reply_arrays: dict) -> None:
            if event == "done" and on_done is not None:
                on_done(reply["path"])
            elif event == "error" and on_error is not None:
                on_error(reply.get("message", ""), reply.get("details", ""))
            elif event == "cancelled" and on_cancelled is not None:
                on_cancelled()

        return self.client.submit("export_dicom_seg", header, arrays, on_event=on_event)


def _require_labelmap_source(seg_node: vtk.vtkObject) -> None:
    """The model writes voxels: a segmentation stored as surfaces (say, imported from models) is refused
    before any work, saying what to change, as Slicer's Segment Editor asks for the same before editing."""
    segmentation = seg_node.GetSegmentation()
    labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    source = segmentation.GetSourceRepresentationName()
    if source != labelmap:
        raise ValueError(
            f"segmentation {seg_node.GetName()!r} is stored as {source}: make {labelmap} its source "
            "representation (Segmentations module, Representations) to segment into it"
        )


def _corrected_by_engine(geometry: SliceGeometry, points: list, rois: list, current: dict) -> dict:
    """The masks of `current` the engine will prompt from: on slices whose prompts are exclude points only
    (`PropagationEngine.with_current_masks`; a box there prompts the slice instead)."""
    try:
        by_slice = prompts_by_slice(geometry, points, rois)
    except PromptError:  # the engine refuses the job in one line
        return {}
    return {i: mask for i, mask in current.items() if i in by_slice and not by_slice[i].has_include}


def _unapplied_excludes(points: list, geometry: SliceGeometry, index: int, mask: np.ndarray) -> list:
    """The exclude points on slice `index` that lie on a voxel of `mask` (not applied yet)."""
    if not points:
        return []
    syx = geometry.ras_to_continuous(np.array([p.position for p in points]))
    rows, cols = mask.shape
    kept = []
    for point, (s, x, y) in zip(points, syx, strict=True):
        row, col = int(round(y)), int(round(x))
        if geometry.slice_of(s) == index and 0 <= row < rows and 0 <= col < cols and mask[row, col]:
            kept.append(point)
    return kept


__all__ = ["InteractiveSegmentation", "SegmentOptions", "SegmentationJob", "SliceRow"]

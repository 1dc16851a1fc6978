"""The module panel without Qt (DESIGN 2.7): every decision the panel makes, so that all of it runs headless
with Slicer's MRML classes and a real engine process. The module's Widget binds Qt signals to the methods
here and shows `view()`; it decides nothing itself.

What lives here: which buttons are enabled and why not (only a placed, non-empty ROI counts as a prompt;
only plain scalar volumes are input), the status line and the dialog for every way an action ends (done,
stopped, failed, dropped as stale), the include/exclude toggle (`placement.py`), when a live update or a
pre-encoding runs, what "Propagate from here" seeds from, the model's state, and the checks before the
DICOM-SEG export. Messages are plain English, like the controller's and the engine's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import vtk

from ..engine.prompts import PromptError
from ..engine.session import slice_center_ras
from . import placement
from .controller import InteractiveSegmentation, SegmentationJob, SegmentOptions, SliceRow
from .markups import points_from_markups, roi_from_node
from .provenance_tags import model_sha256_of
from .scene import HeadlessScene
from .segmentations import ensure_segment, ensure_segmentation
from .views import axis_for_point, is_input_volume, viewed_slice_index

#: The "Model" choice that means the user's own checkpoint file (its path is a user setting).
LOCAL_MODEL = "local file"


@dataclass
class PanelParameters:
    """What the panel reads and writes, with the module's defaults. Inside Slicer the module's parameter node
    wrapper, which has the same fields (a test keeps them equal), is passed instead."""

    inputVolume: Any = None
    includePoints: Any = None
    excludePoints: Any = None
    promptROI: Any = None
    outputSegmentation: Any = None
    axis: str = "axial"
    followView: bool = True
    device: str = "auto"
    precision: str = "auto"
    model: str = "demo"
    iouThreshold: float = 0.5
    window: str = "auto"
    windowLevel: float = 40.0
    windowWidth: float = 400.0
    liveUpdate: bool = True


@dataclass(frozen=True)
class PanelView:
    """Everything the Widget shows."""

    segment_enabled: bool
    segment_tooltip: str
    propagate_from_here_enabled: bool
    stop_enabled: bool
    export_enabled: bool
    export_tooltip: str
    custom_window: bool
    local_model: bool
    model_status: str
    status: str
    progress: tuple[int, int] | None  # (value, maximum); (0, 0) is a busy indicator; None hides the bar
    rows: tuple[SliceRow, ...]


@dataclass(frozen=True)
class Dialog:
    """An error the user must see even when not looking at the status line."""

    message: str
    details: str = ""


def has_roi_prompt(roi_node: vtk.vtkObject | None) -> bool:
    """Only a placed ROI with a size is a prompt ("Create new" in the selector makes an empty one)."""
    if roi_node is None:
        return False
    try:
        roi_from_node(roi_node)
    except PromptError:
        return False
    return True


def has_include_point(include_node: vtk.vtkObject | None) -> bool:
    return include_node is not None and bool(points_from_markups(include_node, 1))


def has_exclude_point(exclude_node: vtk.vtkObject | None) -> bool:
    return exclude_node is not None and bool(points_from_markups(exclude_node, 0))


def end_message(job: SegmentationJob) -> str:
    """The status line once a segmentation or propagation has ended, however it ended."""
    written, kept = len(job.written), len(job.kept)
    if job.state == "cancelled" and job.message:  # never ran (e.g. queued behind a model that failed to load)
        message = job.message[:1].upper() + job.message[1:] + "."
    elif job.state == "cancelled":
        message = f"Stopped: {written} slice(s) written."
    elif job.state == "stale":
        message = f"Stopped: {job.message}. {written} slice(s) had been written."
    elif job.state == "failed":
        message = f"Failed: {job.message}"
    elif not written:
        message = "The model found nothing at the prompts; nothing was written."
    else:
        message = f"{written} slice(s) written; the least certain are listed first."
    if kept:
        message += f" {kept} slice(s) edited by hand were kept."
    return message


@dataclass
class _Activity:
    """The action the panel is following (what the status line and the progress bar show)."""

    status: str = ""
    progress: tuple[int, int] | None = None
    rows: tuple[SliceRow, ...] = ()
    rows_job: SegmentationJob | None = None
    dialogs: list[Dialog] = field(default_factory=list)


class PanelModel:
    """The panel's state and decisions. `make_controller` builds the engine controller on first use (the
    engine process starts with the first request); `requirements(download)` says what must be installed
    first (an object with `ready` and `message`); `dicom_database()` gives Slicer's DICOM database or None."""

    def __init__(
        self,
        hs: HeadlessScene,
        make_controller: Callable[[], InteractiveSegmentation],
        requirements: Callable[[bool], Any],
        dicom_database: Callable[[], Any] = lambda: None,
    ) -> None:
        self.hs = hs
        self._make_controller = make_controller
        self._requirements = requirements
        self._dicom_database = dicom_database
        self._controller: InteractiveSegmentation | None = None
        self.local_checkpoint = ""
        self.activity = _Activity()

    # -- state -------------------------------------------------------------------------------------------
    @property
    def controller(self) -> InteractiveSegmentation:
        if self._controller is None:
            self._controller = self._make_controller()
        return self._controller

    @property
    def busy(self) -> bool:
        return self._controller is not None and self._controller.busy

    def requirements(self, download: bool = False) -> Any:
        return self._requirements(download)

    def _segment_problem(self, p: Any) -> str:
        """Why the model cannot segment yet ("" when it can): the input volume, then the prompts."""
        if p.inputVolume is not None and not is_input_volume(p.inputVolume):
            return "The input must be a scalar volume (not a label map or a color volume)."
        if p.inputVolume is None:
            return "Select the input volume first."
        # Exclude points alone refine the output segment where it covers their slice; where it does not,
        # the engine refuses in one line (checking the segment's voxels here would cost on every refresh).
        excluding = p.outputSegmentation is not None and has_exclude_point(p.excludePoints)
        if not (has_include_point(p.includePoints) or has_roi_prompt(p.promptROI) or excluding):
            return "Place at least one include point (or a box) on a slice of the input volume."
        return ""

    def view(self, p: Any) -> PanelView:
        volume = p.inputVolume if is_input_volume(p.inputVolume) else None
        tip = self._segment_problem(p)
        export_tip = self._export_problem(p)
        return PanelView(
            segment_enabled=not tip,
            segment_tooltip=tip or "Segment the slice that holds the points (Ctrl+Z undoes).",
            propagate_from_here_enabled=bool(volume and p.outputSegmentation and not self.busy),
            stop_enabled=self.busy,
            export_enabled=not export_tip,
            export_tooltip=export_tip or "Write every segment as a DICOM Segmentation of the source series.",
            custom_window=p.window == "custom",
            local_model=p.model == LOCAL_MODEL,
            model_status=self.model_status(p),
            status=self.activity.status,
            progress=self.activity.progress,
            rows=self.activity.rows,
        )

    def take_dialogs(self) -> list[Dialog]:
        """Errors to show in a dialog, each once."""
        dialogs, self.activity.dialogs = self.activity.dialogs, []
        return dialogs

    def say(self, status: str) -> None:
        self.activity.status = status

    # -- the model -------------------------------------------------------------------------------------------
    def model_path(self, p: Any) -> str:
        """The checkpoint file of the chosen model; raises with what to do when there is none yet."""
        from ..weights import registry

        if p.model == LOCAL_MODEL:
            if not self.local_checkpoint:
                raise ValueError("Choose the checkpoint file (Model → local file).")
            return str(registry.check_local_file(self.local_checkpoint))
        return str(registry.resolve_model(p.model))

    def model_status(self, p: Any) -> str:
        try:
            path = self.model_path(p)
        except (ValueError, RuntimeError, OSError) as error:
            return str(error)
        loaded = self._controller.model if self._controller is not None else {}
        if loaded.get("path") == path:
            return f"Loaded: {os.path.basename(path)} on {loaded['device']}"
        return f"Ready: {os.path.basename(path)}"

    def warm_up(self, p: Any) -> bool:
        """The module was entered: start the engine and load the chosen model in the background, so that the
        first click usually finds it ready (torch's import and the load are most of a cold start). Nothing
        is asked or shown when it cannot be done yet (nothing installed, no model file chosen or
        downloaded): the first action says what is missing. A failed load only shows in the status line; the
        first action asks again and shows the error. Returns whether a load was asked for (poll until the
        engine is idle)."""
        if p is None or not self.requirements(False).ready:
            return False
        try:
            path = self.model_path(p)
        except (ValueError, RuntimeError, OSError):
            return False

        def on_error(message: str, details: str) -> None:
            self._fail(f"The model could not be loaded: {message}", False, details)

        return self.controller.request_model(path, p.device, on_error, precision=p.precision) is not None

    def download(self, p: Any) -> bool:
        """Download the chosen registry model in the engine process (resumable; Stop cancels)."""
        from ..weights import registry

        if p.model not in registry.REGISTRY:
            self._fail("Only registry models can be downloaded; choose a local file instead.", True)
            return False

        def on_event(event: str, header: dict, arrays: dict) -> None:
            if event == "progress":
                done, total = header["done"], header["total"]
                self.activity.progress = (int(100 * done / total), 100) if total else (0, 0)
                self.activity.status = f"Downloaded {done / 1e6:.0f} MB"
            elif event == "done":
                self._end(f"Model ready: {header['path']}")
            elif event == "cancelled":
                self._end("Download stopped; the part already downloaded is kept and the next one resumes.")
            elif event == "error":
                self._fail(header.get("message", "the download failed"), True, header.get("details", ""))

        self.controller.client.submit("download", {"model": p.model}, on_event=on_event)
        self._start("Downloading the model…", (0, 100))
        return True

    # -- prompts and placement -------------------------------------------------------------------------------
    def toggle_placement(self, p: Any) -> str:
        """Shift+T: arm the other point list (see placement.py). Returns the list armed."""
        which = placement.toggle(self.hs.scene, self.hs.app_logic, p)
        self.activity.status = f"Click in a slice view to place an {which} point."
        return which

    def point_placed(self, p: Any, node: vtk.vtkObject) -> None:
        """A point was placed in a view: with "follow view", its view's axis becomes the axis."""
        count = node.GetNumberOfControlPoints()
        if not (p.followView and count):
            return
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(count - 1, position)
        axis = axis_for_point(self.hs.scene, position)
        if axis and axis != p.axis:
            p.axis = axis

    def wants_live_update(self, p: Any, shown: bool) -> bool:
        """Points edited: re-segment (after a short delay) only while the panel is shown, so edits made in
        other modules never rewrite the segmentation."""
        return bool(p.liveUpdate and shown)

    def live_update(self, p: Any) -> str:
        """What a due live update does: "run", "later" (a job is running: try again, never drop the edit) or
        "skip" (nothing to segment)."""
        if self._segment_problem(p):
            return "skip"
        return "later" if self.busy else "run"

    # -- segmentation ------------------------------------------------------------------------------------
    def options(self, p: Any, direction: str) -> SegmentOptions:
        return SegmentOptions(p.axis, direction, p.window, p.windowLevel, p.windowWidth, p.iouThreshold)

    def prepare(self, p: Any, segment_id: str = "") -> tuple[Any, str]:
        """Request the model and make sure the output segmentation and segment exist. Returns them."""
        volume = p.inputVolume
        if not is_input_volume(volume):
            raise ValueError(self._segment_problem(p))
        path = self.model_path(p)
        self.controller.request_model(path, p.device, self._on_model_error, precision=p.precision)
        name = f"{volume.GetName()} segmentation"
        seg = ensure_segmentation(self.hs, volume, p.outputSegmentation, name=name)
        seg.CreateDefaultDisplayNodes()  # the selector's "Create new" gives none: the result would not show
        if not segment_id or seg.GetSegmentation().GetSegment(segment_id) is None:
            segment_id = ensure_segment(seg, "SAM-Med2D")
        if p.outputSegmentation is not seg:
            p.outputSegmentation = seg
        return seg, segment_id

    def segment(self, p: Any, direction: str, segment_id: str = "", save_undo: Callable | None = None,
                interactive: bool = True) -> str | None:  # fmt: skip
        """Segment the prompted slice ("none") or propagate, in the engine. Returns the segment written into,
        or None when the action could not start (the status line and, if `interactive`, a dialog say why)."""
        try:
            seg, segment_id = self.prepare(p, segment_id)
            job = self.controller.start_segmentation(
                p.inputVolume, p.includePoints, p.excludePoints, self._roi(p), seg, segment_id,
                self.options(p, direction), modality=self.modality(p.inputVolume), save_undo=save_undo,
                **self._job_callbacks(interactive),
            )  # fmt: skip
        except Exception as error:  # bad input or a missing model: one line, nothing started
            self._fail(f"Segmentation could not start: {error}", interactive)
            return None
        self.activity.rows_job = job
        self._start("Segmenting…" if direction == "none" else "Propagating…")
        return segment_id

    def propagate_from_here(
        self, p: Any, segment_id: str = "", save_undo: Callable | None = None
    ) -> str | None:
        """Propagate both ways from the slice the view of the current axis shows, as the segment has it now
        (after a correction); slices edited by hand are kept."""
        try:
            seg, segment_id = self.prepare(p, segment_id)
            geometry = self.controller.snapshot(p.inputVolume).geometry(p.axis)
            index = viewed_slice_index(self.hs.scene, geometry)
            if index is None:
                raise ValueError(f"show a slice of the input volume in the {p.axis} view first")
            job = self.controller.start_propagation_from_slice(
                p.inputVolume, seg, segment_id, index, self.options(p, "both"),
                modality=self.modality(p.inputVolume), roi_node=self._roi(p), save_undo=save_undo,
                exclude_node=p.excludePoints, **self._job_callbacks(True),
            )  # fmt: skip
        except Exception as error:
            self._fail(f"Propagation could not start: {error}", True)
            return None
        self.activity.rows_job = job
        self._start(f"Propagating from slice {index}…")
        return segment_id

    def prefetch(self, p: Any) -> bool:
        """While idle, the engine encodes the slices of the current axis from the one on screen outwards.
        Only once a model was requested (never starts the engine by itself). Returns whether it was asked."""
        if self._controller is None or self.busy or not is_input_volume(p.inputVolume):
            return False
        try:
            geometry = self._controller.snapshot(p.inputVolume).geometry(p.axis)
            center = viewed_slice_index(self.hs.scene, geometry)
            if center is None:
                return False
            job = self._controller.prefetch(p.inputVolume, p.axis, center, self.options(p, "none"),
                                            self.modality(p.inputVolume))  # fmt: skip
        except (ValueError, RuntimeError, OSError):  # pre-encoding is a courtesy; the next action reports
            return False
        return job is not None

    def cancel(self) -> None:
        if self._controller is not None:
            self._controller.cancel()
        if self.busy:
            self.activity.status = "Stopping… slices already finished are kept."

    def poll(self) -> bool:
        """Deliver the engine's replies (main thread). Returns whether the panel should keep polling."""
        if self._controller is None:
            return False
        self._controller.poll()
        if not self.busy and self.activity.progress is not None:
            self.activity.progress = None
        return self.busy

    def scene_closing(self) -> None:
        """Everything computed for the old scene is dropped, never written into the new one."""
        if self._controller is not None:
            self._controller.scene_closing()
        self.activity = _Activity()

    def shutdown(self) -> None:
        if self._controller is not None:
            self._controller.shutdown()
            self._controller = None

    def row_location(self, row: SliceRow) -> tuple[float, float, float] | None:
        """World RAS of the centre of a table row's slice (to jump the views there), on the axis of the job
        that made the table, whatever ran since."""
        job = self.activity.rows_job
        if job is None or row not in self.activity.rows:
            return None
        return tuple(float(c) for c in slice_center_ras(job.geometry, row.index))

    # -- DICOM -----------------------------------------------------------------------------------------------
    def modality(self, volume: vtk.vtkObject) -> str | None:
        from .dicom_database import source_modality

        return source_modality(volume, self._dicom_database())

    def _model_sha256(self, p: Any) -> str:
        loaded = self._controller.model.get("sha256", "") if self._controller is not None else ""
        return loaded or model_sha256_of(p.outputSegmentation)

    def _export_problem(self, p: Any) -> str:
        if p.inputVolume is None or p.outputSegmentation is None:
            return "Select the input volume and the segmentation to export."
        if not p.inputVolume.GetAttribute("DICOM.instanceUIDs"):
            return "The input volume was not loaded from DICOM (use the DICOM module)."
        if self.busy:
            return "Wait for the running action to end."
        if not self._model_sha256(p):
            return "No SAM-Med2D model made this segmentation: segment with a model first."
        return ""

    def export_dicom_seg(self, p: Any, path: str) -> bool:
        """Write every segment as a DICOM-SEG of the input volume's source series (in the engine process),
        through the command line's output plan: the path may not be a source image (by inode, links
        included), nor an existing file that is not a DICOM-SEG, nor a device or FIFO."""
        from pathlib import Path

        from ..outputs import DICOM_SEG, plan_outputs
        from .dicom_database import source_files

        try:
            problem = self._export_problem(p)
            if problem:
                raise ValueError(problem)
            files = source_files(p.inputVolume, self._dicom_database())
            inputs = [("source image", Path(f)) for f in files]
            plan_outputs([("The DICOM-SEG file", path, DICOM_SEG)], inputs)
            self.controller.start_export(
                p.outputSegmentation, p.inputVolume, files, path, self._model_sha256(p),
                on_done=lambda out: self._end(f"DICOM-SEG written to {out}"),
                on_error=lambda message, details: self._fail(f"DICOM-SEG export failed: {message}", True,
                                                             details),
                on_cancelled=lambda: self._end("DICOM-SEG export stopped before it began; nothing written."),
            )  # fmt: skip
        except Exception as error:
            self._fail(f"DICOM-SEG export could not start: {error}", True)
            return False
        self._start("Writing the DICOM-SEG…")
        return True

    # -- how actions end -------------------------------------------------------------------------------------
    def _roi(self, p: Any) -> vtk.vtkObject | None:
        return p.promptROI if has_roi_prompt(p.promptROI) else None

    def _start(self, status: str, progress: tuple[int, int] = (0, 0)) -> None:
        self.activity.status, self.activity.progress = status, progress

    def _end(self, status: str) -> None:
        self.activity.status, self.activity.progress = status, None

    def _fail(self, message: str, interactive: bool, details: str = "") -> None:
        self._end(message)
        if interactive:
            self.activity.dialogs.append(Dialog(message, details))

    def _on_model_error(self, message: str, details: str) -> None:
        self._fail(f"The model could not be loaded: {message}", True, details)

    def _job_callbacks(self, interactive: bool) -> dict[str, Callable]:
        def on_slice(row: SliceRow) -> None:
            self.activity.status = f"Slice {row.index}: {row.status}, predicted IoU {row.predicted_iou:.2f}"

        def on_done(job: SegmentationJob) -> None:
            self._show_table(job)
            self._end(end_message(job))

        def on_error(message: str, details: str) -> None:
            self._fail(f"Failed: {message}", interactive, details)

        return {"on_slice": on_slice, "on_done": on_done, "on_error": on_error}

    def _show_table(self, job: SegmentationJob) -> None:
        self.activity.rows, self.activity.rows_job = tuple(job.table()), job


__all__ = [
    "LOCAL_MODEL",
    "Dialog",
    "PanelModel",
    "PanelParameters",
    "PanelView",
    "end_message",
    "has_exclude_point",
    "has_include_point",
    "has_roi_prompt",
]

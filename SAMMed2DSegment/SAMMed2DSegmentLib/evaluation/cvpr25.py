"""`evaluate --protocol cvpr25`: the CVPR 2025 interactive 3-D challenge's protocol run through this
module's 2-D workflow, one structure at a time.

The challenge (`CVPR25_iter_eval.py` of github.com/JunMa11/CVPR-MedSegFMCompetition, commit
748e862d162e3e3ee8197bd4085b19bbbe0bb8a0) gives a 3-D model a box on the structure's middle slice plus its
z-range, then 5 clicks, each at the centre of the largest 3-D error of the previous step (`cvpr25_user.py`),
and scores DSC and NSD (2 mm) after every step (`metrics/`). A 2-D model does what a user of this module
does with the same prompts:

1. segment the middle slice with the box, then propagate from it both ways, within the z-range;
2. for each click: re-segment the clicked slice with the clicks on it so far (and the box, on the middle
   slice) and the previous step's low-resolution logits of that slice as the mask prompt, then propagate
   from it both ways, within the z-range and up to (not into) the nearest slices already corrected.

A slice the walk rejects keeps what it had, as in the module (a propagation never erases). Once the mask
is exact there is nothing to click: the remaining steps repeat its scores (the challenge reruns the model on
unchanged prompts).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..engine.geometry import SliceGeometry
from ..engine.prompts import SlicePrompt
from .clicks import EXCLUDE, INCLUDE
from .cvpr25_user import FOREGROUND, ChallengeBox, challenge_box, next_click_3d, slice_position
from .metrics.interactive import click_auc, step_scores

if TYPE_CHECKING:
    from ..engine.propagation import PropagationEngine
    from ..engine.session import SegmentationSession

DEFAULT_CLICKS = 5


class SliceModel(Protocol):
    """What the protocol asks of a segmenter (the engine, or a test double)."""

    def segment(
        self, index: int, prompt: SlicePrompt, mask_input: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Mask and low-resolution logits of slice `index` for one prompt (and mask prompt)."""
        ...

    def propagate(
        self, seed: int, mask: np.ndarray, first: int, last: int
    ) -> Iterable[tuple[int, np.ndarray, np.ndarray | None]]:
        """(index, mask, logits) of every slice accepted walking both ways from `mask` on slice `seed`,
        within slices `first`..`last`; the seed itself is not yielded."""
        ...


class EngineSlices:
    """`SliceModel` on the propagation engine: raw model masks on corrected slices (no post-processing),
    and the engine's own walk, bounded by a slice-filling ROI over the allowed slices."""

    def __init__(self, engine: PropagationEngine, geometry: SliceGeometry) -> None:
        self.engine, self.geometry = engine, geometry

    def segment(
        self, index: int, prompt: SlicePrompt, mask_input: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if mask_input is not None:
            mask_input = mask_input.astype(np.float32)
        mask, _, low_res = self.engine.segment(index, prompt, mask_input=mask_input)
        return mask, low_res

    def propagate(
        self, seed: int, mask: np.ndarray, first: int, last: int
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        rows, cols = self.geometry.slice_shape
        whole = np.array([0.0, 0.0, cols - 1.0, rows - 1.0])
        bounds = {i: whole for i in range(first, last + 1)}
        for outcome in self.engine.iterate({seed: mask}, "both", self.geometry.normal_sign, roi_boxes=bounds):
            if outcome.index != seed and outcome.accepted and outcome.mask is not None:
                yield outcome.index, outcome.mask, outcome.low_res


@dataclass
class Cvpr25Result:
    """What one structure scored; `as_json` gives the documented keys, `mask` the final 3-D prediction."""

    box: ChallengeBox
    dsc_per_step: list[float] = field(default_factory=list)
    nsd_per_step: list[float] = field(default_factory=list)
    clicks: list[dict] = field(default_factory=list)
    model_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    mask: np.ndarray | None = field(default=None, repr=False)

    def as_json(self) -> dict:
        clicks = len(self.dsc_per_step) - 1
        return {
            "dsc_per_step": [round(v, 4) for v in self.dsc_per_step],
            "nsd_per_step": [round(v, 4) for v in self.nsd_per_step],
            "dsc_auc": round(click_auc(self.dsc_per_step, clicks), 4),
            "nsd_auc": round(click_auc(self.nsd_per_step, clicks), 4),
            "final_dsc": round(self.dsc_per_step[-1], 4),
            "final_nsd": round(self.nsd_per_step[-1], 4),
            "clicks": self.clicks,
            "box": self.box.as_json(),
            "model_seconds_per_step": [round(v, 2) for v in self.model_seconds],
            "seconds": round(self.seconds, 2),
        }


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


class _Workflow:
    """The 3-D prediction and what the user did on each slice."""

    def __init__(self, model: SliceModel, geometry: SliceGeometry, box: ChallengeBox) -> None:
        self.model, self.geometry, self.box = model, geometry, box
        self.prediction = np.zeros(geometry.shape_kji, dtype=bool)
        self.logits: dict[int, np.ndarray] = {}
        self.prompts: dict[int, SlicePrompt] = {}  # the corrected slices and their prompts

    def _put(self, index: int, mask: np.ndarray, logits: np.ndarray | None) -> None:
        self.geometry.view(self.prediction, index)[...] = mask
        if logits is not None:
            self.logits[index] = logits

    def correct(self, index: int, prompt: SlicePrompt) -> None:
        """Re-segment slice `index` with `prompt` and its previous logits, then propagate from it."""
        previous = self.logits.get(index)
        mask, logits = self.model.segment(index, prompt, None if previous is None else _sigmoid(previous))
        self.prompts[index] = prompt
        self._put(index, mask, logits)
        if not mask.any():
            return
        below = [i for i in self.prompts if i < index]
        above = [i for i in self.prompts if i > index]
        first = max([self.box.z_min] + [i + 1 for i in below])
        last = min([self.box.z_max] + [i - 1 for i in above])
        for i, m, lr in self.model.propagate(index, mask, first, last):
            self._put(i, m, lr)

    def prompt_with(self, index: int, x: int, y: int, label: int) -> SlicePrompt:
        """The slice's prompt so far (the box on the middle slice, earlier clicks) plus one click."""
        before = self.prompts.get(index, SlicePrompt())
        points = np.vstack([before.points, [[x, y]]])
        labels = np.append(before.labels, label).astype(np.int64)
        return SlicePrompt(points=points, labels=labels, box=before.box)


def run_protocol(
    model: SliceModel, geometry: SliceGeometry, truth: np.ndarray, spacing_kji: tuple[float, float, float],
    max_clicks: int = DEFAULT_CLICKS,
) -> Cvpr25Result:  # fmt: skip
    """The protocol for one structure: `truth` is its boolean 3-D label in KJI order on `geometry`'s grid,
    `spacing_kji` the voxel size in mm per array axis (for NSD)."""
    truth = np.asarray(truth, dtype=bool)
    if truth.shape != geometry.shape_kji:
        raise ValueError(f"the label's shape {truth.shape} is not the volume's {geometry.shape_kji}")
    start = time.perf_counter()
    box = challenge_box(truth, geometry)
    flow = _Workflow(model, geometry, box)
    result = Cvpr25Result(box)

    def score(model_start: float | None) -> None:
        result.model_seconds.append(0.0 if model_start is None else time.perf_counter() - model_start)
        dsc, nsd = step_scores(truth, flow.prediction, spacing_kji)
        result.dsc_per_step.append(dsc)
        result.nsd_per_step.append(nsd)

    model_start = time.perf_counter()
    flow.correct(box.z_mid, SlicePrompt(box=np.array(box.box, dtype=np.float64)))
    score(model_start)
    for _ in range(max_clicks):
        click = next_click_3d(flow.prediction, truth)
        if click is None:
            score(None)
            continue
        index, x, y = slice_position(geometry, click.kji)
        result.clicks.append({"voxel_kji": list(click.kji), "label": click.label,
                              "slice": index, "x": x, "y": y})  # fmt: skip
        model_start = time.perf_counter()
        flow.correct(index, flow.prompt_with(index, x, y, INCLUDE if click.label == FOREGROUND else EXCLUDE))
        score(model_start)
    result.mask = flow.prediction
    result.seconds = time.perf_counter() - start
    return result


def voxel_spacing_kji(ijk_to_ras: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the K, J and I array axes."""
    sizes = np.linalg.norm(np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3], axis=0)
    return float(sizes[2]), float(sizes[1]), float(sizes[0])


def evaluate_cvpr25(
    session: SegmentationSession, truth: np.ndarray, axis: str = "axial", max_clicks: int = DEFAULT_CLICKS
) -> Cvpr25Result:
    """The protocol on the session's volume (set with `set_volume`) with its model and settings: one case,
    callable from any front end (the `evaluate` command, a cohort run)."""
    volume = session.volume
    if volume is None:
        raise ValueError("the session has no volume")
    geometry = volume.geometry(axis)
    model = EngineSlices(session.engine(axis), geometry)
    return run_protocol(model, geometry, truth, voxel_spacing_kji(volume.ijk_to_ras), max_clicks)

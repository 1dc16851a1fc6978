"""Labelled volumes cut into 2-D slices of the three views, with the held-out axial band and the
validation-only volumes kept apart from everything trained on."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..engine.geometry import AXES, SliceGeometry
from ..engine.intensity import SA_MED2D_20M, IntensityWindow, compute_window, looks_like_ct
from ..formats.volumes import read_labels_on_grid, read_volume
from .settings import FinetuneConfig, FinetuneError


@dataclass
class LabelledSlice:
    image: np.ndarray  # float32 intensities, display orientation
    labels: np.ndarray  # integer label map of the same slice
    label_values: tuple[int, ...]  # labels with ≥ min_pixels pixels here
    axis: str
    volume: int
    index: int


@dataclass(frozen=True)
class VolumeIntensity:
    """What the intensity augmentation needs of one volume."""

    rule: IntensityWindow  # the model's rule on the volume as stored: what inference and validation use
    sorted_sample: np.ndarray  # up to 200 000 finite voxels, sorted: the rule's window under other paddings
    is_ct: bool


@dataclass
class TrainingSet:
    slices: list[list[LabelledSlice]]  # per axis (axial, coronal, sagittal)
    validation: list[tuple[LabelledSlice, int]]  # (slice, label) pairs held out
    intensity: list[VolumeIntensity] = field(default_factory=list)  # per volume
    samples_per_axis: list[int] = field(default_factory=list)
    #: Per volume, SHA-256 of its voxels, label map and geometry as read: what a resumed run must see again.
    digests: list[str] = field(default_factory=list)


Pair = tuple[str | os.PathLike[str], str | os.PathLike[str]]


def load_training_set(
    pairs: Sequence[Pair], config: FinetuneConfig, validation_pairs: Sequence[Pair] = ()
) -> TrainingSet:
    """Cut every labelled volume into slices of the three views; hold out a central axial band. Volumes of
    `validation_pairs` are never trained on: every labelled axial slice of theirs is validation."""
    if not pairs:
        raise FinetuneError("no training data: give at least one --image/--labels pair")
    per_axis: list[list[LabelledSlice]] = [[], [], []]
    validation: list[tuple[LabelledSlice, int]] = []
    intensity: list[VolumeIntensity] = []
    digests: list[str] = []
    everything = [*pairs, *validation_pairs]
    for number, (image_path, label_path) in enumerate(everything):
        validation_only = number >= len(pairs)
        try:
            image = read_volume(image_path)
        except ValueError as exc:
            raise FinetuneError(str(exc)) from exc
        try:
            if str(label_path).lower().endswith(".seg.nrrd"):
                labels = _read_segmentation(label_path, image.array_kji, image.ijk_to_ras)
            else:
                labels = read_labels_on_grid(label_path, image.array_kji.shape, image.ijk_to_ras)
        except FinetuneError:
            raise
        except ValueError as exc:
            raise FinetuneError(str(exc)) from exc
        if labels.shape == image.array_kji.shape and np.array_equal(labels, image.array_kji):
            # An integer CT passes every label-map check, and every grey level would become a "structure".
            raise FinetuneError(
                f"the labels {label_path} hold the same voxels as the image {image_path}: give its label map"
            )
        values = image.array_kji.astype(np.float32)
        digest = hashlib.sha256(np.ascontiguousarray(values).tobytes())
        for array in (np.asarray(values.shape), labels.astype(np.int64), np.asarray(image.ijk_to_ras, float)):
            digest.update(np.ascontiguousarray(array).tobytes())
        digests.append(digest.hexdigest())
        finite = values[np.isfinite(values)].ravel()
        sample = np.sort(finite[:: max(1, finite.size // 200_000)])
        is_ct = image.modality == "CT" or (image.modality is None and looks_like_ct(values))
        intensity.append(VolumeIntensity(compute_window(values, SA_MED2D_20M), sample, is_ct))
        if finite.size < values.size:
            # The engine shows NaN voxels as grey 0 and clips infinities to the window's ends; the volume's
            # lowest and highest finite values land there too, and unlike NaN they survive resizing and
            # augmentation (one NaN voxel would make the whole augmented slice NaN, and the loss with it).
            values = np.nan_to_num(values, nan=finite.min(), posinf=finite.max(), neginf=finite.min())
        axial = SliceGeometry.create(values.shape, image.ijk_to_ras, AXES[0])
        count = axial.num_slices
        held = range(count) if validation_only else held_out_band(count, config.val_fraction)
        training_labels = labels  # a validation volume is only seen along the axial axis
        if not validation_only:
            # The held-out axial band is also blanked out of the other views' labels, so no held-out voxel
            # is ever trained on.
            training_labels = labels.copy()
            selector: list[object] = [slice(None)] * 3
            selector[2 - axial.slice_axis] = slice(held.start, held.stop)
            training_labels[tuple(selector)] = 0
        for a, axis in enumerate(AXES[:1] if validation_only else AXES):
            geometry = SliceGeometry.create(values.shape, image.ijk_to_ras, axis)
            source = labels if a == 0 else training_labels
            for index in range(geometry.num_slices):
                lab = geometry.extract(source, index)
                present, counts = np.unique(lab[lab > 0], return_counts=True)
                keep = tuple(int(v) for v, c in zip(present, counts, strict=True) if c >= config.min_pixels)
                if not keep:
                    continue
                item = LabelledSlice(geometry.extract(values, index), lab, keep, axis, number, index)
                if a == 0 and index in held:
                    validation += [(item, v) for v in keep]
                else:
                    per_axis[a].append(item)
    samples = [sum(len(s.label_values) for s in items) for items in per_axis]
    if sum(samples) == 0:
        raise FinetuneError(f"no slice holds a label with ≥ {config.min_pixels} pixels")
    for (image_path, _), digest in zip(validation_pairs, digests[len(pairs) :], strict=True):
        if digest in digests[: len(pairs)]:
            raise FinetuneError(f"--val-image {image_path} is also a training volume: validate on another")
    return TrainingSet(per_axis, validation, intensity, samples, digests)


def _read_segmentation(path: str | os.PathLike[str], image: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """A Slicer .seg.nrrd (any extent, shared or separate layers) → label map on the image grid, segment n →
    label n (a later segment wins where two overlap), through Slicer's own segmentation classes."""
    from ..mrml.segmentations import read_segments_on_grid

    labels = np.zeros(image.shape, np.uint16)
    for number, (_, mask) in enumerate(read_segments_on_grid(path, image, ijk_to_ras)):
        labels[mask] = number + 1
    if not labels.any():
        raise FinetuneError(f"{path}: the segmentation is empty (no segment has voxels on the image grid)")
    return labels


def held_out_band(num_slices: int, fraction: float) -> range:
    """The central axial slices validation holds out (through `load_training_set`, also what
    `benchmarks/select_model.py` scores)."""
    count = int(round(num_slices * fraction))
    start = (num_slices - count) // 2
    return range(start, start + count)

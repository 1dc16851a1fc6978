"""Volume intensities (CT Hounsfield units, MR, PET, 16-bit, float) → the 8-bit images SAM-Med2D expects.

SAM-Med2D was fine-tuned on 8-bit images (0–255) and its predictor only normalises them with SAM's pixel
mean/std; it contains no CT/MR conversion. This module is the volume engine's conversion, in two steps:

1. :func:`compute_window` picks an :class:`IntensityWindow` (``low``…``high``) **once per volume**, so that
   neighbouring slices (and propagation across them) see the same mapping;
2. :func:`to_uint8` clips to the window, scales linearly to 0..255, rounds half to even and casts to uint8.

Neither function modifies its input: the volume node's voxels are never touched (design §2.2).

What SA-Med2D-20M did: the model's own rule
-------------------------------------------
Source: J. Ye, J. Cheng, J. Chen, Z. Deng, T. Li, H. Wang, et al., "SA-Med2D-20M Dataset: Segment Anything in
2D Medical Imaging with 20 Million masks", arXiv:2311.11969 (2023): its section on how the collected 3-D
volumes were processed. SAM-Med2D (arXiv:2308.16184) was trained on this data. The rule is reported to be:
clip each volume's voxels at its 0.5th and 99.5th percentiles, then scale linearly to 0–255, once per
volume, before slicing. The paper's own text was not available to us (the stored summaries break off at
"Voxel values are streamlined to a unified"), so the rule is **checked against the slices the official
repository ships** (`data_demo/`, kept in the project's reference material as `sa-med2d-20m-samples/`):

* ``amos_0006_90.png`` (AMOS CT): outside the scan circle 0, air inside the body ≈ 78–81, soft tissue
  ≈ 150–165, bone up to 254. A fixed HU window cannot give that (W400/L40 puts air at 0 and saturates
  bone). The percentile rule does when the scanner's padding value (here −2048 HU, about a fifth of the
  voxels) is among the lowest 0.5 % and the 99.5th percentile is ≈ 1300 HU: air (−1000) → 80, soft tissue
  (+50) → 160, padding → 0.
* What it gives therefore depends on the scanner's padding: the project's DICOM CT (no padding; p0.5
  −1024, p99.5 ≈ 495 HU) maps air to 5 and the liver to ≈ 188; the same CT padded with −3024 would map air
  to ≈ 148. The demo model is trained with every common padding value for this reason
  (``finetune/batches.py``).

So :data:`SA_MED2D_20M` is that rule: the 0.5th and 99.5th percentiles of **all** finite voxels (padding
included, as the samples require), linear to 0..255, one window per volume. Each model in the weights
registry names its rule; ``"auto"`` in the module and the command line means "the model's own rule"
(:func:`default_window`). Named CT presets (:data:`PRESETS`) and a level/width stay available.

``"auto"`` (the method name kept from before the rule was settled) is a variant that leaves out the voxels
at the volume minimum (constant padding or zero background) before taking the percentiles; it is not what
the dataset did and is no model's default.

Where we differ from the dataset pipeline:

* None in the percentiles of the model's rule: they are exact and do not depend on voxel order (integer
  volumes are counted value by value, others go through ``np.percentile`` over all finite voxels), so a
  flipped or transposed copy of a volume gets the same window. Only the ``"auto"`` variant estimates them.
* For the ``"auto"`` variant, on volumes with more than ``max_samples`` voxels, the percentiles come from a
  deterministic random sample of ``max_samples`` voxels (``numpy.random.default_rng(seed)``). This makes them
  fast and light on memory: 0.14 s and about 20 MiB of temporaries for a C-ordered 512×512×300 int16 volume on
  a 2-vCPU Xeon (0.2–0.35 s for float32 or Fortran order). The estimate is accurate in rank. With ``m``
  samples, the sample p-quantile lies between the exact (p ± 5·sqrt(p(1−p)/m)) quantiles, except with
  negligible probability. For the 0.5th percentile and m = 2 000 000, that is between the 0.475th and 0.525th
  percentiles.
* The window comes from the volume as loaded (after any resampling or cropping in Slicer). The dataset used
  the original files.
* Rounding is half-to-even (``np.rint``). We do not know how the dataset rounded or truncated to uint8, so
  there may be a difference of at most one grey level.
* NaNs (and ±inf) are left out of the statistics. NaN maps to 0.

Bit-exactness: ``to_uint8`` computes ``rint((clip(x, low, high) − low) / (high − low) · 255)`` in float64. It
reproduces the golden reference conversion exactly (``img2_hu`` → ``img2_image``, window level 40 / width 400;
see ``Testing/test_intensity.py``). On that slice, float32 and the other orders of the arithmetic also match.
float64 was kept because it is the exact-arithmetic reading of the rule for every input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PRESETS",
    "SA_MED2D_20M",
    "IntensityWindow",
    "compute_window",
    "default_window",
    "looks_like_ct",
    "to_uint8",
]

#: The SA-Med2D-20M rule (see the module docstring): what ``"auto"`` means for every model in the registry.
SA_MED2D_20M = "sa-med2d-20m"

#: Named CT windows as ``name: (level, width)`` in HU. These are common radiology display presets; exact
#: values vary between sources and institutions. Soft tissue W400/L40 and brain W80/L40 are also the windows
#: MedSAM reported for its CT preprocessing.
PRESETS: dict[str, tuple[float, float]] = {
    "ct-soft-tissue": (40.0, 400.0),
    "ct-lung": (-600.0, 1500.0),
    "ct-bone": (400.0, 1800.0),
    "ct-brain": (40.0, 80.0),
    "ct-liver": (60.0, 160.0),
}

METHODS = (SA_MED2D_20M, "auto", "percentile", "window", "minmax")
MODALITIES = ("CT", "MR", "PT")

# Integer volumes whose value range is below this are counted exactly (a 16 MiB table at most); others go
# through one float copy of their finite voxels.
_MAX_COUNTED_RANGE = 1 << 21

# Elements per block when a whole volume is streamed through float64 arithmetic (32 MiB of float64).
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class IntensityWindow:
    """Intensity range mapped to 0..255; values below ``low`` → 0, above ``high`` → 255.

    ``method`` says how the window was obtained, so the UI and reports can show it and a run can be
    reproduced. ``low``/``high`` must be finite with ``high > low``. A zero-width window has no meaningful
    linear mapping, so it is rejected.
    """

    low: float
    high: float
    method: str = "user"

    def __post_init__(self) -> None:
        low = _finite_float(self.low, "low")
        high = _finite_float(self.high, "high")
        if not high > low:
            raise ValueError(f"window needs high > low, got low={low:g}, high={high:g}")
        if not isinstance(self.method, str):
            raise ValueError(f"method must be a string, got {type(self.method).__name__}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @property
    def level(self) -> float:
        """Window centre (radiological "level")."""
        return (self.low + self.high) / 2.0

    @property
    def width(self) -> float:
        """Window width (radiological "width")."""
        return self.high - self.low

    @classmethod
    def from_level_width(cls, level: float, width: float, method: str = "user") -> IntensityWindow:
        """Window from radiological level/width: ``[level − width/2, level + width/2]``."""
        level = _finite_float(level, "level")
        width = _finite_float(width, "width")
        if not width > 0:
            raise ValueError(f"window width must be > 0, got {width:g}")
        return cls(level - width / 2.0, level + width / 2.0, method)

    @classmethod
    def from_preset(cls, name: str) -> IntensityWindow:
        """Window for a named preset from :data:`PRESETS` (e.g. ``"ct-soft-tissue"``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown window preset {name!r}; choose one of {', '.join(PRESETS)}")
        level, width = PRESETS[name]
        return cls.from_level_width(level, width, f"window W{width:g}/L{level:g} ({name})")


def compute_window(
    volume: np.ndarray,
    method: str = "auto",
    *,
    modality: str | None = None,
    level: float | None = None,
    width: float | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    max_samples: int = 2_000_000,
    seed: int = 0,
) -> IntensityWindow:
    """Choose one intensity window for a whole volume (or a slice); the input is never modified.

    ``method``:

    * ``"sa-med2d-20m"`` (:data:`SA_MED2D_20M`): the 0.5/99.5 percentiles of all finite voxels, the rule
      SAM-Med2D's training data went through (``percentiles`` is ignored: the rule fixes them).
    * ``"auto"``: ``percentiles`` of the finite voxels above the volume minimum (padding left out).
    * ``"percentile"``: ``percentiles`` of all finite voxels, with no background exclusion.
    * ``"window"``: the user's ``level``/``width``. Both are required, must be finite, and width must be > 0.
    * a key of :data:`PRESETS`, e.g. ``"ct-soft-tissue"``: that preset window.
    * ``"minmax"``: the finite minimum and maximum.

    Computed windows never fail on degenerate data. If the percentiles coincide, the window falls back to the
    minimum/maximum of the same voxels, then to the volume's full range. A constant volume gets
    ``value ± 0.5``. The fallback is recorded in ``method``. User windows with width ≤ 0 raise ValueError.
    Percentiles of volumes with more than ``max_samples`` voxels come from a deterministic random sample (see
    the module docstring for the accuracy).
    """
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, got {type(method).__name__}")
    if method not in METHODS and method not in PRESETS:
        raise ValueError(
            f"unknown intensity method {method!r}; choose one of {', '.join(METHODS)} "
            f"or a preset: {', '.join(PRESETS)}"
        )
    modality = _check_modality(modality)
    if method != "window" and (level is not None or width is not None):
        raise ValueError(f"level/width only apply to method='window', not {method!r}")
    _check_volume(volume)

    if method in PRESETS:
        return IntensityWindow.from_preset(method)
    if method == "window":
        if level is None or width is None:
            raise ValueError("method='window' needs both level and width (e.g. level=40, width=400)")
        return IntensityWindow.from_level_width(level, width, f"window W{float(width):g}/L{float(level):g}")

    tag = f" [{modality}]" if modality else ""
    if method == SA_MED2D_20M:
        percentiles = (0.5, 99.5)
    if method == "minmax":
        vmin, vmax = _finite_min_max(volume)
        return _window_or_fallback(vmin, vmax, "minmax" + tag)

    p_low, p_high = _check_percentiles(percentiles)
    max_samples = _check_positive_int(max_samples, "max_samples")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")

    if method == SA_MED2D_20M:
        return _rule_window(volume, tag)
    sample, sampled = _sample(volume, max_samples, int(seed))
    if sample.dtype.kind == "f":
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        # Every sampled voxel is NaN/inf. Fall back to an exact pass over the whole volume: either the volume
        # has no finite value at all (error), or the few finite ones decide the window.
        sample = _all_finite(volume)
        sampled = False
    if method == "auto":
        floor, _ = _finite_min_max(volume)
        considered = sample[sample > floor]
        what = f"auto: percentile {p_low:g}–{p_high:g} of voxels above the volume minimum (SA-Med2D-20M-like)"
        if considered.size == 0:  # every considered voxel sits at the floor (e.g. a constant volume)
            considered = sample
    else:
        considered = sample
        what = f"percentile {p_low:g}–{p_high:g} of all voxels"
    if sampled:
        what += f", estimated from {sample.size} sampled of {volume.size} voxels (seed {int(seed)})"
    what += tag

    low, high = (float(v) for v in np.percentile(considered, [p_low, p_high]))
    if high > low:
        return IntensityWindow(low, high, what)
    cmin, cmax = float(considered.min()), float(considered.max())
    if cmax > cmin:
        return IntensityWindow(cmin, cmax, what + "; percentiles coincide, fell back to min–max")
    vmin, vmax = _finite_min_max(volume)
    return _window_or_fallback(vmin, vmax, what + "; percentiles coincide, fell back to min–max")


def to_uint8(values: np.ndarray, window: IntensityWindow) -> np.ndarray:
    """Map values (a slice or a whole volume) to uint8 through ``window``; the input is never modified.

    ``rint((clip(x, low, high) − low) / (high − low) · 255)`` in float64, then uint8. Rounding is half to
    even. NaN → 0, −inf → 0, +inf → 255. The result has the same shape as ``values``. Whole volumes are
    processed in blocks, so the float64 temporaries stay small.
    """
    if not isinstance(window, IntensityWindow):
        raise ValueError(f"window must be an IntensityWindow, got {type(window).__name__}")
    _check_array(values, "values")
    out = np.empty(values.shape, dtype=np.uint8)
    if values.size == 0:
        return out
    low, high = window.low, window.high
    span = high - low
    if values.ndim == 0:
        out[()] = _scale_block(values.reshape(1), low, high, span)[0]
        return out
    for start, stop in _block_ranges(values):
        out[start:stop] = _scale_block(values[start:stop], low, high, span)
    return out


# --- helpers ---


def _scale_block(block: np.ndarray, low: float, high: float, span: float) -> np.ndarray:
    x = block.astype(np.float64)  # always a fresh copy: the caller's array is never written
    np.clip(x, low, high, out=x)
    x -= low
    x /= span
    x *= 255.0
    np.rint(x, out=x)
    if block.dtype.kind == "f":
        x[np.isnan(x)] = 0.0
    return x.astype(np.uint8)


def _finite_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {result}")
    return result


def _check_modality(modality: str | None) -> str | None:
    if modality is None:
        return None
    if not isinstance(modality, str) or modality.upper() not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)} or None, got {modality!r}")
    return modality.upper()


def _check_percentiles(percentiles: tuple[float, float]) -> tuple[float, float]:
    try:
        p_low, p_high = percentiles
    except (TypeError, ValueError):
        raise ValueError(f"percentiles must be a pair (low, high), got {percentiles!r}") from None
    p_low = _finite_float(p_low, "lower percentile")
    p_high = _finite_float(p_high, "upper percentile")
    if not 0.0 <= p_low < p_high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got ({p_low:g}, {p_high:g})")
    return p_low, p_high


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_array(values: object, name: str) -> None:
    if not isinstance(values, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(values).__name__}")
    if values.dtype.kind not in "iuf":
        raise ValueError(
            f"{name} must hold integer or floating-point intensities, got dtype {values.dtype} "
            "(bool, complex and object arrays are not images)"
        )


def _check_volume(volume: object) -> None:
    _check_array(volume, "volume")
    if volume.size == 0:
        raise ValueError(f"volume is empty (shape {volume.shape}); no window can be computed")


def _block_ranges(values: np.ndarray) -> Iterator[tuple[int, int]]:
    """Ranges along axis 0 holding about ``_BLOCK_ELEMENTS`` elements each."""
    per_row = max(1, values.size // max(1, values.shape[0]))
    step = max(1, _BLOCK_ELEMENTS // per_row)
    for start in range(0, values.shape[0], step):
        yield start, min(start + step, values.shape[0])


def _finite_min_max(volume: np.ndarray) -> tuple[float, float]:
    """Exact minimum and maximum over the finite voxels; ValueError when there are none."""
    vmin, vmax = float(volume.min()), float(volume.max())
    if math.isfinite(vmin) and math.isfinite(vmax):  # NaN propagates through min/max, so none is present
        return vmin, vmax
    vmin, vmax = math.inf, -math.inf
    blocks = [volume.reshape(1)] if volume.ndim == 0 else (volume[a:b] for a, b in _block_ranges(volume))
    for block in blocks:
        finite = np.isfinite(block)
        if finite.any():
            vmin = min(vmin, float(np.min(block, where=finite, initial=np.inf)))
            vmax = max(vmax, float(np.max(block, where=finite, initial=-np.inf)))
    if vmin > vmax:
        raise ValueError("volume has no finite values (all NaN or infinite); no window can be computed")
    return vmin, vmax


def _all_finite(volume: np.ndarray) -> np.ndarray:
    flat = volume.reshape(-1)
    finite = flat[np.isfinite(flat)]
    if finite.size == 0:
        raise ValueError("volume has no finite values (all NaN or infinite); no window can be computed")
    return finite


def _sample(volume: np.ndarray, max_samples: int, seed: int) -> tuple[np.ndarray, bool]:
    """All voxels (flattened), or a deterministic sample with replacement of ``max_samples`` voxels.

    The sample depends only on the logical content, shape and seed, not on the memory layout.
    """
    n = volume.size
    if n <= max_samples:
        return volume.reshape(-1), False
    index = np.random.default_rng(seed).integers(0, n, size=max_samples)
    if volume.flags.c_contiguous:
        return volume.reshape(-1)[index], True
    return volume[np.unravel_index(index, volume.shape)], True


def _rule_window(volume: np.ndarray, tag: str) -> IntensityWindow:
    """The SA-Med2D-20M window, computed exactly so that it depends only on the voxel values: flipping or
    permuting the volume's axes (the same scan stored another way) must not change what the model sees."""
    what = "SA-Med2D-20M rule: percentile 0.5–99.5 of all voxels" + tag
    vmin, vmax = _finite_min_max(volume)
    if volume.dtype.kind in "iu" and vmax - vmin < _MAX_COUNTED_RANGE:
        counts = np.zeros(int(vmax - vmin) + 1, dtype=np.int64)
        blocks = [volume.reshape(1)] if volume.ndim == 0 else (volume[a:b] for a, b in _block_ranges(volume))
        for block in blocks:
            counts += np.bincount((block.astype(np.int64) - int(vmin)).ravel(), minlength=counts.size)
        cumulative = np.cumsum(counts)
        low, high = (vmin + _ranked_value(cumulative, q) for q in (0.5, 99.5))
    else:
        low, high = (float(v) for v in np.percentile(_all_finite(volume), [0.5, 99.5]))
    if high > low:
        return IntensityWindow(low, high, what)
    return _window_or_fallback(vmin, vmax, what + "; percentiles coincide, fell back to min–max")


def _ranked_value(cumulative: np.ndarray, q: float) -> float:
    """``np.percentile``'s linear rule read from cumulative counts of the values ``0, 1, 2, …``."""
    position = (int(cumulative[-1]) - 1) * q / 100.0
    below = math.floor(position)
    lower, upper = (int(np.searchsorted(cumulative, rank, side="right")) for rank in (below, below + 1))
    fraction = position - below
    return float(lower) if fraction == 0 else lower + (upper - lower) * fraction


def _window_or_fallback(vmin: float, vmax: float, what: str) -> IntensityWindow:
    if vmax > vmin:
        return IntensityWindow(vmin, vmax, what)
    return IntensityWindow(vmin - 0.5, vmax + 0.5, what + "; constant volume, window value ± 0.5")


def looks_like_ct(volume: np.ndarray) -> bool:
    """Heuristic for volumes without a modality tag (NIfTI/NRRD): Hounsfield units put air near −1000."""
    if volume.dtype.kind not in "iuf" or volume.size == 0:
        return False
    sample = volume.reshape(-1)[:: max(1, volume.size // 200_000)]
    sample = sample[np.isfinite(sample)] if volume.dtype.kind == "f" else sample
    if sample.size == 0:
        return False
    air = np.count_nonzero((sample > -1100) & (sample < -900)) / sample.size
    return bool(sample.min() >= -3100 and sample.max() <= 5000 and air > 0.02)


def default_window(
    volume: np.ndarray, modality: str | None = None, rule: str = SA_MED2D_20M
) -> IntensityWindow:
    """The window a model sees a volume through when the user picks none: the model's own ``rule`` (from the
    weights registry; SA-Med2D-20M's for every model so far), computed once for the whole volume."""
    return compute_window(volume, rule, modality=modality)

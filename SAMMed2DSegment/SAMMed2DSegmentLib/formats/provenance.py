"""Provenance of a segment (model, checkpoint SHA-256, axis, prompts, window, per-slice confidence) and its
two encodings: complete in RAS in the `.seg.nrrd` header (`Provenance.to_metadata`), and in LPS within the
DICOM-SEG's value-representation limits (`Provenance.to_algorithm_parameters`, cut from the end with a
`truncated` entry saying what was kept). Standard library and numpy only: the Slicer process builds these
records while pydicom and highdicom may exist only in the engine process.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Per-slice status codes in the compact slice list ("index:status:confidence:predicted_iou;...").
SLICE_STATUS_CODES = {"prompted": "P", "given": "G", "propagated": "A", "rejected": "R"}
_STATUS_OF_CODE = {code: status for status, code in SLICE_STATUS_CODES.items()}
SLICES_FORMAT = (
    "index:status:confidence:predicted_iou separated by ';'; "
    "status P=prompted G=given A=propagated R=rejected; "
    "index = slice number along Axis, as in the --report JSON"
)
MAX_LT_LENGTH = 10240  # AlgorithmParameters is LT (PS3.5 table 6.2-1)
TRUNCATED = "..."  # ends every value we had to shorten, so a cut is never silent
_LPS_FLIP = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS for points and direction vectors


@dataclass(frozen=True)
class SliceRecord:
    """One visited slice: its index along the run's axis (as in the report), status, model confidence and
    predicted IoU (both rounded to 4 decimals, like the report)."""

    index: int
    status: str
    confidence: float
    predicted_iou: float


@dataclass(frozen=True)
class PointRecord:
    """A point prompt: position in mm (frame given by the container); label 1 include, 0 exclude."""

    position: tuple[float, float, float]
    label: int


@dataclass(frozen=True)
class RoiRecord:
    """A box prompt: centre, full side lengths, and a 3×3 row-major matrix whose columns are its unit axes."""

    center: tuple[float, float, float]
    size: tuple[float, float, float]
    axes: tuple[tuple[float, float, float], ...]


@dataclass(frozen=True)
class Provenance:
    """What a reviewer needs to check and re-run one segment. Positions are world RAS millimetres here;
    :meth:`to_algorithm_parameters` writes them as LPS for DICOM. ``truncated`` is empty unless a DICOM-SEG
    had to shorten the lists (it then says what was kept)."""

    model: str
    model_sha256: str
    axis: str
    propagate: str
    segment: str = ""
    points_ras: tuple[PointRecord, ...] = ()
    rois_ras: tuple[RoiRecord, ...] = ()
    slices: tuple[SliceRecord, ...] = ()
    window: tuple[float, float] | None = None
    truncated: str = ""
    #: encoder precision the run used ("fp32", "bf16", "fp16"); "" in files written before it was recorded
    precision: str = ""
    #: how the window was chosen (e.g. "SA-Med2D-20M rule: percentile 0.5–99.5 of all voxels"); "" in files
    #: written before it was recorded
    window_method: str = ""
    #: slices whose exclude points corrected the segment as it was: their prompt also held a box and a point
    #: taken from the segment's mask there (`PropagationEngine.refine_prompt`), so re-running them needs
    #: that earlier segment (the command line keeps the run that made it under `Earlier`; the module keeps
    #: one record per segment)
    refined: tuple[int, ...] = ()

    # -- .seg.nrrd header (complete, RAS) ---------------------------------------------------------------

    def to_metadata(self, earlier: Sequence[Provenance] = ()) -> dict[str, str]:
        """Key/value fields for ``save_segmentation``; ``earlier`` runs (other segments, or earlier runs on
        this one) are kept under ``Earlier`` so updating a file never drops what made its other segments."""
        meta = {
            "Model": self.model,
            "ModelSHA256": self.model_sha256,
            "Axis": self.axis,
            "Propagate": self.propagate,
            "Segment": self.segment,
            "CoordinateSystem": "RAS",
            "Prompts": json.dumps(
                {
                    "points_ras": [{"position": list(p.position), "label": p.label} for p in self.points_ras],
                    "rois_ras": [
                        {
                            "center": list(r.center),
                            "axes": [list(row) for row in r.axes],
                            "size": list(r.size),
                        }
                        for r in self.rois_ras
                    ],
                }
            ),
            "Slices": format_slices(self.slices),
            "SlicesFormat": SLICES_FORMAT,
        }
        if self.window is not None:
            meta["Window"] = f"{self.window[0]!r} {self.window[1]!r}"
        if self.window_method:
            meta["WindowMethod"] = self.window_method
        if self.precision:
            meta["Precision"] = self.precision
        if self.refined:
            meta["Refined"] = " ".join(map(str, self.refined))
        if earlier:
            meta["Earlier"] = json.dumps([p.to_metadata() for p in earlier])
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> Provenance:
        """The run described by the flat fields of :meth:`to_metadata` (ValueError when malformed)."""
        try:
            prompts = json.loads(meta["Prompts"])
            window = meta.get("Window")
            return cls(
                model=meta["Model"],
                model_sha256=meta["ModelSHA256"],
                axis=meta["Axis"],
                propagate=meta["Propagate"],
                segment=meta.get("Segment", ""),
                points_ras=tuple(
                    PointRecord(_triple(p["position"]), int(p["label"]))
                    for p in prompts.get("points_ras", [])
                ),
                rois_ras=tuple(
                    RoiRecord(
                        _triple(r["center"]), _triple(r["size"]), tuple(_triple(row) for row in r["axes"])
                    )
                    for r in prompts.get("rois_ras", [])
                ),
                slices=parse_slices(meta.get("Slices", "")),
                window=_pair(window.split()) if window else None,
                precision=meta.get("Precision", ""),
                window_method=meta.get("WindowMethod", ""),
                refined=tuple(int(i) for i in meta.get("Refined", "").split()),
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed SAM-Med2D provenance in the file header: {exc!r}") from exc

    # -- DICOM-SEG AlgorithmParameters (LPS, within LT's 10240 characters) ----------------------------

    def to_algorithm_parameters(self, limit: int = MAX_LT_LENGTH) -> dict[str, str]:
        """Parameters for the SEG's Algorithm Identification, prompts converted to LPS. Values are escaped
        so highdicom's ``key=value,key=value`` text stays parseable. When everything does not fit in
        ``limit`` characters, slice entries are dropped from the end first, then points, then ROIs, and a
        ``truncated`` entry says how many of each were kept (the .seg.nrrd keeps them all)."""
        points = [
            ("+" if p.label == 1 else "-") + " " + " ".join(_num(v) for v in _to_lps(p.position))
            for p in self.points_ras
        ]
        rois = [
            " ".join(
                _num(v) for v in (*_to_lps(r.center), *r.size, *(_LPS_FLIP @ np.asarray(r.axes)).ravel())
            )
            for r in self.rois_ras
        ]
        slices = [_slice_entry(s) for s in self.slices]
        base = {
            "checkpoint_sha256": self.model_sha256,
            "model": self.model,
            "segment": self.segment,
            "axis": self.axis,
            "propagate": self.propagate,
            "frame": "LPS mm",
        }
        if self.window is not None:
            base["window_low_high"] = f"{_num(self.window[0])} {_num(self.window[1])}"
        if self.window_method:
            base["window_method"] = self.window_method
        if self.precision:
            base["precision"] = self.precision
        if self.refined:
            base["refined_slices"] = " ".join(map(str, self.refined))

        def build(n_points: int, n_rois: int, n_slices: int) -> dict[str, str]:
            params = dict(base)
            params["points_lps"] = ";".join(points[:n_points])
            params["rois_lps_center_size_axes"] = ";".join(rois[:n_rois])
            params["slices"] = ";".join(slices[:n_slices])
            params["slice_status"] = "P prompted A propagated R rejected"
            kept = (n_points, n_rois, n_slices) != (len(points), len(rois), len(slices))
            if kept:
                params["truncated"] = (
                    f"kept points {n_points}/{len(points)} rois {n_rois}/{len(rois)} "
                    f"slices {n_slices}/{len(slices)}; the .seg.nrrd holds all {TRUNCATED}"
                )
            return params

        counts = [len(points), len(rois), len(slices)]
        for position in (2, 0, 1):  # shorten the slice list first, then the points, then the ROIs
            if parameters_length(build(*counts)) <= limit:
                break
            counts[position] = _largest_fitting(
                lambda n, p=position: parameters_length(build(*counts[:p], n, *counts[p + 1 :])),
                counts[position],
                limit,
            )
        params = build(*counts)
        if parameters_length(params) > limit:
            raise ValueError(f"provenance does not fit in {limit} characters even without prompts")
        return params

    @classmethod
    def from_algorithm_parameters(cls, params: Mapping[str, str]) -> Provenance | None:
        """The provenance :meth:`to_algorithm_parameters` wrote (prompts converted back to RAS), or None when
        the parameters hold only the checkpoint hash (a segment exported without provenance)."""
        if "model" not in params:
            return None
        try:
            points = []
            for entry in filter(None, params.get("points_lps", "").split(";")):
                sign, *xyz = entry.split()
                points.append(PointRecord(_to_lps(_triple(xyz)), 1 if sign == "+" else 0))
            rois = []
            for entry in filter(None, params.get("rois_lps_center_size_axes", "").split(";")):
                values = [float(v) for v in entry.split()]
                if len(values) != 15:
                    raise ValueError(f"ROI entry needs 15 numbers, got {len(values)}")
                axes = _LPS_FLIP @ np.asarray(values[6:]).reshape(3, 3)
                rois.append(RoiRecord(_to_lps(values[:3]), _triple(values[3:6]), tuple(map(_triple, axes))))
            window = params.get("window_low_high")
            return cls(
                model=params["model"],
                model_sha256=params.get("checkpoint_sha256", ""),
                axis=params.get("axis", ""),
                propagate=params.get("propagate", ""),
                segment=params.get("segment", ""),
                points_ras=tuple(points),
                rois_ras=tuple(rois),
                slices=parse_slices(params.get("slices", "")),
                window=_pair(window.split()) if window else None,
                truncated=params.get("truncated", ""),
                precision=params.get("precision", ""),
                window_method=params.get("window_method", ""),
                refined=tuple(int(i) for i in params.get("refined_slices", "").split()),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed SAM-Med2D AlgorithmParameters: {exc}") from exc

    def summary(self) -> str:
        """One short line (for ContentDescription): axis, direction, prompt counts, slices, confidence."""
        accepted = [s.confidence for s in self.slices if s.status != "rejected"]
        confidence = f" conf {min(accepted):.2f}-{max(accepted):.2f}" if accepted else ""
        return (
            f"{self.axis} {self.propagate}; {len(self.points_ras)} pt {len(self.rois_ras)} ROI; "
            f"{len(accepted)} slices{confidence}"
        )


def build_provenance(
    points: Iterable,
    rois: Iterable,
    outcomes: Iterable,
    *,
    model: str,
    model_sha256: str,
    axis: str,
    propagate: str,
    segment: str = "",
    window: tuple[float, float] | None = None,
    precision: str = "",
    window_method: str = "",
    refined: Iterable[int] = (),
) -> Provenance:
    """Provenance of one run, from what the engine used and produced: ``points`` (``PointPrompt``: RAS
    ``position``, ``label``), ``rois`` (``RoiPrompt``: RAS ``center``, ``axes`` columns, ``size``) and the
    per-slice ``outcomes`` (``SliceOutcome``: ``index``, ``status``, ``confidence``, ``predicted_iou``, e.g.
    ``PropagationResult.slices.values()``). Needs no Slicer, so the module's Logic and the command line both
    call it; pass the result's :meth:`Provenance.to_metadata` to ``save_segmentation`` and the record itself
    to the DICOM-SEG export. ``refined``: the slices corrected from the segment's own mask."""
    return Provenance(
        model=str(model),
        model_sha256=str(model_sha256),
        axis=str(axis),
        propagate=str(propagate),
        segment=str(segment),
        points_ras=tuple(PointRecord(_triple(p.position), int(p.label)) for p in points),
        rois_ras=tuple(
            RoiRecord(
                _triple(r.center), _triple(r.size), tuple(map(_triple, np.asarray(r.axes, dtype=float)))
            )
            for r in rois
        ),
        slices=tuple(
            SliceRecord(
                int(o.index), str(o.status), round(float(o.confidence), 4), round(float(o.predicted_iou), 4)
            )
            for o in sorted(outcomes, key=lambda o: o.index)
        ),
        window=None if window is None else _pair(window),
        precision=str(precision),
        window_method=str(window_method),
        refined=tuple(sorted(int(i) for i in refined)),
    )


def provenance_history(meta: Mapping[str, str]) -> list[Provenance]:
    """Every run recorded in a .seg.nrrd header, oldest first (the last is the latest); empty when the file
    has no SAM-Med2D provenance. ValueError when it is there but malformed."""
    if "Model" not in meta:
        return []
    try:
        earlier = [Provenance.from_metadata(m) for m in json.loads(meta.get("Earlier", "[]"))]
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed SAM-Med2D provenance history in the file header: {exc!r}") from exc
    return [*earlier, Provenance.from_metadata(meta)]


def format_slices(slices: Iterable[SliceRecord]) -> str:
    """Compact per-slice list, e.g. ``10:P:0.9312:0.912;11:A:0.88:0.8671`` (see :data:`SLICES_FORMAT`)."""
    return ";".join(_slice_entry(s) for s in slices)


def parse_slices(text: str) -> tuple[SliceRecord, ...]:
    """Inverse of :func:`format_slices`."""
    records = []
    for entry in filter(None, text.split(";")):
        index, code, confidence, iou = entry.split(":")
        if code not in _STATUS_OF_CODE:
            raise ValueError(f"unknown slice status code {code!r} in {entry!r}")
        records.append(SliceRecord(int(index), _STATUS_OF_CODE[code], float(confidence), float(iou)))
    return tuple(records)


def parameters_length(params: Mapping[str, str]) -> int:
    """Length of AlgorithmParameters as highdicom writes ``params`` (``key=value`` joined by commas)."""
    return len(format_algorithm_parameters(params))


def format_algorithm_parameters(params: Mapping[str, str]) -> str:
    """``key=value,...`` with values escaped, as written into AlgorithmParameters."""
    return ",".join(f"{key}={_escape_parameter(value)}" for key, value in params.items())


def parse_algorithm_parameters(text: str) -> dict[str, str]:
    """Inverse of :func:`format_algorithm_parameters`; tolerant of other writers' free text (skipped)."""
    params = {}
    for item in str(text or "").split(","):
        key, sep, value = item.partition("=")
        if sep:
            params[key.strip()] = urllib.parse.unquote(value)
    return params


def _escape_parameter(value: str) -> str:
    # Percent-encode what would break the "key=value,key=value" text or LT's default (ASCII) repertoire.
    return urllib.parse.quote(str(value), safe=" !\"#$'()*+-./:;<>?@[]^_`{|}~")


def _slice_entry(s: SliceRecord) -> str:
    code = SLICE_STATUS_CODES.get(s.status)
    if code is None:
        raise ValueError(
            f"unknown slice status {s.status!r}; expected one of {', '.join(SLICE_STATUS_CODES)}"
        )
    return f"{s.index}:{code}:{_num(s.confidence)}:{_num(s.predicted_iou)}"


def _num(value: float) -> str:
    """Compact decimal with 0.1 µm / 1e-4 resolution (coordinates, confidences), no trailing zeros."""
    text = f"{float(value):.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _triple(values) -> tuple[float, float, float]:
    result = tuple(float(v) for v in values)
    if len(result) != 3:
        raise ValueError(f"expected 3 numbers, got {len(result)}")
    return result  # type: ignore[return-value]


def _pair(values) -> tuple[float, float]:
    low, high = (float(v) for v in values)
    return (low, high)


def _to_lps(xyz) -> tuple[float, float, float]:
    """RAS → LPS (and back: the flip is its own inverse)."""
    x, y, z = _triple(xyz)
    return (-x + 0.0, -y + 0.0, z)


def _largest_fitting(length_of, upper: int, limit: int) -> int:
    """Largest n in 0..upper with length_of(n) <= limit (lengths grow with n); 0 when none fits."""
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        if length_of(middle) <= limit:
            low = middle
        else:
            high = middle - 1
    return low


# --------------------------------------------------------------------------------------------- writing

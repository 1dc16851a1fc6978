"""The per-step scores of the CVPR 2025 interactive challenge and their area under the curve, as
`CVPR25_iter_eval.py` (JunMa11/CVPR-MedSegFMCompetition, commit 748e862d162e3e3ee8197bd4085b19bbbe0bb8a0)
computes them for one structure."""

from __future__ import annotations

import numpy as np

from ..clicks import dice
from .surface import surface_dice

#: NSD is computed only above this Dice; below it the step's NSD is 0 ("NSD is also low when dice is too
#: low", their comment).
NSD_MIN_DICE = 0.2
TOLERANCE_MM = 2.0


def step_scores(
    truth: np.ndarray, prediction: np.ndarray, spacing_mm: tuple[float, float, float]
) -> tuple[float, float]:
    """(DSC, NSD at 2 mm) of one step's 3-D mask. The truth is never empty here, so Dice is defined."""
    dsc = dice(prediction, truth)
    nsd = surface_dice(truth, prediction, spacing_mm, TOLERANCE_MM) if dsc > NSD_MIN_DICE else 0.0
    return dsc, nsd


def click_auc(per_step: list[float], clicks: int) -> float:
    """Trapezoid area, one unit per click, under the scores after the clicks only (the last `clicks`
    values): their `cumulative_trapezoid(scores[-n_clicks:], np.arange(n_clicks))[-1]`, which leaves the box
    step out because a box is optional there. With 5 clicks it lies in 0..4; with fewer than 2 clicks there
    is no area (0)."""
    if clicks < 2:
        return 0.0
    values = np.asarray(per_step[-clicks:], dtype=np.float64)
    return float(((values[1:] + values[:-1]) / 2).sum())

"""The CVPR 2025 interactive challenge's own definitions, to check ours against (test-only, SciPy).

From github.com/JunMa11/CVPR-MedSegFMCompetition, commit 748e862d162e3e3ee8197bd4085b19bbbe0bb8a0
(Apache-2.0): `compute_surface_distances`, `compute_surface_dice_at_tolerance` and
`compute_dice_coefficient` of `SurfaceDice.py` (after DeepMind's surface-distance); `compute_edt`,
`sample_coord` and the click loop of `CVPR25_iter_eval.py`; `mask2D_to_bbox` and `mask3D_to_bbox` of
`get_boxes.py`; their AUC line. Kept as written except: SciPy's current names (`scipy.ndimage.correlate`,
`distance_transform_edt`), `np.inf` for `np.Inf` (NumPy 2), `scipy.ndimage.label` with a full 3x3x3
structure for `cc3d.connected_components(..., connectivity=26)` (both number components in order of first
appearance in a raster scan), no GPU or downsampling branch, crops sliced with tuples, results returned
instead of stored. The surfel table is the same data as ours (`surfels.py`, checked value for value against
their file).
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage
from scipy import integrate

from SAMMed2DSegmentLib.evaluation.metrics.surfels import NEIGHBOUR_CODE_TO_NORMALS


def compute_surface_distances(mask_gt, mask_pred, spacing_mm):
    neighbour_code_to_surface_area = np.zeros([256])
    for code in range(256):
        normals = np.array(NEIGHBOUR_CODE_TO_NORMALS[code])
        sum_area = 0
        for normal_idx in range(normals.shape[0]):
            n = np.zeros([3])
            n[0] = normals[normal_idx, 0] * spacing_mm[1] * spacing_mm[2]
            n[1] = normals[normal_idx, 1] * spacing_mm[0] * spacing_mm[2]
            n[2] = normals[normal_idx, 2] * spacing_mm[0] * spacing_mm[1]
            sum_area += np.linalg.norm(n)
        neighbour_code_to_surface_area[code] = sum_area
    mask_all = mask_gt | mask_pred
    bbox_min = np.zeros(3, np.int64)
    bbox_max = np.zeros(3, np.int64)
    proj_0 = np.max(np.max(mask_all, axis=2), axis=1)
    idx_nonzero_0 = np.nonzero(proj_0)[0]
    if len(idx_nonzero_0) == 0:
        return {"distances_gt_to_pred": np.array([]), "distances_pred_to_gt": np.array([]),
                "surfel_areas_gt": np.array([]), "surfel_areas_pred": np.array([])}  # fmt: skip
    bbox_min[0] = np.min(idx_nonzero_0)
    bbox_max[0] = np.max(idx_nonzero_0)
    proj_1 = np.max(np.max(mask_all, axis=2), axis=0)
    idx_nonzero_1 = np.nonzero(proj_1)[0]
    bbox_min[1] = np.min(idx_nonzero_1)
    bbox_max[1] = np.max(idx_nonzero_1)
    proj_2 = np.max(np.max(mask_all, axis=1), axis=0)
    idx_nonzero_2 = np.nonzero(proj_2)[0]
    bbox_min[2] = np.min(idx_nonzero_2)
    bbox_max[2] = np.max(idx_nonzero_2)
    cropmask_gt = np.zeros((bbox_max - bbox_min) + 2, np.uint8)
    cropmask_pred = np.zeros((bbox_max - bbox_min) + 2, np.uint8)
    cropmask_gt[0:-1, 0:-1, 0:-1] = mask_gt[bbox_min[0] : bbox_max[0] + 1, bbox_min[1] : bbox_max[1] + 1,
                                            bbox_min[2] : bbox_max[2] + 1]  # fmt: skip
    cropmask_pred[0:-1, 0:-1, 0:-1] = mask_pred[bbox_min[0] : bbox_max[0] + 1, bbox_min[1] : bbox_max[1] + 1,
                                                bbox_min[2] : bbox_max[2] + 1]  # fmt: skip
    kernel = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])
    code_gt = scipy.ndimage.correlate(cropmask_gt.astype(np.uint8), kernel, mode="constant", cval=0)
    code_pred = scipy.ndimage.correlate(cropmask_pred.astype(np.uint8), kernel, mode="constant", cval=0)
    borders_gt = (code_gt != 0) & (code_gt != 255)
    borders_pred = (code_pred != 0) & (code_pred != 255)
    if borders_gt.any():
        distmap_gt = scipy.ndimage.distance_transform_edt(~borders_gt, sampling=spacing_mm)
    else:
        distmap_gt = np.inf * np.ones(borders_gt.shape)
    if borders_pred.any():
        distmap_pred = scipy.ndimage.distance_transform_edt(~borders_pred, sampling=spacing_mm)
    else:
        distmap_pred = np.inf * np.ones(borders_pred.shape)
    surface_area_map_gt = neighbour_code_to_surface_area[code_gt]
    surface_area_map_pred = neighbour_code_to_surface_area[code_pred]
    return {"distances_gt_to_pred": distmap_pred[borders_gt],
            "distances_pred_to_gt": distmap_gt[borders_pred],
            "surfel_areas_gt": surface_area_map_gt[borders_gt],
            "surfel_areas_pred": surface_area_map_pred[borders_pred]}  # fmt: skip


def compute_surface_dice_at_tolerance(surface_distances, tolerance_mm):
    distances_gt_to_pred = surface_distances["distances_gt_to_pred"]
    distances_pred_to_gt = surface_distances["distances_pred_to_gt"]
    surfel_areas_gt = surface_distances["surfel_areas_gt"]
    surfel_areas_pred = surface_distances["surfel_areas_pred"]
    overlap_gt = np.sum(surfel_areas_gt[distances_gt_to_pred <= tolerance_mm])
    overlap_pred = np.sum(surfel_areas_pred[distances_pred_to_gt <= tolerance_mm])
    return (overlap_gt + overlap_pred) / (np.sum(surfel_areas_gt) + np.sum(surfel_areas_pred))


def compute_dice_coefficient(mask_gt, mask_pred):
    volume_sum = mask_gt.sum() + mask_pred.sum()
    if volume_sum == 0:
        return np.nan
    volume_intersect = (mask_gt & mask_pred).sum()
    return 2 * volume_intersect / volume_sum


def auc(scores, n_clicks=5):
    return integrate.cumulative_trapezoid(np.array(scores[-n_clicks:]), np.arange(n_clicks))[-1]


def compute_edt(error_component):
    coords = np.argwhere(error_component)
    min_coords = coords.min(axis=0)
    max_coords = coords.max(axis=0) + 1
    crop_shape = max_coords - min_coords
    padding = np.maximum((crop_shape * 0.25).astype(int), 1)
    center_crop = np.zeros(crop_shape + 2 * padding, dtype=np.uint8)
    inner = tuple(slice(p, p + s) for p, s in zip(padding, crop_shape, strict=True))
    box = tuple(slice(a, b) for a, b in zip(min_coords, max_coords, strict=True))
    center_crop[inner] = error_component[box]
    edt = scipy.ndimage.distance_transform_edt(center_crop)
    dist_cropped = edt[inner]
    dist_full = np.zeros_like(error_component, dtype=dist_cropped.dtype)
    dist_full[box] = dist_cropped
    return dist_full


def sample_coord(edt):
    np.random.seed(42)
    max_val = edt.max()
    max_coords = np.argwhere(edt == max_val)
    chosen_index = max_coords[np.random.choice(len(max_coords))]
    return tuple(chosen_index)


def click(segs_cls, gts_cls):
    """Their click for one class: (center, "fg" | "bg"), or None when the prediction is exact."""
    error_mask = (segs_cls != gts_cls).astype(np.uint8)
    if np.sum(error_mask) == 0:
        return None
    errors, _ = scipy.ndimage.label(error_mask, structure=np.ones((3, 3, 3)))
    component_sizes = np.bincount(errors.flat)
    component_sizes[0] = 0
    largest_component = errors == np.argmax(component_sizes)
    edt = compute_edt(largest_component)
    edt *= largest_component
    if np.sum(edt) == 0:
        edt = largest_component
    center = sample_coord(edt)
    assert largest_component[center]
    return center, ("bg" if gts_cls[center] == 0 else "fg")


def mask3D_to_bbox(gt3D, seed=2025):
    """`mask3D_to_bbox` with `mask2D_to_bbox` inlined, its generator seeded as `get_boxes.py` seeds it."""
    np.random.seed(seed)
    z_indices, _, _ = np.where(gt3D > 0)
    z_indices = np.unique(z_indices)
    z_middle = z_indices[len(z_indices) // 2]
    gt2D = gt3D[z_middle]
    y_indices, x_indices = np.where(gt2D > 0)
    x_min, x_max = np.min(x_indices), np.max(x_indices)
    y_min, y_max = np.min(y_indices), np.max(y_indices)
    H, W = gt2D.shape
    bbox_shift = np.random.randint(0, 6, 1)[0]
    scale_y, scale_x = gt2D.shape
    bbox_shift_x = int(bbox_shift * scale_x / 256)
    bbox_shift_y = int(bbox_shift * scale_y / 256)
    x_min = max(0, x_min - bbox_shift_x)
    x_max = min(W - 1, x_max + bbox_shift_x)
    y_min = max(0, y_min - bbox_shift_y)
    y_max = min(H - 1, y_max + bbox_shift_y)
    return {"z_min": int(z_indices.min()), "z_max": int(z_indices.max()), "z_mid": int(z_middle),
            "z_mid_x_min": int(x_min), "z_mid_y_min": int(y_min), "z_mid_x_max": int(x_max),
            "z_mid_y_max": int(y_max)}  # fmt: skip

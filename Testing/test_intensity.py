"""Intensity → uint8 conversion: golden exactness, window rules, consistency, no side effects, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from SAMMed2DSegmentLib.engine.intensity import PRESETS, IntensityWindow, compute_window, to_uint8

DTYPES = [np.int16, np.uint16, np.int32, np.float32, np.float64]


def reference_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Independent restatement of the rule, element by element in Python floats (float64)."""
    flat = []
    for v in np.asarray(values, dtype=np.float64).ravel().tolist():
        if math.isnan(v):
            flat.append(0)
            continue
        c = min(max(v, low), high)
        flat.append(int(np.rint((c - low) / (high - low) * 255.0)))
    return np.array(flat, dtype=np.uint8).reshape(np.shape(values))


def ct_like_volume(shape=(12, 96, 96), seed=1, padding=True) -> np.ndarray:
    """Synthetic int16 CT: padding −2048 outside a circular FOV, air, a soft-tissue body, a bone core."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    yy, xx = np.mgrid[:y, :x]
    r = np.hypot(yy - (y - 1) / 2, xx - (x - 1) / 2)
    vol = np.empty(shape, dtype=np.float64)
    vol[:] = -1000 + rng.normal(0, 15, size=shape)  # air (big region)
    body = r < 0.3 * x
    vol[:, body] = 40 + rng.normal(0, 20, size=(z, int(body.sum())))  # soft tissue
    bone = r < 0.06 * x
    vol[:, bone] = 700 + rng.normal(0, 50, size=(z, int(bone.sum())))  # bone
    if padding:
        vol[:, r > 0.5 * x] = -2048  # outside the circular field of view
    return np.rint(vol).astype(np.int16)


# --- golden reference ---


def test_golden_ct_slice_is_reproduced_bit_exactly(golden):
    window = IntensityWindow.from_level_width(40, 400)
    assert (window.low, window.high) == (-160.0, 240.0)
    out = to_uint8(golden["img2_hu"], window)
    assert out.dtype == np.uint8 and out.shape == golden["img2_image"].shape
    np.testing.assert_array_equal(out, golden["img2_image"])
    # The same window as a named preset and through compute_window gives the same bytes.
    preset = IntensityWindow.from_preset("ct-soft-tissue")
    np.testing.assert_array_equal(to_uint8(golden["img2_hu"], preset), out)
    w2 = compute_window(golden["img2_hu"], "window", level=40, width=400)
    np.testing.assert_array_equal(to_uint8(golden["img2_hu"], w2), out)


def test_rounding_is_half_to_even_and_ends_are_exact():
    window = IntensityWindow(0.0, 255.0)  # identity scale: value v maps to rint(v)
    values = np.array([-3.0, 0.0, 0.5, 1.5, 2.5, 3.49, 254.5, 255.0, 300.0])
    np.testing.assert_array_equal(to_uint8(values, window), [0, 0, 0, 2, 2, 3, 254, 255, 255])
    w = IntensityWindow(-160.0, 240.0)
    np.testing.assert_array_equal(to_uint8(np.array([-160.0, 240.0, -1e9, 1e9]), w), [0, 255, 0, 255])


# --- windows and presets ---


def test_window_properties_and_presets():
    w = IntensityWindow.from_level_width(-600, 1500, method="lung")
    assert (w.low, w.high, w.level, w.width, w.method) == (-1350.0, 150.0, -600.0, 1500.0, "lung")
    assert PRESETS == {
        "ct-soft-tissue": (40.0, 400.0),
        "ct-lung": (-600.0, 1500.0),
        "ct-bone": (400.0, 1800.0),
        "ct-brain": (40.0, 80.0),
        "ct-liver": (60.0, 160.0),
    }
    vol = ct_like_volume()
    for name, (level, width) in PRESETS.items():
        w = compute_window(vol, name)
        assert (w.level, w.width) == (level, width)
        assert name in w.method and f"W{width:g}/L{level:g}" in w.method
        assert w == IntensityWindow.from_preset(name)
    w = compute_window(vol, "window", level=50, width=350)
    assert (w.low, w.high, w.method) == (-125.0, 225.0, "window W350/L50")


def test_window_is_frozen_and_coerced_to_float():
    w = IntensityWindow(np.int16(-5), np.float32(7.5))
    assert type(w.low) is float and type(w.high) is float and w.method == "user"
    with pytest.raises(AttributeError):
        w.low = 0.0  # type: ignore[misc]


# --- the auto rule on a CT-like volume ---


def test_auto_rule_ignores_padding_floor_and_uses_foreground_percentiles():
    vol = ct_like_volume()
    assert (vol == -2048).mean() > 0.15  # a big padding region, far more than 0.5 %
    w = compute_window(vol, modality="CT")  # small volume: exact, no sampling
    fg = vol[vol > vol.min()].astype(np.float64)
    assert (w.low, w.high) == tuple(np.percentile(fg, [0.5, 99.5]))
    assert -1100 < w.low < -950  # lower end is air, not the −2048 padding
    assert 500 < w.high < 900  # upper end is inside the bone intensities
    assert "auto" in w.method and "0.5–99.5" in w.method and "[CT]" in w.method
    assert "sampled" not in w.method
    # "percentile" keeps every voxel, so the padding sets the lower end.
    wp = compute_window(vol, "percentile")
    assert (wp.low, wp.high) == (-2048.0, float(np.percentile(vol.astype(np.float64), 99.5)))
    # The modality hint does not change the rule.
    assert (compute_window(vol, modality="MR").low, compute_window(vol).low) == (w.low, w.low)
    # Without padding the air itself is the lower end (its minimum is one noisy voxel, not a floor).
    w_np = compute_window(ct_like_volume(padding=False))
    assert -1100 < w_np.low < -950


def test_auto_on_zero_background_mr_like_volume():
    rng = np.random.default_rng(3)
    vol = np.zeros((10, 64, 64), dtype=np.uint16)
    vol[:, 16:48, 16:48] = rng.integers(200, 1200, size=(10, 32, 32))
    w = compute_window(vol, modality="mr")
    assert 200 <= w.low < 220 and 1180 < w.high <= 1200
    img = to_uint8(vol, w)
    assert img[vol == 0].max() == 0 and img.max() == 255


def test_explicit_percentiles_and_minmax():
    vol = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    w = compute_window(vol, "percentile", percentiles=(10, 90))
    assert (w.low, w.high) == tuple(float(v) for v in np.percentile(vol, [10, 90]))
    assert w.low == pytest.approx(99.9) and w.high == pytest.approx(899.1)
    assert "percentile 10–90" in w.method
    wm = compute_window(vol, "minmax")
    assert (wm.low, wm.high, wm.method) == (0.0, 999.0, "minmax")


# --- consistency, side effects, dtypes ---


def test_window_computed_on_volume_is_the_same_for_every_slice():
    vol = ct_like_volume().astype(np.float32)
    w = compute_window(vol)
    whole = to_uint8(vol, w)
    for k in range(vol.shape[0]):
        np.testing.assert_array_equal(to_uint8(vol[k], w), whole[k])
    # Other slicing directions (views, non-contiguous) too.
    np.testing.assert_array_equal(to_uint8(vol[:, 40, :], w), whole[:, 40, :])
    np.testing.assert_array_equal(to_uint8(vol[:, :, 7], w), whole[:, :, 7])


@pytest.mark.parametrize("method", ["auto", "percentile", "minmax", "window", "ct-bone"])
def test_inputs_are_never_modified(method):
    base = ct_like_volume().astype(np.float32)
    base[0, 0, :5] = np.nan
    base[1, 1, :2] = [np.inf, -np.inf]
    for vol in (base.copy(), np.asfortranarray(base), base[:, ::2, ::3]):
        before = vol.copy()
        flags = vol.flags.c_contiguous, vol.flags.f_contiguous, vol.flags.writeable, vol.flags.owndata
        kwargs = {"level": 40, "width": 400} if method == "window" else {}
        w = compute_window(vol, method, max_samples=5000, **kwargs)  # exercises the sampling path too
        to_uint8(vol, w)
        to_uint8(vol[2], w)
        assert vol.dtype == np.float32
        after = vol.flags.c_contiguous, vol.flags.f_contiguous, vol.flags.writeable, vol.flags.owndata
        assert after == flags
        np.testing.assert_array_equal(vol, before)  # NaNs compare equal in this assertion


def test_read_only_input_works():
    vol = ct_like_volume()
    vol.setflags(write=False)
    w = compute_window(vol, max_samples=1000)
    assert to_uint8(vol, w).shape == vol.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(dtype):
    rng = np.random.default_rng(5)
    lo, hi = (0, 4000) if np.dtype(dtype).kind == "u" else (-1024, 3000)
    vol = rng.integers(lo, hi, size=(4, 33, 29)).astype(dtype)
    w = compute_window(vol)
    assert isinstance(w.low, float) and w.high > w.low
    out = to_uint8(vol, w)
    assert out.dtype == np.uint8 and out.shape == vol.shape
    np.testing.assert_array_equal(out, reference_uint8(vol, w.low, w.high))
    # The same logical values in another dtype give the same window and bytes.
    as_f64 = vol.astype(np.float64)
    assert compute_window(as_f64) == w
    np.testing.assert_array_equal(to_uint8(as_f64, w), out)


def test_scalar_and_empty_values():
    w = IntensityWindow(0.0, 10.0)
    assert to_uint8(np.array(5.0, dtype=np.float32), w)[()] == 128  # 127.5 rounds to even
    assert to_uint8(np.zeros((0, 5)), w).shape == (0, 5)


# --- NaN handling ---


@pytest.mark.filterwarnings("error")  # casting NaN to uint8 warns and is platform-dependent
def test_nans_are_ignored_for_statistics_and_map_to_zero():
    vol = ct_like_volume().astype(np.float64)
    rng = np.random.default_rng(7)
    holes = rng.random(vol.shape) < 0.1
    with_nan = vol.copy()
    with_nan[holes] = np.nan
    finite = vol[~holes]
    for method, kept in (("auto", finite[finite > finite.min()]), ("percentile", finite)):
        w = compute_window(with_nan, method)
        assert (w.low, w.high) == tuple(np.percentile(kept, [0.5, 99.5]))
    assert compute_window(with_nan, "minmax") == IntensityWindow(finite.min(), finite.max(), "minmax")
    out = to_uint8(with_nan, compute_window(with_nan))
    assert (out[holes] == 0).all()
    w = IntensityWindow(0.0, 1.0)
    np.testing.assert_array_equal(to_uint8(np.array([np.nan, -np.inf, np.inf, 0.5]), w), [0, 0, 255, 128])
    # Infinite values are left out of the statistics as well.
    inf_vol = np.array([np.inf, -np.inf, 1.0, 2.0, 3.0])
    assert compute_window(inf_vol, "minmax") == IntensityWindow(1.0, 3.0, "minmax")


# --- degenerate data and bad input ---


def test_degenerate_computed_windows_fall_back():
    for dtype in (np.int16, np.float32):
        const = np.full((3, 8, 8), 7, dtype=dtype)
        for method in ("auto", "percentile", "minmax"):
            w = compute_window(const, method)
            assert (w.low, w.high) == (6.5, 7.5) and "constant" in w.method
            assert (to_uint8(const, w) == 128).all()  # 127.5 → 128 (half to even)
    # Nearly constant: percentiles coincide, the window falls back to min–max of the same voxels.
    vol = np.zeros(10_000, dtype=np.float32)
    vol[:5] = 100.0
    w = compute_window(vol, "percentile")
    assert (w.low, w.high) == (0.0, 100.0) and "fell back" in w.method
    # auto with a single voxel above the floor: floor → 0, that voxel → 255.
    vol = np.zeros((4, 4), dtype=np.int16)
    vol[1, 2] = 50
    w = compute_window(vol)
    assert (w.low, w.high) == (0.0, 50.0)
    # A handful of finite voxels among NaNs still define the window, even when sampling misses them.
    sparse = np.full(100_000, np.nan)
    sparse[[3, 50_000]] = [1.0, 5.0]
    assert compute_window(sparse, "minmax") == IntensityWindow(1.0, 5.0, "minmax")
    w = compute_window(sparse, "percentile", percentiles=(0, 100), max_samples=10)
    assert (w.low, w.high) == (1.0, 5.0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: IntensityWindow(1.0, 1.0), "high > low"),
        (lambda: IntensityWindow(2.0, 1.0), "high > low"),
        (lambda: IntensityWindow(float("nan"), 1.0), "low must be finite"),
        (lambda: IntensityWindow(0.0, float("inf")), "high must be finite"),
        (lambda: IntensityWindow("0", 1.0), "low must be a real number"),
        (lambda: IntensityWindow.from_level_width(40, 0), "width must be > 0"),
        (lambda: IntensityWindow.from_level_width(40, -400), "width must be > 0"),
        (lambda: IntensityWindow.from_level_width(float("inf"), 400), "level must be finite"),
        (lambda: IntensityWindow.from_level_width(40, float("inf")), "width must be finite"),
        (lambda: IntensityWindow.from_level_width(40, float("nan")), "width must be finite"),
        (lambda: IntensityWindow.from_preset("ct-abdomen-x"), "unknown window preset"),
    ],
)
def test_bad_windows_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


VOL = np.arange(24, dtype=np.int16).reshape(2, 3, 4)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((VOL, "bogus"), {}, "unknown intensity method 'bogus'"),
        ((VOL, "window"), {"level": 40}, "needs both level and width"),
        ((VOL, "window"), {"level": 40, "width": 0}, "width must be > 0"),
        ((VOL, "window"), {"level": float("inf"), "width": 400}, "level must be finite"),
        ((VOL, "window"), {"level": 40, "width": float("inf")}, "width must be finite"),
        ((VOL, "auto"), {"level": 40, "width": 400}, "only apply to method='window'"),
        ((VOL,), {"percentiles": (99.5, 0.5)}, "0 <= low < high <= 100"),
        ((VOL,), {"percentiles": (-1, 50)}, "0 <= low < high <= 100"),
        ((VOL,), {"percentiles": (50, 101)}, "0 <= low < high <= 100"),
        ((VOL,), {"percentiles": (0.5,)}, "must be a pair"),
        ((VOL,), {"max_samples": 0}, "max_samples must be a positive integer"),
        ((VOL,), {"seed": 1.5}, "seed must be an integer"),
        ((VOL,), {"modality": "XR"}, "modality must be one of CT, MR, PT"),
        ((VOL.tolist(),), {}, "volume must be a numpy array"),
        ((np.zeros((0, 4)),), {}, "volume is empty"),
        ((VOL > 3,), {}, "integer or floating-point"),
        ((VOL.astype(np.complex64),), {}, "integer or floating-point"),
        ((np.full((3, 3), np.nan),), {}, "no finite values"),
        ((np.full((3, 3), np.nan), "minmax"), {}, "no finite values"),
    ],
)
def test_bad_compute_window_input_raises(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_window(*args, **kwargs)


def test_bad_to_uint8_input_raises():
    w = IntensityWindow(0.0, 1.0)
    with pytest.raises(ValueError, match="window must be an IntensityWindow"):
        to_uint8(VOL, (0.0, 1.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="values must be a numpy array"):
        to_uint8([1, 2, 3], w)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integer or floating-point"):
        to_uint8(VOL > 3, w)


# --- subsampling ---


def test_subsampling_is_deterministic_and_close_to_exact_percentiles():
    rng = np.random.default_rng(11)
    vol = rng.gamma(2.0, 300.0, size=(30, 100, 100)).astype(np.float32) - 1000  # 300 000 voxels, skewed
    m = 20_000
    w1 = compute_window(vol, "percentile", max_samples=m, seed=4)
    w2 = compute_window(vol, "percentile", max_samples=m, seed=4)
    assert w1 == w2 and f"{m} sampled of {vol.size}" in w1.method
    # Layout does not change the sample: a Fortran-ordered copy gives the same window.
    assert compute_window(np.asfortranarray(vol), "percentile", max_samples=m, seed=4) == w1
    assert compute_window(vol, "percentile", max_samples=m, seed=5) != w1
    # Tolerance: the sample p-quantile of m draws has a rank error with standard deviation sqrt(p(1-p)/m)
    # (in probability units), whatever the distribution. At 5 sigma it lies between the exact quantiles at
    # p ± 5·sqrt(p(1-p)/m) except with probability < 1e-6. We check that rank bound, not an HU tolerance.
    exact = vol.astype(np.float64)
    for seed in range(5):
        w = compute_window(vol, "percentile", max_samples=m, seed=seed)
        for p, est in ((0.005, w.low), (0.995, w.high)):
            d = 5 * math.sqrt(p * (1 - p) / m)
            lo, hi = np.quantile(exact, [max(0.0, p - d), min(1.0, p + d)])
            assert lo <= est <= hi, (seed, p, est, lo, hi)
    # A sample at least as large as the volume is the exact computation.
    assert compute_window(vol, "percentile", max_samples=vol.size) == compute_window(vol, "percentile")
    exact_w = compute_window(vol, "percentile", max_samples=vol.size)
    assert (exact_w.low, exact_w.high) == tuple(np.percentile(exact, [0.5, 99.5]))


def test_the_sa_med2d_20m_rule_gives_the_exact_expected_grey_levels():
    """0.5th/99.5th percentiles of every voxel, padding included, then linear to 0..255: on 1000 voxels the
    percentiles fall at ranks 4.995 and 994.005, inside the 10 padding and the 10 metal voxels, so the
    window is exactly −3024..3000 and the grey levels follow by hand: (HU + 3024) / 6024 · 255, rounded."""
    from SAMMed2DSegmentLib.engine.intensity import SA_MED2D_20M

    values = np.concatenate([np.full(10, -3024), np.linspace(-1000, 1000, 980), np.full(10, 3000)])
    vol = np.random.default_rng(0).permutation(values).astype(np.int16).reshape(10, 10, 10)
    w = compute_window(vol, SA_MED2D_20M)
    assert (w.low, w.high) == (-3024.0, 3000.0)
    assert w.method.startswith("SA-Med2D-20M rule")
    probe = np.array([-3024, -1000, 0, 1000, 3000], dtype=np.int16)
    assert to_uint8(probe, w).tolist() == [0, 86, 128, 170, 255]
    # Leaving the padding out ("auto") would map air to 0 instead: the rule is not that variant.
    assert to_uint8(probe, compute_window(vol, "auto"))[1] == 0
    # The percentiles are the rule's own, whatever `percentiles` says.
    assert compute_window(vol, SA_MED2D_20M, percentiles=(10, 90)) == w


def test_default_window_is_the_models_rule_for_every_modality():
    from SAMMed2DSegmentLib.engine.intensity import SA_MED2D_20M, default_window

    rng = np.random.default_rng(1)
    ct = np.full((4, 40, 40), -1000, np.int16)
    ct[:, 10:30, 10:30] = rng.normal(40, 20, (4, 20, 20)).astype(np.int16)
    mr = (rng.random((4, 40, 40)) * 900).astype(np.uint16)
    assert default_window(ct) == compute_window(ct, SA_MED2D_20M)
    assert default_window(ct, "CT") == compute_window(ct, SA_MED2D_20M, modality="CT")
    assert default_window(mr) == compute_window(mr, SA_MED2D_20M)
    # Another rule named by a model is honoured.
    assert default_window(mr, None, "auto") == compute_window(mr, "auto")


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.float32])
def test_the_rule_is_exact_and_ignores_voxel_order(dtype):
    """The rule's window is np.percentile over every finite voxel, with no sampling, even on volumes far
    above ``max_samples``: the same scan stored flipped or with its axes permuted gets the same window."""
    from SAMMed2DSegmentLib.engine.intensity import SA_MED2D_20M

    rng = np.random.default_rng(7)
    vol = rng.integers(0 if dtype == np.uint16 else -2048, 3000, size=(30, 300, 300)).astype(dtype)
    if dtype == np.float32:
        vol += rng.random(vol.shape, dtype=np.float32)
        vol[0, 0, :5] = np.nan
    w = compute_window(vol, SA_MED2D_20M, max_samples=1000)
    finite = vol[np.isfinite(vol)]
    np.testing.assert_allclose((w.low, w.high), np.percentile(finite, [0.5, 99.5]), rtol=0, atol=1e-9)
    assert "sampled" not in w.method
    for other in (vol[::-1, :, ::-1], np.transpose(vol, (2, 0, 1)), np.asfortranarray(vol)):
        assert compute_window(other, SA_MED2D_20M, max_samples=1000) == w

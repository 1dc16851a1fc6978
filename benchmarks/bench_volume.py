"""Volume-engine benchmark: clicks, propagation overhead, peak memory (not a test: it prints figures,
asserts nothing).

    .venv/bin/python benchmarks/bench_volume.py [--quick] [--slices 300] [--clicks 30] [--runs 2]
                                                [--skip-memory] [--profile] [--threads N]

Everything runs the `vit_b` build with the deterministic synthetic weights (random weights give random masks:
this measures cost, not quality) on the bundled 512×512×20 DICOM CT, and prints, measured in one run:

1. click-to-mask on a slice whose embedding is cached: a PointPrompt in world RAS → `prompts_by_slice` →
   cached embedding (`EmbeddingCache` + `set_embedding`) → `SamMed2DPredictor.predict` → the mask written
   into a segment of a real MRML segmentation node (`write_segment_slices`); median and p90 over clicks at
   different points with the split mapping / decoder+upsampling / write, and the same click through
   `run_session(direction="none")` (the engine's path, which adds `components_touching`), interleaved;
2. propagation overhead over all 20 slices from one include point on the central slice with permissive
   stopping rules: total time, slices visited, standalone `model.image_encoder` seconds per slice measured in
   the same run (one call after every propagated slice, its time taken out of the total), overhead =
   total / (visited × encoder) − 1, the engine's own encode/decode split, and (when the overhead exceeds
   10 %, or with --profile) a cProfile breakdown;
3. peak memory of an N-slice (default 300, --quick 40) 512×512 int16 volume (the real CT's slices mirrored
   back and forth) propagated from its central slice, each scenario in a fresh subprocess: peak RSS (VmHWM)
   while loading and while propagating, the model's weight bytes, the embedding cache's peak bytes, with the
   default 1 GB cache bound and with a 16 MiB one. (ru_maxrss is printed too but not used: Linux carries it
   across exec, so a child's ru_maxrss is at least the parent's RSS when it was spawned.)

Walks use `WalkEverySlice` (predicted IoU clipped at 0, see there) so that every slice is visited.

The machine's load average is printed next to each part: other processes move the timings by tens of
percent (and far more on a 2-core machine, where a busy core stalls every parallel region).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "SAMMed2DSegment"))

from SAMMed2DSegmentLib.engine import masks as mask_ops  # noqa: E402
from SAMMed2DSegmentLib.engine import preprocessing, segmenter  # noqa: E402
from SAMMed2DSegmentLib.engine.embedding_cache import DEFAULT_MAX_BYTES, EmbeddingCache  # noqa: E402
from SAMMed2DSegmentLib.engine.geometry import SliceGeometry  # noqa: E402
from SAMMed2DSegmentLib.engine.intensity import default_window, to_uint8  # noqa: E402
from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor  # noqa: E402
from SAMMed2DSegmentLib.engine.prompts import INCLUDE, PointPrompt, prompts_by_slice  # noqa: E402
from SAMMed2DSegmentLib.engine.propagation import PropagationEngine, PropagationSettings  # noqa: E402
from SAMMed2DSegmentLib.engine.session import SegmentationSession  # noqa: E402
from SAMMed2DSegmentLib.formats.volumes import read_volume  # noqa: E402
from SAMMed2DSegmentLib.model import build_sam_med2d  # noqa: E402
from SAMMed2DSegmentLib.model.image_encoder import ImageEncoderViT  # noqa: E402
from Testing.synthetic_weights import synthetic_state_dict  # noqa: E402

CT = ROOT / "Testing" / "Data" / "totalseg-example-ct" / "ct"
BUILD = "vit_b"
MIB = 1 << 20
SMALL_CACHE = 16 * MIB
CHILD_TAG = "BENCH_VOLUME_CHILD "

# Walk every slice: random weights give random masks, so only an empty mask may stop a walk.
PERMISSIVE = PropagationSettings(
    iou_threshold=0.0, min_area_mm2=0.0, area_shrink=1e-9, area_growth=1e12, centroid_jump=1e12
)


class WalkEverySlice(SamMed2DPredictor):
    """The predictor with its predicted IoU clipped at 0. With random weights the IoU head also predicts
    negative values, which even `iou_threshold=0` rejects (thresholds are limited to 0..1), so a walk would
    stop at a random slice; one `np.maximum` on a 1-element array costs nothing measurable."""

    def predict(self, *args, **kwargs):
        masks, iou, low_res = super().predict(*args, **kwargs)
        return masks, np.maximum(iou, 0.0), low_res


# -- helpers -------------------------------------------------------------------------------------------


def run_session(predictor, volume_kji, ijk_to_ras, window, points, direction="both", settings=None,
                cache=None, progress=None, key="bench"):  # fmt: skip
    """The session path, as the command line and the engine process run it, with a given embedding cache;
    returns what `session.last` holds (geometry, seeds, result)."""
    session = SegmentationSession(predictor)
    if cache is not None:
        session.cache = cache
    session.set_volume(volume_kji, ijk_to_ras, window=window, key=key)
    for outcome in session.propagate(points, (), "axial", direction, settings):
        if progress is not None:
            progress(len(session.last.result.slices), outcome)
    return session.last


def build_model() -> torch.nn.Module:
    model = build_sam_med2d(BUILD)
    state = synthetic_state_dict(BUILD)
    model.load_state_dict(state, strict=True)
    del state
    gc.collect()
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.element_size() * t.nelement() for t in tensors)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) / {five:.2f} (5 min)"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def p90(values: list[float]) -> float:
    return float(np.percentile(values, 90))


def proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so that RSS counts live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset VmHWM (and ru_maxrss) to the current RSS (Linux ≥ 4.0: `echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def body_points(image_hu: np.ndarray, count: int, rng: np.random.Generator, margin: int = 16) -> np.ndarray:
    """`count` (x, y) pixels inside the body (> −300 HU), away from the image border."""
    body = image_hu > -300
    body[:margin] = body[-margin:] = False
    body[:, :margin] = body[:, -margin:] = False
    ys, xs = np.nonzero(body)
    pick = rng.choice(len(xs), size=count, replace=False)
    return np.stack([xs[pick], ys[pick]], axis=1)


def encoder_inputs(predictor, volume_kji, geometry, window, indices) -> list[torch.Tensor]:
    return [
        predictor.preprocess(to_uint8(geometry.view(volume_kji, i), window)).to(
            predictor.device, predictor.dtype
        )
        for i in indices
    ]


def encoder_times(model, inputs: list[torch.Tensor]) -> list[float]:
    times = []
    with torch.inference_mode():
        for x in inputs:
            start = time.perf_counter()
            model.image_encoder(x)
            times.append(time.perf_counter() - start)
    return times


# -- 1. clicks -------------------------------------------------------------------------------------------


def bench_clicks(model, ct, window, n_clicks: int, big_slices: int) -> dict:
    from SAMMed2DSegmentLib.mrml import scene, segmentations, volumes

    print(f"\n[1] click-to-mask on cached slices ({load()})")
    volume_kji, ijk_to_ras = ct.array_kji, ct.ijk_to_ras
    geometry = SliceGeometry.create(volume_kji.shape, ijk_to_ras, "axial")
    predictor = SamMed2DPredictor(model)
    hs = scene.create_headless_scene()
    volume_node = volumes.add_volume_from_array(hs, volume_kji, ijk_to_ras, "ct")
    seg_node = segmentations.ensure_segmentation(hs, volume_node)
    segment_id = segmentations.ensure_segment(seg_node, "clicked")

    # The embeddings of three central slices, cached under the key run_session uses (so both paths hit).
    middle = geometry.num_slices // 2
    cached = [middle - 2, middle, middle + 2]
    cache = EmbeddingCache()
    cache_key = ("bench", geometry.axis, window.low, window.high)  # the key run_session's engine uses
    for index in cached:
        predictor.set_image(to_uint8(geometry.view(volume_kji, index), window))
        cache.put((cache_key, index), predictor.get_image_embedding())

    rng = np.random.default_rng(0)
    warmup = 3
    clicks = []  # (slice, x, y) display pixels
    per_slice = -(-(n_clicks + warmup) // len(cached))
    for index in cached:
        clicks += [(index, x, y) for x, y in body_points(geometry.view(volume_kji, index), per_slice, rng)]
    rng.shuffle(clicks)
    clicks = clicks[: n_clicks + warmup]
    points_ras = geometry.continuous_to_ras(np.array(clicks, dtype=np.float64))

    def direct(position) -> tuple[float, float, float, float, int]:
        t0 = time.perf_counter()
        prompts = prompts_by_slice(geometry, [PointPrompt(tuple(position), INCLUDE)])
        ((index, prompt),) = prompts.items()
        t1 = time.perf_counter()
        embedding = cache.get((cache_key, index))
        predictor.set_embedding(embedding, geometry.slice_shape)
        t2 = time.perf_counter()
        masks, _, _ = predictor.predict(**prompt.predictor_kwargs())
        t3 = time.perf_counter()
        segmentations.write_segment_slices(seg_node, segment_id, volume_node, geometry, {index: masks[0]})
        t4 = time.perf_counter()
        # Not part of this path: what keep_connected costs the engine path on the same mask.
        mask_ops.components_touching(masks[0], prompt.points)
        t5 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3, int(masks[0].sum()), t5 - t4

    def decode_one_thread(position) -> float:
        ((index, prompt),) = prompts_by_slice(geometry, [PointPrompt(tuple(position), INCLUDE)]).items()
        predictor.set_embedding(cache.get((cache_key, index)), geometry.slice_shape)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            start = time.perf_counter()
            predictor.predict(**prompt.predictor_kwargs())
            return time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)

    def engine(position) -> tuple[float, float]:
        t0 = time.perf_counter()
        seg = run_session(
            predictor,
            volume_kji,
            ijk_to_ras,
            window,
            [PointPrompt(tuple(position), INCLUDE)],
            direction="none",
            settings=PERMISSIVE,
            cache=cache,
        )
        t1 = time.perf_counter()
        segmentations.write_segment_slices(seg_node, segment_id, volume_node, geometry, seg.result.masks())
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    hits_before = cache.hits
    direct_rows, engine_rows, one_thread = [], [], []
    for n, position in enumerate(points_ras):
        # Alternate the order, so that drifting load hits every variant alike.
        if n % 2:
            e = engine(position)
            d = direct(position)
            o = decode_one_thread(position)
        else:
            o = decode_one_thread(position)
            d = direct(position)
            e = engine(position)
        if n >= warmup:
            direct_rows.append(d)
            engine_rows.append(e)
            one_thread.append(o)
    mapping = [r[0] for r in direct_rows]
    embed = [r[1] for r in direct_rows]
    decode = [r[2] for r in direct_rows]
    write = [r[3] for r in direct_rows]
    total = [sum(r[:4]) for r in direct_rows]
    areas = [r[4] for r in direct_rows]
    connected = [r[5] for r in direct_rows]
    eng_total = [a + b for a, b in engine_rows]
    eng_segment = [a for a, _ in engine_rows]

    print(
        f"    {len(total)} clicks (after {warmup} warm-up) at different body points on slices {cached}, "
        f"mask areas {min(areas)}..{max(areas)} px; engine-path cache hits {cache.hits - hits_before} of "
        f"{len(points_ras)} clicks"
    )
    print(f"    direct path: median {ms(statistics.median(total))}, p90 {ms(p90(total))}  (target ≤ 50 ms)")
    print(
        f"      split (medians): prompt mapping {ms(statistics.median(mapping))} "
        f"+ cache lookup/set_embedding {ms(statistics.median(embed))} "
        f"| decoder+upsampling {ms(statistics.median(decode))} (p90 {ms(p90(decode))}) "
        f"| segment write {ms(statistics.median(write))} (p90 {ms(p90(write))})"
    )
    print(
        f"    decoder+upsampling with torch at 1 thread (same clicks, interleaved): median "
        f"{ms(statistics.median(one_thread))}, p90 {ms(p90(one_thread))} "
        f"vs {torch.get_num_threads()} threads {ms(statistics.median(decode))}, p90 {ms(p90(decode))}"
    )
    print(
        "    engine path (session, direction='none' + write): "
        f"median {ms(statistics.median(eng_total))}, p90 {ms(p90(eng_total))}; session alone median "
        f"{ms(statistics.median(eng_segment))}, p90 {ms(p90(eng_segment))}"
    )
    print(
        f"      of which components_touching (keep_connected) on the click's mask: median "
        f"{ms(statistics.median(connected))}, p90 {ms(p90(connected))}, max {ms(max(connected))}"
    )

    # The write rewrites the segment on the whole voxel grid: its cost grows with the volume.
    big_write = None
    if big_slices > geometry.num_slices:
        big = tiled_volume(volume_kji, big_slices)
        big_geometry = SliceGeometry.create(big.shape, ijk_to_ras, "axial")
        big_node = volumes.add_volume_from_array(hs, big, ijk_to_ras, "big")
        big_seg = segmentations.ensure_segmentation(hs, big_node)
        big_id = segmentations.ensure_segment(big_seg, "clicked")
        mask = np.zeros(big_geometry.slice_shape, bool)
        mask[200:300, 200:300] = True
        times = []
        for n in range(6):
            start = time.perf_counter()
            segmentations.write_segment_slices(
                big_seg, big_id, big_node, big_geometry, {big_slices // 2 + n: mask}
            )
            times.append(time.perf_counter() - start)
        big_write = statistics.median(times[1:])
        print(
            f"    segment write of one slice into a {big_slices}-slice 512×512 volume: "
            f"median {ms(big_write)} over {len(times) - 1} writes"
        )
        del big
        hs.scene.RemoveNode(big_seg)
        hs.scene.RemoveNode(big_node)
    print(f"    ({load()})")
    return {
        "median": statistics.median(total),
        "p90": p90(total),
        "mapping": statistics.median(mapping) + statistics.median(embed),
        "decode": statistics.median(decode),
        "write": statistics.median(write),
        "decode_1t": statistics.median(one_thread),
        "engine_median": statistics.median(eng_total),
        "engine_p90": p90(eng_total),
        "big_write": big_write,
        "big_slices": big_slices,
    }


# -- 2. propagation overhead ---------------------------------------------------------------------------


def seed_point(geometry: SliceGeometry, index: int) -> PointPrompt:
    rows, cols = geometry.slice_shape
    ras = geometry.continuous_to_ras(np.array([[index, cols // 2, rows // 2]], dtype=np.float64))[0]
    return PointPrompt(tuple(float(c) for c in ras), INCLUDE, "seed")


def profile_categories() -> list[tuple[str, object]]:
    """(label, code object) whose cumulative time the profile reports, in pipeline order."""
    return [
        ("slice windowing (to_uint8 of one slice)", segmenter.to_uint8.__code__),
        ("preprocess: gray→RGB (as_rgb_uint8)", preprocessing.as_rgb_uint8.__code__),
        ("preprocess: normalise+resize (model_input)", preprocessing.model_input.__code__),
        ("image encoder (ImageEncoderViT.forward)", ImageEncoderViT.forward.__code__),
        ("prompt encoder + mask decoder (decode)", SamMed2DPredictor.decode.__code__),
        ("upsampling 64→256→H×W (postprocess_masks)", SamMed2DPredictor.postprocess_masks.__code__),
        ("predict total (decode+upsample+select+threshold)", SamMed2DPredictor.predict.__code__),
        ("components_touching (keep_connected)", mask_ops.components_touching.__code__),
        ("derive_prompt (bounding box + interior point)", PropagationEngine.derive_prompt.__code__),
        ("  of which interior_point", mask_ops.interior_point.__code__),
        ("stopping rules (_rejection: sums, centroids)", PropagationEngine._rejection.__code__),
        ("engine encode step (_encode: window+preprocess+encoder)", PropagationEngine._encode.__code__),
        ("engine prepare (cache lookup + _encode)", PropagationEngine.prepare.__code__),
        ("engine segment (prepare + predict + components)", PropagationEngine.segment.__code__),
        ("engine run (everything)", PropagationEngine.run.__code__),
    ]


def profile_propagation(run, visited: int) -> None:
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    result = run()
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    table = stats.stats  # {(file, line, name): (primitive calls, calls, tottime, cumtime, callers)}
    print(
        f"    cProfile of one more propagation ({len(result.slices)} slices, "
        f"{wall:.2f} s under the profiler):"
    )
    print(f"      {'where':52s} {'calls':>6s} {'cum s':>8s} {'ms/slice':>9s} {'% total':>8s}")
    for label, code in profile_categories():
        key = (code.co_filename, code.co_firstlineno, code.co_name)
        _, calls, _, cum, _ = table.get(key, (0, 0, 0.0, 0.0, {}))
        print(f"      {label:52s} {calls:6d} {cum:8.3f} {cum / visited * 1e3:9.1f} {cum / wall:8.1%}")
    print("      top 12 functions by own time:")
    ranked = sorted(table.items(), key=lambda kv: kv[1][2], reverse=True)[:12]
    for (file, line, name), (_, calls, own, cum, _) in ranked:
        where = f"{Path(file).name}:{line}({name})" if line else name
        print(f"        {own:7.3f} s own  {cum:7.3f} s cum  {calls:7d} calls  {where[:90]}")


def bench_propagation(model, ct, window, reps: int, force_profile: bool) -> dict:
    print(f"\n[2] propagation overhead over the whole {ct.array_kji.shape[0]}-slice CT ({load()})")
    volume_kji, ijk_to_ras = ct.array_kji, ct.ijk_to_ras
    geometry = SliceGeometry.create(volume_kji.shape, ijk_to_ras, "axial")
    predictor = WalkEverySlice(model)
    middle = geometry.num_slices // 2
    seed = seed_point(geometry, middle)
    inputs = encoder_inputs(predictor, volume_kji, geometry, window, range(geometry.num_slices))
    encoder_times(model, inputs[:1])  # warm-up

    def run(progress=None):
        return run_session(
            predictor,
            volume_kji,
            ijk_to_ras,
            window,
            [seed],
            settings=PERMISSIVE,
            cache=EmbeddingCache(),
            progress=progress,
        ).result

    # The standalone encoder samples are interleaved slice by slice: the progress callback, called after
    # every finished slice, runs one bare encoder call on that slice's input; the callback's own time is
    # subtracted from the run's total. So both see the same load, whatever the neighbours do.
    enc, results, totals = [], [], []
    for _ in range(reps):
        spent = [0.0]

        def interleave(_n, outcome, spent=spent):
            start = time.perf_counter()
            enc.extend(encoder_times(model, [inputs[outcome.index]]))
            spent[0] += time.perf_counter() - start

        result = run(interleave)
        results.append(result)
        totals.append(result.total_seconds - spent[0])

    encoder = statistics.median(enc)
    visited = len(results[0].slices)
    overheads = [t / (len(r.slices) * encoder) - 1 for t, r in zip(totals, results, strict=True)]
    total = statistics.median(totals)
    overhead = total / (visited * encoder) - 1
    last = results[int(np.argsort(totals)[len(totals) // 2])]
    statuses = {}
    for outcome in last.slices.values():
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
    print(
        f"    seed: one include point at the centre of slice {middle}; slices visited {visited} of "
        f"{geometry.num_slices} ({', '.join(f'{v} {k}' for k, v in sorted(statuses.items()))}); "
        f"encoded {last.encoded_slices}"
    )
    walks = [f"step {w.step:+d} → slice {w.last_accepted}: {w.reason}" for w in last.walks]
    print(f"    walks: {'; '.join(walks)}")
    print(
        f"    standalone encoder (model.image_encoder, same slices): median {encoder:.3f} s/slice over "
        f"{len(enc)} calls interleaved slice by slice (min {min(enc):.3f}, max {max(enc):.3f})"
    )
    print(
        f"    propagation total: {', '.join(f'{t:.2f} s' for t in totals)} → median {total:.2f} s = "
        f"{total / visited:.3f} s/slice"
    )
    print(
        f"    overhead beyond the encoder: {overhead:+.1%} (per run: "
        f"{', '.join(f'{o:+.1%}' for o in overheads)})  (target ≤ 10 %)"
    )
    enc_s = statistics.median(r.encode_seconds for r in results)
    dec_s = statistics.median(r.decode_seconds for r in results)
    print(
        f"    engine split (median over runs): encode {enc_s:.2f} s ({enc_s / visited:.3f} s/slice, "
        f"{enc_s / visited - encoder:+.3f} s/slice beyond the bare encoder: windowing, preprocessing) | "
        f"decode {dec_s:.2f} s ({dec_s / visited * 1e3:.0f} ms/slice: prompt encoder, decoder, upsampling, "
        f"components_touching) | rest {total - enc_s - dec_s:.2f} s"
    )
    if overhead > 0.10 or force_profile:
        profile_propagation(run, visited)
    print(f"    ({load()})")
    return {
        "total": total,
        "visited": visited,
        "slices": geometry.num_slices,
        "encoder": encoder,
        "overhead": overhead,
        "encode_s": enc_s,
        "decode_s": dec_s,
    }


# -- 3. memory -------------------------------------------------------------------------------------------


def tiled_volume(volume_kji: np.ndarray, slices: int) -> np.ndarray:
    """`slices` slices of the real CT, mirrored back and forth (0..19, 19..0, …): neighbours stay alike."""
    n = volume_kji.shape[0]
    phase = np.arange(slices) % (2 * n)
    return volume_kji[np.where(phase < n, phase, 2 * n - 1 - phase)]


def memory_child(slices: int, cache_bytes: int) -> None:
    """One scenario in this (fresh) process; prints one JSON line for the parent."""
    model = build_model()
    ct = read_volume(CT)
    volume = tiled_volume(ct.array_kji, slices)
    ct.array_kji = None
    window = default_window(volume, "CT")
    geometry = SliceGeometry.create(volume.shape, ct.ijk_to_ras, "axial")
    predictor = WalkEverySlice(model)
    cache = EmbeddingCache(cache_bytes)
    gc.collect()
    setup_peak = proc_status_kib("VmHWM")
    trim_heap()  # else the state dict's freed pages, still counted in RSS, absorb the propagation's growth
    before = proc_status_kib("VmRSS")
    reset = reset_peak_rss()
    seg = run_session(
        predictor,
        volume,
        ct.ijk_to_ras,
        window,
        [seed_point(geometry, slices // 2)],
        settings=PERMISSIVE,
        cache=cache,
    )
    result = seg.result
    propagation_peak = proc_status_kib("VmHWM") if reset else None
    held = sum(o.mask.nbytes for o in result.slices.values() if o.mask is not None)
    held += sum(o.low_res.nbytes for o in result.slices.values() if o.low_res is not None)
    report = {
        "slices": slices,
        "walks": [f"step {w.step:+d} → slice {w.last_accepted}: {w.reason}" for w in result.walks],
        "cache_max_bytes": cache.max_bytes,
        "cache_peak_bytes": cache.peak_bytes,
        "cache_bytes_end": cache.nbytes,
        "cache_entries_end": len(cache),
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
        "visited": len(result.slices),
        "encoded": result.encoded_slices,
        "total_s": result.total_seconds,
        "encode_s": result.encode_seconds,
        "weights_bytes": weight_bytes(model),
        "volume_bytes": volume.nbytes,
        "result_bytes": held,
        "rss_before_kib": before,
        "setup_peak_kib": setup_peak,
        "peak_reset": reset,
        "propagation_peak_kib": propagation_peak,
        "rss_end_kib": proc_status_kib("VmRSS"),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    print(CHILD_TAG + json.dumps(report), flush=True)


def run_child(slices: int, cache_bytes: int, threads: int | None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(slices), str(cache_bytes)]
    if threads:
        command += ["--threads", str(threads)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith(CHILD_TAG)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory scenario failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    report = json.loads(lines[-1][len(CHILD_TAG) :])
    report["process_s"] = time.perf_counter() - start
    return report


def bench_memory(slices: int, threads: int | None) -> list[dict]:
    print(f"\n[3] peak memory of a {slices}-slice 512×512 int16 propagation, fresh process each ({load()})")
    reports = []
    for bound in (DEFAULT_MAX_BYTES, SMALL_CACHE):
        r = run_child(slices, bound, threads)
        peak = max(v for v in (r["setup_peak_kib"], r["propagation_peak_kib"]) if v)
        r["peak_kib"] = peak
        reports.append(r)
        prop = r["propagation_peak_kib"]
        print(
            f"    cache bound {r['cache_max_bytes'] / MIB:.0f} MiB: visited {r['visited']}/{slices}, "
            f"encoded {r['encoded']}, cache peak {r['cache_peak_bytes'] / MIB:.1f} MiB "
            f"(end: {r['cache_entries_end']} embeddings, {r['cache_bytes_end'] / MIB:.1f} MiB), "
            f"propagation {r['total_s']:.1f} s ({r['total_s'] / max(r['visited'], 1):.3f} s/slice)"
        )
        print(f"      walks: {'; '.join(r['walks'])}")
        print(
            f"      RSS before propagation {r['rss_before_kib'] / 1024:.0f} MiB (setup peak "
            f"{r['setup_peak_kib'] / 1024:.0f} MiB); peak during propagation "
            + (f"{prop / 1024:.0f} MiB (+{(prop - r['rss_before_kib']) / 1024:.0f} MiB)" if prop else "n/a")
            + f"; RSS at the end {r['rss_end_kib'] / 1024:.0f} MiB"
        )
        print(
            f"      process peak (VmHWM, loading or propagating) {peak / 1024:.0f} MiB; ru_maxrss "
            f"{r['ru_maxrss_kib'] / 1024:.0f} MiB (includes the parent's RSS at spawn, not used)"
        )
        print(
            f"      weights {r['weights_bytes'] / MIB:.1f} MiB, volume {r['volume_bytes'] / MIB:.1f} MiB, "
            f"per-slice results kept (masks + low-res logits) {r['result_bytes'] / MIB:.1f} MiB"
        )
    small = reports[1]
    holds = small["cache_peak_bytes"] <= SMALL_CACHE
    print(
        f"    bound holds: cache peak {small['cache_peak_bytes'] / MIB:.2f} MiB "
        f"≤ {SMALL_CACHE / MIB:.0f} MiB: {holds}; encoder calls {reports[0]['encoded']} (1 GB bound) "
        f"vs {small['encoded']} (small bound)"
    )
    print(f"    ({load()})")
    return reports


# -- main ------------------------------------------------------------------------------------------------


def summary(clicks: dict | None, prop: dict | None, memory: list[dict] | None) -> None:
    rows = []
    if clicks:
        rows += [
            (
                "click→mask, cached slice (direct)",
                f"{ms(clicks['median'])} / p90 {ms(clicks['p90'])}",
                "≤ 50 ms",
            ),
            (
                "  split: mapping | decode+upsample | write",
                f"{ms(clicks['mapping'])} | {ms(clicks['decode'])} | {ms(clicks['write'])}",
                "",
            ),
            ("  decoder+upsampling at 1 thread", ms(clicks["decode_1t"]), ""),
            (
                "click→mask via the session + write",
                f"{ms(clicks['engine_median'])} / p90 {ms(clicks['engine_p90'])}",
                "",
            ),
        ]
        if clicks["big_write"] is not None:
            rows.append((f"  write, {clicks['big_slices']}-slice volume", ms(clicks["big_write"]), ""))
    if prop:
        rows += [
            (
                f"propagation, {prop['slices']}-slice CT",
                f"{prop['total']:.2f} s, {prop['visited']} slices visited",
                "",
            ),
            ("  encoder alone (same run)", f"{prop['encoder']:.3f} s/slice", ""),
            ("  overhead beyond encoder", f"{prop['overhead']:+.1%}", "≤ 10 %"),
            ("  engine encode | decode", f"{prop['encode_s']:.2f} s | {prop['decode_s']:.2f} s", ""),
        ]
    if memory:
        for r in memory:
            prop = r["propagation_peak_kib"]
            during = f"{prop / 1024:.0f}" if prop else "n/a"
            rows += [
                (
                    f"peak RSS, {r['slices']} slices, cache {r['cache_max_bytes'] / MIB:.0f} MiB",
                    f"{r['peak_kib'] / 1024:.0f} MiB (loading {r['setup_peak_kib'] / 1024:.0f}, "
                    f"propagating {during})",
                    "",
                ),
                (
                    "  cache peak, encoded / visited",
                    f"{r['cache_peak_bytes'] / MIB:.1f} MiB, {r['encoded']} / {r['visited']}",
                    f"≤ {r['cache_max_bytes'] / MIB:.0f} MiB",
                ),
            ]
        rows.append(("  model weights", f"{memory[0]['weights_bytes'] / MIB:.1f} MiB", ""))
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    print("\nsummary")
    for name, value, target in rows:
        print(f"  {name:{width}s}  {value:{value_width}s}  {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer clicks and runs, --slices 40")
    parser.add_argument("--slices", type=int, default=None, help="slices of the memory volume (default 300)")
    parser.add_argument("--clicks", type=int, default=None, help="timed clicks (default 30, quick 8)")
    parser.add_argument("--runs", type=int, default=None, help="propagation runs (default 2, quick 1)")
    parser.add_argument("--skip-memory", action="store_true", help="skip part 3 (the long one)")
    parser.add_argument("--profile", action="store_true", help="profile the propagation even under 10 %%")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--memory-child", nargs=2, type=int, metavar=("SLICES", "CACHE_BYTES"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    slices = args.slices or (40 if args.quick else 300)
    n_clicks = args.clicks or (8 if args.quick else 30)
    reps = args.runs or (1 if args.quick else 2)

    print(
        f"torch {torch.__version__}, {BUILD} (synthetic weights), CPU threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} cores; {load()}"
    )
    model = build_model()
    ct = read_volume(CT)
    window = default_window(ct.array_kji, ct.modality)
    print(
        f"volume: {CT.relative_to(ROOT)} {ct.array_kji.shape[::-1]} (i, j, k) {ct.array_kji.dtype}, "
        f"modality {ct.modality}; window {window.method} [{window.low:g}, {window.high:g}]"
    )
    clicks = bench_clicks(model, ct, window, n_clicks, slices)
    prop = bench_propagation(model, ct, window, reps, args.profile)
    memory = None
    if not args.skip_memory:
        del model
        gc.collect()
        memory = bench_memory(slices, args.threads)
    summary(clicks, prop, memory)


if __name__ == "__main__":
    main()

"""The bf16 encoder against the exact fp32 path, and how `auto` chooses a precision.

The agreement figures are measured on whatever CPU runs the suite: bf16 arithmetic is emulated where the
CPU lacks bf16 instructions, slower but with the same rounding, so the same thresholds hold everywhere.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from SAMMed2DSegmentLib import commands
from SAMMed2DSegmentLib.engine import precision as prec
from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
from SAMMed2DSegmentLib.model.int8_linear import int8_available
from SAMMed2DSegmentLib.weights import registry
from SAMMed2DSegmentLib.weights.checkpoint import load_model

from .liver_agreement import CT, liver_slice_ious
from .test_demo_model import PROMPT, liver_dice


def _cosine(a: torch.Tensor, b: np.ndarray) -> float:
    a64 = a.double().flatten()
    b64 = torch.from_numpy(np.asarray(b, dtype=np.float64)).flatten()
    return float(torch.nn.functional.cosine_similarity(a64, b64, dim=0))


NATIVE_BF16 = pytest.mark.skipif(
    not prec.cpu_bf16_capable(),
    reason="bf16 on vit_b: this CPU has no bf16 instructions (emulated, over two minutes; the small build "
    "and the demo model check bf16's agreement here)",
)


@pytest.mark.parametrize("build", [pytest.param("vit_b", marks=NATIVE_BF16), "small"])
def test_bf16_embeddings_match_the_golden_fp32_ones(build, golden, request):
    model = request.getfixturevalue(f"{build}_model")
    predictor = SamMed2DPredictor(model, precision="bf16")
    assert predictor.precision == "bf16"
    prefix = "" if build == "vit_b" else "small_"
    for image in ("img1", "img2"):
        predictor.set_image(golden[f"{image}_image"])
        embedding = predictor.get_image_embedding()
        assert embedding.dtype == torch.bfloat16  # kept in the precision it was computed in
        assert _cosine(embedding, golden[f"{prefix}{image}_embedding"]) >= 0.9999


def test_fp32_stays_the_module_path(small_model, golden):
    """precision="fp32" is the default and runs the parity-tested module, bit for bit."""
    predictor = SamMed2DPredictor(small_model)
    assert predictor.precision == "fp32"
    predictor.set_image(golden["img1_image"])
    with torch.inference_mode():
        direct = small_model.image_encoder(predictor.input_image)
    assert torch.equal(predictor.get_image_embedding(), direct)


def test_low_precision_weights_are_prepared_on_the_first_encode_only(small_model, golden, monkeypatch):
    """Issue 27, item 4: a bf16 predictor is ready at once; masks from a cached embedding need no
    low-precision weights, and the first encode prepares them once."""
    from SAMMed2DSegmentLib.model import lowp_encoder

    built = []

    class Counting(lowp_encoder.LowPrecisionEncoder):
        def __init__(self, *args, **kwargs) -> None:
            built.append(args[1])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lowp_encoder, "LowPrecisionEncoder", Counting)
    predictor = SamMed2DPredictor(small_model, precision="bf16")
    assert built == [] and predictor.embedding_dtype == torch.bfloat16
    cached = torch.from_numpy(golden["small_img1_embedding"]).to(torch.bfloat16)
    predictor.set_embedding(cached, golden["img1_image"].shape[:2])
    masks, _, _ = predictor.predict(np.array([[100.0, 120.0]]), np.array([1]))
    assert masks.shape[0] == 1 and built == []
    for image in ("img1", "img2", "img1"):
        predictor.set_image(golden[f"{image}_image"])
        assert _cosine(predictor.get_image_embedding(), golden[f"small_{image}_embedding"]) >= 0.9999
    assert built == [torch.bfloat16]


needs_int8 = pytest.mark.skipif(
    not int8_available(), reason="int8: this PyTorch has no dynamic int8 products for this CPU"
)
LOW_PRECISIONS = ["bf16", pytest.param("int8", marks=needs_int8)]


@pytest.mark.parametrize("build", ["vit_b", "small"])
@needs_int8
def test_int8_embeddings_match_the_golden_fp32_ones(build, golden, request):
    """Issue 27: embedding cosine ≥ 0.999 on the golden images; kept as fp32."""
    model = request.getfixturevalue(f"{build}_model")
    predictor = SamMed2DPredictor(model, precision="int8")
    prefix = "" if build == "vit_b" else "small_"
    for image in ("img1", "img2"):
        predictor.set_image(golden[f"{image}_image"])
        embedding = predictor.get_image_embedding()
        assert embedding.dtype == torch.float32
        assert _cosine(embedding, golden[f"{prefix}{image}_embedding"]) >= prec.MIN_COSINE_INT8


@pytest.mark.parametrize("precision", LOW_PRECISIONS)
def test_background_preparation_builds_the_weights_once_off_the_calling_thread(small_model, golden, precision,
                                                                                monkeypatch):  # fmt: skip
    """The engine starts the preparation when the model loads; the first encode waits for it, and the
    weights are built once, in the preparing thread."""
    from SAMMed2DSegmentLib.model import lowp_encoder

    threads = []

    class Recording(lowp_encoder.LowPrecisionEncoder):
        def __init__(self, *args, **kwargs) -> None:
            threads.append(threading.current_thread().name)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lowp_encoder, "LowPrecisionEncoder", Recording)
    predictor = SamMed2DPredictor(small_model, precision=precision)
    predictor.prepare_in_background()
    predictor.prepare_in_background()  # a second call while it runs starts nothing more
    predictor.set_image(golden["img1_image"])
    assert threads == ["SAMMed2D-lowp-weights"]
    threshold = prec.MIN_COSINE if precision == "bf16" else prec.MIN_COSINE_INT8
    assert _cosine(predictor.get_image_embedding(), golden["small_img1_embedding"]) >= threshold
    predictor.prepare_in_background()  # prepared already: nothing to do
    assert threads == ["SAMMed2D-lowp-weights"]


def test_a_failed_background_preparation_is_raised_by_the_first_encode(small_model, golden, monkeypatch):
    from SAMMed2DSegmentLib.model import lowp_encoder

    def broken(*args, **kwargs):
        raise RuntimeError("no memory for the weights")

    monkeypatch.setattr(lowp_encoder, "LowPrecisionEncoder", broken)
    predictor = SamMed2DPredictor(small_model, precision="bf16")
    predictor.prepare_in_background()
    with pytest.raises(RuntimeError, match="no memory"):
        predictor.set_image(golden["img1_image"])


@needs_int8
def test_preparing_int8_weights_leaves_the_warnings_on(small_model):
    """The quantized dtypes' deprecation notice is silenced by one filter; a catch_warnings per weight, run on
    several threads, once left every warning of the process ignored."""
    import warnings

    from SAMMed2DSegmentLib.model.lowp_encoder import LowPrecisionEncoder

    for _ in range(3):
        LowPrecisionEncoder(small_model.image_encoder, torch.qint8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            warnings.warn("still shown", UserWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["still shown"]
    assert not any(f[0] == "ignore" and f[1] is None and f[2] is Warning for f in warnings.filters)


@needs_int8
def test_a_replaced_model_stops_its_background_preparation(vit_b_model, monkeypatch, caplog):
    """The engine replaces the model: the old one's preparation stops at the next block instead of holding
    the old model and the cores for seconds."""
    from SAMMed2DSegmentLib.model import lowp_encoder

    prepared = []
    predictor = SamMed2DPredictor(vit_b_model, precision="int8")
    original = lowp_encoder.LowPrecisionEncoder._block

    def block(self, *args, **kwargs):
        prepared.append(1)
        predictor.cancel_preparation()  # the model is replaced while the first blocks are prepared
        return original(self, *args, **kwargs)

    monkeypatch.setattr(lowp_encoder.LowPrecisionEncoder, "_block", block)
    with caplog.at_level("INFO", logger="SAMMed2D.predictor"):
        predictor.prepare_in_background()
        for thread in threading.enumerate():
            if thread.name == "SAMMed2D-lowp-weights":
                thread.join(60)
    assert 1 <= len(prepared) < len(vit_b_model.image_encoder.blocks)
    assert "stopped: the model was replaced" in caplog.text


@pytest.fixture(scope="module")
def demo_model():
    return load_model(registry.resolve_model("demo"))[0]


@pytest.mark.parametrize("precision", LOW_PRECISIONS)
def test_demo_model_masks_agree_on_every_liver_slice(demo_model, precision):
    """One include point per slice: bf16 and int8 masks against fp32 masks on every slice of the bundled CT
    that shows the liver (issue 27: mean IoU ≥ 0.98, none below 0.95)."""
    reference = SamMed2DPredictor(demo_model, precision="fp32")
    ious = liver_slice_ious(reference, SamMed2DPredictor(demo_model, precision=precision))
    assert len(ious) >= 10
    assert np.mean(ious) >= 0.98, ious
    assert min(ious) >= 0.95, ious


@pytest.mark.parametrize("precision", LOW_PRECISIONS)
def test_propagation_dice_within_half_a_percent_of_fp32(tmp_path: Path, precision):
    """The `make demo` run (command line, one point, propagated) in fp32 and in a low precision."""
    dice = {}
    for name in ("fp32", precision):
        out, report = tmp_path / f"{name}.seg.nrrd", tmp_path / f"{name}.json"
        argv = ["segment", "--volume", str(CT / "ct"), "--include", str(PROMPT), "--segment-name", "liver",
                "--precision", name, "--out", str(out), "--report", str(report), "--quiet"]  # fmt: skip
        assert commands.main(argv) == 0
        assert json.loads(report.read_text())["precision"]["used"] == name
        dice[name] = liver_dice(out)
    assert abs(dice[precision] - dice["fp32"]) <= 0.005, dice


# -- auto ------------------------------------------------------------------------------------------------
def _auto(bf16: bool, int8: bool, calibrations: dict[str, prec.Calibration], asked: list | None = None):
    def calibration(path: str) -> prec.Calibration:
        if asked is not None:
            asked.append(path)
        return calibrations[path]

    return prec.resolve_precision("auto", "cpu", bf16_capable=lambda: bf16, int8_capable=lambda: int8,
                                  calibration=calibration)  # fmt: skip


GOOD = prec.Calibration(speedup=4.0, cosine=0.99999)


def test_auto_is_fp32_where_the_cpu_has_neither_bf16_nor_int8():
    asked: list[str] = []
    choice = _auto(False, False, {"bf16": GOOD, "int8": GOOD}, asked)
    assert choice.precision == "fp32" and "neither" in choice.reason
    assert not asked  # no calibration without the instructions


def test_requested_bf16_says_when_the_cpu_only_emulates_it():
    """The request is honoured either way; the reason (printed and in the report) tells the user the cost."""
    emulated = prec.resolve_precision("bf16", "cpu", bf16_capable=lambda: False)
    assert emulated.precision == "bf16" and "emulated" in emulated.reason
    native = prec.resolve_precision("bf16", "cpu", bf16_capable=lambda: True)
    assert native.precision == "bf16" and native.reason == "requested"


def test_auto_is_bf16_only_where_supported_faster_and_agreeing():
    """Issue 27: `auto` never picks a path whose calibration (speed) or agreement with fp32 failed."""
    faster = _auto(True, False, {"bf16": GOOD})
    assert faster.precision == "bf16" and faster.dtype == torch.bfloat16
    slower = _auto(True, False, {"bf16": prec.Calibration(0.7, 0.99999)})
    assert slower.precision == "fp32" and "only 0.70×" in slower.reason
    for cosine in (0.998, float("nan")):
        wrong = _auto(True, False, {"bf16": prec.Calibration(4.0, cosine)})
        assert wrong.precision == "fp32" and "disagreed" in wrong.reason


def test_auto_is_int8_only_without_a_passing_bf16_and_where_int8_is_faster_and_agreeing():
    """int8 needs ≥ 1.5× and cosine ≥ 0.999 in its own calibration; bf16, where it passes, comes first."""
    asked: list[str] = []
    assert _auto(True, True, {"bf16": GOOD, "int8": GOOD}, asked).precision == "bf16" and asked == ["bf16"]
    chosen = _auto(False, True, {"int8": prec.Calibration(1.8, 0.9995)})
    assert chosen.precision == "int8" and chosen.dtype == torch.qint8 and "1.8×" in chosen.reason
    after_bf16 = _auto(True, True, {"bf16": prec.Calibration(0.9, 0.99999), "int8": GOOD})
    assert after_bf16.precision == "int8"
    failures = {"only 1.40×": prec.Calibration(1.4, 0.9999), "disagreed": prec.Calibration(3.0, 0.998),
                "only nan×": prec.Calibration(float("nan"), 0.9999)}  # fmt: skip
    for word, failed in failures.items():
        refused = _auto(False, True, {"int8": failed})
        assert refused.precision == "fp32" and word in refused.reason, refused


def test_a_calibration_recorded_as_failing_keeps_auto_off_that_path(tmp_path):
    """The record in the cache folder is what later starts decide by: a failed agreement stays failed."""
    calls = []

    def measure() -> prec.Calibration:
        calls.append(1)
        return prec.Calibration(speedup=3.0, cosine=0.99)

    first = prec.resolve_precision("auto", "cpu", cache_dir=tmp_path, bf16_capable=lambda: False)
    assert first.precision in ("fp32", "int8")  # the real int8 calibration of this machine, whatever it says
    (tmp_path / prec.CALIBRATION_FILE).unlink()
    assert prec.calibrated("int8", tmp_path, measure).cosine == 0.99
    again = prec.resolve_precision("auto", "cpu", cache_dir=tmp_path, bf16_capable=lambda: False,
                                   int8_capable=lambda: True)  # fmt: skip
    assert again.precision == "fp32" and "int8 disagreed" in again.reason
    assert calls == [1]


def test_the_real_agreement_measures_pass_here_and_leave_the_random_state():
    """bf16 is emulated where the CPU lacks the instructions, with the same rounding: the threshold holds.
    The int8 calibration's cosine is measured whatever its speed here."""
    state = torch.random.get_rng_state()
    assert prec.measure_bf16_agreement() >= prec.MIN_COSINE
    if int8_available():
        measured = prec.measure_int8_calibration(repeats=1)
        assert measured.cosine >= prec.MIN_COSINE_INT8 and measured.speedup > 0
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_capability_query_reads_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert not prec.cpu_bf16_capable(prec.cpu_flags(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert prec.cpu_bf16_capable(prec.cpu_flags(info))
    assert prec.cpu_bf16_capable({"amx_bf16", "amx_tile"})


def test_the_calibration_runs_once_per_machine(tmp_path):
    runs = []

    def measure() -> prec.Calibration:
        runs.append(1)
        return prec.Calibration(speedup=2.5, cosine=0.99999)

    assert prec.calibrated("bf16", tmp_path, measure).speedup == 2.5
    assert prec.calibrated("bf16", tmp_path, measure).speedup == 2.5
    assert len(runs) == 1
    record = tmp_path / prec.CALIBRATION_FILE
    (key,) = json.loads(record.read_text())  # this machine's key
    for damaged in ("{not json", *(json.dumps({key: value}) for value in (2.5, {}, {"bf16": 1}))):
        record.write_text(damaged)  # damaged, or an older version's bare speed-up: measured again
        assert prec.calibrated("bf16", tmp_path, measure) == prec.Calibration(2.5, 0.99999)
    assert len(runs) == 5
    assert prec.calibrated("int8", tmp_path, measure) and len(runs) == 6  # each path has its own record
    assert set(json.loads(record.read_text())[key]) == {"bf16", "int8"}
    assert 0 < prec.measure_bf16_speedup(repeats=1) < 1000  # the real measurement runs


def test_impossible_requests_are_refused(small_model):
    with pytest.raises(ValueError, match="fp16 runs on CUDA and MPS"):
        SamMed2DPredictor(small_model, precision="fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        prec.resolve_precision("int4", "cpu")
    with pytest.raises(ValueError, match="int8 runs on the CPU only"):
        prec.resolve_precision("int8", "cuda")
    with pytest.raises(ValueError, match="no dynamic int8 products"):
        prec.resolve_precision("int8", "cpu", int8_capable=lambda: False)

"""The bf16 encoder against the exact fp32 path, and how `auto` chooses a precision.

The agreement figures are measured on whatever CPU runs the suite: bf16 arithmetic is emulated where the
CPU lacks bf16 instructions, slower but with the same rounding, so the same thresholds hold everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from SAMMed2DSegmentLib import commands
from SAMMed2DSegmentLib.engine import precision as prec
from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
from SAMMed2DSegmentLib.weights import registry
from SAMMed2DSegmentLib.weights.checkpoint import load_model

from .liver_agreement import CT, liver_slice_ious
from .test_demo_model import PROMPT, liver_dice


def _cosine(a: torch.Tensor, b: np.ndarray) -> float:
    a64 = a.double().flatten()
    b64 = torch.from_numpy(np.asarray(b, dtype=np.float64)).flatten()
    return float(torch.nn.functional.cosine_similarity(a64, b64, dim=0))


@pytest.mark.parametrize("build", ["vit_b", "small"])
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


@pytest.fixture(scope="module")
def demo_predictors() -> dict[str, SamMed2DPredictor]:
    model, _ = load_model(registry.resolve_model("demo"))
    return {p: SamMed2DPredictor(model, precision=p) for p in ("fp32", "bf16")}


def test_demo_model_masks_agree_on_every_liver_slice(demo_predictors):
    """One include point per slice: bf16 masks against fp32 masks on every slice of the bundled CT that
    shows the liver."""
    ious = liver_slice_ious(demo_predictors["fp32"], demo_predictors["bf16"])
    assert len(ious) >= 10
    assert np.mean(ious) >= 0.98, ious
    assert min(ious) >= 0.95, ious


def test_propagation_dice_within_half_a_percent_of_fp32(tmp_path: Path):
    """The `make demo` run (command line, one point, propagated) in fp32 and in bf16."""
    dice = {}
    for name in ("fp32", "bf16"):
        out, report = tmp_path / f"{name}.seg.nrrd", tmp_path / f"{name}.json"
        argv = ["segment", "--volume", str(CT / "ct"), "--include", str(PROMPT), "--segment-name", "liver",
                "--precision", name, "--out", str(out), "--report", str(report), "--quiet"]  # fmt: skip
        assert commands.main(argv) == 0
        assert json.loads(report.read_text())["precision"]["used"] == name
        dice[name] = liver_dice(out)
    assert abs(dice["bf16"] - dice["fp32"]) <= 0.005, dice


# -- auto ------------------------------------------------------------------------------------------------
def test_auto_is_fp32_where_the_cpu_reports_no_bf16():
    calls = []
    measured = prec.Calibration(speedup=5.0, cosine=1.0)
    choice = prec.resolve_precision(
        "auto", "cpu", bf16_capable=lambda: False, calibration=lambda: calls.append(1) or measured
    )
    assert choice.precision == "fp32" and "neither" in choice.reason
    assert not calls  # no calibration without the instructions


def test_requested_bf16_says_when_the_cpu_only_emulates_it():
    """The request is honoured either way; the reason (printed and in the report) tells the user the cost."""
    emulated = prec.resolve_precision("bf16", "cpu", bf16_capable=lambda: False)
    assert emulated.precision == "bf16" and "emulated" in emulated.reason
    native = prec.resolve_precision("bf16", "cpu", bf16_capable=lambda: True)
    assert native.precision == "bf16" and native.reason == "requested"


def test_auto_is_bf16_only_where_supported_faster_and_agreeing():
    """Issue 27: `auto` never picks a path whose calibration (speed) or agreement with fp32 failed."""

    def auto(speedup: float, cosine: float) -> prec.PrecisionChoice:
        measured = prec.Calibration(speedup=speedup, cosine=cosine)
        return prec.resolve_precision("auto", "cpu", bf16_capable=lambda: True, calibration=lambda: measured)

    faster = auto(4.0, 0.99999)
    assert faster.precision == "bf16" and faster.dtype == torch.bfloat16
    slower = auto(0.7, 0.99999)
    assert slower.precision == "fp32" and "only 0.70×" in slower.reason
    for cosine in (0.998, float("nan")):
        wrong = auto(4.0, cosine)
        assert wrong.precision == "fp32" and "disagreed" in wrong.reason


def test_a_calibration_recorded_as_disagreeing_keeps_auto_at_fp32(tmp_path, monkeypatch):
    """The record in the cache folder is what later starts decide by: a failed agreement stays failed."""
    monkeypatch.setattr(prec, "cpu_bf16_capable", lambda flags=None: True)
    calls = []

    def measure() -> prec.Calibration:
        calls.append(1)
        return prec.Calibration(speedup=3.0, cosine=0.99)

    first = prec.resolve_precision("auto", "cpu", cache_dir=tmp_path, bf16_capable=lambda: True)
    assert first.precision in ("fp32", "bf16")  # the real calibration of this machine, whatever it says
    (tmp_path / prec.CALIBRATION_FILE).unlink()
    assert prec.calibrated_bf16(tmp_path, measure).cosine == 0.99
    again = prec.resolve_precision("auto", "cpu", cache_dir=tmp_path, bf16_capable=lambda: True)
    assert again.precision == "fp32" and "disagreed" in again.reason
    assert calls == [1]


def test_the_real_agreement_measure_passes_here_and_leaves_the_random_state():
    """bf16 is emulated where the CPU lacks the instructions, with the same rounding: the threshold holds."""
    state = torch.random.get_rng_state()
    assert prec.measure_bf16_agreement() >= prec.MIN_COSINE
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

    assert prec.calibrated_bf16(tmp_path, measure).speedup == 2.5
    assert prec.calibrated_bf16(tmp_path, measure).speedup == 2.5
    assert len(runs) == 1
    record = tmp_path / prec.CALIBRATION_FILE
    (key,) = json.loads(record.read_text())  # this machine's key
    for damaged in ("{not json", json.dumps({key: 2.5}), json.dumps({key: {}})):
        record.write_text(damaged)  # damaged, or an older version's bare speed-up: measured again
        assert prec.calibrated_bf16(tmp_path, measure) == prec.Calibration(2.5, 0.99999)
    assert len(runs) == 4
    assert 0 < prec.measure_bf16_speedup(repeats=1) < 1000  # the real measurement runs


def test_impossible_requests_are_refused(small_model):
    with pytest.raises(ValueError, match="fp16 runs on CUDA and MPS"):
        SamMed2DPredictor(small_model, precision="fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        prec.resolve_precision("int8", "cpu")

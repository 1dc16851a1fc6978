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
    choice = prec.resolve_precision(
        "auto", "cpu", bf16_capable=lambda: False, speedup=lambda: calls.append(1) or 5.0
    )
    assert choice.precision == "fp32" and "neither" in choice.reason
    assert not calls  # no calibration without the instructions


def test_requested_bf16_says_when_the_cpu_only_emulates_it():
    """The request is honoured either way; the reason (printed and in the report) tells the user the cost."""
    emulated = prec.resolve_precision("bf16", "cpu", bf16_capable=lambda: False)
    assert emulated.precision == "bf16" and "emulated" in emulated.reason
    native = prec.resolve_precision("bf16", "cpu", bf16_capable=lambda: True)
    assert native.precision == "bf16" and native.reason == "requested"


def test_auto_is_bf16_where_supported_and_faster_and_fp32_where_slower():
    faster = prec.resolve_precision("auto", "cpu", bf16_capable=lambda: True, speedup=lambda: 4.0)
    assert faster.precision == "bf16" and faster.dtype == torch.bfloat16
    slower = prec.resolve_precision("auto", "cpu", bf16_capable=lambda: True, speedup=lambda: 0.7)
    assert slower.precision == "fp32"


def test_the_capability_query_reads_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert not prec.cpu_bf16_capable(prec.cpu_flags(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert prec.cpu_bf16_capable(prec.cpu_flags(info))
    assert prec.cpu_bf16_capable({"amx_bf16", "amx_tile"})


def test_the_calibration_runs_once_per_machine(tmp_path):
    runs = []

    def measure() -> float:
        runs.append(1)
        return 2.5

    assert prec.calibrated_bf16_speedup(tmp_path, measure) == 2.5
    assert prec.calibrated_bf16_speedup(tmp_path, measure) == 2.5
    assert len(runs) == 1
    (tmp_path / prec.CALIBRATION_FILE).write_text("{not json")  # a damaged record is measured again
    assert prec.calibrated_bf16_speedup(tmp_path, measure) == 2.5
    assert len(runs) == 2
    assert 0 < prec.measure_bf16_speedup(repeats=1) < 1000  # the real measurement runs


def test_impossible_requests_are_refused(small_model):
    with pytest.raises(ValueError, match="fp16 runs on CUDA and MPS"):
        SamMed2DPredictor(small_model, precision="fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        prec.resolve_precision("int8", "cpu")

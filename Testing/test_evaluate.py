"""The interactive protocol: the simulated user's clicks, the Dice curve on an oracle, and `evaluate` end to
end on the bundled CT with the demo model (the command line is a contract other tools call)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from SAMMed2DSegmentLib import commands
from SAMMed2DSegmentLib.engine.masks import component_labels
from SAMMed2DSegmentLib.evaluation.clicks import EXCLUDE, INCLUDE, deepest_point, dice, next_click
from SAMMed2DSegmentLib.evaluation.protocol import area_under_curve, interactive_slice

REPO = Path(__file__).resolve().parents[1]
CT = REPO / "Testing" / "Data" / "totalseg-example-ct"
LABELS = CT / "labels" / "labels_on_ct_grid.nrrd"


def disk(shape, cx, cy, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def test_a_missed_region_gets_an_include_click_at_its_deepest_point():
    truth = disk((80, 100), 40, 40, 20) | disk((80, 100), 80, 40, 8)
    prediction = disk((80, 100), 40, 40, 20)  # the small disk is missed
    click = next_click(prediction, truth)
    assert click.label == INCLUDE
    assert (click.x, click.y) == (80, 40)  # the centre of the missed disk
    assert truth[click.y, click.x] and not prediction[click.y, click.x]


def test_a_spill_gets_an_exclude_click_inside_the_largest_false_positive():
    truth = disk((80, 100), 30, 40, 15)
    spill_small = disk((80, 100), 70, 15, 4)
    spill_large = disk((80, 100), 75, 55, 10)
    prediction = truth | spill_small | spill_large
    click = next_click(prediction, truth)
    assert click.label == EXCLUDE
    assert spill_large[click.y, click.x] and not truth[click.y, click.x]
    assert (click.x, click.y) == (75, 55)


def test_the_largest_error_wins_and_clicks_stay_inside_their_region_for_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(30):
        truth = disk((64, 64), *rng.integers(15, 50, 2), rng.integers(5, 20))
        prediction = disk((64, 64), *rng.integers(15, 50, 2), rng.integers(5, 20))
        click = next_click(prediction, truth)
        if click is None:
            assert (prediction == truth).all()
            continue
        error = prediction ^ truth
        labels = component_labels(error)
        sizes = np.bincount(labels.ravel())[1:]
        assert error[click.y, click.x]
        assert sizes[labels[click.y, click.x] - 1] == sizes.max()
        assert click.label == (INCLUDE if truth[click.y, click.x] else EXCLUDE)


def test_agreement_means_no_click_and_depth_uses_the_pixel_spacing():
    truth = disk((40, 40), 20, 20, 8)
    assert next_click(truth, truth) is None
    # Two bars: a flat one (10 rows × 40 columns) and a tall one (40 rows × 6 columns). With square pixels
    # the flat bar is thicker; with rows 0.25 mm apart it is 2.5 mm thick and the tall one (6 mm) is deeper.
    region = np.zeros((64, 64), bool)
    region[2:12, 2:42] = True
    region[20:60, 50:56] = True
    x, y = deepest_point(region)
    assert 2 <= y < 12 and 2 <= x < 42
    x, y = deepest_point(region, spacing=(0.25, 1.0))
    assert 20 <= y < 60 and 50 <= x < 56
    with pytest.raises(ValueError, match="empty"):
        deepest_point(np.zeros((5, 5), bool))


def oracle(truth: np.ndarray):
    """A predictor that starts from the box filled and, for each click, fixes the whole error piece the click
    lies in: what a perfect model does with a click. The protocol's bookkeeping is all that is tested."""
    state = {}

    def predict(prompt, mask_input):
        if "mask" not in state:
            x0, y0, x1, y1 = (int(v) for v in prompt.box)
            mask = np.zeros_like(truth)
            mask[y0 : y1 + 1, x0 : x1 + 1] = True
            state["mask"] = mask
        else:
            assert mask_input is not None and mask_input.min() >= 0 and mask_input.max() <= 1
            x, y = (int(v) for v in prompt.points[-1])
            error = state["mask"] ^ truth
            labels = component_labels(error)
            state["mask"] = state["mask"] ^ (labels == labels[y, x])
        return state["mask"].copy(), np.zeros((64, 64), np.float32)

    return predict


def test_on_an_oracle_dice_never_drops_after_a_click():
    rng = np.random.default_rng(4)
    for _ in range(10):
        truth = disk((96, 96), *rng.integers(30, 66, 2), rng.integers(10, 25))
        truth &= ~disk((96, 96), *rng.integers(30, 66, 2), rng.integers(3, 10))  # a bite out: box errors
        curve = interactive_slice(oracle(truth), truth, "box", max_clicks=5)
        assert len(curve) == 6
        assert all(b >= a for a, b in zip(curve, curve[1:], strict=False)), curve
        assert curve[-1] == 1.0 or curve[-1] > curve[0]
    assert area_under_curve([0.5, 1.0, 1.0]) == pytest.approx(0.875)
    assert area_under_curve([0.7]) == 0.7
    assert dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0


def run_evaluate(tmp_path, *extra, label=5):
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--volume", str(CT / "ct"), "--labels", str(LABELS), "--label-value", str(label),
            "--protocol", "clicks", "--json", str(out), "--quiet", *extra]  # fmt: skip
    return commands.main(argv), out


def test_evaluate_runs_end_to_end_on_the_bundled_ct_with_the_demo_model(tmp_path):
    code, out = run_evaluate(tmp_path, "--max-clicks", "2", "--precision", "fp32")
    assert code == 0
    result = json.loads(out.read_text())
    for key in (
        "dice_per_click",
        "dice_auc",
        "final_dice",
        "slices",
        "propagation_dice",
        "baseline",
        "window",
    ):
        assert key in result, key
    assert len(result["dice_per_click"]) == 3
    assert result["final_dice"] == result["dice_per_click"][-1]
    assert len(result["slices"]) == 20  # the liver is on every slice of this CT
    per_slice = np.array([s["dice_per_click"] for s in result["slices"]])
    np.testing.assert_allclose(per_slice.mean(axis=0), result["dice_per_click"], atol=1e-3)
    assert 0.5 < result["dice_per_click"][0] <= 1 and 0.5 < result["propagation_dice"] <= 1
    assert 0 < result["baseline"]["dice"] <= 1 and 0 < result["baseline"]["propagation_dice"] <= 1
    assert result["window"]["method"].startswith("SA-Med2D-20M rule")
    assert result["model"]["sha256"] == cli_demo_sha256()
    # An explicit window overrides the model's rule.
    code, out = run_evaluate(tmp_path, "--max-clicks", "0", "--window", "ct-soft-tissue", "--first", "point")
    assert code == 0
    window = json.loads(out.read_text())["window"]
    assert (window["low"], window["high"]) == (-160.0, 240.0)


def cli_demo_sha256() -> str:
    from SAMMed2DSegmentLib.weights.registry import REGISTRY

    return REGISTRY["demo"].sha256


@pytest.mark.parametrize(
    "extra, label, message",
    [
        (("--max-clicks", "-1"), 5, "--max-clicks must be within"),
        ((), 999, "--label-value 999 is not in"),
        (("--min-pixels", "0"), 5, "--min-pixels must be"),
        (("--resume",), 5, "--resume go with --manifest"),
    ],
)
def test_bad_evaluate_input_is_one_line(tmp_path, capsys, extra, label, message):
    code, out = run_evaluate(tmp_path, *extra, label=label)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_evaluate_refuses_to_write_over_its_inputs(tmp_path, capsys):
    link = tmp_path / "link.json"
    link.symlink_to(LABELS)  # the output path leads to the label map
    before = LABELS.read_bytes()
    argv = ["evaluate", "--volume", str(CT / "ct"), "--labels", str(LABELS), "--label-value", "5",
            "--json", str(link), "--quiet"]  # fmt: skip
    code = commands.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "same file as --labels" in err and "Traceback" not in err
    assert LABELS.read_bytes() == before

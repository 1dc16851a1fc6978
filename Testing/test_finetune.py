"""Fine-tuning: a few steps on a tiny crop of the real CT learn something, the result loads as a model, an
interrupted run resumes exactly, and bad training input is refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors import safe_open

from SAMMed2DSegmentLib import commands
from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
from SAMMed2DSegmentLib.finetune.batches import (
    LARGE_AREA_PX,
    PADDING_VALUES,
    intensity_mapping,
    make_batch,
    padded_rule_window,
)
from SAMMed2DSegmentLib.finetune.data import TrainingSet, held_out_band, load_training_set
from SAMMed2DSegmentLib.finetune.prompts import Prompts, correction_prompts, sample_prompts
from SAMMed2DSegmentLib.finetune.settings import FinetuneConfig, FinetuneError
from SAMMed2DSegmentLib.finetune.state import export_model, freeze, load_state
from SAMMed2DSegmentLib.finetune.step import decode, iou_ranking_loss, mask_losses, round_loss
from SAMMed2DSegmentLib.finetune.training import finetune
from SAMMed2DSegmentLib.finetune.validation import validate, validation_batches
from SAMMed2DSegmentLib.model import build_sam_med2d
from SAMMed2DSegmentLib.weights.checkpoint import load_model

NIFTI = Path(__file__).parent / "Data" / "totalseg-example-ct" / "nifti"
LIVER, SPLEEN = 5, 1


@pytest.fixture(scope="module")
def crop(tmp_path_factory) -> tuple[Path, Path]:
    """A 12×48×48 crop of the training CT around liver and spleen, with only those two labels."""
    folder = tmp_path_factory.mktemp("crop")
    image = sitk.ReadImage(str(NIFTI / "example_ct_sm.nii.gz"))
    labels = sitk.ReadImage(str(NIFTI / "example_seg.nii.gz"))
    lab = sitk.GetArrayFromImage(labels)
    k, j, i = (int(np.mean(a)) for a in np.nonzero(lab == LIVER))
    box = dict(index=[max(0, i - 24), max(0, j - 24), max(0, k - 6)], size=[48, 48, 12])
    image_crop = sitk.RegionOfInterest(image, box["size"], box["index"])
    label_crop = sitk.RegionOfInterest(labels, box["size"], box["index"])
    arr = sitk.GetArrayFromImage(label_crop)
    kept = sitk.GetImageFromArray(np.where(np.isin(arr, [LIVER, SPLEEN]), arr, 0).astype(np.uint8))
    kept.CopyInformation(label_crop)
    assert (sitk.GetArrayFromImage(kept) == LIVER).sum() > 1000
    paths = folder / "image.nii.gz", folder / "labels.nii.gz"
    sitk.WriteImage(image_crop, str(paths[0]))
    sitk.WriteImage(kept, str(paths[1]))
    return paths


def tiny(**changes) -> FinetuneConfig:
    base = FinetuneConfig(steps=4, batch_size=2, eval_every=2, save_every=1, warmup_steps=1, min_pixels=10)
    return FinetuneConfig(**{**base.__dict__, **changes})


def fixed_loss(model, data) -> float:
    """Loss on one fixed batch with fixed prompts, so before/after are comparable."""
    batch = make_batch(data, np.random.default_rng(123), 8, (1, 1, 1))
    prompts = sample_prompts(batch.masks, np.random.default_rng(7))
    with torch.no_grad():
        features = model.image_encoder(batch.images)
        logits, iou = decode(model, features, prompts)
        return float(round_loss(logits, iou, batch.masks, prompts.single_point)[0])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_few_steps_reduce_the_loss_and_give_a_loadable_model(crop, tmp_path, precision):
    """In bf16 too (autocast, fp32 master weights): the exported weights are fp32 either way."""
    config = tiny(steps=25, batch_size=4, lr=1e-3, eval_every=25, save_every=25, precision=precision)
    data = load_training_set([crop], config)
    torch.manual_seed(config.seed)
    before = fixed_loss(build_sam_med2d("small").train(), data)
    result = finetune(config, [crop], tmp_path)
    assert result.steps == 25 and result.samples_per_second > 0
    model, info = load_model(tmp_path / "best.safetensors")
    assert info.build == "small"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    after = fixed_loss(model, data)
    assert after < 0.9 * before, (before, after)
    # The exported weights run through the inference API.
    predictor = SamMed2DPredictor(model)
    image = np.zeros((48, 48), np.uint8)
    predictor.set_image(image)
    masks, iou, _ = predictor.predict(np.array([[24.0, 24.0]]), np.array([1]))
    assert masks.shape == (1, 48, 48) and np.isfinite(iou).all()


def test_an_interrupted_run_resumes_exactly(crop, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir(), interrupted.mkdir()
    config = tiny()
    finetune(config, [crop], straight)
    first = finetune(config, [crop], interrupted, stop_after=2)
    assert first.steps == 2
    finetune(config, [crop], interrupted, resume=True)
    a, _, run_a = load_state(straight / "last.safetensors")
    b, _, run_b = load_state(interrupted / "last.safetensors")
    assert run_a["step"] == run_b["step"] == 4
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in run_a["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in run_b["history"]]


def test_a_different_seed_trains_differently(crop, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    finetune(tiny(steps=2), [crop], tmp_path / "a")
    finetune(tiny(steps=2, seed=1), [crop], tmp_path / "b")
    a, _, _ = load_state(tmp_path / "a" / "last.safetensors")
    b, _, _ = load_state(tmp_path / "b" / "last.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_existing_state_is_not_overwritten_and_resume_checks_settings(crop, tmp_path):
    finetune(tiny(steps=1), [crop], tmp_path)
    before = (tmp_path / "last.safetensors").read_bytes()
    with pytest.raises(FinetuneError, match="--resume"):
        finetune(tiny(steps=1), [crop], tmp_path)
    with pytest.raises(FinetuneError, match="other settings"):
        finetune(tiny(steps=3, lr=1e-2), [crop], tmp_path, resume=True)
    assert (tmp_path / "last.safetensors").read_bytes() == before


def test_resume_refuses_other_volumes_or_labels(crop, other_patient, tmp_path):
    """A resumed run must see the volumes it started with: other training data would mix two trainings,
    another validation patient would compare best-step scores of two validation sets. A state from before
    the inputs were recorded is taken on trust."""
    from safetensors.torch import save

    image_path, label_path = crop
    finetune(tiny(steps=3), [crop], tmp_path, validation_pairs=[other_patient], stop_after=1)
    relabelled = tmp_path / "relabelled.nii.gz"
    labels = sitk.ReadImage(str(label_path))
    sitk.WriteImage(sitk.ChangeLabel(labels, {LIVER: 7}), str(relabelled))
    other_labels = tmp_path / "other-relabelled.nii.gz"
    sitk.WriteImage(sitk.ChangeLabel(sitk.ReadImage(str(other_patient[1])), {1: 2}), str(other_labels))
    for pairs, validation in (([(image_path, relabelled)], [other_patient]), ([crop], []),
                              ([crop], [(other_patient[0], other_labels)])):  # fmt: skip
        with pytest.raises(FinetuneError, match="other volumes or labels"):
            finetune(tiny(steps=3), pairs, tmp_path, validation_pairs=validation, resume=True)
    path = tmp_path / "last.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata()
    assert json.loads(metadata["run"])["inputs"]["validation"]
    run = {k: v for k, v in json.loads(metadata["run"]).items() if k != "inputs"}
    path.write_bytes(save(tensors, metadata={**metadata, "run": json.dumps(run)}))
    result = finetune(tiny(steps=3), [crop], tmp_path, validation_pairs=[other_patient], resume=True)
    assert result.steps == 3


def test_a_state_without_recorded_inputs_has_its_best_score_recomputed(crop, other_patient, tmp_path):
    """States from before validation was averaged per volume scored several volumes as one pool; on resume
    their best weights are rescored per volume, so the next steps are compared with a like score."""
    from safetensors.torch import save

    config = tiny(steps=4, eval_every=2, save_every=2)
    finetune(config, [crop], tmp_path, validation_pairs=[other_patient], stop_after=2)
    path = tmp_path / "last.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata()
    run = {k: v for k, v in json.loads(metadata["run"]).items() if k != "inputs"}
    true_best = dict(run["best_score"])
    run["best_score"] = {**true_best, "mean": 0.999}  # a pooled score no later step could beat
    path.write_bytes(save(tensors, metadata={**metadata, "run": json.dumps(run)}))
    data = load_training_set([crop], config, [other_patient])
    rescored = validate(load_model(tmp_path / "best.safetensors")[0], validation_batches(data))
    assert rescored == pytest.approx(true_best, abs=1e-6)
    result = finetune(config, [crop], tmp_path, validation_pairs=[other_patient], resume=True)
    assert result.best_score["mean"] < 0.999
    assert result.best_score["mean"] >= rescored["mean"] - 1e-9


def test_a_state_from_before_the_newer_settings_resumes_with_their_defaults(crop, tmp_path):
    """A state whose run JSON lacks settings added later (as states of earlier versions do) resumes when
    the run asks for their defaults, and is refused when it asks for something else."""
    from safetensors.torch import save

    finetune(tiny(steps=2), [crop], tmp_path, stop_after=1)
    path = tmp_path / "last.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata()
    run = json.loads(metadata["run"])
    for key in ("precision", "iou_rank_weight", "all_tokens", "size_exponent", "prompt_mix"):
        del run["config"][key]
    path.write_bytes(save(tensors, metadata={**metadata, "run": json.dumps(run)}))
    with pytest.raises(FinetuneError, match="other settings"):
        finetune(tiny(steps=2, all_tokens=True), [crop], tmp_path, resume=True)
    assert finetune(tiny(steps=2), [crop], tmp_path, resume=True).steps == 2


def test_freezing_the_encoder_trains_only_its_adapters(crop, tmp_path):
    model = build_sam_med2d("small")
    freeze(model, True)
    trainable = {n for n, p in model.image_encoder.named_parameters() if p.requires_grad}
    assert trainable and all(".Adapter." in n for n in trainable)
    assert all(p.requires_grad for p in model.mask_decoder.parameters())
    # End to end from a checkpoint: frozen encoder weights do not move, adapters do.
    start = tmp_path / "start"
    start.mkdir()
    finetune(tiny(steps=1), [crop], start)
    run = tmp_path / "run"
    run.mkdir()
    config = tiny(steps=3, freeze_encoder=True, init_checkpoint=str(start / "best.safetensors"))
    finetune(config, [crop], run)
    before, _ = load_model(start / "best.safetensors")
    after, _, _ = load_state(run / "last.safetensors")
    old = before.state_dict()
    assert torch.equal(
        old["image_encoder.blocks.0.attn.qkv.weight"], after["image_encoder.blocks.0.attn.qkv.weight"]
    )
    adapter = next(k for k in old if ".Adapter." in k and k.endswith("weight"))
    assert not torch.equal(old[adapter], after[adapter])


# --- bad input ---------------------------------------------------------------------------------------


def _write_like(path: Path, array: np.ndarray, like: sitk.Image, **changes) -> Path:
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(like) if array.shape == sitk.GetArrayFromImage(like).shape else None
    for name, value in changes.items():
        getattr(img, f"Set{name}")(value)
    sitk.WriteImage(img, str(path))
    return path


def test_label_maps_that_do_not_match_the_image_are_refused(crop, tmp_path):
    image_path, label_path = crop
    labels = sitk.ReadImage(str(label_path))
    arr = sitk.GetArrayFromImage(labels)
    shifted = _write_like(tmp_path / "shifted.nii.gz", arr, labels, Origin=(10.0, 0.0, 0.0))
    with pytest.raises(FinetuneError, match="geometry .* does not match"):
        load_training_set([(image_path, shifted)], tiny())
    spaced = _write_like(tmp_path / "spaced.nii.gz", arr, labels, Spacing=(1.0, 1.0, 1.0))
    with pytest.raises(FinetuneError, match="geometry .* does not match"):
        load_training_set([(image_path, spaced)], tiny())
    smaller = _write_like(tmp_path / "small.nii.gz", arr[:, :, :40].copy(), labels)
    with pytest.raises(FinetuneError, match="size .* does not match"):
        load_training_set([(image_path, smaller)], tiny())
    floats = _write_like(tmp_path / "float.nii.gz", arr.astype(np.float32), labels)
    with pytest.raises(FinetuneError, match="integers"):
        load_training_set([(image_path, floats)], tiny())


def test_empty_label_maps_are_refused(crop, tmp_path):
    image_path, label_path = crop
    labels = sitk.ReadImage(str(label_path))
    empty = _write_like(tmp_path / "empty.nii.gz", np.zeros_like(sitk.GetArrayFromImage(labels)), labels)
    with pytest.raises(FinetuneError, match="empty"):
        load_training_set([(image_path, empty)], tiny())
    with pytest.raises(FinetuneError, match="no slice holds a label"):
        load_training_set([crop], tiny(min_pixels=100_000))


def test_a_checkpoint_of_another_build_is_refused(crop, tmp_path):
    finetune(tiny(steps=1), [crop], tmp_path)
    config = tiny(build="vit_b", init_checkpoint=str(tmp_path / "best.safetensors"))
    out = tmp_path / "vit"
    out.mkdir()
    with pytest.raises(FinetuneError, match="is a small checkpoint, but --build is vit_b"):
        finetune(config, [crop], out)
    with pytest.raises(FinetuneError, match="from scratch"):
        finetune(tiny(build="vit_b"), [crop], out)
    assert not any(out.iterdir())


def test_command_line_bad_input_is_one_line_and_exit_2(crop, tmp_path, capsys):
    image_path, label_path = crop
    argv = ["finetune", "--image", str(image_path), "--out-dir", str(tmp_path), "--steps", "1"]
    assert commands.main([*argv, "--labels", str(label_path), "--labels", str(label_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in pairs" in err[0]
    missing = ["--out-dir", str(tmp_path / "missing")]
    assert commands.main([*argv, "--labels", str(tmp_path / "none.nii.gz"), *missing]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # a missing --out-dir is created only once the inputs are good


def test_command_line_output_collisions_are_refused(crop, tmp_path, capsys):
    image_path, label_path = crop
    image = tmp_path / "image.nii.gz"
    image.write_bytes(image_path.read_bytes())
    argv = ["finetune", "--image", str(image), "--labels", str(label_path), "--steps", "1"]
    out = tmp_path / "out"
    init = tmp_path / "best.safetensors"
    init.write_bytes(b"not really")
    (tmp_path / "link.safetensors").symlink_to(init)
    cases = {
        "--init": [*argv, "--out-dir", str(tmp_path), "--init", str(init)],  # the state would replace it
        "--export": [
            *argv,
            "--out-dir",
            str(out),
            "--init",
            str(init),
            "--export",
            str(tmp_path / "link.safetensors"),
        ],
    }
    for role, args in cases.items():
        assert commands.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "same file" in err[0] and role in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.safetensors",
        "image.nii.gz",
        "link.safetensors",
    ]
    assert init.read_bytes() == b"not really"


def test_command_line_trains_and_exports(crop, tmp_path, capsys):
    image_path, label_path = crop
    out = tmp_path / "model.safetensors"
    out_dir = tmp_path / "new" / "run"  # created when missing
    argv = ["finetune", "--image", str(image_path), "--labels", str(label_path), "--out-dir", str(out_dir)]
    steps = ["--steps", "2", "--batch-size", "2", "--eval-every", "2"]
    code = commands.main([*argv, *steps, "--export", str(out)])
    assert code == 0
    assert (out_dir / "best.safetensors").is_file()
    assert "trained 2 steps" in capsys.readouterr().err
    model, info = load_model(out)
    assert info.build == "small"


def test_command_line_sets_the_correction_rounds(crop, tmp_path, capsys):
    """The corrective-click settings reach the run (the exported model's metadata records its config); a
    bad one is refused in one line before anything is written."""
    image_path, label_path = crop
    out = tmp_path / "model.safetensors"

    def argv(rounds: str, folder: str) -> list[str]:
        return ["finetune", "--image", str(image_path), "--labels", str(label_path), "--steps", "1",
                "--batch-size", "2", "--correction-probability", "0.9", "--correction-rounds", rounds,
                "--out-dir", str(tmp_path / folder), "--export", str(out), "--quiet"]  # fmt: skip

    assert commands.main(argv("5", "run")) == 0
    with safe_open(str(out), "pt") as f:
        config = json.loads(f.metadata()["config"])
    assert (config["correction_probability"], config["correction_rounds"]) == (0.9, 5)
    assert commands.main(argv("0", "refused")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "correction-rounds must be ≥ 1" in err[0], err
    assert not (tmp_path / "refused").exists()


def test_non_ct_volumes_train_and_validate_in_their_own_default_window(crop, tmp_path):
    """Every volume is shown to the model as inference will show it: the model's rule (SA-Med2D-20M's) on
    the volume as stored; only CT gets the scanner-padding augmentation."""
    image_path, label_path = crop
    image = sitk.ReadImage(str(image_path))
    shifted = sitk.Cast(image, sitk.sitkFloat32) + 2000.0
    mr_path = tmp_path / "mr.nii.gz"
    sitk.WriteImage(shifted, str(mr_path))
    data = load_training_set([(mr_path, label_path)], tiny())
    info = data.intensity[0]
    assert not info.is_ct and info.rule.method.startswith("SA-Med2D-20M rule") and info.rule.low > 500
    batch = make_batch(data, np.random.default_rng(0), 4, (1, 1, 1))
    assert batch.images.shape == (4, 3, 256, 256) and torch.isfinite(batch.images).all()
    full_ct = (NIFTI / "example_ct_sm.nii.gz", NIFTI / "example_seg.nii.gz")
    ct = load_training_set([full_ct], tiny())
    assert ct.intensity[0].is_ct and ct.intensity[0].rule.method.startswith("SA-Med2D-20M rule")


def test_nan_and_infinite_voxels_train_as_the_engine_shows_them(crop, tmp_path):
    """A float volume with NaN or infinite voxels: they become the volume's lowest (NaN, −inf) or highest
    (+inf) finite value, grey 0 or 255 under the rule as in the engine, so no sample is blanked and the loss
    stays finite."""
    image_path, label_path = crop
    image = sitk.ReadImage(str(image_path))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[:, :10, :10] = np.nan  # a corner of every axial slice
    array[:, -3:, -3:] = np.inf
    array[:, :3, -3:] = -np.inf
    finite = array[np.isfinite(array)]
    lowest, highest = float(finite.min()), float(finite.max())
    path = _write_like(tmp_path / "nan.nrrd", array, image)  # NIfTI would not keep NaN
    data = load_training_set([(path, label_path)], tiny())
    assert data.intensity[0].rule.low >= lowest
    for items in data.slices:
        for item in items:
            assert np.isfinite(item.image).all()
    axial = [item.image for item in data.slices[0]]
    assert any((a == lowest).any() for a in axial) and any((a == highest).any() for a in axial)
    batch = make_batch(data, np.random.default_rng(0), 4, (1, 1, 1))
    assert torch.isfinite(batch.images).all()
    result = finetune(tiny(steps=2, eval_every=2), [(path, label_path)], tmp_path / "run")
    entry = result.history[-1]
    assert np.isfinite(entry["loss"]) and np.isfinite(entry["val_mean"])


def test_the_padding_augmentation_reproduces_the_rule_on_a_padded_volume():
    """The window the rule would give if a fraction of the voxels were scanner padding, computed from the
    unpadded sample, equals the rule on the volume padded for real."""
    from SAMMed2DSegmentLib.engine.intensity import SA_MED2D_20M, compute_window

    rng = np.random.default_rng(0)
    tissue = rng.normal(0, 300, 40_000).clip(-1000, 2000).astype(np.float32)
    sample = np.sort(tissue)
    for padding, fraction in [(-1024.0, 0.1), (-2048.0, 0.2), (-3024.0, 0.3)]:
        count = int(round(fraction * tissue.size / (1 - fraction)))
        padded = np.concatenate([tissue, np.full(count, padding, np.float32)]).reshape(1, 1, -1)
        real = compute_window(padded, SA_MED2D_20M)
        low, high = padded_rule_window(sample, padding, count / padded.size)
        assert low == real.low == padding
        assert high == pytest.approx(real.high, abs=1.0)
    assert padded_rule_window(sample, None, 0.2) == tuple(np.percentile(sample, [0.5, 99.5]))


def test_ct_batches_see_the_padding_values_scanners_use():
    """Under the rule the padding outside the field of view is grey 0 and air lands anywhere from ≈ 5
    (no padding) to ≈ 150 (−3024): the model must see that whole range."""
    full_ct = (NIFTI / "example_ct_sm.nii.gz", NIFTI / "example_seg.nii.gz")
    data = load_training_set([full_ct], tiny())
    rng = np.random.default_rng(1)
    mappings = [intensity_mapping(data.intensity[0], rng) for _ in range(400)]
    paddings = {m[2] for m in mappings}
    assert paddings == set(PADDING_VALUES)
    air_grey = [255 * (-1000 - low) / (high - low) for low, high, padding in mappings if padding is not None]
    assert min(air_grey) < 20 and max(air_grey) > 120


def test_exported_models_are_byte_identical_for_the_same_weights(tmp_path):
    """safetensors writes its metadata map in hash order (different in every process); the export sorts
    the header, so `make demo-model` can reproduce the bundled file byte for byte."""
    from SAMMed2DSegmentLib.model import build_sam_med2d

    torch.manual_seed(0)
    model = build_sam_med2d("small")
    meta = {f"key{i}": str(i) for i in range(12)}
    export_model(model, tmp_path / "a.safetensors", meta)
    export_model(model, tmp_path / "b.safetensors", dict(reversed(list(meta.items()))))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded, info = load_model(tmp_path / "a.safetensors")
    assert info.build == "small"


def test_the_mask_prompt_is_given_as_probabilities_like_the_engine_does():
    """The engine feeds sigmoid(previous logits) as mask prompt (PropagationSettings.use_mask_prompt), as
    SAM-Med2D trains; training must feed the same range."""
    masks = torch.zeros(2, 256, 256, dtype=torch.bool)
    masks[:, 100:150, 100:150] = True
    prompts = Prompts(None, None, torch.tensor([[90.0, 90, 160, 160]] * 2))
    logits = torch.full((2, 1, 64, 64), 8.0)
    logits[:, :, :10] = -8.0
    seen = []
    for seed in range(20):
        p = correction_prompts(prompts, masks.clone(), masks, logits, np.random.default_rng(seed))
        assert p.coords.shape == (2, 1, 2) and p.boxes is not None
        if p.mask_input is not None:
            seen.append(p.mask_input)
    assert seen, "the mask prompt is never used"
    for mask_input in seen:
        assert mask_input.min() >= 0 and mask_input.max() <= 1
        torch.testing.assert_close(mask_input, torch.sigmoid(logits))


def test_the_correction_round_starts_from_the_mask_the_predictor_would_pick():
    masks = torch.zeros(1, 256, 256, dtype=torch.bool)
    masks[0, 64:192, 64:192] = True
    logits = torch.full((1, 4, 64, 64), -5.0)
    logits[0, 1, 16:48, 16:48] = 5.0  # token 1: right, but predicted IoU low
    logits[0, 2, :8, :8] = 5.0  # token 2: wrong, predicted IoU high
    iou_pred = torch.tensor([[0.1, 0.2, 0.9, 0.3]])
    _, chosen = round_loss(logits, iou_pred, masks, single_point=True)
    torch.testing.assert_close(chosen, logits[:, 2:3])


def test_the_iou_head_loss_is_weighted_and_the_weight_is_checked():
    masks = torch.zeros(2, 256, 256, dtype=torch.bool)
    masks[:, 64:192, 64:192] = True
    logits = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    iou_pred = torch.rand(2, 4, generator=torch.Generator().manual_seed(1))
    base = float(round_loss(logits, iou_pred, masks, False, iou_weight=0.0)[0])
    one = float(round_loss(logits, iou_pred, masks, False, iou_weight=1.0)[0])
    ten = float(round_loss(logits, iou_pred, masks, False, iou_weight=10.0)[0])
    assert one > base
    assert ten - base == pytest.approx(10 * (one - base), rel=1e-5)
    with pytest.raises(FinetuneError, match="iou-loss-weight"):
        FinetuneConfig(iou_loss_weight=-1.0).check()


def test_the_ranking_loss_rewards_the_right_order_and_its_settings_are_checked():
    """The loss falls when the head ranks the actually best token first, whatever the IoUs' scale."""
    masks = torch.zeros(1, 256, 256, dtype=torch.bool)
    masks[0, 64:192, 64:192] = True
    logits = torch.full((1, 4, 64, 64), -5.0)
    logits[0, 3, 16:48, 16:48] = 5.0  # token 3: the whole square
    logits[0, 1, 16:32, 16:32] = 5.0  # token 1: a quarter of it
    logits[0, 2, 16:24, 16:24] = 5.0  # token 2: less
    right = torch.tensor([[0.5, 0.3, 0.2, 0.4]])
    wrong = torch.tensor([[0.5, 0.4, 0.3, 0.2]])
    _, iou = mask_losses(logits, masks)
    assert float(iou_ranking_loss(right, iou)) < float(iou_ranking_loss(wrong, iou))
    base = float(round_loss(logits, wrong, masks, False, rank_weight=0.0)[0])
    ranked = float(round_loss(logits, wrong, masks, False, rank_weight=2.0)[0])
    assert ranked - base == pytest.approx(2 * float(iou_ranking_loss(wrong, iou)), rel=1e-5)
    for bad in ({"iou_rank_weight": -1.0}, {"iou_rank_weight": float("nan")}, {"size_exponent": -0.5},
                {"prompt_mix": (0.5, 0.5, 0.5)}, {"prompt_mix": (1.2, -0.2, 0.0)}):  # fmt: skip
        with pytest.raises(FinetuneError, match="rank-weight|size-exponent|prompt mix"):
            FinetuneConfig(**bad).check()


def test_all_tokens_trains_every_multimask_token_on_the_structure():
    """SAM's best-of-three ignores two wrong tokens; `all_tokens` charges them (token 0 alike either way)."""
    masks = torch.zeros(1, 256, 256, dtype=torch.bool)
    masks[0, 64:192, 64:192] = True
    logits = torch.full((1, 4, 64, 64), -8.0)
    logits[0, 3, 16:48, 16:48] = 8.0  # token 3 exact, tokens 0..2 empty
    iou_pred = torch.zeros(1, 4)
    losses, _ = mask_losses(logits, masks)
    best = float(round_loss(logits, iou_pred, masks, True, iou_weight=0.0)[0])
    every = float(round_loss(logits, iou_pred, masks, True, iou_weight=0.0, all_tokens=True)[0])
    assert best == pytest.approx(float(losses[0, 3]), rel=1e-5)
    assert every == pytest.approx(float(losses[0, 1:].mean()), rel=1e-5)
    assert every > best + 0.5


def test_the_size_exponent_draws_large_structures_more_often_and_the_mix_sets_the_prompt_kind(tmp_path):
    """A volume with one large and one small structure on every slice: uniform draws take each about half
    of the time; exponent 2 keeps the small one with probability (256 / 4096)² and so almost never."""
    rng = np.random.default_rng(0)
    labels = np.zeros((8, 64, 64), np.uint8)
    labels[:, 8:48, 8:48] = 1  # 160×160 of 256² once resized
    labels[:, 54:58, 54:58] = 2  # 16×16
    paths = tmp_path / "image.nii.gz", tmp_path / "labels.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(rng.normal(0, 100, labels.shape).astype(np.int16)), str(paths[0]))
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(paths[1]))
    data = load_training_set([paths], tiny(val_fraction=0.0))
    small_share = []
    for exponent in (0.0, 2.0):
        batch = make_batch(data, np.random.default_rng(5), 64, (1, 0, 0), size_exponent=exponent)
        small_share.append(float((batch.masks.sum(dim=(1, 2)) < LARGE_AREA_PX).float().mean()))
    assert 0.25 < small_share[0] < 0.75 and small_share[1] < 0.1
    # The size rule draws only when it is on (so a recipe without it keeps its random sequence): an exponent
    # that keeps every structure gives the same kind of batch but leaves the generator elsewhere.
    states = []
    for exponent in (0.0, 1e-12):
        generator = np.random.default_rng(5)
        make_batch(data, generator, 8, (1, 0, 0), size_exponent=exponent)
        states.append(generator.integers(1 << 30))
    assert states[1] != states[0]
    rng = np.random.default_rng(0)
    for mix, has_box, has_points in (((1, 0, 0), False, True), ((0, 1, 0), True, False),
                                     ((0, 0, 1), True, True)):  # fmt: skip
        prompts = sample_prompts(batch.masks, rng, mix)
        assert (prompts.boxes is not None) == has_box and (prompts.coords is not None) == has_points


def test_held_out_voxels_are_never_trained_on(crop, tmp_path):
    """A structure only inside the held-out axial band must be absent from every training view."""
    image_path, label_path = crop
    labels = sitk.ReadImage(str(label_path))
    arr = sitk.GetArrayFromImage(labels)
    held = held_out_band(arr.shape[0], FinetuneConfig.val_fraction)
    marked = arr.copy()
    marked[held.start : held.stop, 5:25, 5:25] = 9
    path = _write_like(tmp_path / "marked.nii.gz", marked, labels)
    data = load_training_set([(image_path, path)], tiny())
    assert any(value == 9 for _, value in data.validation)
    for items in data.slices:
        assert all(9 not in item.label_values and not (item.labels == 9).any() for item in items)


def test_slicer_segmentation_files_are_training_labels(crop, tmp_path):
    """A .seg.nrrd (Slicer saves it cropped to its content) gives the same samples as the label map."""
    from SAMMed2DSegmentLib.engine.geometry import SliceGeometry
    from SAMMed2DSegmentLib.formats.volumes import read_volume
    from SAMMed2DSegmentLib.mrml import scene, segmentations, volumes

    image_path, label_path = crop
    image, labels = read_volume(image_path), read_volume(label_path).array_kji
    hs = scene.create_headless_scene()
    node = volumes.add_volume_from_array(hs, image.array_kji, image.ijk_to_ras, "image")
    seg = segmentations.ensure_segmentation(hs, node)
    geometry = SliceGeometry.create(labels.shape, image.ijk_to_ras, "axial")
    for name, value in (("spleen", SPLEEN), ("liver", LIVER)):
        segment_id = segmentations.ensure_segment(seg, name)
        masks = {i: geometry.extract(labels == value, i) for i in range(geometry.num_slices)}
        segmentations.write_segment_slices(seg, segment_id, node, geometry, masks)
    path = segmentations.save_segmentation(seg, tmp_path / "labels.seg.nrrd")
    from_seg = load_training_set([(image_path, path)], tiny())
    from_map = load_training_set([crop], tiny())
    assert from_seg.samples_per_axis == from_map.samples_per_axis
    for a, b in zip(from_seg.slices[0], from_map.slices[0], strict=True):
        np.testing.assert_array_equal(a.labels > 0, b.labels > 0)


@pytest.fixture(scope="module")
def other_patient(tmp_path_factory) -> tuple[Path, Path]:
    """A 10×96×96 crop of MSD spleen 8 (a patient with a manual label) around its spleen."""
    msd = Path(__file__).parent / "Data" / "msd-spleen-8"
    folder = tmp_path_factory.mktemp("msd")
    image = sitk.ReadImage(str(msd / "spleen_8_ct.nii.gz"))
    labels = sitk.ReadImage(str(msd / "spleen_8_label.nii.gz"))
    k, j, i = (int(np.mean(a)) for a in np.nonzero(sitk.GetArrayFromImage(labels)))
    box = dict(index=[i - 48, j - 48, k - 5], size=[96, 96, 10])
    paths = folder / "image.nii.gz", folder / "labels.nii.gz"
    sitk.WriteImage(sitk.RegionOfInterest(image, box["size"], box["index"]), str(paths[0]))
    sitk.WriteImage(sitk.RegionOfInterest(labels, box["size"], box["index"]), str(paths[1]))
    return paths


def test_a_validation_volume_is_never_trained_on(crop, other_patient):
    """Every labelled axial slice of a --val-image volume is validation, and none of it is a training slice
    in any view; the training volume keeps exactly its own slices and held-out band."""
    alone = load_training_set([crop], tiny())
    both = load_training_set([crop], tiny(), validation_pairs=[other_patient])
    assert [len(s) for s in both.slices] == [len(s) for s in alone.slices]
    assert all(item.volume == 0 for items in both.slices for item in items)
    extra = [(item, v) for item, v in both.validation if item.volume == 1]
    assert len(both.validation) == len(alone.validation) + len(extra)
    labelled = sitk.GetArrayFromImage(sitk.ReadImage(str(other_patient[1]))).reshape(10, -1).sum(axis=1)
    assert {item.axis for item, _ in extra} == {"axial"}
    assert len(extra) == int((labelled >= tiny().min_pixels).sum()) > 0


def test_a_validation_volume_without_a_structure_is_refused(crop, tmp_path):
    """A label too small to score would leave the patient out of the mean without a word: under
    `min_pixels` on every slice, or large enough there (36 pixels of 512²) but under 10 pixels once the
    slice is resized to 256² (9). Refused before the output folder is made."""
    msd = Path(__file__).parent / "Data" / "msd-spleen-8"
    image = msd / "spleen_8_ct.nii.gz"
    for name, size in (("speck", 1), ("small", 6)):
        labels = sitk.ReadImage(str(msd / "spleen_8_label.nii.gz")) * 0
        for i in range(size):
            for j in range(size):
                labels[256 + i, 256 + j, 16] = 1
        path = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(labels, str(path))
        out = tmp_path / name
        with pytest.raises(FinetuneError, match="nothing to validate on"):
            finetune(tiny(steps=1), [crop], out, validation_pairs=[(image, path)])
        assert not out.exists()


def test_a_training_volume_is_refused_as_validation_volume(crop):
    with pytest.raises(FinetuneError, match="also a training volume"):
        load_training_set([crop], tiny(), validation_pairs=[crop])


def test_validation_averages_per_volume_then_over_volumes(crop, other_patient):
    """A second patient counts as much as the first, whatever its number of slices."""
    data = load_training_set([crop], tiny(), validation_pairs=[other_patient])
    torch.manual_seed(0)
    model = build_sam_med2d("small")
    batches = validation_batches(data, size=4)
    both = validate(model, batches)
    alone = []
    for volume in (0, 1):
        subset = TrainingSet(data.slices, [p for p in data.validation if p[0].volume == volume],
                             data.intensity)  # fmt: skip
        alone.append(validate(model, validation_batches(subset)))
    counts = [sum(1 for p in data.validation if p[0].volume == v) for v in (0, 1)]
    for name in ("point", "box"):
        # Batches of other sizes change the last float digits.
        expected = (alone[0][name] + alone[1][name]) / 2
        assert both[name] == pytest.approx(expected, abs=1e-5)
        pooled = (counts[0] * alone[0][name] + counts[1] * alone[1][name]) / sum(counts)
        assert abs(pooled - expected) > 1e-3  # else the test could not tell the two rules apart
    assert both["volume 1"] == pytest.approx(alone[1]["mean"], abs=1e-5)
    assert "volume 0" not in alone[0]  # one volume: the scores as before


def test_command_line_validation_volumes_come_in_pairs(crop, other_patient, tmp_path, capsys):
    image_path, label_path = crop
    argv = ["finetune", "--image", str(image_path), "--labels", str(label_path), "--steps", "1",
            "--out-dir", str(tmp_path / "r"), "--batch-size", "2", "--quiet",
            "--val-image", str(other_patient[0])]  # fmt: skip
    assert commands.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--val-labels: give them in pairs" in err[0], err
    both = ["--val-labels", str(other_patient[1])]
    assert commands.main([*argv, *both, "--val-labels", str(label_path)]) == 2
    assert "1 --val-image but 2 --val-labels" in capsys.readouterr().err
    # A validation volume is an input: no output may replace it (here through a link).
    link = tmp_path / "labels-link.safetensors"
    link.symlink_to(other_patient[1])
    assert commands.main([*argv, "--val-labels", str(link), "--export", str(link)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "same file" in err[0] and "--val-labels" in err[0], err
    assert not (tmp_path / "r").exists()
    assert commands.main([*argv, *both]) == 0
    with safe_open(str(tmp_path / "r" / "best.safetensors"), "pt") as f:
        assert "volume 1" in json.loads(f.metadata()["validation"])

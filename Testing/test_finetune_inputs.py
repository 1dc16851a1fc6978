"""Issue 24, item 5: `finetune` refuses in one line what it cannot use: a damaged `--resume` state (it ended
in tracebacks), a state with nothing left to train (it exited 0 silently), the image given as its own labels
(it trained on every grey level as a structure), and a `--batch-size` that cannot fit in memory (100000 ran
until memory ran out)."""

# ruff: noqa: F811 (the test functions take the imported `crop` fixture by name)
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from SAMMed2DSegmentLib import commands, memory
from SAMMed2DSegmentLib.finetune.settings import FinetuneConfig, training_memory_bytes
from SAMMed2DSegmentLib.finetune.training import finetune

from .test_finetune import crop  # noqa: F401 (the shared fixture)

#: The settings the command line below gives, so an API-made state resumes through it.
CLI_SETTINGS = {"steps": 2, "batch_size": 2, "eval_every": 2, "save_every": 1}


def _argv(image: Path, labels: Path, out_dir: Path, *extra: str) -> list[str]:
    options = [f"--{k.replace('_', '-')}={v}" for k, v in CLI_SETTINGS.items()]
    return [
        "finetune",
        "--image",
        str(image),
        "--labels",
        str(labels),
        "--out-dir",
        str(out_dir),
        *options,
        *extra,
    ]


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def state_after_one_step(crop, tmp_path_factory) -> Path:
    """A genuine training state after step 1 of 2, made with the command line's settings."""
    out = tmp_path_factory.mktemp("state")
    finetune(replace(FinetuneConfig(), **CLI_SETTINGS), [crop], out, stop_after=1)
    return out / "last.safetensors"


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata())


def _with_run(change):
    def damage(tensors: dict, metadata: dict) -> None:
        run = json.loads(metadata["run"])
        change(run)
        metadata["run"] = json.dumps(run)

    return damage


def _reshape_first(prefix: str):
    def damage(tensors: dict, metadata: dict) -> None:
        key = next(k for k in sorted(tensors) if k.startswith(prefix) and tensors[k].dim() >= 2)
        tensors[key] = tensors[key].reshape(-1)

    return damage


DAMAGES = {
    "run-not-json": lambda tensors, metadata: metadata.update(run="{not json"),
    "run-a-list": lambda tensors, metadata: metadata.update(run="[1, 2]"),
    "no-step": _with_run(lambda run: run.pop("step")),
    "no-config": _with_run(lambda run: run.pop("config")),
    "no-rng": _with_run(lambda run: run.pop("rng")),
    "no-param-groups": _with_run(lambda run: run.pop("param_groups")),
    "step-text": _with_run(lambda run: run.update(step="1")),
    "rng-garbage": _with_run(lambda run: run.update(rng={"bit_generator": "PCG64", "state": "garbage"})),
    "rng-other-generator": _with_run(lambda run: run.update(rng={"bit_generator": "Nope", "state": {}})),
    "param-groups-garbage": _with_run(lambda run: run.update(param_groups=[{"params": [0]}])),
    "optimizer-reshaped": _reshape_first("optim."),
    "optimizer-unknown-entry": lambda tensors, metadata: tensors.update({"optim.x.y": torch.zeros(1)}),
    "optimizer-nan": lambda tensors, metadata: tensors.update(
        {k: torch.full_like(v, float("nan")) for k, v in tensors.items() if k.endswith("exp_avg_sq")}
    ),
    "weights-reshaped": _reshape_first("model."),
    "weights-missing": lambda tensors, metadata: tensors.pop(
        next(k for k in sorted(tensors) if k.startswith("model."))
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_state_is_refused_in_one_line(crop, state_after_one_step, tmp_path, capsys, damage):
    tensors, metadata = _read(state_after_one_step)
    DAMAGES[damage](tensors, metadata)
    (tmp_path / "last.safetensors").write_bytes(save(tensors, metadata=metadata))
    assert commands.main(_argv(*crop, tmp_path, "--resume", "--quiet")) == commands.EXIT_BAD_INPUT
    line = _one_error_line(capsys)
    assert "last.safetensors" in line and "damaged" in line, line


def test_a_file_that_is_not_a_state_is_refused_in_one_line(crop, tmp_path, capsys):
    """The output plan sees it first: a file of another kind where a state would be written is not ours to
    read or replace."""
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"
    (tmp_path / "last.safetensors").write_bytes(garbage)
    assert commands.main(_argv(*crop, tmp_path, "--resume", "--quiet")) == commands.EXIT_BAD_INPUT
    line = _one_error_line(capsys)
    assert "last.safetensors" in line and "not a finetune training state" in line, line
    assert (tmp_path / "last.safetensors").read_bytes() == garbage


def test_a_genuine_state_still_resumes(crop, state_after_one_step, tmp_path, capsys):
    (tmp_path / "last.safetensors").write_bytes(state_after_one_step.read_bytes())
    assert commands.main(_argv(*crop, tmp_path, "--resume", "--quiet")) == 0


@pytest.mark.parametrize(("step", "says"), [(2, "all of --steps 2"), (7, "past of --steps 2")])
def test_a_state_with_nothing_left_to_train_says_so(crop, state_after_one_step, tmp_path, capsys, step, says):
    tensors, metadata = _read(state_after_one_step)
    _with_run(lambda run: run.update(step=step))(tensors, metadata)
    (tmp_path / "last.safetensors").write_bytes(save(tensors, metadata=metadata))
    assert commands.main(_argv(*crop, tmp_path, "--resume", "--quiet")) == commands.EXIT_BAD_INPUT
    line = _one_error_line(capsys)
    assert f"has already trained {step} steps, {says}: nothing left to train" in line, line


def test_the_image_as_its_own_labels_is_refused(crop, tmp_path, capsys):
    image, _ = crop
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(image.read_bytes())
    for labels in (image, copy):
        assert commands.main(_argv(image, labels, tmp_path / "out", "--quiet")) == commands.EXIT_BAD_INPUT
        assert "hold the same voxels as the image" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_an_absurd_batch_size_is_refused_with_an_estimate_before_any_work(
    crop, tmp_path, capsys, monkeypatch
):
    def no_reading(*args, **kwargs):
        raise AssertionError("the volumes were read before the batch size was checked")

    monkeypatch.setattr("SAMMed2DSegmentLib.finetune.training.load_training_set", no_reading)
    argv = _argv(*crop, tmp_path / "out", "--quiet")
    argv[argv.index("--batch-size=2")] = "--batch-size=100000"
    assert commands.main(argv) == commands.EXIT_BAD_INPUT
    line = _one_error_line(capsys)
    assert line.startswith("error: --batch-size 100000 with the small build: that needs about 5,0")
    assert line.endswith("; lower --batch-size")
    assert not (tmp_path / "out").exists()


def test_the_estimate_grows_with_the_batch_and_the_build(monkeypatch):
    assert training_memory_bytes("small", 16) < training_memory_bytes("small", 512) < 30e9
    assert training_memory_bytes("small", 16) < training_memory_bytes("vit_b", 16)
    # A batch that fits passes; the same batch with too little memory is refused.
    monkeypatch.setattr(memory, "available_memory", lambda: int(training_memory_bytes("small", 16)))
    memory.require_memory(training_memory_bytes("small", 16), "fits")
    with pytest.raises(memory.NotEnoughMemory):
        memory.require_memory(training_memory_bytes("small", 17), "does not fit")

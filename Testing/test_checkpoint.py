"""Checkpoint loading: safe unpickling, strict key checks, safetensors conversion and cache (DESIGN §2.1)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from SAMMed2DSegmentLib.model import build_sam_med2d
from SAMMed2DSegmentLib.weights import checkpoint as ck
from SAMMed2DSegmentLib.weights.checkpoint import (
    CheckpointError,
    cached_safetensors_path,
    convert_to_safetensors,
    infer_build,
    load_checkpoint_object,
    load_into,
    load_model,
    resolve_device,
    sha256_file,
)
from SAMMed2DSegmentLib.weights.finite_weights import is_recorded_finite, record_path

REFERENCE = Path(__file__).parent / "Data" / "reference"


class NotAllowed:
    """A class no checkpoint loader should instantiate."""

    def __init__(self) -> None:
        self.payload = 1


class SystemCall:
    """Pickles as `os.system(command)`: executing it on load would create the marker file."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class PopenCall:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def __reduce__(self):
        return (subprocess.Popen, (self.argv,))


def _marker_command(marker: Path) -> str:
    return f"\"{sys.executable}\" -c \"open(r'{marker}', 'w').close()\""


@pytest.fixture(scope="module")
def trained() -> tuple[dict[str, torch.Tensor], dict[str, torch.optim.Optimizer]]:
    """The small build's weights after one optimizer step, plus Adam/AdamW/SGD objects holding state."""
    torch.manual_seed(0)
    model = build_sam_med2d("small")
    for p in model.parameters():
        p.data.normal_(0.0, 0.02)
    optimizers = {
        "Adam": torch.optim.Adam(model.parameters(), lr=1e-3),
        "AdamW": torch.optim.AdamW(model.parameters(), lr=1e-3),
        "SGD": torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9),
    }
    for p in model.parameters():  # gradients without autograd: one step is all the optimizers need
        p.grad = torch.randn_like(p)
    for opt in optimizers.values():
        opt.step()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return sd, optimizers


def _assert_same(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert list(got) == list(sd)
    for key, value in sd.items():
        assert torch.equal(got[key], value), key


def _no_optimizer_code(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every real optimizer hook record its use, so a loader that unpickles them is caught."""
    calls: list[str] = []

    def record(name: str):
        def hook(self, *args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called while loading a checkpoint")

        return hook

    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Optimizer):
        monkeypatch.setattr(cls, "__setstate__", record(f"{cls.__name__}.__setstate__"))
        monkeypatch.setattr(cls, "__init__", record(f"{cls.__name__}.__init__"))
    return calls


# ----------------------------------------------------------------------------------------------------
# Accepted layouts


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "SGD"])
def test_official_layout_with_pickled_optimizer(tmp_path, monkeypatch, trained, optimizer):
    sd, optimizers = trained
    opt = optimizers[optimizer]
    assert opt.state, "the optimizer must hold state for this test to mean anything"
    path = tmp_path / "sam-med2d_small.pth"
    torch.save({"model": sd, "optimizer": opt, "epoch": 3}, path)
    calls = _no_optimizer_code(monkeypatch)

    obj = load_checkpoint_object(path)
    state, _ = ck.extract_state_dict(obj)
    model = build_sam_med2d(infer_build(state))
    load_into(model, state)

    assert calls == []
    assert not isinstance(obj["optimizer"], torch.optim.Optimizer)
    assert obj["epoch"] == 3
    _assert_same(model, sd)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_plain_state_dict(tmp_path, trained, zip_format):
    sd, _ = trained
    path = tmp_path / "plain.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    model, info = load_model(path, use_cache=False)
    _assert_same(model, sd)
    assert not model.training
    assert info.build == "small" and info.used_cache is False
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_state_dict_key(tmp_path, trained):
    sd, _ = trained
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": sd, "step": 10}, path)
    model, _ = load_model(path, use_cache=False)
    _assert_same(model, sd)


def test_dataparallel_prefix_is_stripped(tmp_path, trained):
    sd, _ = trained
    path = tmp_path / "dp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    model, info = load_model(path, use_cache=False)
    _assert_same(model, sd)
    assert any("module." in note for note in info.notes)


def test_partial_module_prefix_is_not_stripped(tmp_path, trained):
    sd, _ = trained
    first = next(iter(sd))
    mixed = {(f"module.{k}" if k == first else k): v for k, v in sd.items()}
    with pytest.raises(CheckpointError) as err:
        load_into(build_sam_med2d("small"), ck.extract_state_dict(mixed)[0])
    assert f"module.{first}" in str(err.value)
    assert "missing keys (1)" in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_loads_as_float32(tmp_path, trained, dtype):
    sd, _ = trained
    path = tmp_path / "half.pth"
    torch.save({"model": {k: v.to(dtype) for k, v in sd.items()}}, path)
    model, _ = load_model(path, use_cache=False)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, sd[key].to(dtype).float()), key


# ----------------------------------------------------------------------------------------------------
# Refused files


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"model": SystemCall(_marker_command(marker))}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    cache = tmp_path / "cache"

    with pytest.raises(CheckpointError) as err:
        load_checkpoint_object(path)
    with pytest.raises(CheckpointError):
        load_model(path, cache_dir=cache)

    message = str(err.value)
    assert "refusing to load" in message
    assert "system" in message
    assert not marker.exists()
    assert not cache.exists() or not any(cache.iterdir())


def test_unknown_class_is_refused(tmp_path, trained):
    sd, _ = trained
    path = tmp_path / "extra.pth"
    torch.save({"model": sd, "extra": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="refusing to load.*NotAllowed"):
        load_checkpoint_object(path)


def test_popen_is_refused(tmp_path):
    marker = tmp_path / "popen-ran"
    path = tmp_path / "popen.pth"
    torch.save({"model": PopenCall([sys.executable, "-c", f"open(r'{marker}', 'w').close()"])}, path)
    with pytest.raises(CheckpointError, match="refusing to load.*Popen"):
        load_checkpoint_object(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [b"", os.urandom(4096), b"this is a text file, not a checkpoint\n" * 10],
    ids=["empty", "random", "text"],
)
def test_garbage_file_is_refused(tmp_path, content):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(path, use_cache=False)


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_truncated_file_is_refused(tmp_path, trained, kind):
    sd, _ = trained
    full = tmp_path / "full.pth"
    torch.save({"model": sd}, full)
    if kind == "safetensors":
        converted = tmp_path / "full.safetensors"
        convert_to_safetensors(full, converted)
        full = converted
    data = full.read_bytes()
    path = tmp_path / f"truncated.{kind}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(path, use_cache=False)


def test_checkpoint_without_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save({"epoch": 1, "weights": [torch.zeros(2)]}, path)
    with pytest.raises(CheckpointError, match="no model state dict.*'epoch'"):
        load_model(path, use_cache=False)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pth")


# ----------------------------------------------------------------------------------------------------
# Strict loading


def test_wrong_keys_are_all_listed(trained):
    sd, _ = trained
    bad = dict(sd)
    del bad["mask_decoder.iou_prediction_head.layers.0.bias"]
    bad["mask_decoder.extra_head.weight"] = torch.zeros(3)
    bad["image_encoder.pos_embed"] = torch.zeros(1, 8, 8, 64)
    model = build_sam_med2d("small")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(CheckpointError) as err:
        load_into(model, bad)

    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "missing keys (1)" in message and "mask_decoder.iou_prediction_head.layers.0.bias" in message
    assert "unexpected keys (1)" in message and "mask_decoder.extra_head.weight" in message
    assert "mis-shaped keys (1)" in message and "image_encoder.pos_embed" in message
    assert "[1, 8, 8, 64]" in message and "[1, 16, 16, 64]" in message
    for key, value in model.state_dict().items():  # nothing was half-loaded
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("problem", ["missing", "unexpected", "misshaped"])
def test_each_key_problem_alone_is_reported(tmp_path, trained, problem):
    sd, _ = trained
    bad = dict(sd)
    key = "prompt_encoder.point_embeddings.0.weight"
    if problem == "missing":
        del bad[key]
    elif problem == "unexpected":
        key = "prompt_encoder.not_a_layer.weight"
        bad[key] = torch.zeros(1)
    else:
        bad[key] = torch.zeros(1, 7)
    path = tmp_path / "bad.pth"
    torch.save({"model": bad}, path)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_model(path, use_cache=False)


# ----------------------------------------------------------------------------------------------------
# Build inference


def _meta_state_dict(name: str) -> dict[str, torch.Tensor]:
    layout = json.loads((REFERENCE / f"sammed2d_{name}_state_dict.json").read_text())
    return {key: torch.empty(shape, device="meta") for key, shape in layout}


def test_infer_build_recognises_both_builds(trained):
    sd, _ = trained
    assert infer_build(sd) == "small"
    assert infer_build(_meta_state_dict("small")) == "small"
    assert infer_build(_meta_state_dict("vit_b")) == "vit_b"


def test_infer_build_rejects_unknown_layouts():
    wide = _meta_state_dict("small")
    wide["image_encoder.pos_embed"] = torch.empty(1, 16, 16, 128, device="meta")
    with pytest.raises(CheckpointError, match=r"\[1, 16, 16, 128\]"):
        infer_build(wide)

    shallow = {k: v for k, v in _meta_state_dict("vit_b").items() if ".blocks.11." not in k}
    with pytest.raises(CheckpointError, match="11 encoder blocks"):
        infer_build(shallow)

    plain_sam = {k: v for k, v in _meta_state_dict("vit_b").items() if ".Adapter." not in k}
    with pytest.raises(CheckpointError, match="adapters absent"):
        infer_build(plain_sam)

    sam_1024 = _meta_state_dict("vit_b")
    sam_1024["image_encoder.pos_embed"] = torch.empty(1, 64, 64, 768, device="meta")
    with pytest.raises(CheckpointError, match=r"\[1, 64, 64, 768\]"):
        infer_build(sam_1024)


def test_explicit_build_overrides_inference(tmp_path, trained, monkeypatch):
    import SAMMed2DSegmentLib.model as model_pkg

    sd, _ = trained
    path = tmp_path / "small.pth"
    torch.save(sd, path)
    requested: list[str] = []

    def small_instead(config: str):  # records the request without allocating the 1.1 GB vit_b
        requested.append(config)
        return build_sam_med2d("small")

    monkeypatch.setattr(model_pkg, "build_sam_med2d", small_instead)
    load_model(path, build="vit_b", use_cache=False)
    load_model(path, use_cache=False)
    assert requested == ["vit_b", "small"]


def test_sha256_file_streams(tmp_path):
    path = tmp_path / "blob.bin"
    data = os.urandom(100_003)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk_size=4096) == hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------------
# Safetensors conversion and cache


def test_convert_to_safetensors_round_trip(tmp_path, trained, monkeypatch):
    from safetensors import safe_open

    sd, optimizers = trained
    src = tmp_path / "official.pth"
    torch.save({"model": sd, "optimizer": optimizers["Adam"]}, src)
    dst = tmp_path / "out" / "weights.safetensors"
    dst.parent.mkdir()
    calls = _no_optimizer_code(monkeypatch)

    metadata = convert_to_safetensors(src, dst)
    assert calls == []

    expected_sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert sha256_file(src) == expected_sha
    with safe_open(str(dst), framework="pt") as fh:
        stored = fh.metadata()
        assert sorted(fh.keys()) == sorted(sd)
    assert metadata == stored
    assert stored["format"] == "sammed2d-state-dict/1"
    assert stored["build"] == "small"
    assert stored["source_sha256"] == expected_sha
    assert [p.name for p in dst.parent.iterdir()] == ["weights.safetensors"]  # no temp file left

    model, info = load_model(dst)
    _assert_same(model, sd)
    assert info.sha256 == hashlib.sha256(dst.read_bytes()).hexdigest()  # the loaded file's, not a claim in it
    assert info.used_cache is False


def test_the_identity_is_the_loaded_files_hash_never_a_claim_inside_it(tmp_path, trained, monkeypatch):
    """Two different weights files whose metadata both claim one source hash get two identities; the
    hash of each is remembered (not recomputed) while the file is unchanged."""
    from safetensors.torch import save_file

    sd, _ = trained
    claim = {"format": ck.FORMAT_TAG, "build": "small", "source_sha256": "c" * 64}
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(first), metadata=claim)
    save_file({k: (v * 1.5).contiguous() for k, v in sd.items()}, str(second), metadata=claim)
    cache = tmp_path / "cache"
    infos = [load_model(path, cache_dir=cache)[1] for path in (first, second)]
    assert [i.sha256 for i in infos] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)]
    hashed = []
    real_hash = ck.sha256_file
    monkeypatch.setattr(
        ck, "sha256_file", lambda path, *a, **k: hashed.append(path) or real_hash(path, *a, **k)
    )
    assert load_model(first, cache_dir=cache)[1].sha256 == infos[0].sha256 and hashed == []
    first.write_bytes(second.read_bytes())  # replaced: hashed again
    assert load_model(first, cache_dir=cache)[1].sha256 == infos[1].sha256 and hashed == [first]


def test_a_stale_conversion_is_deleted_only_when_it_is_ours(tmp_path, trained):
    sd, _ = trained
    src, cache = tmp_path / "model.pth", tmp_path / "cache"
    torch.save(sd, src)
    load_model(src, cache_dir=cache)
    stale = cached_safetensors_path(src, cache)
    stale.write_bytes(b"the user's own file under that name")
    torch.save({k: v * 2 for k, v in sd.items()}, src)  # a new version: the old conversion is stale
    load_model(src, cache_dir=cache)
    assert stale.read_bytes() == b"the user's own file under that name"
    ours = cached_safetensors_path(src, cache)
    torch.save({k: v * 3 for k, v in sd.items()}, src)  # and now ours, which is deleted
    load_model(src, cache_dir=cache)
    assert not ours.exists() and cached_safetensors_path(src, cache).is_file()


def test_conversion_failure_leaves_no_file(tmp_path, trained, monkeypatch):
    import safetensors.torch

    sd, _ = trained
    src = tmp_path / "m.pth"
    torch.save(sd, src)
    out = tmp_path / "out"
    out.mkdir()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_to_safetensors(src, out / "m.safetensors")
    assert list(out.iterdir()) == []


def test_cache_is_reused_and_invalidated(tmp_path, trained, monkeypatch):
    sd, _ = trained
    src = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, src)
    cache = tmp_path / "cache"

    conversions: list[Path] = []
    hashes: list[Path] = []
    real_convert, real_hash = ck._write_safetensors, ck.sha256_file

    def counting_convert(sd, dst, metadata):
        conversions.append(Path(dst))
        return real_convert(sd, dst, metadata)

    def counting_hash(path, *args):
        hashes.append(Path(path))
        return real_hash(path, *args)

    monkeypatch.setattr(ck, "_write_safetensors", counting_convert)
    monkeypatch.setattr(ck, "sha256_file", counting_hash)

    model, info = load_model(src, cache_dir=cache)
    _assert_same(model, sd)
    cached = cached_safetensors_path(src, cache)
    assert info.used_cache and info.converted and Path(info.loaded_from) == cached
    assert cached.is_file() and len(conversions) == 1 and len(hashes) == 1
    first_mtime = cached.stat().st_mtime_ns

    model, info = load_model(src, cache_dir=cache)
    _assert_same(model, sd)
    assert info.used_cache and not info.converted
    assert len(conversions) == 1 and len(hashes) == 1  # neither re-converted nor re-hashed
    assert cached.stat().st_mtime_ns == first_mtime
    assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()

    changed = {k: v + 1.0 for k, v in sd.items()}
    torch.save({"model": changed}, src)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, first_mtime + 5_000_000_000))
    model, info = load_model(src, cache_dir=cache)
    _assert_same(model, changed)
    assert info.converted and len(conversions) == 2
    assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert cached_safetensors_path(src, cache) != cached
    assert not cached.exists()  # the stale conversion was removed
    assert len(list(cache.glob("*.safetensors"))) == 1


def test_same_size_same_mtime_swap_loads_the_new_weights(tmp_path, trained):
    """Issue 11, finding 5: the cache used to be keyed on path, size and mtime."""
    sd, _ = trained
    src = tmp_path / "model.pth"
    torch.save({"model": sd}, src)
    cache = tmp_path / "cache"
    _, first = load_model(src, cache_dir=cache)
    changed = {k: v + 1.0 for k, v in sd.items()}
    other = tmp_path / "other.pth"
    torch.save({"model": changed}, other)
    assert other.stat().st_size == src.stat().st_size
    st = src.stat()
    with src.open("r+b") as fh:  # in place: same path, inode and size
        fh.write(other.read_bytes())
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (src.stat().st_size, src.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    model, info = load_model(src, cache_dir=cache)
    _assert_same(model, changed)
    assert info.sha256 == hashlib.sha256(other.read_bytes()).hexdigest() != first.sha256
    assert info.converted


def test_rejected_checkpoint_leaves_nothing_in_the_cache(tmp_path, trained):
    sd, _ = trained
    cache = tmp_path / "cache"
    broken = dict(sd)
    key = next(k for k, v in sd.items() if v.is_floating_point())
    broken[key] = torch.full_like(sd[key], float("nan"))
    nan_file = tmp_path / "nan.pth"
    torch.save({"model": broken}, nan_file)
    with pytest.raises(ck.CheckpointError, match="NaN"):
        load_model(nan_file, cache_dir=cache)
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": {k: v for k, v in sd.items() if k != key}}, wrong)
    with pytest.raises(ck.CheckpointError):
        load_model(wrong, cache_dir=cache)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_corrupt_cache_entry_is_rebuilt(tmp_path, trained):
    sd, _ = trained
    src = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, src)
    cache = tmp_path / "cache"
    cache.mkdir()
    cached_safetensors_path(src, cache).write_bytes(b"junk")
    model, info = load_model(src, cache_dir=cache)
    _assert_same(model, sd)
    assert info.converted


def test_default_cache_dir_from_environment(tmp_path, monkeypatch):
    src = tmp_path / "x.pth"
    src.write_bytes(b"x")
    monkeypatch.setenv("SAMMED2D_CACHE_DIR", str(tmp_path / "envcache"))
    assert cached_safetensors_path(src).parent == tmp_path / "envcache"
    monkeypatch.delenv("SAMMED2D_CACHE_DIR")
    assert cached_safetensors_path(src).parent == Path.home() / ".cache" / "sammed2d"


def test_unwritable_cache_falls_back_to_direct_load(tmp_path, trained, caplog):
    sd, _ = trained
    src = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, src)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger=ck.__name__):
        model, info = load_model(src, cache_dir=blocker / "cache")
    _assert_same(model, sd)
    assert not info.used_cache and Path(info.loaded_from) == src.resolve()
    assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert "cache" in caplog.text


# ----------------------------------------------------------------------------------------------------
# Devices


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
        assert resolve_device("auto").type in {"cpu", "mps"}
    if not (torch.backends.mps.is_available()):
        with pytest.raises(ValueError, match="MPS"):
            resolve_device("mps")


def test_load_model_rejects_unknown_device(tmp_path):
    with pytest.raises(ValueError, match="unknown device"):
        load_model(tmp_path / "whatever.pth", device="gpu")


def test_load_model_assigns_weights_without_a_second_copy(tmp_path):
    """load_model builds on the meta device and assigns the checkpoint's tensors: nothing is left on meta,
    the constants are back, results equal a plain copy-load, and editing the model never edits the file."""
    from safetensors.torch import save_file

    from Testing.synthetic_weights import synthetic_state_dict

    sd = synthetic_state_dict("small")
    path = tmp_path / "small.safetensors"
    save_file(sd, str(path))
    model, _ = load_model(path, use_cache=False)
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(t.is_meta for t in tensors)
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    reference = build_sam_med2d("small")
    reference.load_state_dict(sd)
    torch.testing.assert_close(model.pixel_mean, reference.pixel_mean, rtol=0, atol=0)
    for key, value in reference.state_dict().items():  # the same numbers, bit for bit
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    # Outputs agree to rounding: memory-mapped and heap tensors may take different SIMD reduction orders.
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        torch.testing.assert_close(model.image_encoder(x), reference.image_encoder(x), rtol=0, atol=1e-5)
    with torch.no_grad():
        model.image_encoder.pos_embed.add_(1.0)
    again, _ = load_model(path, use_cache=False)
    torch.testing.assert_close(again.image_encoder.pos_embed, sd["image_encoder.pos_embed"], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# Issue 27, item 4: the NaN/infinity check runs once per cached conversion, recorded beside it


def _counting_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the weight checks (the real check still runs)."""
    calls: list[int] = []
    real = ck.nonfinite_tensors

    def counting(sd):
        calls.append(len(sd))
        return real(sd)

    monkeypatch.setattr(ck, "nonfinite_tensors", counting)
    return calls


def _nan_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = next(k for k, v in sd.items() if v.is_floating_point())
    return {k: torch.full_like(v, float("nan")) if k == key else v.clone() for k, v in sd.items()}


def _write_conversion(cached: Path, sd: dict[str, torch.Tensor], sha: str) -> None:
    """A cached conversion as `load_model` writes it (our format tag, the source's hash), of weights `sd`."""
    from safetensors.torch import save_file

    cached.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(cached), metadata={"format": ck.FORMAT_TAG, "build": "small", "source_sha256": sha})


def test_a_conversion_is_checked_once_and_a_missing_or_damaged_record_checks_again(tmp_path, trained,
                                                                                  monkeypatch):  # fmt: skip
    sd, _ = trained
    src = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, src)
    cache = tmp_path / "cache"
    checks = _counting_checks(monkeypatch)
    _, info = load_model(src, cache_dir=cache)
    cached = cached_safetensors_path(src, cache)
    record = record_path(cached)
    assert info.converted and len(checks) == 1 and record.is_file()
    assert is_recorded_finite(cached, info.sha256)

    model, info = load_model(src, cache_dir=cache)
    _assert_same(model, sd)
    assert info.used_cache and not info.converted and len(checks) == 1  # not checked again

    good = record.read_text(encoding="utf-8")
    other_source = json.dumps({**json.loads(good), "source_sha256": "0" * 64})
    for damage in (None, "", "{not json", "[]", other_source):
        if damage is None:
            record.unlink()
        else:
            record.write_text(damage, encoding="utf-8")
        before = len(checks)
        model, info = load_model(src, cache_dir=cache)
        _assert_same(model, sd)
        assert not info.converted and len(checks) == before + 1, damage  # checked again, not re-converted
        assert record.read_text(encoding="utf-8") == good  # and recorded again
    load_model(src, cache_dir=cache)
    assert len(checks) == before + 1


def test_nan_weights_in_a_cached_conversion_are_never_loaded(tmp_path, trained, caplog):
    """A conversion rewritten with NaN (its record now stale), or with its record missing or damaged: it is
    checked, ignored and converted again from the source, which holds the good weights."""
    sd, _ = trained
    src = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, src)
    cache = tmp_path / "cache"
    _, info = load_model(src, cache_dir=cache)
    cached = cached_safetensors_path(src, cache)
    for record in ("stale", "missing", "damaged"):
        _write_conversion(cached, _nan_weights(sd), info.sha256)
        if record == "missing":
            record_path(cached).unlink()
        elif record == "damaged":
            record_path(cached).write_text("{", encoding="utf-8")
        with caplog.at_level(logging.WARNING, logger=ck.log.name):
            model, again = load_model(src, cache_dir=cache)
        _assert_same(model, sd)
        assert again.converted and "NaN" in caplog.text, record
        assert is_recorded_finite(cached, info.sha256)
        caplog.clear()


def test_a_checkpoint_holding_nan_is_refused_at_conversion_and_with_its_record_missing_or_damaged(
    tmp_path, trained
):
    sd, _ = trained
    src = tmp_path / "nan.pth"
    torch.save({"model": _nan_weights(sd)}, src)
    cache = tmp_path / "cache"
    with pytest.raises(ck.CheckpointError, match="NaN"):  # at conversion: nothing cached
        load_model(src, cache_dir=cache)
    assert not cache.exists() or not list(cache.glob("*.safetensors")) + list(cache.glob("*.finite.json"))
    # A conversion of it in the cache (written by hand, say), without a valid record: still refused.
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    cached = cached_safetensors_path(src, cache)
    _write_conversion(cached, _nan_weights(sd), sha)
    for record in (None, "{", json.dumps({"format": "x"})):
        if record is not None:
            record_path(cached).write_text(record, encoding="utf-8")
        with pytest.raises(ck.CheckpointError, match="NaN"):
            load_model(src, cache_dir=cache)
        assert not is_recorded_finite(cached, sha)


def test_a_stale_conversion_goes_with_its_record(tmp_path, trained):
    sd, _ = trained
    src = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, src)
    cache = tmp_path / "cache"
    load_model(src, cache_dir=cache)
    first = cached_safetensors_path(src, cache)
    torch.save({"model": {k: v + 1.0 for k, v in sd.items()}}, src)
    load_model(src, cache_dir=cache)
    assert not first.exists() and not record_path(first).exists()
    assert sorted(p.name for p in cache.glob("*.finite.json")) == [
        record_path(cached_safetensors_path(src, cache)).name
    ]


def test_loading_a_cached_conversion_imports_neither_dynamo_nor_sympy(tmp_path, trained):
    """Issue 27, cold start: building the network on the meta device once drew its random initial values
    through torch's reference ops, which import torch._dynamo and sympy (over 2 s of every engine start)."""
    sd, _ = trained
    path = tmp_path / "small.pth"
    torch.save({"model": sd}, path)
    load_model(path, cache_dir=tmp_path / "cache")  # the conversion, as on the first start
    script = (
        "import sys\n"
        "from SAMMed2DSegmentLib.weights.checkpoint import load_model\n"
        f"model, _ = load_model({str(path)!r}, cache_dir={str(tmp_path / 'cache')!r})\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    lib = str(Path(ck.__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": lib}).stdout  # fmt: skip
    assert out.strip().splitlines()[-1] == "[]"

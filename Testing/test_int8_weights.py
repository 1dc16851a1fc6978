"""The int8 products and their weights kept between starts (`model/int8_linear.py`,
`weights/int8_weights.py`): the same product as torch's dynamic-quantization module, the same embedding
whether the weights were kept or quantized anew, and a kept file that is damaged, foreign or unwritable never
trusted, never fatal, and never a reason to replace a file that is not ours."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
from SAMMed2DSegmentLib.model import lowp_encoder
from SAMMed2DSegmentLib.model.int8_linear import Int8Linear, QuantizedWeight, int8_available, quantize
from SAMMed2DSegmentLib.weights.checkpoint import load_model
from SAMMed2DSegmentLib.weights.int8_weights import FORMAT_TAG, Int8WeightsFile

pytestmark = pytest.mark.skipif(
    not int8_available(), reason="int8: this PyTorch has no dynamic int8 products for this CPU"
)

SHA = "5e" * 32


@pytest.fixture
def image() -> np.ndarray:
    return (np.random.default_rng(0).random((120, 100)) * 255).astype(np.uint8)


def _embedding(model, image, int8_file=None, prepared=None) -> torch.Tensor:
    """The int8 embedding of `image`; `prepared` collects whether the weights were quantized here."""
    predictor = SamMed2DPredictor(model, precision="int8", int8_file=int8_file)
    encoder = predictor.lowp_encoder
    if prepared is not None:
        prepared.append(encoder.int8_quantized_here)
    predictor.set_image(image)
    return predictor.get_image_embedding()


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's notice that the module is deprecated
def test_the_product_is_torchs_dynamic_per_channel_linear():
    """Packed once at scale 1 with the per-channel scales applied after: torch's module's own result, to
    fp32 rounding."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200)
    x = torch.randn(37, 96)
    module = torch.ao.quantization.quantize_dynamic(
        torch.nn.Sequential(linear), {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
        dtype=torch.qint8,
    )  # fmt: skip
    with torch.no_grad():
        expected = module(x)
        ours = Int8Linear(quantize(linear.weight))(x, linear.bias)
        exact = linear(x)
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert not torch.equal(ours, exact)  # it is an int8 product, not the float one


def test_kept_weights_give_the_same_embedding_and_skip_the_quantization(small_model, image, tmp_path):
    file = Int8WeightsFile.in_cache(SHA, tmp_path)
    prepared: list[bool] = []
    fresh = _embedding(small_model, image, file, prepared)
    assert file.path.is_file()
    kept = _embedding(small_model, image, file, prepared)
    assert prepared == [True, False]
    assert torch.equal(kept, fresh)
    assert torch.equal(_embedding(small_model, image), fresh)  # and without any file


@pytest.mark.parametrize("damage", ["other model", "other torch"])
def test_another_models_or_another_torchs_file_is_not_used_and_is_rewritten(small_model, image, tmp_path,
                                                                            damage):  # fmt: skip
    file = Int8WeightsFile.in_cache(SHA, tmp_path)
    fresh = _embedding(small_model, image, file)
    weights = file.read()
    if damage == "other model":
        Int8WeightsFile(file.path, "00" * 32).write(weights)
    else:
        from safetensors.torch import save_file

        tensors = {f"{k}{part}": getattr(w, field) for k, w in weights.items()
                   for part, field in ((".values", "values"), (".scales", "scales"))}  # fmt: skip
        metadata = {"format": FORMAT_TAG, "model_sha256": SHA, "torch": "1.0"}
        save_file(tensors, str(file.path), metadata=metadata)
    assert file.read() == {}
    prepared: list[bool] = []
    assert torch.equal(_embedding(small_model, image, file, prepared), fresh)
    assert prepared == [True] and set(file.read()) == set(weights)  # rewritten whole


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_unreadable_file_is_not_used_and_left_alone(small_model, image, tmp_path, damage, caplog):
    """Our writes are atomic, so an unreadable file under our name may be anybody's: it is named in the log
    (delete it to keep the weights again) and never replaced."""
    file = Int8WeightsFile.in_cache(SHA, tmp_path)
    fresh = _embedding(small_model, image, file)
    data = file.path.read_bytes()
    damaged = data[: len(data) // 2] if damage == "truncated" else b"\0" * 4096
    file.path.write_bytes(damaged)
    assert file.read() == {}
    prepared: list[bool] = []
    assert torch.equal(_embedding(small_model, image, file, prepared), fresh)
    assert prepared == [True] and file.path.read_bytes() == damaged
    assert f"{file.path} exists and cannot be read as SAMMed2D's int8 weights" in caplog.text


@pytest.mark.parametrize("fault", ["nan scale", "zero scale", "negative scale", "wrong shape", "float values",
                                   "columns reordered", "last row", "missing"])  # fmt: skip
def test_an_entry_that_does_not_fit_its_weight_is_quantized_anew(small_model, image, tmp_path, fault):
    file = Int8WeightsFile.in_cache(SHA, tmp_path)
    fresh = _embedding(small_model, image, file)
    weights = file.read()
    name = sorted(weights)[0]
    values, scales = weights[name].values.clone(), weights[name].scales.clone()
    if fault == "nan scale":
        scales[3] = float("nan")
    elif fault == "zero scale":
        scales[0] = 0.0
    elif fault == "negative scale":
        scales[-1] = -scales[-1]
    elif fault == "columns reordered":  # kept before a change of layout: shapes and scales still fit
        values = values.flip(1)
    elif fault == "last row":
        values[-1] = values[-1] // 2
    elif fault == "wrong shape":
        values = values[:-1]
    elif fault == "float values":
        values = values.float()
    if fault == "missing":
        del weights[name]
    else:
        weights[name] = QuantizedWeight(values, scales)
    assert file.write(weights)
    prepared: list[bool] = []
    assert torch.equal(_embedding(small_model, image, file, prepared), fresh)
    assert prepared == [True]
    assert weights.keys() <= file.read().keys()


def test_a_file_that_is_not_ours_is_never_replaced(small_model, image, tmp_path):
    file = Int8WeightsFile.in_cache(SHA, tmp_path)
    file.path.parent.mkdir(parents=True, exist_ok=True)
    file.path.write_bytes(b"somebody's file")
    _embedding(small_model, image, file)
    assert file.path.read_bytes() == b"somebody's file"
    file.remove()
    assert file.path.read_bytes() == b"somebody's file"


def test_an_unwritable_cache_costs_only_the_quantization(small_model, image, tmp_path, caplog):
    """Where the folder cannot be made (a file stands in its place, which stops root too) the start goes
    on with the weights quantized here."""
    (tmp_path / "cache").write_text("a file, not a folder")
    file = Int8WeightsFile.in_cache(SHA, tmp_path / "cache")
    assert torch.equal(_embedding(small_model, image, file), _embedding(small_model, image))
    assert "cannot keep the int8 weights" in caplog.text


def test_the_stale_conversions_int8_weights_go_with_it(tmp_path):
    """A new version of a checkpoint makes the old one's conversion stale: its int8 weights (ours) are
    deleted with it; another model's stay."""
    from SAMMed2DSegmentLib.model import build_sam_med2d

    torch.manual_seed(0)
    src, cache = tmp_path / "model.pth", tmp_path / "cache"
    state = build_sam_med2d("small").state_dict()
    torch.save(state, src)
    model, info = load_model(src, cache_dir=cache)
    old = Int8WeightsFile.in_cache(info.sha256, cache)
    assert SamMed2DPredictor(model, precision="int8", int8_file=old).lowp_encoder is not None
    other = Int8WeightsFile.in_cache("ab" * 32, cache)
    assert other.write({}) and old.path.is_file()
    torch.save({k: v * 2 for k, v in state.items()}, src)
    load_model(src, cache_dir=cache)
    assert not old.path.exists() and other.path.is_file()


def test_weights_are_quantized_once_per_name_across_the_preparing_threads(small_model, tmp_path, monkeypatch):
    """The blocks are prepared on several threads; every int8 product is recorded once, under its own name."""
    shapes: list[tuple[int, ...]] = []
    lock = threading.Lock()
    real = lowp_encoder.quantize

    def counting(weight):
        with lock:
            shapes.append(tuple(weight.shape))
        return real(weight)

    monkeypatch.setattr(lowp_encoder, "quantize", counting)
    encoder = lowp_encoder.LowPrecisionEncoder(small_model.image_encoder, torch.qint8)
    blocks = len(small_model.image_encoder.blocks)
    adapters = sum(block.Adapter is not None for block in small_model.image_encoder.blocks)
    assert len(encoder.int8_weights) == len(shapes) == 4 * blocks + 2 * adapters
    assert all(name.startswith("blocks.") for name in encoder.int8_weights)


def test_the_engine_keeps_the_int8_weights_in_its_cache_folder(tmp_path):
    """The engine process, as the module starts it, keeps a model's int8 weights in its cache folder once
    it has prepared them (in the background, after the load)."""
    from SAMMed2DSegmentLib.service.client import EngineClient
    from SAMMed2DSegmentLib.weights import registry

    cache = tmp_path / "cache"
    loaded: list[dict] = []
    client = EngineClient(extra_env={"SAMMED2D_CACHE_DIR": str(cache)})
    try:
        request = {"path": str(registry.resolve_model("demo")), "device": "cpu", "precision": "int8"}

        def on_event(event: str, header: dict, arrays: dict) -> None:
            if event == "done":
                loaded.append(header)

        job = client.submit("load_model", request, on_event=on_event)
        client.wait(job, timeout=120)
        assert loaded and loaded[0]["precision"] == "int8"
        file = Int8WeightsFile.in_cache(loaded[0]["sha256"], cache)
        for _ in range(600):
            if file.read():
                break
            threading.Event().wait(0.1)
    finally:
        client.close()
    weights = file.read()
    assert weights and all(w.values.dtype == torch.int8 for w in weights.values())


def test_predictors_sharing_encoders_prepare_them_once(small_model, image, monkeypatch):
    """A batch worker's cases share the encoders prepared for their model: the second predictor takes the
    first one's, and its embedding is the same."""
    built = []
    real = lowp_encoder.LowPrecisionEncoder

    class Counting(real):
        def __init__(self, *args, **kwargs) -> None:
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lowp_encoder, "LowPrecisionEncoder", Counting)
    shared: dict = {}
    first = SamMed2DPredictor(small_model, precision="int8", shared_encoders=shared)
    first.set_image(image)
    second = SamMed2DPredictor(small_model, precision="int8", shared_encoders=shared)
    second.prepare_in_background()  # finds it there: nothing started
    second.set_image(image)
    assert built == [1] and second.lowp_encoder is first.lowp_encoder is shared["int8"]
    assert torch.equal(second.get_image_embedding(), first.get_image_embedding())


def test_each_torch_version_keeps_its_own_file(small_model, image, tmp_path, monkeypatch):
    """Two torch versions sharing one cache (Slicer's and a virtual environment's) do not overwrite each
    other's weights on every start."""
    mine = Int8WeightsFile.in_cache(SHA, tmp_path)
    _embedding(small_model, image, mine)
    monkeypatch.setattr(torch, "__version__", "2.99.0+other")
    other = Int8WeightsFile.in_cache(SHA, tmp_path)
    assert other.path != mine.path and other.path.parent == mine.path.parent
    _embedding(small_model, image, other)
    assert other.read() and mine.path.is_file()


@pytest.mark.parametrize("failure", ["while writing", "while serialising"])
def test_a_full_disk_is_one_warning_and_no_file(small_model, tmp_path, monkeypatch, caplog, failure):
    """A full disk fails the write itself (OSError); safetensors reports its own errors as SafetensorError,
    not an OSError. Either way `write` says so in the log, keeps nothing and raises nothing."""
    import errno
    import pathlib

    from safetensors import SafetensorError

    weights = lowp_encoder.LowPrecisionEncoder(small_model.image_encoder, torch.qint8).int8_weights

    def full(*args, **kwargs):
        if failure == "while writing":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("I/O error: No space left on device (os error 28)")

    if failure == "while writing":
        monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    else:
        monkeypatch.setattr("safetensors.torch.save", full)
    file = Int8WeightsFile.in_cache(SHA, tmp_path)
    assert file.write(weights) is False
    assert not file.path.exists() and "No space left on device" in caplog.text
    assert [p.name for p in file.path.parent.iterdir()] == []  # no temporary file left either


def test_a_failing_write_never_fails_the_encode(small_model, image, tmp_path, monkeypatch, caplog):
    def broken(self, weights):
        raise MemoryError("the file's bytes")

    monkeypatch.setattr(Int8WeightsFile, "write", broken)
    file = Int8WeightsFile.in_cache(SHA, tmp_path)
    predictor = SamMed2DPredictor(small_model, precision="int8", int8_file=file)
    predictor.prepare_in_background()
    predictor.set_image(image)
    assert torch.equal(predictor.get_image_embedding(), _embedding(small_model, image))
    predictor._preparing.join(30)
    assert "could not keep the int8 weights" in caplog.text


def test_a_write_a_killed_start_left_is_removed_and_nothing_else(small_model, image, tmp_path):
    """The engine exits with os._exit: a write in progress leaves its temporary file; the next start
    removes it (our temporary names only, and only when no live process holds the file)."""
    file = Int8WeightsFile.in_cache(SHA, tmp_path)
    file.path.parent.mkdir(parents=True)
    stale = file.path.parent / f".{file.path.name}.0123456789ab.tmp"
    stale.write_bytes(b"half a file")
    theirs = file.path.parent / "notes.txt"
    theirs.write_text("mine")
    _embedding(small_model, image, file)
    assert not stale.exists() and theirs.read_text() == "mine" and file.read()


def test_a_write_skips_weights_another_writer_kept_since_its_read(small_model, tmp_path):
    """A batch worker's threads each quantize on their first case: the first keeps the file, the others find
    it kept since they read and write nothing (each write holds the file's bytes); one at a time, whatever
    the timing. A file no one changed since the read is rewritten (see the damaged-entry test)."""
    weights = lowp_encoder.LowPrecisionEncoder(small_model.image_encoder, torch.qint8).int8_weights
    files = [Int8WeightsFile.in_cache(SHA, tmp_path) for _ in range(4)]
    for file in files:
        assert file.read() == {}
    results: list[bool] = []
    barrier = threading.Barrier(len(files))

    def write(file: Int8WeightsFile) -> None:
        barrier.wait()
        results.append(file.write(weights))

    threads = [threading.Thread(target=write, args=(file,)) for file in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [False, False, False, True]
    kept = files[0].read()
    assert kept.keys() == weights.keys()
    assert all(torch.equal(kept[name].values, weights[name].values) for name in weights)
    later = Int8WeightsFile.in_cache(SHA, tmp_path)
    assert later.write(weights)  # never read: nothing to compare with, so it writes
    reader = Int8WeightsFile.in_cache(SHA, tmp_path)
    assert reader.read().keys() == weights.keys()
    assert Int8WeightsFile.in_cache(SHA, tmp_path).read()  # another reader's use mark is no write
    assert reader.write(weights)  # so this one is not skipped
    assert reader.write(weights)  # nor after its own write


@pytest.mark.parametrize("meanwhile", ["another model's", "another torch's"])
def test_another_models_or_torchs_file_kept_since_the_read_is_replaced(small_model, tmp_path, monkeypatch,
                                                                       meanwhile):  # fmt: skip
    """Only this model's weights for this torch kept meanwhile make a write needless."""
    weights = lowp_encoder.LowPrecisionEncoder(small_model.image_encoder, torch.qint8).int8_weights
    file = Int8WeightsFile.in_cache(SHA, tmp_path)
    assert file.read() == {}
    if meanwhile == "another model's":
        assert Int8WeightsFile(file.path, "00" * 32).write(weights)
    else:
        with monkeypatch.context() as patched:
            patched.setattr(torch, "__version__", "2.11.0")
            assert Int8WeightsFile(file.path, SHA).write(weights)
    assert file.write(weights)
    assert file.read().keys() == weights.keys()  # this model's, this torch's now


def test_a_model_keeps_its_files_of_two_torch_versions(tmp_path, monkeypatch):
    """After a write, the model's files of other torch versions go but the most recently used one (read
    marks a use); another model's file and a file under our name that is not ours stay."""
    import os

    from safetensors.torch import save_file

    real = torch.__version__
    files = {}
    for age, version in enumerate(["2.12.1", "2.12.0", "2.11.0"]):  # kept by earlier torches, oldest last
        monkeypatch.setattr(torch, "__version__", version)
        files[version] = Int8WeightsFile.in_cache(SHA, tmp_path)
        files[version].path.parent.mkdir(parents=True, exist_ok=True)
        save_file({}, str(files[version].path), metadata=files[version]._expected())
        os.utime(files[version].path, ns=(10**18 - age * 10**12,) * 2)
    assert Int8WeightsFile.in_cache(SHA, tmp_path).read() == {}  # 2.11.0's, used now: the newest
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    foreign = Int8WeightsFile.in_cache(SHA, tmp_path).path
    foreign.write_bytes(b"somebody's file")
    other_model = Int8WeightsFile.in_cache("ab" * 32, tmp_path)
    assert other_model.write({})
    monkeypatch.setattr(torch, "__version__", real)
    assert Int8WeightsFile.in_cache(SHA, tmp_path).write({})
    assert files["2.11.0"].path.is_file()
    assert not files["2.12.0"].path.exists() and not files["2.12.1"].path.exists()
    assert foreign.read_bytes() == b"somebody's file" and other_model.path.is_file()
    assert Int8WeightsFile.in_cache(SHA, tmp_path).path.is_file()

"""The weights downloader against a real HTTP server on 127.0.0.1 (tier A: no Slicer, no network)."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from dataclasses import replace

import numpy as np
import pytest

from SAMMed2DSegmentLib.weights.registry import (
    REGISTRY,
    DownloadCancelled,
    ModelEntry,
    VerificationError,
    WeightsError,
    check_local_file,
    download,
    fetch_model,
    resolve_model,
)

PAYLOAD = bytes(range(256)) * 12_000  # ≈3 MB: several 1 MB chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /model.bin with Range support; behaviour switches live on the server object."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path != "/model.bin":
            self.send_error(404)
            return
        data = server.payload
        start = 0
        rng = self.headers.get("Range")
        if rng and not server.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if server.drop_after is not None:
            cut, server.drop_after = server.drop_after, None  # only the first transfer breaks
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """Dropped transfers are what these tests provoke: no traceback on stderr for them."""


@pytest.fixture
def server():
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    httpd.payload = PAYLOAD
    httpd.requests = []
    httpd.drop_after = None
    httpd.ignore_range = False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/model.bin"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_and_reports_progress(server, tmp_path):
    seen = []
    path = download(
        server.url,
        tmp_path / "m.bin",
        size=len(PAYLOAD),
        sha256=SHA,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "m.bin.part").exists()
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_interrupted_transfer_resumes_on_the_next_call(server, tmp_path):
    server.drop_after = 1_000_000
    with pytest.raises(WeightsError, match="interrupted"):
        download(server.url, tmp_path / "m.bin", sha256=SHA, retries=0)
    part = tmp_path / "m.bin.part"
    kept = part.stat().st_size
    assert 0 < kept < len(PAYLOAD) and not (tmp_path / "m.bin").exists()
    path = download(server.url, tmp_path / "m.bin", sha256=SHA, retries=0)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/model.bin", f"bytes={kept}-")


def test_interrupted_transfer_resumes_within_one_call(server, tmp_path):
    server.drop_after = 500_000
    path = download(server.url, tmp_path / "m.bin", sha256=SHA, retries=2)
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 2 and server.requests[1][1] is not None


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    (tmp_path / "m.bin.part").write_bytes(b"garbage that must not stay in front")
    server.ignore_range = True
    assert download(server.url, tmp_path / "m.bin", sha256=SHA).read_bytes() == PAYLOAD


def test_complete_part_file_is_finished_without_refetching(server, tmp_path):
    (tmp_path / "m.bin.part").write_bytes(PAYLOAD)
    assert download(server.url, tmp_path / "m.bin", sha256=SHA).read_bytes() == PAYLOAD
    assert server.requests == [("/model.bin", f"bytes={len(PAYLOAD)}-")]


def test_corrupted_file_is_rejected_and_removed(server, tmp_path):
    server.payload = PAYLOAD[:-1] + b"\x00"
    with pytest.raises(VerificationError, match="SHA-256"):
        download(server.url, tmp_path / "m.bin", sha256=SHA)
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_is_refused_before_downloading(server, tmp_path):
    with pytest.raises(VerificationError, match="expects"):
        download(server.url, tmp_path / "m.bin", size=len(PAYLOAD) + 1)
    assert not (tmp_path / "m.bin").exists()


def test_cancel_keeps_the_part_for_resuming(server, tmp_path):
    cancel = threading.Event()

    def progress(done, total):
        if done >= 1 << 20:
            cancel.set()

    with pytest.raises(DownloadCancelled):
        download(server.url, tmp_path / "m.bin", sha256=SHA, progress=progress, cancel=cancel)
    assert not (tmp_path / "m.bin").exists()
    assert 0 < (tmp_path / "m.bin.part").stat().st_size < len(PAYLOAD)
    assert download(server.url, tmp_path / "m.bin", sha256=SHA).read_bytes() == PAYLOAD


def test_404_message(server, tmp_path):
    with pytest.raises(WeightsError, match="HTTP 404"):
        download(server.url.replace("model.bin", "missing.bin"), tmp_path / "m.bin")


def test_offline_message_says_what_to_do(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused, like a machine offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    entry = replace(REGISTRY["sam-med2d_b"], urls=(f"http://127.0.0.1:{port}/x.pth",))
    with pytest.raises(WeightsError) as info:
        fetch_model(entry, cache_dir=tmp_path)
    message = str(info.value)
    assert "cannot reach" in message and "local file" in message and "--checkpoint" in message


def test_fetch_model_downloads_into_the_cache_once(server, tmp_path):
    entry = ModelEntry("t", "small", "t.bin", "test", urls=(server.url,), sha256=SHA)
    path = fetch_model(entry, cache_dir=tmp_path)
    assert path == tmp_path / "models" / "t.bin" and path.read_bytes() == PAYLOAD
    assert fetch_model(entry, cache_dir=tmp_path) == path
    assert len(server.requests) == 1


def test_resolve_model_by_name_path_and_errors(server, tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "t", ModelEntry("t", "small", "t.bin", "test", urls=(server.url,)))
    with pytest.raises(WeightsError, match="not downloaded yet"):
        resolve_model("t", cache_dir=tmp_path)
    assert server.requests == []
    path = resolve_model("t", download=True, cache_dir=tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert resolve_model("t", cache_dir=tmp_path) == path
    assert resolve_model(str(path)) == path
    with pytest.raises(WeightsError, match="neither a model name"):
        resolve_model(str(tmp_path / "nope.pth"))


def test_resolve_model_honours_the_cache_environment_variable(server, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMMED2D_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setitem(REGISTRY, "t", ModelEntry("t", "small", "t.bin", "test", urls=(server.url,)))
    assert resolve_model("t", download=True) == tmp_path / "env-cache" / "models" / "t.bin"


def test_missing_bundled_demo_model_gives_a_clear_error(tmp_path, monkeypatch):
    entry = replace(REGISTRY["demo"], bundled=tmp_path / "absent.safetensors")
    monkeypatch.setitem(REGISTRY, "demo", entry)
    with pytest.raises(WeightsError, match="bundled model 'demo' is missing"):
        resolve_model("demo", download=True)


def test_registry_entries():
    demo, official = REGISTRY["demo"], REGISTRY["sam-med2d_b"]
    assert demo.build == "small" and demo.bundled is not None
    assert demo.bundled.as_posix().endswith(
        "SAMMed2DSegment/Resources/Models/sammed2d_demo_small.safetensors"
    )
    assert (
        official.build == "vit_b" and official.urls and all(u.startswith("https://") for u in official.urls)
    )
    assert official.sha256 is None and "no published" in official.verification


def test_every_model_names_its_intensity_rule():
    """ "auto" means the model's own conversion: SA-Med2D-20M's rule for the official release and for the
    demo model trained to match it; a checkpoint the registry does not know is a SAM-Med2D fine-tune."""
    from SAMMed2DSegmentLib.engine.intensity import SA_MED2D_20M, compute_window
    from SAMMed2DSegmentLib.weights.registry import intensity_rule

    for name, entry in REGISTRY.items():
        assert entry.intensity == SA_MED2D_20M, name
        assert intensity_rule(name) == entry.intensity
        assert intensity_rule(f"/somewhere/{entry.filename}") == entry.intensity  # by its file
        compute_window(np.arange(100.0).reshape(1, 10, 10), entry.intensity)  # a rule compute_window knows
    assert intensity_rule("/elsewhere/my-finetune.pth") == SA_MED2D_20M
    assert intensity_rule(None) == SA_MED2D_20M


def test_local_file_checks(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        check_local_file(tmp_path / "x.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        check_local_file(tmp_path / "empty.pth")
    good = tmp_path / "good.pth"
    good.write_bytes(PAYLOAD)
    entry = ModelEntry("t", "small", "t.bin", "test", sha256=SHA, size=len(PAYLOAD))
    assert check_local_file(good, entry) == good
    with pytest.raises(WeightsError, match="SHA-256"):
        check_local_file(good, replace(entry, sha256="0" * 64))
    assert good.exists()  # the user's file is never deleted


def test_weights_import_without_torch():
    """The module asks about weights before torch is installed."""
    import subprocess
    import sys

    code = "import sys, SAMMed2DSegmentLib.weights.registry; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- issue 24: what a download must be
PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def _fake_checkpoint(keys: tuple[str, ...], pad: int = 20_000) -> bytes:
    """A torch.save-shaped archive (archive/data.pkl) naming `keys`, padded; small and torch-free."""
    import io
    import pickle
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"model": {key: 0 for key in keys}}, protocol=2))
        archive.writestr("archive/data/0", b"\0" * pad)
    return buffer.getvalue()


GOOD = _fake_checkpoint(tuple(part + "weight" for part in PARTS))


def _entry(server, low: int = 1_000) -> ModelEntry:
    return ModelEntry("t", "vit_b", "t.pth", "test", urls=(server.url,), size_range=(low, 10_000_000),
                      structure=PARTS)  # fmt: skip


def test_captive_portal_page_never_enters_the_cache(server, tmp_path):
    """Issue 24: a 982-byte HTML page (200 OK) became sam-med2d_b.pth for good. It is refused by the size
    range, and, were the range wide enough, by the structure; nothing is left in the cache."""
    server.payload = (b"<html><body>Please log in to the network</body></html>" * 40)[:982]
    with pytest.raises(WeightsError, match="size is 982 bytes, expected 1000..10000000"):
        fetch_model(_entry(server), cache_dir=tmp_path)
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        fetch_model(_entry(server, low=1), cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_download_must_name_the_network_parts(server, tmp_path):
    server.payload = _fake_checkpoint(("image_encoder.weight", "classifier.weight"))
    with pytest.raises(WeightsError, match=r"no prompt_encoder\., mask_decoder\. weights"):
        fetch_model(_entry(server), cache_dir=tmp_path)
    server.payload = GOOD
    path = fetch_model(_entry(server), cache_dir=tmp_path)
    assert path.read_bytes() == GOOD and path.with_name("t.pth.download.json").is_file()


def test_structure_check_reads_real_torch_files(tmp_path):
    """Both torch.save formats (the zip archive and the legacy stream) pass, read without unpickling."""
    torch = pytest.importorskip("torch")
    from SAMMed2DSegmentLib.weights.registry import check_structure

    state = {"model": {part + "weight": torch.zeros(2) for part in PARTS}, "optimizer": {"lr": 1e-4}}
    entry = ModelEntry("t", "vit_b", "t.pth", "test", structure=PARTS)
    for legacy in (False, True):
        path = tmp_path / f"{legacy}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        check_structure(path, entry)
        assert path.exists()


def test_hash_is_pinned_on_the_first_load_and_a_swap_is_refused(server, tmp_path):
    """No SHA-256 is published: the first successful load pins the file's, and a later swap is noticed."""
    from SAMMed2DSegmentLib.weights.registry import pin_loaded

    server.payload = GOOD
    entry = _entry(server)
    path = fetch_model(entry, cache_dir=tmp_path)
    pin_loaded(path, hashlib.sha256(GOOD).hexdigest())
    pin_loaded(path, hashlib.sha256(GOOD).hexdigest())  # the same file loads again
    assert fetch_model(entry, cache_dir=tmp_path) == path
    path.write_bytes(GOOD[:-1] + b"\1")
    with pytest.raises(WeightsError, match="t.pth changed since it was first loaded") as info:
        pin_loaded(path, hashlib.sha256(path.read_bytes()).hexdigest())  # what load_model calls
    assert "\n" not in str(info.value)


def test_a_registry_download_that_fails_to_load_is_removed(server, tmp_path, monkeypatch):
    """A download with the right structure that still fails to load is removed with one line, so the next
    download fetches it again; the same file chosen by hand (no download marker) is never deleted."""
    pytest.importorskip("torch")
    from SAMMed2DSegmentLib.weights.checkpoint import CheckpointError, load_model

    monkeypatch.setenv("SAMMED2D_CACHE_DIR", str(tmp_path / "cache"))
    server.payload = GOOD
    entry = _entry(server)
    path = fetch_model(entry, cache_dir=tmp_path)
    mine = tmp_path / "mine.pth"
    mine.write_bytes(GOOD)
    with pytest.raises(WeightsError, match=r"downloaded t.pth cannot be loaded .*; it was removed") as info:
        load_model(path)
    assert "\n" not in str(info.value) and not path.exists()
    assert not path.with_name("t.pth.download.json").exists()
    with pytest.raises(CheckpointError):
        load_model(mine)
    assert mine.exists()
    assert fetch_model(entry, cache_dir=tmp_path).read_bytes() == GOOD and len(server.requests) == 2


def test_official_entry_is_held_to_a_size_range_and_structure():
    official = REGISTRY["sam-med2d_b"]
    low, high = official.size_range
    assert low <= 2_560_000_000 <= high and official.structure == PARTS
    assert "pinned" in official.verification

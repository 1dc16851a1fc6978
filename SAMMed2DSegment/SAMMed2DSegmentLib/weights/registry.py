"""Model weights: a small registry, a resumable verified downloader, `resolve_model` (pure layer, urllib).

Why this exists: users of other SAM extensions report downloads that hang, restart from zero, or leave a
truncated file that later fails with an obscure unpickling error. Here a download goes into `<name>.part`,
resumes with an HTTP Range request after an interruption, can be cancelled between chunks, and only becomes
the real file after its size (and SHA-256, when the registry knows it) matched; a file that fails the check is
removed. Sites without network access copy the file by hand and point the module (or `--checkpoint`) at it.

Nobody publishes the official file's size and SHA-256, so a download is held to what can be checked without
them: a size range and the checkpoint's structure (a PyTorch archive naming the network's parts, read without
unpickling), before it enters the cache; a captive portal's HTML page is refused there. The registry marks
what it downloaded with a sidecar `<file>.download.json`; the first successful load pins the file's SHA-256
in it (a later swap of the file is refused when it is loaded), and a marked file that fails to load is
removed, so the next download fetches it again.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import pickletools
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..engine.intensity import SA_MED2D_20M
from ..files import HashCancelled, sha256_file
from .cache_dir import default_cache_dir

#: progress(bytes_done, bytes_total or None); called from the thread that downloads.
DownloadProgress = Callable[[int, int | None], None]
CancelSignal = threading.Event | Callable[[], bool] | None

_CHUNK = 1 << 20
_MODULE_DIR = Path(__file__).resolve().parents[2]


class WeightsError(RuntimeError):
    """A model file is not available, could not be downloaded, or failed verification."""


class DownloadCancelled(WeightsError):
    """The user cancelled; the partial file is kept so the next attempt resumes."""


class VerificationError(WeightsError):
    """Size or SHA-256 did not match the registry; the file has been removed."""


@dataclass(frozen=True)
class ModelEntry:
    """One downloadable (or bundled) model. `size`/`sha256` are None when not published."""

    name: str
    build: str  # network build for load_model: "vit_b" or "small"
    filename: str
    description: str
    urls: tuple[str, ...] = ()
    size: int | None = None
    sha256: str | None = None
    approx_size: int | None = None  # for messages when the exact size is not known
    bundled: Path | None = None  # shipped with the extension instead of downloaded
    manual_url: str = ""  # a page where a person can download the file by hand
    #: Bounds (bytes, inclusive) of a download whose exact size is not published.
    size_range: tuple[int, int] | None = None
    #: Key prefixes the checkpoint's state dict must name (checked on download, without unpickling).
    structure: tuple[str, ...] = ()
    #: How the model expects a volume's intensities to become 8-bit images: what "auto" means for it
    #: (a method of `engine.intensity.compute_window`).
    intensity: str = SA_MED2D_20M

    @property
    def verification(self) -> str:
        """What a finished download is checked against, for messages and the README."""
        if self.sha256:
            return "size and SHA-256" if self.size else "SHA-256"
        if self.size:
            return "size only (no published SHA-256)"
        if self.size_range:
            return (
                "a size range and the checkpoint's structure (no published size or SHA-256); "
                "SHA-256 pinned on the first load"
            )
        return "the server's announced length only (no published size or SHA-256)"


REGISTRY: dict[str, ModelEntry] = {
    "demo": ModelEntry(
        name="demo",
        build="small",
        filename="sammed2d_demo_small.safetensors",
        description="small demonstration model shipped with the extension (CPU-friendly, limited accuracy)",
        bundled=_MODULE_DIR / "Resources" / "Models" / "sammed2d_demo_small.safetensors",
        sha256="d62a0991596c8e10a832598a4bb5253caa66689057dbc45c98c0028e91d8fcc1",  # see MODEL_CARD.md
    ),
    "sam-med2d_b": ModelEntry(
        name="sam-med2d_b",
        build="vit_b",
        filename="sam-med2d_b.pth",
        description="official SAM-Med2D release (ViT-B, 256 px, adapters); about 2.4 GB",
        urls=("https://huggingface.co/schengal1/SAM-Med2D_model/resolve/main/sam-med2d_b.pth",),
        size=None,  # not published; the mirror's page shows 2.56 GB (no Git LFS pointer found to be exact)
        sha256=None,  # not published by the authors or the mirror: pinned on the first successful load
        approx_size=2_400_000_000,
        size_range=(2_450_000_000, 2_700_000_000),
        structure=("image_encoder.", "prompt_encoder.", "mask_decoder."),
        manual_url="https://github.com/OpenGVLab/SAM-Med2D#-model-checkpoints",
    ),
}


def intensity_rule(model: str | os.PathLike[str] | None) -> str:
    """The intensity rule of a registry model, given by name or by its file; a checkpoint the registry does
    not know is a SAM-Med2D fine-tune, so it gets the rule SAM-Med2D's training data went through."""
    if model is None:
        return SA_MED2D_20M
    entry = REGISTRY.get(str(model))
    if entry is None:
        name = Path(model).name
        entry = next((e for e in REGISTRY.values() if e.filename == name), None)
    return entry.intensity if entry is not None else SA_MED2D_20M


def models_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where downloaded weights live: `<cache>/models`, the cache being `cache_dir`, else
    `$SAMMED2D_CACHE_DIR` or `~/.cache/sammed2d` (the same root as checkpoint.py's safetensors cache)."""
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "models"


def model_path(entry: ModelEntry, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return entry.bundled if entry.bundled is not None else models_dir(cache_dir) / entry.filename


def _cancel_check(cancel: CancelSignal) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel


def sha256_of(path: Path, cancel: CancelSignal = None) -> str:
    try:
        return sha256_file(path, _CHUNK, _cancel_check(cancel))
    except HashCancelled:
        raise DownloadCancelled("verification cancelled") from None


def verify_file(path: Path, size: int | None, sha256: str | None, cancel: CancelSignal = None) -> None:
    """Raise VerificationError (and delete `path`) when its size or SHA-256 differs from what is expected."""
    actual = path.stat().st_size
    problem = ""
    if size is not None and actual != size:
        problem = f"size is {actual} bytes, expected {size}"
    elif sha256:
        digest = sha256_of(path, cancel)
        if digest.lower() != sha256.lower():
            problem = f"SHA-256 is {digest}, expected {sha256}"
    if problem:
        path.unlink(missing_ok=True)
        raise VerificationError(f"{path.name}: {problem}; the damaged file was removed, download it again")


_PICKLE_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                   "SHORT_BINSTRING"}  # fmt: skip
_MAX_PICKLE = 64 << 20  # a state dict's pickle (names and storage records) is a few MB, not the tensors


def _pickle_strings(stream) -> Iterator[str]:
    """The strings of one pickle, read opcode by opcode: nothing is executed or imported."""
    for opcode, arg, _ in pickletools.genops(stream):
        if opcode.name in _PICKLE_STRINGS and isinstance(arg, str | bytes):
            yield arg if isinstance(arg, str) else arg.decode("latin-1")


def _checkpoint_names(path: Path) -> set[str]:
    """The strings a PyTorch checkpoint's pickle holds (its state dict's keys among them): the `data.pkl` of
    a torch.save archive, or the first pickles of the legacy format. Raises ValueError when it is neither."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pickles = [i for i in archive.infolist() if ("/" + i.filename).endswith("/data.pkl")]
            if not pickles or pickles[0].file_size > _MAX_PICKLE:
                raise ValueError("a ZIP archive without a PyTorch data.pkl")
            with archive.open(pickles[0]) as stream:
                return set(_pickle_strings(stream))
    names: set[str] = set()
    with path.open("rb") as stream:
        for _ in range(4):  # legacy torch.save: magic number, protocol, system info, then the object
            if stream.read(1) != b"\x80":
                break
            stream.seek(-1, os.SEEK_CUR)
            names |= set(_pickle_strings(stream))
    if not names:
        raise ValueError("not a PyTorch checkpoint")
    return names


def check_structure(path: Path, entry: ModelEntry) -> None:
    """Raise VerificationError (and delete `path`) when a download lies outside the entry's size range or is
    not a checkpoint naming the network's parts: what can be checked where no size or SHA-256 is published."""
    actual = path.stat().st_size
    problem = ""
    if entry.size_range is not None and not entry.size_range[0] <= actual <= entry.size_range[1]:
        low, high = entry.size_range
        problem = f"size is {actual} bytes, expected {low}..{high} (a web page instead of the model?)"
    elif entry.structure:
        try:
            names = _checkpoint_names(path)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            problem = f"not a PyTorch checkpoint ({error})"
        else:
            missing = [p for p in entry.structure if not any(n.startswith(p) for n in names)]
            if missing:
                problem = f"not a {entry.name} checkpoint (no {', '.join(missing)} weights)"
    if problem:
        path.unlink(missing_ok=True)
        raise VerificationError(f"{entry.filename}: {problem}; the download was removed")


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".download.json")


def _read_marker(path: Path) -> dict | None:
    try:
        record = json.loads(_marker(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_marker(path: Path, record: dict) -> None:
    temporary = _marker(path).with_suffix(".tmp")
    temporary.write_text(json.dumps(record), encoding="utf-8")
    os.replace(temporary, _marker(path))


def pin_loaded(path: str | os.PathLike[str], sha256: str) -> None:
    """After a successful load: a model the registry downloaded gets its SHA-256 pinned (nobody publishes
    one), so a later swap of the file is noticed; a file loaded before with another hash is refused."""
    path = Path(path)
    record = _read_marker(path)
    if record is None:
        return
    pinned = record.get("sha256")
    if pinned and str(pinned).lower() != sha256.lower():
        raise WeightsError(_swapped(path, sha256, str(pinned)))
    if not pinned:
        try:
            _write_marker(path, {**record, "sha256": sha256})
        except OSError:
            pass  # a read-only cache still loads; the pin waits for a writable one


def _swapped(path: Path, actual: str, pinned: str) -> str:
    return (f"{path.name} changed since it was first loaded (SHA-256 {actual[:12]}…, pinned {pinned[:12]}…); "
            "remove it and download the model again")  # fmt: skip


def discard_unloadable(path: str | os.PathLike[str], error: BaseException) -> BaseException:
    """A model the registry downloaded that fails to load is removed, with its marker, so the next download
    fetches it again; returns the one-line error to raise. Any other file (the user's) is left alone."""
    path = Path(path)
    if _read_marker(path) is None:
        return error
    path.unlink(missing_ok=True)
    _marker(path).unlink(missing_ok=True)
    first = (" ".join(str(error).split()) or type(error).__name__)[:300]
    return WeightsError(
        f"the downloaded {path.name} cannot be loaded ({first}); it was removed, download it again"
    )


def _offline_hint(entry: ModelEntry | None) -> str:
    where = f" from {entry.manual_url}" if entry is not None and entry.manual_url else ""
    return (
        f"If this computer has no internet access, download the file on another computer{where}, copy it "
        "here and choose it as a local file (module: Model → local file; command line: --checkpoint FILE)."
    )


def _content_total(response: http.client.HTTPResponse, offset: int) -> int | None:
    """Total file size from Content-Range (206) or Content-Length (200), or None when not announced."""
    content_range = response.headers.get("Content-Range", "")
    if response.status == 206 and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit():
        return int(length) + (offset if response.status == 206 else 0)
    return None


def _range_start(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _transfer_once(
    url: str,
    part: Path,
    expected_size: int | None,
    progress: DownloadProgress | None,
    is_cancelled: Callable[[], bool],
    timeout: float,
) -> int | None:
    """One HTTP request appending to `part` from where it ends. Returns the total size the server announced.
    Raises OSError-family errors when the transfer breaks (the caller resumes)."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    request = urllib.request.Request(url, headers={"User-Agent": "SAMMed2D-Slicer"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # Nothing left to send: the .part is complete (or longer than the file, then start over).
            total = error.headers.get("Content-Range", "").rsplit("/", 1)[-1]
            if total.isdigit() and int(total) == offset:
                return offset
            part.unlink()
            raise ConnectionError("the partial download did not fit the file on the server") from None
        raise
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the Range header: start again from the first byte
        elif offset and _range_start(response) != offset:
            raise ConnectionError("the server resumed at the wrong position")
        total = _content_total(response, offset)
        if expected_size is not None and total is not None and total != expected_size:
            raise VerificationError(
                f"the server offers {total} bytes but the registry expects {expected_size}; not downloading"
            )
        done = offset
        with part.open("r+b" if offset else "wb") as f:
            f.seek(offset)
            f.truncate()
            if progress:
                progress(done, total)
            while True:
                if is_cancelled():
                    raise DownloadCancelled(f"download cancelled after {done} bytes; starting again resumes")
                block = response.read(_CHUNK)
                if not block:
                    break
                f.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
        if total is not None and done < total:
            raise ConnectionError(f"connection closed after {done} of {total} bytes")
        return total


def download(
    url: str,
    destination: str | os.PathLike[str],
    *,
    size: int | None = None,
    sha256: str | None = None,
    progress: DownloadProgress | None = None,
    cancel: CancelSignal = None,
    retries: int = 3,
    timeout: float = 30.0,
    entry: ModelEntry | None = None,
) -> Path:
    """Download `url` to `destination` through `destination.part`, resuming after interruptions (up to
    `retries` times here, and on the next call), then verify and move into place. Raises WeightsError
    subclasses with a message a user can act on."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    is_cancelled = _cancel_check(cancel)
    attempt = 0
    while True:
        try:
            total = _transfer_once(url, part, size, progress, is_cancelled, timeout)
            break
        except urllib.error.HTTPError as error:
            reason = "the file is not there (HTTP 404)" if error.code == 404 else f"HTTP {error.code}"
            raise WeightsError(f"cannot download {url}: {reason}. {_offline_hint(entry)}") from None
        except urllib.error.URLError as error:
            raise WeightsError(
                f"cannot reach {urllib.parse.urlparse(url).netloc}: {error.reason}. {_offline_hint(entry)}"
            ) from None
        except (ConnectionError, http.client.HTTPException, TimeoutError) as error:
            attempt += 1
            if attempt > retries:
                have = part.stat().st_size if part.exists() else 0
                raise WeightsError(
                    f"download of {url} interrupted ({error}); {have} bytes kept in {part.name}, "
                    "starting the download again resumes from there"
                ) from None
    verify_file(part, size if size is not None else total, sha256, cancel)
    if entry is not None:
        check_structure(part, entry)
    os.replace(part, destination)
    return destination


@functools.lru_cache(maxsize=8)
def _sha256_of_version(path: Path, *_version: int) -> str:
    return sha256_of(path)


def _bundled_sha256(path: Path) -> str:
    """The panel asks for the model's status on every parameter change: hash a file version only once."""
    st = path.stat()  # ctime and inode too: a copy can keep size and mtime, it cannot set these
    return _sha256_of_version(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def fetch_model(
    entry: ModelEntry,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: DownloadProgress | None = None,
    cancel: CancelSignal = None,
) -> Path:
    """The model file, downloaded into the cache first when missing (each registry URL tried in turn)."""
    path = model_path(entry, cache_dir)
    if path.is_file() and entry.bundled is not None and entry.sha256:
        # A damaged or replaced bundled model is refused rather than run; hashed once per file version.
        if _bundled_sha256(path).lower() != entry.sha256.lower():
            raise WeightsError(
                f"the bundled model {entry.name!r} ({path.name}) is altered or damaged (SHA-256 differs); "
                "reinstall the extension"
            )
        return path
    if path.is_file():
        return path  # a pinned download's hash is checked where it loads (pin_loaded), not on each look-up
    if entry.bundled is not None:
        raise WeightsError(
            f"the bundled model {entry.name!r} is missing from this installation ({path.name} not found); "
            "reinstall the extension, or choose another model or a local checkpoint file"
        )
    if not entry.urls:
        raise WeightsError(f"model {entry.name!r} has no download address. {_offline_hint(entry)}")
    errors = []
    for url in entry.urls:
        try:
            done = download(
                url, path, size=entry.size, sha256=entry.sha256, progress=progress, cancel=cancel, entry=entry
            )
            record = {"model": entry.name, "url": url, "size": done.stat().st_size, "sha256": None}
            _write_marker(done, record)
            return done
        except DownloadCancelled:
            raise
        except WeightsError as error:
            errors.append(str(error))
    raise WeightsError(" / ".join(errors))


def check_local_file(path: str | os.PathLike[str], entry: ModelEntry | None = None) -> Path:
    """A checkpoint chosen by hand ("use local file"): must exist and, when it claims to be a registry
    model, match that model's size and hash. The file is never deleted here (it is the user's)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"checkpoint file is empty: {path}")
    if entry is not None:
        actual = path.stat().st_size
        if entry.size is not None and actual != entry.size:
            raise WeightsError(f"{path.name} has {actual} bytes; {entry.name} has {entry.size}")
        if entry.sha256 and sha256_of(path).lower() != entry.sha256.lower():
            raise WeightsError(f"{path.name} is not {entry.name} (SHA-256 differs)")
    return path


def resolve_model(
    name_or_path: str | os.PathLike[str],
    *,
    download: bool = False,
    progress: DownloadProgress | None = None,
    cancel: CancelSignal = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A registry name ("demo", "sam-med2d_b") or a checkpoint path → the local file to load. A registry
    model that is not downloaded yet is fetched only with `download=True`; otherwise WeightsError says how."""
    name = str(name_or_path)
    entry = REGISTRY.get(name)
    if entry is None:
        path = Path(name).expanduser()
        if path.is_file():
            return check_local_file(path)
        raise WeightsError(
            f"{name!r} is neither a model name ({', '.join(REGISTRY)}) nor an existing checkpoint file"
        )
    path = model_path(entry, cache_dir)
    if path.is_file() or entry.bundled is not None:
        return fetch_model(entry, cache_dir=cache_dir)
    if not download:
        size = f" (about {entry.approx_size / 1e9:.1f} GB)" if entry.approx_size else ""
        raise WeightsError(
            f"model {entry.name!r} is not downloaded yet{size}: download it (module: Download button; "
            f"command line: allow downloading) or use a local file. {_offline_hint(entry)}"
        )
    return fetch_model(entry, cache_dir=cache_dir, progress=progress, cancel=cancel)


__all__ = [
    "REGISTRY",
    "DownloadCancelled",
    "ModelEntry",
    "VerificationError",
    "WeightsError",
    "check_local_file",
    "check_structure",
    "discard_unloadable",
    "download",
    "fetch_model",
    "intensity_rule",
    "model_path",
    "models_dir",
    "pin_loaded",
    "resolve_model",
    "verify_file",
]

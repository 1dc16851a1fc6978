"""Loading SAM-Med2D weights safely, strictly and fast.

Why this module exists:

* The official checkpoint (`sam-med2d_b.pth`, ~2.4 GB) is `{"model": state_dict, "optimizer": <Adam object>}`.
  Plain `torch.load(weights_only=True)` refuses the pickled optimizer, and `weights_only=False` would execute
  whatever the file asks for. We unpickle with torch's restricted unpickler and substitute the known optimizer
  classes with an inert stub, so nothing in the file runs and anything else is refused with a clear message.
* The official loader calls `load_state_dict(..., strict=False)` and silently ignores missing/unexpected keys;
  `load_into` lists every missing, unexpected and mis-shaped key instead.
* Reading a 2.4 GB pickle (mostly optimizer moments) on every start is slow: the model weights are converted
  once into a safetensors file in a cache (memory-mapped on later loads). The cache is keyed by the source's
  content (SHA-256), never by its path, size or mtime alone: a file replaced by another of the same size and
  mtime must load the new weights. Hashing 2.4 GB on every start is slow too, so the hash of each source file
  is remembered with its full identity (size, mtime, ctime, inode, device) and reused only while all of it is
  unchanged; ctime is set by the system on every write, rename or `touch`, so no replacement keeps it.
* A checkpoint enters the cache only after it loaded strictly and holds finite weights: a rejected file
  leaves nothing behind.
* The model's identity (`CheckpointInfo.sha256`, which keys the embeddings on disk and goes into reports and
  DICOM-SEG) is the SHA-256 of the file actually loaded (remembered the same way), never the `source_sha256`
  written inside a safetensors file: a file can claim any hash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_path, sha256_file, stat_identity
from .cache_dir import CACHE_ENV, default_cache_dir
from .finite_weights import is_recorded_finite, nonfinite_tensors, record_finite, record_path
from .int8_weights import Int8WeightsFile

log = logging.getLogger(__name__)

FORMAT_TAG = "sammed2d-state-dict/1"
DATAPARALLEL_PREFIX = "module."

# Signature of each build: (encoder width, number of encoder blocks); the 256-px builds have a 16×16 grid.
_BUILD_SIGNATURES: dict[str, tuple[int, int]] = {"vit_b": (768, 12), "small": (64, 2)}
_GRID = 16

# Most names listed per category in a CheckpointError; a wholly wrong file would otherwise print 386 keys.
_MAX_LISTED = 40


class CheckpointError(ValueError):
    """A checkpoint file could not be read, was refused, or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What `load_model` loaded, for reports and the DICOM-SEG algorithm identification."""

    build: str
    source: str
    sha256: str
    used_cache: bool
    converted: bool = False
    loaded_from: str = ""
    notes: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------------
# Restricted unpickling


class _InertOptimizer:
    """Stand-in for a pickled `torch.optim` optimizer: keeps its pickled state as plain data, runs nothing.

    The restricted unpickler creates it with `cls.__new__` and hands the state to `__setstate__`; the real
    optimizer class is never imported, instantiated or called.
    """

    optimizer_class = "torch.optim.Optimizer"

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.optimizer_class}>"


def _plain_dict(*_args: Any) -> dict:
    """Stands in for `collections.defaultdict` (optimizer state): the safe unpickler fills plain dicts."""
    return {}


_OPTIMIZERS = ("Adam", "AdamW", "SGD", "Adamax", "Adagrad", "Adadelta", "RMSprop", "RAdam", "NAdam")


def _optimizer_stubs() -> list[tuple[type, str]]:
    """One stub class per optimizer name, under both the defining module path and the `torch.optim` alias."""
    stubs: list[tuple[type, str]] = []
    for name in _OPTIMIZERS:
        for path in (f"torch.optim.{name.lower()}.{name}", f"torch.optim.{name}"):
            stub = type(f"Inert{name}", (_InertOptimizer,), {"optimizer_class": path})
            stubs.append((stub, path))
    return stubs


_SAFE_GLOBALS: list[Any] = [
    *_optimizer_stubs(),
    (_plain_dict, "collections.defaultdict"),
    dict,
]

_LOAD_LOCK = threading.Lock()
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_OTHER_RE = re.compile(
    r"(?:unrecognized function|but got) <?(?:class |function |built-in function )?'?([\w.]+)"
)


def _offending_global(message: str) -> str | None:
    """Extract the name the restricted unpickler refused from torch's error text."""
    match = _GLOBAL_RE.search(message) or _OTHER_RE.search(message)
    return match.group(1) if match else None


def _torch_reason(exc: BaseException) -> str:
    """The useful part of torch's error text, without its advice to retry with `weights_only=False`."""
    message = str(exc)
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    message = " ".join(message.split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _sniff(path: Path) -> str:
    """Return "safetensors", "zip" (torch >= 1.6 format) or "legacy" (old pickle format, or garbage)."""
    with path.open("rb") as fh:
        head = fh.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len <= size - 8:
            return "safetensors"
    if zipfile.is_zipfile(path):
        return "zip"
    return "legacy"


def _torch_load_restricted(path: Path, kind: str) -> Any:
    """`torch.load` with the weights-only unpickler plus the inert optimizer stubs; memory-mapped if zip."""
    # safe_globals edits a process-wide set and removes the entries on exit: serialise concurrent loads.
    with _LOAD_LOCK, torch.serialization.safe_globals(_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=(kind == "zip"))


def load_checkpoint_object(path: str | os.PathLike[str]) -> Any:
    """Read a `.pth`/`.pt` or safetensors file without executing anything in it.

    Returns what the file holds (for a safetensors file, a dict of tensors). Raises CheckpointError for files
    that need anything beyond tensors, containers and the known optimizer classes, and for unreadable files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read {path}: the file is empty")
    kind = _sniff(path)
    if kind == "safetensors":
        return _load_safetensors(path)[0]
    try:
        return _torch_load_restricted(path, kind)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        message = str(exc)
        name = _offending_global(message) if isinstance(exc, pickle.UnpicklingError) else None
        if name is not None:
            raise CheckpointError(
                f"refusing to load {path}: it needs {name}, which is not a tensor, container or known "
                "optimizer (nothing in the file was executed)"
            ) from exc
        raise CheckpointError(
            f"cannot read {path}: not a PyTorch checkpoint or safetensors file, or it is truncated/corrupt "
            f"({_torch_reason(exc)})"
        ) from exc


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Memory-mapped safetensors read: (tensors, metadata)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
    return tensors, metadata


# ----------------------------------------------------------------------------------------------------
# State dict extraction and strict loading


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def extract_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Find the model state dict in a loaded checkpoint: `obj["model"]`, `obj["state_dict"]` or `obj` itself.

    A leading "module." (DataParallel save) is stripped when every key has it. Returns (state dict, notes).
    """
    notes: list[str] = []
    state: Mapping[str, Any] | None = None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and _is_tensor_dict(obj[key]):
                state = obj[key]
                notes.append(f"state dict taken from the checkpoint's {key!r} entry")
                break
        if state is None and _is_tensor_dict(obj):
            state = obj
    if state is None:
        if isinstance(obj, Mapping):
            found = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:10])
            raise CheckpointError(
                "no model state dict in the checkpoint: expected a dict of tensors, or one under 'model' or "
                f"'state_dict'; found {{{found}}}"
            )
        raise CheckpointError(f"no model state dict in the checkpoint: it holds a {type(obj).__name__}")
    if not all(isinstance(k, str) for k in state):
        raise CheckpointError("the checkpoint's state dict has non-string keys")
    sd = {k: (v.detach() if isinstance(v, nn.Parameter) else v) for k, v in state.items()}
    if all(k.startswith(DATAPARALLEL_PREFIX) for k in sd):
        sd = {k[len(DATAPARALLEL_PREFIX) :]: v for k, v in sd.items()}
        notes.append(f"stripped the {DATAPARALLEL_PREFIX!r} prefix (DataParallel save) from every key")
    return sd, tuple(notes)


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    … and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in shown) + more


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], assign: bool = False) -> None:
    """Strictly load `state_dict` into `model`, listing every missing, unexpected and mis-shaped key.

    Floating tensors of another dtype (fp16/bf16 checkpoints) are cast to the model's dtype. With `assign`
    the tensors become the model's parameters instead of being copied into them (for a model built on the
    meta device: no random initialisation, no second copy of the weights).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped: list[str] = []
    wrong_dtype: list[str] = []
    converted: dict[str, torch.Tensor] = {}
    for key, target in expected.items():
        if key not in state_dict:
            continue
        value = state_dict[key]
        if tuple(value.shape) != tuple(target.shape):
            misshaped.append(f"{key}: checkpoint {list(value.shape)}, model {list(target.shape)}")
            continue
        if value.dtype != target.dtype:
            if value.is_floating_point() and target.is_floating_point():
                value = value.to(target.dtype)
            else:
                wrong_dtype.append(f"{key}: checkpoint {value.dtype}, model {target.dtype}")
                continue
        converted[key] = value
    if missing or unexpected or misshaped or wrong_dtype:
        parts = ["checkpoint does not match the model:"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if misshaped:
            parts.append(_listing("mis-shaped keys", misshaped))
        if wrong_dtype:
            parts.append(_listing("keys with an incompatible dtype", wrong_dtype))
        raise CheckpointError("\n".join(parts))
    model.load_state_dict(converted, strict=True, assign=assign)


def infer_build(state_dict: Mapping[str, Any]) -> str:
    """Recognise the build ("vit_b" or "small") from tensor shapes, so users need not say which is which."""
    pos = state_dict.get("image_encoder.pos_embed")
    pos_shape = list(pos.shape) if pos is not None else None
    blocks = sorted(
        {int(m.group(1)) for k in state_dict if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    )
    has_adapters = any(".Adapter." in k for k in state_dict)
    if pos_shape is not None and len(pos_shape) == 4 and pos_shape[1:3] == [_GRID, _GRID] and has_adapters:
        for build, (width, depth) in _BUILD_SIGNATURES.items():
            if pos_shape[3] == width and blocks == list(range(depth)):
                return build
    known = "; ".join(
        f"{b}: pos_embed [1, {_GRID}, {_GRID}, {w}], {d} blocks, adapters"
        for b, (w, d) in _BUILD_SIGNATURES.items()
    )
    sample = ", ".join(list(state_dict)[:5])
    raise CheckpointError(
        "unknown SAM-Med2D layout: found image_encoder.pos_embed "
        f"{pos_shape if pos_shape is not None else 'missing'}, {len(blocks)} encoder blocks, "
        f"adapters {'present' if has_adapters else 'absent'} (first keys: {sample}); known builds: {known}"
    )


# ----------------------------------------------------------------------------------------------------
# Conversion and cache


def _unshared(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no shared storage (safetensors refuses aliasing)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        tensor = value.detach().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _write_safetensors(sd: Mapping[str, torch.Tensor], dst: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        save_file(_unshared(sd), str(tmp), metadata=metadata)


def _metadata(sd: Mapping[str, torch.Tensor], notes: tuple[str, ...], build: str | None, sha: str) -> dict:
    metadata = {"format": FORMAT_TAG, "build": build or infer_build(sd), "source_sha256": sha}
    if notes:
        metadata["notes"] = "\n".join(notes)
    return metadata


def convert_to_safetensors(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    build: str | None = None,
    source_sha256: str | None = None,
) -> dict[str, str]:
    """Write the model state dict of checkpoint `src` atomically to safetensors `dst`; return its metadata.

    Only the model weights are kept (optimizer state is dropped); the source's SHA-256 (computed unless
    given) and the build go into the metadata so later loads need neither the pickle nor a re-hash.
    """
    src, dst = Path(src), Path(dst)
    sd, notes = extract_state_dict(load_checkpoint_object(src))
    metadata = _metadata(sd, notes, build, source_sha256 or sha256_file(src))
    _write_safetensors(sd, dst, metadata)
    return metadata


def _cache_base(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _index_path(src: Path, base: Path) -> Path:
    """Where the remembered hash of source file `src` (by its resolved path) is kept."""
    resolved = src.expanduser().resolve()
    path_key = hashlib.sha256(str(resolved).encode("utf-8")).hexdigest()[:16]
    stem = re.sub(r"[^\w.-]", "_", src.stem)[:60]
    return base / f"{stem}-{path_key}.source.json"


def _remembered_sha256(src: Path, base: Path) -> str | None:
    """The SHA-256 recorded for `src` while its identity (size, mtime, ctime, inode, device) is unchanged."""
    try:
        entry = json.loads(_index_path(src, base).read_text(encoding="utf-8"))
        if entry.get("identity") == stat_identity(src.expanduser().resolve().stat()):
            sha = entry.get("sha256")
            return sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else None
    except (OSError, ValueError, AttributeError):
        pass
    return None


def source_sha256(src: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> str:
    """SHA-256 of checkpoint `src`: the remembered one while the file is unchanged, else computed."""
    src = Path(src)
    return _remembered_sha256(src, _cache_base(cache_dir)) or sha256_file(src)


def _remember_sha256(src: Path, base: Path, sha: str, identity: list[int]) -> str | None:
    """Record `sha` for `src`; returns the SHA-256 recorded before (another version), if any."""
    index = _index_path(src, base)
    index.parent.mkdir(parents=True, exist_ok=True)
    previous = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        previous = json.loads(index.read_text(encoding="utf-8")).get("sha256")
    with atomic_path(index) as tmp:
        tmp.write_text(
            json.dumps({"source": str(src.expanduser().resolve()), "identity": identity, "sha256": sha})
        )
    return previous if previous != sha else None


def _content_path(src: Path, sha: str, base: Path) -> Path:
    stem = re.sub(r"[^\w.-]", "_", src.stem)[:60]
    return base / f"{stem}-{sha[:32]}.safetensors"


def cached_safetensors_path(
    src: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the converted copy of `src` lives in the cache: named by the SHA-256 of its content (remembered
    while the file is unchanged, else computed), so any change of content gets a new entry."""
    src = Path(src)
    base = _cache_base(cache_dir)
    return _content_path(src, source_sha256(src, base), base)


def glob_escape(text: str) -> str:
    """Escape glob metacharacters in a literal file-name part."""
    return re.sub(r"([*?\[])", r"[\1]", text)


# ----------------------------------------------------------------------------------------------------
# Device and model


def resolve_device(name: str | torch.device) -> torch.device:
    """Turn "cpu"/"cuda"/"cuda:N"/"mps"/"auto" into an available torch.device, else ValueError saying why."""
    text = str(name).strip().lower()
    cuda_ok = torch.cuda.is_available()
    mps_backend = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps_backend is not None and mps_backend.is_available())
    if text == "auto":
        return torch.device("cuda" if cuda_ok else "mps" if mps_ok else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", text):
        if not cuda_ok:
            raise ValueError(f"device {name!r} requested but CUDA is not available in this PyTorch")
        device = torch.device(text)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s)")
        return device
    if text == "mps":
        if not mps_ok:
            raise ValueError("device 'mps' requested but Apple MPS is not available in this PyTorch")
        return torch.device("mps")
    raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N, mps or auto")


def _check_finite(sd: Mapping[str, torch.Tensor], path: Path) -> None:
    """NaN or infinite weights give NaN logits, i.e. empty masks that would erase voxels: refuse them."""
    bad = nonfinite_tensors(sd)
    if bad:
        raise CheckpointError(
            f"refusing {path}: {len(bad)} weight tensor(s) hold NaN or infinity (e.g. {bad[0]}); the file is "
            "damaged"
        )


@dataclasses.dataclass
class _Source:
    """A checkpoint's state dict, provenance, and, for a fresh conversion, what to put in the cache.
    `checked`: its weights are known finite (a cached conversion with its record, or checked on reading);
    `to_record`: a cached conversion checked again (its record was missing or stale), to be recorded."""

    sd: dict[str, torch.Tensor]
    info: CheckpointInfo
    to_cache: tuple[Path, dict[str, str], list[int]] | None = None
    checked: bool = False
    to_record: Path | None = None


def _check_unchanged(path: Path, identity: list[int]) -> None:
    """The hash taken must be the hash of the weights read: refuse a file replaced in between."""
    if stat_identity(path.expanduser().resolve().stat()) != identity:
        raise CheckpointError(f"{path} changed while it was being read; load it again")


def _delete_stale_conversion(path: Path, sha: str, base: Path) -> None:
    """Delete the conversion of an earlier version of `path`, and that version's int8 weights, only when
    they are ones we wrote (our format tag and that version's hash inside): a file of the user's that
    happens to have the name is left alone."""
    from safetensors import SafetensorError, safe_open

    stale = _content_path(path, sha, base)
    try:
        with safe_open(str(stale), framework="pt") as fh:
            metadata = fh.metadata() or {}
        if metadata.get("format") == FORMAT_TAG and metadata.get("source_sha256") == sha:
            stale.unlink()
            record_path(stale).unlink(missing_ok=True)
    except (OSError, SafetensorError):
        pass
    Int8WeightsFile.remove_all(sha, base)  # says why in the log where one cannot go


def _read_source(
    path: Path, cache_dir: str | os.PathLike[str] | None, use_cache: bool, build: str | None
) -> _Source:
    """The model state dict of `path` and its provenance (build left empty), via the cache when allowed.
    A conversion is only prepared here; `load_model` writes it once the weights have loaded."""
    source = str(path.expanduser().resolve())
    base = _cache_base(cache_dir)
    identity = stat_identity(path.expanduser().resolve().stat())
    remembered = _remembered_sha256(path, base) if use_cache else None
    if _sniff(path) == "safetensors":
        # The identity is the hash of this file: a `source_sha256` in its metadata is only a claim, and a
        # file claiming another model's hash would get that model's cached embeddings and provenance.
        tensors, _ = _load_safetensors(path)
        sd, notes = extract_state_dict(tensors)
        sha = remembered or sha256_file(path)
        _check_unchanged(path, identity)
        info = CheckpointInfo("", source, sha, False, False, source, notes)
        return _Source(sd, info, None if remembered or not use_cache else (path, {}, identity))

    sha = remembered or sha256_file(path)
    if use_cache:
        cached = _content_path(path, sha, base)
        found = _cached_conversion(cached, source, sha) if cached.is_file() else None
        if found is not None:
            found.to_cache = None if remembered else (cached, {}, identity)
            return found
    sd, notes = extract_state_dict(load_checkpoint_object(path))
    _check_unchanged(path, identity)
    info = CheckpointInfo("", source, sha, False, False, source, notes)
    if not use_cache:
        return _Source(sd, info)
    return _Source(sd, info, (_content_path(path, sha, base), _metadata(sd, notes, build, sha), identity))


def _cached_conversion(cached: Path, source: str, sha: str) -> _Source | None:
    """The cached conversion of the source with hash `sha`, its weights known finite: by its record, else
    checked now (and recorded later). None (convert again) when it is unreadable, of another source, or
    holds NaN or infinity."""
    try:
        tensors, metadata = _load_safetensors(cached)
        if metadata.get("format") != FORMAT_TAG or metadata.get("source_sha256") != sha:
            return None
        sd, _ = extract_state_dict(tensors)
    except CheckpointError as exc:
        log.warning("ignoring unreadable cached copy %s (%s); converting again", cached, exc)
        return None
    recorded = is_recorded_finite(cached, sha)
    if not recorded and nonfinite_tensors(sd):
        log.warning("ignoring the cached copy %s: its weights hold NaN or infinity; converting again", cached)
        return None
    notes = tuple(filter(None, metadata.get("notes", "").split("\n")))
    info = CheckpointInfo("", source, sha, True, False, str(cached), notes)
    return _Source(sd, info, checked=True, to_record=None if recorded else cached)


def _record_checked(cached: Path, sha: str) -> None:
    """Record a conversion's check; a record that cannot be written only means checking again next time."""
    try:
        record_finite(cached, sha)
    except OSError as exc:
        log.warning("cannot record the weights check of %s (%s); it is checked again next time", cached, exc)


def _store_in_cache(path: Path, source: _Source, cache_dir: str | os.PathLike[str] | None) -> CheckpointInfo:
    """Write a fresh conversion (if any) and remember the source's hash; a cache that cannot be written
    only costs speed. Returns the provenance to report."""
    if source.to_record is not None:
        _record_checked(source.to_record, source.info.sha256)
    if source.to_cache is None:
        return source.info
    cached, metadata, identity = source.to_cache
    base = _cache_base(cache_dir)
    try:
        if metadata:
            _write_safetensors(source.sd, cached, metadata)
            _record_checked(cached, source.info.sha256)
        previous = _remember_sha256(path, base, source.info.sha256, identity)
    except OSError as exc:
        log.warning("cannot write the checkpoint cache in %s (%s); loaded %s directly", base, exc, path)
        return source.info
    if previous is not None:  # the earlier version of this file: its conversion is stale now
        _delete_stale_conversion(path, previous, base)
    if not metadata:
        return source.info
    return dataclasses.replace(source.info, used_cache=True, converted=True, loaded_from=str(cached))


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    build: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> tuple[nn.Module, CheckpointInfo]:
    """Build the network for checkpoint `path`, load it strictly, and return it in eval mode on `device`.

    A safetensors file is read directly (memory-mapped); a `.pth` is converted once into the cache (unless
    `use_cache=False` or the cache is not writable) so later starts skip the pickle (and, while the file is
    unchanged, the hash). Weights holding NaN or infinity are refused; a refused file is never cached. The
    check runs on every load of a file read directly, and once for a cached conversion (`finite_weights`).
    """
    from ..model import build_sam_med2d
    from .registry import discard_unloadable, pin_loaded

    target = resolve_device(device)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        source = _read_source(path, cache_dir, use_cache, build)
        chosen = build or infer_build(source.sd)
        with torch.device("meta"):  # shapes only: the checkpoint's tensors become the parameters below
            model = build_sam_med2d(chosen)
        load_into(model, source.sd, assign=True)
        if not source.checked:  # a cached conversion was checked when it was written
            _check_finite(source.sd, path)
    except Exception as error:  # a registry download that cannot load is removed: the next fetch gets it anew
        replacement = discard_unloadable(path, error)
        if replacement is error:
            raise
        raise replacement from error
    info = _store_in_cache(path, source, cache_dir)
    pin_loaded(path, info.sha256)  # a registry download: its hash pinned, a swapped file refused
    source.sd.clear()
    model.reset_constants()
    model.eval().to(target)
    return model, dataclasses.replace(info, build=chosen)


__all__ = [
    "CACHE_ENV",
    "FORMAT_TAG",
    "CheckpointError",
    "CheckpointInfo",
    "cached_safetensors_path",
    "convert_to_safetensors",
    "default_cache_dir",
    "extract_state_dict",
    "infer_build",
    "load_checkpoint_object",
    "load_into",
    "load_model",
    "resolve_device",
    "sha256_file",
    "source_sha256",
]

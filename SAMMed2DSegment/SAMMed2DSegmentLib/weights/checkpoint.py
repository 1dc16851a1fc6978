"""Loading SAM-Med2D weights safely, strictly and fast.

Why this module exists:

* The official checkpoint (`sam-med2d_b.pth`, ~2.4 GB) is `{"model": state_dict, "optimizer": <Adam object>}`.
  Plain `torch.load(weights_only=True)` refuses the pickled optimizer, and `weights_only=False` would execute
  whatever the file asks for. We unpickle with torch's restricted unpickler and substitute the known optimizer
  classes with an inert stub, so nothing in the file runs and anything else is refused with a clear message.
* The official loader calls `load_state_dict(..., strict=False)` and silently ignores missing/unexpected keys;
  `load_into` lists every missing, unexpected and mis-shaped key instead.
* Reading a 2.4 GB pickle (mostly optimizer moments) on every start is slow: the model weights are converted
  once into a safetensors file in a cache (memory-mapped on later loads), with the source's SHA-256 stored
  in its metadata so it is never recomputed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
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

from ..files import atomic_path, sha256_file
from .cache_dir import CACHE_ENV, default_cache_dir

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


def convert_to_safetensors(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], build: str | None = None
) -> dict[str, str]:
    """Write the model state dict of checkpoint `src` atomically to safetensors `dst`; return its metadata.

    Only the model weights are kept (optimizer state is dropped); the source's SHA-256 and the build go into
    the metadata so later loads need neither the pickle nor a re-hash.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    sd, notes = extract_state_dict(load_checkpoint_object(src))
    metadata = {
        "format": FORMAT_TAG,
        "build": build or infer_build(sd),
        "source_sha256": sha256_file(src),
    }
    if notes:
        metadata["notes"] = "\n".join(notes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        save_file(_unshared(sd), str(tmp), metadata=metadata)
    return metadata



def _source_key(src: Path) -> tuple[str, str]:
    resolved = src.expanduser().resolve()
    st = resolved.stat()
    path_key = hashlib.sha256(str(resolved).encode("utf-8")).hexdigest()[:16]
    version_key = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return path_key, version_key


def cached_safetensors_path(
    src: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the converted copy of `src` lives in the cache; a changed source (size, mtime) gets a new one."""
    src = Path(src)
    path_key, version_key = _source_key(src)
    stem = re.sub(r"[^\w.-]", "_", src.stem)[:60]
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"{stem}-{path_key}-{version_key}.safetensors"


def _remove_stale(cached: Path) -> None:
    """Delete earlier conversions of the same source path (older size/mtime) so the cache does not grow."""
    prefix = cached.name.rsplit("-", 1)[0] + "-"
    for other in cached.parent.glob(f"{glob_escape(prefix)}*.safetensors"):
        if other != cached:
            with contextlib.suppress(OSError):
                other.unlink()


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


def _read_source(
    path: Path, cache_dir: str | os.PathLike[str] | None, use_cache: bool, build: str | None
) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """The model state dict of `path` and its provenance (build left empty), via the cache when allowed."""
    source = str(path.expanduser().resolve())
    if _sniff(path) == "safetensors":
        tensors, metadata = _load_safetensors(path)
        sd, notes = extract_state_dict(tensors)
        sha = metadata.get("source_sha256") if metadata.get("format") == FORMAT_TAG else None
        info = CheckpointInfo("", source, sha or sha256_file(path), False, False, source, notes)
        return sd, info

    if use_cache:
        cached = cached_safetensors_path(path, cache_dir)
        if cached.is_file():
            try:
                tensors, metadata = _load_safetensors(cached)
                if metadata.get("format") == FORMAT_TAG and metadata.get("source_sha256"):
                    sd, _ = extract_state_dict(tensors)
                    notes = tuple(filter(None, metadata.get("notes", "").split("\n")))
                    info = CheckpointInfo(
                        "", source, metadata["source_sha256"], True, False, str(cached), notes
                    )
                    return sd, info
            except CheckpointError as exc:
                log.warning("ignoring unreadable cached copy %s (%s); converting again", cached, exc)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            metadata = convert_to_safetensors(path, cached, build=build)
        except OSError as exc:
            log.warning(
                "cannot write the checkpoint cache in %s (%s); loading %s directly", cached.parent, exc, path
            )
        else:
            _remove_stale(cached)
            tensors, _ = _load_safetensors(cached)
            sd, _ = extract_state_dict(tensors)
            notes = tuple(filter(None, metadata.get("notes", "").split("\n")))
            info = CheckpointInfo("", source, metadata["source_sha256"], True, True, str(cached), notes)
            return sd, info

    sd, notes = extract_state_dict(load_checkpoint_object(path))
    return sd, CheckpointInfo("", source, sha256_file(path), False, False, source, notes)


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    build: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> tuple[nn.Module, CheckpointInfo]:
    """Build the network for checkpoint `path`, load it strictly, and return it in eval mode on `device`.

    A safetensors file is read directly (memory-mapped); a `.pth` is converted once into the cache (unless
    `use_cache=False` or the cache is not writable) so later starts skip the pickle and the hash.
    """
    from ..model import build_sam_med2d

    target = resolve_device(device)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    sd, info = _read_source(path, cache_dir, use_cache, build)
    chosen = build or infer_build(sd)
    with torch.device("meta"):  # shapes only: the checkpoint's tensors become the parameters below
        model = build_sam_med2d(chosen)
    load_into(model, sd, assign=True)
    del sd
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
]

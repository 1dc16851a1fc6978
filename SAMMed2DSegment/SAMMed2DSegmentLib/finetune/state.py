"""Training state: weights, optimizer, counters and random state in one safetensors file (nothing is ever
unpickled, one atomic rename keeps them consistent); the learning-rate schedule; the exported weights."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path
from ..model import SamMed2D
from .settings import MODEL_FORMAT, STATE_FORMAT, FinetuneConfig, FinetuneError


def learning_rate(config: FinetuneConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: SamMed2D, config: FinetuneConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )


def freeze(model: SamMed2D, freeze_encoder: bool) -> None:
    """With `freeze_encoder`, only the encoder's adapters (and the prompt encoder and decoder) learn:
    SAM-Med2D's own recipe for adapting a large encoder cheaply."""
    for name, param in model.image_encoder.named_parameters():
        param.requires_grad = not freeze_encoder or ".Adapter." in name


def save_state(path: Path, model: SamMed2D, optimizer: torch.optim.Optimizer, run: dict) -> None:
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, entry in opt["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{pid}.{key}"] = value.detach().contiguous()
    run = dict(run, param_groups=[{k: v for k, v in g.items()} for g in opt["param_groups"]])
    with atomic_path(path, suffix=".tmp.safetensors") as temporary:
        # Bytes written through the temporary file keep its umask permissions (save_file makes it 0600).
        temporary.write_bytes(save(tensors, metadata={"format": STATE_FORMAT, "run": json.dumps(run)}))


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(model state dict, optimizer tensors by 'pid.key', run JSON) of a training state file. A file that is
    not a state, or whose run record is not a JSON object, is a FinetuneError (one line)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise FinetuneError(f"cannot read training state {path}: {_first_line(exc)}") from None
    if metadata.get("format") != STATE_FORMAT:
        raise FinetuneError(f"{path} is not a SAMMed2D training state")
    try:
        run = json.loads(metadata.get("run", ""))
    except (ValueError, RecursionError):
        run = None
    if not isinstance(run, dict):
        raise FinetuneError(f"training state {path} is damaged: its run record is not a JSON object")
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    optim = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
    return model_sd, optim, run


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: What a run record must hold, and of which JSON type, for a resume (`rng` is checked by numpy itself).
_RUN_FIELDS = {"config": dict, "step": int, "seconds": (int, float), "best_step": int, "best_score": dict,
               "history": list, "rng": dict, "param_groups": list}  # fmt: skip


def check_run_record(path: Path, run: dict, steps: int) -> None:
    """Refuse a damaged run record in one line naming the field, and a state with nothing left to train:
    its step at or past `steps` (`--steps`), which used to end the run silently with exit 0."""
    for key, kind in _RUN_FIELDS.items():
        if key not in run:
            raise FinetuneError(f"training state {path} is damaged: its run record has no {key!r}")
        if not isinstance(run[key], kind) or isinstance(run[key], bool):
            raise FinetuneError(f"training state {path} is damaged: {key!r} is {str(run[key])[:40]!r}")
    if run["step"] < 0:
        raise FinetuneError(f"training state {path} is damaged: step {run['step']} is negative")
    if run["step"] >= steps:
        raise FinetuneError(
            f"{path} has already trained {run['step']} steps, {'past' if run['step'] > steps else 'all'} of "
            f"--steps {steps}: nothing left to train (its best weights are in best.safetensors; start a new "
            "--out-dir for another run)"
        )


def restore_model(path: Path, model: SamMed2D, model_sd: dict[str, torch.Tensor]) -> None:
    """Load the state's weights, refusing in one line names or shapes that are not this build's."""
    expected = model.state_dict()
    for name, value in expected.items():
        if name not in model_sd:
            raise FinetuneError(f"training state {path} is damaged: weight {name!r} is missing")
        if model_sd[name].shape != value.shape:
            raise FinetuneError(
                f"training state {path} is damaged: weight {name!r} has shape {tuple(model_sd[name].shape)}, "
                f"{tuple(value.shape)} expected"
            )
    extra = sorted(set(model_sd) - set(expected))
    if extra:
        raise FinetuneError(f"training state {path} is damaged: unknown weight {extra[0]!r}")
    model.load_state_dict(model_sd)


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], run: dict, path: Path | None = None
) -> None:
    """Give the optimizer its saved moments, each checked against the parameter it belongs to (a reshaped
    moment is only found by torch at the next step, as a traceback), and its parameter groups."""
    where = f"training state {path}" if path else "the training state"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid_text, _, name = key.partition(".")
        if not pid_text.isdigit() or not name or int(pid_text) >= len(params):
            raise FinetuneError(f"{where} is damaged: unknown optimizer entry {key!r}")
        shape = () if name == "step" else params[int(pid_text)].shape
        if value.shape != shape or not value.dtype.is_floating_point or not torch.isfinite(value).all():
            raise FinetuneError(
                f"{where} is damaged: optimizer entry {key!r} has shape {tuple(value.shape)} "
                f"({value.dtype}), {tuple(shape)} finite values expected"
            )
        state.setdefault(int(pid_text), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": run["param_groups"]})
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        reason = _first_line(exc)
        raise FinetuneError(f"{where} is damaged: its optimizer groups do not fit ({reason})") from None


def restore_rng(path: Path, rng: np.random.Generator, saved: object) -> None:
    """Set the random generator's saved state; numpy refuses a damaged one with various exceptions."""
    try:
        rng.bit_generator.state = saved
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        reason = _first_line(exc)
        raise FinetuneError(f"training state {path} is damaged: its random state ({reason})") from None


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted. safetensors writes the metadata map in hash order,
    which differs between processes, so two identical trainings gave different bytes; a key order changes
    neither the header's length nor any offset."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:  # cannot happen for a header safetensors wrote compactly; keep the file as is
        return data
    return data[:8] + text + b" " * (length - len(text)) + data[8 + length :]


def export_model(model: SamMed2D, path: str | os.PathLike[str], metadata: dict[str, str]) -> None:
    """Inference weights as plain safetensors (what `checkpoint.load_model` reads), written atomically and
    byte for byte the same for the same weights and metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(Path(path), suffix=".tmp.safetensors") as temporary:
        data = save(tensors, metadata={"format": MODEL_FORMAT, **metadata})
        temporary.write_bytes(canonical_safetensors(data))

"""Training state: weights, optimizer, counters and random state in one safetensors file (nothing is ever
unpickled, one atomic rename keeps them consistent); the learning-rate schedule; the exported weights."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

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
    """(model state dict, optimizer tensors by 'pid.key', run JSON) of a training state file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise FinetuneError(f"cannot read training state {path}: {exc}") from exc
    if metadata.get("format") != STATE_FORMAT:
        raise FinetuneError(f"{path} is not a SAMMed2D training state")
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    optim = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
    return model_sd, optim, json.loads(metadata["run"])


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], run: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = run["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


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

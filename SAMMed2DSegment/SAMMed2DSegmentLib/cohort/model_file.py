"""The model of a cohort run as the client sees it, before any worker loads it: the checkpoint file's SHA-256
(so every worker loads the same model, and `--resume` sees a new one) and the model options each case passes
on to its command."""

from __future__ import annotations

from pathlib import Path

from . import CohortError


class ModelFileError(CohortError):
    """The named model cannot be found (not downloaded, no such file)."""


def model_file_sha256(checkpoint: str | None, model: str | None, download: bool) -> str:
    """SHA-256 of --checkpoint FILE, else of the --model registry entry's file (fetched with `download`);
    remembered per file by the checkpoint cache, so a large checkpoint is hashed once."""
    from ..weights.checkpoint import source_sha256
    from ..weights.registry import WeightsError, resolve_model

    option = "--checkpoint" if checkpoint else "--model"
    if checkpoint and not Path(checkpoint).is_file():
        raise ModelFileError(f"--checkpoint: no such file: {checkpoint}")
    try:
        path = resolve_model(checkpoint or model or "demo", download=download)
    except WeightsError as exc:
        raise ModelFileError(f"{option}: {exc}") from None
    return source_sha256(path)


def model_argv(checkpoint: str | None, model: str | None, device: str, precision: str) -> list[str]:
    """The model options every case passes on (absolute paths: workers may run in another folder)."""
    argv = ["--checkpoint", str(Path(checkpoint).resolve())] if checkpoint else []
    argv += ["--model", model] if model else []
    return [*argv, "--device", device, "--precision", precision]

"""The training loop: batches, prompting rounds, validation every `eval_every` steps, the state every
`save_every` steps.

Why it looks like this:

* Training samples are 2-D slices cut with the engine's own `SliceGeometry` (`data`), so a model sees slices
  oriented and stretched exactly as it will at inference.
* Prompts follow SAM-Med2D's recipe (`prompts`): random include points, jittered boxes, then corrective
  rounds, each adding a click from the error region with the previous logits as mask prompt.
* All randomness comes from one numpy generator whose state is saved with the weights, so a run is
  deterministic for a seed and an interrupted run resumes exactly where it stopped.
* The state is one safetensors file (`state`): nothing is ever unpickled, and a single atomic rename keeps
  weights, optimizer and counters consistent.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..memory import NotEnoughMemory, require_memory
from ..model import SamMed2D, build_sam_med2d
from ..weights.checkpoint import CheckpointError, CheckpointInfo, load_model
from .batches import make_batch
from .data import Pair, load_training_set
from .settings import FinetuneConfig, FinetuneError, training_memory_bytes
from .state import (
    check_run_record,
    export_model,
    freeze,
    learning_rate,
    load_state,
    make_optimizer,
    restore_model,
    restore_optimizer,
    restore_rng,
    save_state,
)
from .step import training_step
from .validation import ValidationBatch, check_validation_volumes, validate, validation_batches


@dataclass
class FinetuneResult:
    steps: int
    seconds: float
    samples_per_second: float
    best_step: int
    best_score: dict[str, float]
    history: list[dict]


def _load_checkpoint(path: str | os.PathLike[str]) -> tuple[SamMed2D, CheckpointInfo]:
    """(model, info) of a checkpoint file; an unreadable or unsafe one is a `FinetuneError` (one line)."""
    try:
        return load_model(path, device="cpu")
    except CheckpointError as exc:
        raise FinetuneError(str(exc)) from exc


def _initial_model(config: FinetuneConfig) -> SamMed2D:
    if config.init_checkpoint is None:
        if config.build != "small":
            raise FinetuneError(
                f"training the {config.build} build from scratch is not supported; pass --init CHECKPOINT"
            )
        return build_sam_med2d(config.build)
    model, info = _load_checkpoint(config.init_checkpoint)
    if info.build != config.build:
        raise FinetuneError(
            f"--init {config.init_checkpoint} is a {info.build} checkpoint, but --build is {config.build}"
        )
    # load_model memory-maps the file read-only: train on owned copies of the tensors.
    for param in model.parameters():
        param.data = param.data.clone()
    return model


def finetune(
    config: FinetuneConfig,
    pairs: Sequence[Pair],
    out_dir: str | os.PathLike[str],
    *,
    validation_pairs: Sequence[Pair] = (),
    resume: bool = False,
    progress: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
) -> FinetuneResult:
    """Train and keep `last.safetensors` (resumable state) and `best.safetensors` (inference weights of the
    best validation score) in `out_dir`. `stop_after` ends the run at that step, like an interruption.
    `validation_pairs`: volumes only validated on (see `load_training_set`)."""
    config.check()
    try:  # before any volume is read: an absurd --batch-size is refused at once, with the estimate
        require_memory(
            training_memory_bytes(config.build, config.batch_size),
            f"--batch-size {config.batch_size} with the {config.build} build",
            "lower --batch-size",
        )
    except NotEnoughMemory as exc:
        raise FinetuneError(str(exc)) from None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"the output folder {out} is a file")
    state_path, best_path = out / "last.safetensors", out / "best.safetensors"
    data = load_training_set(pairs, config, validation_pairs)
    torch.manual_seed(config.seed)  # the initial weights of a build trained from scratch
    model = _initial_model(config)
    freeze(model, config.freeze_encoder)
    optimizer = make_optimizer(model, config)
    rng = np.random.default_rng(config.seed)
    inputs = {"training": data.digests[: len(pairs)], "validation": data.digests[len(pairs) :]}
    run: dict = {"config": asdict(config), "inputs": inputs, "step": 0, "seconds": 0.0, "best_step": -1,
                 "best_score": {}, "history": []}  # fmt: skip
    pooled_state = False  # a resumed state that may hold a best score pooled over volumes
    if resume and state_path.is_file():
        model_sd, optim_tensors, saved = load_state(state_path)
        check_run_record(state_path, saved, config.steps)
        # States written before a setting existed (precision, the loss and sampling options) ran with its
        # default.
        defaults = json.loads(json.dumps(asdict(FinetuneConfig())))
        if {**defaults, **saved["config"]} != json.loads(json.dumps(asdict(config))):
            raise FinetuneError(f"{state_path} was written with other settings; use them or a new folder")
        # Other volumes would mix two trainings in one run, and best-step scores from two validation sets.
        # States written before the inputs were recorded lack them and are taken on trust.
        if saved.get("inputs", inputs) != inputs:
            raise FinetuneError(
                f"{state_path} was written for other volumes or labels (training or validation); give the "
                "same ones or use a new folder"
            )
        restore_model(state_path, model, model_sd)
        restore_optimizer(optimizer, optim_tensors, saved, state_path)
        restore_rng(state_path, rng, saved["rng"])
        run = {k: v for k, v in saved.items() if k not in ("rng", "param_groups")} | {"inputs": inputs}
        running = run.pop("running_loss", None)
        # States without recorded inputs may come from before validation was averaged per volume, when
        # several volumes were scored as one pool.
        pooled_state = "inputs" not in saved
    elif state_path.exists() and not resume:
        raise FinetuneError(f"{state_path} exists: pass --resume to continue it, or use a new folder")
    else:
        running = None
    val_batches = validation_batches(data)
    check_validation_volumes(val_batches, validation_pairs, first=len(pairs), min_pixels=config.min_pixels)
    if pooled_state and len({v for item in val_batches for v in item.volumes}) > 1:
        # Rescore their best weights so later steps compare like with like.
        run["best_score"] = _current_score(best_path, val_batches, run["best_score"])
    out.mkdir(parents=True, exist_ok=True)  # created only once the inputs have been read and checked
    model.train()
    start_step, t_start = run["step"], time.perf_counter()
    elapsed_before = run["seconds"]
    last = stop_after if stop_after is not None else config.steps
    for step in range(start_step, min(last, config.steps)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        batch = make_batch(data, rng, config.batch_size, config.axis_weights, config.size_exponent)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            loss = training_step(model, batch, rng, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        done = step + 1
        seconds = elapsed_before + time.perf_counter() - t_start
        if done % config.eval_every == 0 or done == config.steps:
            score = validate(model, val_batches)
            entry = {"step": done, "loss": round(running, 4), "seconds": round(seconds, 1),
                     **{f"val_{k}": round(v, 4) for k, v in score.items()}}  # fmt: skip
            run["history"].append(entry)
            if score and score["mean"] > run["best_score"].get("mean", -1.0):
                run["best_step"], run["best_score"] = done, score
                export_model(model, best_path, _model_metadata(config, done, score))
            if progress:
                progress({"event": "eval", **entry})
        if done % config.save_every == 0 or done == config.steps:
            run.update(step=done, seconds=seconds, rng=rng.bit_generator.state, running_loss=running)
            save_state(state_path, model, optimizer, run)
            run.pop("rng"), run.pop("running_loss")
        if progress:
            progress({"event": "step", "step": done, "steps": config.steps, "loss": running,
                      "seconds": seconds, "samples": (done - start_step) * config.batch_size,
                      "session_steps": done - start_step,
                      "session_seconds": time.perf_counter() - t_start})  # fmt: skip
    if not val_batches and config.steps <= last:
        export_model(model, best_path, _model_metadata(config, config.steps, {}))
    seconds = elapsed_before + time.perf_counter() - t_start
    session = time.perf_counter() - t_start
    done_steps = min(last, config.steps)
    return FinetuneResult(
        steps=done_steps,
        seconds=seconds,
        samples_per_second=(done_steps - start_step) * config.batch_size / max(session, 1e-9),
        best_step=run["best_step"],
        best_score=run["best_score"],
        history=run["history"],
    )


def _current_score(
    best_path: Path, batches: list[ValidationBatch], recorded: dict[str, float]
) -> dict[str, float]:
    """The validation score of the weights in `best_path` as `validate` computes it now (`recorded` if
    there are none yet)."""
    if not recorded or not best_path.is_file():
        return recorded
    return validate(_load_checkpoint(best_path)[0], batches)


def _model_metadata(config: FinetuneConfig, step: int, score: dict[str, float]) -> dict[str, str]:
    return {
        "build": config.build,
        "step": str(step),
        "seed": str(config.seed),
        "validation": json.dumps({k: round(v, 4) for k, v in score.items()}),
        "config": json.dumps(asdict(config)),
    }

"""`python -m SAMMed2DSegmentLib finetune`: the options, the output plan, and the progress lines (the
training itself is `finetune/`)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from ..files import atomic_path
from ..finetune.batches import LARGE_AREA_PX
from ..finetune.settings import MODEL_FORMAT, STATE_FORMAT, FinetuneConfig, FinetuneError
from ..finetune.training import FinetuneResult, finetune
from ..model import CONFIGS
from ..outputs import Kind, input_files, safetensors_of
from .common import CommandError, Interrupted, planned


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="train a SAM-Med2D build on labelled volumes")
    p.set_defaults(run_command=run_finetune, summarize=summary)
    p.add_argument("--image", action="append", default=[], required=True, help="image volume (repeatable)")
    p.add_argument("--labels", action="append", default=[], required=True,
                   help="label map on the image's grid, one per --image (same order)")  # fmt: skip
    p.add_argument(
        "--val-image",
        action="append",
        default=[],
        help="a volume only validated on, never trained on (repeatable)",
    )
    p.add_argument("--val-labels", action="append", default=[], help="its label map, one per --val-image")
    p.add_argument("--out-dir", required=True, help="folder for last.safetensors and best.safetensors")
    p.add_argument("--build", default="small", choices=sorted(CONFIGS))
    p.add_argument("--init", help="checkpoint to start from (required for vit_b)")
    p.add_argument("--freeze-encoder", action="store_true", help="train only the encoder's adapters")
    p.add_argument("--iou-rank-weight", type=float, default=FinetuneConfig.iou_rank_weight,
                   help="weight of the IoU head's ranking loss (0: SAM's MSE only)")  # fmt: skip
    p.add_argument(
        "--all-tokens",
        action="store_true",
        help="train every multimask token on the whole structure (not SAM's best of three)",
    )
    p.add_argument(
        "--size-exponent",
        type=float,
        default=FinetuneConfig.size_exponent,
        help=f"draw large structures more often: keep each with (area / {LARGE_AREA_PX} px)^this",
    )
    p.add_argument(
        "--prompt-mix",
        type=float,
        nargs=3,
        default=list(FinetuneConfig.prompt_mix),
        metavar=("POINTS", "BOX", "BOX_POINT"),
        help="probabilities of the first prompt's kind",
    )
    p.add_argument(
        "--correction-probability",
        type=float,
        default=FinetuneConfig.correction_probability,
        help="share of batches that go on with corrective clicks after the first prompt",
    )
    p.add_argument(
        "--correction-rounds",
        type=int,
        default=FinetuneConfig.correction_rounds,
        help="at most this many corrective clicks in such a batch (1..this, drawn)",
    )
    p.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    p.add_argument("--batch-size", type=int, default=FinetuneConfig.batch_size)
    p.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    p.add_argument("--seed", type=int, default=FinetuneConfig.seed)
    p.add_argument("--eval-every", type=int, default=FinetuneConfig.eval_every)
    p.add_argument("--save-every", type=int, default=FinetuneConfig.save_every)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="fp32 (default), bf16 autocast with fp32 master weights (how the shipped demo "
                   "model was trained), or auto (bf16 where the CPU has bf16 instructions and it is faster)",
                   )  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the state in --out-dir")
    p.add_argument("--export", help="copy the best weights to this .safetensors file at the end")
    p.add_argument("--quiet", action="store_true")


def run_finetune(args) -> FinetuneResult:
    """A FinetuneError is bad input (one line, exit status 2); an interruption keeps the training state
    saved so far, and the message says where."""
    try:
        return _train(args)
    except FinetuneError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt as exc:
        message = f"interrupted; the training state last saved in {args.out_dir} is kept (--resume continues)"
        raise Interrupted(message, getattr(exc, "status", 130)) from None


def summary(result: FinetuneResult) -> str:
    """The line a finished run prints on stderr."""
    scores = ", ".join(f"{k} {v:.3f}" for k, v in result.best_score.items())
    best = f"best validation at step {result.best_step}: {scores}" if scores else "no validation slices"
    return (
        f"trained {result.steps} steps in {result.seconds / 60:.1f} min "
        f"({result.samples_per_second:.1f} samples/s); {best}"
    )


def _train(args) -> FinetuneResult:
    for prefix, images, labels in (("", args.image, args.labels), ("val-", args.val_image, args.val_labels)):
        if len(images) != len(labels):
            raise FinetuneError(
                f"{len(images)} --{prefix}image but {len(labels)} --{prefix}labels: give them in pairs"
            )
    if args.threads < 0:
        raise FinetuneError(f"--threads must be ≥ 0 (0: torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..engine.precision import resolve_precision

    choice = resolve_precision(args.precision, "cpu")
    config = replace(
        FinetuneConfig(),
        build=args.build, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        eval_every=args.eval_every, save_every=args.save_every, freeze_encoder=args.freeze_encoder,
        init_checkpoint=args.init, precision=choice.precision, iou_rank_weight=args.iou_rank_weight,
        size_exponent=args.size_exponent, prompt_mix=tuple(args.prompt_mix), all_tokens=args.all_tokens,
        correction_probability=args.correction_probability, correction_rounds=args.correction_rounds,
    )  # fmt: skip
    if args.export and not args.export.endswith(".safetensors"):
        raise FinetuneError(f"--export must end in .safetensors, got {args.export}")
    _check_finetune_outputs(args)
    if not args.quiet:  # only once the inputs and outputs passed: a refusal stays one line
        print(f"training precision: {choice.precision} ({choice.reason})", file=sys.stderr)
    result = finetune(
        config, list(zip(args.image, args.labels, strict=True)), args.out_dir, resume=args.resume,
        validation_pairs=list(zip(args.val_image, args.val_labels, strict=True)),
        progress=None if args.quiet else _print_progress,
    )  # fmt: skip
    best = Path(args.out_dir) / "best.safetensors"
    if args.export:
        with atomic_path(Path(args.export), suffix=".tmp.safetensors") as temporary:
            temporary.write_bytes(best.read_bytes())
    return result


MODEL_WEIGHTS = Kind("model weights written by finetune", safetensors_of(MODEL_FORMAT))
TRAINING_STATE = Kind("a finetune training state", safetensors_of(STATE_FORMAT))


def _check_finetune_outputs(args) -> None:
    """The same output plan as `segment`: no output (the states in --out-dir, --export) may be an input
    (images, labels, validation images and labels, --init) or another output, links included, nor a file of
    another kind; --out-dir may be missing (it is created). An earlier run's best.safetensors is replaced
    only by the run that continues it (--resume with its last.safetensors), never by a new training."""
    given = {"--image": args.image, "--labels": args.labels, "--val-image": args.val_image,
             "--val-labels": args.val_labels, "--init": [args.init] if args.init else []}  # fmt: skip
    inputs = [item for flag, paths in given.items() for path in paths for item in input_files(flag, path)]
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out-dir {out} is a file; give a folder (it is created if missing)")
    if args.export and not Path(args.export).resolve().parent.is_dir():
        raise FinetuneError(f"--export: output folder does not exist: {Path(args.export).resolve().parent}")
    last, best = out / "last.safetensors", out / "best.safetensors"
    outputs = [
        ("--out-dir's last.safetensors", last, TRAINING_STATE),
        ("--out-dir's best.safetensors", best, MODEL_WEIGHTS),
        ("--export", args.export, MODEL_WEIGHTS),
    ]
    planned(outputs, inputs, missing_folders_ok=True)
    if best.exists() and not (args.resume and last.is_file()):
        raise FinetuneError(
            f"{best} holds an earlier run's best weights; it is not replaced: continue that run with "
            "--resume (needs its last.safetensors), or use a new --out-dir"
        )


def _print_progress(event: dict) -> None:
    if event["event"] == "eval":
        scores = " ".join(f"{k[4:]} {v:.3f}" for k, v in event.items() if k.startswith("val_"))
        print(f"step {event['step']}: loss {event['loss']:.4f}, validation Dice {scores}", file=sys.stderr)
        return
    rate = event["samples"] / max(event["session_seconds"], 1e-9)
    per_step = event["session_seconds"] / max(event["session_steps"], 1)
    remaining = (event["steps"] - event["step"]) * per_step
    width = 30
    filled = int(width * event["step"] / event["steps"])
    end = "\r" if sys.stderr.isatty() else "\n"
    if end == "\n" and event["step"] % 50:
        return
    print(
        f"[{'#' * filled}{'.' * (width - filled)}] {event['step']}/{event['steps']} loss {event['loss']:.4f} "
        f"{rate:.1f} samples/s, {remaining / 60:.1f} min left",
        end=end, file=sys.stderr, flush=True,
    )  # fmt: skip

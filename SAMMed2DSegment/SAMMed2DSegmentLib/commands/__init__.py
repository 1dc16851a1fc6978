"""The headless command line (`python -m SAMMed2DSegmentLib segment|convert|finetune|evaluate …`).

One module per command; each has `add_parser(subparsers)`, which adds its options and binds `run_command`
(args -> result, raising `common.CommandError`, `OutputError` or `Interrupted`) and `summarize` (result -> the
line printed on stderr) with `set_defaults`. Adding a command is its import and its entry in `COMMANDS`. Exit
status: 0 done, 2 bad input (one line), 1 an output could not be written, 128 + the signal when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from ..outputs import OutputPlanError
from . import batch, convert, evaluate, finetune, segment
from .common import (
    EXIT_BAD_INPUT,
    EXIT_WRITE_FAILED,
    UNWINDING_SIGNALS,
    CommandError,
    Interrupted,
    OutputError,
    raise_on_signal,
)

#: The commands in the order `--help` lists them.
COMMANDS = (segment, convert, finetune, evaluate, batch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -P -m SAMMed2DSegmentLib", description=__doc__.splitlines()[0]
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; library warnings are shown as one line of ours (`console.one_line_warnings`)."""
    from ..console import one_line_warnings

    with one_line_warnings():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, raise_on_signal) for signum in UNWINDING_SIGNALS}
    try:
        outcome = args.run_command(args)
    except (CommandError, OutputPlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except KeyboardInterrupt as exc:
        print(str(exc) if isinstance(exc, Interrupted) else "interrupted; nothing written", file=sys.stderr)
        return getattr(exc, "status", 130)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not args.quiet:
        print(args.summarize(outcome), file=sys.stderr)
    return args.exit_status(outcome) if hasattr(args, "exit_status") else 0

"""Children that take Ctrl-C as they would in a terminal, however the tests themselves were started."""

from __future__ import annotations

import signal


def sigint_as_in_a_terminal() -> None:
    """`preexec_fn` for a child that the test interrupts with SIGINT: a shell starts background jobs (`cmd &`,
    nohup, some CI runners) with SIGINT ignored, children inherit that, and Python then installs no
    KeyboardInterrupt handler, so the child would never see the Ctrl-C the test sends. A terminal's
    foreground job has SIGINT at its default, which this restores."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

"""Warnings on the command line as one line of ours.

Why: Python shows a library's warning as `path:line: UserWarning: text` followed by the source line, so
highdicom's person-name warning reached users as two long lines naming a file inside site-packages. Every
message of the command line is one line; so are warnings. Deprecation notices speak to developers, not
users, and are dropped. Stdlib only.
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import PurePath
from typing import TextIO

#: Warnings meant for developers of the code that calls a library; nothing a user can act on.
SILENCED = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ResourceWarning)
#: Libraries that log every warning they give (pydicom's `warn_and_log`): the log line already said it.
LOGGED_BY_SOURCE = ("pydicom",)
#: A longer warning keeps its first sentence (highdicom's person-name warning is 500 characters of advice
#: on building names, about headers the user did not write).
MAX_CHARS = 200


def _source(filename: str) -> str:
    """The package a warning came from ('highdicom'), or '' for this package and unknown places."""
    parts = PurePath(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            name = parts[parts.index(marker) + 1]
            return PurePath(name).stem.split("-")[0]
    return ""


def one_line(message: Warning | str, filename: str = "") -> str:
    """`warning: [library: ]text` on one line: whitespace runs collapsed, long text cut to its first
    sentence."""
    text = re.sub(r"\s+", " ", str(message)).strip()
    if len(text) > MAX_CHARS:
        first = re.match(r"(.+?[.!?])(\s|$)", text)
        text = first.group(1) if first and len(first.group(1)) <= MAX_CHARS else text[: MAX_CHARS - 1] + "…"
    source = _source(filename)
    return f"warning: {source}: {text}" if source and source != "SAMMed2DSegmentLib" else f"warning: {text}"


def _show(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    if _source(filename) in LOGGED_BY_SOURCE:
        return
    print(one_line(message, filename), file=file or sys.stderr)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Within: warnings print as `one_line`, each once per place, developer notices dropped (unless the
    user chose filters with -W or PYTHONWARNINGS); the previous warning settings come back afterwards."""
    with warnings.catch_warnings():
        if not sys.warnoptions:  # a user's -W or PYTHONWARNINGS choice stands
            warnings.simplefilter("default")
            for category in SILENCED:
                warnings.simplefilter("ignore", category)
        warnings.showwarning = _show
        yield


__all__ = ["one_line", "one_line_warnings"]

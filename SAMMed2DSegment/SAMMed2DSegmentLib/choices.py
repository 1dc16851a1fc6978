"""Constants and tiny pure functions the panel and the command line share (standard library only, so they
are available before torch or Slicer's classes are)."""

from __future__ import annotations

import hashlib
import re

#: The image encoder's arithmetic (`engine.precision`): "auto" picks one of the others for the machine.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")

#: Segment colours (RGB 0..1) in the spirit of Slicer's generic anatomy colours. A segment's colour is picked
#: from its name, never at random, so the same run always gives the same file.
SEGMENT_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.502, 0.682, 0.502),
    (0.945, 0.839, 0.569),
    (0.694, 0.478, 0.396),
    (0.435, 0.722, 0.824),
    (0.847, 0.396, 0.310),
    (0.867, 0.510, 0.396),
    (0.565, 0.933, 0.565),
    (0.753, 0.408, 0.690),
)


def _name_digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def segment_id_for_name(name: str) -> str:
    """A stable segment ID derived from the segment name: readable (the name with unsafe characters replaced)
    plus 8 hex digits of its SHA-256, so two names that differ only in punctuation still get distinct IDs.
    Slicer's own IDs are random, which made two identical runs write different files."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:40] or "segment"
    return f"{readable}_{_name_digest(name)[:8]}"


def segment_color_for_name(name: str) -> tuple[float, float, float]:
    """The palette colour for a segment name (same name, same colour, in every file)."""
    return SEGMENT_COLORS[int(_name_digest(name)[:8], 16) % len(SEGMENT_COLORS)]

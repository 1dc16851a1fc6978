"""The output plan: the one set of rules every writer checks before any work (`segment`, `convert`,
`evaluate`, `finetune` and the module's DICOM-SEG export), so no writer can destroy what it did not make.

- Every output is compared with every input and every other output by inode (links count) before any work.
- An existing output must be a file of the kind we write there (a `.seg.nrrd` must be a segmentation, a
  `.dcm` a DICOM-SEG, …), or it is refused by name: a CT volume called `x.seg.nrrd` is never rewritten. An
  empty file holds nothing to lose and may be replaced.
- Devices, FIFOs and sockets are refused; `-` means standard output where a format allows it.
- A symlinked output is written through to the file it names, atomically (a temporary file beside the
  target, renamed over it): the link stays a link. A link to a missing file is refused.
- Names must fit the file system's name limit; temporary names are shortened to fit (files.temporary_name).
- Once the plan passes, temporary files a killed run left in the output folders (our name pattern only,
  held by no live run) are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .files import lock_name, locked, name_max, remove_stale_temporaries, same_file, write_target

STDOUT = "-"
_SNIFF_BYTES = 1 << 16
_JSON_LIMIT = 64 << 20  # our JSON outputs are far smaller; anything bigger is not ours
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


class OutputPlanError(ValueError):
    """An output would overwrite an input, another output, or a file that is not ours to replace."""


@dataclass(frozen=True)
class Kind:
    """What a writer puts in an output: `recognise` says whether an existing file is one of those."""

    description: str
    recognise: Callable[[Path], bool]
    stdout: bool = False  # "-" writes to standard output


def _head(path: Path, size: int = _SNIFF_BYTES) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(size)


def _is_segmentation_nrrd(path: Path) -> bool:
    """A NRRD whose header carries Slicer's segmentation fields (a plain volume has none)."""
    head = _head(path)
    if not head.startswith(b"NRRD000"):
        return False
    header = head.split(b"\n\n", 1)[0]
    return any(line.startswith((b"Segmentation_", b"Segment0_")) for line in header.splitlines())


def _is_dicom_seg(path: Path) -> bool:
    """A DICOM file of the Segmentation Storage class (never a source image or another object)."""
    if _head(path, 132)[128:132] != b"DICM":
        return False
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001 - any unreadable file is simply not one of ours
        return False
    return str(dataset.get("SOPClassUID", "")) == SEGMENTATION_STORAGE


def json_with(*keys: str) -> Callable[[Path], bool]:
    """A recogniser for our JSON outputs: a JSON object holding `keys`."""

    def recognise(path: Path) -> bool:
        if path.stat().st_size > _JSON_LIMIT:
            return False
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return False
        return isinstance(document, dict) and all(key in document for key in keys)

    return recognise


def safetensors_of(*formats: str) -> Callable[[Path], bool]:
    """A recogniser for safetensors files whose metadata `format` is one of `formats` (ours)."""

    def recognise(path: Path) -> bool:
        head = _head(path, 8)
        if len(head) < 8:
            return False
        length = int.from_bytes(head, "little")
        if not 2 <= length <= 100 << 20:
            return False
        with open(path, "rb") as fh:
            fh.seek(8)
            try:
                header = json.loads(fh.read(length))
            except (ValueError, UnicodeDecodeError):
                return False
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
        return isinstance(metadata, dict) and metadata.get("format") in formats

    return recognise


SEGMENTATION = Kind("a segmentation (.seg.nrrd)", _is_segmentation_nrrd)
DICOM_SEG = Kind("a DICOM-SEG", _is_dicom_seg)
SEGMENT_REPORT = Kind("a segment report", json_with("volume", "slices"), stdout=True)


@dataclass(frozen=True)
class PlannedOutput:
    role: str
    name: str
    kind: Kind
    target: Path | None  # where the bytes go (a link's target); None for standard output


def _special(mode: int) -> str | None:
    for test, what in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return what
    return None if stat.S_ISREG(mode) else "not a regular file"


def _target(role: str, name: str) -> Path:
    """The file an output's bytes will go to: itself, or the file its link names."""
    path = Path(name)
    if path.is_symlink() and not path.exists():
        raise OutputPlanError(f"{role} {name} is a link to a missing file; name the file itself")
    return write_target(path)


def _check_one(role: str, name: str, target: Path, kind: Kind, missing_folders_ok: bool) -> None:
    """The checks on one output by itself: what it is now, its folder, its name's length."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputPlanError(f"{role} {name} is a folder; give a file name")
    if mode is not None and (what := _special(mode)):
        allowed = " (use - for standard output)" if kind.stdout else ""
        raise OutputPlanError(f"{role} {name} is {what}; give a regular file{allowed}")
    if mode is not None and target.stat().st_size and not kind.recognise(target):
        raise OutputPlanError(
            f"{role} {name} exists and is not {kind.description}; it is not replaced (move it or choose "
            "another name)"
        )
    parent = target.resolve().parent
    if parent.is_dir():
        if not os.access(parent, os.W_OK):
            raise OutputPlanError(f"{role}: output folder is not writable: {parent}")
        limit = name_max(parent)
    elif not missing_folders_ok:
        raise OutputPlanError(f"{role}: output folder does not exist: {parent}")
    else:
        limit = 255
    try:
        encoded = target.name.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8 (Python keeps them as surrogates)
        raise OutputPlanError(
            f"{role}: the name {target.name!r} is not valid UTF-8; choose another"
        ) from None
    if len(encoded) > limit:
        raise OutputPlanError(f"{role}: the name {target.name[:40]}… is longer than {limit} bytes")


def plan_outputs(
    outputs: Sequence[tuple[str, str | os.PathLike[str] | None, Kind]],
    inputs: Sequence[tuple[str, Path]],
    missing_folders_ok: bool = False,
) -> OutputPlan:
    """Check every output (role, name or None when not asked for, kind) against the rules above and against
    every input (role, path) and every other output; raise OutputPlanError naming the problem, before any
    work. `missing_folders_ok`: the caller creates missing folders. Then clear stale temporaries."""
    planned: list[PlannedOutput] = []
    for role, name, kind in outputs:
        if name is None or name == "":
            continue
        name = os.fspath(name)
        if name == STDOUT:
            if not kind.stdout:
                raise OutputPlanError(f"{role} cannot be standard output (-); give a file name")
            planned.append(PlannedOutput(role, name, kind, None))
            continue
        target = _target(role, name)
        for other_role, other in [*inputs, *((p.role, p.target) for p in planned if p.target)]:
            if same_file(target, other):
                raise OutputPlanError(
                    f"{role} {name} is the same file as {other_role} {other}; choose another output path"
                )
        _check_one(role, name, target, kind, missing_folders_ok)
        planned.append(PlannedOutput(role, name, kind, target))
    plan = OutputPlan(planned)
    for folder in {p.target.parent for p in planned if p.target and p.target.parent.is_dir()}:
        remove_stale_temporaries(folder)
    return plan


@dataclass(frozen=True)
class OutputPlan:
    """Outputs that passed the checks; `lock` serialises runs that update one of them."""

    outputs: list[PlannedOutput]

    def get(self, role: str) -> PlannedOutput | None:
        return next((p for p in self.outputs if p.role == role), None)

    @contextlib.contextmanager
    def lock(self, role: str, quiet: bool = False) -> Iterator[None]:
        """Hold the advisory lock beside the output `role` (a file we create, `.NAME.lock`, removed at the
        end), so two runs updating one file take turns: each reads what the other wrote, and neither loses a
        segment. OutputPlanError when the lock file cannot be made."""
        planned = self.get(role)
        if planned is None or planned.target is None:
            yield
            return
        target = planned.target

        def waiting() -> None:
            if not quiet:
                print(f"waiting for another run that is updating {planned.name}…", file=sys.stderr)

        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(locked(target.parent / lock_name(target), on_wait=waiting))
            except OSError as exc:
                raise OutputPlanError(f"{role}: cannot lock {planned.name} ({exc.strerror or exc})") from None
            yield


def input_files(role: str, path: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """The files an input option reads, with their role for messages: a folder (a DICOM series) stands for
    every file in it."""
    path = Path(path)
    if path.is_dir():
        return [(f"file {p.name} of the {role} folder", p) for p in sorted(path.iterdir()) if p.is_file()]
    return [(role, path)] if path.exists() else []

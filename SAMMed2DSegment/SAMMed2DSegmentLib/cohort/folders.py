"""Case folders appear whole or not at all: each case writes into a hidden temporary folder beside its final
place (same file system), which the client renames into place once the case is done. An interrupted or failed
case leaves nothing; a finished one is never touched again by this run."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..files import TEMPORARY_NAME, remove_tree, temporary_name

#: What a case folder of ours may hold (anything else means it is not ours to replace).
REPORT = "report.json"


def case_files(case: str) -> tuple[str, ...]:
    return (f"{case}.seg.nrrd", REPORT, f"{case}-seg.dcm")


def is_ours(folder: Path, case: str) -> bool:
    """A folder a batch made: only the files a case writes, and a report with the batch record."""
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return False
    report = folder / REPORT
    if not names <= set(case_files(case)) or not report.is_file():
        return False
    import json

    try:
        return "batch" in json.loads(report.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False


def _remove(folder: Path) -> None:
    """Remove a temporary folder of ours; a worker that was still writing may add a file meanwhile, and a
    folder that still cannot go is left for the next run's `remove_stale`."""
    with contextlib.suppress(OSError):
        remove_tree(folder, attempts=5, pause=0.2)


class CaseFolders:
    """The temporary folders of one run: made on submission, renamed into place when done, removed else."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._pending: dict[str, Path] = {}

    def final(self, case: str) -> Path:
        return self.out_dir / case

    def make(self, case: str) -> Path:
        folder = self.out_dir / temporary_name(self.final(case), ".tmp")
        folder.mkdir()
        self._pending[case] = folder
        return folder

    def place(self, case: str) -> Path:
        """Rename the case's finished folder into place, replacing an earlier folder of ours."""
        folder, final = self._pending.pop(case), self.final(case)
        old = None
        if final.exists():
            old = self.out_dir / temporary_name(final, ".tmp")
            os.rename(final, old)
        try:
            os.rename(folder, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)
            _remove(folder)
            raise
        if old is not None:
            _remove(old)
        return final

    def discard(self, case: str) -> None:
        if (folder := self._pending.pop(case, None)) is not None:
            _remove(folder)

    def discard_all(self) -> None:
        for case in list(self._pending):
            self.discard(case)


def remove_stale(out_dir: Path) -> None:
    """Remove the temporary case folders a killed run left (our name pattern, folders only); the caller holds
    the run's lock on OUT, so no live run of ours is writing them."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(out_dir):
            if TEMPORARY_NAME.match(entry.name) and entry.is_dir(follow_symlinks=False):
                _remove(Path(entry.path))


@contextlib.contextmanager
def case_folders(out_dir: Path) -> Iterator[CaseFolders]:
    """Temporary folders left unfinished when the block ends (done, failed or interrupted) are removed."""
    folders = CaseFolders(out_dir)
    try:
        yield folders
    finally:
        folders.discard_all()

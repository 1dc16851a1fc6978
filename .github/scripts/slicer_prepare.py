"""Run inside Slicer (`Slicer --python-script .github/scripts/slicer_prepare.py requirements`) by
.github/workflows/slicer.yml, to get a fresh Slicer ready for SAMMed2DSegmentTest without a dialog: through
this module's own logic, what a user confirms in the panel: PyTorch with light-the-torch from its private
folder (polled child processes), then the engine's packages into the extension's private folder. Slicer's
own pip must be the same version afterwards. Exits non-zero, with one line, when a step fails.
"""

import importlib.metadata
import sys
import time

import slicer


def run_to_end(installer) -> None:
    """Poll an installer the module's way until it ends; its error, one line, is raised."""
    progress, shown = installer.poll(), ""
    while not progress.finished:
        if progress.line and progress.line != shown:
            shown = progress.line
            print(shown, flush=True)
        time.sleep(1.0)
        progress = installer.poll()
    if progress.error:
        raise RuntimeError(progress.error)


def install_requirements() -> None:
    from SAMMed2DSegment import SAMMed2DSegmentLogic

    logic = SAMMed2DSegmentLogic()
    pip = importlib.metadata.version("pip")
    state = logic.requirements()
    if state.torch_problem:
        run_to_end(logic.startTorchInstall())
        state = logic.requirements()
    if state.missing:
        run_to_end(logic.startPackageInstall(state.missing))
        state = logic.requirements()
    if not state.ready:
        raise RuntimeError(state.message)
    if importlib.metadata.version("pip") != pip:
        raise RuntimeError(f"Slicer's pip {pip} was changed to {importlib.metadata.version('pip')}")
    print(state.message)


if __name__ == "__main__":
    steps = {"requirements": install_requirements}
    try:
        steps[sys.argv[1]]()
    except Exception as error:  # one line in the job's log, and a failed step
        print(f"error: {error}", file=sys.stderr)
        slicer.util.exit(1)
    else:
        slicer.util.exit(0)
